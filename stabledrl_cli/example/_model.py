"""A tiny LLaDA-style masked diffusion LM: a bidirectional transformer that predicts masked tokens.

No causal mask, no dropout, no in-place ops on inputs: the forward pass is a pure function of
(params, tokens), so `torch.func.functional_call` and `vmap` work on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    vocab_size: int = 13
    """Token ids 0..vocab_size-1 (the task's digits plus its special tokens)."""
    seq_len: int = 12
    """Positions the learned position embedding covers."""
    d_model: int = 64
    """Width of the residual stream."""
    n_layers: int = 2
    """Transformer blocks."""
    n_heads: int = 4
    """Attention heads (d_model must divide by it)."""
    d_ff: int = 256
    """Hidden width of each block's MLP."""


class _Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.norm1 = nn.LayerNorm(config.d_model)
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.ff_in = nn.Linear(config.d_model, config.d_ff)
        self.ff_out = nn.Linear(config.d_ff, config.d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: [B, L, D] -> [B, L, D]; full (bidirectional) attention."""
        batch, length, width = h.shape
        head = width // self.n_heads
        q, k, v = self.qkv(self.norm1(h)).split(width, dim=-1)
        q, k, v = (x.reshape(batch, length, self.n_heads, head).transpose(1, 2) for x in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(head)
        attended = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, length, width)
        h = h + self.proj(attended)
        mlp: torch.Tensor = self.ff_out(F.gelu(self.ff_in(self.norm2(h))))
        return h + mlp


class TinyDiffusionLM(nn.Module):
    """Bidirectional transformer over [B, L] token ids -> logits [B, L, V]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Parameter(torch.zeros(config.seq_len, config.d_model))
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Deterministic init from `generator` (normal(0, 0.02) weights, zero biases)."""
        with torch.no_grad():
            for name, param in self.named_parameters():
                if "norm" in name:
                    param.fill_(1.0 if name.endswith("weight") else 0.0)
                elif name.endswith("bias"):
                    param.zero_()
                else:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B, L] int64 -> logits [B, L, V]."""
        h = self.tok_emb(tokens) + self.pos_emb[: tokens.shape[-1]]
        for block in self.blocks:
            h = block(h)
        logits: torch.Tensor = self.head(self.norm(h))
        return logits
