"""What `stabledrl record --out` refuses beside its own recording there: an integration given
another run directory (`refuse_another_run_dir`), and a Recorder of the script's own, told
how record records it (`records_its_out`)."""

from __future__ import annotations

import os

from stabledrl_cli._run_env import ENV_RUN_DIR
from stabledrl_cli.errors import UsageError

ENV_OPTIMIZER_HOOKS = "STABLEDRL_OPTIMIZER_HOOKS"
""""0": the sitecustomize installs no optimizer hooks (`record --no-optimizer-hooks`)."""


def records_its_out() -> str:
    """What a Recorder of record's --out refused in this process is told
    (`holds_in_this_process`): record's own Recorder holds it, and how to record with one's
    own instead."""
    if os.environ.get(ENV_OPTIMIZER_HOOKS) == "0":
        how = "log_policy_batch; a script that opens a Recorder of its own there calls none"
    else:
        how = (
            "its optimizer hooks; a script that opens a Recorder of its own there runs under "
            "`stabledrl record --no-optimizer-hooks`"
        )
    return f"`stabledrl record` records its --out with {how}"


def refuse_another_run_dir(out: str | os.PathLike[str], given_as: str, leave_out: str) -> None:
    """UsageError when `stabledrl record --out` set $STABLEDRL_RUN_DIR and `out`, the run
    directory an integration was given, names another directory: record's optimizer hooks
    stand down for the integration, so record would find no step in its own. `given_as`: how
    `out` was given (`install(out=mine)`); `leave_out`: how to leave it out."""
    env = os.environ.get(ENV_RUN_DIR)
    if env and os.path.realpath(out) != os.path.realpath(env):
        raise UsageError(
            f"{given_as} is not the run directory of `stabledrl record --out` "
            f"(${ENV_RUN_DIR}), {env}: {leave_out} (it defaults to record's --out) or give "
            "both the same directory"
        )
