"""`stabledrl record -- CMD` refuses the built-in example's options rather than ignore them:
the command trains with its own settings, so `--rl-steps 5` beside it would promise what
never happens."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

COMMAND = ["--", sys.executable, "-c", "pass"]


@pytest.mark.parametrize(
    "option",
    [
        ["--rl-steps", "5"],
        ["--steps", "5"],
        ["--seed", "3"],
        ["--lr", "0.01"],
        ["--estimator", "elbo"],
        ["--same-mask"],
        ["--unit", "token"],
        ["--max-grad-norm", "2"],
        ["--no-skip-nonfinite"],
        ["--threads", "1"],
        ["--guard", "skip"],
        ["--guard-rule", "zclip"],
        ["--device", "cpu"],
    ],
)
def test_an_option_of_the_built_in_example_beside_a_command_is_a_usage_error(
    tmp_path, option: list[str]
) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["record", "--out", str(out), *option, *COMMAND])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert option[0] in errors[0] and "built-in example" in errors[0]
    assert not out.exists()


def test_the_options_of_a_command_still_run_it(tmp_path) -> None:
    out = tmp_path / "run"
    args = ["record", "--out", str(out), "-p", "grpo", "--no-optimizer-hooks", *COMMAND]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "recorded no step" in result.stderr


def test_a_separator_with_no_command_after_it_is_a_usage_error(tmp_path) -> None:
    """`record --out R -- $TRAIN` with $TRAIN empty trained and recorded the built-in example
    into R, as if no `--` had been given."""
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["record", "--out", str(out), "--rl-steps", "1", "--"])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        "error: no command after --: give the training command after it, or leave -- out "
        "to record the built-in example"
    ]
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--no-optimizer-hooks", "--optimizer-hooks"])
def test_the_optimizer_hooks_switch_without_a_command_is_a_usage_error(tmp_path, flag) -> None:
    """The switch is for `-- CMD` (its help says so): the built-in example ignored it."""
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["record", "--out", str(out), "--rl-steps", "1", flag])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        f"error: {flag}: for a training command (-- CMD); the built-in example records its "
        "steps through its own Recorder"
    ]
    assert not out.exists()


@pytest.mark.parametrize("command", [[sys.executable, "train.py"], ["train.py", "--force"]])
def test_a_command_not_after_a_separator_is_a_usage_error(tmp_path, command) -> None:
    """Without `--` the command's own options were read as record's: `record --out R python
    train.py --force` took the script's --force as its own (replacing the run at R) and ran
    the script without it."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "kept.txt").write_text("mine")
    result = CliRunner().invoke(app, ["record", "--out", str(out), *command])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        "error: put the training command after --: stabledrl record --out RUN -- CMD (before "
        "--, the command's own options would be read as record's)"
    ]
    assert sorted(p.name for p in out.iterdir()) == ["kept.txt"]


@pytest.mark.parametrize(
    ("options", "line"),
    [
        (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["--max-grad-norm", "0"], "--max-grad-norm must be a finite number > 0, got 0.0"),
        (["--seed", str(2**63)], f"--seed must be an integer in [-2**63, 2**63 - 1], got {2**63}"),
        (["--geometry-every", "0"], "--geometry-every must be an integer >= 1, got 0"),
        (["--geometry-k", "0"], "--geometry-k must be an integer >= 1, got 0"),
        (["--geometry-k", "9000"], "--geometry-k must be at most 8192 (a relative error of 0.8%), "
         "got 9000"),
        (["--geometry-seed", "-5"], "--geometry-seed must be an integer >= 0, got -5"),
    ],
)  # fmt: skip
def test_a_value_out_of_range_names_the_option_given(tmp_path, options, line) -> None:
    """`--lr nan` said 'lr must be ...' and `--geometry-every 0` 'geometry every must be ...':
    the library's names for them, where every other bad value names the option."""
    geometry = ["--geometry", "sketch"] if options[0].startswith("--geometry") else []
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["record", "--out", str(out), *geometry, *options])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [f"error: {line}"]
    assert not out.exists()


def test_checkpoints_that_is_a_file_is_refused_before_the_run_changes(tmp_path) -> None:
    """With --checkpoint-every, a RUN/checkpoints that is a file failed the first checkpoint
    write after pretraining, exit 4, the run it replaced (--force) already gone."""
    out = tmp_path / "run"
    first = CliRunner().invoke(app, ["record", "--out", str(out), "--rl-steps", "1"])
    assert first.exit_code == 0, first.output
    (out / "checkpoints").write_text("mine")
    before = sorted(p.name for p in (out / "steps").iterdir())
    args = ["record", "--out", str(out), "--force", "--rl-steps", "1", "--checkpoint-every", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 4, result.output
    assert result.stderr.splitlines() == [
        f"error: {out / 'checkpoints'}: cannot write it (Not a directory)"
    ]
    assert sorted(p.name for p in (out / "steps").iterdir()) == before
    assert (out / "checkpoints").read_text() == "mine"


@pytest.mark.parametrize(
    "option", [["--geometry-k", "64"], ["--geometry-seed", "5"], ["--geometry-method", "jvp"]]
)
def test_a_sketch_setting_beside_a_gram_is_a_usage_error(tmp_path, option) -> None:
    """`--geometry gram --geometry-method jvp` (or -k, -seed) recorded an exact Gram and
    ignored the setting unsaid, where `--geometry gram --geometry-dtype float16` is refused:
    the example's Gram is never a sketch (its 64 or 320 units are far below the 2048 at which
    a Gram falls back to one). Now exit 2, one line naming the option."""
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["record", "--out", str(out), "--geometry", "gram", *option])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert option[0] in line and "--geometry sketch" in line
    assert not out.exists()
