"""Per-unit gradient geometry of one optimizer step: an exact Gram matrix or a Gaussian sketch.

A policy gives each unit u (a token, or a sequence when the log-likelihood is a sequence-level
ELBO) a coefficient c_u = dJ/dlogp_u, so its update is g = sum_u c_u grad_theta(logp_u) = G^T c
with G: [U, P] the per-unit gradients over the covered parameters. Recording the geometry of G
once lets a replay compute ||g|| for any policy offline:
- `gram`: K = G G^T, `unit_grad_gram: [U, U]`, ||g|| = sqrt(c^T K c), exact. Per-unit gradients
  come from `torch.func` (`vmap(grad(...))` over `functional_call`) in chunks of units. K is
  O(U^2): above `max_gram_units` units (2048 by default, e.g. token units of a big batch) a
  requested gram switches to a sketch, with a warning; the manifest records the threshold.
- `sketch`: S = G Omega / sqrt(k), `unit_grad_sketch: [U, k]`, ||g|| ~= ||S^T c|| with relative
  error ~ 1/sqrt(2k) (||S^T c||^2 / ||g||^2 is chi-square(k) / k). Omega is a seeded Gaussian
  (see `_omega.py`), shared by every rank, so per-rank sketches add across ranks (per-rank
  Grams do not). Method `exact` multiplies exact per-unit gradients by Omega; `jvp` uses
  forward-mode JVPs along Omega's columns and never forms G (for models where [U, P] does not
  fit); `auto` picks `exact` while the float32 [U, P] matrix fits `EXACT_SKETCH_BYTES`.

Units are described by one of two kinds of log-likelihood function, both called with a
`module_call` (`ModuleCall`) that behaves like `model(*args, **kwargs)` with the covered
parameters swapped in, and whose `.params` is that full name -> tensor mapping:
- per-row (a plain callable): `unit_logp(module_call, *one_row_inputs)`, vmapped over dim 0 of
  every tensor of `unit_inputs` (the model sees one row without its batch dim: call it as
  `module_call(x[None])[0]`). It returns a 0-d tensor (the row is one unit: a sequence ELBO)
  or `[m]` (m units per row, the same m for every row: a sequence's scored tokens); units are
  numbered row-major. Per-unit gradients: `vmap(grad)`, or `vmap(jacrev)` of each row alone.
  This is the fast form whenever rows are independent (no attention across the batch).
- batched (`BatchLogp(fn)`): `fn(module_call, *batch_inputs) -> [U]`, one forward for all
  units, per-unit gradients by vmap over vjp of the whole batch in chunks of units. General,
  but each unit costs a backward pass of the whole batch (~U x a step): prefer per-row.
Both must be deterministic functions of their inputs: random masks (a dLLM's Monte Carlo
masks) are inputs, and the model must have no active dropout (`model.eval()`, or dropout 0).
A random op inside is refused (usage error) rather than consuming the training RNG. Nor may
the forward update buffers (BatchNorm in training mode): refused too (usage error), the
capture's forwards running on copies of the buffers, so the model's keep their values.

Capture at the parameters the step's backward used (before `optimizer.step()`). Nothing here
touches `.grad`, the autograd graph of the real parameters or the global RNG.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Literal

import torch
from torch import nn

from stabledrl_cli.capture._omega import OMEGA_BLOCK_ROWS

# The unit-function forms and the gradient maths are this module's API too (module docstring).
from stabledrl_cli.capture._unit_gradients import BatchLogp as BatchLogp
from stabledrl_cli.capture._unit_gradients import ModuleCall as ModuleCall
from stabledrl_cli.capture._unit_gradients import UnitFn as UnitFn
from stabledrl_cli.capture._unit_gradients import count_units
from stabledrl_cli.capture._unit_gradients import jvp_sketch as jvp_sketch
from stabledrl_cli.capture._unit_gradients import per_unit_gradients as per_unit_gradients
from stabledrl_cli.capture._unit_gradients import sketch_from_gradients as sketch_from_gradients
from stabledrl_cli.dump._schema import GRAM_KEY, SKETCH_KEY
from stabledrl_cli.errors import ConfigError, UsageError
from stabledrl_cli.vocab import (
    GEOMETRY_KINDS,
    SKETCH_METHODS,
    GeometryDtype,
    GeometryKind,
    SketchMethod,
)

CaptureKind = GeometryKind | Literal["none"]
"""What a run records: a gram, a sketch, or no geometry."""
CAPTURE_KINDS: tuple[CaptureKind, ...] = (*GEOMETRY_KINDS, "none")
STORAGE_DTYPES: dict[GeometryDtype, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
}
# `auto` forms exact per-unit gradients while the float32 [U, P] matrix stays under 1 GiB;
# beyond it the JVP path, whose memory does not grow with U * P.
EXACT_SKETCH_BYTES = 1 << 30


class GeometryWarning(UserWarning):
    """Geometry capture changed what was asked for (a gram too large became a sketch)."""


MAX_SKETCH_K = 8192
"""The widest sketch: 16 times the widest sensible one (a wider k reached native code that
aborted the process)."""


@dataclass(frozen=True, kw_only=True)
class GeometryConfig:
    """What gradient geometry a run records, and how."""

    kind: CaptureKind = "none"
    """"gram" (exact U x U), "sketch" (U x k) or "none"."""
    every: int = 1
    """Capture on steps where step % every == 0."""
    k: int = 256
    """Sketch width; the replayed norm's relative error is ~ 1/sqrt(2k) (64..512 sensible, at
    most `MAX_SKETCH_K`)."""
    seed: int = 0
    """Omega seed; the same on every rank so sketches add across ranks."""
    params: tuple[str, ...] | None = None
    """Covered parameter name patterns (fnmatch, any may match), or None = all trainable."""
    method: SketchMethod = "auto"
    """Sketch: "exact" (per-unit grads @ Omega), "jvp", or "auto" (exact while [U, P] fits)."""
    storage_dtype: GeometryDtype = "float32"
    """"float32", or "float16" for sketches only, always with a per-step scale (plain float16
    overflows on spike steps; the run format has no Gram scale)."""
    max_gram_units: int = 2048
    """Above this many units a requested gram is captured as a sketch (K is O(U^2))."""
    chunk_size: int = 64
    """Units per vmap chunk (per-unit gradients); Omega columns per chunk (JVP sketch).
    64 measured faster than 16 on the example (benchmarks/geometry_cost.py); it bounds memory
    at chunk_size x P floats of per-unit gradients."""

    def __post_init__(self) -> None:
        if self.kind not in CAPTURE_KINDS:
            raise UsageError(
                f"unknown geometry kind {self.kind!r}; valid: {', '.join(CAPTURE_KINDS)}"
            )
        if self.method not in SKETCH_METHODS:
            raise UsageError(
                f"unknown sketch method {self.method!r}; valid: {', '.join(SKETCH_METHODS)}"
            )
        if self.storage_dtype not in STORAGE_DTYPES:
            raise UsageError(
                f"unknown geometry storage dtype {self.storage_dtype!r}; "
                f"valid: {', '.join(STORAGE_DTYPES)}"
            )
        if self.kind == "gram" and self.storage_dtype != "float32":
            # The run format has a per-step scale for sketches only (unit_grad_sketch_scale).
            raise UsageError(
                "float16 geometry storage is for sketches (unit_grad_sketch_scale); a Gram matrix "
                "is stored as float32"
            )
        for name in ("every", "k", "max_gram_units", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"geometry {name}", f"must be an integer >= 1, got {value!r}")
        if self.k > MAX_SKETCH_K:
            raise ConfigError(
                "geometry k",
                f"must be at most {MAX_SKETCH_K} (a relative error of 0.8%), got {self.k}",
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError("geometry seed", f"must be an integer >= 0, got {self.seed!r}")
        if self.seed >= 1 << 64:
            raise ConfigError("geometry seed", f"must be below 2**64, got {self.seed}")
        if self.params is not None:
            if isinstance(self.params, str):
                object.__setattr__(self, "params", (self.params,))
            else:
                object.__setattr__(self, "params", tuple(self.params))
            if not self.params or not all(isinstance(p, str) and p for p in self.params):
                raise UsageError("geometry params must be non-empty name patterns, or None (all)")

    def to_manifest(
        self,
        covered_names: Sequence[str],
        covered_numel: Sequence[int],
        *,
        unit: str | None = None,
        device_type: str = "cpu",
    ) -> dict[str, Any]:
        """The run manifest's `geometry` entry: settings, Omega recipe, covered parameters.

        covered_names, covered_numel: one entry per covered parameter, in covered order.
        unit: "token" or "sequence" when known; device_type: where Omega was generated.
        """
        if len(covered_names) != len(covered_numel):
            raise UsageError("covered_names and covered_numel differ in length")
        entry: dict[str, Any] = {
            "kind": self.kind,
            "every": self.every,
            "storage_dtype": self.storage_dtype,
            "storage_scale": self.storage_dtype == "float16",
            "params": list(self.params) if self.params is not None else None,
            "covered": [
                {"name": n, "numel": int(c)}
                for n, c in zip(covered_names, covered_numel, strict=True)
            ],
            "covered_numel": int(sum(int(c) for c in covered_numel)),
            "chunk_size": self.chunk_size,
        }
        if unit is not None:
            entry["unit"] = unit
        if self.kind == "none":
            return entry
        entry["max_gram_units"] = self.max_gram_units
        # A gram above max_gram_units is stored as a sketch, so the sketch recipe is always there.
        entry["sketch"] = {
            "k": self.k,
            "seed": self.seed,
            "method": self.method,
            "scaling": "1/sqrt(k)",
            "omega": "N(0,1); per covered parameter i (covered order) and block b of "
            f"{OMEGA_BLOCK_ROWS} columns, torch.Generator(device).manual_seed("
            "splitmix64(splitmix64(splitmix64(seed) ^ i) ^ b)), randn(block, numel_i)",
            "omega_device_type": device_type,
            "adds_across_ranks": True,
        }
        entry["gram_adds_across_ranks"] = False
        return entry


def covered_parameters(model: nn.Module, config: GeometryConfig) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters the geometry covers, in module order (`named_parameters()`).

    A pattern of `config.params` matches a parameter by any of its names: a weight tied to
    another (a language model's output layer and its embedding) is covered once, under its
    first name, whichever name a pattern gives. A pattern that matches no trainable parameter
    is a usage error (a typo would otherwise silently shrink the coverage).
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if config.params is None:
        covered = trainable
    else:
        names_of: dict[int, list[str]] = {}
        for name, parameter in model.named_parameters(remove_duplicate=False):
            names_of.setdefault(id(parameter), []).append(name)
        aliases = [names_of[id(p)] for _, p in trainable]
        for pattern in config.params:
            if not any(fnmatchcase(n, pattern) for names in aliases for n in names):
                names = ", ".join(n for n, _ in trainable[:12])
                more = " ..." if len(trainable) > 12 else ""
                raise UsageError(
                    f"geometry parameter pattern {pattern!r} matches no trainable parameter; "
                    f"names are like: {names}{more}"
                )
        covered = [
            (n, p)
            for (n, p), names in zip(trainable, aliases, strict=True)
            if any(fnmatchcase(a, q) for a in names for q in config.params)
        ]
    if not covered:
        raise UsageError("geometry covers no parameter: the model has no trainable parameter")
    return covered


def encode_geometry(
    values: torch.Tensor, storage_dtype: str = "float32"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Values as stored: float32 as is; float16 divided by a per-step scale (returned, 0-d).

    The scale is the largest finite |value|, so stored entries lie in [-1, 1] and cannot
    overflow on spike steps; non-finite entries stay non-finite.
    """
    if storage_dtype not in STORAGE_DTYPES:
        raise UsageError(
            f"unknown geometry storage dtype {storage_dtype!r}; valid: {', '.join(STORAGE_DTYPES)}"
        )
    values = values.float()
    if storage_dtype == "float32":
        return values, None
    finite = values[torch.isfinite(values)].abs()
    amax = finite.max() if finite.numel() else torch.zeros((), device=values.device)
    scale = torch.where(amax > 0, amax, torch.ones_like(amax)).float()
    return (values / scale).to(torch.float16), scale


