"""The training loop's edges: SIGTERM checkpoints and stops (and the run resumes from there),
metrics rows average the loss over their window, tokens/s counts training time only."""
import json
import math
import os
import signal
import time

import pytest

from engine import checkpoint as ckpt
from engine.parallel import init_distributed
from test_checkpoint import make_trainer


@pytest.fixture(scope="module")
def env():
    return init_distributed()


def rows_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sigterm_checkpoints_after_the_step_and_the_run_resumes_there(env, tmp_path):
    out = tmp_path / "run"
    trainer, _ = make_trainer(env, out, ["max_steps=8", "checkpoint.every=0", "metrics.log_every=1"])
    previous = signal.getsignal(signal.SIGTERM)

    def preempt(t):
        if t.state.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)   # as a scheduler's preemption would
    trainer.hooks["after_step"] = preempt
    summary = trainer.train()
    trainer.close()
    assert signal.getsignal(signal.SIGTERM) is previous, "the handler must be restored after training"
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == 3
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step_00000003"]

    resumed, _ = make_trainer(env, out, ["max_steps=8", "checkpoint.every=0", "metrics.log_every=1"])
    assert resumed.resume() and resumed.state.step == 3
    summary = resumed.train()
    resumed.close()
    assert summary["stopped_by"] is None and summary["steps"] == 8


def test_a_sigterm_delivered_twice_at_once_is_one_stop_with_a_checkpoint(env, tmp_path):
    """A process-group kill under torchrun reaches a rank twice within moments: still a checkpoint."""
    out = tmp_path / "run"
    trainer, _ = make_trainer(env, out, ["max_steps=8", "checkpoint.every=0"])

    def preempt_twice(t):
        if t.state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
    trainer.hooks["after_step"] = preempt_twice
    summary = trainer.train()   # a SystemExit here would be the "stop at once" path
    trainer.close()
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == 2
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step_00000002"]


def test_rows_average_the_loss_over_their_window(env, tmp_path):
    """log_every=3: each row's loss is the target-weighted mean of its 3 steps, not the last one."""
    out = tmp_path / "run"
    trainer, _ = make_trainer(env, out, ["max_steps=6", "checkpoint.every=0", "metrics.log_every=3"])
    steps = []
    trainer.hooks["after_step"] = lambda t: steps.append((t.last_stats.loss, t.last_stats.targets,
                                                           dict(t.last_stats.per_task_sums)))
    trainer.train()
    trainer.close()
    rows = [r for r in rows_of(out) if "loss" in r]
    assert [r["step"] for r in rows] == [3, 6] and all(r["steps_in_row"] == 3 for r in rows)
    for row, window in zip(rows, (steps[:3], steps[3:])):
        mean = sum(loss * n for loss, n, _ in window) / sum(n for _, n, _ in window)
        assert row["loss"] == pytest.approx(mean, rel=1e-9)
        assert row["step_loss"] == pytest.approx(window[-1][0], rel=1e-9)
        assert row["loss"] != pytest.approx(row["step_loss"], rel=1e-6), "different batches, different losses"
        tasks = {t for _, _, sums in window for t in sums}
        assert set(row["loss_per_task"]) == tasks
        for task in tasks:
            total = sum(sums[task][0] for _, _, sums in window if task in sums)
            count = sum(sums[task][1] for _, _, sums in window if task in sums)
            assert row["loss_per_task"][task] == pytest.approx(total / count, rel=1e-9)
    assert trainer.final_losses == rows[-1]["loss_per_task"]
    # the budget fill: real tokens over grad_accum x world size x data.max_tokens_per_batch slots per step
    cfg = trainer.cfg
    budget = cfg.optim.grad_accum * env.world_size * cfg.data.max_tokens_per_batch
    for row, first in zip(rows, (0, 3)):
        real = row["tokens"] - (rows[0]["tokens"] if first else 0)
        assert row["budget_fill"] == pytest.approx(real / (3 * budget), rel=1e-9)
        assert 0 < row["budget_fill"] <= row["packing_efficiency"] <= 1.0, row   # slots never exceed the budget


def test_a_row_after_a_resume_still_covers_its_whole_window(env, tmp_path):
    """log_every=3, a checkpoint at step 2 (mid-window), a crash at step 3: the resumed run's row at
    step 3 averages steps 1-3 (two from the checkpoint's window, one trained after the resume)."""
    out = tmp_path / "run"
    settings = ["max_steps=6", "checkpoint.every=2", "metrics.log_every=3"]
    trainer, _ = make_trainer(env, out, settings)
    before = []

    def crash_at_3(t):
        if t.state.step == 3:
            raise RuntimeError("crash")
        before.append((t.last_stats.loss, t.last_stats.targets, t.last_stats.tokens))
    trainer.hooks["after_step"] = crash_at_3
    with pytest.raises(RuntimeError, match="crash"):
        trainer.train()
    trainer.close()
    resumed, _ = make_trainer(env, out, settings)
    after = []
    resumed.hooks["after_step"] = lambda t: after.append((t.last_stats.loss, t.last_stats.targets,
                                                          t.last_stats.tokens))
    assert resumed.resume() and resumed.state.step == 2 and resumed.window.steps == 2
    resumed.train()
    resumed.close()
    rows = [r for r in rows_of(out) if "loss" in r]
    assert [r["step"] for r in rows] == [3, 6] and [r["steps_in_row"] for r in rows] == [3, 3]
    window = before[:2] + after[:1]
    assert rows[0]["loss"] == pytest.approx(sum(l * n for l, n, _ in window) / sum(n for _, n, _ in window), rel=1e-9)


