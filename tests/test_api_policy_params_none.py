"""`Recorder(policy='grpo', policy_params={'eps_low': None})` (a config's unset value passed
on) wrote `params: {'eps_low': null}` beside the spec `grpo`, which leaves the None out: the
manifest disagreed with itself. A None parameter is now left at its default in both."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import stabledrl_cli as sd


def test_a_none_policy_parameter_is_left_at_its_default(tmp_path: Path) -> None:
    run = tmp_path / "run"
    params = {"eps_low": None, "eps_high": 0.3}
    with sd.Recorder(run, policy="grpo", policy_params=params) as recorder:  # type: ignore[arg-type]
        recorder.log_step(0, logp=np.zeros((2, 4)), logp_old=np.zeros((2, 4)), advantages=[1, 1])
    entry = json.loads((run / "manifest.json").read_text())["policy"]
    assert entry == {"spec": "grpo:eps_high=0.3", "name": "grpo", "params": {"eps_high": 0.3}}
