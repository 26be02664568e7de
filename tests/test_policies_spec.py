"""Spec parsing: names, keys, types, ranges, canonical specs, required batch fields."""

from __future__ import annotations

import types
import typing

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from stabledrl_cli import get_policy
from stabledrl_cli.errors import UsageError
from stabledrl_cli.policies import REGISTRY, STANDARD_CATALOGUE, catalogue
from stabledrl_cli.spec import format_value


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope", "unknown policy 'nope'; valid: ppo, grpo, dapo, dual-clip, two-sided, gspo"),
        ("ppo:eps=0.2", "unknown key 'eps' for policy 'ppo'; valid keys: eps_low, eps_high, agg"),
        (
            "gmpo:agg=token-mean",
            "valid keys: eps_low, eps_high, mean, rows, beta, kl_is, kl_weight, kl_max, adv",
        ),
        ("grpo:kl_weight=none", "kl_weight=none weighs the KL term: it needs beta > 0"),
        ("grpo:kl_is=token", "kl_is=token weighs the KL term: it needs beta > 0"),
        ("gspo:kl_is=sequence", "kl_is=sequence weighs the KL term: it needs beta > 0"),
        ("grpo:kl_max=10", "kl_max clamps the KL term: it needs beta > 0"),
        ("grpo:beta=0.1,kl_max=0", "kl_max must be a finite number > 0"),
        ("vespo:k_pos=-1", "k_pos must be a finite number >= 0"),
        ("ppo:eps_low=abc", "eps_low expects a number, got 'abc'"),
        ("ppo:agg=mean", "agg must be one of token-mean, token-sum, micro-token-mean"),
        ("ppo:adv=whiten", "adv must be one of recorded, center, zscore, rloo"),
        ("stabledrl:level=word", "level must be one of seq, token"),
        ("ppo:agg=constant,max_len=1.5", "max_len expects an integer"),
        ("ppo:eps_low=-0.1", "eps_low must be a finite number >= 0"),
        ("dapo:eps_high=-0.01", "eps_high must be a finite number >= 0"),
        ("gspo:eps_low=-1e-4", "eps_low must be a finite number >= 0"),
        ("gspo:log_ratio_max=0", "log_ratio_max must be a finite number > 0"),
        ("gspo:delta=0", "delta must be a finite number > 0"),
        ("ppo:beta=-1", "beta must be a finite number >= 0"),
        ("ppo:beta=nan", "beta expects a finite number"),
        ("dual-clip:c=1", "c must be a finite number > 1"),
        ("stabledrl:c=0.5", "c must be a finite number > 1"),
        ("two-sided", "delta is required for two-sided, e.g. two-sided:delta=4"),
        ("two-sided:delta=0", "delta must be a finite number > 0"),
        ("two-sided:delta=-1", "delta must be a finite number > 0"),
        ("cispo:cap=5,eps_high=0.2", "give cap (TRL form) or eps_low/eps_high (verl form)"),
        ("cispo:cap=0", "cap must be a finite number > 0"),
        ("sapo:tau_neg=0", "tau_neg must be a finite number > 0"),
        ("ppo:agg=constant", "agg=constant needs max_len"),
        ("ppo:max_len=10", "max_len only applies to agg=constant or agg=seq-mean-token-sum-norm"),
        ("ppo:rows=all", "rows=all only applies to sequence means"),
        ("ppo:rows=some", "rows must be one of scored, all"),
        ("stabledrl:level=token,rows=all", "rows=all applies to level=seq"),
        ("ppo:eps_low", "is not key=value"),
        ("ppo:eps_low=0.1,eps_low=0.2", "given twice"),
        ("", "empty policy spec"),
    ],
)
def test_bad_specs_raise_one_usage_error_naming_the_choices(spec, message):
    with pytest.raises(UsageError) as info:
        get_policy(spec)
    assert message in str(info.value)
    assert info.value.exit_code == 2
    assert "\n" not in str(info.value)


NO_TIS = {
    "kl_is": "off",
    "kl_weight": "recorded",
    "kl_max": None,
    "tis": "off",
    "tis_min": None,
    "tis_max": None,
}
"""The KL weighting and rollout-correction keys every policy takes, off by default."""


