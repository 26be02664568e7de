"""`Recorder`'s arguments: its counts (world_size, rank, queue_size) refuse a bool, which
Python takes for 0 or 1, and a world_size past what readers accept; its path (and
`open_run`'s) refuses what names no directory; each with one line of the Recorder's own."""

from __future__ import annotations

import errno
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import stabledrl_cli as sd
from stabledrl_cli import _atomic
from stabledrl_cli.dump._file_names import step_file_name
from stabledrl_cli.errors import UsageError


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"world_size": True}, "world_size must be an int in [1, 4096], got True"),
        ({"world_size": 5000}, "world_size must be an int in [1, 4096], got 5000"),
        ({"world_size": 2, "rank": True}, "rank must be an int in [0, 2), got True"),
        ({"async_writes": True, "queue_size": True}, "queue_size must be an int >= 1, got True"),
    ],
)
def test_a_count_of_the_wrong_kind_is_refused_before_the_run_is_made(
    tmp_path: Path, arguments: dict[str, Any], message: str
) -> None:
    """Before: world_size=True and 5000 were refused after the manifest was made, as a
    corrupt manifest ('not recorded, its readers would refuse the run's manifest (...
    corrupt manifest: world_size must be an integer in [1, 4096], got true)'); rank=True
    recorded as rank 1 and queue_size=True as a queue of 1."""
    with pytest.raises(UsageError) as refused:
        sd.Recorder(tmp_path / "run", **arguments)
    assert str(refused.value) == message
    assert not (tmp_path / "run").exists()


def test_a_rank_of_several_not_given_is_refused_before_the_run_is_made(tmp_path: Path) -> None:
    """Before: Recorder(path, world_size=2) took rank 0 in every process; all but the first
    were refused with 'rank 0 of this run is being recorded by another Recorder', and the one
    taken may have recorded another rank's shard as rank 0's."""
    with pytest.raises(UsageError, match=r"^rank= is missing: a Recorder of world_size=2 "):
        sd.Recorder(tmp_path / "run", world_size=2)
    assert not (tmp_path / "run").exists()
    with sd.Recorder(tmp_path / "one") as recorder:  # one rank: it is rank 0
        assert recorder.rank == 0
    with sd.Recorder(tmp_path / "two", world_size=2, rank=1) as recorder:
        assert recorder.rank == 1


def test_the_largest_world_size_is_taken(tmp_path: Path) -> None:
    with sd.Recorder(tmp_path / "run", world_size=4096, rank=0) as recorder:
        recorder.log_step(0, loss=1.0)
    assert sd.open_run(tmp_path / "run").manifest["world_size"] == 4096
    sd.Recorder(tmp_path / "run", world_size=4096, rank=4095).close()  # the last rank


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (None, "path must be a str or a path object, not NoneType"),
        (5, "path must be a str or a path object, not int"),
        (b"run", "path must be a str or a path object, not bytes"),
        ("", "path is empty: name the run's directory"),
        ("ru\x00n", "path 'ru\\x00n' holds a NUL character, which no file name can"),
    ],
)
def test_a_path_that_names_no_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: object, message: str
) -> None:
    """Before: pathlib's TypeError for None, 5 and b"run"; "" recorded into the working
    directory ('already exists and is not empty', or with overwrite=True a run made there);
    a NUL raised ValueError ('embedded null byte') from the Recorder, and open_run said 'no
    such run'."""
    monkeypatch.chdir(tmp_path)
    for make in (sd.Recorder, sd.open_run):
        with pytest.raises(UsageError) as refused:
            make(path)  # type: ignore[operator]
        assert str(refused.value) == message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("switch", "value"),
    [
        (switch, value)
        for switch in ("overwrite", "resume", "async_writes")
        for value in ("false", 0, None, np.int64(0))
        if (switch, value) != ("overwrite", None)  # its default: record's --force, or not
    ],
)
def test_a_switch_that_is_not_true_or_false_is_refused_and_the_run_kept(
    tmp_path: Path, switch: str, value: object
) -> None:
    """Before: a switch was taken for its truth value: overwrite="false" (a config's text)
    removed the run's steps, 0 and None were taken for False. (A numpy bool is the bool it
    holds: tests/test_api_numpy_bools.py.) overwrite=None is its default, which
    tests/test_record_force_own_recorder.py checks."""
    run = tmp_path / "run"
    with sd.Recorder(run) as recorder:
        recorder.log_step(0, loss=1.0)
    with pytest.raises(UsageError) as refused:
        sd.Recorder(run, **{switch: value})
    kind = "int" if isinstance(value, np.int64) else type(value).__name__
    assert str(refused.value) == f"{switch} must be True or False, not {kind}"
    assert sd.open_run(run).step_numbers == [0]


