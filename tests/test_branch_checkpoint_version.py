"""A checkpoint of another version of the example's checkpoint format is named as one, with
its format and the one this version reads, not called 'not a stabledrl example checkpoint'."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stabledrl_cli.errors import InputError
from stabledrl_cli.example.checkpoint import FORMAT, load_checkpoint


@pytest.mark.parametrize("version", ["2", "0", "1.1"])
def test_a_checkpoint_of_another_format_version_names_its_format(tmp_path: Path, version: str):
    path = tmp_path / "step-00000008.pt"
    torch.save({"format": f"stabledrl-example-checkpoint/{version}", "step": 8}, path)
    with pytest.raises(InputError) as raised:
        load_checkpoint(path)
    assert raised.value.exit_code == 3
    assert str(raised.value) == (
        f"{path}: a checkpoint of format 'stabledrl-example-checkpoint/{version}', which this "
        f"version of stabledrl cannot read (it reads {FORMAT})"
    )


@pytest.mark.parametrize("data", [{"format": "other-tool/1"}, {"step": 8}, [1, 2], {"format": 3}])
def test_data_of_no_checkpoint_format_is_not_a_checkpoint(tmp_path: Path, data: object):
    path = tmp_path / "step-00000008.pt"
    torch.save(data, path)
    with pytest.raises(InputError, match="not a stabledrl example checkpoint"):
        load_checkpoint(path)
