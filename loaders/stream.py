"""Shards -> per-task streams of prepared examples -> a mixer. The reader layer of the loader.

Stages (one chain per rank x DataLoader worker, called a *slot*):

    shard URLs (braces expanded, checked at start)
      -> per epoch: seeded shard reshuffle, then this slot's share ``order[slot::num_slots]``
      -> tar samples (``<key>.json`` + ``<key>.<audio ext>``)
      -> StreamReader per (source, task, label): decides from the JSON alone, before any
         audio is decoded, whether a sample belongs to it; block shuffle
      -> prepare_example: decode (soundfile, mono, soxr 16 kHz), log-mel, prompt + labels
      -> ExampleSource.pull(task, label=None, source=None)
      -> Sampler.next_examples(source, n_tokens_budget)

Each stream reads the shards on its own, so a task that is never pulled is never read:
nothing piles up in memory and nothing is lost. The cost is that a recording with several
targets is read (not decoded) once per task.

Sampler protocol (what a scheduler plugs in, e.g. ADS: per-(task, label) quotas, then a
diverse subset of a candidate pool)::

    class Sampler(Protocol):
        def next_examples(self, source: ExampleSource, n_tokens_budget: int) -> list[Example]
        def set_tasks(self, active_tasks, task_weights=None) -> None
        def state_dict(self) -> dict          # JSON-serializable
        def load_state_dict(self, state: dict) -> None

``source.pull(task, label=None, source=None)`` returns the next prepared Example of that
stream (bad samples skipped and counted on the way); ``label`` selects a per-(task, label)
stream of did/ser. ``source.data_counts`` holds the examples per source, task and label
(``{source: {"tasks": {task: n}, "labels": {task: {label: n}}}}``, from shards.json or a
JSON-only scan). A sampler that keeps candidates between calls (a pool) stores them in its
state as (stream, key) records and, on load, re-reads them: it sets ``max_rewind`` (how many
examples per stream it may step back) and calls ``source.rewind(task, label, n)``; the next
``n`` pulls of that stream return the same examples again, uncounted. Pooled examples count
as pending in the pipeline's counts only once returned; a sampler reports its own pool size.
``ProportionalSampler`` is natural mixing: tasks drawn in proportion to their data.

Shuffling is by blocks: a stream fills ``shuffle_buffer`` examples, permutes them with an
RNG seeded by (seed, stream, block number) and hands them out. The state of a stream is its
read position at the block start plus how many of the block were handed out, so a resume
re-reads at most one block and the sample sequence is exactly the uninterrupted one.

Errors: each bad sample is skipped with a warning naming shard and key and counted by
reason (``SKIP_REASONS``), or raised as DataError with on_error="raise". A record-level
error (no JSON, bad JSON, no target, unknown task, corrupt tar) met by several task streams
of a slot is counted once per epoch; a stream started later (a new curriculum stage) counts
what it reads itself. Counts add up: read = emitted + skipped + buffered (examples waiting in
shuffle blocks).
"""
from __future__ import annotations

import collections
import json
import logging
import os
import random
import tarfile
import zlib
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np

from loaders.audio import TARGET_SAMPLE_RATE, AudioError, decode_audio, probe_duration
from loaders.features import log_mel, num_frames
from loaders.prompts import audio_token_count, build_prompt_ids, instruction_language, instruction_text, target_token_count
from loaders.tasks import TARGET_FIELDS, TASKS, UnknownTaskError, tasks_of_record

log = logging.getLogger("loaders")

SKIP_REASONS = (
    "corrupt_tar", "audio_without_json", "json_without_audio", "malformed_json", "no_target",
    "unknown_task", "label_outside_set", "undecodable_audio", "empty_audio", "audio_too_long",
    "text_too_long", "too_long_for_batch",
)
LABELLED_TASKS = {"did": "dialects", "ser": "emotions"}


