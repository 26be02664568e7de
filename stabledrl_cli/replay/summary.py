"""A policy's whole-run summary from its per-step columns, and the choice of the best policy."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from stabledrl_cli.errors import counted
from stabledrl_cli.replay import columns
from stabledrl_cli.replay.columns import Aggregate
from stabledrl_cli.replay.config import SPIKE_MIN_HISTORY
from stabledrl_cli.replay.derivations import ColumnArray, measured_steps
from stabledrl_cli.replay.detectors import rolling_mean
from stabledrl_cli.replay.result import PolicySummary, same_mass
from stabledrl_cli.replay.step_series import StepSeries

if TYPE_CHECKING:
    from stabledrl_cli.replay.stream import StreamedRun


def _median(values: ColumnArray) -> float | None:
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return float(np.median(finite)) if finite.size else None


ROUNDING_RESIDUE = 1e-5
"""A loss at most this fraction of its step's objective mass (the sum of the absolute terms
J adds up) is zero to float32 rounding: terms that cancel leave such a residue."""


def _relative_error(
    replayed: np.ndarray, recorded: np.ndarray, floor: np.ndarray | None = None
) -> float | None:
    """Median over steps of |replayed - recorded| / max(|recorded|, floor): the steps where
    both are finite, leaving out those where both are within `floor` of zero (two rounding
    residues of a zero: nothing to compare) and those with a zero divisor."""
    floor = np.zeros_like(recorded) if floor is None else np.nan_to_num(floor)
    divisor = np.maximum(np.abs(recorded), floor)
    residues = (np.abs(recorded) <= floor) & (np.abs(replayed) <= floor)
    ok = np.isfinite(replayed) & np.isfinite(recorded) & (divisor > 0) & ~residues
    if not ok.any():
        return None
    return float(np.median(np.abs(replayed[ok] - recorded[ok]) / divisor[ok]))


def aggregate(values: ColumnArray, how: Aggregate) -> float | None:
    """A column's whole-run figure over its finite values (count: steps where it is true);
    None where there is no finite value."""
    if how == "count":
        return float(np.count_nonzero(np.asarray(values, dtype=bool)))
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return None
    if how == "max":
        return float(finite.max())
    if how == "median":
        return float(np.median(finite))
    if how == "mean":
        return float(finite.mean())
    return float(finite.sum())


def unjudged_rules(
    series: StepSeries | Mapping[str, ColumnArray], geometry: list[str], window: int
) -> dict[str, str]:
    """Why the drift (bias) rule or the spike rule judged no step of a policy's `series` (the
    whole run), by rule: its 0 steps then say nothing. geometry: each step's kind (spikes are
    judged among steps of one kind); window: the drift rule's."""
    found = {}
    push = np.asarray(series["net_push"], dtype=np.float64)
    if not np.isfinite(rolling_mean(push, window)).any():
        has = (
            f"the run has {counted(push.shape[0], 'step')}"
            if push.shape[0] < window
            else "the policy's net_push has no such window"
        )
        found["drift"] = (
            f"the drift rule judges a step after {window} finite net_push values in a row, "
            f"and {has}"
        )
    norms = np.asarray(series["update_norm"], dtype=np.float64)
    history = (np.isfinite(norms) & (norms != 0)).astype(np.int64)
    measured = measured_steps(geometry)
    most = max(int(history[measured].sum()), int(history[~measured].sum()))
    if most <= SPIKE_MIN_HISTORY:
        found["spike"] = (
            f"the spike rule judges a step after {SPIKE_MIN_HISTORY} finite, nonzero update "
            f"norms of one kind, and the policy has {most}"
        )
    return found


def fidelity_gap(stream: StreamedRun, norms: np.ndarray, *, unjoined: bool = False) -> str:
    """Why the own policy's `fidelity` is None, given its replayed update norms [S]: what the
    run lacks for `_relative_error` to compare any step (`unjoined`: the ranks recorded
    geometry that their join left out)."""
    measured = measured_steps(stream.geometry)
    if not measured.any():
        return "needs gradient geometry" + (" that joins across ranks" if unjoined else "")
    covered = stream.grad_norm_covered[measured]
    if not np.isfinite(covered).any():
        return "needs grad_norm_covered on the steps with geometry"
    if not np.isfinite(norms[measured]).any():
        return "no step with geometry has a finite replayed update norm"
    return "no step with geometry has a finite, nonzero grad_norm_covered and update norm"


