"""`stabledrl_cli.guard`: the in-process guard skips or scales a flagged step, and every
decision is recorded; wired into the built-in example (`record --guard`)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import Recorder, open_run
from stabledrl_cli.errors import InputError, UsageError
from stabledrl_cli.example import ExampleConfig
from stabledrl_cli.example.run_setup import recorder_kwargs
from stabledrl_cli.example.trainer import train
from stabledrl_cli.guard import ACTION_CODES, SCALARS, Decision, Guard
from stabledrl_cli.policies import PolicyBatch, get_policy
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.diff.runs import diff_runs
from stabledrl_cli.replay.guards import replay_guards

NORMS = [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 50.0, 1.0]
"""A steady grad norm with one spike at index 6."""


def test_skip_mode_skips_the_spike_and_nothing_else():
    guard = Guard(mode="skip", rule="skip-step:window=6,sigma=6")
    decisions = [guard.before_step(grad_norm=n) for n in NORMS]
    assert [d.action for d in decisions] == ["none"] * 6 + ["skip", "none"]
    spike = decisions[6]
    assert spike.skip and spike.scale == 0.0 and spike.z is not None and spike.z > 6
    assert spike.reason.startswith("skip-step: z ")
    assert guard.counts == {"none": 7, "scale": 0, "skip": 1}
    assert Guard.scalars(spike) == {
        "guard_action": 2.0,
        "guard_scale": 0.0,
        "guard_z": spike.z,
        "guard_rule_action": 2.0,
    }
    assert math.isnan(Guard.scalars(decisions[0])["guard_z"])  # still gathering statistics
    nonfinite = guard.before_step(grad_norm=math.inf)
    assert nonfinite.skip and nonfinite.z is None and "non-finite" in nonfinite.reason


@pytest.mark.parametrize("mode", ["skip", "scale"])
def test_a_nonfinite_loss_is_skipped_in_either_mode(mode):
    guard = Guard(mode=mode)
    for loss in (math.nan, math.inf):
        decision = guard.before_step(grad_norm=1.0, loss=loss)
        assert decision.skip and decision.z is None and "non-finite" in decision.reason


@pytest.mark.parametrize("mode", ["skip", "scale"])
def test_an_integer_past_floats_range_is_an_infinite_norm(mode):
    """Before: float(10**400) raised OverflowError out of before_step, into the training."""
    guard = Guard(mode=mode)
    decision = guard.before_step(grad_norm=10**400)
    assert decision.skip and "non-finite" in decision.reason
    assert guard.before_step(grad_norm=1.0, loss=-(10**400)).skip


@pytest.mark.parametrize("mode", ["skip", "scale"])
def test_a_step_over_the_ceiling_alone_says_so(mode):
    """4 after 1, 5, 3 is 0.61 standard deviations up, far below z_thresh 2.5: only max_norm
    acts on it. Its reason read 'zclip: z 0.612', as if the z-score had."""
    guard = Guard(mode=mode, rule="zclip:warmup=3,max_norm=2")
    for norm in (1.0, 5.0, 3.0):
        guard.before_step(grad_norm=norm)
    decision = guard.before_step(grad_norm=4.0)
    assert decision.action == mode and decision.z == pytest.approx(0.612, abs=1e-3)
    assert decision.reason == "ceiling"
    spike = guard.before_step(grad_norm=40.0)  # past z_thresh too: the z-score says why
    assert spike.reason.startswith("zclip: z ")


def test_scale_mode_scales_the_spike_down_to_the_threshold():
    guard = Guard(mode="scale", rule="zclip:warmup=5")
    decisions = [guard.before_step(grad_norm=n) for n in NORMS]
    spike = decisions[6]
    assert [d.action for d in decisions[:6]] == ["none"] * 6
    assert spike.action == "scale" and 0.0 < spike.scale < 0.1 and not spike.skip
    # Its gradient ends at scale x the pre-clip gradient, whatever clip_grad_norm_ applied.
    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = torch.full((3,), 50.0 / math.sqrt(3))
    clip_scale = 1.0 / 50.0  # clip_grad_norm_(max_norm=1) left the norm at 1
    param.grad.mul_(clip_scale)
    spike.apply([param], applied=clip_scale)
    assert float(param.grad.norm()) == pytest.approx(min(clip_scale, spike.scale) * 50.0)
    before = param.grad.clone()
    spike.apply([param], applied=spike.scale / 2)  # never scales up
    assert torch.equal(param.grad, before)


def test_scale_mode_keeps_training_after_a_start_of_zero_gradients():
    """A run whose first steps have no gradient (every group's rewards equal: advantages 0,
    grad norm 0) then learns: the default scale rule (ZClip) scaled every later step to 0
    (action scale, guard_scale 0, which the docs keep for skipped steps), for good."""
    guard = Guard(mode="scale")
    norms = [0.0] * 30 + [1.0, 0.8, 1.2, 0.9, 1.1] * 20
    decisions = [guard.before_step(grad_norm=n) for n in norms]
    assert all(0.0 < d.scale <= 1.0 for d in decisions if d.action != "skip")
    assert guard.counts["none"] >= len(norms) - 3


def test_the_batch_rule_skips_a_non_finite_update_of_the_own_policy():
    guard = Guard(mode="scale", policy="grpo")
    logp = torch.tensor([-1.0, -2.0, float("nan"), -1.5])
    batch = PolicyBatch(
        logp=logp,
        logp_old=torch.tensor([-1.0, -2.0, -1.0, -1.5]),
        advantages=torch.tensor([1.0, -1.0, 1.0, -1.0]),
        seq_id=torch.arange(4),
        unit="sequence",
    )
    decision = guard.before_step(grad_norm=1.0, batch=batch)
    assert decision.skip and decision.reason == "grpo: 1 non-finite coefficient"
    fine = PolicyBatch(
        logp=torch.tensor([-1.0, -2.0, -1.0, -1.5]),
        logp_old=torch.tensor([-1.0, -2.0, -1.0, -1.5]),
        advantages=torch.tensor([1.0, -1.0, 1.0, -1.0]),
        seq_id=torch.arange(4),
        unit="sequence",
    )
    assert guard.before_step(grad_norm=1.0, batch=fine).action == "none"


def test_a_batch_given_to_a_guard_without_a_policy_is_refused_not_ignored():
    """`Guard(mode="skip").before_step(grad_norm=1.0, batch=batch)` with a batch whose update
    is NaN: the batch rule needs the run's policy, so the batch was ignored in silence and the
    step went on ('none'); it is refused, as every other input the guard cannot use is, before
    its grad norm enters the rule's statistics."""
    guard, fresh = Guard(mode="skip"), Guard(mode="skip")
    batch = PolicyBatch(
        logp=torch.tensor([[float("nan"), -1.0]]),
        logp_old=torch.zeros(1, 2),
        advantages=torch.ones(1),
    )
    with pytest.raises(UsageError, match=r"batch: the batch rule needs the run's policy"):
        guard.before_step(grad_norm=1.0, batch=batch)
    assert guard.before_step(grad_norm=1.0) == fresh.before_step(grad_norm=1.0)
    assert guard.counts == fresh.counts


