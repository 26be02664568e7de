"""Why the collapse warning judged no step of a short run: it measures one likelihood a
rollout, so a run of 5 steps with a policy batch over 2 rollouts has 2 measurements. The line
read 'the run has no 3 finite own-sample likelihoods in a row (steps with a policy batch)', as
if its 5 such steps were fewer than 3."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import stabledrl_cli as sd
from stabledrl_cli.replay.detectors import collapse_warning, warning_judged
from stabledrl_cli.replay.observed import observe


def _run(path: Path, inner_steps: list[int | None]) -> sd.Run:
    rng = np.random.default_rng(0)
    with sd.Recorder(path, policy="grpo") as rec:
        for step, inner in enumerate(inner_steps):
            logp = -rng.random((4, 8)).astype(np.float32)
            rec.log_step(
                step,
                logp=logp,
                logp_old=logp,
                advantages=rng.normal(size=4).astype(np.float32),
                reward=np.full(4, 0.5, dtype=np.float32),
                inner_step=inner,
            )
    return sd.open_run(path)


def test_the_line_counts_one_likelihood_a_rollout(tmp_path: Path) -> None:
    observed = observe(_run(tmp_path / "mu4", [0, 1, 2, 3, 0]))
    assert observed.collapse_warning.measurements == 2
    assert observed.unjudged("collapse_warning_first_step") == (
        "the run has 2 own-sample likelihoods (one a rollout: its step with inner_step 0, or "
        "every step when none records it), too few for the collapse warning to judge: it "
        "needs the median of 3 finite in a row to fall below an earlier one on two "
        "measurements in a row, beyond the noise of 3 before them (6 measurements, none "
        "missing)"
    )


def test_a_run_without_inner_steps_measures_every_step(tmp_path: Path) -> None:
    observed = observe(_run(tmp_path / "plain", [None, None]))
    assert observed.collapse_warning.measurements == 2
    assert "the run has 2 own-sample likelihoods" in str(
        observed.unjudged("collapse_warning_first_step")
    )
    assert (
        observe(_run(tmp_path / "six", [None] * 6)).unjudged("collapse_warning_first_step") is None
    )


def test_a_run_too_short_to_warn_is_not_judged(tmp_path: Path) -> None:
    """3 to 5 measurements were reported judged, but no fall can warn on them: the median of 3
    must fall below an earlier one on two measurements in a row, and beyond the noise of the
    measurements before its window (while fewer than 3 precede it, the fall is in its own
    noise)."""
    for count in (3, 5):
        observed = observe(_run(tmp_path / f"n{count}", [None] * count))
        assert observed.collapse_warning.judged == 0
        assert "too few for the collapse warning to judge" in str(
            observed.unjudged("collapse_warning_first_step")
        )
    falling = np.array([0.12, 0.12, -0.47, -1.02, -1.02, -1.02])
    steps = np.arange(falling.size)
    assert collapse_warning(steps, falling).tolist() == [5]
    assert warning_judged(falling) == 1
    assert warning_judged(falling[:5]) == 0
    rng = np.random.default_rng(0)
    for _ in range(2000):  # no series of 5 measurements warns
        five = np.cumsum(rng.normal(size=5) * rng.choice([0.01, 1.0, 10.0]))
        assert collapse_warning(steps[:5], five).size == 0