def test_defaults_follow_the_table():
    assert get_policy("ppo").params == {
        "eps_low": 0.2,
        "eps_high": 0.2,
        "agg": "token-mean",
        "max_len": None,
        "rows": "scored",
        "beta": 0.0,
        "adv": "recorded",
        **NO_TIS,
    }
    assert get_policy("grpo").params["agg"] == "seq-mean-token-mean"
    assert get_policy("dapo").params | {} == {
        "eps_low": 0.2,
        "eps_high": 0.28,
        "agg": "token-mean",
        "max_len": None,
        "rows": "scored",
        "beta": 0.0,
        "adv": "recorded",
        **NO_TIS,
    }
    assert get_policy("dual-clip").params["c"] == 3.0
    assert get_policy("two-sided:delta=4").params["delta"] == 4.0
    assert get_policy("gspo").params == {
        "eps_low": 3e-4,
        "eps_high": 4e-4,
        "form": "sequence",
        "log_ratio_max": None,
        "delta": None,
        "agg": "seq-mean-token-mean",
        "max_len": None,
        "rows": "scored",
        "beta": 0.0,
        "adv": "recorded",
        **NO_TIS,
    }
    assert get_policy("cispo").params["cap"] == 5.0
    verl = get_policy("cispo:eps_high=0.28").params
    assert (verl["cap"], verl["eps_low"], verl["eps_high"]) == (None, 0.2, 0.28)
    assert get_policy("sapo").params["tau_pos"] == 1.0
    assert get_policy("sapo").params["tau_neg"] == 1.05
    assert get_policy("sapo").params["agg"] == "seq-mean-token-mean"  # TRL and verl
    assert get_policy("stabledrl").params == {
        "c": 5.0,
        "level": "seq",
        "norm": "group",
        "rows": "scored",
        "beta": 0.0,
        "adv": "recorded",
        **NO_TIS,
    }
    assert get_policy("ppo:eps_low=0.3").params["eps_high"] == 0.3
    for name in ("is", "reinforce"):
        assert get_policy(name).params["agg"] == "token-mean"


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("grpo", "grpo"),
        (" ppo : eps_high = 0.28 ", "ppo:eps_high=0.28"),
        ("ppo:eps_high=0.2", "ppo"),
        ("ppo:beta=0.04,eps_low=0.1", "ppo:beta=0.04,eps_high=0.1,eps_low=0.1"),
        ("two-sided:delta=4.0", "two-sided:delta=4"),
        ("cispo:eps_low=0.2", "cispo:eps_high=0.2,eps_low=0.2"),
        ("stabledrl:norm=batch,c=3", "stabledrl:c=3,norm=batch"),
        ("ppo:agg=constant,max_len=1024", "ppo:agg=constant,max_len=1024"),
        ("gspo:eps_high=1e-3", "gspo:eps_high=0.001"),
    ],
)
def test_canonical_spec_round_trips(spec, canonical):
    """The canonical spec is the one grammar's (`stabledrl_cli.spec`): keys sorted."""
    policy = get_policy(spec)
    assert policy.spec == canonical
    again = get_policy(policy.spec)
    assert again.params == policy.params and again.name == policy.name


def test_catalogue_and_standard_specs():
    assert list(REGISTRY) == [e.name for e in catalogue()]
    assert set(REGISTRY) == {
        "ppo",
        "grpo",
        "dapo",
        "dual-clip",
        "two-sided",
        "gspo",
        "cispo",
        "sapo",
        "is",
        "reinforce",
        "stabledrl",
        "gpg",
        "gppo",
        "clip-cov",
        "kl-cov",
        "gmpo",
        "dppo",
        "vespo",
    }
    for spec in STANDARD_CATALOGUE:
        policy = get_policy(spec)
        assert policy.formula and policy.source and policy.family
    assert get_policy(get_policy("grpo")).spec == "grpo"


def test_every_policy_class_documents_its_formula_and_source():
    for entry in catalogue():
        doc = entry.policy_class().__dict__.get("__doc__") or ""
        assert doc.count("`") >= 2 and "A" in doc, entry.name  # a formula, in backticks
        assert any(s in doc for s in ("TRL", "verl", "arXiv", "importance sampling")), entry.name


def test_required_fields():
    assert get_policy("grpo").required_fields() == set()
    assert get_policy("grpo:beta=0.1").required_fields() == {"logp_ref"}
    assert get_policy("dppo:tis=sequence-mask").required_fields() == {"logp_rollout"}
    assert get_policy("stabledrl:adv=center").required_fields() == {"reward", "group_id"}
    assert get_policy("cispo:agg=recorded").required_fields() == {"loss_scale"}
    assert get_policy("stabledrl").required_fields("sequence") == set()
    with pytest.raises(UsageError, match="unit: sequence"):
        get_policy("stabledrl:level=token").required_fields("sequence")


def _value_strategy(entry, key):
    """Spec text for one key of `entry`, drawn from its type (numbers near the usual ranges)."""
    kind = typing.get_type_hints(entry.config)[key]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None -> X
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if typing.get_origin(kind) is typing.Literal:
        return st.sampled_from(typing.get_args(kind))
    if kind is int:
        return st.integers(1, 4096).map(str)
    numbers = st.one_of(
        st.sampled_from([0.0, 0.1, 0.2, 0.28, 1.0, 1.05, 3.0, 5.0]),
        st.floats(0.0, 10.0, allow_nan=False).map(lambda x: round(x, 3)),
    )
    return numbers.map(format_value)


