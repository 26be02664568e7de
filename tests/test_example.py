"""The built-in example: estimator, sampler, loss gradient, determinism, a short run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch.func import grad, vmap
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.errors import UsageError
from stabledrl_cli.example import (
    ExampleConfig,
    ModelConfig,
    SortTask,
    TinyDiffusionLM,
    draw_mask,
    generate,
    sequence_logp,
    token_logp,
    unit_logp,
)
from stabledrl_cli.example.task import MASK, N_DIGITS
from stabledrl_cli.example.trainer import _rollout_arrays, policy_loss, train

TASK = SortTask()


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """A 100k-parameter model gains nothing from intra-op threads, and two threads on two
    shared cores measured several times slower here (OpenMP spin-waits under contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(seed: int = 0) -> TinyDiffusionLM:
    model = TinyDiffusionLM(ModelConfig(seq_len=TASK.seq_len))
    model.reset_parameters(torch.Generator().manual_seed(seed))
    return model


def _batch(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    prompts = TASK.sample_prompts(n, g)
    completions = torch.randint(0, N_DIGITS, (n, TASK.length), generator=g)
    return torch.cat([prompts, completions], dim=1)


@pytest.mark.parametrize("kind", ["elbo", "llada"])
def test_mask_sample_hides_completion_only_with_the_estimators_weights(kind):
    sample = draw_mask(512, TASK.prompt_len, TASK.length, kind, torch.Generator().manual_seed(1))
    assert not sample.noise_mask[:, : TASK.prompt_len].any()
    assert torch.equal(sample.weights > 0, sample.noise_mask)
    if kind == "elbo":
        torch.testing.assert_close(sample.weights.sum(dim=1), torch.ones(512))
    else:
        # 1/(t L_c) per hidden position: unbiased, E[sum of weights] = 1.
        assert abs(float(sample.weights.sum(dim=1).mean()) - 1.0) < 0.5
        assert float(sample.weights.max()) > 1.0


@pytest.mark.parametrize("kind", ["elbo", "llada"])
def test_unit_logp_is_the_batched_estimate_row_by_row(kind):
    model = _model()
    tokens = _batch(6)
    sample = draw_mask(6, TASK.prompt_len, TASK.length, kind, torch.Generator().manual_seed(2))
    batched = sequence_logp(model, tokens, sample)
    params = dict(model.named_parameters())
    rows = torch.stack(
        [
            unit_logp(model, params, tokens[i], sample.noise_mask[i], sample.weights[i])
            for i in range(6)
        ]
    )
    torch.testing.assert_close(rows, batched)
    # And it composes with torch.func: per-unit gradients in one vmap.
    per_unit = vmap(grad(lambda p, t, m, w: unit_logp(model, p, t, m, w)), in_dims=(None, 0, 0, 0))(
        {k: v.detach() for k, v in params.items()}, tokens, sample.noise_mask, sample.weights
    )
    assert per_unit["head.weight"].shape == (6, *params["head.weight"].shape)


def test_generate_fills_every_position_with_a_digit_and_is_seeded():
    model = _model()
    prompts = TASK.sample_prompts(16, torch.Generator().manual_seed(3))
    first = generate(model, prompts, TASK.length, torch.Generator().manual_seed(4))
    again = generate(model, prompts, TASK.length, torch.Generator().manual_seed(4))
    assert torch.equal(first, again)
    assert first.shape == (16, TASK.length)
    assert ((first >= 0) & (first < N_DIGITS)).all() and not (first == MASK).any()


def test_reward_is_fraction_correct():
    prompts = torch.tensor([[12, 3, 1, 2, 0, 9, 10]])
    answer = torch.tensor([[0, 1, 2, 3, 9]])
    assert float(TASK.reward(prompts, answer)) == 1.0
    assert float(TASK.reward(prompts, torch.tensor([[0, 1, 2, 9, 3]]))) == pytest.approx(0.6)


def _per_unit_grads(model, tokens, noise_mask, weights):
    params = {k: v.detach() for k, v in model.named_parameters()}
    f = grad(lambda p, t, m, w: unit_logp(model, p, t, m, w))
    return vmap(f, in_dims=(None, 0, 0, 0))(params, tokens, noise_mask, weights)


@pytest.mark.parametrize("spec", ["grpo", "stabledrl"])
@pytest.mark.parametrize("unit", ["sequence", "token"])
def test_loss_gradient_is_catalogue_coef_times_per_unit_gradients(spec, unit):
    from stabledrl_cli.policies import get_policy

    model, n, g = _model(5), 16, torch.Generator().manual_seed(6)
    config = ExampleConfig(group_size=4, prompts_per_rollout=4, unit=unit, estimator="elbo")
    tokens = _batch(n, seed=7)
    reward = torch.rand(n, generator=g)
    groups = reward.view(-1, 4)
    advantages = (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)
    old = draw_mask(n, TASK.prompt_len, TASK.length, "elbo", g)
    new = old if unit == "token" else draw_mask(n, TASK.prompt_len, TASK.length, "elbo", g)
    with torch.no_grad():  # move theta off theta_old a little so ratios are not all 1
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    if unit == "sequence":
        logp_old = sequence_logp(_model(5), tokens, old).detach()
        logp = sequence_logp(model, tokens, new)
    else:
        logp_old = token_logp(_model(5), tokens, old.noise_mask)[:, TASK.prompt_len :].detach()
        logp = token_logp(model, tokens, new.noise_mask)[:, TASK.prompt_len :]
    score_mask = new.noise_mask[:, TASK.prompt_len :]
    arrays = _rollout_arrays(config, reward, advantages, logp, logp_old, score_mask)
    loss, weights = policy_loss(get_policy(spec), arrays, unit)
    model.zero_grad()
    loss.backward()

    if unit == "sequence":
        grads = _per_unit_grads(model, tokens, new.noise_mask, new.weights)
    else:  # one unit per completion position: one-hot weights on it
        eye = torch.eye(TASK.seq_len)[TASK.prompt_len :]
        grads = _per_unit_grads(
            model,
            tokens.repeat_interleave(TASK.length, dim=0),
            new.noise_mask.repeat_interleave(TASK.length, dim=0),
            eye.repeat(n, 1),
        )
    coef = weights.coef.detach()
    assert coef.abs().sum() > 0
    for name, param in model.named_parameters():
        expected = -torch.einsum("u,u...->...", coef, grads[name])
        torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-6)


def _small(**overrides) -> ExampleConfig:
    base = dict(steps=6, mu=2, pretrain_steps=5, group_size=4, prompts_per_rollout=2)
    return ExampleConfig(**{**base, **overrides})


class _Collect:
    def __init__(self) -> None:
        self.steps = []

    def __call__(self, info) -> None:
        self.steps.append(info)


@pytest.mark.parametrize(("unit", "estimator"), [("sequence", "llada"), ("token", "elbo")])
def test_same_seed_gives_identical_arrays_and_another_seed_does_not(unit, estimator):
    runs = []
    for seed in (3, 3, 4):
        collect = _Collect()
        train(_small(seed=seed, unit=unit, estimator=estimator), on_step=collect)
        runs.append(collect.steps)
    assert len(runs[0]) == 6
    for a, b in zip(runs[0], runs[1], strict=True):
        assert a.grad_norm == b.grad_norm and a.loss == b.loss
        for key in a.arrays:
            assert torch.equal(a.arrays[key], b.arrays[key]), key
    assert not all(
        torch.equal(a.arrays["logp"], c.arrays["logp"])
        for a, c in zip(runs[0], runs[2], strict=True)
    )


def test_inner_step_zero_ratio_is_pure_masking_noise():
    independent, shared = _Collect(), _Collect()
    train(_small(seed=2), on_step=independent)
    train(_small(seed=2, same_mask=True), on_step=shared)
    for info in shared.steps:
        if info.inner_step == 0:
            assert torch.equal(info.arrays["logp"], info.arrays["logp_old"])
    zero = [s for s in independent.steps if s.inner_step == 0]
    assert zero and all(not torch.equal(s.arrays["logp"], s.arrays["logp_old"]) for s in zero)
    assert [s.inner_step for s in independent.steps] == [0, 1, 0, 1, 0, 1]


def test_bad_configs_are_usage_errors():
    with pytest.raises(UsageError):
        ExampleConfig(unit="token", estimator="llada")
    with pytest.raises(UsageError):
        ExampleConfig(estimator="nope")
    with pytest.raises(UsageError):
        ExampleConfig(steps=0)


def test_token_unit_manifest_says_old_and_new_share_the_mask_and_no_weights():
    from stabledrl_cli.example.run_setup import recorder_kwargs
    from stabledrl_cli.policies import get_policy

    config = ExampleConfig(unit="token", estimator="elbo")
    estimator = recorder_kwargs(config, get_policy("grpo"))["estimator"]
    assert estimator["same_mask"] is True and estimator["weighting"].startswith("none")
    sequence = recorder_kwargs(ExampleConfig(), get_policy("grpo"))["estimator"]
    assert sequence["same_mask"] is False and "1/(t*L_c)" in sequence["weighting"]


def _steps_of(run_dir):
    files = sorted((run_dir / "steps").glob("step-*.safetensors"))
    out = []
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            out.append((tensors, f.metadata()))
    return out


def test_record_cli_runs_the_example_and_records_every_step(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["record", "--out", str(out), "--rl-steps", "8", "--seed", "1", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["unit"] == "sequence"
    assert manifest["estimator"]["kind"] == "llada" and manifest["estimator"]["same_mask"] is False
    assert manifest["reward_range"] == [0.0, 1.0]
    assert manifest["policy"]["name"] == "grpo"
    steps = _steps_of(out)
    assert len(steps) == 8
    assert [int(float(meta["inner_step"])) for _, meta in steps] == [0, 1, 2, 3] * 2
    for tensors, meta in steps:
        assert tensors["logp"].shape == (64,) and tensors["reward"].shape == (64,)
        grad_norm, clipped = float(meta["grad_norm"]), float(meta["grad_norm_clipped"])
        assert grad_norm > 0 and clipped <= min(grad_norm, 1.0) + 1e-6
    assert "final reward" in result.output
    # No terminal: progress is a line per tenth of the steps on stderr.
    assert "RL (grpo) steps: 4/8 (50%), reward" in result.stderr
    assert result.stderr.count("RL (grpo) steps:") == 8

    again = CliRunner().invoke(app, ["record", "--out", str(out), "--rl-steps", "2"])
    assert again.exit_code == 2 and "--force" in again.output


def test_record_cli_rejects_llada_token_units_with_exit_2(tmp_path):
    result = CliRunner().invoke(
        app,
        ["record", "--out", str(tmp_path / "r"), "--unit", "token", "--estimator", "llada"],
    )
    assert result.exit_code == 2
    assert "llada" in result.output


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ("grpo:beta=0.1", "logp_ref"),
        ("grpo:agg=recorded", "loss_scale"),
        ("grpo:tis=token-truncate", "logp_rollout"),
    ],
)
def test_record_refuses_a_policy_the_example_cannot_feed_before_it_trains(tmp_path, spec, field):
    """`record -p grpo:beta=0.1` pretrained, wrote a manifest (and step 0's checkpoint), then
    failed at the first RL step ('needs batch field(s) logp_ref, which this batch lacks'),
    leaving a run without steps that a second `record` refused as not empty."""
    out = tmp_path / "r"
    result = CliRunner().invoke(app, ["record", "--out", str(out), "--rl-steps", "1", "-p", spec])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1
    assert f"needs {field}, which the built-in example does not compute" in result.output
    assert "pretraining" not in result.output
    assert not out.exists()


def test_a_model_whose_outputs_overflow_stops_as_diverged_not_as_a_bug(tmp_path):
    """`record --lr 1000` (a finite lr it takes): after 4 steps the weights were finite (up to
    7e5) but the model's outputs were not, and the next rollout's sampler raised 'probability
    tensor contains either inf, nan or element < 0': exit 70, 'internal error'. The run now
    stops there as a diverged one, its 4 steps recorded and the summary saying after which."""
    out = tmp_path / "run"
    args = ["record", "--out", str(out), "--rl-steps", "40", "--lr", "1000"]
    result = CliRunner(env={"COLUMNS": "120"}).invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "weights or outputs not finite after step 3: stopped" in result.stderr
    assert len(_steps_of(out)) == 4
