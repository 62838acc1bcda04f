"""How a run fails: one rank's error ends the whole torchrun job within seconds, and the
project's own errors reach the user as one line and exit code 2, not a traceback."""
import contextlib
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, TORCHRUN

# A healthy tiny run reaches its first step in ~10 s on this machine; the old failure mode was a
# hang until the 30-minute process-group timeout. Generous, not a timing assertion.
FAILED_JOB_DEADLINE_S = 120


def run_job(cmd: list[str], timeout: int, log) -> int | None:
    """Run cmd with its output in `log`; None if it is still running after `timeout` s, then killed
    with every process under it (torchrun's workers run in sessions of their own)."""
    import psutil

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
            for process in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            proc.wait()
            return None


def test_an_error_on_one_rank_ends_the_job_quickly_and_names_the_rank(demo_dir, tmp_path):
    """Rank 1 fails after step 1 while rank 0 goes on into step 2's collectives: the job must end
    within seconds (it used to wait for the 30-minute process-group timeout)."""
    cmd = TORCHRUN + ["--nproc_per_node=2", "engine/train.py", "--recipe", "random", "max_steps=20",
                      f"data.demo_dir={demo_dir}", "data.max_tokens_per_batch=1024", "debug.fail_on_rank=1",
                      "debug.fail_at_step=1", "metrics.progress_bar=false", "metrics.tensorboard=false",
                      "eval.at_end=false", f"output_dir={tmp_path / 'run'}"]
    start = time.monotonic()
    returncode = run_job(cmd, FAILED_JOB_DEADLINE_S, tmp_path / "log.txt")
    out = (tmp_path / "log.txt").read_text()
    assert returncode is not None, f"the job hung for {FAILED_JOB_DEADLINE_S} s after one rank failed:\n{out[-3000:]}"
    assert returncode != 0
    assert "omnitrain: rank 1: unexpected error, traceback follows" in out, out[-3000:]
    assert "injected failure on rank 1 after step 1" in out  # the traceback of the real error is kept
    # The rank left waiting in a collective says so in one line instead of a second traceback.
    assert "omnitrain: rank 0: stopped: another rank failed" in out, out[-3000:]
    assert time.monotonic() - start < FAILED_JOB_DEADLINE_S


def cli(args: list[str], timeout: int = 120, unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """engine/train.py with `args`; `unset`: environment variables the run must not see."""
    env = {k: v for k, v in os.environ.items() if k not in unset}
    return subprocess.run([sys.executable, "engine/train.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=dict(env, OMP_NUM_THREADS="1"))


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = next((line for line in proc.stderr.splitlines() if line.startswith("omnitrain: error: ")), "")
    for needle in needles:
        assert needle in line, proc.stderr[-3000:]


def test_a_missing_shard_is_one_line_and_exit_2_before_the_model_is_built(tmp_path):
    missing = tmp_path / "nowhere" / "train-000000.tar"
    proc = cli(["--recipe", "tpc", "--recipe", "random", "max_steps=2", f"data.train={missing}",
                f"output_dir={tmp_path / 'run'}"])
    assert_one_line_error(proc, "data.train", "nowhere")
    assert "--recipe is given 2 times (tpc, random): the last, random, is used" in proc.stdout
    assert "model:" not in proc.stdout and not (tmp_path / "run").exists()   # said before the minutes a 7B load takes
    proc = cli(["--recipe", "random", "max_steps=2", f"data.val={missing}", f"output_dir={tmp_path / 'run'}"])
    assert_one_line_error(proc, "data.val", "nowhere")


def test_a_broken_recipe_yaml_is_one_line_and_exit_2(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("max_steps: 3\nlora:\n  rank: [8\n")
    proc = cli(["--recipe", str(recipe)])
    assert_one_line_error(proc, "broken.yaml", "line")


def test_a_setting_given_twice_is_refused_not_last_one_wins(tmp_path):
    """An unquoted brace range is expanded by the shell into one data.train=... per shard; keeping the
    last would train on one shard without a word."""
    shards = [f"data.train={tmp_path}/train-{i:06d}.tar" for i in range(5)]
    proc = cli(["--recipe", "random", "max_steps=2", *shards, f"output_dir={tmp_path / 'run'}"])
    assert_one_line_error(proc, "data.train is given 5 times", "quote it")
    assert not (tmp_path / "run").exists()


def test_model_path_problems_are_one_line_and_exit_2(tmp_path):
    proc = cli(["--recipe", "random", "max_steps=2", f"model.path={tmp_path / 'nope'}", f"output_dir={tmp_path / 'run'}"])
    assert_one_line_error(proc, "model.path=", "is not a folder")


@pytest.mark.parametrize("setting, needle", [
    ("lora.impl=triton", "lora.impl=triton needs a CUDA device"),
    ("loss.impl=triton", "loss.impl=triton needs a CUDA device"),
    ("model.attn_backend=flash_attn", "model.attn_backend=flash_attn is not available on cpu"),
    ("model.liger=true", "model.liger=true needs CUDA"),
])
def test_a_setting_this_device_cannot_run_is_one_line_and_exit_2(tmp_path, setting, needle):
    if torch.cuda.is_available():
        pytest.skip("these settings are refused on a machine without CUDA")
    # tests/conftest.py sets TRITON_INTERPRET=1, under which the Triton kernels do run on CPU
    proc = cli(["--recipe", "random", "max_steps=1", setting, f"output_dir={tmp_path / 'run'}"],
               unset=("TRITON_INTERPRET",))
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_too_many_bad_steps_names_the_last_bad_step_as_logged(tmp_path):
    proc = cli(["--recipe", "random", "max_steps=4", "debug.nonfinite_loss_at=[1,2]", "optim.max_bad_steps=2",
                "metrics.progress_bar=false", f"output_dir={tmp_path / 'run'}"])
    assert_one_line_error(proc, "2 steps in a row", "last at step 2,")
    assert "step 2: non-finite loss" in proc.stdout   # the same number as the step's own log line
