"""The training data stream of one rank: exactly ``grad_accum`` micro-batches per step.

    stream = TrainStream(cfg, tokenizer, rank=r, world_size=w, grad_accum=4, seed=0,
                         schedule_cfg=run_cfg.schedule)      # ADS settings (ads_pool, ...)
    micro_batches = stream.next_step()        # same count on every rank
    stream.set_tasks(["asr", "sum"])          # curriculum stage change, from the next micro-batch on
    stream.set_sampler("ads")                 # "random" (natural mixing) or "ads"
    state = stream.state_dict()               # JSON-serializable; save with the checkpoint
    stream.load_state_dict(state)             # the sample sequence continues exactly

Each rank runs ``max(1, num_workers)`` producers (stream.ExampleSource + a Sampler), one per
DataLoader worker, each over its own share of the shards (slot = rank * workers + worker).
The sampler is loaders.stage_sampler.StageSampler: the stage's sampler over the stage's tasks
("random": tasks drawn in proportion to the data; "ads": per-(task, label) quota drawing
into a candidate pool, then k-center selection on aligner embeddings). The training process
takes examples from the producers round-robin, in each producer's order. An ADS selection
is one micro-batch as chosen (selected within data.max_tokens_per_batch token slots), kept
whole; examples of the random sampler are bucketed by length into padded micro-batches
(loaders.batching) within a lookahead of LOOKAHEAD_BATCHES budgets. With data.packing a
micro-batch is one packed row (loaders.packing: slots = the lengths' sum, no padding).

Exact resume, with or without workers: every example carries its producer's state at the
start of the group it was drawn in and its ordinal. The saved state of a producer is the
group state of its oldest example still waiting to be batched, plus which later ordinals
were already used; a resume replays that stretch (re-decoding the bucketing lookahead, a
few micro-batches' worth) and rebuilds the waiting queue in order. A sampler's pending
samples (the ADS pool) are part of that group state as records; on replay the sampler steps
its streams back to the oldest of them (``ExampleSource.rewind``) and re-reads them. Stage
changes (``set_tasks``, ``set_sampler``) and refreshed ADS embeddings (loaders/embedding_refresh.py)
are recorded as switches at the last example taken from each producer: a producer in this
process reads them as they come (it is lazy, never past that point); worker processes, which
may have run ahead, restart from the saved state at the next step. A replay applies them at
the same points, so they are exactly reproducible too. A resume must use the same rank, world size, num_workers and
seed (the shard split depends on them).

A stage switch takes effect at the next micro-batch: the examples drawn for the old stage and
not yet batched (the waiting queue, and the rest of each producer's current group) are
released, never trained on, and counted (``released_at_switch``: read == used + pending +
released_at_switch + skipped); the switch is recorded after them, so the new stage's producers
draw fresh. Used first instead, they filled the first LOOKAHEAD_BATCHES budgets of the new
stage with the old mix, and a short stage trained none of its new tasks.

TrainStream's stage switches (``set_tasks``, ``set_sampler``) and its saved state
(``state_dict``, ``load_state_dict``) are in loaders.stream_resume (StageSwitchesAndResume,
which it inherits).

DataLoader workers (loaders.dataloader_workers) ignore the SIGTERM/SIGINT sent to the whole
process group, so the engine checkpoints before it stops; they draw their seeds from their own
generator, not from torch's global RNG (LoRA dropout's); an error raised in one reaches the
training process with its own class and one-line message.

Bad-sample warnings: producers hold them and hand them over with their next example; the
training process prints each (shard, key, reason) once per rank, although every worker meets a
bad sample sooner or later (epochs reshuffle the shards) and workers restart on stage changes.

Another sampler plugs in through ``sampler_factory(data_counts, source_weights, *, seed,
slot, active_tasks, task_weights) -> Sampler`` (see loaders.stream for the protocol); such a
stream cannot switch samplers. A sampler with a candidate pool sets ``max_rewind`` (examples
per stream it may step back with ``source.rewind``) and keeps its pool in its state_dict.
"""
from __future__ import annotations

