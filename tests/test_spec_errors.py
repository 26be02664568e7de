"""A spec the grammar cannot read: `split_spec` says what is wrong bare (`SpecError.reason`),
and each caller names the spec its own way."""

from __future__ import annotations

import pytest

from stabledrl_cli.errors import ConfigError, UsageError
from stabledrl_cli.replay.guards import make_guard
from stabledrl_cli.spec import SpecError, split_spec


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (":", "'' is not a name (NAME or NAME:key=value,key=value)"),
        ("grpo:", "nothing after ':'; expected NAME or NAME:key=value,key=value"),
        ("grpo:eps", "'eps' is not key=value; expected NAME or NAME:key=value,key=value"),
        ("grpo:a-b=1", "'a-b' is not a key name"),
        ("grpo:a=1,a=2", "key 'a' given twice"),
    ],
)
def test_a_bad_spec_gives_its_reason_bare_and_names_the_spec_in_its_message(spec, reason):
    with pytest.raises(SpecError) as raised:
        split_spec(spec, kind="guard")
    assert raised.value.reason == reason
    assert str(raised.value) == f"bad guard spec '{spec}': {reason}"
    with pytest.raises(ConfigError) as named:
        make_guard(spec)
    assert str(named.value).endswith(f"'{spec}': {reason}")
    assert "bad guard spec" not in str(named.value)


def test_an_empty_spec_is_named_by_its_kind():
    with pytest.raises(UsageError, match=r"^empty guard spec; expected NAME") as raised:
        split_spec(" ", kind="guard")
    assert not isinstance(raised.value, SpecError)
    with pytest.raises(ConfigError, match="'': empty guard spec; expected NAME"):
        make_guard("")
