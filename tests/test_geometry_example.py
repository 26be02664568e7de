"""Gradient geometry end to end on the built-in example: record it, replay it, check fidelity.

- Geometry draws nothing from the training RNG: same seed, same run, with and without it.
- Replaying the run's own policy reproduces the recorded pre-clip `grad_norm_covered`:
  median relative error <= 1e-3 with `gram`, <= 10% with a k = 256 sketch (the `fidelity`).
- On one example batch, the replayed norm of every catalogue policy equals the norm of a real
  autograd backward of that policy's loss (sequence and token units), and the JVP sketch
  equals the sketch formed from exact per-unit gradients.
"""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.capture.geometry import GeometryConfig, capture_geometry
from stabledrl_cli.cli import record as record_command
from stabledrl_cli.cli.app import app
from stabledrl_cli.example import (
    ModelConfig,
    SortTask,
    TinyDiffusionLM,
    draw_mask,
    generate,
    sequence_logp,
    token_logp,
)
from stabledrl_cli.example.run_setup import recorder_kwargs
from stabledrl_cli.example.step_geometry import geometry_unit_fn
from stabledrl_cli.example.trainer import ExampleConfig, _rollout_arrays, policy_loss, train
from stabledrl_cli.policies import STANDARD_CATALOGUE, get_policy

