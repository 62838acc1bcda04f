"""Build WebDataset shards from a JSONL manifest of local audio files.

    python -m loaders.make_shards MANIFEST.jsonl OUT_DIR [--max-count N] [--max-size MB]
        [--prefix train] [--dialects egy,glf,...|any] [--emotions neutral,happy,...|any]
        [--allow-refused]

This is how a user brings a corpus (MGB-2, ADI-17, their own recordings). Each manifest row
is a JSON object with ``audio`` (a local path; a relative path is resolved against the
manifest's folder) and the sample's fields: ``text`` (asr), ``summary`` (sum), ``dialect``
(did), ``emotion`` (ser), optionally ``task``, ``lang``, ``speaker``, ``duration`` and
``key``. Any other field is kept as it is.

Every row is validated before it is written: the audio file exists, libsndfile (soundfile)
reads it and it holds at least one frame; the row carries at least one target; labels are
in the given sets; the fields are JSON-serialisable; the key is unique and safe as a tar
member name (letters, digits, ``_`` and ``-``; WebDataset splits a member name at the
first dot, so a key may not contain one). Labels are checked against the recipe defaults
(dialects egy,glf,lev,msa,nor; emotions neutral,happy,sad,angry) unless --dialects /
--emotions give other sets; ``any`` accepts every label (for a recipe whose data.dialects /
data.emotions list labels of its own; training skips and counts labels outside them). Without a ``key`` the key is derived from the
audio path relative to the manifest folder. Refused rows are listed with their row number
and reason; the good rows are written all the same.

Exit status (so that a script can tell a partial build from a clean one):
    0  every row written (or some refused, with --allow-refused)
    1  nothing written: every row was refused, or the manifest holds none
    2  bad arguments: the manifest does not exist, or OUT_DIR cannot be a folder of shards
       (it is a file, lies under a file, or cannot be written)
    3  some rows refused, the others written (a partial build)
    4  writing failed part-way (disk full, say): the shards of this run are incomplete

Output: ``OUT_DIR/<prefix>-000000.tar`` ... with members ``<key>.json`` followed by
``<key>.<ext>`` (the audio file's bytes, unchanged, under its own extension), and
``OUT_DIR/shards.json``:
    {"format": 1, "shards": {"train-000000.tar": {"samples": N, "tasks": {"asr": n, ...},
     "labels": {"did": {"egy": n, ...}, "ser": {...}}, "audio_seconds": s}, ...}}
Tar members carry fixed metadata (mtime 0, uid/gid 0, mode 0644), so the same input gives
the same bytes.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import soundfile

from loaders.output_folder import output_folder_problem
from loaders.tasks import DEFAULT_DIALECTS, DEFAULT_EMOTIONS, TARGET_FIELDS, TASKS, UnknownTaskError, tasks_of_record

INDEX_FILE = "shards.json"
INDEX_FORMAT = 1
# Keys: what WebDataset groups reliably (it splits a member name at the first dot and treats
# "/" as a folder) and what fits a ustar member name with room for the extension.
KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,119}$")
# Audio member extensions the streaming reader recognises (loaders.shards.AUDIO_EXTENSIONS;
# a test keeps the two equal): a file under any other name would reach training as
# "json without audio".
AUDIO_EXTENSIONS = ("flac", "wav", "ogg", "opus", "mp3", "oga", "aiff", "aif")
SHARD_NAME_DIGITS = 6
# Label fields whose values are counted in the index, by task.
LABEL_FIELDS = {"did": "dialect", "ser": "emotion"}
# Exit statuses of main (see the module docstring); 2 is also argparse's own for bad arguments.
EXIT_ALL_WRITTEN = 0
EXIT_NOTHING_WRITTEN = 1
EXIT_BAD_ARGUMENTS = 2
EXIT_SOME_REFUSED = 3
EXIT_WRITE_FAILED = 4


# --- writing tars and the index (shared with loaders.demo_data) -----------------------------

def add_tar_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    """Append one file with fixed metadata, so output bytes depend on content alone."""
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def add_sample(tar: tarfile.TarFile, key: str, meta: dict, audio: bytes, ext: str) -> None:
    """One sample: the JSON member first (a reader can route it before the audio arrives)."""
    text = json.dumps(meta, ensure_ascii=False, sort_keys=True)
    add_tar_member(tar, f"{key}.json", text.encode("utf-8"))
    add_tar_member(tar, f"{key}.{ext}", audio)


def write_shard(path: Path, samples: list[tuple[str, dict, bytes, str]]) -> None:
    """Write one tar of (key, meta, audio bytes, audio extension) samples."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, meta, audio, ext in samples:
            add_sample(tar, key, meta, audio, ext)


