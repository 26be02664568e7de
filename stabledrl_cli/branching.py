"""Branch replays: re-train from a recorded run's checkpoint under another policy, as ground
truth for what a one-step replay only estimates (docs/branching.md).

A one-step replay says what a policy's update would do to each recorded batch. A branch
measures what the policy does to the trajectory: it restores the run's checkpoint at (or
nearest before) a step, trains on under the policy, records the branch as a run of its own,
and judges it with the observed-collapse rule over the branch's whole trajectory (the
original's steps before the branch point, then the branch's).

The request of each branch travels through the branch protocol's environment variables
(`stabledrl_cli.capture.branch_protocol`: `to_env`, then `from_env`) into the built-in example
(`stabledrl_cli.example.branch.train_branch`), which `python -m stabledrl_cli.example` runs on
the request of its own environment: one code path for the CLI and for a process honouring the
variables. The user-facing description is docs/branching.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from stabledrl_cli.capture.branch_protocol import (
    BRANCHES_DIR,
    BranchRequest,
    branch_dir,
    check_not_the_original,
    list_checkpoints,
)
from stabledrl_cli.dump import Run, open_run
from stabledrl_cli.dump._integrity import SKIPPED_KINDS
from stabledrl_cli.dump._open import open_snapshot
from stabledrl_cli.dump._run_files import symlink_refused
from stabledrl_cli.dump._run_target import directory_or_nothing, refuse_under_a_file
from stabledrl_cli.dump._stop_notes import STOP_RESUMED
from stabledrl_cli.errors import InputError, UsageError, counted
from stabledrl_cli.example.config import MAX_RL_STEPS, refuse_untrainable
from stabledrl_cli.policies._registry import resolve_spec
from stabledrl_cli.replay.config import DEFAULT_COLLAPSE_WINDOW
from stabledrl_cli.replay.detectors import observed_reward_collapse
from stabledrl_cli.replay.observed import is_verl_recording, reward_windows
from stabledrl_cli.replay.result import ReplayResult
from stabledrl_cli.replay.rollouts import REWARD_DRAW_SCALARS, run_reward_draws

NO_CHECKPOINTS = (
    "{run}: the run has no checkpoints to branch from; record it with --checkpoint-every N "
    "(e.g. stabledrl record --out RUN --checkpoint-every 40)"
)


@dataclass(frozen=True, kw_only=True)
class BranchOutcome:
    """One branch beside what the one-step replay said about its policy."""

    policy: str
    """The canonical spec the branch trained with."""
    run: Path
    """The branch's run directory."""
    steps: int
    """Optimizer steps the branch recorded."""
    first_reward_collapse: int | None
    """The observed-collapse rule over the branch's trajectory (the original's steps before
    the branch point, then the branch's); None: it held, or the rule judged no step
    (`not_judged`)."""
    not_judged: str | None = None
    """Why the observed-collapse rule judged no step of the trajectory (too few reward draws);
    None when it judged some."""
    final_reward: float | None
    """Mean reward_mean over the branch's last 10% of steps (None: no finite reward)."""
    replay_collapsed_steps: list[int] = field(default_factory=list)
    """The one-step replay's risk steps (non-finite or spike) of this policy on the original
    run's recorded batches, from the branch point on."""
    replay_drift_steps: list[int] = field(default_factory=list)
    """The one-step replay's drift steps, from the branch point on."""
    replay_unjudged: dict[str, str] = field(default_factory=dict)
    """The replay's rules (`spike`, `drift`) that judged no step of this policy, each with why
    (`PolicySummary.unjudged`): its steps of them say nothing."""
    span: tuple[int, int] | None = None
    """The compared span: the branch's first and last recorded step (None: it recorded none)."""
    replayed_in_span: int = 0
    """How many of the branch's steps the replay covered: the original's recorded batches of
    those step numbers that the replay replayed."""
    diverged_at: int | None = None
    """The step after which the branch's weights or outputs were not finite, where it stopped
    training (`TrainResult.diverged_at`); None: it trained every step asked."""

    @property
    def collapsed(self) -> bool | None:
        """Whether the branch collapsed: its weights diverged (`diverged_at`), or the
        observed-collapse rule found a collapse; None when neither was seen and the rule judged
        no step of it (`not_judged`): it neither held nor collapsed as far as anyone measured.
        A divergence counts whatever the rule says: weights that are not finite are a collapse
        however the reward fell (docs/collapse.md)."""
        if self.diverged_at is not None:
            return True
        if self.not_judged is not None:
            return None
        return self.first_reward_collapse is not None

    @property
    def replay_flagged(self) -> bool:
        """Whether the one-step replay flagged any risk step from the branch point on."""
        return bool(self.replay_collapsed_steps)

    @property
    def complete(self) -> bool:
        """Whether the replay covered every step the branch trained."""
        return self.steps > 0 and self.replayed_in_span == self.steps

    @property
    def flagged_in_span(self) -> bool:
        """Whether the one-step replay flagged a risk step within the compared span."""
        first, last = self.span or (0, -1)
        return any(first <= step <= last for step in self.replay_collapsed_steps)

    @property
    def agree(self) -> bool | None:
        """Whether the branch collapsed exactly when the replay flagged a risk step within the
        compared span; None when the replay does not cover every branch step, or when the
        collapse comes before the span (the original's, before the branch point): the two
        would judge different spans."""
        collapse, span = self.first_reward_collapse, self.span
        if not self.complete or (collapse is not None and span is not None and collapse < span[0]):
            return None
        if self.collapsed is None:  # the rule judged nothing: nothing to agree with
            return None
        return self.collapsed == self.flagged_in_span

    def to_dict(self) -> dict[str, object]:
        """The branch's entry of `stabledrl branch --format json`."""
        return {
            "policy": self.policy,
            "run": str(self.run),
            "steps": self.steps,
            "collapsed": self.collapsed,
            "first_reward_collapse": self.first_reward_collapse,
            "not_judged": self.not_judged,
            "final_reward": self.final_reward,
            "diverged_at": self.diverged_at,
            "replay": {
                "collapsed_steps": list(self.replay_collapsed_steps),
                "drift_steps": list(self.replay_drift_steps),
                "flagged": self.replay_flagged,
                "unjudged": dict(self.replay_unjudged),
            },
            "compared": {
                "first": None if self.span is None else self.span[0],
                "last": None if self.span is None else self.span[1],
                "branch_steps": self.steps,
                "replayed_steps": self.replayed_in_span,
                "complete": self.complete,
                "flagged": self.flagged_in_span,
            },
            "agree": self.agree,
        }


