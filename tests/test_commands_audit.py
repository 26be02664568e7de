"""An audit of the less-travelled commands (`tune`, `diff`, `branch`, `watch`, `--plot`) on
real runs, as a researcher reads them after a collapse: each test reproduces one defect found
there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stabledrl_cli.branching import BranchOutcome
from stabledrl_cli.cli.app import app
from stabledrl_cli.cli.branch import _cells

LOG = Path(__file__).resolve().parents[1] / "fixtures" / "imports" / "trl-lr0.2"


def _diverged(*, not_judged: str | None = None) -> BranchOutcome:
    """A grpo branch as `stabledrl record --lr 1e-3 --no-skip-nonfinite --checkpoint-every 8`
    then `branch RUN --at 0 -p grpo --rl-steps 120` gave it: its weights went non-finite after
    step 108, where it stopped; its reward fell from 0.62 to 0.1 within the collapse rule's
    first window, which sees no fall there; the replay flagged risk steps within its span."""
    return BranchOutcome(
        policy="grpo",
        run=Path("runs/hins/branches/grpo@0"),
        steps=109,
        first_reward_collapse=None,
        not_judged=not_judged,
        final_reward=0.105,
        replay_collapsed_steps=[16, 17, 18],
        span=(0, 108),
        replayed_in_span=109,
        diverged_at=108,
    )


def test_a_diverged_branch_did_not_hold() -> None:
    """The branch's weights went non-finite: the table read `held, reward 0.105, diverged after
    step 108` and `agree` said `no`, counting the replay's risk flags, which were right, as a
    miss. A branch that diverged did not hold: it is collapsed, and agrees with a flag."""
    branch = _diverged()
    assert branch.collapsed is True
    assert branch.agree is True
    entry = branch.to_dict()
    assert (entry["collapsed"], entry["agree"], entry["diverged_at"]) == (True, True, 108)
    outcome = _cells(branch)[0]
    assert not outcome.startswith("held"), outcome
    assert outcome == "collapsed, reward 0.105, diverged after step 108"


def test_a_diverged_branch_is_judged_however_short() -> None:
    """A branch too short for the collapse rule's window that diverged: its divergence is a
    measurement, where `not judged` said nothing was measured."""
    branch = _diverged(not_judged="the trajectory has 4 finite reward draws")
    assert branch.collapsed is True
    assert branch.to_dict()["not_judged"] == "the trajectory has 4 finite reward draws"
    assert _cells(branch)[0].startswith("collapsed, ")


def _fifo(tmp_path: Path) -> Path:
    os.mkfifo(tmp_path / "fifo")
    return tmp_path / "fifo"


@pytest.mark.parametrize("make", [_fifo, lambda _: Path(os.devnull)], ids=["fifo", "device"])
@pytest.mark.parametrize(
    "command",
    [["import", str(LOG)], ["record", "--rl-steps", "1", "--device", "cpu"]],
    ids=["import", "record"],
)
def test_a_run_under_a_fifo_or_a_device_is_a_usage_error(tmp_path, make, command) -> None:
    """`import LOG --out FIFO/run` (and `record`, `branch --out FIFO`) exited 4, `cannot write
    it (Not a directory)`, `record` and `branch` after seconds of work, where the same path
    under a regular file is refused at once, exit 2, as a report or an archive under a FIFO
    is: it names no place a run can be made, which is bad input, not a failed write."""
    parent = make(tmp_path)
    result = CliRunner().invoke(app, [*command, "--out", str(parent / "run")])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line == f"error: --out {parent / 'run'}: {parent} is not a directory"


def test_branch_runs_under_a_fifo_are_a_usage_error(tmp_path) -> None:
    """`branch RUN --out FIFO` exited 4, `cannot write it (Not a directory)`, after replaying
    the original; as `--out FILE`, it is refused before that, exit 2."""
    run, fifo = tmp_path / "run", _fifo(tmp_path)
    record = ["record", "--out", str(run), "--rl-steps", "1", "--checkpoint-every", "1"]
    assert CliRunner().invoke(app, [*record, "--device", "cpu"]).exit_code == 0
    branch = ["branch", str(run), "--at", "0", "-p", "grpo", "--out", str(fifo)]
    result = CliRunner().invoke(app, [*branch, "--device", "cpu"])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line == f"error: {fifo / 'grpo@0'}: {fifo} is not a directory"
