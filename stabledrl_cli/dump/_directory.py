"""A run directory read lazily: `DirectoryRun` and its `DirectoryStep`.

Every access lists the directory again (or reuses the last listing while the directory is
unchanged), so a run that is still being written grows under the reader; files under a
temporary name are in flight (or left by a killed writer) and never read.
A step file is checked before use: its header (parse, size, header CRC) whenever it is listed,
its data CRC when its step is loaded (`verify=True`, the default). Loading a step reads its
file whole in one read (header, data, CRC); its arrays are then views of that buffer (a file
whose check was cached is read whole at the first array asked for). A torn or corrupt file is
reported in `run.integrity` and skipped with a `RunIntegrityWarning`, never a crash.

Multi-rank runs (world_size > 1): a step joins the ranks' files in rank order. Token arrays and
per-sequence arrays are concatenated; `seq_id` of rank r is offset by the number of sequences
of ranks < r, and `micro_batch` by (max micro_batch + 1) of ranks < r, so both stay distinct.
`group_id` is offset the same way when the manifest's group_ids is "per_rank" (the default),
and left alone when it is "global" (ids shared by all ranks). An offset id outside its rank's
range (a negative one, a seq_id past the rank's sequences) would be another rank's: InputError.
With global ids, a group the ranks marked `group_split` is whole in the joined step when it
holds as many members as the trainer generated for each prompt (the manifest's
`meta.num_generations`): the join clears its mark.
`unit_grad_sketch` rows are concatenated (float16 parts are scaled to float32 first); a
`token_ids` [N, k] whose k differs between ranks cannot be joined (InputError);
`unit_grad_gram` is left out (the cross-rank entries were never recorded), and so is a
`unit_grad_sketch` some ranks did not record (a sketch of part of the step), or recorded with
another seed (`_sketch_seed`) or width k (another Omega); `param_grad_norm`
is rank 0's. Scalars: `nonfinite` sums the ranks' non-finite batch entries, plus the joined
`loss` and `grad_norm` if not finite (one each, not one a rank), `reward_mean` weighted by the
rewards each rank's mean is over (`_scored_rewards`: those not NaN; a file without the count,
no `reward` or an older recorder's, by its sequences; a rank's NaN mean, none of its rewards
scored, left out, as a rank's part with no sequence, which has no mean, and a rank that logged
none), `reward_count` summed over the ranks (a rank that logged none, where another did: the
rewards its mean in the join is over), `loss` averaged over the ranks
that logged one and, in a batch, those of an empty part that logged none (its loss 0: the
all-reduce averages its zero gradient in), `loss_aux` over the same ranks (0 where one logged
none), any other scalar the lowest rank's that logged it (rank 0's when it did: a grad_norm is
every rank's after the all-reduce). A step where some rank recorded no batch (a scalar step,
format 1.2) joins as a scalar step: a batch with a rank missing is not the step's batch; so
does one where no rank's batch holds a token (each part empty), which one rank's file could
not be. A joined batch keeps each rank's number of sequences (`rank_sequences`), for a replay
that normalises each rank's part alone (`loss_norm`).
"""

from __future__ import annotations

import math
import os
import stat
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from stabledrl_cli._json import parse_strict
from stabledrl_cli._regular import NotRegularFile, open_regular
from stabledrl_cli.dump._integrity import Finding, IntegrityReport, StepReadError, gap_findings
from stabledrl_cli.dump._run import Run, Step, omegas_differ, unjoined_kind
from stabledrl_cli.dump._schema import (
    BATCH_FIELDS,
    FIELDS,
    GRAM_KEY,
    LOSS_AUX,
    MANIFEST_LIMIT,
    MANIFEST_NAME,
    META_FORMAT,
    META_NUM_SEQUENCES,
    META_NUM_TOKENS,
    META_RANK,
    META_SCORED_REWARDS,
    META_SCORED_TOKENS,
    META_SKETCH_SEED,
    META_WORLD_SIZE,
    OS_FILE_RE,
    REWARD_COUNT,
    RUN_ID,
    SCALAR_STEP_VERSION,
    SEQUENCE_LIMIT,
    SKETCH_KEY,
    STEP_FILE_RE,
    STEP_LIMIT,
    STEPS_DIR,
    STOP_NOTE_LIMIT,
    STOP_NOTE_RE,
    STOP_NOTE_SHAPE,
    TEMP_FILE_RE,
    TEMP_STOP_NOTE_RE,
    WRITER_LOCK_RE,
    canonical_step,
    check_manifest,
    check_readable_version,
    is_stop_note,
    manifest_stops,
    nonfinite_norms,
    parse_manifest,
    stops_by_rank,
)
from stabledrl_cli.dump._stfile import FileKey, StepHeader, file_key, read_header
from stabledrl_cli.dump._writer_lock import WriterState, writer_states
from stabledrl_cli.errors import InputError
from stabledrl_cli.spec import spec_float, spec_int
from stabledrl_cli.vocab import GroupIds


def _parse_scalars(metadata: dict[str, str]) -> dict[str, float]:
    scalars = {}
    for name, text in sorted(metadata.items()):
        if name.startswith("_"):
            continue
        try:  # as the writer spells a float (repr): not float()'s '1_0', ' 0.5' or other digits
            scalars[name] = spec_float(text)
        except ValueError:
            continue  # a newer minor's non-numeric metadata: ignored
    return scalars


