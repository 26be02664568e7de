"""A replay setting of the wrong type is a UsageError naming the setting and the type given,
raised where the settings are checked (`ReplayConfig`), not Python's text from deep in the
pass ("'int' object has no attribute 'startswith'")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import stabledrl_cli as sd
from stabledrl_cli.errors import UsageError
from stabledrl_cli.replay.config import ReplayConfig

RUN = Path(__file__).resolve().parents[1] / "fixtures" / "grpo"


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"device": 1}, "device must be a device name such as 'cpu' or 'cuda:1', not int"),
        ({"device": None}, "device must be a device name such as 'cpu' or 'cuda:1', not NoneType"),
        ({"detail": "yes"}, "detail must be True or False, not str"),
    ],
)
def test_the_api_names_a_setting_of_the_wrong_type(setting, message):
    with pytest.raises(UsageError) as raised:
        sd.replay(RUN, "grpo", **setting)
    assert str(raised.value) == message


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"lean": "no"}, "lean must be True or False, not str"),
        ({"guards": "zclip"}, "guards must be a tuple of guard specs (strings), not str"),
        ({"guards": 5}, "guards must be a tuple of guard specs (strings), not int"),
        ({"guards": [1]}, "guards must be a tuple of guard specs (strings), not list of int"),
    ],
)
def test_a_config_names_a_setting_of_the_wrong_type(setting, message):
    with pytest.raises(UsageError) as raised:
        ReplayConfig(**setting)
    assert str(raised.value) == message


def test_a_device_given_as_a_torch_device_still_replays():
    result = sd.replay(RUN, "grpo", device=torch.device("cpu"), step_range=(0, 2))
    assert [row["step"] for row in result.policies[0].steps] == [0, 1]
