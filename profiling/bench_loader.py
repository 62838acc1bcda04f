"""Loader throughput: samples/s and audio-seconds/s of the whole pipeline, 0/1/2 workers.

    python -m profiling.bench_loader [--seconds 8] [--max-tokens 2048] [--demo-dir data/demo]

Measures TrainStream.next_step() end to end (tar read, JSON routing, decode, resample,
log-mel, prompt, bucketing, collate) over the embedded demo shards, for 0, 1 and 2
DataLoader workers. Baseline, measured in the same run: the same pipeline with the features
computed by transformers' WhisperFeatureExtractor(feature_size=128) called per sample with
padding="longest", truncation=False (not padded to 30 s). The ratio column is ours / baseline
at the same worker count.

Next to it, the tokens/s that a tiny-preset training step consumes on the same machine
(``--train-steps`` steps of ``engine/train.py --recipe random``, in a subprocess; 0 skips it):
the loader is not the bottleneck while its tokens/s is well above that.

Prints a table, writes profiling/results/bench_loader.json and appends one CSV row per
configuration to profiling/results/bench_loader.csv (git revision, device, settings).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import time
from pathlib import Path

import torch
from profiling.provenance import git_revision, cpu_name as device_name

RESULTS = Path(__file__).parent / "results"
RESULTS_CSV = RESULTS / "bench_loader.csv"
RESULTS_JSON = RESULTS / "bench_loader.json"
WARMUP_STEPS = 2  # fills the shuffle blocks and starts the workers; not timed
WORKER_COUNTS = (0, 1, 2)






def measure(cfg, tokenizer, seconds: float) -> dict:
    """Steps of one rank (grad_accum=1) for about ``seconds`` after warm-up."""
    from loaders.pipeline import TrainStream

    stream = TrainStream(cfg, tokenizer, rank=0, world_size=1, grad_accum=1, seed=0)
    for _ in range(WARMUP_STEPS):
        stream.next_step()
    samples = frames = tokens = steps = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for mb in stream.next_step():
            samples += len(mb["keys"])
            frames += int(mb["feature_attention_mask"].sum())
            tokens += mb["num_tokens"]
        steps += 1
    elapsed = time.perf_counter() - start
    stream.close()
    return {"steps": steps, "samples": samples, "elapsed_s": elapsed, "samples_per_s": samples / elapsed,
            "audio_s_per_s": frames / 100.0 / elapsed, "tokens_per_s": tokens / elapsed}


def training_tokens_per_s(steps: int, demo_dir: str) -> float | None:
    """tokens/s of the tiny preset over `steps` training steps (summary.json of a real run)."""
    if steps <= 0:
        return None
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "engine/train.py", "--recipe", "random", f"max_steps={steps}", f"output_dir={out}",
                   f"data.demo_dir={demo_dir}", "checkpoint.every=0"]
        done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        summary = Path(out) / "summary.json"
        if done.returncode != 0 or not summary.exists():
            print(f"training run failed (exit {done.returncode}); tokens/s of training not measured:\n"
                  f"{done.stderr[-2000:]}")
            return None
        return float(json.loads(summary.read_text())["tokens_per_sec"])


def run(seconds: float, max_tokens: int, demo_dir: str) -> list[dict]:
    import loaders.stream as stream_module
    from engine.tokenizer import build_tiny_tokenizer
    from loaders.config import DataConfig
    from loaders.features import log_mel, reference_log_mel

    tokenizer = build_tiny_tokenizer()
    rows = []
    for workers in WORKER_COUNTS:
        cfg = DataConfig(demo_dir=demo_dir, num_workers=workers, max_tokens_per_batch=max_tokens)
        for impl, features in (("whisper_extractor", reference_log_mel), ("ours", log_mel)):
            stream_module.log_mel = features  # workers fork after this, so they inherit it
            try:
                result = measure(cfg, tokenizer, seconds)
            finally:
                stream_module.log_mel = log_mel
            rows.append({"workers": workers, "features": impl, **result})
    for row in rows:
        base = next(r for r in rows if r["workers"] == row["workers"] and r["features"] == "whisper_extractor")
        row["x_vs_extractor"] = row["samples_per_s"] / base["samples_per_s"]
    return rows


def print_table(rows: list[dict], train_tokens_per_s: float | None) -> None:
    print(f"{'workers':>7} {'features':>18} {'samples/s':>10} {'audio s/s':>10} {'tokens/s':>10} {'vs extractor':>12}")
    for r in rows:
        print(f"{r['workers']:>7} {r['features']:>18} {r['samples_per_s']:>10.1f} {r['audio_s_per_s']:>10.1f} "
              f"{r['tokens_per_s']:>10.0f} {r['x_vs_extractor']:>11.2f}x")
    if train_tokens_per_s:
        print(f"tiny-preset training consumes {train_tokens_per_s:,.0f} tokens/s on this machine; the slowest loader "
              f"configuration delivers {min(r['tokens_per_s'] for r in rows) / train_tokens_per_s:,.0f}x that")


def write_results(rows: list[dict], settings: dict, json_path: Path = RESULTS_JSON, csv_path: Path = RESULTS_CSV) -> None:
    meta = {"time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git": git_revision(), "device": device_name(), "torch": torch.__version__, **settings}
    for path in (json_path, csv_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    fields = list(meta) + ["workers", "features", "samples_per_s", "audio_s_per_s", "tokens_per_s", "x_vs_extractor",
                           "steps", "samples", "elapsed_s"]
    new_file = not csv_path.exists()
    if not new_file:  # keep the columns of the existing file, so older rows stay aligned
        with csv_path.open(newline="") as handle:
            fields = next(csv.reader(handle), fields)
    with csv_path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        for row in rows:
            writer.writerow({**meta, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}})
    print(f"wrote {json_path} and appended {len(rows)} rows to {csv_path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per configuration")
    parser.add_argument("--max-tokens", type=int, default=2048, help="data.max_tokens_per_batch")
    parser.add_argument("--demo-dir", default="data/demo", help="where the demo shards are (generated if absent)")
    parser.add_argument("--train-steps", type=int, default=4, help="tiny training steps to time (0 = skip)")
    parser.add_argument("--json", type=Path, default=RESULTS_JSON, help="write the results here as JSON")
    parser.add_argument("--csv", type=Path, default=RESULTS_CSV, help="CSV to append the rows to")
    args = parser.parse_args(argv)
    rows = run(args.seconds, args.max_tokens, args.demo_dir)
    train_tokens_per_s = training_tokens_per_s(args.train_steps, os.path.abspath(args.demo_dir))
    print_table(rows, train_tokens_per_s)
    write_results(rows, {"seconds": args.seconds, "max_tokens_per_batch": args.max_tokens, "shards": "demo",
                         "grad_accum": 1, "train_tokens_per_s": train_tokens_per_s}, args.json, args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
