"""`branch` on a folder that holds no run says so, as every command does, not that 'the run has
no checkpoints' and to record it with --checkpoint-every (there is no run to record again)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app


@pytest.mark.parametrize("contents", [[], ["notes.txt"], ["checkpoints/"]])
def test_a_folder_that_is_no_run_is_named_as_none(tmp_path: Path, contents: list[str]):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in contents:
        if name.endswith("/"):
            (folder / name).mkdir()
        else:
            (folder / name).write_text("mine\n")
    result = CliRunner().invoke(app, ["branch", str(folder), "--at", "8", "-p", "grpo"])
    assert result.exit_code == 3, result.output
    assert result.stderr == f"error: {folder} is not a run: it has no manifest.json\n"
