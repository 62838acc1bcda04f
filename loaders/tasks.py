"""The four tasks, their target fields and default label sets.

A shard sample's JSON names its targets either through an explicit ``task`` field (plus
that task's target field) or simply by carrying target fields: ``text`` (asr), ``summary``
(sum), ``dialect`` (did), ``emotion`` (ser). One recording with several targets yields one
example per task. This module is dependency-free so every room can import it.
"""
from __future__ import annotations

# Order is the task id (0..3) used in batches (`task_ids`) and metrics.
TASKS = ("asr", "sum", "did", "ser")

# JSON field that holds each task's target.
TARGET_FIELDS = {"asr": "text", "sum": "summary", "did": "dialect", "ser": "emotion"}

# Recipe defaults for data.dialects / data.emotions (closed label sets of DID and SER).
DEFAULT_DIALECTS = ("egy", "glf", "lev", "msa", "nor")
DEFAULT_EMOTIONS = ("neutral", "happy", "sad", "angry")

TASK_IDS = {task: index for index, task in enumerate(TASKS)}


class UnknownTaskError(ValueError):
    """A record names a task outside TASKS."""


def _has_target(meta: dict, field: str) -> bool:
    value = meta.get(field)
    if value is None:
        return False
    if isinstance(value, str):
        return value.strip() != ""
    return True


def tasks_of_record(meta: dict) -> list[str]:
    """Tasks a sample's JSON record yields, in TASKS order.

    With an explicit ``task`` field (a task name or a list of names) exactly those tasks are
    returned, each only if its target field is present and non-empty. Without it, every task
    whose target field is present and non-empty is returned. An empty list means the record
    carries no usable target. A ``task`` value outside TASKS raises UnknownTaskError so the
    caller can skip and count the sample (or stop, in strict mode).
    """
    if not isinstance(meta, dict):
        raise TypeError(f"a sample's JSON must be an object, got {type(meta).__name__}")
    explicit = meta.get("task")
    if explicit is None:
        return [task for task in TASKS if _has_target(meta, TARGET_FIELDS[task])]
    named = [explicit] if isinstance(explicit, str) else list(explicit)
    unknown = [name for name in named if name not in TASK_IDS]
    if unknown:
        raise UnknownTaskError(
            f"unknown task {unknown[0]!r} in the sample's 'task' field; "
            f"expected one of {', '.join(TASKS)}"
        )
    return [task for task in TASKS if task in named and _has_target(meta, TARGET_FIELDS[task])]


def why_no_target(meta: dict) -> str:
    """Why tasks_of_record(meta) is empty, in words a user can act on: the field an explicit
    ``task`` needs, a target field that is present but empty, or no target field at all."""
    explicit = meta.get("task")
    named = [] if explicit is None else ([explicit] if isinstance(explicit, str) else list(explicit))
    empty = [field for field in TARGET_FIELDS.values() if field in meta and not _has_target(meta, field)]
    if named:
        needs = [f"task {task} needs a non-empty {TARGET_FIELDS[task]!r}" for task in named if task in TARGET_FIELDS]
        have = [field for field in TARGET_FIELDS.values() if _has_target(meta, field)]
        return ("; ".join(needs) + (f" (the JSON has {', '.join(map(repr, have))})" if have else "")
                + "; add the field or fix the 'task' field")
    if empty:
        return (f"{', '.join(map(repr, empty))} {'is' if len(empty) == 1 else 'are'} empty and the JSON has no other "
                "target; give the target text or drop the sample")
    fields = ", ".join(map(repr, TARGET_FIELDS.values()))
    return f"the JSON has none of the target fields {fields}; add one (or a 'task' field and its target)"
