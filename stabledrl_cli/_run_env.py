"""The run directory and the --force switch that `stabledrl record -- CMD` exports to its
command ($STABLEDRL_RUN_DIR, $STABLEDRL_FORCE; a script or a launcher may set them itself).
Ground floor: read by the Recorder (dump/), the bootstrap and the integrations alike, so that
--force means one thing to every Recorder that opens record's run."""

from __future__ import annotations

import errno
import os
from contextlib import suppress

from stabledrl_cli.errors import UsageError, quoted

ENV_RUN_DIR = "STABLEDRL_RUN_DIR"
ENV_FORCE = "STABLEDRL_FORCE"
ENV_RANKS_DIR = "STABLEDRL_RANKS_DIR"
"""A directory of `record`'s for the command's processes (`capture.bootstrap`), where a
Recorder that replaces record's run under --force also says so (`forced_run`), and one that
overwrites it leaves `OVERWRITTEN` (`note_overwrite`)."""
OVERWRITTEN = "overwritten"
"""The file of $STABLEDRL_RANKS_DIR that says a Recorder of the command overwrote record's run
(`note_overwrite`)."""
FORCE_ON = ("1", "true", "yes", "on")
FORCE_OFF = ("", "0", "false", "no", "off")
"""$STABLEDRL_FORCE's spellings (any case, spaces aside): replace an existing run, or not."""


def env_force(*, take: bool = False) -> bool:
    """$STABLEDRL_FORCE as a switch (`FORCE_ON`, `FORCE_OFF`; unset: off); take: remove it from
    the environment too. Any other text is a UsageError naming it: `false` or a typo must
    never replace a run."""
    text = os.environ.pop(ENV_FORCE, "") if take else os.environ.get(ENV_FORCE, "")
    value = text.strip().lower()
    if value not in FORCE_ON + FORCE_OFF:
        raise UsageError(
            f"${ENV_FORCE}={quoted(text)}: not a switch; give 1 to replace an existing run (or "
            "true, yes, on), 0 not to (or false, no, off, nothing)"
        )
    return value in FORCE_ON


def records_out(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is the run directory of a `stabledrl record` whose command this process
    belongs to: $STABLEDRL_RUN_DIR, exported by record with $STABLEDRL_RANKS_DIR (a script or
    a launcher that sets the first itself runs under no `record`)."""
    return bool(os.environ.get(ENV_RANKS_DIR)) and _is_run_dir(path)


def _is_run_dir(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is $STABLEDRL_RUN_DIR."""
    run_dir = os.environ.get(ENV_RUN_DIR)
    return (
        run_dir is not None
        and run_dir != ""
        and os.path.realpath(path) == os.path.realpath(run_dir)
    )


def forced_run(path: str | os.PathLike[str], rank: int) -> bool:
    """Whether a Recorder of `rank` that opens `path` without saying `overwrite` replaces the
    run there: `path` is $STABLEDRL_RUN_DIR (`stabledrl record --out`) and $STABLEDRL_FORCE is
    on (`--force`). The first such Recorder of the process takes the switch out of its
    environment: it is this run's, not a later one's (a second Recorder there, or a process
    started later, finds the new run and does not replace its steps). Under `record`, it is
    the first of the command's processes too (a file of the rank's in $STABLEDRL_RANKS_DIR):
    a second process that records the rank (`python a.py && python b.py`) finds the steps the
    first recorded, which --force does not replace."""
    if not _is_run_dir(path) or not env_force(take=True):
        return False
    replaced = os.environ.get(ENV_RANKS_DIR)
    if not replaced:
        return True
    switch = os.path.join(replaced, _replaced_name(rank))
    try:
        os.close(os.open(switch, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    except OSError as exc:  # record's directory gone: its command outlived it
        return exc.errno != errno.ENOENT
    _TAKEN_HERE.add(switch)
    return True


_TAKEN_HERE: set[str] = set()
"""The files of $STABLEDRL_RANKS_DIR that a Recorder of this process made (`forced_run`)."""


def force_taken(rank: int) -> bool:
    """Whether a Recorder of an earlier process of `stabledrl record`'s command took --force
    for `rank` (`forced_run`): a later one of the rank finds the run that one recorded (not
    one of this process, whose second Recorder finds its first's)."""
    replaced = os.environ.get(ENV_RANKS_DIR)
    if not replaced:
        return False
    switch = os.path.join(replaced, _replaced_name(rank))
    return switch not in _TAKEN_HERE and os.path.lexists(switch)


def _replaced_name(rank: int) -> str:
    """The file of $STABLEDRL_RANKS_DIR that says a Recorder of `rank` took --force."""
    return f"replaced.rank-{rank}"


def note_overwrite(path: str | os.PathLike[str]) -> None:
    """Tells `stabledrl record` that a Recorder of its command overwrites record's run at
    `path` (overwrite=True: the old run's files go, a new manifest comes): `OVERWRITTEN` in
    $STABLEDRL_RANKS_DIR, before any file changes. record then removes the old run's
    checkpoints and branch runs, which a resumed run keeps. A no-op for another path, or
    outside `record`; best effort (record's directory gone: a command that outlived it)."""
    if records_out(path):
        ranks_dir = os.environ[ENV_RANKS_DIR]
        with suppress(OSError):
            os.close(os.open(os.path.join(ranks_dir, OVERWRITTEN), os.O_CREAT | os.O_WRONLY))
