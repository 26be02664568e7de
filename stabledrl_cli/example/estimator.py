"""Log-likelihood estimators of a masked diffusion LM: ELBOs over random masks.

A mask sample: draw t ~ U(0, 1) per sequence and hide each completion position with
probability t. The model scores the hidden positions:
- `elbo`: the mean log-likelihood over the hidden positions (at least one is hidden); what
  StableDRL's and d1's code call the ELBO estimate of a sequence.
- `llada`: LLaDA's 1/t-weighted form, sum over hidden positions of log p / (t * L_c), with
  t ~ U(eps, 1) as in LLaDA's training loss. Unbiased, and of higher variance: a small t gives a
  large weight to the few hidden positions.

`unit_logp` is the per-unit log-likelihood as a pure function of (model params, one unit's
inputs), written for `torch.func` (`vmap(grad(...))` over `functional_call`). Training uses the
batched `token_logp` with the same arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from stabledrl_cli.example.task import MASK
from stabledrl_cli.vocab import Estimator

LLADA_EPS = 1e-3  # LLaDA's floor on t: the mask probability is (1 - eps) t + eps, never 0.


@dataclass(frozen=True)
class MaskSample:
    """One mask sample per sequence.

    noise_mask: [B, L] bool, True where the token is replaced by MASK (completion only).
    weights: [B, L] float32, the estimator's weight of each hidden position (0 elsewhere).
    """

    noise_mask: torch.Tensor
    weights: torch.Tensor


def draw_mask(
    n: int, prompt_len: int, completion_len: int, kind: Estimator, generator: torch.Generator
) -> MaskSample:
    """Draw one mask per sequence from `generator` (the training RNG)."""
    t = torch.rand(n, 1, generator=generator)
    u = torch.rand(n, completion_len, generator=generator)
    if kind == "llada":
        t = (1 - LLADA_EPS) * t + LLADA_EPS
        hidden = u < t
        weights = hidden.float() / (t * completion_len)
    else:
        hidden = u < t
        # The mean needs one hidden position: where none is, hide the one with the smallest u.
        none = ~hidden.any(dim=1)
        first = torch.nn.functional.one_hot(u.argmin(dim=1), completion_len).bool()
        hidden = hidden | (first & none[:, None])
        weights = hidden.float() / hidden.sum(dim=1, keepdim=True).float()
    prompt_pad = torch.zeros(n, prompt_len, dtype=torch.bool)
    noise_mask = torch.cat([prompt_pad, hidden], dim=1)
    weights = torch.cat([prompt_pad.float(), weights], dim=1)
    return MaskSample(noise_mask=noise_mask, weights=weights)


def token_logp(
    model: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor, noise_mask: torch.Tensor
) -> torch.Tensor:
    """log p(tokens_l | tokens with hidden positions set to MASK), every position.

    tokens: [B, L] int64, noise_mask: [B, L] bool -> [B, L] float32. Positions that are not
    hidden get the log-prob of a visible token: callers weight them by 0.
    """
    inputs = torch.where(noise_mask, torch.full_like(tokens, MASK), tokens)
    logits = model(inputs)
    return logits.log_softmax(dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def unit_logp(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    tokens: torch.Tensor,
    noise_mask: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """The log-likelihood estimate of one unit, a pure function of `params`.

    tokens: [L] int64, noise_mask: [L] bool, weights: [L] float32 -> 0-d tensor
    sum_l weights_l * log p(tokens_l | masked input). For a sequence unit `weights` is the
    mask sample's (`MaskSample.weights[i]`), giving the ELBO estimate; for a token unit it is a
    one-hot vector on that token. No dropout, no in-place ops: `vmap(grad(f))` works on it.
    """
    inputs = torch.where(noise_mask, torch.full_like(tokens, MASK), tokens)
    logits: torch.Tensor = functional_call(model, dict(params), (inputs.unsqueeze(0),))
    logits = logits.squeeze(0)
    logp = logits.log_softmax(dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return (weights * logp).sum()


def sequence_logp(model: nn.Module, tokens: torch.Tensor, sample: MaskSample) -> torch.Tensor:
    """The batched sequence ELBO estimate: tokens [B, L] -> [B] (unit_logp over the rows)."""
    return (sample.weights * token_logp(model, tokens, sample.noise_mask)).sum(dim=1)
