"""How a baseline fits the run `stabledrl check` gates against it: refused (exit 3, naming the
baseline) when a policy it names cannot replay the run or its policy figures are of another
loss_norm; a run with fewer steps than the baseline's is a tripped gate, one with more a
note."""

from __future__ import annotations

from stabledrl_cli.cli._output import err
from stabledrl_cli.dump import Run
from stabledrl_cli.errors import InputError, UsageError
from stabledrl_cli.policies import get_policy
from stabledrl_cli.replay.baseline import Baseline
from stabledrl_cli.replay.run_facts import replayed_loss_norm


def compare_step_counts(
    run: str, steps: int, training: int | None, baseline: Baseline
) -> str | None:
    """Why the run is too short for the baseline (`evaluate`'s `short_of_baseline`): it has
    fewer steps than the baseline's run, whose figures of the steps it lacks (a later collapse,
    a spike) its gates cannot judge; else None, with a note on stderr when the run has another
    number of steps (`steps`; `training`: a verl recording's training steps, None for any other
    run, whose count verl's imported log has as its steps, as a baseline's `training_steps`
    is its verl recording's: any count of one matching one of the other is no note)."""
    theirs = baseline.run.get("steps")
    their_counts = [
        int(count)
        for count in (theirs, baseline.run.get("training_steps"))
        if isinstance(count, int | float)  # whole numbers >= 0: load_baseline checks them
    ]
    if theirs is None or set(their_counts) & {steps, training}:
        return None
    counts = f"{steps} steps"
    if training is not None:
        counts += f" (optimizer steps; {training} training steps, a line each in verl's log)"
    if max(steps, training or 0) < min(their_counts):
        return (
            f"the run has {counts}, the baseline's run had {theirs}: its gates cannot judge the "
            "steps it lacks"
        )
    err.print(
        f"note: {run} has {counts}, the baseline's run had {theirs}: step counts are compared "
        "as they are",
        highlight=False,
    )
    return None


def baseline_policies_replayable(run: Run, baseline: Baseline) -> None:
    """InputError naming the baseline when a policy it names cannot replay this run (a
    baseline of a run of token units naming stabledrl:level=token, checked against a run of
    sequence units): the input's fault, not a usage error of a --policy never given."""
    from stabledrl_cli.replay.step_data import run_unit  # imports torch

    unit = run_unit(run)
    for spec in baseline.policies:
        try:
            get_policy(spec).required_fields(unit)
        except UsageError as exc:
            raise InputError(f"{baseline.path}: {exc}") from None


def baseline_loss_norm_agrees(run: Run, baseline: Baseline) -> None:
    """InputError naming the baseline when it gates policies replayed with another loss_norm
    than the run's (a per_rank run against a global run's baseline): equal arrays are other
    losses then, and its figures no limit of this run's."""
    theirs, ours = baseline.run.get("loss_norm"), replayed_loss_norm(run)
    if theirs is None or theirs == ours or not any(baseline.policies.values()):
        return
    raise InputError(
        f"{baseline.path}: its policy figures are of loss_norm {theirs}, {run.location} "
        f"replays as {ours}: other losses, not comparable; write the baseline from a {ours} "
        "run (--write-baseline)"
    )
