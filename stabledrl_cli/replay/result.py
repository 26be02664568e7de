"""What a replay returns: `ReplayResult` (one a run) holding `PolicyResult`s (one a policy),
each with its `PolicySummary` and its `StepSeries`.

`to_dict()` is the replay JSON contract (docs/replay-json.md: every key present, null where
not computable; NaN and inf become null when printed); `to_json()` prints it. Extensions
beside the contract's keys: per policy `summary.update_norm_approximate`, the whole-run
figures of gated columns (`columns.Column.gate`) and `summary.detail` (top sequences of
flagged steps, with `detail`); per step the reported columns after `collapsed`; at the top
level `collapse_warning` (the run-level warning, docs/collapse.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

from stabledrl_cli._json import json_safe, stand_in
from stabledrl_cli._repr import compact_repr
from stabledrl_cli.dump._integrity import Gap, missing_count
from stabledrl_cli.errors import UsageError
from stabledrl_cli.policies import get_policy
from stabledrl_cli.replay.config import StepRange
from stabledrl_cli.replay.observed import Observed
from stabledrl_cli.replay.step_series import JsonRow, StepSeries
from stabledrl_cli.vocab import UNJOINED_KINDS, RunGeometryKind, UnjoinedGeometry

if TYPE_CHECKING:
    from stabledrl_cli.dump._live import LiveRead
    from stabledrl_cli.policies import Policy
    from stabledrl_cli.replay.top_sequences import TopSequence


@dataclass(frozen=True)
class Unjoined:
    """The geometry a run's ranks recorded that their join left out on some step (not in the
    JSON but for `kind`)."""

    kinds: frozenset[UnjoinedGeometry] = frozenset()
    """Why, on some step each (`Step.unjoined_why`)."""
    seeds: tuple[int | None, ...] = ()
    """The ranks' sketch seeds on the first step their difference left the sketch out
    (`Step.sketch_seeds`), () when none did (or an archive, which keeps no seed)."""
    widths: tuple[int, ...] = ()
    """The ranks' sketch widths k on the first step their difference left the sketch out, as
    `seeds`."""

    @property
    def kind(self) -> UnjoinedGeometry | None:
        """The first of `kinds` in `UNJOINED_KINDS`' order, None when nothing was left out."""
        return next((kind for kind in UNJOINED_KINDS if kind in self.kinds), None)


MASS_RTOL = 1e-5
"""Discarded gradients this close, relative to the larger, are one figure (`same_mass`): the
replay computes each token's term in float32, so policies that discard the same share (a
setting that only rescales the loss, `agg=constant,max_len=L`) differ by about 1e-7 (1.2e-7
on a sketched run), a share the tables show to 0.1%."""


def same_mass(a: float, b: float) -> bool:
    """Whether discarded gradients `a` and `b` are one figure (`MASS_RTOL`; two infinities of
    one sign are)."""
    return math.isclose(a, b, rel_tol=MASS_RTOL)


@dataclass(frozen=True, kw_only=True)
class PolicySummary:
    """One policy over the whole run (the `--steps` range restricts only the rows)."""

    tokens: int
    """Eligible entries (mask = 1, A != 0) over every step."""
    discarded: int
    """Eligible entries the policy's rule zeroes."""
    discard_frac: float
    """discarded / tokens (0 without tokens)."""
    discarded_pos: int
    """Discarded entries with A > 0."""
    discarded_neg: int
    """Discarded entries with A < 0."""
    discarded_mass_frac: float | None
    """Median over steps of the per-step discarded_mass_frac (None: no finite step)."""
    clipped: int
    """Eligible entries whose weight was bounded or rescaled."""
    update_norm_median: float | None
    """Median of the finite update norms (None: none finite)."""
    update_norm_max: float | None
    """Largest finite update norm (None: none finite)."""
    cosine_to_own_median: float | None
    """Median cosine to the own policy's update (None: no geometry, or no own policy)."""
    spike_steps: list[int]
    drift_steps: list[int]
    collapsed_steps: list[int]
    """Risk steps: nonfinite or spike."""
    first_collapse: int | None
    lead_steps: int | None
    """Always None: a one-step replay claims no lead time (the run-level collapse warning
    has one). Kept for the JSON contract."""
    fidelity: float | None
    """Own policy only: median relative error of update_norm against the recorded
    grad_norm_covered, over steps with geometry."""
    loss_parity: float | None
    """Own policy only: median relative error of -objective against the recorded loss."""
    update_norm_approximate: bool
    """Some step's norm summed varying token coefficients into one sequence unit."""
    column_figures: dict[str, float | None] = field(default_factory=dict)
    """Whole-run figures of gated columns (`Column.figure` -> value) and of summary columns
    (`Column.summary`: the column's name -> value); None: no finite value."""
    unjudged: dict[str, str] = field(default_factory=dict)
    """Why the drift or the spike rule judged no step of the policy, by rule ("drift",
    "spike"): its count of 0 then says nothing (`summary.unjudged_rules`)."""

    def __repr__(self) -> str:
        """The fields, a long list of steps as its first items and its length."""
        return compact_repr(self)

    def to_dict(self) -> JsonRow:
        """The contract's summary keys in order, then the column figures."""
        data: JsonRow = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name != "column_figures"
        }
        data.update(self.column_figures)
        return data


