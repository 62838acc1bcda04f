"""Stage switches and exact resume of the training stream: the part of loaders.pipeline.TrainStream
(which inherits StageSwitchesAndResume) that records, per producer, where a stage, sampler or
embedding switch applies, and that saves and restores the stream's state. How switches and
resume behave is told in loaders.pipeline's docstring.

The methods work on TrainStream's attributes (the waiting ``queue``, ``switches``,
``last_pulled``, ``entries``, the counts) and call its ``_pull_from`` and ``_start``.
"""
from __future__ import annotations

import collections
import copy
import logging

from loaders.batching import check_budget_fits_tasks
from loaders.curriculum import SAMPLERS

STATE_VERSION = 2
log = logging.getLogger("loaders")


class StageSwitchesAndResume:
    """Stage switches and saved state of a TrainStream (see the module docstring)."""

    # --- switches ---------------------------------------------------------------------------
    def set_tasks(self, active_tasks, task_weights=None) -> None:
        """Switch the mix (curriculum stage) from the next micro-batch on: the examples waiting in
        the lookahead, drawn for the old stage, are released (counted, see _release_waiting);
        samples a sampler holds for a dropped task wait for a stage with that task."""
        check_budget_fits_tasks(self.cfg, self.tokenizer, active_tasks)
        self.active_tasks, self.task_weights = list(active_tasks), dict(task_weights or {})
        self._release_waiting()
        self._record_switch()

    def _release_waiting(self) -> None:
        """At a stage switch, set the old stage's draws aside: the waiting queue (up to
        LOOKAHEAD_BATCHES budgets) and the rest of each producer's current group, so that the new
        stage's first micro-batch follows its own mix (used first, they would fill the new stage's
        first micro-batches with the old mix). They are not trained on; they are counted as
        ``released_at_switch`` (read == used + pending + released_at_switch + skipped) and met
        again in a later epoch. Exact resume: a released example is neither waiting nor to be
        replayed (the producers' skip lists), and the switch is recorded after the group's end."""
        for worker in range(self.num_producers):
            pulled = self.counts_by_worker[worker]
            while pulled is not None and self.last_pulled[worker] < pulled["group_end"]:
                self.queue.append(self._pull_from(worker))
                pulled = self.counts_by_worker[worker]
        if not self.queue:
            return
        for example in self.queue:
            self.released_tasks[example.task] = self.released_tasks.get(example.task, 0) + 1
        log.info("stage switch: %d example(s) drawn for the previous stage released (%s)", len(self.queue),
                 ", ".join(f"{t} {n}" for t, n in sorted(collections.Counter(e.task for e in self.queue).items())))
        self.released += len(self.queue)
        self.queue = []

    def set_sampler(self, name: str) -> None:
        """The stage's sampler: "random" (natural mixing) or "ads" (aligner-based diverse
        sampling, settings from schedule_cfg). Applies from the next group of examples drawn."""
        if self.sampler_factory is not None:
            raise ValueError(f"set_sampler({name!r}): this TrainStream draws with a custom sampler_factory; "
                             "build it without one to switch between the built-in samplers")
        if name not in SAMPLERS:
            raise ValueError(f"sampler {name!r}: expected one of {list(SAMPLERS)} (schedule stage 'sampler')")
        if name != self.sampler_name:
            self.sampler_name = name
            self._release_waiting()
            self.refresh.drain()
            if name == "ads" and self.refresh.dirty:    # an ADS stage starts from the freshest vectors
                self.refresh.publish()
            self._record_switch()

    def _record_switch(self, is_stage: bool = True) -> None:
        """Each producer switches after the last example taken from it; switches recorded at the
        same point (set_tasks then set_sampler, or with a refresh) become one. A producer in this
        process reads the switch live (it is lazy: it has not started a group past that point);
        worker processes may have run ahead, so they restart lazily (one restart for both calls)
        and the restart replays exactly, like a resume."""
        for worker in range(self.num_producers):
            switch = [self.last_pulled[worker], list(self.active_tasks), dict(self.task_weights), self.sampler_name,
                      self.refresh.version, is_stage]
            if self.switches[worker] and self.switches[worker][-1][0] == switch[0]:
                previous = self.switches[worker][-1]
                switch[5] = is_stage or len(previous) < 6 or previous[5]   # 4 fields: a stage switch
                self.switches[worker][-1] = switch
            else:
                self.switches[worker].append(switch)
        self._restart_pending = self.num_workers > 0

    def _apply_switches(self) -> None:
        if self._restart_pending:
            self._restart_pending = False
            self.load_state_dict(self.state_dict())

    # --- state ------------------------------------------------------------------------------
    def _worker_entry(self, worker: int):
        """Where this producer resumes: the group of its oldest waiting example (or of its last
        example when none waits), with the ordinals already used after that group's start."""
        waiting = [e for e in self.queue if e.origin[0] == worker]
        if waiting:
            oldest = min(waiting, key=lambda e: e.origin[1])
            resume = oldest.group_state
        elif self._last_example[worker] is not None:
            resume = self._last_example[worker].group_state
        elif self.entries[worker] is not None:
            resume = self.entries[worker]["resume"]
        else:
            resume = None
        if resume is None:
            return {"resume": None, "skip": [], "last": -1, "switches": self.switches[worker]} if self.switches[worker] else None
        waiting_ordinals = {e.origin[1] for e in waiting}
        last = self.last_pulled[worker]
        skip = [o for o in range(resume["ordinal"], last + 1) if o not in waiting_ordinals]
        # Switches before the resume group are already in its state.
        switches = [s for s in self.switches[worker] if s[0] >= resume["ordinal"]]
        return {"resume": resume, "skip": skip, "last": last, "switches": switches}

    def state_dict(self) -> dict:
        self.refresh.drain()     # the last step's vectors belong to the saved state
        workers = [self._worker_entry(w) for w in range(self.num_producers)]
        return {
            "version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
            "num_workers": self.num_workers, "seed": self.seed,
            "active_tasks": list(self.active_tasks), "task_weights": dict(self.task_weights),
            "workers": workers, "embeddings": self.refresh.state_dict(self._versions_needed(workers)),
            "queue": [list(e.origin) for e in self.queue], "next_worker": self.next_worker,
            "counts_by_worker": copy.deepcopy(self.counts_by_worker),
            "used": self.used, "used_tasks": dict(self.used_tasks), "steps": self.steps,
            "released": self.released, "released_tasks": dict(self.released_tasks),
            "used_labels": copy.deepcopy(self.used_labels), "used_embeddings": dict(self.used_embeddings),
            "sampler": self.sampler_name,
        }

    @staticmethod
    def _versions_needed(workers: list) -> set[int]:
        """Embedding versions a producer may return to: its resume group's and its switches'."""
        needed = set()
        for entry in workers:
            if entry is None:
                continue
            resume = entry["resume"]
            if resume is not None and isinstance(resume.get("sampler"), dict):
                needed.add(int(resume["sampler"].get("embedding_version", 0)))
            needed.update(int(s[4]) for s in entry["switches"] if len(s) > 4)
        return needed

    def load_state_dict(self, state: dict) -> None:
        expected = (self.rank, self.world_size, self.num_workers, self.seed)
        saved = (state["rank"], state["world_size"], state["num_workers"], state["seed"])
        if saved != expected:
            raise ValueError(f"loader state was saved with rank, world_size, num_workers, seed = {saved} but this "
                             f"stream has "
                             f"{expected}; resume with the same values (the shard split depends on them)")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} cannot be resumed by this loader (version "
                             f"{STATE_VERSION}); resume with the code that wrote the checkpoint or start a new run")
        self.active_tasks, self.task_weights = list(state["active_tasks"]), dict(state["task_weights"])
        self.sampler_name = state["sampler"]
        self._restart_pending = False
        self.refresh.load_state_dict(state.get("embeddings"))
        self._start(state)
        self.refresh.keep_only(self._versions_needed(state["workers"]))
