"""loaders/demo_data.py: deterministic, indexed, skewed and learnable synthetic demo shards."""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile
from transformers import WhisperFeatureExtractor

from loaders import demo_data
from loaders.demo_data import (CONTENT_WORDS, LEXICON, SAMPLE_RATE, summarize, write_demo_shards)
from loaders.make_shards import INDEX_FILE
from loaders.tasks import DEFAULT_DIALECTS, DEFAULT_EMOTIONS, tasks_of_record

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(train_shards=2, val_shards=1, samples_per_shard=6)
# Labelled val examples are few (~30 per label task), so the nearest-centroid check asks for a
# clear margin over the majority rate rather than perfection.
CENTROID_MARGIN_OVER_MAJORITY = 0.15


def _digests(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def _samples(folder: Path, split: str) -> list[tuple[str, dict, bytes, str]]:
    """(key, meta, audio bytes, extension) of every sample in a split, in shard order."""
    samples = []
    for shard in sorted(folder.glob(f"{split}-*.tar")):
        grouped: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                grouped.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key, parts in grouped.items():
            ext = next(ext for ext in parts if ext != "json")
            samples.append((key, json.loads(parts["json"]), parts[ext], ext))
    return samples


@pytest.fixture(scope="module")
def default_set(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo") / "demo"
    write_demo_shards(folder)
    return folder


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    write_demo_shards(tmp_path / "a", seed=3, **SMALL)
    write_demo_shards(tmp_path / "b", seed=3, **SMALL)
    write_demo_shards(tmp_path / "c", seed=4, **SMALL)
    first, second, other = (_digests(tmp_path / name) for name in "abc")
    assert sorted(first) == [INDEX_FILE, "train-000000.tar", "train-000001.tar", "val-000000.tar"]
    assert first == second
    for name in ("train-000000.tar", "train-000001.tar", "val-000000.tar"):
        assert first[name] != other[name], f"{name} did not change with the seed"


def test_complete_set_is_not_rewritten_and_other_settings_replace_it(tmp_path):
    folder = tmp_path / "demo"
    write_demo_shards(folder, seed=0, **SMALL)
    stamps = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    index = write_demo_shards(folder, seed=0, **SMALL)
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == stamps
    assert index["demo"]["seed"] == 0
    write_demo_shards(folder, seed=0, train_shards=1, val_shards=1, samples_per_shard=4)
    assert sorted(path.name for path in folder.iterdir()) == [INDEX_FILE, "train-000000.tar", "val-000000.tar"]
    assert len(_samples(folder, "train")) == 4
    assert [path.name for path in tmp_path.iterdir()] == ["demo"], "temporary folders were left behind"


def test_refuses_a_folder_holding_other_files(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a demo set"):
        write_demo_shards(folder, **SMALL)
    assert (folder / "notes.txt").read_text() == "keep me"
    assert [path.name for path in tmp_path.iterdir()] == ["mine"]


def test_two_processes_generating_at_once_leave_one_complete_set(tmp_path):
    folder = tmp_path / "demo"
    command = [sys.executable, "-m", "loaders.demo_data", str(folder), "--train-shards", "2",
               "--val-shards", "1", "--samples-per-shard", "6"]
    runs = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for run in runs:
        _, err = run.communicate(timeout=60)
        assert run.returncode == 0, err.decode()
    write_demo_shards(tmp_path / "reference", **SMALL)
    assert _digests(folder) == _digests(tmp_path / "reference")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["demo", "reference"]


def test_index_counts_equal_a_recount_of_the_tars(default_set):
    index = json.loads((default_set / INDEX_FILE).read_text(encoding="utf-8"))
    assert index["format"] == 1
    assert sorted(index["shards"]) == [f"train-{n:06d}.tar" for n in range(8)] + ["val-000000.tar", "val-000001.tar"]
    for name, entry in index["shards"].items():
        split, number = name[:-4].split("-")
        tasks: Counter = Counter()
        labels: dict[str, Counter] = {"did": Counter(), "ser": Counter()}
        seconds = 0.0
        shard_samples = [s for s in _samples(default_set, split) if s[0].split("-")[2] == f"{int(number):04d}"]
        for _, meta, audio, _ in shard_samples:
            for task in tasks_of_record(meta):
                tasks[task] += 1
                if task == "did":
                    labels["did"][meta["dialect"]] += 1
                if task == "ser":
                    labels["ser"][meta["emotion"]] += 1
            info = soundfile.info(io.BytesIO(audio))
            seconds += info.frames / info.samplerate
        assert entry["samples"] == len(shard_samples) == 24
        assert entry["tasks"] == dict(tasks)
        assert entry["labels"] == {task: dict(counts) for task, counts in labels.items() if counts}
        assert entry["audio_seconds"] == pytest.approx(seconds, abs=0.01)


def test_audio_format_and_record_fields(default_set):
    samples = _samples(default_set, "train") + _samples(default_set, "val")
    extensions = Counter(ext for _, _, _, ext in samples)
    assert set(extensions) == {"wav", "flac"} and extensions["flac"] >= 10
    total_bytes = sum(path.stat().st_size for path in default_set.iterdir())
    assert total_bytes < 16 * 1024 * 1024, "the default demo set should stay a few MB"
    for key, meta, audio, _ in samples:
        info = soundfile.info(io.BytesIO(audio))
        assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16"), key
        assert 0.5 <= info.duration <= 3.2, f"{key}: {info.duration:.2f} s"
        assert meta["duration"] == pytest.approx(info.duration, abs=0.001)
        words = meta["text"].split(" ")
        assert 2 <= len(words) <= 6 and all(word in LEXICON for word in words), key
        if "summary" in meta:
            assert meta["summary"] == summarize(words)
            assert 1 <= len(meta["summary"].split(" ")) <= 2
            assert all(word in CONTENT_WORDS for word in meta["summary"].split(" "))
        assert meta.get("dialect", "msa") in DEFAULT_DIALECTS and meta.get("emotion", "neutral") in DEFAULT_EMOTIONS
        assert tasks_of_record(meta), f"{key} yields no task"


def test_summary_is_first_two_distinct_content_words():
    assert summarize(["في", "بيت", "من", "بيت", "قمر", "شمس"]) == "بيت قمر"
    assert summarize(["إلى", "نهر"]) == "نهر"


def test_labels_and_tasks_are_skewed(default_set):
    samples = _samples(default_set, "train")
    dialects = Counter(meta["dialect"] for _, meta, _, _ in samples if "did" in tasks_of_record(meta))
    emotions = Counter(meta["emotion"] for _, meta, _, _ in samples if "ser" in tasks_of_record(meta))
    tasks = Counter(task for _, meta, _, _ in samples for task in tasks_of_record(meta))
    did_total, ser_total = sum(dialects.values()), sum(emotions.values())
    assert dialects.most_common(1)[0][0] == "msa" and dialects["msa"] / did_total > 0.45
    assert min(dialects.values()) / did_total < 0.12
    assert emotions.most_common(1)[0][0] == "neutral" and emotions["neutral"] / ser_total > 0.4
    assert min(emotions.values()) / ser_total < 0.12
    assert set(dialects) == set(DEFAULT_DIALECTS) and set(emotions) == set(DEFAULT_EMOTIONS)
    # the natural task mix is uneven: asr everywhere, the others on about half the records
    assert tasks["asr"] > 0.85 * len(samples)
    for task in ("sum", "did", "ser"):
        assert 0.3 * len(samples) < tasks[task] < 0.8 * len(samples), (task, tasks[task])
    assert any("task" in meta for _, meta, _, _ in samples), "no record uses the explicit task field"


def _mean_log_mel(extractor: WhisperFeatureExtractor, audio: bytes) -> np.ndarray:
    signal, rate = soundfile.read(io.BytesIO(audio), dtype="float32")
    features = extractor(signal, sampling_rate=rate, truncation=False, padding="longest", return_tensors="np")
    return features.input_features[0].mean(axis=1)


def _nearest_centroid_accuracy(train: list[tuple[np.ndarray, str]], val: list[tuple[np.ndarray, str]]) -> float:
    labels = sorted({label for _, label in train})
    centroids = np.stack([np.mean([x for x, label in train if label == name], axis=0) for name in labels])
    hits = [labels[int(np.argmin(((centroids - x) ** 2).sum(axis=1)))] == label for x, label in val]
    return float(np.mean(hits))


@pytest.fixture(scope="module")
def mean_log_mels(default_set) -> dict[str, list[tuple[np.ndarray, dict]]]:
    """split -> [(mean log-mel of the clip, its record)], computed once for the module."""
    extractor = WhisperFeatureExtractor(feature_size=128)
    return {split: [(_mean_log_mel(extractor, audio), meta) for _, meta, audio, _ in _samples(default_set, split)]
            for split in ("train", "val")}


@pytest.mark.parametrize("field", ["dialect", "emotion"])
def test_labels_are_separable_in_log_mel_space(mean_log_mels, field):
    """A nearest-centroid classifier on each clip's mean log-mel (the features the model sees)
    beats the majority rate on val by a clear margin: the label cues are real and simple."""
    train, val = ([(vector, meta[field]) for vector, meta in mean_log_mels[split] if field in meta]
                  for split in ("train", "val"))
    majority = Counter(label for _, label in val).most_common(1)[0][1] / len(val)
    accuracy = _nearest_centroid_accuracy(train, val)
    assert accuracy >= majority + CENTROID_MARGIN_OVER_MAJORITY, (accuracy, majority)


def test_words_are_separable_in_log_mel_space():
    """Every lexicon word, said under random dialect/emotion/speaker, is recognised by a
    nearest-centroid classifier on its level-normalised mean log-mel: asr is learnable."""
    extractor = WhisperFeatureExtractor(feature_size=128)
    rng = np.random.default_rng(11)

    def word_vector(word: str) -> np.ndarray:
        dialect = demo_data.DIALECTS[int(rng.integers(len(demo_data.DIALECTS)))]
        emotion = demo_data.EMOTIONS[int(rng.integers(len(demo_data.EMOTIONS)))]
        signal = demo_data.render_clip([word], dialect, emotion, int(rng.integers(8)), 0, rng).astype(np.float32)
        frames = extractor(signal, sampling_rate=SAMPLE_RATE, truncation=False, padding="longest",
                           return_tensors="np").input_features[0]
        loudness = frames[:100].max(axis=0)  # bins below ~4.6 kHz: the word slots
        spoken = frames[:, loudness > loudness.max() - 1.0].mean(axis=1)
        return spoken - spoken.mean()

    train = [(word_vector(word), word) for word in LEXICON for _ in range(3)]
    val = [(word_vector(word), word) for word in LEXICON for _ in range(2)]
    assert _nearest_centroid_accuracy(train, val) >= 0.9
