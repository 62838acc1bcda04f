"""A task stream whose every example is skipped after decoding (too long for the batch, say)
stops with an error naming the task, the reason and the setting to change, instead of
re-reading the shards forever; also through DataLoader workers, and up front when the
budget cannot hold even the shortest possible example."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.tokenizer import build_tiny_tokenizer
from engine.train import USER_ERROR_EXIT, user_error_classes
from loaders.batching import BatchBudgetError
from loaders.config import DataConfig
from loaders.pipeline import TrainStream
from loaders.prompts import shortest_example_tokens
from loaders.shards import ShardError
from loaders.stream import ExampleSource
from test_stream import bad_config, sample, wav_bytes, write_shard   # tests/loaders is on sys.path

# Stops a pre-fix endless loop; the fixed tests take about a second.
HANG_GUARD_S = 60
REPO = Path(__file__).resolve().parents[2]
# The CLI run below stops before the first step (about 8 s on 2 cores); generous for a loaded machine.
CLI_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def did_shards(tmp_path_factory):
    """Four shards of three did+asr recordings each, 0.5 to 0.7 s long."""
    folder = tmp_path_factory.mktemp("did")
    return [write_shard(folder / f"d-{s}.tar", [m for i in range(3) for m in sample(
        f"d{s}-{i}", {"text": "كتب", "dialect": "egy"}, wav_bytes(0.5 + 0.1 * i, 10 * s + i))]) for s in range(4)]


def did_budget(tokenizer) -> int:
    """A budget that holds the shortest possible did prompt but none of the real examples
    (0.5 s of audio adds about 12 audio tokens)."""
    return shortest_example_tokens(tokenizer, "did", "en", DataConfig().dialects) + 2


def shortest_did_example(did_shards, tokenizer) -> int:
    source = ExampleSource([did_shards], bad_config(), tokenizer, {}, slot=0, num_slots=1, seed=0)
    return min(source.pull("did").num_tokens for _ in range(12))


@pytest.mark.timeout(HANG_GUARD_S)
def test_a_stream_with_every_example_too_long_is_an_error_not_a_loop(did_shards, tokenizer):
    budget = did_budget(tokenizer)
    source = ExampleSource([did_shards], bad_config(max_tokens_per_batch=budget), tokenizer, {}, slot=0,
                           num_slots=1, seed=0)
    with pytest.raises(ShardError) as err:
        source.pull("did")
    message = str(err.value)
    needed = shortest_did_example(did_shards, tokenizer)
    assert needed > budget
    assert "no usable did example" in message and "too_long_for_batch" in message, message
    assert f"Raise data.max_tokens_per_batch to at least {needed}" in message, message
    # One epoch was read: its 12 examples and the first of the next are each counted once.
    assert source.counts()["skipped"] == {"too_long_for_batch": 13}
    assert source.pull("asr").task == "asr"   # the other tasks of the same recordings are fine


@pytest.mark.timeout(HANG_GUARD_S)
def test_several_slots_stop_once_they_skipped_as_many_as_the_source_holds(did_shards, tokenizer):
    """With 4 slots a slot reads a quarter of the shards per epoch; knowing the source holds
    12 did examples, it stops after skipping 12 in a row instead of 16 epochs."""
    budget = did_budget(tokenizer)
    counts = {0: {"tasks": {"did": 12, "asr": 12}, "labels": {"did": {"egy": 12}}}}
    source = ExampleSource([did_shards], bad_config(max_tokens_per_batch=budget), tokenizer, counts, slot=1,
                           num_slots=4, seed=0)
    with pytest.raises(ShardError, match="no usable did example labelled egy"):
        source.pull("did", "egy")
    assert 12 <= source.counts()["skipped"]["too_long_for_batch"] <= 12 + 3


@pytest.mark.timeout(HANG_GUARD_S)
def test_audio_limit_error_names_the_seconds_needed(did_shards, tokenizer):
    source = ExampleSource([did_shards], bad_config(max_audio_seconds=0.3), tokenizer, {}, slot=0, num_slots=1, seed=0)
    with pytest.raises(ShardError, match=r"Raise data\.max_audio_seconds to at least 0\.5 .*did"):
        source.pull("did")


@pytest.mark.timeout(HANG_GUARD_S)
def test_the_error_reaches_the_training_process_through_dataloader_workers(did_shards, tokenizer):
    cfg = DataConfig(train=did_shards, num_workers=2, shuffle_buffer=2, max_tokens_per_batch=did_budget(tokenizer))
    stream = TrainStream(cfg, tokenizer, rank=0, world_size=1, grad_accum=1, seed=0, active_tasks=["did"])
    try:
        with pytest.raises(ShardError, match=r"no usable did example(.|\n)*Raise data\.max_tokens_per_batch to at least"):
            stream.next_step()
    finally:
        stream.close()


def test_a_budget_below_the_shortest_prompt_fails_at_once_naming_the_task(did_shards, tokenizer):
    asr_only = shortest_example_tokens(tokenizer, "asr", "en") + 1
    cfg = DataConfig(train=did_shards, max_tokens_per_batch=asr_only)
    with pytest.raises(BatchBudgetError, match=r"data\.max_tokens_per_batch=\d+ cannot hold one did example"):
        TrainStream(cfg, tokenizer, rank=0, world_size=1, grad_accum=1, seed=0)
    stream = TrainStream(cfg, tokenizer, rank=0, world_size=1, grad_accum=1, seed=0, active_tasks=["asr"])
    with pytest.raises(BatchBudgetError, match="cannot hold one ser example") as err:
        stream.set_tasks(["asr", "ser"])   # a curriculum stage that adds a task
    stream.close()
    # The engine's CLI prints its user errors in one line (exit 2) instead of a traceback.
    assert isinstance(err.value, user_error_classes())


def test_the_cli_prints_a_too_small_budget_in_one_line_and_exits_2(did_shards, tmp_path):
    shards = str(Path(did_shards[0]).parent / "d-{0..3}.tar")
    proc = subprocess.run([sys.executable, "engine/train.py", "--recipe", "random", "max_steps=1",
                           "data.max_tokens_per_batch=8", f"data.train={shards}", f"output_dir={tmp_path / 'run'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == USER_ERROR_EXIT, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("omnitrain: error: data.max_tokens_per_batch=8 cannot hold one "), proc.stderr
    assert "raise data.max_tokens_per_batch well above" in errors[0]
