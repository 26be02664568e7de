"""A crafted manifest (up to 1 MB) may name the run's policy, estimator or source with
up to a megabyte of text: `inspect`'s run table printed each whole (folded over thousands of
lines), and `replay` its note on the run's own policy. They are cut as a meta value is, at 200
characters, their length said; `--format json` has them whole."""

from __future__ import annotations

import json
from pathlib import Path

from _corpus import edit_manifest, tiny_run
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

runner = CliRunner()
LONG = 100_000
SPEC = "grpo:eps_low=" + "x" * LONG


def _crafted(tmp_path: Path) -> Path:
    def change(manifest: dict[str, object]) -> None:
        manifest["policy"]["spec"] = SPEC  # type: ignore[index]
        manifest["estimator"] = {"kind": "e" * LONG}
        manifest["source"] = {"kind": "wandb", "path": "p" * LONG}

    return edit_manifest(tiny_run(tmp_path / "run"), change)


def test_inspect_cuts_the_policy_estimator_and_source(tmp_path: Path) -> None:
    run = _crafted(tmp_path)
    result = runner.invoke(app, ["inspect", str(run)])
    assert result.exit_code == 0, result.stderr[:300]
    assert len(result.stdout) < 20_000, len(result.stdout)
    assert result.stdout.count("characters; --format json has it whole") == 3
    whole = json.loads(runner.invoke(app, ["inspect", str(run), "--format", "json"]).stdout)
    assert whole["policy"]["spec"] == SPEC


def test_replay_cuts_the_runs_own_policy_in_its_note(tmp_path: Path) -> None:
    result = runner.invoke(app, ["replay", str(_crafted(tmp_path))])
    assert result.exit_code == 0, result.stderr[:300]
    assert len(result.stdout) < 20_000, len(result.stdout)
    assert f"({LONG + 13:,} characters; --format json has it whole)" in result.stdout