def test_bad_settings_are_usage_errors():
    with pytest.raises(UsageError, match="unknown guard mode"):
        Guard(mode="off")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="unknown guard"):
        Guard(rule="nope")


CONFIG = ExampleConfig(seed=2, steps=12, pretrain_steps=10)
RULE = "skip-step:sigma=2,window=6"


def _record(out, guard: Guard | None):
    torch.set_num_threads(1)
    policy = get_policy(CONFIG.policy)
    kwargs = recorder_kwargs(CONFIG, policy)
    if guard is not None:
        kwargs["meta"]["guard"] = guard.manifest_note()
    with Recorder(out, **kwargs) as recorder:
        train(CONFIG, recorder=recorder, guard=guard)
    return open_run(out)


def test_the_example_skips_a_flagged_step_and_records_it(tmp_path):
    threads = torch.get_num_threads()
    try:
        plain = _record(tmp_path / "plain", None)
        guarded = _record(tmp_path / "guarded", Guard(mode="skip", rule=RULE))
    finally:
        torch.set_num_threads(threads)
    assert guarded.manifest["meta"]["guard"] == {
        "mode": "skip",
        "rule": RULE,
        "policy": None,
        "scalars": list(SCALARS),
        "actions": {"0": "none", "1": "scale", "2": "skip"},
    }
    headers = list(guarded.step_headers())
    assert all(set(SCALARS) - {"guard_loss"} <= set(h.scalars) for h in headers)  # no loss given
    skipped = [h.step for h in headers if h.scalars["guard_action"] == ACTION_CODES["skip"]]
    assert skipped and skipped[0] < 11
    for h in headers:
        skip = h.step in skipped
        assert h.scalars["guard_scale"] == (0.0 if skip else 1.0)
        if skip:  # a spike by the rule: more than sigma standard deviations above the window
            assert h.scalars["guard_z"] > 2
    # The rule replayed over the recorded grad norms flags the same steps.
    steps, norms = guarded.scalar_series("grad_norm")
    [report] = replay_guards(steps, norms, None, [RULE])
    assert [s.step for s in report.acted if s.action == "skip"] == skipped
    # A skipped update leaves the parameters as they were: the runs are equal through the
    # first skipped step (same batch, same grad norm) and part at the next one.
    first = skipped[0]
    result = diff_runs(plain, guarded, config=ReplayConfig(device="cpu"))
    assert result.parted_at == first + 1
    assert result.first["logprobs"] is not None and result.first["logprobs"].step == first + 1
    assert not {"guard_action", "guard_scale"} & set(plain.step(0).scalars)


