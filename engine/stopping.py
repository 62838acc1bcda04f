"""How a run is asked to stop from outside: SIGTERM, as a scheduler preempting the job sends it.

The handler only records the request on the trainer (``signal_received``); the training loop
agrees on it across ranks after each step, checkpoints, and stops (engine/trainer.py).
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time

# A scheduler that signals the whole process group reaches each rank twice: directly, and through
# torchrun, which passes its own SIGTERM on to its workers moments later. A second SIGTERM within
# this window is that same stop, not a request to stop at once.
REPEATED_SIGTERM_WINDOW_S = 5.0


@contextlib.contextmanager
def stop_on_signals(trainer):
    """SIGTERM (a scheduler's preemption, torchrun passing on its own SIGTERM) asks the trainer
    to checkpoint at the end of the current step and stop; a second SIGTERM (5 s or more later) stops at once.
    torchrun waits ~30 s for its workers after a SIGTERM before killing them: a LoRA checkpoint
    (adapters and their optimizer state) takes far less. Only the main thread can take signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame):
        if trainer.signal_received and time.monotonic() - trainer.signal_time < REPEATED_SIGTERM_WINDOW_S:
            return  # the same stop, delivered twice (to the process group, and passed on by torchrun)
        if trainer.signal_received:
            where = f"; resume from {trainer.last_checkpoint}" if trainer.last_checkpoint else ""
            print(f"[omnitrain] rank {trainer.env.rank}: second SIGTERM: stopping now, without a checkpoint{where}",
                  flush=True)
            raise SystemExit(128 + signum)
        trainer.signal_received = True
        trainer.signal_time = time.monotonic()
        print(f"[omnitrain] rank {trainer.env.rank}: SIGTERM received, stopping after this step with a checkpoint "
              "(send it again, 5 s or more later, to stop at once)", flush=True)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