# torch's own forward-AD decompositions still call torch.jit.script when first loaded.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """A 100k-parameter model gains nothing from intra-op threads, and two threads on two
    shared cores measured 2.5x slower for this file (OpenMP spin-waits under contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Short runs: 4 RL steps = 2 rollouts of mu = 2, after a brief pretraining (geometry and its
# fidelity do not depend on how good the model is, only on the model and the batch).
SHORT = {"steps": 4, "mu": 2, "pretrain_steps": 5, "seed": 3}
GRAM_TOL = 1e-3  # the bound for `gram` (float32 per-unit gradients, float64 product)
SKETCH_TOL = 0.10  # k = 256: relative error ~ 1/sqrt(2k) = 4.4% per step


def _record(tmp_path, name: str, geometry: GeometryConfig | None, **overrides):
    config = ExampleConfig(**{**SHORT, **overrides})
    path = tmp_path / name
    infos = []
    with sd.Recorder(path, **recorder_kwargs(config, get_policy(config.policy), geometry)) as rec:
        train(config, recorder=rec, geometry=geometry, on_step=infos.append)
    return path, infos


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("geometry-runs")
    return {
        "plain": _record(tmp, "plain", None),
        "gram": _record(tmp, "gram", GeometryConfig(kind="gram")),
        "sketch": _record(tmp, "sketch", GeometryConfig(kind="sketch", k=256, method="exact")),
    }


@pytest.mark.parametrize(
    ("name", "key", "shape"),
    [("gram", "unit_grad_gram", (64, 64)), ("sketch", "unit_grad_sketch", (64, 256))],
)
def test_geometry_draws_nothing_from_the_training_rng(runs, name, key, shape):
    (_, plain), (_, recorded) = runs["plain"], runs[name]
    assert len(plain) == len(recorded) == SHORT["steps"]
    assert [a.inner_step for a in plain] == [0, 1, 0, 1]  # two rollouts
    for a, b in zip(plain, recorded, strict=True):
        assert a.reward_mean == b.reward_mean and a.grad_norm == b.grad_norm
        for array in ("logp", "logp_old", "advantages", "reward", "mask"):
            assert torch.equal(a.arrays[array], b.arrays[array]), (a.step, array)
        assert a.geometry == {} and a.grad_norm_covered is None
        assert b.geometry[key].shape == shape  # 64 sequence units


def test_gram_replay_reproduces_the_recorded_grad_norm(runs):
    path, infos = runs["gram"]
    run = sd.open_run(path)
    manifest = run.manifest["geometry"]
    assert manifest["kind"] == "gram" and manifest["unit"] == "sequence"
    assert manifest["covered_numel"] == sum(p["numel"] for p in manifest["covered"]) > 100_000
    # Covering every parameter, the covered norm is the recorded clip_grad_norm_ return value.
    for info in infos:
        assert math.isclose(info.grad_norm_covered, info.grad_norm, rel_tol=1e-5)
    result = sd.replay(run, [run.policy_spec], device="cpu")
    assert result.geometry == "gram" and result.geometry_coverage == 1.0
    own = result.own
    assert own is not None and own.summary.fidelity <= GRAM_TOL
    norms = own.series["update_norm"]
    recorded = np.array([info.grad_norm_covered for info in infos])
    np.testing.assert_allclose(norms, recorded, rtol=GRAM_TOL)
    assert list(own.series["geometry"]) == ["gram"] * len(infos)


def test_sketch_k256_replay_is_within_ten_percent(runs):
    result = sd.replay(runs["sketch"][0], ["grpo"], device="cpu")
    assert result.geometry == "sketch" and result.geometry_coverage == 1.0
    fidelity = result.own.summary.fidelity
    # A sketch is approximate: an error of exactly 0 would mean it is not one.
    assert 0 < fidelity <= SKETCH_TOL


def test_inspect_says_a_gram_was_captured_as_a_sketch(tmp_path):
    """A Gram over more units than max_gram_units is captured as a sketch (a warning at each
    step): inspect said `geometry: gram`, as the manifest declares, though every step holds a
    sketch; it names the sketch's k and steps."""
    geometry = GeometryConfig(kind="gram", max_gram_units=32, k=16)
    with pytest.warns(UserWarning, match="64 units exceed max_gram_units=32"):
        path, _ = _record(tmp_path, "over", geometry, steps=2)
    table = CliRunner().invoke(app, ["inspect", str(path)], terminal_width=400)
    assert "gram, a sketch k=16 on steps 0..1 (over max_gram_units)" in table.stdout


def test_replay_mixes_token_unit_steps_with_and_without_geometry(tmp_path):
    geometry = GeometryConfig(kind="gram", every=2)
    path, infos = _record(
        tmp_path, "token", geometry, unit="token", estimator="elbo", prompts_per_rollout=2,
        group_size=4,
    )  # fmt: skip
    assert [bool(i.geometry) for i in infos] == [True, False, True, False]
    assert infos[0].geometry["unit_grad_gram"].shape == (40, 40)  # 8 sequences x 5 tokens
    result = sd.replay(path, ["grpo"], device="cpu")
    assert result.geometry == "mixed" and result.geometry_coverage == 0.5
    own = result.own
    assert list(own.series["geometry"]) == ["gram", "coef", "gram", "coef"]
    assert own.summary.fidelity <= GRAM_TOL
    assert own.summary.update_norm_approximate is False  # token units: exact


# --- one example batch: every catalogue policy against autograd ------------------------------
@functools.cache  # shared by the tests below; they only read it (and set .grad)
def _example_batch(unit: str, seed: int = 5):
    """A model after brief pretraining and one rollout batch scored like `train` does.

    Returns (model, arrays in the recorded layout, a live logp function, geometry inputs).
    logp and logp_old use independent masks (sequence unit, LLaDA) or the same mask with old
    params perturbed (token unit), so ratios move away from 1 and the policies clip differently.
    """
    from stabledrl_cli.example.pretrain import pretrain

    gen = torch.Generator().manual_seed(seed)
    task = SortTask()
    model = TinyDiffusionLM(ModelConfig(vocab_size=13, seq_len=task.seq_len))
    model.reset_parameters(gen)
    device = torch.device("cpu")
    pretrain(model, task, steps=20, batch_size=32, lr=6e-4, noise=0.3, generator=gen,
             device=device)  # fmt: skip
    prompts = task.sample_prompts(8, gen).repeat_interleave(8, dim=0)
    completions = generate(model, prompts, task.length, gen)
    tokens = torch.cat([prompts, completions], dim=1)
    reward = task.reward(prompts, completions)
    advantages = (reward.view(-1, 8) - reward.view(-1, 8).mean(1, keepdim=True)).reshape(-1)
    kind = "llada" if unit == "sequence" else "elbo"
    old = draw_mask(64, task.prompt_len, task.length, kind, gen)
    new = draw_mask(64, task.prompt_len, task.length, kind, gen) if unit == "sequence" else old
    with torch.no_grad():
        if unit == "sequence":
            logp_old = sequence_logp(model, tokens, old)
        else:
            shifted = TinyDiffusionLM(model.config)
            shifted.load_state_dict(model.state_dict())
            for p in shifted.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
            logp_old = token_logp(shifted, tokens, old.noise_mask)[:, task.prompt_len :]

    def logp_fn():
        if unit == "sequence":
            return sequence_logp(model, tokens, new)
        return token_logp(model, tokens, new.noise_mask)[:, task.prompt_len :]

    config = ExampleConfig(unit=unit, estimator=kind)
    score_mask = new.noise_mask[:, task.prompt_len :]
    arrays = _rollout_arrays(config, reward, advantages, logp_fn().detach(), logp_old, score_mask)
    return model, arrays, logp_fn, (tokens, new.noise_mask, new.weights)


def _autograd_update(model, logp_fn, arrays, policy, unit) -> torch.Tensor:
    """The flattened gradient of the example's loss for `policy`, by a real backward."""
    live = {**arrays, "logp": logp_fn().reshape(-1)}
    loss, _ = policy_loss(policy, live, unit)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()


@pytest.mark.parametrize("unit", ["sequence", "token"])
def test_every_catalogue_policy_norm_matches_autograd(tmp_path, unit):
    model, arrays, logp_fn, inputs = _example_batch(unit)
    fn = geometry_unit_fn(unit, SortTask().prompt_len)
    geometry = capture_geometry(model, fn, inputs, GeometryConfig(kind="gram"), step=0)
    own = get_policy("grpo")
    with sd.Recorder(tmp_path / unit, policy="grpo", unit=unit) as rec:
        rec.log_step(0, **arrays, grad_norm=1.0, loss=0.0, **geometry)
    result = sd.replay(tmp_path / unit, [own.spec, *STANDARD_CATALOGUE], device="cpu")
    assert result.geometry == "gram"
    own_update = _autograd_update(model, logp_fn, arrays, own, unit)
    replayed_norms = []
    for entry in result.policies:
        policy = get_policy(entry.spec)
        update = _autograd_update(model, logp_fn, arrays, policy, unit)
        true_norm = float(torch.linalg.vector_norm(update))
        replayed = float(entry.series["update_norm"][0])
        assert math.isclose(replayed, true_norm, rel_tol=GRAM_TOL), (entry.spec, replayed)
        cosine = float(update @ own_update / (true_norm * torch.linalg.vector_norm(own_update)))
        assert math.isclose(float(entry.series["cosine_to_own"][0]), cosine, abs_tol=1e-3)
        replayed_norms.append(replayed)
    # The policies weigh the batch differently: the check compares distinct updates.
    assert max(replayed_norms) > 1.5 * min(replayed_norms)


def test_jvp_sketch_equals_the_exact_sketch_on_one_step():
    model, _, _, inputs = _example_batch("sequence")
    fn = geometry_unit_fn("sequence", SortTask().prompt_len)
    sketches = {
        method: capture_geometry(
            model, fn, inputs, GeometryConfig(kind="sketch", k=64, seed=7, method=method), 0
        )["unit_grad_sketch"]
        for method in ("exact", "jvp")
    }
    scale = float(sketches["exact"].abs().max())
    torch.testing.assert_close(sketches["jvp"], sketches["exact"], rtol=1e-3, atol=1e-4 * scale)


# --- the CLI ------------------------------------------------------------------------------------
def test_record_cli_sketch_float16_on_selected_parameters(tmp_path, monkeypatch):
    # The CLI's defaults with a 5-step pretraining (the CLI has no option for it): seconds less.
    monkeypatch.setattr(
        record_command, "ExampleConfig", functools.partial(ExampleConfig, pretrain_steps=5)
    )
    out = tmp_path / "run"
    args = ["record", "--out", str(out), "--steps", "2", "--device", "cpu", "--geometry",
            "sketch", "--geometry-k", "64", "--geometry-params", "head.*", "--geometry-seed",
            "3", "--geometry-dtype", "float16", "--geometry-method", "exact"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())["geometry"]
    assert manifest["kind"] == "sketch" and manifest["sketch"]["k"] == 64
    assert manifest["sketch"]["seed"] == 3 and manifest["params"] == ["head.*"]
    assert [c["name"] for c in manifest["covered"]] == ["head.weight", "head.bias"]
    assert manifest["storage_dtype"] == "float16" and manifest["storage_scale"] is True
    step = sd.open_run(out).step(0)
    assert step["unit_grad_sketch"].dtype == torch.float16
    assert step["unit_grad_sketch"].shape == (64, 64)
    assert step.scalars["unit_grad_sketch_scale"] > 0
    assert 0 < step.scalars["grad_norm_covered"] < step.scalars["grad_norm"]
    replayed = sd.replay(out, ["grpo"], device="cpu")
    assert replayed.geometry == "sketch" and replayed.own.summary.fidelity is not None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--geometry", "gram", "--geometry-params", "nope*"], "matches no trainable"),
        (["--geometry", "gram", "--geometry-dtype", "float16"], "float32"),
        (["--geometry", "sketch", "--geometry-k", "0"], "k must be"),
        (["--geometry", "sketch", "--geometry-k", str(10**29)], "k must be at most 8192"),
        (["--geometry", "sketch", "--geometry-k", str(10**30)], "'--geometry-k': not an integer"),
        (["--geometry", "gram", "--", "python", "-c", "pass"], "built-in example"),
    ],
)
def test_record_cli_refuses_bad_geometry_options(tmp_path, extra, message):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["record", "--out", str(out), "--steps", "2", *extra])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not out.exists()
