"""`watch` of a path that is no run and never will be (a FIFO): refused at once, as the other
commands refuse it, not waited on for a manifest under it."""

from __future__ import annotations

import os
import subprocess

import pytest
from _cli import run_cli

TIMEOUT = 20.0
"""Seconds the watch may take: a regression waits for ever, and fails the test, not hangs it."""


def test_a_fifo_is_refused_at_once_not_waited_on(tmp_path):
    """`watch FIFO` printed 'waiting for FIFO/manifest.json' and waited until a signal (a
    FIFO never becomes a directory); `watch --once FIFO` and inspect refused it, exit 3."""
    fifo = tmp_path / "run"
    os.mkfifo(fifo)
    try:
        done = run_cli("watch", fifo, "--interval", "0.1", timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"watch of a FIFO still ran after {TIMEOUT:g} s")
    assert done.returncode == 3, done.stderr
    error = f"error: {fifo} is not a run (not a directory nor a regular file)"
    assert done.stderr.strip().splitlines()[-1] == error
    assert "waiting for" not in done.stderr
    assert run_cli("inspect", fifo, timeout=TIMEOUT).stderr.strip() == error
