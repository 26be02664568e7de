"""Format 1.2: scalar steps (no policy batch), a null policy and the manifest's source; the
oldest-version rule; directory and packed archive read them alike, mixed with batch steps."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import pack_run
from stabledrl_cli.dump._step_encoding import encode_step
from stabledrl_cli.dump._stfile import read_header
from stabledrl_cli.errors import InputError, UsageError


def _batch(rows: int = 2, cols: int = 3) -> dict:
    return {
        "logp": torch.full((rows, cols), -1.0),
        "logp_old": torch.full((rows, cols), -1.0),
        "advantages": torch.linspace(-1.0, 1.0, rows),
    }


def _header(path) -> bytes:
    return path.read_bytes()[:4096]


def test_scalar_steps_round_trip_directory_and_archive(tmp_path):
    path = tmp_path / "run"
    source = {"kind": "import", "format": "jsonl", "file": "log.jsonl"}
    with sd.Recorder(path, policy=None, source=source, param_names=["a", "b"]) as rec:
        rec.log_step(0, loss=1.5, grad_norm=2.0, lr=1e-3, entropy=0.7, clip_frac=0.1)
        rec.log_step(
            1,
            grad_norm=math.inf,
            step_time=0.25,
            nonfinite_grads=3,
            param_grad_norm=np.array([1.0, 2.0]),
            scalars={"kl": 0.02, "grad_norm/group_0": 4.0},
        )
        rec.log_step(2, **_batch(), reward=[1.0, 0.0], clip_frac_high=0.05)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == "1.2"
    assert manifest["policy"] is None and manifest["source"] == source
    steps = path / "steps"
    assert b'"_format_version":"1.2"' in _header(steps / "step-00000000.safetensors")
    assert b'"_format_version":"1.0"' in _header(steps / "step-00000002.safetensors")
    archive = tmp_path / "run.h5"
    # small: Fletcher32 everywhere, no per-step checksums (which say 2.0 whatever the run)
    pack_run(sd.open_run(path), archive, compression="small")
    with h5py.File(archive) as handle:
        assert handle.attrs["format_version"] == "1.2"
    for run in (sd.open_run(path), sd.open_run(archive)):
        assert run.policy_spec is None and run.manifest["source"] == source
        assert run.integrity.ok and run.step_numbers == [0, 1, 2]
        first, second, third = run.steps()
        assert first.is_scalar and first.fields == set() and first.num_tokens == 0
        assert first.scalars["entropy"] == 0.7 and first.scalars["clip_frac"] == 0.1
        assert second.is_scalar and second.fields == {"param_grad_norm"}
        assert second["param_grad_norm"].tolist() == [1.0, 2.0]
        assert second.scalars["nonfinite"] == 1.0  # the inf grad_norm
        assert second.scalars["nonfinite_grads"] == 3.0
        assert second.scalars["grad_norm/group_0"] == 4.0 and second.scalars["kl"] == 0.02
        assert not third.is_scalar and third.num_tokens == 6 and third["logp"].shape == (6,)
        steps_, values = run.scalar_series("grad_norm")
        assert steps_.tolist() == [0, 1] and values[0] == 2.0 and math.isinf(values[1])


def test_a_run_without_1_2_additions_stays_older(tmp_path):
    path = tmp_path / "run"
    with sd.Recorder(path) as rec:
        rec.log_step(0, **_batch(), entropy=0.5, step_time=0.1)
    assert json.loads((path / "manifest.json").read_text())["format_version"] == "1.0"
    assert b'"_format_version":"1.0"' in _header(path / "steps" / "step-00000000.safetensors")
    archive = tmp_path / "run.h5"
    pack_run(sd.open_run(path), archive, compression="small")  # (as above)
    with h5py.File(archive) as handle:
        assert handle.attrs["format_version"] == "1.0"


def test_scalar_only_run_packs_and_reads(tmp_path):
    path = tmp_path / "run"
    with sd.Recorder(path, policy=None) as rec:
        for step in range(3):
            rec.log_step(step, grad_norm=float(step))
    archive = tmp_path / "run.h5"
    pack_run(sd.open_run(path), archive)
    run = sd.open_run(archive)
    assert [s.scalars["grad_norm"] for s in run] == [0.0, 1.0, 2.0]
    assert all(s.is_scalar for s in run) and run.integrity.ok


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"logp": np.zeros(3, "f"), "seq_id": [0, 0, 0]}, "logp_old: required"),
        ({"reward": [1.0]}, "logp: required"),
        ({"mask": np.ones(3, "u1")}, "logp: required"),
    ],
)
def test_a_partial_batch_names_the_missing_field(tmp_path, arrays, message):
    with sd.Recorder(tmp_path / "run") as rec, pytest.raises(UsageError, match=message):
        rec.log_step(0, **arrays)


def test_a_series_scalar_given_twice_is_refused(tmp_path):
    with sd.Recorder(tmp_path / "run") as rec, pytest.raises(UsageError, match="'kl' is given"):
        rec.log_step(0, kl=0.1, scalars={"kl": 0.2})


@pytest.mark.parametrize("source", [{"format": "csv"}, {"kind": ""}, "import", {"kind": 1}])
def test_a_source_needs_a_kind(tmp_path, source):
    with pytest.raises(UsageError, match="source must be"):
        sd.Recorder(tmp_path / "run", policy=None, source=source)


def test_a_scalar_step_of_an_older_version_is_unreadable(tmp_path):
    """Before 1.2 a step without logp was corrupt; a file claiming 1.1 still is."""
    path = tmp_path / "run"
    with sd.Recorder(path, policy=None) as rec:
        rec.log_step(0, grad_norm=1.0)
        rec.log_step(1, grad_norm=2.0)
    file = path / "steps" / "step-00000001.safetensors"
    metadata = dict(read_header(file, deep=False).metadata)
    metadata = {k: v for k, v in metadata.items() if not k.startswith("_crc")}
    metadata["_format_version"] = "1.1"
    file.write_bytes(b"".join(encode_step({}, metadata)))
    run = sd.open_run(path)
    assert run.step_numbers == [0]
    assert "the step has no tokens" in run.integrity.findings[0].message


def test_resume_a_scalar_run(tmp_path):
    path = tmp_path / "run"
    with sd.Recorder(path, policy=None, source={"kind": "optimizer-hooks"}) as rec:
        rec.log_step(0, grad_norm=1.0)
        rec.log_step(1, grad_norm=2.0)
    with sd.Recorder(path, policy=None, resume=True) as rec:
        rec.log_step(2, grad_norm=3.0)
    run = sd.open_run(path)
    assert run.step_numbers == [0, 1, 2] and run.manifest["source"] == {"kind": "optimizer-hooks"}
    with pytest.raises(UsageError, match="its policy is None"):
        sd.Recorder(path, policy="grpo", resume=True)


def test_multi_rank_scalar_steps_join(tmp_path):
    path = tmp_path / "run"
    recorders = [sd.Recorder(path, policy=None, world_size=2, rank=r) for r in (0, 1)]
    for rank, rec in enumerate(recorders):
        rec.log_step(0, grad_norm=1.0 + rank, nonfinite_grads=rank)
        # Step 1: rank 0 logs a batch, rank 1 only scalars: the joined step has no batch.
        rec.log_step(1, **(_batch() if rank == 0 else {}), grad_norm=5.0)
        rec.close()
    run = sd.open_run(path)
    zero, one = run.steps()
    assert zero.is_scalar and zero.scalars["grad_norm"] == 1.0
    assert one.is_scalar and one.num_tokens == 0 and one.fields == set()


def test_a_step_no_rank_gave_a_token_joins_as_a_scalar_step(tmp_path):
    """Each rank's part of step 1 is empty (a rank may log one): the joined batch held no
    token, which replay, check and watch met with an internal error (exit 70, torch's
    'amax(): Expected reduction dim'). One rank's file refuses such a step; joined, it is a
    scalar step, its scalars kept."""
    path = tmp_path / "run"
    recorders = [sd.Recorder(path, world_size=2, rank=r) for r in (0, 1)]
    for rank, rec in enumerate(recorders):
        for step in range(3):
            rows = 0 if step == 1 else 2
            rec.log_step(step, **_batch(rows), reward=torch.ones(rows), loss=0.5 + rank)
        rec.close()
    run = sd.open_run(path)
    assert run.integrity.ok and run.step_numbers == [0, 1, 2]
    empty = run.step(1)
    assert empty.is_scalar and empty.num_tokens == 0 and empty.scalars["loss"] == 1.0
    result = CliRunner().invoke(app, ["replay", str(path), "-p", "grpo", "-f", "json"])
    assert result.exit_code == 0, result.output
    replayed = json.loads(result.stdout)
    assert replayed["steps"] == 2 and replayed["scalar_steps"] == 1
    pack_run(run, tmp_path / "run.h5")
    assert sd.open_run(tmp_path / "run.h5").step(1).is_scalar


def test_an_archive_step_of_a_batch_with_no_token_is_skipped(tmp_path, monkeypatch):
    """An archive packed from such a run before it joined as a scalar step holds a batch of
    no token: replay of it died with exit 70 (torch's 'amax(): Expected reduction dim').
    The archive's reader now refuses the step, as a run of one rank's reader does."""
    from stabledrl_cli.dump._directory import DirectoryRun
    from stabledrl_cli.dump._directory_step import DirectoryStep

    path = tmp_path / "run"
    recorders = [sd.Recorder(path, world_size=2, rank=r) for r in (0, 1)]
    for rec in recorders:
        for step in range(3):
            rec.log_step(step, **_batch(0 if step == 1 else 2))
        rec.close()
    joined = DirectoryRun._try_step

    def as_packed_before(self, n, **kwargs):  # the empty batch kept, as pack stored it
        step = joined(self, n, **kwargs)
        if isinstance(step, DirectoryStep) and step.is_scalar:
            step.fields = set(step.records[0].fields)
        return step

    monkeypatch.setattr(DirectoryRun, "_try_step", as_packed_before)
    pack_run(sd.open_run(path), tmp_path / "run.h5")
    monkeypatch.undo()
    archive = sd.open_run(tmp_path / "run.h5")
    assert archive.step_numbers == [0, 2]
    with pytest.raises(InputError, match="step 1 is unreadable: the step has no tokens"):
        archive.step(1)
    result = CliRunner().invoke(app, ["replay", str(tmp_path / "run.h5"), "-p", "grpo"])
    assert result.exit_code == 0, result.output


def test_scalar_names_that_hdf5_reads_as_paths_pack(tmp_path):
    path = tmp_path / "run"
    names = {"clip_ratio/low_mean": 0.1, "a%2Fb": 0.2, ".": 0.3, "..": 0.4, "x/../y": 0.5}
    with sd.Recorder(path, policy=None) as rec:
        rec.log_step(0, scalars=names)
    archive = tmp_path / "run.h5"
    pack_run(sd.open_run(path), archive)
    step = sd.open_run(archive).step(0)
    assert {name: step.scalars[name] for name in names} == names
