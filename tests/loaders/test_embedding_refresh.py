"""Refreshed ADS embeddings (trainable audio encoder): the bounded cache, its hand-over to ADS
through TrainStream, and exact resume across a refresh, with and without workers."""
import json
import zlib

import numpy as np
import pytest

from loaders.ads import ADSError
from loaders.curriculum import ScheduleConfig
from loaders.embeddings import EmbeddingCache, EmbeddingSource, decode_rows, encode_rows, sample_identity
from tests.loaders.test_schedule_stream import STAGES, config, make_stream, check_counts_add_up, write_skewed_shards

ALIGNER_DIM = 48     # the "model's" hidden size; the stream projects to schedule.embedding_dim
SCHEDULE = ScheduleConfig(ads_pool=32, ads_window=16, ads_max_wait=8, embedding_dim=32, embedding_refresh_every=2,
                          embedding_cache=64)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_skewed_shards(tmp_path_factory.mktemp("skewed"))


@pytest.fixture(scope="module")
def tokenizer():
    from engine.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


def aligner_vectors(micro_batches, step: int) -> np.ndarray:
    """What a training forward would capture: one vector per sample, depending on the sample and
    on the step (the encoder changes as it trains), deterministic so that runs can be compared."""
    rows = [np.random.default_rng([zlib.crc32(key.encode()), step]).standard_normal(ALIGNER_DIM)
            for mb in micro_batches for key in mb["keys"]]
    return np.stack(rows).astype(np.float32)


class FakeForward:
    """Stands in for engine.aligner_refresh.AlignerCapture: the vectors of the last step."""

    def __init__(self):
        self.pending = np.zeros((0, ALIGNER_DIM), np.float32)

    def run(self, micro_batches, step):
        self.pending = np.concatenate([self.pending, aligner_vectors(micro_batches, step)])

    def pop(self):
        vectors, self.pending = self.pending, np.zeros((0, ALIGNER_DIM), np.float32)
        return vectors


def run(make, steps, *, refresh=True, save_at=(), stages=None):
    """The engine's loop as the stream sees it: stage switches, next_step, the forward, checkpoints
    through JSON (a new process resuming), with the forward's vectors fed back when ``refresh``."""
    from loaders.curriculum import ScheduleConfig as Cfg

    schedule = Cfg(stages=stages or STAGES).build(max_steps=steps, max_tokens=None)
    stream, forward, stage_index, trace = make(), FakeForward(), -1, []
    if refresh:
        stream.refresh_embeddings_from(forward.pop)
    for step in range(steps):
        if step in save_at:
            saved = json.loads(json.dumps(stream.state_dict()))
            stream.close()
            stream, forward = make(), FakeForward()
            if refresh:
                stream.refresh_embeddings_from(forward.pop)
            stream.load_state_dict(saved)
        index, stage = schedule.stage_at(step, 0)
        if index != stage_index:
            stage_index = index
            stream.set_tasks(list(stage.tasks), stage.weights)
            stream.set_sampler(stage.sampler)
        micro_batches = stream.next_step()
        forward.run(micro_batches, step)
        trace.append([list(zip(mb["keys"], mb["tasks"])) for mb in micro_batches])
    counts, state = stream.counts(), json.loads(json.dumps(stream.state_dict()))
    stream.close()
    return trace, counts, state


ADS_ONLY = [{"name": "ads", "tasks": ["asr", "sum", "did"], "sampler": "ads"}]


