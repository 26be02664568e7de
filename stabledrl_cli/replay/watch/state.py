"""What a watch shows of a run (`RunWatcher.state`, docs/watch.md): `WatchState`, with a
`StepRow` for each of the last steps read."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from stabledrl_cli.dump._views import ReadSteps
from stabledrl_cli.replay.incremental import OwnReplay
from stabledrl_cli.replay.observed import is_verl_recording
from stabledrl_cli.replay.rollouts import (
    REWARD_DRAW_SCALARS,
    rollout_indices,
    run_reward_draws,
    training_step_starts,
)
from stabledrl_cli.replay.summary import unjudged_rules
from stabledrl_cli.replay.watch.alerts import Alert, flag_steps
from stabledrl_cli.replay.watch.rank_files import RankProgress, behind


@dataclass(frozen=True, kw_only=True)
class StepRow:
    """One step as a watcher shows it: recorded reward and grad norm, the own policy's
    replayed discard fraction and flags (None where not known)."""

    step: int
    reward_mean: float | None
    grad_norm: float | None
    discard_frac: float | None
    risk: bool | None
    drift: bool | None
    training_step: int | None = None
    """Of a verl recording: the training step that holds the step, from 1 as verl's log numbers
    them, whose reward `reward_mean` is then (`_training_rewards`); None for any other run."""


def _training_rewards(
    replay: OwnReplay, steps: list[int]
) -> dict[int, tuple[int | None, float | None]]:
    """Of a verl recording, each of `steps` -> (its training step, from 1 as verl's log
    numbers them, None where the recording does not establish it (`rollout_indices`); that
    training step's reward as verl logs it, `critic/score/mean`: its rollout's draw,
    `rollouts.run_reward_draws`, None where it recorded no reward), over the steps read so
    far."""
    read = ReadSteps.of(replay.run, replay.headers(replay.seen))
    scalars = read.scalar_series_many(list(REWARD_DRAW_SCALARS))
    seen = np.asarray(replay.seen, np.int64)
    starts = training_step_starts(seen, *scalars["inner_step"])
    indices = rollout_indices(*scalars["inner_step"])
    drawn = dict(zip(*(a.tolist() for a in run_reward_draws(scalars, verl=True)), strict=True))
    rewards: dict[int, tuple[int | None, float | None]] = {}
    for n in steps:
        start = int(starts[np.searchsorted(starts, n, side="right") - 1])
        index = indices.get(n)
        rewards[n] = (None if index is None else index + 1, drawn.get(start))
    return rewards


@dataclass(frozen=True, kw_only=True)
class WatchState:
    """What a watcher knows of a run now (docs/watch.md)."""

    run: str
    waiting: str | None
    """Why nothing is known yet (no manifest, no step), or None."""
    steps: int
    """Steps read, scalar steps included."""
    last_step: int | None
    own_policy: str | None
    """The own policy's spec (None: the run names none, or one not in the catalogue)."""
    recorded_policy: str | None
    """The policy spec the run's manifest names (None: none)."""
    replayed_steps: int
    """Steps the own policy replayed (0 without one, or on scalar steps only)."""
    scalar_steps: int
    """Steps without a policy batch: nothing to replay, their recorded scalars count."""
    recent: list[StepRow]
    """The last steps, ascending."""
    risk_steps: list[int]
    drift_steps: list[int]
    spike_steps: list[int]
    """Steps whose recorded grad_norm is a spike."""
    nonfinite_steps: list[int]
    """Recorded non-finite steps."""
    nonfinite_training_steps: list[int] | None
    """A verl recording's training steps that hold them, numbered as verl's log numbers them
    (`Observed.nonfinite_training_steps`); None for any other run."""
    collapse_warning: int | None
    """The collapse warning's first step."""
    first_reward_collapse: int | None
    alerts: list[Alert]
    """Every alert so far, in the order seen."""
    ranks: list[RankProgress]
    """Each rank's progress, of a run of several ranks (its directory's step files); [] for
    one rank or a packed archive."""
    ranks_behind: list[int]
    """The ranks of `ranks` behind the furthest one (`rank_files.behind`)."""
    packed_ranks: int | None = None
    """The world size of a packed archive's run of several ranks (its steps joined, each
    whole: no rank's progress is left to show); None otherwise."""
    unjudged: dict[str, str] = field(default_factory=dict)
    """The rules that judged no step of the steps seen, each with why: the own policy's
    `drift` and `spike` (as a replay's `PolicySummary.unjudged`) and the recorded run's
    (`RECORDED_RULES`, `Observed.unjudged`): their none says nothing."""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


