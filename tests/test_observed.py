"""Detectors on synthetic curves, and `observe` on a recorded run."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import stabledrl_cli as sd
from stabledrl_cli.replay.config import COLLAPSE_NOISE_MARGIN, DEFAULT_COLLAPSE_WINDOW
from stabledrl_cli.replay.detectors import (
    _early_fall,
    collapse_warning,
    collapse_window,
    noise_before,
    observed_reward_collapse,
    own_likelihood,
    own_likelihood_series,
    rolling_mean,
    spike_flags,
)
from stabledrl_cli.replay.measurements import host_array, logratio_moments
from stabledrl_cli.replay.observed import observe


def _noisy(curve: np.ndarray, seed: int = 0, scale: float = 0.02) -> np.ndarray:
    return curve + np.random.default_rng(seed).normal(0.0, scale, size=curve.shape)


def test_rolling_mean_matches_a_loop():
    values = np.random.default_rng(0).normal(size=50)
    got = rolling_mean(values, 7)
    for i in range(50):
        want = values[i - 6 : i + 1].mean() if i >= 6 else np.nan
        np.testing.assert_allclose(got[i], want, equal_nan=True)
    partial = rolling_mean(values, 7, min_periods=1)
    np.testing.assert_allclose(partial[2], values[:3].mean())
    with_nan = values.copy()
    with_nan[10] = np.nan
    out = rolling_mean(with_nan, 3)
    assert np.isnan(out[10:13]).all() and np.isfinite(out[13])


def test_spike_flags_rule():
    values = np.ones(30)
    values[3] = 50.0  # fewer than min_history (5) values before it: not judged
    values[12] = 10.0  # exactly 10 x the median: not above it
    values[15] = 10.5
    values[20] = np.nan  # non-finite: not a spike, left out of the history
    values[25] = np.inf
    flags = spike_flags(values)
    assert np.flatnonzero(flags).tolist() == [15]
    # The history is the previous 20 finite values: a long high stretch becomes the norm.
    level = np.concatenate((np.ones(30), np.full(30, 20.0)))
    flagged = np.flatnonzero(spike_flags(level)).tolist()
    assert flagged == list(range(30, 40))  # until 20 x 20.0 outweighs the 1.0s in the median
    assert not spike_flags(np.ones(5)).any()
    assert spike_flags(np.array([])).shape == (0,)


def test_zero_norms_are_left_out_of_the_spike_history():
    """A step with no update (every advantage 0: a sparse reward no sample of the batch got)
    has a zero norm. Such steps made the median 0, so every step that did update, of any size,
    was a spike; they are left out of the history as non-finite ones are."""
    values = np.zeros(40)
    values[[8, 12, 17, 21, 26, 30, 33]] = [1.0, 1.3, 0.8, 1.1, 0.9, 1.2, 14.0]
    assert np.flatnonzero(spike_flags(values)).tolist() == [33]  # 14 > 10 x median 1.05
    assert not spike_flags(np.array([0.0] * 10 + [1.0] + [0.0] * 5 + [2.0])).any()


def test_collapse_window_is_fixed_whatever_the_length():
    assert collapse_window(50) == collapse_window(1000) == DEFAULT_COLLAPSE_WINDOW == 10


def test_collapse_step_does_not_move_when_recorded_longer():
    """The same trajectory recorded 160 and 400 steps long collapses at the same step."""
    steps = np.arange(400)
    curve = _noisy(np.where(steps < 100, np.minimum(0.1 + steps / 60, 0.8), 0.05))
    short = observed_reward_collapse(steps[:160], curve[:160], reward_range=(0.0, 1.0))
    long = observed_reward_collapse(steps, curve, reward_range=(0.0, 1.0))
    assert short is not None and short == long
    wide = observed_reward_collapse(steps, curve, reward_range=(0.0, 1.0), window=20)
    assert wide is not None and wide != long  # the window is a setting: it moves with it


def test_clean_collapse_found_near_the_drop():
    steps = np.arange(300)
    curve = np.where(steps < 200, np.minimum(0.1 + steps / 100, 0.8), 0.05)
    found = observed_reward_collapse(steps, _noisy(curve), reward_range=(0.0, 1.0))
    window = DEFAULT_COLLAPSE_WINDOW
    assert found is not None and 200 <= found < 200 + window
    # The rolling mean must have crossed half of its best there, and not before.
    level = rolling_mean(_noisy(curve), window)
    assert level[found] < 0.5 * np.nanmax(level[:found])
    assert observed_reward_collapse(steps, _noisy(curve)) is not None  # floor = the run's min


def test_slow_drift_is_not_a_collapse():
    steps = np.arange(400)
    curve = np.linspace(0.8, 0.5, 400)  # loses 3/8 of the reward: never halves it
    assert observed_reward_collapse(steps, _noisy(curve), reward_range=(0.0, 1.0)) is None
    ramp_then_drift = np.concatenate((np.linspace(0.1, 0.8, 100), np.linspace(0.8, 0.5, 300)))
    assert observed_reward_collapse(steps, _noisy(ramp_then_drift)) is None  # floor 0.1


def test_recovery_before_2w_is_not_a_collapse():
    steps = np.arange(300)
    window = DEFAULT_COLLAPSE_WINDOW
    curve = np.full(300, 0.8)
    curve[150 : 150 + window] = 0.0  # the rolling mean dips below half for < 2W steps
    assert observed_reward_collapse(steps, curve, reward_range=(0.0, 1.0)) is None
    longer = np.full(300, 0.8)
    longer[150 : 150 + 3 * window] = 0.0  # below half for more than 2W steps
    assert observed_reward_collapse(steps, longer, reward_range=(0.0, 1.0)) is not None


def test_drop_at_the_end_that_lasts_to_the_end_is_a_collapse():
    steps = np.arange(200)
    curve = np.full(200, 0.8)
    curve[-12:] = 0.0  # fewer than 2W steps left, but it never recovers
    found = observed_reward_collapse(steps, curve, reward_range=(0.0, 1.0))
    assert found is not None and found >= 188


def test_negative_rewards_measured_from_the_floor():
    steps = np.arange(200)
    curve = np.where(steps < 120, np.minimum(-0.9 + steps / 60, -0.1), -0.95)
    found = observed_reward_collapse(steps, _noisy(curve), reward_range=(-1.0, 0.0))
    assert found is not None and 120 <= found < 130
    assert observed_reward_collapse(steps, _noisy(curve)) is not None
    # Rewards all below zero that only wobble: measured from the floor, no collapse.
    wobble = -0.5 + 0.05 * np.sin(steps / 7.0)
    assert observed_reward_collapse(steps, wobble, reward_range=(-1.0, 0.0)) is None


def _success_rates(rate: float, batch: int, steps: int, seed: int) -> np.ndarray:
    """Per-step success rates of `batch` 0/1 rewards; `rate`: [steps] or a number."""
    rates = np.broadcast_to(rate, (steps,))
    return np.random.default_rng(seed).binomial(batch, rates) / batch


def test_a_flat_sparse_reward_is_not_a_collapse():
    """2 % successes among 16 samples a step, 300 steps, nothing changing: the best 10-step
    mean is a lucky one and unlucky stretches fall below half of it, but not beyond the noise
    of such a reward (the half-of-best test alone reported 19 of these 20 runs)."""
    steps = np.arange(300)
    reported = [
        observed_reward_collapse(steps, _success_rates(0.02, 16, 300, seed), (0.0, 1.0))
        for seed in range(20)
    ]
    assert reported == [None] * 20


def test_a_sparse_reward_that_really_falls_is_a_collapse():
    """The success rate falls tenfold at step 150 (0.3 -> 0.03 over 16 samples a step): found
    within 2W steps of the fall in every run."""
    steps = np.arange(300)
    rates = np.where(steps < 150, 0.3, 0.03)
    window = DEFAULT_COLLAPSE_WINDOW
    for seed in range(20):
        found = observed_reward_collapse(steps, _success_rates(rates, 16, 300, seed), (0.0, 1.0))
        assert found is not None and 150 - window <= found < 150 + 2 * window, (seed, found)


def test_a_fall_in_one_step_from_where_the_run_began_is_a_collapse():
    """A policy that degenerates at once (the imported TRL run at lr 0.3): 0.375 at its first
    logged step, 0 on the 29 after. The fall is the run's largest step, left out of the noise;
    counted as noise it hid the collapse."""
    steps = np.arange(1, 61, 2)
    rewards = np.concatenate(([0.375], np.zeros(29)))
    assert observed_reward_collapse(steps, rewards) == 21
    assert noise_before(rewards, 10, skip_largest=True)[-1] == 0.0
    assert noise_before(rewards, 10)[-1] > 0.0


def _early_fall_rewards(seed: int, high: int, low: tuple[float, float]) -> np.ndarray:
    """50 rewards, one a rollout: `high` of 0.5-0.7, then `low` (`record --lr 0.05 --rl-steps
    200`: 0.62 at its first rollout, 0.02-0.16 from its second on)."""
    rng = np.random.default_rng(seed)
    return np.concatenate((rng.uniform(0.5, 0.7, high), rng.uniform(*low, 50 - high)))


@pytest.mark.parametrize("high", [1, 3])
def test_a_fall_within_the_first_window_is_a_collapse(high):
    """A fall after the first reward was not seen in 184 of these 200 runs ('none', and `check
    --fail-on-collapse` passed them): the first W-reward level holds the fall, and no later
    one was below half of it (a fall after 3 rewards was found in each). Where the levels find
    none, the means of the first rewards are read: each run is found collapsed, and the first
    rewards alone find the fall within the first window."""
    window = DEFAULT_COLLAPSE_WINDOW
    for seed in range(200):
        rewards = _early_fall_rewards(seed, high, (0.02, 0.16))
        found = observed_reward_collapse(np.arange(50), rewards, (0, 1))
        early = _early_fall(rewards, window, COLLAPSE_NOISE_MARGIN)
        assert found is not None and early is not None and early < window, (seed, found)


def test_a_smaller_fall_within_the_first_window_is_found_at_its_ends():
    """0.5-0.7 falling to 0.2-0.3 after `high` of the first rewards, 200 runs each: found after
    1, 2 or 7-9 of them, seldom after 3-6, where neither the first means nor a W-reward level
    stays below half of the best before the window has passed (docs/collapse.md)."""
    found = [
        sum(
            observed_reward_collapse(
                np.arange(50), _early_fall_rewards(s, high, (0.2, 0.3)), (0, 1)
            )
            is not None
            for s in range(200)
        )
        for high in range(1, 10)
    ]
    assert found == [150, 67, 1, 0, 0, 12, 102, 191, 200]


def test_the_first_rewards_of_a_flat_reward_seldom_read_as_a_fall():
    """The early reading's margin adds sqrt(2 ln W) (the luck of the best of the first means):
    on 1000 flat runs it fires on 1 of 2 % sparse rewards (16 samples a step; the W-reward
    levels report 11 of them, the rule 12), none of 10 % ones or of Gaussian noise."""
    runs = {
        "sparse 2%": lambda rng: rng.binomial(16, 0.02, 300) / 16,
        "sparse 10%": lambda rng: rng.binomial(16, 0.1, 300) / 16,
        "gaussian": lambda rng: np.clip(0.3 + 0.1 * rng.standard_normal(300), 0, 1),
    }
    margin = COLLAPSE_NOISE_MARGIN
    fired = {
        name: sum(
            _early_fall(draw(np.random.default_rng(seed)), DEFAULT_COLLAPSE_WINDOW, margin)
            is not None
            for seed in range(1000)
        )
        for name, draw in runs.items()
    }
    assert fired == {"sparse 2%": 1, "sparse 10%": 0, "gaussian": 0}


def test_noise_before_is_the_per_step_noise_before_the_window():
    rng = np.random.default_rng(0)
    white = 0.5 + 0.1 * rng.standard_normal(4000)
    assert noise_before(white, 10)[-1] == pytest.approx(0.1, rel=0.05)
    with_drop = np.concatenate((white[:2000], white[2000:] - 0.4))  # one drop adds little
    assert noise_before(with_drop, 10)[-1] == pytest.approx(0.1, rel=0.1)
    values = np.array([0.0, 1.0, 1.0, 1.0, 5.0])
    # Window 2: all values up to i while fewer than 2 precede the window, then those before
    # it: the jump to 5 inside the last window is not noise.
    expected = np.sqrt([0.0, 1 / 2, 1 / 4, 1 / 4, 1 / 6])
    assert noise_before(values, 2) == pytest.approx(expected)
    gappy = np.array([0.0, 1.0, np.nan, 3.0, 2.0, 2.0])  # differences touching NaN left out
    assert noise_before(gappy, 1)[-1] == pytest.approx(np.sqrt((1 + 1 + 0) / 3 / 2))


def test_collapse_edge_cases():
    assert observed_reward_collapse(np.arange(5), np.ones(5)) is None  # shorter than W
    assert observed_reward_collapse(np.arange(50), np.zeros(50)) is None  # flat at the floor
    shuffled = np.random.default_rng(0).permutation(300)
    curve = np.where(np.arange(300) < 200, 0.8, 0.05)
    in_order = observed_reward_collapse(np.arange(300), curve, (0.0, 1.0))
    assert observed_reward_collapse(shuffled, curve[shuffled], (0.0, 1.0)) == in_order
    with pytest.raises(ValueError, match="shape"):
        observed_reward_collapse(np.arange(3), np.zeros(4))


def test_own_likelihood_is_the_median_over_scored_finite_units():
    logp_old = np.array([-1.0, -2.0, -3.0, np.nan, -100.0, np.inf])
    mask = np.array([1, 1, 1, 1, 0, 1])
    assert own_likelihood(logp_old, mask) == -2.0
    assert np.isnan(own_likelihood(logp_old, np.zeros(6)))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("size", [1, 2, 7, 1000, 1001])
def test_own_likelihood_equals_numpys_median_of_the_float64_values(dtype, size):
    rng = np.random.default_rng(size)
    logp_old = (rng.standard_normal(size) - 2.0).astype(dtype)
    logp_old[rng.random(size) < 0.1] = np.nan
    logp_old[rng.random(size) < 0.05] = -np.inf
    mask = rng.random(size) < 0.8
    kept = logp_old.astype(np.float64)[mask & np.isfinite(logp_old)]
    expected = float(np.median(kept)) if kept.size else float("nan")
    got = own_likelihood(logp_old, mask)
    assert got == expected or (np.isnan(got) and np.isnan(expected))


def test_host_array_views_numpys_dtypes_and_widens_bfloat16():
    values = torch.tensor([[-1.5, 2.25], [0.0, -3.0]])
    view = host_array(values)
    assert view.shape == (4,) and np.shares_memory(view, values.numpy())
    widened = host_array(values.to(torch.bfloat16))
    assert widened.dtype == np.float32 and widened.tolist() == [-1.5, 2.25, 0.0, -3.0]


def test_own_likelihood_series_keeps_inner_step_0_or_every_step():
    steps, values = np.array([3, 0, 1, 2]), np.array([3.0, 0.0, 1.0, 2.0])
    kept = own_likelihood_series(steps, np.array([0.0, 0.0, 1.0, np.nan]), values)
    assert kept[0].tolist() == [0, 3] and kept[1].tolist() == [0.0, 3.0]
    every = own_likelihood_series(steps, np.full(4, np.nan), values)
    assert every[0].tolist() == [0, 1, 2, 3]


def test_collapse_warning_on_a_falling_median():
    steps = np.arange(0, 40, 2)
    values = np.where(steps < 20, -1.0, -1.9)
    # medians of 3: -1 up to step 20; step 22: -1.9 (drop 0.9 > 0.5), fallen; step 24 fallen
    # too, the second in a row -> warns.
    assert collapse_warning(steps, values, window=3, drop=0.5).tolist() == list(range(24, 40, 2))
    assert collapse_warning(steps, values, window=3, drop=1.0).size == 0
    assert collapse_warning(steps[:2], values[:2], window=3, drop=0.5).size == 0  # < window
    rising = np.linspace(-3.0, -1.0, 20)
    assert collapse_warning(steps, rising).size == 0  # a likelihood that rises never warns
    gap = values.copy()
    gap[12] = np.nan  # a NaN measurement makes its windows (steps 24-28) NaN: they do not warn
    assert collapse_warning(steps, gap, window=3, drop=0.5).tolist() == list(range(32, 40, 2))
    assert collapse_warning(np.array([], dtype=np.int64), np.array([])).size == 0


def test_a_noisy_likelihood_that_never_fell_seldom_warns():
    """Measurements of white noise, 0.5 nats a step, 300 of them: the 0.5-nat drop alone warns
    on every one of these 40 runs; beyond the measurements' noise, at most 2 do (the rule is
    chosen to err on under 5 % of such runs)."""
    steps = np.arange(300)
    with_test = without = 0
    for seed in range(40):
        values = -1.0 + 0.5 * np.random.default_rng(seed).standard_normal(300)
        with_test += collapse_warning(steps, values).size > 0
        without += collapse_warning(steps, values, noise_margin=-1000).size > 0
    assert without == 40 and with_test <= 2


def test_a_likelihood_that_falls_beyond_its_noise_warns_right_after():
    steps = np.arange(300)
    for seed in range(20):
        values = -1.0 + 0.1 * np.random.default_rng(seed).standard_normal(300)
        values[150:] -= 1.0
        warns = collapse_warning(steps, values)
        assert warns.size and 150 <= warns[0] <= 152, (seed, warns[:1])


@pytest.mark.parametrize("odd", [-2.0, 2.0])
def test_one_odd_batch_in_a_likelihood_that_never_fell_does_not_warn(odd: float) -> None:
    """One measurement 2 nats below a flat series moved the mean of 3 by 0.67 nats, past the
    0.5-nat drop, and warned on its steps; one 2 nats above raised the best mean by as much,
    and every later step of a long series warned. A median of 3 moves with no single value."""
    steps = np.arange(1000)
    for seed in range(10):
        values = -1.0 + 0.05 * np.random.default_rng(seed).standard_normal(1000)
        values[100] += odd
        assert collapse_warning(steps, values).size == 0, (seed, odd)


def test_a_fall_after_an_odd_batch_still_warns_right_after() -> None:
    """An odd batch neither warns nor hides a later fall of 1 nat: the warning comes on the
    second measurement after it (the median of 3 moves on the second, and the warning wants
    two fallen measurements in a row)."""
    steps = np.arange(300)
    for seed in range(20):
        values = -1.0 + 0.05 * np.random.default_rng(seed).standard_normal(300)
        values[100] -= 2.0
        values[150:] -= 1.0
        warns = collapse_warning(steps, values)
        assert warns.size and 151 <= warns[0] <= 152, (seed, warns[:1])


def test_heavy_tailed_noise_that_never_fell_seldom_warns() -> None:
    """Student's t noise with 2 degrees of freedom, of the typical spread of gaussian noise of
    0.5 nats (its median absolute deviation), 300 measurements: the rare large strays warned
    on 22 of these 40 flat series; now on at most 5."""
    steps = np.arange(300)
    warned = 0
    for seed in range(40):
        draws = np.random.default_rng(seed).standard_t(2, 300)
        values = -1.0 + 0.5 * 0.6744897501960817 / 0.816496580927726 * draws
        warned += collapse_warning(steps, values).size > 0
    assert warned <= 5, warned


def test_observe_a_recorded_run(tmp_path):
    path = tmp_path / "run"
    gen = torch.Generator().manual_seed(0)
    logratios = []
    with sd.Recorder(path, reward_range=(0.0, 1.0)) as rec:
        for step in range(60):
            logp = -torch.rand(4, 8, generator=gen)
            noise = 0.05 * torch.randn(4, 8, generator=gen)
            mask = torch.ones(4, 8)
            mask[:, 6:] = 0
            inner = step % 2
            if step == 33:
                noise[0, 0] = float("nan")
            if inner == 0:
                scored = (-noise)[mask.bool()]
                logratios.append(scored[torch.isfinite(scored)].double())
            reward = 0.8 if step < 40 else 0.05
            rec.log_step(
                step,
                logp=logp,
                logp_old=logp + noise,
                advantages=torch.randn(4, generator=gen),
                mask=mask,
                reward=torch.full((4,), reward),
                grad_norm=40.0 if step == 25 else 1.0 + 0.01 * step,
                inner_step=inner,
            )
    observed = observe(sd.open_run(path))
    # One draw a rollout (the even steps, inner_step 0): the 10-draw mean of draws 16-25,
    # (4 x 0.8 + 6 x 0.05) / 10 < 0.4, ends at step 50.
    assert observed.first_reward_collapse == 50
    assert observed.recorded_spike_steps == [25]
    assert observed.nonfinite_steps == [33]
    reference = torch.cat(logratios)
    assert observed.noise_floor_units == reference.numel()
    assert observed.noise_floor_logratio_std == pytest.approx(reference.std(correction=0).item())
    curve = observed.to_dict()["reward_curve"]
    assert curve["window"] == 10
    assert curve["first"] == pytest.approx(0.8) and curve["best"] == pytest.approx(0.8)
    assert curve["last"] == pytest.approx(0.05)


def test_observe_without_rewards_or_inner_steps(tmp_path):
    path = tmp_path / "run"
    with sd.Recorder(path) as rec:
        rec.log_step(
            0, logp=np.zeros(3), logp_old=np.zeros(3), advantages=np.ones(3), seq_id=[0, 0, 1]
        )
    observed = observe(sd.open_run(path))
    assert observed.first_reward_collapse is None and observed.reward_curve is None
    assert observed.noise_floor_logratio_std is None and observed.recorded_spike_steps == []


def test_logratio_moments_leave_out_non_finite_entries_silently():
    """-inf - -inf, NaN and inf entries are left out of the noise floor, with no numpy warning
    on stderr; a masked entry is left out too."""
    logp = np.array([-np.inf, -1.0, np.nan, 0.0, -3.0, -0.5], dtype=np.float32)
    logp_old = np.array([-np.inf, -2.0, 0.0, np.inf, -3.5, -0.5], dtype=np.float32)
    mask = np.array([1, 1, 1, 1, 1, 0], dtype=bool)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        count, mean, m2 = logratio_moments(logp, logp_old, mask)
    assert (count, mean, m2) == (2, 0.75, 0.125)
    assert logratio_moments(logp[:1], logp_old[:1], mask[:1]) == (0, 0.0, 0.0)


def test_a_spike_threshold_past_the_float_range_flags_nothing_and_warns_nothing():
    """A recorded grad norm near float64's largest (1.7e308, finite) made `factor * median`
    overflow: numpy's 'overflow encountered in multiply' RuntimeWarning reached the stderr of
    replay, inspect, check and watch. A threshold past the range is exceeded by no value."""
    huge = 1.7976931348623157e308
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        steady = spike_flags(np.full(30, huge), factor=10.0)
        jump = spike_flags(np.array([1.0] * 10 + [huge]), factor=10.0)
    assert not steady.any()
    assert jump.tolist() == [False] * 10 + [True]


def test_a_reward_collapse_near_the_float_range_is_found_and_warns_nothing():
    """Rewards near float64's largest (an imported log's 1e307, 1e308; a declared reward range
    of (-1e308, 1e308), which a manifest takes) overflowed `reward - floor`, the noise's
    squares and the rolling sums: numpy's 'overflow encountered in subtract' and 'invalid value
    encountered in subtract' RuntimeWarnings, with their source lines, reached the stderr of
    inspect, check and watch. The rule is scale-free: rewards scaled by a power of two
    (exact) collapse where the rewards do, with no warning."""
    steps = np.arange(300)
    rewards = _noisy(np.where(steps < 150, 0.8, 0.1))
    found = observed_reward_collapse(steps, rewards)
    assert found is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert observed_reward_collapse(steps, np.ldexp(rewards, 1020)) == found
        assert observed_reward_collapse(steps, np.ldexp(rewards, -60)) == found
        declared = observed_reward_collapse(steps, rewards, reward_range=(-1e308, 1e308))
        huge = 1.7976931348623157e308
        means = rolling_mean(np.array([huge, huge, -huge, huge]), 2)
    assert declared is None  # a fall of 0.7 in a range of 2e308: no collapse
    assert means[1:].tolist() == [huge, 0.0, 0.0]


def test_recorded_series_stats_of_values_near_the_float_range_are_finite():
    """inspect's and check's mean and median of a recorded series whose values are near
    float64's largest overflowed their sum: inf for finite values, and numpy's 'overflow
    encountered in reduce' RuntimeWarning on stderr."""
    from stabledrl_cli.replay.recorded import series_stats

    huge = 1.7976931348623157e308
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = series_stats(np.array([huge, 1.0, huge, huge], dtype=np.float64))
    assert stats.mean == pytest.approx(0.75 * huge, rel=1e-12)
    assert stats.median == huge and stats.max == huge and stats.min == 1.0


