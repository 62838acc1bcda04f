"""engine/train.py leave_process: a finished multi-process run leaves without interpreter
finalization (where gloo's leftover threads can abort it), yet with its outputs flushed and its exit
code kept; every other exit stays a normal one.

Each case runs a small script in a fresh interpreter that ends the way train.py's __main__ does. A
module global stands in for what must not run at exit: its __del__ runs only during finalization.
"""
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

SCRIPT = textwrap.dedent("""
    import atexit, logging, logging.handlers, os, sys, threading
    sys.path.insert(0, {repo!r})
    from engine.train import leave_process

    code, sentinel, log_path, keep_thread = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "thread"

    class FinalizationSentinel:
        def __del__(self):
            if sentinel == "abort":   # what the gloo teardown did to a finished rank
                os.abort()
            os.write(2, b"finalization ran\\n")

    SENTINEL = FinalizationSentinel()   # a module global: released only when the interpreter finalizes

    # Buffered until logging.shutdown, an atexit handler: lost if the atexit handlers do not run.
    handler = logging.handlers.MemoryHandler(capacity=1000, target=logging.FileHandler(log_path))
    logging.getLogger("omnitrain").addHandler(handler)
    logging.getLogger("omnitrain").warning("final log line")
    atexit.register(lambda: print("atexit handler ran"))
    if keep_thread:
        release = threading.Event()
        threading.Thread(target=release.wait, args=(2,), daemon=False).start()
    print("last stdout line", end="")   # stdout is a pipe here: written only when flushed
    leave_process(code)
""")


def run_exit(tmp_path, code: int, world_size: int, sentinel: str = "print", thread: bool = False):
    script = tmp_path / "ends_like_train.py"
    script.write_text(SCRIPT.format(repo=str(REPO)))
    log_path = tmp_path / "run.log"
    env = {"PATH": "/usr/bin:/bin", "WORLD_SIZE": str(world_size), "RANK": "1"}
    proc = subprocess.run([sys.executable, str(script), str(code), sentinel, str(log_path),
                           "thread" if thread else "-"], capture_output=True, text=True, env=env, timeout=60)
    return proc, (log_path.read_text() if log_path.exists() else "")


@pytest.mark.parametrize("code", [0, 143])
def test_a_finished_multi_process_run_skips_finalization_and_keeps_its_outputs(tmp_path, code):
    proc, log = run_exit(tmp_path, code, world_size=2)
    assert proc.returncode == code, proc.stderr
    assert "finalization ran" not in proc.stderr
    assert "last stdout line" in proc.stdout, proc.stdout
    assert "atexit handler ran" in proc.stdout
    assert "final log line" in log


def test_an_abort_during_finalization_no_longer_fails_a_finished_run(tmp_path):
    proc, _ = run_exit(tmp_path, 0, world_size=2, sentinel="abort")
    assert proc.returncode == 0, proc.stderr


def test_the_abort_stand_in_does_abort_a_normal_exit(tmp_path):
    # The contrast that makes the test above mean something: a normal exit finalizes and aborts.
    proc, _ = run_exit(tmp_path, 0, world_size=1, sentinel="abort")
    assert proc.returncode == -6, (proc.returncode, proc.stderr)


@pytest.mark.parametrize("code, world_size, thread", [
    (0, 1, False),     # one process: no gloo threads, a normal exit
    (2, 2, False),     # a user error: the process group was aborted, not closed after a barrier
    (0, 2, True),      # a non-daemon thread still running: a normal exit waits for it
])
def test_other_exits_finalize_normally(tmp_path, code, world_size, thread):
    proc, log = run_exit(tmp_path, code, world_size=world_size, thread=thread)
    assert proc.returncode == code, proc.stderr
    assert "finalization ran" in proc.stderr
    assert "last stdout line" in proc.stdout and "atexit handler ran" in proc.stdout
    assert "final log line" in log
