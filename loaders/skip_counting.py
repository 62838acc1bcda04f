"""Bad samples on a streaming job: counted by reason, warned about once, and a stream that
yields nothing usable stopped with an error that says which setting to change.

- ErrorCounter: one per slot (rank x DataLoader worker). Counts every skip *event* (a bad
  recording met again in a later epoch, or by another task's stream, is counted again: the
  counts must add up with what was read), but warns only the first time a (shard, key,
  reason) is met; the first warning says so.
- SkipWarnings: prints each (shard, key, reason) once. The training stream's slots hold their
  warnings (``hold_warnings``) instead of printing them: each epoch reshuffles the shards over
  the slots, so every DataLoader worker of a rank meets the same bad sample sooner or later,
  and workers restart on a curriculum stage change. The training process prints what its
  producers hand over with their examples (loaders.pipeline) through one SkipWarnings per
  rank, so a bad sample is printed once per rank.
- UnusableRun: per stream reader, the skips since its last usable example. When whole
  epochs pass without one (every example too long for the batch, say), the stream would
  loop over the shards forever; it raises ShardError instead, naming the task, the main
  skip reason with its count and the setting to change.
"""
from __future__ import annotations

import collections
import logging
import math

from loaders.shards import ShardError

log = logging.getLogger("loaders")

SKIP_REASONS = (
    "corrupt_tar", "audio_without_json", "json_without_audio", "malformed_json", "no_target",
    "unknown_task", "label_outside_set", "undecodable_audio", "empty_audio", "audio_too_long",
    "text_too_long", "too_long_for_batch",
)

# What a user changes when every example of a stream is skipped for a reason: the recipe key
# and whether its value must go up to the smallest value seen (limits) or the data must change.
LIMIT_SETTINGS = {
    "too_long_for_batch": ("data.max_tokens_per_batch", "tokens"),
    "text_too_long": ("data.max_text_tokens", "target tokens"),
    "audio_too_long": ("data.max_audio_seconds", "seconds"),
}
DATA_ADVICE = {
    "undecodable_audio": "re-encode the audio as wav/flac/ogg",
    "empty_audio": "replace the empty recordings",
}


# What a skip of this reason stands for in the counts, said with the warning (not when the error is
# raised instead, data.on_error=raise).
COUNT_NOTES = {
    "corrupt_tar": "counted as one corrupt_tar: a damaged tar does not tell how many samples it lost",
}


class DataError(ValueError):
    """A bad sample, raised when data.on_error=raise (or data.strict for labels)."""


class SkipWarnings:
    """Prints a skip warning once per (shard, key, reason); the first warning says so."""

    def __init__(self, rank: int | None = None):
        self.prefix = f"[rank {rank}] " if rank is not None else ""
        self.warned: set[tuple] = set()   # (shard, key, reason) already printed

    def warn(self, reason: str, message: str, sample: tuple[str, str] | None = None) -> None:
        """``sample``: (shard, key); None for a skip that names no sample (always printed)."""
        if sample is not None:
            if (*sample, reason) in self.warned:
                return
            if not self.warned:
                message += (" (each bad sample is printed once per reason; when it is met again, in a later epoch, "
                            "by another task or by another DataLoader worker, it is counted in the skip counts but "
                            "not printed)")
            self.warned.add((*sample, reason))
        log.warning("%sskipped (%s): %s", self.prefix, reason, message)


