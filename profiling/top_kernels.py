"""Where a profiled step goes: the top operators/kernels of a torch.profiler chrome trace.

    python -m profiling.top_kernels runs/<run>/traces/rank0-step3.json [--top 15]

Reads the JSON that torch.profiler's export_chrome_trace writes (`profiler.enabled=true` in a
recipe writes one per rank under <output_dir>/traces/) and prints:
  1. the top CUDA kernels by total time (when the trace has any), else the top CPU operators
     by self time (time not spent in a nested operator, so a parent and its children are not
     counted twice), each with its share of the profiled steps' wall time;
  2. the engine's record_function ranges (data_wait, forward.audio_encoder, forward.llm,
     forward.loss, backward, optimizer) with their totals and shares.
The profiled steps' wall time is the sum of the `ProfilerStep#N` ranges; without them, the
span from the first to the last event.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from dataclasses import dataclass
from pathlib import Path

# The ranges the engine records (engine/trainer.py, engine/model.py), in the order a step runs them.
ENGINE_RANGES = ("data_wait", "forward.audio_encoder", "forward.llm", "forward.loss", "backward", "optimizer")
KERNEL_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
STEP_PREFIX = "ProfilerStep#"


class TraceError(ValueError):
    """The file is not a torch.profiler chrome trace; the message says what was found."""


@dataclass
class OpTotal:
    name: str
    calls: int
    total_us: float
    self_us: float


def load_trace(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such file; traces are written under <output_dir>/traces/ "
                         "when the run has profiler.enabled=true")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TraceError(f"{path}: not JSON ({e}); was the trace written completely?") from e
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise TraceError(f"{path}: no 'traceEvents' list; expected a chrome trace from torch.profiler")
    return [e for e in events if isinstance(e, dict) and e.get("ph") == "X" and "dur" in e]


def step_wall_us(events: list[dict]) -> float:
    steps = [e["dur"] for e in events if str(e.get("name", "")).startswith(STEP_PREFIX)]
    if steps:
        return float(sum(steps))
    if not events:
        return 0.0
    return max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)


def self_times(ops: list[dict]) -> dict[int, float]:
    """Self time of each op (by index in `ops`): its duration minus that of its direct children,
    nesting read per thread from the start/end times."""
    self_us = {}
    by_thread = collections.defaultdict(list)
    for i, e in enumerate(ops):
        by_thread[(e.get("pid"), e.get("tid"))].append(i)
    for indices in by_thread.values():
        indices.sort(key=lambda i: (ops[i]["ts"], -ops[i]["dur"]))
        stack: list[int] = []
        for i in indices:
            start = ops[i]["ts"]
            while stack and ops[stack[-1]]["ts"] + ops[stack[-1]]["dur"] <= start:
                stack.pop()
            self_us[i] = float(ops[i]["dur"])
            if stack:
                self_us[stack[-1]] -= ops[i]["dur"]
            stack.append(i)
    return self_us


def top_ops(events: list[dict]) -> tuple[str, list[OpTotal]]:
    """("cuda kernels" | "cpu ops", totals sorted by the time that counts: kernel time or CPU self time)."""
    kernels = [e for e in events if e.get("cat") in KERNEL_CATEGORIES]
    if kernels:
        kind, ops = "cuda kernels", kernels
        self_us = {i: float(e["dur"]) for i, e in enumerate(ops)}
    else:
        kind, ops = "cpu ops", [e for e in events if e.get("cat") == "cpu_op"]
        self_us = self_times(ops)
    totals: dict[str, OpTotal] = {}
    for i, e in enumerate(ops):
        t = totals.setdefault(e["name"], OpTotal(e["name"], 0, 0.0, 0.0))
        t.calls += 1
        t.total_us += e["dur"]
        t.self_us += self_us[i]
    return kind, sorted(totals.values(), key=lambda t: t.self_us, reverse=True)


def engine_ranges(events: list[dict]) -> list[OpTotal]:
    """Totals of the engine's record_function ranges (CPU side: the host time of each range)."""
    totals = {name: OpTotal(name, 0, 0.0, 0.0) for name in ENGINE_RANGES}
    for e in events:
        if e.get("cat") == "user_annotation" and e.get("name") in totals:
            t = totals[e["name"]]
            t.calls += 1
            t.total_us += e["dur"]
    return [t for t in totals.values() if t.calls]


def short(name: str, width: int) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def format_report(path: str | Path, top: int = 15) -> str:
    events = load_trace(path)
    wall = step_wall_us(events)
    kind, ops = top_ops(events)
    n_steps = sum(1 for e in events if str(e.get("name", "")).startswith(STEP_PREFIX))
    share = (lambda us: f"{100 * us / wall:6.1f}%") if wall > 0 else (lambda us: "   n/a")
    lines = [f"{path}: {n_steps or 'no'} profiled step(s), {wall / 1e3:,.1f} ms wall; top {kind} by "
             f"{'total' if kind == 'cuda kernels' else 'self'} time"]
    lines.append(f"{'name':<60}{'calls':>8}{'time ms':>11}{'share':>8}")
    for t in ops[:top]:
        lines.append(f"{short(t.name, 59):<60}{t.calls:>8}{t.self_us / 1e3:>11.2f}{share(t.self_us)}")
    if not ops:
        lines.append("  (no operator events: was the trace recorded with the profiler's CPU/CUDA activities?)")
    ranges = engine_ranges(events)
    lines.append("")
    lines.append(f"{'engine range':<28}{'calls':>8}{'time ms':>11}{'share':>8}")
    for t in ranges:
        lines.append(f"{t.name:<28}{t.calls:>8}{t.total_us / 1e3:>11.2f}{share(t.total_us)}")
    if not ranges:
        lines.append("  (none of " + ", ".join(ENGINE_RANGES) + " found: not an omnitrain training trace?)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", help="chrome trace JSON written by torch.profiler (e.g. traces/rank0-step3.json)")
    parser.add_argument("--top", type=int, default=15, help="rows of the operator table")
    args = parser.parse_args(argv)
    try:
        print(format_report(args.trace, args.top))
    except TraceError as e:
        print(f"top_kernels: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