def _merge_scalars(
    parts: list[dict[str, float]], weights: list[int], sequences: list[int]
) -> dict[str, float]:
    """Joins the ranks' scalars of one step, `weights` each rank's count for its reward_mean,
    `sequences` each rank's part's (all 0 for a scalar step) (rule in the module docstring)."""
    names = sorted(set().union(*parts))  # each scalar the lowest rank's that logged it
    merged = {name: next(p[name] for p in parts if name in p) for name in names}
    merged.pop("unit_grad_sketch_scale", None)  # joined sketches are float32
    logged = [p for p in parts if "loss" in p]
    if logged:
        # an empty part's rank adds a zero gradient to the all-reduce's mean: a loss of 0
        idle = sum(1 for p, n in zip(parts, sequences, strict=True) if n == 0 and "loss" not in p)
        zeros = [0.0] * idle if any(sequences) else []
        merged["loss"] = float(np.mean([p["loss"] for p in logged] + zeros))
        if any(LOSS_AUX in p for p in logged):  # the loss's part outside the policy, alike
            merged[LOSS_AUX] = float(np.mean([p.get(LOSS_AUX, 0.0) for p in logged] + zeros))
    if all("nonfinite" in p for p in parts):
        # each rank's count holds its own loss and grad_norm; the joined step holds one of each
        entries = sum(p["nonfinite"] - nonfinite_norms(p) for p in parts)
        merged["nonfinite"] = float(entries + nonfinite_norms(merged))
    # a rank whose mean is NaN, or with none over no reward (an empty part), scored none of
    # its sequences: the others' mean stands, as it does for a rank that logged none
    given = [
        p.get("reward_mean", math.nan if n == 0 else None)
        for p, n in zip(parts, weights, strict=True)
    ]
    scored = [(m, n) for m, n in zip(given, weights, strict=True) if m is not None]
    if scored and sum(weights) > 0:
        kept = [(m, n) for m, n in scored if not math.isnan(m)]
        total = sum(n for _, n in kept)
        merged["reward_mean"] = (
            float(sum(mean * n for mean, n in kept) / total) if total > 0 else math.nan
        )
    if any(REWARD_COUNT in p for p in parts):  # the rewards the joined mean is over
        merged[REWARD_COUNT] = float(
            sum(
                p.get(REWARD_COUNT, n if m is not None and not math.isnan(m) else 0)
                for p, m, n in zip(parts, given, weights, strict=True)
            )
        )
    return merged


_STORED_DTYPES = {"float32": "F32", "float16": "F16", "uint8": "U8", "int32": "I32", "int64": "I64"}


def _count(metadata: dict[str, str], key: str) -> int:
    try:  # ASCII digits, as the writer spells a count: not int()'s '1_0' or other digits
        value = spec_int(metadata.get(key, "0"))
    except ValueError:
        raise StepReadError("unreadable", f"{key} is not an integer") from None
    if value < 0:
        raise StepReadError("unreadable", f"{key} is negative")
    return value


def _check_fields(header: StepHeader, tokens: int, sequences: int, *, scalar: bool) -> None:
    """Every schema field has its dtype and a shape that agrees with the step's counts, and
    the required fields are there (none for a scalar step); else StepReadError (the step is
    skipped, not the run)."""
    for name, spec in FIELDS.items():
        if name not in header.tensors:
            if spec.required and not scalar:
                raise StepReadError("unreadable", f"required field {name} is missing")
            continue
        dtype, shape = header.tensors[name]
        allowed = {_STORED_DTYPES[d] for d in spec.dtypes}
        if dtype not in allowed:
            raise StepReadError("unreadable", f"{name}: dtype {dtype}, expected {spec.dtype}")
        counts = {"tokens": (tokens,), "sequences": (sequences,), "units": (tokens, sequences)}
        expected = [None if dim is None else counts[dim] for dim in spec.dims]
        if (
            len(shape) != len(expected)
            or any(
                want is not None and got not in want
                for got, want in zip(shape, expected, strict=True)
            )
            or (spec.per == "unit_pairs" and shape[0] != shape[1])
        ):
            raise StepReadError(
                "unreadable",
                f"{name}: shape {list(shape)} disagrees with the step's {tokens} tokens and "
                f"{sequences} sequences",
            )


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
    num_scored_rewards: int | None = None
    """`_scored_rewards`; None for a file without it."""
    unknown_fields: frozenset[str] = frozenset()
    """The file's tensors that are no schema field (a newer minor version's)."""
    sketch_seed: int | None = None
    """`_sketch_seed`: the Omega seed of the file's sketch; None when it records none."""
    sketch_width: int | None = None
    """The k of the file's `unit_grad_sketch` [U, k]; None without one."""

    @property
    def scalars(self) -> dict[str, float]:
        return dict(zip(self.scalar_names, self.scalar_values, strict=True))

    @property
    def reward_weight(self) -> int:
        """The weight of its reward_mean in a join: the rewards the mean is over, else (no
        count recorded) the sequences."""
        if self.num_scored_rewards is None:
            return self.num_sequences
        return self.num_scored_rewards


@dataclass(slots=True)
class _Checked:
    """A step file's last check: its stat key, whether its data CRC was checked, and what it
    gave (a record, or the (kind, message) of its StepReadError: the exception itself is not
    kept, since its traceback would hold the checking frames)."""

    key: FileKey
    deep: bool
    outcome: _HeaderRecord | tuple[str, str]
    header_crc: int = 0
    """`StepHeader.header_crc` of the checked header (a later full read skips its checks)."""


@dataclass(frozen=True)
class _DirectoryChecks:
    """`DirectoryRun.checks`: each step file's last check, by file name."""

    files: dict[str, _Checked]


