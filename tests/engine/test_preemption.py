"""SIGTERM on one rank of a torchrun job: every rank stops before the same step, one checkpoint is
written, the job exits with 143, and the same command resumes from that checkpoint."""
import json
import os
import subprocess
import time

import psutil

from conftest import REPO, TORCHRUN, step_rows

# A tiny 2-rank job reaches its first steps in ~10-20 s here; generous, not a timing assertion.
DEADLINE_S = 240


def worker_of_rank(torchrun: subprocess.Popen, rank: int) -> psutil.Process | None:
    for child in psutil.Process(torchrun.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "engine/train.py" in " ".join(child.cmdline()):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_sigterm_on_one_rank_checkpoints_every_rank_and_resumes(demo_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--nproc_per_node=2", "engine/train.py", "--recipe", "random", "max_steps=40", f"output_dir={out}",
            f"data.demo_dir={demo_dir}", "data.max_tokens_per_batch=1024", "checkpoint.every=0", "metrics.log_every=1",
            "metrics.progress_bar=false", "metrics.tensorboard=false", "eval.at_end=false", "eval.every=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = tmp_path / "log.txt"
    with open(log, "w") as sink:
        job = subprocess.Popen(TORCHRUN + args, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            start = time.monotonic()
            while "step 2/40" not in log.read_text() and time.monotonic() - start < DEADLINE_S and job.poll() is None:
                time.sleep(0.2)
            rank1 = worker_of_rank(job, 1)
            assert rank1 is not None, log.read_text()[-3000:]
            rank1.send_signal(15)   # one rank only: the other learns of it through the ranks' agreement
            returncode = job.wait(timeout=DEADLINE_S)
        finally:
            if job.poll() is None:
                for p in [psutil.Process(job.pid)] + psutil.Process(job.pid).children(recursive=True):
                    p.kill()
    text = log.read_text()
    assert returncode != 0, text[-3000:]   # torchrun reports the workers' 143
    assert "rank 1: SIGTERM received" in text and "stopped by SIGTERM" in text, text[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    stopped_at = summary["steps"]
    assert summary["stopped_by"] == "SIGTERM" and 2 <= stopped_at < 40
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert checkpoints == [f"step_{stopped_at:08d}"]

    resumed = subprocess.run(TORCHRUN + args[:2] + [a.replace("max_steps=40", f"max_steps={stopped_at + 2}")
                                                    for a in args[2:]],
                             cwd=REPO, capture_output=True, text=True, timeout=DEADLINE_S, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / checkpoints[0]}" in resumed.stdout
    steps = [r["step"] for r in step_rows(out)]
    assert steps == list(range(1, stopped_at + 3)), steps
