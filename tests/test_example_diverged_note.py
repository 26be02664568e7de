"""A built-in example run whose weights went non-finite stops there; its run says so, as an
interrupted one does, rather than read as a finished run of fewer steps."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import open_run


def test_a_diverged_example_run_notes_where_its_training_stopped(tmp_path):
    """`record --rl-steps 8 --lr 1e30 --no-skip-nonfinite` stopped after 2 of its 8 steps
    ('diverged' in record's summary), and its run read 'closed: its Recorder finished' in
    inspect, a finished run of 2 steps; it now notes the stop (inspect, replay's warning)."""
    out = tmp_path / "run"
    args = ["record", "--out", str(out), "--rl-steps", "8", "--lr", "1e30", "--no-skip-nonfinite"]
    recorded = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert recorded.exit_code == 0, recorded.output
    [stop] = open_run(out).recording_stops
    assert stop["step"] == 2
    assert stop["reason"] == (
        "training stopped (its weights or outputs were not finite after step 1) at step 2, 2 of "
        "the 8 steps asked (0..7) recorded"
    )
    inspected = CliRunner().invoke(app, ["inspect", str(out), "--format", "json"])
    assert [s["step"] for s in json.loads(inspected.stdout)["recording_stops"]] == [2]