@pytest.mark.parametrize("steps", [3, 30, 1000])
def test_recorded_series_stats_of_a_series_at_the_float_range_are_its_value(steps):
    """A series of float64's largest value, 3 or 30 steps long, overflowed the mean of the
    values divided by their count too: numpy's 'overflow encountered in reduce' on stderr and
    `check --write-baseline` ended in an internal error (exit 70, 'a baseline cannot hold
    inf'); of 1000 steps its median read 1.7976931348623155e308, below every value."""
    from stabledrl_cli.replay.recorded import series_stats

    huge = 1.7976931348623157e308
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = series_stats(np.full(steps, huge))
    assert stats.median == huge
    assert stats.mean == pytest.approx(huge, rel=1e-15) and stats.tail == pytest.approx(huge)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mixed = series_stats(np.array([huge, -huge, huge]))
        # numpy's pairwise sum of a longer series reaches inf + -inf: 'invalid value
        # encountered in reduce' reached inspect's stderr (an imported log of +-1e308)
        swinging = series_stats(np.array([huge, -huge] * 150))
    assert mixed.mean == pytest.approx(huge / 3, rel=1e-12) and mixed.median == huge
    assert swinging.mean == 0.0 and swinging.tail == 0.0


def _growing_sequence_run(
    path, *, counts: bool, drop_at: int | None = None, uncounted_step: int | None = None
):
    """A sequence run whose logp_old is each completion's log-prob summed over its tokens (as
    RLOO records it): completions grow by half their length over 40 steps (20 -> 30 tokens)
    while the per-token log-likelihood rises slightly (-1.0 -> -0.95), or, from `drop_at`,
    falls by 0.8 nats a token (a real collapse of the policy's likelihood of its samples).
    `counts` records each completion's token_count (but on `uncounted_step`)."""
    rng = np.random.default_rng(0)
    with sd.Recorder(path, unit="sequence", policy="grpo") as rec:
        for step in range(40):
            lengths = np.round(20 + 10 * step / 39 + rng.integers(-2, 3, size=16)).astype(int)
            per_token = -1.0 + 0.05 * step / 39 + rng.normal(0.0, 0.02, size=16)
            if drop_at is not None and step >= drop_at:
                per_token -= 0.8
            summed = per_token * lengths
            rec.log_step(
                step,
                logp=summed,
                logp_old=summed,
                advantages=rng.normal(size=16),
                reward=np.full(16, 0.5),
                inner_step=0,
                token_count=lengths if counts and step != uncounted_step else None,
            )