@dataclass
class PolicyResult:
    """One policy replayed over a run."""

    name: str
    spec: str
    """Canonical policy spec."""
    params: dict[str, object]
    own: bool
    """The run's own policy (from its manifest)."""
    best: bool
    """`summary.best_index`: among the policies without risk (collapsed) steps, the fewest
    drift steps, then the lowest discarded_mass_frac (within rounding: the first given); never
    with one policy replayed."""
    summary: PolicySummary
    series: StepSeries = field(repr=False)
    """Per-step columns over the reported range."""
    detail: dict[int, list[TopSequence]] | None = field(default=None, repr=False)
    """step -> top sequences of that flagged step (with `detail`; None without it)."""

    def __repr__(self) -> str:
        """One line: the spec, own and best, and the headline figures (`.summary` holds them
        all, with the flagged steps)."""
        summary = self.summary
        return (
            f"PolicyResult(spec={self.spec!r}, own={self.own}, best={self.best}, "
            f"discard_frac={summary.discard_frac:.4g}, "
            f"collapsed_steps={len(summary.collapsed_steps)}, "
            f"first_collapse={summary.first_collapse}, drift_steps={len(summary.drift_steps)})"
        )

    @property
    def steps(self) -> list[JsonRow]:
        """Per-step rows over the reported range."""
        return list(self.series.iter_rows())

    def summary_dict(self) -> JsonRow:
        """The policy's `summary` entry, with `detail` when it was asked for (`{}` when no
        step of the range was flagged)."""
        summary = self.summary.to_dict()
        if self.detail is not None:
            summary["detail"] = {
                str(k): [asdict(s) for s in v] for k, v in sorted(self.detail.items())
            }
        return summary

    def to_dict(self, *, steps: bool = True) -> JsonRow:
        """The policy's entry of the JSON contract (`steps=False`: without its per-step rows)."""
        return {
            "name": self.name,
            "spec": self.spec,
            "params": dict(self.params),
            "own": self.own,
            "best": self.best,
            "summary": self.summary_dict(),
            "steps": self.steps if steps else [],
        }


