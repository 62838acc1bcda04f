"""Scheduling through TrainStream on real shards: ADS balances a skewed dialect stream while
random mixing keeps the skew, stages switch on the fly (later tasks never earlier, counts add
up), a resume inside an ADS stage continues the exact batch sequence, stored aligner
embeddings change what ADS selects, and every rank yields grad_accum micro-batches."""
import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import soundfile

from engine.tokenizer import build_tiny_tokenizer
from loaders.config import DataConfig
from loaders.curriculum import ScheduleConfig
from loaders.embeddings import sidecar_path, write_embedding_sidecar
from loaders.pipeline import TrainStream
from loaders.shards import iter_tar_samples

DIALECT_SHARES = {"egy": 0.8, "glf": 0.2}     # the skew ADS must undo
SHARDS, RECORDS_PER_SHARD = 4, 30
# Over the ~150 did examples of the balance test, ADS's label shares stay within 0.08 of
# uniform: the quota drawer is exact per window and the selection steers cumulative counts to
# the targets, but up to a pool's worth of drawn samples is still pending when we count.
# Random mixing over the same window stays near the data's 0.8 (binomial sd ~0.03 at n=150).
ADS_SHARE_TOLERANCE = 0.08
RANDOM_SHARE_TOLERANCE = 0.1
# Small ADS settings keep the tests fast; the mechanics are those of the defaults.
SCHEDULE = ScheduleConfig(ads_pool=32, ads_window=16, ads_max_wait=8, embedding_dim=32)


