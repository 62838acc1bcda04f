"""Shards -> per-task streams of prepared examples -> a mixer. The reader layer of the loader.

Stages (one chain per rank x DataLoader worker, called a *slot*):

    shard URLs (braces expanded, checked at start; loaders.shards)
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

    optional: set_stage(active_tasks, task_weights, sampler_name) (stage switches with a sampler
    change), counts() -> {"pending": n, ...} (samples it holds), selects_micro_batches (each
    returned group is one micro-batch as chosen), max_rewind (see below).

``source.pull(task, label=None, source=None)`` returns the next prepared Example of that
stream (bad samples skipped and counted on the way); ``label`` selects a per-(task, label)
stream of did/ser. ``source.data_counts`` holds the examples per source, task and label
(``{source: {"tasks": {task: n}, "labels": {task: {label: n}}}}``, from shards.json or a
JSON-only scan). A sampler that keeps candidates between calls (a pool) stores them in its
state as (stream, key) records and, on load, re-reads them: it sets ``max_rewind`` (how many
examples per stream it may step back) and calls ``source.rewind(task, label, n)``; the next
``n`` pulls of that stream (over all sources) return the same examples again, from the same
sources, uncounted. ``source.keep_history(stream, n)`` lets it say how far back it still
needs, so saved states stay small. A sampler reports the samples it holds (``counts()``
"pending"); the pipeline counts them as pending. The samplers are in loaders.sampling.

Shuffling is by blocks: a stream fills ``shuffle_buffer`` examples, permutes them with an
RNG seeded by (seed, stream, block number) and hands them out. The state of a stream is its
read position at the block start plus how many of the block were handed out, so a resume
re-reads at most one block and the sample sequence is exactly the uninterrupted one.

Errors: each bad sample is skipped and counted by reason (``SKIP_REASONS``), with a warning
naming shard and key the first time that (shard, key, reason) is met (loaders.skip_counting;
with ``hold_warnings`` they wait in ``source.errors`` for the training process to print, see
loaders.pipeline), or raised as DataError with on_error="raise". A stream whose whole epochs
yield no usable example (all too long for the batch, say) raises ShardError naming the
setting to change.
A record-level error (no JSON, bad JSON, no target, unknown task, corrupt tar) met by several task streams
of a slot is counted once per epoch; a stream started later (a new curriculum stage) counts
what it reads itself. Counts add up: read = emitted + skipped + buffered (examples waiting in
shuffle blocks).
"""
from __future__ import annotations

import collections
import logging
import random
import zlib
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np

from loaders.audio import TARGET_SAMPLE_RATE, AudioError, decode_audio, probe_duration
from loaders.features import log_mel, num_frames
from loaders.prompts import audio_token_count, build_prompt_ids, instruction_language, instruction_text, target_token_count
from loaders.shards import LABELLED_TASKS, RawSample, ShardError, iter_tar_samples, shard_order
from loaders.skip_counting import SKIP_REASONS, DataError, ErrorCounter, UnusableRun  # noqa: F401 (re-exported)
from loaders.tasks import TARGET_FIELDS, UnknownTaskError, tasks_of_record, why_no_target

log = logging.getLogger("loaders")


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
    embedding_kind: str | None = None  # ADS only: "refreshed", "stored" (aligner vector) or "fallback"
    selected_together: bool = False  # set by the producer: this example's group is one chosen micro-batch

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


# See StreamReader._max_empty_epochs.
EMPTY_SLOT_EPOCHS_PER_SLOT = 4


def stream_name(source: int | None, task: str, label: str | None) -> str:
    """"0/did/egy": one source's reader; with source None, "did/egy": the stream over all sources."""
    name = f"{task}/{label or '*'}"
    return name if source is None else f"{source}/{name}"


