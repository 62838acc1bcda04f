"""Samplers: which examples go into training next, read through ``pull(task, label)``.

- ``StreamPuller`` reads, numbers and counts examples per stream (``Drawn`` records) and
  re-reads pending ones on resume.
- ``ProportionalSampler``: natural mixing (the ``random`` sampler), streams drawn in proportion
  to the data, examples packed in read order.
- ``ADSSampler``: aligner-based diverse sampling: a candidate pool filled by per-(task, label)
  quota drawing, micro-batches chosen by k-center selection (loaders.ads) on aligner
  embeddings (loaders.embeddings).
The sampler TrainStream's producers run, ``StageSampler`` (the current stage's sampler
switched on the fly), is in loaders.stage_sampler.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from loaders.ads import (LABEL_BALANCED_TASKS, ADSError, BalancedDrawer, DrawCounter, ProportionalDrawer, StreamId,
                         balanced_streams, example_field, k_center_select, k_center_select_reference, pick_start,
                         quantize_embeddings)
from loaders.curriculum import DEFAULT_ADS_MAX_WAIT, DEFAULT_ADS_POOL, DEFAULT_ADS_WINDOW, DEFAULT_EMBEDDING_DIM


def seed_list(seed) -> list[int]:
    """A seed (an int or a list of ints) as a list, so that samplers can append their own sub-seeds."""
    return [int(s) for s in seed] if isinstance(seed, (list, tuple)) else [int(seed)]


@dataclass
class Drawn:
    """An example read from a stream: pull serial, stream, offset in that stream, wait count."""
    serial: int
    stream: StreamId
    example: dict
    offset: int = 0
    waited: int = 0

    @property
    def group(self) -> StreamId:
        """The ADS group: (task, label) for label-balanced tasks, else (task, None)."""
        task = example_field(self.example, "task")
        return (task, example_field(self.example, "label") if task in LABEL_BALANCED_TASKS else None)

    def record(self) -> list:
        return [self.serial, self.stream[0], self.stream[1], example_field(self.example, "key"), self.waited, self.offset]


class StreamPuller:
    """Reads examples through ``pull(task, label)``, numbers and counts them; re-reads on resume.

    Resume contract: samples still pending (pooled, not yet in a batch) are stored as keys with
    their offset in their stream. ``rewind_counts(records)`` says, per stream, how many samples
    to step back: to the oldest pending one (samples between it and the stream's end that were
    already used are re-read and skipped, not counted again). ``max_wait`` bounds how far back.
    """

    def __init__(self, pull: Callable[[str, str | None], dict], counter: DrawCounter | None = None):
        self.pull, self.counter, self.serial = pull, counter or DrawCounter(), 0
        self.pulled: dict[StreamId, int] = {}
        self.reread_skipped = 0

    def _read(self, stream: StreamId) -> dict:
        example = self.pull(*stream)
        key, task, label = (example_field(example, name) for name in ("key", "task", "label"))
        if task != stream[0] or (stream[1] is not None and label != stream[1]):
            raise ADSError(f"stream {stream} returned sample {key!r} of task {task!r} label {label!r}; "
                           "pull(task, label) must return that stream's samples")
        tokens = example_field(example, "num_tokens")
        if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or tokens < 1:
            raise ADSError(f"sample {key!r} from stream {stream}: 'num_tokens' must be a positive int, got {tokens!r}")
        return example

    def draw(self, stream: StreamId) -> Drawn:
        example = self._read(stream)
        self.counter.add(example)
        offset = self.pulled.get(stream, 0)
        self.pulled[stream] = offset + 1
        self.serial += 1
        return Drawn(self.serial - 1, stream, example, offset)

    def rewind_counts(self, records: Sequence[list]) -> dict:
        """Per stream: samples to step back so the next read is the oldest pending sample."""
        oldest: dict[StreamId, int] = {}
        for record in records:
            stream = (record[1], record[2])
            oldest[stream] = min(oldest.get(stream, record[5]), record[5])
        return {stream: self.pulled.get(stream, 0) - offset for stream, offset in oldest.items()}

    def redraw(self, records: Sequence[list], start_offsets: Mapping[StreamId, int] | None = None) -> list[Drawn]:
        """Re-read pending samples (keys are checked). Each stream is read from its position in
        ``start_offsets`` (this puller's ``pulled`` count the restored stream stands at; default:
        rewound by ``rewind_counts``) up to the checkpoint's count; used samples are skipped."""
        by_stream: dict[StreamId, dict[int, list]] = {}
        for record in records:
            by_stream.setdefault((record[1], record[2]), {})[int(record[5])] = record
        drawn = []
        for stream, wanted in by_stream.items():
            start = min(wanted) if start_offsets is None else int(start_offsets.get(stream, 0))
            if start > min(wanted):
                raise ADSError(f"resume: stream {stream} restarts at sample {start} of the run, after its oldest pending "
                               f"sample {min(wanted)}; restore the stream to an earlier position")
            for offset in range(start, self.pulled.get(stream, 0)):
                example = self._read(stream)
                if offset not in wanted:
                    self.reread_skipped += 1
                    continue
                serial, _, _, key, waited, _ = wanted[offset]
                if example_field(example, "key") != key:
                    raise ADSError(
                        f"resume: stream {stream} returned sample {example_field(example, 'key')!r} where the checkpoint's pending "
                        f"sample {key!r} was expected; step each stream back by rewind_counts() from its checkpointed "
                        "position before the first batch")
                drawn.append(Drawn(int(serial), stream, example, offset, int(waited)))
        return sorted(drawn, key=lambda d: d.serial)

    def state_dict(self) -> dict:
        return {"serial": self.serial, "counter": self.counter.state_dict(),
                "pulled": [[t, l, n] for (t, l), n in self.pulled.items()]}

    def load_state_dict(self, state: dict) -> None:
        self.serial = int(state["serial"])
        self.counter.load_state_dict(state["counter"])
        self.pulled = {(t, l): int(n) for t, l, n in state["pulled"]}


