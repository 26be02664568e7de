"""`python -m stabledrl_cli.example`: train the branch the environment asks for.

The built-in example honouring the branch protocol (stabledrl_cli.branching) as a user's
trainer would: STABLEDRL_RESUME_CHECKPOINT, STABLEDRL_POLICY_OVERRIDE, STABLEDRL_RUN_DIR,
STABLEDRL_BRANCH_AT and STABLEDRL_BRANCH_STEPS name the branch; it is trained by
`train_branch`, the function `stabledrl branch` calls. A STABLEDRL_RUN_DIR that is not empty
is refused unless STABLEDRL_FORCE is on (`capture.bootstrap.env_force`, as the integrations
read it): then the branch replaces the run in it, but for the run of the checkpoint
(RUN/checkpoints/step-XXXXXXXX.pt), which a branch never replaces or writes into, as
`stabledrl branch` refuses it. Without STABLEDRL_RESUME_CHECKPOINT it says
what to set and exits 2; an error is one stderr line and its exit code, as the `stabledrl`
commands give it (Ctrl-C: `interrupted`, 130, the steps trained so far recorded and the run
closed; STABLEDRL_DEBUG=1: the traceback instead).
"""

from __future__ import annotations

import os
import sys
import traceback

import torch

from stabledrl_cli.capture.bootstrap import ENV_FORCE, ENV_RUN_DIR, env_force
from stabledrl_cli.capture.branch_protocol import (
    CHECKPOINTS_DIR,
    ENV_RESUME_CHECKPOINT,
    check_not_the_original,
    request_from_environment,
)
from stabledrl_cli.dump._run_target import directory_or_nothing
from stabledrl_cli.errors import DEBUG_ENV, UsageError, exit_code_for
from stabledrl_cli.example.branch import train_branch


def main() -> int:
    """Trains the requested branch; -> the exit code."""
    try:
        request = request_from_environment()
        if request is None:
            print(
                f"stabledrl: error: set {ENV_RESUME_CHECKPOINT} and the other branch variables "
                "(docs/branching.md); to record the example, use `stabledrl record`",
                file=sys.stderr,
            )
            return 2
        force = env_force()
        run_dir = request.run_dir
        checkpoints = request.checkpoint.parent
        if checkpoints.name == CHECKPOINTS_DIR:  # a run's: never replaced by its branch
            check_not_the_original(run_dir, checkpoints.parent, given=ENV_RUN_DIR)
        if not force and directory_or_nothing(run_dir, str(run_dir)) and any(run_dir.iterdir()):
            raise UsageError(f"{run_dir} is not empty; set {ENV_FORCE}=1 to replace the run in it")
        torch.set_num_threads(1)  # the arrays are then the same as a single-threaded record
        result = train_branch(request, force=force)
    except (Exception, KeyboardInterrupt) as exc:
        code, message = exit_code_for(exc)
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exception(exc, file=sys.stderr)
        else:
            print(f"stabledrl: error: {message}", file=sys.stderr)
        return code
    print(f"branch {request.policy}@{request.at}: {result.steps} steps in {request.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
