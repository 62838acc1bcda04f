"""summary.json after a resume: a rerun of a finished run keeps its results, and a run stopped and
resumed reports the whole run (losses of every task, wall and training time of every segment)."""
import json
import os
import subprocess
import sys

from conftest import REPO, step_rows

# Short, with a validation small enough to finish in a second or two.
QUICK = ["--recipe", "random", "metrics.progress_bar=false", "metrics.log_every=1", "eval.max_samples=2",
         "eval.max_new_tokens=2", "data.max_tokens_per_batch=1024"]


def train(out, *overrides) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "engine/train.py", *QUICK, f"output_dir={out}", *overrides], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode in (0, 143), proc.stderr[-3000:]
    return proc


def summary_of(out) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_rerunning_a_finished_run_keeps_its_summary(tmp_path):
    out = tmp_path / "run"
    train(out, "max_steps=2")
    finished = summary_of(out)
    assert finished["final_loss_per_task"] and finished["eval"]
    proc = train(out, "max_steps=2")
    assert "already complete" in proc.stdout
    assert summary_of(out) == finished
    # Without its summary (a crash after the final checkpoint), the rerun writes one from the
    # checkpoint: the final losses and the training time are the run's, not the empty rerun's.
    (out / "summary.json").unlink()
    train(out, "max_steps=2")
    rebuilt = summary_of(out)
    assert rebuilt["final_loss_per_task"] == finished["final_loss_per_task"]
    assert rebuilt["train_s"] == finished["train_s"] and rebuilt["tokens"] == finished["tokens"]
    assert rebuilt["wall_s"] >= finished["train_s"]


def test_a_stopped_and_resumed_run_reports_the_whole_run(tmp_path):
    out = tmp_path / "run"
    proc = train(out, "max_steps=3", "debug.stop_after_steps=1")
    first = summary_of(out)
    # debug.stop_after_steps acts as a preemption: the summary and the last line say the run stopped
    assert first["stopped_by"] == "debug.stop_after_steps" and first["steps"] == 1 and first["max_steps"] == 3
    assert "stopped by debug.stop_after_steps before the end of the run" in proc.stdout
    train(out, "max_steps=3")
    whole = summary_of(out)
    assert whole["steps"] == 3 and whole["stopped_by"] is None
    assert whole["train_s"] > first["train_s"] and whole["wall_s"] > first["wall_s"]
    assert whole["tokens_per_sec"] == whole["tokens"] / whole["train_s"]
    # Every task any step logged has its latest loss in the summary (not only the last segment's).
    latest = {}
    for row in step_rows(out):
        latest.update(row["loss_per_task"])
    assert whole["final_loss_per_task"] == latest and len(latest) == 4
