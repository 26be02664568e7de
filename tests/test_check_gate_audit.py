"""`stabledrl check` as a CI job runs it: the exit code says the verdict, whatever becomes of
the lines on stderr."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest
from _cli import TIMEOUT, cli_command, cli_environment
from _corpus import tiny_run


@pytest.mark.parametrize(
    ("gate", "code", "ok"),
    [(("--max-nonfinite", "9"), 0, True), (("--max-collapsed", "0"), 1, False)],
    ids=["holds", "trips"],
)
def test_a_check_with_its_stderr_closed_exits_with_its_verdict(
    tmp_path: Path, gate: tuple[str, ...], code: int, ok: bool
) -> None:
    """`check ... 2>&-` (Python's sys.stderr None): its stderr lines go nowhere, its JSON to
    stdout and its exit code is the verdict's. It was 70, an internal error, held gate and
    tripped one alike: the replay's progress asked the missing stderr whether it is a
    terminal. (A tiny run's 4 steps leave max_collapsed not judged: tripped.)"""
    run = tiny_run(tmp_path / "run")
    command = shlex.join(cli_command("check", run, *gate, "--format", "json"))
    done = subprocess.run(
        f"exec {command} 2>&-", shell=True, capture_output=True, text=True,
        env=cli_environment(), stdin=subprocess.DEVNULL, timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode == code and done.stderr == "", (done.returncode, done.stderr)
    assert json.loads(done.stdout)["ok"] is ok
