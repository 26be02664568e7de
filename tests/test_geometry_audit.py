"""Gradient geometry's numbers against independent references (an audit).

- A custom loop's token-unit step with masked tokens, loss weights, a sequence with no scored
  token and two micro-batches: the replayed norm of grpo, stabledrl and gspo equals the norm
  of a real backward of each policy's hand-written loss.
- Geometry taken per sequence in a token run: of the mean scored log-probability.
- A sketch's relative error over many seeds is about 1/sqrt(2k), as docs/geometry.md says.
- Capture leaves the model as it found it: a forward that updates buffers (BatchNorm in
  training mode) is a usage error, and the model's buffers keep their values.
- `covered_grad_norm` of half-precision gradients is their norm, not its rounding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import stabledrl_cli as sd
from stabledrl_cli.capture.geometry import (
    BatchLogp,
    GeometryConfig,
    capture_geometry,
    covered_grad_norm,
    covered_parameters,
    per_unit_gradients,
    sketch_from_gradients,
)
from stabledrl_cli.errors import UsageError
from stabledrl_cli.geometry import replayed_update_norm

B, L, V, GROUP = 8, 5, 11, 4  # sequences, tokens a sequence, vocabulary, group size


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(V, 8), nn.Tanh(), nn.Linear(8, V))


def _row_logp(call, tokens: torch.Tensor) -> torch.Tensor:
    """[L] token log-probs of one row: position t scored from token t - 1 (rolled)."""
    logits = call(torch.roll(tokens, 1)[None])[0]
    return torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]


def _logp(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """[B, L] token log-probs by an ordinary forward, as `_row_logp` row by row."""
    logits = model(torch.roll(tokens, 1, dims=1))
    return torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]


class _Batch:
    """One step's rollout: masks with a sequence scored on no token, loss weights, 2 groups."""

    def __init__(self, model: nn.Module) -> None:
        gen = torch.Generator().manual_seed(1)
        self.tokens = torch.randint(0, V, (B, L), generator=gen)
        self.mask = torch.rand(B, L, generator=gen) > 0.3
        self.mask[2] = False  # a sequence with no scored token
        self.weight = torch.rand(B, L, generator=gen) + 0.5
        self.reward = torch.tensor([1.0, 0, 1, 0, 0, 0, 1, 1])
        self.adv = self.reward - self.reward.view(-1, GROUP).mean(1).repeat_interleave(GROUP)
        with torch.no_grad():
            self.logp_old = _logp(model, self.tokens) + 0.3 * torch.randn(B, L, generator=gen)
        self.micro = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])

    @property
    def scored(self) -> torch.Tensor:
        return self.mask.sum(1).clamp(min=1)

    def grpo(self, logp: torch.Tensor) -> torch.Tensor:
        """-J of grpo (docs/policies.md): seq-mean-token-mean of the clipped surrogate."""
        a = self.adv[:, None]
        r = torch.exp(logp - self.logp_old)
        term = torch.min(r * a, r.clamp(0.8, 1.2) * a) * self.weight * self.mask
        n = (self.mask.sum(1) > 0).sum()
        return -(term.sum(1) / (n * self.scored)).sum()

    def gspo(self, logp: torch.Tensor) -> torch.Tensor:
        """-J of `gspo:eps_low=0.2,eps_high=0.2`: the clip on the sequence ratio s_i."""
        log_s = ((logp - self.logp_old) * self.mask).sum(1) / self.scored
        s, a = torch.exp(log_s)[:, None], self.adv[:, None]
        term = torch.min(s * a, s.clamp(0.8, 1.2) * a) * self.weight * self.mask
        n = (self.mask.sum(1) > 0).sum()
        return -(term.sum(1) / (n * self.scored)).sum()

    def stabledrl(self, logp: torch.Tensor) -> torch.Tensor:
        """-J of stabledrl (level=seq, norm=group): a detached clipped softmax per group."""
        live = self.mask.sum(1) > 0
        log_v = (((logp - self.logp_old) * self.mask).sum(1) / self.scored).detach()
        log_v = torch.where(live, log_v.clamp(max=math.log(5.0)), -math.inf)
        share = torch.softmax(log_v.view(-1, GROUP), 1).reshape(-1)
        groups = live.view(-1, GROUP).any(1).sum()
        elbo = (self.weight * logp * self.mask).sum(1) / self.scored
        return -(share * self.adv * elbo).sum() / groups


