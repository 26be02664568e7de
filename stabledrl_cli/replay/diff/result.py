"""What `diff_runs` finds: where two runs part, the `diff --format json` document
(docs/diff.md)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from stabledrl_cli.vocab import DiffKind


@dataclass(frozen=True, kw_only=True)
class FieldDifference:
    """How one field (or scalar) differs at a step."""

    field: str
    what: str
    """In words: 'only in A', 'float32[64] vs float32[32]', '3 of 64 differ, first at 5, max
    |a-b| 0.01' (the index of the first differing entry in the flattened array), ', 2 NaN or
    inf against another value' after it when some are."""


@dataclass(frozen=True, kw_only=True)
class Parting:
    """The first step at which one kind of difference shows, and what differs there."""

    step: int
    fields: list[FieldDifference]
    more: int = 0
    """Fields that differ there too, past those described (`FIELDS_SHOWN`)."""


@dataclass(frozen=True, kw_only=True)
class SideBySide:
    """One step's figures in each run (None where a run lacks the step or the figure)."""

    step: int
    a: dict[str, float | bool | None]
    b: dict[str, float | bool | None]


@dataclass(frozen=True, kw_only=True)
class DiffResult:
    """Where two runs part (the `diff --format json` document, docs/diff.md)."""

    run_a: str
    run_b: str
    atol: float
    rtol: float
    steps_a: int
    steps_b: int
    common: int
    """Steps both runs hold."""
    compared: int
    """Common steps compared (the comparison stops once every kind has parted)."""
    scalars_only: int
    """Compared steps that one run holds as scalars only (no policy batch: an imported log,
    optimizer-hook steps): only what both record there was compared, not the other's batch."""
    batches_compared: int
    """Compared steps where both runs hold a policy batch: those `inputs` and `logprobs` were
    compared on (0: not compared, both runs or one holding scalars only)."""
    unshared: dict[str, list[str]]
    """Per run ("a", "b"), the scalars (and scalar-step arrays, `param_grad_norm`) it alone
    records at a compared step where either run holds scalars only: not compared there."""
    unshared_compared: dict[str, int]
    """Of the `unshared` names, those both runs record at other compared steps, each with the
    number of them: compared there (verl's imported `lr`, which its first step lacks)."""
    only_a: list[tuple[int, int]]
    """Steps only run A holds, as inclusive ranges [first, last]."""
    only_b: list[tuple[int, int]]
    first: dict[DiffKind, Parting | None]
    """Per kind, the first step where it differs (None: never, over the compared steps)."""
    parted_at: int | None
    """The first step where inputs, log-probabilities or scalars differ (None: they never do)."""
    own_policy: dict[str, str | None]
    """The own policy replayed for each run ("a", "b"), None when not in the catalogue."""
    around: list[SideBySide] = field(default_factory=list)
    unreadable_a: list[tuple[int, int]] = field(default_factory=list)
    """Steps run A has a file for but cannot read (torn, corrupt, a rank missing), as inclusive
    ranges: not among its steps, so not compared (one B holds is in `only_b`)."""
    unreadable_b: list[tuple[int, int]] = field(default_factory=list)
    bits_only: list[str] = field(default_factory=list)
    """The arrays no kind parts on (gradient geometry, `param_grad_norm`) whose bits differ at
    a compared step: no tolerance applies to them."""
    notes: list[str] = field(default_factory=list)
    """How the steps of a log written every k steps were compared (`WindowMeans`), or that a
    log's rows skip steps the other run holds without saying how it was written."""

    @property
    def identical(self) -> bool:
        """Every common step bit for bit equal (its arrays compared), no step in one run only,
        and none that either run cannot read."""
        return (
            self.first["arrays"] is None
            and not self.scalars_only
            and not any(self.unshared.values())
            and not self.only_a
            and not self.only_b
            and not self.unreadable_a
            and not self.unreadable_b
        )

    def parted_before(self, until: int | None) -> bool:
        """They part before step `until` (None: at any step)."""
        return self.parted_at is not None and (until is None or self.parted_at < until)

    def to_dict(self) -> dict[str, object]:
        """The JSON document (NaN still to be mapped to null)."""
        data = asdict(self)
        data["first"] = {kind: data["first"][kind] for kind in self.first}
        data["only_a"] = [list(r) for r in self.only_a]
        data["only_b"] = [list(r) for r in self.only_b]
        data["unreadable_a"] = [list(r) for r in self.unreadable_a]
        data["unreadable_b"] = [list(r) for r in self.unreadable_b]
        data["identical"] = self.identical
        return data
