"""An import stopped midway leaves no run that looks whole under RUN."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.dump._writer import Recorder
from stabledrl_cli.errors import InputError, WriteError


def _log(path: Path, steps: int) -> Path:
    path.write_text("".join(f'{{"step": {s}, "loss": {s / 10}}}\n' for s in range(steps)))
    return path


def _stop_at_step(monkeypatch: pytest.MonkeyPatch, stop: int, error: BaseException) -> None:
    log_step = Recorder.log_step

    def stopping(self: Recorder, step: int, *args: Any, **kwargs: Any) -> None:
        if step == stop:
            raise error
        log_step(self, step, *args, **kwargs)

    monkeypatch.setattr(Recorder, "log_step", stopping)


@pytest.mark.parametrize(
    ("error", "code"), [(KeyboardInterrupt(), 130), (WriteError("disk: full"), 4)]
)
def test_an_import_stopped_midway_leaves_no_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: BaseException, code: int
) -> None:
    """Ctrl-C at the 6th of 10 steps: the run held steps 0-4 and a manifest marked closed
    (`recording closed`, integrity ok), a whole-looking import of half the log."""
    log = _log(tmp_path / "log.jsonl", 10)
    _stop_at_step(monkeypatch, 5, error)
    result = CliRunner().invoke(app, ["import", str(log), "--out", str(tmp_path / "run")])
    assert result.exit_code == code, result.output
    assert not (tmp_path / "run").exists()


def test_an_import_stopped_over_a_run_it_replaces_leaves_no_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """--force over a run, stopped midway: RUN is not a run (the old one is replaced already),
    and a file of the user's beside the run stays."""
    run = tmp_path / "run"
    runner = CliRunner()
    old = ["import", str(_log(tmp_path / "old.jsonl", 3)), "-o", str(run)]
    assert runner.invoke(app, old).exit_code == 0
    (run / "notes.txt").write_text("mine")
    _stop_at_step(monkeypatch, 5, KeyboardInterrupt())
    args = ["import", str(_log(tmp_path / "log.jsonl", 10)), "-o", str(run), "--force"]
    assert runner.invoke(app, args).exit_code == 130
    with pytest.raises(InputError):
        sd.open_run(run)
    assert sorted(p.name for p in run.rglob("*")) == ["notes.txt", "steps"]
