"""The Recorder's arguments and keywords refused with one line of its own: rewrite_step's
unknown keyword names rewrite_step, a reward_range must be an ordered pair of numbers."""

from __future__ import annotations

import numpy as np
import pytest

import stabledrl_cli as sd
from stabledrl_cli.errors import UsageError


def test_rewrite_step_refuses_a_misspelt_keyword_in_its_own_name(tmp_path):
    """Before, rewrite_step(0, logpp=...) raised Python's TypeError naming log_step."""
    z = np.zeros(2, np.float32)
    with sd.Recorder(tmp_path / "run", unit="sequence") as rec:
        rec.log_step(0, logp=z, logp_old=z, advantages=z)
        with pytest.raises(UsageError) as refused:
            rec.rewrite_step(0, logpp=z)
        assert str(refused.value) == (
            "'logpp' is not a keyword of rewrite_step (did you mean 'logp'?)"
        )
        rec.rewrite_step(0, logp=z, logp_old=z, advantages=z, grad_norm=1.0)
    assert sd.open_run(tmp_path / "run").step(0).scalars["grad_norm"] == 1.0