class StreamReader:
    """One (source, task, label) stream of raw samples for one slot, endless, block-shuffled."""

    def __init__(self, name, urls, task, label, closed_labels, *, slot, num_slots, seed, block_size, errors, strict,
                 known_count=None):
        self.name, self.urls, self.task, self.label = name, urls, task, label
        self.known_count = known_count  # examples of this stream in all of its source's shards (None: unknown)
        self.unusable_run = UnusableRun()
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
        record_id, who = (epoch, sample.shard, sample.index), (sample.shard, sample.key)
        if sample.error is not None:
            self.read += self.errors.report(sample.error[0], sample.error[1], record_id, sample=who)
            return False
        try:
            tasks = tasks_of_record(sample.meta)
        except UnknownTaskError as exc:
            self.read += self.errors.report("unknown_task", f"{sample.where}: {exc}", record_id, sample=who)
            return False
        if not tasks:
            self.read += self.errors.report("no_target", f"{sample.where}: {why_no_target(sample.meta)}", record_id,
                                            sample=who)
            return False
        if self.task not in tasks:
            return False
        if self.task in LABELLED_TASKS:
            value = str(sample.meta[TARGET_FIELDS[self.task]]).strip()
            if value not in self.closed_labels:
                message = (f"{sample.where}: {self.task} label {value!r} is not in data.{LABELLED_TASKS[self.task]}="
                           f"{list(self.closed_labels)}; add it there or fix the sample")
                self.read += self.errors.report("label_outside_set", message, record_id + (self.task,),
                                                force_raise=self.strict, sample=who)
                return False
            if self.label is not None and value != self.label:
                return False
        return True

    # --- a stream with nothing usable -----------------------------------------------------
    def note_usable(self, epoch: int) -> None:
        self.unusable_run.usable(epoch)

    def note_unusable(self, epoch: int, reason: str, value: float | None) -> None:
        """An example of ``epoch`` was skipped after decoding. Raises ShardError once whole epochs
        (the same allowance as for JSON-level emptiness, _max_empty_epochs) passed without a
        usable one, or, with several slots, once this stream skipped in a row as many examples
        as its source holds in all: it would otherwise re-read the shards forever."""
        empty_epochs = self.unusable_run.unusable(epoch, reason, value)
        skipped_in_row = sum(self.unusable_run.reasons.values())
        if empty_epochs >= 1 and (empty_epochs >= self._max_empty_epochs() or
                                  (self.known_count and skipped_in_row >= self.known_count)):
            raise self.unusable_run.error(self.name, self.task, self.label, empty_epochs,
                                          self._slot_shards(max(0, epoch - 1)))

    # --- blocks ---------------------------------------------------------------------------
    def _max_empty_epochs(self) -> int:
        """Whole epochs without one example before the stream is called empty. With one slot an
        empty epoch means the data has none. With several, a slot reads 1/num_slots of the
        shards per epoch, reshuffled each epoch, so a rare label kept in a few shards (a
        per-label ADS stream) can miss it for several epochs in a row: allow
        EMPTY_SLOT_EPOCHS_PER_SLOT x num_slots of them (about that many reads of all the shards'
        JSON; no audio is decoded)."""
        return 1 if self.num_slots == 1 else EMPTY_SLOT_EPOCHS_PER_SLOT * self.num_slots

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
                if empty_epochs > self._max_empty_epochs():
                    raise ShardError(f"stream {self.name}: {empty_epochs - 1} whole epoch(s) of this slot's shares of "
                                     f"the shards (the last: {self._slot_shards(self.epoch)}) hold no usable "
                                     f"{self.task} example{' labelled ' + self.label if self.label else ''}; drop "
                                     "the task from the mix, give it data, or spread it over more shards")
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
                "block_history": [list(h) for h in self.block_history],
                "last_usable_epoch": self.unusable_run.last_usable_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.block_number, self.read = state["block_number"], state["read"]
        self.taken, self.high_taken, self.high_block = state["taken"], state["high_taken"], state["high_block"]
        self.block_history = collections.deque(list(h) for h in state["block_history"])
        self.epoch, self.shard_pos, self.sample_index = state["block_start"]
        # States saved before this field: count from the epoch before the resume point.
        self.unusable_run = UnusableRun(state.get("last_usable_epoch", self.epoch - 1))
        self._samples, self.block = None, []
        if state["has_block"]:
            self._fill_block()  # a replay (block_number <= high_block): counted before the checkpoint
            self.block_emitted = state["block_emitted"]


