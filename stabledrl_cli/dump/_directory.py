"""A run directory read lazily: `DirectoryRun` and its `DirectoryStep`.

Every access lists the directory again (or reuses the last listing while the directory is
unchanged), so a run that is still being written grows under the reader; files under a
temporary name are in flight (or left by a killed writer) and never read.
A step file is checked before use: its header (parse, size, header CRC) whenever it is listed,
its data CRC when its step is loaded (`verify=True`, the default). Loading a step reads its
file whole in one read (header, data, CRC); its arrays are then views of that buffer (a file
whose check was cached is read whole at the first array asked for). A torn or corrupt file is
reported in `run.integrity` and skipped with a `RunIntegrityWarning`, never a crash.
A step of several ranks joins their files (`_directory_step`); the files are reached through
`_directory_files`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from stabledrl_cli.dump._directory_files import DirectoryFiles
from stabledrl_cli.dump._directory_step import DirectoryStep, joined_step
from stabledrl_cli.dump._file_names import MANIFEST_NAME, OS_FILE_RE, STEPS_DIR, WRITER_LOCK_RE
from stabledrl_cli.dump._integrity import Finding, IntegrityReport, StepReadError, gap_findings
from stabledrl_cli.dump._listing import Entry, Listing, listed_entry, missing_ranks, stray_findings
from stabledrl_cli.dump._manifest import RUN_ID, check_manifest, parse_manifest
from stabledrl_cli.dump._run import Run
from stabledrl_cli.dump._run_files import parse_stop_note
from stabledrl_cli.dump._schema import META_FORMAT
from stabledrl_cli.dump._step_record import Checked, HeaderRecord, header_record
from stabledrl_cli.dump._stfile import StepHeader
from stabledrl_cli.dump._stop_notes import manifest_stops, stops_by_rank
from stabledrl_cli.dump._versions import check_readable_version
from stabledrl_cli.dump._writer_lock import WriterState, writer_states
from stabledrl_cli.errors import InputError


@dataclass(frozen=True)
class _DirectoryChecks:
    """`DirectoryRun.checks`: each step file's last check, by file name."""

    files: dict[str, Checked]


