"""`pack RUN /dev/stdout --force | head -c 100`: the reader gone is a quiet stop, exit 141.

The archive piped on (docs/exit-codes.md) to a reader that closed the pipe ended with
`error: /dev/stdout: cannot write it (Broken pipe)` and exit 4 (a 600-step run, 0.48 MB), as a
full disk would: docs/exit-codes.md gives 141 and no error line for a reader of stdout that
went away."""

from __future__ import annotations

import subprocess
from pathlib import Path

from _cli import cli_command, cli_environment

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def test_an_archive_piped_to_a_reader_that_goes_away_stops_quietly() -> None:
    env = {**cli_environment(), "NO_COLOR": "1"}
    env.pop("STABLEDRL_DEBUG", None)
    script = (
        f"{' '.join(cli_command('pack', FIXTURES / 'grpo', '/dev/stdout', '--force'))}"
        ' | head -c 100 > /dev/null; echo "status=${PIPESTATUS[0]}" >&2'
    )
    done = subprocess.run(
        script, shell=True, executable="/bin/bash", env=env, capture_output=True,
        text=True, timeout=300, check=False,
    )  # fmt: skip
    lines = [line for line in done.stderr.splitlines() if "%)" not in line]
    assert lines == ["status=141"], done.stderr
