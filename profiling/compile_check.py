"""Ahead-of-time compile check of every Triton kernel variant the engine launches on CUDA, no GPU needed.

    python -m profiling.compile_check                      # sm_90 (H100/H200), bf16 + fp16, every config (~15 min)
    python -m profiling.compile_check --dtypes fp32 --shapes test --quick   # the GPU tests' fp32 launches
    python -m profiling.compile_check --quick              # one config per launch: the largest tile and the fallback
    python -m profiling.compile_check --arch 80 --dtypes bf16 --json runs/compile_check.json

What is compiled: the launches themselves. The engine's real launch code (LoRAGroupFunction and
LoRAMLPFunction forward and backward, both impls triton and triton_gemm, dropout on and off, ranks 8,
16 and 64; cross_entropy_rows_triton; materialize_keep_mask) runs on fake CUDA tensors
(meta tensors that report device cuda: shapes and strides, no memory) with every kernel object of
KERNEL_MODULES replaced by a recorder, so the check follows the code: constexprs, num_warps, group
sizes and autotune configs are read from the call and from the modules' autotuners, never copied.
Each recorded call is compiled with triton.compile for GPUTarget("cuda", arch), once per autotune
config, with the argument specialization Triton's JIT would apply (stride 1 -> constexpr, multiples
of 16 -> divisibility hints), in a spawned worker process (TRITON_INTERPRET unset there, a fresh
Triton cache so ptxas really runs and its -v log gives registers and spills).

Verdicts, per variant: ok | spills (ok, but ptxas spilled registers to local memory) | error (the
compiler's message) | over-smem (needs more shared memory per block than the arch allows: Triton
raises OutOfResources when the kernel is loaded) | crash / timeout of the compiler.
A launch through an autotuner with several configs left after its early prune benchmarks them all,
and Triton's autotuner skips configs that raise OutOfResources or PTXASError while benchmarking: an
over-smem config there is reported as "pruned" (it only costs a compilation on the GPU) and fails the
check only when no config of the launch fits. Untuned launches and single-config launches (small
problems, see kernels/lora.py `_untuned_when_small`) run what they get: over-smem fails. Compile
errors always fail (the autotuner does not catch them all). Exit status 1 when anything failed,
2 when triton or its NVIDIA backend is missing.

The table is printed, the full rows written as JSON (--json), and one summary row appended to
profiling/results/compile_check.csv. The launches are recorded by profiling/compile_check_launches.py.
Nothing at module level imports triton or torch: the worker must drop TRITON_INTERPRET (set by
tests/conftest.py on CPU) before triton is imported.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from profiling.compile_check_launches import DTYPES, TOKENS, raw_kernel, expand_variants, record_launches

RESULTS_CSV = Path(__file__).parent / "results" / "compile_check.csv"
# Shared memory one block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin; CUDA C Programming
# Guide, "Technical Specifications per Compute Capability"): what Triton compares metadata.shared with.
SMEM_LIMIT_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024,
                    120: 99 * 1024}
WARP_SIZE = 32
# The largest variants (128 x 256 tiles, spilling) take ~10 s in ptxas on one loaded core.
COMPILE_TIMEOUT_S = 300
ERROR_LINES = 6


class ToolMissing(RuntimeError):
    """triton, its NVIDIA backend or ptxas is not there: nothing can be compiled."""


# ----------------------------------------------------------------------------- compile worker
def _find_tool(name):
    """Path of a binary triton's NVIDIA backend ships (ptxas, ptxas-blackwell, cuobjdump)."""
    from triton import knobs
    reason = "not found"
    try:
        path = getattr(knobs.nvidia, name.replace("-", "_")).path
    except (AttributeError, RuntimeError) as err:  # knobs raise RuntimeError("Cannot find ...")
        path, reason = None, str(err)
    if not path or not os.path.exists(path):
        raise ToolMissing(f"triton's NVIDIA backend has no usable {name} ({reason if not path else path}); "
                          "reinstall triton (its Linux wheels ship it in triton/backends/nvidia/bin) or point "
                          f"TRITON_{name.upper().replace('-', '_')}_PATH at a CUDA toolkit's {name}")
    return path


