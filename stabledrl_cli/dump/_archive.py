"""A whole run in one HDF5 file: `pack_run` writes it, `ArchiveRun` reads it (same Run API).

Layout (archive format 1.0; every array dataset chunked, gzip with shuffle, Fletcher32):
    attrs: kind = "stabledrl-run", format_version, tool_version, source (the packed path)
    manifest                 the run's manifest.json as one JSON string dataset (an HDF5
                             attribute fails past 64 KiB, a manifest with param_names can be
                             larger)
    integrity                JSON string: the source's integrity findings, carried over
    steps/step               int64 [S]       step numbers, ascending
    steps/num_tokens         int64 [S]       T of each step (also num_sequences,
                             num_scored_tokens)
    scalars/NAME             float64 [S]     one per-step scalar (NaN where not recorded)
    scalars_recorded/NAME    uint8 [S]       1 where the step recorded it (a recorded NaN
                             is a fact, not a gap)
    tokens/step_offsets      int64 [S+1]     step i's tokens are [off[i], off[i+1])
    tokens/NAME              [sum T]         per-token fields, concatenated
    sequences/step_offsets   int64 [S+1]     the same for per-sequence [N] fields
    sequences/NAME           [sum N]
    ragged/NAME/data         flat            fields of other shapes (unit_grad_gram [U, U],
    ragged/NAME/step_offsets int64 [S+1]     unit_grad_sketch [U, k], token_ids [N, k],
    ragged/NAME/shape        int64 [S, ndim] param_grad_norm [P]), each with its own index
    present/NAME             uint8 [S]       1 where the step has the field

Steps are read lazily: indexing a Step reads its slice of one dataset. Fletcher32 checksums
catch corrupt bytes on every read; `integrity` reads every chunk once and reports the steps
that a bad chunk touches, and those steps are skipped with a warning, as a corrupt step file
of a run directory is.

`pack_run` writes to a temporary name beside the target and renames it when complete: a
killed pack leaves no file under the target name (at most a dot-named temporary file).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from stabledrl_cli.dump._integrity import Finding, IntegrityReport, RunIntegrityWarning
from stabledrl_cli.dump._reader import Run, Step, size_on_disk
from stabledrl_cli.dump._schema import (
    FIELDS,
    FORMAT_VERSION,
    RUN_KIND,
    UNITS,
    check_readable_version,
)
from stabledrl_cli.dump._stfile import StepFileError, fsync_dir
from stabledrl_cli.errors import InputError, UsageError

ARCHIVE_VERSION = FORMAT_VERSION
REPLAY_REPORT_KIND = (
    "stabledrl-replay-report"  # replay/report.py writes it; dump/ imports no replay
)
TOKEN_FIELDS = tuple(name for name, spec in FIELDS.items() if spec.per == "token")
SEQUENCE_FIELDS = ("group_id", "reward")  # per-sequence [N]; token_ids [N, k] is ragged
RAGGED_FIELDS = tuple(n for n in FIELDS if n not in TOKEN_FIELDS and n not in SEQUENCE_FIELDS)
STEP_COUNTS = ("num_tokens", "num_sequences", "num_scored_tokens")

# 32 Ki elements (128 KiB of float32) a chunk: small enough that reading one step's slice
# decompresses little, large enough that gzip has something to work with.
_CHUNK_ELEMENTS = 1 << 15
_COMPRESSION = {"compression": "gzip", "compression_opts": 4, "shuffle": True, "fletcher32": True}
# HDF5's default chunk cache (1 MiB a dataset) holds a handful of chunks; steps are read in
# order, so a larger one lets consecutive steps share decompressed chunks (a step's sketch
# slice alone can be a few MiB).
_CHUNK_CACHE_BYTES = 8 << 20


def _decode(value: Any) -> Any:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


# --- reading --------------------------------------------------------------------------------
@dataclass(repr=False)
class ArchiveStep(Step):
    """A Step of a packed run: `step[name]` reads the step's slice of the archive."""

    _archive: ArchiveRun | None = field(default=None, repr=False)
    _index: int = field(default=0, repr=False)
    _loaded: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    """Arrays already read (and checked) when the step was loaded; each is handed out once."""

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.fields:
            raise KeyError(f"step {self.step} has no field {name!r}; it has: {sorted(self.fields)}")
        assert self._archive is not None
        if name in self._loaded:
            return torch.from_numpy(self._loaded.pop(name))
        try:
            return torch.from_numpy(self._archive.read_field(self._index, name))
        except OSError as exc:
            raise InputError(
                f"{self._archive.path}: cannot read {name} of step {self.step}: {exc}"
            ) from None

    def __repr__(self) -> str:
        return f"ArchiveStep(step={self.step}, fields={sorted(self.fields)})"


