"""A run's rollouts and their reward draws: which recorded steps make up one rollout (verl's
training steps, their indices) and the one reward each rollout draws, the value the
observed-collapse rule of `detectors` reads (docs/collapse.md). numpy in, numpy out.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from stabledrl_cli.dump._schema import REWARD_COUNT

REWARD_DRAW_SCALARS = ("reward_mean", "inner_step", "rollout_reward", REWARD_COUNT)
"""The scalars a run's reward draws are read from (`run_reward_draws`)."""

_Series = tuple[np.ndarray, np.ndarray]


def count_weights(steps: np.ndarray, counted_steps: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[S] the weight of the reward of each of `steps` in a mean over several: the count it is
    a mean of (counted_steps, counts: [C] a count's series, in step order: `reward_count`,
    `rollout_count`); 1 at a step without one, as at every step of a run recorded before
    it."""
    weights = np.ones(steps.size)
    known = np.isin(steps, counted_steps)
    weights[known] = counts[np.searchsorted(counted_steps, steps[known])]
    return weights


def training_step_starts(
    steps: np.ndarray, inner_steps: np.ndarray, inner_step: np.ndarray
) -> np.ndarray:
    """[T] the first step of each training step of a verl recording (a rollout: its step
    whose `inner_step` is 0 and the steps after it above 0), in step order, from its `steps`
    [S] and inner_step series ([I] steps, values): the training step of a step s is
    `np.searchsorted(starts, s, side="right")`, from 1 as verl's log numbers them. A step's
    inner_step counts the updates since its rollout's first step (verl's hook: 0 there, one
    more each step after), so a rollout starts at s - inner_step of each of its steps, its
    first step's file unreadable or not; a step without one is a rollout of its own."""
    counted = np.isfinite(inner_step)
    firsts = inner_steps[counted] - inner_step[counted].astype(np.int64)
    return np.union1d(firsts, np.setdiff1d(steps, inner_steps[counted]))


