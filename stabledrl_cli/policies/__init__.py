"""The policy catalogue: what each RL policy does to one step's tokens.

`get_policy(spec).weights(batch)` returns, per token, the coefficient dJ/dlogp_t of the
policy's surrogate objective, the tokens its rule discards or clips, and J itself. `prepare`
computes the shared quantities once, so a replay evaluates every policy on one prepared batch.
The maths is docs/policies.md; each family lives in its own module.

The catalogue's declarations (`REGISTRY`, configs, defaults, formulas, sources, `resolve_spec`)
import no torch, so `stabledrl policies` starts fast; the computing names (`Policy`,
`PolicyBatch`, `Weights`, `prepare`, ...) are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stabledrl_cli._lazy import lazy_getattr
from stabledrl_cli.policies._lookup import get_policy
from stabledrl_cli.policies._registry import (
    CONVENTIONS,
    MAX_POLICIES,
    REGISTRY,
    STANDARD_CATALOGUE,
    PolicyEntry,
    catalogue,
    resolve_spec,
)

if TYPE_CHECKING:
    from stabledrl_cli.policies._base import Policy, Weights
    from stabledrl_cli.policies._policy_batch import PolicyBatch
    from stabledrl_cli.policies._prepare import prepare
    from stabledrl_cli.policies._prepared_batch import PreparedBatch

# Computing name -> its module (torch).
_COMPUTE: dict[str, str] = {
    "Policy": "stabledrl_cli.policies._base",
    "Weights": "stabledrl_cli.policies._base",
    "PolicyBatch": "stabledrl_cli.policies._policy_batch",
    "PreparedBatch": "stabledrl_cli.policies._prepared_batch",
    "prepare": "stabledrl_cli.policies._prepare",
}

__all__ = [
    "CONVENTIONS",
    "MAX_POLICIES",
    "REGISTRY",
    "STANDARD_CATALOGUE",
    "Policy",
    "PolicyBatch",
    "PolicyEntry",
    "PreparedBatch",
    "Weights",
    "catalogue",
    "get_policy",
    "prepare",
    "resolve_spec",
]


__getattr__ = lazy_getattr(__name__, _COMPUTE, globals())