@pytest.mark.parametrize("ending, expected", [
    (["max_steps=3"], [("end", 3), ("save", 3)]),                       # the end: validated, then checkpointed
    (["max_steps=6", "debug.stop_after_steps=3"], [("save", 3)]),        # a stop to be resumed: no final eval
])
def test_the_final_validation_runs_before_the_final_checkpoint(env, tmp_path, ending, expected):
    """So that the checkpoint records it: a resumed finished run does not validate again, and a run
    continued with a larger max_steps keeps that eval row (rows after a checkpoint are cut on resume)."""
    trainer, _ = make_trainer(env, tmp_path / "run", ["checkpoint.every=0", *ending])
    calls = []
    trainer.hooks["on_end"] = lambda t: calls.append(("end", t.state.step))
    real_save = trainer.save
    trainer.save = lambda: (calls.append(("save", trainer.state.step)), real_save())
    trainer.train()
    trainer.close()
    assert calls == expected


def test_tokens_per_second_leaves_out_time_spent_outside_steps(env, tmp_path):
    out = tmp_path / "run"
    trainer, _ = make_trainer(env, out, ["max_steps=3", "checkpoint.every=0"])
    trainer.hooks["after_step"] = lambda t: time.sleep(0.5)   # e.g. an evaluation between steps
    summary = trainer.train()
    trainer.close()
    assert summary["wall_s"] - summary["train_s"] > 0.9   # the sleeps after steps 1 and 2 (wall_s is read before the hooks)
    assert summary["tokens_per_sec"] == pytest.approx(summary["tokens"] / summary["train_s"])
    assert math.isfinite(summary["tokens_per_sec"])


def test_data_counts_of_a_two_rank_run_cover_both_ranks(cli_run):
    """summary.json and the metrics rows carry the counts of every rank, and they add up."""
    summary = json.loads((cli_run / "summary.json").read_text())
    data = summary["data"]
    assert data["world_size"] == 2 and [r["rank"] for r in data["per_rank"]] == [0, 1]
    assert data["used"] == sum(r["used"] for r in data["per_rank"]) > 0
    assert data["used"] > max(r["used"] for r in data["per_rank"]), "one rank's counts alone"
    assert data["read"] == data["used"] + data["pending"] + data["released_at_switch"] + sum(data["skipped"].values())
    last = [r for r in rows_of(cli_run) if "data" in r][-1]
    assert last["data"]["world_size"] == 2


def test_resume_after_a_crash_rewrites_exactly_the_rows_written_after_its_checkpoint(demo_dir, tmp_path):
    """hybrid: a checkpoint at step 3, a stage boundary at step 3 whose stage row and eval row are
    written after that checkpoint. A crash later loses the later checkpoints; the resumed run must
    leave metrics.jsonl as the uninterrupted run wrote it: no boundary eval twice, none missing."""
    import shutil
    import subprocess
    import sys

    from conftest import REPO

    def train(out):
        cmd = [sys.executable, "engine/train.py", "--recipe", "hybrid", "max_steps=8", f"output_dir={out}",
               f"data.demo_dir={demo_dir}", "data.max_tokens_per_batch=1024", "checkpoint.every=3", "checkpoint.keep=5",
               "metrics.log_every=1", "eval.max_samples=2", "eval.max_new_tokens=2", "metrics.tensorboard=false",
               "eval.at_end=false"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    def shape(rows):
        return [(r.get("event", "train"), r["step"], r.get("stage"), round(r["loss"], 4) if r.get("loss") else None)
                for r in rows]

    straight = tmp_path / "straight"
    train(straight)
    want = rows_of(straight)
    boundary = [r for r in want if r.get("event") == "eval" and r["step"] == 3]
    assert len(boundary) == 1, "the recipe's stage boundary moved: pick the checkpoint step again"
    crashed = tmp_path / "crashed"
    shutil.copytree(straight, crashed)
    for later in ("step_00000006", "step_00000008"):   # lost in the crash
        shutil.rmtree(crashed / "checkpoints" / later)
    proc = train(crashed)
    assert "resumed from" in proc.stdout and "step_00000003" in proc.stdout
    assert shape(rows_of(crashed)) == shape(want)
