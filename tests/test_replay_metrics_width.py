"""`replay --metrics` at 80 columns: the on-request columns that would take the summary past
the terminal go to tables of their own, each led by the policy column; no figure is lost."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

runner = CliRunner()


def _table(args: list[str], width: int) -> str:
    result = runner.invoke(app, args, env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    return result.stdout


def _cells(text: str) -> dict[str, list[str]]:
    """Each policy's cells, over every table row naming it (its name kept once)."""
    cells: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("│ "):
            policy, *figures = (cell.strip() for cell in line.strip("│").split("│"))
            cells.setdefault(policy, []).extend(figures)
    return cells


def _headers(text: str) -> list[str]:
    return [
        cell.strip()
        for line in text.splitlines()
        if line.startswith("┃ ")
        for cell in line.strip("┃").split("┃")[1:]
    ]


@pytest.mark.parametrize(
    "groups", [["trl"], ["verl"], ["trl", "verl", "counts"]], ids=["trl", "verl", "all"]
)
def test_metrics_columns_fit_80_columns_and_keep_every_figure(grpo_fixture, groups):
    args = ["replay", str(grpo_fixture), "--device", "cpu", "--no-legend"]
    for group in groups:
        args += ["--metrics", group]
    whole, narrow = _table(args, 250), _table(args, 80)
    assert max(len(line) for line in narrow.splitlines()) <= 80
    assert max(len(line) for line in whole.splitlines()) > 80  # one table, as wide as it is
    assert _cells(narrow) == _cells(whole) and len(_cells(whole)) == 10
    assert _headers(narrow) == _headers(whole)
    assert narrow.count("Replay of ") == 1


def test_wide_still_overflows_in_one_table(grpo_fixture):
    """--wide shows every column in one table, overflowing the terminal as documented."""
    args = ["replay", str(grpo_fixture), "-p", "grpo", "--metrics", "trl", "--wide"]
    text = _table(args, 80)
    assert len([line for line in text.splitlines() if line.startswith("│ grpo")]) == 1
    assert "trl low" in text and "norm max" in text


@pytest.mark.parametrize("groups", [["trl"], ["trl", "verl", "counts"]], ids=["trl", "all"])
def test_per_step_metrics_columns_fit_80_columns_and_keep_every_figure(grpo_fixture, groups):
    """The per-step tables split the same way, each table led by the step."""
    args = ["replay", str(grpo_fixture), "-p", "grpo", "-p", "cispo", "--steps", "28:40"]
    for group in groups:
        args += ["--metrics", group]
    whole, narrow = _table(args, 250), _table(args, 80)
    assert max(len(line) for line in narrow.splitlines()) <= 80
    cells, expected = _cells(narrow), _cells(whole)  # the flags column follows the built-in
    assert {k: sorted(v) for k, v in cells.items()} == {k: sorted(v) for k, v in expected.items()}
    assert len(expected) == 12 + 2  # steps 28..39, and the two policies' summary rows
    assert sorted(_headers(narrow)) == sorted(_headers(whole))
    assert narrow.count("grpo (own): steps 28:40") == 1