# --- shards ---------------------------------------------------------------------------------
AUDIO_EXTENSIONS = ("flac", "wav", "ogg", "opus", "mp3", "oga", "aiff", "aif")
TAR_BLOCK = 512
INDEX_FILE = "shards.json"


class ShardError(ValueError):
    """A shard list that cannot be trained on (missing files, too few shards for the slots)."""


def expand_urls(spec) -> list[str]:
    """Brace notation (``a-{000..007}.tar``, ``{a,b}``) and whitespace-separated URLs -> list."""
    import braceexpand

    specs = [spec] if isinstance(spec, str) else list(spec)
    urls = []
    for entry in specs:
        for word in str(entry).split():
            urls.extend(braceexpand.braceexpand(word))
    return urls


def expand_sources(spec) -> list[list[str]]:
    """One URL list per source. A string or a flat list of URLs is one source; a list of lists
    (or of lists and strings) is several sources, one per entry."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not any(isinstance(entry, (list, tuple)) for entry in specs):
        return [expand_urls(specs)]
    return [expand_urls(entry) for entry in specs]


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def check_shards_exist(urls: list[str], config_key: str) -> None:
    """Fail before training if a local shard is missing, naming them and the config key."""
    if not urls:
        raise ShardError(f"{config_key} names no shards; give shard URLs, e.g. data/x/train-{{000000..000007}}.tar")
    missing = [u for u in urls if (_is_local(u) or u.startswith("file://")) and not os.path.isfile(local_path(u))]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ShardError(f"{config_key}: {len(missing)} of {len(urls)} shard(s) do not exist: {shown}. "
                         "Check the path and brace range, or build shards with python -m loaders.make_shards")


def check_enough_shards(urls: list[str], num_slots: int, world_size: int, num_workers: int, config_key: str) -> None:
    if len(urls) < num_slots:
        raise ShardError(
            f"{config_key} has {len(urls)} shard(s) but {world_size} rank(s) x {max(1, num_workers)} worker(s) "
            f"need at least {num_slots} so every sample is read exactly once per epoch; write more, smaller shards "
            "(make_shards --max-count) or lower data.num_workers")


def shard_order(urls: list[str], seed: int, epoch: int) -> list[str]:
    """The epoch's shard order: a seeded permutation, the same on every rank and worker."""
    order = list(urls)
    random.Random(zlib.crc32(f"shards/{seed}/{epoch}".encode())).shuffle(order)
    return order


@dataclass
class RawSample:
    shard: str
    key: str
    index: int  # position of the sample in its shard
    meta: dict | None = None
    audio: bytes | None = None
    error: tuple[str, str] | None = None  # (reason, message)

    @property
    def where(self) -> str:
        return f"shard {self.shard}, sample {self.key!r}"


def _open_stream(url: str):
    if _is_local(url) or url.startswith("file://"):
        stream = open(local_path(url), "rb")
    else:
        import webdataset

        stream = webdataset.gopen(url, "rb")
    if url.endswith((".tar.gz", ".tgz")):
        import gzip

        return gzip.GzipFile(fileobj=stream, mode="rb")
    return stream


def _read_exact(stream, n: int) -> bytes:
    chunks, left = [], n
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _pax_path(data: bytes) -> str | None:
    for record in data.decode("utf-8", "replace").splitlines():
        _, _, keyvalue = record.partition(" ")
        if keyvalue.startswith("path="):
            return keyvalue[len("path="):]
    return None


