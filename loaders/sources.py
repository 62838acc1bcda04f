"""Where the data comes from: data.train / data.val as shard URL lists per source, or the
embedded demo set (generated on first use) when none is given."""
from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

from loaders.output_folder import output_folder_problem
from loaders.shards import (ShardError, check_shards_exist, expand_sources, has_a_member, is_local,
                            no_example_message)


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
    """The local shards named in data.train and data.val exist (remote URLs are read later), and
    no source of data.train is all empty or non-tar files: said before the model is built, which
    takes minutes at 7B. (One bad shard among good ones is skipped and counted while training.)"""
    for split in ("train", "val"):
        spec = getattr(cfg, split)
        if not is_empty_spec(spec):
            sources = expand_sources(spec)
            for number, urls in enumerate(sources, start=1):
                check_shards_exist(urls, f"data.{split}")
                if split == "train" and all(is_local(u) or u.startswith("file://") for u in urls) and not any(
                        has_a_member(u) for u in urls):
                    where = f" (source {number} of {len(sources)})" if len(sources) > 1 else ""
                    raise ShardError(no_example_message(urls, f"data.train{where}"))


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


def _shard_span(urls: list[str]) -> str:
    """e.g. "4 shards, /d/train-000000.tar ... /d/train-000003.tar"."""
    if len(urls) == 1:
        return f"1 shard, {urls[0]}"
    return f"{len(urls)} shards, {urls[0]} ... {urls[-1]}"


def data_sources_note(cfg) -> str:
    """Where training and validation data come from, as one start line (said before any shard
    is read): the demo set when data.train is empty, with data.val's fate spelled out."""
    if is_empty_spec(cfg.train):
        demo = os.path.abspath(cfg.demo_dir)
        val = ("validation on the demo val split" if is_empty_spec(cfg.val)
               else "validation on data.val")
        return (f"data: data.train is empty: training on the embedded demo set ({demo}), {val}; "
                "set data.train to your shard URLs to train on your data")
    sources = expand_sources(cfg.train)
    if len(sources) == 1:
        train = f"training on data.train ({_shard_span(sources[0])})"
    else:
        weights = list(cfg.weights) or [1] * len(sources)
        train = f"training on {len(sources)} sources of data.train (" + "; ".join(
            f"weight {w:g}: {_shard_span(urls)}" for w, urls in zip(weights, sources)) + ")"
    if is_empty_spec(cfg.val):
        return f"data: {train}; no validation (data.val is empty)"
    val = [url for urls in expand_sources(cfg.val) for url in urls]
    return f"data: {train}; validation on data.val ({_shard_span(val)})"


def no_validation_reason(cfg, val_data: dict) -> str:
    """Why validation has no example, for the "validation disabled (...)" line: data.val is
    empty, or its shards (named, with what is wrong) yielded no usable example.
    ``val_data``: the validation set's counts over every rank ({"read", "skipped": {reason: n}})."""
    if is_empty_spec(cfg.val) and not is_empty_spec(cfg.train):
        return "no validation data: data.val is empty (the demo's val split is used only when data.train is empty too)"
    urls = [url for source in resolve_sources(cfg, "val") for url in source]
    skipped = val_data.get("skipped") or {}
    counted = (f"; {sum(skipped.values())} of {val_data.get('read', 0)} example(s) read were skipped ("
               + ", ".join(f"{reason} {n}" for reason, n in skipped.items()) + ")") if skipped else ""
    split = "data.val" if not is_empty_spec(cfg.val) else "the demo val split"
    return "no validation data: " + no_example_message(urls, split, counted)


def data_sources_problem(cfg) -> str | None:
    """A data setting that cannot work, known before any shard is read (for the config check):
    data.weights not one positive number per source of data.train, or a demo_dir that cannot be a
    folder while the demo set is used. None when all is well."""
    if cfg.weights:
        sources = 1 if is_empty_spec(cfg.train) else len(expand_sources(cfg.train))
        if len(cfg.weights) != sources:
            return (f"config key 'data.weights': {list(cfg.weights)} has {len(cfg.weights)} entries for {sources} "
                    "source(s) in data.train; give one weight per source (a list of URL sets in data.train is "
                    "several sources)")
        if any(not isinstance(w, (int, float)) or w <= 0 for w in cfg.weights):
            return f"config key 'data.weights': {list(cfg.weights)} must be positive numbers"
    if is_empty_spec(cfg.train):
        problem = output_folder_problem(Path(cfg.demo_dir)) if cfg.demo_dir else "no folder is given"
        if problem and not (cfg.demo_dir and os.path.isfile(os.path.join(cfg.demo_dir, "shards.json"))):
            return (f"config key 'data.demo_dir': {problem}; data.train is empty, so the embedded demo set is "
                    "generated there: give a folder path (new, or one holding the demo set), or set data.train")
    return None