def capture_geometry(
    model: nn.Module,
    unit_fn: UnitFn,
    unit_inputs: Sequence[Any],
    config: GeometryConfig,
    step: int,
) -> dict[str, torch.Tensor]:
    """The step's geometry arrays, ready for the step file; {} when not captured this step.

    Returns {"unit_grad_gram": [U, U]} or {"unit_grad_sketch": [U, k]}, plus
    "<key>_scale" (0-d float32) with float16 storage. A gram over more than
    `config.max_gram_units` units is captured as a sketch, with a `GeometryWarning`.
    """
    if config.kind == "none" or step % config.every != 0:
        return {}
    covered = covered_parameters(model, config)
    n_units = count_units(model, unit_fn, unit_inputs, covered)
    kind = config.kind
    if kind == "gram" and n_units > config.max_gram_units:
        warnings.warn(
            f"geometry: {n_units} units exceed max_gram_units={config.max_gram_units}; "
            f"capturing a k={config.k} sketch instead of the {n_units}^2 Gram matrix",
            GeometryWarning,
            stacklevel=2,
        )
        kind = "sketch"
    if kind == "gram":
        grads = per_unit_gradients(model, unit_fn, unit_inputs, covered, config.chunk_size)
        key, values = GRAM_KEY, grads @ grads.T
    else:
        key, values = SKETCH_KEY, _sketch(model, unit_fn, unit_inputs, covered, config, n_units)
    stored, scale = encode_geometry(values, config.storage_dtype)
    arrays = {key: stored}
    if scale is not None:
        arrays[f"{key}_scale"] = scale
    return arrays


