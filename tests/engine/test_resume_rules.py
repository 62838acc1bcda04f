"""What a run may continue: no mixing of two runs in one folder, no resume with settings that
break the run, metrics without duplicates after a resume, and a rotation that keeps the newest
checkpoint. In-process; checkpoints are meta.json folders except where weights matter."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import REPO
from engine import checkpoint as ckpt
from engine.checkpoint import CheckpointError, plan_resume
from engine.config import config_to_dict, load_config, save_config
from engine.metrics import MetricsWriter


def make_cfg(out, *overrides, recipe="random"):
    return load_config(recipe, [f"output_dir={out}", *overrides])


def fake_checkpoint(out, step, cfg=None, world_size=1, tokens=0):
    """A complete checkpoint as plan_resume sees it: a step folder with meta.json, and its other
    files present (plan_resume checks that none is missing or empty; their contents are not read)."""
    folder = out / "checkpoints" / f"step_{step:08d}"
    folder.mkdir(parents=True)
    for name in [".metadata", "__0_0.distcp"] + [f"rank{r}.pt" for r in range(world_size)]:
        (folder / name).write_bytes(b"not read by plan_resume")
    config = json.loads(json.dumps(config_to_dict(cfg))) if cfg is not None else None
    meta = {"step": step, "world_size": world_size, "tokens": tokens}
    if config is not None:
        meta["config"] = config
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_never_refuses_a_folder_that_holds_a_run(tmp_path):
    out = tmp_path / "run"
    assert plan_resume(out, make_cfg(out, "checkpoint.resume=never"), 1) == (None, [])  # a new folder is fine
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(CheckpointError, match="metrics.jsonl") as e:
        plan_resume(out, make_cfg(out, "checkpoint.resume=never"), 1)
    assert "new output_dir" in str(e.value)
    fake_checkpoint(out, 40, make_cfg(out))
    with pytest.raises(CheckpointError, match="step_00000040"):
        plan_resume(out, make_cfg(out, "checkpoint.resume=never"), 1)


def test_resuming_an_earlier_step_names_the_later_checkpoints(tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(out)
    early = fake_checkpoint(out, 35, cfg)
    fake_checkpoint(out, 40, cfg)
    with pytest.raises(CheckpointError, match="step_00000040") as e:
        plan_resume(out, make_cfg(out, f"checkpoint.resume={early}"), 1)
    assert "step 35" in str(e.value)
    # the way out it names works: the earlier checkpoint continues into a new folder
    assert f"checkpoint.resume={early} output_dir=" in str(e.value)
    fresh = tmp_path / "fresh"
    assert plan_resume(fresh, make_cfg(fresh, f"checkpoint.resume={early}"), 1)[0] == early
    point, warnings = plan_resume(out, make_cfg(out, "checkpoint.resume=auto"), 1)
    assert point.name == "step_00000040" and warnings == []


@pytest.mark.parametrize("change, key, old, new", [
    (["lora.targets=[q_proj,v_proj]"], "lora.targets", '"k_proj"', '["q_proj", "v_proj"]'),
    (["lora.alpha=64"], "lora.alpha", "16.0", "64.0"),
    (["lora.rank=4"], "lora.rank", "8", "4"),
    (["data.max_tokens_per_batch=1024"], "data.max_tokens_per_batch", "2048", "1024"),
    (["seed=7"], "seed", "1234", "7"),
    (["optim.grad_accum=2"], "optim.grad_accum", "1", "2"),
])
def test_a_changed_fixed_setting_is_refused_with_old_and_new_values(tmp_path, change, key, old, new):
    out = tmp_path / "run"
    fake_checkpoint(out, 40, make_cfg(out, "max_steps=40"))
    with pytest.raises(CheckpointError) as e:
        plan_resume(out, make_cfg(out, "max_steps=42", *change), 1)
    msg = str(e.value)
    assert f"{key}: " in msg and old in msg and new in msg, msg
    assert "step_00000040" in msg
    # the message lists every setting that may change on resume, from the rule itself
    changeable = msg.split("may change on resume: ")[1]
    for setting in ckpt.CHANGEABLE_ON_RESUME:
        assert (setting + "*" if setting.endswith(".") else setting) in changeable, setting


def test_another_recipe_is_refused(tmp_path):
    out = tmp_path / "run"
    fake_checkpoint(out, 40, make_cfg(out, "max_steps=40"))
    with pytest.raises(CheckpointError, match='schedule.name: "random" -> "tpc"'):
        plan_resume(out, make_cfg(out, "max_steps=42", recipe="tpc"), 1)


def test_changeable_settings_resume_and_a_new_world_size_is_refused(tmp_path):
    out = tmp_path / "run"
    fake_checkpoint(out, 40, make_cfg(out, "max_steps=40"), world_size=2)
    cfg = make_cfg(out, "max_steps=40", "eval.every=5", "metrics.log_every=3", "checkpoint.every=10",
                   "lora.impl=reference", "model.gradient_checkpointing=true")
    point, warnings = plan_resume(out, cfg, 2)
    assert point.name == "step_00000040" and warnings == []
    with pytest.raises(CheckpointError, match="2 processes"):
        plan_resume(out, cfg, 1)


def test_a_longer_run_warns_which_stage_it_resumes_into(tmp_path):
    out = tmp_path / "run"
    fake_checkpoint(out, 30, make_cfg(out, "max_steps=40", recipe="hybrid"))
    point, warnings = plan_resume(out, make_cfg(out, "max_steps=100", recipe="hybrid"), 1)
    assert point.name == "step_00000030" and len(warnings) == 1
    assert "max_steps 40 -> 100" in warnings[0] and "'ads'" in warnings[0] and "'asr+sum'" in warnings[0]
    assert "max_tokens" not in warnings[0], "only the budget that changed is named"


def test_a_finished_run_without_checkpoints_is_not_restarted_over(tmp_path):
    """resume=auto in a folder whose run finished (summary.json) but whose checkpoints are gone would
    train again from step 0 over its metrics, adapter and summary: refused. A folder with rows but no
    summary (a crash before the first checkpoint) still restarts."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    assert plan_resume(out, make_cfg(out), 1) == (None, [])
    (out / "summary.json").write_text('{"steps": 1}')
    with pytest.raises(CheckpointError, match="finished run") as e:
        plan_resume(out, make_cfg(out), 1)
    assert "new output_dir" in str(e.value)
    fake_checkpoint(out, 1, make_cfg(out))
    assert plan_resume(out, make_cfg(out), 1)[0].name == "step_00000001"