@dataclass(eq=False, kw_only=True, repr=False)  # Step's repr
class DirectoryStep(Step):
    """A Step of a run directory: `step[name]` reads the rank files (joined, module docstring)."""

    paths: list[Path] = field(repr=False)
    """One file per rank, in rank order."""
    records: list[_HeaderRecord] = field(repr=False)
    """Per rank, what its file's header says."""
    file_keys: list[FileKey] = field(repr=False)
    """Per rank, the key of the file its record was checked from."""
    header_crcs: list[int] = field(repr=False)
    """Per rank, the CRC of the header bytes checked (a later read of the file skips its
    checks when they are the same bytes)."""
    files: list[StepHeader | None] = field(repr=False)
    """Per rank, the file's header and data buffer once read (None until then)."""
    loader: Callable[[Path, int], StepHeader] = field(repr=False)
    """(file, its header CRC) -> the file read whole: `DirectoryRun._load` of the run."""
    named: Callable[[Path], str] = field(default=str, repr=False)
    """How messages name a file: `DirectoryRun.named` of the run."""
    group_ids: GroupIds = field(default="per_rank", repr=False)
    group_size: int | None = field(default=None, repr=False)
    """The members of a whole prompt group (`Run.group_size`), for a join of global ids."""
    handed: set[tuple[int, str]] = field(default_factory=set, repr=False)
    """(rank, name) of the arrays handed out as views of the rank's buffer; asking for one
    again reads the file anew (a caller may have changed the first in place)."""

    @property
    def unknown_fields(self) -> frozenset[str]:
        return frozenset().union(*(record.unknown_fields for record in self.records))

    def _read(self, name: str) -> np.ndarray:
        if len(self.paths) == 1:
            return self._read_rank(0, name)
        joined = self._joined(name)
        if name == "group_split" and self.group_ids == "global" and self.group_size:
            return self._whole_groups_cleared(joined)
        return joined

    def _whole_groups_cleared(self, split: np.ndarray) -> np.ndarray:
        """`split` with the marks of the groups whose `group_size` members are all here
        cleared: the ranks each held part of them, the joined step holds them whole."""
        if "group_id" not in self.fields:
            return split
        # global ids join as they are: read without handing them out (no file read again)
        ids = np.concatenate([self._rank_array(r, "group_id") for r in range(len(self.paths))])
        _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
        whole = counts[inverse.reshape(-1)] == self.group_size
        cleared: np.ndarray = np.where(whole, 0, split).astype(split.dtype)
        return cleared

    def _file(self, rank: int) -> StepHeader:
        """The rank's file read whole: the one the record was checked from."""
        loaded = self.files[rank]
        if loaded is None:
            path = self.paths[rank]
            try:
                loaded = self.loader(path, self.header_crcs[rank])
            except StepReadError as exc:
                raise InputError(f"{self.named(path)}: cannot read it: {exc}") from None
            if loaded.key != self.file_keys[rank] or loaded.header_crc != self.header_crcs[rank]:
                raise InputError(
                    f"{self.named(path)}: changed since it was checked; open the run again"
                )
            self.files[rank] = loaded
        return loaded

    def _read_rank(self, rank: int, name: str) -> np.ndarray:
        if (rank, name) in self.handed:
            self.files[rank] = None
            self.handed = {(r, n) for r, n in self.handed if r != rank}
        self.handed.add((rank, name))
        return self._rank_array(rank, name)

    def _rank_array(self, rank: int, name: str) -> np.ndarray:
        """The rank's array, a view of its file's buffer."""
        try:
            return self._file(rank).array(name)
        except ValueError as exc:  # offsets past the buffer: the file is not what was checked
            raise InputError(f"{self.named(self.paths[rank])}: cannot read {name}: {exc}") from None

    def _joined(self, name: str) -> np.ndarray:
        if name == "param_grad_norm":
            return self._read_rank(0, name)
        parts = [self._read_rank(rank, name) for rank in range(len(self.paths))]
        if name == "seq_id":
            sequences = [r.num_sequences for r in self.records]
            offsets = np.cumsum([0, *sequences])
            parts = [
                self._shifted(p, int(offsets[r]), name, r, sequences[r])
                for r, p in enumerate(parts)
            ]
        elif name == "micro_batch" or (name == "group_id" and self.group_ids == "per_rank"):
            sizes = [int(p.max()) + 1 if p.size else 0 for p in parts]
            offsets = np.cumsum([0, *sizes])
            parts = [self._shifted(p, int(offsets[r]), name, r) for r, p in enumerate(parts)]
        elif name == "unit_grad_sketch" and any(p.dtype == np.float16 for p in parts):
            with np.errstate(all="ignore"):  # a scale that overflows gives inf, as in torch
                parts = [
                    p.astype(np.float32) * np.float32(r.scalars.get("unit_grad_sketch_scale", 1.0))
                    if p.dtype == np.float16
                    else p
                    for p, r in zip(parts, self.records, strict=True)
                ]
        for rank, part in enumerate(parts[1:], start=1):
            if part.shape[1:] != parts[0].shape[1:]:  # each rank's Recorder checks its own only
                raise InputError(
                    f"{self.named(self.paths[0])}: cannot join the ranks' {name}: rank 0's has "
                    f"shape {list(parts[0].shape)}, rank {rank}'s {list(part.shape)}"
                )
        return np.concatenate(parts)

    def _shifted(
        self, ids: np.ndarray, offset: int, name: str, rank: int, limit: int | None = None
    ) -> np.ndarray:
        """Rank `rank`'s ids numbered after the ranks before it (`offset` added, in their
        dtype); InputError when the numbers outgrow that dtype, when an id is negative (it
        would be another rank's), or, given the rank's `limit` sequences, when its ids do not
        reach up to `limit` - 1 exactly (past it: another rank's; short of it: a sequence no
        entry is of; no ids at all when it has sequences)."""
        if not ids.size and not limit:
            return ids
        low, high = (int(ids.min()), int(ids.max())) if ids.size else (0, -1)
        if low < 0 or (limit is not None and high != limit - 1):
            bound = (
                "ids are >= 0" if limit is None else f"its {limit} sequences are 0 to {limit - 1}"
            )
            held = f"lie in [{low}, {high}]" if ids.size else "has no entry"
            raise InputError(
                f"{self.named(self.paths[rank])}: cannot join the ranks' {name}: rank {rank}'s "
                f"{held} ({bound})"
            )
        if high + offset > np.iinfo(ids.dtype).max:
            raise InputError(
                f"{self.named(self.paths[0])}: cannot join the ranks' {name}: numbered across "
                f"{len(self.paths)} ranks, its ids pass the {ids.dtype} range"
            )
        shifted: np.ndarray = ids + ids.dtype.type(offset)
        return shifted


