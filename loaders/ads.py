"""ADS: aligner-based diverse sampling (task/label quotas + k-center selection, numba core).

Four parts, in data-flow order:

1. Drawing (``BalancedDrawer``, ``ProportionalDrawer``, ``DrawCounter``): which stream to read
   next. A stream is ``(task, label)`` for the label-balanced tasks (did, ser) and
   ``(task, None)`` otherwise; ``(task, None)`` of did/ser is the task's natural stream (all
   labels). ADS balances *by drawing*: active tasks get equal shares (or the stage's weights)
   and inside did/ser each present label gets an equal share of its task, exactly over every
   window of ``window`` draws (remainders carried to the next window); the order inside a
   window is a seeded shuffle. Random (natural) mixing draws streams in proportion to the data.
2. Selection (``k_center_select`` numba, ``k_center_select_reference`` NumPy): greedy
   farthest-point (k-center) choice of a micro-batch from a candidate pool under per-group
   quotas and a token budget. Both compute exact integer distances on 16-bit fixed-point unit
   vectors, so they select the same indices bit for bit. The numba core is lazy: a candidate's
   distance to new centers is computed only when its stale bound could make it the farthest.
3. ``ADSSampler``: pulls examples through ``pull(task, label)``, keeps the pool, returns
   micro-batches; ``ProportionalSampler`` is the natural-mixing baseline with the same API.
   Both also implement loaders.stream's Sampler protocol (``next_examples(source, budget)``).
4. Embeddings (``EmbeddingSource``): stored aligner vectors (sidecar ``<shard>.emb.npz`` or a
   ``<key>.emb.npy`` member) or ``fallback_embedding``, a fixed projection of mean log-mel.

Repeats (reported per task and label): ``repeats = max(0, draws - natural_count)``, where
``draws`` counts examples of that (task, label) pulled from the streams and ``natural_count``
is the number of such samples this rank's shards hold (shards.json). With each stream reading
its samples once per epoch, this is exactly the number of draws that re-read a sample already
read in this run. Without natural counts, repeats are reported as None.
"""
from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Mapping, Sequence

import numpy as np
from numba import njit

from loaders.curriculum import DEFAULT_ADS_MAX_WAIT, DEFAULT_ADS_POOL, DEFAULT_ADS_WINDOW, DEFAULT_EMBEDDING_DIM
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


