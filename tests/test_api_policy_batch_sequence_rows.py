"""A unit 'sequence' `PolicyBatch` given a [1, N] ELBO (docs/custom-loops.md's `per_seq_elbo`
without its `[0]`) was refused as 'seq_id: unit 'sequence' records one entry per sequence, but
7 of its 8 entries repeat another's id (token-level data?)', naming a field it was never
given; it is now refused as `Recorder.log_step` refuses the same array (26345a3), naming
logp's shape and the way out."""

from __future__ import annotations

import pytest
import torch

from stabledrl_cli.errors import InputError
from stabledrl_cli.guard import Guard
from stabledrl_cli.policies import PolicyBatch, get_policy

MESSAGE = (
    "logp: shape [1, 8] holds 8 entries a row, but unit 'sequence' records one entry a "
    "sequence: pass [N] arrays, one per sequence (per_seq_elbo[0] of a [1, N] ELBO), or seq_id"
)


def _batch(elbo: torch.Tensor, **fields: torch.Tensor) -> PolicyBatch:
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 0.5, -0.5])
    return PolicyBatch(
        logp=elbo, logp_old=elbo + 0.125, advantages=advantages, unit="sequence", **fields
    )


def test_a_1_by_n_elbo_is_refused_naming_logp() -> None:
    elbo = torch.linspace(-3.0, -1.0, 8)[None, :]
    with pytest.raises(InputError) as refused:
        get_policy("stabledrl").weights(_batch(elbo))
    assert str(refused.value) == MESSAGE
    guard = Guard(policy="stabledrl:norm=batch")
    with pytest.raises(InputError) as refused:
        guard.before_step(grad_norm=1.0, batch=_batch(elbo, group_id=torch.arange(8) // 4))
    assert str(refused.value) == MESSAGE


def test_its_row_and_a_column_of_sequences_weigh_alike() -> None:
    elbo = torch.linspace(-3.0, -1.0, 8)
    policy = get_policy("stabledrl")
    flat = policy.weights(_batch(elbo)).coef
    torch.testing.assert_close(policy.weights(_batch(elbo[:, None])).coef, flat)
    seq_id = torch.arange(8)[None, :]
    torch.testing.assert_close(policy.weights(_batch(elbo[None, :], seq_id=seq_id)).coef, flat)
