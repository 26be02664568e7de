"""The record bootstrap's state as a fresh process has it, for tests that drive
`stabledrl_cli.capture.bootstrap` (and `log_policy_batch`) in this process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stabledrl_cli.capture import _uncaught, bootstrap
from stabledrl_cli.capture._recording import Recording
from stabledrl_cli.capture._status import ENV_STATUS_FILE


def fresh_recording(monkeypatch: pytest.MonkeyPatch, run: Path, status: Path, **more: Any) -> None:
    """Has the bootstrap record into `run` as `record` would tell it to (its status file
    `status`, made here), from a fresh `Recording` (restored after the test: a test before it
    in this process may have left a framework integration's mark, which turns the hooks off),
    with `more` of the module's names set too."""
    status.touch()
    monkeypatch.setenv(bootstrap.ENV_RUN_DIR, str(run))
    monkeypatch.setenv(ENV_STATUS_FILE, str(status))
    monkeypatch.setattr(_uncaught, "interrupted", None)
    monkeypatch.setattr(bootstrap, "recording", Recording())
    for name, value in more.items():
        monkeypatch.setattr(bootstrap, name, value)
