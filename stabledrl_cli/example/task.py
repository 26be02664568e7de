"""The toy task: sort 5 digits. Reward = fraction of completion positions that are correct.

A sequence is `[BOS, d1..d5, SEP, c1..c5]`: the prompt is the first 7 tokens, the completion
the last 5. Exact match is too sparse for a 100k-parameter model (its reward stays at 0),
so the verifiable reward is the fraction correct, in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

N_DIGITS = 10
SEP = 10
MASK = 11
BOS = 12
VOCAB_SIZE = 13


@dataclass(frozen=True, kw_only=True)
class SortTask:
    length: int = 5
    """Digits to sort (the completion length)."""

    @property
    def prompt_len(self) -> int:
        return self.length + 2

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.length

    def sample_prompts(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n random prompts -> [n, prompt_len] (BOS, digits, SEP)."""
        digits = torch.randint(0, N_DIGITS, (n, self.length), generator=generator)
        bos = torch.full((n, 1), BOS, dtype=torch.long)
        sep = torch.full((n, 1), SEP, dtype=torch.long)
        return torch.cat([bos, digits, sep], dim=1)

    def answers(self, prompts: torch.Tensor) -> torch.Tensor:
        """prompts: [n, prompt_len] -> the correct completions [n, length]."""
        return prompts[:, 1 : 1 + self.length].sort(dim=1).values

    def reward(self, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        """Fraction of correct positions: [n, prompt_len], [n, length] -> [n] float32."""
        return (completions == self.answers(prompts)).float().mean(dim=1)
