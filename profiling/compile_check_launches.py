"""The kernel launches the engine makes on CUDA, recorded without a GPU, and the compile jobs they
give: the half of profiling/compile_check.py that knows the engine (see its docstring).

The engine's real launch code runs on meta tensors that report device cuda (shapes and strides, no
memory), with every kernel object of KERNEL_MODULES replaced by a recorder: constexprs, num_warps,
group sizes and autotune configs are read from the calls and from the modules' autotuners. Nothing at
module level imports triton or torch (compile_check's worker must drop TRITON_INTERPRET first).
"""
from __future__ import annotations

import importlib
import json
import re

KERNEL_MODULES = ("kernels.lora", "kernels.lora_grouped", "kernels.linear_cross_entropy")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Ranks the recipes use (8, 16) and a large one (64); grouped calls concatenate G adapters (qkv: 3,
# gate/up: 2), so the kernels see BLOCK_R up to next_power_of_2(3 * 64) = 256.
RANKS = (8, 16, 64)
DROPOUTS = (0.0, 0.05)
DROPOUT_SEED = 12345
# Tokens per micro-batch: at or above kernels.lora.TUNE_MIN_ROWS every config is tuned, below it
# the one small config runs untuned.
TOKENS = {"7b": (4096, 512), "test": (47,)}
# "test": the odd shapes of the GPU tests (tests/kernels/test_lora.py: M, K, N = 47, 123, 95; the
# row-kernel test's vocabulary block 256): no divisibility hints, the small-problem configs.
TEST_SHAPES = {"hidden": 123, "intermediate": 95, "kv": 95, "vocab": 1000}
TEST_CE_BLOCK_V = 256
CE_ROWS = 512


# ----------------------------------------------------------------------------- recording launches
class _LaunchRecorder:
    """Stands in for a kernel object (JIT function or autotuner) of a kernel module: `obj[grid](...)`
    records the call instead of launching it."""

    def __init__(self, module, attr, obj, sink):
        self.module, self.attr, self.obj, self.sink = module, attr, obj, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append((self.module, self.attr, self.obj, args, kwargs))


def _is_kernel_object(obj) -> bool:
    from triton.runtime.autotuner import Autotuner
    return isinstance(obj, Autotuner) or type(obj).__name__ in ("JITFunction", "InterpretedFunction")


def launchable_kernels(module) -> set[str]:
    """Names of the module's @triton.jit functions that no other one calls: the kernels (the rest,
    such as kernels.lora's _dot and _keep, are device functions inlined into them)."""
    import inspect
    raw = {raw_kernel(obj).fn.__name__: inspect.getsource(raw_kernel(obj).fn)
           for obj in vars(module).values() if _is_kernel_object(obj)}
    return {name for name in raw
            if not any(re.search(rf"\b{name}\(", src) for other, src in raw.items() if other != name)}


def raw_kernel(obj):
    """The @triton.jit function under autotune/heuristics wrappers."""
    while not type(obj).__name__ in ("JITFunction", "InterpretedFunction"):
        obj = obj.fn
    return obj


def _describe(value):
    """A launch argument as plain data for the worker: tensors by dtype and 16-byte alignment."""
    import torch
    if isinstance(value, torch.Tensor):
        aligned = (value.storage_offset() * value.element_size()) % 16 == 0
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": aligned}
    return value


def _config_dict(config) -> dict:
    options = {k: getattr(config, k, None) for k in ("num_warps", "num_stages", "num_ctas", "maxnreg")}
    return {"kwargs": dict(config.kwargs), "options": {k: v for k, v in options.items() if v is not None}}


def _launch_record(module, attr, obj, args, kwargs, scenario) -> dict:
    """One recorded call: kernel, arguments, and for autotuned kernels the configs its prune keeps."""
    import inspect
    from triton.runtime.autotuner import Autotuner
    names = list(inspect.signature(raw_kernel(obj).fn).parameters)
    params = {k: v for k, v in kwargs.items() if k in names}
    record = {"module": module, "attr": attr, "kernel": raw_kernel(obj).fn.__name__, "scenario": scenario,
              "args": [_describe(a) for a in args], "constexprs": params,
              "options": {k: v for k, v in kwargs.items() if k not in names}, "configs": None, "reachable": None}
    if isinstance(obj, Autotuner):
        configs = list(obj.configs)
        prune = getattr(obj, "early_config_prune", None)
        kept = prune(configs, dict(zip(names, args)), **params) if prune and len(configs) > 1 else configs
        # A prune may also return a config of its own (a fallback outside the tuned list): it is run too.
        configs += [k for k in kept if not any(k is c for c in configs)]
        record["configs"] = [_config_dict(c) for c in configs]
        record["reachable"] = [i for i, c in enumerate(configs) if any(c is k for k in kept)]
    return record


class _AutogradContext:
    """What torch.autograd.Function hands forward and backward: saved tensors, needed gradients."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _lora_scenarios(shapes, tokens, dtype, cuda):
    """The LoRA launches of a training step: forward and backward of one projection (with and without
    bias), of q/k/v grouped (Qwen2's q/k/v have biases) and of the grouped MLP."""
    import torch
    from kernels.lora import LoRAGroupFunction
    from kernels.lora_grouped import LoRAMLPFunction
    h, inter, kv = shapes["hidden"], shapes["intermediate"], shapes["kv"]
    new = lambda *s: torch.empty(*s, device=cuda, dtype=dtype)
    for rank in RANKS:
        for fused in (False, True):
            for p in DROPOUTS:
                hyper = (2.0, p, DROPOUT_SEED if p else 0, fused)
                impl = "triton_gemm" if fused else "triton"
                tag = f"r={rank} {impl} p={p} M={tokens}"
                groups = {"lora_linear": [(h, True)], "lora_linear nobias": [(h, False)],
                          "lora_qkv": [(h, True), (kv, True), (kv, True)]}
                for name, outs in groups.items():
                    yield f"{name} {tag}", lambda outs=outs, rank=rank, hyper=hyper: _run_group(
                        new, tokens, h, outs, rank, hyper, LoRAGroupFunction)
                yield f"lora_mlp {tag}", lambda rank=rank, hyper=hyper: _run_mlp(
                    new, tokens, h, inter, rank, hyper, LoRAMLPFunction)


def _run_group(new, tokens, k, outs, rank, hyper, function):
    g = len(outs)
    weights, lora_bs = [new(n, k) for n, _ in outs], [new(n, rank) for n, _ in outs]
    biases = [new(n) if bias else None for n, bias in outs]
    ctx = _AutogradContext()
    ys = function.forward(ctx, new(tokens, k), new(g * rank, k), hyper, *weights, *lora_bs, *biases)
    ctx.needs_input_grad = (True, True, False) + (False,) * g + (True,) * g + (False,) * g
    function.backward(ctx, *[_empty_like(y) for y in ys])


def _run_mlp(new, tokens, h, inter, rank, hyper, function):
    ctx = _AutogradContext()
    weights = [new(inter, h), new(inter, h), new(h, inter)]
    lora_bs = [new(inter, rank), new(inter, rank), new(h, rank)]
    out = function.forward(ctx, new(tokens, h), new(2 * rank, h), new(rank, inter), hyper, *weights, *lora_bs)
    ctx.needs_input_grad = (True, True, True, False, False, False, False, True, True, True)
    function.backward(ctx, _empty_like(out))


def _empty_like(t):
    import torch
    return torch.empty_like(t)


def _other_scenarios(shapes, dtype, cuda, shape_set):
    import torch
    from kernels.linear_cross_entropy import cross_entropy_rows_triton
    from kernels.lora import materialize_keep_mask
    block_v = TEST_CE_BLOCK_V if shape_set == "test" else None
    for grad in (True, False):
        yield f"cross_entropy_rows V={shapes['vocab']} grad={grad}", lambda grad=grad: cross_entropy_rows_triton(
            torch.empty(CE_ROWS, shapes["vocab"], device=cuda, dtype=dtype),
            torch.empty(CE_ROWS, device=cuda, dtype=torch.long), -100, 0.0, 0.0, grad, block_v=block_v)
    yield "materialize_keep_mask", lambda: materialize_keep_mask(DROPOUT_SEED, 1000, shapes["hidden"], 0.05, cuda)


def _shapes(shape_set):
    if shape_set == "test":
        return TEST_SHAPES
    from profiling.bench_linear_cross_entropy import VOCAB
    from profiling.bench_lora import SHAPES
    return {**SHAPES["7b"], "vocab": VOCAB}


def _meta_as_cuda_mode():
    """A torch function mode in which tensors live on the meta device (shapes and strides, no data)
    but say they are on CUDA, so the launch code takes its CUDA branches; torch's FakeTensorMode
    cannot make CUDA tensors views on a build without CUDA."""
    import torch
    from torch.overrides import TorchFunctionMode

    class MetaAsCuda(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func == torch.Tensor.device.__get__:
                return torch.device("cuda", 0)
            if func == torch.Tensor.is_cuda.__get__:
                return True
            kwargs = dict(kwargs or {})
            if "device" in kwargs:
                kwargs["device"] = "meta"
            return func(*args, **kwargs)

    return MetaAsCuda()


def record_launches(dtypes, shape_sets) -> list[dict]:
    """Every kernel call the scenarios make, recorded on meta tensors that pass for CUDA (nothing runs)."""
    import torch
    sink, patched = [], []
    modules = [importlib.import_module(m) for m in KERNEL_MODULES]
    for module in modules:
        for attr, obj in list(vars(module).items()):
            if _is_kernel_object(obj):
                patched.append((module, attr, obj))
                setattr(module, attr, _LaunchRecorder(module.__name__, attr, obj, sink))
    records = []
    try:
        with _meta_as_cuda_mode():
            for shape_set in shape_sets:
                shapes = _shapes(shape_set)
                for dtype_name in dtypes:
                    dtype = getattr(torch, DTYPES[dtype_name])
                    scenarios = [s for m in TOKENS[shape_set] for s in _lora_scenarios(shapes, m, dtype, "cuda")]
                    scenarios += list(_other_scenarios(shapes, dtype, "cuda", shape_set))
                    for label, run in scenarios:
                        run()
                        label = f"{shape_set} {dtype_name} {label}"
                        records += [{**_launch_record(*call, label), "shape_set": shape_set, "dtype": dtype_name}
                                    for call in sink]
                        sink.clear()
    finally:
        for module, attr, obj in patched:
            setattr(module, attr, obj)
    return records


# ----------------------------------------------------------------------------- variants to compile
def _spec_key(arg):
    """Enough of Triton's argument specialization to tell two calls apart (the worker does the real one)."""
    if isinstance(arg, dict):
        return ("tensor", arg["tensor"], arg["aligned"])
    if isinstance(arg, bool) or arg is None or isinstance(arg, float):
        return (type(arg).__name__,)
    if isinstance(arg, int):
        return ("int", arg == 1, arg % 16 == 0, -2**31 <= arg < 2**31)
    return (repr(arg),)


def _tile_size(config) -> tuple:
    blocks = [v for k, v in config["kwargs"].items() if k.startswith("BLOCK")]
    product = 1
    for b in blocks:
        product *= b
    return product, config["options"].get("num_stages", 0)


def expand_variants(records, all_configs=True, every_specialization=False) -> list[dict]:
    """One compile job per distinct (shape set, kernel, constexprs, config), with the argument
    specialization of its first launch; every_specialization: also one per
    distinct specialization (strides and sizes divisible by 16 or equal to 1: hints, not code paths).
    --quick keeps, per launch, the config that runs untuned and the largest tile (the most
    resource-hungry)."""
    variants = {}
    for rec_index, rec in enumerate(records):
        if rec["configs"] is None:
            picks = [None]
        elif all_configs:
            picks = rec["reachable"]
        elif len(rec["reachable"]) == 1:
            picks = rec["reachable"]
        else:
            picks = [max(rec["reachable"], key=lambda i: _tile_size(rec["configs"][i]))]
        for index in picks:
            config = rec["configs"][index] if index is not None else {"kwargs": {}, "options": {}}
            constexprs = {**rec["constexprs"], **config["kwargs"]}
            options = {**rec["options"], **config["options"]}
            spec = [_spec_key(a) for a in rec["args"]] if every_specialization else \
                [_spec_key(a) for a in rec["args"] if isinstance(a, dict)]  # pointer dtypes and alignment
            key = json.dumps([rec["shape_set"], rec["module"], rec["attr"], spec,
                              sorted(constexprs.items()), sorted(options.items())])
            job = variants.setdefault(key, {"module": rec["module"], "attr": rec["attr"], "kernel": rec["kernel"],
                                            "dtype": rec["dtype"], "shape_set": rec["shape_set"],
                                            "args": rec["args"], "constexprs": constexprs, "options": options,
                                            "scenario": rec["scenario"], "launches": []})
            job["launches"].append((rec_index, index))
    return list(variants.values())
