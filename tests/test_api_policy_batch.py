"""A `PolicyBatch` a script builds by hand, given what holds no real numbers or no data: the
documented InputError naming the field, not an error from deep inside torch or numpy, and
never a result computed from part of the values."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import stabledrl_cli as sd
from stabledrl_cli.errors import InputError, UsageError

B, L = 2, 3


def _weights(**fields: Any) -> sd.Weights:
    batch: dict[str, Any] = {
        "logp": -torch.rand(B, L),
        "logp_old": -torch.rand(B, L),
        "advantages": torch.randn(B),
    }
    return sd.get_policy("grpo").weights(sd.PolicyBatch(**{**batch, **fields}))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("logp", "abc", "logp: expected real numbers, got dtype <U3"),
        ("advantages", ["a", "b"], "advantages: expected real numbers, got dtype <U1"),
        ("logp", np.full((B, L), None), "logp: expected real numbers, got dtype object"),
        ("logp", torch.ones(B, L, dtype=torch.cfloat),
         "logp: expected real numbers, got dtype torch.complex64"),
        ("logp_old", np.ones((B, L), complex),
         "logp_old: expected real numbers, got dtype complex128"),
        ("logp", torch.empty(B, L, device="meta"),
         "logp: a tensor on the meta device holds no data"),
        ("advantages", torch.empty(B, device="meta"),
         "advantages: a tensor on the meta device holds no data"),
        ("logp", (-torch.rand(B, L)).to_sparse(),
         "logp: a torch.sparse_coo tensor; pass a dense one (.to_dense())"),
    ],
)  # fmt: skip
def test_an_array_of_no_real_numbers_or_no_data_is_refused_naming_it(field, value, message):
    """Before: TypeError (text: "can't convert np.ndarray of type numpy.str_"; objects),
    NotImplementedError (meta), RuntimeError (sparse: "reshape is not implemented"), and
    complex logp was replayed with its imaginary part dropped (a UserWarning, no error)."""
    with pytest.raises(InputError) as refused:
        _weights(**{field: value})
    assert str(refused.value) == message


def test_a_ragged_list_is_refused_naming_the_field():
    """Before: numpy's ValueError ("setting an array element with a sequence")."""
    with pytest.raises(InputError, match=r"^logp: cannot be read as an array \(setting"):
        _weights(logp=[[-1.0, -2.0, -3.0], [-1.0]])


def test_weights_of_what_is_no_batch_is_a_usage_error():
    """Before: AttributeError ("'str' object has no attribute 'unit'")."""
    with pytest.raises(UsageError, match=r"^a batch is a PolicyBatch, not dict$"):
        sd.get_policy("grpo").weights({"logp": [-1.0]})  # type: ignore[arg-type]


def test_real_numbers_of_any_kind_are_still_taken():
    """numpy arrays, lists, float16 and float64 tensors, a bool mask: one same result."""
    logp, logp_old, adv = -torch.rand(B, L), -torch.rand(B, L), torch.randn(B)
    expected = _weights(logp=logp, logp_old=logp_old, advantages=adv).objective
    as_given = [
        {"logp": logp.numpy(), "logp_old": logp_old.tolist(), "advantages": adv.double()},
        {"logp": logp, "logp_old": logp_old, "advantages": adv.numpy(),
         "mask": np.ones((B, L), bool)},
    ]  # fmt: skip
    for fields in as_given:
        assert torch.allclose(_weights(**fields).objective, expected)


def test_one_advantage_a_row_is_taken_as_a_column_too():
    """[B, 1] advantages, which the Recorder takes for [B, L] log-probs (one a row), were
    refused by a PolicyBatch ('advantages has shape (2, 1); expected (2, 3) or (2,)'): the
    same result as [B] now; another shape is still refused, naming the three it takes."""
    logp, logp_old, adv = -torch.rand(B, L), -torch.rand(B, L), torch.randn(B)
    expected = _weights(logp=logp, logp_old=logp_old, advantages=adv)
    column = _weights(logp=logp, logp_old=logp_old, advantages=adv[:, None])
    assert torch.equal(column.coef, expected.coef)
    assert torch.equal(column.objective, expected.objective)
    with pytest.raises(InputError, match=r"^advantages has shape \(1, 2\); expected \(2, 3\), "):
        _weights(logp=logp, logp_old=logp_old, advantages=adv[None, :])