def test_cache_is_bounded_least_recently_updated_first_and_round_trips():
    cache = EmbeddingCache(capacity=3, dim=8)
    rng = np.random.default_rng(0)
    cache.update(["a", "b", "c"], rng.standard_normal((3, 8)))
    cache.update(["a"], rng.standard_normal((1, 8)))           # a is now the most recent
    cache.update(["d"], rng.standard_normal((1, 16)))          # another size: projected to 8
    assert list(cache.snapshot()) == ["c", "a", "d"] and len(cache) == 3 and cache.updates == 5
    assert all(v.shape == (8,) and v.dtype == np.float16 for v in cache.snapshot().values())
    restored = EmbeddingCache(capacity=3, dim=8)
    restored.load_state_dict(json.loads(json.dumps(cache.state_dict())))
    for key, vector in cache.snapshot().items():
        np.testing.assert_array_equal(restored.snapshot()[key], vector)
    rows = decode_rows(encode_rows(cache.snapshot(), 8))
    assert list(rows) == ["c", "a", "d"]
    with pytest.raises(ADSError, match="non-finite"):
        cache.update(["e"], np.full((1, 8), np.nan))
    with pytest.raises(ADSError, match="2 samples"):
        cache.update(["e", "f"], np.ones((3, 8)))


def test_refreshed_vectors_take_precedence_over_stored_and_fallback():
    source = EmbeddingSource(dim=8)
    spectrum = np.random.default_rng(1).standard_normal(128)
    fallback, kind = source.lookup("s.tar", "k", spectrum)
    assert kind == "fallback"
    refreshed = np.random.default_rng(2).standard_normal(8).astype(np.float16)
    source.use_refreshed({sample_identity("s.tar", "k"): refreshed})
    vector, kind = source.lookup("s.tar", "k", spectrum)
    assert kind == "refreshed" and np.array_equal(vector, refreshed.astype(np.float32))
    assert source.lookup("other.tar", "k", spectrum)[1] == "fallback"    # same key, other shard
    assert (source.hits, source.misses) == (1, 2)


def test_the_training_forward_refreshes_what_ads_selects(shards, tokenizer):
    make = lambda: make_stream(config(shards), tokenizer, schedule_cfg=SCHEDULE)   # noqa: E731
    refreshed, counts, state = run(make, 7, stages=ADS_ONLY)
    plain, plain_counts, plain_state = run(make, 7, refresh=False, stages=ADS_ONLY)
    assert counts["embedding_refreshes"] >= 2 and counts["embeddings"]["refreshed"] > 0
    assert counts["embedding_cache"] == SCHEDULE.embedding_cache         # bounded, and full by now
    assert counts["embedding_hit_rate"] == counts["embeddings"]["refreshed"] / sum(counts["embeddings"].values())
    check_counts_add_up(counts)
    assert refreshed[:2] == plain[:2]            # nothing published before the first refresh
    assert refreshed != plain                    # then the fresh vectors change the selection
    assert plain_counts["embedding_refreshes"] == 0 and plain_state["embeddings"] is None
    # The saved state holds the cache and only the versions a replay can still need.
    saved = state["embeddings"]
    assert len(saved["cache"]["ids"]) == SCHEDULE.embedding_cache
    assert str(saved["version"]) in saved["snapshots"] and len(saved["snapshots"]) <= 2


@pytest.mark.parametrize("num_workers,save_at", [(0, {5, 6}), (2, {5})])
def test_resume_across_a_refresh_reproduces_the_uninterrupted_sequence(shards, tokenizer, num_workers, save_at):
    cfg = config(shards, num_workers=num_workers)
    make = lambda: make_stream(cfg, tokenizer, schedule_cfg=SCHEDULE)   # noqa: E731
    reference, reference_counts, _ = run(make, 9)
    resumed, resumed_counts, _ = run(make, 9, save_at=save_at)
    assert reference_counts["embedding_refreshes"] >= 1 and reference_counts["embeddings"]["refreshed"] > 0
    assert resumed == reference
    assert resumed_counts == reference_counts


def test_a_forward_that_skipped_samples_is_an_error(shards, tokenizer):
    stream = make_stream(config(shards), tokenizer, schedule_cfg=SCHEDULE, sampler="ads", active_tasks=["asr", "did"])
    forward = FakeForward()
    stream.refresh_embeddings_from(lambda: forward.pop()[:-1])      # one sample's vector missing
    forward.run(stream.next_step(), 0)
    with pytest.raises(RuntimeError, match="every micro-batch of a step must go through the model"):
        stream.next_step()
    stream.close()
