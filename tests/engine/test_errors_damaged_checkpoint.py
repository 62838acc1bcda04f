"""A damaged checkpoint (a file missing, empty, cut short or overwritten) stops a resume with one
error line that names the step folder and the file, and says how to go on; the way it names works."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

QUICK = ["--recipe", "random", "metrics.progress_bar=false", "eval.max_samples=2", "eval.max_new_tokens=2",
         "data.max_tokens_per_batch=1024"]


def train(out, *overrides) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "engine/train.py", *QUICK, f"output_dir={out}", *overrides], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A finished 2-step run with a checkpoint at each step."""
    out = tmp_path_factory.mktemp("damaged") / "run"
    proc = train(out, "max_steps=2", "checkpoint.every=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    return out


def damage_meta(folder):
    (folder / "meta.json").write_text("{\n")


def remove_rank_state(folder):
    (folder / "rank0.pt").unlink()


def cut_rank_state(folder):
    data = (folder / "rank0.pt").read_bytes()
    (folder / "rank0.pt").write_bytes(data[:len(data) // 3])


def empty_weights(folder):
    next(folder.glob("*.distcp")).write_bytes(b"")


def cut_weights(folder):
    weights = next(folder.glob("*.distcp"))
    weights.write_bytes(weights.read_bytes()[:5000])


@pytest.mark.parametrize("damage, file, problem", [
    (damage_meta, "meta.json", "cannot be read"),
    (remove_rank_state, "rank0.pt", "is missing"),
    (cut_rank_state, "rank0.pt", "cannot be read"),
    (empty_weights, ".distcp", "is empty"),
    (cut_weights, ".distcp", "cannot be read"),
])
def test_a_damaged_checkpoint_is_one_line_naming_folder_file_and_the_way_on(two_checkpoints, tmp_path, damage,
                                                                            file, problem):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    latest = run / "checkpoints" / "step_00000002"
    damage(latest)
    proc = train(run, "max_steps=3")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = next(line for line in proc.stderr.splitlines() if line.startswith("omnitrain: error: "))
    assert f"checkpoint {latest} is damaged" in line and file in line and problem in line, line
    assert f"remove {latest}" in line and str(run / "checkpoints" / "step_00000001") in line, line
    if damage is damage_meta:   # refused before anything is written into the run folder
        assert "model:" not in proc.stdout


def test_the_way_on_it_names_resumes_from_the_previous_checkpoint(two_checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    latest = run / "checkpoints" / "step_00000002"
    remove_rank_state(latest)
    shutil.rmtree(latest)   # what the error says to do
    proc = train(run, "max_steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_00000001'} at step 1" in proc.stdout


def test_without_an_earlier_checkpoint_it_says_to_start_again(two_checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    shutil.rmtree(run / "checkpoints" / "step_00000001")
    damage_meta(run / "checkpoints" / "step_00000002")
    proc = train(run, "max_steps=3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "no earlier checkpoint is left" in proc.stderr and "new output_dir" in proc.stderr