@dataclass(frozen=True, kw_only=True)
class BranchReport:
    """`stabledrl branch`'s result: where the branches start and how each went."""

    run: Path
    requested_at: int
    at: int
    """The checkpoint's step: the branches' first step."""
    steps: int
    original_first_reward_collapse: int | None
    branches: list[BranchOutcome]
    original_not_judged: str | None = None
    """Why the observed-collapse rule judged no step of the original (None: it judged some)."""
    replayed: ReplayResult = field(repr=False, compare=False)
    """The one-step replay of every branch's policy on the original (its skipped steps)."""
    original_skipped_steps: list[int] = field(default_factory=list)
    """The original's step files the reader skipped (torn, unreadable, a missing rank)."""
    original_stopped_at: int | None = None
    """The first step the original's recording did not hold, its training going on or
    stopped (a divergence of the built-in example's weights, Ctrl-C, a full disk: the
    earliest step of its `recording_stopped` notes that no resume marked); None: none."""

    def to_dict(self) -> dict[str, object]:
        """`stabledrl branch --format json`."""
        return {
            "run": str(self.run),
            "requested_at": self.requested_at,
            "at": self.at,
            "steps": self.steps,
            "original": {
                "first_reward_collapse": self.original_first_reward_collapse,
                "not_judged": self.original_not_judged,
                "skipped_steps": list(self.original_skipped_steps),
                "stopped_at": self.original_stopped_at,
                "live": None if self.replayed.live is None else self.replayed.live.to_dict(),
            },
            "branches": [b.to_dict() for b in self.branches],
        }


