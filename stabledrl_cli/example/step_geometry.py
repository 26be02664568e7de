"""The example's gradient geometry: the per-row log-likelihood that `capture_geometry`
differentiates (`geometry_unit_fn`), and a step's geometry as `log_step` keywords
(`geometry_keywords`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from stabledrl_cli.capture.geometry import GeometryConfig, ModuleCall, capture_geometry
from stabledrl_cli.example.estimator import token_logp, unit_logp
from stabledrl_cli.vocab import Unit


def geometry_unit_fn(unit: Unit, prompt_len: int) -> Callable[..., torch.Tensor]:
    """The per-row log-likelihood that `capture_geometry` differentiates, for one sequence.

    Inputs of a row: tokens [L] int64, noise_mask [L] bool, weights [L] float32 (the step's
    mask sample). Sequence unit -> 0-d ELBO estimate (the same arithmetic as `sequence_logp`);
    token unit -> [L_c] log-probs of the completion positions (as `token_logp` in `train`).
    """
    if unit == "sequence":

        def sequence_unit(call: ModuleCall, tokens: torch.Tensor, noise_mask: torch.Tensor,
                          weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
            return unit_logp(call.model, call.params, tokens, noise_mask, weights)

        return sequence_unit

    def token_units(call: ModuleCall, tokens: torch.Tensor, noise_mask: torch.Tensor,
                    weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
        return token_logp(call, tokens[None], noise_mask[None])[0, prompt_len:]

    return token_units


def geometry_keywords(
    model: torch.nn.Module,
    geometry: GeometryConfig | None,
    unit_fn: Callable[..., torch.Tensor],
    inputs: tuple[torch.Tensor, ...],
    step: int,
) -> dict[str, Any]:
    """The step's geometry as `log_step` keywords (CPU arrays, a float scale), or {}."""
    if geometry is None:
        return {}
    captured = capture_geometry(model, unit_fn, inputs, geometry, step)
    return {k: (v.cpu() if v.ndim else float(v)) for k, v in captured.items()}