LOSSES = {"grpo": "grpo", "stabledrl": "stabledrl", "gspo:eps_low=0.2,eps_high=0.2": "gspo"}


def _backward_norm(model: nn.Module, batch: _Batch, loss: str) -> float:
    """The norm of the policy's gradient, accumulated over the two micro-batches (the step's
    normalisers: each micro-batch's part of the loss, backward a part at a time)."""
    model.zero_grad(set_to_none=True)
    for k in (0, 1):
        logp = _logp(model, batch.tokens)
        keep = (batch.micro == k)[:, None]
        getattr(batch, loss)(torch.where(keep, logp, logp.detach())).backward()
    return float(
        torch.linalg.vector_norm(
            torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
        )
    )


def test_gram_norms_equal_real_backward_norms_of_hand_written_losses(tmp_path):
    model = _model()
    batch = _Batch(model)
    config = GeometryConfig(kind="gram")
    covered = covered_parameters(model, config)
    entry = config.to_manifest(
        [n for n, _ in covered], [p.numel() for _, p in covered], unit="token"
    )
    geometry = capture_geometry(model, _row_logp, [batch.tokens], config, 0)
    truth = {spec: _backward_norm(model, batch, loss) for spec, loss in LOSSES.items()}
    covered_norm = covered_grad_norm(model, config)  # the last backward's: gspo
    with sd.Recorder(tmp_path / "run", policy="gspo:eps_low=0.2,eps_high=0.2", unit="token",
                     geometry=entry) as rec:  # fmt: skip
        rec.log_step(
            0,
            logp=_logp(model, batch.tokens).detach(),
            logp_old=batch.logp_old,
            advantages=batch.adv[:, None].expand(B, L),
            mask=batch.mask,
            loss_weight=batch.weight,
            group_id=torch.arange(B) // GROUP,
            reward=batch.reward,
            micro_batch=batch.micro,
            loss=0.0,
            grad_norm=covered_norm,
            grad_norm_covered=covered_norm,
            **geometry,
        )
    result = sd.replay(tmp_path / "run", list(LOSSES), device="cpu")
    assert result.geometry == "gram"
    replayed = {p.spec: float(p.series["update_norm"][0]) for p in result.policies}
    for spec, norm in truth.items():
        got = replayed[sd.get_policy(spec).spec]
        assert math.isclose(got, norm, rel_tol=1e-6), (spec, got, norm)
    assert len({round(n, 4) for n in truth.values()}) == 3  # three distinct updates
    assert result.own.summary.fidelity <= 1e-6


