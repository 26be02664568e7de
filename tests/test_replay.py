"""`stabledrl replay`: the engine, its indicators and detectors, the CLI and its exit codes.

Runs are small and synthetic, recorded with the real Recorder in a tmp dir; the fixture facts
(a degrading grpo run vs stabledrl) are tests/test_replay_fixtures.py.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import cli_command, cli_environment, full_disk, full_disk_error, run_cli_together
from rich.console import Console
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli._json import json_safe
from stabledrl_cli.cli.app import app
from stabledrl_cli.errors import InputError, UsageError
from stabledrl_cli.policies import STANDARD_CATALOGUE, PolicyBatch, get_policy
from stabledrl_cli.replay import columns, engine, stream
from stabledrl_cli.replay.baseline import check_settings
from stabledrl_cli.replay.baseline_read import load_baseline
from stabledrl_cli.replay.baseline_write import baseline_dict, write_baseline
from stabledrl_cli.replay.config import ReplayConfig, parse_size, parse_step_range
from stabledrl_cli.replay.detectors import drift_flags, rolling_mean
from stabledrl_cli.replay.engine import replay_run
from stabledrl_cli.replay.evaluation import evaluate
from stabledrl_cli.replay.gate import Gates
from stabledrl_cli.replay.hdf5 import REPORT_KIND, read_hdf5, write_hdf5
from stabledrl_cli.replay.measurements import NoiseFloor, OwnLikelihood
from stabledrl_cli.replay.observed import observe
from stabledrl_cli.replay.report import print_detail
from stabledrl_cli.replay.step_data import array_bytes, read_arrays
from stabledrl_cli.replay.stream import step_row_bytes
from stabledrl_cli.vocab import METRIC_GROUPS

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]

SUMMARY_KEYS = {
    "tokens", "discarded", "discard_frac", "discarded_pos", "discarded_neg",
    "discarded_mass_frac", "clipped", "update_norm_median", "update_norm_max",
    "cosine_to_own_median", "spike_steps", "drift_steps", "collapsed_steps", "first_collapse",
    "lead_steps", "fidelity", "loss_parity",
}  # fmt: skip
CONTRACT_STEP_KEYS = [
    "step", "tokens", "discarded", "discard_frac", "clipped", "geometry", "update_norm",
    "clip_scale", "cosine_to_own", "weight_max", "ess_frac", "net_push", "spike", "nonfinite",
    "drift", "collapsed",
]  # fmt: skip
STEP_KEYS = set(CONTRACT_STEP_KEYS)

N_SEQ, GROUP, DIM = 16, 8, 6


def _step_arrays(rng: np.random.Generator, step: int, *, spike_at: int | None, noise: float):
    """One sequence-unit step: N sequences in groups of GROUP, features x_u for geometry."""
    reward = rng.random(N_SEQ).astype(np.float32)
    group = np.arange(N_SEQ) // GROUP
    adv = reward - np.array([reward[group == g].mean() for g in group], dtype=np.float32)
    logp_old = (-5.0 + rng.normal(size=N_SEQ)).astype(np.float32)
    logp = (logp_old + noise * rng.normal(size=N_SEQ)).astype(np.float32)
    if spike_at is not None and step == spike_at:
        worst = int(np.argmin(adv))  # a negative-advantage sequence whose ratio explodes
        logp[worst] = logp_old[worst] + 6.0
    features = rng.normal(size=(N_SEQ, DIM)).astype(np.float32)
    return {
        "logp": logp,
        "logp_old": logp_old,
        "advantages": adv.astype(np.float32),
        "mask": np.ones(N_SEQ, np.uint8),
        "seq_id": np.arange(N_SEQ, dtype=np.int32),
        "group_id": group.astype(np.int32),
        "reward": reward,
    }, features


def record_run(
    path: Path,
    *,
    steps: int = 12,
    policy: str = "grpo",
    seed: int = 0,
    spike_at: int | None = None,
    nan_at: int | None = None,
    geometry: str | None = None,
    geometry_every: int = 1,
    sketch_k: int = 4096,
    drop: tuple[str, ...] = (),
    noise: float = 0.1,
    feature_scale: float = 1.0,
) -> Path:
    """A synthetic sequence-unit run. The unit log-likelihood is linear in the parameters,
    logp_u = x_u . theta, so grad_u = x_u exactly: the gram is X X^T, and the recorded
    grad_norm_covered is the real norm of the own policy's update (autograd)."""
    rng = np.random.default_rng(seed)
    own = get_policy(policy)
    with sd.Recorder(path, policy=own.name, policy_params={}, unit="sequence",
                     reward_range=(0.0, 1.0)) as rec:  # fmt: skip
        for step in range(steps):
            arrays, features = _step_arrays(rng, step, spike_at=spike_at, noise=noise)
            features = features * np.float32(feature_scale)  # gradient norms, x feature_scale
            if nan_at is not None and step == nan_at:
                arrays["logp"][3] = np.nan
            weights = own.weights(PolicyBatch(**arrays, unit="sequence"))
            theta = torch.zeros(DIM, dtype=torch.float64, requires_grad=True)
            unit_logp = torch.from_numpy(features).double() @ theta
            surrogate = -(weights.coef.detach().double() * unit_logp).sum()
            (grad,) = torch.autograd.grad(surrogate, theta)
            extra = {}
            # geometry_every > 1: the steps in between have none (a "mixed" run)
            step_geometry = geometry if step % geometry_every == 0 else None
            if step_geometry == "gram":
                extra["unit_grad_gram"] = features @ features.T
            elif step_geometry == "sketch":
                omega = np.random.default_rng(1234 + step).normal(size=(DIM, sketch_k))
                extra["unit_grad_sketch"] = (features @ omega / math.sqrt(sketch_k)).astype(
                    np.float32
                )
            if step_geometry is not None:
                extra["grad_norm_covered"] = float(grad.norm())
            for name in drop:
                arrays.pop(name)
            rec.log_step(
                step,
                **arrays,
                **extra,
                grad_norm=float(grad.norm()),
                loss=-float(weights.objective),
                reward_mean=float(arrays.get("reward", np.zeros(1)).mean()),
                inner_step=step % 2,
            )
    return path


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> Path:
    return record_run(tmp_path_factory.mktemp("replay") / "run", steps=30, spike_at=22)


