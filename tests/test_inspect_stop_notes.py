"""`inspect` reads each rank's stop-note file once: the integrity check and the notes shown
come from one read."""

from __future__ import annotations

import collections
import json
import os
import time
from pathlib import Path

import pytest
from test_stop_notes import both_stopped  # noqa: F401  (a fixture)
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.dump._directory import DirectoryRun


@pytest.mark.parametrize("output_format", ["table", "json"])
def test_inspect_reads_each_stop_note_once(
    both_stopped: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    output_format: str,
) -> None:
    """A settled run (its steps directory last changed an hour ago, as a finished run's): one
    listing serves the whole call."""
    hour_ago = time.time() - 3600
    os.utime(both_stopped / "steps", (hour_ago, hour_ago))
    reads: collections.Counter[str] = collections.Counter()
    real = DirectoryRun._note_bytes

    def counting(self: DirectoryRun, path: Path) -> bytes:
        reads[path.name] += 1
        return real(self, path)

    monkeypatch.setattr(DirectoryRun, "_note_bytes", counting)
    result = CliRunner().invoke(app, ["inspect", str(both_stopped), "-f", output_format])
    assert result.exit_code == 0, result.output
    assert reads == {"stopped.rank-0000.json": 1, "stopped.rank-0001.json": 1}
    if output_format == "json":
        assert [n["rank"] for n in json.loads(result.stdout)["recording_stops"]] == [0, 1]
    else:
        assert "stopped at step 3 (rank 0)" in result.stdout
