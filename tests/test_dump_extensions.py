"""Format 1.1: per-sequence micro_batch and group_split, the manifest's group_ids; format 1.3:
a sequence run's token_count; the oldest-version rule; a directory and a packed archive read
them alike."""

from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pytest
import torch

import stabledrl_cli as sd
from stabledrl_cli.dump import pack_run
from stabledrl_cli.errors import InputError, UsageError


def _batch(rows: int = 4, cols: int = 3, value: float = -1.0) -> dict:
    return {
        "logp": torch.full((rows, cols), value),
        "logp_old": torch.full((rows, cols), -1.0),
        "advantages": torch.linspace(-1.0, 1.0, rows),
    }


def test_micro_batch_and_group_split_round_trip_directory_and_archive(tmp_path):
    path = tmp_path / "run"
    with sd.Recorder(path) as rec:
        rec.log_step(
            0,
            **_batch(),
            group_id=np.array([0, 0, 1, 1]),
            micro_batch=torch.tensor([0, 0, 1, 1]),
            group_split=np.array([False, False, True, True]),
        )
        rec.log_step(1, **_batch())  # a step without them
    archive = tmp_path / "run.h5"
    pack_run(sd.open_run(path), archive)
    for run in (sd.open_run(path), sd.open_run(archive)):
        step = run.step(0)
        assert {"micro_batch", "group_split"} <= step.fields
        assert step["micro_batch"].dtype == torch.int32
        assert step["micro_batch"].tolist() == [0, 0, 1, 1]
        assert step["group_split"].dtype == torch.uint8
        assert step["group_split"].tolist() == [0, 0, 1, 1]
        assert "micro_batch" not in run.step(1) and run.step(1).get("group_split") is None
    # A step that uses a 1.1 field says so; one that does not stays 1.0, as does the manifest.
    header = (path / "steps" / "step-00000000.safetensors").read_bytes()
    assert b'"_format_version":"1.1"' in header
    assert b'"_format_version":"1.0"' in (path / "steps" / "step-00000001.safetensors").read_bytes()
    assert sd.open_run(path).manifest["format_version"] == "1.0"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"micro_batch": np.array([0, 1, 2])}, "micro_batch: 3 entries"),
        ({"micro_batch": np.array([0.0, 0.0, 1.0, 1.0])}, "micro_batch: expected an integer"),
        ({"micro_batch": np.array([0, -1, 0, 0])}, "micro_batch: ids must be >= 0"),
        ({"micro_batch": np.zeros((4, 2), np.int64)}, r"micro_batch: expected shape \[N\]"),
        ({"group_split": np.array([0, 2, 0, 0])}, "group_split: values must be 0 or 1"),
        ({"group_split": np.array([True, False])}, "group_split: 2 entries"),
        ({"group_split": np.array(["a"] * 4)}, "group_split: expected bool"),
    ],
)
def test_log_step_checks_the_new_fields(tmp_path, change, message):
    with sd.Recorder(tmp_path / "run") as rec, pytest.raises(UsageError, match=message):
        rec.log_step(0, **_batch(), **change)


def _two_ranks(path, group_ids: str) -> None:
    recorders = [sd.Recorder(path, world_size=2, rank=r, group_ids=group_ids) for r in (0, 1)]
    for rank, rec in enumerate(recorders):
        rec.log_step(
            0,
            **_batch(value=-1.0 - rank),
            # Rank 0 holds prompt groups 3 and 7; rank 1 holds the rest of 7 and group 9.
            group_id=np.array([3, 3, 7, 7]) if rank == 0 else np.array([7, 7, 9, 9]),
            micro_batch=np.array([0, 0, 1, 1]),
            group_split=np.array([0, 0, 1, 1]) if rank == 0 else np.array([1, 1, 0, 0]),
        )
    for rec in recorders:
        rec.close()