def test_collapse_warning_measures_per_token_on_a_run_that_records_token_counts(tmp_path):
    """docs/collapse.md: on a sequence run of summed log-probs whose completions grow, the
    median summed log-prob falls with no change in the policy (here by 8 nats while the
    per-token likelihood rises): the warning fires on 23 of 40 steps, from step 17. With each
    sequence's token_count recorded, it measures logp_old / token_count: no warning; a real
    drop of the per-token likelihood still warns; a run that records no counts (or not on
    every measured step) keeps the per-unit measurement."""
    _growing_sequence_run(tmp_path / "sums", counts=False)
    without = observe(sd.open_run(tmp_path / "sums")).collapse_warning
    assert without.measure == "unit" and len(without.steps) > 20  # the documented caveat

    _growing_sequence_run(tmp_path / "counted", counts=True)
    counted = observe(sd.open_run(tmp_path / "counted")).collapse_warning
    assert counted.measure == "token" and counted.steps == []
    assert counted.to_dict()["measure"] == "token"

    _growing_sequence_run(tmp_path / "drop", counts=True, drop_at=25)
    dropped = observe(sd.open_run(tmp_path / "drop")).collapse_warning
    assert dropped.measure == "token" and dropped.first_step == 27
    assert "per-token likelihood fell" in dropped.rule_text

    _growing_sequence_run(tmp_path / "mixed", counts=True, uncounted_step=20)
    mixed = observe(sd.open_run(tmp_path / "mixed")).collapse_warning
    assert mixed.measure == "unit" and mixed.steps == without.steps


