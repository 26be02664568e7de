"""The run directory and the --force switch that `stabledrl record -- CMD` exports to its
command ($STABLEDRL_RUN_DIR, $STABLEDRL_FORCE; a script or a launcher may set them itself).
Ground floor: read by the Recorder (dump/), the bootstrap and the integrations alike, so that
--force means one thing to every Recorder that opens record's run."""

from __future__ import annotations

import os

from stabledrl_cli.errors import UsageError

ENV_RUN_DIR = "STABLEDRL_RUN_DIR"
ENV_FORCE = "STABLEDRL_FORCE"
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
            f"${ENV_FORCE}={text!r}: not a switch; give 1 to replace an existing run (or "
            "true, yes, on), 0 not to (or false, no, off, nothing)"
        )
    return value in FORCE_ON


def forced_run(path: str | os.PathLike[str]) -> bool:
    """Whether a Recorder that opens `path` without saying `overwrite` replaces the run there:
    `path` is $STABLEDRL_RUN_DIR (`stabledrl record --out`) and $STABLEDRL_FORCE is on
    (`--force`). The first such Recorder of the process takes the switch out of its
    environment: it is this run's, not a later one's (a second Recorder there, or a process
    started later, finds the new run and does not replace its steps)."""
    run_dir = os.environ.get(ENV_RUN_DIR)
    if not run_dir or os.path.realpath(path) != os.path.realpath(run_dir):
        return False
    return env_force(take=True)
