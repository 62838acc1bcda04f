"""ADS: aligner-based diverse sampling, the drawing and selection core (numba).

Two parts, in data-flow order (the samplers that use them are in loaders.sampling, the
embeddings they compare in loaders.embeddings):

1. Drawing (``BalancedDrawer``, ``ProportionalDrawer``, ``DrawCounter``): which stream to read
   next. A stream is ``(task, label)`` for the label-balanced tasks (did, ser) and
   ``(task, None)`` otherwise; ``(task, None)`` of did/ser is the task's natural stream (all
   labels). ADS balances *by drawing*: active tasks get equal shares (or the stage's weights)
   and inside did/ser each present label gets an equal share of its task, exactly over every
   window of ``window`` draws (remainders carried to the next window); the order inside a
   window is a seeded shuffle. A configured label the data's counts show no example of is absent
   (no stream, ``absent_labels``). Random (natural) mixing draws streams in proportion to the data.
2. Selection (``k_center_select`` numba, ``k_center_select_reference`` NumPy): greedy
   farthest-point (k-center) choice of a micro-batch from a candidate pool under per-group
   quotas and a token budget. Both compute exact integer distances on 16-bit fixed-point unit
   vectors, so they select the same indices bit for bit. The numba core is lazy: a candidate's
   distance to new centers is computed only when its stale bound could make it the farthest.

Repeats (reported per task and label): ``repeats = max(0, draws - natural_count)``, where
``draws`` counts examples of that (task, label) pulled from the streams and ``natural_count``
is the number of such samples this reader's shards hold (shards.json). With each stream reading
its samples once per epoch, this is the number of draws that re-read a sample already read in
this run. Without natural counts, repeats are reported as None.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from numba import njit

from loaders.shards import LABELLED_TASKS
from loaders.tasks import DEFAULT_DIALECTS, DEFAULT_EMOTIONS, TASKS

StreamId = tuple  # (task, label or None)

# Tasks whose labels get equal shares inside the task (closed label sets).
LABEL_BALANCED_TASKS = {"did": DEFAULT_DIALECTS, "ser": DEFAULT_EMOTIONS}

# Unit vectors are stored as int16 with this scale: components are integers in [-2^10, 2^10],
# so every squared distance is an integer below 2^24 (|a - b| <= 2 + rounding, (2 * (2^10 +
# 0.5 * sqrt(D)))^2 < 2^24 for any D < 10^6) and float32 sums of them are exact in any order:
# the numba core (blocked, reassociated sums) and the NumPy reference (einsum) agree bit for bit.
# The step 2^-10 of a unit vector is far below the distances k-center compares (0..2).
QUANT_SCALE = 2 ** 10
_NO_DISTANCE_YET = np.float32(2 ** 30)   # above any squared distance (< 2^24)


class ADSError(ValueError):
    """Bad ADS input; the message names the stream, sample key or setting."""


def example_field(example, name: str, default=None):
    """A field of an example: a dict key or an attribute (loaders.stream.Example)."""
    return example.get(name, default) if isinstance(example, Mapping) else getattr(example, name, default)


# --- 1. drawing -------------------------------------------------------------------------------

def stream_counts(task_counts: Mapping[str, int], label_counts: Mapping[str, Mapping[str, int]] | None = None) -> dict:
    """Natural counts per stream from shards.json-style totals (``tasks`` and ``labels`` of an index)."""
    counts = {(task, None): int(n) for task, n in task_counts.items()}
    for task, per_label in (label_counts or {}).items():
        counts.update({(task, label): int(n) for label, n in per_label.items()})
    return counts


def natural_counts_from_data_counts(data_counts: Mapping) -> dict:
    """Stream counts summed over sources from loaders.stream's ``data_counts``
    (``{source: {"tasks": {task: n}, "labels": {task: {label: n}}}}``)."""
    total: dict[StreamId, int] = {}
    for per_source in data_counts.values():
        for stream, n in stream_counts(per_source.get("tasks", {}), per_source.get("labels", {})).items():
            total[stream] = total.get(stream, 0) + n
    return total


def label_counts_known(task: str, natural_counts: Mapping[StreamId, int] | None) -> bool:
    """Whether ``natural_counts`` say how many examples each label of ``task`` has. shards.json
    (and the JSON scan without it) list only the labels that occur, so a label missing beside
    others of its task, or beside a task count of 0, has none. Without a per-label breakdown for
    a task that has examples (or without counts at all) nothing is known."""
    return natural_counts is not None and (natural_counts.get((task, None)) == 0 or any(
        stream[0] == task and stream[1] is not None for stream in natural_counts))


def absent_labels(tasks: Sequence[str], labels: Mapping[str, Sequence[str]] | None,
                  natural_counts: Mapping[StreamId, int] | None) -> dict[str, list[str]]:
    """Per label-balanced task of ``tasks``: its configured labels known to have no example."""
    labels = {**LABEL_BALANCED_TASKS, **(labels or {})}
    absent = {task: [l for l in labels[task] if natural_counts.get((task, l), 0) <= 0] for task in tasks
              if task in LABEL_BALANCED_TASKS and label_counts_known(task, natural_counts)}
    return {task: missing for task, missing in absent.items() if missing}


# The recipe keys that hold each label-balanced task's label set (loaders.config.DataConfig).
LABEL_SET_KEYS = {task: f"data.{field}" for task, field in LABELLED_TASKS.items()}


def absent_labels_note(labels: Mapping[str, Sequence[str]] | None,
                       natural_counts: Mapping[StreamId, int] | None) -> str | None:
    """One line for the start of a run: which configured labels have no training example, that
    ADS balances over the rest, and how to silence it; None when every label has data. A task
    with no example at all is not a label matter (no sampler draws it) and is not mentioned."""
    labels = {**LABEL_BALANCED_TASKS, **(labels or {})}
    parts, settings = [], []
    for task, missing in absent_labels(list(LABEL_BALANCED_TASKS), labels, natural_counts).items():
        present = [l for l in labels[task] if l not in missing]
        if present:
            parts.append(f"{task} labels {', '.join(missing)} of {LABEL_SET_KEYS[task]} have no training examples; "
                         f"ADS balances {task} over {', '.join(present)}")
            settings.append(f"{LABEL_SET_KEYS[task]}=[{','.join(present)}]")
    if not parts:
        return None
    return f"data: {'; '.join(parts)} (to silence this, set {' '.join(settings)} to the labels you have)"


def absent_labels_note_for(data_cfg, data_counts: Mapping) -> str | None:
    """absent_labels_note from a DataConfig (data.dialects / data.emotions) and TrainStream's
    ``data_counts``: what a run prints at its start when a stage uses ADS."""
    labels = {task: list(getattr(data_cfg, field)) for task, field in LABELLED_TASKS.items()}
    return absent_labels_note(labels, natural_counts_from_data_counts(data_counts))


def balanced_streams(tasks: Sequence[str], labels: Mapping[str, Sequence[str]] | None = None,
                     task_weights: Mapping[str, float] | None = None,
                     natural_counts: Mapping[StreamId, int] | None = None) -> tuple[list, np.ndarray, list]:
    """ADS streams and target shares: equal (or weighted) per task, equal per present label.

    A configured label known to have no example (``absent_labels``: a label the counts of its
    task leave out counts as 0) has no stream and is returned in ``absent``; so is a task known
    to have no example (as ``(task, None)``, or all its labels), whose share goes to the other
    tasks. Where the counts say nothing about a task's labels, all its labels get a stream.
    """
    labels = {**LABEL_BALANCED_TASKS, **(labels or {})}
    missing = absent_labels(tasks, labels, natural_counts)
    streams, shares, absent = [], [], []
    for task in tasks:
        task_share = float((task_weights or {}).get(task, 1.0))
        if task not in LABEL_BALANCED_TASKS:
            if natural_counts is not None and natural_counts.get((task, None)) == 0:
                absent.append((task, None))
                continue
            streams.append((task, None)), shares.append(task_share)
            continue
        present = [l for l in labels[task] if l not in missing.get(task, [])]
        absent += [(task, l) for l in missing.get(task, [])]
        streams += [(task, label) for label in present]
        shares += [task_share / len(present) for _ in present]
    if not streams or np.sum(shares) <= 0:
        raise ADSError(f"none of the stage's tasks {', '.join(tasks)} has training examples (with a label of "
                       "data.dialects / data.emotions for did / ser); add data or change the stage's tasks")
    return streams, np.asarray(shares) / np.sum(shares), absent


class BalancedDrawer:
    """Exact quotas per window of draws, seeded order inside the window (see module doc)."""

    def __init__(self, streams: Sequence[StreamId], shares: np.ndarray, window: int, seed: int):
        if window < len(streams):
            raise ADSError(f"schedule.ads_window={window} is smaller than the {len(streams)} streams it must balance; "
                           f"set it to at least {len(streams)}")
        self.streams, self.shares, self.window = list(streams), np.asarray(shares, np.float64), int(window)
        self._rng = np.random.default_rng(seed)
        self._credit = np.zeros(len(streams))
        self._block = np.zeros(0, np.int64)
        self._pos = 0

    def _plan_window(self) -> None:
        self._credit += self.shares * self.window
        quota = np.maximum(np.floor(self._credit + 1e-9), 0).astype(np.int64)
        missing = self.window - int(quota.sum())
        if missing:   # largest remainders get the leftover draws; ties broken by the seeded RNG
            order = np.lexsort((self._rng.random(len(quota)), -(self._credit - quota)))
            quota[order[:missing]] += 1
        self._credit -= quota
        self._block = np.repeat(np.arange(len(quota)), quota)
        self._rng.shuffle(self._block)
        self._pos = 0

    def next_stream(self) -> StreamId:
        if self._pos >= len(self._block):
            self._plan_window()
        self._pos += 1
        return self.streams[self._block[self._pos - 1]]

    def state_dict(self) -> dict:
        return {"rng": self._rng.bit_generator.state, "credit": self._credit.tolist(),
                "block": self._block.tolist(), "pos": self._pos}

    def load_state_dict(self, state: dict) -> None:
        self._rng.bit_generator.state = state["rng"]
        self._credit = np.asarray(state["credit"], np.float64)
        self._block, self._pos = np.asarray(state["block"], np.int64), int(state["pos"])


class ProportionalDrawer:
    """Natural mixing: task streams drawn in proportion to their sample counts (or weights)."""

    def __init__(self, tasks: Sequence[str], natural_counts: Mapping[StreamId, int] | None,
                 task_weights: Mapping[str, float] | None, seed: int):
        self.streams = [(task, None) for task in tasks]
        if task_weights is not None:
            mass, self.mixing = [task_weights[t] for t in tasks], "weights"
        elif natural_counts is not None and all((t, None) in natural_counts for t in tasks):
            mass, self.mixing = [natural_counts[(t, None)] for t in tasks], "natural"
        else:   # no index to know the data's proportions: equal shares, said in stats()
            mass, self.mixing = [1.0] * len(tasks), "equal (no natural counts)"
        mass = np.asarray(mass, np.float64)
        if mass.sum() <= 0:
            raise ADSError(f"tasks {list(tasks)} have no samples in the index; nothing to draw")
        self.shares = mass / mass.sum()
        self._cdf = np.cumsum(self.shares)
        self._rng = np.random.default_rng(seed)

    def next_stream(self) -> StreamId:
        return self.streams[min(int(np.searchsorted(self._cdf, self._rng.random(), side="right")), len(self.streams) - 1)]

    def state_dict(self) -> dict:
        return {"rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self._rng.bit_generator.state = state["rng"]


class DrawCounter:
    """Draws per (task, label) over the run and the repeats they imply (module doc)."""

    def __init__(self, natural_counts: Mapping[StreamId, int] | None = None):
        self.natural = dict(natural_counts) if natural_counts is not None else None
        self.draws: dict[tuple, int] = {}

    def add(self, example: dict) -> None:
        task = example_field(example, "task")
        key = (task, example_field(example, "label") if task in LABEL_BALANCED_TASKS else None)
        self.draws[key] = self.draws.get(key, 0) + 1

    def repeats(self) -> dict[str, dict[str, int | None]]:
        out: dict[str, dict[str, int | None]] = {}
        for (task, label), n in sorted(self.draws.items(), key=lambda kv: (TASKS.index(kv[0][0]), str(kv[0][1]))):
            natural = None if self.natural is None else self.natural.get((task, label))
            out.setdefault(task, {})["all" if label is None else label] = None if natural is None else max(0, n - natural)
        return out

    def draws_by_task(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (task, label), n in self.draws.items():
            out.setdefault(task, {})["all" if label is None else label] = n
        return out

    def state_dict(self) -> dict:
        return {"draws": [[t, l, n] for (t, l), n in self.draws.items()]}

    def load_state_dict(self, state: dict) -> None:
        self.draws = {(t, l): int(n) for t, l, n in state["draws"]}


# --- 2. selection -----------------------------------------------------------------------------

def quantize_embeddings(embeddings: np.ndarray) -> np.ndarray:
    """[M, D] float -> [M, D] int16 unit vectors (zero vectors stay zero) scaled by QUANT_SCALE."""
    e = np.asarray(embeddings, np.float64)
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    unit = np.divide(e, norms, out=np.zeros_like(e), where=norms > 0)
    return np.rint(unit * QUANT_SCALE).astype(np.int16)


@njit(cache=False, nogil=True, fastmath=True)   # reassociation is exact here (integer sums < 2^24)
def _distance_to_center(codes, j, center_rows, c):
    acc = np.float32(0)
    for k in range(codes.shape[1]):
        diff = np.float32(codes[j, k]) - center_rows[c, k]
        acc += diff * diff
    return acc


@njit(cache=False, nogil=True)
def _heap_push(keys, idx, size, key, i):
    """Max-heap on (key, then lowest index): the order in which the reference's argmax wins."""
    pos = size
    while pos > 0:
        parent = (pos - 1) // 2
        if keys[parent] > key or (keys[parent] == key and idx[parent] < i):
            break
        keys[pos], idx[pos] = keys[parent], idx[parent]
        pos = parent
    keys[pos], idx[pos] = key, i
    return size + 1