class ExampleSource:
    """Per-(source, task, label) streams of prepared examples for one slot, created on first pull."""

    def __init__(self, sources: list[list[str]], cfg, tokenizer, data_counts: dict, *, slot: int, num_slots: int,
                 seed: int, max_rewind: int = 0, rank: int | None = None, hold_warnings: bool = False):
        self.sources, self.cfg, self.tokenizer = sources, cfg, tokenizer
        self.max_rewind = max_rewind  # how many examples per stream rewind() may step back
        # Per pulled stream "task/label": (source, reader.taken before the pull) of recent pulls,
        # and the sources that the next pulls after a rewind must read again, in order.
        self.pull_history: dict[str, collections.deque] = {}
        self.replay_sources: dict[str, collections.deque] = {}
        self.data_counts = data_counts  # {source: {"tasks": {task: n}, "labels": {task: {label: n}}}}
        self.slot, self.num_slots, self.seed = slot, num_slots, seed
        # rank: named in the warnings (None with one rank)
        self.errors = ErrorCounter(cfg.on_error, rank, hold_warnings=hold_warnings)
        self.readers: dict[str, StreamReader] = {}
        self.emitted = 0
        self.rng = np.random.default_rng([seed, slot, 7])

    def _reader(self, source: int, task: str, label: str | None) -> StreamReader:
        name = stream_name(source, task, label)
        if name not in self.readers:
            closed = tuple(getattr(self.cfg, LABELLED_TASKS[task])) if task in LABELLED_TASKS else ()
            counts = self.data_counts.get(source, {})
            known = (counts.get("tasks", {}).get(task) if label is None else
                     counts.get("labels", {}).get(task, {}).get(label))
            self.readers[name] = StreamReader(
                name, self.sources[source], task, label, closed, slot=self.slot, num_slots=self.num_slots,
                seed=self.seed, block_size=self.cfg.shuffle_buffer, errors=self.errors, strict=self.cfg.strict,
                known_count=known)
        return self.readers[name]

    def _choose_source(self, task: str, label: str | None) -> int:
        if len(self.sources) == 1:
            return 0
        weights = [source_weight(self.cfg, s) * (self.data_counts[s]["tasks"].get(task, 0) if label is None else
                                                 self.data_counts[s]["labels"].get(task, {}).get(label, 0))
                   for s in range(len(self.sources))]
        if sum(weights) <= 0:
            raise ValueError(f"no source holds examples of task {task!r}" + (f" labelled {label!r}" if label else ""))
        return int(self.rng.choice(len(weights), p=np.asarray(weights) / sum(weights)))

    def pull(self, task: str, label: str | None = None, source: int | None = None) -> Example:
        """The next good example of this stream; bad samples are skipped and counted on the way.
        With several sources and ``source`` None, the source is drawn by weight (after a rewind:
        the sources of the pulls being repeated, in order)."""
        logical = stream_name(None, task, label)
        if source is None:
            replay = self.replay_sources.get(logical)
            source = replay.popleft() if replay else self._choose_source(task, label)
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
                    self.errors.report(exc.reason, str(exc), sample=(sample.shard, sample.key))
                reader.note_unusable(epoch, exc.reason, getattr(exc, "value", None))
                continue
            reader.note_usable(epoch)
            if not replaying:
                self.emitted += 1
            if self.max_rewind:
                self._remember_pull(logical, source, taken_before)
            else:
                reader.trim_history(reader.taken)
            return example

    def _remember_pull(self, logical: str, source: int, taken_before: int) -> None:
        history = self.pull_history.setdefault(logical, collections.deque())
        history.append((source, taken_before))
        self.keep_history(logical, self.max_rewind)

    def keep_history(self, logical: str, n: int) -> None:
        """Remember only the last ``n`` pulls of stream ``logical`` ("task/label", see
        stream_name(None, ...)): a sampler that knows how far back its pending examples reach
        calls this so that saved states stay small."""
        history = self.pull_history.get(logical)
        if history is None:
            return
        while len(history) > min(n, self.max_rewind):
            history.popleft()
        task, label = logical.split("/")
        for source in range(len(self.sources)):
            reader = self.readers.get(stream_name(source, task, None if label == "*" else label))
            if reader is not None:
                oldest = next((taken for s, taken in history if s == source), reader.taken)
                reader.trim_history(oldest)

    def rewind(self, task: str, label: str | None = None, n: int = 1) -> None:
        """Step a stream back by ``n`` pulled examples: the next ``n`` pulls return them again, in
        the same order and from the same sources, without counting them again (for samplers
        that keep a candidate pool and must re-read it on resume). At most ``max_rewind`` back."""
        logical = stream_name(None, task, label)
        history = self.pull_history.get(logical, collections.deque())
        if n <= 0:
            return
        if n > len(history):
            raise ValueError(f"stream {logical}: cannot step back {n} examples; this source remembers the last "
                             f"{len(history)} (max_rewind={self.max_rewind})")
        undone = [history.pop() for _ in range(n)][::-1]
        for source in sorted({s for s, _ in undone}):
            first = next(taken for s, taken in undone if s == source)
            self.readers[stream_name(source, task, label)].rewind_to(first)
        pending = self.replay_sources.setdefault(logical, collections.deque())
        pending.extendleft(reversed([s for s, _ in undone]))

    def counts(self) -> dict:
        epochs = [r.epoch for r in self.readers.values()]
        return {"read": sum(r.read for r in self.readers.values()), "emitted": self.emitted,
                "skipped": dict(self.errors.skipped), "buffered": sum(r.buffered for r in self.readers.values()),
                "epoch": max(epochs, default=0)}

    def state_dict(self) -> dict:
        # Records before the slowest reader's epoch cannot be met again: forget them.
        self.errors.prune(min((r.epoch for r in self.readers.values()), default=0))
        return {"readers": {name: r.state_dict() for name, r in self.readers.items()}, "emitted": self.emitted,
                "pull_history": {name: [list(p) for p in h] for name, h in self.pull_history.items()},
                "replay_sources": {name: list(q) for name, q in self.replay_sources.items() if q},
                "skipped": dict(self.errors.skipped), "seen": sorted(list(e) for e in self.errors.seen),
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.emitted = state["emitted"]
        self.pull_history = {name: collections.deque(tuple(p) for p in h) for name, h in state["pull_history"].items()}
        self.replay_sources = {name: collections.deque(q) for name, q in state.get("replay_sources", {}).items()}
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
    """An example over a limit. ``value``: its size in the limit's unit (tokens, seconds)."""

    def __init__(self, reason: str, message: str, value: float | None = None):
        super().__init__(message)
        self.reason, self.value = reason, value


def prepare_example(sample: RawSample, task: str, epoch: int, cfg, tokenizer) -> Example:
    """Decode, featurize and prompt one (sample, task). Raises AudioError / SampleTooLong."""
    target = str(sample.meta[TARGET_FIELDS[task]]).strip()
    n_target = target_token_count(tokenizer, target)
    if n_target > cfg.max_text_tokens:
        raise SampleTooLong("text_too_long", f"{sample.where}: {task} target has {n_target} tokens, more than "
                            f"data.max_text_tokens={cfg.max_text_tokens}; raise the limit or drop the sample", n_target)
    seconds = probe_duration(sample.audio, shard=sample.shard, key=sample.key)
    if seconds > cfg.max_audio_seconds:
        raise SampleTooLong("audio_too_long", f"{sample.where}: audio lasts {seconds:.1f} s, more than "
                            f"data.max_audio_seconds={cfg.max_audio_seconds}; raise the limit or split the recording",
                            float(seconds))
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
                            "data.max_audio_seconds", len(ids.input_ids))
    label = target if task in LABELLED_TASKS else None
    return Example(sample.key, sample.shard, task, label, epoch, np.asarray(ids.input_ids, dtype=np.int64),
                   np.asarray(ids.labels, dtype=np.int64), features, waveform.size / TARGET_SAMPLE_RATE)


# --- mixing ---------------------------------------------------------------------------------
class Sampler(Protocol):
    def next_examples(self, source: ExampleSource, n_tokens_budget: int) -> list[Example]: ...
    def set_tasks(self, active_tasks, task_weights=None) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
