"""A configured DID/SER label with no training example: ADS (and hybrid's ADS stage) balances
over the labels that have data instead of crashing when the empty label's stream runs dry; the
start of the run can say so in one line; random mixing (random, tpc) is not affected."""

import numpy as np
import pytest

from engine.tokenizer import build_tiny_tokenizer
from loaders.ads import (absent_labels, absent_labels_note, absent_labels_note_for, balanced_streams,
                         natural_counts_from_data_counts)
from loaders.config import DataConfig
from loaders.curriculum import ScheduleConfig
from loaders.make_shards import shard_index_entry, write_index, write_shard
from loaders.pipeline import TrainStream
from loaders.tasks import DEFAULT_EMOTIONS
from test_embed_shards import wav_bytes   # tests/loaders is on sys.path

PRESENT_EMOTIONS = ("neutral", "happy", "sad")       # "angry" of the default data.emotions has no sample
SHARDS, RECORDS_PER_SHARD = 2, 12
# Small ADS settings keep the test fast; the mechanics are those of the defaults.
SCHEDULE = ScheduleConfig(ads_pool=16, ads_window=12, ads_max_wait=8, embedding_dim=16)


def write_shards_without_angry(folder, with_index: bool = True) -> list[str]:
    """asr + ser records whose emotions cycle over neutral/happy/sad (never angry), with the
    shards.json make_shards writes (it lists only the labels that occur)."""
    entries, urls = {}, []
    for s in range(SHARDS):
        samples, records = [], []
        for i in range(RECORDS_PER_SHARD):
            meta = {"text": "كتب", "emotion": PRESENT_EMOTIONS[(s + i) % len(PRESENT_EMOTIONS)]}
            seconds = 0.2 + 0.02 * i
            samples.append((f"s{s}-{i:03d}", meta, wav_bytes(seconds, 200.0 + 150 * i + 40 * s), "wav"))
            records.append((meta, seconds))
        path = folder / f"train-{s:06d}.tar"
        write_shard(path, samples)
        entries[path.name] = shard_index_entry(records)
        urls.append(str(path))
    if with_index:
        write_index(folder, entries)
    return urls


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module", params=["index", "scan"])
def shards(request, tmp_path_factory):
    """The same shards with shards.json (counts from the index) and without (counted by a scan)."""
    return write_shards_without_angry(tmp_path_factory.mktemp(request.param), with_index=request.param == "index")


def make_stream(urls, tokenizer, sampler):
    cfg = DataConfig(train=urls, shuffle_buffer=4, max_tokens_per_batch=512)   # default emotions: with angry
    return TrainStream(cfg, tokenizer, rank=0, world_size=1, grad_accum=2, seed=3, active_tasks=["asr", "ser"],
                       sampler=sampler, schedule_cfg=SCHEDULE)


def ser_labels(micro_batches, labels_by_key):
    return [labels_by_key[k] for mb in micro_batches for k, t in zip(mb["keys"], mb["tasks"]) if t == "ser"]


def labels_by_key():
    return {f"s{s}-{i:03d}": PRESENT_EMOTIONS[(s + i) % len(PRESENT_EMOTIONS)]
            for s in range(SHARDS) for i in range(RECORDS_PER_SHARD)}


def test_ads_balances_over_the_labels_that_have_data(shards, tokenizer):
    stream = make_stream(shards, tokenizer, "ads")
    counts = natural_counts_from_data_counts(stream.data_counts)
    streams, shares, absent = balanced_streams(["asr", "ser"], {"ser": list(DEFAULT_EMOTIONS)}, natural_counts=counts)
    assert absent == [("ser", "angry")]
    assert streams == [("asr", None)] + [("ser", label) for label in PRESENT_EMOTIONS]
    np.testing.assert_allclose(shares, [0.5] + [0.5 / 3] * 3)
    # the stream runs (each ser label stream is read several epochs over) and never needs angry
    micro_batches = [mb for _ in range(12) for mb in stream.next_step()]
    used = ser_labels(micro_batches, labels_by_key())
    assert len(used) >= 30 and set(used) == set(PRESENT_EMOTIONS), used
    assert stream.counts()["sampler"] == "ads"
    stream.close()


def test_hybrid_switch_to_ads_after_random_steps_does_not_fail(shards, tokenizer):
    stream = make_stream(shards, tokenizer, "random")
    for _ in range(3):
        stream.next_step()
    stream.set_sampler("ads")                  # hybrid's ADS stage
    micro_batches = [mb for _ in range(6) for mb in stream.next_step()]
    assert set(ser_labels(micro_batches, labels_by_key())) <= set(PRESENT_EMOTIONS)
    assert stream.counts()["sampler"] == "ads"
    stream.close()


def test_random_mixing_is_not_affected_by_an_absent_label(shards, tokenizer):
    stream = make_stream(shards, tokenizer, "random")
    micro_batches = [mb for _ in range(8) for mb in stream.next_step()]
    assert set(ser_labels(micro_batches, labels_by_key())) == set(PRESENT_EMOTIONS)
    stream.close()


def test_the_start_of_run_note_names_the_absent_label_and_the_setting(shards, tokenizer):
    stream = make_stream(shards, tokenizer, "random")   # known before any ADS stage starts
    note = absent_labels_note_for(stream.cfg, stream.data_counts)
    stream.close()
    assert note is not None and "\n" not in note
    assert "ser labels angry of data.emotions have no training examples" in note
    assert "ADS balances ser over neutral, happy, sad" in note
    assert "data.emotions=[neutral,happy,sad]" in note
    assert "did" not in note                   # no did data at all: not a label matter, not mentioned
    silenced = DataConfig(train=shards, emotions=list(PRESENT_EMOTIONS))
    assert absent_labels_note_for(silenced, stream.data_counts) is None


def test_label_counts_without_a_per_label_breakdown_leave_every_label_in():
    # a task count but no per-label counts: nothing is known about the labels
    unknown = {("asr", None): 4, ("ser", None): 4}
    assert absent_labels(["ser"], None, unknown) == {}
    assert absent_labels(["ser"], None, None) == {}
    streams, _, absent = balanced_streams(["ser"], None, natural_counts=unknown)
    assert absent == [] and len(streams) == len(DEFAULT_EMOTIONS)
    assert absent_labels_note(None, unknown) is None


def test_a_task_without_any_example_is_left_out_of_ads():
    counts = {("asr", None): 10, ("ser", None): 0, ("did", None): 6, ("did", "egy"): 6}
    streams, shares, absent = balanced_streams(["asr", "did", "ser"], None, natural_counts=counts)
    assert streams == [("asr", None), ("did", "egy")]
    np.testing.assert_allclose(shares, [0.5, 0.5])
    assert ("ser", "angry") in absent and ("did", "glf") in absent
    note = absent_labels_note(None, counts)
    assert "data.dialects=[egy]" in note and "ser" not in note
