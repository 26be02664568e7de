"""`stabledrl diff` as a demanding user reads it: what a parting says, at the tolerances given."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from _corpus import flip_bit, step_path, tiny_run
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import Recorder

runner = CliRunner()


def _scalar_run(path: Path, losses: list[float]) -> Path:
    """A run of scalar steps with these recorded losses."""
    with Recorder(path, policy=None) as recorder:
        for step, loss in enumerate(losses):
            recorder.log_step(step, loss=loss, grad_norm=1.0)
    return path


def test_a_parting_scalar_shows_the_digits_that_tell_its_values_apart(tmp_path):
    """Under --atol 0 --rtol 0 a loss of 0.1 against 0.1000001 parts, and the scalars line
    said 'loss: 0.1 vs 0.1' (6 significant digits): a parting between two values shown
    equal. It takes the digits past 6 that tell them apart; 6 still where they do."""
    a = _scalar_run(tmp_path / "a", [0.5, 0.1, 0.25])
    b = _scalar_run(tmp_path / "b", [0.5, 0.1000001, 0.75])
    args = ["diff", str(a), str(b), "--device", "cpu", "--atol", "0", "--rtol", "0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "             loss: 0.1 vs 0.1000001" in result.stdout.splitlines()
    done = runner.invoke(app, [*args, "--until", "2", "-f", "json"])
    scalars = json.loads(done.stdout)["first"]["scalars"]
    assert scalars["fields"] == [{"field": "loss", "what": "0.1 vs 0.1000001"}]
    c = _scalar_run(tmp_path / "c", [0.5, 0.123456789, 0.25])
    done = runner.invoke(app, ["diff", str(a), str(c), "--device", "cpu", "-f", "json"])
    what = json.loads(done.stdout)["first"]["scalars"]["fields"][0]["what"]
    assert what == "0.1 vs 0.123457"


def test_a_step_neither_run_can_read_is_not_called_identical(tmp_path):
    """Two copies of a run whose step 1 lost its data (a flipped bit) and its step 2 file's
    tail (torn): neither step was compared, each listed 'unreadable in A' and 'in B', yet the
    verdict read 'identical: every array of every step equal, bit for bit' (JSON identical
    true). They never part (exit 0), but are not called identical."""
    a = tiny_run(tmp_path / "a")
    flip_bit(step_path(a, 1), step_path(a, 1).stat().st_size - 1)
    torn = step_path(a, 2)
    torn.write_bytes(torn.read_bytes()[:100])
    b = shutil.copytree(a, tmp_path / "b")
    done = runner.invoke(app, ["diff", str(a), str(b), "--device", "cpu", "-f", "json"])
    assert done.exit_code == 0, done.output
    data = json.loads(done.stdout)
    assert data["unreadable_a"] == data["unreadable_b"] == [[1, 2]]
    assert (data["compared"], data["parted_at"], data["identical"]) == (2, None, False)
    text = runner.invoke(app, ["diff", str(a), str(b), "--device", "cpu"]).stdout
    assert "they never part: every step both hold equal, bit for bit" in text.splitlines()
    assert "identical" not in text


def _rewarded(path: Path, scale: float) -> Path:
    """A run of scalar steps whose figures take 7 or 8 characters: a small negative reward,
    a grad norm in the thousands."""
    with Recorder(path, policy=None) as recorder:
        for step in range(4):
            recorder.log_step(
                step, reward_mean=-0.0123 * scale * (step + 1), grad_norm=1234.5 * scale
            )
    return path


def test_the_figures_around_a_parting_are_never_cut_at_80_columns(tmp_path, monkeypatch):
    """Rewards of -0.0185 and grad norms of 1850 side by side: at 80 columns the table was
    81 wide and still cut them ('-0.01…', '1.85e+…'). Its headers stack a word a line where
    the table would not fit, so every figure is whole within 80 columns."""
    monkeypatch.setenv("COLUMNS", "80")
    a, b = _rewarded(tmp_path / "a", 1.0), _rewarded(tmp_path / "b", 1.5)
    result = runner.invoke(app, ["diff", str(a), str(b), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    title = next(i for i, line in enumerate(lines) if line.startswith("around step 0"))
    table = lines[title + 1 :]
    assert "…" not in result.stdout
    assert max(len(line) for line in table) <= 80, result.stdout
    assert table[-1].split() == ["3", "-0.0492", "-0.0738", "1.23e+03", "1.85e+03", *["-"] * 4]


def test_the_help_tells_run_a_from_run_b(monkeypatch):
    """The help read 'Usage: stabledrl diff [OPTIONS] RUN RUN' over two identical RUN lines,
    where docs/diff.md and every figure of the output speak of A and B: it names them RUN_A
    and RUN_B, each its own line."""
    monkeypatch.setenv("COLUMNS", "80")
    text = runner.invoke(app, ["diff", "--help"]).stdout
    assert "Usage: stabledrl diff [OPTIONS] RUN_A RUN_B" in text
    lines = text.splitlines()
    assert [line.split()[0] for line in lines if line.startswith("  RUN")] == ["RUN_A", "RUN_B"]


def _graded(path: Path, norms: np.ndarray | None) -> Path:
    """Three steps of one policy batch, the same in every run, with these parameter grad
    norms (None: not recorded)."""
    with Recorder(path, policy="grpo", unit="sequence") as recorder:
        for step in range(3):
            logp = -np.ones(4, np.float32)
            recorder.log_step(
                step, logp=logp, logp_old=logp, advantages=np.ones(4, np.float32), loss=0.5,
                grad_norm=1.0, param_grad_norm=norms,
            )  # fmt: skip
    return path


def test_bits_no_kind_parts_on_are_not_said_within_the_tolerance(tmp_path):
    """Runs equal but for an array only `arrays` compares, bit for bit (parameter grad
    norms, gradient geometry): the verdict read 'bits first differ at step 0, within atol
    1e-06, rtol 1e-05', though no tolerance applies to them (here B alone records them). It
    names them; the JSON lists them under `bits_only`."""
    a = _graded(tmp_path / "a", None)
    b = _graded(tmp_path / "b", np.array([1.0, 2.0], np.float32))
    result = runner.invoke(app, ["diff", str(a), str(b), "--device", "cpu"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert (
        "they never part: bits first differ at step 0, within atol 1e-06, rtol 1e-05 but for "
        "param_grad_norm (compared bit for bit only)"
    ) in result.stdout.splitlines()
    done = runner.invoke(app, ["diff", str(a), str(b), "--device", "cpu", "-f", "json"])
    data = json.loads(done.stdout)
    assert (data["parted_at"], data["bits_only"], data["identical"]) == (
        None,
        ["param_grad_norm"],
        False,
    )
    same = runner.invoke(app, ["diff", str(a), str(a), "--device", "cpu", "-f", "json"])
    assert json.loads(same.stdout)["bits_only"] == []


def test_a_step_a_rank_never_wrote_is_not_called_an_unreadable_file(tmp_path):
    """A 2-rank run whose rank 1 wrote no file for step 2: diff warned 'skipped 1 unreadable
    step file (step 2: incomplete, no file for rank(s) [1])', of a file that does not exist.
    The step is counted as incomplete; a torn file beside it as an unreadable file."""
    a = tiny_run(tmp_path / "a", world_size=2)
    b = shutil.copytree(a, tmp_path / "b")
    (b / "steps" / "step-00000002.rank-0001.safetensors").unlink()
    torn = b / "steps" / "step-00000003.rank-0000.safetensors"
    torn.write_bytes(torn.read_bytes()[:100])
    result = runner.invoke(app, ["diff", str(a), str(b), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1, result.stderr
    assert warning[0].startswith(
        f"warning: {b}: skipped 1 incomplete step and 1 unreadable step file (step 2: incomplete"
    )
    assert "unreadable in B, not compared: 2..3" in result.stdout.splitlines()