UNKNOWN_LISTED = 100
"""Stray files of steps/ listed as a finding each, at most: any more are one finding that
counts them (300,000 junk files would be 300,000 findings, gigabytes of report)."""
_SETTLED_NS = 2_000_000_000
"""How long before a listing the steps directory must have last changed for the listing to be
reused (far above any filesystem's timestamp granularity)."""


@dataclass(frozen=True)
class _Entry:
    """What a name in steps/ is: a final step file (`rank` set), a temporary one, or an unknown
    file (`reason` set)."""

    path: Path
    step: int | None = None
    rank: int | None = None
    temporary: bool = False
    note: bool = False
    """A rank's `recording_stopped` note (`rank` set), or one in flight (`temporary` too)."""
    reason: str | None = None


@dataclass
class _Listing:
    finals: dict[int, dict[int, Path]] = field(default_factory=dict)
    temps: list[tuple[int, Path]] = field(default_factory=list)
    notes: dict[int, Path] = field(default_factory=dict)
    """Each rank's `recording_stopped` note file, by rank."""
    unknown: list[tuple[Path, str]] = field(default_factory=list)
    """Files that are not step files of this run, each with why."""
    read_notes: tuple[dict[int, dict[str, Any]], list[Finding]] | None = None
    """`notes` read (`DirectoryRun._stop_notes`), once a listing: its integrity check and
    its notes shown (`inspect`) come from one read of each file."""


def symlink_refused(name: str) -> InputError:
    """The refusal of a run's manifest or steps folder that is a symlink, named `name`."""
    return InputError(f"{name}: a symlink (nothing in a run is followed out of it)")