def balanced_streams(tasks: Sequence[str], labels: Mapping[str, Sequence[str]] | None = None,
                     task_weights: Mapping[str, float] | None = None,
                     natural_counts: Mapping[StreamId, int] | None = None) -> tuple[list, np.ndarray, list]:
    """ADS streams and target shares: equal (or weighted) per task, equal per present label.

    A label whose natural count is known to be 0 has no stream (returned in ``absent``).
    """
    labels = {**LABEL_BALANCED_TASKS, **(labels or {})}
    weights = np.array([float((task_weights or {}).get(task, 1.0)) for task in tasks])
    weights /= weights.sum()
    streams, shares, absent = [], [], []
    for task, task_share in zip(tasks, weights):
        if task not in LABEL_BALANCED_TASKS:
            streams.append((task, None)), shares.append(task_share)
            continue
        present = [l for l in labels[task] if natural_counts is None or natural_counts.get((task, l), 1) > 0]
        absent += [(task, l) for l in labels[task] if l not in present]
        if not present:
            raise ADSError(f"task {task!r} is active but none of its labels {list(labels[task])} has samples; "
                           "remove it from the stage or add data")
        streams += [(task, label) for label in present]
        shares += [task_share / len(present)] * len(present)
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
def _pop_farthest(keys, idx, size, spill_keys, spill_idx, spill_size, codes, center_rows, n_centers,
                  min_dist, seen, taken, lengths, budget, groups, left, use_quota):
    """Lazy greedy step: pop until the top candidate's distance is up to date (it then is the
    farthest; every other bound is lower or equal with a higher index). Stale candidates are
    compared with the centers they have not seen and pushed back; candidates that no longer fit
    are dropped; with ``use_quota``, candidates of groups without quota go to the spill heap."""
    while size > 0:
        key, j, size = _heap_pop(keys, idx, size)
        if taken[j] or lengths[j] > budget:
            continue   # never a candidate again: the budget only shrinks
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
def _k_center_core(codes, groups, lengths, eligible, forced, quota, token_budget, max_items, start):
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
    budget, count = token_budget, 0
    while count < limit:
        pick = -1
        while next_forced < m and pick < 0:       # stale candidates first, lowest index first
            i = next_forced
            next_forced += 1
            if forced[i] and eligible[i] and not taken[i] and lengths[i] <= budget:
                pick = i
        if pick < 0 and count == 0:
            if start < 0:
                break
            pick = start
        if pick < 0:
            if not heaps_built:    # one eager pass over the centers so far, then lazy
                for j in range(m):
                    if eligible[j] and not taken[j] and lengths[j] <= budget:
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
                                                 count, min_dist, seen, taken, lengths, budget, groups, left, True)
            if pick < 0:                          # no group with quota has a fitting candidate: fill
                pick, r_size, q_size = _pop_farthest(r_keys, r_idx, r_size, q_keys, q_idx, q_size, codes,
                                                     center_rows, count, min_dist, seen, taken, lengths, budget,
                                                     groups, left, False)
            if pick < 0:
                break
        order[count] = pick
        for k in range(d):
            center_rows[count, k] = codes[pick, k]
        count += 1
        taken[pick] = True
        budget -= lengths[pick]
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


