"""The alerts a watch raises of the steps read (`RunWatcher.poll`): a risk, non-finite or
drift step of the own policy, a recorded grad-norm spike, the collapse warning, a streak of
steps without a policy-gradient update, a reward collapse."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from stabledrl_cli.replay.derivations import ColumnArray
from stabledrl_cli.replay.incremental import OwnReplay
from stabledrl_cli.vocab import AlertKind


@dataclass(frozen=True, kw_only=True)
class Alert:
    """Something a watcher saw happen, once per kind and step."""

    kind: AlertKind
    step: int
    message: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def flag_steps(series: dict[str, ColumnArray], name: str) -> list[int]:
    if not series:
        return []
    flags = np.asarray(series[name], dtype=bool)
    return [int(n) for n in np.asarray(series["step"])[flags]]


def _stretch_starts(series: dict[str, ColumnArray], name: str) -> list[int]:
    """The steps flagged `name` whose replayed step before is not: where each stretch of them
    begins, over the replayed steps in order (a run that records a batch every Nth step, or
    scalar steps between, is one stretch, not one a step)."""
    if not series:
        return []
    flags = np.asarray(series[name], dtype=bool)
    starts = flags & ~np.concatenate(([False], flags[:-1]))
    return [int(n) for n in np.asarray(series["step"])[starts]]


def candidates(replay: OwnReplay, spike_factor: float) -> list[Alert]:
    """Every alert the steps read raise, raised before or not (a grad-norm spike is one past
    `spike_factor` times its recent median)."""
    series = replay.series()
    observed = replay.observed()
    found: list[Alert] = []
    spec = replay.spec or "the own policy"
    spikes = set(flag_steps(series, "spike"))
    risk = flag_steps(series, "collapsed")
    for step in risk:
        what = "an update norm spike" if step in spikes else "a non-finite update"
        found.append(Alert(kind="risk", step=step, message=f"{spec} replayed: {what}"))
    for step in sorted(set(observed.recorded_spike_steps) - set(risk)):  # once a step
        found.append(
            Alert(
                kind="grad_norm_spike",
                step=step,
                message=f"recorded grad_norm > {spike_factor:g}x its recent median",
            )
        )
    for step in observed.nonfinite_steps:
        found.append(
            Alert(kind="nonfinite", step=step, message="the step recorded NaN or inf values")
        )
    for step in _stretch_starts(series, "drift"):
        found.append(
            Alert(kind="drift", step=step, message=f"{spec} replayed: bias (drift) begins")
        )
    warning = observed.collapse_warning
    if warning.first_step is not None:
        found.append(
            Alert(
                kind="collapse_warning",
                step=warning.first_step,
                message=f"{warning.measured} {warning.drop:g}+ nats below its best",
            )
        )
    streak = observed.unscored_streak
    if streak is not None:
        found.append(
            Alert(
                kind="unscored_streak",
                step=streak.first_step,
                message=f"{streak.steps} policy-batch steps in a row without an update: "
                f"{streak.cause}",
            )
        )
    collapse = observed.first_reward_collapse
    if collapse is not None:
        found.append(
            Alert(
                kind="reward_collapse",
                step=collapse,
                message=f"observed reward collapse (as of step {replay.seen[-1]})",
            )
        )
    return found