def _is_symlink(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def read_manifest_bytes(path: Path, limit: int = MANIFEST_LIMIT, what: str = "manifest") -> bytes:
    """The manifest's bytes (or another small file's, a `what` of at most `limit` bytes): a
    regular file (a symlink, FIFO or device is never read), at most `limit` + 1 bytes of it
    (`parse_manifest` refuses a longer one)."""
    try:
        fh, _ = open_regular(path, follow_links=False)
        with fh:
            return fh.read(limit + 1)
    except NotRegularFile:
        raise InputError(f"{path}: not a regular file") from None
    except OSError as exc:
        if _is_symlink(path):
            raise symlink_refused(str(path)) from None
        raise InputError(f"{path}: unreadable {what} ({exc.strerror or exc})") from None


def parse_stop_note(raw: bytes, rank: int, where: str) -> dict[str, Any]:
    """Rank `rank`'s note file (`STOP_NOTE_RE`) as its note; InputError naming `where` for one
    past `STOP_NOTE_LIMIT` bytes, not strict UTF-8 JSON, not of the note's shape, or of
    another rank than its name's."""
    if len(raw) > STOP_NOTE_LIMIT:
        raise InputError(f"{where}: a note of more than {STOP_NOTE_LIMIT} bytes")
    note = parse_strict(raw, where, "note")
    if not is_stop_note(note):
        raise InputError(f"{where}: not a recording_stopped note {STOP_NOTE_SHAPE}")
    assert isinstance(note, dict)
    if note["rank"] != rank:
        raise InputError(f"{where}: its note says rank {note['rank']}, its file name {rank}")
    return note


def _unknown_reason(name: str, regular: bool, world_size: int) -> str | None:
    """Why a file in steps/ is not a finished step file of this run (None if it is one)."""
    match = STEP_FILE_RE.match(name)
    if match is None:
        return "not a step file of this run"
    if (match.group(2) is not None) != (world_size > 1):
        return "a step file of a run with another world_size"
    found = canonical_step(name)
    if found is None:
        return "a step file name not spelled as the writer spells it (or out of range)"
    if found[1] >= world_size:
        return f"rank {found[1]} >= the run's world_size {world_size}"
    if not regular:
        return "named like a step file but not a regular file (never opened)"
    return None


def _missing_ranks(ranks: dict[int, Path], world_size: int) -> str | None:
    """'incomplete, no file for rank(s) [...]' naming at most five, or None (a rank that died,
    or is still writing the step); O(files), not O(world_size)."""
    if len(ranks) >= world_size:
        return None
    first: list[int] = []
    rank = 0
    while len(first) < 5 and rank < world_size:
        if rank not in ranks:
            first.append(rank)
        rank += 1
    more = world_size - len(ranks) - len(first)
    return f"incomplete, no file for rank(s) {first}" + (f" and {more} more" if more > 0 else "")


class DirectoryRun(Run):
    """A run directory written by `Recorder` (format v1)."""

    def __init__(self, path: Path, *, verify: bool = True) -> None:
        self.path = path
        self.verify = verify
        manifest_path = path / MANIFEST_NAME
        if not self._exists(manifest_path):
            raise InputError(f"{self.location} is not a run: it has no {MANIFEST_NAME}")
        manifest = parse_manifest(self._manifest_bytes(manifest_path), self.named(manifest_path))
        self.format_version = check_manifest(manifest, self.named(manifest_path))
        self._manifest = manifest
        self.world_size: int = manifest["world_size"]
        # file name -> its last check: an unchanged file is checked once (its data CRC once more
        # when its arrays are first read). One small record a step: a long run reads in bounded
        # memory.
        self._checked: dict[str, _Checked] = {}
        self._shared: dict[Any, Any] = {}  # field and scalar name tuples, one per layout
        self._listing = _Listing()
        self._listed_stamp: object | None = None
        """`_stamp` of the steps directory when `_listing` was made, if it can be reused."""
        self._held_listing = 0
        """How many `hold_listing` calls are not released: while one is not, `_listing` is
        never made again."""
        self._held_checks: dict[str, _Checked] = {}
        """Each file's check made while the listing is held, by name: while it is, a file is
        read as checked then (`_check`), though a Recorder rewrote or removed it since."""
        self._entries_seen: dict[tuple[str, bool], _Entry] = {}
        """What each (name, regular) of the last listing is: a name listed again is not parsed
        again (a live run's listing grows by a few names a poll)."""

    def hold_listing(self) -> None:
        self._scan()
        self._held_listing += 1

    def release_listing(self) -> None:
        self._held_listing -= 1
        if not self._held_listing:
            self._held_checks = {}

    def recorded_again(self) -> bool:
        path = self.path / MANIFEST_NAME
        try:
            now = parse_manifest(self._manifest_bytes(path), self.named(path))
        except InputError:  # gone: being recorded over; unreadable now: it cannot tell
            return not self._exists(path)
        return now.get(RUN_ID) != self._manifest.get(RUN_ID)

    def recorder_states(self) -> dict[int, WriterState] | None:
        """Each rank's lock file in steps/, as this machine's locks show it (`writer_states`)."""
        return writer_states(self.path / STEPS_DIR)

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    # -- storage: what a run read from elsewhere (dump/_remote.py) does its own way ------------
    def named(self, path: Path) -> str:
        """How messages and findings name `path`, a file of this run: under the run's
        `location` (here the path itself)."""
        return str(path)

    def _said(self, exc: OSError) -> str:
        """What the filesystem said of a failed call, for a message."""
        return exc.strerror or str(exc)

    def _exists(self, path: Path) -> bool:
        return os.path.lexists(path)

    def _manifest_bytes(self, path: Path) -> bytes:
        return read_manifest_bytes(path)

    def _note_bytes(self, path: Path) -> bytes:
        """A rank's note file's bytes, at most `STOP_NOTE_LIMIT` + 1 of them; InputError."""
        return read_manifest_bytes(path, STOP_NOTE_LIMIT, "note")

    def _stop_notes(self, listing: _Listing) -> tuple[dict[int, dict[str, Any]], list[Finding]]:
        """Each note file of `listing` as its note, by rank, and an `unknown_file` finding for
        each that does not read as one (`parse_stop_note`); each file read once a listing."""
        if listing.read_notes is not None:
            return listing.read_notes
        notes: dict[int, dict[str, Any]] = {}
        findings = []
        for rank, path in sorted(listing.notes.items()):
            where = self.named(path)
            try:
                notes[rank] = parse_stop_note(self._note_bytes(path), rank, where)
            except InputError as exc:
                reason = str(exc).removeprefix(f"{where}: ")
                findings.append(Finding("unknown_file", None, where, f"{path.name}: {reason}"))
        listing.read_notes = notes, findings
        return listing.read_notes

    @property
    def recording_stops(self) -> list[dict[str, Any]]:
        """The manifest's note and each rank's own note file (a rank's file before the
        manifest's note of the same rank), by rank."""
        return self._stops(self._scan())

    @property
    def listed_recording_stops(self) -> list[dict[str, Any]]:
        """`recording_stops` as of the last listing (`listed_step_numbers`'), not listed
        again."""
        return self._stops(self._listing)

    def _stops(self, listing: _Listing) -> list[dict[str, Any]]:
        return stops_by_rank(self._stop_notes(listing)[0].values(), manifest_stops(self.manifest))

    def _entries(self, directory: Path) -> list[tuple[str, bool]]:
        """(name, whether it is a regular file, not a link) of each entry, sorted by name;
        FileNotFoundError when there is no such directory, NotADirectoryError when it is
        something else (a file), InputError when it is a symlink (never followed)."""
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:  # a symlink: ENOTDIR on Linux, ELOOP elsewhere
            if _is_symlink(directory):
                raise symlink_refused(self.named(directory)) from None
            raise
        try:
            with os.scandir(fd) as entries:
                found = sorted(entries, key=lambda entry: entry.name)
        finally:
            os.close(fd)
        listed = []
        for entry in found:
            try:
                regular = entry.is_file(follow_symlinks=False)
            except OSError:
                regular = False
            listed.append((entry.name, regular))
        return listed

    def _stamp(self, directory: Path) -> object | None:
        """What changes whenever the directory's entries do, or None when no stamp can be
        trusted now (then it is listed again). Here its inode and modification time, once that
        time is older than `_SETTLED_NS` (a file added within the clock's granularity after a
        listing can leave the time as it was)."""
        try:
            st = os.stat(directory)
        except OSError:
            return None
        if time.time_ns() - st.st_mtime_ns <= _SETTLED_NS:
            return None
        return (st.st_ino, st.st_mtime_ns)

    def _file_key(self, path: Path) -> FileKey:
        """What changes when the file does; OSError if it is gone."""
        return file_key(path.stat())

    def _header(
        self, path: Path, *, deep: bool, keep: bool = False, known: int | None = None
    ) -> StepHeader:
        """`parse_header` of the file (its arguments), `key` filled in; StepReadError."""
        return read_header(path, deep=deep, keep_data=keep, known=known)

    def _load(self, path: Path, known: int) -> StepHeader:
        """The file read whole, its header not checked again if its CRC is `known`."""
        return self._header(path, deep=False, keep=True, known=known)

    def _scan(self) -> _Listing:
        """The steps directory's files, sorted into finals, temporaries and unknown ones; the
        last listing again while the directory's `_stamp` is the same."""
        if self._held_listing:
            return self._listing
        steps_dir = self.path / STEPS_DIR
        stamp = self._stamp(steps_dir)
        if stamp is not None and stamp == self._listed_stamp:
            return self._listing
        self._listing = listing = _Listing()
        self._listed_stamp = None
        try:
            found = self._entries(steps_dir)
        except FileNotFoundError:
            return listing
        except NotADirectoryError:
            raise InputError(
                f"{self.named(steps_dir)}: not a directory (where a run keeps its step files)"
            ) from None
        except OSError as exc:
            raise InputError(
                f"{self.named(steps_dir)}: cannot list it ({self._said(exc)})"
            ) from None
        known, self._entries_seen = self._entries_seen, {}
        for name, regular in found:
            if regular and WRITER_LOCK_RE.match(name):  # a live Recorder's, no step's data
                continue
            if regular and OS_FILE_RE.match(name):  # a file browser's (.DS_Store): no run's
                continue
            entry = known.get((name, regular)) or self._entry(steps_dir, name, regular)
            self._entries_seen[name, regular] = entry
            if entry.note:
                if not entry.temporary:
                    assert entry.rank is not None
                    listing.notes[entry.rank] = entry.path
            elif entry.temporary:
                assert entry.step is not None
                listing.temps.append((entry.step, entry.path))
            elif entry.reason is not None:
                listing.unknown.append((entry.path, entry.reason))
            else:
                assert entry.step is not None and entry.rank is not None
                listing.finals.setdefault(entry.step, {})[entry.rank] = entry.path
        self._listed_stamp = stamp
        return listing

    def _entry(self, steps_dir: Path, name: str, regular: bool) -> _Entry:
        """What the file `name` of steps/ is (`_Entry`)."""
        path = steps_dir / name
        note = STOP_NOTE_RE.match(name) or TEMP_STOP_NOTE_RE.match(name)
        if note is not None and self.world_size > 1:
            rank = int(note.group(1))
            why = (
                "a note's name not spelled as the writer spells it"
                if note.group(1) != f"{rank:04d}"
                else f"rank {rank} >= the run's world_size {self.world_size}"
                if rank >= self.world_size
                else "named like a note but not a regular file (never opened)"
                if not regular
                else None
            )
            if why is not None:
                return _Entry(path, reason=why)
            return _Entry(path, rank=rank, note=True, temporary=name.startswith("."))
        temp = TEMP_FILE_RE.match(name)
        if temp is not None:
            step = int(temp.group(1))
            if (temp.group(2) is not None) == (self.world_size > 1) and step <= STEP_LIMIT:
                return _Entry(path, step=step, temporary=True)
        reason = _unknown_reason(name, regular, self.world_size)
        final = canonical_step(name)
        if reason is not None or final is None:
            return _Entry(path, reason=reason or "not a step file of this run")
        return _Entry(path, step=final[0], rank=final[1])

    def _record(
        self, header: StepHeader, step: int, rank: int, version: tuple[int, int]
    ) -> _HeaderRecord:
        """What the Step is built from; StepReadError for a header that disagrees with its
        file name (step, rank) or the manifest (world_size: a rank recorded with another one
        is not a part of this run's steps), with itself (counts, shapes, dtypes), or a step
        with no tokens (a scalar step, with no batch field at all, has none: from format 1.2
        on)."""
        metadata = header.metadata
        scalars = _parse_scalars(metadata)
        if "step" in scalars and scalars["step"] != float(step):
            raise StepReadError(
                "unreadable", f"its header says step {metadata['step']}, its file name {step}"
            )
        said = (metadata.get(META_RANK, str(rank)), metadata.get(META_WORLD_SIZE))
        if said[0] != str(rank) or said[1] not in (None, str(self.world_size)):
            raise StepReadError(
                "unreadable",
                f"its header says rank {said[0]} of world_size {said[1]}, its file name rank "
                f"{rank} of the run's world_size {self.world_size}",
            )
        tokens = _count(metadata, META_NUM_TOKENS)
        sequences = _count(metadata, META_NUM_SEQUENCES)
        scored = _count(metadata, META_SCORED_TOKENS)
        scalar = version >= SCALAR_STEP_VERSION and not any(
            name in header.tensors for name in BATCH_FIELDS
        )
        if scalar and tokens + sequences + scored > 0:
            raise StepReadError("unreadable", "a step without a batch counts tokens")
        if tokens == 0 and self.world_size == 1 and not scalar:
            raise StepReadError("unreadable", "the step has no tokens")
        if scored > tokens:
            raise StepReadError("unreadable", f"{scored} scored tokens of {tokens}")
        if sequences > SEQUENCE_LIMIT:
            raise StepReadError(
                "unreadable", f"{sequences} sequences: more sequences than an int32 seq_id names"
            )
        rewards = _count(metadata, META_SCORED_REWARDS) if META_SCORED_REWARDS in metadata else None
        if rewards is not None and rewards > sequences:
            raise StepReadError("unreadable", f"{rewards} scored rewards of {sequences} sequences")
        _check_fields(header, tokens, sequences, scalar=scalar)
        seed = _count(metadata, META_SKETCH_SEED) if META_SKETCH_SEED in metadata else None
        width = header.tensors[SKETCH_KEY][1][1] if SKETCH_KEY in header.tensors else None
        names = tuple(scalars)
        fields = frozenset(name for name in header.tensors if name in FIELDS)
        unknown = frozenset(header.tensors).difference(FIELDS)
        return _HeaderRecord(
            fields=self._shared.setdefault(fields, fields),
            unknown_fields=self._shared.setdefault(unknown, unknown),
            scalar_names=self._shared.setdefault(names, names),
            scalar_values=tuple(scalars.values()),
            num_tokens=tokens,
            num_sequences=sequences,
            sketch_seed=seed,
            sketch_width=width,
            num_scored_tokens=scored,
            num_scored_rewards=rewards,
        )

    def _check(
        self, path: Path, step: int, rank: int, *, deep: bool, keep: bool = False
    ) -> tuple[_HeaderRecord, _Checked, StepHeader | None]:
        """The record and check of the file of `step` and `rank` (as the listing names it),
        checked (in full with `deep`) unless a check of the file as it is now is cached; with
        `keep`, the header and data read by a check made now (the step then never reads its
        file again). While the listing is held, a file checked as far is not checked again:
        its step reads the same (scalars, fields, counts) to every figure of a command, though
        the Recorder rewrote its last step since (`rewrite_step`) or removed it; a full read
        (`keep`) reads the file as it is."""
        held = self._held_checks.get(path.name) if self._held_listing and not keep else None
        if held is not None and (held.deep or not deep):
            if isinstance(held.outcome, tuple):
                raise StepReadError(*held.outcome)
            return held.outcome, held, None
        record, checked, header = self._checked_now(path, step, rank, deep=deep, keep=keep)
        if self._held_listing:
            self._held_checks[path.name] = checked
        return record, checked, header

    def _checked_now(
        self, path: Path, step: int, rank: int, *, deep: bool, keep: bool
    ) -> tuple[_HeaderRecord, _Checked, StepHeader | None]:
        """`_check` of the file as it is now (its check cached while the file's key is the
        same)."""
        try:
            key = self._file_key(path)
        except OSError as exc:
            raise StepReadError("unreadable", f"cannot stat: {self._said(exc)}") from None
        cached = self._checked.get(path.name)
        known = None
        if cached is not None and cached.key == key:
            if isinstance(cached.outcome, tuple):
                raise StepReadError(*cached.outcome)
            if cached.deep or not deep:
                return cached.outcome, cached, None
            known = cached.header_crc
        try:
            header = self._header(path, deep=deep, keep=keep, known=known)
            key = header.key
            if cached is not None and known == header.header_crc:
                record = cached.outcome
                assert not isinstance(record, tuple)
            else:
                version = header.metadata.get(META_FORMAT, "")
                try:
                    parsed = check_readable_version(version, path.name)
                except InputError as exc:
                    raise StepReadError("unreadable", str(exc)) from None
                record = self._record(header, step, rank, parsed)
        except StepReadError as exc:
            self._checked[path.name] = _Checked(key, True, (exc.kind, str(exc)))
            raise
        checked = self._checked[path.name] = _Checked(key, deep, record, header.header_crc)
        return record, checked, header if keep else None

    def checks(self) -> _DirectoryChecks:
        return _DirectoryChecks(dict(self._checked))

    def adopt_checks(self, checks: object) -> None:
        """Each file's check from `checks`, unless this reader checked it as far (its data
        CRC too) itself; `_check` keeps a check only while the file's key is the one checked."""
        if not isinstance(checks, _DirectoryChecks):
            return
        for name, check in checks.files.items():
            mine = self._checked.get(name)
            if mine is not None and (mine.deep or not check.deep):
                continue
            outcome = check.outcome
            if isinstance(outcome, _HeaderRecord):  # its names shared, as a record read here
                outcome = replace(
                    outcome,
                    fields=self._shared.setdefault(outcome.fields, outcome.fields),
                    scalar_names=self._shared.setdefault(
                        outcome.scalar_names, outcome.scalar_names
                    ),
                )
            self._checked[name] = _Checked(check.key, check.deep, outcome, check.header_crc)
            if self._held_listing:  # read as the worker read it (`_check`)
                self._held_checks[name] = self._checked[name]

    def _records(
        self, n: int, ranks: dict[int, Path], *, deep: bool, keep: bool = False
    ) -> list[tuple[_HeaderRecord, _Checked, StepHeader | None]]:
        """Every rank's (record, check, file read now or None), in rank order; StepReadError
        for a missing or bad file."""
        if not ranks:  # a number no listing holds (`steps_of`)
            raise StepReadError("missing_rank", f"no file of step {n}: the run does not hold it")
        missing = _missing_ranks(ranks, self.world_size)
        if missing:
            raise StepReadError("missing_rank", missing)
        deep = deep and self.verify
        return [self._check(ranks[r], n, r, deep=deep, keep=keep) for r in range(self.world_size)]

    def _try_step(
        self, n: int, *, deep: bool, ranks: dict[int, Path] | None = None
    ) -> DirectoryStep | StepReadError:
        if ranks is None:
            # The listing that produced `n` (step_numbers lists before each pass), else a fresh one.
            ranks = self._listing.finals.get(n) or self._scan().finals.get(n, {})
        try:
            checked = self._records(n, ranks, deep=deep, keep=deep)
        except StepReadError as exc:
            return exc
        records = [record for record, _, _ in checked]
        fields = set(records[0].fields).intersection(*(r.fields for r in records[1:]))
        held = set().union(*(r.fields for r in records)) & {GRAM_KEY, SKETCH_KEY}
        sketched = SKETCH_KEY in fields
        seeds = tuple(r.sketch_seed for r in records) if sketched else ()
        widths = tuple(r.sketch_width or 0 for r in records) if sketched else ()
        # a Gram of each rank never combines; a sketch is the step's only with every rank's
        # rows, drawn with one Omega (one seed, one k)
        omega = omegas_differ(seeds, widths)
        differ = {SKETCH_KEY} if omega else set()
        unjoined = frozenset((held - fields) | (held & {GRAM_KEY}) | differ)
        unjoined = unjoined if len(records) > 1 else frozenset()
        fields -= unjoined
        # else a scalar step (module docstring)
        batch = "logp" in fields and any(r.num_tokens for r in records)
        sequences = [r.num_sequences if batch else 0 for r in records]
        weights = [r.reward_weight if batch else 0 for r in records]
        parts = [r.scalars for r in records]
        scalars = parts[0] if len(records) == 1 else _merge_scalars(parts, weights, sequences)
        return DirectoryStep(
            step=n,
            scalars=scalars,
            fields=fields if batch else fields - set(BATCH_FIELDS),
            num_tokens=sum(r.num_tokens for r in records) if batch else 0,
            num_sequences=sum(sequences),
            num_scored_tokens=sum(r.num_scored_tokens for r in records) if batch else 0,
            unjoined=unjoined if batch else frozenset(),
            sketch_seeds=seeds if len(records) > 1 and batch else (),
            sketch_widths=widths if len(records) > 1 and batch else (),
            sketch_width=records[0].sketch_width if SKETCH_KEY in fields and batch else None,
            unjoined_why=unjoined_kind(unjoined, omega=omega) if batch else None,
            rank_sequences=tuple(sequences) if len(records) > 1 and batch else (),
            paths=[ranks[r] for r in range(self.world_size)],
            records=records,
            file_keys=[check.key for _, check, _ in checked],
            header_crcs=[check.header_crc for _, check, _ in checked],
            files=[loaded for _, _, loaded in checked],
            loader=self._load,
            named=self.named,
            group_ids=self.group_ids,
            group_size=self.group_size,
        )

    @property
    def step_numbers(self) -> list[int]:
        listing = self._scan()
        numbers = []
        for n in sorted(listing.finals):
            try:
                self._records(n, listing.finals[n], deep=False)
            except StepReadError:
                continue
            numbers.append(n)
        return numbers

    @property
    def listed_step_numbers(self) -> list[int]:
        """The steps with a final file name in the listing (no file opened, nor stat'ed)."""
        return sorted(self._scan().finals)

    @property
    def listed_partial_steps(self) -> dict[int, Collection[int]]:
        return {
            n: ranks.keys()
            for n, ranks in self._listing.finals.items()
            if len(ranks) < self.world_size
        }

    @property
    def listed_last_steps(self) -> dict[int, int]:
        lasts: dict[int, int] = {}
        for n, ranks in self._listing.finals.items():
            for rank in ranks:
                lasts[rank] = max(n, lasts.get(rank, n))
        return lasts

    def _has_step(self, n: int) -> bool:
        return n in self._listing.finals or n in self._scan().finals

    def _step_findings(self, listing: _Listing, *, deep: bool) -> list[Finding]:
        """A finding for each step missing a rank and each step file that fails its check (in
        full, its data CRC too, with `deep`)."""
        findings: list[Finding] = []
        for n, ranks in sorted(listing.finals.items()):
            missing = _missing_ranks(ranks, self.world_size)
            if missing:
                findings.append(Finding("missing_rank", n, None, f"step {n}: {missing}"))
            for rank, path in ranks.items():
                try:
                    self._check(path, n, rank, deep=deep)
                except StepReadError as exc:
                    findings.append(
                        Finding(exc.kind, n, self.named(path), f"step {n}: {exc.kind}: {exc}")
                    )
        return findings

    def header_findings(self) -> list[Finding]:
        return self._step_findings(self._scan(), deep=False)

    @property
    def integrity(self) -> IntegrityReport:
        """Every step file checked in full (data CRC), temporary and stray files, gaps."""
        return self._integrity(self._scan())

    @property
    def listed_integrity(self) -> IntegrityReport:
        return self._integrity(self._listing)

    def _integrity(self, listing: _Listing) -> IntegrityReport:
        """`integrity` of the files of `listing`."""
        findings = self._step_findings(listing, deep=True)
        for n, path in listing.temps:
            findings.append(
                Finding(
                    "temporary",
                    n,
                    self.named(path),
                    f"step {n}: temporary file {path.name} (in flight, or left by a killed writer)",
                )
            )
        for path, reason in listing.unknown[:UNKNOWN_LISTED]:
            findings.append(
                Finding("unknown_file", None, self.named(path), f"{path.name}: {reason}")
            )
        unlisted = len(listing.unknown) - UNKNOWN_LISTED
        if unlisted > 0:
            message = (
                f"{unlisted:,} more files in steps/ that are not step files of this run, "
                f"not listed one by one (the first {UNKNOWN_LISTED} are)"
            )
            findings.append(Finding("unknown_file", None, None, message))
        findings.extend(self._stop_notes(listing)[1])
        # Steps with any file (even a bad or temporary one) are reported as such, not as gaps.
        findings.extend(gap_findings(sorted(set(listing.finals) | {n for n, _ in listing.temps})))
        findings.sort(key=lambda f: (f.step if f.step is not None else -1, f.kind))
        return IntegrityReport(findings)
