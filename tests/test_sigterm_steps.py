"""The SIGTERM handler that `record` and an `async_writes` Recorder give a training process
(`stabledrl_cli._sigterm`), in plain Python processes that stand for it: its steps written,
then the end by SIGTERM, wherever its main thread is; nothing of it in a forked child or under
a handler the script set."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _cli import ROOT, record_env

from stabledrl_cli.dump import open_run

HEAD = textwrap.dedent(
    """
    import ctypes, os, signal, sys, time
    from stabledrl_cli._sigterm import steps_written_on_sigterm

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


def test_a_second_sigterm_that_comes_inside_the_first_ones_handler_still_ends_it() -> None:
    """Slurm signals the command directly and through `record`: the second SIGTERM can come
    while the main thread runs the first one's handler, before it set SIGTERM ignored, and
    Python runs the handler again there, in the same thread. Before, that second run waited
    for the lock the first held: the process never ended, SIGTERM ignored from then on (a
    recording test that signals `record`'s process group hung so)."""
    body = """
        import stabledrl_cli._sigterm as handling

        plain = handling._set_action
        def set_action(action):  # the second SIGTERM, as the first one's handler runs
            handling._set_action = plain
            os.kill(os.getpid(), signal.SIGTERM)
            return plain(action)
        handling._set_action = set_action
        os.kill(os.getpid(), signal.SIGTERM)  # the first, handled by the main thread
        time.sleep(30)
        """
    try:
        result = subprocess.run(
            [sys.executable, "-c", HEAD + textwrap.dedent(body)],
            capture_output=True, text=True, cwd=ROOT, timeout=20,
        )  # fmt: skip
    except subprocess.TimeoutExpired:  # (killed by run)
        pytest.fail("the process did not end")
    assert (result.stdout, result.returncode) == ("written True\n", -signal.SIGTERM)
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


SLOW_ASYNC_RECORDER = textwrap.dedent(
    """
    import os, signal, sys, time
    import numpy as np
    import stabledrl_cli.dump._step_writes as writer
    from stabledrl_cli import Recorder

    durable = writer.make_durable

    def slow_durable(item):  # a slow disk's fsync; each step made durable is listed
        time.sleep(0.05)
        durable(item)
        with open(os.path.join(os.path.dirname(sys.argv[1]), "durable"), "a") as listed:
            listed.write(f"{item.step}\\n")

    writer.make_durable = slow_durable
    recorder = Recorder(sys.argv[1], policy="grpo", async_writes=True)
    for step in range(6):
        recorder.log_step(
            step, logp=np.zeros(4, np.float32), logp_old=np.zeros(4, np.float32),
            advantages=np.ones(4, np.float32), mask=np.ones(4, bool), seq_id=np.arange(4),
        )
    print("logged", flush=True)
    if sys.argv[2] == "dropped":
        del recorder
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
    """
)


@pytest.mark.parametrize("recorder", ["held", "dropped"])
def test_an_async_recorders_queued_steps_are_written_on_a_sigterm(
    tmp_path: Path, recorder: str
) -> None:
    """A script's own `Recorder(async_writes=True)`, SIGTERM left at its default action: every
    step log_step returned for is written and made durable (its fsync, which the writer
    thread queues) before the process ends by SIGTERM (before, the queue died with it: none of
    the 6 steps on this slow disk), and the run is left unclosed. The step files alone are
    there without it: log_step writes them, the queue holds their fsyncs."""
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", SLOW_ASYNC_RECORDER, str(run), recorder],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert (result.stdout, result.returncode) == ("logged\n", -signal.SIGTERM), result.stderr
    assert result.stderr == ""
    assert sorted(path.name for path in (run / "steps").glob("step-*")) == [
        f"step-{step:08d}.safetensors" for step in range(6)
    ]
    durable = tmp_path / "durable"
    assert durable.is_file() and durable.read_text().split() == [str(s) for s in range(6)]
    assert "recording_closed" not in (run / "manifest.json").read_text()


SIGTERM_INSIDE_A_STEP = textwrap.dedent(
    """
    import functools, os, signal, time
    import numpy as np
    from stabledrl_cli import Recorder
    from stabledrl_cli.capture import bootstrap, log_policy_batch

    bootstrap.hooks_installed()
    bootstrap.log_hook_step(0, {"grad_norm": 1.5, "scalars": {}})  # held: the run not open
    log_step = Recorder.log_step
    @functools.wraps(log_step)
    def signalled(self, step, **fields):  # SIGTERM as the step is being written
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        return log_step(self, step, **fields)
    Recorder.log_step = signalled
    print("logging", flush=True)
    log_policy_batch(
        0, policy="grpo", logp=np.zeros(4, np.float32), logp_old=np.zeros(4, np.float32),
        advantages=np.ones(4, np.float32), mask=np.ones(4, bool), seq_id=np.arange(4),
    )
    print("went on", flush=True)
    time.sleep(30)
    """
)


def test_a_sigterm_inside_a_step_being_recorded_has_it_written_at_once(tmp_path: Path) -> None:
    """Under the optimizer hooks, SIGTERM came while the main thread recorded step 0 (the held
    one, paired with its batch), holding the recording lock that the writing takes: the
    handler, run there, waited WRITE_SECONDS (10 s) for it, then ended the process without
    the step. Now that thread finishes the step, then the steps are written, at once."""
    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_INSIDE_A_STEP],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**record_env(), "STABLEDRL_RUN_DIR": str(run)},
    )  # fmt: skip
    assert process.stdout is not None
    assert process.stdout.readline() == "logging\n"
    start = time.monotonic()
    stdout, stderr = process.communicate(timeout=30)
    assert time.monotonic() - start < 5.0
    assert (stdout, stderr, process.returncode) == ("", "", -signal.SIGTERM)
    step = open_run(run).step(0)
    assert step.num_tokens == 4 and step.scalars["grad_norm"] == 1.5
