"""Recorder(resume=True) continues a run in place; overwrite=True with several ranks removes
only the recorder's own files."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
import torch

import stabledrl_cli as sd
from stabledrl_cli import _atomic
from stabledrl_cli.errors import InputError, UsageError


def _batch(step: int) -> dict:
    gen = torch.Generator().manual_seed(step)
    return {
        "logp": -torch.rand(2, 3, generator=gen),
        "logp_old": -torch.rand(2, 3, generator=gen),
        "advantages": torch.tensor([1.0, -1.0]),
        "loss": float(step),
    }


def _record(path, steps, **kwargs) -> None:
    with sd.Recorder(path, policy="dapo:eps_high=0.28", **kwargs) as rec:
        for step in steps:
            rec.log_step(step, **_batch(step))


def _step_files(path) -> list[str]:
    """The names in steps/ but a live Recorder's lock file."""
    return sorted(n for n in os.listdir(path / "steps") if not n.startswith(".writer."))


def test_resume_keeps_earlier_steps_and_replaces_later_ones(tmp_path):
    path = tmp_path / "run"
    _record(path, range(6))
    manifest_before = (path / "manifest.json").read_bytes()
    kept = (path / "steps" / "step-00000002.safetensors").read_bytes()
    (path / "steps" / ".step-00000006.safetensors.tmp-4242").write_bytes(b"left by a kill")
    with sd.Recorder(path, policy="dapo:eps_high=0.28", resume=True, resume_from=3) as rec:
        assert _step_files(path) == [f"step-{n:08d}.safetensors" for n in range(3)]
        with pytest.raises(UsageError, match="step 2 was logged already"):
            rec.log_step(2, **_batch(2))  # before the resume point
        for step in (3, 4):
            rec.log_step(step, **{**_batch(step), "loss": 100.0 + step})
    run = sd.open_run(path)
    assert run.step_numbers == [0, 1, 2, 3, 4] and run.integrity.ok
    assert run.scalar_series("loss")[1].tolist() == [0.0, 1.0, 2.0, 103.0, 104.0]
    assert (path / "steps" / "step-00000002.safetensors").read_bytes() == kept
    # Kept as it was, but for a new run identity: steps 3-5 were written again.
    manifest_after = json.loads((path / "manifest.json").read_text())
    manifest_kept = json.loads(manifest_before)
    assert manifest_after.pop("run_id") != manifest_kept.pop("run_id")
    assert manifest_after == manifest_kept


@pytest.mark.parametrize("resume_from, warned", [(10, True), (6, False), (3, False)])
def test_a_resume_point_past_the_runs_end_warns_of_the_gap(tmp_path, capfd, resume_from, warned):
    """resume_from=10 on a run ending at step 5 left steps 6..9 missing with no word until
    `inspect` found the gap; the Recorder says so as it opens the run."""
    path = tmp_path / "run"
    _record(path, range(6))
    capfd.readouterr()
    _record(path, [resume_from], resume=True, resume_from=resume_from)
    err = capfd.readouterr().err
    if warned:
        assert err == (
            f"stabledrl: warning: {path}: resume_from=10 is past the run's last step, 5: steps "
            "6..9 will be missing (inspect reports the gap)\n"
        )
    else:
        assert err == ""


def test_resume_without_a_resume_point_appends(tmp_path):
    path = tmp_path / "run"
    _record(path, range(3))
    manifest_before = (path / "manifest.json").read_bytes()
    with sd.Recorder(path, policy="dapo:eps_high=0.28", resume=True) as rec:
        with pytest.raises(UsageError, match="does not follow step 2"):
            rec.log_step(2, **_batch(2))
        rec.log_step(3, **_batch(3))
    assert sd.open_run(path).step_numbers == [0, 1, 2, 3]
    assert (path / "manifest.json").read_bytes() == manifest_before  # its run identity too


def _run_id(path) -> str:
    return json.loads((path / "manifest.json").read_text())["run_id"]


def test_each_recording_of_a_run_has_its_own_identity(tmp_path):
    """The manifest's run_id: new for a new run and for one overwritten, kept by a resume
    that replaces no step (a resume point past the last step), new for one that replaces
    some; the Recorder's own manifest says the same."""
    path = tmp_path / "run"
    _record(path, range(3))
    first = _run_id(path)
    assert len(first) == 32 and int(first, 16) >= 0
    _record(path, range(3, 5), resume=True, resume_from=3)  # nothing at or after step 3
    assert _run_id(path) == first
    with sd.Recorder(path, policy="dapo:eps_high=0.28", resume=True, resume_from=4) as rec:
        assert rec.manifest["run_id"] == _run_id(path) != first  # step 4 is written again
        rec.log_step(4, **_batch(4))
    resumed = _run_id(path)
    with sd.Recorder(path, policy="dapo:eps_high=0.28", overwrite=True) as rec:
        assert rec.manifest["run_id"] == _run_id(path) not in (first, resumed)


