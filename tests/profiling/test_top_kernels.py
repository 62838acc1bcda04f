"""profiling/top_kernels.py on a real trace of a profiled tiny run, and on a hand-made trace."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from profiling.top_kernels import ENGINE_RANGES, TraceError, format_report, main, self_times, top_ops

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory) -> Path:
    """python engine/train.py --recipe random max_steps=4 profiler.enabled=true (wait 1, warmup 1, active 1)."""
    tmp = tmp_path_factory.mktemp("profiled")
    out = tmp / "run"
    cmd = [sys.executable, "engine/train.py", "--recipe", "random", "max_steps=4", "profiler.enabled=true",
           "profiler.wait=1", "profiler.warmup=1", "profiler.active=1", f"output_dir={out}",
           f"data.demo_dir={tmp / 'demo'}", "data.max_tokens_per_batch=256", "checkpoint.every=0",
           "metrics.progress_bar=false", "metrics.tensorboard=false", "eval.at_end=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"profiled run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return out


def test_profiled_run_writes_a_trace_that_top_kernels_reads(profiled_run, capsys):
    traces = sorted((profiled_run / "traces").glob("rank0-step*.json"))
    assert len(traces) == 1, list((profiled_run / "traces").iterdir())
    assert main([str(traces[0]), "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "1 profiled step(s)" in out and "top cpu ops by self time" in out
    lines = out.splitlines()
    op_rows = lines[2:lines.index("")]  # between the table header and the blank line
    assert len(op_rows) == 5, out  # --top 5
    assert any(line.startswith("aten::mm ") for line in op_rows), out  # the LLM's matmuls rank near the top
    for name in ENGINE_RANGES:  # the engine's ranges, each recorded in the profiled step
        assert any(line.split()[:1] == [name] for line in out.splitlines()), (name, out)
    shares = [float(line.split()[-1].rstrip("%")) for line in op_rows]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.5


def write_trace(path: Path, events: list[dict]) -> Path:
    path.write_text(json.dumps({"traceEvents": events}))
    return path


def x(name, cat, ts, dur, tid=1):
    return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur}


def test_self_time_subtracts_nested_operators_once():
    # linear [0, 100) holds addmm [10, 70) which holds copy_ [20, 30); mul [100, 120) on its own.
    ops = [x("aten::linear", "cpu_op", 0, 100), x("aten::addmm", "cpu_op", 10, 60), x("aten::copy_", "cpu_op", 20, 10),
           x("aten::mul", "cpu_op", 100, 20), x("aten::mul", "cpu_op", 0, 30, tid=2)]
    assert self_times(ops) == {0: 40.0, 1: 50.0, 2: 10.0, 3: 20.0, 4: 30.0}
    kind, totals = top_ops(ops)
    assert kind == "cpu ops"
    assert [(t.name, t.calls, t.self_us) for t in totals] == [
        ("aten::addmm", 1, 50.0), ("aten::mul", 2, 50.0), ("aten::linear", 1, 40.0), ("aten::copy_", 1, 10.0)]


def test_cuda_kernels_are_preferred_and_shares_use_the_profiler_steps(tmp_path):
    events = [x("ProfilerStep#3", "user_annotation", 0, 1000), x("aten::mm", "cpu_op", 0, 900),
              x("sm90_gemm", "kernel", 10, 600, tid=7), x("sm90_gemm", "kernel", 700, 100, tid=7),
              x("triton_lora_fwd", "kernel", 620, 50, tid=7), x("backward", "user_annotation", 400, 500)]
    out = format_report(write_trace(tmp_path / "t.json", events), top=5)
    lines = out.splitlines()
    assert "top cuda kernels by total time" in lines[0] and "1,000" not in lines[0] and "1.0 ms wall" in lines[0]
    assert lines[2].split() == ["sm90_gemm", "2", "0.70", "70.0%"]
    assert lines[3].split() == ["triton_lora_fwd", "1", "0.05", "5.0%"]
    assert not any(line.startswith("aten::mm") for line in lines)
    assert ["backward", "1", "0.50", "50.0%"] in [line.split() for line in lines]


def test_a_file_that_is_not_a_trace_gets_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"step": 1}\n{"step": 2}\n')
    assert main([str(bad)]) == 2
    assert "not JSON" in capsys.readouterr().err
    with pytest.raises(TraceError, match="no such file"):
        format_report(tmp_path / "missing.json")
