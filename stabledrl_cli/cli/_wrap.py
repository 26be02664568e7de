"""`stabledrl record --out DIR -- CMD`, the parent side: run a training command with the run
directory exported to it, then turn what happened into one exit code. The command's own
failing exit code wins; otherwise a recording failure its bootstrap reported
(capture/bootstrap.py, through the status file) or a run without any step is an error.

With the optimizer hooks on (the default), the directory holding the sitecustomize of
capture/_site/ goes first on the command's PYTHONPATH: every Python process of the command
(a torchrun's ranks too) installs the hooks when it imports torch (capture/optimizer_hooks.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import typer
from rich.markup import escape

from stabledrl_cli.capture.bootstrap import (
    ENV_FORCE,
    ENV_POLICY,
    ENV_RUN_DIR,
    ENV_STATUS_FILE,
)
from stabledrl_cli.cli._output import err
from stabledrl_cli.errors import InputError, UsageError, WriteError
from stabledrl_cli.policies import resolve_spec

SITE_DIR = Path(__file__).resolve().parents[1] / "capture" / "_site"
"""The directory of the sitecustomize that installs the optimizer hooks in the command."""

NO_STEP = (
    "the command recorded no step: no torch optimizer.step() ran in a Python process of the "
    "command (the optimizer hooks record those; not with --no-optimizer-hooks, `python -I`, "
    "`-E` or `-S`) and it never called stabledrl_cli.log_policy_batch(step, ...)"
)


def _recorded_steps(out: Path) -> int:
    """Step files the run holds (every rank's)."""
    # Imported here: the dump package imports torch, which `record --help` never needs.
    from stabledrl_cli.dump._schema import STEP_FILE_RE, STEPS_DIR

    steps = out / STEPS_DIR
    if not steps.is_dir():
        return 0
    return sum(1 for path in steps.iterdir() if STEP_FILE_RE.match(path.name))


def _child_failures(status: Path) -> list[tuple[int, str]]:
    """The (exit code, reason) lines the child's bootstrap reported."""
    failures = []
    for line in status.read_text(encoding="utf-8").splitlines():
        code, _, reason = line.partition("\t")
        if code.isdigit() and reason:
            failures.append((int(code), reason))
    return failures


def _with_hooks(env: dict[str, str]) -> None:
    """Puts the hooks' sitecustomize first on the command's PYTHONPATH."""
    paths = [str(SITE_DIR), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)


def run_command(
    out: Path, cmd: list[str], force: bool, policy: str | None, optimizer_hooks: bool = True
) -> None:
    """Run CMD with the run directory exported (and, with `optimizer_hooks`, the hooks'
    sitecustomize on its path); CMD's failing exit code becomes ours (said with the number of
    step files the run holds), else a recording failure or a run without steps is an error
    (capture/bootstrap.py)."""
    if shutil.which(cmd[0]) is None:
        raise UsageError(f"command not found: {cmd[0]}")
    if policy is not None:
        resolve_spec(policy)  # a bad spec is a usage error here, not a warning in the child
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="stabledrl-record-") as scratch:
        status = Path(scratch) / "status"
        status.touch()
        env = dict(os.environ)
        env[ENV_RUN_DIR] = str(out.resolve())
        env[ENV_FORCE] = "1" if force else "0"
        env[ENV_STATUS_FILE] = str(status)
        if policy is not None:
            env[ENV_POLICY] = policy
        if optimizer_hooks:
            _with_hooks(env)
        err.print(
            f"recording [bold]{escape(' '.join(cmd))}[/] into {escape(str(out))}",
            highlight=False,
            markup=True,
        )
        code = subprocess.call(cmd, env=env)
        failures = _child_failures(status)
    if code != 0:
        for _, reason in failures:
            err.print(
                f"[yellow]warning:[/] recording failed: {escape(reason)}",
                highlight=False,
                markup=True,
            )
        steps = _recorded_steps(out)
        held = f"{steps} step file(s): `stabledrl inspect {out}`" if steps else "no step file"
        err.print(
            f"the training command exited with code {code}; the run holds {held}",
            highlight=False,
        )
        raise typer.Exit(code)
    if failures:
        code, reason = failures[0]
        error = {UsageError.exit_code: UsageError, InputError.exit_code: InputError}.get(
            code, WriteError
        )
        raise error(f"recording failed: {reason}")
    if _recorded_steps(out) == 0:
        raise UsageError(NO_STEP)