import collections
import copy

import torch

from loaders.batching import LOOKAHEAD_BATCHES, check_budget_fits_tasks, collate, padded_cost, select_micro_batch
from loaders.curriculum import SAMPLERS, ScheduleConfig
from loaders.dataloader_workers import WorkerDataset, WorkerFailure, WorkerSignalGuard, keep_as_is, loader_seed
from loaders.embedding_refresh import RefreshedEmbeddings
from loaders.packing import collate_packed, select_packed_row
from loaders.rank_counts import add_counts
from loaders.shards import (LABELLED_TASKS, ShardError, check_enough_shards, count_examples_by_shard, no_example_message,
                            shard_order, sum_counts)
from loaders.skip_counting import SkipWarnings
from loaders.sources import resolve_sources
from loaders.stream import ExampleSource, source_weight
from loaders.stream_resume import StageSwitchesAndResume
from loaders.tasks import TASKS



# --- producers ------------------------------------------------------------------------------
class ExampleProducer:
    """One slot's ExampleSource and Sampler; yields examples tagged for exact resume."""

    def __init__(self, cfg, tokenizer, sources, data_counts, sampler, *, slot, num_slots, seed, worker, rank=None):
        self.cfg, self.worker, self.sampler = cfg, worker, sampler
        self.source = ExampleSource(sources, cfg, tokenizer, data_counts, slot=slot, num_slots=num_slots, seed=seed,
                                    max_rewind=getattr(sampler, "max_rewind", 0), rank=rank, hold_warnings=True)
        self.ordinal = 0

    def state_dict(self) -> dict:
        return copy.deepcopy({"source": self.source.state_dict(), "sampler": self.sampler.state_dict(),
                              "ordinal": self.ordinal})

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state["source"])
        self.sampler.load_state_dict(state["sampler"])
        self.ordinal = state["ordinal"]

    def iterate(self, entry: dict | None, live_switches: list | None = None):
        """Examples from a saved entry (or the start). ``entry["switches"]`` lists stage changes
        and embedding refreshes as [after_ordinal, active_tasks, task_weights, sampler,
        embedding_version, is_stage]: each applies from the first group that starts after that
        ordinal, so a replay switches exactly where the original run did. ``live_switches``: the
        stream's own list (same content as the entry's), read as it grows, so that a producer in
        the training process takes new switches without a restart (it never runs ahead).
        Each example carries ``skip_warnings``, held since the previous one, for the training process."""
        skip, switches, held = set(), [], []
        if entry is not None:
            if entry["resume"] is not None:
                self.load_state_dict(entry["resume"])
            skip, switches = set(entry["skip"]), [list(s) for s in entry["switches"]]
        switches = switches if live_switches is None else live_switches
        applied = 0
        while True:
            while applied < len(switches) and self.ordinal > switches[applied][0]:
                _, active_tasks, task_weights, sampler, *refresh = switches[applied]
                applied += 1
                version, is_stage = refresh if refresh else (None, True)   # states written before refreshes
                if version is not None and version != getattr(self.sampler, "embedding_version", version):
                    self.sampler.set_embedding_version(version)
                if not is_stage:
                    continue
                if hasattr(self.sampler, "set_stage"):
                    self.sampler.set_stage(active_tasks, task_weights, sampler)
                else:
                    self.sampler.set_tasks(active_tasks, task_weights)
            group_state, group_start = self.state_dict(), self.ordinal
            try:
                examples = self.sampler.next_examples(self.source, self.cfg.max_tokens_per_batch)
            except Exception:
                self.source.errors.print_held()   # no example will carry them: the error stops the stream
                raise
            held += self.source.errors.take_held()
            counts = self.source.counts()
            if hasattr(self.sampler, "counts"):
                counts["sampler"] = self.sampler.counts()
            together = bool(getattr(self.sampler, "selects_micro_batches", False))
            for example in examples:
                ordinal = self.ordinal
                self.ordinal += 1
                if ordinal in skip:
                    continue
                example.origin = (self.worker, ordinal)
                example.group_state, example.group_start = group_state, group_start
                example.group_end, example.counts_after = group_start + len(examples) - 1, counts
                example.selected_together = together
                example.skip_warnings, held = held, []
                yield example


