"""A Recorder never writes a run its readers refuse: a manifest that `open_run` would call
corrupt (a world_size past the readers' bound, a manifest past their size bound) is refused
when the Recorder is made, before anything is written (UsageError, exit 2); a run directory
the system cannot name (a name longer than the file system takes) is WriteError (exit 4)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import stabledrl_cli as sd
from stabledrl_cli._batch_inputs import WORLD_SIZE_LIMIT
from stabledrl_cli.dump._manifest import MANIFEST_LIMIT
from stabledrl_cli.errors import UsageError, WriteError


def _batch() -> dict[str, np.ndarray]:
    return {
        "logp": np.zeros(4, np.float32),
        "logp_old": np.zeros(4, np.float32),
        "advantages": np.ones(4, np.float32),
        "seq_id": np.array([0, 0, 1, 1]),
    }


LONG_NAMES = [f"{n:04}".ljust(1000, "p") for n in range(MANIFEST_LIMIT // 1000)]
"""Names of 1,000 characters, each once, past the manifest's bound together."""


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"world_size": WORLD_SIZE_LIMIT + 1}, "world_size"),
        ({"world_size": True}, "world_size"),
        ({"meta": {"notes": "x" * MANIFEST_LIMIT}}, "bytes"),
        ({"param_names": LONG_NAMES}, "bytes"),
    ],
)
def test_a_manifest_the_readers_refuse_is_refused_before_anything_is_written(
    tmp_path, kwargs, word
):
    path = tmp_path / "run"
    with pytest.raises(UsageError, match=word) as info:
        sd.Recorder(path, **kwargs)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
    assert not path.exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_every_rank_refuses_a_world_size_past_the_readers_bound(tmp_path, rank):
    with pytest.raises(UsageError, match="world_size"):
        sd.Recorder(tmp_path / "run", world_size=WORLD_SIZE_LIMIT + 1, rank=rank)


def test_the_largest_world_size_the_readers_take_is_recorded_and_read(tmp_path):
    path = tmp_path / "run"
    with sd.Recorder(path, world_size=WORLD_SIZE_LIMIT, rank=0) as rec:
        rec.log_step(0, **_batch())
    assert sd.open_run(path).manifest["world_size"] == WORLD_SIZE_LIMIT


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_close_mark_that_would_pass_the_size_bound_leaves_the_run_readable(tmp_path, world_size):
    """A manifest within its readers' bound but for the few bytes of its close mark (of one
    rank: recording_closed; of several: recording_closed_ranks too) was rewritten past it as
    its Recorders closed: every reader refused the finished run. The mark is left out."""
    small = sd.Recorder(tmp_path / "small", world_size=world_size, rank=0, meta={"notes": ""})
    room = MANIFEST_LIMIT - (small.path / "manifest.json").stat().st_size
    small.close()
    path = tmp_path / "run"
    ranks = [
        sd.Recorder(path, world_size=world_size, rank=rank, meta={"notes": "x" * (room - 8)})
        for rank in range(world_size)
    ]
    for rec in ranks:
        rec.log_step(0, **_batch())
        rec.close()
    assert (path / "manifest.json").stat().st_size <= MANIFEST_LIMIT
    assert sd.open_run(path).step_numbers == [0]


def test_a_resume_of_a_stopped_run_at_the_size_bound_appends_without_its_resumed_mark(tmp_path):
    """A killed run (no close mark) whose stop note has no room left for `resumed: true`: the
    resume that appends records on, the note as it was, the run readable."""
    path = tmp_path / "run"
    rec = sd.Recorder(path, meta={"notes": ""})
    rec.log_step(0, **_batch())
    rec.note_stop("training interrupted (Ctrl-C) after step 0", 1)
    rec.close()
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["recording_closed"]
    room = MANIFEST_LIMIT - len(json.dumps(manifest, indent=2)) - 1
    manifest["meta"]["notes"] = "x" * (room - 8)
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    with sd.Recorder(path, resume=True) as rec:
        rec.log_step(1, **_batch())
    run = sd.open_run(path)
    assert run.step_numbers == [0, 1] and "resumed" not in run.manifest["recording_stopped"]


def test_a_run_name_too_long_for_the_file_system_is_a_write_error(tmp_path):
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    path = tmp_path / ("r" * (name_max + 1))
    with pytest.raises(WriteError, match="cannot write it") as info:
        sd.Recorder(path)
    assert info.value.exit_code == 4 and "\n" not in str(info.value)