def k_center_select(codes, groups, lengths, quota, token_budget, start, eligible=None, forced=None, max_items=None):
    """Greedy farthest-point selection (numba). Returns selected candidate indices, in order.

    ``codes`` are quantize_embeddings() output. Picks: stale (``forced``) candidates first in index order, else ``start``; then repeatedly
    the candidate farthest (squared L2 on ``codes``) from everything picked, among eligible,
    unpicked candidates that fit the remaining token budget and whose group has quota left;
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
                          np.int64(m if max_items is None else max_items), np.int64(start))


def k_center_select_reference(codes, groups, lengths, quota, token_budget, start, eligible=None, forced=None,
                              max_items=None):
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
    budget, order = int(token_budget), []
    while len(order) < max_items:
        candidates = eligible & ~taken & (lengths <= budget)
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
        budget -= int(lengths[pick])
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


# --- 4. embeddings ----------------------------------------------------------------------------

N_MELS = 128                          # Whisper log-mel bins used by the loader (BRIEF: feature_size=128)
# Fixed seeds of the random projections, so that every run and every rank projects alike.
FALLBACK_PROJECTION_SEED = 2601_12494   # the paper's arXiv number: fallback of mean log-mel
STORED_PROJECTION_SEED = 2601_12495     # stored aligner vectors whose size differs from the ADS dim
SIDECAR_SUFFIX = ".emb.npz"             # <shard stem>.emb.npz beside <shard stem>.tar
SIDECAR_FORMAT = 1


@lru_cache(maxsize=16)
def _projection(in_dim: int, out_dim: int, seed: int) -> np.ndarray:
    # Gaussian projection scaled by 1/sqrt(out_dim): distances are kept in expectation (JL).
    return (np.random.default_rng(seed).standard_normal((in_dim, out_dim)) / np.sqrt(out_dim)).astype(np.float32)


def fallback_embedding(mean_logmel: np.ndarray, dim: int = DEFAULT_EMBEDDING_DIM,
                       seed: int = FALLBACK_PROJECTION_SEED) -> np.ndarray:
    """Embedding of a sample with no stored aligner vector: a fixed seeded random projection of
    its mean log-mel spectrum ([128], mean over frames), with the spectrum's own mean removed
    first so that loudness alone does not decide the direction. float32 [dim]."""
    spectrum = np.asarray(mean_logmel, np.float32).reshape(-1)
    if spectrum.shape[0] != N_MELS:
        raise ADSError(f"mean log-mel must have {N_MELS} bins, got {spectrum.shape[0]}")
    return (spectrum - spectrum.mean()) @ _projection(N_MELS, dim, seed)


def fit_embedding_dim(vector: np.ndarray, dim: int) -> np.ndarray:
    """A stored aligner vector brought to the ADS dimension (as is, or a fixed projection)."""
    vector = np.asarray(vector, np.float32).reshape(-1)
    return vector if vector.shape[0] == dim else vector @ _projection(vector.shape[0], dim, STORED_PROJECTION_SEED)


def sidecar_path(shard: str) -> str:
    """``/data/train-000000.tar`` -> ``/data/train-000000.emb.npz``."""
    stem = shard[: -len(".tar")] if shard.endswith(".tar") else os.path.splitext(shard)[0]
    return stem + SIDECAR_SUFFIX


def write_embedding_sidecar(path: str, keys: Sequence[str], embeddings: np.ndarray, source: str = "") -> None:
    """Sidecar format 1: npz with ``keys`` (str [N]), ``embeddings`` (float16 [N, D]: the mean-pooled
    aligner output per sample), ``format`` (int) and ``source`` (the model that computed them)."""
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(keys) or len(set(keys)) != len(keys):
        raise ADSError(f"{path}: need one embedding row per distinct key, got {len(keys)} keys for shape {embeddings.shape}")
    np.savez(path, keys=np.asarray(keys, dtype=str), embeddings=embeddings.astype(np.float16),
             format=np.int64(SIDECAR_FORMAT), source=np.asarray(source))


def read_embedding_sidecar(path: str) -> dict[str, np.ndarray]:
    """key -> float16 vector from a sidecar written by write_embedding_sidecar."""
    try:
        with np.load(path, allow_pickle=False) as data:
            keys, rows, fmt = data["keys"], data["embeddings"], int(data["format"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
        raise ADSError(f"{path}: not a readable embedding sidecar ({error}); delete it or rerun "
                       "`python -m loaders.embed_shards`") from error
    if fmt != SIDECAR_FORMAT or rows.ndim != 2 or len(keys) != len(rows) or not np.isfinite(rows).all():
        raise ADSError(f"{path}: sidecar format {fmt}, shape {rows.shape} for {len(keys)} keys (or non-finite "
                       f"values); expected format {SIDECAR_FORMAT}; rerun `python -m loaders.embed_shards`")
    return dict(zip(keys.tolist(), rows))


def decode_embedding_member(data: bytes, where: str = "") -> np.ndarray:
    """A ``<key>.emb.npy`` tar member (a 1-D float array) -> float32 vector."""
    try:
        vector = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as error:
        raise ADSError(f"{where}: unreadable .emb.npy member ({error})") from error
    if vector.ndim != 1 or not np.isfinite(vector).all():
        raise ADSError(f"{where}: .emb.npy must hold one finite 1-D vector, got shape {vector.shape}")
    return vector.astype(np.float32)


class EmbeddingSource:
    """Embeddings for ADS: stored aligner vectors (tar member or sidecar) or the fallback.

    Sidecars are looked up only for local shard paths (not ``pipe:`` or URLs). ``hits`` counts
    samples with a stored vector, ``misses`` those that fell back; ``hit_rate`` is their ratio.
    """

    def __init__(self, dim: int = DEFAULT_EMBEDDING_DIM, cached_shards: int = 4):
        self.dim, self.hits, self.misses = dim, 0, 0
        self._cached_shards = cached_shards
        self._sidecars: dict[str, dict[str, np.ndarray]] = {}

    def _sidecar(self, shard: str) -> dict[str, np.ndarray]:
        if shard not in self._sidecars:
            path = sidecar_path(shard)
            local = "://" not in shard and not shard.startswith("pipe:")
            self._sidecars[shard] = read_embedding_sidecar(path) if local and os.path.exists(path) else {}
            while len(self._sidecars) > self._cached_shards:
                self._sidecars.pop(next(iter(self._sidecars)))
        return self._sidecars[shard]

    def embedding_for(self, shard: str, key: str, mean_logmel: np.ndarray, member: np.ndarray | None = None) -> np.ndarray:
        """float32 [dim]: the tar member's vector, else the sidecar's, else the fallback projection."""
        stored = member if member is not None else self._sidecar(shard).get(key)
        if stored is None:
            self.misses += 1
            return fallback_embedding(mean_logmel, self.dim)
        self.hits += 1
        return fit_embedding_dim(stored, self.dim)

    @property
    def hit_rate(self) -> float | None:
        seen = self.hits + self.misses
        return self.hits / seen if seen else None

    def stats(self) -> dict:
        return {"embedding_hits": self.hits, "embedding_misses": self.misses, "embedding_hit_rate": self.hit_rate}


# --- 3. samplers ------------------------------------------------------------------------------

def _seed_list(seed) -> list[int]:
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
    tokens by k-center selection under quotas that steer the cumulative selection towards the
    target shares. A candidate that waited ``max_wait`` selections is taken first. A candidate
    longer than ``token_budget`` is returned alone (counted in ``oversize``).
    """

    def __init__(self, pull, tasks: Sequence[str], *, token_budget: int, labels=None, task_weights=None,
                 natural_counts=None, pool_size: int = DEFAULT_ADS_POOL, window: int = DEFAULT_ADS_WINDOW,
                 max_wait: int = DEFAULT_ADS_MAX_WAIT, max_items: int | None = None,
                 embedding_dim: int = DEFAULT_EMBEDDING_DIM, seed=0, implementation: str = "numba",
                 embed: Callable[[object], np.ndarray] | None = None, puller: StreamPuller | None = None):
        if implementation not in ("numba", "numpy"):
            raise ADSError(f"implementation must be 'numba' or 'numpy', got {implementation!r}")
        self._owns_puller = puller is None
        self.puller = puller or StreamPuller(pull, DrawCounter(natural_counts))
        self.token_budget, self.pool_size, self.window = int(token_budget), int(pool_size), int(window)
        self.max_wait, self.max_items, self.embedding_dim = int(max_wait), max_items, int(embedding_dim)
        self.labels, self.natural_counts, self.seed = labels, natural_counts, _seed_list(seed)
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
        return self._select(self._codes, groups, lengths, quota, budget, start,
                            eligible=eligible, forced=forced, max_items=self.max_items)

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
    packed in read order into micro-batches of at most ``token_budget`` tokens. The sample that
    does not fit starts the next batch; one longer than the budget is returned alone."""

    def __init__(self, pull, tasks: Sequence[str], *, token_budget: int, task_weights=None, natural_counts=None,
                 max_items: int | None = None, seed=0, puller: StreamPuller | None = None):
        self._owns_puller = puller is None
        self.puller = puller or StreamPuller(pull, DrawCounter(natural_counts))
        self.tasks, self.token_budget, self.max_items = tuple(tasks), int(token_budget), max_items
        self.drawer = ProportionalDrawer(tasks, natural_counts, task_weights, _seed_list(seed) + [0])
        self._pending: list[Drawn] = []
        self._restore: list | None = None
        self.oversize = 0

    def adopt(self, items: Sequence[Drawn]) -> None:
        self._pending = sorted(self._pending + list(items), key=lambda d: d.serial)

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
            if not self._pending:
                self._pending.append(self.puller.draw(self.drawer.next_stream()))
            tokens = int(example_field(self._pending[0].example, "num_tokens"))
            if batch and used + tokens > budget:
                break
            batch.append(self._pending.pop(0))
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
