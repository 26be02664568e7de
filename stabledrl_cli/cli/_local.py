"""Commands that read a run only at a local path (`watch`, `branch`): a URL is refused in one line
(exit 2) naming the commands that do read one, instead of being taken for a path. Outputs are
local paths too (`pack`'s archive, the run of `record`, `import`, `branch`): a URL is refused,
never written as a local directory named after its scheme (`./s3:/bucket/run`)."""

from __future__ import annotations

from pathlib import Path

from stabledrl_cli.dump._remote import is_url
from stabledrl_cli.errors import UsageError

URL_READERS = "replay, check, inspect, diff, tune and pack read a run at a URL"


def local_run(run: str, command: str, why: str) -> Path:
    """`run` as a local path; UsageError when it is a URL (`why`: what `command` needs a
    local run for)."""
    if is_url(run):
        raise UsageError(f"{run}: {command} takes a local path, not a URL ({why}); {URL_READERS}")
    return Path(run)


def local_output(value: str, command: str, what: str) -> Path:
    """`value`, where `command` writes `what`, as a local path; UsageError when it is a URL."""
    if is_url(value):
        raise UsageError(f"{value}: {command} writes {what} to a local path, not a URL")
    return Path(value)
