"""A short masked-diffusion pretraining, so rewards start in between (not 0, not 1).

The targets are noisy on purpose: each completion digit is replaced by a random digit with
probability `noise`, so the model learns sorting only roughly and RL has room to move.
"""

from __future__ import annotations

import torch
from torch import nn

from stabledrl_cli.example.estimator import draw_mask, token_logp
from stabledrl_cli.example.task import N_DIGITS, SortTask


def pretrain(
    model: nn.Module,
    task: SortTask,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    noise: float,
    generator: torch.Generator,
    device: torch.device,
) -> float:
    """Masked-token cross-entropy on (prompt, noisy answer) pairs; returns the last loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    loss_value = float("nan")
    for _ in range(steps):
        prompts = task.sample_prompts(batch_size, generator)
        answers = task.answers(prompts)
        corrupt = torch.rand(answers.shape, generator=generator) < noise
        random_digits = torch.randint(0, N_DIGITS, answers.shape, generator=generator)
        targets = torch.where(corrupt, random_digits, answers)
        tokens = torch.cat([prompts, targets], dim=1).to(device)
        sample = draw_mask(batch_size, task.prompt_len, task.length, "elbo", generator)
        noise_mask = sample.noise_mask.to(device)
        logp = token_logp(model, tokens, noise_mask)
        loss = -(logp * noise_mask).sum() / noise_mask.sum()
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        optimizer.step()
        loss_value = float(loss.detach())
    return loss_value
