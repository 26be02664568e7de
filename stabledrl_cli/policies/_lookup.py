"""A spec to its computing `Policy`: the catalogue's entry (`_registry`, no torch) bound to its
validated config, its family module (and torch) imported on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stabledrl_cli.errors import UsageError
from stabledrl_cli.policies._registry import resolve_spec

if TYPE_CHECKING:
    from stabledrl_cli.policies._base import Policy


def get_policy(spec: str | Policy) -> Policy:
    """The catalogue's Policy for a spec, `NAME` or `NAME:key=value,...` (`stabledrl
    policies` lists the names, keys and defaults; docs/policies.md the formulas). A Policy
    passes through unchanged. UsageError (exit 2) for an unknown name or key, a key given
    twice, a value out of range, or what is neither a spec string nor a Policy."""
    if not isinstance(spec, str):
        from stabledrl_cli.policies._base import Policy  # a Policy means torch is loaded

        if isinstance(spec, Policy):
            return spec
        raise UsageError(f"a policy is a spec string or a Policy, not {type(spec).__name__}")
    entry, config = resolve_spec(spec)
    policy: Policy = entry.policy_class()(config, entry)
    return policy
