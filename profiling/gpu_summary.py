"""The last table of profiling/gpu_check.sh: stage status and headline numbers from its JSON files.

    python -m profiling.gpu_summary OUT_DIR

Reads OUT_DIR/stages.jsonl (written by gpu_check.sh), bench_train.json (or bench_train_ckpt.json),
bench_train_packed.json (ours on packed rows of the same batches, its own stage), bench_lora.json and bench_linear_cross_entropy.json where present, prints one short table and
writes OUT_DIR/summary.json. A missing or unreadable file is named in the table, never fatal.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_stages(out_dir: Path) -> list[dict]:
    stages = []
    try:
        lines = (out_dir / "stages.jsonl").read_text().splitlines()
    except OSError:
        return stages
    for line in lines:
        try:
            stages.append(json.loads(line))
        except json.JSONDecodeError:
            stages.append({"stage": "?", "status": "unreadable line", "rc": None, "seconds": None, "note": line[:60]})
    return stages


def geomean(values: list[float]) -> float | None:
    values = [v for v in values if isinstance(v, (int, float)) and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def fmt(value, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def bench_train_lines(out_dir: Path) -> list[tuple[str, str]]:
    lines, padded = [], None
    for name in ("bench_train.json", "bench_train_ckpt.json"):  # the second: the retry with checkpointing
        report = read_json(out_dir / name)
        if report is not None:
            lines += one_bench_train(report)
            padded = report if "error" not in report["results"].get("ours", {"error": 1}) else padded
    packed = read_json(out_dir / "bench_train_packed.json")
    if packed is not None:
        lines += one_bench_train(packed, padded)
    return lines or [("bench_train", "no bench_train.json")]


def one_bench_train(report: dict, padded_report: dict | None = None) -> list[tuple[str, str]]:
    """Headline lines of one bench_train report. `padded_report`: the run of ours on the padded
    batches in another stage, for the packed / padded ratio of a packed-only report."""
    s, res, cmp_ = report["settings"], report["results"], report.get("comparison") or {}
    tag = f"bench_train {s['preset']}{' (grad ckpt)' if s.get('gradient_checkpointing') else ''}"
    failed = [v for v, r in res.items() if "error" in r]
    ok = {v: r for v, r in res.items() if "error" not in r}
    lines = [(tag, "failed: " + ", ".join(f"{v} {res[v]['error']}" for v in failed))] if failed else []
    if "ours" in ok and "baseline" in ok:
        lines += ours_vs_baseline_lines(tag, ok["ours"], ok["baseline"], cmp_)
    else:
        lines += [(f"{tag} {v} tokens/s | peak GiB", f"{r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f}")
                  for v, r in ok.items() if v in ("ours", "baseline")]
    if "ours_packed" in ok:
        lines += packed_lines(tag, report, padded_report)
    return lines


def ours_vs_baseline_lines(tag: str, ours: dict, base: dict, cmp_: dict) -> list[tuple[str, str]]:
    goals = cmp_.get("goals", {})

    def goal(key):
        g = goals.get(key)
        return "" if not g or g["met"] is None else f" (goal {g['target']:g}: {'met' if g['met'] else 'not met'})"

    mfu = f"{ours['mfu'] * 100:.1f}% vs {base['mfu'] * 100:.1f}%" if ours.get("mfu") is not None else "n/a (no peak known)"
    return [(f"{tag} tokens/s ours | baseline", f"{ours['tokens_per_s']:,.0f} | {base['tokens_per_s']:,.0f}"),
            (f"{tag} speed-up ours/baseline", fmt(cmp_.get("speedup"), ".2f", "x") + goal("speedup")),
            (f"{tag} MFU ours vs baseline", mfu + goal("mfu")),
            (f"{tag} peak GiB ours | baseline", f"{ours['peak_gib']:.1f} | {base['peak_gib']:.1f}, ratio "
             + fmt(cmp_.get("memory_ratio"), ".2f", "x") + goal("memory_ratio"))]


def packed_lines(tag: str, report: dict, padded_report: dict | None) -> list[tuple[str, str]]:
    """Ours on packed rows: tokens/s, packing efficiency against the same samples padded, and
    packed / padded tokens/s (same run where it has both, else against the padded stage's run)."""
    s, packed, cmp_ = report["settings"], report["results"]["ours_packed"], report.get("comparison") or {}
    padded_eff = 1 - s["padding_pct"] / 100
    mfu = f", MFU {packed['mfu'] * 100:.1f}%" if packed.get("mfu") is not None else ""
    lines = [(f"{tag} tokens/s ours packed", f"{packed['tokens_per_s']:,.0f}{mfu}, peak {packed['peak_gib']:.1f} GiB"),
             (f"{tag} packing efficiency packed | padded", f"{packed.get('packing_efficiency', 1.0):.3f} | {padded_eff:.3f}")]
    if "packed_vs_padded_speedup" in cmp_:
        lines.append((f"{tag} tokens/s packed / padded", f"{cmp_['packed_vs_padded_speedup']:.2f}x (same run)"))
    elif padded_report is not None and same_setup(report, padded_report):
        padded = padded_report["results"]["ours"]
        lines.append((f"{tag} tokens/s packed / padded",
                      f"{packed['tokens_per_s'] / padded['tokens_per_s']:.2f}x (separate stages, same batches)"))
    return lines


def same_setup(a: dict, b: dict) -> bool:
    keys = ("preset", "recipe", "budget", "steps", "warmup", "nproc", "gradient_checkpointing", "overrides")
    return all(a["settings"].get(k) == b["settings"].get(k) for k in keys)


def lora_lines(out_dir: Path) -> list[tuple[str, str]]:
    report = read_json(out_dir / "bench_lora.json")
    if report is None:
        return [("lora kernels", "no bench_lora.json")]
    ours = [r for r in report.get("rows", []) if r.get("impl") == "ours"]
    speedups = [r.get("speedup_vs_peft") for r in ours]
    g = geomean(speedups)
    spread = f" (min {min(speedups):.2f}, max {max(speedups):.2f}, {len(ours)} shapes)" if g else ""
    return [("lora ours vs PEFT speed-up (geo-mean)", fmt(g, ".2f", "x") + spread)]


def cross_entropy_lines(out_dir: Path) -> list[tuple[str, str]]:
    report = read_json(out_dir / "bench_linear_cross_entropy.json")
    if report is None:
        return [("linear cross-entropy", "no bench_linear_cross_entropy.json")]
    ours = [r for r in report.get("rows", []) if r.get("variant") == "ours"]
    vs_liger = geomean([r.get("time_vs_liger") for r in ours])
    mem = geomean([r.get("mem_vs_naive") for r in ours])
    return [("linear CE ours time / Liger (geo-mean)", fmt(vs_liger, ".2f", "x")),
            ("linear CE ours memory / naive (geo-mean)", fmt(mem, ".3f", "x"))]


def summarize(out_dir: Path) -> tuple[str, dict]:
    stages = read_stages(out_dir)
    results = bench_train_lines(out_dir) + lora_lines(out_dir) + cross_entropy_lines(out_dir)
    env = read_json(out_dir / "env.json") or {}
    name_width = max([len(str(s.get("stage", "?"))) + 2 for s in stages] + [22])
    lines = [f"gpu_check summary: {env.get('device', '?')} | torch {env.get('torch', '?')} | {out_dir}",
             f"{'stage':<{name_width}}{'status':<10}{'seconds':>8}  note"]
    for s in stages:
        secs = "" if s.get("seconds") is None else str(s["seconds"])
        lines.append(f"{s.get('stage', '?'):<{name_width}}{s.get('status', '?'):<10}{secs:>8}  {s.get('note', '')}")
    width = max(len(k) for k, _ in results) + 2
    lines += [""] + [f"{key:<{width}}{value}" for key, value in results]
    return "\n".join(lines), {"env": env, "stages": stages, "results": dict(results)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="the folder gpu_check.sh wrote")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    if not out_dir.is_dir():
        print(f"gpu_summary: {out_dir} is not a folder; give the OUT_DIR of gpu_check.sh", file=sys.stderr)
        return 2
    table, data = summarize(out_dir)
    (out_dir / "summary.json").write_text(json.dumps(data, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
