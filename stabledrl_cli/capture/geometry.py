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
A random op inside is refused (usage error) rather than consuming the training RNG.

Capture at the parameters the step's backward used (before `optimizer.step()`). Nothing here
touches `.grad`, the autograd graph of the real parameters or the global RNG.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

from stabledrl_cli.capture._omega import OMEGA_BLOCK_ROWS, omega_chunk_rows, omega_factors
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


@dataclass(frozen=True)
class BatchLogp:
    """Marks a batched unit log-likelihood: `fn(module_call, *batch_inputs) -> [U]`.

    Use it for token units (one forward scores every token). Per-unit gradients are the rows
    of the Jacobian of `fn`, formed by vmap over vjp in chunks of rows.
    """

    fn: Callable[..., torch.Tensor]


UnitFn = Callable[..., torch.Tensor] | BatchLogp


class ModuleCall:
    """`model(*args, **kwargs)` with the covered parameters swapped in, for a unit function.

    `params` is the whole mapping name -> tensor (covered parameters being differentiated,
    every other parameter and buffer held constant), for code written against
    `functional_call(model, params, ...)` itself.
    """

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor]) -> None:
        self.model, self.params = model, params

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.model, self.params, args, kwargs)


def covered_parameters(model: nn.Module, config: GeometryConfig) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters the geometry covers, in module order (`named_parameters()`).

    A pattern of `config.params` that matches no trainable parameter is a usage error (a typo
    would otherwise silently shrink the coverage).
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if config.params is None:
        covered = trainable
    else:
        for pattern in config.params:
            if not any(fnmatchcase(n, pattern) for n, _ in trainable):
                names = ", ".join(n for n, _ in trainable[:12])
                more = " ..." if len(trainable) > 12 else ""
                raise UsageError(
                    f"geometry parameter pattern {pattern!r} matches no trainable parameter; "
                    f"names are like: {names}{more}"
                )
        covered = [(n, p) for n, p in trainable if any(fnmatchcase(n, q) for q in config.params)]
    if not covered:
        raise UsageError("geometry covers no parameter: the model has no trainable parameter")
    return covered


@dataclass
class _Functional:
    """The model as a function of its covered parameters; every other tensor held constant."""

    model: nn.Module
    names: list[str]
    params: dict[str, torch.Tensor]
    constants: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module, covered: Sequence[tuple[str, torch.Tensor]]) -> _Functional:
        names = [n for n, _ in covered]
        params = {n: p.detach() for n, p in covered}
        constants = {n: p.detach() for n, p in model.named_parameters() if n not in params}
        constants.update(dict(model.named_buffers()))
        return cls(model, names, params, constants)

    @property
    def numels(self) -> list[int]:
        return [self.params[n].numel() for n in self.names]

    @property
    def device(self) -> torch.device:
        return self.params[self.names[0]].device

    def call_with(self, params: dict[str, torch.Tensor]) -> ModuleCall:
        return ModuleCall(self.model, {**self.constants, **params})

    def flatten(self, grads: dict[str, torch.Tensor], rows: int) -> torch.Tensor:
        """Per-parameter `[rows, *shape]` -> `[rows, P]` float32, in covered order."""
        return torch.cat([grads[n].reshape(rows, -1) for n in self.names], dim=1).float()

    def units_fn(
        self, unit_fn: UnitFn, unit_inputs: Sequence[Any]
    ) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        """params -> the step's unit log-likelihoods `[U]`."""
        if isinstance(unit_fn, BatchLogp):

            def batched(params: dict[str, torch.Tensor]) -> torch.Tensor:
                return _check_batch_out(unit_fn.fn(self.call_with(params), *unit_inputs))

            return batched

        def per_unit(params: dict[str, torch.Tensor]) -> torch.Tensor:
            def one(*xs: torch.Tensor) -> torch.Tensor:
                return _check_unit_out(unit_fn(self.call_with(params), *xs))

            return vmap(one)(*unit_inputs).reshape(-1)

        return per_unit


def _check_unit_out(out: Any) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.ndim > 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(
            f"a per-row log-likelihood must return a 0-d tensor (one unit) or [m] (m units), "
            f"got {shape}"
        )
    return out