def test_record_guard_scale_records_each_decision(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["record", "--out", str(out), "--rl-steps", "6", "--device", "cpu", "--guard", "scale",
         "--guard-rule", "zclip:warmup=2,z_thresh=0.5"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    run = open_run(out)
    note = run.manifest["meta"]["guard"]
    assert note["mode"] == "scale" and note["rule"] == "zclip:warmup=2,z_thresh=0.5"
    assert note["policy"] is None  # the example passes no batch: the grad-norm rule alone
    actions = np.array([h.scalars["guard_action"] for h in run.step_headers()])
    scales = np.array([h.scalars["guard_scale"] for h in run.step_headers()])
    assert set(actions.tolist()) <= {0.0, 1.0} and len(actions) == 6
    assert np.all((scales < 1.0) == (actions == 1.0))
    assert f"{int((actions == 1).sum())} scaled (recorded as guard_action)" in result.stderr
    inspected = CliRunner().invoke(app, ["inspect", str(out), "--format", "json"])
    assert "guard_action" in json.loads(inspected.stdout)["scalars"]


def test_apply_returns_the_factor_it_multiplied_the_gradients_by():
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.ones(2)
    assert Decision("scale", 0.25, "").apply([param], applied=0.5) == 0.5
    assert param.grad.tolist() == [0.5, 0.5]
    assert Decision("scale", 0.25, "").apply([param], applied=0.1) == 1.0  # the clip cut more
    assert Decision("none", 1.0, "").apply([param], applied=0.5) == 1.0
    assert param.grad.tolist() == [0.5, 0.5]


SCALE_RULE = "zclip:alpha=0.1,warmup=2,z_thresh=0.5"
"""Flags 5 of the example's first 12 steps, whose ZClip thresholds lie between 0.5 and 2."""


def _record_cli(out, *options: str, steps: int = 12):
    args = ["record", "--out", str(out), "--rl-steps", str(steps), "--device", "cpu", *options]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    """`record --guard scale --guard-rule SCALE_RULE --max-grad-norm 2` of the example's 12
    steps, recorded once for the tests that read it: its result and its run."""
    out = tmp_path_factory.mktemp("scaled") / "run"
    guard = ("--guard", "scale", "--guard-rule", SCALE_RULE)
    return _record_cli(out, *guard, "--max-grad-norm", "2"), open_run(out)


def test_record_guard_scale_says_which_flagged_steps_the_clip_had_cut_further(tmp_path, scaled):
    """`record --guard scale` said '6 scaled' on a run bit for bit the unguarded one: at the
    default --max-grad-norm 1 clip_grad_norm_ had cut each flagged step's gradient further than
    the guard's factor, and apply, which never scales up, left it. It now tells them apart."""
    guarded = _record_cli(
        tmp_path / "left", "--guard", "scale", "--guard-rule", SCALE_RULE, "--max-grad-norm", "0.5"
    )
    assert (
        f"guard (scale, {SCALE_RULE}): 0 steps skipped, 5 steps flagged to scale (recorded as "
        "guard_action), 0 of them scaled: clip_grad_norm_ (--max-grad-norm 0.5) had already cut "
        "each one's gradient further"
    ) in " ".join(guarded.stderr.split())
    _record_cli(tmp_path / "plain", "--max-grad-norm", "0.5")
    result = diff_runs(
        open_run(tmp_path / "plain"), open_run(tmp_path / "left"), config=ReplayConfig()
    )
    assert result.parted_at is None  # the guard changed nothing
    assert "0 steps skipped, 5 scaled (recorded as guard_action)" in scaled[0].stderr


def test_record_says_the_guard_skipped_the_non_finite_updates_under_no_skip_nonfinite(tmp_path):
    """`record --lr 1e30 --no-skip-nonfinite --guard skip` said 'non-finite steps 3', as if
    their updates had been taken, though the guard, which skips a non-finite grad norm, had
    skipped all three; it now says '3 (updates skipped)'."""
    diverging = ("--lr", "1e30", "--no-skip-nonfinite")
    result = _record_cli(tmp_path / "run", *diverging, "--guard", "skip", steps=8)
    assert re.search(r"non-finite steps +│ 3 \(updates skipped\) +│", result.stderr)
    assert "3 steps skipped, 0 scaled" in result.stderr
    plain = _record_cli(tmp_path / "plain", *diverging, steps=8)
    assert re.search(r"non-finite steps +│ 1 +│", plain.stderr)  # its update was taken


def test_record_says_when_the_guards_rule_judged_no_step(tmp_path):
    """`record --rl-steps 6 --guard skip` said '0 steps skipped, 0 scaled', a clean bill, where
    skip-step (window 128) had judged none of the 6 steps, gathering its statistics, as
    `replay --guard skip-step` says of the same run; record now says so too."""
    result = _record_cli(tmp_path / "run", "--guard", "skip", steps=6)
    line = "0 steps skipped, 0 scaled (recorded as guard_action); its rule judged no step (its "
    line += "statistics need more than the 6 grad norms it was given)"
    assert line in " ".join(result.stderr.split())
    judging = _record_cli(tmp_path / "judged", "--guard", "skip", "--guard-rule", RULE, steps=6)
    assert "judged no step" not in judging.stderr
    guard = Guard(mode="skip", rule="skip-step:window=6")
    for norm in (1.0, 1.1, math.nan, 0.9, 1.0):
        guard.before_step(grad_norm=norm)
    assert guard.judged == 2  # from the third finite norm on (half a window); NaN is dropped


def test_a_step_the_guard_scales_records_the_norm_the_optimizer_got(scaled):
    """On a step the guard scaled below clip_grad_norm_'s cut, `grad_norm_clipped` (the norm
    after clipping, docs/run-format.md) was the clip's alone: 2.0 where the guard had brought
    the gradient to 0.543 (grad norm 2.356 x guard_scale 0.2306); it is now that norm."""
    headers = list(scaled[1].step_headers())
    scaled = [h.scalars for h in headers if h.scalars["guard_action"] == 1]
    assert len(scaled) == 5
    for s in scaled:
        assert s["grad_norm_clipped"] == pytest.approx(s["grad_norm"] * s["guard_scale"])
    for h in headers:
        if h.scalars["guard_action"] == 0:
            s = h.scalars
            assert s["grad_norm_clipped"] == pytest.approx(min(s["grad_norm"], 2.0), rel=1e-5)


def test_record_guard_rule_needs_guard(tmp_path):
    result = CliRunner().invoke(
        app, ["record", "--out", str(tmp_path / "r"), "--guard-rule", "zclip"]
    )
    assert result.exit_code == 2 and "--guard-rule needs --guard" in result.stderr


def test_what_would_poison_or_skew_the_guard_is_a_usage_error():
    """`apply(applied=nan)` made every gradient NaN (and 0 divided by zero); a negative grad
    norm entered the rule's statistics; a malformed batch raised after its norm had entered
    them. Each is now refused, and the rule's history is left as it was."""
    decision = Decision("scale", 0.5, "", None)
    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.ones(2)
    for applied in (math.nan, 0.0, -1.0, math.inf):
        with pytest.raises(UsageError, match="applied must be a finite factor > 0"):
            decision.apply([param], applied=applied)
    assert param.grad.tolist() == [1.0, 1.0]
    guard = Guard(mode="skip", policy="grpo")
    with pytest.raises(UsageError, match="grad_norm must be >= 0"):
        guard.before_step(grad_norm=-1.0)
    malformed = PolicyBatch(
        logp=torch.zeros(3),
        logp_old=torch.zeros(3),
        advantages=torch.ones(5),
        seq_id=torch.arange(3),
        unit="sequence",
    )
    with pytest.raises(InputError, match="advantages has shape"):
        guard.before_step(grad_norm=1.0, batch=malformed)
    fresh = Guard(mode="skip", policy="grpo")
    for norm in (1.0, 1.1, 0.9, 1.0, 1.05, 50.0):
        assert guard.before_step(grad_norm=norm) == fresh.before_step(grad_norm=norm)


@pytest.mark.parametrize(
    ("policy", "lacks"),
    [("ppo:beta=0.1", "logp_ref"), ("grpo:adv=zscore", "group_id, reward")],
)
def test_a_batch_without_a_field_the_policy_needs_is_refused_before_the_rule(policy, lacks):
    """A batch lacking a field the guard's policy needs was refused (UsageError) after its
    grad norm had entered the rule's statistics: a loop that caught the error and asked
    again (without the batch) counted the step twice."""
    guard = Guard(mode="skip", rule="skip-step:window=6", policy=policy)
    fresh = Guard(mode="skip", rule="skip-step:window=6", policy=policy)
    batch = PolicyBatch(
        logp=torch.zeros(2, 3), logp_old=torch.zeros(2, 3), advantages=torch.ones(2)
    )
    for norm in (1.0, 1.1, 0.9, 1.0, 1.05, 50.0, 1.0):
        with pytest.raises(UsageError, match=f"needs batch field\\(s\\) {lacks}"):
            guard.before_step(grad_norm=100.0, batch=batch)
        assert guard.before_step(grad_norm=norm) == fresh.before_step(grad_norm=norm)
    assert guard.counts == fresh.counts


GRAD_INPUTS = ["loss", "grad_norm", "batch", "applied"]

_GRAD_INPUTS_SCRIPT = """
import json, sys, warnings
import torch
from stabledrl_cli.guard import Decision, Guard
from stabledrl_cli.policies import PolicyBatch

def read(which):
    live = torch.tensor(1.0, requires_grad=True) * 2  # a loss or norm still in the graph
    if which == "loss":
        Guard().before_step(grad_norm=1.0, loss=live)
    elif which == "grad_norm":
        Guard().before_step(grad_norm=live)
    elif which == "batch":
        logp = torch.tensor([-1.0, -2.0, -1.0, -1.5], requires_grad=True) * 1
        batch = PolicyBatch(
            logp=logp, logp_old=logp.detach(), advantages=torch.tensor([1.0, -1.0, 1.0, -1.0]),
            seq_id=torch.arange(4), unit="sequence",
        )
        Guard(policy="grpo").before_step(grad_norm=1.0, batch=batch)
    else:
        param = torch.nn.Parameter(torch.ones(2))
        param.grad = torch.ones(2)
        Decision("scale", 0.5, "test").apply([param], applied=live)

outcomes, warned = {}, None
for which in sys.argv[1:]:
    if warned is not None:  # torch warns once a process: the inputs after it go unchecked
        outcomes[which] = f"not checked: {warned} warned before it"
        continue
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            read(which)
            outcomes[which] = "ok"
        except UserWarning as warning:
            outcomes[which], warned = f"warned: {warning}", which
print(json.dumps(outcomes))
"""


@pytest.fixture(scope="module")
def grad_input_outcomes() -> dict[str, str]:
    """Each of `GRAD_INPUTS` read by the guard in one process of its own, in turn: "ok", or
    why not. Torch warns once a process, so the test's process (which may have warned
    already) cannot tell, and an input after one that warned is not checked."""
    done = subprocess.run(
        [sys.executable, "-c", _GRAD_INPUTS_SCRIPT, *GRAD_INPUTS],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("which", GRAD_INPUTS)
def test_a_tensor_that_requires_grad_is_read_detached(which, grad_input_outcomes):
    """`before_step(loss=t)` with `t` in the graph emitted torch's 'Converting a tensor with
    requires_grad=True to a scalar' UserWarning (and `grad_norm`, `apply(applied=)` alike): the
    guard reads a tensor's value detached."""
    assert grad_input_outcomes[which] == "ok"


@pytest.mark.parametrize(
    ("rule", "problem"), [("skip-step:window=0", "window must be"), ("", "empty guard spec")]
)
def test_record_bad_guard_rule_names_the_option(tmp_path, rule, problem):
    """The rule's error named `rule`, which record has no option of: a user must know to fix
    --guard-rule. Refused before anything is recorded. An empty rule (a --guard-rule "$RULE"
    whose variable is unset) made the default one, where replay --guard '' is refused."""
    out = tmp_path / "r"
    result = CliRunner().invoke(
        app, ["record", "--out", str(out), "--guard", "skip", "--guard-rule", rule]
    )
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: --guard-rule {rule!r}: {problem}")
    assert not out.exists()
    with pytest.raises(UsageError, match=f"rule {rule!r}: {problem}"):
        Guard(mode="skip", rule=rule)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            torch.tensor(1.0, device="meta"),
            "grad_norm: cannot be read as a number (Tensor.item() cannot be called on meta "
            "tensors)",
        ),
        (
            torch.tensor(1 + 1j),
            "grad_norm must be a number or a one-element tensor, got a complex tensor",
        ),
        (
            torch.tensor(True),
            "grad_norm must be a number or a one-element tensor, got a bool tensor",
        ),
    ],
)
def test_a_tensor_the_guard_cannot_read_as_a_number_is_a_usage_error(value, message):
    """Before: torch's RuntimeError (meta: 'Tensor.item() cannot be called on meta tensors';
    complex: 'value cannot be converted to type double without overflow'), from before_step
    and apply alike; a bool tensor was read as 1.0, where a Python bool is refused."""
    guard = Guard(mode="scale")
    with pytest.raises(UsageError) as refused:
        guard.before_step(grad_norm=value)
    assert str(refused.value) == message
    with pytest.raises(UsageError) as refused:
        guard.before_step(grad_norm=1.0, loss=value)
    assert str(refused.value) == message.replace("grad_norm", "loss")
    with pytest.raises(UsageError) as refused:
        Decision("scale", 0.5, "").apply([], applied=value)
    assert str(refused.value) == message.replace("grad_norm", "applied")
    assert guard.counts == {"none": 0, "scale": 0, "skip": 0}


