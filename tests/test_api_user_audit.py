"""What a researcher with a hand-written dLLM RL loop meets in the Python API, as the docs
describe it: a Recorder's manifest that says its policy one way, and `help()` on the public
names that reads without the package's private modules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import stabledrl_cli as sd


def _policy_entry(run: Path, policy: str, params: dict[str, object] | None) -> object:
    with sd.Recorder(run, policy=policy, policy_params=params) as recorder:  # type: ignore[arg-type]
        recorder.log_step(0, logp=np.zeros((2, 4)), logp_old=np.zeros((2, 4)), advantages=[1, -1])
    return json.loads((run / "manifest.json").read_text())["policy"]


def test_a_policy_parameter_given_as_text_is_stored_as_its_spec_reads_it(tmp_path: Path) -> None:
    """`policy_params={"eps_low": "0.1"}` (a value read from a config file as text) wrote the spec
    `grpo:eps_low=0.1` beside `params: {"eps_low": "0.1"}`, where the same spec given as a string
    stores the number 0.1: the manifest disagreed with itself, and with the other spelling."""
    as_text = _policy_entry(tmp_path / "text", "grpo", {"eps_low": "0.1"})
    in_spec = _policy_entry(tmp_path / "spec", "grpo:eps_low=0.1", None)
    assert (
        as_text
        == in_spec
        == {"spec": "grpo:eps_low=0.1", "name": "grpo", "params": {"eps_low": 0.1}}
    )
    custom = _policy_entry(tmp_path / "custom", "mine", {"flag": "true", "mode": "fast"})
    assert custom == _policy_entry(tmp_path / "custom-spec", "mine:flag=true,mode=fast", None)
    assert custom["params"] == {"flag": True, "mode": "fast"}  # type: ignore[index]
