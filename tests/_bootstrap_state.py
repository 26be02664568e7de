"""The record bootstrap's state as a fresh process has it, for tests that drive
`stabledrl_cli.capture.bootstrap` (and `log_policy_batch`) in this process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stabledrl_cli.capture import _log_policy_batch, _uncaught, bootstrap
from stabledrl_cli.capture._status import ENV_STATUS_FILE, RecordingFailure

FRESH = {
    "_recorder": None,
    "_last": None,
    "_hooks_first": None,
    "_held": None,
    "_opening": False,
    "_hooks_start": 0,
    "_closed": False,
    "_integration": False,
}
"""The module's state that one recording changes (set for the test, restored after it: a test
before it in this process may have left a framework integration's `_integration`, which turns
the hooks off)."""
FRESH_BATCH = {
    "_first_batch_logged": False,
    "_batch_policy": None,
    "_warned_policy_changed": False,
}
"""The state of `log_policy_batch`'s module that one recording changes, set and restored too."""


def fresh_recording(monkeypatch: pytest.MonkeyPatch, run: Path, status: Path, **more: Any) -> None:
    """Has the bootstrap record into `run` as `record` would tell it to (its status file
    `status`, made here), from a fresh state, with `more` of its names set too."""
    status.touch()
    monkeypatch.setenv(bootstrap.ENV_RUN_DIR, str(run))
    monkeypatch.setenv(ENV_STATUS_FILE, str(status))
    monkeypatch.setattr(_uncaught, "interrupted", None)
    for name, value in {**FRESH, "_failure": RecordingFailure(), **more}.items():
        monkeypatch.setattr(bootstrap, name, value)
    for name, value in FRESH_BATCH.items():
        monkeypatch.setattr(_log_policy_batch, name, value)
