"""loaders/skip_counting.py + loaders/pipeline.py: a bad sample is printed once per rank, also
with DataLoader workers (each epoch reshuffles the shards over the workers, so every worker
meets it sooner or later, and workers restart on a stage change), while every skip is still
counted by the worker that met it and the counts add up."""
import logging
import sys

import pytest

import loaders.pipeline
from engine.tokenizer import build_tiny_tokenizer
from loaders.pipeline import TrainStream
from loaders.skip_counting import ErrorCounter
from loaders.stream import ExampleSource
from test_stream import bad_config, bad_shards, good, sample, write_shard  # noqa: F401 (a fixture)

BAD_KEY = "bad-decode"
UNDECODABLE = b"RIFF\x00\x00garbage" * 20


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def one_bad_shards(tmp_path_factory):
    """Four shards of two good asr+sum recordings; the third also holds one undecodable recording."""
    folder = tmp_path_factory.mktemp("one-bad")
    shards = []
    for s in range(4):
        members = good(f"s{s}-0", 10 * s) + good(f"s{s}-1", 10 * s + 1)
        if s == 2:
            members += sample(BAD_KEY, {"text": "كتب", "summary": "ولد"}, UNDECODABLE)
        shards.append(write_shard(folder / f"t-{s}.tar", members))
    return shards


def printing_source(*args, **kwargs) -> ExampleSource:
    """An ExampleSource that prints its own warnings (as each worker did before they were held)."""
    return ExampleSource(*args, **dict(kwargs, hold_warnings=False))


def run_two_workers(shards, tokenizer, capfd) -> tuple[list[str], dict, list[dict]]:
    """Two steps of asr, a stage change that adds sum (the workers restart), two more steps.
    Returns the printed skip lines (worker processes included), the counts and each worker's."""
    handler = logging.StreamHandler(sys.stderr)   # forked workers inherit it, and the captured stderr
    logger = logging.getLogger("loaders")
    logger.addHandler(handler)
    stream = TrainStream(bad_config(train=shards, num_workers=2), tokenizer, rank=0, world_size=1, grad_accum=1,
                         seed=0, active_tasks=["asr"])
    try:
        capfd.readouterr()
        for _ in range(2):
            stream.next_step()
        stream.set_tasks(["asr", "sum"])
        for _ in range(2):
            stream.next_step()
        counts, per_worker = stream.counts(), [dict(c) for c in stream.counts_by_worker]
    finally:
        stream.close()
        logger.removeHandler(handler)
    printed = [line for line in capfd.readouterr().err.splitlines() if "skipped (" in line]
    return printed, counts, per_worker


def test_two_workers_print_a_bad_sample_once_and_count_every_skip(one_bad_shards, tokenizer, capfd, monkeypatch):
    printed, counts, per_worker = run_two_workers(one_bad_shards, tokenizer, capfd)
    # Both workers met the bad sample (several epochs each), with both tasks.
    met = [c["skipped"].get("undecodable_audio", 0) for c in per_worker]
    assert all(n >= 2 for n in met), met
    assert len(printed) == 1, printed
    assert f"skipped (undecodable_audio): shard {one_bad_shards[2]}, sample '{BAD_KEY}'" in printed[0]
    assert "by another DataLoader worker, it is counted" in printed[0]
    # Every skip is counted where it happened, and the rank's counts add up.
    assert counts["skipped"] == {"undecodable_audio": sum(met)}
    assert counts["read"] == (counts["used"] + counts["pending"] + counts["released_at_switch"]
                              + sum(counts["skipped"].values())), counts

    # The same run with each worker printing its own warnings (as before holding them): the
    # same counts, and the same sample printed again by each worker and after the restart.
    monkeypatch.setattr(loaders.pipeline, "ExampleSource", printing_source)
    printed_by_workers, counts_by_workers, _ = run_two_workers(one_bad_shards, tokenizer, capfd)
    assert len(printed_by_workers) > 1, printed_by_workers
    assert counts_by_workers == counts


def test_held_warnings_are_the_printed_ones_and_counting_is_unchanged(bad_shards, tokenizer, caplog):  # noqa: F811
    """A source that holds its warnings counts exactly as one that prints them, and holds
    exactly the warnings the other printed, each (shard, key, reason) once."""
    printing = ExampleSource([bad_shards], bad_config(), tokenizer, {}, slot=0, num_slots=1, seed=0)
    holding = ExampleSource([bad_shards], bad_config(), tokenizer, {}, slot=0, num_slots=1, seed=0, hold_warnings=True)
    with caplog.at_level(logging.WARNING, logger="loaders"):
        for source in (printing, holding):
            for task in ("asr", "sum"):   # two epochs each: every bad record met again
                while source.pull(task).epoch < 2:
                    pass
    printed = [r.getMessage() for r in caplog.records if "skipped (" in r.getMessage()]
    assert holding.counts() == printing.counts()
    assert sum(holding.counts()["skipped"].values()) > len(printed)   # counted more often than printed
    held = holding.errors.take_held()
    assert [f"skipped ({reason}): {message}" for reason, message, _ in held] == \
           [line.split(" (each bad sample")[0] for line in printed]
    assert holding.errors.take_held() == []


def test_a_stopping_producer_prints_what_it_held(caplog):
    errors = ErrorCounter("skip", rank=3, hold_warnings=True)
    errors.report("empty_audio", "shard a.tar, sample 'k': audio is shorter than one frame", sample=("a.tar", "k"))
    errors.report("empty_audio", "shard a.tar, sample 'k': audio is shorter than one frame", sample=("a.tar", "k"))
    with caplog.at_level(logging.WARNING, logger="loaders"):
        errors.print_held()
    printed = [r.getMessage() for r in caplog.records]
    assert errors.skipped == {"empty_audio": 2}
    assert len(printed) == 1 and printed[0].startswith("[rank 3] skipped (empty_audio): shard a.tar, sample 'k'")
