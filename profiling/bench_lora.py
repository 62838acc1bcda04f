"""Benchmark of kernels/lora.py and kernels/lora_grouped.py: forward+backward time and peak memory of
one LoRA projection and of the grouped q/k/v and MLP calls.

    python -m profiling.bench_lora                      # GPU: 7B thinker shapes, bf16; CPU: reduced, fp32
    python -m profiling.bench_lora --tokens 8192 --json runs/bench_lora.json

Compared, in the same run and on the same inputs:
  ours       kernels.lora.lora_linear / kernels.lora_grouped.lora_qkv, lora_mlp, impl=triton (GPU only): step-1
             kernels around cuBLAS GEMMs
  ours_gemm  the same with impl=triton_gemm: base GEMMs in Triton, rank-r term in the accumulator
             (the recipe's lora.impl=auto takes whichever of the two this benchmark shows faster)
  peft       PEFT's LoraLayer (peft.tuners.lora.Linear) in eager mode      <- named baseline
  compiled   the PyTorch reference under torch.compile (GPU; --compile on CPU)
  reference  the PyTorch reference in eager mode (CPU), with the kernels' Philox dropout mask
  torch      the engine's CPU path (lora.impl=torch): the reference math, dropout mask from torch's RNG
  gemm_bound the base GEMMs alone (x W^T forward, dy W backward): the lower bound of the layer
Ratios printed: time / gemm_bound and peft / time (speed-up over PEFT). The table is printed,
written as JSON (--json) and appended as CSV rows to profiling/results/bench_lora.csv.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.lora import lora_linear, lora_linear_reference
from kernels.lora_grouped import lora_mlp, lora_mlp_reference, lora_qkv
from profiling.provenance import git_revision

RESULTS_CSV = Path(__file__).parent / "results" / "bench_lora.csv"
# Qwen2.5-Omni-7B thinker (its config.json): hidden 3584, intermediate 18944, 28 query heads and
# 4 KV heads of 128. The CPU shapes keep the proportions at a size two cores time in seconds.
SHAPES = {"7b": {"hidden": 3584, "intermediate": 18944, "kv": 4 * 128},
          "cpu": {"hidden": 512, "intermediate": 1408, "kv": 128},
          # smoke test of this script itself, e.g. with TRITON_INTERPRET=1 --with-ours on CPU
          "tiny": {"hidden": 128, "intermediate": 256, "kv": 32}}
RANK = 16
ALPHA = 32  # scale 2, as a typical alpha = 2r recipe
GPU_TOKENS = [4096, 8192, 16384]
OURS = {"ours": "triton", "ours_gemm": "triton_gemm"}
CPU_TOKENS = [1024]
# Forward+backward steps before timing (autotuning, torch.compile, allocator warm-up) and timed
# steps; the CPU run uses fewer, its steps take tenths of seconds.
GPU_WARMUP, GPU_REPS = 3, 10
CPU_WARMUP, CPU_REPS = 1, 5




# ----------------------------------------------------------------------------- layers under test
def projections(shapes):
    h, i, kv = shapes["hidden"], shapes["intermediate"], shapes["kv"]
    return {"q_proj": (h, h), "k_proj": (h, kv), "gate_proj": (h, i), "down_proj": (i, h)}


def make_params(k, n, device, dtype, gen):
    weight = (torch.randn(n, k, generator=gen) * k ** -0.5).to(device, dtype)
    lora_A = (torch.randn(RANK, k, generator=gen) * k ** -0.5).to(device, dtype).requires_grad_()
    lora_B = (torch.randn(n, RANK, generator=gen) * RANK ** -0.5).to(device, dtype).requires_grad_()
    return weight, lora_A, lora_B


def peft_layer(weight, lora_A, lora_B, dropout_p):
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    n, k = weight.shape
    base = torch.nn.Linear(k, n, bias=False, device=weight.device, dtype=weight.dtype)
    base.weight.data.copy_(weight)
    base.weight.requires_grad_(False)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout_p)
    layer = PeftLoraLinear(base, "default", config=config, r=RANK, lora_alpha=ALPHA, lora_dropout=dropout_p)
    layer.to(device=weight.device, dtype=weight.dtype)
    layer.lora_A["default"].weight.data.copy_(lora_A)
    layer.lora_B["default"].weight.data.copy_(lora_B)
    return layer


_COMPILED = {}


def compiled_reference():
    """One torch.compile of the reference, shared by all layers: weights are arguments and
    shapes dynamic, so token counts and layers reuse it (compilations dominate the GPU run)."""
    if "ref" not in _COMPILED:
        _COMPILED["ref"] = torch.compile(lora_linear_reference, dynamic=True)
    return _COMPILED["ref"]


def single_candidates(k, n, device, dtype, dropout_p, compile_ref, gen, with_ours):
    """name -> (fn(x) -> output)."""
    weight, lora_A, lora_B = make_params(k, n, device, dtype, gen)
    scale = ALPHA / RANK
    layer = peft_layer(weight, lora_A, lora_B, dropout_p)
    cands = {"peft": layer, "gemm_bound": lambda x: F.linear(x, weight)}
    if with_ours:
        for name, impl in OURS.items():
            cands[name] = lambda x, impl=impl: lora_linear(x, weight, lora_A, lora_B, scale, None, dropout_p, impl=impl)
    ref = compiled_reference() if compile_ref else lora_linear_reference
    cands["compiled" if compile_ref else "reference"] = \
        lambda x: ref(x, weight, lora_A, lora_B, scale, None, dropout_p, 1234)
    if device.type != "cuda":
        cands["torch"] = lambda x: lora_linear(x, weight, lora_A, lora_B, scale, None, dropout_p, 1234, impl="torch")
    return cands


def qkv_candidates(shapes, device, dtype, dropout_p, gen, with_ours):
    h, kv = shapes["hidden"], shapes["kv"]
    parts = [make_params(h, n, device, dtype, gen) for n in (h, kv, kv)]
    weights, As, Bs = [list(t) for t in zip(*parts)]
    layers = [peft_layer(w, a, b, dropout_p) for w, a, b in parts]
    scale = ALPHA / RANK
    cands = {"peft": lambda x: tuple(layer(x) for layer in layers),
             "gemm_bound": lambda x: tuple(F.linear(x, w) for w in weights)}
    if with_ours:
        for name, impl in OURS.items():
            cands[name] = lambda x, impl=impl: lora_qkv(x, weights, As, Bs, scale, (None,) * 3, dropout_p, impl=impl)
    if device.type != "cuda":
        cands["torch"] = lambda x: lora_qkv(x, weights, As, Bs, scale, (None,) * 3, dropout_p, 1234, impl="torch")
    return cands


def mlp_candidates(shapes, device, dtype, dropout_p, gen, with_ours):
    h, i = shapes["hidden"], shapes["intermediate"]
    parts = [make_params(k, n, device, dtype, gen) for k, n in ((h, i), (h, i), (i, h))]
    weights, As, Bs = [list(t) for t in zip(*parts)]
    gate, up, down = [peft_layer(w, a, b, dropout_p) for w, a, b in parts]
    wg, wu, wd = weights
    scale = ALPHA / RANK
    cands = {"peft": lambda x: down(F.silu(gate(x)) * up(x)),
             "gemm_bound": lambda x: F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)}
    if with_ours:
        for name, impl in OURS.items():
            cands[name] = lambda x, impl=impl: lora_mlp(x, weights, As, Bs, scale, dropout_p, impl=impl)
    if device.type != "cuda":
        cands["reference"] = lambda x: lora_mlp_reference(x, weights, As, Bs, scale, dropout_p, 1234)
        cands["torch"] = lambda x: lora_mlp(x, weights, As, Bs, scale, dropout_p, 1234, impl="torch")
    return cands


# ----------------------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, x, device):
    """Median ms of forward+backward over timed steps, and peak memory above the inputs (MiB, CUDA)."""
    def step():
        out = fn(x)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        x.grad = None

    warmup, reps = (GPU_WARMUP, GPU_REPS) if device.type == "cuda" else (CPU_WARMUP, CPU_REPS)
    for _ in range(warmup):
        step()
    sync(device)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync(device)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = []
    for _ in range(reps):  # the median resists the noise of a shared machine
        start = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), peak


def run_case(layer, k, tokens, dropout_p, cands, device, dtype, gen):
    x = torch.randn(tokens, k, generator=gen).to(device, dtype).requires_grad_()
    results = {name: measure(fn, x, device) for name, fn in cands.items()}
    bound_ms, peft_ms = results["gemm_bound"][0], results["peft"][0]
    return [{"layer": layer, "tokens": tokens, "dropout": dropout_p, "impl": name, "ms": round(ms, 4),
             "peak_mib": None if peak is None else round(peak, 1), "x_gemm_bound": round(ms / bound_ms, 3),
             "speedup_vs_peft": round(peft_ms / ms, 3)} for name, (ms, peak) in results.items()]


def print_table(rows, label):
    print(f"\nLoRA forward+backward, {label} (r={RANK}); baseline for speed-up: PEFT LoraLayer eager")
    head = f"{'layer':<10}{'tokens':>7}{'drop':>6}  {'impl':<11}{'ms':>9}{'peak MiB':>10}{'x bound':>9}{'vs peft':>9}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        print(f"{r['layer']:<10}{r['tokens']:>7}{r['dropout']:>6}  {r['impl']:<11}{r['ms']:>9.3f}{peak:>10}"
              f"{r['x_gemm_bound']:>9.2f}{r['speedup_vs_peft']:>9.2f}")


def append_csv(path: Path, rows, meta):
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(meta) + list(rows[0])
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({**meta, **r})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts (M); default by device")
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.05])
    parser.add_argument("--layers", nargs="+", default=["q_proj", "k_proj", "gate_proj", "down_proj", "qkv", "mlp"])
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="time the reference under torch.compile (default: on GPU only)")
    parser.add_argument("--shapes", choices=sorted(SHAPES), help="default: 7b on GPU, cpu on CPU")
    parser.add_argument("--with-ours", action=argparse.BooleanOptionalAction, default=None,
                        help="time our Triton paths (default: on GPU only; on CPU needs TRITON_INTERPRET=1)")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--csv", type=Path, default=RESULTS_CSV, help="CSV to append the rows to")
    args = parser.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    shapes = SHAPES[args.shapes or ("7b" if on_gpu else "cpu")]
    with_ours = on_gpu if args.with_ours is None else args.with_ours
    tokens = args.tokens or (GPU_TOKENS if on_gpu else CPU_TOKENS)
    compile_ref = on_gpu if args.compile is None else args.compile
    device_name = torch.cuda.get_device_name() if on_gpu else "CPU"
    label = f"{device_name}, {str(dtype)[6:]}" + ("" if on_gpu else f", reduced shapes {shapes} (CPU)")
    gen = torch.Generator().manual_seed(0)
    single = projections(shapes)

    meta = {"time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git": git_revision(),
            "device": device_name, "dtype": str(dtype)[6:], "rank": RANK, "shapes": json.dumps(shapes),
            "torch": torch.__version__}
    rows = []
    for dropout_p in args.dropout:
        for layer in args.layers:
            if layer in single:
                k, n = single[layer]
                cands = single_candidates(k, n, device, dtype, dropout_p, compile_ref, gen, with_ours)
            elif layer == "qkv":
                k, cands = shapes["hidden"], qkv_candidates(shapes, device, dtype, dropout_p, gen, with_ours)
            elif layer == "mlp":
                k, cands = shapes["hidden"], mlp_candidates(shapes, device, dtype, dropout_p, gen, with_ours)
            else:
                parser.error(f"--layers: {layer!r} is not one of {[*single, 'qkv', 'mlp']}")
            for m in tokens:
                case = run_case(layer, k, m, dropout_p, cands, device, dtype, gen)
                # Results are kept as they come, so a run cut short by a time limit still reports.
                rows += case
                append_csv(args.csv, case, meta)
                if args.json:
                    write_json(args.json, meta, rows)
                print(" ".join(f"{r['layer']}/{r['tokens']}/{r['dropout']}/{r['impl']}={r['ms']:.3f}ms" for r in case),
                      flush=True)
            del cands
            if on_gpu:
                torch.cuda.empty_cache()

    print_table(rows, label)
    print(f"appended {len(rows)} rows to {args.csv}" + (f"; wrote {args.json}" if args.json else ""))
    return rows


def write_json(path, meta, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