def check_toolchain(arch: int = 90) -> dict:
    """triton importable with its NVIDIA backend and ptxas, or ToolMissing saying what to install."""
    try:
        import triton
        import triton.backends.nvidia.compiler as nvidia
    except ImportError as err:
        raise ToolMissing(f"cannot import triton with its NVIDIA backend ({err}); install triton "
                          "(pip install triton) on Linux") from err
    try:
        ptxas = nvidia.get_ptxas(arch).path
    except RuntimeError as err:
        raise ToolMissing(f"triton's NVIDIA backend finds no ptxas ({err}); reinstall triton or set "
                          "TRITON_PTXAS_PATH to a CUDA toolkit's ptxas") from err
    return {"triton": triton.__version__, "triton_path": os.path.dirname(triton.__file__), "ptxas": ptxas}


def parse_ptxas_log(text: str) -> dict:
    """Registers per thread, spill bytes and stack frame from a `ptxas -v` log."""
    out = {}
    if m := re.search(r"Used (\d+) registers", text):
        out["regs"] = int(m.group(1))
    if m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text):
        out["spill_stores"], out["spill_loads"] = int(m.group(1)), int(m.group(2))
    if m := re.search(r"(\d+) bytes stack frame", text):
        out["stack"] = int(m.group(1))
    return out


def parse_resource_usage(text: str) -> dict:
    """Registers and stack from `cuobjdump --dump-resource-usage` (no spill split there)."""
    m = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return {"regs": int(m.group(1)), "stack": int(m.group(2))} if m else {}


def _cubin_resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_find_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True)
    return parse_resource_usage(res.stdout)


def _mock_arg(arg):
    from triton.runtime.jit import MockTensor
    import torch
    if not isinstance(arg, dict):
        return arg
    tensor = MockTensor(getattr(torch, arg["tensor"]))
    if not arg["aligned"]:
        tensor.data_ptr = lambda: 8  # specialization sees a pointer off the 16-byte grid
    return tensor


def _ast_source(fn, backend, args, constexprs):
    """triton.compile's input, specialized as JITFunction.run would specialize these arguments."""
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl
    values = {**{p.name: p.default for p in fn.params}, **dict(zip(fn.arg_names, args)), **constexprs}
    signature, consts, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        if param.is_constexpr:
            signature[param.name], consts[param.name] = "constexpr", values[param.name]
            continue
        specialize = not param.do_not_specialize
        ty, key = native_specialize_impl(backend, _mock_arg(values[param.name]), False, specialize,
                                         specialize and not param.do_not_specialize_on_alignment)
        signature[param.name] = ty
        if ty == "constexpr":
            consts[param.name] = key
        elif isinstance(key, str):
            attrs[(i,)] = backend.parse_attr(key)
    return ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)


def _error_text(err, captured: str) -> str:
    """The compiler's message: its cause first (the last line of a CompilationError), then context."""
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    if type(err).__name__ == "CompilationError" and lines:
        lines = [lines[-1]] + lines[:-1]
    diagnostics = [ln for ln in captured.splitlines() if "error" in ln.lower()]
    return "\n".join([f"{type(err).__name__}: " + (lines[0] if lines else "")] + lines[1:ERROR_LINES] +
                     diagnostics[:ERROR_LINES])


class _CapturedOutput:
    """fd 1 and 2 into a file while compiling: ptxas' -v log (Triton prints it) and MLIR diagnostics."""

    def __enter__(self):
        sys.stdout.flush(), sys.stderr.flush()
        self.file = tempfile.TemporaryFile(mode="w+")
        self.saved = [os.dup(1), os.dup(2)]
        os.dup2(self.file.fileno(), 1), os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stdout.flush(), sys.stderr.flush()
        for fd, saved in zip((1, 2), self.saved):
            os.dup2(saved, fd)
            os.close(saved)
        self.file.seek(0)
        self.text = self.file.read()
        self.file.close()


def compile_variant(job: dict, arch: int) -> dict:
    """Compile one variant for GPUTarget("cuda", arch); its shared memory, registers, spills, time."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    fn = raw_kernel(getattr(importlib.import_module(job["module"]), job["attr"]))
    target = GPUTarget("cuda", arch, WARP_SIZE)
    knobs.nvidia.dump_ptxas_log = True
    start = time.perf_counter()
    captured = _CapturedOutput()
    try:
        with captured:
            src = _ast_source(fn, make_backend(target), job["args"], job["constexprs"])
            kernel = triton.compile(src, target=target, options=dict(job["options"]))
    except Exception as err:  # the compiler's own errors are the result here, not a failure of the tool
        return {"status": "error", "error": _error_text(err, getattr(captured, "text", "")),
                "seconds": time.perf_counter() - start}
    usage = parse_ptxas_log(captured.text) or _cubin_resources(kernel.asm["cubin"])
    return {"status": "compiled", "shared": kernel.metadata.shared, **usage, "seconds": time.perf_counter() - start}


def _worker_loop(conn, cache_dir, arch):
    """Spawned worker: no interpreter, a private Triton cache (cached kernels skip ptxas and its log)."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton >= 3.9 warns when unset; 1 = its default
    while True:
        job = conn.recv()
        if job is None:
            return
        conn.send(compile_variant(job, arch))


