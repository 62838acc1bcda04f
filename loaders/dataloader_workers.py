"""DataLoader worker processes of the training stream (loaders.pipeline.TrainStream).

- WorkerDataset: each worker runs one producer (loaders.pipeline.ExampleProducer) over its
  own share of the shards; an error raised in it is handed over as a WorkerFailure item.
- WorkerFailure: the training process raises the worker's error with its own class and
  one-line message (the CLI prints those of its user errors as one line), its traceback
  chained under it as WorkerTraceback and logged at DEBUG.
- WorkerSignalGuard: workers ignore the stop signals sent to the whole process group (only
  the training process reacts: it finishes the step and checkpoints) and still end with it.
- loader_seed: the seed of the DataLoader's own generator, so that starting workers leaves
  torch's global RNG (LoRA dropout's) alone.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import traceback
import weakref
import zlib

import torch

log = logging.getLogger("loaders")


class WorkerTraceback(Exception):
    """The traceback of an error raised in a DataLoader worker, chained under the error itself."""


class WorkerFailure:
    """An error raised in a DataLoader worker, handed to the training process as an item, which
    raises it there with its own class and one-line message. (Torch would re-raise it as
    ``ExceptionWrapper`` does: the same class, but its message replaced by "Caught DataError in
    DataLoader worker process 0. Original Traceback ...", which the CLI then prints whole.)"""

    def __init__(self, error: BaseException, worker: int, traceback_text: str):
        self.error, self.worker, self.traceback_text = error, worker, traceback_text

    @classmethod
    def of(cls, error: BaseException, worker: int) -> "WorkerFailure | None":
        """None when the error would not come through pickling intact (then torch reports it)."""
        try:
            copy_ = pickle.loads(pickle.dumps(error))
        except Exception:
            return None
        if type(copy_) is not type(error) or str(copy_) != str(error):
            return None
        return cls(error, worker, "".join(traceback.format_exception(error)))

    def reraise(self):
        log.debug("DataLoader worker %d failed:\n%s", self.worker, self.traceback_text)
        raise self.error from WorkerTraceback(f"in DataLoader worker {self.worker}:\n{self.traceback_text}")


class WorkerDataset(torch.utils.data.IterableDataset):
    """In worker ``w``: the examples of producer ``w`` (``make_producer(w)``), resumed from
    ``entries[w]``; an error ends them with a WorkerFailure item."""

    def __init__(self, make_producer, entries):
        self.make_producer, self.entries = make_producer, entries

    def __iter__(self):
        worker = torch.utils.data.get_worker_info().id
        try:
            yield from self.make_producer(worker).iterate(self.entries[worker])
        except Exception as error:
            failure = WorkerFailure.of(error, worker)
            if failure is None:
                raise
            yield failure


# prctl option of <linux/prctl.h>: the signal this process gets when its parent dies.
PR_SET_PDEATHSIG = 1
# Signals that stop a job: a scheduler's preemption, `timeout`, torchrun (SIGTERM), Ctrl-C (SIGINT).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class WorkerSignalGuard:
    """DataLoader workers ignore the stop signals sent to the whole process group, so that only
    the training process reacts (the engine finishes the step and checkpoints): a worker killed
    by them makes torch raise "DataLoader worker is killed by signal" in the training process.
    Workers still end without it: a worker gets SIGKILL when the training process dies (Linux's
    parent-death signal; torch's own check of the parent's pid ends the loop, but its result
    queue's feeder thread then blocks the exit forever on a pipe nobody reads), and once
    ``release`` is called (the loader shuts down, or the interpreter exits) SIGTERM ends a worker
    again, as torch's shutdown of a slow worker needs."""

    _unreleased: "weakref.WeakSet[WorkerSignalGuard]" = weakref.WeakSet()
    _atexit_registered = False

    def __init__(self):
        self.released = multiprocessing.get_context("fork").Event()
        self.parent_pid = os.getpid()
        self.loader_iter = None   # weak reference to the DataLoader iterator whose workers this guards
        # The parent-death signal follows the thread that forked the worker: only the main
        # thread, which lives as long as the process, may be that thread.
        self.die_with_parent = sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()
        WorkerSignalGuard._unreleased.add(self)
        if not WorkerSignalGuard._atexit_registered:
            # Registered after multiprocessing's own exit hook (imported with the Event above), so
            # it runs first: multiprocessing terminates (SIGTERM) and joins daemonic workers at exit.
            atexit.register(WorkerSignalGuard.release_all)
            WorkerSignalGuard._atexit_registered = True

    @contextlib.contextmanager
    def starting_workers(self):
        """Block the stop signals while workers fork, so that none reaches a worker before its
        worker_init sets them aside; the training process receives a blocked one right after."""
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def worker_init(self, worker_id: int) -> None:
        """DataLoader worker_init_fn (runs in the worker)."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_sigterm_in_worker)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        if self.die_with_parent:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != self.parent_pid:   # it died before the line above
                os.kill(os.getpid(), signal.SIGKILL)

    def _on_sigterm_in_worker(self, signum, frame) -> None:
        if self.released.is_set():   # the loader's own shutdown: die as SIGTERM's default would
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    def release(self) -> None:
        self.released.set()
        WorkerSignalGuard._unreleased.discard(self)

    def watch(self, loader_iter) -> None:
        self.loader_iter = weakref.ref(loader_iter)

    @classmethod
    def release_all(cls) -> None:
        """At exit, shut down the loaders nobody closed (a run that failed): multiprocessing
        would SIGTERM their workers, and torch's SIGCHLD handler would report that as a crash."""
        for guard in list(cls._unreleased):
            guard.release()
            loader_iter = guard.loader_iter() if guard.loader_iter is not None else None
            getattr(loader_iter, "_shutdown_workers", lambda: None)()


def keep_as_is(item):
    return item


def loader_seed(seed: int, rank: int, step: int) -> int:
    """The seed of a DataLoader started at ``step``: from the stream's seed, rank and step, so a
    resumed run's restart at a step seeds its workers as the uninterrupted one would."""
    return zlib.crc32(f"loader/{seed}/{rank}/{step}".encode())
