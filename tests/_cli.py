"""The command line in real processes, as a user runs it: exit codes, the streams, nothing
mocked. Independent commands run at once (`run_cli_together`): each such process spends most of
its life importing torch, so a test's batch of exit-code checks takes the time of its slowest
command instead of their sum."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300.0
"""Seconds a command may take before its test fails."""


def cli_command(*args: object) -> list[str]:
    """`python -m stabledrl_cli ARGS...`, with this interpreter."""
    return [sys.executable, "-m", "stabledrl_cli", *map(str, args)]


def cli_environment() -> dict[str, str]:
    """The test's environment, with this checkout first on the import path."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) if not path else f"{ROOT}{os.pathsep}{path}"}


def run_cli(
    *args: object, cwd: Path = ROOT, timeout: float = TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """`stabledrl ARGS...` in a process of its own; its exit code and both streams."""
    return run_cli_together(args, cwd=cwd, timeout=timeout)[0]


def record_python(
    script: str, *options: str, cwd: Path, env: dict[str, str], out: str = "run"
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """`stabledrl record --out OUT OPTIONS -- python -c SCRIPT` in a process of its own, in
    `cwd`; its result and the lines of its stderr that mention an error (any case), which a
    refusal in one line makes exactly `["error: ..."]`."""
    done = subprocess.run(
        [*cli_command("record", "--out", out, *options), "--", sys.executable, "-c", script],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    return done, [line for line in done.stderr.splitlines() if "error" in line.lower()]


def torch_training(steps: int, each: str = "") -> str:
    """A script that takes `steps` optimizer steps of a tiny torch model (numbered `step` from
    0), each followed by the statement `each`, then prints `trained`: what `record`'s optimizer
    hooks record as scalar steps."""
    return f"""
import torch

model = torch.nn.Linear(2, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range({steps}):
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    {each}
print("trained")
"""


def record_env() -> dict[str, str]:
    """A wrapped command's environment: the package's root and the tests' helpers (such as
    distributed_exit) on its path, no inherited run."""
    here = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("STABLEDRL_")}
    paths = (str(here.parent), str(here), os.environ.get("PYTHONPATH"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return {**env, "NO_COLOR": "1", "COLUMNS": "200"}


def record(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """A real `stabledrl record ARGS` process, in `record_env`."""
    return subprocess.run(
        [*cli_command(), "record", *args],
        capture_output=True, text=True, env=record_env(), timeout=TIMEOUT, cwd=cwd,
    )  # fmt: skip


def close(recorded: float, computed: float) -> bool:
    """A recorded number equals the one the script computed, to 1e-6 relative (NaN: NaN)."""
    return math.isclose(recorded, computed, rel_tol=1e-6) or (
        math.isnan(recorded) and math.isnan(computed)
    )


def run_cli_together(
    *commands: Sequence[object], cwd: Path = ROOT, timeout: float = TIMEOUT
) -> list[subprocess.CompletedProcess[str]]:
    """Each of `commands` (the arguments after `stabledrl`) in a process of its own, all at
    once; their results in the same order. Each must finish within `timeout` seconds of the
    start, as if run alone. The commands must not depend on one another."""
    started = [
        subprocess.Popen(
            cli_command(*command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env=cli_environment(),
        )
        for command in commands
    ]
    deadline = time.monotonic() + timeout
    results = []
    try:
        for process in started:
            out, err = process.communicate(timeout=max(0.0, deadline - time.monotonic()))
            results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def full_disk_error(option: str) -> str:
    """The one line a report written to `full_disk` by `option` ends its command with (exit
    4)."""
    return f"error: {option} /dev/full: cannot write it (no space left on device)"


def full_disk(path: Path) -> Path:
    """`path` made a link to /dev/full, where every write fails as on a full disk (a report
    is written in place there, so it passes every check made before the replay)."""
    import pytest

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system: the tests' full disk")
    path.symlink_to("/dev/full")
    return path