def sketch_method(config: GeometryConfig, n_units: int, covered_numel: int) -> str:
    """ "exact" or "jvp": what `auto` resolves to for U units over P covered parameters."""
    if config.method != "auto":
        return config.method
    return "exact" if n_units * covered_numel * 4 <= EXACT_SKETCH_BYTES else "jvp"


def _sketch(
    model: nn.Module,
    unit_fn: UnitFn,
    unit_inputs: Sequence[Any],
    covered: Sequence[tuple[str, torch.Tensor]],
    config: GeometryConfig,
    n_units: int,
) -> torch.Tensor:
    numels = [p.numel() for _, p in covered]
    if sketch_method(config, n_units, sum(numels)) == "exact":
        grads = per_unit_gradients(model, unit_fn, unit_inputs, covered, config.chunk_size)
        return sketch_from_gradients(grads, numels, config.seed, config.k)
    return jvp_sketch(
        model,
        unit_fn,
        unit_inputs,
        covered,
        seed=config.seed,
        k=config.k,
        chunk_size=config.chunk_size,
    )


def covered_grad_norm(model: nn.Module, config: GeometryConfig) -> float:
    """sqrt(sum ||p.grad||^2) over the covered parameters: call after backward, before clipping.

    Computed like `clip_grad_norm_` (the norm of per-parameter norms), but in float32 at least
    whatever the gradients' dtype: a bfloat16 norm is rounded to 3 significant digits, which
    `fidelity` would read as the geometry's error. A parameter without a gradient counts 0.
    Non-finite gradients give a non-finite norm. A model split across devices has each
    parameter's norm moved to the first one's device, as the clip does.
    """
    grads = [p.grad for _, p in covered_parameters(model, config) if p.grad is not None]
    if not grads:
        return 0.0
    norms = torch.stack(
        [
            torch.linalg.vector_norm(g.detach(), dtype=torch.promote_types(g.dtype, torch.float32))
            .float()
            .to(grads[0].device)
            for g in grads
        ]
    )
    return float(torch.linalg.vector_norm(norms))