def parity_gap(objective: np.ndarray, loss: np.ndarray) -> str:
    """Why the own policy's `loss_parity` is None, given its replayed objective J [S] and the
    recorded loss [S]: what leaves `_relative_error` no step to compare."""
    finite = np.isfinite(loss)
    if not finite.any():
        return "the run recorded no finite loss"
    if not (finite & np.isfinite(objective)).any():
        return "no step with a finite loss has a finite -J"
    return (
        "each step with a finite loss and -J has both 0 to float32 rounding, nothing to "
        "compare: terms that cancel, as on-policy GRPO's over whole groups, or no nonzero "
        "advantage"
    )


def summarize_policy(
    series: StepSeries,
    stream: StreamedRun,
    *,
    own: bool,
    approximate: bool,
    objective_mass: np.ndarray,
    window: int,
) -> PolicySummary:
    """One policy's summary over every step of `series` (the whole run); objective_mass [S]:
    the policy's `objective_mass` column, the size of each step's J before its terms cancel;
    window: the drift rule's (`ReplayConfig.window`)."""
    steps = np.asarray(series["step"], dtype=np.int64)
    tokens = int(np.sum(series["tokens"]))
    discarded = int(np.sum(series["discarded"]))
    norms = np.asarray(series["update_norm"], dtype=np.float64)
    finite_norms = norms[np.isfinite(norms)]
    collapsed = steps[np.asarray(series["collapsed"], dtype=bool)]
    drift = np.asarray(series["drift"], dtype=bool)
    fidelity = loss_parity = None
    if own:
        measured = measured_steps(stream.geometry)
        if measured.any():
            fidelity = _relative_error(norms[measured], stream.grad_norm_covered[measured])
        objective = np.asarray(series["objective"], dtype=np.float64)
        floor = ROUNDING_RESIDUE * np.asarray(objective_mass, dtype=np.float64)
        loss_parity = _relative_error(-objective, stream.loss, floor)
    figures = {
        column.figure: aggregate(series[column.name], column.gate.aggregate)
        for column in columns.gated_columns()
        if column.figure is not None and column.gate is not None
    }
    for column in columns.summary_columns():
        assert column.summary is not None
        value = aggregate(series[column.name], column.summary)
        figures[column.name] = int(value) if column.kind == "int" and value is not None else value
    return PolicySummary(
        tokens=tokens,
        discarded=discarded,
        discard_frac=discarded / tokens if tokens else 0.0,
        discarded_pos=int(np.sum(series["discarded_pos"])),
        discarded_neg=int(np.sum(series["discarded_neg"])),
        # Median over steps of the per-step fraction: a ratio of sums would let one step whose
        # IS reference overflowed (r = exp(large)) outweigh every other step.
        discarded_mass_frac=_median(series["discarded_mass_frac"]),
        clipped=int(np.sum(series["clipped"])),
        update_norm_median=float(np.median(finite_norms)) if finite_norms.size else None,
        update_norm_max=float(finite_norms.max()) if finite_norms.size else None,
        cosine_to_own_median=_median(series["cosine_to_own"]),
        spike_steps=[int(s) for s in steps[np.asarray(series["spike"], dtype=bool)]],
        drift_steps=[int(s) for s in steps[drift]],
        collapsed_steps=[int(s) for s in collapsed],
        first_collapse=int(collapsed[0]) if collapsed.size else None,
        lead_steps=None,  # a one-step replay claims no lead time: only the collapse warning
        fidelity=fidelity,
        loss_parity=loss_parity,
        update_norm_approximate=approximate,
        column_figures=figures,
        unjudged=unjudged_rules(series, list(stream.geometry), window),
    )


def best_index(summaries: list[PolicySummary]) -> int | None:
    """Among the policies without risk (collapsed) steps, the fewest drift (bias) steps, then
    the lowest discarded_mass_frac (`same_mass`: within rounding, the first given); None when
    one policy is replayed or every one has risk steps (a comparison needs two, and a policy
    that blew up is never best)."""
    candidates = [i for i, s in enumerate(summaries) if not s.collapsed_steps]
    if len(summaries) < 2 or not candidates:
        return None

    def mass(i: int) -> float:
        value = summaries[i].discarded_mass_frac
        return value if value is not None and math.isfinite(value) else math.inf

    fewest = min(len(summaries[i].drift_steps) for i in candidates)
    tied = [i for i in candidates if len(summaries[i].drift_steps) == fewest]
    least = min(mass(i) for i in tied)
    return next(i for i in tied if same_mass(mass(i), least))
