"""A list of tensors as an array field: a custom loop that scores its sequences one at a time
keeps their ELBOs in a Python list, each a 0-d tensor still in the autograd graph (or in
bfloat16, or on the GPU), which numpy cannot read. The Recorder and a `PolicyBatch` take it as
the tensor it stacks into, as they take that tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import stabledrl_cli as sd
from stabledrl_cli.errors import InputError, UsageError
from stabledrl_cli.policies import PolicyBatch, get_policy


def _elbos() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Four sequences' ELBOs, each a 0-d tensor that requires grad, and their rollout ones."""
    weight = torch.tensor(1.0, requires_grad=True)
    values = [-1.5, -2.25, -0.75, -3.0]
    elbo = [torch.tensor(v) * weight for v in values]
    old = [torch.tensor(v + 0.125) for v in values]
    return elbo, old


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_list_of_tensors_is_recorded_as_the_tensor_it_stacks_into(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    """Before: 'logp: cannot be read as an array (Can't call numpy() on Tensor that requires
    grad ...)', and for bfloat16 '(Got unsupported ScalarType BFloat16)': nothing written."""
    elbo, old = _elbos()
    logp = [e.to(dtype) for e in elbo]
    with sd.Recorder(tmp_path / "run", policy="stabledrl", unit="sequence") as recorder:
        recorder.log_step(
            0,
            logp=logp,
            logp_old=old,
            advantages=[torch.tensor(1.0), torch.tensor(-1.0), 1.0, -1.0],
            group_id=[0, 0, 1, 1],
            reward=[torch.tensor(1.0, dtype=dtype), 0.0, 1.0, 0.0],
        )
    step = sd.open_run(tmp_path / "run").step(0)
    expected = torch.stack(logp).detach().float().numpy()
    np.testing.assert_array_equal(step.array("logp"), expected)
    np.testing.assert_array_equal(step.array("logp_old"), torch.stack(old).numpy())
    np.testing.assert_array_equal(step.array("advantages"), [1.0, -1.0, 1.0, -1.0])
    np.testing.assert_array_equal(step.array("reward"), [1.0, 0.0, 1.0, 0.0])


def test_a_list_of_rows_is_a_b_by_l_array(tmp_path: Path) -> None:
    draws = torch.Generator().manual_seed(0)
    rows = [-torch.rand(6, generator=draws, requires_grad=True) for _ in range(3)]
    with sd.Recorder(tmp_path / "run") as recorder:
        recorder.log_step(0, logp=rows, logp_old=rows, advantages=[1.0, 0.0, -1.0])
    step = sd.open_run(tmp_path / "run").step(0)
    np.testing.assert_array_equal(step.array("logp"), torch.cat(rows).detach().numpy())
    np.testing.assert_array_equal(step.array("seq_id"), np.arange(3).repeat(6))


def test_tensors_that_do_not_stack_are_refused_naming_the_field(tmp_path: Path) -> None:
    with sd.Recorder(tmp_path / "run") as recorder:
        with pytest.raises(UsageError, match=r"^logp: cannot be read as an array \(stack"):
            recorder.log_step(
                0, logp=[torch.ones(2), torch.ones(3)], logp_old=[0.0], advantages=[0]
            )
        assert recorder.last_step is None


def test_a_policy_batch_of_tensor_lists_weighs_as_the_stacked_tensors() -> None:
    """Before: a bare RuntimeError ('Can't call numpy() on Tensor that requires grad') or
    TypeError ('Got unsupported ScalarType BFloat16') from inside `prepare`."""
    elbo, old = _elbos()
    policy = get_policy("stabledrl")
    stacked = PolicyBatch(
        logp=torch.stack(elbo).detach(),
        logp_old=torch.stack(old),
        advantages=[1.0, -1.0, 1.0, -1.0],
        unit="sequence",
    )
    listed = PolicyBatch(
        logp=elbo, logp_old=old, advantages=[1.0, -1.0, 1.0, -1.0], unit="sequence"
    )
    torch.testing.assert_close(policy.weights(listed).coef, policy.weights(stacked).coef)
    halved = PolicyBatch(
        logp=[e.detach().bfloat16() for e in elbo],
        logp_old=old,
        advantages=[1.0, -1.0, 1.0, -1.0],
        unit="sequence",
    )
    assert torch.isfinite(policy.weights(halved).coef).all()


def test_a_policy_batch_of_tensors_numpy_cannot_read_is_an_input_error() -> None:
    """Lists of lists of such tensors, and tensors that do not stack, are refused naming the
    field, never a bare RuntimeError."""
    elbo, old = _elbos()
    nested = PolicyBatch(logp=[elbo, elbo], logp_old=[old, old], advantages=[1.0, -1.0])
    with pytest.raises(InputError, match=r"^logp: cannot be read as an array"):
        get_policy("grpo").weights(nested)
    ragged = PolicyBatch(logp=[torch.ones(2), torch.ones(3)], logp_old=old, advantages=[1.0])
    with pytest.raises(InputError, match=r"^logp: cannot be read as an array \(stack"):
        get_policy("grpo").weights(ragged)