def rollout_indices(inner_steps: np.ndarray, inner_step: np.ndarray) -> dict[int, int]:
    """A verl recording's step -> its rollout's index (from 0), from its inner_step series
    ([I] steps, values), not from the rollouts' places in a list: a rollout whose every step is
    lost or unreadable leaves no start, and the rollouts after it would each take the number of
    the one before. A rollout starts at a step minus its inner_step; the recording's first at
    step 0 (verl's hook numbers a process's steps from 0). A rollout whose step before the next
    start was read ends there (its steps between, read or lost, are its own): it is that long.
    Where none does, k divides every start and is no less than any rollout's steps up to its
    last read: where only one number is both, it is k.
    verl trains every rollout alike (its dataloader drops the last partial batch): where those
    rollouts are all k steps long and every start is a multiple of k, each step n up to the
    last read, read or not, is in the rollout n // k. Otherwise rollouts are numbered in turn
    from step 0's up to the first whose end is lost (a whole rollout may be lost after it);
    from there on no step is numbered, nor any where step 0's rollout is lost whole."""
    counted = np.isfinite(inner_step)
    read = np.sort(inner_steps[counted])
    starts = np.unique(read - inner_step[counted].astype(np.int64))
    if not starts.size:
        return {}
    nexts = np.append(starts[1:], read[-1] + 1)
    lasts = read[np.searchsorted(read, nexts) - 1]  # each rollout's last step read
    ended = lasts == nexts - 1
    lengths = set((nexts - starts)[:-1][ended[:-1]].tolist())
    if not lengths:  # k divides every start and is no less than any rollout's steps read
        g, longest = int(np.gcd.reduce(starts)), int((lasts - starts).max()) + 1
        lengths = {g} if longest <= g < 2 * longest else lengths
    if len(lengths) == 1:
        (k,) = lengths
        if not (starts % k).any():
            return {n: n // k for n in range(int(read[-1]) + 1)}
    if starts[0]:  # the rollout of step 0 is lost whole: the ones after it are not known
        return {}
    indices: dict[int, int] = {}
    rollouts = zip(starts.tolist(), lasts.tolist(), ended.tolist(), strict=True)
    for i, (a, last, whole) in enumerate(rollouts):
        indices.update(dict.fromkeys(range(a, last + 1), i))
        if not whole:
            break
    return indices


def reward_draws(
    steps: np.ndarray,
    rewards: np.ndarray,
    inner_steps: np.ndarray,
    inner_step: np.ndarray,
    begun_steps: np.ndarray | None = None,
    begun: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    *,
    verl: bool = False,
) -> _Series:
    """The rewards the observed-collapse rule reads: one a rollout, at its first step. A
    rollout's steps are the one whose recorded `inner_step` is not above 0 and the steps after
    it whose `inner_step` is: passes over the same sequences (ppo_epochs, num_iterations) and
    its other mini-batches (verl's, TRL's steps_per_generation above
    gradient_accumulation_steps). Its draw is the mean of their rewards that are not NaN (NaN
    when none is), each weighted by `weights` (`count_weights` of `reward_count`: the rewards
    a step's mean is over, so the draw is the rollout's own mean over its scored sequences, as
    TRL logs `reward` and verl `critic/score/mean`, also where verl's padding samples leave
    some mini-batches fewer; 1 where unknown: the rollout's own mean when its steps hold as
    many sequences each); a step of weight 0 holds no reward. A step before the first such
    start is left out; a step without an inner_step is a rollout of its own. A step that records
    `rollout_reward` (`begun`: the rollouts the training generated during the step, their
    mean reward, as TRL logs `reward`) starts one too, whatever its inner_step, and that is
    its draw: so a rollout begun inside a step that trains an earlier one is drawn at that
    step, apart from the earlier one, as TRL logs it. Of a verl recording (`verl`), whose
    hook counts inner_step from its rollout's first step, a rollout starts at each of its
    steps' step minus its inner_step (`training_step_starts`, verl's training steps), so one
    whose first step is unread keeps its own draw there, not merged with the one before.

    steps, rewards: [S] the reward_mean series, in step order; inner_steps, inner_step: [I]
    the inner_step series; begun_steps, begun: [B] the rollout_reward series (None: none);
    weights: [S] (None: 1 each) -> ([D] steps, [D] rewards)."""
    marked = np.zeros(0, dtype=np.int64) if begun_steps is None else begun_steps
    weights = np.ones(steps.size) if weights is None else weights
    if verl:
        first = training_step_starts(steps, inner_steps, inner_step)
    else:
        continued = inner_steps[np.asarray(inner_step, dtype=np.float64) > 0]
        first = np.union1d(
            steps[~np.isin(steps, continued)], inner_steps[~np.isin(inner_steps, continued)]
        )
    starts = np.union1d(first, marked)
    rollout = np.searchsorted(starts, steps, side="right") - 1
    scored = (rollout >= 0) & ~np.isnan(rewards) & (weights > 0)
    weighted = rewards[scored] * weights[scored]
    sums = np.bincount(rollout[scored], weights=weighted, minlength=starts.size)
    counts = np.bincount(rollout[scored], weights=weights[scored], minlength=starts.size)
    held = np.isin(np.arange(starts.size), rollout) | np.isin(starts, marked)
    draws = np.divide(sums, counts, out=np.full(starts.size, np.nan), where=counts > 0)
    if begun is not None:
        draws[np.searchsorted(starts, marked)] = begun
    return starts[held], draws[held]


def run_reward_draws(series: Mapping[str, _Series], *, verl: bool = False) -> _Series:
    """`reward_draws` of a run's `REWARD_DRAW_SCALARS` series (as `scalar_series_many` gives
    them), each step's reward weighted by its `reward_count` (`count_weights`); `verl`: the
    run is a verl recording (`observed.is_verl_recording`)."""
    steps, rewards = series["reward_mean"]
    weights = count_weights(steps, *series[REWARD_COUNT])
    return reward_draws(
        steps, rewards, *series["inner_step"], *series["rollout_reward"], weights, verl=verl
    )
