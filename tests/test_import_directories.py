"""`stabledrl import DIR`: a directory stands for the one log it holds (its trainer_state.json,
its event files, its W&B run file). A directory that holds logs of several kinds was imported
as one of them, the others passed over without a word; an event file that is no regular file
(a FIFO, which would block the read) was passed over unsaid too."""

from __future__ import annotations

import json
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


def test_a_directory_of_event_files_and_a_csv_export_is_refused_naming_both(tmp_path: Path) -> None:
    """A TensorBoard directory that also holds a W&B chart's CSV export was imported as its
    event files, the CSV passed over unsaid: the refusal names both and how to pick one."""
    folder = _events(tmp_path / "logs")
    (folder / "wandb_export.csv").write_text("Step,run - loss\n1,5\n2,6\n")
    line = _refusal(folder, tmp_path / "run")
    assert line == (
        f"error: {folder}: logs of 2 kinds (1 events.out.tfevents.* file; wandb_export.csv): "
        "import one: give its file, or pass --format-in tfevents"
    )
    code, stdout, _ = _import(str(folder), "--format-in", "tfevents", "--out", str(tmp_path / "r"))
    assert code == 0 and json.loads(stdout)["steps"] == 3
    code, stdout, _ = _import(str(folder / "wandb_export.csv"), "--out", str(tmp_path / "c"))
    assert code == 0 and json.loads(stdout)["steps"] == 2


def test_a_trainer_state_beside_event_files_is_refused_naming_both(tmp_path: Path) -> None:
    """An output_dir whose logging_dir is itself holds trainer_state.json and event files: it
    was imported as its trainer_state.json alone."""
    folder = _events(tmp_path / "out")
    state = {"log_history": [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    line = _refusal(folder, tmp_path / "run")
    assert line == (
        f"error: {folder}: logs of 2 kinds (trainer_state.json; 1 events.out.tfevents.* "
        "file): import one: give its file, or pass --format-in trainer_state or tfevents"
    )
    code, stdout, _ = _import(
        str(folder), "--format-in", "trainer_state", "--out", str(tmp_path / "r")
    )
    assert code == 0 and json.loads(stdout)["steps"] == 2


def test_a_directory_of_two_csv_logs_names_them(tmp_path: Path) -> None:
    """Two CSV logs and nothing a directory stands for: the refusal said the directory held no
    trainer_state.json, event files or W&B run file, not which logs it held."""
    for name in ("a.csv", "b.csv"):
        (tmp_path / name).write_text("step,loss\n1,0.5\n")
    line = _refusal(tmp_path, tmp_path / "run")
    assert line == (
        f"error: {tmp_path}: a directory without trainer_state.json, events.out.tfevents.* "
        "files or a run-*.wandb file (it holds the logs a.csv, b.csv: give one of them)"
    )


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


def test_a_trainer_state_that_is_a_fifo_is_named_not_said_missing(tmp_path: Path) -> None:
    """A directory whose trainer_state.json is a FIFO was refused as 'a directory without
    trainer_state.json, ...' (it holds one): the file is named as no regular file, unread."""
    os.mkfifo(tmp_path / "trainer_state.json")
    line = _refusal(tmp_path, tmp_path / "run")
    assert line == f"error: {tmp_path / 'trainer_state.json'}: not a regular file"


@pytest.mark.parametrize("name", ["eval.csv", "rows.jsonl", "events.out.tfevents.1.host"])
def test_a_subdirectory_named_as_a_log_is_no_second_log(tmp_path: Path, name: str) -> None:
    """A subdirectory named like a log file (an `eval.csv/` folder of plots) beside the
    directory's trainer_state.json made the directory one of logs of 2 kinds, refused: a
    directory is no CSV, JSON-lines or event file."""
    state = {"log_history": [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    (tmp_path / name).mkdir()
    code, stdout, stderr = _import(str(tmp_path), "--out", str(tmp_path / "run"))
    assert code == 0, stderr
    assert json.loads(stdout)["steps"] == 2
