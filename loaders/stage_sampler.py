"""The sampler of a TrainStream producer: ``StageSampler``, the current stage's sampler
("random" or "ads", from loaders.sampling) over the current stage's tasks, switched on the fly,
with exact resume through ``ExampleSource.rewind`` (loaders.stream's Sampler protocol).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from loaders.ads import DrawCounter, StreamId
from loaders.curriculum import SAMPLERS, ScheduleConfig
from loaders.embeddings import EmbeddingSource
from loaders.sampling import ADSSampler, Drawn, ProportionalSampler, StreamPuller, seed_list
from loaders.tasks import TASKS


# ExampleSource.max_rewind for StageSampler: no fixed cap. After every batch the sampler trims
# each stream's pull history to exactly what its pending samples need (ExampleSource.keep_history).
UNBOUNDED_REWIND = 2 ** 62


class StageSampler:
    """The current stage's sampler ("random" or "ads") over its tasks, switched on the fly.

    Implements loaders.stream's Sampler protocol plus ``set_stage(tasks, weights, sampler)``.
    At a switch nothing read is lost: samples pending in the old sampler (the ADS pool, the
    random sampler's carried-over sample) move to the new one if their task is active, else
    they wait (``parked``) for a stage with their task.

    ``mixing_counts``: per stream, the data's examples scaled by source weight (natural-mixing
    shares). ``label_counts``: per stream, the data's examples (a label with none gets no ADS
    stream). ``natural_counts``: per stream, the examples of this slot's shards in one epoch
    (repeats = draws beyond it). ``task_weights`` replace natural mixing (a missing task
    weighs 1); for ADS they scale the equal task shares.

    Resume: the state holds every pending sample as a record (stream, offset, key). Loaded
    into a producer whose ExampleSource is restored to the same moment, the next call steps
    each stream back to its oldest pending sample (``source.rewind``) and re-reads the pending
    ones (keys are checked; used ones are skipped), so the sequence continues exactly.
    """

    max_rewind = UNBOUNDED_REWIND

    def __init__(self, *, token_budget: int, mixing_counts: Mapping[StreamId, float],
                 label_counts: Mapping[StreamId, int], natural_counts: Mapping[StreamId, int],
                 labels: Mapping[str, Sequence[str]], config: ScheduleConfig | None = None, seed=0,
                 active_tasks=None, task_weights=None, sampler: str = "random",
                 embeddings: EmbeddingSource | None = None, implementation: str = "numba",
                 padded_budget: bool = True, embedding_snapshots: Mapping[int, dict] | None = None):
        self.token_budget, self.config = int(token_budget), config or ScheduleConfig()
        self.mixing_counts, self.label_counts, self.labels = dict(mixing_counts), dict(label_counts), dict(labels)
        self.seed, self.implementation = seed_list(seed), implementation
        self.padded_budget = padded_budget   # False for packed rows: the budget is the lengths' sum
        self.embeddings = embeddings or EmbeddingSource(self.config.embedding_dim)
        # version -> refreshed embeddings (loaders.pipeline.TrainStream publishes them); 0 = none
        self.embedding_snapshots = embedding_snapshots if embedding_snapshots is not None else {0: {}}
        self.embedding_version = 0
        self.puller = StreamPuller(None, DrawCounter(natural_counts))
        self.builds = 0
        self.sampler = None
        self._parked: list[Drawn] = []
        self._restore: list | None = None
        self.set_stage(active_tasks, task_weights, sampler)

    # --- stages ---------------------------------------------------------------------------
    def set_stage(self, active_tasks, task_weights=None, sampler: str | None = None) -> None:
        tasks = tuple(t for t in TASKS if t in (active_tasks or TASKS))
        unknown = [t for t in (active_tasks or ()) if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"active tasks {list(active_tasks or ())}: expected a non-empty subset of {list(TASKS)}")
        name = sampler or getattr(self, "name", "random")
        if name not in SAMPLERS:
            raise ValueError(f"sampler {name!r}: expected one of {list(SAMPLERS)} (schedule stage 'sampler')")
        pending = [] if self.sampler is None else self.sampler.take_pending() + self._parked
        self._parked = []
        self.tasks, self.name = tasks, name
        self.task_weights = {t: float(task_weights.get(t, 1.0)) for t in tasks} if task_weights else None
        self.builds += 1
        self.sampler = self._build()
        if self._restore is None:
            self._hand_over(pending)

    def set_tasks(self, active_tasks, task_weights=None) -> None:
        self.set_stage(active_tasks, task_weights, self.name)

    def set_embedding_version(self, version: int, reembed: bool = True) -> None:
        """Use the refreshed embeddings published as ``version``; the ADS pool is embedded again."""
        if version not in self.embedding_snapshots:
            raise RuntimeError(f"refreshed embeddings version {version} is not available (have "
                               f"{sorted(self.embedding_snapshots)}); the loader state is inconsistent")
        self.embedding_version = version
        self.embeddings.use_refreshed(self.embedding_snapshots[version])
        if reembed and isinstance(self.sampler, ADSSampler):
            self.sampler.reembed()

    def set_sampler(self, name: str) -> None:
        self.set_stage(self.tasks, self.task_weights, name)

    def _build(self):
        common = dict(token_budget=self.token_budget, task_weights=self.task_weights, seed=self.seed + [self.builds],
                      puller=self.puller)
        if self.name == "random":
            return ProportionalSampler(None, self.tasks, natural_counts=self.mixing_counts, **common)
        cfg = self.config
        return ADSSampler(None, self.tasks, labels=self.labels, natural_counts=self.label_counts, pool_size=cfg.ads_pool,
                          window=cfg.ads_window, max_wait=cfg.ads_max_wait, embedding_dim=cfg.embedding_dim,
                          implementation=self.implementation, embed=self._embed, padded_budget=self.padded_budget,
                          **common)

    @property
    def selects_micro_batches(self) -> bool:
        """True when each group returned by next_examples is one micro-batch as chosen (ADS's
        k-center selection, within the budget) and must not be regrouped by length."""
        return self.name == "ads"

    def _embed(self, example) -> np.ndarray:
        vector, kind = self.embeddings.lookup(example.shard, example.key, example.features.mean(axis=1))
        example.embedding_kind = kind
        return vector

    def _hand_over(self, items: list) -> None:
        active = set(self.tasks)
        self._parked = sorted(self._parked + [d for d in items if d.stream[0] not in active], key=lambda d: d.serial)
        self.sampler.adopt([d for d in items if d.stream[0] in active])

    # --- batches --------------------------------------------------------------------------
    def next_examples(self, source, n_tokens_budget: int) -> list:
        """loaders.stream.Sampler protocol: the next examples read from ``source``."""
        self.puller.pull = source.pull
        if self._restore is not None:
            for (task, label), n in self.puller.rewind_counts(self._restore).items():
                source.rewind(task, label, n)
            records, self._restore = self._restore, None
            self._hand_over(self.puller.redraw(records))
        examples = self.sampler.next_batch(n_tokens_budget)
        self._forget_unneeded_history(source)
        return examples

    def _forget_unneeded_history(self, source) -> None:
        oldest: dict[StreamId, int] = {}
        for record in self.pending_records():
            stream = (record[1], record[2])
            oldest[stream] = min(oldest.get(stream, record[5]), record[5])
        for (task, label), pulled in self.puller.pulled.items():
            keep = pulled - oldest[(task, label)] if (task, label) in oldest else 0
            source.keep_history(f"{task}/{label or '*'}", keep)

    def pending_records(self) -> list[list]:
        """Every sample read but not yet returned (sampler pool or queue, and parked)."""
        if self._restore is not None:
            return self._restore
        return [d.record() for d in self._parked] + self.sampler.pending_records()

    def counts(self) -> dict:
        counter = self.puller.counter
        return {"sampler": self.name, "pending": len(self.pending_records()), "parked": len(self._parked),
                "draws": counter.draws_by_task(), "repeats": counter.repeats()}

    # --- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        inner = {k: v for k, v in self.sampler.state_dict().items() if k not in ("pool", "pending")}
        return {"tasks": list(self.tasks), "task_weights": self.task_weights, "name": self.name, "builds": self.builds,
                "sampler": inner, "pending": [list(r) for r in self.pending_records()],
                "puller": self.puller.state_dict(), "embedding_version": self.embedding_version}

    def load_state_dict(self, state: dict) -> None:
        self.puller.load_state_dict(state["puller"])
        self.set_embedding_version(int(state.get("embedding_version", 0)), reembed=False)  # before the pool is re-read
        self.tasks, self.name, self.builds = tuple(state["tasks"]), state["name"], int(state["builds"])
        self.task_weights = state["task_weights"]
        self.sampler = self._build()
        self.sampler.load_state_dict({**state["sampler"], "pool": [], "pending": []}, redraw=False)
        self._parked, self._restore = [], [list(r) for r in state["pending"]]
