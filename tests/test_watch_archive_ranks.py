"""`watch` on a packed archive of a run of several ranks says so, as a directory run has a
ranks line; the archive holds joined steps, so no rank's progress is left to show."""

from __future__ import annotations

import json

from test_watch import _two_rank_run
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

runner = CliRunner()


def test_watch_on_a_packed_archive_of_two_ranks_has_a_ranks_line(tmp_path):
    """The directory's view had 'ranks: 2, each at step 3'; the archive's had no ranks line
    and its JSON no word of the ranks."""
    run = _two_rank_run(tmp_path / "run", {0: range(4), 1: range(4)})
    archive = tmp_path / "run.h5"
    assert runner.invoke(app, ["pack", str(run), str(archive)]).exit_code == 0
    views = {
        path: runner.invoke(app, ["watch", str(path), "--once", "--device", "cpu"])
        for path in (run, archive)
    }
    assert all(view.exit_code == 0 for view in views.values()), views
    assert "ranks: 2, each at step 3" in views[run].stdout.splitlines()
    lines = views[archive].stdout.splitlines()
    assert "ranks: 2, joined in the packed archive (each step whole)" in lines
    data = json.loads(
        runner.invoke(
            app, ["watch", str(archive), "--once", "-f", "json", "--device", "cpu"]
        ).stdout
    )
    assert (data["ranks"], data["packed_ranks"]) == ([], 2)
    one = json.loads(
        runner.invoke(app, ["watch", str(run), "--once", "-f", "json", "--device", "cpu"]).stdout
    )
    assert one["packed_ranks"] is None