def check_sources_have_examples(sources: list[list[str]], shard_counts: list[dict]) -> None:
    """Each source of data.train yields at least one example: a source of empty, non-tar or
    unusable shards is an error naming them, not an empty index the sampler trips over later."""
    for number, (urls, counts) in enumerate(zip(sources, shard_counts), start=1):
        if not any(n for entry in counts.values() for n in entry["tasks"].values()):
            key = "data.train" + (f" (source {number} of {len(sources)})" if len(sources) > 1 else "")
            raise ShardError(no_example_message(urls, key))


class TrainStream(StageSwitchesAndResume):
    """Endless token-budget micro-batches for one rank (see the module docstring)."""

    def __init__(self, cfg, tokenizer, *, rank: int, world_size: int, grad_accum: int, seed: int,
                 active_tasks=None, task_weights=None, sampler: str = "random", schedule_cfg=None,
                 sampler_factory=None):
        if not 0 <= rank < world_size or grad_accum < 1:
            raise ValueError(f"need 0 <= rank < world_size and grad_accum >= 1 (got {rank}, {world_size}, {grad_accum})")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.rank, self.world_size, self.grad_accum, self.seed = rank, world_size, grad_accum, seed
        self.num_workers = cfg.num_workers
        self.num_producers = max(1, cfg.num_workers)
        self.sources = resolve_sources(cfg, "train")
        num_slots = world_size * self.num_producers
        for urls in self.sources:
            check_enough_shards(urls, num_slots, world_size, cfg.num_workers, "data.train")
        if cfg.weights and len(cfg.weights) != len(self.sources):
            raise ValueError(f"data.weights has {len(cfg.weights)} entries for {len(self.sources)} source(s) in "
                             "data.train; give one weight per source")
        self.shard_counts = [count_examples_by_shard(urls) for urls in self.sources]
        check_sources_have_examples(self.sources, self.shard_counts)
        self.data_counts = {index: sum_counts(counts.values()) for index, counts in enumerate(self.shard_counts)}
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.active_tasks = list(active_tasks) if active_tasks else list(TASKS)
        check_budget_fits_tasks(cfg, tokenizer, self.active_tasks)
        self.task_weights = dict(task_weights or {})
        self.sampler_name = sampler
        self.schedule_cfg = schedule_cfg or ScheduleConfig()
        self.sampler_factory = sampler_factory
        if sampler_factory is None and sampler not in SAMPLERS:
            raise ValueError(f"sampler {sampler!r}: expected one of {list(SAMPLERS)}")
        self._restart_pending = False
        self._loader_iter = None
        self._signal_guard = None
        self.skip_warnings = SkipWarnings(rank if world_size > 1 else None)
        sc = self.schedule_cfg
        self.refresh = RefreshedEmbeddings(sc.embedding_cache, sc.embedding_dim, sc.embedding_refresh_every)
        self._start({"workers": [None] * self.num_producers, "queue": [], "next_worker": 0,
                     "counts_by_worker": [None] * self.num_producers, "used": 0, "used_tasks": {}, "steps": 0})

    # --- producers --------------------------------------------------------------------------
    def _make_producer(self, worker: int) -> ExampleProducer:
        slot, num_slots = self.rank * self.num_producers + worker, self.world_size * self.num_producers
        return ExampleProducer(self.cfg, self.tokenizer, self.sources, self.data_counts, self._make_sampler(slot),
                               slot=slot, num_slots=num_slots, seed=self.seed, worker=worker,
                               rank=self.rank if self.world_size > 1 else None)

    def _make_sampler(self, slot: int):
        weights = [source_weight(self.cfg, s) for s in range(len(self.sources))]
        if self.sampler_factory is not None:
            return self.sampler_factory(self.data_counts, weights, seed=self.seed, slot=slot,
                                        active_tasks=self.active_tasks, task_weights=self.task_weights)
        from loaders.ads import natural_counts_from_data_counts, stream_counts
        from loaders.stage_sampler import StageSampler

        mixing: dict = {}
        for source, counts in self.data_counts.items():
            for stream, n in stream_counts(counts["tasks"], counts["labels"]).items():
                mixing[stream] = mixing.get(stream, 0.0) + weights[source] * n
        # This slot's shards of the first epoch: what "every sample once" means for repeats.
        num_slots = self.world_size * self.num_producers
        slot_counts = sum_counts(self.shard_counts[s][url] for s, urls in enumerate(self.sources)
                                 for url in shard_order(urls, self.seed, 0)[slot::num_slots])
        return StageSampler(token_budget=self.cfg.max_tokens_per_batch, mixing_counts=mixing,
                            label_counts=natural_counts_from_data_counts(self.data_counts),
                            natural_counts=stream_counts(slot_counts["tasks"], slot_counts["labels"]),
                            labels={task: list(getattr(self.cfg, field)) for task, field in LABELLED_TASKS.items()},
                            config=self.schedule_cfg, seed=[self.seed, slot], active_tasks=self.active_tasks,
                            task_weights=self.task_weights, sampler=self.sampler_name,
                            padded_budget=not self.cfg.packing, embedding_snapshots=self.refresh.snapshots)

    def _start(self, state: dict) -> None:
        self.close()
        self.entries = state["workers"]
        self.counts_by_worker = list(state["counts_by_worker"])
        self.used, self.used_tasks, self.steps = state["used"], dict(state["used_tasks"]), state["steps"]
        self.released, self.released_tasks = state.get("released", 0), dict(state.get("released_tasks", {}))
        self.used_labels = {task: dict(v) for task, v in state.get("used_labels", {}).items()}
        self.used_embeddings = dict(state.get("used_embeddings", {"stored": 0, "fallback": 0}))
        self.used_embeddings.setdefault("refreshed", 0)
        self.last_pulled = [e["last"] if e else -1 for e in self.entries]
        self.switches = [list(e["switches"]) if e else [] for e in self.entries]
        self._last_example = [None] * self.num_producers
        self.stash = [collections.deque() for _ in range(self.num_producers)]
        if self.num_workers == 0:
            self._iters = [self._make_producer(0).iterate(self.entries[0], live_switches=self.switches[0])]
        else:
            if self.sampler_name == "ads" and self.sampler_factory is None:
                from loaders.ads import compile_k_center

                compile_k_center()   # once here, not once per forked worker
            dataset = WorkerDataset(self._make_producer, self.entries)
            self._signal_guard = WorkerSignalGuard()
            # Its own seeded generator: iter(DataLoader) draws the workers' base seed from it, not
            # from torch's global RNG, which LoRA dropout uses (a restart would shift dropout).
            generator = torch.Generator().manual_seed(loader_seed(self.seed, self.rank, self.steps))
            loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                                 collate_fn=keep_as_is, multiprocessing_context="fork",
                                                 worker_init_fn=self._signal_guard.worker_init, generator=generator)
            with self._signal_guard.starting_workers():
                self._loader_iter = iter(loader)
            self._signal_guard.watch(self._loader_iter)
        # Rebuild the waiting queue: each producer replays its waiting examples first, in order.
        waiting = collections.defaultdict(list)
        for worker, ordinal in state["queue"]:
            waiting[worker].append(ordinal)
        replayed = {}
        for worker, ordinals in waiting.items():
            for ordinal in sorted(ordinals):
                example = self._pull_from(worker, update_counts=False)
                if example.origin[1] != ordinal:
                    raise RuntimeError(f"loader resume diverged: worker {worker} replayed ordinal "
                                       f"{example.origin[1]}, expected {ordinal}; the shards changed since the checkpoint")
                replayed[(worker, ordinal)] = example
        self.queue = [replayed[(w, o)] for w, o in state["queue"]]
        self.next_worker = state["next_worker"]

    def _pull_from(self, worker: int, update_counts: bool = True):
        if self.num_workers == 0:
            example = next(self._iters[0])
        else:
            while not self.stash[worker]:
                item = next(self._loader_iter)
                if isinstance(item, WorkerFailure):
                    self.close()   # the failed producer is gone; the stream ends, as without workers
                    item.reraise()
                self.stash[item.origin[0]].append(item)
            example = self.stash[worker].popleft()
        for reason, message, sample in example.skip_warnings:
            self.skip_warnings.warn(reason, message, sample)
        if update_counts:
            self._last_example[worker] = example
            self.last_pulled[worker] = example.origin[1]
            self.counts_by_worker[worker] = dict(example.counts_after, group_end=example.group_end)
        return example

    def _pull(self):
        self._apply_switches()
        example = self._pull_from(self.next_worker)
        self.next_worker = (self.next_worker + 1) % self.num_producers
        return example

    # --- steps ------------------------------------------------------------------------------
    def next_step(self) -> list[dict]:
        """Exactly grad_accum micro-batches, each within data.max_tokens_per_batch padded slots."""
        self.refresh.drain()
        if self.refresh.due(self.sampler_name):
            self.refresh.publish()
            self._record_switch(is_stage=False)
        self._apply_switches()
        micro_batches, stepped = [], []
        for _ in range(self.grad_accum):
            examples = self._next_micro_batch(self.cfg.max_tokens_per_batch)
            for e in examples:
                self._count_used(e)
            stepped += examples
            self.used += len(examples)
            collate_batch = collate_packed if self.cfg.packing else collate
            micro_batches.append(collate_batch(examples, self.pad_token_id))
        self.steps += 1
        self.refresh.expect(stepped)
        return micro_batches

    def refresh_embeddings_from(self, feed) -> None:
        """Refresh ADS's embeddings from the training forward (trainable audio encoder):
        ``feed()`` returns float [n, H], the mean-pooled aligner output of each sample of the
        last step, in the order of its micro-batches and their ``keys`` (engine.aligner_refresh).
        Published to the samplers every schedule.embedding_refresh_every steps of an ADS stage."""
        self.refresh.attach(feed)

    def _next_micro_batch(self, budget: int) -> list:
        """The oldest waiting example's micro-batch: its sampler's selection as chosen (ADS), or
        it and its nearest neighbours in length among the examples that may be regrouped."""
        if not self.queue:
            self.queue.append(self._pull())
        if self.queue[0].selected_together:
            return self._take_selection(self.queue[0], budget)
        while (sum(e.num_tokens for e in self.queue if not e.selected_together) < LOOKAHEAD_BATCHES * budget
               and not self.queue[-1].selected_together):   # past a stage switch to ADS: no more lookahead
            self.queue.append(self._pull())
        free = [i for i, e in enumerate(self.queue) if not e.selected_together]
        select = select_packed_row if self.cfg.packing else select_micro_batch
        chosen = select([self.queue[i].num_tokens for i in free], budget)
        examples = self._take([free[i] for i in chosen])
        assert self._cost(examples) <= budget  # select_micro_batch / select_packed_row guarantee it
        return examples

    def _cost(self, examples) -> int:
        """Token slots of a micro-batch: the lengths' sum when packed, else batch size x longest."""
        lengths = [e.num_tokens for e in examples]
        return sum(lengths) if self.cfg.packing else padded_cost(lengths)

    def _take_selection(self, head, budget: int) -> list:
        worker = head.origin[0]
        while self.last_pulled[worker] < head.group_end:   # the rest of the selection, from its producer
            self.queue.append(self._pull_from(worker))
        examples = self._take([i for i, e in enumerate(self.queue)
                               if e.origin[0] == worker and e.group_start == head.group_start])
        if self._cost(examples) > budget:
            raise RuntimeError(f"sampler selection of {len(examples)} examples costs {self._cost(examples)} token "
                               f"slots, more than data.max_tokens_per_batch={budget}; the sampler must select "
                               "within the micro-batch budget")
        return examples

    def _take(self, indices: list[int]) -> list:
        chosen = set(indices)
        examples = [self.queue[i] for i in indices]
        self.queue = [e for i, e in enumerate(self.queue) if i not in chosen]
        return examples

    def _count_used(self, example) -> None:
        self.used_tasks[example.task] = self.used_tasks.get(example.task, 0) + 1
        if example.label is not None:
            per_label = self.used_labels.setdefault(example.task, {})
            per_label[example.label] = per_label.get(example.label, 0) + 1
        if example.embedding_kind is not None:
            kind = example.embedding_kind
            self.used_embeddings[kind] = self.used_embeddings.get(kind, 0) + 1

    # --- counts -----------------------------------------------------------------------------
    def counts(self) -> dict:
        """Cumulative counts for metrics: {"read", "used", "pending", "skipped": {reason: n},
        "epoch", "tasks": {task: used}, "labels": {"did"/"ser": {label: used}}, "draws" and
        "repeats" ({task: {label or "all": n}}: samples read by the sampler, and reads beyond the
        slot's shards' natural count), "embeddings" (ADS-embedded examples used, by kind:
        refreshed, stored, fallback), "embedding_hit_rate" (share of them with a real aligner
        vector, refreshed or stored; None before any), "embedding_refreshes" (versions
        published), "embedding_cache" (vectors held), "sampler"}.
        "released_at_switch" (examples drawn for a stage and released at the switch to the next,
        never trained on) and "released_tasks" ({task: n} of them).
        read == used + pending + released_at_switch + sum(skipped); pending includes samples held
        by the sampler."""
        read, skipped, pending, epoch = 0, {}, len(self.queue), 0
        draws, repeats = {}, {}
        for worker, c in enumerate(self.counts_by_worker):
            if c is None:
                continue
            read += c["read"]
            for reason, n in c["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + n
            pending += c["buffered"] + (c["group_end"] - self.last_pulled[worker])
            epoch = max(epoch, c["epoch"])
            sampler = c.get("sampler", {})
            pending += sampler.get("pending", 0)
            draws = add_counts(draws, sampler.get("draws", {}))
            repeats = add_counts(repeats, sampler.get("repeats", {}))
        embedded = sum(self.used_embeddings.values())
        real = self.used_embeddings.get("stored", 0) + self.used_embeddings.get("refreshed", 0)
        return {"read": read, "used": self.used, "pending": pending, "released_at_switch": self.released,
                "released_tasks": dict(self.released_tasks), "skipped": skipped, "epoch": epoch,
                "tasks": dict(self.used_tasks), "labels": copy.deepcopy(self.used_labels), "draws": draws,
                "repeats": repeats, "embeddings": dict(self.used_embeddings),
                "embedding_hit_rate": real / embedded if embedded else None, **self.refresh.counts(),
                "sampler": self.sampler_name}

    def close(self) -> None:
        # Stop DataLoader workers now, not when the iterator is collected: a data error's
        # traceback keeps it alive, and a later collection stalls for seconds.
        if self._signal_guard is not None:
            self._signal_guard.release()
            self._signal_guard = None
        getattr(self._loader_iter, "_shutdown_workers", lambda: None)()
        self._loader_iter = None
        self._iters = []
