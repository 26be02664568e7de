"""A policy's per-step columns (`StepSeries`), given or derived when read: the derived
columns are held by the series read last only (`_HELD` of them), and the JSON rows are built
from the columns a block of steps at a time.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from stabledrl_cli.replay.derivations import ColumnArray

JsonRow = dict[str, object]
"""One JSON object of the contract, before NaN and inf become null."""


Columns = dict[str, ColumnArray]


@dataclass(frozen=True, eq=False)
class StepSeries:
    """One policy's per-step columns: name -> [S], the reported columns of `columns.COLUMNS`
    in their order (each column's meaning is declared there), aligned over the same steps.

    Given (`given`), or derived when read (`derive`) and kept with the series while it is one
    of the `_HELD` series read last (`_holders`): a replay of many policies holds every
    policy's streamed metrics once, the columns derived of them (integer casts, flags, ratios:
    half the metrics' size again) of two policies at most, so two series read in turn (two
    results compared column by column) are each derived once."""

    given: Columns | None = None
    derive: Callable[[], Columns] | None = field(default=None, repr=False)

    @property
    def columns(self) -> Columns:
        if self.given is not None:
            return self.given
        held: Columns | None = self.__dict__.get("_derived")
        _release(self)  # back in `_holders` below, as the series read last
        if held is None:
            assert self.derive is not None, "a StepSeries has its columns or a way to derive them"
            while len(_holders) >= _HELD:  # the columns read longest ago dropped first
                _release(_holders.pop(0)())
            held = self.derive()
        object.__setattr__(self, "_derived", held)
        _holders.append(self._ref)
        return held

    @property
    def _ref(self) -> weakref.ref[StepSeries]:
        """A weak reference to this series, taken out of `_holders` when the series goes."""
        return weakref.ref(self, _forget)

    def __getstate__(self) -> dict[str, object]:
        """What pickles: the columns or the way to derive them, not the derived ones."""
        return {name: value for name, value in self.__dict__.items() if name != "_derived"}

    def __getitem__(self, name: str) -> ColumnArray:
        columns = self.columns
        if name not in columns:
            raise KeyError(f"no column {name!r}; the series has {list(columns)}")
        return columns[name]

    def __contains__(self, name: str) -> bool:
        return name in self.columns

    def keys(self) -> list[str]:
        """The column names, in their order: with `series[name]`, `dict(series)` (and so
        `pandas.DataFrame(dict(series))`) holds every column."""
        return list(self.columns)

    def __iter__(self) -> Iterator[str]:
        """The column names, in their order (as `in` and indexing take them)."""
        return iter(self.keys())

    def __len__(self) -> int:
        """The number of steps."""
        columns = self.columns
        return len(columns["step"]) if "step" in columns else 0

    def __repr__(self) -> str:
        return f"StepSeries({len(self)} steps; columns: {', '.join(self.columns)})"

    def select(self, keep: np.ndarray) -> StepSeries:
        """The steps where `keep` ([S] bool) is true (derived when read, as this series)."""
        if self.given is not None:
            return StepSeries(_selected(self.given, keep))
        return StepSeries(derive=partial(_selected_of, self, keep))

    def iter_rows(self) -> Iterator[JsonRow]:
        """The per-step rows one at a time, built from the columns `_ROW_BLOCK` steps at a
        time: the rows are output, so only a block of them is ever held as Python objects."""
        columns = self.columns
        steps = len(columns["step"]) if "step" in columns else 0
        for start in range(0, steps, _ROW_BLOCK):
            block = [values[start : start + _ROW_BLOCK].tolist() for values in columns.values()]
            for values in zip(*block, strict=True):
                yield dict(zip(columns, values, strict=True))


# Rows are converted from the columns this many steps at a time.
_ROW_BLOCK = 1024

_HELD = 2
"""How many series hold their derived columns at a time."""
_holders: list[weakref.ref[StepSeries]] = []
"""The series that hold derived columns, the one read longest ago first (readers go through a
replay's policies one after another, or two results' side by side: each series read column
after column is derived once)."""


def _release(series: StepSeries | None) -> None:
    """`series`' derived columns dropped, and it out of `_holders`."""
    if series is not None:
        series.__dict__.pop("_derived", None)
        _holders[:] = [ref for ref in _holders if ref() is not series]


def _forget(ref: weakref.ref[StepSeries]) -> None:
    """A series gone: out of `_holders` (its columns went with it)."""
    if ref in _holders:
        _holders.remove(ref)


def _selected(columns: Columns, keep: np.ndarray) -> Columns:
    """Each column's values where `keep` ([S] bool) is true."""
    return {name: values[keep] for name, values in columns.items()}


def _selected_of(series: StepSeries, keep: np.ndarray) -> Columns:
    """`series`' columns where `keep` is true (a function of the module: a result pickles);
    `series`' own columns are dropped once these are made (the selection is what is read)."""
    selected = _selected(series.columns, keep)
    _release(series)
    return selected
