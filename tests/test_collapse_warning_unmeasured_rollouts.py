"""Why the collapse warning judged no step of a run with enough rollouts, some of which measure
nothing. A real TRL run (dapo, `mask_truncated_completions`, 6-token completions) learned to
fill every completion with "b", so from its 5th rollout on every completion was truncated and
masked whole: 10 rollouts, 4 likelihoods. `inspect` and `replay` said 'the run has 10
own-sample likelihoods ..., too few for the collapse warning to judge: it needs ... (6
measurements, none missing)', 10 being more than the 6 it names; the line now says how many
are finite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.replay.observed import observe


def _run(path: Path, scored: list[bool]) -> Path:
    """A token run of one step a rollout, a step scoring every token or none."""
    logps = -np.random.default_rng(0).random((len(scored), 4, 6)).astype(np.float32)
    batch = {
        "advantages": np.array([1.0, -1.0, 0.5, -0.5], dtype=np.float32),
        "reward": np.array([2.0, 0.0, 1.5, 0.5], dtype=np.float32),
        "inner_step": 0,
    }
    with sd.Recorder(path, policy="grpo") as rec:
        for step, (logp, scores) in enumerate(zip(logps, scored, strict=True)):
            mask = np.full(logp.shape, float(scores), dtype=np.float32)
            rec.log_step(step, logp=logp, logp_old=logp, mask=mask, **batch)
    return path


def test_the_line_counts_the_finite_likelihoods(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", [True] * 4 + [False] * 6)
    observed = observe(sd.open_run(run))
    assert observed.collapse_warning.measurements == 10
    assert observed.collapse_warning.finite == 4
    why = observed.unjudged("collapse_warning_first_step")
    assert why is not None
    assert why.startswith(
        "the run has 10 own-sample likelihoods (one a rollout: its step with inner_step 0, or "
        "every step when none records it), 4 of them finite (a step that scores no token "
        "measures none), too few in a row for the collapse warning to judge: it needs"
    )
    shown = CliRunner().invoke(app, ["inspect", str(run)])
    assert shown.exit_code == 0, shown.stderr
    assert "4 of them finite" in shown.stdout


def test_a_run_whose_likelihoods_are_all_finite_says_so_as_before(tmp_path: Path) -> None:
    observed = observe(sd.open_run(_run(tmp_path / "run", [True] * 4)))
    assert observed.collapse_warning.finite == 4
    why = observed.unjudged("collapse_warning_first_step")
    assert why is not None and "of them finite" not in why
    assert "4 own-sample likelihoods (one a rollout" in why and "too few for the" in why
