"""The objects a replay returns print a few lines however long the run: a notebook that
evaluates `result.observed` or a policy's `summary` shows each list of steps as its first
items and its length."""

from __future__ import annotations

from dataclasses import replace

import stabledrl_cli as sd
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