def test_a_numpy_array_of_one_number_is_the_number_it_holds():
    """grad_norm=np.array(50.0) (a norm turned into numpy with .numpy()), which the
    Recorder records, was refused by the guard ('grad_norm must be a number or a one-element
    tensor, got ndarray'); a numpy array of one number is now taken as a one-element tensor
    is, in before_step and apply, and one of several numbers is refused, named."""
    given, plain = (
        Guard(mode="scale", rule="zclip:warmup=5"),
        Guard(mode="scale", rule="zclip:warmup=5"),
    )
    for norm in NORMS:
        decision = given.before_step(grad_norm=np.array(norm), loss=np.array([[0.5]]))
        assert decision == plain.before_step(grad_norm=norm, loss=0.5)
    param = torch.nn.Parameter(torch.zeros(1))
    param.grad = torch.ones(1)
    decision.apply([param], applied=np.float32(1.0))
    Decision("scale", 0.25, "").apply([param], applied=np.array([0.5]))
    assert param.grad.tolist() == [0.5]
    with pytest.raises(UsageError) as refused:
        given.before_step(grad_norm=np.array([1.0, 2.0]))
    assert str(refused.value) == (
        "grad_norm must be a number or a one-element tensor, got an array of 2 elements"
    )


def test_a_policy_that_is_neither_a_spec_nor_a_policy_is_refused_when_the_guard_is_made():
    """Before: Guard(policy=3) was taken, and failed later with an AttributeError ('int' object
    has no attribute 'spec') from manifest_note, or 'weights' from the first before_step
    given a batch."""
    with pytest.raises(UsageError) as refused:
        Guard(policy=3)  # type: ignore[arg-type]
    assert str(refused.value) == "a policy is a spec string or a Policy, not int"
    assert Guard(policy=get_policy("grpo")).manifest_note()["policy"] == "grpo"


