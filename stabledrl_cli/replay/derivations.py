"""Host derivations of per-step columns: what a derivation sees (`SeriesInputs`, one policy's
columns so far) and the built-in derivations `columns.COLUMNS` declares (the clip scale,
spike, nonfinite and drift flags), with the helpers they share (`ratio`, `measured_steps`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from stabledrl_cli.replay.config import CLIP_EPS, ReplayConfig
from stabledrl_cli.replay.detectors import drift_flags, spike_flags, spike_judged
from stabledrl_cli.vocab import StepGeometryKind

ColumnArray = npt.NDArray[np.generic]
"""One column over the steps: [S]."""


@dataclass(frozen=True)
class SeriesInputs:
    """What a host derivation sees: one policy's columns so far (every device metric, and the
    derived columns declared before it), the step numbers, each step's geometry, the config."""

    values: Mapping[str, ColumnArray]
    steps: npt.NDArray[np.int64]
    geometry: tuple[StepGeometryKind, ...]
    config: ReplayConfig

    def float(self, name: str) -> npt.NDArray[np.float64]:
        """Column `name` as float64 [S]."""
        return np.asarray(self.values[name], dtype=np.float64)

    def flag(self, name: str) -> npt.NDArray[np.bool_]:
        """Column `name` as bool [S]."""
        return np.asarray(self.values[name], dtype=np.bool_)


Derive = Callable[[SeriesInputs], ColumnArray]


def ratio(num: npt.NDArray[np.float64], den: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """num / den elementwise; 0 where den is 0 (nothing to divide), NaN propagated."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = num / np.where(den == 0, 1.0, den)
    return np.where(den == 0, np.where(np.isfinite(num), 0.0, np.nan), out)


def clip_scale(inputs: SeriesInputs) -> ColumnArray:
    norm = inputs.float("update_norm")
    bound = inputs.config.max_grad_norm
    if bound is None:
        return np.where(np.isfinite(norm), 1.0, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.minimum(1.0, bound / (norm + CLIP_EPS))


def measured_steps(geometry: Sequence[str]) -> npt.NDArray[np.bool_]:
    """[S] bool: the steps whose update norm recorded gradient geometry measured (a Gram
    matrix or a sketch), not the coefficient-norm proxy ("coef")."""
    return np.array([kind != "coef" for kind in geometry], dtype=bool)


def _per_kind(
    inputs: SeriesInputs, rule: Callable[[npt.NDArray[np.float64]], ColumnArray]
) -> ColumnArray:
    """`rule` ([S'] norms -> [S'] bool) applied to the update norms of each kind apart: norms
    from recorded geometry and coefficient norms (the proxy) are in different units (on the
    example, ~13x apart), so in a mixed run each step's spike history holds only steps
    measured the same way, else every geometry step among proxy steps would be a "spike"."""
    norm = inputs.float("update_norm")
    measured = measured_steps(inputs.geometry)
    flags = np.zeros(norm.shape[0], dtype=bool)
    for same in (measured, ~measured):
        flags[same] = rule(norm[same])
    return flags


def spike(inputs: SeriesInputs) -> ColumnArray:
    factor = inputs.config.spike_factor
    return _per_kind(inputs, lambda norms: spike_flags(norms, factor=factor))


def spike_judged_steps(inputs: SeriesInputs) -> ColumnArray:
    """The steps `spike` compared with a median (`spike_judged`, in each kind's history), and
    those without a finite, nonzero norm, which are never a spike (a non-finite one is counted
    as non-finite): False on a kind's first finite, nonzero norms only."""
    norm = inputs.float("update_norm")
    judged: ColumnArray = ~np.isfinite(norm) | (norm == 0) | _per_kind(inputs, spike_judged)
    return judged


def nonfinite(inputs: SeriesInputs) -> ColumnArray:
    return ~np.isfinite(inputs.float("update_norm")) | (inputs.float("nonfinite_coefs") > 0)


def drift(inputs: SeriesInputs) -> ColumnArray:
    config = inputs.config
    return drift_flags(inputs.float("net_push"), config.window, config.drift_threshold)