def shard_index_entry(records: list[tuple[dict, float]]) -> dict:
    """The shards.json entry for one shard from (meta, audio seconds) of its samples."""
    tasks: Counter = Counter()
    labels: dict[str, Counter] = {task: Counter() for task in LABEL_FIELDS}
    seconds = 0.0
    for meta, duration in records:
        for task in tasks_of_record(meta):
            tasks[task] += 1
            if task in LABEL_FIELDS:
                labels[task][str(meta[LABEL_FIELDS[task]]).strip()] += 1
        seconds += duration
    return {
        "samples": len(records),
        "tasks": {task: tasks[task] for task in TASKS if tasks[task]},
        "labels": {task: dict(sorted(counts.items())) for task, counts in labels.items() if counts},
        "audio_seconds": round(seconds, 3),
    }


def write_index(out_dir: Path, shards: dict[str, dict], extra: dict | None = None) -> dict:
    """Write shards.json (via a temporary file and a rename) and return its content."""
    index = {"format": INDEX_FORMAT, "shards": dict(sorted(shards.items()))}
    if extra:
        index.update(extra)
    tmp = out_dir / f".{INDEX_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(index, ensure_ascii=False, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / INDEX_FILE)
    return index


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:0{SHARD_NAME_DIGITS}d}.tar"


# --- validating manifest rows ---------------------------------------------------------------

class RowRefused(ValueError):
    """A manifest row that cannot become a sample; the message says why."""


@dataclass
class ValidSample:
    row: int
    key: str
    meta: dict
    audio: bytes
    ext: str
    seconds: float


# The value of --dialects / --emotions that turns the label check off.
ANY_LABEL = "any"


@dataclass
class LabelSets:
    """Allowed dialect / emotion labels; None accepts any label. Defaults: the recipe defaults,
    the sets training uses unless data.dialects / data.emotions say otherwise."""
    dialects: tuple[str, ...] | None = DEFAULT_DIALECTS
    emotions: tuple[str, ...] | None = DEFAULT_EMOTIONS


def derive_key(audio_path: Path, manifest_dir: Path) -> str:
    """A key from the audio path (relative to the manifest folder), made tar-safe."""
    try:
        relative = audio_path.resolve().relative_to(manifest_dir.resolve())
    except ValueError:
        relative = Path(audio_path.name)
    stem = str(relative.with_suffix("")).replace(os.sep, "_")
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", stem).lstrip("_-")
    return key[:120] or "sample"


def _check_labels(meta: dict, labels: LabelSets) -> None:
    for field_name, allowed, option in (
        ("dialect", labels.dialects, "--dialects"),
        ("emotion", labels.emotions, "--emotions"),
    ):
        value = meta.get(field_name)
        if allowed is not None and isinstance(value, str) and value.strip() and value.strip() not in allowed:
            raise RowRefused(f"{field_name} {value!r} is not in {option} ({', '.join(allowed)}); fix the row, or give "
                             f"{option} with your label set ({option} {ANY_LABEL} accepts every label)")


# Frames decoded per read while checking that a whole file decodes (bounded memory).
DECODE_CHECK_BLOCK_FRAMES = 1 << 20


def _read_audio_facts(path: Path) -> tuple[bytes, str, float]:
    """Bytes, extension and seconds of an audio file, or RowRefused saying what is wrong.

    The whole file is decoded once (in blocks), so a truncated or corrupt file is refused
    here rather than skipped mid-training."""
    if not path.is_file():
        raise RowRefused(f"audio file {path} does not exist")
    if path.stat().st_size == 0:
        raise RowRefused(f"audio file {path} is empty (0 bytes)")
    ext = path.suffix.lower().lstrip(".")
    if ext not in AUDIO_EXTENSIONS:
        raise RowRefused(f"audio file {path} is not named as one of {', '.join(AUDIO_EXTENSIONS)}; "
                         "re-encode it (e.g. to flac) or rename it if it is one of these formats")
    try:
        with soundfile.SoundFile(str(path)) as sound:
            expected, rate = sound.frames, sound.samplerate
            decoded = sum(len(block) for block in sound.blocks(blocksize=DECODE_CHECK_BLOCK_FRAMES, dtype="float32"))
    except Exception as error:  # libsndfile raises several types; all mean "unreadable"
        raise RowRefused(f"audio file {path} is not readable by soundfile: {error}") from None
    if decoded == 0:
        raise RowRefused(f"audio file {path} holds no audio frames")
    if decoded < expected:
        raise RowRefused(f"audio file {path} is truncated: its header says {expected} frames, {decoded} decode")
    return path.read_bytes(), ext, decoded / rate