class _PulledSampler:
    """What both samplers share: resume re-reads and loaders.stream's Sampler protocol."""
    puller: StreamPuller
    _restore: list | None = None
    _restore_offsets: Mapping | None = None

    def _redraw_if_resumed(self) -> None:
        if self._restore is not None:
            self.adopt(self.puller.redraw(self._restore, self._restore_offsets))
            self._restore, self._restore_offsets = None, None

    def next_examples(self, source, n_tokens_budget: int) -> list:
        """loaders.stream.Sampler protocol: the next micro-batch's examples read from ``source.pull``."""
        self.puller.pull = source.pull
        return self.next_batch(n_tokens_budget)

    def rewind_counts(self) -> dict:
        """Per stream, how far to step back from the checkpointed position (see StreamPuller)."""
        return self.puller.rewind_counts(self.pending_records())


class ADSSampler(_PulledSampler):
    """Task/label-balanced, diversity-selected micro-batches from a candidate pool.

    ``pull(task, label) -> example`` (dict with "task", "label", "num_tokens", "embedding"
    float [embedding_dim], "key"). Each ``next_batch()`` tops the pool up to ``pool_size``
    active candidates (BalancedDrawer), then picks a micro-batch of at most ``token_budget``
    tokens (with ``padded_budget``: padded slots, batch size x longest) by k-center selection
    under quotas that steer the cumulative selection towards the target shares. A candidate
    that waited ``max_wait`` selections is taken first. A candidate longer than
    ``token_budget`` is returned alone (counted in ``oversize``).
    """

    def __init__(self, pull, tasks: Sequence[str], *, token_budget: int, labels=None, task_weights=None,
                 natural_counts=None, pool_size: int = DEFAULT_ADS_POOL, window: int = DEFAULT_ADS_WINDOW,
                 max_wait: int = DEFAULT_ADS_MAX_WAIT, max_items: int | None = None,
                 embedding_dim: int = DEFAULT_EMBEDDING_DIM, seed=0, implementation: str = "numba",
                 embed: Callable[[object], np.ndarray] | None = None, puller: StreamPuller | None = None,
                 padded_budget: bool = False):
        if implementation not in ("numba", "numpy"):
            raise ADSError(f"implementation must be 'numba' or 'numpy', got {implementation!r}")
        self._owns_puller = puller is None
        self.puller = puller or StreamPuller(pull, DrawCounter(natural_counts))
        self.token_budget, self.pool_size, self.window = int(token_budget), int(pool_size), int(window)
        self.max_wait, self.max_items, self.embedding_dim = int(max_wait), max_items, int(embedding_dim)
        self.padded_budget = padded_budget   # budget counts padded slots (count x longest), not the sum
        self.labels, self.natural_counts, self.seed = labels, natural_counts, seed_list(seed)
        self._select = k_center_select if implementation == "numba" else k_center_select_reference
        self.embed = embed or (lambda example: example_field(example, "embedding"))
        self._rng = np.random.default_rng(self.seed + [1])
        self._pool: list[Drawn] = []
        self._codes = np.zeros((0, self.embedding_dim), np.int16)
        self._restore: list | None = None
        self.oversize = 0
        self.set_tasks(tasks, task_weights)

    def set_tasks(self, tasks: Sequence[str], task_weights: Mapping[str, float] | None = None) -> None:
        """New active tasks (an ADS stage following another): new quotas; pooled samples of
        inactive tasks stay pending (never returned) until their task is active again."""
        self.tasks, self.task_weights = tuple(tasks), task_weights
        self.streams, self.shares, self.absent = balanced_streams(tasks, self.labels, task_weights, self.natural_counts)
        self._group = {stream: g for g, stream in enumerate(self.streams)}
        self.drawer = BalancedDrawer(self.streams, self.shares, self.window, self.seed + [0])
        self._selected = np.zeros(len(self.streams), np.int64)

    def adopt(self, items: Sequence[Drawn]) -> None:
        """Take over already-read samples (a previous stage's pending ones, or re-read on resume)."""
        self._add_to_pool(list(items))

    def reembed(self) -> None:
        """Embed the whole pool again (the embedding source changed: refreshed vectors)."""
        self._codes = self._codes_of(self._pool) if self._pool else self._codes[:0]

    def take_pending(self) -> list[Drawn]:
        items, self._pool, self._codes = self._pool, [], self._codes[:0]
        return items

    def pending_records(self) -> list[list]:
        return self._restore if self._restore is not None else [d.record() for d in self._pool]

    def _codes_of(self, items: Sequence[Drawn]) -> np.ndarray:
        """Quantized embeddings of new pool members (``embed`` is called once per sample)."""
        vectors = []
        for item in items:
            vector = self.embed(item.example)
            if not isinstance(vector, np.ndarray) or vector.shape != (self.embedding_dim,) or not np.isfinite(vector).all():
                shape = getattr(vector, "shape", type(vector).__name__)
                raise ADSError(f"sample {example_field(item.example, 'key')!r}: 'embedding' must be a finite float array "
                               f"of shape ({self.embedding_dim},) (schedule.embedding_dim), got {shape}")
            vectors.append(vector)
        return quantize_embeddings(np.stack(vectors)) if vectors else np.zeros((0, self.embedding_dim), np.int16)

    def _add_to_pool(self, items: list[Drawn]) -> None:
        """Append, keeping the pool in pull order (index order = age order for stale-first picks)."""
        if not items:
            return
        pool, codes = self._pool + items, np.concatenate([self._codes, self._codes_of(items)])
        order = np.argsort([d.serial for d in pool], kind="stable")
        self._pool, self._codes = [pool[i] for i in order], codes[order]

    def _refill(self) -> None:
        active = sum(1 for d in self._pool if d.group in self._group)
        self._add_to_pool([self.puller.draw(self.drawer.next_stream()) for _ in range(self.pool_size - active)])

    def _quotas(self, eligible_lengths: np.ndarray, budget: int) -> np.ndarray:
        expected = max(1, int(budget // max(1.0, float(eligible_lengths.mean()))))
        if self.max_items:
            expected = min(expected, self.max_items)
        desired = self.shares * (self._selected.sum() + expected) - self._selected
        return np.append(np.maximum(np.ceil(desired - 1e-9), 0).astype(np.int64), 0)   # last: inactive group

    def _choose(self, budget: int) -> np.ndarray:
        n_groups = len(self.streams)
        groups = np.array([self._group.get(d.group, n_groups) for d in self._pool], np.int64)
        lengths = np.array([int(example_field(d.example, "num_tokens")) for d in self._pool], np.int64)
        eligible = groups < n_groups
        too_long = np.flatnonzero(eligible & (lengths > budget))
        if len(too_long):
            self.oversize += 1
            return too_long[:1]
        quota = self._quotas(lengths[eligible], budget)
        forced = eligible & (np.array([d.waited for d in self._pool]) >= self.max_wait)
        start = pick_start(self._rng, groups, lengths, quota, budget, eligible)
        return self._select(self._codes, groups, lengths, quota, budget, start, eligible=eligible, forced=forced,
                            max_items=self.max_items, padded=self.padded_budget)

    def next_batch(self, token_budget: int | None = None) -> list:
        """The next micro-batch (examples as pulled), at most ``token_budget`` tokens (default: the
        constructor's) unless one sample alone is longer."""
        self._redraw_if_resumed()
        self._refill()
        chosen = self._choose(self.token_budget if token_budget is None else int(token_budget))
        keep = np.ones(len(self._pool), bool)
        keep[chosen] = False
        batch = [self._pool[i] for i in chosen]
        self._pool = [d for d, k in zip(self._pool, keep) if k]
        self._codes = self._codes[keep]
        for item in self._pool:
            item.waited += 1
        for item in batch:
            self._selected[self._group[item.group]] += 1
        return [item.example for item in batch]

    def stats(self) -> dict:
        return {"pool": len(self._pool), "oversize": self.oversize, "absent_labels": self.absent,
                "draws": self.puller.counter.draws_by_task(), "repeats": self.puller.counter.repeats()}

    def state_dict(self) -> dict:
        state = {"tasks": list(self.tasks), "task_weights": self.task_weights, "drawer": self.drawer.state_dict(),
                 "rng": self._rng.bit_generator.state, "selected": self._selected.tolist(), "oversize": self.oversize,
                 "pool": self.pending_records()}
        if self._owns_puller:
            state["puller"] = self.puller.state_dict()
        return state

    def load_state_dict(self, state: dict, redraw: bool = True, stream_offsets: Mapping | None = None) -> None:
        """Restore; with ``redraw`` the pooled samples are re-read from the restored streams at the
        next batch (see StreamPuller.redraw for ``stream_offsets``). Without it the caller re-reads
        them and calls ``adopt``."""
        self.set_tasks(state["tasks"], state["task_weights"])
        self.drawer.load_state_dict(state["drawer"])
        self._rng.bit_generator.state = state["rng"]
        self._selected = np.asarray(state["selected"], np.int64)
        self.oversize = int(state["oversize"])
        self._pool, self._codes = [], self._codes[:0]
        self._restore = [list(r) for r in state["pool"]] if redraw else None
        self._restore_offsets = stream_offsets
        if "puller" in state and self._owns_puller:
            self.puller.load_state_dict(state["puller"])


class ProportionalSampler(_PulledSampler):
    """Natural mixing (the ``random`` sampler): streams drawn in proportion to the data, samples
    packed in read order into micro-batches of at most ``token_budget`` tokens. Samples waiting
    (the one that did not fit the last batch, or an earlier stage's sampler's pool handed over
    at a switch) are taken when the drawer next picks their task, so the mix follows the
    drawer's shares from a switch on; one longer than the budget is returned alone."""

    def __init__(self, pull, tasks: Sequence[str], *, token_budget: int, task_weights=None, natural_counts=None,
                 max_items: int | None = None, seed=0, puller: StreamPuller | None = None):
        self._owns_puller = puller is None
        self.puller = puller or StreamPuller(pull, DrawCounter(natural_counts))
        self.tasks, self.token_budget, self.max_items = tuple(tasks), int(token_budget), max_items
        self.drawer = ProportionalDrawer(tasks, natural_counts, task_weights, seed_list(seed) + [0])
        self._pending: list[Drawn] = []
        self._restore: list | None = None
        self.oversize = 0

    def adopt(self, items: Sequence[Drawn]) -> None:
        self._pending = sorted(self._pending + list(items), key=lambda d: d.serial)

    def _take_or_draw(self, stream: StreamId) -> Drawn:
        """The oldest waiting sample of the drawn stream's task (handed over by the previous
        stage's sampler, or one that did not fit the last batch), else a new one: the mix
        follows the drawer's shares whatever waits."""
        for i, item in enumerate(self._pending):
            if item.stream[0] == stream[0]:
                return self._pending.pop(i)
        return self.puller.draw(stream)

    def take_pending(self) -> list[Drawn]:
        items, self._pending = self._pending, []
        return items

    def pending_records(self) -> list[list]:
        return self._restore if self._restore is not None else [d.record() for d in self._pending]

    def next_batch(self, token_budget: int | None = None) -> list:
        self._redraw_if_resumed()
        budget = self.token_budget if token_budget is None else int(token_budget)
        batch, used = [], 0
        while used < budget and (not self.max_items or len(batch) < self.max_items):
            item = self._take_or_draw(self.drawer.next_stream())
            tokens = int(example_field(item.example, "num_tokens"))
            if batch and used + tokens > budget:
                self.adopt([item])   # waits for its task's next turn
                break
            batch.append(item)
            used += tokens
        if used > budget:
            self.oversize += 1
        return [item.example for item in batch]

    def stats(self) -> dict:
        return {"pending": len(self._pending), "oversize": self.oversize, "mixing": self.drawer.mixing,
                "draws": self.puller.counter.draws_by_task(), "repeats": self.puller.counter.repeats()}

    def state_dict(self) -> dict:
        state = {"drawer": self.drawer.state_dict(), "oversize": self.oversize,
                 "pending": self.pending_records()}
        if self._owns_puller:
            state["puller"] = self.puller.state_dict()
        return state

    def load_state_dict(self, state: dict, redraw: bool = True, stream_offsets: Mapping | None = None) -> None:
        self.drawer.load_state_dict(state["drawer"])
        self.oversize = int(state["oversize"])
        self._pending = []
        self._restore = [list(r) for r in state["pending"]] if redraw else None
        self._restore_offsets = stream_offsets
        if "puller" in state and self._owns_puller:
            self.puller.load_state_dict(state["puller"])
