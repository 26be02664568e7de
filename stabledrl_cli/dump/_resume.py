"""A Recorder's resume of a run in place (`_setup` says what it keeps, removes and renews):
the run's manifest checked against the recorder's, this rank's kept step files verified
in full, then its later ones, temporary files and stop notes removed."""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path
from typing import Any

from stabledrl_cli._atomic import write_atomic
from stabledrl_cli.dump._directory import DirectoryRun
from stabledrl_cli.dump._file_names import MANIFEST_NAME, STEPS_DIR, canonical_step
from stabledrl_cli.dump._integrity import StepReadError
from stabledrl_cli.dump._manifest import RECORDING_CLOSED, RUN_ID
from stabledrl_cli.dump._manifest_edits import amend_manifest, new_run_id, reopen_run
from stabledrl_cli.dump._policy import same_policy
from stabledrl_cli.dump._rank_files import Owned, own_files, remove_file
from stabledrl_cli.dump._run_files import parse_stop_note, read_manifest_bytes
from stabledrl_cli.dump._stfile import read_header
from stabledrl_cli.dump._stop_notes import (
    RECORDING_STOPPED,
    STOP_NOTE_LIMIT,
    STOP_RESUMED,
    is_stop_note,
    note_text,
)
from stabledrl_cli.errors import InputError, UsageError, counted, quoted_spec, shown, warn

_MUST_AGREE = ("unit", "world_size", "group_ids", "loss_norm")


def _whole_steps(steps: Path, world_size: int) -> set[int]:
    """The steps every rank's file of is in `steps` (a reader may have read them)."""
    files: dict[int, int] = {}
    for found in map(canonical_step, os.listdir(steps)):
        if found is not None and found[1] < world_size:
            files[found[0]] = files.get(found[0], 0) + 1
    return {step for step, count in files.items() if count == world_size}


def _stop_note_of(path: Path, rank: int) -> dict[str, Any] | None:
    """The note a rank's note file holds, None when it holds none (`parse_stop_note`)."""
    try:
        return parse_stop_note(read_manifest_bytes(path, STOP_NOTE_LIMIT, "note"), rank, str(path))
    except InputError:
        return None


def _read_manifest(path: Path) -> dict[str, Any]:
    if not (path / MANIFEST_NAME).is_file():
        raise UsageError(f"{path}: nothing to resume (no {MANIFEST_NAME})")
    return DirectoryRun(path).manifest


def check_same_run(old: dict[str, Any], new: dict[str, Any], refused: str) -> None:
    """UsageError `{refused}: its NAME is ..., this recorder's ...` when the run's manifest
    `old` and a Recorder's `new` differ in what every rank and every resume records alike
    (unit, world_size, group_ids, loss_norm, the policy)."""
    defaults = {"group_ids": "per_rank", "loss_norm": "global"}
    for name in _MUST_AGREE:
        was, now = old.get(name, defaults.get(name)), new.get(name, defaults.get(name))
        if was != now:
            raise UsageError(f"{refused}: its {name} is {was!r}, this recorder's {now!r}")
    was, now = (old.get("policy") or {}).get("spec"), (new.get("policy") or {}).get("spec")
    if not same_policy(was, now):  # (the run keeps its own spelling of it)
        # a crafted manifest's spec may be 1 MB: cut
        was_text, now_text = (None if s is None else quoted_spec(s) for s in (was, now))
        raise UsageError(f"{refused}: its policy is {was_text}, this recorder's {now_text}")


def _warn_kept(old: dict[str, Any], new: dict[str, Any], path: Path) -> None:
    """Warns of a description of the run's data the resume was given otherwise than the run
    (`reward_range`, `estimator`): the run keeps its own, which every step is read with."""
    for name, unset in (("reward_range", None), ("estimator", {})):
        was, now = old.get(name), new.get(name)
        if now != unset and now != was:
            warn(  # as JSON, cut (`shown`): a crafted manifest's estimator may be 1 MB
                f"stabledrl: warning: {path}: a resumed run keeps its {name} {shown(was)}; this "
                f"recorder's {shown(now)} is not recorded (a run has one, for every step)\n"
            )


def _check_compatible(old: dict[str, Any], new: dict[str, Any], path: Path) -> None:
    check_same_run(old, new, f"cannot resume {path}")
    _warn_kept(old, new, path)
    names, given = old.get("param_names"), new.get("param_names")
    if given is not None and given != names:  # (none given: the run's are kept, as its meta)
        had = counted(len(names), "name") if isinstance(names, list) else "none"
        raise UsageError(
            f"cannot resume {path}: its param_names are not this recorder's ({had}, "
            f"{len(given)} given)"
        )


def _records_again(stopped: object, resume_from: int | None) -> bool:
    """Whether a resume from `resume_from` records again the step whose failed write stopped
    the recording (the manifest's `recording_stopped` note): then the note, which says the
    later steps are missing, goes. A resume that appends keeps it."""
    step = stopped.get("step") if isinstance(stopped, dict) else None
    return isinstance(step, int) and resume_from is not None and resume_from <= step


def resume_run(
    path: Path, manifest: dict[str, Any], rank: int, world_size: int, resume_from: int | None
) -> tuple[dict[str, Any], int | None]:
    existing = _read_manifest(path)
    _check_compatible(existing, manifest, path)
    existing.pop(RECORDING_CLOSED, None)
    last: int | None = None
    replaced: Owned = []
    step_files, notes = own_files(path / STEPS_DIR, rank, world_size)
    for file, step, temporary in step_files:
        if temporary or (resume_from is not None and step >= resume_from):
            replaced.append((file, step, temporary))
            continue
        try:
            read_header(file, deep=True)
        except StepReadError as exc:  # refused: nothing has changed, the mark stays
            raise InputError(
                f"cannot resume {path}: step {step} ({file.name}) is {exc.kind}: {exc}; "
                f"resume from step {step} or earlier"
            ) from None
        last = step if last is None else max(last, step)
    reopen_run(path, rank)  # before any step file changes
    stopped = existing.get(RECORDING_STOPPED) or {}
    if _records_again(stopped, resume_from) and rank in (0, stopped["rank"]):
        del existing[RECORDING_STOPPED]
        amend_manifest(path, RECORDING_STOPPED, None)
    elif is_stop_note(stopped) and stopped["rank"] == rank:
        resumed = {**stopped, STOP_RESUMED: True}
        with suppress(InputError):  # best effort: a manifest at its size bound keeps the note
            amend_manifest(path, RECORDING_STOPPED, resumed)
            existing[RECORDING_STOPPED] = resumed
    for note, note_rank, temporary in notes:
        kept = None if temporary else _stop_note_of(note, note_rank)
        if temporary or _records_again(kept, resume_from):
            remove_file(note)
        elif kept is not None:  # its rank records again: a reader no longer waits on the stop
            write_atomic(note, note_text({**kept, STOP_RESUMED: True}))
    rewritten = {step for _, step, temporary in replaced if not temporary}
    whole = _whole_steps(path / STEPS_DIR, world_size) if rank and rewritten else set()
    # steps a reader may have read are written again (this rank's part): a new identity, before
    # they are removed (a resume cut short there leaves it) and again once they are gone
    renew = bool(rewritten) and (rank == 0 or not rewritten.isdisjoint(whole))
    if renew:
        existing[RUN_ID] = new_run_id()
        amend_manifest(path, RUN_ID, existing[RUN_ID])
    for file, _, _ in replaced:
        remove_file(file)
    if renew:
        existing[RUN_ID] = new_run_id()
        amend_manifest(path, RUN_ID, existing[RUN_ID])
    return existing, last