def _check_batch_out(out: Any) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.ndim != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"a batched log-likelihood (BatchLogp) must return [U], got {shape}")
    return out


def _check_unit_inputs(unit_inputs: Sequence[Any]) -> int:
    """Per-unit inputs are tensors sharing dim 0 (the unit index); returns U."""
    if not unit_inputs or not all(isinstance(x, torch.Tensor) for x in unit_inputs):
        raise UsageError("per-unit inputs must be one or more tensors indexed by unit on dim 0")
    sizes = {int(x.shape[0]) if x.ndim else None for x in unit_inputs}
    size = next(iter(sizes)) if len(sizes) == 1 else None
    if size is None:
        raise UsageError(f"per-unit inputs disagree on the number of units (dim 0): {sizes}")
    return size


def _deterministic(call: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Runs a torch.func transform; a random op inside (dropout) becomes a usage error."""
    try:
        return call()
    except RuntimeError as exc:
        if "randomness" in str(exc):
            raise UsageError(
                "geometry capture needs a deterministic model: put it in eval mode or set "
                "dropout to 0, and pass random masks as inputs"
            ) from exc
        raise


def per_unit_gradients(
    model: nn.Module,
    unit_logp: UnitFn,
    unit_inputs: Sequence[Any],
    covered: Sequence[tuple[str, torch.Tensor]],
    chunk_size: int = 64,
) -> torch.Tensor:
    """Per-unit gradients of the unit log-likelihoods over the covered parameters.

    unit_logp: a per-row callable (vmapped over dim 0 of `unit_inputs`) or a `BatchLogp`.
    Returns G: `[U, P_covered]` float32, rows in unit order (row-major over rows x units per
    row), columns in covered order, each parameter flattened.
    """
    fm = _Functional.of(model, covered)
    if isinstance(unit_logp, BatchLogp):
        return _deterministic(lambda: _batch_gradients(fm, unit_logp, unit_inputs, chunk_size))
    return _deterministic(lambda: _unit_gradients(fm, unit_logp, unit_inputs, chunk_size))


def _unit_gradients(
    fm: _Functional, unit_logp: Callable[..., torch.Tensor], inputs: Sequence[Any], chunk: int
) -> torch.Tensor:
    n_rows = _check_unit_inputs(inputs)

    def value(params: dict[str, torch.Tensor], *xs: torch.Tensor) -> torch.Tensor:
        return _check_unit_out(unit_logp(fm.call_with(params), *xs))

    per_row = _units_per_row(fm, unit_logp, inputs)
    in_dims = (None,) + (0,) * len(inputs)
    if per_row is None:  # one unit per row: the gradient of a scalar
        grad_fn, per_row, rows_per_chunk = vmap(grad(value), in_dims=in_dims), 1, chunk
    else:  # m units per row: the rows of the row's own Jacobian, never the whole batch's
        grad_fn, rows_per_chunk = vmap(jacrev(value), in_dims=in_dims), max(1, chunk // per_row)
    out = torch.empty(n_rows * per_row, sum(fm.numels), device=fm.device)
    for start in range(0, n_rows, rows_per_chunk):
        stop = min(start + rows_per_chunk, n_rows)
        grads = grad_fn(fm.params, *(x[start:stop] for x in inputs))
        out[start * per_row : stop * per_row] = fm.flatten(grads, (stop - start) * per_row)
    return out


def _units_per_row(
    fm: _Functional, unit_logp: Callable[..., torch.Tensor], inputs: Sequence[Any]
) -> int | None:
    """None when a row is one unit (0-d output), else m: a probe forward of the first row."""

    def one(*xs: torch.Tensor) -> torch.Tensor:
        return _check_unit_out(unit_logp(fm.call_with(fm.params), *xs))

    with torch.no_grad():
        out = _deterministic(lambda: vmap(one)(*(x[:1] for x in inputs)))
    return None if out.ndim == 1 else int(out.shape[1])


def _batch_gradients(
    fm: _Functional, unit_logp: BatchLogp, inputs: Sequence[Any], chunk: int
) -> torch.Tensor:
    values, vjp_fn = vjp(fm.units_fn(unit_logp, inputs), fm.params)[:2]
    n_units = values.shape[0]
    out = torch.empty(n_units, sum(fm.numels), device=fm.device)
    for start in range(0, n_units, chunk):
        stop = min(start + chunk, n_units)
        rows = torch.arange(stop - start, device=values.device)
        basis = torch.zeros(stop - start, n_units, dtype=values.dtype, device=values.device)
        basis[rows, rows + start] = 1
        (grads,) = vmap(vjp_fn)(basis)
        out[start:stop] = fm.flatten(grads, stop - start)
    return out


def sketch_from_gradients(
    grads: torch.Tensor, numels: Sequence[int], seed: int, k: int
) -> torch.Tensor:
    """S = G Omega / sqrt(k) from exact per-unit gradients G: `[U, P]` -> `[U, k]` float32.

    Omega's rows of a parameter come `omega_chunk_rows` at a time (all of them when Omega is
    kept whole), so a parameter's whole factor [k, n_i] is never built."""
    factors = omega_factors(seed, tuple(numels), k, grads.device)
    sketch = torch.zeros(grads.shape[0], k, device=grads.device)
    offset = 0
    for i, numel in enumerate(numels):
        block = grads[:, offset : offset + numel]
        rows = k if factors.kept else omega_chunk_rows(numel)
        for start in range(0, k, rows):
            stop = min(start + rows, k)
            sketch[:, start:stop] += block @ factors.rows(i, start, stop).T
        offset += numel
    return sketch / math.sqrt(k)


