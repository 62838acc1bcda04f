"""SIGTERM on one rank of a torchrun job: every rank stops before the same step, one checkpoint is
written, the job exits with 143, and the same command resumes from that checkpoint. A SIGTERM
during a validation pass abandons the pass on every rank (a job has ~30 s to checkpoint, not to
finish an evaluation); the resumed run validates that step first."""
import json
import os
import subprocess
import time

import psutil

from conftest import REPO, TORCHRUN, read_metrics, step_rows

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


def test_sigterm_during_a_validation_abandons_it_and_the_resumed_run_validates_first(demo_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--nproc_per_node=2", "engine/train.py", "--recipe", "random", "max_steps=4", f"output_dir={out}",
            f"data.demo_dir={demo_dir}", "data.max_tokens_per_batch=1024", "checkpoint.every=0", "metrics.log_every=1",
            "metrics.progress_bar=false", "metrics.tensorboard=false", "eval.every=2", "eval.at_end=false",
            "eval.max_samples=4", "eval.max_new_tokens=4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # rank 1 gets SIGTERM as the validation at step 2 begins; rank 0 learns of it inside the pass
    stopped = subprocess.run(TORCHRUN + args + ["debug.sigterm_on_rank=1", "debug.sigterm_in_eval_at_step=2"],
                             cwd=REPO, capture_output=True, text=True, timeout=DEADLINE_S, env=env)
    text = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0, text[-3000:]
    assert "validation at step 2 abandoned (SIGTERM)" in text, text[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]
    assert not [r for r in read_metrics(out) if r.get("event") == "eval"]

    # a resumed segment that fails leaves no summary.json (not the stopped segment's, which would
    # tell a script the job was preempted), and its checkpoint still holds the pending validation
    failed = subprocess.run(TORCHRUN + args + ["debug.fail_on_rank=1", "debug.fail_at_step=3"], cwd=REPO,
                            capture_output=True, text=True, timeout=DEADLINE_S, env=env)
    assert failed.returncode != 0 and "injected failure on rank 1" in failed.stdout + failed.stderr
    assert not (out / "summary.json").exists()

    resumed = subprocess.run(TORCHRUN + args, cwd=REPO, capture_output=True, text=True, timeout=DEADLINE_S, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "validation at step 2 (abandoned when the run stopped) runs now" in resumed.stdout
    rows = read_metrics(out)
    assert [r["step"] for r in rows if r.get("event") == "eval"] == [2, 4]
    assert [r["step"] for r in step_rows(out)] == [1, 2, 3, 4]

    # the same command once more: nothing left to train, the last checkpoint is not rewritten
    written = (out / "checkpoints" / "step_00000004" / "meta.json").stat().st_mtime_ns
    again = subprocess.run(TORCHRUN + args, cwd=REPO, capture_output=True, text=True, timeout=DEADLINE_S, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already complete (max_steps=4 reached at step 4)" in again.stdout
    assert (out / "checkpoints" / "step_00000004" / "meta.json").stat().st_mtime_ns == written
    assert len(read_metrics(out)) == len(rows)