def test_resume_verifies_the_kept_steps(tmp_path):
    path = tmp_path / "run"
    _record(path, range(4))
    victim = path / "steps" / "step-00000001.safetensors"
    data = bytearray(victim.read_bytes())
    data[-2] ^= 0x01
    victim.write_bytes(bytes(data))
    closed = json.loads((path / "manifest.json").read_text())["recording_closed"]
    with pytest.raises(InputError, match=r"step 1 .* is unreadable: data checksum mismatch"):
        sd.Recorder(path, policy="dapo:eps_high=0.28", resume=True, resume_from=3)
    # Refused, the resume changed nothing: the closed run keeps its mark (before, it lost it,
    # and a watch of the run waited for steps no Recorder would write) and its steps.
    assert json.loads((path / "manifest.json").read_text())["recording_closed"] is closed is True
    assert sd.open_run(path).step_numbers == [0, 1, 2, 3]
    # Resuming at the corrupt step replaces it.
    with sd.Recorder(path, policy="dapo:eps_high=0.28", resume=True, resume_from=1) as rec:
        rec.log_step(1, **_batch(1))
    assert sd.open_run(path).step_numbers == [0, 1] and sd.open_run(path).integrity.ok


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"policy": "grpo"}, "its policy is 'dapo:eps_high=0.28', this recorder's 'grpo'"),
        ({"unit": "sequence"}, "its unit is 'token'"),
        ({"world_size": 2, "rank": 0}, "its world_size is 1"),
        ({"group_ids": "global"}, "its group_ids is 'per_rank'"),
    ],
)
def test_resume_refuses_an_incompatible_run(tmp_path, kwargs, message):
    path = tmp_path / "run"
    _record(path, range(2))
    before = _step_files(path)
    with pytest.raises(UsageError, match=message):
        sd.Recorder(path, **{"policy": "dapo:eps_high=0.28", "resume": True, **kwargs})
    assert _step_files(path) == before  # nothing removed


def test_a_resumed_run_keeps_the_param_names_its_norms_are_checked_against(tmp_path):
    """Resuming a run whose manifest names 2 parameters wrote param_grad_norm of 1 entry (with
    param_names=["x"], which the manifest did not take) or of 3 (with none given) unchecked,
    where the run's first Recorder refused both: steps no name described, and no integrity
    finding. A resume now checks the norms against the run's names, and refuses other names."""
    path = tmp_path / "run"
    with sd.Recorder(path, param_names=["a", "b"]) as rec:
        rec.log_step(0, loss=1.0, param_grad_norm=[1.0, 2.0])
    with pytest.raises(UsageError) as refused:
        sd.Recorder(path, resume=True, param_names=["x"])
    assert str(refused.value) == (
        f"cannot resume {path}: its param_names are not this recorder's (2 names, 1 given)"
    )
    with sd.Recorder(path, resume=True) as rec:
        with pytest.raises(
            UsageError, match=r"^param_grad_norm: 3 entries, but param_names has 2$"
        ):
            rec.log_step(1, loss=1.0, param_grad_norm=[3.0, 4.0, 5.0])
        rec.log_step(1, loss=1.0, param_grad_norm=[3.0, 4.0])
    with sd.Recorder(path, resume=True, param_names=("a", "b")) as rec:
        rec.log_step(2, loss=1.0, param_grad_norm=[5.0, 6.0])
    assert sd.open_run(path).step_numbers == [0, 1, 2]


def test_resume_refusals(tmp_path):
    with pytest.raises(UsageError, match="nothing to resume"):
        sd.Recorder(tmp_path / "new", resume=True)
    with pytest.raises(UsageError, match="pick one"):
        sd.Recorder(tmp_path / "new", resume=True, overwrite=True)
    with pytest.raises(UsageError, match="resume_from goes with resume=True"):
        sd.Recorder(tmp_path / "new", resume_from=3)
    with pytest.raises(UsageError, match="resume=True to continue it"):
        _record(tmp_path / "run", [0])
        _record(tmp_path / "run", [0])


def _ranked(path, rank: int, steps, **kwargs) -> None:
    with sd.Recorder(path, world_size=2, rank=rank, **kwargs) as rec:
        for step in steps:
            rec.log_step(step, **_batch(step), group_id=np.array([0, 0]))


