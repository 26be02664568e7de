"""`watch --once` with a live watch's option: `--once --until-idle 600` (a cron job meaning to
wait for the run) answered at once, exit 0, the option dropped unsaid. It is a usage error."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--until-idle", "600"], "--until-idle"),
        (["--interval", "30"], "--interval"),
        (["--interval", "30", "--until-idle", "0"], "--interval, --until-idle"),
    ],
)
def test_once_refuses_the_options_of_a_live_watch(tmp_path, options, named):
    result = CliRunner().invoke(app, ["watch", str(tmp_path), "--once", *options])
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {named}: for a live watch; --once reads the run once, as it is now\n"
    )
