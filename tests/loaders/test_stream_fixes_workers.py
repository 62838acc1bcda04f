"""The training stream with DataLoader workers (data.num_workers > 0):

- a SIGTERM to the whole process group (schedulers, `timeout`, torchrun) reaches the workers
  too; they must ignore it so that the engine finishes the step, checkpoints and exits 143,
  and they must still end when the training process exits or is killed;
- starting or restarting the workers leaves torch's global RNG alone (LoRA dropout uses it);
- an error raised in a worker reaches the training process with its own class and its
  one-line message, as with num_workers=0 (the worker's traceback chained under it).
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

from engine.tokenizer import build_tiny_tokenizer
from loaders.config import DataConfig
from loaders.demo_data import write_demo_shards
from loaders.dataloader_workers import WorkerTraceback
from loaders.pipeline import TrainStream
from loaders.shards import ShardError
from loaders.skip_counting import DataError
from test_pipeline import demo_config, flac_bytes, write_shard   # tests/loaders is on sys.path

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
# A tiny CLI run reaches its first steps in ~10-15 s on 2 cores; generous limits, not timings.
CLI_TIMEOUT_S = 240
# torch's workers check every MP_STATUS_CHECK_INTERVAL (5 s) whether their parent lives.
WORKER_EXIT_S = 30
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo") / "shards"
    write_demo_shards(str(folder))
    return folder


@pytest.fixture(scope="module")
def demo(demo_folder):
    urls = sorted(str(p) for p in demo_folder.glob("*.tar"))
    return [u for u in urls if "/train-" in u], [u for u in urls if "/val-" in u]


def wait_for(predicate, timeout_s: float, poll_s: float = 0.2) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(poll_s)
    return predicate()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


# --- 1. SIGTERM to the process group -----------------------------------------------------------
def test_sigterm_to_the_process_group_with_workers_checkpoints_and_exits_143(demo_folder, tmp_path):
    out = tmp_path / "run"
    args = [PYTHON, "engine/train.py", "--recipe", "random", "max_steps=40", f"output_dir={out}",
            f"data.demo_dir={demo_folder}", "data.num_workers=1", "data.max_tokens_per_batch=1024",
            "checkpoint.every=0", "metrics.log_every=1", "metrics.progress_bar=false", "metrics.tensorboard=false",
            "eval.at_end=false", "eval.every=0"]
    log = tmp_path / "log.txt"
    with open(log, "w") as sink:
        # Its own process group, as a scheduler's job: the signal goes to the workers too.
        job = subprocess.Popen(args, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
        try:
            assert wait_for(lambda: "step 2/40" in log.read_text() or job.poll() is not None, CLI_TIMEOUT_S)
            assert job.poll() is None, log.read_text()[-3000:]
            workers = psutil.Process(job.pid).children(recursive=True)
            assert workers, "no DataLoader worker was running"
            os.killpg(job.pid, signal.SIGTERM)
            returncode = job.wait(timeout=CLI_TIMEOUT_S)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    text = log.read_text()
    assert "killed by signal" not in text, text[-3000:]
    assert returncode == 143, text[-3000:]
    assert "SIGTERM received" in text and "stopped by SIGTERM" in text, text[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    stopped_at = summary["steps"]
    assert summary["stopped_by"] == "SIGTERM" and 2 <= stopped_at < 40
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert checkpoints == [f"step_{stopped_at:08d}"]
    assert wait_for(lambda: not group_alive(job.pid), WORKER_EXIT_S), "DataLoader workers outlived the run"


STREAM_SCRIPT = """
import os, sys, time
import psutil
from engine.tokenizer import build_tiny_tokenizer
from loaders.config import DataConfig
from loaders.pipeline import TrainStream
urls = sys.argv[1:]
cfg = DataConfig(train=urls, val=urls, num_workers=1, shuffle_buffer=4, max_tokens_per_batch=1024)
stream = TrainStream(cfg, build_tiny_tokenizer(), rank=0, world_size=1, grad_accum=1, seed=0)
stream.next_step()
print("workers", *[p.pid for p in psutil.Process().children()], flush=True)
if os.environ["END"] == "sleep":
    time.sleep(600)