@st.composite
def valid_specs(draw):
    """A random spec of any catalogue name that the catalogue accepts."""
    entry = draw(st.sampled_from(catalogue()))
    keys = draw(st.lists(st.sampled_from(entry.keys), unique=True, max_size=len(entry.keys)))
    raw = {key: draw(_value_strategy(entry, key)) for key in keys}
    if raw.get("agg") == "constant":
        raw.setdefault("max_len", str(draw(st.integers(1, 4096))))
    else:
        raw.pop("max_len", None)
    if raw.get("tis", "off") == "off":  # the bounds of a rollout correction need one
        raw.pop("tis_min", None)
        raw.pop("tis_max", None)
    raw.update({key: example for key, example in entry.required.items() if key not in raw})
    spec = entry.name + (":" + ",".join(f"{k}={v}" for k, v in raw.items()) if raw else "")
    try:
        get_policy(spec)
    except UsageError:
        assume(False)
    return spec


@settings(max_examples=150, deadline=None, derandomize=True)
@given(valid_specs())
def test_every_canonical_spec_round_trips(spec):
    """Parsing a policy's canonical spec gives the same parameters, whatever was given."""
    policy = get_policy(spec)
    again = get_policy(policy.spec)
    assert again.params == policy.params, (spec, policy.spec)
    assert again.spec == policy.spec


def test_explicit_default_that_another_key_moves_is_kept():
    """eps_high defaults to eps_low: eps_high=0.2 next to eps_low=0.1 must survive."""
    for spec in ("ppo:", "grpo:", "dual-clip:", "two-sided:delta=4,"):
        policy = get_policy(f"{spec}eps_low=0.1,eps_high=0.2")
        assert "eps_high=0.2" in policy.spec
        assert get_policy(policy.spec).params["eps_high"] == 0.2


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("grpo:beta=0.1,kl_max=\u0661", "kl_max expects a number, got '\u0661'"),
        ("grpo:beta=0.1,kl_max=1_0", "kl_max expects a number, got '1_0'"),
        ("ppo:eps_low=\uff10.2", "eps_low expects a number"),
        ("ppo:eps_low=0x1", "eps_low expects a number"),
        ("ppo:agg=constant,max_len=1_0", "max_len expects an integer of at most 30 digits"),
        ("ppo:agg=constant,max_len=\u0663", "max_len expects an integer"),
        ("ppo:eps_low=inf", "eps_low expects a finite number, got 'inf'"),
    ],
)
def test_a_spec_number_is_ascii_decimal_notation(spec, message):
    """Python's float() and int() also take other scripts' digits and `_` separators: a spec
    number is what docs/policies.md says, digits 0-9 with an optional point and exponent."""
    with pytest.raises(UsageError) as info:
        get_policy(spec)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("dapo:eps_high=1e-400", "eps_high: '1e-400' is too small for a float: it reads as 0"),
        ("dapo:eps_high=-0.0001e-320", "eps_high: '-0.0001e-320' is too small for a float"),
        ("dapo:eps_high=1e400", "eps_high expects a finite number, got '1e400'"),
    ],
)
def test_a_nonzero_number_that_reads_as_0_or_inf_is_a_usage_error(spec, message):
    """`dapo:eps_high=1e-400` silently became eps_high=0 (float() underflows to 0.0); a written
    0 still reads as 0, and a sweep's ends are read alike."""
    from stabledrl_cli.tune.grid import expand

    with pytest.raises(UsageError) as info:
        get_policy(spec)
    assert message in str(info.value)
    with pytest.raises(UsageError, match="too small for a float"):
        expand("dapo:eps_high=1e-400..0.5:3")
    for zero in ("0", "0e-400", "-0.000", "00.0e5"):
        assert get_policy(f"dapo:eps_high={zero}").params["eps_high"] == 0.0


@pytest.mark.parametrize(
    ("spec", "key", "value"),
    [
        ("ppo:eps_low=.25", "eps_low", 0.25),
        ("ppo:eps_low=+2.5e-1", "eps_low", 0.25),
        ("ppo:eps_low=3.", "eps_low", 3.0),
        ("ppo:eps_low=1E-4", "eps_low", 1e-4),
        ("ppo:agg=constant,max_len=+0012", "max_len", 12),
    ],
)
def test_ascii_spellings_of_a_number_still_parse(spec, key, value):
    assert get_policy(spec).params[key] == value


