"""Where the data comes from: data.train / data.val as shard URL lists per source, or the
embedded demo set (generated on first use) when none is given."""
from __future__ import annotations

import glob
import os
import sys

from loaders.shards import check_shards_exist, expand_sources


def demo_shard_urls(cache_dir) -> tuple[list[str], list[str]]:
    """The embedded demo set's train and val shard paths, generated into cache_dir on first use."""
    from loaders import demo_data

    if not os.path.isfile(os.path.join(cache_dir, "shards.json")):
        print(f"[loaders] generating the embedded demo shards into {os.path.abspath(cache_dir)} "
              "(python -m loaders.demo_data)", file=sys.stderr, flush=True)
    demo_data.write_demo_shards(cache_dir)
    train = sorted(glob.glob(os.path.join(cache_dir, "train-*.tar")))
    val = sorted(glob.glob(os.path.join(cache_dir, "val-*.tar")))
    return train, val


def is_empty_spec(spec) -> bool:
    """data.train / data.val left empty ("" or []): the demo set, or no validation data."""
    return not spec.strip() if isinstance(spec, str) else not list(spec)


def check_given_shards_exist(cfg) -> None:
    """The local shards named in data.train and data.val exist (remote URLs are read later):
    a typo in a path is said before the model is built, which takes minutes at 7B."""
    for split in ("train", "val"):
        spec = getattr(cfg, split)
        if not is_empty_spec(spec):
            for urls in expand_sources(spec):
                check_shards_exist(urls, f"data.{split}")


def resolve_sources(cfg, split: str) -> list[list[str]]:
    """data.train / data.val as URL lists per source, checked to exist. An empty data.train
    means the demo set; an empty data.val means the demo's val split when data.train is
    empty too, else no validation data ([])."""
    spec = getattr(cfg, split)
    if is_empty_spec(spec):
        if split == "val" and not is_empty_spec(cfg.train):
            return []
        train, val = demo_shard_urls(cfg.demo_dir)
        return [train if split == "train" else val]
    sources = expand_sources(spec)
    for urls in sources:
        check_shards_exist(urls, f"data.{split}")
    return sources
