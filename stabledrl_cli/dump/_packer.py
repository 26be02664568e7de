"""`pack_run`: a whole run into one HDF5 file (layout in `_layout`), written atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import h5py

from stabledrl_cli._atomic import missing_directory, output_path, write_error
from stabledrl_cli._json import unicode_text
from stabledrl_cli._version import __version__
from stabledrl_cli.dump._archive_checks import CRC_ATTR, index_crc
from stabledrl_cli.dump._arguments import path_argument, step_number, switch_argument
from stabledrl_cli.dump._file_names import MANIFEST_NAME, STEPS_DIR
from stabledrl_cli.dump._integrity import (
    Finding,
    IntegrityReport,
    integrity_warnings_ignored,
)
from stabledrl_cli.dump._layout import CHECKSUMS_VERSION, needs_escape
from stabledrl_cli.dump._live import LiveRead, live_read
from stabledrl_cli.dump._open import opened_run
from stabledrl_cli.dump._pack_file import GuardedFile
from stabledrl_cli.dump._pack_manifest import archive_manifest
from stabledrl_cli.dump._pack_steps import Packer
from stabledrl_cli.dump._run import Run, size_on_disk
from stabledrl_cli.dump._run_target import os_file, run_holding
from stabledrl_cli.dump._schema import COUNT_FIELDS, EXTENSION_FIELDS
from stabledrl_cli.dump._url_filesystem import inside_local_run, local_path
from stabledrl_cli.dump._versions import RUN_KIND, written_version
from stabledrl_cli.errors import InputError, UsageError, counted, type_name
from stabledrl_cli.vocab import PACK_COMPRESSIONS, PackCompression


def _text_dataset(handle: h5py.File, name: str, text: str) -> None:
    dataset = handle.create_dataset(name, data=text, dtype=h5py.string_dtype())
    dataset.attrs[CRC_ATTR] = index_crc(text)


@dataclass(frozen=True, kw_only=True)
class PackSummary:
    """What `pack_run` wrote."""

    source: str
    out: str
    steps: int
    tokens: int
    source_bytes: int
    """Bytes of the run's files that the archive holds (`left_out` not counted)."""
    archive_bytes: int
    findings: list[Finding]
    left_out: dict[str, int] = field(default_factory=dict)
    """The entries of the run's directory that the archive does not hold (`_left_out`), with
    their bytes."""
    unknown_fields: list[str] = field(default_factory=list)
    """Arrays of the run's step files that this format version does not know (a newer minor
    version's fields), sorted: the archive does not hold them."""
    unjoined_geometry: dict[str, int] = field(default_factory=dict)
    """Geometry the run's ranks recorded that their join leaves out (`Step.unjoined`: Grams,
    which do not combine, or a sketch of some ranks only), by name, with its steps: as a
    replay of the directory, the archive holds none of it, only which steps left it out."""
    damaged_steps: int = 0
    """Steps of the listing packed that every rank wrote but that could not be read (a torn or
    corrupt file: a finding each), left out."""
    live: LiveRead | None = None
    """A live Recorder held the run: the steps listed to pack, and those landed since
    (`dump._live.live_read`)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.source,
            "out": self.out,
            "steps": self.steps,
            "tokens": self.tokens,
            "source_bytes": self.source_bytes,
            "archive_bytes": self.archive_bytes,
            "left_out": self.left_out,
            "unknown_fields": self.unknown_fields,
            "unjoined_geometry": self.unjoined_geometry,
            "damaged_steps": self.damaged_steps,
            "integrity": IntegrityReport(self.findings).to_dict(),
            "live": None if self.live is None else self.live.to_dict(),
        }


def _left_out(run: Run) -> dict[str, int]:
    """The entries of a run directory on this machine that an archive does not hold, by name (a
    directory's ending in /), with their bytes: all but its manifest, its steps/ and its
    dot-named files (notes, locks, temporary files) and a file browser's files (`os_file`:
    Thumbs.db, desktop.ini): checkpoints/, branches/ (`stabledrl branch` reads and writes
    them in the run directory), a user's own files; a link as the link, never followed (a
    received run's `notes -> /usr`). {} for an archive, or a run at a URL of
    another filesystem."""
    local = local_path(run.location)
    if local is None or not os.path.isdir(local):
        return {}
    found: dict[str, int] = {}
    with suppress(OSError), os.scandir(local) as entries:
        for entry in entries:
            skipped = entry.name.startswith(".") or entry.name in (MANIFEST_NAME, STEPS_DIR)
            if not skipped and not os_file(Path(entry.path)):
                # A link is left out as the link it is: what it names is no file of the run.
                ending = "/" if entry.is_dir(follow_symlinks=False) else ""
                found[unicode_text(entry.name) + ending] = size_on_disk(
                    Path(entry.path), follow=False
                )
    return dict(sorted(found.items()))


def check_pack_target(
    given: str | os.PathLike[str], run: Run, force: bool, *, to_force: str = "pass force=True"
) -> Path:
    """`given` as the archive's path, UsageError unless `pack_run` may write it: not a
    directory, nor a name ending in / (which names one), in one that exists, not inside
    `run`'s directory nor `run`'s archive itself nor inside another run (`run_holding`; symlinks
    resolved: an archive there would replace a file of the run, or sit among its files), and no
    entry of that name at all (a
    file, a symlink even to nothing, a FIFO...) unless `force` (then written as
    `_atomic.output_path` writes: a link's target replaced, a FIFO or device written in place).
    `to_force`: how the message tells the caller to force it (the command's `pass --force`).
    WriteError when the system cannot tell (a name longer than the file system takes)."""
    out = Path(given)
    try:
        # Nor inside another run: replacing its manifest through a link would lose that run.
        holder = run.location if inside_local_run(out, run.location) else run_holding(out)
        if holder is not None:
            raise UsageError(f"{out} is inside the run {holder}; write the archive outside it")
        if out.is_dir():
            raise UsageError(
                f"{out} is a directory; give the archive's file name, e.g. {out}/run.h5"
            )
        if os.fspath(given).endswith(os.sep):
            raise UsageError(
                f"{given} ends in {os.sep}: give the archive's file name, e.g. {out}/run.h5"
            )
        problem = missing_directory(out)
    except OSError as exc:  # a name longer than the file system takes, ...
        raise write_error(out, exc) from None
    if problem is not None:
        raise UsageError(f"{out}: {problem}")
    if os.path.lexists(out) and not force:
        raise UsageError(f"{out} already exists; {to_force} to overwrite it")
    return out


def _write_archive(
    handle: h5py.File,
    run: Run,
    numbers: Sequence[int],
    manifest_text: str,
    guarded: GuardedFile,
    progress: Callable[[int], None] | None,
    compression: PackCompression,
) -> tuple[Packer, IntegrityReport]:
    """Every readable step of `numbers` (each checked in full as it is read, `progress(1)`
    after each, packed or not), then the run's integrity report as of the listing packed: its
    full check finds each step file checked already, so a file is read once (a run at a URL is
    not fetched twice)."""
    handle.attrs["kind"] = RUN_KIND
    handle.attrs["tool_version"] = __version__
    handle.attrs["source"] = unicode_text(run.location)  # h5py refuses a lone surrogate
    _text_dataset(handle, "manifest", manifest_text)
    packer = Packer(handle, compression)
    with integrity_warnings_ignored():  # the integrity report names them
        for n in numbers:
            if guarded.error is not None:  # the disk is full: stop early, fail at the end
                break
            for step in run.steps_of((n,)):  # none when its file is damaged
                packer.add(step, run.location)
            if progress is not None:
                progress(1)
    packer.finish()
    integrity = run.listed_integrity  # of the listing packed: a live run grows meanwhile
    findings = [  # a file name that is not UTF-8, escaped: readers refuse a lone surrogate
        {k: unicode_text(v) if isinstance(v, str) else v for k, v in f.to_dict().items()}
        for f in integrity.findings
    ]
    _text_dataset(handle, "integrity", json.dumps(findings))
    extended = run.group_ids == "global" or any(
        f"sequences/{name}" in packer.columns for name in EXTENSION_FIELDS
    )
    manifest = run.manifest
    uses_1_2 = (
        manifest.get("policy") is None
        or manifest.get("source") is not None
        or any("logp" not in fields for fields in packer.fields)
        or any(needs_escape(name) for name in set().union(*packer.scalars))
    )
    uses_1_3 = any(f"sequences/{name}" in packer.columns for name in COUNT_FIELDS)
    handle.attrs["format_version"] = (
        CHECKSUMS_VERSION
        if packer.checksummed
        else written_version(
            extended, uses_1_2, uses_1_3, loss_norm=run.loss_norm, world_size=manifest["world_size"]
        )
    )
    return packer, integrity


def _nothing_to_pack(run: Run, integrity: IntegrityReport) -> str:
    """Why a run packs no step: it has none, or every one was skipped (its first finding)."""
    if not integrity.findings:
        return f"{run.location}: the run has no steps; nothing to pack"
    found = counted(len(integrity.findings), "integrity finding")
    return (
        f"{run.location}: no readable step to pack ({found}, the first: "
        f"{integrity.findings[0].message})"
    )


def pack_run(
    run: str | os.PathLike[str] | Run,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    compression: PackCompression = "fast",
    listed: Sequence[int] | None = None,
) -> PackSummary:
    """Writes `run` (every readable step) into one HDF5 file at `out`, atomically (a symlink,
    device or FIFO named `out` is written in place: `_atomic.output_path`). run: a run
    directory, archive or URL, opened here and closed when it returns or raises, or an opened
    Run, left open.

    A run being recorded is packed as listed when the pack begins: `listed`, its
    `listed_whole_step_numbers` taken by the caller (who counts them for a progress bar, say),
    else taken here (ascending, each step once, else UsageError); the steps that land
    meanwhile, and their files' findings, are left out.

    progress: called with 1 after each step of the listing is read (packed, or left out as
    damaged). compression: "fast" (only the fields a deflate halves are compressed: a replay
    reads the archive near the directory's speed) or "small" (every field gzip, with shuffle
    where it helps: the smallest file, ~2.5x slower to read); readers read either
    (`_layout.FILTERS`).

    The source's integrity findings (torn, corrupt or temporary step files, gaps) are carried
    into the archive; the steps they name are not packed. InputError (exit 3) when no step is
    left to pack (a run of no step, or every one damaged), no file written. UsageError (exit
    2) if `out` exists and not `force`, or lies inside the run's directory, `force` or not
    (`check_pack_target`); the target name is untouched until the archive is complete (written
    under a temporary name beside it, then renamed: a killed pack leaves no file under the
    target name). A failed write (a full disk) raises WriteError (exit 4), its temporary file
    removed.
    """
    if compression not in PACK_COMPRESSIONS:
        raise UsageError(f"compression {compression!r}: expected one of {list(PACK_COMPRESSIONS)}")
    given = path_argument(out, "out", "the archive's file")
    force = switch_argument(force, "force")
    chosen = None if listed is None else _listed_argument(listed)
    with opened_run(run) as source:
        target = check_pack_target(given, source, force)
        numbers = source.listed_whole_step_numbers if chosen is None else chosen
        return _pack(source, target, numbers, progress, compression)


def _listed_argument(listed: Sequence[int]) -> list[int]:
    """`pack_run`'s `listed`: step numbers, ascending, each once (an archive holds its steps
    so), else UsageError (for one number or str too, not their digits)."""
    if isinstance(listed, (str, bytes)) or not isinstance(listed, Iterable):
        raise UsageError(f"listed must be a list of step numbers, not {type_name(listed)}")
    numbers = [step_number(n, "listed") for n in listed]
    for before, after in pairwise(numbers):
        if after <= before:
            raise UsageError(f"listed must be ascending, each step once: {after} after {before}")
    return numbers


def _pack(
    run: Run,
    target: Path,
    numbers: list[int],
    progress: Callable[[int], None] | None,
    compression: PackCompression,
) -> PackSummary:
    """`pack_run` of the steps `numbers` of an opened run, its last listing's (not listed
    again), into a `target` checked already."""
    try:
        manifest_text = archive_manifest(run)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"{run.location}: its manifest cannot be written as JSON ({exc})"
        ) from None
    source_bytes = run.size_bytes  # before the archive: a store that cannot list leaves none
    unpacked = _left_out(run)
    source_bytes = max(0, source_bytes - sum(unpacked.values()))
    with output_path(target) as temp:
        guarded = GuardedFile(temp)
        try:
            with h5py.File(guarded, "w") as handle:
                packer, integrity = _write_archive(
                    handle, run, numbers, manifest_text, guarded, progress, compression
                )
        finally:
            guarded.close()
        if guarded.error is not None:
            raise guarded.error
        if not packer.numbers:
            raise InputError(_nothing_to_pack(run, integrity))
        archive_bytes = temp.stat().st_size  # a FIFO or device written in place has no size
    return PackSummary(
        source=run.location,
        out=str(target),
        steps=len(packer.numbers),
        tokens=packer.offsets["tokens"][-1],
        source_bytes=source_bytes,
        archive_bytes=archive_bytes,
        findings=list(integrity.findings),
        left_out=unpacked,
        unknown_fields=sorted(packer.unknown_fields),
        unjoined_geometry=packer.unjoined_steps,
        damaged_steps=len(numbers) - len(packer.numbers),
        live=live_read(run, numbers),
    )