def _check_targets(meta: dict) -> None:
    for task, field_name in TARGET_FIELDS.items():
        value = meta.get(field_name)
        if value is not None and not isinstance(value, str):
            raise RowRefused(f"{field_name} must be a string, got {type(value).__name__} {value!r}")
    try:
        tasks = tasks_of_record(meta)
    except UnknownTaskError as error:
        raise RowRefused(str(error)) from None
    if tasks:
        return
    if "task" in meta:
        named = meta["task"] if isinstance(meta["task"], list) else [meta["task"]]
        needs = ", ".join(f"task {t} needs a non-empty {TARGET_FIELDS[t]!r}" for t in named if t in TARGET_FIELDS)
        raise RowRefused(f"task {meta['task']!r} is given but its target is missing or empty ({needs})")
    empty = [name for name in TARGET_FIELDS.values() if isinstance(meta.get(name), str) and not meta[name].strip()]
    if empty:
        raise RowRefused(f"no target: {', '.join(repr(n) for n in empty)} empty; give at least one non-empty "
                         "text, summary, dialect or emotion")
    raise RowRefused("no target: give at least one of text, summary, dialect, emotion")


def validate_row(row_number: int, line: str, manifest_dir: Path, labels: LabelSets) -> ValidSample:
    """Turn one manifest line into a sample, or raise RowRefused with the reason."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise RowRefused(f"not valid JSON: {error}") from None
    if not isinstance(row, dict):
        raise RowRefused("a row must be a JSON object")
    audio_field = row.get("audio")
    if audio_field is None or audio_field == "":
        raise RowRefused(f"{'missing' if audio_field is None else 'empty'} 'audio' (path of the audio file)")
    if not isinstance(audio_field, str):
        raise RowRefused(f"'audio' is {json.dumps(audio_field)} ({type(audio_field).__name__}), not a path; give the "
                         "audio file's path as a string, e.g. \"audio\": \"clips/0001.wav\"")
    audio_path = Path(audio_field)
    if not audio_path.is_absolute():
        audio_path = manifest_dir / audio_path
    meta = {name: value for name, value in row.items() if name not in ("audio", "key")}
    _check_targets(meta)
    _check_labels(meta, labels)
    duration = meta.get("duration")
    if duration is not None and (not isinstance(duration, (int, float)) or not math.isfinite(duration) or duration < 0):
        raise RowRefused(f"duration {duration!r} is not a non-negative number of seconds")
    try:
        json.dumps(meta, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise RowRefused(f"fields cannot be written as JSON: {error}") from None
    key = row.get("key")
    if key is None:
        key = derive_key(audio_path, manifest_dir)
    elif not isinstance(key, str) or not KEY_PATTERN.match(key):
        raise RowRefused(
            f"key {key!r} is not tar-safe: use 1-120 letters, digits, '_' or '-', no dots or slashes"
        )
    audio, ext, seconds = _read_audio_facts(audio_path)
    if "duration" not in meta:
        meta["duration"] = round(seconds, 3)
    return ValidSample(row_number, key, meta, audio, ext, seconds)


# --- packing samples into shards ------------------------------------------------------------

# Tar overhead of one sample: a 512-byte header for each of two members, the JSON, and padding.
SAMPLE_OVERHEAD_BYTES = 2048


class ShardSink:
    """Writes samples into <prefix>-NNNNNN.tar shards as they come, starting a new shard when
    the current one is full, so only one sample's audio is in memory at a time."""

    def __init__(self, out_dir: Path, prefix: str, max_count: int, max_bytes: int, log=print):
        self.out_dir, self.prefix, self.max_count, self.max_bytes, self.log = out_dir, prefix, max_count, max_bytes, log
        self.written: dict[str, dict] = {}
        self._tar: tarfile.TarFile | None = None
        self._records: list[tuple[dict, float]] = []
        self._bytes = 0

    def add(self, sample: ValidSample) -> None:
        size = len(sample.audio) + SAMPLE_OVERHEAD_BYTES
        if self._tar is not None and (len(self._records) >= self.max_count or self._bytes + size > self.max_bytes):
            self._finish_shard()
        if self._tar is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._name = shard_name(self.prefix, len(self.written))
            self._tar = tarfile.open(self.out_dir / self._name, "w", format=tarfile.USTAR_FORMAT)
        add_sample(self._tar, sample.key, sample.meta, sample.audio, sample.ext)
        self._records.append((sample.meta, sample.seconds))
        self._bytes += size

    def close(self) -> dict[str, dict]:
        if self._tar is not None:
            self._finish_shard()
        return self.written

    def _finish_shard(self) -> None:
        self._tar.close()
        entry = shard_index_entry(self._records)
        self.written[self._name] = entry
        self.log(f"wrote {self.out_dir / self._name}: {entry['samples']} samples, {entry['audio_seconds']:.1f} s of audio")
        self._tar, self._records, self._bytes = None, [], 0


