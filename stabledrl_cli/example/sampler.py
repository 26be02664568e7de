"""Generation by iterative unmasking (LLaDA's sampler, one token per step).

Start from the prompt and an all-MASK completion. Each step samples a digit at every hidden
position (temperature 1, from the training RNG) and reveals the one the model is most
confident about (LLaDA's low-confidence remasking), until nothing is hidden.
"""

from __future__ import annotations

import torch
from torch import nn

from stabledrl_cli.example.task import MASK, N_DIGITS


class NonFiniteOutput(ArithmeticError):
    """The model's output at a hidden position is not finite: there is nothing to sample
    from (weights grown past what its activations can hold, though each is finite)."""


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: torch.Tensor,
    completion_len: int,
    generator: torch.Generator,
    temperature: float = 1.0,
) -> torch.Tensor:
    """prompts: [B, P] -> completions [B, completion_len] (digits only). NonFiniteOutput when
    the model's probabilities are not finite (before anything is drawn from `generator`)."""
    batch, prompt_len = prompts.shape
    device = prompts.device
    x = torch.cat([prompts, torch.full((batch, completion_len), MASK, device=device)], dim=1)
    rows = torch.arange(batch, device=device)
    for _ in range(completion_len):
        hidden = x[:, prompt_len:] == MASK
        logits = model(x)[:, prompt_len:, :N_DIGITS] / temperature
        probs = logits.softmax(dim=-1)
        if not bool(torch.isfinite(probs).all()):
            raise NonFiniteOutput
        # Sampling draws from the CPU generator so a seed gives the same run on any device.
        flat = probs.reshape(-1, N_DIGITS).cpu()
        sampled = torch.multinomial(flat, 1, generator=generator).view(batch, completion_len)
        sampled = sampled.to(device)
        confidence = probs.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
        confidence = confidence.masked_fill(~hidden, -1.0)
        position = confidence.argmax(dim=1)
        x[rows, prompt_len + position] = sampled[rows, position]
    return x[:, prompt_len:]
