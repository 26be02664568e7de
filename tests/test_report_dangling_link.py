"""A report named by a link that leads into a directory that does not exist: the report is
written where the link leads, so the command is refused up front (exit 2, naming that
directory), as for a report named in a missing directory. Before, the link's own directory was
checked: the replay ran in full, then the write failed (exit 4)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import fixture_run
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app


@pytest.mark.parametrize(
    "command",
    [
        ["tune", "RUN", "-p", "dapo:eps_high=0.2|0.3", "--plot", "LINK"],
        ["replay", "RUN", "-p", "dapo", "--plot", "LINK"],
        ["replay", "RUN", "-p", "dapo", "--out", "LINK"],
        ["check", "RUN", "--max-spikes", "100", "--junit", "LINK"],
        ["check", "RUN", "--max-spikes", "100", "--write-baseline", "LINK"],
        ["pack", "RUN", "LINK"],
    ],
)
def test_a_link_into_a_missing_directory_is_refused_before_the_command_runs(
    tmp_path: Path, command: list[str]
) -> None:
    link = tmp_path / "report.png"
    link.symlink_to(tmp_path / "missing" / "report.png")
    swap = {"RUN": str(fixture_run("grpo")), "LINK": str(link)}
    done = CliRunner().invoke(app, [swap.get(arg, arg) for arg in command])
    assert done.exit_code == 2, done.output
    assert f"directory {tmp_path / 'missing'} does not exist" in done.stderr
    assert "replaying" not in done.stderr and not (tmp_path / "missing").exists()
