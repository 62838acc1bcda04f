"""loaders/stream.py: shard URLs, rank x worker split, per-task readers, bad inputs skipped,
warned and counted by reason (totals add up) or raised."""
import io
import json
import logging
import tarfile

import numpy as np
import pytest
import soundfile

from engine.tokenizer import build_tiny_tokenizer
from loaders.config import DataConfig
from loaders.shards import (
    ShardError, check_enough_shards, check_shards_exist, count_examples, expand_urls, iter_tar_samples, shard_order,
)
from loaders.stream import DataError, ExampleSource
from loaders.tasks import TASKS, TARGET_FIELDS


def wav_bytes(seconds: float, seed: int = 0, rate: int = 16_000) -> bytes:
    rng = np.random.default_rng(seed)
    signal = (0.1 * rng.standard_normal(int(seconds * rate))).astype(np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, signal, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def write_shard(path, members: list[tuple[str, bytes]], corrupt_tail: bytes | None = None) -> str:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if corrupt_tail is not None:  # replace the end-of-archive blocks by a damaged header
        raw = open(path, "rb").read().rstrip(b"\0")
        raw = raw + b"\0" * (-len(raw) % 512) + corrupt_tail + b"\0" * 1024
        open(path, "wb").write(raw)
    return str(path)


def sample(key: str, meta, audio: bytes | None = None, ext: str = "wav") -> list[tuple[str, bytes]]:
    members = []
    if meta is not None:
        members.append((f"{key}.json", meta if isinstance(meta, bytes) else json.dumps(meta).encode()))
    if audio is not None:
        members.append((f"{key}.{ext}", audio))
    return members


def good(key: str, seed: int) -> list[tuple[str, bytes]]:
    meta = {"text": "كتب الولد", "summary": "الولد", "dialect": "egy", "emotion": "sad"}
    return sample(key, meta, wav_bytes(0.5, seed))


# Each bad record and the one reason it must be counted under (once per epoch).
BAD_RECORDS = {
    "audio_without_json": sample("bad-nojson", None, wav_bytes(0.5, 1)),
    "json_without_audio": sample("bad-noaudio", {"text": "كتب"}),
    "malformed_json": sample("bad-json", b"{\"text\": ", wav_bytes(0.5, 2)),
    "no_target": sample("bad-notarget", {"lang": "ar"}, wav_bytes(0.5, 3)),
    "unknown_task": sample("bad-task", {"task": "translate", "text": "كتب"}, wav_bytes(0.5, 4)),
    "label_outside_set": sample("bad-label", {"dialect": "martian"}, wav_bytes(0.5, 5)),
    "undecodable_audio": sample("bad-decode", {"text": "كتب"}, b"RIFF\x00\x00garbage" * 20),
    "empty_audio": sample("bad-empty", {"summary": "الولد"}, wav_bytes(0.0)),
    "audio_too_long": sample("bad-long", {"emotion": "happy"}, wav_bytes(3.0, 6)),
    "text_too_long": sample("bad-text", {"text": "ك" * 80}, wav_bytes(0.5, 7)),
}
CORRUPT_HEADER = b"\xffnot a tar header" + b"\x13" * 496


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    """Shard A: good, every bad record, good. Shard B: two good records, then a corrupt header.
    Good records come first, so reading one epoch's good examples reads every bad one."""
    folder = tmp_path_factory.mktemp("bad")
    members_a = good("a-good-0", 10) + [m for records in BAD_RECORDS.values() for m in records] + good("a-good-1", 11)
    a = write_shard(folder / "a.tar", members_a)
    b = write_shard(folder / "b.tar", good("b-good-0", 12) + good("b-good-1", 13), corrupt_tail=CORRUPT_HEADER)
    return [a, b]


def bad_config(**overrides) -> DataConfig:
    settings = dict(max_audio_seconds=2.0, max_text_tokens=40, shuffle_buffer=1)
    settings.update(overrides)
    return DataConfig(**settings)


def pull_one_epoch(source: ExampleSource, task: str) -> list:
    """Examples of epoch 0 of one task stream (stops at the first example of epoch 1)."""
    examples = []
    while True:
        example = source.pull(task)
        if example.epoch > 0:
            return examples
        examples.append(example)


def test_expand_urls_braces_and_lists():
    assert expand_urls("d/train-{000000..000002}.tar") == [f"d/train-00000{i}.tar" for i in range(3)]
    assert expand_urls(["a-{0..1}.tar", "b.tar c.tar"]) == ["a-0.tar", "a-1.tar", "b.tar", "c.tar"]


def test_missing_shard_is_an_error_naming_it(tmp_path):
    present = write_shard(tmp_path / "x-0.tar", good("k", 0))
    with pytest.raises(ShardError, match=r"x-1\.tar") as err:
        check_shards_exist([present, str(tmp_path / "x-1.tar")], "data.train")
    assert "data.train" in str(err.value)


def test_too_few_shards_says_how_many_are_needed_and_only_the_advice_that_applies():
    with pytest.raises(ShardError, match="need at least 4.*or lower data.num_workers"):
        check_enough_shards(["a", "b", "c"], 4, 2, 2, "data.train")
    with pytest.raises(ShardError, match="need at least 2") as e:   # no workers to lower
        check_enough_shards(["a"], 2, 2, 0, "data.train")
    assert "num_workers" not in str(e.value) and "fewer ranks" in str(e.value)


def test_shard_order_reshuffles_per_epoch_and_agrees_across_calls():
    urls = [f"s{i}" for i in range(16)]
    orders = [shard_order(urls, 0, epoch) for epoch in range(3)]
    assert all(sorted(o) == sorted(urls) for o in orders)
    assert orders[0] != orders[1] != orders[2]
    assert shard_order(urls, 0, 1) == orders[1]


def test_each_bad_input_is_skipped_warned_and_counted_once(bad_shards, tokenizer, caplog):
    source = ExampleSource([bad_shards], bad_config(), tokenizer, {}, slot=0, num_slots=1, seed=0)
    with caplog.at_level(logging.WARNING, logger="loaders"):
        used = {task: pull_one_epoch(source, task) for task in TASKS}
    for task in TASKS:
        assert sorted(e.key for e in used[task]) == ["a-good-0", "a-good-1", "b-good-0", "b-good-1"]
    counts = source.counts()
    expected = {reason: 1 for reason in BAD_RECORDS}
    expected["corrupt_tar"] = 1
    assert counts["skipped"] == expected
    # read = emitted + skipped + buffered (the epoch-1 examples that ended each pull)
    assert counts["read"] == counts["emitted"] + sum(counts["skipped"].values()) + counts["buffered"]
    assert counts["emitted"] == 4 * 4 + 4
    messages = "\n".join(r.getMessage() for r in caplog.records)
    for reason, records in BAD_RECORDS.items():
        key = records[0][0].split(".")[0]
        assert f"{bad_shards[0]}, sample {key!r}" in messages, reason
    assert f"shard {bad_shards[1]}: corrupt tar header" in messages


@pytest.mark.parametrize("task", ["asr", "did"])
def test_on_error_raise_stops_at_the_first_bad_sample(bad_shards, tokenizer, task):
    source = ExampleSource([bad_shards[:1]], bad_config(on_error="raise"), tokenizer, {}, slot=0, num_slots=1, seed=0)
    with pytest.raises(DataError, match=r"a\.tar, sample 'bad-"):
        pull_one_epoch(source, task)


def test_strict_labels_raise_even_when_skipping(bad_shards, tokenizer):
    source = ExampleSource([bad_shards[:1]], bad_config(strict=True), tokenizer, {}, slot=0, num_slots=1, seed=0)
    pull_one_epoch(source, "asr")  # other tasks are unaffected by strict
    with pytest.raises(DataError, match="martian"):
        pull_one_epoch(source, "did")


def test_corrupt_tar_ends_the_shard_with_one_error(bad_shards):
    samples = list(iter_tar_samples(bad_shards[1]))
    assert [s.key for s in samples[:2]] == ["b-good-0", "b-good-1"]
    assert samples[2].error[0] == "corrupt_tar" and len(samples) == 3


def test_readers_decide_from_json_without_decoding_audio(tmp_path, tokenizer, monkeypatch):
    """A task stream never decodes the audio of records that are not its task."""
    shard = write_shard(tmp_path / "t.tar", sample("only-asr", {"text": "كتب"}, wav_bytes(0.5, 1))
                        + sample("only-ser", {"emotion": "sad"}, wav_bytes(0.5, 2)))
    decoded = []
    import loaders.stream as stream_module

    real = stream_module.decode_audio
    monkeypatch.setattr(stream_module, "decode_audio", lambda data, shard, key: decoded.append(key) or real(data))
    source = ExampleSource([[shard]], bad_config(), tokenizer, {}, slot=0, num_slots=1, seed=0)
    assert [e.key for e in pull_one_epoch(source, "ser")] == ["only-ser"]
    assert decoded == ["only-ser", "only-ser"]  # epoch 0, then the epoch-1 example that ended the pull


def test_rank_by_worker_split_reads_every_example_exactly_once(tmp_path, tokenizer):
    """2 ranks x 2 workers = 4 slots over 8 shards: epoch 0 of every task holds each
    (key, task) exactly once across the slots."""
    urls, expected = [], []
    for s in range(8):
        members = []
        for i in range(3):
            key = f"s{s}-{i}"
            meta = {"text": "كتب", "dialect": "msa"} if i != 1 else {"emotion": "happy", "summary": "ولد"}
            members += sample(key, meta, wav_bytes(0.3, s * 10 + i))
            expected += [(key, task) for task in TASKS if TARGET_FIELDS[task] in meta]
        urls.append(write_shard(tmp_path / f"train-{s:06d}.tar", members))
    cfg = bad_config(shuffle_buffer=4)
    seen = []
    for rank in range(2):
        for worker in range(2):
            source = ExampleSource([urls], cfg, tokenizer, {}, slot=rank * 2 + worker, num_slots=4, seed=5)
            for task in TASKS:
                seen += [(e.key, e.task) for e in pull_one_epoch(source, task)]
    assert sorted(seen) == sorted(expected)


def test_count_examples_scans_json_when_there_is_no_index(bad_shards):
    counts = count_examples(bad_shards)
    assert counts["tasks"]["asr"] == 4 + 2  # 4 good + bad-decode + bad-text (JSON says asr)
    assert counts["labels"]["did"] == {"egy": 4, "martian": 1}


def test_rewind_re_reads_the_same_examples_without_counting_them_again(bad_shards, tokenizer):
    """A sampler with a candidate pool steps streams back on resume; blocks of 3 make the
    rewind cross block boundaries, and the bad records in between are not counted twice."""
    cfg = bad_config(shuffle_buffer=3)
    source = ExampleSource([bad_shards], cfg, tokenizer, {}, slot=0, num_slots=1, seed=2, max_rewind=8)
    first = [source.pull("asr").key for _ in range(7)]
    counts = source.counts()
    source.rewind("asr", n=5)
    again = [source.pull("asr").key for _ in range(5)]
    assert again == first[2:]
    assert source.counts() == counts
    after = source.pull("asr").key  # the stream goes on where it was
    reference = ExampleSource([bad_shards], cfg, tokenizer, {}, slot=0, num_slots=1, seed=2)
    assert [reference.pull("asr").key for _ in range(8)] == first + [after]
    with pytest.raises(ValueError, match="cannot step back 9"):
        source.rewind("asr", n=9)


def test_rewind_over_several_sources_repeats_the_same_sources_in_order(tmp_path, tokenizer):
    """With two sources a stream's pulls alternate between them by a seeded draw; a rewind
    steps each source's reader back and replays the same sources, so the keys come back in
    order and the stream then goes on exactly as one that never stepped back."""
    sources = [[write_shard(tmp_path / f"{name}.tar", [m for i in range(6) for m in good(f"{name}-{i}", 20 + i)])]
               for name in ("x", "y")]
    counts = {s: {"tasks": {"asr": 6}, "labels": {}} for s in range(2)}
    cfg = bad_config(shuffle_buffer=2)

    def make(max_rewind):
        return ExampleSource(sources, cfg, tokenizer, counts, slot=0, num_slots=1, seed=4, max_rewind=max_rewind)
    source = make(16)
    first = [source.pull("asr").key for _ in range(8)]
    assert {k[0] for k in first} == {"x", "y"}
    before = source.counts()
    source.rewind("asr", n=6)
    assert [source.pull("asr").key for _ in range(6)] == first[2:]
    assert source.counts() == before
    then = [source.pull("asr").key for _ in range(3)]
    reference = make(0)
    assert [reference.pull("asr").key for _ in range(11)] == first + then
    source.keep_history("asr/*", 2)              # a sampler says how far back it still needs
    with pytest.raises(ValueError, match="cannot step back 3"):
        source.rewind("asr", n=3)


def test_a_rare_label_in_one_shard_reaches_every_slot(tmp_path, tokenizer):
    """A per-label stream whose label lives in one shard of four: slots that miss that shard in
    an epoch read on (the shard order is reshuffled each epoch) instead of failing."""
    urls = [write_shard(tmp_path / f"r-{s}.tar", [m for i in range(2) for m in sample(
        f"r{s}-{i}", {"dialect": "glf" if s == 0 and i == 0 else "egy"}, wav_bytes(0.3, 10 * s + i))])
        for s in range(4)]
    for slot in range(4):
        source = ExampleSource([urls], bad_config(), tokenizer, {}, slot=slot, num_slots=4, seed=1)
        assert source.pull("did", "glf").key == "r0-0"
    with pytest.raises(ShardError, match="labelled lev"):
        ExampleSource([urls], bad_config(dialects=["egy", "glf", "lev"]), tokenizer, {}, slot=0, num_slots=4,
                      seed=1).pull("did", "lev")


def test_gzipped_shards_read_like_plain_ones(bad_shards, tmp_path):
    import gzip

    plain = bad_shards[0]
    zipped = tmp_path / "a.tar.gz"
    zipped.write_bytes(gzip.compress(open(plain, "rb").read()))
    keys = lambda url: [(s.key, s.error and s.error[0]) for s in iter_tar_samples(url)]  # noqa: E731
    assert keys(str(zipped)) == keys(plain)


def test_a_task_without_data_is_an_error_not_a_hang(tmp_path, tokenizer):
    shard = write_shard(tmp_path / "asr-only.tar", sample("k", {"text": "كتب"}, wav_bytes(0.3)))
    source = ExampleSource([[shard]], bad_config(), tokenizer, {}, slot=0, num_slots=1, seed=0)
    with pytest.raises(ShardError, match="no usable sum example"):
        source.pull("sum")