def test_apply_takes_one_tensor_as_clip_grad_norm_does():
    """Before: apply(param) iterated the tensor's rows, views without a gradient, and left
    param.grad unscaled, silently (torch.nn.utils.clip_grad_norm_ takes one tensor too)."""
    param = torch.nn.Parameter(torch.ones(2, 2))
    param.grad = torch.ones(2, 2)
    Decision("scale", 0.5, "").apply(param)
    assert param.grad.tolist() == [[0.5, 0.5], [0.5, 0.5]]


def test_apply_refuses_the_gradients_in_place_of_their_parameters():
    """docs/guard.md said apply takes 'the gradients' tensors': apply([p.grad for p in
    params]) scaled each gradient's own .grad, None, so it did nothing, silently, on a step
    the guard scales. Tensors none of which holds a .grad are refused, naming the argument;
    parameters of which some hold none (frozen ones) are scaled where they do."""
    model = torch.nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    grads = [p.grad for p in model.parameters()]
    with pytest.raises(UsageError) as refused:
        Decision("scale", 0.5, "").apply([g for g in grads if g is not None])
    assert str(refused.value) == (
        "parameters: none of the 2 tensors holds a .grad to scale: give the parameters, as "
        "clip_grad_norm_ takes them, not their gradients"
    )
    Decision("none", 1.0, "").apply([g for g in grads if g is not None])  # nothing to scale
    model.bias.grad = None
    Decision("scale", 0.5, "").apply(model.parameters())
    assert model.weight.grad.tolist() == [[0.5, 0.5]] and model.bias.grad is None


