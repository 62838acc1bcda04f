"""omnitrain: LoRA instruction tuning of Qwen2.5-Omni's thinker on speech tasks.

    torchrun --nproc_per_node=2 engine/train.py --recipe hybrid [key=value ...]
    python engine/train.py --recipe random max_steps=20 optim.lr=2e-4

Parse the recipe and overrides, build, train, close; everything else lives in engine/.
Errors the project raises on purpose (a bad setting, shard, sample or checkpoint) are printed as
`omnitrain: error: ...` with exit code 2; anything else keeps its full traceback.
"""
from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading
from pathlib import Path
from typing import NoReturn

if __package__ in (None, ""):  # run as a script (torchrun engine/train.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import ConfigError, available_recipes, check_repeated_keys, load_config  # noqa: E402

# The recipe users run (DESIGN: `torchrun engine/train.py --recipe hybrid`).
DEFAULT_RECIPE = "hybrid"
# Exit code of a run refused or stopped for a reason its message explains (argparse's code too).
USER_ERROR_EXIT = 2
# Exit code of a run stopped by SIGTERM after its checkpoint (128 + 15, as a shell reports it).
SIGTERM_EXIT = 143


# The project's own error classes, by module: their messages say what to change (a setting, a
# shard, a sample, a checkpoint); a traceback adds nothing for the user.
USER_ERRORS = {
    "engine.config": ("ConfigError",),
    "engine.checkpoint": ("CheckpointError",),
    "engine.trainer": ("TrainingStopped",),
    "loaders.ads": ("ADSError",),
    "loaders.audio": ("AudioError",),
    "loaders.curriculum": ("ScheduleError",),
    "loaders.packing": ("PackingError",),
    "loaders.shards": ("ShardError",),
    "loaders.stream": ("DataError", "SampleTooLong"),
    "loaders.tasks": ("UnknownTaskError",),
}


def user_error_classes() -> tuple[type[BaseException], ...]:
    """The classes of USER_ERRORS that exist (one moved or renamed keeps its full traceback
    rather than hiding the error being reported behind an ImportError)."""
    import importlib

    found = []
    for module_name, names in USER_ERRORS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        found += [getattr(module, name) for name in names if isinstance(getattr(module, name, None), type)]
    return tuple(found)


def rank_label() -> str:
    """`rank 1: ` under torchrun with several processes (each rank prints its own error), else ''."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"rank {os.environ.get('RANK', '?')}: "
    return ""


# What a collective raises on a rank whose peer process died (gloo's TCP transport; NCCL's
# watchdog). The peer printed the real error; a traceback of this one only hides it.
PEER_LOST_MESSAGES = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing")


def lost_a_peer(error: BaseException) -> bool:
    return bool(rank_label()) and isinstance(error, RuntimeError) and any(m in str(error) for m in PEER_LOST_MESSAGES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", action="append", help=f"recipe name ({', '.join(available_recipes())}) or a YAML "
                        f"path (default {DEFAULT_RECIPE}; given twice, the last is used)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value settings, e.g. optim.lr=2e-4 max_steps=50")
    args = parser.parse_args(argv)
    recipes = args.recipe or [DEFAULT_RECIPE]
    try:
        notes = check_repeated_keys([f"--recipe={name}" for name in recipes] + args.overrides)
        cfg = load_config(recipes[-1], args.overrides)
    except ConfigError as e:
        print(f"omnitrain: error: {rank_label()}{e}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
    if os.environ.get("RANK", "0") == "0":
        for note in notes:
            print(f"[omnitrain] note: {note}", flush=True)

    from engine.runner import run_training

    try:
        summary = run_training(cfg)  # on failure it has already torn the process group down, without a barrier
    except user_error_classes() as e:
        print(f"omnitrain: error: {rank_label()}{e}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
    except Exception as e:
        if lost_a_peer(e):
            first_sentence = str(e).split(". ")[0]
            print(f"omnitrain: {rank_label()}stopped: another rank failed ({first_sentence}); see that rank's "
                  "error", file=sys.stderr, flush=True)
            return 1
        if rank_label():  # torchrun stops the other ranks as soon as this one exits: say which one failed
            print(f"omnitrain: {rank_label()}unexpected error, traceback follows", file=sys.stderr, flush=True)
        raise
    if summary.get("stopped_by") == "SIGTERM":
        return SIGTERM_EXIT  # checkpointed, not finished: a scheduler sees a terminated job
    return 0


# Exit codes of a run that ended through run_training's normal return: every output written and
# closed, the process group torn down after a barrier (engine/parallel.py close_distributed).
FINISHED_EXITS = (0, SIGTERM_EXIT)
# What CPython returns when it cannot flush stdout at exit (Py_FinalizeEx); kept on the os._exit path.
FLUSH_FAILED_EXIT = 120


def leave_process(code: int) -> NoReturn:
    """Exit with `code`; a finished multi-process run skips interpreter finalization.

    Why: 2-process CPU runs (FSDP2 over gloo) were seen to finish every step, print "done", write
    summary.json, pass the closing barrier and destroy_process_group, and then have one rank die with
    SIGABRT ("terminate called without an active exception"): torchrun reports the finished job as
    failed. The core dump shows the main thread in Py_FinalizeEx and a gloo worker thread
    (ProcessGroupGloo::runLoop) dropping its reference to a finished all-gather (FSDP2's
    AsyncAllgatherCoalescedWork): releasing its output views decrefs their base tensor's Python
    object, which takes the GIL; during finalization that thread is ended by pthread_exit, whose
    unwinding through a noexcept destructor calls std::terminate (the mechanism of pytorch PR
    #179291). The worker drops a work's tensors only after `wait()` has returned to Python, so on a
    busy machine it can still be doing so when the main thread finalizes; no barrier waits for that,
    and destroy_process_group does not stop those threads (FSDP2's DeviceMesh keeps the ProcessGroup
    in its registry and DTensor's caches keep the mesh). After a finished run finalization has
    nothing left to do that a user could notice, so such a run leaves with os._exit, after doing by
    hand what normal exit does first: the atexit handlers (logging.shutdown, multiprocessing's child
    cleanup, the DataLoader worker guard) and flushing stdout/stderr. (TensorBoard and metrics.jsonl
    were closed by the trainer, summary.json written, before run_training returned.)

    Everything else exits normally: one process (never seen to abort; no gloo peer, no FSDP2 on one CPU),
    a user error (2) or a failure (the process group was aborted, not closed), a process group still
    initialized, or a non-daemon thread still running (normal exit waits for it; os._exit would not)."""
    distributed = sys.modules.get("torch.distributed")   # not imported: no process group to check
    finished = (code in FINISHED_EXITS and int(os.environ.get("WORLD_SIZE", "1")) > 1
                and not (distributed is not None and distributed.is_available() and distributed.is_initialized()))
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if not finished or others:
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed pipe or stream: what normal exit reports too
            code = code or FLUSH_FAILED_EXIT
    os._exit(code)


if __name__ == "__main__":
    leave_process(main())
