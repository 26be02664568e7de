"""Optimizer hooks: a step whose gradients are clipped more than once (a clip_grad_norm_ with
max_norm=inf to read the norm, then the real clip; a clip of one module, then of the whole
model) records the norms of the gradients before the first clip, not a sum over the clips."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from _cli import close
from _cli import record as _record
from _phases import PHASES_SCRIPT

from stabledrl_cli.capture._pending_clips import grad_states, unchanged
from stabledrl_cli.dump import Run, Step, open_run

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


def test_a_step_clipped_twice_records_the_norms_before_the_first_clip(phased):
    steps, computed = phased["clipped twice"]
    for n, mine in enumerate(computed):
        scalars = steps[n].scalars
        assert close(scalars["grad_norm"], mine["grad_norm"]), (n, scalars, mine)
        for g in (0, 1):
            assert close(scalars[f"grad_norm/group_{g}"], mine["groups"][g]), (n, g, scalars)
            assert close(scalars[f"grad_norm/module/{2 * g}"], mine["groups"][g]), (n, g)
    assert not math.isnan(steps[0].scalars["grad_norm"])


SKIPPED_BY_THE_SCRIPT = textwrap.dedent(
    """
    import json, math, sys
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for zero in sys.argv[2:]:  # each case in turn, 4 iterations each
        for step in range(4):
            optimizer.zero_grad(set_to_none=zero != "zeros")
            model(torch.randn(16, 6)).pow(2).mean().backward()
            if step == 1:
                model.weight.grad[0, 0] = float("nan")
            try:
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), 0.01, error_if_nonfinite=zero == "refused"
                ).item()
            except RuntimeError:  # torch refuses a non-finite norm, clipping nothing
                grad_norm = math.nan
            seen.append(grad_norm)
            if not math.isfinite(grad_norm):  # the script's own rule: no step on a NaN gradient
                continue
            optimizer.step()
    json.dump(seen, open(sys.argv[1], "w"))
    """
)
ZEROS = ("none", "zeros", "refused")


@pytest.mark.parametrize("zero", ZEROS)
def test_a_clip_whose_step_the_script_skipped_is_not_the_next_steps(phased, zero):
    """The clip of an iteration that the script skipped (no optimizer.step()) measured other
    gradients than the next iteration's clip: the next step records its own clip's norm, and
    the skipped one is recorded as skipped (optimizer_skipped 1, its NaN norm). So is a clip
    that torch refused (`error_if_nonfinite=True` raised): before, that iteration was in no
    step (3 steps for 4 iterations, the NaN in none)."""
    steps, mine = phased["skipped"]
    first = 4 * ZEROS.index(zero)
    for n in range(first, first + 4):
        scalars = steps[n].scalars
        assert close(scalars["grad_norm"], mine[n]), (n, scalars, mine)
        assert scalars.get("optimizer_skipped", 0.0) == (n == first + 1), (n, scalars)


TWO_OPTIMIZERS_ONE_CLIP = textwrap.dedent(
    """
    import json, math, sys
    import torch

    torch.manual_seed(0)
    actor, critic = torch.nn.Linear(6, 1), torch.nn.Linear(6, 1)
    actor_optimizer = torch.optim.SGD(actor.parameters(), lr=0.1)
    critic_optimizer = torch.optim.SGD(critic.parameters(), lr=0.1)
    seen = []
    for step in range(3):
        actor_optimizer.zero_grad()
        critic_optimizer.zero_grad()
        x = torch.randn(8, 6)
        (actor(x).pow(2).mean() + 3 * critic(x).pow(2).mean()).backward()
        norm = lambda m: math.sqrt(sum(p.grad.double().norm().item() ** 2 for p in m.parameters()))
        seen.append({"actor": norm(actor), "critic": norm(critic)})
        torch.nn.utils.clip_grad_norm_([*actor.parameters(), *critic.parameters()], 0.01)
        actor_optimizer.step()
        critic_optimizer.step()
    json.dump(seen, open(sys.argv[1], "w"))
    """
)


def test_one_clip_of_two_optimizers_parameters_gives_each_its_own_norm(phased):
    """An actor and a critic clipped together, each with its optimizer: each optimizer's
    recorded norm is that of its own gradients before the clip (not the joint norm for the
    first, nor the clipped norm for the second)."""
    steps, mine = phased["two optimizers"]
    for n in range(3):
        scalars = steps[n].scalars
        assert close(scalars["grad_norm"], mine[n]["actor"]), (n, scalars, mine)
        if n:  # the critic's step after the actor's step n - 1
            assert close(scalars["optimizer_1/grad_norm"], mine[n - 1]["critic"]), (n, scalars)


def test_a_gradient_freed_and_made_again_is_not_the_one_a_clip_left():
    """zero_grad() frees a gradient; the next backward's may take its id and version: it is
    still another gradient, whose clip is its own."""
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    then = grad_states([param])[id(param)]
    assert unchanged(then, grad_states([param])[id(param)])
    param.grad.mul_(0.5)  # clipped again in place
    assert not unchanged(then, grad_states([param])[id(param)])
    then = grad_states([param])[id(param)]
    param.grad = None  # zero_grad(set_to_none=True), then a new gradient of the same version
    param.grad = torch.ones(3).mul_(2.0)
    assert not unchanged(then, grad_states([param])[id(param)])


SPENT_GENERATOR = textwrap.dedent(
    """
    import torch

    model = torch.nn.Linear(4, 1)
    params = model.parameters()
    optimizer = torch.optim.SGD(params, lr=0.1)
    for step in range(2):
        model(torch.ones(3, 4)).sum().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # spent by the optimizer: no clip
        torch.nn.utils.clip_grad_norm_(parameters=params, max_norm=1.0)  # given by keyword
        optimizer.step()
        optimizer.zero_grad()
    """
)


def test_torchs_warning_of_a_spent_generator_names_the_scripts_line(tmp_path):
    """torch warns when clip_grad_norm_ gets an empty generator (one the optimizer spent: the
    script clips nothing), given as the first argument or by keyword. Before, the hooks'
    wrapper handed torch a list: no warning under `stabledrl record`; now the script's own
    lines warn, as without it."""
    script = tmp_path / "train.py"
    script.write_text(SPENT_GENERATOR)
    plain = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    warned = [line for line in plain.stderr.splitlines() if "UserWarning" in line]
    assert warned == [f"{script}:{line}: UserWarning: `parameters` is an empty generator, no "
                      "gradient clipping will occur." for line in (9, 10)]  # fmt: skip
    result = _record("--out", str(tmp_path / "run"), "--", sys.executable, str(script))
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "UserWarning" in line] == warned
    assert open_run(tmp_path / "run").step_numbers == [0, 1]


CLIPPED_BY_VALUE = textwrap.dedent(
    """
    import json, math, sys
    import torch
    from torch.nn.utils import clip_grad_value_

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for step in range(4):
        optimizer.zero_grad()
        model(torch.randn(16, 6)).pow(2).mean().backward()
        if step == 1:
            model[1].weight.grad[0, 0] = float("inf")
        if step == 2:
            model[1].weight.grad[0, 1] = 1e3  # a spike
        norm = lambda ps: math.sqrt(sum(p.grad.double().norm().item() ** 2 for p in ps))
        seen.append({"grad_norm": norm(model.parameters()), "last": norm(model[1].parameters())})
        clip_grad_value_(model.parameters(), 0.01)
        optimizer.step()
    json.dump(seen, open(sys.argv[1], "w"))
    """
)


def test_a_clip_by_value_records_the_norms_before_it(phased):
    """clip_grad_value_ clamps each gradient element: the step's norms are those of the
    gradients before it, as for a norm clip. Before, they were the clamped ones: the spike's
    step recorded 0.08 for 1000, and the inf gradient's a finite norm with nonfinite_grads 0."""
    steps, mine = phased["by value"]
    assert len(mine) == 4
    for n in range(4):
        scalars = steps[n].scalars
        assert close(scalars["grad_norm"], mine[n]["grad_norm"]), (n, scalars, mine)
        assert close(scalars["grad_norm/module/1"], mine[n]["last"]), (n, scalars, mine)
        assert scalars["nonfinite_grads"] == (n == 1), (n, scalars)
    assert math.isinf(steps[1].scalars["grad_norm"])