def _files_of(path, rank: int) -> dict[str, bytes]:
    names = [n for n in _step_files(path) if f".rank-{rank:04d}." in n]
    return {n: (path / "steps" / n).read_bytes() for n in names}


def test_overwrite_by_one_rank_leaves_the_other_ranks_files(tmp_path):
    path = tmp_path / "run"
    for rank in (0, 1):
        _ranked(path, rank, range(3))
    rank0 = {n: (path / "steps" / n).read_bytes() for n in _step_files(path) if "rank-0000" in n}
    _ranked(path, 1, [5], overwrite=True)  # rank 1 starts over: only its own files go
    assert {
        n: (path / "steps" / n).read_bytes() for n in _step_files(path) if "rank-0000" in n
    } == (rank0)
    assert [n for n in _step_files(path) if "rank-0001" in n] == [
        "step-00000005.rank-0001.safetensors"
    ]
    _ranked(path, 0, [5], overwrite=True)  # rank 0 rewrites the manifest, not rank 1's files
    assert _step_files(path) == [
        "step-00000005.rank-0000.safetensors",
        "step-00000005.rank-0001.safetensors",
    ]
    run = sd.open_run(path)
    assert run.step_numbers == [5] and run.integrity.ok


def test_resume_with_two_ranks_touches_only_its_rank(tmp_path):
    path = tmp_path / "run"
    for rank in (0, 1):
        _ranked(path, rank, range(4), policy="grpo")
    _ranked(path, 1, [2, 3], policy="grpo", resume=True, resume_from=2)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert sd.open_run(path).step_numbers == [0, 1, 2, 3]


RESUMES = [(3, False), (2, False), (5, True), (None, True)]
"""(resume_from, whether the stop note at step 3 stays)."""


@pytest.mark.parametrize(("resume_from", "noted"), RESUMES)
def test_a_resume_that_records_the_stopped_step_again_drops_the_stop_note(
    tmp_path, monkeypatch, resume_from, noted
):
    """A recording stopped by a full disk at step 3 notes it (`recording_stopped`: the later
    steps are not in the run). A resume from step 3 or before (a TRL run resumed from a
    checkpoint once the disk has room) records that step and the later ones again: the note
    goes, or `inspect` and `watch` would say they are missing. A resume from a later step,
    or one that appends, leaves steps 3-4 missing: the note stays, still true."""
    path = tmp_path / "run"
    real_writev = os.writev

    def full_at_step_3(fd: int, buffers: list) -> int:
        if "step-00000003" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_writev(fd, buffers)

    monkeypatch.setattr(_atomic.os, "writev", full_at_step_3)
    _record(path, range(6), on_write_error="warn")
    monkeypatch.undo()
    assert sd.open_run(path).step_numbers == [0, 1, 2]
    assert json.loads((path / "manifest.json").read_text())["recording_stopped"]["step"] == 3
    _record(path, range(resume_from or 5, 7), resume=True, resume_from=resume_from)
    manifest = json.loads((path / "manifest.json").read_text())
    assert ("recording_stopped" in manifest) == noted


@pytest.mark.parametrize("resume_from", [-1, 2.5, "3"])
def test_a_bad_resume_from_is_named_as_resume_from(tmp_path, resume_from):
    """Before, Recorder(path, resume=True, resume_from=-1) said 'step must be an int in
    [0, 2**63 - 1], got -1', naming an argument the Recorder has not."""
    with pytest.raises(UsageError) as refused:
        sd.Recorder(tmp_path / "run", resume=True, resume_from=resume_from)
    assert str(refused.value) == (
        f"resume_from must be an int in [0, 2**63 - 1], got {resume_from!r}"
    )
    assert not (tmp_path / "run").exists()


def test_a_kept_step_that_is_a_symlink_is_named_as_one(tmp_path):
    """Before, a step file replaced by a symlink (to a file that reads) was refused as 'is
    unreadable: cannot read: Too many levels of symbolic links', a loop there is not: the
    open that never follows a link fails so on one."""
    path = tmp_path / "run"
    _record(path, range(3))
    victim = path / "steps" / "step-00000001.safetensors"
    elsewhere = tmp_path / "elsewhere.safetensors"
    victim.rename(elsewhere)
    victim.symlink_to(elsewhere)
    with pytest.raises(InputError) as refused:
        sd.Recorder(path, policy="dapo:eps_high=0.28", resume=True)
    assert str(refused.value) == (
        f"cannot resume {path}: step 1 (step-00000001.safetensors) is unreadable: a symlink, "
        "never followed; resume from step 1 or earlier"
    )
