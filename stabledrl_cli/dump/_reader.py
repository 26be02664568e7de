"""`open_run`: a lazy reader of a recorded run, with an integrity report.

A directory run is read with safetensors' `safe_open`, one file at a time. Every access lists
the directory again, so a run that is still being written grows under the reader; files under
a temporary name are in flight (or left by a killed writer) and never read. A step file is
checked before use: its header (parse, size, header CRC) whenever it is listed, its data CRC
when its arrays are read (`verify=True`, the default). A torn or corrupt file is reported in
`run.integrity` and skipped with a `RunIntegrityWarning`, never a crash.

Multi-rank runs (world_size > 1): a Step joins the ranks' files in rank order. Token arrays
and per-sequence arrays are concatenated; `seq_id` of rank r is offset by the number of
sequences of ranks < r, and `group_id` by (max group_id + 1) of ranks < r, so ids stay
unique. `unit_grad_sketch` rows are concatenated (float16 parts are scaled to float32 first);
`unit_grad_gram` is left out (the cross-rank entries were never recorded); `param_grad_norm`
is rank 0's. Scalars: `nonfinite` is summed, `reward_mean` weighted by sequences, `loss`
averaged over ranks, the rest taken from rank 0.
"""

from __future__ import annotations

import json
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from stabledrl_cli.dump._integrity import (
    Finding,
    IntegrityReport,
    RunIntegrityWarning,
    gap_findings,
)
from stabledrl_cli.dump._schema import (
    FIELDS,
    MANIFEST_NAME,
    META_FORMAT,
    META_NUM_SEQUENCES,
    META_NUM_TOKENS,
    META_SCORED_TOKENS,
    RUN_KIND,
    STEP_FILE_RE,
    STEPS_DIR,
    TEMP_FILE_RE,
    check_manifest,
    check_readable_version,
)
from stabledrl_cli.dump._stfile import StepFileError, read_header
from stabledrl_cli.errors import InputError

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


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


def _parse_scalars(metadata: dict[str, str]) -> dict[str, float]:
    scalars = {}
    for name, text in sorted(metadata.items()):
        if name.startswith("_"):
            continue
        try:
            scalars[name] = float(text)
        except ValueError:
            continue  # a newer minor's non-numeric metadata: ignored
    return scalars


def _merge_scalars(parts: list[dict[str, float]], sequences: list[int]) -> dict[str, float]:
    """Joins the ranks' scalars of one step (rule in the module docstring)."""
    merged = dict(parts[0])
    merged.pop("unit_grad_sketch_scale", None)  # joined sketches are float32
    if all("nonfinite" in p for p in parts):
        merged["nonfinite"] = float(sum(p["nonfinite"] for p in parts))
    if all("loss" in p for p in parts):
        merged["loss"] = float(np.mean([p["loss"] for p in parts]))
    if all("reward_mean" in p for p in parts) and sum(sequences) > 0:
        weighted = sum(p["reward_mean"] * n for p, n in zip(parts, sequences, strict=True))
        merged["reward_mean"] = float(weighted / sum(sequences))
    return merged


@dataclass(frozen=True, slots=True)
class _HeaderRecord:
    """What a step's Step is built from, kept per checked file instead of its parsed header
    (a few hundred bytes, not a few KB): names are shared by files of the same layout."""

    fields: frozenset[str]
    """The file's tensors that are schema fields."""
    scalar_names: tuple[str, ...]
    scalar_values: tuple[float, ...]
    num_tokens: int
    num_sequences: int
    num_scored_tokens: int

    @property
    def scalars(self) -> dict[str, float]:
        return dict(zip(self.scalar_names, self.scalar_values, strict=True))


@dataclass(slots=True)
class _Checked:
    """A step file's last check: its stat key, whether its data CRC was checked, and what it
    gave (a record, or the (kind, message) of its StepFileError: the exception itself is not
    kept, since its traceback would hold the checking frames)."""

    key: tuple[int, int, int]
    deep: bool
    outcome: _HeaderRecord | tuple[str, str]


