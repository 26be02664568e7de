"""`check` replays as `replay` does, but took neither `--threads` nor `--memory-budget`: a CI
check of a big run was held to one thread and the default budget. It takes both now, and its
verdict and figures do not depend on them."""

from __future__ import annotations

import json

import pytest
from _corpus import tiny_run
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

runner = CliRunner()


def _gates(args: list[str]) -> list[dict[str, object]]:
    result = runner.invoke(app, [*args, "-f", "json"])
    assert result.exit_code == 0, result.output
    gates: list[dict[str, object]] = json.loads(result.stdout)["gates"]
    return gates


def test_threads_and_the_memory_budget_leave_the_gates_as_they_are(tmp_path):
    run = tiny_run(tmp_path / "run", steps=12)
    check = ["check", str(run), "-p", "grpo", "--max-collapsed", "9", "--max-discard-frac", "1"]
    alone = _gates(check)
    assert _gates([*check, "--threads", "2", "--memory-budget", "1"]) == alone
    assert _gates([*check, "--memory-budget", "1G"]) == alone


@pytest.mark.parametrize(
    ("option", "said"),
    [
        (["--threads", "0"], "--threads must be an integer in [1, 256]"),
        (["--memory-budget", "0"], "--memory-budget expects a size such as 256M or 1G"),
    ],
)
def test_a_bad_value_is_a_usage_error(tmp_path, option, said):
    run = tiny_run(tmp_path / "run", steps=4)
    result = runner.invoke(app, ["check", str(run), "--max-collapsed", "9", *option])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert said in line, line
