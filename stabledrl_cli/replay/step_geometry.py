"""A step's recorded gradient geometry on the device (`StepGeometry`): checked against the
step it comes with, and the update norms and inner products it measures."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from stabledrl_cli.errors import InputError
from stabledrl_cli.geometry import (
    check_gram,
    check_scale,
    decode_geometry,
    geometry_product,
    product_dtype,
    require_scale,
    update_norms,
)
from stabledrl_cli.policies import PreparedBatch
from stabledrl_cli.vocab import StepGeometryKind


@dataclass
class StepGeometry:
    """A step's recorded gradient geometry on the device.

    kind: "gram" (`stored` [U, U]), "sketch" (`stored` [U, k]) or "coef" (none: norms are
    coefficient norms, a proxy). `stored` is the matrix as recorded (float16 sketches with their
    per-step `scale`). `per_sequence`: U counts sequences while the step has token entries
    (token coefficients are summed per sequence).
    """

    kind: StepGeometryKind
    stored: torch.Tensor | None = None
    scale: float | None = None
    per_sequence: bool = False

    @classmethod
    def from_arrays(
        cls,
        gram: torch.Tensor | None,
        sketch: torch.Tensor | None,
        scale: float | None,
        prep: PreparedBatch,
        step: int,
    ) -> StepGeometry:
        kind: StepGeometryKind = "gram" if gram is not None else "sketch"
        stored = gram if gram is not None else sketch
        if stored is None:
            return cls("coef")
        rows = stored.shape[0]
        if kind == "gram" and (stored.ndim != 2 or stored.shape[1] != rows):
            raise InputError(f"step {step}: unit_grad_gram has shape {list(stored.shape)}")
        if kind == "sketch" and stored.ndim != 2:
            raise InputError(f"step {step}: unit_grad_sketch has shape {list(stored.shape)}")
        if kind == "sketch" and stored.shape[1] == 0:
            raise InputError(
                f"step {step}: unit_grad_sketch has no columns (shape {list(stored.shape)}): "
                "it measures no update, its norms would all read 0"
            )
        if rows == prep.num_tokens:
            per_sequence = False
        elif rows == prep.n_seq:
            per_sequence = True
        else:
            raise InputError(
                f"step {step}: {kind} geometry has {rows} units but the step has "
                f"{prep.num_tokens} entries and {prep.n_seq} sequences"
            )
        try:
            require_scale(stored, scale)
            if kind == "gram":
                check_gram(stored)
            if scale is not None:
                check_scale(scale)
        except InputError as exc:
            raise InputError(f"step {step}: {exc}") from None
        return cls(kind, stored.to(prep.device), scale, per_sequence)

    def units(self, coef: torch.Tensor, prep: PreparedBatch) -> torch.Tensor:
        """[P, T] token coefficients -> [P, U] unit coefficients of the geometry."""
        return prep.seq_sum(coef) if self.per_sequence else coef

    @cached_property
    def matrix(self) -> torch.Tensor | None:
        """The recorded matrix decoded to float32 (`geometry.decode_geometry`), made on first
        use: the streaming pass never needs it whole (`measure` decodes a block at a time)."""
        return None if self.stored is None else decode_geometry(self.stored, self.scale)

    def measure(
        self, coef_units: torch.Tensor, own: int | None, rows: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[R, U] of a step with geometry -> ([R] float64 norms of sum_u c_u grad_u, [rows] inner
        products of the first `rows` updates with update `own`, or None without `own`). Both
        come from one product coef @ matrix (`geometry.geometry_product`)."""
        assert self.stored is not None
        gram = self.kind == "gram"
        coef = coef_units.to(product_dtype(self.stored.device, gram=gram))
        products = geometry_product(coef, self.stored, self.scale)
        # Rounded through float32 like `replayed_update_norm`, so both give the same figure.
        norms = update_norms(products, coef, gram=gram).float().double()
        if own is None:
            return norms, None
        other = coef[own] if gram else products[own]
        return norms, products[:rows] @ other

    def unit_scale(self) -> torch.Tensor | None:
        """[U] ||grad_u||: sqrt(K_uu) or the sketch row norm; None without geometry."""
        if self.matrix is None:
            return None
        if self.kind == "gram":
            return torch.diagonal(self.matrix).clamp(min=0).sqrt()
        norm: torch.Tensor = torch.linalg.vector_norm(self.matrix, dim=-1)
        return norm