class CompileWorkers:
    """`jobs` spawned compile workers; one that dies or hangs is replaced and its variant reported."""

    def __init__(self, jobs: int, arch: int, timeout_s: float = COMPILE_TIMEOUT_S):
        import multiprocessing
        self.ctx, self.arch, self.timeout_s = multiprocessing.get_context("spawn"), arch, timeout_s
        self.cache_dir = tempfile.mkdtemp(prefix="compile_check_cache_")
        self.workers = [self._start() for _ in range(jobs)]

    def _start(self):
        parent, child = self.ctx.Pipe()
        saved = os.environ.pop("TRITON_INTERPRET", None)  # also for the child's own imports
        try:
            proc = self.ctx.Process(target=_worker_loop, args=(child, self.cache_dir, self.arch), daemon=True)
            proc.start()
        finally:
            if saved is not None:
                os.environ["TRITON_INTERPRET"] = saved
        child.close()
        return {"proc": proc, "conn": parent, "job": None, "since": 0.0}

    def run(self, jobs, on_result):
        """Compile every job; on_result(index, result) as each finishes."""
        from multiprocessing.connection import wait
        pending = list(enumerate(jobs))[::-1]
        busy = []
        while pending or busy:
            for worker in self.workers:
                if worker["job"] is None and pending:
                    worker["job"], worker["since"] = pending.pop(), time.perf_counter()
                    worker["conn"].send(worker["job"][1])
                    busy.append(worker)
            for conn in wait([w["conn"] for w in busy], timeout=5.0):
                worker = next(w for w in busy if w["conn"] is conn)
                try:
                    result = conn.recv()
                except (EOFError, OSError):  # the worker died mid-compile
                    result = {"status": "crash", "error": f"compiler process died (exit code {worker['proc'].exitcode})"}
                    self._replace(worker)
                self._finish(worker, busy, result, on_result)
            for worker in [w for w in busy if time.perf_counter() - w["since"] > self.timeout_s]:
                self._replace(worker)
                self._finish(worker, busy, {"status": "timeout", "error": f"no result in {self.timeout_s:.0f} s"},
                             on_result)

    def _finish(self, worker, busy, result, on_result):
        index = worker["job"][0]
        result.setdefault("seconds", time.perf_counter() - worker["since"])
        busy.remove(worker)
        worker["job"] = None
        on_result(index, result)

    def _replace(self, worker):
        worker["proc"].kill()
        worker["proc"].join()
        fresh = self._start()
        worker["proc"], worker["conn"] = fresh["proc"], fresh["conn"]

    def close(self):
        for worker in self.workers:
            try:
                worker["conn"].send(None)
            except (BrokenPipeError, OSError):
                pass
            worker["proc"].join(timeout=10)
            if worker["proc"].is_alive():
                worker["proc"].kill()
        shutil.rmtree(self.cache_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- verdicts
def judge(records, variants, results, smem_limit):
    """Each variant's status, and the launches none of whose configs can run (see the module doc)."""
    raw = []
    for result in results:
        if result["status"] != "compiled":
            raw.append(result["status"])
        elif result["shared"] > smem_limit:
            raw.append("over-smem")
        else:
            raw.append("spills" if result.get("spill_stores", 0) > 0 else "ok")
    compiled = {}  # record index -> {config index: variant index}
    for v_index, variant in enumerate(variants):
        for rec_index, config_index in variant["launches"]:
            compiled.setdefault(rec_index, {})[config_index] = v_index
    benign, launch_failures = {}, []  # benign: over-smem the autotuner skips in every launch using it
    for rec_index, configs in compiled.items():
        rec = records[rec_index]
        reachable = rec["reachable"] if rec["configs"] is not None else [None]
        runnable = any(raw[configs[i]] in ("ok", "spills") for i in reachable if i in configs)
        complete = all(i in configs for i in reachable)
        for i in reachable:
            if i in configs and raw[configs[i]] == "over-smem":
                benign[configs[i]] = benign.get(configs[i], True) and len(reachable) > 1 and (runnable or not complete)
        if complete and not runnable:
            launch_failures.append({"scenario": rec["scenario"], "kernel": rec["kernel"],
                                    "configs": [raw[configs[i]] for i in reachable]})
    status = ["pruned" if benign.get(i) else s for i, s in enumerate(raw)]
    return status, launch_failures


FAILED = ("error", "crash", "timeout", "over-smem")


# ----------------------------------------------------------------------------- report
def variant_label(variant) -> str:
    consts = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in variant["constexprs"].items())
    opts = " ".join(f"{k}={v}" for k, v in sorted(variant["options"].items()) if k != "num_ctas" or v != 1)
    return f"{variant['kernel']} [{variant['shape_set']} {variant['dtype']}] {consts} {opts}".strip()