def checkpoint_for(run_dir: Path, at: int) -> tuple[int, Path]:
    """The run's checkpoint at `at`, or the nearest one before it.

    InputError (exit 3) for a run without checkpoints; UsageError when all are after `at`.
    """
    found = list_checkpoints(run_dir)
    if not found:
        raise InputError(NO_CHECKPOINTS.format(run=run_dir))
    before = [(step, path) for step, path in found if step <= at]
    if not before:
        raise UsageError(
            f"{run_dir}: no checkpoint at or before step {at} (first at {found[0][0]})"
        )
    return before[-1]


def _trajectory_collapse(
    original: tuple[np.ndarray, np.ndarray],
    branch: tuple[np.ndarray, np.ndarray],
    at: int,
    reward_range: tuple[float, float] | None,
) -> tuple[int | None, str | None]:
    """The observed-collapse rule over the original's reward draws before `at`, then the
    branch's: its first collapse step, and why it judged no step (None when it judged some)."""
    keep = original[0] < at
    steps = np.concatenate([original[0][keep], branch[0]])
    rewards = np.concatenate([original[1][keep], branch[1]])
    window = DEFAULT_COLLAPSE_WINDOW
    if reward_windows(rewards, window) == 0:
        draws = counted(int(np.count_nonzero(np.isfinite(rewards))), "finite reward draw")
        return None, (
            f"the trajectory has {draws} (one a rollout), no {window} in a row (the collapse "
            "window): the collapse rule judges no step"
        )
    return observed_reward_collapse(steps, rewards, reward_range, window), None


_Series = tuple[np.ndarray, np.ndarray]


def _rewards(run: Run) -> tuple[_Series, _Series]:
    """The run's reward_mean series, and its draws, one a rollout (`rollouts.reward_draws`),
    from one pass over the headers."""
    series = run.scalar_series_many(REWARD_DRAW_SCALARS)
    return series["reward_mean"], run_reward_draws(series, verl=is_verl_recording(run))