def test_two_rank_join_offsets_micro_batch_and_leaves_global_group_ids(tmp_path):
    path = tmp_path / "global"
    _two_ranks(path, "global")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["group_ids"] == "global" and manifest["format_version"] == "1.1"
    archive = tmp_path / "global.h5"
    # small: Fletcher32 everywhere, no per-step checksums (which say 2.0 whatever the run)
    pack_run(sd.open_run(path), archive, compression="small")
    with h5py.File(archive, "r") as handle:
        assert handle.attrs["format_version"] == "1.1"
    for run in (sd.open_run(path), sd.open_run(archive)):
        assert run.group_ids == "global"
        step = run.step(0)
        assert step["micro_batch"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # rank 1 past rank 0
        assert step["group_id"].tolist() == [3, 3, 7, 7, 7, 7, 9, 9]  # group 7 stays one group
        assert step["group_split"].tolist() == [0, 0, 1, 1, 1, 1, 0, 0]
        assert step["seq_id"].tolist() == [i for i in range(8) for _ in range(3)]


def test_two_rank_join_offsets_per_rank_group_ids(tmp_path):
    path = tmp_path / "per_rank"
    _two_ranks(path, "per_rank")
    run = sd.open_run(path)
    assert run.group_ids == "per_rank" and run.manifest["format_version"] == "1.0"
    step = run.step(0)
    assert step["group_id"].tolist() == [3, 3, 7, 7, 15, 15, 17, 17]  # rank 1 offset by 8
    assert step["micro_batch"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_runs_without_the_new_fields_read_as_before(tmp_path):
    """A 1.0 manifest has no group_ids: per_rank, as it always was."""
    path = tmp_path / "old"
    _two_ranks(path, "per_rank")
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["group_ids"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    run = sd.open_run(path)
    assert run.group_ids == "per_rank"
    assert run.step(0)["group_id"].tolist() == [3, 3, 7, 7, 15, 15, 17, 17]


def test_group_ids_is_checked(tmp_path):
    with pytest.raises(UsageError, match="group_ids 'mine' is not one of: per_rank, global"):
        sd.Recorder(tmp_path / "run", group_ids="mine")
    with sd.Recorder(tmp_path / "run") as rec:
        rec.log_step(0, **_batch())
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    (tmp_path / "run" / "manifest.json").write_text(json.dumps({**manifest, "group_ids": 1}))
    with pytest.raises(InputError, match="corrupt manifest: group_ids must be per_rank or global"):
        sd.open_run(tmp_path / "run")


def _sequences(counts: object) -> dict:
    summed = np.array([-6.0, -12.0, -0.0, -3.0])
    return {"logp": summed, "logp_old": summed, "advantages": np.ones(4), "token_count": counts}


def test_token_count_round_trips_directory_and_archive(tmp_path):
    """A 1.3 field: the step that records it says 1.3, the manifest and a step without it stay
    1.0; two ranks' counts are joined in rank order; pack keeps them."""
    path = tmp_path / "run"
    recorders = [
        sd.Recorder(path, unit="sequence", world_size=2, rank=r, policy="grpo") for r in (0, 1)
    ]
    for rank, rec in enumerate(recorders):
        rec.log_step(0, **_sequences(torch.tensor([6, 12, 0, 3]) + rank))
        rec.log_step(1, **_sequences(None))
        rec.close()
    header = (path / "steps" / "step-00000000.rank-0000.safetensors").read_bytes()
    assert b'"_format_version":"1.3"' in header
    step_1 = (path / "steps" / "step-00000001.rank-0001.safetensors").read_bytes()
    assert b'"_format_version":"1.0"' in step_1
    assert sd.open_run(path).manifest["format_version"] == "1.0"
    small, fast = tmp_path / "small.h5", tmp_path / "fast.h5"
    pack_run(sd.open_run(path), small, compression="small")
    pack_run(sd.open_run(path), fast)
    with h5py.File(small, "r") as handle:
        assert handle.attrs["format_version"] == "1.3"
    for run in (sd.open_run(path), sd.open_run(small), sd.open_run(fast)):
        step = run.step(0)
        assert step["token_count"].dtype == torch.int32
        assert step["token_count"].tolist() == [6, 12, 0, 3, 7, 13, 1, 4]
        assert "token_count" not in run.step(1).fields


def test_token_count_accepts_whole_floats(tmp_path):
    """A float mask's sum is a count too: stored as int32."""
    with sd.Recorder(tmp_path / "run", unit="sequence") as rec:
        rec.log_step(0, **_sequences(torch.tensor([6.0, 12.0, 0.0, 3.0])))
    assert sd.open_run(tmp_path / "run").step(0)["token_count"].tolist() == [6, 12, 0, 3]


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        (np.array([6, -1, 0, 3]), "token_count: counts must be >= 0, got -1"),
        (np.array([6.0, 2.5, 0.0, 3.0]), "token_count: counts must be whole numbers, got 2.5"),
        (np.array([6.0, np.nan, 0.0, 3.0]), "token_count: counts must be whole numbers, got nan"),
        (np.array([6.0, np.inf, 0.0, 3.0]), "token_count: counts must be whole numbers, got inf"),
        (np.array([6.0, -2.0, 0.0, 3.0]), "token_count: counts must be >= 0, got -2"),
        (np.array([2.0**40, 1, 1, 1]), "token_count: count 1099511627776 does not fit int32"),
        (np.array([6, 12, 3]), "token_count: 3 entries, but seq_id implies 4 sequences"),
        (np.ones((4, 2), np.int64), r"token_count: expected shape \[N\]"),
        (np.array([2**31, 1, 1, 1]), "token_count: count 2147483648 does not fit int32"),
        (np.array([True, True, False, True]), "token_count: expected an integer or float dtype"),
    ],
)
def test_log_step_checks_token_count(tmp_path, counts, message):
    """Each refusal is one UsageError naming the field; nothing is written."""
    with sd.Recorder(tmp_path / "run", unit="sequence") as rec, pytest.raises(UsageError) as err:
        rec.log_step(0, **_sequences(counts))
    assert re.match(message, str(err.value)) and "\n" not in str(err.value)
    assert not list((tmp_path / "run" / "steps").iterdir())


def test_token_count_is_refused_in_a_token_run(tmp_path):
    with sd.Recorder(tmp_path / "run") as rec, pytest.raises(UsageError, match="unit 'sequence'"):
        rec.log_step(0, **_batch(), token_count=np.array([3, 3, 3, 3]))
