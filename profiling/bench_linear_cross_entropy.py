"""Benchmark of kernels/linear_cross_entropy.py: time and peak memory of the LM-head loss
(forward + backward) at Qwen2.5-Omni's vocabulary.

    python -m profiling.bench_linear_cross_entropy                 # GPU: H=3584, T in {4096, 16384}, bf16
    python -m profiling.bench_linear_cross_entropy --json runs/bench_lce.json
    python -m profiling.bench_linear_cross_entropy --device cpu    # CPU: H=256, T=2048, fp32

Compared, in the same run and on the same inputs:
  ours       linear_cross_entropy(impl=triton) (on CPU: under TRITON_INTERPRET=1)
  reference  linear_cross_entropy(impl=reference), the chunked PyTorch path used on CPU
  naive      full logits, then F.cross_entropy                          <- named memory baseline
  liger      liger_kernel's LigerFusedLinearCrossEntropyLoss            <- named time baseline
  gemm_bound (GPU) the logits, dh (and dW when trainable) GEMM FLOPs at the measured matmul rate
Memory is the peak above the inputs: torch.cuda.max_memory_allocated on GPU; on CPU the process's
peak RSS (VmHWM, reset just before the step), each variant in its own process so allocator
caches of one cannot hide another's peak. Each row runs once with a frozen lm_head (the LoRA
case, no dW) and once with a trainable one (dW included in the peak of every variant).
The table is printed, written as JSON (--json) and appended as CSV rows to
profiling/results/bench_linear_cross_entropy.csv.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from profiling.provenance import git_revision

RESULTS_CSV = Path(__file__).parent / "results" / "bench_linear_cross_entropy.csv"
# Qwen2.5-Omni-7B thinker (its config.json): vocab_size 152064, hidden_size 3584.
VOCAB = 152064
GPU_HIDDEN, GPU_TOKENS = 3584, (4096, 16384)
# On CPU naive needs ~4 GB at T=2048 (fp32 logits, their log-softmax and gradient); larger T does
# not fit beside other work on a 24 GiB machine. H=256 keeps the GEMMs at seconds on two cores.
CPU_HIDDEN, CPU_TOKENS = 256, (2048,)
# Interpreted Triton programs (ours-triton and Liger on CPU) take minutes per step at T=2048;
# run them once, frozen only: their memory is the point, their time on CPU is not.
INTERPRETED = ("ours", "liger")
GPU_WARMUP, GPU_REPS = 2, 5
LOSS_AGREEMENT_RTOL = 2e-2  # bf16 logits of the GPU variants differ by rounding, not by more
MIB = 1 << 20




# ----------------------------------------------------------------------------- one step per variant
def make_inputs(tokens, hidden, vocab, dtype, device, trainable):
    import torch

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=gen).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) * hidden**-0.5).to(device, dtype).requires_grad_(trainable)
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[::10] = -100  # prompt tokens: every 10th ignored
    return h, w, labels.to(device)


def loss_step_fn(variant):
    """variant -> fn(h, w, labels) that runs forward and backward and returns the loss sum."""
    if variant == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError as err:
            raise RuntimeError(f"skipped: liger-kernel not importable ({err}); pip install liger-kernel") from err
        liger_loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def step(h, w, labels):
            loss = liger_loss(w, h, labels)
            loss.backward()
            return loss.detach()
        return step

    from kernels.linear_cross_entropy import linear_cross_entropy

    impl = {"ours": "triton", "reference": "reference", "naive": "naive"}[variant]

    def step(h, w, labels):
        loss, _, _ = linear_cross_entropy(h, w, labels, impl=impl)
        loss.backward()
        return loss.detach()
    return step


# ----------------------------------------------------------------------------- CPU: one process each
def cpu_peak_rss_reset() -> int:
    """Reset the process's peak RSS to its current RSS (Linux clear_refs 5); return it in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return read_status_kib("VmRSS") * 1024


