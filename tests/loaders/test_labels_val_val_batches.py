"""Validation batches: ranks split the val set by shard, or by record when there are fewer val
shards than ranks, so one val shard works with any number of ranks and every example is
validated exactly once; the pass counts read / used / skipped by reason
(adding up) and prints each bad recording once."""
import logging

import pytest

from engine.tokenizer import build_tiny_tokenizer
from loaders.config import DataConfig
from loaders.make_shards import write_shard
from loaders.rank_counts import merge_rank_counts
from loaders.shards import iter_tar_samples
from loaders.skip_counting import SKIP_REASONS
from loaders.tasks import tasks_of_record
from loaders.val_batches import ValBatches, build_val_batches
from test_embed_shards import wav_bytes   # tests/loaders is on sys.path

GOOD_RECORDS = 7    # odd: the ranks of a 2-rank split get different numbers of records


def good_samples(prefix: str, n: int) -> list:
    return [(f"{prefix}{i:02d}", {"text": "كتب", "summary": "ك", "dialect": "egy", "emotion": "happy"},
             wav_bytes(0.2 + 0.05 * i, 300.0 + 60 * i), "wav") for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def one_val_shard(tmp_path_factory):
    path = tmp_path_factory.mktemp("val") / "val-000000.tar"
    write_shard(path, good_samples("v", GOOD_RECORDS))
    return str(path)


@pytest.fixture(scope="module")
def bad_val_shard(tmp_path_factory):
    """Good records and one of each kind of bad one, in a single shard."""
    path = tmp_path_factory.mktemp("bad") / "val-000000.tar"
    four_tasks = {"text": "كتب", "summary": "ك", "dialect": "egy", "emotion": "happy"}
    write_shard(path, good_samples("g", 3) + [
        ("undecodable", four_tasks, b"not audio at all" * 64, "wav"),    # met by its 4 tasks
        ("no-target", {"lang": "ar"}, wav_bytes(0.3, 400.0), "wav"),
        ("odd-emotion", {"text": "كتب", "emotion": "bored"}, wav_bytes(0.3, 500.0), "wav"),
    ])
    return str(path)


def config(val, **overrides) -> DataConfig:
    return DataConfig(train=val, val=val, max_tokens_per_batch=1024, **overrides)


def examples_of(batches) -> list:
    return [(key, task) for mb in batches for key, task in zip(mb["keys"], mb["tasks"])]


@pytest.mark.parametrize("world_size", [2, 3, 8])
def test_one_val_shard_serves_more_ranks_each_example_once(one_val_shard, tokenizer, world_size):
    cfg = config(one_val_shard)
    expected = sorted((s.key, t) for s in iter_tar_samples(one_val_shard) for t in tasks_of_record(s.meta))
    per_rank = [build_val_batches(cfg, tokenizer, rank=rank, world_size=world_size) for rank in range(world_size)]
    seen = [example for batches in per_rank for example in examples_of(batches)]
    assert sorted(seen) == expected                          # the union is the shard, no duplicates
    records = [batches.counts["records"] for batches in per_rank]
    assert sum(records) == GOOD_RECORDS and max(records) - min(records) <= 1   # split evenly by record
    if world_size > GOOD_RECORDS:
        assert per_rank[-1] == [] and isinstance(per_rank[-1], ValBatches)     # a rank with no record: no batch
    for batches in per_rank:
        assert all(mb["input_ids"].numel() <= cfg.max_tokens_per_batch for mb in batches)


def test_enough_shards_are_split_by_shard_each_example_once(tmp_path, tokenizer):
    urls = []
    for s in range(3):
        urls.append(str(tmp_path / f"val-{s:06d}.tar"))
        write_shard(tmp_path / f"val-{s:06d}.tar", good_samples(f"s{s}-", 2 + s))
    cfg = config(urls)
    expected = sorted((x.key, t) for url in urls for x in iter_tar_samples(url) for t in tasks_of_record(x.meta))
    per_rank = [build_val_batches(cfg, tokenizer, rank=rank, world_size=2) for rank in range(2)]
    assert sorted(example for batches in per_rank for example in examples_of(batches)) == expected
    assert {key.split("-")[0] for key, _ in examples_of(per_rank[1])} == {"s1"}     # whole shards: rank 1 has shard 1
    assert [batches.counts["records"] for batches in per_rank] == [2 + 4, 3]


def test_counts_add_up_by_reason_and_each_bad_sample_is_printed_once(bad_val_shard, tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="loaders"):
        batches = build_val_batches(config(bad_val_shard), tokenizer, rank=0, world_size=1)
    counts = batches.counts
    assert counts["records"] == 6
    assert counts["used"] == len(examples_of(batches)) == 3 * 4 + 1    # good records' tasks + odd-emotion's asr
    assert counts["skipped"] == {"undecodable_audio": 4, "no_target": 1, "label_outside_set": 1}
    assert set(counts["skipped"]) <= set(SKIP_REASONS)
    assert counts["read"] == counts["used"] + sum(counts["skipped"].values()) == 19
    printed = [r.getMessage() for r in caplog.records]
    assert sum("'undecodable'" in m for m in printed) == 1, printed
    assert sum("'no-target'" in m for m in printed) == 1 and sum("'odd-emotion'" in m for m in printed) == 1


def test_counts_over_ranks_are_the_counts_of_the_whole_set(bad_val_shard, tokenizer):
    cfg = config(bad_val_shard)
    whole = build_val_batches(cfg, tokenizer, rank=0, world_size=1).counts
    merged = merge_rank_counts([build_val_batches(cfg, tokenizer, rank=r, world_size=2).counts for r in range(2)])
    for key in ("records", "read", "used", "skipped"):
        assert merged[key] == whole[key], key


def test_max_samples_caps_the_examples_and_the_counts_still_add_up(one_val_shard, tokenizer):
    capped = build_val_batches(config(one_val_shard), tokenizer, rank=0, world_size=2, max_samples=5)
    assert len(examples_of(capped)) == capped.counts["used"] == 5
    assert capped.counts["read"] == 5 and capped.counts["records"] == 2    # 4 tasks per record: stopped in the 2nd


def test_no_val_data_gives_an_empty_pass_with_zero_counts(tokenizer, one_val_shard):
    batches = build_val_batches(DataConfig(train=one_val_shard, val=""), tokenizer, rank=0, world_size=1)
    assert batches == [] and batches.counts == {"records": 0, "read": 0, "used": 0, "skipped": {}}