def test_apply_names_a_generator_clip_grad_norm_used_up():
    """`params = model.parameters()`, `clip_grad_norm_(params, ...)`, then `apply(params)`
    (the page's example with a generator): apply got no tensor and scaled nothing, silently;
    since bae64de it said 'none of the 0 tensors holds a .grad ... not their gradients', a
    wrong lead. It now names the used-up iterator."""
    model = torch.nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    params = model.parameters()
    torch.nn.utils.clip_grad_norm_(params, 100.0)
    with pytest.raises(UsageError) as refused:
        Decision("scale", 0.5, "").apply(params)
    assert str(refused.value) == (
        "parameters: no tensor to scale (an iterator already used up, as model.parameters() "
        "is by clip_grad_norm_: give a list of them to both)"
    )


@pytest.mark.parametrize(
    ("given", "got"),
    [
        (torch.nn.Linear(2, 1), ": got a Linear model, not its .parameters()"),
        (3.0, ", got float"),
        ({"w": torch.ones(1)}, ", got dict"),
        ([torch.ones(1), "w"], ", got an item of type str"),
        ((x for x in [torch.ones(1), None]), ", got an item of type NoneType"),
    ],
)
def test_apply_refuses_what_is_no_tensor_naming_the_argument(given, got):
    """Before: apply(model) raised a raw TypeError ('Linear' object is not iterable) at the
    first scaled step, apply([tensor, "w"]) an AttributeError; a model is refused at any step."""
    expected = "parameters must be a tensor or an iterable of tensors, as clip_grad_norm_ takes"
    with pytest.raises(UsageError) as refused:
        Decision("scale", 0.5, "").apply(given)
    assert str(refused.value) == expected + got
    if not isinstance(given, torch.nn.Module):
        return
    with pytest.raises(UsageError):
        Decision("none", 1.0, "").apply(given)