class ArchiveRun(Run):
    """A run packed by `stabledrl pack` into one HDF5 file (layout in the module docstring)."""

    def __init__(self, path: Path, *, verify: bool = True) -> None:
        self.path = path
        self.verify = verify
        try:
            self._file = h5py.File(path, "r", rdcc_nbytes=_CHUNK_CACHE_BYTES)
        except OSError as exc:
            raise InputError(f"{path}: unreadable HDF5 file ({exc})") from None
        try:
            self._load()
        except InputError:
            self._file.close()
            raise
        except (KeyError, ValueError, TypeError, OSError) as exc:
            self._file.close()
            raise InputError(f"{path}: corrupt run archive ({type(exc).__name__}: {exc})") from None
        self._bad: dict[int, StepFileError] = {}  # step index -> why it cannot be read
        self._verified: set[int] = set()
        self._checked_all = False

    def _load(self) -> None:
        handle, path = self._file, self.path
        kind = _decode(handle.attrs.get("kind"))
        if kind == REPLAY_REPORT_KIND:
            raise InputError(f"{path} is a replay report, not a run (open it with read_hdf5)")
        if kind != RUN_KIND:
            raise InputError(f"{path} is not a run (HDF5 kind {kind!r}, expected {RUN_KIND!r})")
        self.format_version = check_readable_version(
            _decode(handle.attrs.get("format_version")), str(path)
        )
        manifest = json.loads(_decode(handle["manifest"][()]))
        if not isinstance(manifest, dict) or manifest.get("format") != RUN_KIND:
            raise InputError(f"{path}: corrupt run archive (its manifest is not a run manifest)")
        if manifest.get("unit") not in UNITS:
            raise InputError(f"{path}: corrupt run archive (manifest unit)")
        self._manifest = manifest
        self.world_size = int(manifest.get("world_size") or 1)
        self._carried = [Finding(**f) for f in json.loads(_decode(handle["integrity"][()]))]
        self._numbers = handle["steps/step"][()].astype(np.int64)
        self._counts = {name: handle[f"steps/{name}"][()] for name in STEP_COUNTS}
        self._index_of = {int(n): i for i, n in enumerate(self._numbers)}
        self._offsets = {
            group: handle[f"{group}/step_offsets"][()] for group in ("tokens", "sequences")
        }
        self._ragged = {
            name: (handle[f"ragged/{name}/step_offsets"][()], handle[f"ragged/{name}/shape"][()])
            for name in handle.get("ragged", {})
        }
        # Per-step facts stay columns ([S] arrays), turned into a Step's set and dict only when
        # that step is loaded: a long archive costs a few bytes a step, not a dict a step.
        self._present = {
            name: handle[f"present/{name}"][()].astype(bool)
            for name in handle["present"]
            if name in FIELDS
        }
        count = len(self._numbers)
        for name, mask in self._present.items():
            if not mask.any():
                continue
            group = "tokens" if name in TOKEN_FIELDS else "sequences"
            where = f"ragged/{name}/data" if name in RAGGED_FIELDS else f"{group}/{name}"
            if where not in handle or (name in RAGGED_FIELDS and name not in self._ragged):
                raise InputError(f"{path}: corrupt run archive (no dataset {where})")
        recorded = handle.get("scalars_recorded", {})
        self._scalar_values = {
            name: handle[f"scalars/{name}"][()] for name in sorted(handle.get("scalars", {}))
        }
        self._scalar_recorded = {
            name: recorded[name][()].astype(bool) for name in self._scalar_values
        }
        offsets = [*self._offsets.values(), *(o for o, _ in self._ragged.values())]
        per_step = [
            *self._counts.values(),
            *self._present.values(),
            *self._scalar_values.values(),
            *self._scalar_recorded.values(),
        ]
        if any(o.shape != (count + 1,) for o in offsets) or any(
            c.shape != (count,) for c in per_step
        ):
            raise InputError(f"{path}: corrupt run archive (index lengths do not match the steps)")

    def _fields_of(self, index: int) -> set[str]:
        return {name for name, mask in self._present.items() if mask[index]}

    def _scalars_of(self, index: int) -> dict[str, float]:
        return {
            name: float(values[index])
            for name, values in self._scalar_values.items()
            if self._scalar_recorded[name][index]
        }

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    def close(self) -> None:
        self._file.close()

    # -- steps ---------------------------------------------------------------------------------
    def read_field(self, index: int, name: str) -> np.ndarray:
        """Step `index`'s array `name` from the archive (token [T], sequence [N], or ragged)."""
        if name in TOKEN_FIELDS or name in SEQUENCE_FIELDS:
            group = "tokens" if name in TOKEN_FIELDS else "sequences"
            offsets = self._offsets[group]
            return self._file[f"{group}/{name}"][offsets[index] : offsets[index + 1]]
        offsets, shapes = self._ragged[name]
        flat = self._file[f"ragged/{name}/data"][offsets[index] : offsets[index + 1]]
        return flat.reshape(tuple(int(d) for d in shapes[index]))

    def _verify(self, index: int) -> dict[str, np.ndarray]:
        """Reads the step's every field once (Fletcher32 checks each chunk), or marks it bad.

        Returns what it read, so the Step hands those arrays out instead of reading them
        again ({} when the step was checked before)."""
        if index in self._verified or index in self._bad:
            return {}
        try:
            arrays = {name: self.read_field(index, name) for name in sorted(self._fields_of(index))}
        except OSError as exc:
            self._bad[index] = StepFileError("unreadable", f"archive data checksum failed: {exc}")
            return {}
        self._verified.add(index)
        return arrays

    def _try_step(self, n: int, *, deep: bool) -> Step | StepFileError:
        index = self._index_of.get(n)
        if index is None:
            return StepFileError("unreadable", f"no step {n} in the archive")
        loaded = self._verify(index) if deep and self.verify else {}
        if index in self._bad:
            return self._bad[index]
        counts = {name: int(self._counts[name][index]) for name in STEP_COUNTS}
        return ArchiveStep(
            step=n,
            scalars=self._scalars_of(index),
            fields=self._fields_of(index),
            num_tokens=counts["num_tokens"],
            num_sequences=counts["num_sequences"],
            num_scored_tokens=counts["num_scored_tokens"],
            paths=[self.path],
            _headers=[],
            _archive=self,
            _index=index,
            _loaded=loaded,
        )

    @property
    def step_numbers(self) -> list[int]:
        return [int(n) for i, n in enumerate(self._numbers) if i not in self._bad]

    def step(self, n: int) -> Step:
        if n not in self._index_of:
            raise InputError(f"{self.path}: no step {n}")
        loaded = self._try_step(n, deep=True)
        if isinstance(loaded, StepFileError):
            raise InputError(f"{self.path}: step {n} is {loaded.kind}: {loaded}")
        return loaded

    def scalar_series_many(self, names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """From the scalar datasets (no per-step objects)."""
        readable = np.ones(len(self._numbers), dtype=bool)
        readable[list(self._bad)] = False
        result = {}
        for name in names:
            if name not in self._scalar_values:
                result[name] = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))
                continue
            keep = readable & self._scalar_recorded[name]
            result[name] = (
                self._numbers[keep].astype(np.int64),
                self._scalar_values[name][keep].astype(np.float64),
            )
        return result

    # -- integrity -----------------------------------------------------------------------------
    def _check_all_chunks(self) -> list[Finding]:
        """Reads every chunk of every dataset; a bad one marks the steps whose data it holds."""
        findings = []
        datasets: list[tuple[str, h5py.Dataset]] = []
        self._file.visititems(
            lambda name, obj: (
                datasets.append((name, obj)) if isinstance(obj, h5py.Dataset) else None
            )
        )
        for name, dataset in datasets:
            chunks = dataset.iter_chunks() if dataset.chunks else [()]
            for chunk in chunks:
                try:
                    dataset[chunk]
                except OSError as exc:
                    hit = self._steps_of_chunk(name, chunk)
                    for index in hit:
                        self._bad.setdefault(
                            index,
                            StepFileError("unreadable", f"archive data checksum failed: {exc}"),
                        )
                    steps = [int(self._numbers[i]) for i in hit]
                    where = f"steps {steps}" if steps else "run-level data"
                    findings.append(
                        Finding(
                            "unreadable",
                            steps[0] if steps else None,
                            f"{self.path}:{name}",
                            f"archive dataset {name}: a corrupt chunk ({where}): {exc}",
                        )
                    )
        return findings

    def _steps_of_chunk(self, name: str, chunk: tuple[slice, ...]) -> list[int]:
        parts = name.split("/")
        if not chunk or len(parts) < 2 or parts[-1] in ("step_offsets", "shape"):
            return []
        if parts[0] in ("tokens", "sequences"):
            offsets = self._offsets[parts[0]]
        elif parts[0] == "ragged" and parts[-1] == "data":
            offsets = self._ragged[parts[1]][0]
        else:
            return []
        start, stop = chunk[0].start, chunk[0].stop
        return [
            i for i in range(len(self._numbers)) if offsets[i] < stop and offsets[i + 1] > start
        ]

    @property
    def integrity(self) -> IntegrityReport:
        """The source run's findings as packed, plus any corrupt chunk of the archive itself."""
        if not self._checked_all:
            self._archive_findings = self._check_all_chunks()
            self._checked_all = True
        findings = [*self._carried, *self._archive_findings]
        findings.sort(key=lambda f: (f.step if f.step is not None else -1, f.kind))
        return IntegrityReport(findings)


