"""Training schedules: stages of active tasks and samplers (random, TPC, ADS, hybrid).

A schedule is a list of stages. Each stage names its active tasks, its sampler (``random``:
natural mixing, or ``ads``: aligner-based diverse sampling, see loaders/ads.py), optional
mixing weights and its length. A recipe's ``schedule`` section holds the stages::

    schedule:
      name: hybrid            # random | tpc | ads | hybrid: default stages when `stages` is absent
      replay: true            # TPC: earlier tasks stay in later stages (false, or a weight in (0, 1))
      stages:                 # optional; replaces the defaults of `name`
        - {name: asr, tasks: [asr], steps: 0.25}
        - {name: asr+sum, tasks: [asr, sum], steps: 100}
        - {name: all, tasks: all, sampler: ads}

Stage length: ``steps`` or ``tokens`` (one unit for the whole schedule). An int >= 1 is
absolute; a float in (0, 1] is a fraction of the run's ``max_steps`` / ``max_tokens``.
Fractions are turned into boundaries by cumulative rounding (``round(sum of fractions *
total)``) so rounding never accumulates. The last stage may omit its length and always runs
to the end of the run. Lengths count from the start of the stage.

This module is dependency-free (no numpy): the engine's config composes ``ScheduleConfig``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from loaders.tasks import TASKS

SAMPLERS = ("random", "ads")
SCHEDULE_NAMES = ("random", "tpc", "ads", "hybrid")
LENGTH_UNITS = ("steps", "tokens")
STAGE_KEYS = ("name", "tasks", "sampler", "weights") + LENGTH_UNITS

# TPC stage order: the task hierarchy (core acoustic mapping, then summarization, then the
# paralinguistic tasks). The paper's abstract gives the order, not the lengths.
TPC_STAGE_TASKS = (("asr",), ("sum",), ("did", "ser"))

# Default stage fractions of the run. The paper's lengths are not available to us; these are
# this project's choices: TPC gives the ASR foundation and the ASR+SUM stage a quarter each
# and the full task set the remaining half; hybrid shortens the TPC stages so that the ADS
# refinement (volatile for generative decoding when run long) gets the last 35%.
TPC_FRACTIONS = (0.25, 0.25, None)              # None: the rest of the run
HYBRID_FRACTIONS = (0.15, 0.20, 0.30, None)     # three TPC stages, then ADS for the rest


class ScheduleError(ValueError):
    """A schedule section that cannot be run; the message names the stage and key."""


@dataclass(frozen=True)
class Stage:
    """One stage: active tasks, sampler, mixing weights, length (resolved by Schedule).

    ``weights`` None means natural mixing for ``random`` (in proportion to the data) and equal
    task shares for ``ads``; otherwise a weight per active task (normalized by the sampler).
    ``length`` is the value given in the recipe (int = absolute, float = fraction of the run,
    None = the rest of the run) in ``unit`` ("steps" or "tokens").
    """
    name: str
    tasks: tuple[str, ...]
    sampler: str = "random"
    weights: Mapping[str, float] | None = None
    unit: str = "steps"
    length: int | float | None = None

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "tasks": list(self.tasks), "sampler": self.sampler}
        if self.weights is not None:
            out["weights"] = dict(self.weights)
        if self.length is not None:
            out[self.unit] = self.length
        return out


def _where(index: int, raw: Mapping) -> str:
    name = raw.get("name") if isinstance(raw, Mapping) else None
    return f"schedule.stages[{index}]" + (f" ({name!r})" if name else "")


def _parse_tasks(where: str, value: Any) -> tuple[str, ...]:
    if value == "all":
        return TASKS
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ScheduleError(f"{where}: 'tasks' must be a non-empty list of {list(TASKS)} or 'all', got {value!r}")
    unknown = [task for task in value if task not in TASKS]
    if unknown:
        raise ScheduleError(f"{where}: unknown task {unknown[0]!r} in 'tasks'; expected some of {list(TASKS)}")
    if len(set(value)) != len(value):
        raise ScheduleError(f"{where}: 'tasks' lists a task twice: {list(value)}")
    return tuple(task for task in TASKS if task in value)


def _parse_weights(where: str, value: Any, tasks: Sequence[str]) -> dict[str, float] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ScheduleError(f"{where}: 'weights' must map each active task to a weight, got {value!r}")
    if set(value) != set(tasks):
        raise ScheduleError(
            f"{where}: 'weights' must name exactly the stage's tasks {list(tasks)}, got {sorted(value)}; "
            "leave 'weights' out for natural mixing")
    weights = {}
    for task in tasks:
        weight = value[task]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise ScheduleError(f"{where}: 'weights.{task}' must be a positive number, got {weight!r}")
        weights[task] = float(weight)
    return weights


def _parse_length(where: str, unit: str, value: Any) -> int | float:
    """An int >= 1 (absolute), a float in (0, 1] (fraction), or a whole float > 1 (absolute)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ScheduleError(f"{where}: '{unit}' must be a number (int >= 1 absolute, or a fraction in (0, 1]), got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ScheduleError(f"{where}: '{unit}' must be >= 1, got {value}")
        return value
    if 0 < value <= 1:
        return float(value)
    if value > 1 and value.is_integer():
        return int(value)
    raise ScheduleError(f"{where}: '{unit}' = {value} is neither a fraction in (0, 1] nor a whole number of {unit}")


def parse_stage(index: int, raw: Any) -> Stage:
    """One recipe stage dict -> Stage (length not yet resolved against the run)."""
    if not isinstance(raw, Mapping):
        raise ScheduleError(f"schedule.stages[{index}] must be a mapping with keys {list(STAGE_KEYS)}, got {raw!r}")
    where = _where(index, raw)
    unknown = [key for key in raw if key not in STAGE_KEYS]
    if unknown:
        raise ScheduleError(f"{where}: unknown key {unknown[0]!r}; allowed keys are {list(STAGE_KEYS)}")
    if "tasks" not in raw:
        raise ScheduleError(f"{where}: missing key 'tasks' (a list of {list(TASKS)} or 'all')")
    tasks = _parse_tasks(where, raw["tasks"])
    sampler = raw.get("sampler", "random")
    if sampler not in SAMPLERS:
        raise ScheduleError(f"{where}: 'sampler' must be one of {list(SAMPLERS)}, got {sampler!r}")
    units = [unit for unit in LENGTH_UNITS if raw.get(unit) is not None]
    if len(units) > 1:
        raise ScheduleError(f"{where}: give the length in 'steps' or in 'tokens', not both")
    unit = units[0] if units else "steps"
    length = _parse_length(where, unit, raw[unit]) if units else None
    name = raw.get("name") or "+".join(tasks)
    if not isinstance(name, str):
        raise ScheduleError(f"{where}: 'name' must be a string, got {name!r}")
    weights = _parse_weights(where, raw.get("weights"), tasks)
    return Stage(name=name, tasks=tasks, sampler=sampler, weights=weights, unit=unit, length=length)


class Schedule:
    """Stages with resolved boundaries; ``stage_at(step, tokens)`` is a pure function.

    ``step`` is the number of optimizer steps already taken (the step about to run), ``tokens``
    the cumulative real tokens consumed before it. Stage ``i`` covers ``[starts[i], ends[i])``
    in the schedule's unit; the last stage's end is None (it runs to the end of the run). A
    token-measured switch happens at the first step that starts at or past the boundary.
    Being pure, a resumed run lands in the right stage from (step, tokens) alone.
    """

    def __init__(self, stages: Sequence[Stage], max_steps: int | None = None, max_tokens: int | None = None):
        if not stages:
            raise ScheduleError("schedule.stages is empty: give at least one stage")
        names = [stage.name for stage in stages]
        for index, name in enumerate(names):
            if names.index(name) != index:
                raise ScheduleError(f"schedule.stages[{index}]: stage name {name!r} is used twice; names must be unique")
        given = [(i, s.unit) for i, s in enumerate(stages) if s.length is not None]
        self.unit = given[0][1] if given else "steps"
        for index, unit in given:
            if unit != self.unit:
                raise ScheduleError(
                    f"{_where(index, {'name': stages[index].name})}: length given in '{unit}' but earlier stages use "
                    f"'{self.unit}'; one schedule uses one unit")
        self.stages = tuple(stages)
        self.max_steps, self.max_tokens = max_steps, max_tokens
        self.total = max_steps if self.unit == "steps" else max_tokens
        self.ends = self._resolve_ends()
        self.starts = (0,) + tuple(self.ends[:-1])

    def _resolve_ends(self) -> tuple[int | None, ...]:
        total_key = "max_steps" if self.unit == "steps" else "max_tokens"
        ends: list[int | None] = []
        cumulative_fraction, absolute = 0.0, 0
        previous_end = 0
        last = len(self.stages) - 1
        for index, stage in enumerate(self.stages):
            where = _where(index, {"name": stage.name})
            if stage.length is None:
                if index != last:
                    raise ScheduleError(f"{where}: missing '{self.unit}'; only the last stage may run to the end")
                ends.append(None)
                break
            if isinstance(stage.length, float):
                if not self.total:
                    raise ScheduleError(
                        f"{where}: '{self.unit}: {stage.length}' is a fraction of the run, but the run has no "
                        f"{total_key}; set {total_key} or give an absolute length")
                cumulative_fraction += stage.length
            else:
                absolute += stage.length
            end = absolute + (round(cumulative_fraction * self.total) if cumulative_fraction else 0)
            if end <= previous_end:
                raise ScheduleError(
                    f"{where}: '{self.unit}: {stage.length}' resolves to 0 {self.unit} of the {total_key}={self.total} run"
                    f"; raise {total_key} or give an absolute length")
            if self.total and end > self.total:
                raise ScheduleError(
                    f"{where}: ends at {end} {self.unit} but the run stops at {total_key}={self.total}; "
                    "shorten the stages or raise the run length")
            if self.total and end == self.total and index != last:
                nxt = self.stages[index + 1].name
                raise ScheduleError(f"{where}: ends at the end of the run, so stage {nxt!r} would never start")
            ends.append(end)
            previous_end = end
        ends[-1] = None     # the last stage always runs to the end of the run
        return tuple(ends)

    def __len__(self) -> int:
        return len(self.stages)

    def stage_at(self, step: int, tokens: int) -> tuple[int, Stage]:
        """(index, Stage) active for the step about to run."""
        position = step if self.unit == "steps" else tokens
        for index, end in enumerate(self.ends):
            if end is None or position < end:
                return index, self.stages[index]
        raise AssertionError("unreachable: the last stage has no end")

    def describe(self) -> list[str]:
        """One line per stage, for the run log."""
        lines = []
        for index, stage in enumerate(self.stages):
            end = "end" if self.ends[index] is None else self.ends[index]
            lines.append(f"stage {index} {stage.name!r}: {self.unit} [{self.starts[index]}, {end}) "
                         f"tasks={','.join(stage.tasks)} sampler={stage.sampler}"
                         + (f" weights={dict(stage.weights)}" if stage.weights else ""))
        return lines

    def to_list(self) -> list[dict]:
        return [stage.to_dict() for stage in self.stages]


def _tpc_stages(replay: bool | float, fractions: Sequence[float | None], unit: str) -> list[dict]:
    stages, seen = [], []
    for new_tasks, fraction in zip(TPC_STAGE_TASKS, fractions):
        stage: dict[str, Any] = {"name": "+".join(seen + list(new_tasks)), "sampler": "random"}
        if replay is False or not seen:
            stage["tasks"] = list(new_tasks)
        elif replay is True:
            stage["tasks"] = seen + list(new_tasks)
        else:   # a weight: earlier tasks replayed at `replay` relative to the stage's new tasks
            stage["tasks"] = seen + list(new_tasks)
            stage["weights"] = {**{t: float(replay) for t in seen}, **{t: 1.0 for t in new_tasks}}
        if not replay:
            stage["name"] = "+".join(new_tasks)
        if fraction is not None:
            stage[unit] = fraction
        stages.append(stage)
        seen += list(new_tasks)
    return stages


def default_schedule(name: str, replay: bool | float = True, unit: str = "steps") -> list[dict]:
    """The recipe-form stage list for a named schedule (see the module and DESIGN.md).

    random: all tasks, natural mixing, the whole run. ads: ADS over all tasks, the whole run.
    tpc: [asr] 25% -> [asr, sum] 25% -> [asr, sum, did, ser] rest. hybrid: [asr] 15% ->
    [asr, sum] 20% -> [all] 30% (random sampler) -> ADS over all tasks for the rest (35%).
    ``replay``: True keeps earlier tasks in later TPC stages at their natural share; False
    trains each stage on its new tasks only; a float in (0, 1) keeps them at that weight
    relative to each new task (explicit weights replace natural mixing in those stages).
    """
    if name not in SCHEDULE_NAMES:
        raise ScheduleError(f"schedule.name must be one of {list(SCHEDULE_NAMES)}, got {name!r}")
    if unit not in LENGTH_UNITS:
        raise ScheduleError(f"stage length unit must be one of {list(LENGTH_UNITS)}, got {unit!r}")
    if not isinstance(replay, bool) and not (isinstance(replay, (int, float)) and 0 < replay < 1):
        raise ScheduleError(f"schedule.replay must be true, false or a weight in (0, 1), got {replay!r}")
    if name == "random":
        return [{"name": "random", "tasks": list(TASKS), "sampler": "random"}]
    if name == "ads":
        return [{"name": "ads", "tasks": list(TASKS), "sampler": "ads"}]
    if name == "tpc":
        return _tpc_stages(replay, TPC_FRACTIONS, unit)
    stages = _tpc_stages(replay, HYBRID_FRACTIONS[:3], unit)
    stages.append({"name": "ads", "tasks": list(TASKS), "sampler": "ads"})
    return stages


# ADS defaults (recipe keys schedule.ads_*). Pool: 256 candidates give a 16-sample micro-batch
# a 16x wider choice at a selection cost far below a training step (see profiling/bench_ads.py).
DEFAULT_ADS_POOL = 256
# Quota window: 480 draws is a multiple of the stream count of every default task subset
# (4 tasks; 2 + 5 dialects + 4 emotions = 11 streams gives a remainder carried to the next window).
DEFAULT_ADS_WINDOW = 480
# A candidate not chosen after this many selections is taken first (bounded staleness: k-center
# keeps outliers and would otherwise leave central samples in the pool forever).
DEFAULT_ADS_MAX_WAIT = 64
# Dimension of the vectors ADS compares: stored aligner outputs (3584 at 7B) and the fallback
# projection are both brought to this size (random projections keep distances, Johnson-Lindenstrauss).
DEFAULT_EMBEDDING_DIM = 256
# With a trainable audio encoder (model.train_audio_encoder=true) the training forward refreshes
# ADS's embeddings. Cache: 4096 samples x 256 dims in float16 = 2 MiB per rank and per snapshot
# kept for resume (usually two), small next to a checkpoint; a sample not seen recently falls
# back to its stored or projected vector. Hand-over to ADS every 25 steps: in the training
# process (data.num_workers=0) it costs one re-embedding of the pool (milliseconds); with
# worker processes the workers restart and re-read the pool (about 2-4 s at the default pool on
# two CPU cores, measured), which every 25 steps of a GPU run's multi-second steps stays a few %.
DEFAULT_EMBEDDING_CACHE = 4096
DEFAULT_EMBEDDING_REFRESH_EVERY = 25


@dataclass
class ScheduleConfig:
    """The recipe's ``schedule`` section (typed; the engine's config composes it)."""
    name: str = "random"
    stages: list[dict] | None = None        # None: default_schedule(name, replay)
    replay: bool | float = True
    ads_pool: int = DEFAULT_ADS_POOL
    ads_window: int = DEFAULT_ADS_WINDOW
    ads_max_wait: int = DEFAULT_ADS_MAX_WAIT
    embedding_dim: int = DEFAULT_EMBEDDING_DIM
    embedding_cache: int = DEFAULT_EMBEDDING_CACHE
    embedding_refresh_every: int = DEFAULT_EMBEDDING_REFRESH_EVERY
    extra: dict = field(default_factory=dict, repr=False)   # unknown keys land here -> error in validate()

    def validate(self) -> None:
        if self.extra:
            raise ScheduleError(f"schedule: unknown key {sorted(self.extra)[0]!r}; allowed keys are "
                                f"{[f for f in self.__dataclass_fields__ if f != 'extra']}")
        if self.name not in SCHEDULE_NAMES:
            raise ScheduleError(f"schedule.name must be one of {list(SCHEDULE_NAMES)}, got {self.name!r}")
        for key in ("ads_pool", "ads_window", "ads_max_wait", "embedding_dim", "embedding_cache",
                    "embedding_refresh_every"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ScheduleError(f"schedule.{key} must be a positive integer, got {value!r}")
        if not isinstance(self.replay, bool) and not (isinstance(self.replay, (int, float)) and 0 < self.replay < 1):
            raise ScheduleError(f"schedule.replay must be true, false or a weight in (0, 1), got {self.replay!r}")
        if self.stages is not None and not isinstance(self.stages, list):
            raise ScheduleError(f"schedule.stages must be a list of stage mappings, got {type(self.stages).__name__}")

    @classmethod
    def from_dict(cls, section: Mapping[str, Any] | None) -> "ScheduleConfig":
        section = dict(section or {})
        known = {key: section.pop(key) for key in list(section) if key in cls.__dataclass_fields__ and key != "extra"}
        config = cls(**known, extra=section)
        config.validate()
        return config

    def stage_dicts(self, unit: str = "steps") -> list[dict]:
        return list(self.stages) if self.stages is not None else default_schedule(self.name, self.replay, unit)

    def build(self, max_steps: int | None, max_tokens: int | None) -> Schedule:
        """Schedule for a run of max_steps (preferred for default fractions) or max_tokens."""
        self.validate()
        unit = "steps" if max_steps or not max_tokens else "tokens"
        stages = [parse_stage(index, raw) for index, raw in enumerate(self.stage_dicts(unit))]
        return Schedule(stages, max_steps=max_steps, max_tokens=max_tokens)


class ScheduledSampler:
    """Micro-batches for a Schedule: the stage's sampler over the stage's tasks, switched on the fly.

    ``pull(task, label) -> example`` reads one example from a stream (label None: the task's
    natural stream; a label of did/ser: that label's stream); see loaders/ads.py for the
    example fields. ``next_batch(step, tokens)`` returns ``(stage_index, examples)``; the stage
    comes from ``schedule.stage_at(step, tokens)``. At a switch nothing read is lost: samples
    pending in the old stage's sampler move to the new one if their task is active, else they
    wait (``parked``) for a later stage with their task. Streams of inactive tasks are not read.

    Resume: ``state_dict()`` holds the key and stream offset of every pending sample. Step each
    stream back from its checkpointed position by ``rewind_counts()[stream]`` (taken together
    with the state), then ``load_state_dict``; the pending samples are re-read (and checked by
    key) at the next batch, so the batch sequence continues exactly.
    """

    def __init__(self, schedule: Schedule, pull, *, token_budget: int, config: ScheduleConfig | None = None,
                 labels: Mapping[str, Sequence[str]] | None = None, natural_counts: Mapping | None = None,
                 max_items: int | None = None, seed: int = 0, implementation: str = "numba", embed=None):
        from loaders.ads import DrawCounter   # numba: loaded only where batches are drawn
        from loaders.sampling import StreamPuller
        self.schedule, self.config = schedule, config or ScheduleConfig()
        self.token_budget, self.labels, self.natural_counts = token_budget, labels, natural_counts
        self.max_items, self.seed, self.implementation, self.embed = max_items, seed, implementation, embed
        self.puller = StreamPuller(pull, DrawCounter(natural_counts))
        self.stage_index: int | None = None
        self.sampler = None
        self._parked: list = []
        self._restore: list | None = None
        self._sampler_state: dict | None = None
        self._restore_offsets: Mapping | None = None

    def _build_sampler(self, index: int):
        from loaders.sampling import ADSSampler, ProportionalSampler
        stage = self.schedule.stages[index]
        common = dict(token_budget=self.token_budget, task_weights=stage.weights, natural_counts=self.natural_counts,
                      max_items=self.max_items, seed=[self.seed, index], puller=self.puller)
        if stage.sampler == "random":
            return ProportionalSampler(None, stage.tasks, **common)
        return ADSSampler(None, stage.tasks, labels=self.labels, pool_size=self.config.ads_pool,
                          window=self.config.ads_window, max_wait=self.config.ads_max_wait,
                          embedding_dim=self.config.embedding_dim, implementation=self.implementation, embed=self.embed,
                          **common)

    def _enter_stage(self, index: int) -> None:
        pending = self.sampler.take_pending() if self.sampler is not None else []
        self.stage_index, self.sampler = index, self._build_sampler(index)
        self._hand_over(pending + self._parked)

    def _hand_over(self, items: list) -> None:
        active = set(self.schedule.stages[self.stage_index].tasks)
        self._parked = [item for item in items if item.stream[0] not in active]
        self.sampler.adopt([item for item in items if item.stream[0] in active])

    def next_batch(self, step: int, tokens: int) -> tuple[int, list[dict]]:
        index, _ = self.schedule.stage_at(step, tokens)
        if self._restore is not None:
            if self._restore:
                self._hand_over(self.puller.redraw(self._restore, self._restore_offsets))
            self._restore = None
        if index != self.stage_index:
            self._enter_stage(index)
        return index, self.sampler.next_batch()

    def pending_records(self) -> list[list]:
        """Every sample read but not yet in a batch (sampler pool/queue and parked), as records."""
        if self._restore is not None:
            return self._restore
        sampler_records = self.sampler.pending_records() if self.sampler is not None else []
        return [item.record() for item in self._parked] + sampler_records

    def rewind_counts(self) -> dict:
        """Per stream, how far to step back from the checkpointed position before resuming."""
        return self.puller.rewind_counts(self.pending_records())

    def stats(self) -> dict:
        out = self.sampler.stats() if self.sampler is not None else {}
        return {**out, "stage": self.stage_index, "parked": len(self._parked)}

    def state_dict(self) -> dict:
        if self._restore is not None:
            sampler_state = self._sampler_state
        else:
            sampler_state = self.sampler.state_dict() if self.sampler is not None else None
            if sampler_state is not None:
                sampler_state = {k: v for k, v in sampler_state.items() if k not in ("pool", "pending")}
        return {"stage_index": self.stage_index, "sampler": sampler_state, "pending": self.pending_records(),
                "puller": self.puller.state_dict()}

    def load_state_dict(self, state: dict, stream_offsets: Mapping | None = None) -> None:
        """Restore. ``stream_offsets``: where the restored streams stand, in this run's pull counts
        (default: stepped back by ``rewind_counts()``); see loaders.sampling.StreamPuller.redraw."""
        self.puller.load_state_dict(state["puller"])
        self._restore_offsets = stream_offsets
        self.stage_index, self._parked = state["stage_index"], []
        self.sampler, self._sampler_state = None, state["sampler"]
        if self.stage_index is not None:
            self.sampler = self._build_sampler(self.stage_index)
            self.sampler.load_state_dict({**state["sampler"], "pool": [], "pending": []}, redraw=False)
        self._restore = [list(r) for r in state["pending"]]