def summarize(variants, rows) -> list[dict]:
    """One line per kernel: counts by status, the largest shared memory, registers and spills."""
    table = {}
    for variant, row in zip(variants, rows):
        line = table.setdefault(variant["kernel"], {"kernel": variant["kernel"], "variants": 0, "ok": 0, "spills": 0,
                                                    "pruned": 0, "failed": 0, "max_smem": 0, "max_regs": 0,
                                                    "max_spill": 0, "seconds": 0.0})
        line["variants"] += 1
        line["failed" if row["status"] in FAILED else row["status"]] += 1
        line["max_smem"] = max(line["max_smem"], row.get("shared", 0))
        line["max_regs"] = max(line["max_regs"], row.get("regs", 0))
        line["max_spill"] = max(line["max_spill"], row.get("spill_stores", 0))
        line["seconds"] += row["seconds"]
    return list(table.values())


def print_report(summary, variants, rows, launch_failures, smem_limit):
    head = f"{'kernel':<28}{'variants':>9}{'ok':>5}{'spills':>7}{'pruned':>7}{'failed':>7}{'max smem KiB':>13}" \
           f"{'max regs':>9}{'max spill B':>12}{'compile s':>10}"
    print(head)
    for s in summary:
        print(f"{s['kernel']:<28}{s['variants']:>9}{s['ok']:>5}{s['spills']:>7}{s['pruned']:>7}{s['failed']:>7}"
              f"{s['max_smem'] / 1024:>13.1f}{s['max_regs']:>9}{s['max_spill']:>12}{s['seconds']:>10.1f}")
    problems = [(v, r) for v, r in zip(variants, rows) if r["status"] != "ok"]
    if problems:
        print(f"\nnot ok (shared memory limit {smem_limit} bytes):")
    for variant, row in sorted(problems, key=lambda p: (p[1]["status"], p[0]["kernel"])):
        usage = f"smem {row.get('shared', '-')} regs {row.get('regs', '-')} spill {row.get('spill_stores', '-')}"
        print(f"  {row['status']:<9} {variant_label(variant)} | {usage} | first seen: {variant['scenario']}")
        if row.get("error"):
            print("            " + row["error"].splitlines()[0][:300])
    for failure in launch_failures:
        print(f"  NO CONFIG FITS: {failure['kernel']} in {failure['scenario']}: {failure['configs']}")


