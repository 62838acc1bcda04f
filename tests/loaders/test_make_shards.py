"""loaders/make_shards.py: manifest -> validated WebDataset shards + shards.json, round trip."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import webdataset as wds

from loaders.make_shards import EXIT_SOME_REFUSED, INDEX_FILE, main as make_shards_main, make_shards
from loaders.tasks import TASKS, UnknownTaskError, tasks_of_record

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "arabic-speech"
CLIPS = ("s00-m3.flac", "s00-f2.flac", "s01-m3.flac")


def _asset_rows() -> dict[str, dict]:
    rows = {}
    for line in (ASSETS / "manifest.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        rows[row["audio"]] = row
    return rows


def _write_manifest(path: Path, rows: list) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row, ensure_ascii=False) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes}, read with the standard library."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


@pytest.fixture
def real_manifest(tmp_path: Path) -> tuple[Path, list[dict]]:
    """Rows for the real 22.05 kHz FLAC clips: one relative path, the others absolute."""
    shutil.copy(ASSETS / CLIPS[0], tmp_path / CLIPS[0])
    source = _asset_rows()
    rows = [
        {"audio": CLIPS[0], "text": source[CLIPS[0]]["text"], "dialect": "msa", "emotion": "neutral", "speaker": "m3"},
        {"audio": str(ASSETS / CLIPS[1]), "text": source[CLIPS[1]]["text"], "summary": "ذهب الولد",
         "emotion": "happy", "lang": "ar", "key": "clip-f2"},
        {"audio": str(ASSETS / CLIPS[2]), "task": "did", "dialect": "egy", "text": source[CLIPS[2]]["text"],
         "duration": 3.2},
        {"audio": str(ASSETS / "long-passage.flac"), "text": source["long-passage.flac"]["text"], "key": "long-passage"},
    ]
    return _write_manifest(tmp_path / "manifest.jsonl", rows), rows


def test_round_trip_keeps_audio_bytes_and_fields(real_manifest, tmp_path):
    manifest, rows = real_manifest
    out = tmp_path / "shards"
    report = make_shards(manifest, out, log=lambda message: None)
    assert report.refused == []
    assert list(report.written) == ["train-000000.tar"]
    shard = out / "train-000000.tar"
    expected_keys = ["s00-m3", "clip-f2", "s01-m3", "long-passage"]
    sources = [tmp_path / CLIPS[0], ASSETS / CLIPS[1], ASSETS / CLIPS[2], ASSETS / "long-passage.flac"]

    with_tarfile = _read_tar(shard)
    with_webdataset = list(wds.WebDataset(str(shard), shardshuffle=False))
    assert [sample["__key__"] for sample in with_webdataset] == expected_keys
    assert sorted(with_tarfile) == sorted(expected_keys)
    for key, row, source, sample in zip(expected_keys, rows, sources, with_webdataset):
        original = source.read_bytes()
        assert sample["flac"] == original, f"{key}: audio bytes changed in the webdataset read"
        assert with_tarfile[key]["flac"] == original, f"{key}: audio bytes changed in the tarfile read"
        meta = json.loads(sample["json"])
        assert meta == json.loads(with_tarfile[key]["json"])
        for field, value in row.items():
            if field not in ("audio", "key"):
                assert meta[field] == value, f"{key}: field {field} changed"
        assert "audio" not in meta and "key" not in meta
        audio, rate = soundfile.read(io.BytesIO(sample["flac"]))
        assert rate == 22050 and audio.ndim == 1
        assert meta["duration"] == pytest.approx(len(audio) / rate, abs=0.1)
    long_meta = json.loads(with_tarfile["long-passage"]["json"])
    assert long_meta["duration"] > 80.0, "the 82 s passage must be kept whole"


def test_index_counts_equal_a_recount_of_the_tars(real_manifest, tmp_path):
    manifest, _ = real_manifest
    out = tmp_path / "shards"
    make_shards(manifest, out, max_count=3, log=lambda message: None)
    index = json.loads((out / INDEX_FILE).read_text(encoding="utf-8"))
    assert index["format"] == 1
    assert sorted(index["shards"]) == ["train-000000.tar", "train-000001.tar"]
    for name, entry in index["shards"].items():
        samples = _read_tar(out / name)
        tasks = {task: 0 for task in TASKS}
        labels: dict[str, dict[str, int]] = {}
        seconds = 0.0
        for parts in samples.values():
            meta = json.loads(parts["json"])
            for task in tasks_of_record(meta):
                tasks[task] += 1
                field = {"did": "dialect", "ser": "emotion"}.get(task)
                if field:
                    labels.setdefault(task, {}).setdefault(meta[field], 0)
                    labels[task][meta[field]] += 1
            info = soundfile.info(io.BytesIO(parts["flac"]))
            seconds += info.frames / info.samplerate
        assert entry["samples"] == len(samples)
        assert entry["tasks"] == {task: n for task, n in tasks.items() if n}
        assert entry["labels"] == labels
        assert entry["audio_seconds"] == pytest.approx(seconds, abs=0.01)
    first = index["shards"]["train-000000.tar"]
    # row 3 names task "did" explicitly: its text does not make an asr example
    assert first["tasks"] == {"asr": 2, "sum": 1, "did": 2, "ser": 2}


def test_same_manifest_gives_identical_bytes(real_manifest, tmp_path):
    manifest, _ = real_manifest
    make_shards(manifest, tmp_path / "a", log=lambda message: None)
    make_shards(manifest, tmp_path / "b", log=lambda message: None)
    for name in ("train-000000.tar", INDEX_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_refused_rows_are_reported_with_row_and_reason(tmp_path, capsys):
    clip = tmp_path / "good.flac"
    shutil.copy(ASSETS / CLIPS[1], clip)
    (tmp_path / "noise.wav").write_bytes(b"this is not audio at all")
    (tmp_path / "empty.wav").write_bytes(b"")
    soundfile.write(tmp_path / "silent-header.wav", np.zeros(0, dtype="int16"), 16000)
    shutil.copy(ASSETS / CLIPS[1], tmp_path / "clip.sph")
    whole = (ASSETS / CLIPS[0]).read_bytes()
    (tmp_path / "cut.flac").write_bytes(whole[: len(whole) // 2])
    rows = [
        {"audio": "good.flac", "text": "نص", "emotion": "happy"},                 # 1 ok
        {"audio": "missing.flac", "text": "نص"},                                 # 2
        {"audio": "noise.wav", "text": "نص"},                                    # 3
        {"audio": "empty.wav", "text": "نص"},                                    # 4
        {"audio": "silent-header.wav", "text": "نص"},                            # 5
        {"audio": "cut.flac", "text": "نص"},                                     # 6
        {"audio": "good.flac", "speaker": "f2", "key": "no-target"},             # 7
        {"audio": "good.flac", "text": "نص", "key": "bad.key"},                  # 8
        {"audio": "good.flac", "text": "نص"},                                    # 9 duplicate derived key
        {"audio": "good.flac", "text": "نص", "emotion": "bored", "key": "b"},    # 10
        "{not json",                                                             # 11
        {"audio": "good.flac", "task": "translate", "text": "نص", "key": "t"},   # 12
        {"audio": "good.flac", "task": "sum", "text": "نص", "key": "s"},         # 13
        {"audio": "good.flac", "text": ["a"], "key": "l"},                       # 14
        {"text": "نص", "key": "no-audio"},                                       # 15
        {"audio": "good.flac", "dialect": "glf", "key": "glf-ok"},               # 16 ok
        {"audio": "clip.sph", "text": "نص"},                                     # 17
    ]
    manifest = _write_manifest(tmp_path / "manifest.jsonl", rows)
    code = make_shards_main([str(manifest), str(tmp_path / "out"), "--emotions", "neutral,happy,sad,angry"])
    printed = capsys.readouterr().out
    assert code == EXIT_SOME_REFUSED
    expected = {
        2: "does not exist", 3: "not readable by soundfile", 4: "empty (0 bytes)", 5: "no audio frames",
        6: "cut.flac", 7: "no target", 8: "not tar-safe", 9: "already used by row 1", 10: "not in --emotions",
        11: "not valid JSON", 12: "unknown task 'translate'", 13: "its target is missing", 14: "must be a string",
        15: "missing 'audio'", 17: "is not named as one of",
    }
    refused_lines = [line for line in printed.splitlines() if line.startswith("refused row")]
    assert len(refused_lines) == len(expected)
    for row_number, reason in expected.items():
        line = next((line for line in refused_lines if line.startswith(f"refused row {row_number}:")), None)
        assert line is not None and reason in line, f"row {row_number}: expected {reason!r} in {line!r}"
    assert "2 samples written in 1 shards, 15 rows refused" in printed
    assert sorted(_read_tar(tmp_path / "out" / "train-000000.tar")) == ["glf-ok", "good"]


def test_nothing_written_exits_non_zero(tmp_path, capsys):
    manifest = _write_manifest(tmp_path / "manifest.jsonl", [{"audio": "missing.wav", "text": "نص"}])
    code = make_shards_main([str(manifest), str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code != 0
    assert "refused row 1" in captured.out and "nothing written" in captured.err
    assert not (tmp_path / "out" / INDEX_FILE).exists()


def _partial_manifest(tmp_path: Path) -> Path:
    """Two good rows and one refused (its audio file is missing)."""
    shutil.copy(ASSETS / CLIPS[1], tmp_path / "clip.flac")
    return _write_manifest(tmp_path / "manifest.jsonl", [{"audio": "clip.flac", "text": "نص", "key": "one"},
                                                         {"audio": "gone.flac", "text": "نص", "key": "gone"},
                                                         {"audio": "clip.flac", "dialect": "egy", "key": "two"}])


def test_exit_status_tells_a_partial_build_from_a_clean_one(tmp_path, capsys):
    manifest = _partial_manifest(tmp_path)
    assert make_shards_main([str(manifest), str(tmp_path / "partial")]) == 3
    captured = capsys.readouterr()
    assert "refused row 2: audio file" in captured.out and "does not exist" in captured.out
    assert "2 samples written in 1 shards, 1 rows refused" in captured.out
    assert "partial build: 1 rows" in captured.err and "--allow-refused" in captured.err
    assert sorted(_read_tar(tmp_path / "partial" / "train-000000.tar")) == ["one", "two"]   # good rows still written
    assert json.loads((tmp_path / "partial" / INDEX_FILE).read_text(encoding="utf-8"))["shards"][
        "train-000000.tar"]["samples"] == 2

    assert make_shards_main([str(manifest), str(tmp_path / "accepted"), "--allow-refused"]) == 0
    captured = capsys.readouterr()
    assert "refused row 2:" in captured.out and "2 samples written in 1 shards, 1 rows refused" in captured.out
    assert captured.err == ""
    shard = "train-000000.tar"
    assert (tmp_path / "accepted" / shard).read_bytes() == (tmp_path / "partial" / shard).read_bytes()

    clean = _write_manifest(tmp_path / "clean.jsonl", [{"audio": "clip.flac", "text": "نص", "key": "one"}])
    assert make_shards_main([str(clean), str(tmp_path / "clean")]) == 0
    assert "1 samples written in 1 shards, 0 rows refused" in capsys.readouterr().out
    # --allow-refused accepts a partial build, never an empty one.
    nothing = _write_manifest(tmp_path / "nothing.jsonl", [{"audio": "gone.flac", "text": "نص"}])
    assert make_shards_main([str(nothing), str(tmp_path / "nothing"), "--allow-refused"]) == 1
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    assert make_shards_main([str(empty), str(tmp_path / "empty")]) == 1
    assert "the manifest holds no rows" in capsys.readouterr().err


def test_the_command_exits_3_on_a_partial_build_and_documents_it(tmp_path):
    """The process status a shell script sees, and --help listing every status."""
    manifest = _partial_manifest(tmp_path)
    repo = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "loaders.make_shards", str(manifest), str(tmp_path / "out")]
    assert subprocess.run(command, cwd=repo, capture_output=True, timeout=120).returncode == 3
    assert subprocess.run(command + ["--allow-refused"], cwd=repo, capture_output=True, timeout=120).returncode == 0
    usage = subprocess.run([sys.executable, "-m", "loaders.make_shards", "--help"], cwd=repo, capture_output=True,
                           text=True, timeout=120).stdout
    for status in ("0  every row written", "1  nothing written", "2  bad arguments", "3  some rows refused",
                   "4  writing failed part-way"):
        assert status in usage, usage
    assert "--allow-refused" in usage


def test_a_second_prefix_joins_the_index(real_manifest, tmp_path):
    manifest, _ = real_manifest
    out = tmp_path / "shards"
    make_shards(manifest, out, max_count=2, log=lambda message: None)
    make_shards(manifest, out, prefix="val", log=lambda message: None)
    index = json.loads((out / INDEX_FILE).read_text(encoding="utf-8"))
    assert sorted(index["shards"]) == ["train-000000.tar", "train-000001.tar", "val-000000.tar"]
    assert index["shards"]["val-000000.tar"]["samples"] == 4


def test_tasks_of_record_reads_targets_and_explicit_task():
    assert tasks_of_record({"text": "a", "emotion": "sad", "dialect": "", "lang": "ar"}) == ["asr", "ser"]
    assert tasks_of_record({"summary": "s", "text": "t", "dialect": "egy"}) == ["asr", "sum", "did"]
    assert tasks_of_record({"task": "ser", "text": "t", "emotion": "sad"}) == ["ser"]
    assert tasks_of_record({"task": ["did", "asr"], "text": "t", "dialect": "egy"}) == ["asr", "did"]
    assert tasks_of_record({"task": "sum", "text": "t"}) == []
    assert tasks_of_record({"speaker": "x"}) == []
    with pytest.raises(UnknownTaskError, match="translate"):
        tasks_of_record({"task": "translate", "text": "t"})


def test_audio_extensions_match_the_streaming_reader():
    """A shard member under an extension the reader does not know would be lost at training."""
    from loaders.make_shards import AUDIO_EXTENSIONS
    from loaders.shards import AUDIO_EXTENSIONS as READER_EXTENSIONS
    assert set(AUDIO_EXTENSIONS) == set(READER_EXTENSIONS)


def test_default_label_sets_are_enforced_and_any_turns_the_check_off(tmp_path, capsys):
    """Without --dialects/--emotions the recipe defaults are the allowed sets (a typo such as
    "xyz" would otherwise be counted in shards.json and only skipped at training)."""
    shutil.copy(ASSETS / CLIPS[1], tmp_path / "clip.flac")
    rows = [{"audio": "clip.flac", "dialect": "egy", "key": "ok"},
            {"audio": "clip.flac", "dialect": "xyz", "key": "typo"},
            {"audio": "clip.flac", "emotion": "bored", "key": "odd-emotion"}]
    manifest = _write_manifest(tmp_path / "manifest.jsonl", rows)
    assert make_shards_main([str(manifest), str(tmp_path / "strict")]) == EXIT_SOME_REFUSED
    printed = capsys.readouterr().out
    assert "refused row 2: dialect 'xyz' is not in --dialects (egy, glf, lev, msa, nor)" in printed
    assert "refused row 3: emotion 'bored' is not in --emotions (neutral, happy, sad, angry)" in printed
    index = json.loads((tmp_path / "strict" / INDEX_FILE).read_text(encoding="utf-8"))
    assert index["shards"]["train-000000.tar"]["labels"] == {"did": {"egy": 1}}
    assert make_shards_main([str(manifest), str(tmp_path / "open"), "--dialects", "any", "--emotions", "any"]) == 0
    assert "3 samples written" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        make_shards_main(["--help"])
    assert "'any': accept every label" in capsys.readouterr().out


def test_refused_targets_name_the_field_to_fill():
    from loaders.make_shards import RowRefused, _check_targets

    with pytest.raises(RowRefused, match=r"task 'did' is given .*\(task did needs a non-empty 'dialect'\)"):
        _check_targets({"task": "did", "text": "نص"})
    with pytest.raises(RowRefused, match="'text' empty"):
        _check_targets({"text": "  "})
    with pytest.raises(RowRefused, match="give at least one of text, summary, dialect, emotion"):
        _check_targets({"lang": "ar"})


def _clean_manifest(tmp_path: Path) -> Path:
    shutil.copy(ASSETS / CLIPS[1], tmp_path / "clip.flac")
    return _write_manifest(tmp_path / "clean.jsonl", [{"audio": "clip.flac", "text": "نص", "key": "one"}])


def test_an_out_dir_that_cannot_hold_shards_is_one_line_and_exit_2(tmp_path, capsys):
    manifest = _clean_manifest(tmp_path)
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me", encoding="utf-8")
    blocked = tmp_path / "blocked"
    (blocked / INDEX_FILE).mkdir(parents=True)
    cases = {a_file: "is a file, not a folder", a_file / "sub": "lies under", a_file / "sub" / "deeper": "lies under",
             blocked: "holds folder(s) named like its outputs (shards.json)"}
    for out, says in cases.items():
        assert make_shards_main([str(manifest), str(out)]) == 2, out
        captured = capsys.readouterr()
        assert captured.err.count("\n") == 1 and captured.err.startswith("error: OUT_DIR: "), captured.err
        assert says in captured.err and str(out) in captured.err
        assert captured.out == ""                       # refused before any row is read
    assert a_file.read_text(encoding="utf-8") == "keep me"
    assert make_shards_main([str(manifest), str(tmp_path / "new" / "nested")]) == 0   # a missing folder is created


def test_the_command_refuses_a_file_as_out_dir_without_a_traceback(tmp_path):
    manifest = _clean_manifest(tmp_path)
    a_file = tmp_path / "a-file"
    a_file.write_text("", encoding="utf-8")
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-m", "loaders.make_shards", str(manifest), str(a_file)], cwd=repo,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: OUT_DIR: {a_file} is a file, not a folder; give a folder for the shards (it is created if missing)"]


def test_a_write_failure_part_way_is_one_line_and_exit_4(tmp_path, capsys, monkeypatch):
    import errno

    import loaders.make_shards as module

    manifest = _clean_manifest(tmp_path)

    def disk_full(tar, key, meta, audio, ext):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "train-000000.tar"))

    monkeypatch.setattr(module, "add_sample", disk_full)
    assert make_shards_main([str(manifest), str(tmp_path / "out")]) == module.EXIT_WRITE_FAILED == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "train-000000.tar" in err
    assert "shards.json was not updated" in err and not (tmp_path / "out" / INDEX_FILE).exists()


def test_manifest_folder_and_non_string_audio_are_said_as_such(tmp_path, capsys):
    assert make_shards_main([str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"manifest {tmp_path} is a folder" in err and ".jsonl file" in err and "does not exist" not in err
    manifest = _write_manifest(tmp_path / "manifest.jsonl", [{"audio": 7, "text": "نص"}, {"audio": "", "text": "نص"},
                                                             {"audio": ["a.wav"], "text": "نص"}])
    make_shards_main([str(manifest), str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "refused row 1: 'audio' is 7 (int), not a path; give the audio file's path as a string" in out
    assert "refused row 2: empty 'audio'" in out
    assert "refused row 3: 'audio' is [\"a.wav\"] (list), not a path" in out
    assert "missing 'audio'" not in out