def test_param_names_may_be_any_iterable_of_names(tmp_path: Path) -> None:
    """Before: a generator (names from model.named_parameters()) raised TypeError ("object of
    type 'generator' has no len()") after the run's manifest was written, holding []."""
    names = (name for name in ("weight", "bias"))
    with sd.Recorder(tmp_path / "run", param_names=names) as recorder:  # type: ignore[arg-type]
        recorder.log_step(0, loss=1.0, param_grad_norm=[1.0, 2.0])
    assert sd.open_run(tmp_path / "run").manifest["param_names"] == ["weight", "bias"]


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ("weight", "param_names must be a list of strings, got str"),
        (3, "param_names must be a list of strings, got int"),
        (["weight", 3], "param_names must be a list of strings; entry 1 is int"),
    ],
)
def test_param_names_that_are_not_names_are_refused_before_the_run_is_made(
    tmp_path: Path, names: object, message: str
) -> None:
    """Before: a string was taken for its characters (param_names="ab": two names, 'a' and
    'b'), and 3 raised TypeError ('int' object is not iterable)."""
    with pytest.raises(UsageError) as refused:
        sd.Recorder(tmp_path / "run", param_names=names)  # type: ignore[arg-type]
    assert str(refused.value) == message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text", ["01", b"01"])
def test_a_reward_range_given_as_text_is_refused_before_the_run_is_made(
    tmp_path: Path, text: object
) -> None:
    """Before: a string was taken for its characters (reward_range="01": (0.0, 1.0)) and bytes
    for their codes (b"01": (48.0, 49.0)), recorded as the run's reward range."""
    with pytest.raises(UsageError) as refused:
        sd.Recorder(tmp_path / "run", reward_range=text)  # type: ignore[arg-type]
    assert str(refused.value) == f"reward_range must be (low, high), a pair, not text; got {text!r}"
    assert not (tmp_path / "run").exists()


def test_counts_that_are_numpy_or_torch_integers_are_taken_as_the_ints_they_hold(
    tmp_path: Path,
) -> None:
    """Before: Recorder(world_size=np.int64(2), rank=np.int64(1)) was refused as 'world_size
    must be an int in [1, 4096], got 2', a message its user cannot act on (step numbers took
    numpy integers already)."""
    import torch

    with sd.Recorder(
        tmp_path / "run", world_size=np.int64(2), rank=torch.tensor(1), async_writes=True,
        queue_size=np.int32(2),
    ) as recorder:  # fmt: skip
        assert (recorder.world_size, recorder.rank) == (2, 1)
        assert type(recorder.world_size) is int and type(recorder.rank) is int
        recorder.log_step(0, loss=1.0)
    assert [file.name for file in (tmp_path / "run" / "steps").iterdir()] == [
        step_file_name(0, 1, 2)
    ]


