"""A StableDRL-style loop (unit "sequence") that logs its [1, N] ELBO as it is, without the
`[0]` of docs/custom-loops.md's `per_seq_elbo.detach()[0]`: the refusal names logp's shape and
the fix, not seq_id, which the loop never gave."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import stabledrl_cli as sd
from stabledrl_cli.errors import UsageError

N = 8


def _log(run: Path, logp: torch.Tensor, advantages: torch.Tensor) -> None:
    with sd.Recorder(run, policy="stabledrl:norm=batch", unit="sequence") as rec:
        rec.log_step(
            0,
            logp=logp,
            logp_old=logp + 0.1,
            advantages=advantages,
            group_id=torch.arange(N) // 4,
            reward=torch.rand(N),
        )


@pytest.mark.parametrize("advantages", [torch.randn(N), torch.randn(1, N)])
def test_a_1_by_n_elbo_is_refused_naming_its_shape(
    tmp_path: Path, advantages: torch.Tensor
) -> None:
    with pytest.raises(UsageError) as refused:
        _log(tmp_path / "run", -torch.rand(1, N), advantages)
    assert str(refused.value) == (
        "logp: shape [1, 8] holds 8 entries a row, but unit 'sequence' records one entry a "
        "sequence: pass [N] arrays, one per sequence (per_seq_elbo[0] of a [1, N] ELBO), or "
        "seq_id"
    )


def test_an_estimate_a_mask_a_row_is_refused_naming_the_mean(tmp_path: Path) -> None:
    """[N, K]: K Monte Carlo masks' ELBOs of each sequence (the [1, N] hint did not fit)."""
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 0.5, -0.5])
    with pytest.raises(UsageError) as refused:
        _log(tmp_path / "run", -torch.rand(N, 2), advantages)
    assert str(refused.value) == (
        "logp: shape [8, 2] holds 2 entries a row, but unit 'sequence' records one entry a "
        "sequence: pass [N] arrays, one per sequence (the mean over its 2 masks of an [N, K] "
        "of Monte Carlo estimates, .mean(-1)), or seq_id; per-token log-probs are unit 'token'"
    )


def test_one_entry_a_row_and_the_documented_index_are_recorded(tmp_path: Path) -> None:
    _log(tmp_path / "column", -torch.rand(N, 1), torch.randn(N))
    _log(tmp_path / "indexed", -torch.rand(1, N)[0], torch.randn(N))
    for name in ("column", "indexed"):
        assert sd.open_run(tmp_path / name).step(0).array("seq_id").tolist() == list(range(N))