def open_archive(path: Path, *, verify: bool = True) -> Run:
    """An HDF5 file: a packed run, else InputError (a replay report, or another kind)."""
    return ArchiveRun(path, verify=verify)


# --- writing --------------------------------------------------------------------------------
class _Column:
    """A growing 1-D dataset: appended step by step, with fill where a step lacks the field."""

    def __init__(self, group: h5py.Group, name: str, dtype: np.dtype, length: int) -> None:
        self.name = name
        self.dtype = np.dtype(dtype)
        self.dataset = group.create_dataset(
            name,
            shape=(length,),
            maxshape=(None,),
            dtype=self.dtype,
            chunks=(_CHUNK_ELEMENTS,),
            **_COMPRESSION,
        )
        self.length = length

    def append(self, values: np.ndarray | None, count: int) -> None:
        """Writes `values` ([count], or None: leave `count` fill entries) at the end."""
        start, self.length = self.length, self.length + count
        self.dataset.resize((self.length,))
        if values is None or count == 0:
            return
        if values.dtype != self.dtype:
            if not np.can_cast(values.dtype, self.dtype, casting="safe"):
                raise InputError(
                    f"{self.name}: a step stores {values.dtype}, an earlier one {self.dtype}; "
                    "a run archive keeps one dtype a field"
                )
            values = values.astype(self.dtype)
        self.dataset[start : self.length] = values