@dataclass
class ShardsReport:
    """What one make_shards run did: shards it wrote (name -> index entry), rows it refused."""
    written: dict[str, dict]
    refused: list[tuple[int, str]]
    index: dict

    @property
    def samples_written(self) -> int:
        return sum(entry["samples"] for entry in self.written.values())


def collect_samples(manifest: Path, sink: ShardSink, labels: LabelSets) -> list[tuple[int, str]]:
    """Validate every manifest row into sink; return the refused rows (row number, reason)."""
    manifest_dir = manifest.resolve().parent
    refused: list[tuple[int, str]] = []
    seen_keys: dict[str, int] = {}
    with open(manifest, encoding="utf-8") as lines:
        for row_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                sample = validate_row(row_number, line, manifest_dir, labels)
                if sample.key in seen_keys:
                    raise RowRefused(
                        f"key {sample.key!r} already used by row {seen_keys[sample.key]}; give each row a unique 'key'"
                    )
            except RowRefused as reason:
                refused.append((row_number, str(reason)))
                continue
            seen_keys[sample.key] = row_number
            sink.add(sample)
    return refused


def make_shards(manifest: Path, out_dir: Path, max_count: int = 1000, max_size_mb: float = 512.0,
                prefix: str = "train", labels: LabelSets | None = None, log=print) -> ShardsReport:
    """Validate the manifest, write <prefix>-NNNNNN.tar shards and update shards.json.

    Index entries of other prefixes already in OUT_DIR/shards.json are kept (so train and
    val can be written by two runs); entries of this prefix are replaced by this run's.
    """
    out_dir = Path(out_dir)
    sink = ShardSink(out_dir, prefix, max_count, int(max_size_mb * 1024 * 1024), log)
    try:
        refused = collect_samples(Path(manifest), sink, labels or LabelSets())
    finally:
        written = sink.close()
    if not written:
        return ShardsReport({}, refused, {})
    kept = {}
    for name, entry in _read_existing_index(out_dir).items():
        if not name.startswith(prefix + "-"):
            kept[name] = entry
        elif name not in written:
            log(f"warning: {out_dir / name} is left from an earlier run and is no longer in {INDEX_FILE}; delete it")
    index = write_index(out_dir, {**kept, **written})
    return ShardsReport(written, refused, index)


def _read_existing_index(out_dir: Path) -> dict:
    """Entries already in OUT_DIR/shards.json that still exist on disk."""
    path = out_dir / INDEX_FILE
    if not path.is_file():
        return {}
    try:
        shards = json.loads(path.read_text(encoding="utf-8")).get("shards", {})
    except (json.JSONDecodeError, AttributeError):
        return {}
    return {name: entry for name, entry in shards.items() if (out_dir / name).is_file()}


def out_dir_problem(out_dir: Path, prefix: str) -> str | None:
    """Why OUT_DIR cannot receive shards (said before any row is read), or None. It need not
    exist yet (it is created with the first shard), but the nearest existing folder on its
    path must be a writable folder, and nothing in it may be a folder where a shard or
    shards.json is to be written."""
    problem = output_folder_problem(out_dir)
    if problem:
        return f"{problem}; give a folder for the shards (it is created if missing)"
    if out_dir.is_dir():
        blocked = [p.name for p in [out_dir / INDEX_FILE, *out_dir.glob(f"{prefix}-*.tar")] if p.is_dir()]
        if blocked:
            return (f"{out_dir} holds folder(s) named like its outputs ({', '.join(sorted(blocked))}); "
                    "move them away or give another folder")
    return None


