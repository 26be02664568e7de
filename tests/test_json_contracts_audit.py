"""The machine-readable contracts seen from outside: each command's `--format json` names the
run as the others do, so that the reports of one run can be joined on it."""

from __future__ import annotations

import json

from _corpus import tiny_run
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

runner = CliRunner()


def _json(*args: str) -> dict[str, object]:
    result = runner.invoke(app, [*args, "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_check_names_the_run_as_replay_and_inspect_do(tmp_path, monkeypatch):
    """`check ./run/ --format json` said "run": "./run/" where `replay`, `inspect`, `tune`,
    `watch`, `pack` and `diff` all say "run" (the path as Python writes it), and so did its
    table's title and its JUnit suite, while its own stderr notes said "run"."""
    tiny_run(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    given = "./run/"
    names = {
        _json("replay", given, "-p", "grpo")["run"],
        _json("inspect", given)["run"],
        _json("check", given, "-p", "grpo", "--max-discard-frac", "1", "--junit", "j.xml")["run"],
    }
    assert names == {"run"}
    assert 'name="stabledrl check run"' in (tmp_path / "j.xml").read_text()
    table = runner.invoke(app, ["check", given, "-p", "grpo", "--max-discard-frac", "1"])
    assert table.exit_code == 0, table.output
    assert "stabledrl check run\n" in table.stdout and "./run/" not in table.stdout