@njit(cache=False, nogil=True)
def _heap_pop(keys, idx, size):
    top_key, top = keys[0], idx[0]
    size -= 1
    key, i = keys[size], idx[size]
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and (keys[child + 1] > keys[child] or
                                 (keys[child + 1] == keys[child] and idx[child + 1] < idx[child])):
            child += 1
        if key > keys[child] or (key == keys[child] and i < idx[child]):
            break
        keys[pos], idx[pos] = keys[child], idx[child]
        pos = child
    keys[pos], idx[pos] = key, i
    return top_key, top, size


@njit(cache=False, nogil=True)
def _fits(length, count, longest, spent, token_budget, padded):
    """Whether one more candidate of ``length`` tokens fits after ``count`` picks. ``padded``: the
    micro-batch costs its padded slots (count x longest), else the sum of its lengths. Either
    cost only grows with each pick, so a candidate that no longer fits never fits again."""
    if padded:
        return (count + 1) * max(longest, length) <= token_budget
    return spent + length <= token_budget


@njit(cache=False, nogil=True)
def _pop_farthest(keys, idx, size, spill_keys, spill_idx, spill_size, codes, center_rows, n_centers,
                  min_dist, seen, taken, lengths, fit_state, groups, left, use_quota):
    """Lazy greedy step: pop until the top candidate's distance is up to date (it then is the
    farthest; every other bound is lower or equal with a higher index). Stale candidates are
    compared with the centers they have not seen and pushed back; candidates that no longer fit
    are dropped; with ``use_quota``, candidates of groups without quota go to the spill heap."""
    while size > 0:
        key, j, size = _heap_pop(keys, idx, size)
        if taken[j] or not _fits(lengths[j], n_centers, fit_state[0], fit_state[1], fit_state[2], fit_state[3] != 0):
            continue   # never a candidate again: the cost only grows
        if use_quota and left[groups[j]] <= 0:
            spill_size = _heap_push(spill_keys, spill_idx, spill_size, key, j)
            continue
        if seen[j] < n_centers:
            for c in range(seen[j], n_centers):
                dist = _distance_to_center(codes, j, center_rows, c)
                if dist < min_dist[j]:
                    min_dist[j] = dist
            seen[j] = n_centers
            size = _heap_push(keys, idx, size, min_dist[j], j)
            continue
        return j, size, spill_size
    return -1, size, spill_size