def test_a_replay_and_inspect_measure_the_warning_per_token_as_observe_does(tmp_path):
    """The streaming pass (replay), inspect's pass and a packed archive take the same
    per-token measurements as `observe` reading the run."""
    from stabledrl_cli.dump import pack_run
    from stabledrl_cli.replay.inspection import summarize

    path = tmp_path / "drop"
    _growing_sequence_run(path, counts=True, drop_at=25)
    expected = observe(sd.open_run(path)).collapse_warning
    pack_run(sd.open_run(path), tmp_path / "drop.h5")
    for source in (path, tmp_path / "drop.h5"):
        replayed = sd.replay(source, policies=["grpo"], device="cpu").observed.collapse_warning
        inspected = summarize(sd.open_run(source)).observed.collapse_warning
        assert replayed == inspected == expected


def test_own_likelihood_per_token_leaves_out_entries_without_tokens():
    logp_old = np.array([-10.0, -40.0, 0.0, -6.0], dtype=np.float32)
    mask = np.array([1, 1, 1, 0])
    counts = np.array([10, 20, 0, 3])  # a completion masked whole sums over no token
    assert own_likelihood(logp_old, mask, counts) == -1.5  # median of -1 and -2
    assert own_likelihood(logp_old, mask) == -10.0
    assert np.isnan(own_likelihood(logp_old[2:3], mask[2:3], counts[2:3]))


