"""`stabledrl record -- CMD` with record in the test's process and CMD a real one: what a
test of record's exit code, its lines and the run reads, without a Python of record's own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app


def child_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment a wrapped command sees: the package's root first on its path (the
    script runs from its own folder), and no run directory inherited from outside."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.delenv("STABLEDRL_RUN_DIR", raising=False)
    return {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}


def record_here(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str, str]:
    """`stabledrl record ARGS` in-process (CliRunner); the wrapped command is a real child
    process, whose stdout/stderr are read at the file-descriptor level.

    Returns (exit code, record's own stderr, the child's stdout, the child's stderr).
    """
    child_env(monkeypatch)
    capfd.readouterr()
    result = CliRunner().invoke(app, ["record", *args])
    child = capfd.readouterr()
    return result.exit_code, result.stderr, child.out, child.err


def record_python_here(
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    script: str,
    *options: str,
    cwd: Path,
    out: str = "run",
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """`_cli.record_python` with record in-process (`record_here`), in `cwd`: `stabledrl record
    --out OUT OPTIONS -- python -c SCRIPT`, the script a real process. Returns its result (the
    script's stdout; record's stderr, then the script's) and the lines of that stderr that
    mention an error (any case)."""
    monkeypatch.chdir(cwd)
    args = ("--out", out, *options, "--", sys.executable, "-c", script)
    code, stderr, child_out, child_err = record_here(monkeypatch, capfd, *args)
    done = subprocess.CompletedProcess(
        ["stabledrl", "record", *args], code, child_out, stderr + child_err
    )
    return done, [line for line in done.stderr.splitlines() if "error" in line.lower()]


def record_done_here(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], *args: str
) -> subprocess.CompletedProcess[str]:
    """`_cli.record(ARGS)` with record in-process (`record_here`): its exit code, the wrapped
    command's stdout, and a stderr of the command's lines then record's own (whose last line is
    record's last, as in a real record process)."""
    code, stderr, child_out, child_err = record_here(monkeypatch, capfd, *args)
    return subprocess.CompletedProcess(
        ["stabledrl", "record", *args], code, child_out, child_err + stderr
    )