class _PhaseSteps:
    """A phase's steps of a run, numbered from 0 at its first."""

    def __init__(self, run: Run, first: int) -> None:
        self.run, self.first = run, first

    def __getitem__(self, n: int) -> Step:
        return self.run.step(self.first + n)


PHASED = {
    "two optimizers": (TWO_OPTIMIZERS_ONE_CLIP, ()),
    "clipped twice": (SCRIPT, ()),
    "by value": (CLIPPED_BY_VALUE, ()),
    "skipped": (SKIPPED_BY_THE_SCRIPT, ZEROS),
}
"""Scripts, with their arguments after the file they write, recorded as phases of one
process (`_phases`), in this order: the actor's and the critic's optimizers first, the first
two the process steps (the critic's: optimizer_1)."""


@pytest.fixture(scope="module")
def phased(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """PHASED recorded by one `stabledrl record` of one process: name -> (the phase's steps,
    numbered from 0 at its first, what its script computed, one item an iteration); "run" ->
    the whole run."""
    tmp = tmp_path_factory.mktemp("phases")
    phases = []
    for k, (name, (source, args)) in enumerate(PHASED.items()):
        script = tmp / f"phase_{k}.py"
        script.write_text(source)
        phases.append((name, str(script), [str(tmp / f"phase_{k}.json"), *args]))
    (tmp / "phases.json").write_text(json.dumps(phases))
    (tmp / "train.py").write_text(PHASES_SCRIPT)
    result = _record("--out", str(tmp / "run"), "--", sys.executable, str(tmp / "train.py"),
                     str(tmp / "phases.json"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    run, first = open_run(tmp / "run"), 0
    recorded: dict[str, Any] = {"run": run}
    for name, _, (computed, *_) in phases:
        mine = json.loads(Path(computed).read_text())
        recorded[name] = (_PhaseSteps(run, first), mine)
        first += len(mine)
    return recorded


def test_each_iteration_of_each_phase_is_a_step(phased):
    iterations = [len(phased[name][1]) for name in PHASED]
    assert iterations == [3, 3, 4, 4 * len(ZEROS)]
    assert phased["run"].step_numbers == list(range(sum(iterations)))
