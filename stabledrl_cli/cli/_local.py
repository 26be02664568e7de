"""Commands that read a run only at a local path (`watch`, `branch`): a URL is refused in one line
(exit 2) naming the commands that do read one, instead of being taken for a path. Outputs are
local paths too (`pack`'s archive, the run of `record`, `import`, `branch`): a URL is refused,
never written as a local directory named after its scheme (`./s3:/bucket/run`)."""

from __future__ import annotations

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
