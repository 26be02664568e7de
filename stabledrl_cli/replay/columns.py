"""Every per-step column of a replay, declared once (docs/replay-json.md defines each).

A `Column` says what a per-step figure is called (its JSON key and HDF5 dataset name), its
type, what it means, and where it comes from: a device metric of `metrics.step_metrics`
(`derive` None: computed on the device for every policy at once) or a host derivation from
the columns before it (`derive`). The engine, the JSON rows, the HDF5 report, the per-step
table and the gate all read `COLUMNS`; adding a metric is one declaration here plus its
computation (in `step_metrics` for a device metric).

The order of `COLUMNS` is the order of a step row in the JSON contract (the contract's keys,
then the extensions). Unreported columns are intermediate device metrics that a derivation
needs; they never leave the replay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from stabledrl_cli.replay.config import SPIKE_MIN_HISTORY, ReplayConfig
from stabledrl_cli.replay.derivations import (
    ColumnArray,
    Derive,
    SeriesInputs,
    clip_scale,
    drift,
    nonfinite,
    ratio,
    spike,
    spike_judged_steps,
)
from stabledrl_cli.vocab import MetricGroup, StepGeometryKind, Worse

ColumnKind = Literal["int", "float", "bool", "str"]
"""A column's value type: int64, float64 (NaN where not computable), bool, or str."""
DTYPES: dict[ColumnKind, type[np.generic]] = {
    "int": np.int64,
    "float": np.float64,
    "bool": np.bool_,
    "str": np.object_,
}
Aggregate = Literal["max", "median", "mean", "sum", "count"]
"""How a column becomes one figure of the run: over its finite values (count: the steps where
a bool column is true)."""
CellFormat = Literal["int", "percent", "number", "number4"]
"""How the per-step table shows a value: as is, as a percentage, to 3 or 4 digits."""

TRL_CLIP_METRICS = (
    "trl_clip_ratio_low_mean",
    "trl_clip_ratio_high_mean",
    "trl_clip_ratio_region_mean",
    "trl_cispo_clip_ratio",
)
"""TRL's `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean`,
`cispo_clip_ratio`, in that order."""
TRL_EXTREME_METRICS = ("trl_clip_ratio_low_min", "trl_clip_ratio_high_max")
"""TRL's `clip_ratio/low_min`, `clip_ratio/high_max`: the extreme per-sequence clip fraction of
each micro-batch call, mean over the calls."""
TRL_METRICS = (*TRL_CLIP_METRICS, "trl_vespo_phi_seq_mean", *TRL_EXTREME_METRICS)
"""TRL's clip metrics, `vespo/phi_seq_mean`, then the extreme clip metrics (computed by
`framework.framework_metrics`)."""
VERL_METRICS = ("verl_pg_clipfrac", "verl_pg_clipfrac_lower", "verl_ppo_kl")
"""verl's `actor/pg_clipfrac`, `actor/pg_clipfrac_lower`, `actor/ppo_kl` (computed by
`framework`)."""


@dataclass(frozen=True, kw_only=True)
class ColumnGate:
    """A column's whole-run figure: reported in the policy summary as `NAME_AGGREGATE` and
    gated by `check` against a baseline like the built-in figures."""

    aggregate: Aggregate
    worse: Worse
    """The direction in which a change of the figure is a regression."""
    abs_tol: float = 0.0
    """Default absolute slack of a written baseline."""
    rel_tol: float = 0.0
    """Default relative slack of a written baseline."""


@dataclass(frozen=True, kw_only=True)
class TableCell:
    """How the per-step table shows a column."""

    header: str
    format: CellFormat = "number"


@dataclass(frozen=True, kw_only=True)
class Column:
    """One per-step figure of every replayed policy."""

    name: str
    """JSON key of a step row, HDF5 dataset name, and the name derivations read it by."""
    kind: ColumnKind
    meaning: str
    derive: Derive | None = None
    """None: a device metric of `metrics.step_metrics` (one value a policy a step)."""
    reported: bool = True
    """False: an intermediate that derivations need, never output."""
    table: TableCell | None = None
    """Its cell in the per-step table (None: not shown there)."""
    flag: bool = False
    """A bool column listed in the per-step table's `flags` cell when true."""
    gate: ColumnGate | None = None
    """Its whole-run figure, summarized and gated (None: neither)."""
    summary: Aggregate | None = None
    """Its whole-run figure in the policy summary under the column's own name, not gated."""
    group: MetricGroup | None = None
    """Shown in the tables only on request (`replay --metrics GROUP`); None: by default."""

    @property
    def figure(self) -> str | None:
        """The summary and gate name of its whole-run figure, or None."""
        return None if self.gate is None else f"{self.name}_{self.gate.aggregate}"


