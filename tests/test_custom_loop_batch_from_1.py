"""A custom loop under `stabledrl record`'s optimizer hooks that numbers its batches as
transformers does its global_step, from 1, counted after the update, and logs each batch after
its optimizer step: batch n is iteration n - 1's, and the hooks pair it with optimizer step n,
the next iteration's (its grad norm and lr). The hooks cannot tell it from a loop whose first
batch comes at step 1 before its step, so recording goes on, with one warning line."""

from __future__ import annotations

from pathlib import Path

import pytest
from _record_here import record_python_here

import stabledrl_cli as sd

SCRIPT = """
import os
import torch
import stabledrl_cli as sd

first, after = int(os.environ["FIRST"]), os.environ["AFTER"] == "1"
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for it in range(4):
    optimizer.zero_grad()
    model(torch.randn(2, 4)).pow(2).mean().backward()
    logp = -torch.rand(2, 3)
    fields = {"logp": logp, "logp_old": logp, "advantages": torch.ones(2), "loss": float(it)}
    if after:
        optimizer.step()
    sd.log_policy_batch(first + it, **fields)
    if not after:
        optimizer.step()
"""
WARNING = (
    "stabledrl: warning: the loop's first batch, log_policy_batch(1), came after optimizer "
    "step 0, which had none: a loop that numbers its batches from 1 (a global_step counted "
    "after the update) has each batch recorded with the next iteration's optimizer step; "
)


def _record(
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    tmp_path: Path,
    first: int,
    after: bool,
) -> str:
    """SCRIPT's loop under `record -p grpo`, its batches numbered from `first`, each logged
    `after` its optimizer step or before; record's stderr, then the script's."""
    monkeypatch.setenv("FIRST", str(first))
    monkeypatch.setenv("AFTER", "1" if after else "0")
    done, _ = record_python_here(monkeypatch, capfd, SCRIPT, "-p", "grpo", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_batches_numbered_from_1_after_the_step_warn_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    stderr = _record(monkeypatch, capfd, tmp_path, first=1, after=True)
    assert [line for line in stderr.splitlines() if "warning" in line] == [
        next(line for line in stderr.splitlines() if line.startswith(WARNING))
    ]
    run = sd.open_run(tmp_path / "run")
    # batch 1 (iteration 0's loss) went with optimizer step 1: what the warning says
    assert run.step(1).scalars["loss"] == 0.0
    assert run.step(0).is_scalar


@pytest.mark.parametrize("after", [True, False])
def test_batches_numbered_from_0_warn_of_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], after: bool
) -> None:
    """Each batch is recorded with its own optimizer step (its lr), whether the loop logs it
    before the step or after."""
    assert "warning" not in _record(monkeypatch, capfd, tmp_path, first=0, after=after)
    run = sd.open_run(tmp_path / "run")
    assert run.step_numbers == [0, 1, 2, 3]
    assert [run.step(s).scalars["loss"] for s in run.step_numbers] == [0.0, 1.0, 2.0, 3.0]
    assert all(run.step(s).scalars.get("lr") == 0.1 for s in run.step_numbers)
