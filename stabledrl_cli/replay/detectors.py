"""Collapse detectors shared by `inspect` (the recorded run) and replay (each policy).

Rules and defaults: docs/collapse.md. numpy in, numpy out.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from stabledrl_cli.replay.config import (
    COLLAPSE_NOISE_MARGIN,
    DEFAULT_COLLAPSE_WINDOW,
    DEFAULT_SPIKE_FACTOR,
    DEFAULT_WARNING_DROP,
    DEFAULT_WARNING_WINDOW,
    SPIKE_HISTORY,
    SPIKE_MIN_HISTORY,
    WARNING_NOISE_MARGIN,
)
from stabledrl_cli.replay.guard_rules import SCALE_ABOVE, unit_of


def _largest_finite(values: np.ndarray) -> float:
    """max |value| over the finite `values`; 0 without any."""
    finite = values[np.isfinite(values)]
    return float(np.abs(finite).max()) if finite.size else 0.0


def collapse_window(num_steps: int) -> int:
    """The default W of the observed-collapse rule, the same for a run of any length
    (`num_steps` does not change it; a replay's own W is `Observed.collapse_window`)."""
    del num_steps
    return DEFAULT_COLLAPSE_WINDOW


def rolling_mean(values: np.ndarray, window: int, min_periods: int | None = None) -> np.ndarray:
    """Trailing mean over `window` values: out[i] = mean(values[i - window + 1 : i + 1]).

    values: [S]. Where fewer than `min_periods` (default: `window`) values precede, NaN. A
    non-finite value makes every window that holds it NaN (propagated, not hidden).
    """
    values = np.asarray(values, dtype=np.float64)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    min_periods = window if min_periods is None else min_periods
    n = values.shape[0]
    out = np.full(n, np.nan)
    if n == 0:
        return out
    finite = np.isfinite(values)
    bad = np.concatenate(([0], np.cumsum(~finite)))
    index = np.arange(n)
    start = np.maximum(index - window + 1, 0)
    count = index + 1 - start
    largest = _largest_finite(values)
    unit = unit_of(largest) if largest > SCALE_ABOVE else 1.0  # a sum near 1e308 overflows
    sums = _window_sums(np.where(finite, values / unit, 0.0), min(window, n), start)
    means = sums / count * unit  # a mean is no larger than the largest value: finite
    has_bad = (bad[index + 1] - bad[start]) > 0
    ok = count >= min_periods
    out[ok] = np.where(has_bad[ok], np.nan, means[ok])
    return out


def rolling_median(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing median over `window` values: out[i] = median(values[i - window + 1 : i + 1]).

    values: [S] -> [S]; NaN until `window` values exist, and where the window holds a
    non-finite value (as `rolling_mean`). Unlike a mean, one stray value cannot move it past
    the others: a median of 3 moves only when two of the three do."""
    values = np.asarray(values, dtype=np.float64)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out = np.full(values.shape[0], np.nan)
    if values.shape[0] < window:
        return out
    windows = sliding_window_view(values, window)
    judged = np.isfinite(windows).all(axis=1)
    out[window - 1 :][judged] = np.median(windows[judged], axis=1)
    return out


def _window_sums(values: np.ndarray, block: int, start: np.ndarray) -> np.ndarray:
    """out[i] = sum(values[start[i] : i + 1]), each window at most `block` long and, when
    shorter, starting at 0 or at a multiple of `block`. Summed within blocks of `block`
    values: a window is the tail of one block plus the head of the next, so a sum holds the
    window's values only (a difference of running sums would keep the rounding of a 1e35
    long gone from the window, and read a window of -0.2 as 0)."""
    n = values.shape[0]
    blocks = np.zeros(-(-n // block) * block)
    blocks[:n] = values
    blocks = blocks.reshape(-1, block)
    heads = np.cumsum(blocks, axis=1).reshape(-1)[:n]
    tails = np.cumsum(blocks[:, ::-1], axis=1)[:, ::-1].reshape(-1)[:n]
    index = np.arange(n)
    one_block = start // block == index // block
    return np.where(one_block, heads, tails[start] + heads)


def spike_flags(
    values: np.ndarray,
    factor: float = DEFAULT_SPIKE_FACTOR,
    history: int = SPIKE_HISTORY,
    min_history: int = SPIKE_MIN_HISTORY,
) -> np.ndarray:
    """values: [S] -> [S] bool: value > factor x median of the previous `history` finite,
    non-zero values.

    Needs `min_history` such values before it; non-finite values are never spikes (they are
    counted as non-finite) and are left out of the history, and so are zeros (a step with no
    update: every advantage 0), which would make the median 0 and every update a spike.
    """
    values = np.asarray(values, dtype=np.float64)
    flags = np.zeros(values.shape[0], dtype=bool)
    kept_index = np.flatnonzero(np.isfinite(values) & (values != 0))
    kept = values[kept_index]
    if kept.shape[0] <= min_history:
        return flags
    medians = np.full(kept.shape[0], np.nan)
    # Values near float64's largest make a median (the mean of two middle values) or its
    # threshold overflow to inf: a threshold past the range, which no value exceeds.
    with np.errstate(over="ignore"):
        # Short histories (fewer than `history` values before) one by one; full ones vectorized.
        for k in range(min_history, min(history, kept.shape[0])):
            medians[k] = np.median(kept[:k])
        if kept.shape[0] > history:
            # windows[j] = kept[j : j + history]
            windows = sliding_window_view(kept[:-1], history)
            medians[history:] = np.median(windows, axis=1)
        checked = ~np.isnan(medians)
        flags[kept_index[checked]] = kept[checked] > factor * medians[checked]
    return flags


def spike_judged(values: np.ndarray, min_history: int = SPIKE_MIN_HISTORY) -> np.ndarray:
    """values: [S] -> [S] bool: the steps `spike_flags` compares with a median, the finite,
    non-zero values with `min_history` such values before them (a step before those is
    neither a spike nor judged one)."""
    values = np.asarray(values, dtype=np.float64)
    judged = np.zeros(values.shape[0], dtype=bool)
    judged[np.flatnonzero(np.isfinite(values) & (values != 0))[min_history:]] = True
    return judged


def observed_reward_collapse(
    steps: np.ndarray,
    rewards: np.ndarray,
    reward_range: tuple[float, float] | None = None,
    window: int = DEFAULT_COLLAPSE_WINDOW,
    noise_margin: float = COLLAPSE_NOISE_MARGIN,
) -> int | None:
    """The first step of observed reward collapse, or None (docs/collapse.md).

    steps, rewards: [S] (per recorded step, e.g. the `reward_mean` scalar). With W = `window`
    (fixed: a trajectory's collapse step does not move when it is recorded longer) and m the
    rolling mean of reward - floor over W steps (floor = the lowest finite reward, or
    reward_range[0] when lower):
    the first step i where m falls below half of its best value so far and stays below that
    level for 2W steps, or to the end of the run, and where the drop is beyond the reward's
    noise: best - max(m[i : i + 2W]) > (c + sqrt(2 ln(n_i / W))) * sigma_i / sqrt(W), with
    sigma_i the per-step noise of the rewards before the window, their largest step left out
    (`noise_before`), n_i the steps up to i and c `noise_margin`. The square root is how far
    the best of n_i / W independent W-step means rises above their level by luck alone.
    A NaN reward (a step none of whose samples was scored) is left out, as if not recorded.
    """
    steps = np.asarray(steps)
    rewards = np.asarray(rewards, dtype=np.float64)
    if steps.shape != rewards.shape:
        raise ValueError(f"steps {steps.shape} and rewards {rewards.shape} differ in shape")
    order = np.argsort(steps, kind="stable")
    scored = order[~np.isnan(rewards[order])]  # a NaN reward (nothing scored) is no draw
    steps, rewards = steps[scored], rewards[scored]
    n = rewards.shape[0]
    if n < window or not np.isfinite(rewards).any():
        return None
    # A declared range the rewards fall below (a -1/0 reward declared (0, 1)) would leave every
    # level negative, the best never positive: no collapse could ever be found.
    floor = float(rewards[np.isfinite(rewards)].min())  # a -inf floor made every level inf
    if reward_range is not None:
        floor = min(floor, reward_range[0])
    largest = max(abs(floor), _largest_finite(rewards))
    if largest > SCALE_ABOVE:  # reward - floor and the noise's squares would overflow
        unit = unit_of(largest)
        rewards, floor = rewards / unit, floor / unit
    level = rolling_mean(rewards - floor, window)
    best = np.fmax.accumulate(level)  # NaN until the first full window; NaN never wins
    threshold = 0.5 * best
    ahead_max = _ahead_max(level, 2 * window)
    margin = noise_margin + luck_of_the_best(n, window)
    noise = noise_before(rewards, window, skip_largest=True)
    beyond_noise = best - ahead_max > margin * noise / np.sqrt(window)
    collapsed = (best > 0) & np.isfinite(level) & (ahead_max < threshold) & beyond_noise
    hits = np.flatnonzero(collapsed)
    if hits.size:
        return int(steps[hits[0]])
    early = _early_fall(rewards - floor, window, noise_margin)  # what the levels cannot see
    return None if early is None else int(steps[early])


def _ahead_max(level: np.ndarray, span: int) -> np.ndarray:
    """[S]: the largest level over [i, i + span), cut at the end of the run ("stays below for
    2W steps, or to the end"). NaN counts as not below (+inf): a non-finite stretch breaks a
    collapse."""
    padded = np.concatenate((np.where(np.isnan(level), np.inf, level), np.full(span - 1, -np.inf)))
    ahead: np.ndarray = sliding_window_view(padded, span).max(axis=1)
    return ahead


def _early_fall(above_floor: np.ndarray, window: int, noise_margin: float) -> int | None:
    """The index of a fall within the first `window` rewards, which the W-reward levels cannot
    see (the first of them holds the fall): with m_i the mean of the rewards up to i (of
    min(i + 1, W) of them, the last W), the best of m_0..m_{W-2} so far and k its rewards, the
    first i < W where the m over [i, i + 2W) stay below half of that best, by more than
    (`noise_margin` + sqrt(2 ln W)) * sigma / sqrt(k), sigma the noise of the first 3W rewards
    (the fall, their largest step, left out: `noise_before`) and sqrt(2 ln W) how far the best
    of W such means rises by luck alone; None without one (a window of 1 has no first means).
    above_floor: [S], S >= W."""
    if window < 2:
        return None
    level = rolling_mean(above_floor, window, min_periods=1)
    first = np.arange(window - 1)
    best = np.fmax.accumulate(level[: window - 1])
    draws = np.maximum.accumulate(np.where(level[: window - 1] == best, first, 0)) + 1
    best = np.concatenate((best, np.full(level.size - best.size, best[-1])))
    draws = np.concatenate((draws, np.full(level.size - draws.size, draws[-1])))
    ahead_max = _ahead_max(level, 2 * window)
    start = above_floor[: 3 * window]
    sigma = noise_before(start, start.size, skip_largest=True)[-1]
    margin = noise_margin + np.sqrt(2 * np.log(window))
    beyond_noise = best - ahead_max > margin * sigma / np.sqrt(draws)
    fell = (best > 0) & np.isfinite(level) & (ahead_max < 0.5 * best) & beyond_noise
    hits = np.flatnonzero(fell[:window])
    return int(hits[0]) if hits.size else None


def luck_of_the_best(length: int, window: int) -> np.ndarray:
    """[length]: sqrt(2 ln(n_i / window)) (0 while n_i <= window), with n_i = i + 1 the values
    up to i: about how many standard errors the best of n_i / window independent
    window-means rises above their level by luck alone."""
    seen = np.arange(1, length + 1)
    luck: np.ndarray = np.sqrt(2 * np.log(np.maximum(seen / window, 1.0)))
    return luck


def noise_before(values: np.ndarray, window: int, *, skip_largest: bool = False) -> np.ndarray:
    """values: [S] in step order -> [S] sigma_i, the per-step noise of the values before the
    window that ends at i and of the step into it (the differences among values[: i - window
    + 2]), so that a fall inside that window does not count as noise (a fall at its first
    value does, once); of values[: i + 1] while fewer than `window` values precede the window.
    The rules' noise margins were chosen with this estimate (docs/collapse.md).

    sigma: the root mean square of successive differences over sqrt(2) (a white noise's
    standard deviation; a trend adds little to it). Differences touching a non-finite value
    are left out; 0 without any. skip_largest: the largest difference is left out too (a
    single fall from where the values began is no noise)."""
    differences = np.diff(values)
    finite = np.isfinite(differences)
    square = np.where(finite, differences**2, 0.0)
    sums, counts = np.cumsum(square), np.cumsum(finite)
    if skip_largest:
        sums, counts = sums - np.maximum.accumulate(square), np.maximum(counts - 1, 0)
    squares = np.concatenate(([0.0], sums))
    counted = np.concatenate(([0], counts))
    index = np.arange(values.shape[0])
    upto = np.where(index - window + 1 >= window, index - window + 1, index)
    noise: np.ndarray = np.sqrt(squares[upto] / np.maximum(counted[upto], 1) / 2)
    return noise


def drift_flags(net_push: np.ndarray, window: int, threshold: float) -> np.ndarray:
    """net_push: [S] -> [S] bool: the trailing mean of net_push over `window` steps is below
    `threshold` (docs/collapse.md: drift, the early warning beside collapse).

    A step is flagged only once a full window precedes it (so a few noisy first steps cannot
    flag); a window holding a non-finite value is not flagged (the step is `nonfinite`).
    """
    means = rolling_mean(net_push, window)
    flags: np.ndarray = np.isfinite(means) & (means < threshold)
    return flags


def own_likelihood(
    logp_old: np.ndarray, mask: np.ndarray, token_count: np.ndarray | None = None
) -> float:
    """One step's measurement for the collapse warning: the median of `logp_old` (the policy's
    log-likelihood of its own fresh samples at rollout time) over the scored units (mask [U]
    != 0) whose value is finite; NaN without any. logp_old, mask: [U].

    token_count: [U] each unit's number of tokens (a sequence run that records them): the
    median is then of logp_old / token_count, the per-token likelihood, over the units with
    at least one token."""
    values = np.asarray(logp_old).reshape(-1)
    scored = np.asarray(mask).reshape(-1) != 0
    if token_count is not None:
        counts = np.asarray(token_count).reshape(-1)
        scored &= counts > 0
        values = values / np.maximum(counts, 1)
    kept = values[scored & np.isfinite(values)]
    if not kept.size:
        return float("nan")
    # np.median's value, from one partition in the array's own dtype: no float64 copy, no
    # sort. Of an even count, the lower middle value is the largest below the partition's
    # middle (partitioning at both middles instead took 20 times as long).
    middle = kept.size // 2
    parted = np.partition(kept, middle)
    if kept.size % 2:
        return float(parted[middle])
    return (float(np.maximum.reduce(parted[:middle])) + float(parted[middle])) / 2


def own_likelihood_series(
    steps: np.ndarray, inner_step: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The collapse warning's measurements: (steps, values) of the steps whose `inner_step` is
    0 (the first update on a fresh rollout), or of every step when none records inner_step.

    steps [S], inner_step [S] (NaN where the step records none), values [S] (`own_likelihood`
    of each step) -> ([M] int64, [M] float64), in step order."""
    steps = np.asarray(steps, dtype=np.int64)
    inner = np.asarray(inner_step, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    keep = inner == 0 if np.isfinite(inner).any() else np.ones(steps.shape[0], dtype=bool)
    order = np.argsort(steps[keep], kind="stable")
    return steps[keep][order], values[keep][order]


def collapse_warning(
    steps: np.ndarray,
    values: np.ndarray,
    window: int = DEFAULT_WARNING_WINDOW,
    drop: float = DEFAULT_WARNING_DROP,
    noise_margin: float = WARNING_NOISE_MARGIN,
) -> np.ndarray:
    """The steps whose measurement warns of a collapse (docs/collapse.md).

    steps, values: [M] the measurements (`own_likelihood_series`). m_j = median of the last
    `window` values (`rolling_median`: NaN until `window` exist, or when one of them is NaN);
    measurement j has fallen when max_{i <= j} m_i - m_j exceeds both `drop` and the
    measurements' noise: (c + 2 sqrt(2 ln(j / window))) * sigma_j / sqrt(window), with sigma_j
    their per-step noise before the window (`noise_before`) and c `noise_margin`. The best
    level and the current one can each stray about sqrt(2 ln(j / window)) standard errors by
    luck, one up and one down. It warns when measurement j - 1 has fallen too: one odd batch,
    high or low, moves no median of 3, and two in a row must then move two medians.
    -> [K] int64 the steps that warn."""
    steps = np.asarray(steps, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    levels = rolling_median(values, window)
    best = np.fmax.accumulate(levels) if levels.size else levels  # NaN never wins
    luck = noise_margin + 2 * luck_of_the_best(values.shape[0], window)
    needed = np.maximum(drop, luck * noise_before(values, window) / np.sqrt(window))
    fallen = np.isfinite(levels) & (best - levels > needed)
    warns = np.zeros_like(fallen)
    warns[1:] = fallen[1:] & fallen[:-1]
    out: np.ndarray = steps[warns]
    return out


def warning_judged(values: np.ndarray, window: int = DEFAULT_WARNING_WINDOW) -> int:
    """How many measurements `collapse_warning` judges: j, whose median and the one before it
    are finite (`window` finite measurements in a row each) and have a finite median before
    them to have fallen from, and before whose window `window` measurements give the noise
    (before that, a fall counts in its own noise: with the default margin no series of 5
    measurements can warn). values: [M] -> a count (0: the warning judges none)."""
    finite = np.isfinite(rolling_median(np.asarray(values, dtype=np.float64), window))
    earlier = np.cumsum(finite) - finite  # finite medians before each measurement
    judged = np.zeros_like(finite)
    judged[1:] = finite[1:] & finite[:-1] & (earlier[:-1] > 0)
    judged[: 2 * window - 1] = False
    return int(np.count_nonzero(judged))