def iter_tar_members(stream, url: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular member. Raises ShardError on a corrupt or truncated tar."""
    offset, long_name = 0, None
    while True:
        header = _read_exact(stream, TAR_BLOCK)
        if not header or header == b"\0" * TAR_BLOCK:
            return
        if len(header) < TAR_BLOCK:
            raise ShardError(f"truncated tar header at byte {offset}")
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise ShardError(f"corrupt tar header at byte {offset} ({exc})") from None
        padded = -(-info.size // TAR_BLOCK) * TAR_BLOCK
        data = _read_exact(stream, padded)
        if len(data) < info.size:
            raise ShardError(f"member {info.name!r} is truncated ({len(data)} of {info.size} bytes)")
        data, offset = data[: info.size], offset + TAR_BLOCK + padded
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE):
            long_name = _pax_path(data) or long_name
            continue
        name, long_name = long_name or info.name, None
        if info.isreg():
            yield name, data


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _make_sample(url: str, key: str, index: int, files: dict[str, bytes]) -> RawSample:
    sample = RawSample(url, key, index)
    audio_ext = next((e for e in files if e.rpartition(".")[2] in AUDIO_EXTENSIONS), None)
    if "json" not in files:
        reason = "audio_without_json" if audio_ext else "malformed_json"
        sample.error = (reason, f"{sample.where}: no {key}.json beside {sorted(files)}; every sample needs one")
        return sample
    try:
        sample.meta = json.loads(files["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        sample.error = ("malformed_json", f"{sample.where}: {key}.json is not valid UTF-8 JSON ({exc})")
        return sample
    if not isinstance(sample.meta, dict):
        sample.error = ("malformed_json", f"{sample.where}: {key}.json must hold an object, not "
                        f"{type(sample.meta).__name__}")
    elif audio_ext is None:
        sample.error = ("json_without_audio", f"{sample.where}: no audio file ({'/'.join(AUDIO_EXTENSIONS)}) "
                        f"beside {key}.json")
    else:
        sample.audio = files[audio_ext]
    return sample


def iter_tar_samples(url: str, skip: int = 0) -> Iterator[RawSample]:
    """Samples of one shard (members grouped by key, in order), from sample ``skip`` on.

    A corrupt tar ends the shard with one RawSample whose error is "corrupt_tar": the rest of
    the shard cannot be located in a stream.
    """
    index, key, files = 0, None, {}
    with _open_stream(url) as stream:
        try:  # OSError/EOFError: a damaged gzip layer
            for name, data in iter_tar_members(stream, url):
                member_key, ext = _split_name(name)
                if key is not None and member_key != key:
                    if index >= skip:
                        yield _make_sample(url, key, index, files)
                    index, files = index + 1, {}
                key = member_key
                files[ext] = data
        except (ShardError, OSError, EOFError) as exc:
            if key is not None:  # the members read before the damage are whole
                if index >= skip:
                    yield _make_sample(url, key, index, files)
                index += 1
            if index >= skip:
                last = f" after sample {key!r}" if key else ""
                yield RawSample(url, key or "?", index, error=("corrupt_tar", f"shard {url}: {exc}{last}; the rest "
                                                                              "of this shard is skipped; rewrite it"))
            return
        if key is not None and index >= skip:
            yield _make_sample(url, key, index, files)


def count_examples(urls: list[str]) -> dict:
    """{"tasks": {task: n}, "labels": {task: {label: n}}} from shards.json, else a JSON-only scan."""
    tasks, labels = {t: 0 for t in TASKS}, {t: {} for t in LABELLED_TASKS}
    indexes: dict[str, dict] = {}
    scanned = 0
    for url in urls:
        folder = os.path.dirname(local_path(url)) if _is_local(url) or url.startswith("file://") else None
        if folder is not None and folder not in indexes:
            path = os.path.join(folder, INDEX_FILE)
            indexes[folder] = json.load(open(path)).get("shards", {}) if os.path.isfile(path) else {}
        entry = indexes.get(folder, {}).get(os.path.basename(local_path(url))) if folder is not None else None
        if entry is None:
            if scanned == 0:
                log.warning("no %s entry for shard %s (and maybe others): counting examples from the shards' JSON "
                            "(write %s with python -m loaders.make_shards to skip this scan)", INDEX_FILE, url, INDEX_FILE)
            scanned += 1
            entry = _scan_shard(url)
        for task, n in entry.get("tasks", {}).items():
            tasks[task] = tasks.get(task, 0) + n
        for task, per_label in entry.get("labels", {}).items():
            for label, n in per_label.items():
                labels.setdefault(task, {})[label] = labels.setdefault(task, {}).get(label, 0) + n
    return {"tasks": tasks, "labels": labels}


def _scan_shard(url: str) -> dict:
    """Counts of one shard read from its JSON only (no audio decoded)."""
    tasks, labels = {}, {t: {} for t in LABELLED_TASKS}
    for sample in iter_tar_samples(url):
        if sample.error is not None:
            continue
        try:
            record_tasks = tasks_of_record(sample.meta)
        except UnknownTaskError:
            continue
        for task in record_tasks:
            tasks[task] = tasks.get(task, 0) + 1
            if task in LABELLED_TASKS:
                value = str(sample.meta[TARGET_FIELDS[task]]).strip()
                labels[task][value] = labels[task].get(value, 0) + 1
    return {"tasks": tasks, "labels": labels}


class DataError(ValueError):
    """A bad sample, raised when data.on_error=raise (or data.strict for labels)."""


@dataclass
class Example:
    key: str
    shard: str
    task: str
    label: str | None
    epoch: int
    input_ids: np.ndarray  # [T] int64
    labels: np.ndarray  # [T] int64, -100 outside the assistant response
    features: np.ndarray  # [128, F] float32
    audio_seconds: float
    origin: tuple = ()  # (worker, ordinal) set by the producer; used for exact resume

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


class ErrorCounter:
    """Counts skips by reason, warns once per counted skip, de-duplicates record-level errors."""

    def __init__(self, on_error: str):
        self.on_error = on_error
        self.skipped: dict[str, int] = {}
        self.seen: set[tuple] = set()
        self.silent = False  # True while a resume or rewind replays already-counted reads

    def report(self, reason: str, message: str, dedupe: tuple | None = None, *, force_raise: bool = False) -> bool:
        """Count one skip. Returns False if it was already counted (same record, same epoch)."""
        if self.silent:  # a replay of reads that were counted (or raised) the first time
            return False
        if self.on_error == "raise" or force_raise:
            raise DataError(message)
        if dedupe is not None:
            if dedupe in self.seen:
                return False
            self.seen.add(dedupe)
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        log.warning("skipped (%s): %s", reason, message)
        return True

    def prune(self, min_epoch: int) -> None:
        self.seen = {entry for entry in self.seen if entry[0] >= min_epoch}


def stream_name(source: int, task: str, label: str | None) -> str:
    return f"{source}/{task}/{label or '*'}"


class StreamReader:
    """One (source, task, label) stream of raw samples for one slot, endless, block-shuffled."""

    def __init__(self, name, urls, task, label, closed_labels, *, slot, num_slots, seed, block_size, errors, strict):
        self.name, self.urls, self.task, self.label = name, urls, task, label
        self.closed_labels = closed_labels
        self.slot, self.num_slots, self.seed = slot, num_slots, seed
        self.block_size = max(1, block_size)
        self.errors, self.strict = errors, strict
        self.epoch, self.shard_pos, self.sample_index = 0, 0, 0
        self.block_number, self.block_start = 0, (0, 0, 0)
        self.block: list[tuple[RawSample, int]] = []
        self.block_emitted = 0
        self.read = 0
        # Rewind support: block items handed out so far, the highest such count and block
        # number reached (below them a re-read is a replay, not counted again), and where
        # recent blocks started.
        self.taken, self.high_taken, self.high_block = 0, 0, -1
        self.block_history: collections.deque = collections.deque()
        self._samples: Iterator[RawSample] | None = None

    # --- raw position -------------------------------------------------------------------
    def _slot_shards(self, epoch: int) -> list[str]:
        return shard_order(self.urls, self.seed, epoch)[self.slot :: self.num_slots]

    def _next_raw(self) -> tuple[RawSample, int] | None:
        """The next raw sample and its epoch; None once at each epoch end."""
        while True:
            if self._samples is None:
                shards = self._slot_shards(self.epoch)
                if self.shard_pos >= len(shards):
                    self.epoch, self.shard_pos, self.sample_index = self.epoch + 1, 0, 0
                    return None
                self._samples = iter_tar_samples(shards[self.shard_pos], skip=self.sample_index)
            sample = next(self._samples, None)
            if sample is None:
                self._samples = None
                self.shard_pos, self.sample_index = self.shard_pos + 1, 0
                continue
            self.sample_index += 1
            return sample, self.epoch

    def _accepts(self, sample: RawSample, epoch: int) -> bool:
        """Decide from the JSON alone; count record-level errors once per record and epoch."""
        record_id = (epoch, sample.shard, sample.index)
        if sample.error is not None:
            self.read += self.errors.report(sample.error[0], sample.error[1], record_id)
            return False
        try:
            tasks = tasks_of_record(sample.meta)
        except UnknownTaskError as exc:
            self.read += self.errors.report("unknown_task", f"{sample.where}: {exc}", record_id)
            return False
        if not tasks:
            fields = ", ".join(TARGET_FIELDS.values())
            self.read += self.errors.report("no_target", f"{sample.where}: the JSON has none of {fields}", record_id)
            return False
        if self.task not in tasks:
            return False
        if self.task in LABELLED_TASKS:
            value = str(sample.meta[TARGET_FIELDS[self.task]]).strip()
            if value not in self.closed_labels:
                message = (f"{sample.where}: {self.task} label {value!r} is not in data.{LABELLED_TASKS[self.task]}="
                           f"{list(self.closed_labels)}; add it there or fix the sample")
                self.read += self.errors.report("label_outside_set", message, record_id + (self.task,),
                                                force_raise=self.strict)
                return False
            if self.label is not None and value != self.label:
                return False
        return True

    # --- blocks ---------------------------------------------------------------------------
    def _fill_block(self) -> None:
        replay = self.block_number <= self.high_block
        read_before, silent_before = self.read, self.errors.silent
        self.errors.silent = silent_before or replay
        try:
            self._fill_block_items()
        finally:
            self.errors.silent = silent_before
        if replay:
            self.read = read_before
        else:
            self.high_block = self.block_number
            self.block_history.append([self.taken, list(self.block_start), self.block_number, len(self.block)])

    def _fill_block_items(self) -> None:
        self.block_start = (self.epoch, self.shard_pos, self.sample_index)
        self.block, self.block_emitted = [], 0
        empty_epochs = 0
        while len(self.block) < self.block_size:
            raw = self._next_raw()
            if raw is None:  # blocks end with the epoch, so epochs never interleave
                if self.block:
                    break
                empty_epochs += 1
                if empty_epochs > 1:
                    raise ShardError(f"stream {self.name}: a whole epoch of this slot's shards "
                                     f"{self._slot_shards(self.epoch)} holds no usable {self.task} example"
                                     f"{' labelled ' + self.label if self.label else ''}; drop the task from the "
                                     "mix or give it data")
                continue
            sample, epoch = raw
            if self._accepts(sample, epoch):
                self.block.append((sample, epoch))
                self.read += 1
        rng = random.Random(zlib.crc32(f"{self.seed}/{self.slot}/{self.name}/{self.block_number}".encode()))
        rng.shuffle(self.block)

    def next(self) -> tuple[RawSample, int]:
        if self.block_emitted >= len(self.block):
            if self.block:
                self.block_number += 1
            self._fill_block()
        item = self.block[self.block_emitted]
        self.block_emitted += 1
        self.taken += 1
        return item

    @property
    def replaying(self) -> bool:
        """True while re-reading items handed out before a rewind (not to be counted again)."""
        return self.taken <= self.high_taken

    def mark_taken(self) -> None:
        self.high_taken = max(self.high_taken, self.taken)

    def trim_history(self, oldest_needed: int) -> None:
        while len(self.block_history) > 1 and self.block_history[1][0] <= oldest_needed:
            self.block_history.popleft()

    def rewind_to(self, taken: int) -> None:
        """Step back so the next item handed out is item number ``taken`` of this stream."""
        entry = next((h for h in reversed(self.block_history) if h[0] <= taken), None)
        if entry is None:
            raise ValueError(f"stream {self.name}: cannot step back to item {taken}; the oldest remembered block "
                             f"starts at item {self.block_history[0][0] if self.block_history else self.taken}")
        start_taken, block_start, block_number, _ = entry
        self.epoch, self.shard_pos, self.sample_index = block_start
        self.block_number, self._samples = block_number, None
        self._fill_block()  # a replay: block_number <= high_block
        self.block_emitted, self.taken = taken - start_taken, taken

    @property
    def buffered(self) -> int:
        return len(self.block) - self.block_emitted

    def state_dict(self) -> dict:
        return {"block_start": list(self.block_start), "block_number": self.block_number,
                "block_emitted": self.block_emitted, "has_block": bool(self.block), "read": self.read,
                "taken": self.taken, "high_taken": self.high_taken, "high_block": self.high_block,
                "block_history": [list(h) for h in self.block_history]}

    def load_state_dict(self, state: dict) -> None:
        self.block_number, self.read = state["block_number"], state["read"]
        self.taken, self.high_taken, self.high_block = state["taken"], state["high_taken"], state["high_block"]
        self.block_history = collections.deque(list(h) for h in state["block_history"])
        self.epoch, self.shard_pos, self.sample_index = state["block_start"]
        self._samples, self.block = None, []
        if state["has_block"]:
            self._fill_block()  # a replay (block_number <= high_block): counted before the checkpoint
            self.block_emitted = state["block_emitted"]


class ExampleSource:
    """Per-(source, task, label) streams of prepared examples for one slot, created on first pull."""

    def __init__(self, sources: list[list[str]], cfg, tokenizer, data_counts: dict, *, slot: int, num_slots: int,
                 seed: int, max_rewind: int = 0):
        self.sources, self.cfg, self.tokenizer = sources, cfg, tokenizer
        self.max_rewind = max_rewind  # how many examples per stream rewind() may step back
        self.pull_history: dict[str, collections.deque] = {}  # reader.taken before each recent pull
        self.data_counts = data_counts  # {source: {"tasks": {task: n}, "labels": {task: {label: n}}}}
        self.slot, self.num_slots, self.seed = slot, num_slots, seed
        self.errors = ErrorCounter(cfg.on_error)
        self.readers: dict[str, StreamReader] = {}
        self.emitted = 0
        self.rng = np.random.default_rng([seed, slot, 7])

    def _reader(self, source: int, task: str, label: str | None) -> StreamReader:
        name = stream_name(source, task, label)
        if name not in self.readers:
            closed = tuple(getattr(self.cfg, LABELLED_TASKS[task])) if task in LABELLED_TASKS else ()
            self.readers[name] = StreamReader(
                name, self.sources[source], task, label, closed, slot=self.slot, num_slots=self.num_slots,
                seed=self.seed, block_size=self.cfg.shuffle_buffer, errors=self.errors, strict=self.cfg.strict)
        return self.readers[name]

    def _choose_source(self, task: str) -> int:
        if len(self.sources) == 1:
            return 0
        weights = [source_weight(self.cfg, s) * self.data_counts[s]["tasks"].get(task, 0)
                   for s in range(len(self.sources))]
        if sum(weights) <= 0:
            raise ValueError(f"no source holds examples of task {task!r}")
        return int(self.rng.choice(len(weights), p=np.asarray(weights) / sum(weights)))

    def pull(self, task: str, label: str | None = None, source: int | None = None) -> Example:
        """The next good example of this stream; bad samples are skipped and counted on the way."""
        source = self._choose_source(task) if source is None else source
        reader = self._reader(source, task, label)
        taken_before = reader.taken
        while True:
            sample, epoch = reader.next()
            replaying = reader.replaying
            reader.mark_taken()
            try:
                example = prepare_example(sample, task, epoch, self.cfg, self.tokenizer)
            except (AudioError, SampleTooLong) as exc:
                if not replaying:
                    self.errors.report(exc.reason, str(exc))
                continue
            if not replaying:
                self.emitted += 1
            if self.max_rewind:
                self._remember_pull(reader, taken_before)
            else:
                reader.trim_history(reader.taken)
            return example

    def _remember_pull(self, reader: StreamReader, taken_before: int) -> None:
        history = self.pull_history.setdefault(reader.name, collections.deque())
        history.append(taken_before)
        while len(history) > self.max_rewind:
            history.popleft()
        reader.trim_history(history[0])

    def rewind(self, task: str, label: str | None = None, n: int = 1, source: int = 0) -> None:
        """Step a stream back by ``n`` pulled examples: the next ``n`` pulls return them again, in
        the same order, without counting them again (for samplers that keep a candidate pool
        and must re-read it on resume). At most ``max_rewind`` examples back."""
        name = stream_name(source, task, label)
        history = self.pull_history.get(name, collections.deque())
        if n <= 0:
            return
        if n > len(history):
            raise ValueError(f"stream {name}: cannot step back {n} examples; this source remembers the last "
                             f"{len(history)} (max_rewind={self.max_rewind})")
        target = history[-n]
        for _ in range(n):
            history.pop()
        self.readers[name].rewind_to(target)

    def counts(self) -> dict:
        epochs = [r.epoch for r in self.readers.values()]
        return {"read": sum(r.read for r in self.readers.values()), "emitted": self.emitted,
                "skipped": dict(self.errors.skipped), "buffered": sum(r.buffered for r in self.readers.values()),
                "epoch": max(epochs, default=0)}

    def state_dict(self) -> dict:
        # Records before the slowest reader's epoch cannot be met again: forget them.
        self.errors.prune(min((r.epoch for r in self.readers.values()), default=0))
        return {"readers": {name: r.state_dict() for name, r in self.readers.items()}, "emitted": self.emitted,
                "pull_history": {name: list(h) for name, h in self.pull_history.items()},
                "skipped": dict(self.errors.skipped), "seen": sorted(list(e) for e in self.errors.seen),
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.emitted = state["emitted"]
        self.pull_history = {name: collections.deque(h) for name, h in state["pull_history"].items()}
        self.errors.skipped = dict(state["skipped"])
        self.errors.seen = {tuple(e) for e in state["seen"]}
        self.rng.bit_generator.state = state["rng"]
        self.readers = {}
        for name, reader_state in state["readers"].items():
            source, task, label = name.split("/")
            self._reader(int(source), task, None if label == "*" else label).load_state_dict(reader_state)
        min_epoch = min((r.epoch for r in self.readers.values()), default=0)
        self.errors.prune(min_epoch)


def source_weight(cfg, source: int) -> float:
    return float(cfg.weights[source]) if cfg.weights else 1.0


# --- preparing one example ------------------------------------------------------------------
class SampleTooLong(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def prepare_example(sample: RawSample, task: str, epoch: int, cfg, tokenizer) -> Example:
    """Decode, featurize and prompt one (sample, task). Raises AudioError / SampleTooLong."""
    target = str(sample.meta[TARGET_FIELDS[task]]).strip()
    n_target = target_token_count(tokenizer, target)
    if n_target > cfg.max_text_tokens:
        raise SampleTooLong("text_too_long", f"{sample.where}: {task} target has {n_target} tokens, more than "
                            f"data.max_text_tokens={cfg.max_text_tokens}; raise the limit or drop the sample")
    seconds = probe_duration(sample.audio, shard=sample.shard, key=sample.key)
    if seconds > cfg.max_audio_seconds:
        raise SampleTooLong("audio_too_long", f"{sample.where}: audio lasts {seconds:.1f} s, more than "
                            f"data.max_audio_seconds={cfg.max_audio_seconds}; raise the limit or split the recording")
    waveform = decode_audio(sample.audio, shard=sample.shard, key=sample.key)
    if num_frames(waveform.size) == 0:
        raise AudioError("empty_audio", f"{sample.where}: audio is shorter than one 10 ms feature frame")
    features = log_mel(waveform)
    lang = instruction_language(sample.key, cfg.instruction_lang)
    closed = getattr(cfg, LABELLED_TASKS[task]) if task in LABELLED_TASKS else ()
    ids = build_prompt_ids(tokenizer, instruction=instruction_text(task, lang, closed), target=target,
                           n_audio_tokens=audio_token_count(features.shape[1]))
    if len(ids.input_ids) > cfg.max_tokens_per_batch:
        raise SampleTooLong("too_long_for_batch", f"{sample.where}: {task} example has {len(ids.input_ids)} tokens, "
                            f"more than data.max_tokens_per_batch={cfg.max_tokens_per_batch}; raise it or lower "
                            "data.max_audio_seconds")
    label = target if task in LABELLED_TASKS else None
    return Example(sample.key, sample.shard, task, label, epoch, np.asarray(ids.input_ids, dtype=np.int64),
                   np.asarray(ids.labels, dtype=np.int64), features, waveform.size / TARGET_SAMPLE_RATE)


# --- mixing ---------------------------------------------------------------------------------
class Sampler(Protocol):
    def next_examples(self, source: ExampleSource, n_tokens_budget: int) -> list[Example]: ...
    def set_tasks(self, active_tasks, task_weights=None) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class ProportionalSampler:
    """Natural mixing: each example's task drawn with weight = its number of examples in the
    data (over all sources, scaled by source weight) times ``task_weights[task]`` (default 1)."""

    def __init__(self, data_counts: dict, source_weights: list[float], *, seed: int, slot: int,
                 active_tasks=None, task_weights=None):
        self.data_counts, self.source_weights = data_counts, source_weights
        self.rng = np.random.default_rng([seed, slot, 11])
        self.set_tasks(active_tasks, task_weights)

    def set_tasks(self, active_tasks, task_weights=None) -> None:
        self.active_tasks = list(active_tasks) if active_tasks else list(TASKS)
        unknown = [t for t in self.active_tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; expected a subset of {list(TASKS)}")
        self.task_weights = dict(task_weights or {})
        natural = {t: sum(w * self.data_counts[s]["tasks"].get(t, 0) for s, w in enumerate(self.source_weights))
                   for t in self.active_tasks}
        weights = np.asarray([natural[t] * float(self.task_weights.get(t, 1.0)) for t in self.active_tasks])
        if weights.sum() <= 0:
            raise ValueError(f"the data holds no examples of the active tasks {self.active_tasks}")
        self.probabilities = weights / weights.sum()

    def next_examples(self, source: ExampleSource, n_tokens_budget: int) -> list[Example]:
        examples, tokens = [], 0
        while tokens < n_tokens_budget:
            task = self.active_tasks[int(self.rng.choice(len(self.active_tasks), p=self.probabilities))]
            example = source.pull(task)
            examples.append(example)
            tokens += example.num_tokens
        return examples

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "active_tasks": self.active_tasks,
                "task_weights": self.task_weights}

    def load_state_dict(self, state: dict) -> None:
        self.set_tasks(state["active_tasks"], state["task_weights"])
        self.rng.bit_generator.state = state["rng"]
