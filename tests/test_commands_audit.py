"""An audit of the less-travelled commands (`tune`, `diff`, `branch`, `watch`, `--plot`) on
real runs, as a researcher reads them after a collapse: each test reproduces one defect found
there."""

from __future__ import annotations

from pathlib import Path

from stabledrl_cli.branching import BranchOutcome
from stabledrl_cli.cli.branch import _cells


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
