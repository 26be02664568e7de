"""A full disk that refuses a step and then the manifest's `recording_stopped` note: the note
is written again as the Recorder closes, before the run is marked closed. Before: the run of
16 of 200 steps (`record -- CMD` on a 200 KiB tmpfs) read as a closed, whole recording, with
no word of the stop (`inspect`: 'closed: its Recorder finished'): the closed mark, written
after the failed step's file was removed, found room the note had not."""

from __future__ import annotations

from pathlib import Path

import pytest

import stabledrl_cli.dump._recorder_end as recorder_end
import stabledrl_cli.dump._step_writes as step_writes
from stabledrl_cli.dump import Recorder, open_run
from stabledrl_cli.dump._manifest import RECORDING_CLOSED
from stabledrl_cli.dump._stop_notes import RECORDING_STOPPED
from stabledrl_cli.errors import WriteError

BATCH = {"logp": [-1.0], "logp_old": [-1.0], "advantages": [1.0]}


def _full_disk_at(monkeypatch: pytest.MonkeyPatch, step: int, manifest_refusals: int) -> None:
    """The write of `step`'s file fails, and the next `manifest_refusals` manifest writes
    (the stop note's and the closed mark's alike)."""
    write, amend = step_writes.write_step, step_writes.amend_manifest
    refusals = [manifest_refusals]

    def write_step(directory, name, *args, **kwargs):
        if name == f"step-{step:08d}.safetensors":
            raise WriteError(f"{directory}/{name}: cannot write it (no space left on device)")
        return write(directory, name, *args, **kwargs)

    def amend_manifest(path, name, value):
        if refusals[0] > 0:
            refusals[0] -= 1
            raise WriteError(f"{path}: cannot write it (no space left on device)")
        return amend(path, name, value)

    monkeypatch.setattr(step_writes, "write_step", write_step)
    for module in (step_writes, recorder_end):
        monkeypatch.setattr(module, "amend_manifest", amend_manifest)


def _record(path: Path) -> None:
    with Recorder(path, unit="sequence", on_write_error="warn") as recorder:
        for step in range(6):
            recorder.log_step(step, **BATCH)


def test_a_refused_stop_note_is_written_as_the_run_closes(monkeypatch, tmp_path):
    _full_disk_at(monkeypatch, step=3, manifest_refusals=1)
    _record(tmp_path / "run")
    manifest = open_run(tmp_path / "run").manifest
    assert manifest[RECORDING_STOPPED]["step"] == 3
    assert "no space left on device" in manifest[RECORDING_STOPPED]["reason"]
    assert manifest.get(RECORDING_CLOSED) is True
    assert open_run(tmp_path / "run").step_numbers == [0, 1, 2]


def test_a_run_whose_stop_cannot_be_noted_is_not_marked_closed(monkeypatch, tmp_path):
    """Unclosed, it reads as a recording that ended unmarked, never as a whole one."""
    _full_disk_at(monkeypatch, step=3, manifest_refusals=2)
    _record(tmp_path / "run")
    manifest = open_run(tmp_path / "run").manifest
    assert RECORDING_STOPPED not in manifest and RECORDING_CLOSED not in manifest