def jvp_sketch(
    model: nn.Module,
    unit_logp: UnitFn,
    unit_inputs: Sequence[Any],
    covered: Sequence[tuple[str, torch.Tensor]],
    *,
    seed: int,
    k: int,
    chunk_size: int = 64,
) -> torch.Tensor:
    """S = G Omega / sqrt(k) by forward-mode JVPs, never forming G: `[U, k]` float32.

    Column j of S is the JVP of the unit log-likelihoods along Omega[:, j] (reshaped per
    parameter); `chunk_size` columns are vmapped together.
    """
    fm = _Functional.of(model, covered)
    if not isinstance(unit_logp, BatchLogp):
        _check_unit_inputs(unit_inputs)
    units = fm.units_fn(unit_logp, unit_inputs)
    factors = omega_factors(seed, tuple(fm.numels), k, fm.device)

    def column(tangents: dict[str, torch.Tensor]) -> torch.Tensor:
        tangent_out: torch.Tensor = jvp(units, (fm.params,), (tangents,))[1]
        return tangent_out

    def run() -> torch.Tensor:
        columns = []
        for start in range(0, k, chunk_size):
            stop = min(start + chunk_size, k)
            tangents = {
                name: factors.rows(i, start, stop)
                .reshape(stop - start, *fm.params[name].shape)
                .to(fm.params[name].dtype)
                for i, name in enumerate(fm.names)
            }
            columns.append(vmap(column)(tangents).float())
        return torch.cat(columns).T / math.sqrt(k)

    return _deterministic(run)


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
    n_units = _count_units(model, unit_fn, unit_inputs, covered)
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


def _count_units(
    model: nn.Module,
    unit_fn: UnitFn,
    unit_inputs: Sequence[Any],
    covered: Sequence[tuple[str, torch.Tensor]],
) -> int:
    if not isinstance(unit_fn, BatchLogp):
        n_rows = _check_unit_inputs(unit_inputs)
        per_row = _units_per_row(_Functional.of(model, covered), unit_fn, unit_inputs)
        return n_rows * (1 if per_row is None else per_row)
    # A batched function says how many units it scores only when run: one no-grad forward.
    fm = _Functional.of(model, covered)
    with torch.no_grad():
        return int(_deterministic(lambda: fm.units_fn(unit_fn, unit_inputs)(fm.params)).shape[0])


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

    Computed like `clip_grad_norm_` (the norm of per-parameter norms); a parameter without a
    gradient counts 0. Non-finite gradients give a non-finite norm.
    """
    grads = [p.grad for _, p in covered_parameters(model, config) if p.grad is not None]
    if not grads:
        return 0.0
    norms = torch.stack([torch.linalg.vector_norm(g.detach()).float() for g in grads])
    return float(torch.linalg.vector_norm(norms))
