"""`open_run` given an argument of the wrong type: UsageError naming it, not Python's
TypeError from deep inside (pathlib) or a setting taken for another."""

from __future__ import annotations

from pathlib import Path

import pytest

import stabledrl_cli as sd
from stabledrl_cli.dump import pack_run
from stabledrl_cli.errors import UsageError


@pytest.mark.parametrize(
    ("path", "named"), [(None, "NoneType"), (3, "int"), (b"runs/mine", "bytes")]
)
def test_a_path_of_the_wrong_type_is_a_usage_error(path: object, named: str) -> None:
    """Before: TypeError ('expected str, bytes or os.PathLike object, not int') from
    pathlib; bytes, which Path takes, raised the same after open_run's own URL check."""
    with pytest.raises(UsageError) as refused:
        sd.open_run(path)  # type: ignore[arg-type]
    assert str(refused.value) == f"path must be a str or a path object, not {named}"


@pytest.mark.parametrize("verify", ["no", 0, None])
def test_a_verify_that_is_not_a_bool_is_a_usage_error(tmp_path: Path, verify: object) -> None:
    """Before: any value was taken for its truth, so verify="no" verified every array."""
    with sd.Recorder(tmp_path / "run", policy=None) as recorder:
        recorder.log_step(0, loss=1.0)
    with pytest.raises(UsageError) as refused:
        sd.open_run(tmp_path / "run", verify=verify)  # type: ignore[arg-type]
    assert str(refused.value) == f"verify must be True or False, not {type(verify).__name__}"


@pytest.mark.parametrize("verify", [True, False])
def test_reading_an_archive_after_close_says_it_is_closed(tmp_path: Path, verify: bool) -> None:
    """Before: a closed archive's arrays read as a corrupt archive (InputError 'corrupt run
    archive (no dataset tokens/advantages)'), and sd.replay(run) after `with
    sd.open_run(...) as run:` said the same: the file was fine."""
    with sd.Recorder(tmp_path / "run") as recorder:
        recorder.log_step(0, logp=[[-1.0, -2.0]], logp_old=[[-1.0, -2.0]], advantages=[1.0])
    pack_run(sd.open_run(tmp_path / "run"), tmp_path / "run.h5")
    with sd.open_run(tmp_path / "run.h5", verify=verify) as run:
        header = next(run.step_headers())
    closed = (
        f"{tmp_path / 'run.h5'}: the run was closed (run.close(), or the end of its with "
        "block); open it again with open_run"
    )
    for read in (
        lambda: run.step(0)["logp"],
        lambda: header["logp"],
        lambda: run.integrity,
        lambda: sd.replay(run, policies="grpo"),
    ):
        with pytest.raises(UsageError) as refused:
            read()
        assert str(refused.value) == closed
    assert run.step_numbers == [0]  # the index, read as it opened, is still there
    assert sd.open_run(tmp_path / "run.h5").step(0)["logp"].tolist() == [-1.0, -2.0]