def test_rewards_below_the_declared_range_are_judged_from_their_own_floor():
    """A run that declares reward_range (0, 1) but logs rewards in [-1, 0] (a -1/0 reward, or
    a range written for another task): every level reward - 0 was negative, the best never
    positive, so a collapse from -0.1 to -0.95 was never reported (None). The floor is the
    lower of the declared low end and the lowest recorded reward."""
    steps = np.arange(200)
    curve = _noisy(np.where(steps < 120, np.minimum(-0.9 + steps / 60, -0.1), -0.95))
    declared = observed_reward_collapse(steps, curve, reward_range=(-1.0, 0.0))
    assert declared is not None
    assert observed_reward_collapse(steps, curve, reward_range=(0.0, 1.0)) == declared
    partly = np.where(steps < 120, 0.8, -0.2)  # falls below the declared range at step 120
    found = observed_reward_collapse(steps, _noisy(partly), reward_range=(0.0, 1.0))
    assert found is not None and 120 <= found < 130


def _reused_run(path, draws: np.ndarray, mu: int, *, inner_step: bool = True):
    """A scalar run logging each rollout's success rate on `mu` optimizer steps (ppo_epochs,
    num_iterations), inner_step 0 .. mu - 1 on them when `inner_step`."""
    with sd.Recorder(path, policy=None, reward_range=(0.0, 1.0)) as rec:
        for step, reward in enumerate(np.repeat(draws, mu)):
            extra = {"inner_step": step % mu} if inner_step else {}
            rec.log_step(step, reward_mean=float(reward), **extra)
    return sd.open_run(path)


