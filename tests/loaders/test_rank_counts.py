"""loaders/rank_counts.py: the job's data counts from every rank's, so that skips seen by one
rank only are in the totals and the totals add up."""
import logging

import pytest
import torch.multiprocessing

from engine.tokenizer import build_tiny_tokenizer
from loaders.pipeline import TrainStream
from loaders.rank_counts import gather_rank_counts, merge_rank_counts
from test_stream import bad_config, bad_shards  # noqa: F401 (a fixture)   tests/loaders is on sys.path


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def check_counts_add_up(counts):
    assert counts["read"] == (counts["used"] + counts["pending"] + counts.get("released_at_switch", 0)
                              + sum(counts["skipped"].values())), counts
    assert sum(counts["tasks"].values()) == counts["used"]


def test_two_ranks_counts_sum_and_every_rank_s_skips_are_kept(bad_shards, tokenizer, caplog):  # noqa: F811
    """Each rank reads its own shards (a.tar holds every bad record): the job's skip counts are
    the sum of both ranks', and the totals add up as they do on one rank. Warnings name the rank."""
    per_rank = []
    for rank in range(2):
        stream = TrainStream(bad_config(train=bad_shards), tokenizer, rank=rank, world_size=2, grad_accum=2, seed=0)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="loaders"):
            for _ in range(3):
                stream.next_step()
        per_rank.append(stream.counts())
        stream.close()
        skips = [r.getMessage() for r in caplog.records if "skipped (" in r.getMessage()]
        assert skips and all(m.startswith(f"[rank {rank}] skipped (") for m in skips), skips
    assert per_rank[0]["skipped"] != per_rank[1]["skipped"]   # the ranks saw different bad records
    merged = merge_rank_counts(per_rank)
    check_counts_add_up(merged)
    for key in ("read", "used", "pending"):
        assert merged[key] == per_rank[0][key] + per_rank[1][key]
    for reason in set(per_rank[0]["skipped"]) | set(per_rank[1]["skipped"]):
        assert merged["skipped"][reason] == sum(c["skipped"].get(reason, 0) for c in per_rank)
    for task in set(per_rank[0]["tasks"]) | set(per_rank[1]["tasks"]):
        assert merged["tasks"][task] == sum(c["tasks"].get(task, 0) for c in per_rank)
    assert merged["epoch"] == max(c["epoch"] for c in per_rank)
    assert merged["world_size"] == 2
    assert [r["rank"] for r in merged["per_rank"]] == [0, 1]
    assert [r["skipped"] for r in merged["per_rank"]] == [c["skipped"] for c in per_rank]
    assert merged["sampler"] == "random"


def test_unknown_stays_unknown_and_the_hit_rate_is_recomputed():
    a = {"repeats": {"did": {"egy": 2, "glf": None}}, "embeddings": {"stored": 3, "refreshed": 0, "fallback": 1},
         "embedding_hit_rate": 0.75, "embedding_refreshes": 2, "embedding_cache": 5, "sampler": "ads"}
    b = {"repeats": {"did": {"egy": 1, "glf": 4}, "ser": {"sad": 1}},
         "embeddings": {"stored": 0, "refreshed": 1, "fallback": 3}, "embedding_hit_rate": 0.25,
         "embedding_refreshes": 2, "embedding_cache": 7, "sampler": "ads"}
    merged = merge_rank_counts([a, b])
    assert merged["repeats"] == {"did": {"egy": 3, "glf": None}, "ser": {"sad": 1}}
    assert merged["embedding_hit_rate"] == pytest.approx(4 / 8)
    assert merged["embedding_refreshes"] == 2 and merged["embedding_cache"] == 12
    assert [r["embedding_cache"] for r in merged["per_rank"]] == [5, 7]
    assert a["repeats"]["did"]["egy"] == 2   # the inputs are not changed


def _gather_in_rank(rank: int, world_size: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        counts = {"read": 10 + rank, "used": 7, "pending": 3, "skipped": {"corrupt_tar": rank} if rank else {},
                  "tasks": {"asr": 7}, "epoch": rank}
        results[rank] = gather_rank_counts(counts)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_gather_rank_counts_all_gathers_over_a_real_process_group(tmp_path):
    """Two gloo processes: every rank gets the same job counts (rank 1's skip included)."""
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.start_processes(_gather_in_rank, args=(2, str(tmp_path / "init"), results), nprocs=2,
                                          start_method="fork")   # fork: no second torch import (seconds)
    assert results[0] == results[1]
    assert results[0]["read"] == 21 and results[0]["skipped"] == {"corrupt_tar": 1} and results[0]["epoch"] == 1
    check_counts_add_up(results[0])
    # Without a process group (one process): this rank's counts in the same structure.
    alone = gather_rank_counts({"read": 1, "used": 1, "pending": 0, "skipped": {}, "tasks": {"asr": 1}})
    assert alone["read"] == 1 and alone["world_size"] == 1 and len(alone["per_rank"]) == 1
