"""Gradient geometry capture: Gram and sketch against plain autograd on a tiny masked LM."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from stabledrl_cli.capture import _omega
from stabledrl_cli.capture.geometry import (
    BatchLogp,
    GeometryConfig,
    GeometryWarning,
    capture_geometry,
    covered_grad_norm,
    covered_parameters,
    encode_geometry,
    jvp_sketch,
    per_unit_gradients,
    sketch_from_gradients,
)
from stabledrl_cli.errors import InputError, UsageError
from stabledrl_cli.geometry import decode_geometry, replayed_update_norm

# torch's own forward-AD decompositions still call torch.jit.script when first loaded.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

VOCAB, LENGTH, MASK_ID = 7, 5, 6


def sketch_matrix(covered, seed: int, k: int) -> torch.Tensor:
    """Omega as one `[P_covered, k]` float32 matrix (unscaled), from its per-parameter factors."""
    numels = tuple(p.numel() for _, p in covered)
    factors = _omega.omega_factors(seed, numels, k, covered[0][1].device)
    return torch.cat([factors.rows(i) for i in range(len(numels))], dim=1).T.contiguous()


class TinyLM(nn.Module):
    """One bidirectional attention block and an LM head: [B, L] token ids -> [B, L, V]."""

    def __init__(self, d: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(0.1 * torch.randn(LENGTH, d))
        self.qkv = nn.Linear(d, 3 * d)
        self.norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        h = self.norm(h + self.drop(att @ v))
        return self.head(torch.tanh(h))


def make_batch(n_seq: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens [N, L], masked input [N, L], scored-position mask [N, L] (float)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, MASK_ID, (n_seq, LENGTH), generator=gen)
    mask = torch.rand(n_seq, LENGTH, generator=gen) < 0.5
    mask[:, 0] = True  # every sequence scores at least one position
    masked = torch.where(mask, torch.full_like(tokens, MASK_ID), tokens)
    return tokens, masked, mask.float()


def seq_logp(call, tokens, masked, mask):
    """Per-unit (sequence) ELBO-style log-likelihood: mean log-prob of the masked positions."""
    logits = call(masked[None])[0]
    lp = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None])[:, 0]
    return (lp * mask).sum() / mask.sum().clamp(min=1)


def token_logp(call, tokens, masked):
    """Batched token units: the log-prob of every position, [N * L]."""
    logits = call(masked)
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).reshape(-1)


def batch_seq_logp(model, tokens, masked, mask):
    """The same per-sequence log-likelihoods by an ordinary forward: [N]."""
    lp = torch.log_softmax(model(masked), dim=-1).gather(-1, tokens[..., None])[..., 0]
    return (lp * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def reference_gradients(model, covered, unit_values) -> torch.Tensor:
    """G by a plain loop of torch.autograd.grad, one unit at a time: [U, P]."""
    params = [p for _, p in covered]
    rows = []
    for u in range(unit_values(model).shape[0]):
        value = unit_values(model)[u]
        grads = torch.autograd.grad(value, params, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1)
                    for g, p in zip(grads, params, strict=True)
                ]
            )
        )
    return torch.stack(rows)


def real_update_norm(model, covered, unit_values, coef) -> torch.Tensor:
    """The norm of the autograd gradient of sum_u coef_u logp_u over the covered params."""
    params = [p for _, p in covered]
    grads = torch.autograd.grad((coef * unit_values(model)).sum(), params, allow_unused=True)
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g) for g in grads if g is not None])
    )


@pytest.fixture
def model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


def test_gram_equals_loop_reference(model):
    tokens, masked, mask = make_batch()
    config = GeometryConfig(kind="gram", chunk_size=4)  # 6 units: one full chunk, one partial
    covered = covered_parameters(model, config)
    arrays = capture_geometry(model, seq_logp, (tokens, masked, mask), config, step=0)
    assert set(arrays) == {"unit_grad_gram"}
    gram = arrays["unit_grad_gram"]
    assert gram.dtype == torch.float32 and gram.shape == (6, 6)
    ref = reference_gradients(model, covered, lambda m: batch_seq_logp(m, tokens, masked, mask))
    torch.testing.assert_close(gram, ref @ ref.T, rtol=1e-5, atol=1e-6)
    grads = per_unit_gradients(model, seq_logp, (tokens, masked, mask), covered, chunk_size=4)
    torch.testing.assert_close(grads, ref, rtol=1e-5, atol=1e-6)

    # Code written against functional_call(model, params, ...) gets the mapping as call.params.
    def params_style(call, tokens, masked, mask):
        logits = torch.func.functional_call(model, call.params, (masked[None],))[0]
        lp = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None])[:, 0]
        return (lp * mask).sum() / mask.sum().clamp(min=1)

    again = per_unit_gradients(model, params_style, (tokens, masked, mask), covered)
    torch.testing.assert_close(again, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("params", [None, ("head.*", "norm.weight")])
def test_replayed_norm_equals_real_backward(model, params):
    tokens, masked, mask = make_batch(n_seq=8, seed=3)
    config = GeometryConfig(kind="gram", params=params)
    covered = covered_parameters(model, config)
    gram = capture_geometry(model, seq_logp, (tokens, masked, mask), config, step=0)[
        "unit_grad_gram"
    ]
    gen = torch.Generator().manual_seed(7)
    coefs = torch.randn(5, 8, generator=gen)
    coefs[1] -= coefs[1].mean()  # centered advantages: the update partly cancels
    replayed = replayed_update_norm(coefs, gram=gram)
    assert replayed.shape == (5,)
    for coef, norm in zip(coefs, replayed, strict=True):
        real = real_update_norm(
            model, covered, lambda m: batch_seq_logp(m, tokens, masked, mask), coef
        )
        torch.testing.assert_close(norm, real, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(replayed_update_norm(coefs[0], gram=gram), replayed[0])


def test_sketch_exact_matches_jvp(model):
    tokens, masked, mask = make_batch()
    inputs = (tokens, masked, mask)
    covered = covered_parameters(model, GeometryConfig())
    exact = capture_geometry(
        model, seq_logp, inputs, GeometryConfig(kind="sketch", k=40, method="exact"), step=0
    )["unit_grad_sketch"]
    jvp = capture_geometry(
        model,
        seq_logp,
        inputs,
        GeometryConfig(kind="sketch", k=40, method="jvp", chunk_size=16),  # 40: partial block
        step=0,
    )["unit_grad_sketch"]
    assert exact.shape == jvp.shape == (6, 40)
    torch.testing.assert_close(jvp, exact, rtol=1e-4, atol=1e-5)
    # Both are G Omega / sqrt(k) with the materialized Omega.
    ref = reference_gradients(model, covered, lambda m: batch_seq_logp(m, tokens, masked, mask))
    omega = sketch_matrix(covered, seed=0, k=40)
    torch.testing.assert_close(exact, ref @ omega / math.sqrt(40), rtol=1e-4, atol=1e-5)


def test_jvp_sketch_token_units(model):
    tokens, masked, _ = make_batch(n_seq=3)
    covered = covered_parameters(model, GeometryConfig(params=("head.*", "qkv.*")))
    batch = BatchLogp(token_logp)
    grads = per_unit_gradients(model, batch, (tokens, masked), covered, chunk_size=4)
    numels = [p.numel() for _, p in covered]
    exact = sketch_from_gradients(grads, numels, seed=5, k=24)
    jvp = jvp_sketch(model, batch, (tokens, masked), covered, seed=5, k=24, chunk_size=8)
    torch.testing.assert_close(jvp, exact, rtol=1e-4, atol=1e-5)


def test_sketch_norm_error_follows_one_over_sqrt_2k(model):
    tokens, masked, mask = make_batch(n_seq=8, seed=4)
    covered = covered_parameters(model, GeometryConfig())
    grads = per_unit_gradients(model, seq_logp, (tokens, masked, mask), covered)
    numels = [p.numel() for _, p in covered]
    coef = torch.randn(8, generator=torch.Generator().manual_seed(2))
    true = torch.linalg.vector_norm(coef @ grads)
    median_err = {}
    for k in (64, 256):
        errors = [
            float(
                (
                    replayed_update_norm(coef, sketch=sketch_from_gradients(grads, numels, s, k))
                    - true
                ).abs()
                / true
            )
            for s in range(120)
        ]
        median_err[k] = float(torch.tensor(errors).median())
        # ||S^T c||^2 / ||g||^2 ~ chi2(k)/k: the relative norm error is ~ |N(0, 1/(2k))|,
        # whose median is 0.674 / sqrt(2k).
        theory = 0.674 / math.sqrt(2 * k)
        assert 0.6 * theory < median_err[k] < 1.5 * theory, (k, median_err[k], theory)
    assert median_err[256] < 0.10
    assert 1.4 < median_err[64] / median_err[256] < 2.9


def test_per_layer_coverage_and_covered_grad_norm(model):
    tokens, masked, mask = make_batch()
    config = GeometryConfig(kind="gram", params=("head.*",))
    covered = covered_parameters(model, config)
    assert [n for n, _ in covered] == ["head.weight", "head.bias"]
    assert (
        config.to_manifest([n for n, _ in covered], [p.numel() for _, p in covered])[
            "covered_numel"
        ]
        == 8 * VOCAB + VOCAB
    )
    grads = per_unit_gradients(model, seq_logp, (tokens, masked, mask), covered)
    assert grads.shape == (6, 8 * VOCAB + VOCAB)

    model.zero_grad()
    loss = -batch_seq_logp(model, tokens, masked, mask).mean()
    loss.backward()
    manual = math.sqrt(sum(float((p.grad**2).sum()) for _, p in covered))
    assert covered_grad_norm(model, config) == pytest.approx(manual, rel=1e-6)
    everything = GeometryConfig(kind="gram")
    all_norm = covered_grad_norm(model, everything)
    assert all_norm > manual
    clipped = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)
    assert all_norm == pytest.approx(float(clipped), rel=1e-6)

    with pytest.raises(UsageError, match="matches no trainable parameter"):
        covered_parameters(model, GeometryConfig(params=("lm_head.*",)))
    model.head.bias.requires_grad_(False)
    assert [n for n, _ in covered_parameters(model, config)] == ["head.weight"]


def test_global_rng_untouched_and_omega_seeded(model):
    tokens, masked, mask = make_batch()
    covered = covered_parameters(model, GeometryConfig())
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    for config in (
        GeometryConfig(kind="gram"),
        GeometryConfig(kind="sketch", k=32, method="exact", seed=9),
        GeometryConfig(kind="sketch", k=32, method="jvp", seed=9),
    ):
        capture_geometry(model, seq_logp, (tokens, masked, mask), config, step=0)
    capture_geometry(
        model, BatchLogp(token_logp), (tokens, masked), GeometryConfig(kind="gram"), step=0
    )
    assert torch.equal(torch.random.get_rng_state(), before)

    first = sketch_matrix(covered, seed=9, k=40)

    _omega.omega_factors.cache_clear()  # regenerate, not just return the memo
    torch.manual_seed(999)  # the global RNG plays no part
    again = sketch_matrix(covered, seed=9, k=40)
    assert torch.equal(first, again)
    assert not torch.equal(first, sketch_matrix(covered, seed=10, k=40))
    # A narrower sketch is the first columns of a wider one with the same seed.
    assert torch.equal(sketch_matrix(covered, seed=9, k=20), first[:, :20])
    assert torch.equal(torch.random.get_rng_state(), torch.manual_seed(999).get_state())


def test_float16_storage_needs_and_uses_a_scale(model):
    big = torch.tensor([[3.0e5, -1.0e5], [2.0, float("nan")]])
    assert torch.isinf(big.half()).any()  # plain float16 overflows
    stored, scale = encode_geometry(big, "float16")
    assert stored.dtype == torch.float16 and scale is not None and scale.ndim == 0
    assert torch.isfinite(stored[0]).all() and torch.isnan(stored[1, 1])
    torch.testing.assert_close(
        decode_geometry(stored, scale), big, rtol=1e-3, atol=1e-3 * 3e5, equal_nan=True
    )
    with pytest.raises(InputError, match="without its per-step scale"):
        decode_geometry(stored)
    with pytest.raises(InputError, match="without its per-step scale"):
        replayed_update_norm(torch.ones(2), sketch=stored)

    # Large gradients (a spike step): a log-likelihood scaled by 1e6 has gradients >> 65504.
    def spiky_logp(call, tokens, masked, mask):
        return 1.0e6 * seq_logp(call, tokens, masked, mask)

    inputs = make_batch()
    config = GeometryConfig(kind="sketch", k=64, method="exact", storage_dtype="float16")
    arrays = capture_geometry(model, spiky_logp, inputs, config, step=0)
    assert set(arrays) == {"unit_grad_sketch", "unit_grad_sketch_scale"}
    full = capture_geometry(model, spiky_logp, inputs, GeometryConfig(kind="sketch", k=64), step=0)[
        "unit_grad_sketch"
    ]
    assert full.abs().max() > 65504
    restored = decode_geometry(arrays["unit_grad_sketch"], arrays["unit_grad_sketch_scale"])
    assert torch.isfinite(restored).all()
    torch.testing.assert_close(restored, full, rtol=2e-3, atol=2e-3 * float(full.abs().max()))


def test_token_units_batch_function_and_gram_fallback(model):
    tokens, masked, _ = make_batch(n_seq=3)
    batch = BatchLogp(token_logp)
    config = GeometryConfig(kind="gram", params=("head.*", "qkv.weight"), chunk_size=4)
    covered = covered_parameters(model, config)
    gram = capture_geometry(model, batch, (tokens, masked), config, step=0)["unit_grad_gram"]
    assert gram.shape == (3 * LENGTH, 3 * LENGTH)
    unit_values = lambda m: token_logp(m, tokens, masked)  # noqa: E731
    ref = reference_gradients(model, covered, unit_values)
    torch.testing.assert_close(gram, ref @ ref.T, rtol=1e-5, atol=1e-6)
    coef = torch.randn(3 * LENGTH, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        replayed_update_norm(coef, gram=gram),
        real_update_norm(model, covered, unit_values, coef),
        rtol=1e-4,
        atol=1e-7,
    )

    # The same token units as a per-row function ([L] units per sequence, row-major) give the
    # same Gram without a backward pass of the whole batch per token.
    def row_tokens(call, tokens, masked):
        return token_logp(call, tokens[None], masked[None])

    per_row = capture_geometry(model, row_tokens, (tokens, masked), config, step=0)
    torch.testing.assert_close(per_row["unit_grad_gram"], gram, rtol=1e-5, atol=1e-6)
    exact = capture_geometry(
        model, row_tokens, (tokens, masked), GeometryConfig(kind="sketch", k=24, method="exact"), 0
    )["unit_grad_sketch"]
    jvp = capture_geometry(
        model, row_tokens, (tokens, masked), GeometryConfig(kind="sketch", k=24, method="jvp"), 0
    )["unit_grad_sketch"]
    assert exact.shape == (3 * LENGTH, 24)
    torch.testing.assert_close(jvp, exact, rtol=1e-4, atol=1e-5)

    small = GeometryConfig(kind="gram", max_gram_units=10, k=32)
    with pytest.warns(GeometryWarning, match="15 units exceed max_gram_units=10"):
        arrays = capture_geometry(model, batch, (tokens, masked), small, step=0)
    assert set(arrays) == {"unit_grad_sketch"} and arrays["unit_grad_sketch"].shape == (15, 32)
    manifest = small.to_manifest(["a"], [3], unit="token")
    assert manifest["max_gram_units"] == 10 and manifest["sketch"]["k"] == 32
    assert manifest["unit"] == "token"


def test_every_and_none(model):
    tokens, masked, mask = make_batch()
    inputs = (tokens, masked, mask)
    assert capture_geometry(model, seq_logp, inputs, GeometryConfig(), step=0) == {}
    every = GeometryConfig(kind="gram", every=3)
    assert capture_geometry(model, seq_logp, inputs, every, step=4) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "unit_grad_gram" in capture_geometry(model, seq_logp, inputs, every, step=6)


def test_bad_config_and_inputs_are_usage_errors(model):
    with pytest.raises(UsageError, match="valid: gram, sketch, none"):
        GeometryConfig(kind="hessian")
    with pytest.raises(UsageError, match="valid: auto, exact, jvp"):
        GeometryConfig(kind="sketch", method="fast")
    with pytest.raises(UsageError, match="valid: float32, float16"):
        GeometryConfig(storage_dtype="bfloat16")
    with pytest.raises(UsageError, match="k must be an integer >= 1"):
        GeometryConfig(k=0)
    with pytest.raises(UsageError, match="seed"):
        GeometryConfig(seed=-1)
    with pytest.raises(UsageError, match="a Gram matrix is stored as float32"):
        GeometryConfig(kind="gram", storage_dtype="float16")
    assert GeometryConfig(params=["head.*"]).params == ("head.*",)

    tokens, masked, mask = make_batch()
    config = GeometryConfig(kind="gram")
    with pytest.raises(UsageError, match="disagree on the number of units"):
        capture_geometry(model, seq_logp, (tokens, masked[:3], mask), config, step=0)
    with pytest.raises(UsageError, match="0-d tensor"):
        capture_geometry(
            model, lambda call, t, m, k: call(m[None])[0], (tokens, masked, mask), config, 0
        )
    with pytest.raises(UsageError, match="exactly one of gram or sketch"):
        replayed_update_norm(torch.ones(2))
    with pytest.raises(UsageError, match="coef has 3 units"):
        replayed_update_norm(torch.ones(3), gram=torch.eye(2))


def test_dropout_in_training_mode_is_refused():
    torch.manual_seed(0)
    model = TinyLM(dropout=0.1).train()
    tokens, masked, mask = make_batch()
    before = torch.random.get_rng_state()
    with pytest.raises(UsageError, match="deterministic model"):
        capture_geometry(model, seq_logp, (tokens, masked, mask), GeometryConfig(kind="gram"), 0)
    assert torch.equal(torch.random.get_rng_state(), before)
    model.eval()
    assert capture_geometry(
        model, seq_logp, (tokens, masked, mask), GeometryConfig(kind="gram"), 0
    )["unit_grad_gram"].shape == (6, 6)


def test_nonfinite_gradients_propagate(model):
    tokens, masked, mask = make_batch()
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    gram = capture_geometry(model, seq_logp, (tokens, masked, mask), GeometryConfig(kind="gram"), 0)
    assert torch.isnan(gram["unit_grad_gram"]).any()
    assert torch.isnan(replayed_update_norm(torch.ones(6), gram=gram["unit_grad_gram"]))


def test_manifest_entry():
    config = GeometryConfig(kind="sketch", k=128, seed=3, params=("head.*",))
    entry = config.to_manifest(["head.weight", "head.bias"], [56, 7], unit="sequence")
    assert entry["kind"] == "sketch" and entry["covered_numel"] == 63
    assert entry["covered"] == [
        {"name": "head.weight", "numel": 56},
        {"name": "head.bias", "numel": 7},
    ]
    assert entry["sketch"]["seed"] == 3 and entry["sketch"]["k"] == 128
    assert entry["sketch"]["adds_across_ranks"] and not entry["gram_adds_across_ranks"]
    assert entry["params"] == ["head.*"] and entry["unit"] == "sequence"
    assert "sketch" not in GeometryConfig().to_manifest(["w"], [1])


def test_blocked_product_is_the_decoded_product_and_the_replays_norm(monkeypatch):
    """geometry_product widens a stored sketch a block at a time (here 64 rows, the last block
    40) and scales the product: the decoded matrix's product within float32 rounding, a NaN entry
    reaching every product of its column; the replay's norms equal replayed_update_norm's."""
    from stabledrl_cli import geometry
    from stabledrl_cli.policies import PolicyBatch, prepare
    from stabledrl_cli.replay.step_geometry import StepGeometry

    generator = torch.Generator().manual_seed(3)
    units, k = 1000, 12
    dense = torch.randn(units, k, generator=generator) * 3.0e5
    stored, scale = encode_geometry(dense, "float16")
    coef = torch.randn(4, units, generator=generator)
    monkeypatch.setattr(geometry, "PRODUCT_BLOCK_BYTES", 64 * k * 4)
    expected = coef.double() @ decode_geometry(stored, scale).double()
    products = geometry.geometry_product(coef, stored, scale)
    assert products.dtype == torch.float32 and products.shape == (4, k)
    torch.testing.assert_close(products.double(), expected, rtol=1e-5, atol=1e-5 * 3.0e5)
    one = geometry.geometry_product(coef[1], stored, scale)  # a [U] coefficient vector
    torch.testing.assert_close(one.double(), expected[1], rtol=1e-5, atol=1e-5 * 3.0e5)
    gram, wide = dense[:50] @ dense[:50].T, coef[:, :50].double()
    torch.testing.assert_close(geometry.geometry_product(wide, gram), wide @ gram.double())
    poisoned = stored.clone()
    poisoned[700, 5] = math.nan
    hit = geometry.geometry_product(coef, poisoned, scale)
    assert torch.isnan(hit[:, 5]).all() and torch.isfinite(hit[:, :5]).all()

    batch = prepare(
        PolicyBatch(
            logp=torch.zeros(units),
            logp_old=torch.zeros(units),
            advantages=torch.ones(units),
            unit="sequence",
        )
    )
    step = StepGeometry.from_arrays(None, stored, float(scale), batch, step=0)
    norms, _ = step.measure(coef, None, 4)
    assert torch.equal(norms, replayed_update_norm(coef, sketch=stored, scale=scale).double())


def test_exact_sketch_generates_omega_a_chunk_at_a_time(monkeypatch):
    """Without Omega kept whole, a parameter's factor [k, n_i] (k / U times its per-unit
    gradients) is generated in chunks: measured before, a 64-unit exact sketch of 527k
    parameters at k = 512 peaked at 2,485 MiB, 693 MiB since."""
    grads = torch.randn(4, 300)
    numels = (200, 100)
    _omega.omega_factors.cache_clear()
    whole = sketch_from_gradients(grads, numels, seed=3, k=96)
    generated: list[int] = []
    rows = _omega.omega_rows

    def counted(seed, param_index, numel, start, stop, device):
        generated.append((stop - start) * numel * 4)
        return rows(seed, param_index, numel, start, stop, device)

    monkeypatch.setattr(_omega, "OMEGA_CACHE_BYTES", 0)
    monkeypatch.setattr(_omega, "OMEGA_CHUNK_BYTES", 32 * 200 * 4, raising=False)
    monkeypatch.setattr(_omega, "omega_rows", counted)
    _omega.omega_factors.cache_clear()
    chunked = sketch_from_gradients(grads, numels, seed=3, k=96)
    _omega.omega_factors.cache_clear()
    assert max(generated) <= 32 * 200 * 4
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