@dataclass
class Step:
    """One optimizer step, read lazily: arrays come from the file when indexed.

    `step[name]` -> torch.Tensor on the CPU (token fields [T], sequence fields [N]).
    """

    step: int
    scalars: dict[str, float]
    fields: set[str]
    num_tokens: int
    num_sequences: int
    num_scored_tokens: int
    """Tokens with mask = 1."""
    paths: list[Path] = field(repr=False)
    _headers: list[_HeaderRecord] = field(repr=False)
    """Per rank, what its file's header says (empty for an archive step)."""

    def __contains__(self, name: object) -> bool:
        return name in self.fields

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self.fields else default

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.fields:
            raise KeyError(f"step {self.step} has no field {name!r}; it has: {sorted(self.fields)}")
        if len(self.paths) == 1:
            return self._read(0, name)
        return self._joined(name)

    def _read(self, rank: int, name: str) -> torch.Tensor:
        try:
            with safe_open(str(self.paths[rank]), framework="pt") as handle:
                return handle.get_tensor(name)
        except Exception as exc:
            raise InputError(f"{self.paths[rank]}: cannot read {name}: {exc}") from None

    def _joined(self, name: str) -> torch.Tensor:
        if name == "param_grad_norm":
            return self._read(0, name)
        parts = [self._read(rank, name) for rank in range(len(self.paths))]
        if name == "seq_id":
            offsets = np.cumsum([0] + [h.num_sequences for h in self._headers])
            parts = [p + int(offsets[r]) for r, p in enumerate(parts)]
        elif name == "group_id":
            sizes = [int(p.max()) + 1 if p.numel() else 0 for p in parts]
            offsets = np.cumsum([0, *sizes])
            parts = [p + int(offsets[r]) for r, p in enumerate(parts)]
        elif name == "unit_grad_sketch" and any(p.dtype == torch.float16 for p in parts):
            parts = [
                p.float() * h.scalars.get("unit_grad_sketch_scale", 1.0)
                if p.dtype == torch.float16
                else p
                for p, h in zip(parts, self._headers, strict=True)
            ]
        return torch.cat(parts)


