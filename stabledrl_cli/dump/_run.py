"""The abstract run: what every reader of a recorded run offers, whatever holds it.

A `Run` (a run directory, or a packed archive) lists its readable steps, hands out a `Step`
(`stabledrl_cli.dump._step`) per optimizer step, reports its integrity, and derives the rest
from those: iteration that skips an untrustworthy step with a `RunIntegrityWarning`,
header-only iteration, per-step scalar series.
"""

from __future__ import annotations

import os
import stat
import warnings
from abc import ABC, abstractmethod
from array import array
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np

from stabledrl_cli.dump._arguments import step_number
from stabledrl_cli.dump._integrity import (
    Finding,
    IntegrityReport,
    RunIntegrityWarning,
    StepReadError,
)
from stabledrl_cli.dump._step import Step
from stabledrl_cli.dump._stop_notes import manifest_stops
from stabledrl_cli.dump._writer_lock import WriterState
from stabledrl_cli.errors import InputError, UsageError, type_name
from stabledrl_cli.vocab import GroupIds, LossNorm, Unit

_RunT = TypeVar("_RunT", bound="Run")


def size_on_disk(path: Path, *, follow: bool = True) -> int:
    """Bytes of a file, or of every file under a directory (one renamed away meanwhile, e.g. a
    temporary step file of a live run, is skipped). A link under `path`, and `path` itself
    unless `follow`, is its own bytes, never followed: a run received with `notes -> /usr` or
    `key -> /etc/shadow` in it holds neither, and a link to / would walk the file system."""
    try:
        info = os.stat(path) if follow else os.lstat(path)
    except OSError:
        return 0
    if not stat.S_ISDIR(info.st_mode):
        return info.st_size
    total = 0
    for root, dirs, files in os.walk(path):  # (it enters no linked directory)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def scalar_names(names: Iterable[str]) -> list[str]:
    """`names` as `Run.scalar_series_many` takes them, UsageError unless each is a str and
    `names` is no str itself (one name where a list of them goes: its characters)."""
    if isinstance(names, str):
        raise UsageError(f"names must be a list of scalar names, not the str {names!r}")
    names = list(names)
    for name in names:
        if not isinstance(name, str):
            raise UsageError(f"a scalar name is a str, not {type_name(name)}")
    return names


