"""Optimizer hooks: an optimizer whose parameter group holds no learning rate as a number
(transformers' Adafactor with its relative step keeps `lr=None` in its groups) is recorded,
without `lr`, instead of stopping the recording at its first step."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from _cli import cli_command
from _cli import record_env as _env

from stabledrl_cli.dump import open_run

SCRIPT = textwrap.dedent(
    """
    import torch

    class RelativeStep(torch.optim.SGD):  # as transformers' Adafactor(lr=None): its own rate
        def __init__(self, params):
            torch.optim.Optimizer.__init__(self, params, {"lr": None, "momentum": 0.0})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(p.grad, alpha=-0.01)

    model = torch.nn.Linear(4, 1)
    head = torch.nn.Linear(4, 1)
    optimizer = RelativeStep([{"params": model.parameters()},
                              {"params": head.parameters(), "lr": torch.tensor(0.5)}])
    for step in range(3):
        optimizer.zero_grad()
        (model(torch.ones(2, 4)) + head(torch.ones(2, 4))).sum().backward()
        optimizer.step()
    print("trained", flush=True)
    """
)


def test_a_group_whose_lr_is_none_is_recorded_without_it(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [*cli_command(), "record", "--out", str(tmp_path / "run"), "--", sys.executable,
         str(script)],
        capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr, result.stderr
    run = open_run(tmp_path / "run")
    assert run.step_numbers == [0, 1, 2]
    for n in range(3):
        scalars = run.step(n).scalars
        assert "lr" not in scalars and "lr/group_0" not in scalars, scalars
        assert scalars["lr/group_1"] == 0.5
        assert scalars["grad_norm"] > 0