def _label_list(text: str | None, default: tuple[str, ...]) -> tuple[str, ...] | None:
    """--dialects / --emotions: absent -> the recipe default; "any" -> None (no check)."""
    if text is None:
        return default
    if text.strip().lower() == ANY_LABEL:
        return None
    return tuple(label.strip() for label in text.split(",") if label.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loaders.make_shards", description=__doc__.split("\n\n")[0],
                                     epilog=EXIT_STATUS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path, help="JSONL manifest: one row per recording")
    parser.add_argument("out_dir", type=Path, help="folder for the tar shards and shards.json")
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard at most")
    parser.add_argument("--max-size", type=float, default=512.0, help="MB per shard at most")
    parser.add_argument("--prefix", default="train", help="shard name prefix (train, val, ...)")
    parser.add_argument("--dialects", help=f"allowed dialect labels, comma-separated; rows with others are refused "
                                           f"(default: the recipe default {','.join(DEFAULT_DIALECTS)}; "
                                           f"'{ANY_LABEL}': accept every label)")
    parser.add_argument("--emotions", help=f"allowed emotion labels, comma-separated; rows with others are refused "
                                           f"(default: the recipe default {','.join(DEFAULT_EMOTIONS)}; "
                                           f"'{ANY_LABEL}': accept every label)")
    parser.add_argument("--allow-refused", action="store_true",
                        help=f"exit {EXIT_ALL_WRITTEN}, not {EXIT_SOME_REFUSED}, when some rows are refused and the "
                             "others written (a partial build is accepted)")
    args = parser.parse_args(argv)
    if args.max_count < 1 or args.max_size <= 0:
        parser.error("--max-count must be at least 1 and --max-size above 0")
    if not re.match(r"^[A-Za-z0-9_\-]+$", args.prefix):
        parser.error(f"--prefix {args.prefix!r} may hold only letters, digits, '_' and '-'")
    if not args.manifest.is_file():
        what = ("is a folder; give the manifest file (a .jsonl file, one JSON row per recording)"
                if args.manifest.is_dir() else "does not exist")
        print(f"error: manifest {args.manifest} {what}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    labels = LabelSets(_label_list(args.dialects, DEFAULT_DIALECTS), _label_list(args.emotions, DEFAULT_EMOTIONS))
    for option, value in (("--dialects", labels.dialects), ("--emotions", labels.emotions)):
        if value is not None and not value:
            parser.error(f"{option} names no labels; give comma-separated labels or '{ANY_LABEL}'")
    problem = out_dir_problem(args.out_dir, args.prefix)
    if problem:
        print(f"error: OUT_DIR: {problem}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    try:
        report = make_shards(args.manifest, args.out_dir, args.max_count, args.max_size, args.prefix, labels)
    except OSError as exc:
        print(f"error: writing shards into {args.out_dir} failed: {exc.strerror or exc} "
              f"({exc.filename or args.out_dir}); shards.json was not updated and any shard this run wrote is "
              "incomplete: fix the folder (or free space) and run again", file=sys.stderr)
        return EXIT_WRITE_FAILED
    for row_number, reason in report.refused:
        print(f"refused row {row_number}: {reason}")
    print(f"{report.samples_written} samples written in {len(report.written)} shards, {len(report.refused)} rows refused")
    return exit_status(report, args.manifest, args.allow_refused)


EXIT_STATUS_HELP = f"""exit status:
  {EXIT_ALL_WRITTEN}  every row written (or some refused, with --allow-refused)
  {EXIT_NOTHING_WRITTEN}  nothing written: every row was refused, or the manifest holds none
  {EXIT_BAD_ARGUMENTS}  bad arguments: the manifest does not exist, or OUT_DIR cannot be a folder of shards
     (it is a file, lies under a file, or cannot be written)
  {EXIT_SOME_REFUSED}  some rows refused, the others written (a partial build)
  {EXIT_WRITE_FAILED}  writing failed part-way (disk full, say): the shards of this run are incomplete"""


def exit_status(report: ShardsReport, manifest: Path, allow_refused: bool) -> int:
    """The exit status of a finished run (EXIT_STATUS_HELP), with its error line on stderr."""
    if not report.samples_written:
        why = "every row was refused (reasons above)" if report.refused else "the manifest holds no rows"
        print(f"error: nothing written from {manifest}: {why}", file=sys.stderr)
        return EXIT_NOTHING_WRITTEN
    if report.refused and not allow_refused:
        print(f"error: partial build: {len(report.refused)} rows of {manifest} refused (reasons above), the other "
              f"{report.samples_written} written; fix those rows and run again, or pass --allow-refused to accept "
              f"the shards without them (exit {EXIT_ALL_WRITTEN})", file=sys.stderr)
        return EXIT_SOME_REFUSED
    return EXIT_ALL_WRITTEN


if __name__ == "__main__":
    sys.exit(main())