@njit(cache=False, nogil=True)
def _k_center_core(codes, groups, lengths, eligible, forced, quota, token_budget, max_items, start, padded):
    m, d = codes.shape
    limit = min(m, max_items)
    order = np.empty(limit, np.int64)
    center_rows = np.empty((max(limit, 1), d), np.float32)
    taken = np.zeros(m, np.bool_)
    left = quota.copy()
    min_dist = np.full(m, _NO_DISTANCE_YET, np.float32)
    seen = np.zeros(m, np.int64)                  # how many centers min_dist[j] accounts for
    q_keys, q_idx = np.empty(m, np.float32), np.empty(m, np.int64)   # candidates whose group has quota
    r_keys, r_idx = np.empty(m, np.float32), np.empty(m, np.int64)   # the rest (used once quotas run dry)
    q_size, r_size, heaps_built, next_forced = 0, 0, False, 0
    count = 0
    fit_state = np.zeros(4, np.int64)             # longest, spent, token_budget, padded
    fit_state[2], fit_state[3] = token_budget, 1 if padded else 0
    while count < limit:
        pick = -1
        while next_forced < m and pick < 0:       # stale candidates first, lowest index first
            i = next_forced
            next_forced += 1
            if forced[i] and eligible[i] and not taken[i] and _fits(lengths[i], count, fit_state[0], fit_state[1],
                                                                    token_budget, padded):
                pick = i
        if pick < 0 and count == 0:
            if start < 0:
                break
            pick = start
        if pick < 0:
            if not heaps_built:    # one eager pass over the centers so far, then lazy
                for j in range(m):
                    if eligible[j] and not taken[j] and _fits(lengths[j], count, fit_state[0], fit_state[1],
                                                              token_budget, padded):
                        for c in range(count):
                            dist = _distance_to_center(codes, j, center_rows, c)
                            if dist < min_dist[j]:
                                min_dist[j] = dist
                        seen[j] = count
                        if left[groups[j]] > 0:
                            q_size = _heap_push(q_keys, q_idx, q_size, min_dist[j], j)
                        else:
                            r_size = _heap_push(r_keys, r_idx, r_size, min_dist[j], j)
                heaps_built = True
            pick, q_size, r_size = _pop_farthest(q_keys, q_idx, q_size, r_keys, r_idx, r_size, codes, center_rows,
                                                 count, min_dist, seen, taken, lengths, fit_state, groups, left, True)
            if pick < 0:                          # no group with quota has a fitting candidate: fill
                pick, r_size, q_size = _pop_farthest(r_keys, r_idx, r_size, q_keys, q_idx, q_size, codes,
                                                     center_rows, count, min_dist, seen, taken, lengths, fit_state,
                                                     groups, left, False)
            if pick < 0:
                break
        order[count] = pick
        for k in range(d):
            center_rows[count, k] = codes[pick, k]
        count += 1
        taken[pick] = True
        fit_state[0] = max(fit_state[0], lengths[pick])
        fit_state[1] += lengths[pick]
        left[groups[pick]] -= 1
    return order[:count]