def test_a_rollout_reused_over_several_steps_counts_as_one_reward_draw(tmp_path):
    """A flat 2 % success rate over 16 samples, each rollout's reward logged on the mu = 4
    steps that reuse it: every logged step counted as an independent draw (3 of 4 successive
    differences 0, the noise taken for half of what it is, a window of 10 steps holding 2.5
    draws), so 10 of these 10 runs were reported collapsed. The steps with inner_step > 0 are
    left out: the rule reads one draw a rollout, and a real fall is still found."""
    reported = [
        observe(_reused_run(tmp_path / f"flat{seed}", _success_rates(0.02, 16, 75, seed), 4))
        for seed in range(10)
    ]
    assert [o.first_reward_collapse for o in reported] == [None] * 10
    assert reported[0].reward_windows == 75 - 10 + 1  # windows of draws, not of steps
    rates = np.where(np.arange(75) < 40, 0.3, 0.03)
    falling = observe(_reused_run(tmp_path / "falling", _success_rates(rates, 16, 75, 0), 4))
    assert falling.first_reward_collapse is not None
    assert 4 * (40 - 10) <= falling.first_reward_collapse < 4 * (40 + 20)
    assert falling.first_reward_collapse % 4 == 0  # a rollout's first step


def _reward_run(path, rewards: np.ndarray):
    with sd.Recorder(path, policy=None, reward_range=(0.0, 1.0)) as rec:
        for step, reward in enumerate(rewards):
            rec.log_step(step, reward_mean=float(reward))
    return sd.open_run(path)


