"""The policy catalogue: what each RL policy does to one step's tokens.

`get_policy(spec).weights(batch)` returns, per token, the coefficient dJ/dlogp_t of the
policy's surrogate objective, the tokens its rule discards or clips, and J itself. `prepare`
computes the shared quantities once, so a replay evaluates every policy on one prepared batch.
The math is policies.md; each family lives in its own module.
"""

from __future__ import annotations

from stabledrl_cli.policies._base import Policy, Weights
from stabledrl_cli.policies._batch import PolicyBatch, PreparedBatch, prepare
from stabledrl_cli.policies._registry import (
    REGISTRY,
    STANDARD_CATALOGUE,
    PolicyEntry,
    catalogue,
    get_policy,
    parse_spec,
)

__all__ = [
    "REGISTRY",
    "STANDARD_CATALOGUE",
    "Policy",
    "PolicyBatch",
    "PolicyEntry",
    "PreparedBatch",
    "Weights",
    "catalogue",
    "get_policy",
    "parse_spec",
    "prepare",
]