def test_a_reason_shows_the_z_score_past_the_limit():
    """A z just past sigma read 'skip-step: z 6' (3 digits), as if at the limit, not past it."""
    guard = Guard(mode="skip", rule="skip-step:window=6,sigma=1.5")
    for norm in (1.0, 2.0, 3.0):
        guard.before_step(grad_norm=norm)
    # z of 2 + 1.5 * std(1, 2, 3) * (1 + 1e-5) over that history: 1.500015 sigma
    decision = guard.before_step(grad_norm=2.0 + 1.5 * (1 + 1e-5))
    assert decision.skip
    assert decision.reason == "skip-step: z 1.50002"
    far = Guard(mode="skip", rule="skip-step:window=6,sigma=1.5")
    for norm in (1.0, 2.0, 3.0):
        far.before_step(grad_norm=norm)
    assert far.before_step(grad_norm=9.0).reason == "skip-step: z 7"


def test_the_module_example_applies_a_decision_as_the_guard_page_does():
    """The module docstring's example called `decision.apply(params)` after
    clip_grad_norm_(params, 1.0): in mode scale that scales the clipped gradient again (a
    norm-10 step with scale 0.3 ended at 0.03 of its pre-clip size, not 0.1); docs/guard.md
    passes the factor the clip applied, as `apply` needs."""
    import stabledrl_cli.guard as guard_module

    example = [line.strip() for line in (guard_module.__doc__ or "").splitlines()]
    applies = [line for line in example if "decision.apply(" in line]
    assert applies == ["...     decision.apply(params, applied=min(1.0, 1.0 / (norm + 1e-6)))"]
