"""`python -m stabledrl_cli.example`: train the branch the environment asks for.

The built-in example honouring the branch protocol (stabledrl_cli.branching) as a user's
trainer would: STABLEDRL_RESUME_CHECKPOINT, STABLEDRL_POLICY_OVERRIDE, STABLEDRL_RUN_DIR,
STABLEDRL_BRANCH_AT and STABLEDRL_BRANCH_STEPS name the branch; it is trained by
`train_branch`, the function `stabledrl branch` calls. Without STABLEDRL_RESUME_CHECKPOINT it
says what to set and exits 2; an error is one stderr line and its exit code.
"""

from __future__ import annotations

import sys

import torch

from stabledrl_cli.capture.branch_protocol import ENV_RESUME_CHECKPOINT, request_from_environment
from stabledrl_cli.errors import StabledrlError
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
        torch.set_num_threads(1)  # the arrays are then the same as a single-threaded record
        result = train_branch(request)
    except StabledrlError as exc:
        print(f"stabledrl: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"branch {request.policy}@{request.at}: {result.steps} steps in {request.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