def _sequence_mean_logp(call, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A sequence's gradient unit in a token run: its scored tokens' mean log-probability."""
    return (_row_logp(call, tokens) * mask).sum() / mask.sum().clamp(min=1)


@pytest.mark.parametrize("kind", ["gram", "sketch"])
def test_per_sequence_geometry_of_a_token_run_is_of_the_mean_scored_logp(tmp_path, kind):
    """docs/run-format.md: in a token run, geometry taken per sequence is of the mean
    log-probability of the sequence's scored tokens, and replay sums each sequence's token
    coefficients. stabledrl's are the same over a sequence (unit loss weights): its replayed
    norm is its real backward's, and not flagged approximate; grpo's (r_t varies) are
    flagged. The gradient of the summed log-probs read 3.6x too large here."""
    model = _model()
    batch = _Batch(model)
    batch.weight = torch.ones(B, L)
    config = GeometryConfig(kind=kind, k=4096, method="exact")
    geometry = capture_geometry(
        model, _sequence_mean_logp, [batch.tokens, batch.mask.float()], config, 0
    )
    truth = _backward_norm(model, batch, "stabledrl")
    with sd.Recorder(tmp_path / "run", policy="stabledrl", unit="token") as rec:
        rec.log_step(
            0,
            logp=_logp(model, batch.tokens).detach(),
            logp_old=batch.logp_old,
            advantages=batch.adv[:, None].expand(B, L),
            mask=batch.mask,
            group_id=torch.arange(B) // GROUP,
            reward=batch.reward,
            loss=0.0,
            grad_norm=1.0,
            **geometry,
        )
    result = sd.replay(tmp_path / "run", ["stabledrl", "grpo"], device="cpu")
    own, grpo = result.policies
    tolerance = 1e-6 if kind == "gram" else 0.05  # k = 4096: 1/sqrt(2k) = 1.1%
    assert math.isclose(float(own.series["update_norm"][0]), truth, rel_tol=tolerance)
    assert not own.summary.update_norm_approximate
    assert grpo.summary.update_norm_approximate


def test_sketch_relative_error_is_about_one_over_sqrt_2k():
    """docs/geometry.md: the replayed norm's relative error is ~ 1/sqrt(2k). Over 200 seeds
    (measured: k=16 0.186, k=64 0.084, k=256 0.044 rms against 0.177, 0.088, 0.044), the rms
    lies within 25% of it and the mean within a few standard errors of 0."""
    model = _model()
    batch = _Batch(model)
    covered = covered_parameters(model, GeometryConfig(kind="sketch"))
    grads = per_unit_gradients(model, _row_logp, [batch.tokens], covered)
    numels = [p.numel() for _, p in covered]
    coef = torch.randn(grads.shape[0], generator=torch.Generator().manual_seed(2))
    true = float(torch.linalg.vector_norm(grads.double().T @ coef.double()))
    for k in (16, 64):
        errors = np.array(
            [
                float(replayed_update_norm(coef, sketch=sketch_from_gradients(grads, numels, s, k)))
                / true
                - 1
                for s in range(200)
            ]
        )
        expected = 1 / math.sqrt(2 * k)
        assert 0.75 * expected < math.sqrt(np.mean(errors**2)) < 1.25 * expected, k
        assert abs(errors.mean()) < 4 * expected / math.sqrt(len(errors)) + 0.5 / k, k


class _BatchNormLM(nn.Module):
    """A token model with a BatchNorm: in training mode its forward updates running stats."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, 8)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, V)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        return self.head(self.norm(h.transpose(1, 2)).transpose(1, 2))


def _batch_logp(call, tokens: torch.Tensor) -> torch.Tensor:
    logits = call(torch.roll(tokens, 1, dims=1))
    return torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0].reshape(-1)


@pytest.mark.parametrize("kind", ["gram", "sketch"])
@pytest.mark.parametrize("form", ["per-row", "batched"])
def test_capture_leaves_the_buffers_of_a_training_batchnorm_alone(kind, form):
    """A BatchNorm in training mode updates its running stats in every forward. Capture raised
    torch's RuntimeError (a traceback in the training loop it observes) after its forwards had
    already moved the model's running_mean, running_var and num_batches_tracked: the next
    training step normalised with other statistics than a run without geometry."""
    torch.manual_seed(0)
    model = _BatchNormLM()
    tokens = torch.randint(0, V, (4, L))
    before = {name: b.clone() for name, b in model.named_buffers()}
    fn = _row_logp if form == "per-row" else BatchLogp(_batch_logp)
    with pytest.raises(UsageError, match="forward updates no buffer"):
        capture_geometry(model, fn, [tokens], GeometryConfig(kind=kind, k=8), 0)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_capture_of_a_batchnorm_in_eval_mode_is_exact():
    """In eval mode the same model's forward updates nothing: captured, the Gram is exact."""
    torch.manual_seed(0)
    model = _BatchNormLM().eval()
    tokens = torch.randint(0, V, (4, L))
    gram = capture_geometry(model, _row_logp, [tokens], GeometryConfig(kind="gram"), 0)
    grads = []
    for row in range(4):
        for t in range(L):
            model.zero_grad(set_to_none=True)
            _logp(model, tokens[row : row + 1])[0, t].backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    stacked = torch.stack(grads)
    torch.testing.assert_close(gram["unit_grad_gram"], stacked @ stacked.T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_covered_grad_norm_of_half_precision_gradients_is_their_norm(dtype):
    """`grad_norm_covered` of bfloat16 gradients was their norm rounded to bfloat16 (5e-4 off
    here, 0.93124 for 0.93075), which replay's `fidelity` then read as the geometry's error."""
    torch.manual_seed(0)
    model = nn.Linear(300, 300).to(dtype)
    model(torch.randn(7, 300).to(dtype)).float().square().sum().mul(1e-3).backward()
    true = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters()))
    got = covered_grad_norm(model, GeometryConfig(kind="gram"))
    assert math.isclose(got, true, rel_tol=1e-5), (got, true)  # float32 sums: 2e-6