def read_status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line; the CPU benchmark needs Linux")


def cpu_worker(variant, tokens, hidden, trainable):
    """Runs in its own process: one forward+backward, prints a JSON line with time and memory."""
    import gc

    import torch

    step = loss_step_fn(variant)
    h, w, labels = make_inputs(tokens, hidden, VOCAB, torch.float32, "cpu", trainable)
    gc.collect()
    # Memory from the first (cold) step: a warm-up would let the C allocator keep freed blocks
    # and hide part of the peak. Time from a second step, except for interpreted variants.
    base = cpu_peak_rss_reset()
    start = time.perf_counter()
    loss = step(h, w, labels)
    seconds = time.perf_counter() - start
    peak = read_status_kib("VmHWM") * 1024
    if variant not in INTERPRETED:
        h.grad = w.grad = None
        start = time.perf_counter()
        step(h, w, labels)
        seconds = time.perf_counter() - start
    print(json.dumps({"ms": seconds * 1e3, "peak_mib": (peak - base) / MIB, "loss": float(loss)}))


def run_cpu(variant, tokens, hidden, trainable):
    env = dict(os.environ)
    if variant in INTERPRETED:
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "profiling.bench_linear_cross_entropy", "--worker", variant,
           "--tokens", str(tokens), "--hidden", str(hidden)] + (["--trainable-only"] if trainable else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": reason if reason.startswith("RuntimeError: skipped") else f"failed: {reason}"}
    return {"status": "ok", **json.loads(lines[-1])}


# ----------------------------------------------------------------------------- GPU: same process
def run_gpu(variant, tokens, hidden, trainable):
    import torch

    try:
        step = loss_step_fn(variant)
    except RuntimeError as err:
        return {"status": str(err)}
    h, w, labels = make_inputs(tokens, hidden, VOCAB, torch.bfloat16, "cuda", trainable)
    for _ in range(GPU_WARMUP):
        step(h, w, labels)
        h.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(GPU_REPS):
        h.grad = w.grad = None
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        loss = step(h, w, labels)
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    peak = torch.cuda.max_memory_allocated() - base
    del h, w, labels
    torch.cuda.empty_cache()
    return {"status": "ok", "ms": sorted(times)[len(times) // 2], "peak_mib": peak / MIB, "loss": float(loss)}


def gpu_matmul_tflops(hidden):
    """Measured bf16 rate of the logits GEMM [4096, H] x [H, V] (the shape every variant runs)."""
    import torch

    a = torch.randn(4096, hidden, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(VOCAB, hidden, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b.t())
    torch.cuda.synchronize()
    reps = 10
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b.t())
    torch.cuda.synchronize()
    return 2 * 4096 * hidden * VOCAB * reps / (time.perf_counter() - start) / 1e12


# ----------------------------------------------------------------------------- table, JSON, CSV
def add_ratios(rows, tflops):
    for row in rows:
        same = [r for r in rows if (r["tokens"], r["weight"]) == (row["tokens"], row["weight"]) and r["status"] == "ok"]
        naive = next((r for r in same if r["variant"] == "naive"), None)
        liger = next((r for r in same if r["variant"] == "liger"), None)
        if row["status"] != "ok":
            continue
        if naive:
            row["mem_vs_naive"] = row["peak_mib"] / naive["peak_mib"]
            row["loss_rel_diff_vs_naive"] = abs(row["loss"] - naive["loss"]) / abs(naive["loss"])
        if liger:
            row["time_vs_liger"] = row["ms"] / liger["ms"]
        if tflops:
            gemms = 3 if row["weight"] == "trainable" else 2
            bound_ms = gemms * 2 * row["tokens"] * row["hidden"] * VOCAB / (tflops * 1e12) * 1e3
            row["gemm_bound_ms"] = bound_ms
            row["time_vs_gemm_bound"] = row["ms"] / bound_ms


def print_table(rows):
    def fmt(value, spec):
        width = int(spec.split(".")[0])
        return format(value, spec) if isinstance(value, float) else "-".rjust(width)

    print(f"{'variant':<10} {'T':>6} {'weight':<9} {'ms':>10} {'peak MiB':>9} {'mem/naive':>9} "
          f"{'t/liger':>8} {'t/gemm':>7} {'loss rel':>9}  status")
    for r in rows:
        print(f"{r['variant']:<10} {r['tokens']:>6} {r['weight']:<9} {fmt(r.get('ms'), '10.1f')} "
              f"{fmt(r.get('peak_mib'), '9.1f')} {fmt(r.get('mem_vs_naive'), '9.3f')} "
              f"{fmt(r.get('time_vs_liger'), '8.2f')} {fmt(r.get('time_vs_gemm_bound'), '7.2f')} "
              f"{fmt(r.get('loss_rel_diff_vs_naive'), '9.1e')}  {r['status']}")


CSV_FIELDS = ["time_utc", "git", "device", "dtype", "torch", "variant", "tokens", "hidden", "vocab", "weight",
              "ms", "peak_mib", "mem_vs_naive", "time_vs_liger", "gemm_bound_ms", "time_vs_gemm_bound",
              "loss", "loss_rel_diff_vs_naive", "status"]


def append_csv(rows, meta, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**meta, **row})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts T (default: per device)")
    parser.add_argument("--hidden", type=int, help="hidden size H (default: 3584 GPU, 256 CPU)")
    parser.add_argument("--variants", nargs="+", default=["ours", "reference", "naive", "liger"])
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    parser.add_argument("--csv", type=Path, default=RESULTS_CSV, help="append CSV rows here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one CPU variant, one process
    parser.add_argument("--trainable-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return cpu_worker(args.worker, args.tokens[0], args.hidden, args.trainable_only)

    import torch

    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    hidden = args.hidden or (GPU_HIDDEN if on_gpu else CPU_HIDDEN)
    token_counts = args.tokens or (GPU_TOKENS if on_gpu else CPU_TOKENS)
    tflops = gpu_matmul_tflops(hidden) if on_gpu else None
    rows = []
    for tokens in token_counts:
        for weight in ("frozen", "trainable"):
            for variant in args.variants:
                if not on_gpu and weight == "trainable" and variant in INTERPRETED:
                    continue
                print(f"running {variant} T={tokens} {weight} ...", file=sys.stderr, flush=True)
                run = run_gpu if on_gpu else run_cpu
                result = run(variant, tokens, hidden, weight == "trainable")
                rows.append({"variant": variant, "tokens": tokens, "hidden": hidden, "vocab": VOCAB,
                             "weight": weight, **result})
    add_ratios(rows, tflops)
    device = torch.cuda.get_device_name() if on_gpu else f"CPU ({os.cpu_count()} cores)"
    meta = {"time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git": git_revision(),
            "device": device, "dtype": "bfloat16" if on_gpu else "float32", "torch": torch.__version__}
    print(f"\nlinear cross-entropy, V={VOCAB}, H={hidden}, {meta['dtype']}, {device}"
          + (f", measured matmul {tflops:.0f} TFLOP/s" if tflops else ""))
    print_table(rows)
    if not on_gpu:
        print("CPU times of 'ours' and 'liger' are Triton-interpreter times (not kernel speed); memory is real.")
    for row in rows:
        if row["status"] == "ok" and row.get("loss_rel_diff_vs_naive", 0.0) > LOSS_AGREEMENT_RTOL:
            print(f"WARNING: {row['variant']} T={row['tokens']} loss differs from naive by "
                  f"{row['loss_rel_diff_vs_naive']:.1e}", file=sys.stderr)
    append_csv(rows, meta, args.csv)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**meta, "matmul_tflops": tflops, "rows": rows}, indent=2))
    print(f"CSV rows appended to {args.csv}" + (f"; JSON written to {args.json}" if args.json else ""))


if __name__ == "__main__":
    main()
