"""watch, diff and the follower they replay with (`incremental.OwnReplay`) refuse a run as
replay does: an archive whose index fails its checksum is named as the reason no step could be
read (not a skipped step, not runs that "share no step"), in replay's words."""

from __future__ import annotations

from pathlib import Path

import pytest
from _cli import run_cli_together
from _corpus import edit_archive, flip_index


def _index_failure(tmp_path: Path, name: str = "steps/step") -> Path:
    """An archive of a 3-step run with one bit of index `name` flipped (its CRC as packed)."""
    folder = tmp_path / name.replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    return edit_archive(folder, flip_index(name))


def _refusal(archive: Path, name: str = "steps/step") -> str:
    return (
        f"error: {archive}: no step could be read (archive index {name}: checksum mismatch; "
        "every step is skipped)"
    )


@pytest.mark.parametrize("index", ["steps/step", "scalars/grad_norm"])
def test_watch_names_an_archive_index_that_fails_its_checksum(tmp_path, index):
    """It said "warning: skipped 1 unreadable step of RUN.h5 (archive index ...)" then
    "error: RUN.h5: the run has no readable step yet": no step file was skipped, and none
    will be readable later."""
    archive = _index_failure(tmp_path, index)
    once, followed = run_cli_together(
        ["watch", archive, "--once", "--device", "cpu"],
        ["watch", archive, "--until-idle", "0", "--interval", "0.1", "--device", "cpu"],
    )
    assert once.returncode == followed.returncode == 3, (once.stderr, followed.stderr)
    assert once.stderr.strip().splitlines() == [_refusal(archive, index)]
    followed_lines = followed.stderr.strip().splitlines()
    assert followed_lines[-1] == _refusal(archive, index)
    assert not any(line.startswith("warning") for line in followed_lines)
