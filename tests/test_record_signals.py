"""`record -- CMD` and a stop signal (SIGTERM, SIGHUP, SIGINT) that reaches record outside the
wait for its command: while it readies the command (its temporary directory made, the command
not started yet), as the command starts, and while it finishes (the command ended, its reports
and the run's ranks not yet read, the temporary directory not yet removed).

Each window is hit exactly: record runs in a real process whose function at that window
(looked up by name in `_wrap` when record calls it) first sends the signal to record itself."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _cli import ROOT, TIMEOUT, cli_command, cli_environment

DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    from stabledrl_cli.cli import _wrap
    from stabledrl_cli.cli.app import main

    window, signum = sys.argv.pop(1), signal.Signals[sys.argv.pop(1)]
    original = getattr(_wrap, window)

    def signalled(*args, **kwargs):
        if window == "_started":  # just after the command started
            started = original(*args, **kwargs)
            os.kill(os.getpid(), signum)
            return started
        os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    setattr(_wrap, window, signalled)
    main()
    """
)

TRAIN = textwrap.dedent(
    """
    import numpy as np
    import stabledrl_cli as sd

    logp = np.zeros((2, 3), dtype="float32")
    for step in range(3):  # policy batches, recorded without torch's import
        sd.log_policy_batch(step, policy="grpo", logp=logp, logp_old=logp,
                            advantages=np.ones(2, dtype="float32"))
    """
)


def _default_dispositions() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def _record_signalled(
    tmp_path: Path, window: str, signum: signal.Signals, script: str
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`record --out RUN -- python -c SCRIPT` in a process group of its own, sent `signum` by
    itself at `window`; -> its result and its temporary directory's parent (its TMPDIR).
    Fails when a process of the group outlives record (an orphaned command)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    path = os.environ.get("PYTHONPATH")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT) if not path else f"{ROOT}{os.pathsep}{path}",
        "TMPDIR": str(scratch),
        "NO_COLOR": "1",
        "COLUMNS": "200",
    }
    env.pop("STABLEDRL_RUN_DIR", None)
    process = subprocess.Popen(
        [sys.executable, "-c", DRIVER, window, signum.name, "record", "--out",
         str(tmp_path / "run"), "--", sys.executable, "-c", script],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
        preexec_fn=_default_dispositions,  # not inherited ignored
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
        with pytest.raises(ProcessLookupError):  # nothing of the group is left running
            os.killpg(process.pid, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), scratch


def _left(scratch: Path) -> list[str]:
    return [path.name for path in scratch.iterdir() if path.name.startswith("stabledrl-record")]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stop_signal_before_the_command_starts_stops_record_there(tmp_path, signum):
    """Before, SIGTERM and SIGHUP killed record with its temporary directory left behind (no
    line, the shell's 143 or 129)."""
    flag = tmp_path / "started"
    done, scratch = _record_signalled(tmp_path, "_with_site", signum, f"open({str(flag)!r}, 'w')")
    assert done.returncode == 128 + signum, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"stopped by {signum.name} before the training command started: nothing recorded"
    ), done.stderr
    assert "Traceback" not in done.stderr
    assert not flag.exists()  # the command never ran
    assert _left(scratch) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_as_the_command_starts_reaches_it(tmp_path, signum):
    """Before, record died with the command just started, which ran on, orphaned, unseen."""
    done, scratch = _record_signalled(tmp_path, "_started", signum, "import time; time.sleep(100)")
    assert done.returncode == 128 + signum, done.stderr
    assert f"the training command was killed by {signum.name}" in done.stderr
    assert "Traceback" not in done.stderr
    assert _left(scratch) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stop_signal_after_the_command_ended_lets_record_finish(tmp_path, signum):
    """The command's steps are kept and checked, its outcome stands, the temporary directory
    goes. Before, SIGTERM and SIGHUP killed record with its temporary directory left behind
    and the run unchecked; SIGINT ended it with `error: interrupted` (130) after a command
    that succeeded."""
    done, scratch = _record_signalled(tmp_path, "_reports", signum, TRAIN)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"{signum.name} came after the training command ended: its outcome stands"
    ), done.stderr
    assert "Traceback" not in done.stderr and "error" not in done.stderr
    run = tmp_path / "run"
    assert len(list((run / "steps").iterdir())) == 3
    assert json.loads((run / "manifest.json").read_text()).get("recording_closed") is True
    assert _left(scratch) == []


def test_a_signal_ignored_where_record_starts_stays_ignored_in_the_command(tmp_path):
    """`nohup stabledrl record ...` ignores SIGHUP, and a shell's background job SIGINT: the
    command inherits that, and record leaves such a signal to it. Before, record's own
    handler of them made the command start with their default (a hangup ended it)."""
    script = tmp_path / "dispositions.py"
    script.write_text(
        "import signal\n"
        "print([signal.getsignal(s) is signal.SIG_IGN for s in (signal.SIGHUP, signal.SIGINT)])\n"
        + TRAIN
    )

    def ignore_hangup_and_interrupt() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    done = subprocess.run(
        [*cli_command("record", "--out", tmp_path / "run", "--"),
         sys.executable, str(script)],
        capture_output=True, text=True, env=cli_environment(), timeout=TIMEOUT,
        preexec_fn=ignore_hangup_and_interrupt,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[True, True]"
