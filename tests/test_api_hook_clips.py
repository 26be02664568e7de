"""Optimizer hooks: a step whose gradients are clipped more than once (a clip_grad_norm_ with
max_norm=inf to read the norm, then the real clip; a clip of one module, then of the whole
model) records the norms of the gradients before the first clip, not a sum over the clips."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
from _cli import cli_command
from test_optimizer_hooks import _env, close

from stabledrl_cli.dump import open_run

SCRIPT = textwrap.dedent(
    """
    import json, math, sys
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD([
        {"params": model[0].parameters()}, {"params": model[2].parameters()},
    ], lr=0.1)
    seen = []
    for step in range(3):
        optimizer.zero_grad()
        model(torch.randn(16, 6)).pow(2).mean().backward()
        norms = {name: p.grad.double().norm().item() for name, p in model.named_parameters()}
        groups = [math.sqrt(sum(norms[f"{m}.{k}"] ** 2 for k in ("weight", "bias")))
                  for m in (0, 2)]
        if step == 0:  # read the norm, then clip
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf).item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        elif step == 1:  # the same clip twice
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01).item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        else:  # one module, then the whole model: the second finds the first's clipped
            first = torch.nn.utils.clip_grad_norm_(model[2].parameters(), 0.01).item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
            grad_norm = math.sqrt(first ** 2 + groups[0] ** 2)
        optimizer.step()
        seen.append({"grad_norm": grad_norm, "groups": groups})
    json.dump(seen, open(sys.argv[1], "w"))
    """
)


def test_a_step_clipped_twice_records_the_norms_before_the_first_clip(tmp_path):
    script, computed = tmp_path / "train.py", tmp_path / "computed.json"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [*cli_command(), "record", "--out", str(tmp_path / "run"), "--", sys.executable,
         str(script), str(computed)],
        capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    run = open_run(tmp_path / "run")
    for n, mine in enumerate(json.loads(computed.read_text())):
        scalars = run.step(n).scalars
        assert close(scalars["grad_norm"], mine["grad_norm"]), (n, scalars, mine)
        for g in (0, 1):
            assert close(scalars[f"grad_norm/group_{g}"], mine["groups"][g]), (n, g, scalars)
            assert close(scalars[f"grad_norm/module/{2 * g}"], mine["groups"][g]), (n, g)
    assert not math.isnan(run.step(0).scalars["grad_norm"])


SKIPPED_BY_THE_SCRIPT = textwrap.dedent(
    """
    import json, math, sys
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for step in range(4):
        optimizer.zero_grad(set_to_none=sys.argv[2] == "none")
        model(torch.randn(16, 6)).pow(2).mean().backward()
        if step == 1:
            model.weight.grad[0, 0] = float("nan")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01).item()
        if not math.isfinite(grad_norm):  # the script's own rule: no step on a NaN gradient
            continue
        optimizer.step()
        seen.append(grad_norm)
    json.dump(seen, open(sys.argv[1], "w"))
    """
)


@pytest.mark.parametrize("zero", ["none", "zeros"])
def test_a_clip_whose_step_the_script_skipped_is_not_the_next_steps(tmp_path, zero):
    """The clip of an iteration that the script skipped (no optimizer.step()) measured other
    gradients than the next iteration's clip: the next step records its own clip's norm."""
    script, computed = tmp_path / "train.py", tmp_path / "computed.json"
    script.write_text(SKIPPED_BY_THE_SCRIPT)
    result = subprocess.run(
        [*cli_command(), "record", "--out", str(tmp_path / "run"), "--", sys.executable,
         str(script), str(computed), zero],
        capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    run = open_run(tmp_path / "run")
    mine = json.loads(computed.read_text())
    assert run.step_numbers == [0, 1, 2]
    for n in range(3):
        assert close(run.step(n).scalars["grad_norm"], mine[n]), (n, run.step(n).scalars, mine)