def _final_reward(rewards: np.ndarray) -> float | None:
    finite = rewards[np.isfinite(rewards)]
    if not finite.size:
        return None
    tail = finite[-max(1, finite.size // 10) :]
    return float(tail.mean())


def _stopped_at(run: Run) -> int | None:
    """The earliest step of the run's `recording_stopped` notes that no resume marked."""
    steps = [
        note["step"]
        for note in run.recording_stops
        if isinstance(note.get("step"), int) and note.get(STOP_RESUMED) is not True
    ]
    return min(steps, default=None)


def _steps_to_end(run_dir: Path, at: int, end: int) -> int:
    """The steps from the checkpoint at `at` to the run's last step file (`end` - 1): a
    branch's default count; UsageError past MAX_RL_STEPS (a stray file far ahead, say)."""
    count = end - at
    if count > MAX_RL_STEPS:
        raise UsageError(
            f"{run_dir}: {count} steps from the checkpoint at step {at} to the last step file "
            f"(step {end - 1}), more than the {MAX_RL_STEPS} a branch trains; "
            "pass --rl-steps N (steps=N)"
        )
    return count


def run_branches(
    run_dir: Path,
    *,
    at: int,
    policies: Sequence[str],
    steps: int | None = None,
    out: Path | None = None,
    force: bool = False,
    device: str = "cpu",
    threads: int | None = None,
    on_branch: Callable[[BranchRequest], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> BranchReport:
    """Trains one branch of the built-in example per policy from `run_dir`'s checkpoint at
    (or nearest before) `at`, and sets each beside the one-step replay of its policy.

    steps: steps per branch (None: to the original's last step file, one the reader skips
    included: it is named in `original_skipped_steps`; a UsageError past MAX_RL_STEPS). out:
    where the branch runs go (default RUN/branches). threads: torch's CPU threads for the
    replay and the branches (None: as they are). on_branch: called as each branch starts
    to train (its checkpoint taken: a checkpoint refused calls nothing); on_step: with
    each branch step's number. InputError when the run holds no readable step at or after
    the checkpoint's: there is no recorded batch to replay beside a branch.
    """
    if not policies:
        raise UsageError("name at least one policy to branch with")
    # canonical specs from the catalogue (no torch), before the run is read: a usage error
    # is one whatever the run holds, and a refused branch costs no torch import
    specs = list(
        dict.fromkeys(entry.spec_of(config) for entry, config in map(resolve_spec, policies))
    )
    # then: a folder that is no run is not a run without checkpoints
    original = open_snapshot(run_dir)
    at_step, checkpoint = checkpoint_for(run_dir, at)
    last = max(original.step_numbers, default=None)
    if last is not None and last < at_step:
        raise InputError(
            f"{run_dir}: no step at or after step {at_step}, the checkpoint's (last step {last}): "
            "no recorded batch to replay beside a branch"
        )
    findings = original.integrity.findings
    skipped = sorted({f.step for f in findings if f.kind in SKIPPED_KINDS and f.step is not None})
    end = max([at_step if last is None else last, *skipped]) + 1  # a torn last step counts too
    count = _steps_to_end(run_dir, at_step, end) if steps is None else steps
    for spec in specs:  # as record refuses it, before the replay asks the run for its fields
        refuse_untrainable(spec, original.unit)
    base = run_dir / BRANCHES_DIR if out is None else out
    if out is None and os.path.islink(base):  # the run's own folder, never written through
        raise symlink_refused(str(base))
    requests = [
        BranchRequest(
            checkpoint=checkpoint,
            policy=spec,
            run_dir=branch_dir(base, spec, at_step),
            at=at_step,
            steps=count,
        )
        for spec in specs
    ]
    for request in requests:  # before any branch trains, with --force too
        check_not_the_original(request.run_dir, run_dir)
        directory_or_nothing(request.run_dir, str(request.run_dir))
        refuse_under_a_file(request.run_dir, str(request.run_dir))  # --out FILE, say
    if not force:
        taken = [r.run_dir for r in requests if r.run_dir.exists() and any(r.run_dir.iterdir())]
        if taken:
            raise UsageError(
                f"{taken[0]} is not empty; pass --force (force=True) to overwrite the branches"
            )
    import torch  # only now: a branch refused above costs no torch import (seconds)

    from stabledrl_cli.example.branch import train_branch
    from stabledrl_cli.replay.engine import replay

    if threads is not None:
        torch.set_num_threads(threads)
    _, original_draws = _rewards(original)
    outcomes = []
    replayed = replay(original, policies=specs, device=device)
    for request in requests:
        honoured = BranchRequest.from_env(request.to_env())
        assert honoured is not None  # to_env always sets the checkpoint
        started = None if on_branch is None else partial(on_branch, request)
        training = train_branch(
            honoured, force=force, device=device, on_step=on_step, on_start=started
        )
        branch = open_run(request.run_dir)
        branch_rewards, branch_draws = _rewards(branch)
        collapse, not_judged = _trajectory_collapse(
            original_draws, branch_draws, at_step, original.reward_range
        )
        result = replayed.policy(request.policy)
        summary = result.summary
        trained = branch.step_numbers
        covered = set(np.asarray(result.series["step"]).tolist()) if len(result.series) else set()
        outcomes.append(
            BranchOutcome(
                policy=request.policy,
                run=request.run_dir,
                steps=len(trained),
                span=(min(trained), max(trained)) if trained else None,
                replayed_in_span=len(covered.intersection(trained)),
                first_reward_collapse=collapse,
                not_judged=not_judged,
                final_reward=_final_reward(branch_rewards[1]),
                replay_collapsed_steps=[s for s in summary.collapsed_steps if s >= at_step],
                replay_drift_steps=[s for s in summary.drift_steps if s >= at_step],
                replay_unjudged=dict(summary.unjudged),
                diverged_at=training.diverged_at,
            )
        )
    return BranchReport(
        run=run_dir,
        requested_at=at,
        at=at_step,
        steps=count,
        original_first_reward_collapse=replayed.observed.first_reward_collapse,
        original_not_judged=replayed.observed.unjudged("first_reward_collapse"),
        branches=outcomes,
        replayed=replayed,
        original_skipped_steps=skipped,
        original_stopped_at=_stopped_at(original),
    )
