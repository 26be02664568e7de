"""Recorder(policy=...): a full spec string, with policy_params merged, or a resolved policy
object; the manifest stores the canonical spec."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
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


# --- a step its own policy cannot be replayed with ---------------------------------------------
_BATCH = {"logp": -np.ones(4), "logp_old": -np.ones(4), "advantages": np.ones(4)}
"""A sequence-unit step of 4 sequences with only the fields every policy needs."""


@pytest.mark.parametrize(
    ("policy", "missing", "fields"),
    [
        ("grpo:beta=0.04", "'logp_ref'", {"logp_ref": -np.ones(4)}),
        (
            "grpo:adv=center",
            "'group_id', 'reward'",
            {"group_id": np.array([0, 0, 1, 1]), "reward": np.array([1.0, 0.0, 1.0, 0.0])},
        ),
        ("dapo:agg=recorded", "'loss_scale'", {"loss_scale": np.full(4, 4.0)}),
        ("dppo:tis=token-mask", "'logp_rollout'", {"logp_rollout": -np.ones(4)}),
        (sd.get_policy("ppo:beta=0.1"), "'logp_ref'", {"logp_ref": -np.ones(4)}),
    ],
)
def test_a_step_without_a_field_its_own_policy_needs_is_refused_unwritten(
    tmp_path, policy, missing, fields
):
    """The step is refused at log_step (UsageError naming the fields and the policy), nothing
    written, and the same step with the fields is recorded: the run's default replay goes
    through. Before, the step was written and `replay` (check, watch --once) of the run ended
    with exit 3 ("step 0 has no 'logp_ref', which policy 'grpo:beta=0.04' needs"): the
    mistake showed only after training."""
    path = tmp_path / "run"
    with sd.Recorder(path, policy=policy, unit="sequence") as rec:
        spec = rec.manifest["policy"]["spec"]
        with pytest.raises(UsageError) as refused:
            rec.log_step(0, **_BATCH)
        assert str(refused.value) == (
            f"step 0 has no {missing}, which the run's policy {spec!r} needs: pass it, or "
            "record the policy the loop computes"
        )
        assert os.listdir(path / "steps") == [".writer.rank-0000.lock"]  # its lock, no step
        rec.log_step(0, **_BATCH, **fields)
    result = sd.replay(path, device="cpu")
    assert result.own is not None and result.own.spec == sd.get_policy(spec).spec
    assert result.steps == 1


@pytest.mark.parametrize(
    "policy",
    [None, "mine:beta=1", "ppo:beta=0.1,on=true", _Custom(spec="mine:beta=1")],
)
def test_a_policy_the_catalogue_does_not_replay_leaves_the_steps_unchecked(tmp_path, policy):
    """No policy, a custom one, a spec of a key the catalogue does not know: the run's replay
    does not replay it as its own, so no field of a step is asked for."""
    with sd.Recorder(tmp_path / "run", policy=policy, unit="sequence") as rec:
        rec.log_step(0, **_BATCH)
    assert sd.open_run(tmp_path / "run").step_numbers == [0]


def test_a_scalar_step_is_not_checked_against_the_policy(tmp_path):
    with sd.Recorder(tmp_path / "run", policy="grpo:beta=0.04") as rec:
        rec.log_step(0, grad_norm=1.0, loss=0.5)
    assert sd.open_run(tmp_path / "run").step(0).is_scalar


def test_a_policy_the_units_rule_out_is_refused_before_anything_is_written(tmp_path):
    """stabledrl:level=token on a sequence run: its default replay ended with exit 2 ("level=token
    needs token units"); the Recorder refuses it as it is made."""
    with pytest.raises(UsageError) as refused:
        sd.Recorder(tmp_path / "run", policy="stabledrl:level=token", unit="sequence")
    assert str(refused.value) == (
        "policy 'stabledrl:level=token': level=token needs token units, but this run was "
        "recorded with unit: sequence; use level=seq"
    )
    assert not (tmp_path / "run").exists()
    sd.Recorder(tmp_path / "run", policy="stabledrl:level=token", unit="token").close()


@pytest.mark.parametrize(
    "value", [np.float32(0.2), np.float64(0.2), np.array(0.2, dtype="float32"), np.array(0.2)]
)
def test_numpy_policy_params_are_plain_numbers(tmp_path, value):
    """policy_params read from a numpy array (a sweep's): refused before ('must be a number,
    bool or string, not float32'); now the number it holds, in its shortest form."""
    entry = _policy_entry(
        tmp_path, policy="grpo", policy_params={"eps_low": value, "beta": np.int64(0)}
    )
    assert entry["spec"] == "grpo:beta=0,eps_low=0.2"
    assert entry["params"] == {"eps_low": 0.2, "beta": 0}
    assert type(entry["params"]["beta"]) is int


@pytest.mark.parametrize(("value", "text"), [(np.bool_(True), "true"), (np.array(False), "false")])
def test_a_numpy_bool_policy_param_is_the_bool_it_holds(tmp_path, value, text):
    """A flag read from an array (a sweep's): refused before ('policy parameter on=np.True_
    must be a number, bool or string, not bool'); now the bool it holds, as a numpy number
    is the number it holds."""
    entry = _policy_entry(tmp_path, policy="my-loss", policy_params={"on": value})
    assert entry["spec"] == f"my-loss:on={text}"
    assert type(entry["params"]["on"]) is bool


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"policy": "grpo:eps_low=-1"}, "eps_low must be a finite number >= 0, got -1.0"),
        ({"policy": "grpo", "policy_params": {"eps_low": -1}}, "eps_low must be a finite"),
        ({"policy": "grpo:eps_low=abc"}, "eps_low expects a number, got 'abc'"),
        ({"policy": "dapo:agg=foo"}, "agg must be one of token-mean"),
    ],
)
def test_a_catalogue_policys_bad_parameter_is_refused_as_the_recorder_is_made(
    tmp_path, kwargs, message
):
    """grpo:eps_low=-1 was recorded, a run whose own policy replay then refused; now the
    Recorder refuses it as replay's -p does, one line, before anything is written."""
    with pytest.raises(UsageError) as refused:
        sd.Recorder(tmp_path / "run", **kwargs)
    assert str(refused.value).startswith("policy spec '") and message in str(refused.value)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "run").exists()
