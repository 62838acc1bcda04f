"""Refreshed ADS embeddings for a trainable audio encoder: the stream's side of it.

With ``model.train_audio_encoder=true`` the aligner output of a sample changes as the encoder
trains, so the vectors stored beside the shards go stale. The training forward captures each
sample's mean-pooled aligner output (engine.aligner_refresh) at no extra encoder cost; after
each step the stream pulls them from that feed and updates a bounded ``EmbeddingCache``.

Every ``schedule.embedding_refresh_every`` steps of an ADS stage the stream *publishes* the
cache: a snapshot becomes a new version, recorded like a stage switch (loaders.pipeline), so
each producer moves to it after the last example taken from it, its ADS pool is embedded again,
and a replay (resume, restart) moves at exactly the same point. A sampler's state names the
version its pool was embedded with; the versions a saved state can still need are kept (and
saved with the cache, as float16), the others dropped. Version 0 is "nothing refreshed".
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from loaders.ads import ADSError
from loaders.embeddings import EmbeddingCache, decode_rows, encode_rows, sample_identity


class RefreshedEmbeddings:
    """The cache, its published versions and the feed of the training forward (one per stream)."""

    def __init__(self, capacity: int, dim: int, refresh_every: int):
        if refresh_every < 1:
            raise ADSError(f"schedule.embedding_refresh_every must be at least 1, got {refresh_every}")
        self.cache = EmbeddingCache(capacity, dim)
        self.refresh_every = int(refresh_every)
        self.version = 0
        self.snapshots: dict[int, dict[str, np.ndarray]] = {0: {}}   # shared with the samplers
        self.feed: Callable[[], np.ndarray] | None = None
        self.pending_ids: list[str] = []       # the last step's samples, in micro-batch order
        self.dirty = False                     # updates since the last publication
        self.steps_since_publish = 0

    def attach(self, feed: Callable[[], np.ndarray]) -> None:
        """``feed()`` returns float [n, H]: one aligner vector per sample the model saw since the
        previous call, in the order of the step's micro-batches and their ``keys``."""
        self.feed = feed

    def expect(self, examples) -> None:
        """The samples of the step just handed out, in micro-batch order: their vectors come from
        the next ``drain`` (nothing is kept without a feed)."""
        self.pending_ids = [sample_identity(e.shard, e.key) for e in examples] if self.feed is not None else []
        self.steps_since_publish += 1

    def drain(self) -> None:
        """Move the feed's vectors of the last step into the cache."""
        if self.feed is None or not self.pending_ids:
            return
        vectors = np.asarray(self.feed())
        if vectors.ndim != 2 or vectors.shape[0] != len(self.pending_ids):
            raise RuntimeError(
                f"embedding refresh: the training forward produced {vectors.shape[0] if vectors.ndim else 0} aligner "
                f"vectors for the {len(self.pending_ids)} samples of the last step; every micro-batch of a step must "
                "go through the model once before the next step is drawn")
        self.cache.update(self.pending_ids, vectors)
        self.pending_ids, self.dirty = [], True

    def due(self, sampler: str) -> bool:
        return self.dirty and sampler == "ads" and self.steps_since_publish >= self.refresh_every

    def publish(self) -> int:
        """A snapshot of the cache as the next version (the caller records the switch)."""
        self.version += 1
        self.snapshots[self.version] = self.cache.snapshot()
        self.dirty, self.steps_since_publish = False, 0
        return self.version

    def keep_only(self, needed: set[int]) -> None:
        """Drop the versions no producer can return to (the current one and 0 always stay)."""
        for version in [v for v in self.snapshots if v not in needed | {0, self.version}]:
            del self.snapshots[version]

    def counts(self) -> dict:
        return {"embedding_refreshes": self.version, "embedding_cache": len(self.cache),
                "embedding_updates": self.cache.updates}

    # --- state ------------------------------------------------------------------------------
    def state_dict(self, needed: set[int]) -> dict | None:
        """JSON-safe; None while nothing was ever refreshed (states stay small)."""
        if self.version == 0 and not len(self.cache) and not self.dirty:
            return None
        keep = sorted((needed | {self.version}) - {0})
        return {"version": self.version, "dirty": self.dirty, "steps_since_publish": self.steps_since_publish,
                "cache": self.cache.state_dict(),
                "snapshots": {str(v): encode_rows(self.snapshots[v], self.cache.dim) for v in keep}}

    def load_state_dict(self, state: dict | None) -> None:
        self.snapshots.clear()       # in place: samplers built later read the same mapping
        self.snapshots[0] = {}
        self.pending_ids = []
        if state is None:
            self.version, self.dirty, self.steps_since_publish = 0, False, 0
            self.cache = EmbeddingCache(self.cache.capacity, self.cache.dim)
            return
        self.cache.load_state_dict(state["cache"])
        self.version, self.dirty = int(state["version"]), bool(state["dirty"])
        self.steps_since_publish = int(state["steps_since_publish"])
        for version, rows in state["snapshots"].items():
            self.snapshots[int(version)] = decode_rows(rows)