# END=exit: leave without closing the stream; the workers must not keep the interpreter alive
"""


@pytest.mark.parametrize("end", ["sigkill", "exit"])
def test_workers_end_when_the_training_process_is_killed_or_exits(demo, end):
    train, _ = demo
    env = dict(ENV, END="sleep" if end == "sigkill" else "exit", PYTHONPATH=str(REPO))
    job = subprocess.Popen([PYTHON, "-c", textwrap.dedent(STREAM_SCRIPT)] + train, cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = job.stdout.readline()
        assert line.startswith("workers "), job.stderr.read()[-3000:] if job.poll() is not None else line
        workers = [psutil.Process(int(pid)) for pid in line.split()[1:]]
        assert len(workers) == 1
        if end == "sigkill":
            job.kill()
        else:
            assert job.wait(timeout=WORKER_EXIT_S) == 0, job.stderr.read()[-3000:]
        assert wait_for(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers),
                        WORKER_EXIT_S), f"worker still running after the training process ended ({end})"
    finally:
        if group_alive(job.pid):
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()


# --- 2. torch's global RNG ---------------------------------------------------------------------
def test_starting_and_restarting_workers_leaves_the_global_rng_alone(demo, tokenizer):
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    stream = TrainStream(demo_config(demo, num_workers=1, max_tokens_per_batch=1024), tokenizer, rank=0,
                         world_size=1, grad_accum=1, seed=0)
    try:
        stream.next_step()                # the DataLoader starts its workers
        assert torch.equal(torch.get_rng_state(), before)
        stream.set_tasks(["asr", "did"])  # a stage switch restarts them
        stream.next_step()
        stream.load_state_dict(stream.state_dict())   # as a resume does
        stream.next_step()
        assert torch.equal(torch.get_rng_state(), before)
    finally:
        stream.close()


def train_cli(demo_folder, out, *settings) -> subprocess.CompletedProcess:
    args = [PYTHON, "engine/train.py", "--recipe", "random", f"output_dir={out}", f"data.demo_dir={demo_folder}",
            "data.num_workers=1", "lora.dropout=0.05", "data.max_tokens_per_batch=1024", "checkpoint.every=0",
            "metrics.log_every=1", "metrics.progress_bar=false", "metrics.tensorboard=false", "eval.at_end=false",
            "eval.every=0", *settings]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, env=ENV)
    assert proc.returncode in (0, 143), proc.stderr[-3000:]
    return proc


def step_losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if "event" not in r]


def test_a_resumed_run_with_workers_and_lora_dropout_has_the_same_losses(demo_folder, tmp_path):
    """Dropout draws from torch's global RNG (restored from the checkpoint); a DataLoader whose
    start drew from it too shifted every dropout mask after a resume."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_cli(demo_folder, straight, "max_steps=5")
    train_cli(demo_folder, resumed, "max_steps=5", "debug.stop_after_steps=2")
    assert [step for step, _ in step_losses(resumed)] == [1, 2]
    train_cli(demo_folder, resumed, "max_steps=5")
    assert step_losses(resumed) == step_losses(straight)
    assert len(step_losses(straight)) == 5


# --- 3. errors raised in workers -----------------------------------------------------------------
def shards_with_undecodable_audio(folder) -> list[str]:
    """Two shards of asr records; the second also holds 'bad-0', whose audio is not audio. Its
    JSON is fine, so only decoding meets it: in a DataLoader worker when there are workers."""
    urls = []
    for s in range(2):
        records = [(f"s{s}-{i}", {"text": "كتب الولد"}, flac_bytes(_tone(0.4 + 0.1 * i))) for i in range(3)]
        if s == 1:
            records.append(("bad-0", {"text": "كتب"}, b"this is not a flac file" * 20))
        urls.append(write_shard(folder / f"train-{s:06d}.tar", records))
    return urls


def _tone(seconds: float):
    import numpy as np

    t = np.arange(int(seconds * 16_000)) / 16_000
    return (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)


def first_error(cfg, tokenizer, steps: int = 20) -> BaseException:
    stream = TrainStream(cfg, tokenizer, rank=0, world_size=1, grad_accum=1, seed=0, active_tasks=["asr"])
    try:
        for _ in range(steps):
            stream.next_step()
    except Exception as error:   # the class is checked by the caller
        return error
    finally:
        stream.close()
    raise AssertionError(f"no error in {steps} steps")


def test_a_worker_data_error_keeps_its_class_and_one_line_message(tmp_path, tokenizer):
    urls = shards_with_undecodable_audio(tmp_path)
    cfg = dict(train=urls, val=urls, on_error="raise", shuffle_buffer=2, max_tokens_per_batch=1024)
    in_process = first_error(DataConfig(num_workers=0, **cfg), tokenizer)
    through_workers = first_error(DataConfig(num_workers=2, **cfg), tokenizer)
    assert type(in_process) is DataError and type(through_workers) is DataError
    assert "\n" not in str(through_workers) and "DataLoader worker" not in str(through_workers), str(through_workers)
    assert str(through_workers) == str(in_process)
    assert "bad-0" in str(through_workers)
    # the worker's traceback is kept, chained under the error
    assert isinstance(through_workers.__cause__, WorkerTraceback)
    assert "Traceback" in str(through_workers.__cause__) and "DataError" in str(through_workers.__cause__)


def test_a_worker_shard_error_of_an_unusable_stream_is_one_line(tmp_path, tokenizer):
    urls = [write_shard(tmp_path / f"d-{s}.tar", [(f"d{s}-{i}", {"dialect": "egy"}, flac_bytes(_tone(0.6)))
                                                   for i in range(2)]) for s in range(2)]
    from loaders.prompts import shortest_example_tokens

    budget = shortest_example_tokens(tokenizer, "did", "en", DataConfig().dialects) + 2   # holds no real example
    cfg = DataConfig(train=urls, val=urls, num_workers=2, shuffle_buffer=2, max_tokens_per_batch=budget)
    stream = TrainStream(cfg, tokenizer, rank=0, world_size=1, grad_accum=1, seed=0, active_tasks=["did"])
    try:
        with pytest.raises(ShardError) as err:
            stream.next_step()
    finally:
        stream.close()
    assert "\n" not in str(err.value) and "no usable did example" in str(err.value), str(err.value)


def test_the_cli_prints_a_worker_data_error_as_one_user_line(tmp_path):
    urls = shards_with_undecodable_audio(tmp_path)
    pattern = str(tmp_path / "train-{000000..000001}.tar")
    proc = subprocess.run([PYTHON, "engine/train.py", "--recipe", "random", f"data.train={pattern}",
                           f"data.val={urls[0]}", "data.on_error=raise", "data.num_workers=2", "max_steps=6",
                           "data.shuffle_buffer=2", f"output_dir={tmp_path / 'run'}", "metrics.progress_bar=false",
                           "metrics.tensorboard=false", "eval.at_end=false", "eval.every=0"],
                          cwd=REPO, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, env=ENV)
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("omnitrain: error: ") and "bad-0" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "DataLoader worker" not in proc.stderr, proc.stderr[-3000:]