COLUMNS: tuple[Column, ...] = (
    Column(
        name="step",
        kind="int",
        meaning="The recorded step number.",
        derive=lambda inputs: inputs.steps,
        table=TableCell(header="step", format="int"),
    ),
    Column(
        name="tokens",
        kind="int",
        meaning="Eligible entries: mask = 1 and A != 0.",
        table=TableCell(header="tokens", format="int"),
    ),
    Column(name="discarded", kind="int", meaning="Eligible entries the policy's rule zeroes."),
    Column(
        name="discard_frac",
        kind="float",
        meaning="discarded / tokens (0 without tokens).",
        derive=lambda inputs: ratio(inputs.float("discarded"), inputs.float("tokens")),
        table=TableCell(header="discard", format="percent"),
    ),
    Column(
        name="clipped",
        kind="int",
        meaning="Eligible entries whose weight was bounded or rescaled, gradient kept.",
        table=TableCell(header="clipped", format="int"),
    ),
    Column(
        name="geometry",
        kind="str",
        meaning="How update_norm was measured: gram, sketch or coef (the coefficient norm).",
        derive=lambda inputs: np.array(inputs.geometry, dtype=object),
    ),
    Column(
        name="update_norm",
        kind="float",
        meaning="Norm of the replayed (pre-clip) update.",
        table=TableCell(header="update norm", format="number4"),
    ),
    Column(
        name="clip_scale",
        kind="float",
        meaning="min(1, max_grad_norm / update_norm): what clipping would apply (1 without it).",
        derive=clip_scale,
        table=TableCell(header="clip scale"),
    ),
    Column(
        name="cosine_to_own",
        kind="float",
        meaning="Cosine between this update and the run's own policy's (needs geometry).",
        table=TableCell(header="cos own"),
    ),
    Column(
        name="weight_max",
        kind="float",
        meaning="Largest effective weight: coef over the REINFORCE coefficient.",
        table=TableCell(header="w max"),
    ),
    Column(
        name="ess_frac",
        kind="float",
        meaning="Effective sample size of the weights over the eligible entries, in (0, 1].",
        table=TableCell(header="ess"),
    ),
    Column(
        name="net_push",
        kind="float",
        meaning="(sum coef - sum coef_reinforce) / sum |coef_reinforce|: REINFORCE sits at 0.",
        table=TableCell(header="net push"),
    ),
    Column(
        name="spike",
        kind="bool",
        meaning="update_norm above spike_factor x the median of the previous finite non-zero "
        "steps.",
        derive=spike,
        flag=True,
    ),
    Column(
        name="nonfinite",
        kind="bool",
        meaning="The replayed update is NaN or inf.",
        derive=nonfinite,
        flag=True,
    ),
    Column(
        name="drift",
        kind="bool",
        meaning="The rolling mean of net_push over window steps is below drift_threshold.",
        derive=drift,
        flag=True,
    ),
    Column(
        name="collapsed",
        kind="bool",
        meaning="A risk step: nonfinite or spike.",
        derive=lambda inputs: inputs.flag("nonfinite") | inputs.flag("spike"),
    ),
    Column(name="discarded_pos", kind="int", meaning="Discarded entries with A > 0."),
    Column(name="discarded_neg", kind="int", meaning="Discarded entries with A < 0."),
    Column(
        name="discarded_mass_frac",
        kind="float",
        meaning="Norm of the discarded part of the IS update over the norm of the IS update.",
        derive=lambda inputs: ratio(inputs.float("discarded_mass"), inputs.float("is_mass")),
    ),
    Column(name="objective", kind="float", meaning="The policy's surrogate objective J."),
    Column(
        name="scored_tokens",
        kind="int",
        meaning="Scored entries: mask = 1 (A = 0 included).",
        summary="sum",
        group="counts",
        table=TableCell(header="scored", format="int"),
    ),
    Column(
        name="clipped_pos",
        kind="int",
        meaning="Clipped entries with A > 0.",
        summary="sum",
        group="counts",
        table=TableCell(header="clip +A", format="int"),
    ),
    Column(
        name="clipped_neg",
        kind="int",
        meaning="Clipped entries with A < 0.",
        summary="sum",
        group="counts",
        table=TableCell(header="clip -A", format="int"),
    ),
    *(
        Column(
            name=name,
            kind="float",
            meaning=meaning,
            summary="mean",
            group="trl",
            table=TableCell(header=header, format="percent"),
        )
        for name, header, meaning in zip(
            (*TRL_CLIP_METRICS, *TRL_EXTREME_METRICS),
            ("trl low", "trl high", "trl region", "trl cispo", "trl low min", "trl high max"),
            (
                "TRL clip_ratio/low_mean: (r < 1 - eps_low) & (A < 0) over scored entries, "
                "mean over micro-batches.",
                "TRL clip_ratio/high_mean: (r > 1 + eps_high) & (A > 0) over scored entries, "
                "mean over micro-batches.",
                "TRL clip_ratio/region_mean: low or high, mean over micro-batches.",
                "TRL cispo_clip_ratio: (r > cap) & (A > 0) over scored entries, mean over "
                "micro-batches.",
                "TRL clip_ratio/low_min: per micro-batch, the least share of a sequence's "
                "scored entries with (r < 1 - eps_low) & (A < 0) over its rows on every rank "
                "(rows without one skipped), mean over micro-batches.",
                "TRL clip_ratio/high_max: per micro-batch, the largest share of a sequence's "
                "scored entries with (r > 1 + eps_high) & (A > 0) over its rows on every rank, "
                "mean over micro-batches.",
            ),
            strict=True,
        )
    ),
    Column(
        name="trl_vespo_phi_seq_mean",
        kind="float",
        meaning="TRL vespo/phi_seq_mean: VESPO's gamma weight phi of each row, mean over rows, "
        "mean over micro-batches.",
        summary="mean",
        group="trl",
        table=TableCell(header="trl phi", format="number4"),
    ),
    *(
        Column(
            name=name,
            kind="float",
            meaning=meaning,
            summary="mean",
            group="verl",
            table=TableCell(
                header=header, format="number4" if name == "verl_ppo_kl" else "percent"
            ),
        )
        for name, header, meaning in zip(
            VERL_METRICS,
            ("verl clipfrac", "verl lower", "verl ppo_kl"),
            (
                "verl pg_clipfrac: scored entries whose clip binds (dppo: outside its trust "
                "region; gmpo: A > 0 and log r outside [-eps_low, eps_high]), over scored "
                "entries, mean over micro-batches.",
                "verl pg_clipfrac_lower (dual-clip: A < 0 and r > c; dppo: inside its trust "
                "region and r > c; gmpo: A < 0 and log r outside [-eps_low, eps_high]; 0 for "
                "gspo, cispo and sapo), over scored entries, mean over micro-batches.",
                "verl ppo_kl: mean of -log r (|log r| for kl_cov) over scored entries, mean "
                "over micro-batches.",
            ),
            strict=True,
        )
    ),
    Column(
        name="discarded_mass",
        kind="float",
        meaning="Norm of the discarded part of the IS update.",
        reported=False,
    ),
    Column(name="is_mass", kind="float", meaning="Norm of the IS update.", reported=False),
    Column(
        name="objective_mass",
        kind="float",
        meaning="Sum of |r A w / norm| over scored entries: the size of the terms J adds up.",
        reported=False,
    ),
    Column(
        name="nonfinite_coefs",
        kind="float",
        meaning="Scored entries whose coefficient is NaN or inf.",
        reported=False,
    ),
    Column(
        name="spike_judged",
        kind="bool",
        meaning="The spike rule judged the step: false on the first "
        f"{SPIKE_MIN_HISTORY} finite, non-zero update norms of its kind, which have no history "
        "to compare with (n/j in the per-step table's flags).",
        derive=spike_judged_steps,
    ),
)
"""The registry: every per-step column, in the order of a JSON step row."""