def _check_selection_inputs(codes, groups, lengths, eligible, forced, quota):
    m = codes.shape[0]
    if codes.dtype != np.int16 or codes.ndim != 2:
        raise ADSError(f"codes must be an int16 [M, D] array from quantize_embeddings, got {codes.dtype} {codes.shape}")
    for name, arr in (("groups", groups), ("lengths", lengths), ("eligible", eligible), ("forced", forced)):
        if arr.shape != (m,):
            raise ADSError(f"{name} must have shape ({m},) to match the {m} candidates, got {arr.shape}")
    if m and (groups.min() < 0 or groups.max() >= len(quota)):
        raise ADSError(f"group ids must lie in [0, {len(quota)}) (one quota per group)")


def k_center_select(codes, groups, lengths, quota, token_budget, start, eligible=None, forced=None, max_items=None,
                    padded=False):
    """Greedy farthest-point selection (numba). Returns selected candidate indices, in order.

    ``codes`` are quantize_embeddings() output. Picks: stale (``forced``) candidates first in index order, else ``start``; then repeatedly
    the candidate farthest (squared L2 on ``codes``) from everything picked, among eligible,
    unpicked candidates that fit the token budget and whose group has quota left (the cost of a
    selection is the sum of its lengths, or with ``padded`` its padded slots: count x longest);
    when no such candidate exists, quotas are relaxed to fill the budget. Ties: lowest index.
    Evaluation is lazy (a max-heap of stale nearest-center distances, refreshed on demand), which
    picks exactly what the eager NumPy reference picks while computing far fewer distances.
    """
    m = codes.shape[0]
    eligible = np.ones(m, np.bool_) if eligible is None else np.asarray(eligible, np.bool_)
    forced = np.zeros(m, np.bool_) if forced is None else np.asarray(forced, np.bool_)
    groups, lengths = np.asarray(groups, np.int64), np.asarray(lengths, np.int64)
    quota = np.asarray(quota, np.int64)
    _check_selection_inputs(codes, groups, lengths, eligible, forced, quota)
    return _k_center_core(codes, groups, lengths, eligible, forced, quota, np.int64(token_budget),
                          np.int64(m if max_items is None else max_items), np.int64(start), bool(padded))


