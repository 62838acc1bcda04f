"""Aligner embeddings for ADS: stored vectors beside the shards, or a fixed fallback projection.

Stored vectors are the mean-pooled output of the audio-text aligner (the projection at the
end of the thinker's audio encoder), computed once with the frozen encoder by
``python -m loaders.embed_shards`` and written as a sidecar ``<shard stem>.emb.npz`` beside
each shard (or carried as a ``<key>.emb.npy`` tar member). A sample without one falls back
to a fixed seeded random projection of its mean log-mel spectrum; ``EmbeddingSource`` counts
hits and misses so that the fraction of real embeddings can be reported.

With a trainable audio encoder the stored vectors go stale: the training forward refreshes
them (engine.aligner_refresh captures each sample's mean-pooled aligner output) into a bounded
``EmbeddingCache``; the stream hands snapshots of it to the samplers (loaders.pipeline), and a
refreshed vector takes precedence over a stored one.
"""
from __future__ import annotations

import base64
import collections
import io
import os
import zipfile
from functools import lru_cache
from typing import Sequence

import numpy as np

from loaders.ads import ADSError
from loaders.curriculum import DEFAULT_EMBEDDING_DIM
from loaders.shards import is_local

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


def sample_identity(shard: str, key: str) -> str:
    """One sample across shards (keys repeat between shards): the refreshed-cache key."""
    return f"{shard}::{key}"


def encode_rows(rows: dict[str, np.ndarray], dim: int) -> dict:
    """JSON-safe form of identity -> float16 [dim] rows (for the loader state in checkpoints)."""
    matrix = np.stack(list(rows.values())).astype(np.float16) if rows else np.zeros((0, dim), np.float16)
    return {"dim": dim, "ids": list(rows), "vectors": base64.b64encode(matrix.tobytes()).decode("ascii")}


def decode_rows(state: dict) -> dict[str, np.ndarray]:
    ids, dim = state["ids"], int(state["dim"])
    matrix = np.frombuffer(base64.b64decode(state["vectors"]), np.float16).reshape(len(ids), dim)
    return dict(zip(ids, matrix))


class EmbeddingCache:
    """Refreshed aligner embeddings, least recently updated evicted first: at most ``capacity``
    float16 rows of ``dim`` (vectors of another size are projected as stored ones are).

    A row is replaced, never changed in place, so a ``snapshot()`` stays valid after updates."""

    def __init__(self, capacity: int, dim: int):
        if capacity < 1:
            raise ADSError(f"embedding cache capacity must be at least 1 (schedule.embedding_cache), got {capacity}")
        self.capacity, self.dim = int(capacity), int(dim)
        self._rows: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self.updates = 0

    def __len__(self) -> int:
        return len(self._rows)

    def update(self, identities: Sequence[str], vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(identities):
            raise ADSError(f"embedding refresh: {len(identities)} samples but vectors of shape {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise ADSError("embedding refresh: the aligner output has non-finite values (the audio encoder diverged); "
                           "lower optim.lr or train with model.train_audio_encoder=false")
        for identity, vector in zip(identities, vectors):
            self._rows.pop(identity, None)
            self._rows[identity] = fit_embedding_dim(vector, self.dim).astype(np.float16)
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)
        self.updates += len(identities)

    def snapshot(self) -> dict[str, np.ndarray]:
        return dict(self._rows)

    def state_dict(self) -> dict:
        return {**encode_rows(self._rows, self.dim), "capacity": self.capacity, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if int(state["dim"]) != self.dim:
            raise ADSError(f"the checkpoint's embedding cache has dim {state['dim']}, this run "
                           f"schedule.embedding_dim={self.dim}; resume with the same value")
        self._rows = collections.OrderedDict(decode_rows(state))
        while len(self._rows) > self.capacity:      # a smaller schedule.embedding_cache on resume
            self._rows.popitem(last=False)
        self.updates = int(state.get("updates", 0))


class EmbeddingSource:
    """Embeddings for ADS: refreshed vectors (``use_refreshed``), else stored aligner vectors
    (tar member or sidecar), else the fallback.

    Sidecars are looked up only for local shard paths (not ``pipe:`` or URLs). ``hits`` counts
    samples with a real (refreshed or stored) vector, ``misses`` those that fell back;
    ``hit_rate`` is their ratio.
    """

    def __init__(self, dim: int = DEFAULT_EMBEDDING_DIM, cached_shards: int = 4):
        self.dim, self.hits, self.misses = dim, 0, 0
        self._cached_shards = cached_shards
        self._sidecars: dict[str, dict[str, np.ndarray]] = {}
        self._refreshed: dict[str, np.ndarray] = {}

    def use_refreshed(self, rows: dict[str, np.ndarray]) -> None:
        """identity (``sample_identity``) -> vector of the ADS dim, taking precedence from now on."""
        self._refreshed = rows

    def _sidecar(self, shard: str) -> dict[str, np.ndarray]:
        if shard not in self._sidecars:
            path = sidecar_path(shard)
            self._sidecars[shard] = read_embedding_sidecar(path) if is_local(shard) and os.path.exists(path) else {}
            while len(self._sidecars) > self._cached_shards:
                self._sidecars.pop(next(iter(self._sidecars)))
        return self._sidecars[shard]

    def embedding_for(self, shard: str, key: str, mean_logmel: np.ndarray, member: np.ndarray | None = None) -> np.ndarray:
        """float32 [dim]: the refreshed vector, else the tar member's, else the sidecar's, else the
        fallback projection."""
        return self.lookup(shard, key, mean_logmel, member)[0]

    def lookup(self, shard: str, key: str, mean_logmel: np.ndarray, member: np.ndarray | None = None
               ) -> tuple[np.ndarray, str]:
        """(float32 [dim] vector, kind): kind "refreshed" (from the training forward), "stored"
        (tar member, else sidecar) or "fallback" (projection of the mean log-mel spectrum)."""
        refreshed = self._refreshed.get(sample_identity(shard, key)) if self._refreshed else None
        if refreshed is not None:
            self.hits += 1
            return refreshed.astype(np.float32), "refreshed"
        stored = member if member is not None else self._sidecar(shard).get(key)
        if stored is None:
            self.misses += 1
            return fallback_embedding(mean_logmel, self.dim), "fallback"
        self.hits += 1
        return fit_embedding_dim(stored, self.dim), "stored"

    @property
    def hit_rate(self) -> float | None:
        seen = self.hits + self.misses
        return self.hits / seen if seen else None

    def stats(self) -> dict:
        return {"embedding_hits": self.hits, "embedding_misses": self.misses, "embedding_hit_rate": self.hit_rate}
