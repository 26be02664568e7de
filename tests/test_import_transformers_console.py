"""`import` of transformers' (and so TRL's) console output: the lines its own PrinterCallback
and ProgressCallback print carry no step number and round values to 4 digits, so no format
reads them; the import names the log that has the steps, in one line (exit 3), rather than a
JSON parser's complaint about single quotes, or "cannot tell what kind of log this is"."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

trainer_callback = pytest.importorskip(
    "transformers.trainer_callback",
    reason="transformers is not installed (pip install -e '.[trl]')",
)

LOGS = [
    {"loss": -0.0123456, "grad_norm": 1.23456789, "learning_rate": 1e-05, "reward": 0.625},
    {"loss": 0.5, "grad_norm": float("nan"), "learning_rate": 9e-06, "reward": 0.25},
]
RUNNER = CliRunner()


def _console(callback: object) -> str:
    """What the callback prints for LOGS, as transformers' Trainer.log hands them over (its
    `epoch` added, no step)."""
    args = None  # neither callback reads the training arguments
    state = trainer_callback.TrainerState(max_steps=4, epoch=0.5)
    control = trainer_callback.TrainerControl()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        callback.on_train_begin(args, state, control)  # type: ignore[attr-defined]
        for logs in LOGS:
            callback.on_log(args, state, control, logs={**logs, "epoch": state.epoch})  # type: ignore[attr-defined]
    return out.getvalue()


@pytest.mark.parametrize("name", ["ProgressCallback", "PrinterCallback"])
@pytest.mark.parametrize(
    "setup",
    [
        "",
        "Loading checkpoint shards: 100%\n[rank0]: warmup\n",
        "Map: 100%|##########| 8/8 [00:00<00:00, 1000.00 examples/s]\n",  # a comma: not a CSV
    ],
)
def test_transformers_console_output_names_the_log_to_import(
    tmp_path: Path, name: str, setup: str
) -> None:
    text = _console(getattr(trainer_callback, name)())
    assert text.startswith("{'loss': ")  # the callback's own line, no step in it
    log = tmp_path / "slurm-1234.out"
    log.write_text(setup + text)
    result = RUNNER.invoke(app, ["import", str(log), "--out", str(tmp_path / "run")])
    assert result.exit_code == 3, result.output
    assert result.stderr == (
        f"error: {log}: transformers' console output (`{{'loss': ...}}` lines), which holds no "
        "step numbers (and values to 4 digits): import the run's trainer_state.json (in its "
        "output_dir's checkpoint-N folders, or trainer.state.save_to_json(PATH)), or log it "
        'with report_to="tensorboard"\n'
    )
    assert not (tmp_path / "run").exists()


def test_a_slurm_output_of_the_progress_bar_and_its_lines_is_refused_the_same(
    tmp_path: Path,
) -> None:
    """sbatch writes a job's stdout and stderr to one file: the progress bar (stderr) and its
    carriage returns, which clear it before each `{'loss': ...}` line. Before, such a file
    was read as a CSV (the bar's commas): 'line 1: not CSV (new-line character seen in
    unquoted field ...)'."""
    out = io.StringIO()
    callback = trainer_callback.ProgressCallback()
    state = trainer_callback.TrainerState(max_steps=4, epoch=0.5)
    control = trainer_callback.TrainerControl()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        callback.on_train_begin(None, state, control)
        for step, logs in enumerate(LOGS, start=1):
            state.global_step = step
            callback.on_step_end(None, state, control)
            callback.on_log(None, state, control, logs={**logs, "epoch": state.epoch})
    assert "\r{'loss': " in out.getvalue()
    log = tmp_path / "slurm-1234.out"
    log.write_text(out.getvalue())
    result = RUNNER.invoke(app, ["import", str(log), "--out", str(tmp_path / "run")])
    assert result.exit_code == 3, result.output
    assert result.stderr.startswith(f"error: {log}: transformers' console output (`{{'loss'")
