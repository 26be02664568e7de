"""`record -- CMD` whose command recorded no step says so truthfully: a command that called
log_policy_batch with batches that hold no token was told it 'never called' it."""

from __future__ import annotations

import shlex
import sys

import pytest
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

EMPTY_BATCH = (
    "import numpy as np, stabledrl_cli as sd\n"
    "sd.log_policy_batch(0, logp=np.zeros(0), logp_old=np.zeros(0), advantages=np.zeros(0),"
    " seq_id=np.zeros(0, dtype=np.int32))\n"
)


def test_a_command_whose_only_batch_held_no_token_is_not_said_to_never_call_it(tmp_path):
    out = tmp_path / "run"
    args = ["record", "--out", str(out), "-p", "grpo", "--", sys.executable, "-c", EMPTY_BATCH]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    last = result.stderr.splitlines()[-1]
    assert last == (
        "error: the command recorded no step: no torch optimizer.step() ran in a Python process "
        "of the command where the optimizer hooks record it (not with --no-optimizer-hooks, "
        "`python -I`, `-E` or `-S`, nor where the TRL or verl integration records instead: its "
        "warnings say what it did not record) and no call of "
        "stabledrl_cli.log_policy_batch(step, ...) recorded one"
    )


def test_the_command_recorded_is_shown_as_a_shell_would_take_it(tmp_path):
    """'recording python -c print("a b") into R' lost the quoting: the line could not be run
    again as shown."""
    out = tmp_path / "run"
    command = [sys.executable, "-c", 'print("a b")']
    result = CliRunner().invoke(app, ["record", "--out", str(out), "--", *command])
    assert result.stderr.splitlines()[0] == f"recording {shlex.join(command)} into {out}"


@pytest.mark.parametrize(("name", "shown"), [("", "''"), (" ", "' '"), ("no such", "'no such'")])
def test_a_command_not_found_is_named_so_an_empty_one_shows(tmp_path, name, shown):
    """`record --out R -- "$TRAIN"` with $TRAIN empty said 'error: command not found: ', the
    name it could not find invisible."""
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["record", "--out", str(out), "--", name])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [f"error: command not found: {shown}"]