RECORDED_RULES = {
    "spike_steps": "spike_steps",
    "nonfinite_steps": "nonfinite_steps",
    "collapse_warning": "collapse_warning_first_step",
    "first_reward_collapse": "first_reward_collapse",
}
"""The recorded run's figures of `WatchState` (its keys) whose rule may judge no step -> the
run figure `Observed.unjudged` names it by."""


def watch_state(
    path: Path,
    replay: OwnReplay | None,
    *,
    waiting: str | None,
    alerts: list[Alert],
    recent: int,
    ranks: list[RankProgress],
    packed_ranks: int | None,
) -> WatchState:
    """What a watcher of `path` knows now: the steps `replay` read (None: none yet), the last
    `recent` of them as rows, the `alerts` raised so far."""
    policy = None if replay is None else replay.spec
    recorded = None if replay is None else replay.run.policy_spec
    seen = [] if replay is None else replay.seen
    if replay is None or not seen:
        return WatchState(
            run=str(path),
            waiting=waiting,
            steps=0,
            last_step=None,
            own_policy=policy,
            recorded_policy=recorded,
            replayed_steps=0,
            scalar_steps=0,
            recent=[],
            risk_steps=[],
            drift_steps=[],
            spike_steps=[],
            nonfinite_steps=[],
            nonfinite_training_steps=None,
            collapse_warning=None,
            first_reward_collapse=None,
            alerts=list(alerts),
            ranks=ranks,
            ranks_behind=behind(ranks),
            packed_ranks=packed_ranks,
        )
    series = replay.series()
    observed = replay.observed()
    unjudged = {}
    if series:
        geometry = [str(kind) for kind in series["geometry"]]
        unjudged.update(unjudged_rules(series, geometry, replay.config.window))
    for key, figure in RECORDED_RULES.items():
        why = observed.unjudged(figure)
        if why is not None:
            unjudged[key] = why
    shown = seen[-recent:] if recent > 0 else []
    index = {int(n): i for i, n in enumerate(series.get("step", []))}
    headers = {h.step: h for h in replay.headers(shown)}
    verl = _training_rewards(replay, shown) if is_verl_recording(replay.run) else {}
    rows = []
    for n in shown:
        i, header = index.get(n), headers.get(n)
        scalars = header.scalars if header is not None else {}
        training, reward = verl.get(n, (None, scalars.get("reward_mean")))
        rows.append(
            StepRow(
                step=n,
                training_step=training,
                reward_mean=reward,
                grad_norm=scalars.get("grad_norm"),
                discard_frac=None if i is None else float(series["discard_frac"][i]),
                risk=None if i is None else bool(series["collapsed"][i]),
                drift=None if i is None else bool(series["drift"][i]),
            )
        )
    return WatchState(
        run=str(path),
        waiting=None,
        steps=len(seen),
        last_step=seen[-1],
        own_policy=policy,
        recorded_policy=recorded,
        replayed_steps=len(replay.steps) if series else 0,
        scalar_steps=len(seen) - len(replay.steps) - len(replay.rejected),
        recent=rows,
        risk_steps=flag_steps(series, "collapsed"),
        drift_steps=flag_steps(series, "drift"),
        spike_steps=list(observed.recorded_spike_steps),
        nonfinite_steps=list(observed.nonfinite_steps),
        nonfinite_training_steps=observed.nonfinite_training_steps,
        collapse_warning=observed.collapse_warning.first_step,
        first_reward_collapse=observed.first_reward_collapse,
        alerts=list(alerts),
        ranks=ranks,
        ranks_behind=behind(ranks),
        packed_ranks=packed_ranks,
        unjudged=unjudged,
    )