def test_ranks_sketches_join_with_each_ranks_scale_whatever_their_dtype(tmp_path):
    """A rank's `unit_grad_sketch_scale` multiplies its sketch, float32 or float16, as a
    one-rank run reads it (`decode_geometry`). The join of two ranks applied the scales only
    when some part was float16: two float32 parts of scale 10 read 10x too small, and a
    float32 part beside a float16 one lost its scale alone."""
    gen = torch.Generator().manual_seed(3)
    parts = [torch.randn(2, 3, generator=gen), torch.randn(2, 3, generator=gen)]
    scales = (10.0, 4.0)
    expected = {}
    for dtypes in ((torch.float32, torch.float32), (torch.float32, torch.float16)):
        path = tmp_path / "-".join(str(d) for d in dtypes)
        recorders = [
            sd.Recorder(path, unit="sequence", policy="is", world_size=2, rank=r) for r in range(2)
        ]
        for rank, recorder in enumerate(recorders):
            recorder.log_step(
                0,
                logp=[-1.0, -1.2],
                logp_old=[-1.1, -1.0],
                advantages=[1.0, -0.5],
                unit_grad_sketch=parts[rank].to(dtypes[rank]),
                unit_grad_sketch_scale=scales[rank],
            )
            recorder.close()
        joined = torch.cat(
            [p.to(d).float() * s for p, d, s in zip(parts, dtypes, scales, strict=True)]
        )
        step = sd.open_run(path).step(0)
        torch.testing.assert_close(step["unit_grad_sketch"], joined)
        assert "unit_grad_sketch_scale" not in step.scalars
        result = sd.replay(path, ["is"], device="cpu")
        expected[dtypes] = float(result.own.series["update_norm"][0])
        coef = (
            sd.get_policy("is")
            .weights(
                sd.PolicyBatch(
                    logp=torch.tensor([-1.0, -1.2, -1.0, -1.2]),
                    logp_old=torch.tensor([-1.1, -1.0, -1.1, -1.0]),
                    advantages=torch.tensor([1.0, -0.5, 1.0, -0.5]),
                    unit="sequence",
                )
            )
            .coef
        )
        want = float(replayed_update_norm(coef, sketch=joined))
        assert math.isclose(expected[dtypes], want, rel_tol=1e-6), (dtypes, expected, want)


class _TiedHead(nn.Module):
    """An embedding whose output layer shares its weight, as many language models tie them."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.body = nn.Linear(3, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight


@pytest.mark.parametrize("pattern", ["head.weight", "head.*", "embed.weight"])
def test_a_tied_weight_is_covered_by_any_of_its_names(pattern: str) -> None:
    """`--geometry-params 'head.weight'` on a model whose head is tied to its embedding covers
    that one weight (named once, by its first name, as `named_parameters()` names it). Before,
    the pattern was refused as matching no trainable parameter: only the first name was
    matched."""
    model = _TiedHead()
    covered = covered_parameters(model, GeometryConfig(kind="gram", params=(pattern,)))
    assert [(name, p is model.embed.weight) for name, p in covered] == [("embed.weight", True)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_covered_grad_norm_of_a_model_split_across_devices() -> None:  # pragma: no cover
    """A model whose layers sit on different devices (a pipeline, a `device_map`): the norm of
    their gradients as `clip_grad_norm_` takes it, each parameter's norm moved to the first
    one's device. Before, stacking norms of two devices raised torch's RuntimeError inside the
    training loop."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1).cuda())
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    expected = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
    assert covered_grad_norm(model, GeometryConfig(kind="gram")) == pytest.approx(expected)


@pytest.mark.parametrize("coef", [torch.tensor(1.0), torch.ones(2, 2, 3)])
def test_replayed_update_norm_refuses_coefficients_of_another_shape(coef: torch.Tensor) -> None:
    """`coef` is [U] or [B, U]: a 0-d tensor raised IndexError, a 3-d one was taken as a batch
    of batches; both are a UsageError naming the shapes it takes."""
    gram = torch.eye(3)
    with pytest.raises(UsageError, match=r"coef must be \[U\] or \[B, U\]"):
        replayed_update_norm(coef, gram=gram)
