"""The validation set of one rank: one finite pass over the val shards, every task of every
record, as padded micro-batches sorted by length (engine/validation.py runs them).

How ranks share the val set (every record is validated exactly once, on one rank):
- at least as many val shards as ranks: by shard, ``shards[rank::world_size]`` (each rank
  reads only its own shards);
- fewer val shards than ranks (one shard and eight ranks, say): by record, record number i of
  the whole set (shards in the order given, records in shard order) on rank ``i % world_size``;
  every rank reads the tar members of every val shard but decodes only its own records.
A rank may get no record at all; the validator runs dummy batches there. Validation is a
finite pass, so DataLoader workers play no part here.

Counts (``ValBatches.counts``, one rank's; sum them over ranks with
loaders.rank_counts.merge_rank_counts or add_counts):
    records: the records of this rank read (bad ones included)
    read:    examples read: one per task of a record, one for a record that yields no task
             (unreadable, bad JSON, no target, unknown task)
    used:    examples in the batches
    skipped: {reason: n} by loaders.skip_counting.SKIP_REASONS, one per example skipped
read == used + sum(skipped). A bad recording is printed once per reason (a record whose audio
cannot be decoded is met by each of its tasks: counted for each, printed once).
"""
from __future__ import annotations

from loaders.audio import AudioError
from loaders.batching import collate
from loaders.shards import LABELLED_TASKS, iter_tar_samples
from loaders.sources import resolve_sources
from loaders.stream import ErrorCounter, SampleTooLong, prepare_example
from loaders.tasks import TARGET_FIELDS, UnknownTaskError, tasks_of_record, why_no_target


class ValBatches(list):
    """One rank's validation micro-batches (a list of collated batches) with ``counts``
    (module docstring): {"records", "read", "used", "skipped": {reason: n}}."""

    def __init__(self, batches=(), counts: dict | None = None):
        super().__init__(batches)
        self.counts = counts if counts is not None else {"records": 0, "read": 0, "used": 0, "skipped": {}}


def rank_records(urls, rank: int, world_size: int):
    """This rank's records of the val set (module docstring: by shard, or by record when there
    are fewer shards than ranks)."""
    if len(urls) >= world_size:
        for url in urls[rank::world_size]:
            yield from iter_tar_samples(url)
        return
    number = 0
    for url in urls:
        for sample in iter_tar_samples(url):
            if number % world_size == rank:
                yield sample
            number += 1


class _ValCounter:
    """read / used / skipped of one rank's pass; warnings once per (shard, key, reason)."""

    def __init__(self, cfg, rank: int, world_size: int):
        self.errors = ErrorCounter(cfg.on_error, rank if world_size > 1 else None)
        self.records = self.read = self.used = 0

    def skip(self, reason: str, message: str, sample, *, force_raise: bool = False) -> None:
        self.errors.report(reason, message, force_raise=force_raise, sample=(sample.shard, sample.key))

    def as_dict(self) -> dict:
        return {"records": self.records, "read": self.read, "used": self.used, "skipped": dict(self.errors.skipped)}


def _record_tasks(sample, counter: _ValCounter) -> list[str]:
    """The tasks of a record; [] when it yields none (counted as one read, one skipped)."""
    if sample.error is not None:
        counter.skip(*sample.error, sample)
        return []
    try:
        tasks = tasks_of_record(sample.meta)
    except UnknownTaskError as exc:
        counter.skip("unknown_task", f"{sample.where}: {exc}", sample)
        return []
    if not tasks:
        counter.skip("no_target", f"{sample.where}: {why_no_target(sample.meta)}", sample)
    return tasks


def _val_example(sample, task, cfg, tokenizer, counter: _ValCounter):
    """One (record, task) example, or None when it is skipped (counted)."""
    if task in LABELLED_TASKS:
        value = str(sample.meta[TARGET_FIELDS[task]]).strip()
        closed = getattr(cfg, LABELLED_TASKS[task])
        if value not in closed:
            counter.skip("label_outside_set", f"{sample.where}: {task} label {value!r} is not in "
                         f"data.{LABELLED_TASKS[task]}={list(closed)}; add it there or fix the sample", sample,
                         force_raise=cfg.strict)
            return None
    try:
        return prepare_example(sample, task, 0, cfg, tokenizer)
    except (AudioError, SampleTooLong) as exc:
        counter.skip(exc.reason, str(exc), sample)
        return None


def _val_examples(urls, cfg, tokenizer, counter: _ValCounter, rank: int, world_size: int, max_samples):
    """Every (record, task) example of this rank's records, in order; bad ones skipped and counted.
    With ``max_samples`` the pass stops after that many examples."""
    for sample in rank_records(urls, rank, world_size):
        counter.records += 1
        tasks = _record_tasks(sample, counter)
        counter.read += max(1, len(tasks))
        for task in tasks:
            example = _val_example(sample, task, cfg, tokenizer, counter)
            if example is None:
                continue
            counter.used += 1
            yield example
            if max_samples is not None and counter.used >= max_samples:
                counter.read -= len(tasks) - 1 - tasks.index(task)   # the record's later tasks were not read
                return


def build_val_batches(cfg, tokenizer, *, rank: int, world_size: int, max_samples: int | None = None) -> ValBatches:
    """One finite pass over this rank's share of the val set (module docstring), every task
    of every record, as micro-batches within data.max_tokens_per_batch (sorted by length, so
    padding is small), with the pass's counts in ``.counts``. Ranks may get different numbers
    of batches (none at all when the set has fewer records than ranks). ``max_samples``: at
    most that many examples on this rank."""
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size (got rank {rank}, world size {world_size})")
    urls = [url for source in resolve_sources(cfg, "val") for url in source]
    counter = _ValCounter(cfg, rank, world_size)
    examples = list(_val_examples(urls, cfg, tokenizer, counter, rank, world_size, max_samples))
    examples.sort(key=lambda e: e.num_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches, current = [], []
    for example in examples:
        if current and (len(current) + 1) * example.num_tokens > cfg.max_tokens_per_batch:
            batches.append(collate(current, pad))
            current = []
        current.append(example)
    if current:
        batches.append(collate(current, pad))
    return ValBatches(batches, counter.as_dict())
