"""`open_run` given an argument of the wrong type: UsageError naming it, not Python's
TypeError from deep inside (pathlib) or a setting taken for another."""

from __future__ import annotations

from pathlib import Path

import pytest

import stabledrl_cli as sd
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