class Run(ABC):
    """A recorded run: a directory now, an HDF5 archive later, behind the same API."""

    path: Path

    @property
    @abstractmethod
    def manifest(self) -> dict[str, Any]: ...

    @property
    @abstractmethod
    def step_numbers(self) -> list[int]:
        """Readable steps, ascending (checked as of now: a live run grows)."""

    @abstractmethod
    def step(self, n: int) -> Step:
        """Step `n`; InputError if it is missing or corrupt."""

    @property
    @abstractmethod
    def integrity(self) -> IntegrityReport: ...

    @abstractmethod
    def _try_step(self, n: int, *, deep: bool) -> Step | StepFileError: ...

    @property
    def unit(self) -> str:
        return self.manifest["unit"]

    @property
    def policy_spec(self) -> str | None:
        policy = self.manifest.get("policy") or {}
        return policy.get("spec") if isinstance(policy, dict) else None

    @property
    def reward_range(self) -> tuple[float, float] | None:
        value = self.manifest.get("reward_range")
        return (float(value[0]), float(value[1])) if value else None

    @property
    def geometry(self) -> dict[str, Any] | None:
        return self.manifest.get("geometry")

    @property
    def size_bytes(self) -> int:
        """Bytes on disk: the archive file, or every file under the run directory."""
        return size_on_disk(self.path)

    def __len__(self) -> int:
        return len(self.step_numbers)

    def __iter__(self) -> Iterator[Step]:
        return self.steps()

    def steps(self, start: int | None = None, stop: int | None = None) -> Iterator[Step]:
        """Steps with start <= step < stop, ascending; a corrupt one is skipped with a warning."""
        for n in self.step_numbers:
            if (start is not None and n < start) or (stop is not None and n >= stop):
                continue
            loaded = self._try_step(n, deep=True)
            if isinstance(loaded, StepFileError):
                warnings.warn(
                    f"skipping step {n}: {loaded.kind}: {loaded}", RunIntegrityWarning, stacklevel=2
                )
                continue
            yield loaded

    def step_headers(self) -> Iterator[Step]:
        """Every readable step from its header alone (scalars, fields, counts; no data read)."""
        for n in self.step_numbers:
            loaded = self._try_step(n, deep=False)
            if not isinstance(loaded, StepFileError):
                yield loaded

    def scalar_series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps [S] int64, values [S] float64) of one per-step scalar, from headers only;
        S counts the steps that recorded it."""
        return self.scalar_series_many([name])[name]

    def scalar_series_many(self, names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """`scalar_series` of several scalars in one pass over the headers."""
        pairs: dict[str, list[tuple[int, float]]] = {name: [] for name in names}
        for step in self.step_headers():
            for name in names:
                if name in step.scalars:
                    pairs[name].append((step.step, step.scalars[name]))
        return {
            name: (
                np.array([p[0] for p in found], dtype=np.int64),
                np.array([p[1] for p in found], dtype=np.float64),
            )
            for name, found in pairs.items()
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


@dataclass
class _Listing:
    finals: dict[int, dict[int, Path]] = field(default_factory=dict)
    temps: list[tuple[int, Path]] = field(default_factory=list)
    unknown: list[Path] = field(default_factory=list)


class DirectoryRun(Run):
    """A run directory written by `Recorder` (format v1)."""

    def __init__(self, path: Path, *, verify: bool = True) -> None:
        self.path = path
        self.verify = verify
        manifest_path = path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise InputError(f"{path} is not a run: it has no {MANIFEST_NAME}")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{manifest_path}: unreadable manifest ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != RUN_KIND:
            raise InputError(f"{path} is not a run: {MANIFEST_NAME} is not a {RUN_KIND} manifest")
        self.format_version = check_manifest(manifest, str(manifest_path))
        self._manifest = manifest
        self.world_size: int = manifest["world_size"]
        # file name -> its last check: an unchanged file is checked once (its data CRC once more
        # when its arrays are first read). One small record a step: a long run reads in bounded
        # memory.
        self._checked: dict[str, _Checked] = {}
        self._shared: dict[Any, Any] = {}  # field and scalar name tuples, one per layout
        self._listing = _Listing()

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    def _scan(self) -> _Listing:
        self._listing = listing = _Listing()
        steps_dir = self.path / STEPS_DIR
        try:
            names = sorted(os.listdir(steps_dir))
        except FileNotFoundError:
            return listing
        for name in names:
            final, temp = STEP_FILE_RE.match(name), TEMP_FILE_RE.match(name)
            match = final or temp
            ranked = match is not None and match.group(2) is not None
            if match is None or ranked != (self.world_size > 1):
                listing.unknown.append(steps_dir / name)
                continue
            step, rank = int(match.group(1)), int(match.group(2) or 0)
            if temp is not None:
                listing.temps.append((step, steps_dir / name))
            elif rank >= self.world_size:
                listing.unknown.append(steps_dir / name)
            else:
                listing.finals.setdefault(step, {})[rank] = steps_dir / name
        return listing

    def _record(self, metadata: dict[str, str], tensors: dict[str, Any]) -> _HeaderRecord:
        scalars = _parse_scalars(metadata)
        names = tuple(scalars)
        fields = frozenset(name for name in tensors if name in FIELDS)
        return _HeaderRecord(
            fields=self._shared.setdefault(fields, fields),
            scalar_names=self._shared.setdefault(names, names),
            scalar_values=tuple(scalars.values()),
            num_tokens=int(metadata.get(META_NUM_TOKENS, 0)),
            num_sequences=int(metadata.get(META_NUM_SEQUENCES, 0)),
            num_scored_tokens=int(metadata.get(META_SCORED_TOKENS, 0)),
        )

    def _check(self, path: Path, *, deep: bool) -> _HeaderRecord:
        try:
            st = path.stat()
        except OSError as exc:
            raise StepFileError("unreadable", f"cannot stat: {exc.strerror or exc}") from None
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._checked.get(path.name)
        if cached is not None and cached.key == key:
            if isinstance(cached.outcome, tuple):
                raise StepFileError(*cached.outcome)
            if cached.deep or not deep:
                return cached.outcome
        try:
            header = read_header(path, deep=deep)
            version = header.metadata.get(META_FORMAT, "")
            try:
                check_readable_version(version, path.name)
            except InputError as exc:
                raise StepFileError("unreadable", str(exc)) from None
            record = self._record(header.metadata, header.tensors)
        except StepFileError as exc:
            self._checked[path.name] = _Checked(key, True, (exc.kind, str(exc)))
            raise
        except ValueError as exc:  # a count that is not an integer
            self._checked[path.name] = _Checked(key, True, ("unreadable", f"bad count: {exc}"))
            raise StepFileError("unreadable", f"bad count: {exc}") from None
        self._checked[path.name] = _Checked(key, deep, record)
        return record

    def _records(self, ranks: dict[int, Path], *, deep: bool) -> list[_HeaderRecord]:
        """Every rank's record, in rank order; StepFileError for a missing or bad file."""
        missing = [r for r in range(self.world_size) if r not in ranks]
        if missing:
            raise StepFileError("missing_rank", f"no file for rank(s) {missing}")
        return [self._check(ranks[r], deep=deep and self.verify) for r in range(self.world_size)]

    def _try_step(
        self, n: int, *, deep: bool, ranks: dict[int, Path] | None = None
    ) -> Step | StepFileError:
        if ranks is None:
            # The listing that produced `n` (step_numbers lists before each pass), else a fresh one.
            ranks = self._listing.finals.get(n) or self._scan().finals.get(n, {})
        try:
            records = self._records(ranks, deep=deep)
        except StepFileError as exc:
            return exc
        fields = set(records[0].fields).intersection(*(r.fields for r in records[1:]))
        if len(records) > 1:
            fields.discard("unit_grad_gram")
        sequences = [r.num_sequences for r in records]
        scalars = [r.scalars for r in records]
        return Step(
            step=n,
            scalars=scalars[0] if len(records) == 1 else _merge_scalars(scalars, sequences),
            fields=fields,
            num_tokens=sum(r.num_tokens for r in records),
            num_sequences=sum(sequences),
            num_scored_tokens=sum(r.num_scored_tokens for r in records),
            paths=[ranks[r] for r in range(self.world_size)],
            _headers=records,
        )

    @property
    def step_numbers(self) -> list[int]:
        listing = self._scan()
        numbers = []
        for n in sorted(listing.finals):
            try:
                self._records(listing.finals[n], deep=False)
            except StepFileError:
                continue
            numbers.append(n)
        return numbers

    def step(self, n: int) -> Step:
        if n not in self._listing.finals and n not in self._scan().finals:
            raise InputError(f"{self.path}: no step {n}")
        loaded = self._try_step(n, deep=True)
        if isinstance(loaded, StepFileError):
            raise InputError(f"{self.path}: step {n} is {loaded.kind}: {loaded}")
        return loaded

    @property
    def integrity(self) -> IntegrityReport:
        """Every step file checked in full (data CRC), temporary and stray files, gaps."""
        listing = self._scan()
        findings: list[Finding] = []
        for n, ranks in sorted(listing.finals.items()):
            missing = [r for r in range(self.world_size) if r not in ranks]
            if missing:
                findings.append(
                    Finding("missing_rank", n, None, f"step {n}: no file for rank(s) {missing}")
                )
            for path in ranks.values():
                try:
                    self._check(path, deep=True)
                except StepFileError as exc:
                    findings.append(Finding(exc.kind, n, str(path), f"step {n}: {exc.kind}: {exc}"))
        for n, path in listing.temps:
            findings.append(
                Finding(
                    "temporary",
                    n,
                    str(path),
                    f"step {n}: temporary file {path.name} (in flight, or left by a killed writer)",
                )
            )
        for path in listing.unknown:
            findings.append(
                Finding(
                    "unknown_file", None, str(path), f"not a step file of this run: {path.name}"
                )
            )
        # Steps with any file (even a bad or temporary one) are reported as such, not as gaps.
        findings.extend(gap_findings(sorted(set(listing.finals) | {n for n, _ in listing.temps})))
        findings.sort(key=lambda f: (f.step if f.step is not None else -1, f.kind))
        return IntegrityReport(findings)