class ErrorCounter:
    """Counts skips by reason, warns once per (shard, key, reason), de-duplicates record-level
    errors met by several task streams of a slot in the same epoch. With ``hold_warnings`` the
    warnings are kept (``take_held``) for the training process to print, not printed here."""

    def __init__(self, on_error: str, rank: int | None = None, hold_warnings: bool = False):
        self.on_error, self.rank = on_error, rank
        self.skipped: dict[str, int] = {}
        self.seen: set[tuple] = set()
        self.warnings = SkipWarnings(rank)
        self.hold_warnings = hold_warnings
        self.held: list[tuple] = []   # (reason, message, sample) not yet handed over
        self.silent = False  # True while a resume or rewind replays already-counted reads

    def report(self, reason: str, message: str, dedupe: tuple | None = None, *, force_raise: bool = False,
               sample: tuple[str, str] | None = None) -> bool:
        """Count one skip. Returns False if it was already counted (same record, same epoch).
        ``sample``: (shard, key), so that a recording skipped again is counted but not printed."""
        if self.silent:  # a replay of reads that were counted (or raised) the first time
            return False
        if self.on_error == "raise" or force_raise:
            raise DataError(message)
        if dedupe is not None:
            if dedupe in self.seen:
                return False
            self.seen.add(dedupe)
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if reason in COUNT_NOTES:
            message += f" ({COUNT_NOTES[reason]})"
        self._warn(reason, message, sample)
        return True

    def _warn(self, reason: str, message: str, sample: tuple[str, str] | None) -> None:
        if not self.hold_warnings:
            self.warnings.warn(reason, message, sample)
            return
        if sample is not None:   # hand each one over once from this slot; the receiver de-duplicates
            if (*sample, reason) in self.warnings.warned:
                return
            self.warnings.warned.add((*sample, reason))
        self.held.append((reason, message, sample))

    def take_held(self) -> list[tuple]:
        """The held warnings since the last call: [(reason, message, (shard, key) or None)]."""
        held, self.held = self.held, []
        return held

    def print_held(self) -> None:
        """Print the held warnings here (a slot that stops on an error hands nothing over)."""
        printer = SkipWarnings(self.rank)
        for reason, message, sample in self.take_held():
            printer.warn(reason, message, sample)

    def prune(self, min_epoch: int) -> None:
        self.seen = {entry for entry in self.seen if entry[0] >= min_epoch}


class UnusableRun:
    """The skips of one stream since its last usable example, by reason, with the smallest
    value of each limit seen (the setting a user would have to reach)."""

    def __init__(self, last_usable_epoch: int = -1):
        # -1: nothing usable yet and the stream started at the beginning of epoch 0.
        self.last_usable_epoch = last_usable_epoch
        self.reasons: collections.Counter = collections.Counter()
        self.smallest: dict[str, float] = {}

    def usable(self, epoch: int) -> None:
        self.last_usable_epoch = max(self.last_usable_epoch, epoch)
        self.reasons.clear()
        self.smallest.clear()

    def unusable(self, epoch: int, reason: str, value: float | None) -> int:
        """Record one skipped example of ``epoch``; returns the whole epochs read since the
        last usable example (those strictly between its epoch and this one)."""
        self.reasons[reason] += 1
        if value is not None:
            self.smallest[reason] = min(self.smallest.get(reason, value), value)
        return epoch - self.last_usable_epoch - 1

    def error(self, stream: str, task: str, label: str | None, empty_epochs: int, shards: list[str]) -> ShardError:
        what = f"{task} example" + (f" labelled {label}" if label else "")
        reason, count = self.reasons.most_common(1)[0]
        others = ", ".join(f"{n} {r}" for r, n in self.reasons.most_common()[1:])
        shown = ", ".join(shards[:3]) + (f" and {len(shards) - 3} more" if len(shards) > 3 else "")
        message = (f"stream {stream}: {empty_epochs} whole epoch(s) over this slot's shards ({shown}) yielded no "
                   f"usable {what}: {count} examples in a row skipped as {reason}" + (f" (and {others})" if others else "")
                   + ". ")
        if reason in LIMIT_SETTINGS:
            setting, unit = LIMIT_SETTINGS[reason]
            smallest = self.smallest[reason]
            # Seconds rounded up, so that the value given is enough.
            shown_value = f"{math.ceil(smallest * 10) / 10:.1f}" if isinstance(smallest, float) else str(smallest)
            message += (f"Raise {setting} to at least {shown_value} (the smallest {task} example seen needs "
                        f"{shown_value} {unit}), or drop {task} from the mix")
        else:
            message += f"{DATA_ADVICE.get(reason, 'fix the samples')}, or drop {task} from the mix"
        return ShardError(message)