def _json(args: list[str]) -> dict:
    result = runner.invoke(app, ["replay", *args, "--format", "json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --- the JSON contract ---------------------------------------------------------------------------
def test_default_replays_own_policy_plus_catalogue_in_contract_shape(plain_run):
    data = _json([str(plain_run)])
    # The contract's keys in their order, then the extensions `collapse_warning`, `guards`,
    # `threads`, `scalar_steps`, `skipped_steps`, `missing_steps`, `live`,
    # `unjoined_geometry` and `unscored_streak`.
    assert list(data) == [
        "run", "steps", "geometry", "geometry_coverage", "policies", "observed",
        "collapse_warning", "guards", "threads", "scalar_steps", "skipped_steps",
        "missing_steps", "live", "unjoined_geometry", "unscored_streak",
    ]  # fmt: skip
    assert data["threads"] == 1
    warning = data["collapse_warning"]
    assert list(warning) == [
        "detector", "settings", "steps", "first_step", "lead_steps", "measure",
    ]  # fmt: skip
    assert warning["detector"] == "own_likelihood_drop" and warning["measure"] == "unit"
    assert warning["settings"] == {"window": 3, "drop": 0.5}
    assert data["steps"] == 30 and data["geometry"] == "coef" and data["geometry_coverage"] == 0
    specs = [p["spec"] for p in data["policies"]]
    catalogue = [get_policy(s).spec for s in STANDARD_CATALOGUE]
    assert specs == catalogue  # own (grpo) first, and deduplicated against the catalogue
    assert [p["own"] for p in data["policies"]].count(True) == 1 and data["policies"][0]["own"]
    assert [p["best"] for p in data["policies"]].count(True) == 1
    for p in data["policies"]:
        assert set(p) == {"name", "spec", "params", "own", "best", "summary", "steps"}
        assert set(p["summary"]) >= SUMMARY_KEYS
        assert len(p["steps"]) == 30
        for row in p["steps"]:
            assert set(row) >= STEP_KEYS
            assert row["cosine_to_own"] is None  # no geometry
        assert p["summary"]["fidelity"] is None
        assert p["summary"]["lead_steps"] is None  # a replay claims no lead time
    assert set(data["observed"]) == {
        "first_reward_collapse", "recorded_spike_steps", "noise_floor_logratio_std",
    }  # fmt: skip
    own = data["policies"][0]["summary"]
    assert own["loss_parity"] is not None and own["loss_parity"] < 1e-5
    assert all(p["summary"]["loss_parity"] is None for p in data["policies"][1:])


def test_loss_parity_flags_a_zero_loss_beside_an_objective_that_is_not(tmp_path):
    """A recorded loss of exactly 0 where the own policy's objective is far from zero is a
    mismatch (the loss of another computation), not a step without a loss to compare."""
    rng = np.random.default_rng(0)
    with sd.Recorder(tmp_path / "run", policy="grpo", policy_params={}, unit="sequence") as rec:
        for step in range(3):
            arrays, _ = _step_arrays(rng, step, spike_at=None, noise=0.5)
            objective = float(get_policy("grpo").weights(
                PolicyBatch(**arrays, unit="sequence")).objective)  # fmt: skip
            assert abs(objective) > 1e-3
            rec.log_step(step, **arrays, grad_norm=1.0, loss=0.0)
    own = sd.replay(tmp_path / "run", ["grpo"], device="cpu").own
    assert own is not None
    assert own.summary.loss_parity is not None and own.summary.loss_parity > 1.0


@pytest.mark.parametrize(
    ("loss", "advantages", "gap"),
    [
        (0.0, 0.0, "each step with a finite loss and -J has both 0 to float32 rounding"),
        (None, 1.0, "the run recorded no finite loss"),
    ],
)
def test_a_loss_parity_without_a_step_to_compare_says_why(tmp_path, loss, advantages, gap):
    """On-policy GRPO over whole groups (TRL's default num_iterations=1), or all-equal rewards
    in every group: each step's loss and -J are 0 to rounding, and the table said 'loss parity
    n/a (median relative error of -J vs the recorded loss)', as for a comparison that failed.
    It now says why there is none, as fidelity's does."""
    with sd.Recorder(tmp_path / "run", policy="grpo", unit="sequence") as rec:
        for step in range(2):
            logp = np.full(4, -1.0, dtype=np.float32)
            scalars = {} if loss is None else {"loss": loss}
            rec.log_step(step, logp=logp, logp_old=logp, advantages=np.full(4, advantages),
                         **scalars)  # fmt: skip
    result = sd.replay(tmp_path / "run", ["grpo"], device="cpu")
    assert result.own is not None and result.own.summary.loss_parity is None
    assert result.loss_parity_gap.startswith(gap)
    shown = runner.invoke(app, ["replay", str(tmp_path / "run")], terminal_width=400)
    assert shown.exit_code == 0, shown.output
    assert f"own policy grpo: loss parity n/a ({gap}" in shown.output


def test_with_policies_replays_exactly_those_and_marks_own(plain_run):
    data = _json([str(plain_run), "-p", "stabledrl", "-p", "ppo:agg=seq-mean-token-mean",
                  "-p", "stabledrl"])  # fmt: skip
    assert [p["spec"] for p in data["policies"]] == ["stabledrl", "ppo:agg=seq-mean-token-mean"]
    assert [p["own"] for p in data["policies"]] == [False, False]  # ppo:... is not named grpo
    data = _json([str(plain_run), "-p", "dapo", "-p", "grpo:eps_low=0.2"])
    assert [p["own"] for p in data["policies"]] == [False, True]


def test_api_returns_the_cli_results(plain_run):
    cli = _json([str(plain_run), "-p", "grpo", "-p", "cispo"])
    result = sd.replay(plain_run, ["grpo", "cispo"], device="cpu")
    assert json.loads(result.to_json()) == cli
    # The JSON is printed row by row; it is exactly json.dumps of the whole contract dict.
    for indent in (2, None):
        assert result.to_json(indent) == json.dumps(result.to_dict(), indent=indent)
    assert (
        result.own.spec == "grpo"
        and json_safe(result.policy("cispo").summary.to_dict()) == cli["policies"][1]["summary"]
    )


# --- indicators --------------------------------------------------------------------------------
def test_indicators_by_hand(tmp_path):
    path = record_run(tmp_path / "run", steps=3, noise=0.5, seed=3)
    result = sd.replay(path, ["reinforce", "is", "grpo"], device="cpu")
    step = sd.open_run(path).step(1)
    logr = (step["logp"] - step["logp_old"]).double().numpy()
    adv = step["advantages"].double().numpy()
    ratio, eligible = np.exp(logr), adv != 0
    rows = {p.spec: p.steps[1] for p in result.policies}
    assert rows["reinforce"]["net_push"] == pytest.approx(0.0, abs=1e-6)
    assert rows["reinforce"]["weight_max"] == pytest.approx(1.0)
    assert rows["reinforce"]["ess_frac"] == pytest.approx(1.0)
    assert rows["is"]["weight_max"] == pytest.approx(ratio[eligible].max(), rel=1e-5)
    w = ratio[eligible]
    assert rows["is"]["ess_frac"] == pytest.approx(w.sum() ** 2 / (w.size * (w * w).sum()), 1e-5)
    # grpo: w = r unless its conditional clip discards the token (then 0).
    discarded = eligible & (((adv > 0) & (ratio > 1.2)) | ((adv < 0) & (ratio < 0.8)))
    w = np.where(discarded, 0.0, ratio)[eligible]
    assert rows["grpo"]["discarded"] == int(discarded.sum())
    assert rows["grpo"]["ess_frac"] == pytest.approx(w.sum() ** 2 / (w.size * (w * w).sum()), 1e-5)
    ref = adv[eligible]  # grpo's norm is N * 1 for every sequence: it cancels in net_push
    push = ((w * ref).sum() - ref.sum()) / np.abs(ref).sum()
    assert rows["grpo"]["net_push"] == pytest.approx(push, rel=1e-4, abs=1e-6)
    # coef proxy: update_norm = ||coef||
    coef = get_policy("grpo").weights(PolicyBatch(
        logp=step["logp"], logp_old=step["logp_old"], advantages=step["advantages"],
        mask=step["mask"], seq_id=step["seq_id"], group_id=step["group_id"],
        reward=step["reward"], unit="sequence",
    )).coef  # fmt: skip
    assert rows["grpo"]["update_norm"] == pytest.approx(float(coef.norm()), rel=1e-5)


def test_drift_flags_needs_a_full_window_below_threshold():
    net = np.array([0.0, -0.5, -0.5, -0.5, np.nan, -0.5, -0.5, -0.5])
    flags = drift_flags(net, window=3, threshold=-0.2)
    # window [0, -.5, -.5] = -0.33 < -0.2 at index 2; NaN windows are not flagged.
    assert flags.tolist() == [False, False, True, True, False, False, False, True]


def test_a_huge_net_push_leaves_no_trace_once_out_of_the_window(grpo_fixture):
    """The trailing mean was a difference of running sums: once a step's net_push of -1e35
    (an overflowed ratio on an A < 0 token, as llada grpo runs record) was in the sum, every
    later window's mean came out 0 (or some 1e17), so the 11 windows of -0.2 after it were not
    flagged, and on fixtures/grpo `-p is --window 1` missed steps 133 and 134 (net_push
    -1.62 and -0.40, after steps of -6.8e13)."""
    net = np.array([-1e35] + [-0.2] * 60)
    flags = drift_flags(net, window=50, threshold=-0.15)
    assert flags.tolist() == [False] * 49 + [True] * 12
    assert rolling_mean(np.array([1e20, 1.0, 3.0]), 2).tolist()[1:] == [5e19, 2.0]
    result = sd.replay(grpo_fixture, ["is"], device="cpu", window=1)
    push = np.asarray(result.policies[0].series["net_push"], dtype=np.float64)
    below = np.asarray(result.policies[0].series["step"])[np.isfinite(push) & (push < -0.15)]
    assert result.policies[0].summary.drift_steps == below.tolist()


def test_spike_flagged_for_grpo_not_for_stabledrl(plain_run):
    result = sd.replay(plain_run, ["grpo", "stabledrl", "reinforce"], device="cpu")
    spikes = {p.spec: p.summary.spike_steps for p in result.policies}
    assert spikes["grpo"] == [22]
    assert spikes["stabledrl"] == [] and spikes["reinforce"] == []
    grpo = result.policy("grpo")
    assert grpo.summary.collapsed_steps == [22] and grpo.summary.first_collapse == 22
    assert grpo.steps[22]["weight_max"] > 100  # exp(6): the unbounded A < 0 ratio
    assert result.best is not None and result.best.spec != "grpo"


def test_a_sparse_reward_run_has_no_risk_steps(tmp_path):
    """A hard task: most batches get no reward at all (every advantage 0, a zero update and a
    zero recorded grad norm). Every step where some sample succeeded was a risk step of every
    policy, and a recorded spike, against a median of zeros (a healthy 120-step run with 2%
    success: 19 risk steps for each of the 10 policies, best none)."""
    gen = np.random.default_rng(0)
    group = np.arange(N_SEQ) // GROUP
    with sd.Recorder(tmp_path / "run", policy="grpo", reward_range=(0.0, 1.0)) as rec:
        for step in range(40):
            reward = np.zeros(N_SEQ, dtype=np.float32)
            if step % 4 == 3:  # one success in a group of 8, every fourth step
                reward[gen.integers(N_SEQ)] = 1.0
            means = np.bincount(group, weights=reward) / np.bincount(group)
            advantages = (reward - means[group]).astype(np.float32)
            logp_old = -gen.gamma(0.6, 1.5, size=(N_SEQ, 12)).astype(np.float32)
            rec.log_step(
                step,
                logp=logp_old + 0.05 * gen.standard_normal(logp_old.shape).astype(np.float32),
                logp_old=logp_old,
                advantages=advantages,
                group_id=group,
                reward=reward,
                grad_norm=float(np.abs(advantages).sum() * gen.uniform(0.8, 1.2)),
            )
    result = sd.replay(tmp_path / "run", ["grpo", "reinforce"], device="cpu")
    assert [p.summary.collapsed_steps for p in result.policies] == [[], []]
    assert result.observed.recorded_spike_steps == [] and result.best is not None


def test_best_is_never_a_policy_with_risk_steps_nor_a_lone_policy(plain_run):
    alone = sd.replay(plain_run, ["stabledrl"], device="cpu")
    assert alone.best is None and not alone.policies[0].best  # nothing to compare with
    risky = sd.replay(plain_run, ["grpo", "is"], device="cpu")  # both spike at step 22
    assert all(p.summary.collapsed_steps for p in risky.policies) and risky.best is None
    table = runner.invoke(app, ["replay", str(plain_run), "-p", "grpo", "--device", "cpu"])
    assert "(best)" not in table.stdout and "best: fewest bias steps" in table.stdout
    assert "risk" in table.stdout and "bias" in table.stdout


def test_max_grad_norm_sets_clip_scale_but_spikes_use_the_preclip_norm(plain_run):
    base = sd.replay(plain_run, ["grpo"], device="cpu").policy("grpo")
    clipped = sd.replay(plain_run, ["grpo"], device="cpu", max_grad_norm=0.01).policy("grpo")
    assert clipped.summary.spike_steps == base.summary.spike_steps == [22]
    for row in clipped.steps:
        expected = min(1.0, 0.01 / (row["update_norm"] + 1e-6))
        assert row["clip_scale"] == pytest.approx(expected)
    assert all(row["clip_scale"] == 1.0 for row in base.steps)


def test_nonfinite_step_is_replayed_and_flagged(tmp_path):
    path = record_run(tmp_path / "run", steps=8, nan_at=5)
    data = _json([str(path)])
    for p in data["policies"]:
        row = p["steps"][5]
        assert row["nonfinite"] and row["collapsed"] and row["update_norm"] is None
        assert 5 in p["summary"]["collapsed_steps"]
        assert not any(r["nonfinite"] for i, r in enumerate(p["steps"]) if i != 5)
    # The NaN step's top sequences carry NaN figures: null in the JSON and the HDF5 report.
    out = tmp_path / "report.h5"
    args = [str(path), "-p", "grpo", "--steps", "4:7", "--detail", "--out", str(out)]
    detail = _json(args)["policies"][0]["summary"]["detail"]["5"]
    assert detail[0]["seq_id"] == 3 and detail[0]["log_ratio"] is None
    summary = json.loads(read_hdf5(out)["policies"][0]["attrs"]["summary"])
    assert summary["detail"]["5"] == detail


def test_detail_is_in_the_summary_whenever_it_is_asked_for(plain_run, tmp_path):
    """`summary.detail` is there "only with --detail" (docs/replay-json.md): with --detail
    and no flagged step in the range it was left out, so `summary["detail"]` raised KeyError
    for a consumer that asked for it. It is `{}` then, in the JSON and the HDF5 report alike;
    without --detail it is still left out."""
    out = tmp_path / "report.h5"
    args = [str(plain_run), "-p", "grpo", "--steps", "0:3", "--detail", "--out", str(out)]
    summary = _json(args)["policies"][0]["summary"]
    assert summary["detail"] == {}
    assert json.loads(read_hdf5(out)["policies"][0]["attrs"]["summary"])["detail"] == {}
    flagged = _json([str(plain_run), "-p", "grpo", "--steps", "20:25", "--detail"])
    assert list(flagged["policies"][0]["summary"]["detail"]) == ["22"]
    plain = _json([str(plain_run), "-p", "grpo", "--steps", "20:25"])
    assert "detail" not in plain["policies"][0]["summary"]


# --- chunks and devices ------------------------------------------------------------------------
def test_chunk_size_does_not_change_results(plain_run):
    results = [
        sd.replay(plain_run, ["grpo", "stabledrl", "gspo"], device="cpu", chunk_size=size)
        for size in (1, 7, 64)
    ]
    first = results[0].to_dict()
    for other in results[1:]:
        assert other.to_dict() == first


def test_memory_budget_bounds_each_chunk_and_does_not_change_results(plain_run, monkeypatch):
    arrays = read_arrays(next(iter(sd.open_run(plain_run).steps())), "run")
    step_bytes = array_bytes(arrays) + step_row_bytes(2)  # its arrays and its rows' metrics
    chunks: list[int] = []
    moved = stream.to_device

    def counting(chunk, device):
        chunks.append(len(chunk))
        moved(chunk, device)

    monkeypatch.setattr(stream, "to_device", counting)
    # Half the budget a chunk: the chunk computed and the one read ahead share it.
    budgeted = sd.replay(plain_run, ["grpo", "gspo"], device="cpu", memory_budget=6 * step_bytes)
    assert chunks and max(chunks) == 3 and sum(chunks) == 30
    chunks.clear()
    capped = sd.replay(
        plain_run, ["grpo", "gspo"], device="cpu", memory_budget=6 * step_bytes, chunk_size=2
    )
    assert max(chunks) == 2
    chunks.clear()
    whole = sd.replay(plain_run, ["grpo", "gspo"], device="cpu", memory_budget=2**40)
    assert chunks == [30]
    assert budgeted.to_dict() == capped.to_dict() == whole.to_dict()


def test_a_replay_of_every_step_holds_its_per_step_columns_once(plain_run):
    """The result of many policies over a long run: each policy's per-step columns are the
    streamed metrics and what is derived from them, not another copy of every column for a
    reported range that holds every step (the copy set the peak of building a result)."""
    run = sd.open_run(plain_run)
    policies = [get_policy("grpo")] * 64
    steps = 2000
    metrics = np.zeros((steps, len(policies), len(columns.device_metrics())))
    streamed = stream.StreamedRun(
        step_numbers=np.arange(steps, dtype=np.int64),
        metrics=metrics,
        geometry=("coef",) * steps,
        approximate=np.zeros(len(policies), dtype=bool),
        loss=np.full(steps, np.nan),
        grad_norm_covered=np.full(steps, np.nan),
        noise_floor=NoiseFloor(),
        likelihood=OwnLikelihood(),
    )
    observed, streamed_bytes = observe(run), metrics.nbytes
    tracemalloc.start()
    try:
        result = engine.replay_result(
            run, policies, None, streamed, observed, [], ReplayConfig(device="cpu")
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(len(p.series) == steps for p in result.policies)
    assert peak < streamed_bytes  # the old code's peak: 1.57x the streamed metrics


def test_threads_are_set_for_the_replay_then_restored(plain_run):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen: list[int] = []
    try:
        result = sd.replay(plain_run, ["grpo"], device="cpu", threads=2)
        assert result.threads == 2 and json.loads(result.to_json())["threads"] == 2
        assert torch.get_num_threads() == 2
        with engine.single_torch_thread():
            seen.append(torch.get_num_threads())
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    for threads in ("0", "257", "99999999999"):  # torch crashed past 2**31 and at 100000
        result = CliRunner().invoke(
            app, ["replay", str(plain_run), "-p", "grpo", "--threads", threads]
        )
        assert result.exit_code == 2 and "Traceback" not in result.stderr, result.output
        assert result.stderr.strip() == "error: --threads must be an integer in [1, 256]"


@pytest.mark.parametrize(
    ("text", "size"), [("64M", 64 * 2**20), ("1g", 2**30), ("512KiB", 512 * 2**10), ("4096", 4096)]
)
def test_memory_budget_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text",
    ["", "0", "-1M", "lots", "1X", "nan", "\u0661M", "1_0M", "\uff11G", "1e308T", "1.7e308K"],
)
def test_bad_memory_budget_is_a_usage_error(plain_run, text):
    """1e308T (a finite number, an infinite size) was an internal error: OverflowError,
    exit 70."""
    with pytest.raises(UsageError, match=r"^memory_budget expects a size"):
        parse_size(text)
    result = CliRunner().invoke(app, ["replay", str(plain_run), "--memory-budget", text])
    assert result.exit_code == 2
    assert "--memory-budget expects a size" in result.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("geometry", [None, "gram", "sketch"])
def test_cuda_matches_cpu(tmp_path, geometry):  # pragma: no cover - no GPU on CI
    """The catalogue (the fused pass: shared references and normalizers) on CUDA gives the CPU
    replay's every per-step column, with and without recorded geometry."""
    path = record_run(tmp_path / "run", steps=16, spike_at=11, nan_at=5, geometry=geometry)
    cpu = sd.replay(path, device="cpu")
    gpu = sd.replay(path, device="cuda")
    assert [p.spec for p in gpu.policies] == [p.spec for p in cpu.policies]
    for a, b in zip(cpu.policies, gpu.policies, strict=True):
        assert list(b.series.columns) == list(a.series.columns)
        for name, values in a.series.columns.items():
            if np.asarray(values).dtype.kind == "f":
                np.testing.assert_allclose(
                    b.series[name], values, rtol=1e-4, atol=1e-6, err_msg=f"{a.spec} {name}"
                )
            else:
                np.testing.assert_array_equal(b.series[name], values, err_msg=f"{a.spec} {name}")


# --- geometry ----------------------------------------------------------------------------------
def test_gram_geometry_gives_exact_norms_fidelity_and_cosine(tmp_path):
    path = record_run(tmp_path / "run", steps=10, geometry="gram", noise=0.5)
    data = _json([str(path), "-p", "grpo", "-p", "stabledrl", "-p", "is"])
    assert data["geometry"] == "gram" and data["geometry_coverage"] == 1.0
    own = data["policies"][0]
    assert own["own"] and own["summary"]["fidelity"] < 1e-5
    assert all(abs(r["cosine_to_own"] - 1.0) < 1e-5 for r in own["steps"])
    others = data["policies"][1]["steps"]
    assert all(r["cosine_to_own"] is not None and -1 <= r["cosine_to_own"] <= 1 for r in others)
    grpo_is = data["policies"][2]
    assert grpo_is["summary"]["discarded_mass_frac"] == 0.0
    assert 0 < own["summary"]["discarded_mass_frac"] < 1


def test_mixed_geometry_reports_every_key_and_labels_each_step(tmp_path):
    path = record_run(tmp_path / "run", steps=10, geometry="gram", geometry_every=2, noise=0.5)
    data = _json([str(path), "-p", "grpo", "-p", "stabledrl"])
    assert data["geometry"] == "mixed" and data["geometry_coverage"] == 0.5
    own, other = data["policies"]
    assert own["own"] and not other["own"] and [own["best"], other["best"]].count(True) == 1
    for p in data["policies"]:
        assert set(p["summary"]) >= SUMMARY_KEYS
        assert [r["geometry"] for r in p["steps"]] == ["gram", "coef"] * 5
        for row in p["steps"]:
            assert set(row) >= STEP_KEYS
            # cosine needs geometry: a number on gram steps, null on coef steps
            assert (row["cosine_to_own"] is None) == (row["geometry"] == "coef")
    # fidelity is measured on the steps with geometry only (coef norms are not grad norms)
    assert own["summary"]["fidelity"] < 1e-5 and other["summary"]["fidelity"] is None
    table = runner.invoke(app, ["replay", str(path), "-p", "grpo", "--wide", "--device", "cpu"])
    assert table.exit_code == 0 and "geometry mixed (coverage 50%)" in table.stdout
    assert "norm med*" in table.stdout and "a proxy in other units" in table.stdout


def test_mixed_geometry_spikes_compare_like_with_like(tmp_path):
    # Gradient norms 100x the coefficient norms, geometry on every 4th step: compared with the
    # proxy norms of the steps between, every geometry step would look like a spike.
    path = record_run(tmp_path / "run", steps=40, geometry="gram", geometry_every=4,
                      feature_scale=100.0)  # fmt: skip
    result = sd.replay(path, ["reinforce", "stabledrl"], device="cpu")
    for p in result.policies:
        norms, kinds = p.series["update_norm"], p.series["geometry"]
        assert np.median(norms[kinds == "gram"]) > 20 * np.median(norms[kinds == "coef"])
        assert p.summary.spike_steps == []


def test_cuda_without_a_gpu_is_a_usage_error(plain_run, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = runner.invoke(app, ["replay", str(plain_run), "-p", "grpo", "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA device" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def test_mps_without_mps_is_a_usage_error(plain_run, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    result = runner.invoke(app, ["replay", str(plain_run), "-p", "grpo", "--device", "mps"])
    assert result.exit_code == 2 and "no MPS device" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


@pytest.mark.parametrize("device", ["meta", "mps"])
def test_the_api_refuses_a_device_it_cannot_compute_on(plain_run, monkeypatch, device):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UsageError, match="device"):
        sd.replay(plain_run, ["grpo"], device=device)


def test_sketch_geometry_approximates_the_norms(tmp_path):
    path = record_run(tmp_path / "run", steps=6, geometry="sketch", sketch_k=4096)
    data = _json([str(path), "-p", "grpo"])
    assert data["geometry"] == "sketch"
    assert data["policies"][0]["summary"]["fidelity"] < 0.1  # relative error ~ 1/sqrt(2k)


# --- outputs -----------------------------------------------------------------------------------
def test_table_marks_own_and_best_and_says_counterfactual(plain_run):
    result = runner.invoke(app, ["replay", str(plain_run), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "grpo (own)" in result.stdout and "(best)" in result.stdout
    assert "proxy" in result.stdout and "one-step counterfactual" in result.stdout


def test_steps_range_and_detail(plain_run):
    data = _json([str(plain_run), "-p", "grpo", "--steps", "20:25", "--detail"])
    grpo = data["policies"][0]
    assert [r["step"] for r in grpo["steps"]] == [20, 21, 22, 23, 24]
    assert grpo["summary"]["spike_steps"] == [22]  # the summary covers the whole run
    top = grpo["summary"]["detail"]["22"]
    assert top and top[0]["advantage"] < 0 and top[0]["log_ratio"] == pytest.approx(6.0, 0.05)
    assert set(top[0]) == {"seq_id", "group", "reward", "advantage", "log_ratio", "contribution"}
    table = runner.invoke(
        app, ["replay", str(plain_run), "-p", "grpo", "--steps", "21:23", "--detail"]
    )
    assert table.exit_code == 0 and "step 22: sequences contributing most" in table.stdout


def test_hdf5_report_and_open_run_refuses_it(plain_run, tmp_path):
    out = tmp_path / "report.h5"
    result = runner.invoke(
        app, ["replay", str(plain_run), "-p", "grpo", "-p", "stabledrl", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = read_hdf5(out)
    assert report["attrs"]["kind"] == REPORT_KIND
    as_json = runner.invoke(
        app, ["replay", str(plain_run), "-p", "grpo", "-p", "stabledrl", "--format", "json"]
    )
    document = json.loads(as_json.stdout)
    assert json.loads(report["attrs"]["guards"]) == document["guards"] != []
    assert report["attrs"]["threads"] == document["threads"] == 1
    assert report["attrs"]["run"] == str(plain_run)
    assert report["attrs"]["run_policy_spec"].startswith("grpo")
    grpo = report["policies"][0]
    assert grpo["attrs"]["spec"] == "grpo" and json.loads(grpo["attrs"]["params"])["eps_low"] == 0.2
    assert grpo["update_norm"].shape == (30,) and grpo["spike"][22] == 1
    with pytest.raises(InputError, match="not a run"):
        sd.open_run(out)
    again = runner.invoke(app, ["replay", str(out)])
    assert again.exit_code == 3 and "not a run" in again.stderr


# --- bad input ---------------------------------------------------------------------------------
def test_missing_field_for_a_requested_policy_exits_3_naming_it(tmp_path):
    path = record_run(tmp_path / "run", steps=3, drop=("reward", "group_id"))
    ok = runner.invoke(app, ["replay", str(path), "-p", "grpo", "--format", "json"])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(app, ["replay", str(path), "-p", "grpo:adv=center"])
    assert bad.exit_code == 3
    assert "'reward'" in bad.stderr and "grpo:adv=center" in bad.stderr and "step 0" in bad.stderr
    assert "Traceback" not in bad.output


def _break_step(path: Path, number: int) -> None:
    """Rewrites a step file with logp_old one entry short (a shape the header disagrees with)."""
    from stabledrl_cli._atomic import write_atomic
    from stabledrl_cli.dump._step_encoding import encode_step
    from stabledrl_cli.dump._stfile import read_header

    step_path = path / "steps" / f"step-{number:08d}.safetensors"
    header = read_header(step_path, deep=True)
    metadata = {k: v for k, v in header.metadata.items() if not k.startswith("_crc32")}
    step = sd.open_run(path).step(number)
    tensors = {name: step[name].numpy() for name in step.fields}
    tensors["logp_old"] = tensors["logp_old"][:-1]
    write_atomic(step_path, encode_step(tensors, metadata))


def test_mismatched_array_lengths_skip_the_step_and_say_so(tmp_path):
    """A step whose arrays disagree in length is a finding: replay and check skip it, replay
    the rest, and say on stderr how many steps were skipped and why."""
    path = record_run(tmp_path / "run", steps=3)
    _break_step(path, 1)
    result = runner.invoke(app, ["replay", str(path), "-p", "grpo", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (
        "skipped 1 unreadable, incomplete or invalid step" in result.stderr
        and "step 1" in result.stderr
    )
    assert "logp_old" in result.stderr and "replayed 2" in result.stderr
    check = runner.invoke(app, ["check", str(path), "--max-nonfinite", "9", "--device", "cpu"])
    assert (
        check.exit_code == 0 and "skipped 1 unreadable, incomplete or invalid step" in check.stderr
    )
    findings = sd.open_run(path).integrity.findings
    assert sd.replay(path, ["grpo"], device="cpu").skipped == [f.message for f in findings]


def _unreadable_run(tmp_path: Path) -> Path:
    path = record_run(tmp_path / "run", steps=3)
    for step_file in (path / "steps").iterdir():
        step_file.write_bytes(step_file.read_bytes()[:50])  # every step torn
    return path


@pytest.mark.parametrize("command", ["replay", "check"])
def test_zero_readable_steps_exit_3_naming_why(tmp_path, command):
    path = _unreadable_run(tmp_path)
    extra = ["--max-collapsed", "0"] if command == "check" else []
    result = runner.invoke(app, [command, str(path), "-p", "grpo", "--device", "cpu", *extra])
    assert result.exit_code == 3 and result.stdout == ""
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert "no step could be read (3 steps were skipped: step 0: torn" in message
    with pytest.raises(InputError, match="no step could be read"):
        sd.replay(path, ["grpo"], device="cpu")


def test_zero_readable_steps_exit_3_in_a_real_process(tmp_path):
    """replay's; check's reads the run through the same replay (checked in-process above)."""
    path = _unreadable_run(tmp_path)
    (done,) = run_cli_together(["replay", path, "--device", "cpu"], timeout=120)
    assert done.returncode == 3, done.stderr
    assert "no step could be read" in done.stderr and "Traceback" not in done.stderr


def test_progress_ends_at_the_listed_steps_when_some_are_damaged(tmp_path):
    """Progress counts the listed step files, and the ones the reader skips (damaged) as done
    when the replay ends: the last line says 100%. Before, it ended short of it (8/9 here)."""
    path = record_run(tmp_path / "run", steps=10)
    torn = path / "steps" / "step-00000003.safetensors"
    torn.write_bytes(torn.read_bytes()[:-9])
    flipped = path / "steps" / "step-00000006.safetensors"
    data = bytearray(flipped.read_bytes())
    data[-3] ^= 1
    flipped.write_bytes(bytes(data))
    done = runner.invoke(app, ["replay", str(path), "-p", "grpo", "--format", "json"])
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout)["steps"] == 8
    shown = [line for line in done.stderr.splitlines() if line.startswith("replaying: ")]
    assert shown[-1] == "replaying: 10/10 (100%)", done.stderr
    assert "skipped 2 unreadable" in done.stderr


def test_wrong_format_version_exits_3(tmp_path):
    path = record_run(tmp_path / "run", steps=2)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = "3.0"
    (path / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["replay", str(path)])
    assert result.exit_code == 3 and "newer" in result.stderr


def test_bad_options_exit_2(plain_run):
    for args in (["-p", "nosuch"], ["-p", "grpo:zzz=1"], ["--steps", "x:y"], ["--window", "0"]):
        result = runner.invoke(app, ["replay", str(plain_run), *args])
        assert result.exit_code == 2, (args, result.output)
    assert parse_step_range("3:") == (3, None) and parse_step_range(":7") == (None, 7)
    assert parse_step_range(" 3 : 7 ") == (3, 7)
    for text in ("\u0663:\u0667", "1_0:", "\u0665"):  # int() takes these; a step is ASCII digits
        with pytest.raises(UsageError, match="expects A:B"):
            parse_step_range(text)
    # Library errors name the setting; the CLI names its option.
    for args, message in (
        (["--window", "0"], "--window must be an integer in [1, 1e+09]"),
        (["--window", str(10**29)], "--window must be an integer in [1, 1e+09]"),
        (["--collapse-window", str(10**29)], "--collapse-window must be an integer in [1, 1e+09]"),
        (["--window", str(10**30)], "'--window': not an integer"),  # more than 30 digits
        (["--guard", f"skip-step:window={10**23}"], "window must be an integer in [6, 1e+09]"),
        (["--guard", f"zclip:warmup={10**23}"], "warmup must be an integer in [1, 1e+09]"),
        (["--steps", "5:5"], "--steps 5:5 is empty"),
        # Before, an unset $RANGE (--steps "") printed a row for every step of the run
        (["--steps", ""], "--steps is empty; give A:B (A <= step < B), or : for every step"),
        (["--steps", " "], "--steps is empty; give A:B"),
        # Before, -5: replayed every step: a bound below the first step selected nothing out
        (["--steps", "-5:"], "--steps -5: has a negative bound: steps are numbered from 0"),
        (["--steps", ":-1"], "--steps :-1 has a negative bound"),
        (["--spike-factor", "1"], "--spike-factor must be a finite number > 1"),
    ):
        result = runner.invoke(app, ["replay", str(plain_run), *args])
        assert result.exit_code == 2 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)


def test_exit_codes_in_a_real_process(plain_run, tmp_path):
    missing, bad = run_cli_together(
        ["replay", tmp_path / "nope"], ["replay", plain_run, "-p", "nosuch"]
    )
    assert missing.returncode == 3 and "no such run" in missing.stderr
    assert "Traceback" not in missing.stderr and missing.stdout == ""
    assert bad.returncode == 2 and "unknown policy" in bad.stderr


def test_config_validation():
    with pytest.raises(UsageError, match=r"^chunk_size must be an integer >= 1$"):
        ReplayConfig(chunk_size=0)
    with pytest.raises(UsageError, match=r"^window must be an integer in \[1, 1e\+09\]$"):
        sd.replay(REPO / "fixtures" / "grpo", ["grpo"], window=0)
    with pytest.raises(Exception, match="empty"):
        ReplayConfig(step_range=(5, 5))
    # Before, a ValueError of unpacking ('too many values to unpack') or a float kept as a bound
    message = r"^step_range must be \(start, stop\), each an integer or None, got "
    for step_range in ("1:3", (1.5, None), (None, "3"), (True, None), (1, 2, 3), None):
        with pytest.raises(UsageError, match=message):
            ReplayConfig(step_range=step_range)  # type: ignore[arg-type]
    ReplayConfig(step_range=(np.int64(1), None))  # type: ignore[arg-type]  # numpy ints too
    for not_engine in (3, object()):  # before, an AttributeError ('int' object has no 'stream')
        with pytest.raises(UsageError, match=r"^engine must be 'local', 'processes', 'ray' or"):
            sd.replay(REPO / "fixtures" / "grpo", ["grpo"], engine=not_engine)  # type: ignore[arg-type]


def test_an_empty_list_of_policies_is_refused_not_the_catalogue():
    """`policies=[]` (say, a list filtered down to nothing) replayed the run's own policy and
    the whole standard catalogue, ten policies nobody asked for; None still means that."""
    run = REPO / "fixtures" / "grpo"
    for nothing in ([], ()):
        with pytest.raises(UsageError, match=r"^no policy to replay \(an empty list\)"):
            sd.replay(run, nothing)
    replayed = [p.spec for p in sd.replay(run, None).policies]  # grpo, the own one, is in it
    assert replayed == [get_policy(s).spec for s in STANDARD_CATALOGUE]


def test_replay_run_accepts_an_opened_run(plain_run):
    run = sd.open_run(plain_run)
    result = replay_run(run, ["reinforce"], config=ReplayConfig(device="cpu"))
    assert result.steps == 30 and result.policies[0].summary.drift_steps == []


def test_drift_flagged_for_grpo_on_noisy_ratios_not_for_reinforce(tmp_path):
    path = record_run(tmp_path / "run", steps=12, noise=0.8, seed=5)
    result = sd.replay(path, ["grpo", "reinforce"], device="cpu", window=4, drift_threshold=-0.05)
    grpo, reinforce = result.policy("grpo"), result.policy("reinforce")
    assert np.mean(grpo.series["net_push"]) < -0.05
    assert grpo.summary.drift_steps and grpo.summary.drift_steps[0] >= 3
    assert reinforce.summary.drift_steps == []


# --- the observed run beside the replay --------------------------------------------------------
def test_observed_uses_the_replays_spike_factor_and_streamed_noise_floor(plain_run):
    run = sd.open_run(plain_run)
    default = sd.replay(plain_run, ["reinforce"], device="cpu")
    lax = sd.replay(plain_run, ["reinforce"], device="cpu", spike_factor=1e6)
    # The noise floor pooled during the streaming pass is what inspect reads from disk.
    assert default.observed == observe(run)
    assert default.observed.noise_floor_units > 0
    assert default.observed.recorded_spike_steps == [22]  # the recorded grad norm spikes there
    assert lax.observed == observe(run, ReplayConfig(spike_factor=1e6))
    assert lax.observed.recorded_spike_steps == []


# --- adding a column ---------------------------------------------------------------------------
def test_a_new_column_is_one_declaration(plain_run, tmp_path, monkeypatch):
    """A column declared in the registry (with its computation) reaches the JSON rows, the
    summary, the HDF5 report, the per-step table and the gate, none of them edited."""
    doubled = columns.Column(
        name="doubled_norm",
        kind="float",
        meaning="2 x update_norm (a test column)",
        derive=lambda inputs: 2.0 * inputs.float("update_norm"),
        table=columns.TableCell(header="twice norm"),
        gate=columns.ColumnGate(aggregate="max", worse="higher", rel_tol=0.1),
    )
    monkeypatch.setattr(columns, "COLUMNS", (*columns.COLUMNS, doubled))
    result = sd.replay(plain_run, ["grpo", "stabledrl"], device="cpu")
    data = json.loads(result.to_json())
    grpo = data["policies"][0]
    for row in grpo["steps"]:
        assert list(row)[: len(CONTRACT_STEP_KEYS)] == CONTRACT_STEP_KEYS  # extended, not changed
        assert list(row)[-1] == "doubled_norm"
        assert row["doubled_norm"] == pytest.approx(2 * row["update_norm"])
    assert grpo["summary"]["doubled_norm_max"] == pytest.approx(
        2 * grpo["summary"]["update_norm_max"]
    )

    write_hdf5(result, tmp_path / "report.h5")
    report = read_hdf5(tmp_path / "report.h5")["policies"][0]
    np.testing.assert_allclose(report["doubled_norm"], 2 * report["update_norm"])

    console = Console(record=True, width=200)
    print_detail(result, console, wide=True)
    assert "twice norm" in console.export_text()

    baseline = baseline_dict(result, check_settings(None))
    figure = baseline["policies"]["grpo"]["doubled_norm_max"]
    assert figure["value"] == pytest.approx(2 * grpo["summary"]["update_norm_max"])
    assert (figure["worse"], figure["rel_tol"]) == ("higher", 0.1)
    write_baseline(baseline, tmp_path / "baseline.json")
    assert all(g.ok for g in evaluate(result, Gates(), load_baseline(tmp_path / "baseline.json")))
    figure["value"] /= 2  # today's figure is now a regression
    write_baseline(baseline, tmp_path / "tight.json")
    tripped = [
        g for g in evaluate(result, Gates(), load_baseline(tmp_path / "tight.json")) if not g.ok
    ]
    assert [(g.policy, g.gate) for g in tripped] == [("grpo", "baseline.doubled_norm_max")]


def test_the_public_replay_is_callable_after_a_replay_module_is_imported():
    """`import stabledrl_cli.replay.<module>` makes `stabledrl_cli.replay` the subpackage; it
    is callable as the public function all the same (a fresh interpreter, nothing imported)."""
    script = (
        "import stabledrl_cli.replay.engine, stabledrl_cli as sd\n"
        "from stabledrl_cli.replay import stream\n"
        f"result = sd.replay({str(REPO / 'fixtures' / 'grpo')!r}, ['grpo'], device='cpu')\n"
        "print(type(result).__name__, result.policies[0].spec)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ReplayResult", "grpo"]


def test_one_policy_may_be_given_alone_not_in_a_list(plain_run):
    """`sd.replay(run, "grpo")` replays grpo; a string used to be read as a sequence of
    one-letter specs ("unknown policy 'g'"). A Policy may be given alone too."""
    listed = sd.replay(plain_run, ["grpo:eps_high=0.28"], device="cpu").to_json()
    assert sd.replay(plain_run, "grpo:eps_high=0.28", device="cpu").to_json() == listed
    policy = sd.get_policy("grpo:eps_high=0.28")
    assert sd.replay(plain_run, policy, device="cpu").to_json() == listed


@pytest.mark.parametrize("output_format", ["json", "table"])
@pytest.mark.parametrize(("flag", "name"), [("--plot", "replay.png"), ("--out", "report.h5")])
def test_an_output_that_cannot_be_written_comes_after_the_results(
    plain_run, tmp_path, output_format, flag, name
):
    """--plot or --out onto a full disk (a link to /dev/full, written in place): exit 4 with
    one line naming it, after the results are shown, as check does. Before, the replay
    computed everything, then ended at the failed write with no table and no JSON."""
    target = full_disk(tmp_path / name)
    args = ["replay", str(plain_run), "-p", "grpo", flag, str(target), "--device", "cpu"]
    result = runner.invoke(app, [*args, "--format", output_format])
    assert result.exit_code == 4, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [full_disk_error(flag)], result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    if output_format == "json":
        assert [p["spec"] for p in json.loads(result.stdout)["policies"]] == ["grpo"]
    else:
        assert "grpo" in result.stdout and "discard" in result.stdout, result.stdout


@pytest.mark.parametrize(
    "args", [["replay", "-p", "grpo", "--out"], ["replay", "-p", "grpo", "--plot"], ["pack"]]
)
def test_an_output_under_a_regular_file_is_named_so(plain_run, tmp_path, args):
    """--out, --plot (and pack's archive) under a path that is a regular file said 'directory
    FILE does not exist', of a file that exists; the line now says it is not a directory."""
    (tmp_path / "notes.txt").write_text("x")
    target = tmp_path / "notes.txt" / ("replay.png" if "--plot" in args else "report.h5")
    result = runner.invoke(app, [args[0], str(plain_run), *args[1:], str(target)])
    assert result.exit_code == 2, result.output
    assert f"{tmp_path / 'notes.txt'} is not a directory" in result.stderr, result.stderr
    assert "does not exist" not in result.stderr


@pytest.mark.parametrize("output_format", ["table", "json"])
def test_stdout_on_a_full_disk_is_an_output_not_written(plain_run, output_format):
    """`replay RUN > out.json` on a full disk ended 'internal error: OSError: [Errno 28] No
    space left on device (a bug: ...)', exit 70; it is an output that cannot be written:
    exit 4, one line naming stdout, and nothing after it."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system: the tests' full disk")
    args = ["replay", plain_run, "-p", "grpo", "--device", "cpu", "--format", output_format]
    with open("/dev/full", "w") as stdout:
        done = subprocess.run(
            cli_command(*args), stdout=stdout, stderr=subprocess.PIPE, text=True,
            env=cli_environment(), timeout=300,
        )  # fmt: skip
    assert done.returncode == 4, done.stderr
    lines = [line for line in done.stderr.splitlines() if not line.startswith("replaying")]
    assert lines == ["error: stdout: cannot write it (no space left on device)"], done.stderr


def test_an_output_that_cannot_be_written_leaves_the_others_written(plain_run, tmp_path):
    """--out onto a full disk beside --plot: the plot was not written (the first failed write
    ended the writing). Each output is written that can be, as check's are; exit 4 names
    the one that cannot."""
    plot = tmp_path / "replay.png"
    args = ["replay", str(plain_run), "-p", "grpo", "--device", "cpu", "--format", "json"]
    result = runner.invoke(
        app, [*args, "--out", str(full_disk(tmp_path / "report.h5")), "--plot", str(plot)]
    )
    assert result.exit_code == 4, result.output
    assert result.stderr.strip().splitlines()[-1] == full_disk_error("--out")
    assert f"wrote {plot}" in result.stderr
    assert plot.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("output_format", ["json", "table"])
def test_a_bad_metrics_group_is_refused_before_the_replay(plain_run, tmp_path, output_format):
    """--metrics bogus: exit 2, one line, before any step is replayed or any output written.
    Before, the table's refusal came after the whole replay (and after --plot was written),
    and with --format json the value was never checked (exit 0)."""
    plot = tmp_path / "replay.png"
    args = ["replay", str(plain_run), "-p", "grpo", "--metrics", "trl", "--metrics", "bogus"]
    result = runner.invoke(app, [*args, "--plot", str(plot), "--format", output_format])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        "error: --metrics 'bogus' is not one of trl, verl, counts"
    ]
    assert result.stdout == "" and not plot.exists()


def test_no_report_is_written_inside_the_run_it_reads(tmp_path):
    """`replay --out RUN/manifest.json` replaced the run's manifest with the report (exit 0;
    every reader then refused the run, exit 3); a --plot, --write-baseline or --junit could do
    the same to any of its files, or through a link to the run. Each is refused before any
    replay, as `pack` refuses an archive inside the run."""
    run = tmp_path / "run"
    shutil.copytree(REPO / "fixtures" / "grpo", run)
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    (tmp_path / "link").symlink_to(run)
    refused = [
        ["replay", str(run), "-p", "grpo", "--out", str(run / "manifest.json")],
        ["replay", str(run), "-p", "grpo", "--out", str(tmp_path / "link" / "report.h5")],
        ["check", str(run), "--max-collapsed", "0", "--junit", str(run / "steps" / "j.xml")],
        ["check", str(run), "--write-baseline", str(run / "baseline.json")],
        ["tune", str(run), "-p", "stabledrl:c=3..5:2", "--plot", str(run / "tune.png")],
    ]
    for args in refused:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert f"is inside the run {run}; write it outside the run" in result.output, args
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before
    beside = tmp_path / "report.h5"
    result = runner.invoke(app, ["replay", str(run), "-p", "grpo", "--out", str(beside)])
    assert result.exit_code == 0, result.output
    assert beside.is_file()


def test_an_hdf5_write_refused_by_the_system_names_the_reason(grpo_fixture, tmp_path, monkeypatch):
    """h5py raises an OSError without errno whose text is HDF5's error stack; `replay -o` on
    a read-only file system said "cannot write it (Unable to synchronously create file
    (unable to open file: name = ..., errno = 30, error message = ...))". It now gives the
    system's reason, as for any other write (exit 4)."""
    import h5py

    def refused(name: object, mode: str = "r", **kwargs: object) -> object:
        raise OSError(
            f"Unable to synchronously create file (unable to open file: name = '{name}', "
            "errno = 30, error message = 'Read-only file system', flags = 13, o_flags = 242)"
        )

    monkeypatch.setattr(h5py, "File", refused)
    out = tmp_path / "out.h5"
    result = runner.invoke(app, ["replay", str(grpo_fixture), "-p", "grpo", "-o", str(out)])
    assert result.exit_code == 4, result.output
    assert f"{out}: cannot write it (Read-only file system)" in result.stderr
    assert "Unable to synchronously" not in result.stderr


def test_the_per_step_legend_reads_as_the_summarys() -> None:
    """The per-step table's legend quoted each column's declared meaning as a sentence
    ("step: The recorded step number", "nonfinite: The replayed update is NaN or inf") beside
    lower-case ones, where the summary's legend makes each a clause: now both do."""
    from stabledrl_cli.replay.report import detail_legend

    shown = columns.table_columns(METRIC_GROUPS)
    flags = [c.name for c in columns.reported_columns() if c.flag]
    lines = detail_legend(shown, flags)
    meanings = [line.split(": ", 1)[1] for line in lines[:-1]]
    meanings += [part.split(": ", 1)[1] for part in lines[-1].split(": ", 1)[1].split("; ")]
    assert "step: the recorded step number" in lines
    for meaning in meanings:
        first = meaning.split(" ", 1)[0]
        assert not first[:1].isupper() or first.isupper() or first[1:2].isupper(), meaning
        assert not meaning.endswith("."), meaning
