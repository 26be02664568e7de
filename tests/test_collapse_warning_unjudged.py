"""Why the collapse warning judged no step of a short run: it measures one likelihood a
rollout, so a run of 5 steps with a policy batch over 2 rollouts has 2 measurements. The line
read 'the run has no 3 finite own-sample likelihoods in a row (steps with a policy batch)', as
if its 5 such steps were fewer than 3."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import stabledrl_cli as sd
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
        "every step when none records it), no 3 finite in a row for the collapse warning to "
        "judge"
    )


def test_a_run_without_inner_steps_measures_every_step(tmp_path: Path) -> None:
    observed = observe(_run(tmp_path / "plain", [None, None]))
    assert observed.collapse_warning.measurements == 2
    assert "the run has 2 own-sample likelihoods" in str(
        observed.unjudged("collapse_warning_first_step")
    )
    assert (
        observe(_run(tmp_path / "three", [None] * 3)).unjudged("collapse_warning_first_step")
        is None
    )


def test_a_scalar_run_has_no_likelihood(tmp_path: Path) -> None:
    with sd.Recorder(tmp_path / "scalars", policy=None) as rec:
        for step in range(4):
            rec.log_step(step, reward_mean=0.5)
    assert observe(sd.open_run(tmp_path / "scalars")).unjudged("collapse_warning_first_step") == (
        "the run has no own-sample likelihood (a step with a policy batch, one a rollout) for "
        "the collapse warning to judge"
    )
