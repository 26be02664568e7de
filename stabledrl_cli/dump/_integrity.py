"""What a reader found wrong with a run: each finding a kind, a step, a path and a sentence.

Finding kinds:
    torn          a step file shorter than its header says (a write cut short); skipped
    temporary     a temporary file: a step in flight, or left by a killed writer; skipped
    unreadable    a step file that fails to parse or its checksum; skipped
    missing_rank  a step with some ranks' files missing; skipped
    gap           step numbers missing between recorded ones
    unknown_file  a file in steps/ that is not a step file of this run (a stray file, a second
                  spelling of a step number, a symlink, FIFO or device named like a step;
                  never opened), or a rank's stop note that does not read as one
    unchecked     an archive packed before index checksums: its indexes are read unchecked;
                  or an archive's integrity text whose checksum does not match
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from stabledrl_cli._shared_setting import SharedSetting

DAMAGED_KINDS = ("torn", "unreadable")
"""Integrity findings of a damaged step file. A recorder gives a step file its final name only
once it is whole, so a torn one under that name is no step still being written."""
SKIPPED_KINDS = (*DAMAGED_KINDS, "missing_rank")
"""Integrity findings that mean a step the reader skips (docs/run-format.md): a damaged file,
or a step some rank has not written (on a live run, maybe not yet: its ranks lag)."""


class RunIntegrityWarning(UserWarning):
    """A step a reader skipped while iterating (the same fact is in `run.integrity`)."""


def _ignore_integrity_warnings() -> Callable[[], None]:
    caught = warnings.catch_warnings()
    caught.__enter__()
    warnings.simplefilter("ignore", RunIntegrityWarning)
    return partial(caught.__exit__, None, None, None)


integrity_warnings_ignored = SharedSetting(_ignore_integrity_warnings).held
"""The reader's `RunIntegrityWarning`s ignored for the block, in every thread (a warnings
filter is the process's): for a pass that counts the steps it skips, or reports them from
`run.integrity`. The last of the blocks under way side by side restores the filters."""


class StepReadError(Exception):
    """A step that cannot be trusted; `kind` is a finding kind: torn, unreadable or
    missing_rank."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Finding:
    """One fact about a run that a reader skips or reports (kinds in the module docstring)."""

    kind: str
    step: int | None
    path: str | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "step": self.step, "path": self.path, "message": self.message}


@dataclass(frozen=True)
class IntegrityReport:
    """Every finding of a run's full check; `ok` when there is none."""

    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "findings": [f.to_dict() for f in self.findings]}


@dataclass(frozen=True)
class Gap:
    """Steps `first`..`last` (every `stride`-th: `missing` of them) missing between two recorded
    ones."""

    first: int
    last: int
    missing: int
    stride: int

    @property
    def message(self) -> str:
        span = f"step {self.first}" if self.missing == 1 else f"steps {self.first}..{self.last}"
        return f"{span} missing ({self.missing} step(s), stride {self.stride})"


def gaps(steps: list[int]) -> list[Gap]:
    """Missing step numbers, against the run's stride: the most common difference between
    recorded steps (the smallest of those as common). Only a difference of a whole number of
    strides misses steps: a log of every 10th step that also holds its first or its last
    (1, 10, 20, 30, 37) misses none.

    A run that records every 10th step has stride 10 and no gaps; steps: sorted, unique.
    """
    if len(steps) < 2:
        return []
    array = np.asarray(steps, dtype=np.int64)
    diffs = np.diff(array)
    values, counts = np.unique(diffs, return_counts=True)
    stride = int(values[counts.argmax()])  # ascending values: the first most common
    found: list[Gap] = []
    for index in np.flatnonzero((diffs > stride) & (diffs % stride == 0)):
        first, last = int(array[index]) + stride, int(array[index + 1]) - stride
        found.append(Gap(first, last, (last - first) // stride + 1, stride))
    return found


def missing_count(found: Sequence[Gap]) -> int:
    """The steps the `found` gaps miss, in all."""
    return sum(gap.missing for gap in found)


def gap_findings(steps: list[int]) -> list[Finding]:
    """The `gap` findings of `gaps(steps)`."""
    return [Finding("gap", gap.first, None, gap.message) for gap in gaps(steps)]
