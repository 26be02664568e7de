"""The objects a replay returns print a few lines however long the run: a notebook that
evaluates `result.observed` or a policy's `summary` shows each list of steps as its first
items and its length."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

from _cli import ROOT

import stabledrl_cli as sd
from stabledrl_cli.dump import pack_run
from stabledrl_cli.replay.guards import GuardedStep

LONG = list(range(100_000))


def test_reprs_of_a_long_runs_results_stay_short() -> None:
    """Before, with 100,000 spike, drift and collapsed steps `repr(summary)` listed every one
    (2,067,559 characters), as `repr(result.observed)` listed its step lists and each guard's
    acted steps."""
    result = sd.replay("fixtures/grpo", policies=["grpo"], device="cpu", guards="zclip")
    summary = result.policy("grpo").summary
    observed = result.observed
    guard = observed.guards[0]
    acted = [GuardedStep(n, "clipped", 2.0, 0.5, 3.0, 1.0) for n in LONG]
    long_ones = [
        replace(summary, spike_steps=LONG, drift_steps=LONG, collapsed_steps=LONG),
        replace(
            observed,
            recorded_spike_steps=LONG,
            nonfinite_steps=LONG,
            collapse_warning=replace(observed.collapse_warning, steps=LONG),
            guards=[replace(guard, acted=acted)],
        ),
    ]
    for obj in long_ones:
        text = repr(obj)
        assert len(text) < 4000, (type(obj).__name__, len(text))
        assert "... (100000 items)]" in text
        assert text.startswith(f"{type(obj).__name__}(first_reward_collapse=") or (
            text.startswith(f"{type(obj).__name__}(tokens=")
        )


def test_a_short_list_is_shown_whole() -> None:
    observed = sd.replay("fixtures/grpo", policies=["grpo"], device="cpu").observed
    few = replace(observed, nonfinite_steps=[92, 93, 94, 95])
    assert "nonfinite_steps=[92, 93, 94, 95]," in repr(few)


def test_a_steps_repr_reads_the_same_in_every_session(tmp_path):
    """A step's `fields` printed as a set in the session's hash order
    (`fields={'logp_old', 'advantages', ...}`), another order each time the notebook ran; they
    are sorted now, for a run directory's step and an archive's alike."""
    archive = tmp_path / "grpo.h5"
    pack_run(ROOT / "fixtures" / "grpo", archive)
    code = "import sys, stabledrl_cli as sd; print(repr(sd.open_run(sys.argv[1]).step(3)))"
    for run in (ROOT / "fixtures" / "grpo", archive):
        shown = {
            subprocess.run(
                [sys.executable, "-c", code, str(run)],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "PYTHONHASHSEED": seed},
            ).stdout
            for seed in ("1", "2", "3")
        }
        assert len(shown) == 1, shown
        assert "fields={'advantages', 'group_id', 'logp', 'logp_old', 'mask'," in shown.pop()