def _open_archive(path: Path, *, verify: bool) -> Run:
    """An HDF5 file: a run packed by `stabledrl pack`, else InputError (e.g. a replay report)."""
    from stabledrl_cli.dump._archive import open_archive  # imports this module

    return open_archive(path, verify=verify)


def open_run(path: str | os.PathLike[str], *, verify: bool = True) -> Run:
    """Opens a run directory or a packed .h5 archive (`stabledrl pack`) for lazy reading.

    Raises InputError (exit 3) for a missing path, a non-run, or a newer major format version.
    `verify=False` skips the data checksum when arrays are read (headers are always checked).
    """
    run_path = Path(path)
    if not run_path.exists():
        raise InputError(f"no such run: {run_path}")
    if run_path.is_dir():
        return DirectoryRun(run_path, verify=verify)
    try:
        with open(run_path, "rb") as fh:
            signature = fh.read(len(_HDF5_SIGNATURE))
    except OSError as exc:
        raise InputError(f"cannot read {run_path}: {exc.strerror or exc}") from None
    if signature == _HDF5_SIGNATURE:
        archive = _open_archive(run_path, verify=verify)
        check_manifest(archive.manifest, f"{run_path} (manifest)")
        return archive
    raise InputError(f"{run_path} is not a run (expected a run directory or a .h5 archive)")
