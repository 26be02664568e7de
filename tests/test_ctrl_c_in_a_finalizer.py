"""A Ctrl-C whose KeyboardInterrupt Python swallows (raised inside a finalizer) still stops
the command.

`pack` of a 600-step run, Ctrl-C about 0.7 s in, printed "Exception ignored in: <function
WeakValueDictionary.__init__.<locals>.remove ...> KeyboardInterrupt" (once "<function
_get_module_lock.<locals>.cb ...>"), went on, renamed its archive into place over the one
there (`--force`) and exited 0: Python's handler had raised inside a weakref callback of
h5py's, where Python ignores exceptions (about one try in ten)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


class _InterruptedInItsFinalizer:
    """Sends SIGINT to its own process from `__del__`, then runs a few more lines there, so
    Python's handler raises KeyboardInterrupt inside the finalizer."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):
            pass


def _interrupted_in_a_finalizer(*args: Any, **kwargs: Any) -> Any:
    """In place of a command's work: a finalizer meets Ctrl-C, then the work goes on for
    seconds, as a long pack or replay does."""
    _InterruptedInItsFinalizer()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        pass
    raise AssertionError("the work went on to its end after Ctrl-C")


@pytest.mark.parametrize(
    ("module", "work", "args"),
    [
        ("stabledrl_cli.dump._packer", "pack_run", ["pack", str(FIXTURES / "grpo"), "out.h5"]),
        ("stabledrl_cli.cli.inspect", "summarize", ["inspect", str(FIXTURES / "grpo")]),
    ],
)
def test_a_ctrl_c_swallowed_in_a_finalizer_stops_the_command(
    module: str,
    work: str,
    args: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(f"{module}.{work}", _interrupted_in_a_finalizer)
    # Ctrl-C at a terminal reaches a foreground process, where Python's own handler raises
    # KeyboardInterrupt: a test process started in the background (`cmd &`, as a CI job may
    # be) inherits SIGINT ignored, and the command would rightly never hear it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = CliRunner().invoke(app, args)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.exit_code == 130, result.output
    assert "error: interrupted" in result.output
    assert "Exception ignored" not in result.output
    assert not (tmp_path / "out.h5").exists()
