"""The figures of each run set side by side around the parting step (`diff_runs`), its own
policy replayed (`incremental.OwnReplay`, over the run's steps up to the last one shown)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from stabledrl_cli.dump import Run, RunIntegrityWarning
from stabledrl_cli.errors import InputError
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.diff.alignment import RolloutRewards, WindowMeans

FIGURES = ("reward_mean", "reward_draw", "grad_norm", "discard_frac", "risk", "risk_judged")
"""The figures set side by side: recorded reward, the rollout's reward as compared (at its
first step, `RolloutRewards`) and pre-clip grad norm, the own policy's replayed discard
fraction and risk (a spike or non-finite update; None, with `risk_judged` False, on a step the
spike rule had not judged: the `spike_judged` column)."""


def _compared_reward(
    step: int,
    scalars: Mapping[str, float],
    rewards: RolloutRewards,
    means: Mapping[str, float] | None,
) -> float | None:
    """The reward_mean compared at `step` (as `diff.steps` compares it), as the side-by-side table
    shows it: the mean over the other run's row's window (`means`), else the draw of the
    rollout that starts there, else the step's own where no rollout draw among the compared
    steps holds it (a rollout whose first step the other run lacks); None inside a rollout,
    whose reward its first step shows."""
    if means is not None:
        return means.get("reward_mean")
    draw = rewards.at(step)
    if draw is not None or rewards.inside(step):
        return draw
    return scalars.get("reward_mean")


def run_figures(
    run: Run,
    numbers: list[int],
    config: ReplayConfig,
    rewards: RolloutRewards,
    window: WindowMeans | None,
    reads: dict[int, int],
) -> dict[int, dict[str, float | bool | None]]:
    """compared number -> FIGURES of `run` at `numbers`, each at the run's step `reads` gives
    for it (the number itself where it gives none, as `diff_runs` reads it) (its own policy
    replayed over the run's steps up to the last of them; its figures None, with a warning,
    when its steps lack a field it needs), with its reward draws `rewards`, or its means over
    the other run's rows (`window`) where it has them."""
    numbered = {reads.get(n, n): n for n in numbers}
    steps = sorted(numbered)
    series: dict[str, Any] = {}
    if any(not h.is_scalar for h in run.step_headers() if h.step <= steps[-1]):
        from stabledrl_cli.replay.incremental import OwnReplay  # torch: a policy batch to replay

        follower = OwnReplay(run, config)
        try:
            follower.extend([n for n in run.step_numbers if n <= steps[-1]])
            series = follower.series()
        except InputError as exc:
            message = f"{run.location}: its own policy is not replayed ({exc})"
            warnings.warn(message, RunIntegrityWarning, stacklevel=2)
    index = {int(n): i for i, n in enumerate(series.get("step", []))}
    wanted = set(steps)
    out: dict[int, dict[str, float | bool | None]] = {}
    for header in run.step_headers():
        if header.step not in wanted:
            continue
        i = index.get(header.step)
        risk = None if i is None else bool(series["collapsed"][i])
        means = None if window is None else window.at(header.step)
        out[numbered[header.step]] = {
            "reward_mean": header.scalars.get("reward_mean"),
            "reward_draw": _compared_reward(header.step, header.scalars, rewards, means),
            "grad_norm": {**header.scalars, **(means or {})}.get("grad_norm"),
            "discard_frac": None if i is None else float(series["discard_frac"][i]),
            "risk": risk if i is None or series["spike_judged"][i] else None,
            "risk_judged": None if i is None else bool(series["spike_judged"][i]),
        }
    return out