@pytest.mark.parametrize("value", ["1" * 5000, "x" * 5000, "\u0661" * 5000, "9" * 4000])
def test_an_error_quotes_a_bounded_excerpt_of_a_long_value(value):
    for spec in (f"grpo:beta=0.1,kl_max={value}", f"ppo:agg=constant,max_len={value}"):
        with pytest.raises(UsageError) as info:
            get_policy(spec)
        assert len(str(info.value)) < 400, str(info.value)[:200]
        assert "5,000 characters" in str(info.value) or "4,000 characters" in str(info.value)


@pytest.mark.parametrize("spec", ["zclip:z_thresh=\u0663", "skip-step:window=1_0"])
def test_a_guard_spec_number_is_ascii_decimal_notation(spec):
    from stabledrl_cli.replay.guards import make_guard

    with pytest.raises(UsageError, match=r"expects a number|must be int"):  # a float, an int
        make_guard(spec)


@pytest.mark.parametrize(
    "sweep", ["stabledrl:c=\u0662..5:3", "stabledrl:c=2..5:\u0663", "stabledrl:c=1_0..20:3"]
)
def test_a_sweep_number_is_ascii_decimal_notation(sweep):
    from stabledrl_cli.tune.grid import expand

    with pytest.raises(UsageError):
        expand(sweep)


def test_a_recorded_spec_keeps_a_non_ascii_number_as_text():
    from stabledrl_cli.dump._policy import policy_entry

    params = policy_entry("mine:a=\u0661,b=1_0,c=2.5,d=3", None)["params"]
    assert params == {"a": "\u0661", "b": "1_0", "c": 2.5, "d": 3}


@pytest.mark.parametrize("where", ["name", "key"])
def test_an_error_quotes_a_bounded_excerpt_of_a_long_name_or_key(where):
    from stabledrl_cli.replay.guards import make_guard
    from stabledrl_cli.tune.grid import expand

    long = "a" * 5000
    policy, guard, sweep = (
        (long, long, f"{long}:c=1..2:3")
        if where == "name"
        else (f"grpo:{long}=1", f"zclip:{long}=1", f"grpo:{long}=1..x:3")
    )
    for parse, spec in ((get_policy, policy), (make_guard, guard), (expand, sweep)):
        with pytest.raises(UsageError) as info:
            parse(spec)
        assert len(str(info.value)) < 400, (spec[:20], str(info.value)[:200])


def _float_keys() -> list[tuple[str, str]]:
    """(policy, key) of every float parameter of the catalogue."""
    keys = []
    for name, entry in REGISTRY.items():
        hints = typing.get_type_hints(entry.config)
        for key in entry.keys:
            hint = hints[key]
            args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            if args[0] is float:
                keys.append((name, key))
    return keys


@pytest.mark.parametrize(("name", "key"), _float_keys())
@pytest.mark.parametrize("value", ["1e39", "-1e39", "1e308"])
def test_a_number_past_float32_is_a_usage_error(name, key, value):
    """A replay computes in float32: a bound it cannot hold (`grpo:eps_high=1e39`) made torch
    raise inside the computation, an internal error (exit 70) instead of a usage error."""
    with pytest.raises(UsageError) as info:
        get_policy(f"{name}:{key}={value}")
    assert f"{key} must be at most 3.4e+38 in size" in str(info.value)


@pytest.mark.parametrize(("name", "key"), _float_keys())
@pytest.mark.parametrize("value", ["1e-320", "-1e-40"])
def test_a_nonzero_number_below_float32s_smallest_normal_is_a_usage_error(name, key, value):
    """A replay computes in float32, where such a number is 0 or subnormal: `cispo:cap=1e-320`
    was accepted although `cap=0` is refused (> 0), and acted as a cap of 0."""
    with pytest.raises(UsageError) as info:
        get_policy(f"{name}:{key}={value}")
    assert f"{key} must not lie strictly between 0 and 1.2e-38 in size" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_sweep_of_numbers_below_float32s_smallest_normal_is_a_usage_error():
    """Each of those settings computed as eps_low = 0: the grid held three identical ones."""
    from stabledrl_cli.tune.grid import expand

    with pytest.raises(UsageError) as info:
        expand("ppo:eps_low=1e-320..1e-310:3")
    assert "eps_low must not lie strictly between 0 and 1.2e-38 in size" in str(info.value)


def test_the_largest_float32_bound_computes():
    import numpy as np

    from stabledrl_cli.policies import PolicyBatch, prepare

    logp = np.array([-1.0, -2.0, -0.5, -3.0], dtype=np.float32)
    batch = PolicyBatch(
        logp=logp,
        logp_old=logp - np.float32(0.3),
        advantages=np.array([1.0, -1.0, 1.0, -1.0], dtype=np.float32),
    )
    for spec in ("grpo:eps_high=3.4e38", "cispo:cap=3.4e38", "dual-clip:c=3.4e38"):
        weights = get_policy(spec).weights(prepare(batch, "cpu"))
        assert weights.coef.isfinite().all(), spec
