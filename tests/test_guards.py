"""Grad-norm guards replayed over recorded norms: ZClip against the real `zclip` package, the
skip-step rule against OLMo-core's `get_step_factor`, and the replay report."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from stabledrl_cli._json import json_safe
from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import open_run
from stabledrl_cli.errors import UsageError
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.engine import replay_run
from stabledrl_cli.replay.guard_rules import GuardDecision, SkipStep, ZClip
from stabledrl_cli.replay.guards import make_guard, replay_guards


def norms_with_spikes(n: int = 200, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    values = [1.0 + 0.1 * rng.gauss(0.0, 1.0) for _ in range(n)]
    for i in (40, 41, 90, 150):
        values[i] *= 12.0
    return values


def real_zclip_thresholds(norms: list[float], **kwargs: object) -> list[float | None]:
    """What the real ZClip clips each norm to (None: not clipped), driving its `step` with a
    one-parameter model whose gradient has exactly that norm."""
    zclip = pytest.importorskip("zclip", reason="zclip is not installed (pip install -e '.[dev]')")
    guard = zclip.ZClip(max_grad_norm=None, **kwargs)
    param = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    model = torch.nn.Module()
    model.p = param
    out: list[float | None] = []
    for norm in norms:
        param.grad = torch.tensor([norm], dtype=torch.float64)
        guard.step(model)
        after = float(param.grad.abs())
        out.append(after if after < norm * (1 - 1e-12) else None)
    return out


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ({}, {}),
        (
            {"z_thresh": 2.0, "alpha": 0.9, "warmup": 10},
            {"z_thresh": 2.0, "alpha": 0.9, "warmup_steps": 10},
        ),
        ({"clip": "mean"}, {"clip_option": "mean"}),
        ({"clip_factor": 0.7}, {"clip_factor": 0.7}),
    ],
)
def test_zclip_matches_the_zclip_package(ours: dict, theirs: dict) -> None:
    norms = norms_with_spikes()
    expected = real_zclip_thresholds(norms, **theirs)
    guard = ZClip(**ours)
    got = []
    for norm in norms:
        decision = guard.update(norm)
        got.append(decision.threshold if decision.action == "clip" else None)
    assert [g is None for g in got] == [e is None for e in expected]
    assert sum(e is not None for e in expected) >= 3
    for g, e in zip(got, expected, strict=True):
        if e is not None:
            # the package scales the gradient by clip / (norm + 1e-6): relative 1e-6
            assert g == pytest.approx(e, rel=1e-5)


def test_a_zclip_warmup_of_zero_norms_leaves_no_threshold_of_zero() -> None:
    """Norms of 0 through the warmup (a sparse-reward start: every group's rewards equal, its
    advantages and gradient 0) left ZClip's averages at 0, its threshold at 0. The package
    clips the first real norm to 0 and, its averages taking that 0, every later one: a
    `Guard(mode="scale")` froze training for good. Norms of 0 stay out of the averages."""
    norms = [0.0] * 25 + [1.0, 0.9, 1.1] * 20 + [12.0]
    theirs = real_zclip_thresholds(norms)
    assert theirs[25:] == [0.0] * 61  # the source's behaviour: clipped to 0, for good
    guard = ZClip()
    decisions = [guard.update(norm) for norm in norms]
    assert [d.action for d in decisions] == ["none"] * 85 + ["clip"]
    assert guard.mean == pytest.approx(1.0, rel=0.2)  # the averages are the real norms'


def test_zclip_keeps_zero_norms_out_of_its_averages() -> None:
    """A phase of steps without gradient mid-run (every group's rewards equal) decayed ZClip's
    averages towards 0: after 300 such steps every later step was clipped, to as little as
    5e-4 of its norm, for the rest of the run (the averages take the clipped norms). A norm
    of 0 has nothing to clip and now leaves the averages as they are."""
    rng = random.Random(0)
    steady = [1.0 + 0.1 * rng.gauss(0.0, 1.0) for _ in range(600)]
    norms = [*steady[:100], *[0.0] * 300, *steady[100:]]
    guard, plain = ZClip(), ZClip()
    with_zeros = [guard.update(n) for n in norms]
    without = [plain.update(n) for n in steady]
    assert [d for d in with_zeros if d.action != "none" or d.z is not None] == [
        d for d in without if d.action != "none" or d.z is not None
    ]
    assert all(d == GuardDecision("none", 1.0, None, None) for d in with_zeros[100:400])


def olmo_skips(losses: list[float], norms: list[float], window: int, sigma: float) -> list[bool]:
    """OLMo-core 3.0's SkipStepOptimizer.get_step_factor, step by step, in torch as it is
    written there (the package itself cannot be installed beside this project: its
    cached-path dependency pins rich < 14)."""
    skipped = []
    hist_l: list[torch.Tensor] = []
    hist_g: list[torch.Tensor] = []
    for loss, norm in zip(losses, norms, strict=True):
        hist_l.append(torch.tensor(loss))
        hist_g.append(torch.tensor(norm))
        hist_l, hist_g = hist_l[-(window + 1) :], hist_g[-(window + 1) :]
        if len(hist_l) < max(2, window // 2):
            skipped.append(False)
            continue
        l_std, l_mean = torch.std_mean(torch.stack(hist_l[:-1]))
        g_std, g_mean = torch.std_mean(torch.stack(hist_g[:-1]))
        ok = bool(
            torch.logical_and(
                (hist_l[-1] - l_mean) <= sigma * l_std, (hist_g[-1] - g_mean) <= sigma * g_std
            )
        )
        skipped.append(not ok)
    return skipped


@pytest.mark.parametrize(("window", "sigma"), [(128, 6.0), (32, 3.0), (6, 2.0)])
def test_skip_step_matches_olmo_core(window: int, sigma: float) -> None:
    norms = norms_with_spikes(300, seed=window)
    rng = random.Random(1)
    losses = [2.0 - 0.002 * i + 0.05 * rng.gauss(0.0, 1.0) for i in range(300)]
    losses[200] += 3.0  # a loss spike with an ordinary grad norm
    expected = olmo_skips(losses, norms, window, sigma)
    guard = SkipStep(window=window, sigma=sigma)
    got = [guard.update(n, loss).action == "skip" for n, loss in zip(norms, losses, strict=True)]
    assert got == expected
    assert any(expected)


@pytest.mark.parametrize("spec", ["zclip:warmup=5", "zclip", "skip-step:window=6", "skip-step"])
def test_norms_past_the_range_of_their_squares_decide_as_scaled_down_ones(spec: str) -> None:
    """Finite norms and losses near float64's largest raised OverflowError (`fsum`, `x ** 2`):
    exit 70 from `replay --guard`, an exception in the training loop from a `Guard`. Both
    rules are scale-free: the same series times 2**1000 gets the same decisions."""
    rng = random.Random(0)
    norms = [1.0 + rng.random() for _ in range(300)]
    norms[150] = norms[200] = 40.0
    small, big = make_guard(spec), make_guard(spec)
    acted = set()
    for norm in norms:
        a = small.update(norm, norm)
        b = big.update(norm * 2.0**1000, norm * 2.0**1000)
        assert (a.action, a.z is None) == (b.action, b.z is None)
        assert (b.z or 0.0, b.scale) == pytest.approx((a.z or 0.0, a.scale), rel=1e-5)
        acted.add(a.action)
    assert acted == {"none", "skip" if spec.startswith("skip") else "clip"}


def test_nonfinite_norms_are_reported_and_kept_out_of_the_statistics() -> None:
    norms = norms_with_spikes()
    with_nan = [*norms[:60], math.nan, math.inf, *norms[60:]]
    clean = [r.to_dict() for r in replay_guards(range(len(norms)), norms, None)]
    dirty = replay_guards(range(len(with_nan)), with_nan, None)
    assert [d.count("nonfinite") for d in dirty] == [2, 2]
    for report, base in zip(dirty, clean, strict=True):
        kept = [a for a in report.to_dict()["acted"] if a["action"] != "nonfinite"]
        assert [a["scale"] for a in kept] == [a["scale"] for a in base["acted"]]


@pytest.mark.parametrize("spec", ["zclip", "zclip:warmup=3", "skip-step:window=6"])
def test_a_nonfinite_loss_is_nonfinite_for_every_guard(spec: str) -> None:
    norms = norms_with_spikes()
    losses = {i: (math.inf if i == 70 else math.nan if i == 71 else 0.5) for i in range(200)}
    clean = replay_guards(range(200), norms, None, [spec])[0].to_dict()["acted"]
    (report,) = replay_guards(range(200), norms, losses, [spec])
    nonfinite = [a["step"] for a in report.to_dict()["acted"] if a["action"] == "nonfinite"]
    assert nonfinite == [70, 71]
    without = [norm for i, norm in enumerate(norms) if i not in (70, 71)]
    base = replay_guards(range(198), without, None, [spec])[0].to_dict()["acted"]
    kept = [a for a in report.to_dict()["acted"] if a["action"] != "nonfinite"]
    assert [a["scale"] for a in kept] == [a["scale"] for a in base]
    assert len(clean) == len(base)


def test_replay_report_counts_and_removed_norm() -> None:
    norms = norms_with_spikes()
    losses = {i: 1.0 for i in range(len(norms))}
    zclip, skip = replay_guards(range(len(norms)), norms, losses)
    assert zclip.spec == "zclip" and skip.spec == "skip-step"
    assert {s.step for s in zclip.acted} >= {40, 90, 150}
    assert zclip.removed_norm == pytest.approx(
        sum(s.grad_norm * (1 - s.scale) for s in zclip.acted)
    )
    # 40 and 41 fall before window // 2 steps; at 150 the three spikes in its window have
    # widened the window's std enough to let the fourth through.
    assert {s.step for s in skip.acted} == {90}
    assert all(s.scale == 0.0 for s in skip.acted)
    data = skip.to_dict()
    assert data["skipped"] == 1 and data["steps"] == len(norms)


def test_removed_norm_is_a_float_when_no_guard_acts() -> None:
    """docs/replay-json.md types `removed_norm` as a float: a guard that acted on no step wrote
    the integer 0 (Python's sum of nothing), so a typed reader met 0 beside 1.49."""
    reports = replay_guards(range(10), [1.0] * 10, None)
    assert all(not r.acted for r in reports)
    for report in reports:
        assert '"removed_norm": 0.0' in json.dumps(report.to_dict())


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("zclap", "unknown guard 'zclap'"),
        ("zclip:alpha=1.5", "alpha must be in (0, 1)"),
        # a nonzero value a float cannot hold: refused as itself, not checked as 0.0
        ("zclip:alpha=1e-400", "zclip:alpha=1e-400': alpha: '1e-400' is too small for a float"),
        ("skip-step:sigma=1e-999", "sigma: '1e-999' is too small for a float: it reads as 0"),
        # not finite (docs/policies.md: refused in --guard specs as in policy specs)
        ("zclip:max_norm=inf", "guard 'zclip:max_norm=inf': max_norm expects a finite number"),
        ("zclip:clip_factor=1e400", "clip_factor expects a finite number, got '1e400'"),
        ("zclip:warmup=two", "warmup must be int"),
        ("skip-step:window=3", "window must be an integer in [6, 1e+09]"),
        (f"skip-step:window={10**23}", "window must be an integer in [6, 1e+09]"),
        (f"zclip:warmup={10**23}", "warmup must be an integer in [1, 1e+09]"),
        ("skip-step:z=3", "unknown key 'z'"),
        ("zclip:clip=max", "clip must be one of adaptive, mean"),
        # the spec's syntax: a guard spec, not a "policy spec" as these lines said
        (":", "guard ':': '' is not a name"),
        ("skip-step:", "guard 'skip-step:': nothing after ':'"),
        ("skip-step,zclip", "guard 'skip-step,zclip'"),
        ("zclip:alpha", "guard 'zclip:alpha': 'alpha' is not key=value"),
    ],
)
def test_bad_guard_specs(spec: str, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        make_guard(spec)


def test_canonical_guard_spec() -> None:
    (report,) = replay_guards([0], [1.0], None, ["zclip:z_thresh=3,alpha=0.97"])
    assert report.spec == "zclip:z_thresh=3"


FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def test_replay_reports_the_guards_on_the_recorded_norms():
    run = open_run(FIXTURES / "grpo")
    result = replay_run(run, ["grpo"], config=ReplayConfig(device="cpu"))
    steps, norms = run.scalar_series("grad_norm")
    loss_steps, losses = run.scalar_series("loss")
    expected = replay_guards(
        steps, norms, dict(zip(loss_steps.tolist(), losses.tolist(), strict=True))
    )
    data = result.to_dict()
    assert data["guards"] == json_safe([r.to_dict() for r in expected])
    zclip, skip = data["guards"]
    # the fixture's collapse: its 10^6 grad-norm spikes are clipped by ZClip, skipped by OLMo
    assert 80 in [a["step"] for a in zclip["acted"] if a["action"] == "clip"]
    assert 80 in [a["step"] for a in skip["acted"] if a["action"] == "skip"]
    assert zclip["nonfinite"] == 4


def test_replay_cli_guard_option():
    runner = CliRunner()
    base = ["replay", str(FIXTURES / "stabledrl"), "-p", "stabledrl", "--device", "cpu"]
    custom = runner.invoke(app, [*base, "--guard", "zclip:z_thresh=4", "--format", "json"])
    assert custom.exit_code == 0, custom.output
    assert [g["guard"] for g in json.loads(custom.stdout)["guards"]] == ["zclip:z_thresh=4"]
    none = runner.invoke(app, [*base, "--guard", "none", "--format", "json"])
    assert json.loads(none.stdout)["guards"] == []
    table = runner.invoke(app, base)
    assert "guards on the recorded grad norms: zclip would" in table.stdout
    bad = runner.invoke(app, [*base, "--guard", "zclap"])
    assert bad.exit_code == 2
    assert bad.stderr.strip().splitlines() == [
        "error: --guard 'zclap': unknown guard 'zclap'; valid: zclip, skip-step"
    ]


def test_a_guard_given_twice_is_replayed_once():
    """`--guard zclip --guard zclip:z_thresh=2.5` (two spellings of one guard) replayed it
    twice: two identical `guards` entries in the JSON and the table's line, so equivalent
    invocations gave different JSON. A guard is now replayed once, as a policy given twice is
    (docs/replay-json.md), in the order first given."""
    runner = CliRunner()
    base = ["replay", str(FIXTURES / "stabledrl"), "-p", "stabledrl", "--device", "cpu"]
    once = runner.invoke(app, [*base, "--guard", "zclip", "--format", "json"])
    twice = runner.invoke(
        app,
        [*base, "--guard", "zclip", "--guard", "skip-step", "--guard", "zclip:z_thresh=2.5",
         "--format", "json"],
    )  # fmt: skip
    assert once.exit_code == twice.exit_code == 0, twice.output
    assert [g["guard"] for g in json.loads(twice.stdout)["guards"]] == ["zclip", "skip-step"]
    assert json.loads(twice.stdout)["guards"][0] == json.loads(once.stdout)["guards"][0]
    (report,) = replay_guards([0, 1], [1.0, 2.0], None, ["skip-step", "skip-step:window=128"])
    assert report.spec == "skip-step"


def test_guard_none_beside_a_guard_is_refused():
    """`--guard none --guard zclip` replayed zclip: `none` (no guard) was silently overruled.
    The two contradict each other, and the command says so (exit 2); `none` alone or given
    twice still means no guard."""
    runner = CliRunner()
    base = ["replay", str(FIXTURES / "stabledrl"), "-p", "stabledrl", "--device", "cpu"]
    mixed = runner.invoke(app, [*base, "--guard", "none", "--guard", "zclip"])
    assert mixed.exit_code == 2
    assert mixed.stderr.strip().splitlines() == [
        "error: --guard none (no guard) contradicts 'zclip': give one or the other"
    ]
    twice = runner.invoke(app, [*base, "--guard", "none", "--guard", "none", "--format", "json"])
    assert twice.exit_code == 0 and json.loads(twice.stdout)["guards"] == []
