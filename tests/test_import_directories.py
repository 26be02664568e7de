"""`stabledrl import DIR`: a directory stands for the one log it holds (its trainer_state.json,
its event files, its W&B run file). An event file that is no regular file (a FIFO, which would
block the read) was passed over unsaid."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

pytest.importorskip("tensorboard", reason="needs tensorboard (the dev extra)")
from torch.utils.tensorboard import SummaryWriter

runner = CliRunner()


def _events(folder: Path) -> Path:
    """A TensorBoard run of 3 steps in `folder`, as torch's SummaryWriter writes it."""
    with SummaryWriter(str(folder)) as writer:
        for step in range(3):
            writer.add_scalar("loss", 1.0 + step, step)
    return folder


def _import(*args: str) -> tuple[int, str, str]:
    done = runner.invoke(app, ["import", *args, "--format", "json"])
    return done.exit_code, done.stdout, done.stderr


def _refusal(folder: Path, out: Path) -> str:
    """The one error line of an import of `folder` that is refused (exit 3, no run written)."""
    code, stdout, stderr = _import(str(folder), "--out", str(out))
    assert (code, stdout) == (3, ""), stderr
    (line,) = stderr.strip().splitlines()
    assert not out.exists()
    return line


@pytest.mark.parametrize("beside", [True, False], ids=["beside-event-files", "alone"])
def test_an_event_file_that_is_a_fifo_is_refused_unread(tmp_path: Path, beside: bool) -> None:
    """A FIFO named as an event file was passed over unsaid (beside event files), or the
    directory was said to hold no event file (alone). It is named, never opened (an open of a
    FIFO that no process writes blocks for ever)."""
    folder = _events(tmp_path / "logs") if beside else tmp_path / "logs"
    folder.mkdir(exist_ok=True)
    fifo = folder / "events.out.tfevents.1.host.fifo"
    os.mkfifo(fifo)
    line = _refusal(folder, tmp_path / "run")
    assert line == f"error: {fifo}: not a regular file"
