"""A SIGTERM whose stop Python swallows (raised inside a finalizer) still stops the command.

CI once saw `pack` print "Exception ignored in: <function WeakValueDictionary...remove>
... Terminated", pack every step, rename its archive into place and exit 0: the handler had
raised inside a weakref callback of h5py's, where Python ignores exceptions, and had set
SIGTERM to be ignored after it."""

from __future__ import annotations

import os
import signal
import time
import weakref
from collections.abc import Callable

import pytest
import typer

from stabledrl_cli.cli._signals import stopped_by_sigterm


class _SignalledInItsFinalizer:
    """Sends SIGTERM to its own process from `__del__`, then runs a few more lines there, so
    the handler runs (and raises) inside the finalizer."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):
            pass


def _callback_that_is_signalled(_: object) -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(1000):
        pass


class _Referent:
    pass


def _finished_after_a_lost_stop(finalized: Callable[[], object]) -> list[str]:
    """What the work reached when `finalized()`'s result, dropped at once, was finalized."""
    reached: list[str] = []
    with pytest.raises(typer.Exit) as stopped, stopped_by_sigterm():
        finalized()
        reached.append("past the finalizer")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pass
        reached.append("the end of the work")
    assert stopped.value.exit_code == 143
    return reached


def test_a_stop_swallowed_in_a_del_is_raised_again() -> None:
    assert _finished_after_a_lost_stop(_SignalledInItsFinalizer) == ["past the finalizer"]


def test_a_stop_swallowed_in_a_weakref_callback_is_raised_again() -> None:
    references: list[weakref.ref[_Referent]] = []

    def watched() -> None:
        references.append(weakref.ref(_Referent(), _callback_that_is_signalled))

    assert _finished_after_a_lost_stop(watched) == ["past the finalizer"]
    assert references[0]() is None


def test_other_unraisable_exceptions_still_reach_the_hook_there_was(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[type[BaseException]] = []
    monkeypatch.setattr("sys.unraisablehook", lambda u: seen.append(type(u.exc_value)))

    class Failing:
        def __del__(self) -> None:
            raise ValueError("in a finalizer")

    with stopped_by_sigterm():
        Failing()
    assert seen == [ValueError]


def test_sigterm_outside_the_work_is_as_before() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with stopped_by_sigterm():
        pass
    assert signal.getsignal(signal.SIGTERM) is before