@pytest.mark.parametrize("epoch", ["abc", "nan", "1e30"])
def test_a_source_date_epoch_that_is_no_time_is_a_usage_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, epoch: str
) -> None:
    """Before: ValueError ('could not convert string to float: 'abc'', 'Invalid value NaN')
    or OverflowError ('timestamp out of range for platform time_t') from the Recorder, naming
    no variable (under record: exit 3, 'ValueError: ...')."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", epoch)
    with pytest.raises(UsageError) as refused:
        sd.Recorder(tmp_path / "run")
    assert str(refused.value) == (
        f"SOURCE_DATE_EPOCH must be a time in seconds since 1970-01-01 UTC, got {epoch!r}"
    )
    assert not (tmp_path / "run").exists()


def test_a_source_date_epoch_fixes_the_recorded_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    with sd.Recorder(tmp_path / "run", policy=None) as recorder:
        recorder.log_step(0, loss=1.0)
    run = sd.open_run(tmp_path / "run")
    assert run.manifest["created"] == "2023-11-14T22:13:20+00:00"
    assert run.step(0).scalars["wall_time"] == 1700000000.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss": "0.5"}, "loss: expected a number, got text '0.5'"),
        ({"scalars": {"acc": "nan"}}, "scalars['acc']: expected a number, got text 'nan'"),
        ({"scalars": {"acc": b"1"}}, "scalars['acc']: expected a number, got text b'1'"),
        ({"scalars": {"acc": np.str_("2")}}, "scalars['acc']: expected a number, got text '2'"),
        ({"kl": np.array("3")}, "kl: expected a number, got text '3'"),
    ],
)
def test_a_scalar_given_as_text_is_refused_unwritten(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    """A scalar logged as text was parsed silently (loss='0.5' recorded 0.5, 'nan' a NaN): a
    string where a number belongs is a bug of the loop. Refused, naming the field."""
    with sd.Recorder(tmp_path / "run", policy=None) as recorder:
        with pytest.raises(UsageError) as refused:
            recorder.log_step(0, grad_norm=1.0, **kwargs)
        assert str(refused.value) == message
    assert sd.open_run(tmp_path / "run").step_numbers == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss": np.complex64(0.5 + 2j)}, "loss: expected a number, got complex64"),
        ({"kl": np.complex128(1)}, "kl: expected a number, got complex128"),
        ({"scalars": {"acc": 1j}}, "scalars['acc']: expected a number, got complex"),
    ],
)
def test_a_scalar_given_as_a_complex_number_is_refused_unwritten(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    """A numpy complex scalar was recorded as its real part (loss=np.complex64(0.5+2j) gave
    0.5, with numpy's ComplexWarning), where a Python complex was refused: refused alike
    now, naming the field, and nothing is written."""
    with sd.Recorder(tmp_path / "run", policy=None) as recorder:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(UsageError) as refused:
                recorder.log_step(0, grad_norm=1.0, **kwargs)
        assert str(refused.value) == message
    assert sd.open_run(tmp_path / "run").step_numbers == []


def test_a_scalar_given_as_a_bool_is_recorded_as_0_or_1(tmp_path: Path) -> None:
    with sd.Recorder(tmp_path / "run", policy=None) as recorder:
        recorder.log_step(0, loss=True, scalars={"skipped": np.bool_(False), "ok": True})
    scalars = sd.open_run(tmp_path / "run").step(0).scalars
    assert (scalars["loss"], scalars["skipped"], scalars["ok"]) == (1.0, 0.0, 1.0)


def test_numpy_numbers_in_meta_and_estimator_are_the_numbers_they_hold(tmp_path: Path) -> None:
    """A config with numpy values (a sweep's, read from an array) was refused ('meta must be
    JSON-serializable: Object of type float32 is not JSON serializable'), where policy_params
    takes them; now each is the Python number or bool it holds, at any depth. A NaN is still
    refused: the manifest is strict JSON."""
    meta = {
        "lr": np.float32(0.001),
        "sweep": {"steps": np.int64(400), "flags": [np.bool_(True), np.array(0.5)]},
    }
    with sd.Recorder(tmp_path / "run", meta=meta, estimator={"mask_samples": np.int32(2)}):
        pass
    manifest = sd.open_run(tmp_path / "run").manifest
    assert manifest["meta"] == {"lr": 0.001, "sweep": {"steps": 400, "flags": [True, 0.5]}}
    assert type(manifest["meta"]["sweep"]["steps"]) is int
    assert manifest["estimator"] == {"mask_samples": 2}
    with pytest.raises(UsageError, match=r"^meta must be JSON-serializable: Out of range float"):
        sd.Recorder(tmp_path / "other", meta={"x": np.float32("nan")})
    circular: dict[str, object] = {"lr": np.float32(0.1)}
    circular["self"] = circular
    with pytest.raises(UsageError, match=r"^meta must be JSON-serializable: Circular reference"):
        sd.Recorder(tmp_path / "other", meta=circular)


def test_whole_number_rewards_advantages_and_weights_are_taken_as_floats(tmp_path: Path) -> None:
    """A 0/1 correctness reward as an integer or bool tensor, +-1 advantages as integers and a
    0/1 loss weight were refused ('expected a floating dtype'): under `record` one such batch
    turned recording off for the rest of the run. They are stored as the float32 numbers
    they are; a log-probability still must be a float."""
    import torch

    logp = np.zeros((2, 3), np.float32)
    with sd.Recorder(tmp_path / "run", policy="grpo") as recorder:
        recorder.log_step(
            0,
            logp=logp,
            logp_old=logp,
            advantages=torch.tensor([1, -1]),
            reward=torch.tensor([True, False]),
            loss_weight=np.ones((2, 3), np.uint8),
            group_id=np.zeros(2, np.int32),
        )
        with pytest.raises(UsageError, match=r"^logp: expected a floating dtype, got int64$"):
            recorder.log_step(1, logp=np.zeros((2, 3), np.int64), logp_old=logp, advantages=logp)
    (step,) = sd.open_run(tmp_path / "run")
    assert step.array("reward").tolist() == [1.0, 0.0]
    assert step.array("advantages").tolist() == [1.0, 1.0, 1.0, -1.0, -1.0, -1.0]
    assert step.array("loss_weight").dtype == np.float32
    assert step.array("reward").dtype == np.float32 and step.scalars["reward_mean"] == 0.5


def test_a_recorder_shows_whether_it_records(tmp_path, monkeypatch, capsys):
    """A Recorder showed 'Recorder(PATH, unit='token', rank=0)' whether it recorded, was closed,
    or had stopped recording after a failed write (on_write_error="warn": every later log_step
    returns without writing), so a notebook could not tell. Its repr says which."""
    flat = {
        "logp": np.full(4, -1.0, np.float32),
        "logp_old": np.zeros(4, np.float32),
        "advantages": np.ones(4, np.float32),
        "seq_id": np.array([0, 0, 1, 1]),
    }
    path = tmp_path / "run"
    recorder = sd.Recorder(path, on_write_error="warn")
    assert repr(recorder) == f"Recorder({str(path)!r}, unit='token', rank=0, state='recording')"

    def full(fd: int, buffers: list[memoryview]) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_atomic.os, "writev", full)
    recorder.log_step(0, **flat)
    monkeypatch.undo()
    capsys.readouterr()
    stopped = f"Recorder({str(path)!r}, unit='token', rank=0, state='stopped at step 0')"
    assert repr(recorder) == stopped
    recorder.close()
    assert repr(recorder) == stopped
    other = tmp_path / "other"
    closed = sd.Recorder(other)
    closed.close()
    assert repr(closed) == f"Recorder({str(other)!r}, unit='token', rank=0, state='closed')"


@pytest.mark.parametrize("count", [-1, 1.5, math.nan, math.inf])
def test_a_nonfinite_grads_that_is_no_count_is_refused_unwritten(tmp_path: Path, count) -> None:
    """log_step(nonfinite_grads=-1) (a loop's 'not counted') was recorded, and inspect and
    check then read every such step as a non-finite one, where docs/run-format.md says no
    recorder writes a negative or NaN count: refused, as inner_step and reward_count are."""
    with sd.Recorder(tmp_path / "run", policy=None) as recorder:
        with pytest.raises(UsageError, match=r"^nonfinite_grads: .* whole number >= 0"):
            recorder.log_step(0, grad_norm=1.0, nonfinite_grads=count)
        recorder.log_step(0, grad_norm=1.0, nonfinite_grads=np.int64(2))
    assert sd.open_run(tmp_path / "run").step(0).scalars["nonfinite_grads"] == 2
