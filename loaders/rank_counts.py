"""The data counts of a whole job: each rank's TrainStream.counts() merged into one dict.

Each rank reads its own shards, so each rank's counts cover only its share; metrics rows and
summary.json must show the job's. Every rank calls gather_rank_counts at the same point (a
log row, the end of training): it all-gathers the per-rank dicts and merges them.

Merged structure (the keys of TrainStream.counts(), with the job's values):
    summed over ranks:  read, used, pending, released_at_switch (examples drawn for a stage that
                        ended before they were batched), released_tasks {task: n},
                        skipped {reason: n}, tasks {task: n},
                        labels {task: {label: n}}, draws and repeats {task: {label: n}}
                        (None, "unknown", stays None), embeddings {kind: n}, embedding_updates,
                        embedding_cache (vectors held, all ranks' caches together)
    maximum over ranks: epoch (the furthest rank), embedding_refreshes (published versions;
                        the same schedule on every rank)
    recomputed:         embedding_hit_rate from the summed embeddings
    the same on every rank: sampler (rank 0's)
    per rank:           "per_rank": [{"rank", "read", "used", "pending", "released_at_switch", "skipped", "epoch",
                        "embedding_cache"}, ...] in rank order
    "world_size":       the number of dicts merged
So the invariant of one rank holds for the job: read == used + pending + released_at_switch +
sum(skipped).
A key this module does not know is summed when every rank's value is a number (or a dict of
numbers), else rank 0's value is kept.
"""
from __future__ import annotations

SUMMED = ("read", "used", "pending", "released_at_switch", "released_tasks", "skipped", "tasks", "labels", "draws", "repeats", "embeddings",
          "embedding_updates", "embedding_cache")
MAXIMUM = ("epoch", "embedding_refreshes")
PER_RANK = ("read", "used", "pending", "released_at_switch", "skipped", "epoch", "embedding_cache")


def add_counts(total, part):
    """total + part: numbers add; dicts add key by key (a new dict); None (unknown) stays None."""
    if isinstance(total, dict) or isinstance(part, dict):
        merged = dict(total or {})
        for key, value in (part or {}).items():
            merged[key] = add_counts(merged[key], value) if key in merged else _copy(value)
        return merged
    if total is None or part is None:
        return None
    return total + part


def _copy(value):
    return {k: _copy(v) for k, v in value.items()} if isinstance(value, dict) else value


def _is_numeric(value) -> bool:
    if isinstance(value, dict):
        return all(_is_numeric(v) for v in value.values())
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def merge_rank_counts(per_rank: list[dict]) -> dict:
    """One dict per rank, in rank order -> the job's counts (see the module docstring)."""
    if not per_rank:
        return {}
    merged: dict = {}
    for key in dict.fromkeys(k for counts in per_rank for k in counts):   # first-seen order
        values = [counts[key] for counts in per_rank if key in counts]
        if key in MAXIMUM:
            present = [v for v in values if v is not None]
            merged[key] = max(present) if present else None
        elif key in SUMMED or (key not in ("embedding_hit_rate", "sampler")
                               and all(_is_numeric(v) for v in values)):
            total = _copy(values[0])
            for value in values[1:]:
                total = add_counts(total, value)
            merged[key] = total
        else:
            merged[key] = _copy(values[0])
    if "embeddings" in merged:
        embedded = sum(merged["embeddings"].values())
        real = merged["embeddings"].get("stored", 0) + merged["embeddings"].get("refreshed", 0)
        merged["embedding_hit_rate"] = real / embedded if embedded else None
    merged["world_size"] = len(per_rank)
    merged["per_rank"] = [dict({"rank": rank}, **{k: _copy(c[k]) for k in PER_RANK if k in c})
                          for rank, c in enumerate(per_rank)]
    return merged


def gather_rank_counts(counts: dict) -> dict:
    """This rank's counts -> the job's. A collective: every rank must call it at the same point.
    Without an initialized process group (one process) it merges this rank's counts alone."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return merge_rank_counts([counts])
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, counts)
    return merge_rank_counts(gathered)
