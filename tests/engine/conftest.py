"""Shared training runs: each real multi-process run is launched once per test session."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]

# The settings every CLI run of the engine tests shares: short, with a checkpoint midway and
# a NaN loss injected at step 2 so that the guard is exercised in every run.
CLI_STEPS = 4
CLI_SETTINGS = [f"max_steps={CLI_STEPS}", "checkpoint.every=2", "metrics.log_every=1", "debug.nonfinite_loss_at=[2]",
                "data.max_tokens_per_batch=1024", "optim.lr=5e-3", "optim.warmup_steps=0", "metrics.progress_bar=false",
                "eval.max_samples=4", "eval.max_new_tokens=4"]


def run_cli(args: list[str], nproc: int, log: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = TORCHRUN + [f"--nproc_per_node={nproc}", "engine/train.py"] + args
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def step_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "event" not in r]


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    from loaders.demo_data import write_demo_shards

    path = tmp_path_factory.mktemp("demo") / "shards"
    write_demo_shards(str(path))
    return path


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory, demo_dir) -> Path:
    """torchrun --nproc_per_node=2 engine/train.py --recipe random ... (the uninterrupted run)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = run_cli(["--recipe", "random", f"output_dir={out}", f"data.demo_dir={demo_dir}"] + CLI_SETTINGS, 2,
                   out.parent / "log.txt")
    assert proc.returncode == 0, f"training failed; log in {out.parent / 'log.txt'}:\n{proc.stderr[-4000:]}"
    return out
