"""Shard URLs and tar reading: brace expansion, existence checks, the per-epoch shard order,
samples of a WebDataset tar (``<key>.json`` + ``<key>.<audio ext>``, members grouped by key)
and the per-shard example counts (``shards.json`` index, else a JSON-only scan).

A bad member never stops the stream: it comes out as a RawSample whose ``error`` says why
(reason, message naming shard and key); the reader layer (loaders.stream) counts it.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import random
import tarfile
import zlib
from dataclasses import dataclass
from typing import Iterator

from loaders.tasks import TARGET_FIELDS, TASKS, UnknownTaskError, tasks_of_record, why_no_target

log = logging.getLogger("loaders")

# Tasks with a closed label set, and the DataConfig field that holds it.
LABELLED_TASKS = {"did": "dialects", "ser": "emotions"}

AUDIO_EXTENSIONS = ("flac", "wav", "ogg", "opus", "mp3", "oga", "aiff", "aif")
TAR_BLOCK = 512
INDEX_FILE = "shards.json"


class ShardError(ValueError):
    """A shard list that cannot be trained on (missing files, too few shards for the slots)."""


class DamagedTar(ShardError):
    """A tar stream that cannot be read on. ``member``: the name of the member it broke in, if known."""

    def __init__(self, message: str, member: str | None = None):
        super().__init__(message)
        self.member = member


def expand_urls(spec) -> list[str]:
    """Brace notation (``a-{000..007}.tar``, ``{a,b}``) and whitespace-separated URLs -> list."""
    import braceexpand

    specs = [spec] if isinstance(spec, str) else list(spec)
    urls = []
    for entry in specs:
        for word in str(entry).split():
            urls.extend(braceexpand.braceexpand(word))
    return urls


def parse_url_lists(text: str) -> list:
    """A list of shard URLs as typed on a command line, ``[[a-{0..7}.tar], [b-{0..3}.tar]]``,
    where YAML fails: a brace range is not a plain scalar inside a YAML flow list. Items are
    nested lists or strings; commas inside braces belong to the URL (``{a,b}``); a quoted item
    is taken as is. Raises ValueError (saying where) on anything else: unbalanced brackets or
    braces, an empty item, text after the list."""
    value, end = _parse_list(text, 0)
    if text[end:].strip():
        raise ValueError(f"unexpected {text[end:].strip()!r} after the list")
    return value


def _parse_list(text: str, pos: int) -> tuple[list, int]:
    """The list opening at text[pos] == "[" and the position after its "]"."""
    items, pos = [], pos + 1
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            raise ValueError("a '[' is not closed by ']'")
        if text[pos] == "]" and not items:
            return items, pos + 1
        if text[pos] == "[":
            item, pos = _parse_list(text, pos)
        elif text[pos] in "'\"":
            close = text.find(text[pos], pos + 1)
            if close < 0:
                raise ValueError(f"the quote at character {pos + 1} is not closed")
            item, pos = text[pos + 1:close], close + 1
        else:
            item, pos = _parse_word(text, pos)
        items.append(item)
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos < len(text) and text[pos] == "]":
            return items, pos + 1
        if pos >= len(text):
            raise ValueError("a '[' is not closed by ']'")
        if text[pos] != ",":
            raise ValueError(f"expected ',' or ']' at character {pos + 1}")
        pos += 1


def _parse_word(text: str, pos: int) -> tuple[str, int]:
    """An unquoted item: up to the next ',' or ']' outside braces."""
    start, depth = pos, 0
    while pos < len(text) and (depth or text[pos] not in ",]"):
        if text[pos] in "[\"'" and not depth:
            raise ValueError(f"unexpected {text[pos]!r} at character {pos + 1}")
        depth += {"{": 1, "}": -1}.get(text[pos], 0)
        if depth < 0:
            raise ValueError(f"a '}}' at character {pos + 1} closes no '{{'")
        pos += 1
    if depth:
        raise ValueError(f"a '{{' in {text[start:pos].strip()!r} is not closed by '}}'")
    word = text[start:pos].strip()
    if not word:
        raise ValueError(f"empty item at character {start + 1}")
    return word, pos


def expand_sources(spec) -> list[list[str]]:
    """One URL list per source. A string or a flat list of URLs is one source; a list of lists
    (or of lists and strings) is several sources, one per entry."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not any(isinstance(entry, (list, tuple)) for entry in specs):
        return [expand_urls(specs)]
    return [expand_urls(entry) for entry in specs]


