"""The in-training guard as a researcher meets it in a custom loop: what it decides on a
sparse-reward run, how `Decision.apply` reads the clip it is given, and the documented ways
of running it under a GradScaler and across a resume."""

from __future__ import annotations

import random

import pytest
import torch

from stabledrl_cli.guard import Decision, Guard
from stabledrl_cli.replay.guards import replay_guards


def steady_norms(n: int, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [1.0 + 0.05 * rng.gauss(0.0, 1.0) for _ in range(n)]


def test_skip_step_does_not_skip_the_first_steps_that_learn_after_a_start_without_gradient():
    """A sparse-reward run whose first 100 steps earned no reward (every group's rewards equal:
    advantages, loss and gradient exactly 0) filled skip-step's window with zeros: their
    standard deviation 0 made the first real grad norm's z-score infinite, and the next ones'
    above 6, so the default guard skipped steps 100, 101 and 102, the first updates with any
    signal. A step without gradient has nothing to skip and stays out of the statistics, as
    zclip's norms of 0 do."""
    norms = [0.0] * 100 + steady_norms(60)
    losses = [0.0] * 100 + [-0.1 - 0.01 * (i % 3) for i in range(60)]
    for with_loss in (False, True):
        guard = Guard(mode="skip")
        decisions = [
            guard.before_step(grad_norm=norm, loss=loss if with_loss else None)
            for norm, loss in zip(norms, losses, strict=True)
        ]
        assert [i for i, d in enumerate(decisions) if d.skip] == []
        assert guard.judged == 0  # 60 nonzero norms: fewer than half the 128-step window
        assert all(d.z is None for d in decisions)
    # replayed over the same norms, the rule says the same
    (report,) = replay_guards(range(160), norms, None, ["skip-step"])
    assert report.acted == []
    assert report.collected == 60


def test_skip_step_still_skips_a_spike_among_steps_without_gradient():
    """Steps without gradient interleaved with real ones leave the spike rule as it was over
    the real ones alone."""
    real = steady_norms(120)
    real[100] = 10.0
    mixed: list[float] = []
    for norm in real:
        mixed += [norm, 0.0]
    guard, plain = Guard(mode="skip"), Guard(mode="skip")
    on_mixed = [guard.before_step(grad_norm=n) for n in mixed]
    on_real = [plain.before_step(grad_norm=n) for n in real]
    assert on_mixed[0::2] == on_real
    assert [i for i, d in enumerate(on_real) if d.skip] == [100]
    assert all(d.action == "none" and d.z is None for d in on_mixed[1::2])


def test_apply_reads_a_factor_above_1_as_the_clip_that_did_not_act():
    """`applied=max_norm / norm` without the min(1, ...) is above 1 on a step whose norm is
    below max_norm, where clip_grad_norm_ left the gradient as it was: the guard divided its
    scale by it and cut the gradient to scale / applied of its pre-clip size (0.6 / 2: 0.3,
    not the rule's 0.6). clip_grad_norm_ never scales up: such a factor is taken as 1."""
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.tensor([3.0, 4.0])  # norm 5
    max_norm = 10.0
    norm = float(torch.nn.utils.clip_grad_norm_([param], max_norm))
    factor = Decision("scale", 0.6, "zclip: z 9").apply([param], applied=max_norm / norm)
    assert factor == pytest.approx(0.6)
    torch.testing.assert_close(param.grad, torch.tensor([1.8, 2.4]))