@dataclass
class _Packer:
    """Per-step bookkeeping of one pack, written as [S] datasets at the end."""

    handle: h5py.File
    numbers: list[int] = field(default_factory=list)
    counts: dict[str, list[int]] = field(default_factory=lambda: {n: [] for n in STEP_COUNTS})
    scalars: list[dict[str, float]] = field(default_factory=list)
    fields: list[set[str]] = field(default_factory=list)
    offsets: dict[str, list[int]] = field(default_factory=lambda: {"tokens": [0], "sequences": [0]})
    columns: dict[str, _Column] = field(default_factory=dict)
    ragged_offsets: dict[str, list[int]] = field(default_factory=dict)
    ragged_shapes: dict[str, list[tuple[int, ...] | None]] = field(default_factory=dict)

    def _column(self, group: str, name: str, dtype: np.dtype, length: int) -> _Column:
        key = f"{group}/{name}"
        if key not in self.columns:
            self.columns[key] = _Column(self.handle.require_group(group), name, dtype, length)
        return self.columns[key]

    def add(self, step: Step, where: str) -> None:
        arrays = {name: step[name].numpy() for name in sorted(step.fields)}
        tokens, sequences = step.num_tokens, step.num_sequences
        for group, names, count in (
            ("tokens", TOKEN_FIELDS, tokens),
            ("sequences", SEQUENCE_FIELDS, sequences),
        ):
            length = self.offsets[group][-1]
            for name in names:
                array = arrays.get(name)
                if array is not None and array.shape != (count,):
                    raise InputError(
                        f"{where}: step {step.step}: {name} has shape {list(array.shape)}, "
                        f"expected [{count}]; cannot pack it"
                    )
                if array is not None:
                    self._column(group, name, array.dtype, length).append(array, count)
                elif f"{group}/{name}" in self.columns:  # an optional field this step lacks
                    self.columns[f"{group}/{name}"].append(None, count)
            self.offsets[group].append(length + count)
        for name in RAGGED_FIELDS:
            array = arrays.get(name)
            if array is None and name not in self.ragged_offsets:
                continue
            if name not in self.ragged_offsets:  # first step with it: earlier steps lack it
                self.ragged_offsets[name] = [0] * (len(self.numbers) + 1)
                self.ragged_shapes[name] = [None] * len(self.numbers)
                self._column(f"ragged/{name}", "data", array.dtype, 0)
            size = 0 if array is None else array.size
            flat = None if array is None else array.reshape(-1)
            self.columns[f"ragged/{name}/data"].append(flat, size)
            self.ragged_offsets[name].append(self.ragged_offsets[name][-1] + size)
            self.ragged_shapes[name].append(None if array is None else array.shape)
        self.numbers.append(step.step)
        for name, value in zip(
            STEP_COUNTS,
            (tokens, sequences, step.num_scored_tokens),
            strict=True,
        ):
            self.counts[name].append(int(value))
        self.scalars.append(dict(step.scalars))
        self.fields.append(set(step.fields))

    def finish(self) -> None:
        handle, count = self.handle, len(self.numbers)
        steps = handle.require_group("steps")
        steps.create_dataset("step", data=np.array(self.numbers, dtype=np.int64))
        for name, values in self.counts.items():
            steps.create_dataset(name, data=np.array(values, dtype=np.int64))
        for group, offsets in self.offsets.items():
            handle.require_group(group).create_dataset(
                "step_offsets", data=np.array(offsets, dtype=np.int64)
            )
        for name, offsets in self.ragged_offsets.items():
            group = handle.require_group(f"ragged/{name}")
            group.create_dataset("step_offsets", data=np.array(offsets, dtype=np.int64))
            shapes = self.ragged_shapes[name]
            ndim = max(len(s) for s in shapes if s is not None)
            table = np.zeros((count, ndim), dtype=np.int64)
            for i, shape in enumerate(shapes):
                if shape is not None:
                    table[i] = shape
            group.create_dataset("shape", data=table)
        present = handle.require_group("present")
        for name in FIELDS:
            flags = np.array([name in f for f in self.fields], dtype=np.uint8)
            if flags.any():
                present.create_dataset(name, data=flags)
        values, recorded = handle.require_group("scalars"), handle.require_group("scalars_recorded")
        for name in sorted(set().union(*self.scalars)):
            values.create_dataset(
                name,
                data=np.array([s.get(name, np.nan) for s in self.scalars], dtype=np.float64),
            )
            recorded.create_dataset(
                name, data=np.array([name in s for s in self.scalars], dtype=np.uint8)
            )


