"""`watch --once` with a policy gate on a run whose recorded policy the catalogue cannot
replay: the refusal names why as the note above it does, not "not in the catalogue" for a
policy that is in it with a parameter it does not take."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "grpo"


def test_a_gate_on_an_unreplayable_own_policy_is_refused_with_the_notes_reason(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    manifest = run / "manifest.json"
    written = json.loads(manifest.read_text())
    written["policy"]["spec"] = "grpo:clip=7"
    manifest.write_text(json.dumps(written))

    result = CliRunner().invoke(app, ["watch", str(run), "--once", "--max-discard-frac", "0.1"])

    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert "unknown" in lines[0] and "'clip'" in result.stderr  # the note: why
    assert lines[-1] == (
        f"error: {run}: --max-discard-frac need(s) the own policy replayed, and the run's "
        "policy 'grpo:clip=7' is none the catalogue replays (the note above says why); gate "
        "it with --max-spikes, --max-nonfinite or --fail-on-collapse"
    )
    assert "not in the catalogue" not in result.stderr
