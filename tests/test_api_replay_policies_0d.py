"""`replay(run, policies)` given a 0-d numpy array or tensor: iterable by its type, not by its
value, so listing it raised a bare TypeError ('iteration over a 0-d array'); it is refused as
any other value that is no spec, Policy or list of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import stabledrl_cli as sd
from stabledrl_cli.errors import UsageError


@pytest.fixture
def run(tmp_path: Path) -> Path:
    logp = torch.linspace(-2.0, -0.5, 8)
    with sd.Recorder(tmp_path / "run", policy="grpo", unit="sequence") as recorder:
        recorder.log_step(0, logp=logp, logp_old=logp + 0.25, advantages=torch.ones(8))
    return tmp_path / "run"


@pytest.mark.parametrize(
    ("policies", "kind"),
    [(np.array("grpo"), "numpy.ndarray"), (torch.tensor(2), "torch.Tensor")],
)
def test_a_0d_array_is_refused_as_no_list_of_policies(
    run: Path, policies: object, kind: str
) -> None:
    with pytest.raises(UsageError) as refused:
        sd.replay(run, policies)  # type: ignore[arg-type]
    assert str(refused.value) == (
        f"policies must be a spec, a Policy or a list of them, not a 0-d {kind}"
    )


def test_an_array_of_specs_is_a_list_of_them(run: Path) -> None:
    result = sd.replay(run, np.array(["grpo", "cispo"]))  # type: ignore[arg-type]
    assert [policy.spec for policy in result.policies] == ["grpo", "cispo"]