def test_a_checkpoint_without_settings_resumes_with_a_warning(tmp_path):
    out = tmp_path / "run"
    fake_checkpoint(out, 40, cfg=None)
    point, warnings = plan_resume(out, make_cfg(out, "lora.rank=4"), 1)
    assert point.name == "step_00000040" and "cannot be checked" in warnings[0]


def test_metrics_are_cut_back_to_the_resumed_step(tmp_path):
    rows = [{"event": "stage", "step": 0}, {"step": 1}, {"step": 2}, {"event": "eval", "step": 2}, {"step": 3},
            {"event": "eval", "step": 3}, {"step": 4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    assert MetricsWriter.keep_rows_up_to(tmp_path, 2) == 4  # steps 3, 4 and the torn last line go
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == rows[:4]
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.write({"step": 3, "loss": 1.0})
    writer.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 2, 3]
    assert MetricsWriter.keep_rows_up_to(tmp_path, -1) == 5  # a fresh start keeps nothing
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    from engine.parallel import init_distributed

    init_distributed()  # a one-rank gloo group, as a torchrun job of one process
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    root = tmp_path / "run" / "checkpoints"
    for step in (35, 40):
        fake_checkpoint(tmp_path / "run", step)
    save_config(make_cfg(tmp_path / "run"), tmp_path / "run" / "config.yaml")
    final = ckpt.save_checkpoint(root, 5, model, optimizer, {"train": {"tokens": 99}}, rank=0, world_size=1, keep=2)
    assert (final / "meta.json").exists() and final.name == "step_00000005"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000005", "step_00000040"]
    meta = ckpt.read_meta(final)
    assert meta["tokens"] == 99 and meta["config"]["lora"]["rank"] == 8  # the run folder's settings


def test_writing_a_step_again_keeps_the_old_copy_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    from engine.parallel import init_distributed

    init_distributed()
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    root = tmp_path / "run" / "checkpoints"
    (tmp_path / "run").mkdir()
    save_config(make_cfg(tmp_path / "run"), tmp_path / "run" / "config.yaml")
    ckpt.save_checkpoint(root, 7, model, optimizer, {"train": {"tokens": 1}}, rank=0, world_size=1, keep=2)

    def fail(tmp, final):
        raise OSError("disk full")
    monkeypatch.setattr(ckpt, "commit_checkpoint", fail)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(root, 7, model, optimizer, {"train": {"tokens": 2}}, rank=0, world_size=1, keep=2)
    # the failed rewrite leaves the old copy as the checkpoint of that step
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000007"]
    assert ckpt.read_meta(root / "step_00000007")["tokens"] == 1
    monkeypatch.undo()
    final = ckpt.save_checkpoint(root, 7, model, optimizer, {"train": {"tokens": 3}}, rank=0, world_size=1, keep=2)
    assert ckpt.read_meta(final)["tokens"] == 3
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".tmp")) == ["step_00000007"]


def test_cli_refuses_before_writing_anything(cli_run, tmp_path):
    """The user's view: a copied finished run resumed with another LoRA rank is refused in one
    line (not a DCP size-mismatch traceback), and the folder's config.yaml is left as it was."""
    copy = tmp_path / "copy"
    shutil.copytree(cli_run, copy)
    before = (copy / "config.yaml").read_text()
    proc = subprocess.run([sys.executable, "engine/train.py", "--recipe", "random", f"output_dir={copy}", "lora.rank=4"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "lora.rank: 8 -> 4" in proc.stderr, proc.stderr[-3000:]
    assert (copy / "config.yaml").read_text() == before


def test_tensorboard_hides_the_events_a_resumed_run_writes_again(tmp_path):
    """A run logged steps 1-4 and crashed; its checkpoint is at step 2. The resumed run writes steps
    3-4 again: TensorBoard must show each step once, with the resumed run's values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = MetricsWriter(tmp_path, tensorboard=True)
    for step in (1, 2, 3, 4):
        first.write({"step": step, "loss": 10.0 + step})
    first.close()
    resumed = MetricsWriter(tmp_path, tensorboard=True)
    resumed.purge_after_step = 2   # what Trainer.resume sets
    for step in (3, 4, 5):
        resumed.write({"step": step, "loss": 20.0 + step})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    seen = [(e.step, e.value) for e in events.Scalars("loss")]
    assert seen == [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0), (5, 25.0)], seen


def test_a_resume_path_that_does_not_exist_says_so(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match="does not exist"):
        plan_resume(out, make_cfg(out, f"checkpoint.resume={tmp_path / 'nope'}"), 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint there"):
        plan_resume(out, make_cfg(out, f"checkpoint.resume={tmp_path / 'empty'}"), 1)