def test_a_step_with_no_scored_reward_is_no_reward_draw(tmp_path):
    """A step none of whose samples was scored (TRL's None reward) logs a NaN reward_mean.
    Its NaN made every window of 10 holding it NaN and broke 'stays below for 20 steps': one
    such step in 25 put a fall from 0.6 to 0.02 at step 200 at step 290, one in 15 hid it
    ('none'), one in 7 left the rule judging no step. They are left out."""
    noise = 0.03 * np.random.default_rng(0).standard_normal(300)
    falling = np.where(np.arange(300) < 200, 0.6, 0.02) + noise
    for every in (25, 15, 7):
        gappy = falling.copy()
        gappy[5::every] = np.nan
        observed = observe(_reward_run(tmp_path / f"falling{every}", gappy))
        assert observed.unjudged("first_reward_collapse") is None, every
        assert observed.first_reward_collapse is not None, every
        assert 200 <= observed.first_reward_collapse <= 210, (every, observed)
    flat = np.random.default_rng(1).binomial(16, 0.5, size=300) / 16
    flat[3::7] = np.nan
    observed = observe(_reward_run(tmp_path / "flat", flat))
    assert observed.unjudged("first_reward_collapse") is None
    assert observed.first_reward_collapse is None
    kept = ~np.isnan(gappy)
    assert observed_reward_collapse(np.arange(300), gappy, (0.0, 1.0)) == (
        observed_reward_collapse(np.arange(300)[kept], gappy[kept], (0.0, 1.0))
    )


