"""The abstract run and step: what every reader of a recorded run offers, whatever holds it.

A `Run` (a run directory, or a packed archive) lists its readable steps, hands out a `Step`
per optimizer step, reports its integrity, and derives the rest from those: iteration that
skips an untrustworthy step with a `RunIntegrityWarning`, header-only iteration, per-step
scalar series. A `Step` knows its scalars, fields and counts at once; `step[name]` (a torch
tensor) and `step.array(name)` (numpy) read one array when it is asked for, and the step reads
as a mapping of its fields (`keys()`, iteration, `get`, `in`).
"""

from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod
from array import array
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

import numpy as np

from stabledrl_cli._repr import compact_repr
from stabledrl_cli.dump._arguments import step_number
from stabledrl_cli.dump._integrity import (
    Finding,
    IntegrityReport,
    RunIntegrityWarning,
    StepReadError,
)
from stabledrl_cli.dump._schema import GRAM_KEY, SKETCH_KEY
from stabledrl_cli.dump._stop_notes import manifest_stops
from stabledrl_cli.dump._writer_lock import WriterState
from stabledrl_cli.errors import InputError, UsageError, type_name
from stabledrl_cli.vocab import GroupIds, LossNorm, Unit, UnjoinedGeometry

if TYPE_CHECKING:
    import torch

_Default = TypeVar("_Default")
_RunT = TypeVar("_RunT", bound="Run")


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A step's array as the CPU torch tensor `step[name]` hands out (no copy). torch is
    imported here, at the first array read: listing or inspecting a run's headers, and the
    commands' --help, never load it."""
    import torch

    return torch.from_numpy(array)


def size_on_disk(path: Path) -> int:
    """Bytes of a file, or of every file under a directory (one renamed away meanwhile, e.g. a
    temporary step file of a live run, is skipped)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
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


def omegas_differ(seeds: Iterable[int | None], widths: Iterable[int]) -> UnjoinedGeometry | None:
    """Why the sketches every rank of a step recorded were drawn with two Omegas, so do not
    join: other widths k, else other seeds (None: not recorded, taken as agreeing); None when
    they agree."""
    if len(set(widths)) > 1:
        return "sketch_widths_differ"
    if len({seed for seed in seeds if seed is not None}) > 1:
        return "sketch_seeds_differ"
    return None


def unjoined_kind(
    unjoined: frozenset[str], *, omega: UnjoinedGeometry | None = None
) -> UnjoinedGeometry | None:
    """Why a step's ranks' geometry `unjoined` was left out of the join, None when none was:
    `GRAM_KEY` first (Grams never join), then a sketch of two Omegas (`omega`:
    `omegas_differ` of the ranks' own, or as an archive keeps it), then a sketch some ranks
    did not record."""
    if GRAM_KEY in unjoined:
        return "per_rank_grams"
    if SKETCH_KEY not in unjoined:
        return None
    return omega or "partial_sketches"


@dataclass(eq=False, kw_only=True)
class Step(ABC):
    """One optimizer step, read lazily: `step[name]` -> a CPU torch.Tensor read when indexed
    (token fields [T], sequence fields [N], token_ids [N, k], geometry [U, U] or [U, k]);
    `step.array(name)` -> the same values as a numpy array."""

    step: int
    scalars: dict[str, float]
    fields: set[str]
    num_tokens: int
    num_sequences: int
    num_scored_tokens: int
    """Tokens with mask = 1."""
    unjoined: frozenset[str] = frozenset()
    """Geometry some rank's file holds that the step leaves out, since the ranks' parts do not
    combine: `unit_grad_gram` of a multi-rank step, or a `unit_grad_sketch` not every rank
    recorded."""
    sketch_seeds: tuple[int | None, ...] = ()
    """Each rank's Omega seed of its `unit_grad_sketch` (`_sketch_seed`; None: not recorded),
    in rank order, of a step joined from several ranks' files that each hold a sketch; ()
    otherwise. Seeds that differ leave the sketch out (`unjoined`)."""
    sketch_widths: tuple[int, ...] = ()
    """Each rank's k of its `unit_grad_sketch` [U, k], as `sketch_seeds`: widths that differ
    (two Omegas) leave the sketch out too."""
    sketch_width: int | None = None
    """The k of the step's `unit_grad_sketch` [U, k] (a resumed run's steps may hold another
    k than its manifest's); None when the step holds none."""
    unjoined_why: UnjoinedGeometry | None = None
    """Why `unjoined` was left out (`unjoined_kind`); None when nothing was."""
    rank_sequences: tuple[int, ...] = ()
    """The sequences of each rank's part, in rank order, of a step joined from several ranks'
    files (rank r's are the joined step's next ones, as `seq_id` numbers them); () for a step
    of one file."""

    def __repr__(self) -> str:
        return compact_repr(self)

    @property
    def unknown_fields(self) -> frozenset[str]:
        """Arrays of the step's files that no field of this format version names (a newer
        minor version's fields): never read, so never packed either."""
        return frozenset()

    def __contains__(self, name: object) -> bool:
        return name in self.fields

    def keys(self) -> list[str]:
        """The step's fields, sorted: with `step[name]`, `dict(step)` reads every array."""
        return sorted(self.fields)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    @property
    def is_scalar(self) -> bool:
        """Whether the step has no policy batch (format 1.2): only scalars, and perhaps
        param_grad_norm. Replay has nothing to replay on such a step."""
        return "logp" not in self.fields

    @overload
    def get(self, name: str) -> torch.Tensor | None: ...

    @overload
    def get(self, name: str, default: _Default) -> torch.Tensor | _Default: ...

    def get(self, name: str, default: object = None) -> object:
        """`step[name]`, or `default` when the step did not record the field."""
        return self[name] if name in self.fields else default

    def __getitem__(self, name: str) -> torch.Tensor:
        return as_tensor(self.array(name))

    def array(self, name: str) -> np.ndarray:
        """`step[name]` as the numpy array it is read into (no torch): KeyError for a field the
        step did not record (saying so of one of its scalars), InputError if it cannot be read."""
        if name not in self.fields:
            scalar = name in self.scalars
            where = f"; {name!r} is a scalar: step.scalars[{name!r}]" if scalar else ""
            raise KeyError(
                f"step {self.step} has no field {name!r}; it has: {sorted(self.fields)}{where}"
            )
        return self._read(name)

    @abstractmethod
    def _read(self, name: str) -> np.ndarray:
        """The array `name` (a field of this step); InputError if it cannot be read."""


class Run(ABC):
    """A recorded run: a directory or an HDF5 archive, behind the same API."""

    path: Path
    verify: bool = True
    """Whether a step's data checksum is checked when its arrays are read."""

    @property
    @abstractmethod
    def manifest(self) -> dict[str, Any]:
        """The run's manifest (fields in `stabledrl_cli.dump._schema`)."""

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
        policy = self.manifest.get("policy") or {}
        spec = policy.get("spec") if isinstance(policy, dict) else None
        return spec if isinstance(spec, str) else None

    @property
    def reward_range(self) -> tuple[float, float] | None:
        value = self.manifest.get("reward_range")
        return (float(value[0]), float(value[1])) if value else None

    @property
    def geometry(self) -> dict[str, Any] | None:
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
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, traceback: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"
