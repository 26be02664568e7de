"""What a Recorder's refusal of a directory that is not empty names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import stabledrl_cli as sd
from stabledrl_cli.errors import UsageError


def test_a_run_is_named_by_its_manifest_not_a_folder_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, the first entry os.listdir gave was named: 'not empty (checkpoints)' on a run
    of the built-in example (its checkpoints listed before manifest.json on ext4), also in
    the line `record --force -- sh -c 'a && b'` gives b, while record removes that folder."""
    run = tmp_path / "run"
    with sd.Recorder(run, policy=None) as recorder:
        recorder.log_step(0, loss=1.0)
    (run / "checkpoints").mkdir()
    listdir = os.listdir
    last = "manifest.json"
    monkeypatch.setattr(os, "listdir", lambda path: sorted(listdir(path), key=lambda n: n == last))
    with pytest.raises(UsageError, match=r"is not empty \(manifest\.json\);"):
        sd.Recorder(run, policy=None)