class Run(ABC):
    """A recorded run: a directory or an HDF5 archive, behind the same API."""

    path: Path
    verify: bool = True
    """Whether a step's data checksum is checked when its arrays are read."""

    @property
    @abstractmethod
    def manifest(self) -> dict[str, Any]:
        """The run's manifest (its fields: docs/run-format.md)."""

    @property
    def archive_version(self) -> tuple[int, int] | None:
        """A packed archive's own format version (its `format_version` attribute, which says
        what the archive's layout adds to its manifest's); None for a run directory."""
        return None

    @property
    def recording_stops(self) -> list[dict[str, Any]]:
        """Every rank's `recording_stopped` note ({step, rank, reason}: its recording stopped
        after a failed write or `note_stop`, training going on), by rank; empty when no rank
        stopped. Here the manifest's (an archive keeps every rank's in it, `RECORDING_STOPS`)."""
        return manifest_stops(self.manifest)

    @contextmanager
    def snapshot(self) -> Iterator[Run]:
        """The run for the block, its steps as listed when the block began: steps that land
        meanwhile are not read, so every figure of a command comes from one listing (a run
        still being recorded grows under it). Blocks nest. Here the run as it is (an archive
        does not grow)."""
        self.hold_listing()
        try:
            yield self
        finally:
            self.release_listing()

    def hold_listing(self) -> None:
        """From now on, read the run's steps as listed now (`snapshot`'s start), until
        `release_listing`. Nothing here (an archive does not grow)."""
        return None

    def release_listing(self) -> None:
        """Undo one `hold_listing`: once each is undone, the run is listed again as it grows."""
        return None

    def recorded_again(self) -> bool:
        """Whether the run was recorded again since it was opened (resumed from a step it held,
        or recorded over): its manifest's `run_id` is another now, or the manifest is gone.
        False here (an archive is never written while it is read)."""
        return False

    def recorder_states(self) -> dict[int, WriterState] | None:
        """What each rank's lock file left in the run says of its Recorder: "held" (recording
        now), "released" (its process died without closing the run: killed, say), "unknown"
        (`writer_states`); a rank whose Recorder closed has none. None where it cannot be
        told: here (an archive holds no Recorder)."""
        return None

    def recorder_ranks(self) -> tuple[list[int], list[int]]:
        """(the ranks a live Recorder records now, those whose process died without closing
        the run), as `recorder_states` tells them; empty where it cannot."""
        states = self.recorder_states() or {}
        live = sorted(rank for rank, state in states.items() if state == "held")
        return live, sorted(rank for rank, state in states.items() if state == "released")

    @property
    def listed_recording_stops(self) -> list[dict[str, Any]]:
        """`recording_stops` as of the run's last listing (`listed_step_numbers`'): what a
        reader following a live run polls, without listing it again. `recording_stops` here."""
        return self.recording_stops

    @property
    @abstractmethod
    def step_numbers(self) -> list[int]:
        """Readable steps, ascending (checked as of now: a live run grows)."""

    @property
    def listed_step_numbers(self) -> list[int]:
        """The steps the run lists, ascending, without checking any (one may turn out unreadable
        when it is read): what a reader following a live run polls. `step_numbers` here."""
        return self.step_numbers

    @property
    def listed_whole_step_numbers(self) -> list[int]:
        """The steps of the run's listing (`listed_step_numbers`) every rank has a file of,
        ascending: the most a pass over it reads (a step some rank lacks is skipped, never
        read)."""
        listed = self.listed_step_numbers  # lists first: the partial ones are of this listing
        partial = set(self.listed_partial_step_numbers)
        return [n for n in listed if n not in partial] if partial else listed

    @property
    def listed_partial_step_numbers(self) -> list[int]:
        """The steps of the run's last listing (`listed_step_numbers`') some rank has no file
        of, ascending, not listed again: a step a reader following the run read is gone once
        one of its files is."""
        return sorted(self.listed_partial_steps)

    @property
    def listed_partial_steps(self) -> dict[int, Collection[int]]:
        """`listed_partial_step_numbers`, each -> the ranks that have a file of it. {} here:
        every step is whole."""
        return {}

    @property
    def listed_last_steps(self) -> dict[int, int]:
        """Each rank's last step with a file in the run's last listing (`listed_step_numbers`'),
        by rank; a rank with none is not there. {} here: no rank lags."""
        return {}

    @property
    @abstractmethod
    def integrity(self) -> IntegrityReport:
        """Every finding of a full check of the run (data checksums included)."""

    @property
    def listed_integrity(self) -> IntegrityReport:
        """`integrity` as of the run's last listing (`listed_step_numbers`'): the findings of
        the steps a pass over it read, not of those that landed since (a live run). `integrity`
        here."""
        return self.integrity

    def header_findings(self) -> list[Finding]:
        """The findings of the run's step files that its reader skips before any data is read
        (a torn or unreadable header, a missing rank; an archive's steps left out when it was
        packed): what `integrity` finds without reading the data. Here `integrity`'s own."""
        return self.integrity.findings

    def checks(self) -> object | None:
        """What this reader has checked of the run's data so far, with what identifies each file
        as checked, for another reader of the same run to `adopt_checks` (a sharded replay's
        workers hand theirs to the driver); None when it has nothing to hand on."""
        return None

    def adopt_checks(self, checks: object) -> None:
        """Takes another reader's `checks` of this run as its own, so `integrity` reads only
        what neither checked: what no longer is as it was checked is checked again, and
        anything not this reader's kind of checks is ignored."""
        return None

    @abstractmethod
    def _has_step(self, n: int) -> bool:
        """Whether the run holds step `n` at all (readable or not)."""

    @abstractmethod
    def _try_step(self, n: int, *, deep: bool) -> Step | StepReadError:
        """Step `n`, or why it cannot be trusted; `deep` also checks its data."""

    def step(self, n: int) -> Step:
        """Step `n`; InputError if it is missing or corrupt, UsageError if `n` is no int >= 0
        (a numpy integer is one; a bool, a float or text is not)."""
        n = step_number(n)
        if not self._has_step(n):
            raise InputError(f"{self.location}: no step {n}")
        loaded = self._try_step(n, deep=True)
        if isinstance(loaded, StepReadError):
            raise InputError(f"{self.location}: step {n} is {loaded.kind}: {loaded}")
        return loaded

    @property
    def location(self) -> str:
        """Where the run was opened from, as given: its path, or its URL (fsspec)."""
        return str(self.path)

    @property
    def source(self) -> str:
        """What `open_run` opens this run from in another process (an absolute path here; a
        URL for a run read through fsspec)."""
        return str(self.path.absolute())

    @property
    def unit(self) -> Unit:
        """What one entry of the step arrays is: "token" or "sequence" (the manifest's)."""
        return cast(Unit, self.manifest["unit"])

    @property
    def group_ids(self) -> GroupIds:
        """How the run numbers its prompt groups across ranks (per_rank unless recorded)."""
        return cast(GroupIds, self.manifest.get("group_ids", "per_rank"))

    @property
    def loss_norm(self) -> LossNorm:
        """How the run's ranks normalised their losses (global unless recorded "per_rank")."""
        return cast(LossNorm, self.manifest.get("loss_norm", "global"))

    @property
    def group_size(self) -> int | None:
        """The members of a whole prompt group: the manifest's `meta.num_generations` (as the
        TRL and verl integrations record it), None unless a positive integer."""
        meta = self.manifest.get("meta")
        size = meta.get("num_generations") if isinstance(meta, dict) else None
        return size if type(size) is int and size > 0 else None

    @property
    def policy_spec(self) -> str | None:
        """The spec of the policy the run trained with (the manifest's), None when not known."""
        policy = self.manifest.get("policy") or {}
        spec = policy.get("spec") if isinstance(policy, dict) else None
        return spec if isinstance(spec, str) else None

    @property
    def reward_range(self) -> tuple[float, float] | None:
        """(low, high) of the run's rewards as recorded, None when the run declared none."""
        value = self.manifest.get("reward_range")
        return (float(value[0]), float(value[1])) if value else None

    @property
    def geometry(self) -> dict[str, Any] | None:
        """The manifest's gradient geometry settings (docs/geometry.md), None without."""
        value = self.manifest.get("geometry")
        return value if isinstance(value, dict) else None

    @property
    def size_bytes(self) -> int:
        """Bytes on disk: the archive file, or every file under the run directory."""
        return size_on_disk(self.path)

    def __len__(self) -> int:
        return len(self.step_numbers)

    def __iter__(self) -> Iterator[Step]:
        return self.steps()

    def steps(self, start: int | None = None, stop: int | None = None) -> Iterator[Step]:
        """Steps with start <= step < stop, ascending; a corrupt one is skipped with a warning,
        one that another rank has not written (yet: a live multi-rank run) without one, as
        `step_numbers` leaves it out. Each listed step is read once, checked as it is read (no
        pass over the headers first). UsageError, at the first step, for a bound that is no
        step number."""
        start = None if start is None else step_number(start, "start")
        stop = None if stop is None else step_number(stop, "stop")
        yield from self._steps_skipping(
            (
                n
                for n in self.listed_step_numbers
                if (start is None or n >= start) and (stop is None or n < stop)
            ),
            quiet=("missing_rank",),
        )

    def steps_of(self, numbers: Iterable[int]) -> Iterator[Step]:
        """The steps of these numbers, in their order (e.g. a shard of a listing made
        elsewhere); one missing or corrupt is skipped with a warning. UsageError, as it comes,
        for a number that is no step number (as `step` refuses it)."""
        yield from self._steps_skipping((step_number(n) for n in numbers), quiet=())

    def _steps_skipping(self, numbers: Iterable[int], quiet: tuple[str, ...]) -> Iterator[Step]:
        """Each step of `numbers` read whole; one that cannot be is skipped, with a warning
        unless its kind of failure is in `quiet`."""
        for n in numbers:
            loaded = self._try_step(n, deep=True)
            if isinstance(loaded, StepReadError):
                if loaded.kind not in quiet:
                    warnings.warn(
                        f"{self.location}: skipping step {n}: {loaded.kind}: {loaded}",
                        RunIntegrityWarning,
                        stacklevel=3,
                    )
                continue
            yield loaded

    def step_headers(self) -> Iterator[Step]:
        """Every readable step from its header alone (scalars, fields, counts; no data read),
        each checked as it comes (a caller that stops early reads no more headers)."""
        for n in self.listed_step_numbers:
            loaded = self._try_step(n, deep=False)
            if not isinstance(loaded, StepReadError):
                yield loaded

    def scalar_series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps [S] int64, values [S] float64) of one per-step scalar, from headers only;
        S counts the steps that recorded it."""
        return self.scalar_series_many([name])[name]

    def scalar_series_many(self, names: Iterable[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """`scalar_series` of several scalars in one pass over the headers, each named once
        however often `names` names it. UsageError for a name that is no str, or one name where
        a list of them goes (`scalar_names`)."""
        found = {name: (array("q"), array("d")) for name in scalar_names(names)}
        for step in self.step_headers():
            scalars = step.scalars
            held = scalars.keys() & found.keys() if len(scalars) < len(found) else found
            for name in held:
                if name in scalars:
                    numbers, values = found[name]
                    numbers.append(step.step)
                    values.append(scalars[name])
        return {
            name: (np.array(numbers, dtype=np.int64), np.array(values, dtype=np.float64))
            for name, (numbers, values) in found.items()
        }

    def close(self) -> None:
        """Releases what the run holds open between reads (an archive's file; a directory
        holds none); the run is not read after. Closing twice is harmless."""
        return None

    def __enter__(self: _RunT) -> _RunT:
        """The run itself: the `with` block's end closes it (`close`)."""
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, traceback: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"
