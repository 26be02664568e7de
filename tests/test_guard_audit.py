"""The in-training guard as a researcher meets it in a custom loop: what it decides on a
sparse-reward run, how `Decision.apply` reads the clip it is given, and the documented ways
of running it under a GradScaler and across a resume."""

from __future__ import annotations

import io
import math
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
    norms = [0.0] * 100 + steady_norms(200)
    norms[250] = 10.0  # a real spike, later
    losses = [0.0] * 100 + [-0.1 - 0.01 * (i % 3) for i in range(200)]
    for with_loss in (False, True):
        guard = Guard(mode="skip")
        decisions = [
            guard.before_step(grad_norm=norm, loss=loss if with_loss else None)
            for norm, loss in zip(norms, losses, strict=True)
        ]
        assert [i for i, d in enumerate(decisions) if d.skip] == [250]
        assert all(d.z is None for d in decisions[:163])  # 63 nonzero norms gathered first
        assert guard.judged == 137
    # replayed over the same norms, the rule says the same
    (report,) = replay_guards(range(300), norms, None, ["skip-step"])
    assert [(s.step, s.action) for s in report.acted] == [(250, "skip")]
    assert report.collected == 200


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


def test_the_gradscaler_recipe_trains_through_a_skip_and_backs_the_scale_off():
    """Under a GradScaler the page's loop, its `scaler.step` skipped with the step, left the
    scaler unupdated: the next `unscale_` raised 'unscale_() has already been called on this
    optimizer since the last update()' and training stopped. The page now says to call
    `scaler.update()` on every step, as this loop does: an overflow the guard skips (its
    grad norm inf) halves the scale, as the scaler's own skip does."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    guard = Guard(mode="skip")
    actions = []
    for step in range(4):
        optimizer.zero_grad()
        x = torch.full((8, 4), math.inf if step == 1 else 1.0)  # step 1 overflows
        scaler.scale(model(x).pow(2).mean()).backward()
        scaler.unscale_(optimizer)
        norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        decision = guard.before_step(grad_norm=norm)
        before = [p.detach().clone() for p in params]
        if not decision.skip:
            scaler.step(optimizer)
        scaler.update()  # every step, skipped or not
        moved = any(not torch.equal(b, p) for b, p in zip(before, params, strict=True))
        actions.append((decision.action, moved))
        if step == 1:
            assert scaler.get_scale() == 2.0**15
    assert actions == [("none", True), ("skip", False), ("none", True), ("none", True)]


def test_a_guard_saved_with_the_checkpoint_goes_on_where_it_stopped_after_a_resume():
    """A run resumed in a new process with a new Guard gathered its statistics again: for its
    first 63 steps skip-step judged nothing, and a spike there went through. The page says so
    and how to go on instead: the guard pickles with the checkpoint."""
    norms = steady_norms(200)
    norms[110] = 20.0  # a spike 10 steps after the resume at step 100
    unbroken = Guard(mode="skip", policy="grpo")
    expected = [unbroken.before_step(grad_norm=n) for n in norms]
    first = Guard(mode="skip", policy="grpo")
    for norm in norms[:100]:
        first.before_step(grad_norm=norm)
    saved = io.BytesIO()
    torch.save({"step": 100, "guard": first}, saved)
    saved.seek(0)
    resumed = torch.load(saved, weights_only=False)["guard"]
    assert [resumed.before_step(grad_norm=n) for n in norms[100:]] == expected[100:]
    assert (resumed.counts, resumed.judged) == (unbroken.counts, unbroken.judged)
    assert expected[110].skip
    fresh = Guard(mode="skip", policy="grpo")  # what a resume without it does
    assert not [fresh.before_step(grad_norm=n) for n in norms[100:]][10].skip


def test_apply_takes_a_parameter_list_as_clip_grad_norm_does():
    """`clip_grad_norm_(plist, ...)` takes an nn.ParameterList (an iterable of its parameters);
    `apply(plist)` refused it on every step as 'got a ParameterList model, not its
    .parameters()', though it is no model and is the very iterable the clip took."""
    plist = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(2)) for _ in range(2)])
    for p in plist:
        p.grad = torch.tensor([3.0, 4.0])
    torch.nn.utils.clip_grad_norm_(plist, 100.0)
    assert Decision("scale", 0.5, "zclip: z 9").apply(plist) == 0.5
    for p in plist:
        torch.testing.assert_close(p.grad, torch.tensor([1.5, 2.0]))
