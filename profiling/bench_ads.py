"""Benchmark of the ADS selection core (loaders/ads.py): micro-batch selections per second.

    python -m profiling.bench_ads                       # pools of 256 (default), 1k, 4k, 16k; 256-dim
    python -m profiling.bench_ads --pools 16384 --json runs/bench_ads.json

Compared, in the same run and on the same pools (same start, quotas and token budget):
  numba      loaders.ads.k_center_select: the njit core (first-call compile time reported apart)
  numpy      loaders.ads.k_center_select_reference: vectorized NumPy     <- named baseline
Both must select the same indices (checked on every pool; a mismatch stops the benchmark).
The table is printed, written as JSON (--json) and appended as CSV rows to
profiling/results/bench_ads.csv (git revision, device, settings). The goal of the issue is
numba >= 10x the NumPy reference.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numba
import numpy as np

from loaders.ads import balanced_streams, k_center_select, k_center_select_reference, pick_start, quantize_embeddings
from loaders.curriculum import DEFAULT_ADS_POOL, DEFAULT_EMBEDDING_DIM
from loaders.tasks import TASKS
from profiling.provenance import git_revision, cpu_name as device_name

RESULTS_CSV = Path(__file__).parent / "results" / "bench_ads.csv"
POOLS = [DEFAULT_ADS_POOL, 1024, 4096, 16384]
# Example lengths: 4-16 s clips at 25 audio tokens/s plus prompt and target (about 100-400
# tokens); a 16384-token micro-batch then holds about 65 samples, i.e. 65 greedy picks.
MIN_TOKENS, MAX_TOKENS = 100, 400
TOKEN_BUDGET = 16384
# Repetitions: enough for a stable median of the fast core; the NumPy reference takes ~1 s
# per selection at 16k on two cores, so it gets fewer.
NUMBA_REPS, NUMPY_REPS = 20, 3






def make_pool(m: int, dim: int, seed: int):
    """A pool drawn like ADS draws it: all four tasks, 5 dialects and 4 emotions as groups."""
    rng = np.random.default_rng(seed)
    streams, shares, _ = balanced_streams(TASKS)
    groups = rng.choice(len(streams), size=m, p=shares)
    codes = quantize_embeddings(rng.standard_normal((m, dim)).astype(np.float32))
    lengths = rng.integers(MIN_TOKENS, MAX_TOKENS + 1, m)
    expected = TOKEN_BUDGET // ((MIN_TOKENS + MAX_TOKENS) // 2)
    quota = np.ceil(shares * expected).astype(np.int64)
    start = pick_start(rng, groups, lengths, quota, TOKEN_BUDGET, np.ones(m, bool))
    return codes, groups, lengths, quota, start


def time_selection(select, pool, reps: int) -> tuple[float, np.ndarray]:
    times, chosen = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        chosen = select(*pool[:4], TOKEN_BUDGET, pool[4])
        times.append(time.perf_counter() - t0)
    return statistics.median(times), chosen


def run(pools: list[int], dim: int, seed: int) -> tuple[list[dict], float]:
    warm = make_pool(64, dim, seed)
    t0 = time.perf_counter()
    k_center_select(*warm[:4], TOKEN_BUDGET, warm[4])
    compile_s = time.perf_counter() - t0     # first call: numba's compile (the 64-pool run is negligible)
    rows = []
    for m in pools:
        pool = make_pool(m, dim, seed + m)
        numba_s, fast = time_selection(k_center_select, pool, NUMBA_REPS)
        numpy_s, reference = time_selection(k_center_select_reference, pool, NUMPY_REPS)
        if not np.array_equal(fast, reference):
            raise SystemExit(f"pool {m}: numba and NumPy selected different indices; the core is wrong")
        rows.append({"pool": m, "dim": dim, "picks": len(fast), "numba_ms": numba_s * 1e3, "numpy_ms": numpy_s * 1e3,
                     "numba_selections_per_s": 1 / numba_s, "numpy_selections_per_s": 1 / numpy_s,
                     "speedup_vs_numpy": numpy_s / numba_s, "same_indices": True})
    return rows, compile_s


def print_table(rows: list[dict], compile_s: float, device: str) -> None:
    print(f"\nADS k-center selection, {device}; token budget {TOKEN_BUDGET}, lengths {MIN_TOKENS}-{MAX_TOKENS}; "
          f"baseline: vectorized NumPy reference")
    head = f"{'pool':>7}{'dim':>5}{'picks':>7}{'numba ms':>11}{'numpy ms':>11}{'sel/s numba':>13}{'speed-up':>10}  same"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['pool']:>7}{r['dim']:>5}{r['picks']:>7}{r['numba_ms']:>11.3f}{r['numpy_ms']:>11.2f}"
              f"{r['numba_selections_per_s']:>13.1f}{r['speedup_vs_numpy']:>9.1f}x  {r['same_indices']}")
    print(f"numba first-call compile: {compile_s:.2f} s (excluded above)")


def append_csv(rows: list[dict], meta: dict, path: Path = RESULTS_CSV) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(meta) + list(rows[0])
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({**meta, **r})


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pools", type=int, nargs="+", default=POOLS, help="candidate pool sizes")
    parser.add_argument("--dim", type=int, default=DEFAULT_EMBEDDING_DIM, help="embedding dimension")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--csv", type=Path, default=RESULTS_CSV, help="CSV to append the rows to")
    args = parser.parse_args(argv)

    rows, compile_s = run(args.pools, args.dim, args.seed)
    device = device_name()
    print_table(rows, compile_s, device)
    meta = {"time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git": git_revision(),
            "device": device, "token_budget": TOKEN_BUDGET, "numba": numba.__version__, "numpy": np.__version__,
            "compile_s": round(compile_s, 3)}
    append_csv(rows, meta, args.csv)
    print(f"appended {len(rows)} rows to {args.csv}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