def test_the_reward_curve_reads_the_collapse_rules_draws(tmp_path):
    """With a NaN reward_mean (no sample scored) among its first or last 10 steps, inspect's
    reward curve read 'first n/a, ... last n/a' though the collapse rule judged the run."""
    flat = np.random.default_rng(1).binomial(16, 0.5, size=40) / 16
    flat[3::7] = np.nan
    curve = observe(_reward_run(tmp_path / "flat", flat)).to_dict()["reward_curve"]
    draws = flat[~np.isnan(flat)]
    assert curve["first"] == pytest.approx(draws[:10].mean())
    assert curve["best"] == pytest.approx(max(draws[i : i + 10].mean() for i in range(25)))
    assert curve["last"] == pytest.approx(draws[-10:].mean())


def test_without_a_reward_range_a_small_lasting_fall_reads_as_a_collapse():
    """docs/collapse.md: the floor is then the run's own lowest reward, so a success rate
    stepping from 0.8 to 0.7 is a 'collapse' unless reward_range=(0, 1) is declared."""
    steps = np.arange(500)
    for seed in range(3):
        noise = np.random.default_rng(seed).standard_normal(500)
        stepped = np.where(steps < 250, 0.8, 0.7) + 0.03 * noise
        found = observed_reward_collapse(steps, stepped)
        assert found is not None and 250 <= found <= 270, (seed, found)
        assert observed_reward_collapse(steps, stepped, (0.0, 1.0)) is None
        negative = np.where(steps < 250, -1.0, -1.3) + 0.05 * noise
        found = observed_reward_collapse(steps, negative)
        assert found is not None and 250 <= found <= 270, (seed, found)


def test_a_single_early_success_of_a_sparse_reward_reads_as_a_collapse():
    """docs/collapse.md: below a success rate of 0.02 the noise is read too low. One success
    in 16 at step 20, then none until the run learns from step 220, is reported at 186."""
    rewards = np.zeros(420)
    rewards[20] = 1 / 16
    rewards[220:] = np.linspace(0.0, 0.6, 200)
    assert observed_reward_collapse(np.arange(420), rewards, (0.0, 1.0)) == 186
