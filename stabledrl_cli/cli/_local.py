"""Commands that read a run only at a local path (`watch`, `branch`): a URL is refused in one line
(exit 2) naming the commands that do read one, instead of being taken for a path. Outputs are
local paths too (`pack`'s archive, the run of `record`, `import`, `branch`): a URL is refused,
never written as a local directory named after its scheme (`./s3:/bucket/run`)."""

from __future__ import annotations

import os
from pathlib import Path

from stabledrl_cli._url import is_url, redacted
from stabledrl_cli.errors import UsageError

URL_READERS = "replay, check, inspect, diff, tune and pack read a run at a URL"


def local_run(run: str, command: str, why: str) -> Path:
    """`run` as a local path; UsageError when it is a URL (`why`: what `command` needs a
    local run for) or empty."""
    if is_url(run):
        raise UsageError(
            f"{redacted(run)}: {command} takes a local path, not a URL ({why}); {URL_READERS}"
        )
    return Path(_given(run, command, "the run"))


def local_output(value: str, command: str, what: str) -> Path:
    """`value`, where `command` writes `what`, as a local path; UsageError when it is a URL
    or empty."""
    if is_url(value):
        raise UsageError(f"{redacted(value)}: {command} writes {what} to a local path, not a URL")
    return Path(_given(value, command, what))


def _given(value: str, command: str, what: str) -> str:
    """`value`, refused when empty: Path("") is the working directory, which no one means (a
    script's unset variable)."""
    if not value:
        raise UsageError(f"{command}: the path of {what} is empty; {EMPTY_PATH}")
    return value


EMPTY_PATH = "give a path (an empty one would be the working directory)"


def check_not_in_a_run(out: Path) -> None:
    """UsageError when --out (of `record`, `import`) lies in the steps, checkpoints or branches
    folder of a run (a folder above it holding a manifest, a branch run's too), as `branch
    --out` is refused: the run would hold a file that is not its own."""
    from stabledrl_cli.capture.branch_protocol import check_outside_run_folders
    from stabledrl_cli.dump._file_names import MANIFEST_NAME

    # realpath, not resolve: a symlink loop raises RuntimeError there (Python < 3.13); it is
    # left for the writes to refuse (a loop is no run's folder)
    for parent in (*out.parents, *Path(os.path.realpath(out)).parents):  # as given first
        if os.path.lexists(parent / MANIFEST_NAME):
            check_outside_run_folders(out, parent, what="a run", run=str(parent), given="--out")
