"""The SIGTERM handler that `record` gives a training process (`capture._sigterm`), in plain
Python processes that stand for it: its steps written, then the end by SIGTERM, wherever its
main thread is; nothing of it in a forked child or under a handler the script set."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

from _cli import ROOT

HEAD = textwrap.dedent(
    """
    import ctypes, os, signal, sys, time
    from stabledrl_cli.capture._sigterm import steps_written_on_sigterm

    PARENT = os.getpid()
    steps_written_on_sigterm(lambda: print("written", os.getpid() == PARENT, flush=True))
    """
)


def _signalled(body: str, settle: float = 0.0) -> subprocess.CompletedProcess[str]:
    """Runs HEAD + body, which prints a line once it waits for SIGTERM; sends it `settle`
    seconds later."""
    process = subprocess.Popen(
        [sys.executable, "-c", HEAD + textwrap.dedent(body)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    assert process.stdout is not None
    first = process.stdout.readline()
    time.sleep(settle)
    process.send_signal(signal.SIGTERM)
    try:
        stdout, stderr = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:  # still running: a SIGTERM lost
        process.kill()
        stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, first + stdout, stderr)


def test_a_main_thread_held_in_a_c_call_still_has_its_steps_written_and_ends() -> None:
    """The main thread waits on a mutex in C, the GIL released: Python would run a handler
    only once the call returned, here never (the test would time out)."""
    result = _signalled(
        """
        mutex = ctypes.create_string_buffer(64)  # zeros: PTHREAD_MUTEX_INITIALIZER
        libc = ctypes.CDLL(None)
        libc.pthread_mutex_lock(mutex)
        print("held", flush=True)
        libc.pthread_mutex_lock(mutex)  # never returns
        """,
        settle=0.5,  # into the C call
    )
    assert (result.stdout, result.returncode) == ("held\nwritten True\n", -signal.SIGTERM)
    assert result.stderr == ""


def test_a_forked_child_ends_at_once_and_its_parent_lives_on() -> None:
    """The child shares the parent's wakeup pipe until it lets it go: a SIGTERM to the child
    would otherwise wake the parent's thread, which would end the parent."""
    body = """
        child = os.fork()
        if child == 0:  # SIGTERM comes before it runs any Python, or as it sleeps
            time.sleep(5)
            os._exit(0)
        os.kill(child, signal.SIGTERM)
        _, status = os.waitpid(child, 0)
        time.sleep(0.3)  # a wrongly woken thread would end the parent meanwhile
        print("child", os.waitstatus_to_exitcode(status), "parent lives", flush=True)
        """
    result = subprocess.run(
        [sys.executable, "-c", HEAD + textwrap.dedent(body)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert (result.stdout, result.returncode) == ("child -15 parent lives\n", 0), result.stderr


def test_a_handler_the_script_sets_takes_sigterm_and_the_process_goes_on() -> None:
    result = _signalled(
        """
        signal.signal(signal.SIGTERM, lambda *_: print("its own", flush=True))
        print("set", flush=True)
        time.sleep(1)
        print("went on", flush=True)
        """
    )
    assert (result.stdout, result.returncode) == ("set\nits own\nwent on\n", 0), result.stderr
