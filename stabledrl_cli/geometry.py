"""Read-side gradient geometry: stored geometry back to numbers, and update norms from it.

A recorded step may hold the per-unit geometry of its update (docs/run-format.md): the Gram
matrix K = G G^T (`unit_grad_gram: [U, U]`) or a sketch S = G Omega / sqrt(k)
(`unit_grad_sketch: [U, k]`, float16 storage with its per-step scale
`unit_grad_sketch_scale`). Capture (`capture/geometry.py`) writes them; replay reads them.
Both stand on this module, which imports neither.
"""

from __future__ import annotations

import torch

from stabledrl_cli.dump._inputs import gram_problem, sketch_scale_problem
from stabledrl_cli.errors import InputError, UsageError


def decode_geometry(
    stored: torch.Tensor, scale: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Stored geometry back to float32. float16 without its per-step scale is refused."""
    require_scale(stored, scale)
    if scale is not None:
        factor = torch.as_tensor(scale, dtype=torch.float32, device=stored.device)
        return stored.to(torch.float32, copy=True).mul_(factor)
    return stored.float()


def replayed_update_norm(
    coef: torch.Tensor,
    gram: torch.Tensor | None = None,
    sketch: torch.Tensor | None = None,
    scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """The norm of sum_u coef_u grad_u from the recorded geometry.

    coef: `[U]` or `[B, U]` (B policies at once); gram: `[U, U]` -> sqrt(c^T K c), a tiny
    negative from rounding clamped at 0; sketch: `[U, k]` -> ||S^T c||. scale: the per-step
    scale of float16 storage (required for float16). Returns `[]` or `[B]` float32 (computed
    in `product_dtype`). Non-finite inputs give non-finite norms.
    """
    stored = gram if gram is not None else sketch
    if stored is None or (gram is not None and sketch is not None):
        raise UsageError("replayed_update_norm needs exactly one of gram or sketch")
    require_scale(stored, scale)
    wide = product_dtype(stored.device, gram=gram is not None)
    coef = torch.as_tensor(coef, device=stored.device).to(wide)
    if coef.ndim not in (1, 2):
        raise UsageError(f"coef must be [U] or [B, U], got a tensor of shape {list(coef.shape)}")
    if coef.shape[-1] != stored.shape[0]:
        raise UsageError(f"coef has {coef.shape[-1]} units but the geometry has {stored.shape[0]}")
    products = geometry_product(coef, stored, scale)
    return update_norms(products, coef, gram=gram is not None).float()


PRODUCT_BLOCK_BYTES = 1 << 21
"""Bytes of decoded geometry `geometry_product` holds at a time (2 MiB: a block is decoded
and multiplied while it is in the cache; the whole decoded matrix is never built)."""


def geometry_product(
    coef: torch.Tensor, stored: torch.Tensor, scale: torch.Tensor | float | None = None
) -> torch.Tensor:
    """coef [R, U] @ the decoded geometry [U, k], in coef's dtype: the stored rows are widened
    to that dtype a block at a time (`PRODUCT_BLOCK_BYTES`) and their partial products summed;
    the per-step scale of float16 storage multiplies the [R, k] result (one pass over R x k
    entries instead of U x k). A float16 sketch is never decoded whole: a replay's largest
    per-step cost with a sketch was that decoding, not the product."""
    require_scale(stored, scale)
    rows = max(1, PRODUCT_BLOCK_BYTES // max(1, stored.shape[1] * coef.element_size()))
    products: torch.Tensor | None = None
    for start in range(0, stored.shape[0], rows):
        block = stored[start : start + rows].to(coef.dtype)
        part = coef[..., start : start + rows] @ block
        products = part if products is None else products.add_(part)
    if products is None:
        products = coef @ stored.to(coef.dtype)
    if scale is not None:
        products = products * torch.as_tensor(scale, dtype=coef.dtype, device=coef.device)
    return products


def require_scale(stored: torch.Tensor, scale: torch.Tensor | float | None) -> None:
    """InputError for float16 geometry without its per-step scale (float16 storage is only
    readable with it)."""
    if stored.dtype == torch.float16 and scale is None:
        raise InputError(
            "float16 gradient geometry without its per-step scale: refusing to read it "
            "(float16 overflows on spike steps)"
        )


def check_gram(gram: torch.Tensor) -> None:
    """InputError for a [U, U] matrix that is no Gram matrix G G^T (`gram_problem`)."""
    problem = gram_problem(gram.detach().cpu().numpy())
    if problem is not None:
        raise InputError(problem)


def check_scale(scale: torch.Tensor | float) -> None:
    """InputError for a per-step geometry scale <= 0 (`sketch_scale_problem`)."""
    problem = sketch_scale_problem(float(scale))
    if problem is not None:
        raise InputError(problem)


def product_dtype(device: torch.device, *, gram: bool) -> torch.dtype:
    """What coef @ geometry is computed in: float64 for a Gram matrix, where the device has it
    (not on Apple's MPS; c^T K c may cancel); float32 for a sketch, whose float16 storage and
    sketching error (about 1/sqrt(k)) leave nothing for float64 products to add but time."""
    return torch.float64 if gram and device.type != "mps" else torch.float32


def update_norms(products: torch.Tensor, coef: torch.Tensor, *, gram: bool) -> torch.Tensor:
    """Norms of the updates sum_u c_u grad_u from `products` = coef @ geometry: sqrt(c^T K c)
    with a Gram matrix (a tiny negative from rounding clamped at 0), ||S^T c|| with a sketch."""
    if gram:
        return (products * coef).sum(-1).clamp(min=0).sqrt()
    norm: torch.Tensor = torch.linalg.vector_norm(products, dim=-1)
    return norm