def is_local(url: str) -> bool:
    """A plain filesystem path (not a URL, not a ``pipe:`` command)."""
    return "://" not in url and not url.startswith("pipe:")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def check_shards_exist(urls: list[str], config_key: str) -> None:
    """Fail before training if a local shard is missing, naming them and the config key."""
    if not urls:
        raise ShardError(f"{config_key} names no shards; give shard URLs, e.g. data/x/train-{{000000..000007}}.tar")
    local = [u for u in urls if is_local(u) or u.startswith("file://")]
    folders = [u for u in local if os.path.isdir(local_path(u))]
    if folders:
        raise ShardError(_folder_message(folders[0], config_key))
    missing = [u for u in local if not os.path.isfile(local_path(u))]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ShardError(f"{config_key}: {len(missing)} of {len(urls)} shard(s) do not exist: {shown}. "
                         + (_glob_hint(missing) or "Check the path and brace range, or build shards with "
                            "python -m loaders.make_shards"))


def _glob_hint(missing: list[str]) -> str | None:
    """A missing URL with a glob character: the engine does not expand globs (the shell did not
    either, or the file would exist); brace notation names a numbered range."""
    pattern = next((u for u in missing if any(c in u for c in "*?[")), None)
    if pattern is None:
        return None
    folder = os.path.dirname(local_path(pattern)) or "."
    name = os.path.basename(pattern)
    stem = name.split("*")[0].split("?")[0].split("[")[0] or "train-"
    matches = sorted(glob.glob(local_path(pattern))) if is_local(pattern) or pattern.startswith("file://") else []
    found = (f"; {len(matches)} file(s) here match it, {os.path.basename(matches[0])}"
             + (f" ... {os.path.basename(matches[-1])}" if len(matches) > 1 else "") if matches else "")
    return (f"Shard URLs are not glob patterns: {pattern} is not expanded{found}. Name the shards with brace "
            f"notation, e.g. {folder}/{stem}{{000000..000007}}.tar for {stem}000000.tar ... {stem}000007.tar")


def _folder_message(url: str, config_key: str) -> str:
    """A folder given where shard files are expected: say so, with the shards it holds."""
    folder = local_path(url).rstrip("/") or "/"
    tars = sorted(name for name in os.listdir(folder) if name.endswith((".tar", ".tar.gz", ".tgz")))
    holds = (f"it holds {len(tars)} tar file(s): {tars[0]}" + (f" ... {tars[-1]}" if len(tars) > 1 else "")
             if tars else "it holds no .tar files")
    return (f"{config_key}: {url} is a folder, not a shard ({holds}); give shard URLs, e.g. "
            f"{folder}/train-{{000000..000007}}.tar for train-000000.tar ... train-000007.tar")


def check_enough_shards(urls: list[str], num_slots: int, world_size: int, num_workers: int, config_key: str) -> None:
    if len(urls) < num_slots:
        raise ShardError(
            f"{config_key} has {len(urls)} shard(s) but {world_size} rank(s) x {max(1, num_workers)} worker(s) "
            f"need at least {num_slots} so every sample is read exactly once per epoch; write more, smaller shards "
            "(make_shards --max-count)" + (" or lower data.num_workers" if num_workers > 1 else
                                           " or run fewer ranks" if world_size > 1 else ""))


def shard_order(urls: list[str], seed: int, epoch: int) -> list[str]:
    """The epoch's shard order: a seeded permutation, the same on every rank and worker."""
    order = list(urls)
    random.Random(zlib.crc32(f"shards/{seed}/{epoch}".encode())).shuffle(order)
    return order


@dataclass
class RawSample:
    shard: str
    key: str
    index: int  # position of the sample in its shard
    meta: dict | None = None
    audio: bytes | None = None
    error: tuple[str, str] | None = None  # (reason, message)

    @property
    def where(self) -> str:
        return f"shard {self.shard}, sample {self.key!r}"


def _open_stream(url: str):
    if is_local(url) or url.startswith("file://"):
        stream = open(local_path(url), "rb")
    else:
        import webdataset

        stream = webdataset.gopen(url, "rb")
    if url.endswith((".tar.gz", ".tgz")):
        import gzip

        return gzip.GzipFile(fileobj=stream, mode="rb")
    return stream


def _read_exact(stream, n: int) -> bytes:
    chunks, left = [], n
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _pax_path(data: bytes) -> str | None:
    for record in data.decode("utf-8", "replace").splitlines():
        _, _, keyvalue = record.partition(" ")
        if keyvalue.startswith("path="):
            return keyvalue[len("path="):]
    return None