def device_metrics() -> tuple[str, ...]:
    """The columns `step_metrics` computes on the device, in the order of its [P, M] rows."""
    return tuple(c.name for c in COLUMNS if c.derive is None)


def reported_columns() -> tuple[Column, ...]:
    """The columns of a step row (JSON, HDF5, the policy's series), in order."""
    return tuple(c for c in COLUMNS if c.reported)


def gated_columns() -> tuple[Column, ...]:
    """The columns with a whole-run figure (summary and gate)."""
    return tuple(c for c in COLUMNS if c.gate is not None)


def summary_columns() -> tuple[Column, ...]:
    """The columns with an ungated whole-run figure in the policy summary."""
    return tuple(c for c in COLUMNS if c.summary is not None)


def table_columns(groups: tuple[MetricGroup, ...] = ()) -> tuple[Column, ...]:
    """The reported columns the per-step table shows: the default ones and those of `groups`."""
    return tuple(
        c
        for c in reported_columns()
        if c.table is not None and (c.group is None or c.group in groups)
    )


def derive_series(
    device: npt.NDArray[np.float64],
    steps: npt.NDArray[np.int64],
    geometry: tuple[StepGeometryKind, ...],
    config: ReplayConfig,
) -> dict[str, ColumnArray]:
    """One policy's reported columns over the steps: device [S, M] (columns `device_metrics()`)
    -> name -> [S], each of its declared type."""
    values: dict[str, ColumnArray] = {name: device[:, i] for i, name in enumerate(device_metrics())}
    inputs = SeriesInputs(values=values, steps=steps, geometry=geometry, config=config)
    series: dict[str, ColumnArray] = {}
    for column in COLUMNS:
        raw = values[column.name] if column.derive is None else column.derive(inputs)
        values[column.name] = np.asarray(raw).astype(DTYPES[column.kind], copy=False)
        if column.reported:
            series[column.name] = values[column.name]
    return series
