"""`stabledrl record --out DIR -- CMD`, once the command ended: what is made of the run it
left. A run of several ranks is checked against the ranks the command announced
(`check_ranks`: one that wrote no step is an error, steps missing a rank's file a warning),
and a failing exit code is noted in a run its Recorder closed without a stop note
(`note_exit_code`)."""

from __future__ import annotations

import itertools
import os
from contextlib import suppress
from pathlib import Path

from rich.markup import escape

from stabledrl_cli._process import how_it_ended
from stabledrl_cli.capture._site.stabledrl_ranks import announced_rank
from stabledrl_cli.cli._output import err
from stabledrl_cli.dump._file_names import canonical_step
from stabledrl_cli.dump._manifest import RECORDING_CLOSED
from stabledrl_cli.dump._manifest_edits import amend_manifest, manifest_now
from stabledrl_cli.dump._stop_notes import RECORDING_STOPPED
from stabledrl_cli.errors import InputError, UsageError, WriteError


def note_exit_code(out: Path, code: int, files: list[str]) -> None:
    """Notes in the run that the training command exited with error `code` (a script's
    `sys.exit(3)`, which raises no exception the recording process could note) when its
    Recorder closed it with no stop note: closed and unnoted, it would read as a whole
    training. A run of several ranks is marked closed by the last rank to close, and noted
    too when every rank's Recorder closed without the mark (`_ranks_closed`) and none noted a
    stop (a rank that raised under
    `torch.multiprocessing.spawn`, whose wrapper catches the error and calls `sys.exit(1)`).
    The note is the one an uncaught exception gives, after the last step of the run's step
    `files` (`training command exited with code 3 after step 2`). Best effort: a run that
    cannot be read or amended is left as it is."""
    try:
        manifest = manifest_now(out)
        if RECORDING_STOPPED in manifest:
            return
        if manifest.get(RECORDING_CLOSED) is not True and not _ranks_closed(out, manifest):
            return
        steps = [found[0] for found in map(canonical_step, files) if found]
        if steps:
            last = max(steps)
            reason = f"training command {how_it_ended(code)} after step {last}"
            amend_manifest(out, RECORDING_STOPPED, {"step": last + 1, "rank": 0, "reason": reason})
    except (InputError, ValueError, WriteError):
        pass


def _ranks_closed(out: Path, manifest: dict[str, object]) -> bool:
    """Whether the run at `out` (its `manifest`) is of several ranks whose Recorders all
    closed, none noting a stop: no rank's lock file is left (a killed Recorder leaves its
    own), no rank's stop note file is in steps/. False where the locks cannot be told."""
    from stabledrl_cli.dump._file_names import STEPS_DIR, STOP_NOTE_RE
    from stabledrl_cli.dump._writer_lock import writer_states

    world_size = manifest.get("world_size")
    if not isinstance(world_size, int) or world_size < 2:
        return False
    steps = out / STEPS_DIR
    if writer_states(steps) != {}:
        return False
    try:
        return not any(STOP_NOTE_RE.match(name) for name in os.listdir(steps))
    except OSError:
        return False


def _world_size(out: Path, name: str) -> int | None:
    """The world_size that the step file `name` says it was written in; None when it is no
    rank's file, or cannot say (readers report such a file themselves)."""
    from stabledrl_cli._batch_inputs import WORLD_SIZE_LIMIT
    from stabledrl_cli.dump._file_names import STEPS_DIR
    from stabledrl_cli.dump._integrity import StepReadError
    from stabledrl_cli.dump._schema import META_WORLD_SIZE
    from stabledrl_cli.dump._stfile import read_header

    try:
        header = read_header(out / STEPS_DIR / name, deep=False)
    except StepReadError:
        return None
    said = header.metadata.get(META_WORLD_SIZE, "")
    world_size = int(said) if said.isascii() and said.isdigit() else 0
    return world_size if 1 < world_size <= WORLD_SIZE_LIMIT else None


def _ranks_named(ranks: list[int]) -> str:
    """`[1, 3]`, at most five ranks, then how many more."""
    more = f" and {len(ranks) - 5} more" if len(ranks) > 5 else ""
    return f"{ranks[:5]}{more}"


def announced_ranks(directory: Path) -> set[tuple[int, int]]:
    """The (rank, world_size) of each process of the command that announced itself as a rank
    in `directory` (bootstrap.ENV_RANKS_DIR): a file each, named by
    `stabledrl_ranks.rank_file_name`; none when the command removed the directory; at most
    ANNOUNCED_LIMIT entries are read, and a name that is no rank's is no announcement."""
    announced = set()
    with suppress(OSError), os.scandir(directory) as entries:
        for entry in itertools.islice(entries, ANNOUNCED_LIMIT):
            rank = announced_rank(entry.name)
            if rank is not None:
                announced.add(rank)
    return announced


ANNOUNCED_LIMIT = 1 << 16
"""Entries of the ranks directory read: each rank of a run of 4096 (the most a run has) is one,
and a launcher that runs as a rank of its own (a node's number) adds one more."""


def check_ranks(
    out: Path,
    names: list[str],
    new: list[str],
    launched: set[tuple[int, int]],
    *,
    failed: bool = False,
) -> None:
    """After the command, of a run of several ranks: a warning line naming the steps that the
    ranks the command launched (`launched`: `announced_ranks`) wrote and that miss one of
    their files (readers skip them: a rank that crashed, say); before it, for a command that
    exited 0 (not `failed`), UsageError when such a rank holds no step file (no step of the
    run is whole: readers skip every one, and without rank 0 the run has no manifest). The
    run's other ranks run elsewhere (another node's `record`, into the same directory or its
    own) and are left alone; so is a rank that holds step files of an earlier recording only
    (a job relaunched in part under --force)."""
    from stabledrl_cli.dump._file_names import canonical_step

    files = [found for found in map(canonical_step, names) if found is not None]
    written = [name for name in new if ".rank-" in name and canonical_step(name) is not None]
    world_size = _world_size(out, written[0]) if written else None
    if world_size is None:
        return
    here = {rank for rank, size in launched if size == world_size and rank < world_size}
    ranks = {rank for _, rank in files}
    silent = sorted(here - ranks)
    if silent and not failed:
        raise UsageError(
            f"rank(s) {_ranks_named(silent)} of the run's {world_size} recorded no step: no "
            f"step of {out} is whole (the other ranks wrote {len(files)} step file(s)), so "
            "readers skip every one"
        )
    by_step: dict[int, set[int]] = {}
    for step, rank in files:
        by_step.setdefault(step, set()).add(rank)
    mine = [found for found in map(canonical_step, written) if found and found[1] in here]
    torn = sorted({step for step, _ in mine if not here <= by_step[step]})
    if torn:
        first = sorted(here - by_step[torn[0]])
        err.print(
            f"[yellow]warning:[/] {len(torn)} step(s) the command recorded are incomplete "
            f"(step {torn[0]}: incomplete, no file for rank(s) {_ranks_named(first)}): "
            f"readers skip them; `stabledrl inspect {escape(str(out))}` lists them",
            highlight=False,
            markup=True,
        )
