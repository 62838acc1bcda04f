"""loaders/pipeline.py: TrainStream end to end over the demo shards, exact resume, stage
switches, rank x worker split with real DataLoader workers, val batches, no truncation."""
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile

from engine.tokenizer import build_tiny_tokenizer
from loaders.audio import decode_audio
from loaders.config import DataConfig
from loaders.pipeline import TrainStream
from loaders.sources import demo_shard_urls
from loaders.val_batches import build_val_batches
from loaders.prompts import IGNORE_INDEX, IM_END, audio_token_count
from loaders.shards import ShardError, iter_tar_samples
from loaders.stream import ExampleSource
from loaders.tasks import TASK_IDS, TASKS, tasks_of_record

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "arabic-speech"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    train, val = demo_shard_urls(str(folder))
    return train, val


def demo_config(demo, **overrides) -> DataConfig:
    train, val = demo
    settings = dict(train=train, val=val, shuffle_buffer=16)
    settings.update(overrides)
    return DataConfig(**settings)


def step_keys(micro_batches):
    return [list(zip(mb["keys"], mb["tasks"])) for mb in micro_batches]


def flac_bytes(signal: np.ndarray, rate: int = 16_000) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, signal, rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def write_shard(path, records: list[tuple[str, dict, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for key, meta, audio in records:
            for name, data in ((f"{key}.json", json.dumps(meta).encode()), (f"{key}.flac", audio)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def check_counts_add_up(counts):
    assert counts["read"] == (counts["used"] + counts["pending"] + counts["released_at_switch"]
                              + sum(counts["skipped"].values())), counts
    assert sum(counts["tasks"].values()) == counts["used"]
    assert sum(counts["released_tasks"].values()) == counts["released_at_switch"]


def test_micro_batches_have_the_engine_format(demo, tokenizer):
    cfg = demo_config(demo, max_tokens_per_batch=1024, instruction_lang="mixed")
    stream = TrainStream(cfg, tokenizer, rank=0, world_size=1, grad_accum=3, seed=0)
    micro_batches = stream.next_step()
    assert len(micro_batches) == 3
    audio_id = tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    for mb in micro_batches:
        b, t = mb["input_ids"].shape
        assert b * t <= cfg.max_tokens_per_batch
        assert mb["attention_mask"].shape == mb["labels"].shape == (b, t)
        assert mb["input_features"].shape[:2] == (b, 128) and mb["input_features"].dtype.is_floating_point
        assert mb["feature_attention_mask"].shape == (b, mb["input_features"].shape[2])
        assert mb["task_ids"].tolist() == [TASK_IDS[task] for task in mb["tasks"]]
        assert mb["num_tokens"] == int(mb["attention_mask"].sum()) and len(mb["keys"]) == b
        for row in range(b):
            frames = int(mb["feature_attention_mask"][row].sum())
            assert int((mb["input_ids"][row] == audio_id).sum()) == audio_token_count(frames)
            assert float(mb["input_features"][row, :, frames:].abs().sum()) == 0.0  # padding is zeros
            labelled = mb["labels"][row] != IGNORE_INDEX
            answer = tokenizer.decode(mb["input_ids"][row][labelled])
            assert answer.endswith(IM_END) and len(answer) > len(IM_END)
            assert not bool(labelled[~mb["attention_mask"][row].bool()].any())
    for _ in range(3):
        micro_batches += stream.next_step()
    assert {t for mb in micro_batches for t in mb["tasks"]} == set(TASKS)  # natural mixing draws all four
    check_counts_add_up(stream.counts())
    stream.close()


def test_missing_shard_fails_at_construction(demo, tokenizer):
    train, _ = demo
    cfg = demo_config(demo, train=[train[0].replace("000000", "{000000..000009}")])
    with pytest.raises(ShardError, match="train-000008.tar"):
        TrainStream(cfg, tokenizer, rank=0, world_size=1, grad_accum=1, seed=0)


def _run_with_interruptions(cfg, tokenizer, steps, switch_at, save_at):
    """Steps of one stream, saved (through JSON) and reloaded into a new stream at save_at."""
    stream, keys = None, []
    for step in range(steps):
        if stream is None or step in save_at:
            state = json.loads(json.dumps(stream.state_dict())) if stream is not None else None
            if stream is not None:
                stream.close()
            stream = TrainStream(cfg, tokenizer, rank=1, world_size=2, grad_accum=2, seed=7)
            if state is not None:
                stream.load_state_dict(state)
        if step == switch_at:
            stream.set_tasks(["did", "ser"], {"ser": 2.0})
        keys.append(step_keys(stream.next_step()))
    counts = stream.counts()
    stream.close()
    return keys, counts


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_sees_exactly_the_uninterrupted_sequence(demo, tokenizer, num_workers):
    cfg = demo_config(demo, num_workers=num_workers)
    steps = 6 if num_workers == 0 else 4
    reference, reference_counts = _run_with_interruptions(cfg, tokenizer, steps, switch_at=2, save_at=set())
    resumed, resumed_counts = _run_with_interruptions(cfg, tokenizer, steps, switch_at=2, save_at={1, 3})
    assert resumed == reference
    assert resumed_counts == reference_counts
    check_counts_add_up(resumed_counts)


def test_set_tasks_switches_the_mix_at_once_and_counts_what_it_releases(demo, tokenizer):
    stream = TrainStream(demo_config(demo), tokenizer, rank=0, world_size=1, grad_accum=2, seed=1)
    stream.next_step()
    waiting = [(e.key, e.task) for e in stream.queue]
    assert {task for _, task in waiting} - {"did"}  # other tasks are waiting when the stage changes
    before = stream.counts()
    stream.set_tasks(["did"])
    released = stream.counts()["released_at_switch"]
    assert released >= len(waiting) > 0            # the lookahead, and the rest of the producer's group
    check_counts_add_up(stream.counts())
    used = []
    for step in range(4):
        used += [pair for keys in step_keys(stream.next_step()) for pair in keys]
        check_counts_add_up(stream.counts())
        if step == 0:   # fresh draws (the released ones come back in a later epoch)
            assert not set(waiting) & set(used)
    assert {task for _, task in used} == {"did"}    # from the first micro-batch of the new stage on
    assert stream.counts()["used"] == before["used"] + len(used)
    stream.close()


def test_two_ranks_by_two_workers_read_each_key_once_per_epoch(tmp_path, tokenizer):
    """Real DataLoader workers: 8 shards x 3 records, 4 slots; the first 12 examples of each
    rank (6 per worker) are exactly its two shards, and the ranks together cover all 24."""
    rng = np.random.default_rng(0)
    urls = [write_shard(tmp_path / f"t-{s}.tar",
                        [(f"s{s}-{i}", {"text": "كتب"}, flac_bytes(0.1 * rng.standard_normal(4000).astype(np.float32)))
                         for i in range(3)]) for s in range(8)]
    cfg = DataConfig(train=urls, val=urls, num_workers=2, shuffle_buffer=1)
    seen = []
    for rank in range(2):
        stream = TrainStream(cfg, tokenizer, rank=rank, world_size=2, grad_accum=1, seed=3, active_tasks=["asr"])
        pulled = [stream._pull() for _ in range(12)]
        assert {e.epoch for e in pulled} == {0}
        assert {e.origin[0] for e in pulled} == {0, 1}
        seen += [e.key for e in pulled]
        stream.close()
    assert sorted(seen) == sorted(f"s{s}-{i}" for s in range(8) for i in range(3))


def test_too_few_shards_for_ranks_and_workers(demo, tokenizer):
    train, _ = demo
    cfg = demo_config(demo, train=train[:3], num_workers=2)
    with pytest.raises(ShardError, match="need at least 4"):
        TrainStream(cfg, tokenizer, rank=0, world_size=2, grad_accum=1, seed=0)


def test_val_batches_cover_every_val_example_once(demo, tokenizer):
    cfg = demo_config(demo)
    _, val = demo
    expected = sorted((s.key, task) for url in val for s in iter_tar_samples(url) for task in tasks_of_record(s.meta))
    seen = []
    for rank in range(2):
        for mb in build_val_batches(cfg, tokenizer, rank=rank, world_size=2):
            assert mb["input_ids"].numel() <= cfg.max_tokens_per_batch
            seen += list(zip(mb["keys"], mb["tasks"]))
    assert sorted(seen) == expected
    capped = build_val_batches(cfg, tokenizer, rank=0, world_size=2, max_samples=5)
    assert sum(len(mb["keys"]) for mb in capped) == 5


def test_45_second_recording_is_kept_whole_and_82_seconds_is_skipped(tmp_path, tokenizer):
    long_clip = ASSETS / "long-passage.flac"
    wave = decode_audio(long_clip.read_bytes(), shard=str(ASSETS), key=long_clip.stem)
    assert wave.size > 80 * 16_000
    shard = write_shard(tmp_path / "long.tar", [
        ("clip-45s", {"text": "نص"}, flac_bytes(wave[: 45 * 16_000])),
        ("clip-82s", {"text": "نص"}, long_clip.read_bytes()),
    ])
    cfg = DataConfig(train=[shard], max_audio_seconds=60.0, max_tokens_per_batch=4096, shuffle_buffer=1)
    source = ExampleSource([[shard]], cfg, tokenizer, {}, slot=0, num_slots=1, seed=0)
    example = source.pull("asr")
    assert example.key == "clip-45s" and example.features.shape == (128, 4500)
    assert example.audio_seconds == pytest.approx(45.0)
    assert int((example.input_ids == tokenizer.convert_tokens_to_ids("<|AUDIO|>")).sum()) == 1125
    assert source.pull("asr").epoch == 1  # the 82 s clip was skipped on the way
    assert source.counts()["skipped"] == {"audio_too_long": 1}


def test_source_weights_steer_the_mix(tmp_path, tokenizer):
    rng = np.random.default_rng(1)

    def shards(prefix):
        return [write_shard(tmp_path / f"{prefix}-{s}.tar",
                            [(f"{prefix}{s}-{i}", {"text": "كتب"}, flac_bytes(0.1 * rng.standard_normal(3200).astype(np.float32)))
                             for i in range(4)]) for s in range(2)]

    a, b = shards("a"), shards("b")
    for weights, expected in (([1.0, 0.0], {"a"}), ([1.0, 1.0], {"a", "b"})):
        cfg = DataConfig(train=[a, b], weights=weights, shuffle_buffer=2, max_tokens_per_batch=512)
        stream = TrainStream(cfg, tokenizer, rank=0, world_size=1, grad_accum=2, seed=0)
        keys = [k for _ in range(3) for mb in stream.next_step() for k in mb["keys"]]
        assert {k[0] for k in keys} == expected
        stream.close()
    with pytest.raises(ValueError, match="one weight per source"):
        TrainStream(DataConfig(train=[a, b], weights=[1.0]), tokenizer, rank=0, world_size=1, grad_accum=1, seed=0)


def test_counts_add_up_with_bad_samples_in_the_stream(tmp_path, tokenizer):
    rng = np.random.default_rng(2)
    urls = []
    for s in range(2):
        records = [(f"g{s}-{i}", {"text": "كتب", "dialect": "msa"}, flac_bytes(0.1 * rng.standard_normal(3200).astype(np.float32)))
                   for i in range(4)]
        records += [(f"bad-audio{s}", {"text": "كتب"}, b"fLaC not really"), (f"bad-label{s}", {"dialect": "xx"}, records[0][2])]
        urls.append(write_shard(tmp_path / f"m-{s}.tar", records))
    stream = TrainStream(DataConfig(train=urls, shuffle_buffer=3, max_tokens_per_batch=512), tokenizer,
                         rank=0, world_size=1, grad_accum=2, seed=0)
    for _ in range(3):
        stream.next_step()
        counts = stream.counts()
        check_counts_add_up(counts)
    assert counts["skipped"]["undecodable_audio"] >= 2 and counts["skipped"]["label_outside_set"] >= 2
    stream.close()