@dataclass
class ReplayResult:
    """A replay of one run: every policy, and the run's observed behaviour beside them."""

    run: str
    steps: int
    """Steps replayed (the whole run; `step_range` restricts only the per-step rows)."""
    geometry: RunGeometryKind
    geometry_coverage: float
    """Fraction of steps with recorded gradient geometry."""
    policies: list[PolicyResult]
    observed: Observed
    run_policy_spec: str | None = None
    step_range: StepRange = (None, None)
    skipped: list[str] = field(default_factory=list)
    """Why each skipped step was skipped (not in the JSON): the reader's reason for each step
    it could not read, then the replay's for each step whose data it could not use
    (`stream.StreamedRun.rejected`); each names its step."""
    missing: list[Gap] = field(default_factory=list)
    """The runs of steps missing between the run's recorded ones (`run_facts.run_gaps`;
    the JSON counts their steps, `missing_steps`)."""
    threads: int = 1
    """CPU threads the replay computed with (`ReplayConfig.threads`)."""
    widest_chunk: int = 0
    """The most steps of a chunk the memory budget or chunk size closed, 0 when none was (not
    in the JSON: `stream.StreamedRun.widest_chunk`)."""
    scalar_steps: int = 0
    """Steps without a policy batch (per-step scalars only, format 1.2), not replayed."""
    fidelity_gap: str = ""
    """Why the own policy's fidelity is None (`summary.fidelity_gap`; "" when it is not: not
    in the JSON, whose fidelity is null)."""
    loss_parity_gap: str = ""
    """Why the own policy's loss_parity is None (`summary.parity_gap`; "" when it is not: not
    in the JSON, whose loss_parity is null)."""
    unjoined: Unjoined = Unjoined()
    """Geometry the run's ranks recorded that their join leaves out on some replayed step,
    and why (`Unjoined.kind`: the JSON's `unjoined_geometry`). Those steps' update norms are
    coefficient norms."""
    live: LiveRead | None = None
    """The run was being recorded when replayed: the steps listed when the replay began, and
    the steps landed since (`dump._live.live_read`); None when no live Recorder held it."""

    @property
    def per_rank_grams(self) -> bool:
        """The run's ranks recorded Gram matrices, which do not combine across ranks."""
        return self.unjoined.kind == "per_rank_grams"

    @property
    def partial_sketches(self) -> bool:
        """Some of the run's ranks recorded no sketch: the others' rows are part of a step."""
        return self.unjoined.kind == "partial_sketches"

    def __repr__(self) -> str:
        """One line: the run, its steps and the policies (`.policies`, `.observed` and
        `.to_dict()` hold the rest)."""
        own, best = self.own, self.best
        return (
            f"ReplayResult(run={self.run!r}, steps={self.steps}, "
            f"policies={[p.spec for p in self.policies]}, own={own.spec if own else None!r}, "
            f"best={best.spec if best else None!r})"
        )

    def policy(self, spec: str | Policy) -> PolicyResult:
        """The result of the policy of this spec, or Policy, as `replay` took it: found by its
        canonical spec ("grpo:eps_low=0.2" is "grpo"; KeyError lists the specs)."""
        try:
            wanted = get_policy(spec).spec
        except UsageError:  # no catalogue spec: perhaps a custom Policy's own
            wanted = str(spec)
        for p in self.policies:
            if p.spec == wanted:
                return p
        raise KeyError(
            f"no policy {spec!r} in this replay; it has {[p.spec for p in self.policies]}"
        )

    @property
    def skipped_steps(self) -> int:
        """Steps skipped: unreadable, incomplete, or with data the replay cannot use."""
        return len(self.skipped)

    @property
    def missing_steps(self) -> int:
        """Steps missing between the run's recorded ones."""
        return missing_count(self.missing)

    @property
    def own(self) -> PolicyResult | None:
        """The run's own policy, when it was replayed."""
        return next((p for p in self.policies if p.own), None)

    @property
    def best(self) -> PolicyResult | None:
        """The best policy (`PolicyResult.best`)."""
        return next((p for p in self.policies if p.best), None)

    def to_dict(self, *, steps: bool = True) -> dict[str, object]:
        """The JSON contract, NaN and inf already mapped to null (`steps=False`: every policy's
        `steps` left empty)."""
        data: dict[str, object] = json_safe(
            {
                "run": self.run,
                "steps": self.steps,
                "geometry": self.geometry,
                "geometry_coverage": self.geometry_coverage,
                "policies": [p.to_dict(steps=steps) for p in self.policies],
                "observed": self.observed.contract_dict(),
                "collapse_warning": self.observed.collapse_warning.to_dict(),
                "guards": [g.to_dict() for g in self.observed.guards],
                "threads": self.threads,
                "scalar_steps": self.scalar_steps,
                "skipped_steps": self.skipped_steps,
                "missing_steps": self.missing_steps,
                "live": None if self.live is None else self.live.to_dict(),
                "unjoined_geometry": self.unjoined.kind,
                "unscored_streak": streak.to_dict()
                if (streak := self.observed.unscored_streak)
                else None,
            }
        )
        return data

    def iter_json(self, indent: int | None = 2) -> Iterator[str]:
        """`to_json()` in pieces, the per-step rows serialized one at a time: printing a long
        run's JSON never holds all its rows as Python objects (`to_dict()` does)."""
        head = self.to_dict(steps=False)
        policies = head["policies"]
        assert isinstance(policies, list)
        rows_mark = stand_in(head, "rows-of-policy")
        for i, policy in enumerate(policies):
            policy["steps"] = rows_mark.format(i)
        text = json.dumps(head, indent=indent, allow_nan=False)
        for i, p in enumerate(self.policies):
            before, text = text.split(json.dumps(rows_mark.format(i)), 1)
            yield before
            yield from _json_list(p.series.iter_rows(), indent, depth=3)
        yield text

    def to_json(self, indent: int | None = 2) -> str:
        """The JSON contract as text: json.dumps(self.to_dict(), indent=indent)."""
        return "".join(self.iter_json(indent))


def _json_list(rows: Iterator[JsonRow], indent: int | None, depth: int) -> Iterator[str]:
    """A JSON list of `rows`, as json.dumps would print it at nesting `depth`, row by row."""
    if indent is None:
        inner = outer = ""
        separator = ", "
    else:
        inner, outer = "\n" + " " * (indent * (depth + 1)), "\n" + " " * (indent * depth)
        separator = ","
    first = True
    for row in rows:
        text = json.dumps(json_safe(row), indent=indent, allow_nan=False)
        yield ("[" if first else separator) + inner + text.replace("\n", inner)
        first = False
    yield "[]" if first else outer + "]"
