"""Per-unit gradients of a step's unit log-likelihoods over the covered parameters, G: [U, P],
formed whole (`per_unit_gradients`) or only through its Gaussian sketch G Omega / sqrt(k)
(`sketch_from_gradients`, `jvp_sketch`), with torch.func.

The two forms of unit log-likelihood (per-row, or batched: `BatchLogp`), what they return and
why they must be deterministic: `geometry`'s docstring, which puts these to use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

from stabledrl_cli.capture._omega import omega_chunk_rows, omega_factors
from stabledrl_cli.errors import UsageError


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
        # Copies of the buffers: a forward that updates one in place (BatchNorm's running
        # statistics in training mode) updates its copy, never the model's (`_deterministic`).
        constants.update({n: b.detach().clone() for n, b in model.named_buffers()})
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
    """Runs a torch.func transform; a random op inside (dropout) or an update of a buffer in
    place (BatchNorm in training mode: torch.func refuses to mutate a tensor the function
    captured, or to update unbatched running statistics under vmap) becomes a usage error."""
    try:
        return call()
    except RuntimeError as exc:
        if "randomness" in str(exc):
            raise UsageError(
                "geometry capture needs a deterministic model: put it in eval mode or set "
                "dropout to 0, and pass random masks as inputs"
            ) from exc
        if "mutate a captured" in str(exc) or "updated in place" in str(exc):
            raise UsageError(
                "geometry capture needs a model whose forward updates no buffer (BatchNorm in "
                "training mode updates its running statistics): put it in eval mode"
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


def count_units(
    model: nn.Module,
    unit_fn: UnitFn,
    unit_inputs: Sequence[Any],
    covered: Sequence[tuple[str, torch.Tensor]],
) -> int:
    """U, the step's units: rows times units a row (a probe forward of the first row), or
    what a batched function scores."""
    if not isinstance(unit_fn, BatchLogp):
        n_rows = _check_unit_inputs(unit_inputs)
        per_row = _units_per_row(_Functional.of(model, covered), unit_fn, unit_inputs)
        return n_rows * (1 if per_row is None else per_row)
    # A batched function says how many units it scores only when run: one no-grad forward.
    fm = _Functional.of(model, covered)
    with torch.no_grad():
        return int(_deterministic(lambda: fm.units_fn(unit_fn, unit_inputs)(fm.params)).shape[0])
