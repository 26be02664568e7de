"""Views of part of an open run behind the Run API: `StepSubset` (some of its steps, read from
the run) and `ReadSteps` (steps whose headers a caller already read, served from them)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from stabledrl_cli.dump._integrity import Finding, IntegrityReport, StepReadError
from stabledrl_cli.dump._run import Run
from stabledrl_cli.dump._step import Step


class StepSubset(Run):
    """Some of a run's steps behind the Run API: a replay of part of a run reads only these
    (a step among them that turns out unreadable is skipped, as in the whole run). Named as
    the run is (`location`, `source`)."""

    def __init__(self, run: Run, numbers: Sequence[int]) -> None:
        self.path = run.path
        self._run = run
        self._numbers = sorted(set(numbers))

    @property
    def manifest(self) -> dict[str, Any]:
        return self._run.manifest

    @property
    def location(self) -> str:
        return self._run.location

    @property
    def source(self) -> str:
        return self._run.source

    @property
    def step_numbers(self) -> list[int]:
        return list(self._numbers)

    @property
    def integrity(self) -> IntegrityReport:
        return self._run.integrity

    def header_findings(self) -> list[Finding]:
        return self._run.header_findings()

    def _has_step(self, n: int) -> bool:
        return n in self._numbers and self._run._has_step(n)

    def _try_step(self, n: int, *, deep: bool) -> Step | StepReadError:
        return self._run._try_step(n, deep=deep)


class ReadSteps(StepSubset):
    """Steps whose headers a caller read, behind the Run API from those headers: what is
    derived from their scalars reads no file again."""

    def __init__(self, run: Run, headers: Mapping[int, Step], numbers: Sequence[int]) -> None:
        super().__init__(run, numbers)
        self._headers = headers

    @classmethod
    def of(cls, run: Run, headers: Sequence[Step]) -> ReadSteps:
        """The view of `headers`, steps of `run` read by one walk (`run.step_headers()`)."""
        return cls(run, {h.step: h for h in headers}, [h.step for h in headers])

    def step_headers(self) -> Iterator[Step]:
        for n in self._numbers:
            yield self._headers[n]