def iter_tar_members(stream, url: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular member. Raises DamagedTar on a corrupt or truncated tar."""
    offset, long_name = 0, None
    while True:
        header = _read_exact(stream, TAR_BLOCK)
        if not header or header == b"\0" * TAR_BLOCK:
            return
        if len(header) < TAR_BLOCK:
            raise DamagedTar(f"truncated tar header at byte {offset}")
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise DamagedTar(f"corrupt tar header at byte {offset} ({exc})") from None
        padded = -(-info.size // TAR_BLOCK) * TAR_BLOCK
        data = _read_exact(stream, padded)
        if len(data) < info.size:
            raise DamagedTar(f"member {long_name or info.name!r} is truncated ({len(data)} of {info.size} bytes)",
                             long_name or info.name)
        data, offset = data[: info.size], offset + TAR_BLOCK + padded
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE):
            long_name = _pax_path(data) or long_name
            continue
        name, long_name = long_name or info.name, None
        if info.isreg():
            yield name, data


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _make_sample(url: str, key: str, index: int, files: dict[str, bytes]) -> RawSample:
    sample = RawSample(url, key, index)
    audio_ext = next((e for e in files if e.rpartition(".")[2] in AUDIO_EXTENSIONS), None)
    if "json" not in files:
        reason = "audio_without_json" if audio_ext else "malformed_json"
        sample.error = (reason, f"{sample.where}: no {key}.json beside {sorted(files)}; every sample needs one")
        return sample
    try:
        sample.meta = json.loads(files["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        sample.error = ("malformed_json", f"{sample.where}: {key}.json is not valid UTF-8 JSON ({exc})")
        return sample
    if not isinstance(sample.meta, dict):
        sample.error = ("malformed_json", f"{sample.where}: {key}.json must hold an object, not "
                        f"{type(sample.meta).__name__}")
    elif audio_ext is None:
        sample.error = ("json_without_audio", f"{sample.where}: no audio file ({'/'.join(AUDIO_EXTENSIONS)}) "
                        f"beside {key}.json")
    else:
        sample.audio = files[audio_ext]
    return sample


def iter_tar_samples(url: str, skip: int = 0) -> Iterator[RawSample]:
    """Samples of one shard (members grouped by key, in order), from sample ``skip`` on.

    A damaged tar ends the shard with one RawSample whose error is "corrupt_tar": the rest of
    the shard cannot be located in a stream, nor can how many samples it held. The sample being
    read when the damage hit is part of that one error, unless it is whole (its JSON and audio
    both read and the damage in a later member): a truncated audio member is not a "JSON
    without audio".
    """
    index, key, files = 0, None, {}
    with _open_stream(url) as stream:
        try:  # OSError/EOFError: a damaged gzip layer
            for name, data in iter_tar_members(stream, url):
                member_key, ext = _split_name(name)
                if key is not None and member_key != key:
                    if index >= skip:
                        yield _make_sample(url, key, index, files)
                    index, files = index + 1, {}
                key = member_key
                files[ext] = data
        except (ShardError, OSError, EOFError) as exc:
            yield from _end_of_damaged_shard(url, key, index, files, exc, skip)
            return
        if key is not None and index >= skip:
            yield _make_sample(url, key, index, files)


def _end_of_damaged_shard(url: str, key: str | None, index: int, files: dict, exc: Exception, skip: int):
    """The sample being read when the damage hit (if whole), then one corrupt_tar record."""
    damaged_member = getattr(exc, "member", None)
    whole = (key is not None and "json" in files and any(e.rpartition(".")[2] in AUDIO_EXTENSIONS for e in files)
             and (damaged_member is None or _split_name(damaged_member)[0] != key))
    if whole:
        if index >= skip:
            yield _make_sample(url, key, index, files)
        index += 1
        lost = f"the rest of the shard after sample {key!r}"
    elif key is not None:
        lost = f"sample {key!r} (number {index} of the shard) and the rest of the shard after it"
    else:
        lost = "the whole shard"
    if index >= skip:
        yield RawSample(url, key or "?", index, error=("corrupt_tar", (
            f"shard {url}: {exc}; {lost} cannot be read; rewrite the shard")))


def count_examples_by_shard(urls: list[str]) -> dict[str, dict]:
    """Per shard URL: {"tasks": {task: n}, "labels": {task: {label: n}}}, from shards.json beside
    the shards, else a JSON-only scan of the shard (no audio decoded)."""
    indexes: dict[str, dict] = {}
    counts, scanned = {}, 0
    for url in urls:
        local = is_local(url) or url.startswith("file://")
        folder = os.path.dirname(local_path(url)) if local else None
        if folder is not None and folder not in indexes:
            path = os.path.join(folder, INDEX_FILE)
            indexes[folder] = json.load(open(path)).get("shards", {}) if os.path.isfile(path) else {}
        entry = indexes.get(folder, {}).get(os.path.basename(local_path(url))) if folder is not None else None
        if entry is None:
            if scanned == 0:
                log.warning("no %s entry for shard %s (and maybe others): counting examples from the shards' JSON "
                            "(write %s with python -m loaders.make_shards to skip this scan)", INDEX_FILE, url, INDEX_FILE)
            scanned += 1
            entry = _scan_shard(url)
        counts[url] = {"tasks": dict(entry.get("tasks", {})),
                       "labels": {task: dict(per_label) for task, per_label in entry.get("labels", {}).items()}}
    return counts


def sum_counts(entries) -> dict:
    """Sum of per-shard count entries -> {"tasks": {task: n}, "labels": {task: {label: n}}}."""
    tasks, labels = {t: 0 for t in TASKS}, {t: {} for t in LABELLED_TASKS}
    for entry in entries:
        for task, n in entry.get("tasks", {}).items():
            tasks[task] = tasks.get(task, 0) + n
        for task, per_label in entry.get("labels", {}).items():
            for label, n in per_label.items():
                labels.setdefault(task, {})[label] = labels.setdefault(task, {}).get(label, 0) + n
    return {"tasks": tasks, "labels": labels}


def count_examples(urls: list[str]) -> dict:
    """{"tasks": {task: n}, "labels": {task: {label: n}}} from shards.json, else a JSON-only scan."""
    return sum_counts(count_examples_by_shard(urls).values())


def _scan_shard(url: str) -> dict:
    """Counts of one shard read from its JSON only (no audio decoded)."""
    tasks, labels = {}, {t: {} for t in LABELLED_TASKS}
    for sample in iter_tar_samples(url):
        if sample.error is not None:
            continue
        try:
            record_tasks = tasks_of_record(sample.meta)
        except UnknownTaskError:
            continue
        for task in record_tasks:
            tasks[task] = tasks.get(task, 0) + 1
            if task in LABELLED_TASKS:
                value = str(sample.meta[TARGET_FIELDS[task]]).strip()
                labels[task][value] = labels[task].get(value, 0) + 1
    return {"tasks": tasks, "labels": labels}



# --- why a shard list yields nothing ------------------------------------------------------------

NO_EXAMPLE_SHARDS_SHOWN = 5  # shards named in a "no usable example" message; the rest are counted


def first_member_problem(url: str) -> str | None:
    """Why the shard has no first file member to read (reads its first header only): not a
    readable tar, or a tar with no members; None when it has one."""
    try:
        with _open_stream(url) as stream:
            if next(iter_tar_members(stream, url), None) is None:
                return "is a tar file with no file members (an empty shard)"
    except (DamagedTar, OSError, EOFError) as exc:
        return f"is not a readable tar file ({exc})"
    return None


def has_a_member(url: str) -> bool:
    """The shard opens as a tar with at least one file in it (reads its first header only)."""
    return first_member_problem(url) is None


def why_shard_has_no_example(url: str) -> str:
    """What is wrong with a shard that yields no example, as a phrase after its URL: not a tar,
    no members, samples none of which has a target (with the first one's problem), or an index
    that counts none of its good samples. Reads the shard."""
    problem = first_member_problem(url)
    if problem is not None:
        return problem
    samples, with_targets, first_problem = 0, 0, None
    for sample in iter_tar_samples(url):
        samples += 1
        if sample.error is not None:
            first_problem = first_problem or sample.error[1]
            continue
        try:
            if tasks_of_record(sample.meta):
                with_targets += 1
                continue
            first_problem = first_problem or f"{sample.where}: {why_no_target(sample.meta)}"
        except UnknownTaskError as exc:
            first_problem = first_problem or f"{sample.where}: {exc}"
    if samples == 0:
        return "is a tar file with no file members (an empty shard)"
    if with_targets == 0:
        return f"holds {samples} sample(s), none usable; the first: {first_problem}"
    if _index_entry(url) is not None:
        return (f"holds {with_targets} sample(s) with targets, but {INDEX_FILE} beside it counts no example of "
                f"it; rewrite {INDEX_FILE} (python -m loaders.make_shards) or remove it")
    return (f"holds {with_targets} sample(s) with targets, each skipped under the data settings (audio or text "
            "too long, a label outside the set, audio that does not decode: the skip counts say which)")


def _index_entry(url: str) -> dict | None:
    """The shard's entry in the shards.json beside it, if there is one."""
    if not (is_local(url) or url.startswith("file://")):
        return None
    path = os.path.join(os.path.dirname(local_path(url)), INDEX_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("shards", {}).get(os.path.basename(local_path(url)))
    except (OSError, ValueError, AttributeError):
        return None


def no_example_message(urls: list[str], config_key: str, counted: str = "") -> str:
    """The error for a shard list that yields no example at all, naming the shards and why;
    ``counted``: how the examples read were counted, when they were."""
    shown = urls[:NO_EXAMPLE_SHARDS_SHOWN]
    reasons = "; ".join(f"{url} {why_shard_has_no_example(url)}" for url in shown)
    more = f" (and {len(urls) - len(shown)} more shard(s) not shown)" if len(urls) > len(shown) else ""
    return (f"{config_key}: its {len(urls)} shard(s) yield no usable example: {reasons}{more}{counted}. A shard is a tar of "
            "<key>.json + <key>.<audio ext> pairs; build shards with python -m loaders.make_shards")