def wav_bytes(seconds: float, pitch_hz: float, rng) -> bytes:
    t = np.arange(int(seconds * 16_000)) / 16_000
    signal = 0.3 * np.sin(2 * np.pi * pitch_hz * t) + 0.05 * rng.standard_normal(t.size)
    buffer = io.BytesIO()
    soundfile.write(buffer, signal.astype(np.float32), 16_000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def write_skewed_shards(folder) -> list[str]:
    """Half the records are did (80% egy, 20% glf), a quarter asr, a quarter sum; short tones
    whose pitch depends on the record, so embeddings differ between samples."""
    rng = np.random.default_rng(0)
    urls = []
    for s in range(SHARDS):
        path = folder / f"train-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(RECORDS_PER_SHARD):
                kind = rng.random()
                if kind < 0.5:
                    meta = {"dialect": "egy" if rng.random() < DIALECT_SHARES["egy"] else "glf"}
                elif kind < 0.75:
                    meta = {"text": "كتب الولد"}
                else:
                    meta = {"summary": "الولد"}
                audio = wav_bytes(rng.uniform(0.2, 0.6), rng.uniform(150, 3000), rng)
                for name, data in ((f"s{s}-{i:03d}.json", json.dumps(meta).encode()), (f"s{s}-{i:03d}.wav", audio)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        urls.append(str(path))
    return urls


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_skewed_shards(tmp_path_factory.mktemp("skewed"))


def config(urls, **overrides) -> DataConfig:
    settings = dict(train=urls, val=urls, dialects=list(DIALECT_SHARES), shuffle_buffer=8, max_tokens_per_batch=1024)
    settings.update(overrides)
    return DataConfig(**settings)


def make_stream(cfg, tokenizer, **kwargs) -> TrainStream:
    settings = dict(rank=0, world_size=1, grad_accum=2, seed=5, schedule_cfg=SCHEDULE)
    settings.update(kwargs)
    return TrainStream(cfg, tokenizer, **settings)


def check_counts_add_up(counts):
    assert counts["read"] == (counts["used"] + counts["pending"] + counts["released_at_switch"]
                              + sum(counts["skipped"].values())), counts
    assert sum(counts["tasks"].values()) == counts["used"]
    assert sum(counts["labels"].get("did", {}).values()) == counts["tasks"].get("did", 0)


def did_shares(micro_batches, labels_by_key):
    labels = [labels_by_key[k] for mb in micro_batches for k, t in zip(mb["keys"], mb["tasks"]) if t == "did"]
    return {label: labels.count(label) / len(labels) for label in DIALECT_SHARES}, len(labels)


def test_ads_balances_skewed_dialects_random_keeps_the_skew(shards, tokenizer):
    labels_by_key = {s.key: s.meta.get("dialect") for url in shards for s in iter_tar_samples(url)}
    data = [v for v in labels_by_key.values() if v]
    assert abs(data.count("egy") / len(data) - DIALECT_SHARES["egy"]) < 0.1   # the data really is skewed
    results = {}
    for sampler in ("random", "ads"):
        stream = make_stream(config(shards), tokenizer, active_tasks=["asr", "did"], sampler=sampler)
        micro_batches = [mb for _ in range(22) for mb in stream.next_step()]
        results[sampler] = did_shares(micro_batches, labels_by_key)
        counts = stream.counts()
        check_counts_add_up(counts)
        assert counts["sampler"] == sampler
        assert {t for mb in micro_batches for t in mb["tasks"]} == {"asr", "did"}
        stream.close()
        if sampler == "ads":
            ads_counts = counts
    (ads, n_ads), (natural, n_natural) = results["ads"], results["random"]
    assert n_ads >= 100 and n_natural >= 50, (n_ads, n_natural)
    for label in DIALECT_SHARES:
        assert abs(ads[label] - 0.5) < ADS_SHARE_TOLERANCE, ads
    assert abs(natural["egy"] - DIALECT_SHARES["egy"]) < RANDOM_SHARE_TOLERANCE, natural
    # the used labels are counted, and the rare dialect is re-read far more often than the common one
    assert ads_counts["labels"]["did"]["glf"] == round(ads["glf"] * n_ads)
    natural_glf = sum(1 for v in data if v == "glf")
    assert ads_counts["repeats"]["did"]["glf"] == ads_counts["draws"]["did"]["glf"] - natural_glf > 0
    assert ads_counts["repeats"]["did"]["glf"] > ads_counts["repeats"]["did"]["egy"]
    assert ads_counts["embedding_hit_rate"] == 0.0          # no sidecars: every embedding fell back


# The engine's stage loop (engine/trainer.py update_stage), reduced to what the stream sees.
STAGES = [{"name": "asr", "tasks": ["asr"], "steps": 3}, {"name": "asr+sum", "tasks": ["asr", "sum"], "steps": 2},
          {"name": "ads", "tasks": ["asr", "sum", "did"], "sampler": "ads"}]


def run_schedule(make, steps, save_at=(), stages=STAGES):
    """The engine's stage loop (engine/trainer.py), reduced to what the stream sees; at
    ``save_at`` steps the state goes through JSON into a new stream, as a resume does.
    Returns (stage index and (key, task) per micro-batch, per step; counts after each step)."""
    schedule = ScheduleConfig(stages=stages).build(max_steps=steps, max_tokens=None)
    stream, stage_index, tokens, trace, counts_per_step = make(), -1, 0, [], []
    for step in range(steps):
        if step in save_at:       # a checkpoint (through JSON) and a new process resuming from it
            saved = json.loads(json.dumps(stream.state_dict()))
            stream.close()
            stream = make()
            stream.load_state_dict(saved)
        index, stage = schedule.stage_at(step, tokens)
        if index != stage_index:
            stage_index = index
            stream.set_tasks(list(stage.tasks), stage.weights)
            stream.set_sampler(stage.sampler)
        micro_batches = stream.next_step()
        tokens += sum(mb["num_tokens"] for mb in micro_batches)
        trace.append((index, [list(zip(mb["keys"], mb["tasks"])) for mb in micro_batches]))
        counts_per_step.append(stream.counts())
    stream.close()
    return trace, counts_per_step


def test_stages_switch_on_the_fly_later_tasks_never_earlier_counts_add_up(shards, tokenizer):
    trace, counts = run_schedule(lambda: make_stream(config(shards), tokenizer), 9)
    assert [index for index, _ in trace] == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    tasks_at = [{task for mb in mbs for _, task in mb} for _, mbs in trace]
    assert all(tasks <= {"asr"} for tasks in tasks_at[:3])
    assert all(tasks <= {"asr", "sum"} for tasks in tasks_at[3:5]) and "sum" in tasks_at[3] | tasks_at[4]
    # the new stage's mix from its first step: the examples waiting for batching when a stage
    # ends (LOOKAHEAD_BATCHES budgets, about two steps here) are released, not used first
    assert "sum" in tasks_at[3]
    assert all("did" in tasks for tasks in tasks_at[5:])
    assert counts[2]["released_at_switch"] == 0 < counts[3]["released_at_switch"] < counts[5]["released_at_switch"]
    assert [c["sampler"] for c in counts] == ["random"] * 5 + ["ads"] * 4
    for c in counts:
        check_counts_add_up(c)
    for before, after in zip(counts, counts[1:]):        # cumulative: never goes down across a switch
        assert all(after["tasks"].get(t, 0) >= n for t, n in before["tasks"].items())
    used_keys = [pair for _, mbs in trace for mb in mbs for pair in mb]
    assert len(used_keys) == counts[-1]["used"]


# Checkpoints inside a stage and right at the switches (steps 3 and 5, before the stream is told).
@pytest.mark.parametrize("num_workers,steps,save_at", [(0, 9, {3, 5, 6, 7}), (2, 9, {5, 7})])
def test_resume_inside_an_ads_stage_reproduces_the_uninterrupted_sequence(shards, tokenizer, num_workers, steps,
                                                                          save_at):
    cfg = config(shards, num_workers=num_workers)
    reference, reference_counts = run_schedule(lambda: make_stream(cfg, tokenizer), steps)
    resumed, resumed_counts = run_schedule(lambda: make_stream(cfg, tokenizer), steps, save_at=save_at)
    assert resumed == reference
    assert resumed_counts[-1] == reference_counts[-1]
    assert reference_counts[-1]["sampler"] == "ads" and "did" in reference_counts[-1]["tasks"]


def test_stored_embeddings_change_the_ads_selection(shards, tokenizer, tmp_path):
    with_sidecars = []
    for url in shards:
        copy = tmp_path / url.rsplit("/", 1)[1]
        shutil.copy(url, copy)
        keys = [s.key for s in iter_tar_samples(str(copy))]
        vectors = np.random.default_rng(len(with_sidecars)).standard_normal((len(keys), 48))
        write_embedding_sidecar(sidecar_path(str(copy)), keys, vectors, source="test")
        with_sidecars.append(str(copy))

    def ads_keys(urls):
        stream = make_stream(config(urls), tokenizer, active_tasks=["asr", "sum", "did"], sampler="ads")
        keys = [mb["keys"] for _ in range(4) for mb in stream.next_step()]
        rate = stream.counts()["embedding_hit_rate"]
        stream.close()
        return keys, rate

    stored, stored_rate = ads_keys(with_sidecars)
    fallback, fallback_rate = ads_keys(shards)
    assert (stored_rate, fallback_rate) == (1.0, 0.0)
    assert stored != fallback
    assert ads_keys(with_sidecars)[0] == stored              # and the selection is deterministic


def test_every_rank_yields_grad_accum_micro_batches_under_ads(shards, tokenizer):
    streams = [make_stream(config(shards), tokenizer, rank=rank, world_size=2, grad_accum=3, sampler="ads",
                           active_tasks=["asr", "did"]) for rank in range(2)]
    keys = [[], []]
    for _ in range(3):
        for rank, stream in enumerate(streams):
            micro_batches = stream.next_step()
            assert len(micro_batches) == 3
            assert all(mb["keys"] and mb["input_ids"].numel() <= 1024 for mb in micro_batches)
            keys[rank] += [k for mb in micro_batches for k in mb["keys"]]
    assert keys[0][:10] != keys[1][:10]     # each rank selects from its own shards' pool
    for stream in streams:
        stream.close()


@pytest.mark.parametrize("sampler", ["random", "ads"])
def test_packed_rows_hold_the_budget_in_real_tokens(shards, tokenizer, sampler):
    stream = make_stream(config(shards, packing=True), tokenizer, sampler=sampler, active_tasks=["asr", "did"])
    for _ in range(3):
        micro_batches = stream.next_step()
        assert len(micro_batches) == 2
        for mb in micro_batches:
            assert "cu_seqlens" in mb and mb["input_ids"].shape[0] == 1
            assert mb["num_tokens"] == mb["input_ids"].shape[1] <= 1024
            assert len(mb["keys"]) == len(mb["cu_seqlens"]) - 1
    check_counts_add_up(stream.counts())
    stream.close()
