"""Recorder(policy=...): a full spec string, with policy_params merged, or a resolved policy
object; the manifest stores the canonical spec."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

import stabledrl_cli as sd
from stabledrl_cli.errors import UsageError


def _policy_entry(tmp_path, **kwargs) -> dict:
    sd.Recorder(tmp_path / "run", **kwargs).close()
    return sd.open_run(tmp_path / "run").manifest["policy"]


def test_a_full_spec_string(tmp_path):
    entry = _policy_entry(tmp_path, policy="dapo: eps_high=0.28,agg=token-mean ")
    assert entry == {
        "spec": "dapo:agg=token-mean,eps_high=0.28",
        "name": "dapo",
        "params": {"eps_high": 0.28, "agg": "token-mean"},
    }


def test_a_spec_string_with_policy_params_merged(tmp_path):
    entry = _policy_entry(
        tmp_path, policy="ppo:eps_low=0.1", policy_params={"eps_high": 0.3, "c": 5.0, "on": True}
    )
    assert entry["spec"] == "ppo:c=5,eps_high=0.3,eps_low=0.1,on=true"
    assert entry["params"] == {"eps_low": 0.1, "eps_high": 0.3, "c": 5.0, "on": True}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"policy": "dapo:eps_high=0.28", "policy_params": {"eps_high": 0.3}}, "given both"),
        ({"policy": "dapo:eps_high"}, "is not key=value"),
        ({"policy": ""}, "empty policy spec"),
        ({"policy": 3}, "policy must be a spec string"),
        ({"policy_params": {"eps": "a,b"}}, "cannot go into a spec string"),
    ],
)
def test_bad_policies_are_usage_errors(tmp_path, kwargs, message):
    with pytest.raises(UsageError, match=message):
        sd.Recorder(tmp_path / "run", **kwargs)


def test_a_catalogue_policy_object_is_stored_as_it_is(tmp_path):
    policy = sd.get_policy("dapo:eps_high=0.28,eps_low=0.2")
    entry = _policy_entry(tmp_path, policy=policy)
    assert entry == {"spec": policy.spec, "name": policy.name, "params": policy.params}
    assert sd.get_policy(entry["spec"]).params == policy.params  # the spec resolves back


@dataclass
class _Custom:
    name: str = "mine"
    spec: str = "mine:k=1"
    params: dict = field(default_factory=lambda: {"k": 1})


def test_any_object_with_name_spec_and_params(tmp_path):
    assert _policy_entry(tmp_path, policy=_Custom()) == {
        "spec": "mine:k=1",
        "name": "mine",
        "params": {"k": 1},
    }
    with pytest.raises(UsageError, match="policy_params go with a spec string"):
        sd.Recorder(tmp_path / "other", policy=_Custom(), policy_params={"k": 2})