@dataclass(frozen=True, kw_only=True)
class PackSummary:
    """What `pack_run` wrote."""

    source: str
    out: str
    steps: int
    tokens: int
    source_bytes: int
    archive_bytes: int
    findings: list[Finding]

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.source,
            "out": self.out,
            "steps": self.steps,
            "tokens": self.tokens,
            "source_bytes": self.source_bytes,
            "archive_bytes": self.archive_bytes,
            "integrity": IntegrityReport(self.findings).to_dict(),
        }


def _check_target(out: Path, force: bool) -> None:
    if out.is_dir():
        raise UsageError(f"{out} is a directory; give the archive's file name, e.g. {out}/run.h5")
    if not out.parent.is_dir():
        raise UsageError(f"{out}: directory {out.parent} does not exist")
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to overwrite it")


def pack_run(run: Run, out: str | os.PathLike[str], *, force: bool = False) -> PackSummary:
    """Writes `run` (every readable step) into one HDF5 file at `out`, atomically.

    The source's integrity findings (torn, corrupt or temporary step files, gaps) are carried
    into the archive; the steps they name are not packed. UsageError (exit 2) if `out` exists
    and not `force`; the target name is untouched until the archive is complete.
    """
    target = Path(out)
    _check_target(target, force)
    integrity = run.integrity  # full check first, so only trusted steps are packed
    temp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(temp, "w") as handle:
            handle.attrs["kind"] = RUN_KIND
            handle.attrs["format_version"] = ARCHIVE_VERSION
            handle.attrs["tool_version"] = _tool_version()
            handle.attrs["source"] = str(run.path)
            text = json.dumps(run.manifest, indent=2, allow_nan=False)
            handle.create_dataset("manifest", data=text, dtype=h5py.string_dtype())
            findings = json.dumps([f.to_dict() for f in integrity.findings])
            handle.create_dataset("integrity", data=findings, dtype=h5py.string_dtype())
            packer = _Packer(handle)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RunIntegrityWarning)  # already in `integrity`
                for step in run.steps():
                    packer.add(step, str(run.path))
            packer.finish()
            handle.flush()
            os.fsync(_fileno(handle))
        os.replace(temp, target)
        fsync_dir(target.parent)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return PackSummary(
        source=str(run.path),
        out=str(target),
        steps=len(packer.numbers),
        tokens=packer.offsets["tokens"][-1],
        source_bytes=size_on_disk(Path(run.path)),
        archive_bytes=target.stat().st_size,
        findings=list(integrity.findings),
    )


def _fileno(handle: h5py.File) -> int:
    """The OS file descriptor under an h5py file (sec2 driver), for fsync."""
    return int(handle.id.get_vfd_handle())


def _tool_version() -> str:
    from stabledrl_cli import __version__

    return __version__