def append_csv(path: Path, row: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def run_check(arch, dtypes, shape_sets, all_configs, jobs, kernel_filter=None, progress=True,
              every_specialization=False, timeout_s=COMPILE_TIMEOUT_S, rows_log=None):
    """Record the launches, compile every variant, judge them: (meta, variants, rows, launch_failures)."""
    toolchain = check_toolchain(arch)
    records = record_launches(dtypes, shape_sets)
    variants = expand_variants(records, all_configs, every_specialization)
    if kernel_filter:
        variants = [v for v in variants if any(k in v["kernel"] for k in kernel_filter)]
    results = [None] * len(variants)
    start = time.perf_counter()

    def on_result(index, result):
        results[index] = result
        if rows_log:  # a run stopped early keeps what it compiled
            with open(rows_log, "a") as f:
                f.write(json.dumps({"label": variant_label(variants[index]), **result}) + "\n")
        if progress:
            done = sum(r is not None for r in results)
            print(f"\r[{done}/{len(variants)}] {time.perf_counter() - start:6.0f} s  {variants[index]['kernel']:<30}",
                  end="", file=sys.stderr, flush=True)

    workers = CompileWorkers(jobs, arch, timeout_s)
    try:
        workers.run(variants, on_result)
    finally:
        workers.close()
    if progress:
        print(file=sys.stderr)
    status, launch_failures = judge(records, variants, results, SMEM_LIMIT_BYTES[arch])
    rows = [{**r, "status": s} for r, s in zip(results, status)]
    meta = {**toolchain, "arch": arch, "smem_limit": SMEM_LIMIT_BYTES[arch], "dtypes": dtypes, "shapes": shape_sets,
            "mode": "all-configs" if all_configs else "quick", "launches": len(records),
            "wall_s": round(time.perf_counter() - start, 1)}
    return meta, variants, rows, launch_failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SMEM_LIMIT_BYTES),
                        help="CUDA compute capability to compile for (90: H100/H200)")
    # fp32 runs only in tests on a GPU (the engine trains in bf16 there), and its GEMM variants
    # compile for minutes each: asked for explicitly.
    parser.add_argument("--dtypes", default="bf16,fp16", help=f"comma list of {', '.join(DTYPES)} (default: bf16,fp16)")
    parser.add_argument("--shapes", default="7b,test", help="7b: the 7B thinker's shapes; test: the GPU tests' odd ones")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--all-configs", action="store_true", help="every autotune config (the default)")
    mode.add_argument("--quick", action="store_true", help="per launch: the untuned config and the largest tile")
    parser.add_argument("--every-specialization", action="store_true",
                        help="also one compile per distinct argument specialization (several times longer)")
    parser.add_argument("--kernels", help="comma list: only kernels whose name contains one of these")
    parser.add_argument("--jobs", type=int, default=1, choices=(1, 2), help="compile processes")
    parser.add_argument("--timeout", type=float, default=COMPILE_TIMEOUT_S, help="seconds per compile")
    parser.add_argument("--json", type=Path, help="write every variant's result here (and, while running, "
                        "each one as it finishes to PATH.partial.jsonl)")
    parser.add_argument("--csv", type=Path, default=RESULTS_CSV, help="CSV to append the summary row to")
    args = parser.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    shape_sets = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for name, given, known in (("--dtypes", dtypes, DTYPES), ("--shapes", shape_sets, TOKENS)):
        unknown = [g for g in given if g not in known]
        if unknown or not given:
            parser.error(f"{name}: {unknown or given} not known; use a comma list of {', '.join(known)}")
    os.environ.pop("TRITON_INTERPRET", None)  # this process only records; the worker compiles
    partial = args.json.with_suffix(".partial.jsonl") if args.json else None
    if partial and partial.exists():
        partial.unlink()
    try:
        meta, variants, rows, launch_failures = run_check(
            args.arch, dtypes, shape_sets, not args.quick, args.jobs,
            args.kernels.split(",") if args.kernels else None, every_specialization=args.every_specialization,
            timeout_s=args.timeout, rows_log=partial)
    except ToolMissing as err:
        print(f"compile_check: {err}", file=sys.stderr)
        return 2
    summary = summarize(variants, rows)
    print(f"triton {meta['triton']} ({meta['triton_path']}), sm_{args.arch}, {meta['mode']}, dtypes {args.dtypes}, "
          f"shapes {args.shapes}: {len(variants)} variants from {meta['launches']} launches in {meta['wall_s']} s")
    print_report(summary, variants, rows, launch_failures, meta["smem_limit"])
    failed = sum(r["status"] in FAILED for r in rows) + len(launch_failures)
    write_outputs(args, meta, variants, rows, launch_failures, summary, failed)
    if partial and partial.exists():
        partial.unlink()
    print(f"\n{'FAILED' if failed else 'OK'}: {failed} failure(s); appended a row to {args.csv}"
          + (f"; wrote {args.json}" if args.json else ""))
    return 1 if failed else 0


def write_outputs(args, meta, variants, rows, launch_failures, summary, failed):
    from profiling.provenance import cpu_name, git_revision
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "summary": summary, "launch_failures": launch_failures,
                                         "variants": [{**v, "label": variant_label(v), **r}
                                                      for v, r in zip(variants, rows)]}, indent=1))
    count = lambda *states: sum(r["status"] in states for r in rows)
    append_csv(args.csv, {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git": git_revision(),
        "host": cpu_name(), "triton": meta["triton"], "arch": meta["arch"], "dtypes": ",".join(meta["dtypes"]),
        "shapes": ",".join(meta["shapes"]), "mode": meta["mode"], "kernels": args.kernels or "all",
        "variants": len(rows), "ok": count("ok"), "spills": count("spills"), "pruned": count("pruned"),
        "failed": failed, "max_smem": max((r.get("shared", 0) for r in rows), default=0),
        "smem_limit": meta["smem_limit"], "max_regs": max((r.get("regs", 0) for r in rows), default=0),
        "max_spill_bytes": max((r.get("spill_stores", 0) for r in rows), default=0), "wall_s": meta["wall_s"]})


if __name__ == "__main__":
    sys.exit(main())
