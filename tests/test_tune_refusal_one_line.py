"""`tune` refusing a run says one line on stderr: it printed its header (`tuning N settings over
RUN`) before the replay, so a run with nothing to replay or without a field the settings need
got two lines, where `replay` and `check` give the error alone. The header now comes once the
replay computed a step."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FIXTURES, fixture_run
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app


@pytest.fixture(scope="module")
def scalar_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TRL's trainer_state.json imported: per-step scalars, no policy batch."""
    out = tmp_path_factory.mktemp("imported") / "run"
    source = FIXTURES / "imports" / "trl-lr0.2" / "trainer_state.json"
    done = CliRunner().invoke(app, ["import", str(source), "--out", str(out)])
    assert done.exit_code == 0, done.output
    return out


@pytest.mark.parametrize(
    ("run", "spec", "error"),
    [
        ("scalar", "dapo", "nothing to replay"),
        ("grpo", "dapo:agg=recorded", "step 0 has no 'loss_scale'"),
    ],
)
def test_a_refused_run_is_one_line(scalar_run: Path, run: str, spec: str, error: str) -> None:
    path = scalar_run if run == "scalar" else fixture_run(run)
    done = CliRunner().invoke(app, ["tune", str(path), "-p", spec, "--device", "cpu"])
    assert done.exit_code == 3, done.output
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"error: {path}: ") and error in line


def test_the_header_comes_before_the_progress_of_a_tune_that_runs() -> None:
    run = fixture_run("grpo")
    done = CliRunner().invoke(app, ["tune", str(run), "-p", "dapo:eps_high=0.2|0.3"])
    assert done.exit_code == 0, done.output
    lines = done.stderr.splitlines()
    assert lines[0] == f"tuning 2 settings over {run}"
    assert lines[1].startswith("replaying: ")
