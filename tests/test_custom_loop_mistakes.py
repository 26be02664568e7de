"""Mistakes a researcher makes on a first custom dLLM loop, each refused in one line that
names the fix: a loop's per-token log-probs under unit "sequence", and per-sequence sums
under unit "token"."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import stabledrl_cli as sd
from stabledrl_cli.errors import UsageError

B, L = 8, 6


def _log(run: Path, unit: str, logp: torch.Tensor) -> None:
    with sd.Recorder(run, policy="grpo", unit=unit) as rec:
        rec.log_step(
            0,
            logp=logp,
            logp_old=logp - 0.1,
            advantages=torch.randn(B),
            group_id=torch.arange(B) // 4,
            reward=torch.rand(B),
        )


def test_per_token_log_probs_under_unit_sequence_name_unit_token(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as refused:
        _log(tmp_path / "run", "sequence", -torch.rand(B, L))
    assert str(refused.value).endswith("; per-token log-probs are unit 'token'")


def test_log_probs_summed_per_sequence_under_unit_token_name_unit_sequence(
    tmp_path: Path,
) -> None:
    with pytest.raises(UsageError) as refused:
        _log(tmp_path / "run", "token", -torch.rand(B, L).sum(1))
    assert str(refused.value) == (
        "seq_id: required for flat per-token arrays (or pass [B, L] arrays); one entry a "
        "sequence (its log-probs summed, an ELBO) is unit 'sequence'"
    )