class DirectoryRun(DirectoryFiles, Run):
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
        self._checked: dict[str, Checked] = {}
        self._shared: dict[Any, Any] = {}  # field and scalar name tuples, one per layout
        self._listing = Listing()
        self._listed_stamp: object | None = None
        """`_stamp` of the steps directory when `_listing` was made, if it can be reused."""
        self._held_listing = 0
        """How many `hold_listing` calls are not released: while one is not, `_listing` is
        never made again."""
        self._held_checks: dict[str, Checked] = {}
        """Each file's check made while the listing is held, by name: while it is, a file is
        read as checked then (`_check`), though a Recorder rewrote or removed it since."""
        self._entries_seen: dict[tuple[str, bool], Entry] = {}
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

    def _stop_notes(self, listing: Listing) -> tuple[dict[int, dict[str, Any]], list[Finding]]:
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

    def _stops(self, listing: Listing) -> list[dict[str, Any]]:
        return stops_by_rank(self._stop_notes(listing)[0].values(), manifest_stops(self.manifest))

    def _scan(self) -> Listing:
        """The steps directory's files, sorted into finals, temporaries and unknown ones; the
        last listing again while the directory's `_stamp` is the same."""
        if self._held_listing:
            return self._listing
        steps_dir = self.path / STEPS_DIR
        stamp = self._stamp(steps_dir)
        if stamp is not None and stamp == self._listed_stamp:
            return self._listing
        self._listing = listing = Listing()
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
            entry = known.get((name, regular)) or listed_entry(
                steps_dir, name, regular, self.world_size
            )
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

    def _check(
        self, path: Path, step: int, rank: int, *, deep: bool, keep: bool = False
    ) -> tuple[HeaderRecord, Checked, StepHeader | None]:
        """The record and check of the file of `step` and `rank` (as the listing names it),
        checked (in full with `deep`) unless a check of the file as it is now is cached; with
        `keep`, the header and data read by a check made now (the step then never reads its
        file again). While the listing is held, a file checked as far is not checked again:
        its step reads the same (scalars, fields, counts) to every figure of a command, though
        the Recorder rewrote its last step since (`rewrite_step`) or removed it; a full read
        (`keep`) reads the file as it is, and a file it finds bad is bad to every figure after
        (a step the pass skipped adds no scalar, as a worker's check of it adds none)."""
        held = self._held_checks.get(path.name) if self._held_listing and not keep else None
        if held is not None and (held.deep or not deep):
            if isinstance(held.outcome, tuple):
                raise StepReadError(*held.outcome)
            return held.outcome, held, None
        try:
            record, checked, header = self._checked_now(path, step, rank, deep=deep, keep=keep)
        except StepReadError:
            failed = self._checked.get(path.name)
            if self._held_listing and failed is not None and isinstance(failed.outcome, tuple):
                self._held_checks[path.name] = failed
            raise
        if self._held_listing:
            self._held_checks[path.name] = checked
        return record, checked, header

    def _checked_now(
        self, path: Path, step: int, rank: int, *, deep: bool, keep: bool
    ) -> tuple[HeaderRecord, Checked, StepHeader | None]:
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
                record = header_record(
                    header,
                    step,
                    rank,
                    parsed,
                    world_size=self.world_size,
                    shared=self._shared,
                )
        except StepReadError as exc:
            self._checked[path.name] = Checked(key, True, (exc.kind, str(exc)))
            raise
        checked = self._checked[path.name] = Checked(key, deep, record, header.header_crc)
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
            if isinstance(outcome, HeaderRecord):  # its names shared, as a record read here
                outcome = replace(
                    outcome,
                    fields=self._shared.setdefault(outcome.fields, outcome.fields),
                    scalar_names=self._shared.setdefault(
                        outcome.scalar_names, outcome.scalar_names
                    ),
                )
            self._checked[name] = Checked(check.key, check.deep, outcome, check.header_crc)
            if self._held_listing:  # read as the worker read it (`_check`)
                self._held_checks[name] = self._checked[name]

    def _records(
        self, n: int, ranks: dict[int, Path], *, deep: bool, keep: bool = False
    ) -> list[tuple[HeaderRecord, Checked, StepHeader | None]]:
        """Every rank's (record, check, file read now or None), in rank order; StepReadError
        for a missing or bad file."""
        if not ranks:  # a number no listing holds (`steps_of`)
            raise StepReadError("missing_rank", f"no file of step {n}: the run does not hold it")
        missing = missing_ranks(ranks, self.world_size)
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
        return joined_step(
            n,
            [ranks[r] for r in range(self.world_size)],
            checked,
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
        """Whether the run holds step `n`: as the last listing holds it whole, else as the
        directory is listed again (a rank may have written its file since; for a step the
        listing holds partial, when `_relisting_due`), the listing `step` then reads it from."""
        listed = self._listing.finals.get(n)
        if listed is not None and (
            len(listed) == self.world_size or not self._relisting_due(n, listed)
        ):
            return True
        return n in self._scan().finals

    def _relisting_due(self, n: int, listed: dict[int, Path]) -> bool:
        """Whether step `n`, whose files of ranks `listed` the last listing holds, is worth
        listing the directory again for: always here, where a directory unchanged is not
        listed again (`_stamp`)."""
        return True

    def _step_findings(self, listing: Listing, *, deep: bool) -> list[Finding]:
        """A finding for each step missing a rank and each step file that fails its check (in
        full, its data CRC too, with `deep`)."""
        findings: list[Finding] = []
        for n, ranks in sorted(listing.finals.items()):
            missing = missing_ranks(ranks, self.world_size)
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

    def _integrity(self, listing: Listing) -> IntegrityReport:
        """`integrity` of the files of `listing`."""
        findings = self._step_findings(listing, deep=True)
        findings.extend(stray_findings(listing, self.named))
        findings.extend(self._stop_notes(listing)[1])
        # Steps with any file (even a bad or temporary one) are reported as such, not as gaps.
        findings.extend(gap_findings(sorted(set(listing.finals) | {n for n, _ in listing.temps})))
        findings.sort(key=lambda f: (f.step if f.step is not None else -1, f.kind))
        return IntegrityReport(findings)