def compile_k_center() -> None:
    """Compile the numba core now (a few seconds, once per process). Called before DataLoader
    workers fork, so that each worker inherits the compiled code instead of compiling its own."""
    codes = quantize_embeddings(np.eye(2))
    k_center_select(codes, np.zeros(2, np.int64), np.ones(2, np.int64), np.array([2]), 2, 0, padded=True)


def k_center_select_reference(codes, groups, lengths, quota, token_budget, start, eligible=None, forced=None,
                              max_items=None, padded=False):
    """The same selection in vectorized NumPy (distances for all candidates at once per pick)."""
    m = codes.shape[0]
    eligible = np.ones(m, bool) if eligible is None else np.asarray(eligible, bool)
    forced = np.zeros(m, bool) if forced is None else np.asarray(forced, bool)
    groups, lengths, left = np.asarray(groups, np.int64), np.asarray(lengths, np.int64), np.array(quota, np.int64)
    _check_selection_inputs(codes, groups, lengths, eligible, forced, left)
    max_items = m if max_items is None else max_items
    codes32 = codes.astype(np.float32)
    taken = np.zeros(m, bool)
    min_dist = np.full(m, _NO_DISTANCE_YET, np.float32)
    spent, longest, order = 0, 0, []
    while len(order) < max_items:
        if padded:
            fits = (len(order) + 1) * np.maximum(longest, lengths) <= token_budget
        else:
            fits = spent + lengths <= token_budget
        candidates = eligible & ~taken & fits
        stale = candidates & forced
        if stale.any():
            pick = int(np.argmax(stale))
        elif not order:
            if start < 0:
                break
            pick = int(start)
        else:
            with_quota = candidates & (left[groups] > 0)
            mask = with_quota if with_quota.any() else candidates
            if not mask.any():
                break
            pick = int(np.argmax(np.where(mask, min_dist, -1)))
        order.append(pick)
        taken[pick] = True
        spent, longest = spent + int(lengths[pick]), max(longest, int(lengths[pick]))
        left[groups[pick]] -= 1
        diff = codes32 - codes32[pick]
        np.minimum(min_dist, np.einsum("ij,ij->i", diff, diff), out=min_dist)
    return np.asarray(order, np.int64)


def pick_start(rng: np.random.Generator, groups, lengths, quota, token_budget, eligible) -> int:
    """Seeded start: a uniform choice among eligible candidates that fit and have group quota
    (any fitting eligible candidate when no group with quota has one); -1 when none fits."""
    fits = np.asarray(eligible) & (np.asarray(lengths) <= token_budget)
    with_quota = fits & (np.asarray(quota)[groups] > 0)
    choices = np.flatnonzero(with_quota if with_quota.any() else fits)
    return int(choices[rng.integers(len(choices))]) if len(choices) else -1
