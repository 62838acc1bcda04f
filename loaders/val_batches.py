"""The validation set of one rank: one finite pass over its val shards, every task of every
record, as padded micro-batches sorted by length (engine/validation.py runs them)."""
from __future__ import annotations

from loaders.audio import AudioError
from loaders.batching import collate
from loaders.shards import LABELLED_TASKS, check_enough_shards, iter_tar_samples
from loaders.sources import resolve_sources
from loaders.stream import ErrorCounter, SampleTooLong, prepare_example
from loaders.tasks import TARGET_FIELDS, UnknownTaskError, tasks_of_record, why_no_target


def _val_examples(urls, cfg, tokenizer, errors: ErrorCounter, max_samples):
    """Every (record, task) example of the shards, in shard order; bad samples skipped and counted."""
    count = 0
    for url in urls:
        for sample in iter_tar_samples(url):
            if sample.error is not None:
                errors.report(*sample.error)
                continue
            try:
                tasks = tasks_of_record(sample.meta)
            except UnknownTaskError as exc:
                errors.report("unknown_task", f"{sample.where}: {exc}")
                continue
            if not tasks:
                errors.report("no_target", f"{sample.where}: {why_no_target(sample.meta)}")
            for task in tasks:
                if task in LABELLED_TASKS:
                    value = str(sample.meta[TARGET_FIELDS[task]]).strip()
                    closed = getattr(cfg, LABELLED_TASKS[task])
                    if value not in closed:
                        errors.report("label_outside_set", f"{sample.where}: {task} label {value!r} is not in "
                                      f"data.{LABELLED_TASKS[task]}={list(closed)}", force_raise=cfg.strict)
                        continue
                try:
                    yield prepare_example(sample, task, 0, cfg, tokenizer)
                except (AudioError, SampleTooLong) as exc:
                    errors.report(exc.reason, str(exc))
                    continue
                count += 1
                if max_samples is not None and count >= max_samples:
                    return


def build_val_batches(cfg, tokenizer, *, rank: int, world_size: int, max_samples: int | None = None) -> list[dict]:
    """One finite pass over this rank's val shards (``shards[rank::world_size]``), every task of
    every record, as micro-batches within data.max_tokens_per_batch (sorted by length, so
    padding is small). Ranks may get different numbers of batches."""
    urls = [url for source in resolve_sources(cfg, "val") for url in source]
    if not urls:
        return []
    check_enough_shards(urls, world_size, world_size, 0, "data.val")
    errors = ErrorCounter(cfg.on_error, rank if world_size > 1 else None)
    examples = list(_val_examples(urls[rank::world_size], cfg, tokenizer, errors, max_samples))
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
    return batches
