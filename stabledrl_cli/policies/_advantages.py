"""Advantage normalization from per-sequence rewards and groups (`adv=` of every policy).

- center: r_i - mean_g(r)                   (Dr.GRPO; StableDRL's code; TRL scale_rewards="none")
- zscore: (r_i - mean_g) / (std_g + 1e-4)    (TRL scale_rewards="group"; std is torch.std's
  unbiased estimate, as TRL computes it)
- rloo:   r_i - mean of the other members of g

A group of one (a singleton) has no baseline: as verl's `compute_grpo_outcome_advantage` and
`compute_rloo_outcome_advantage` do, its mean is 0 and its std 1, so A = r_i (center, rloo)
and r_i / (1 + 1e-4) (zscore). TRL never forms one (num_generations >= 2).

Statistics run over every sequence of the reward array, scored or not: a group's baseline is
a property of its rewards, not of which tokens a mask kept. A NaN reward marks an unscorable
sequence (TRL turns a reward function's None into NaN): as TRL does, it is left out of its
group's statistics (nanmean, nanstd) and its advantage is 0; the group keeps its size, so a
group with one rewarded member is not a singleton (its member's A is 0, TRL's too).

The statistics are computed in float64 on the CPU, whatever the replay's device and dtype,
then given in the reward's: a group whose rewards are all equal has mean r and std 0
exactly, so A = 0, the figure the formula gives. A float32 sum of its rewards can be an ulp
or more off their mean, and zscore's 1e-4 magnifies that: summed one by one, as a group
index adds them, 64 rewards of 0.9 gave A = -5.3e-3. TRL's own float32 mean (torch.nanmean
over the group's row) can be an ulp off as well: its advantages of such a group are that
noise, -6.0e-4 for the same 64 rewards on the CPU, where replay's are 0.
"""

from __future__ import annotations

import torch

from stabledrl_cli.errors import UsageError
from stabledrl_cli.vocab import ADV_MODES, AdvMode

# TRL's epsilon in (r - mean) / (std + 1e-4): keeps a zero-variance group finite.
ZSCORE_EPS = 1e-4


def recompute_advantages(
    reward: torch.Tensor, seq_group: torch.Tensor, n_groups: int, mode: AdvMode
) -> torch.Tensor:
    """reward: [N] (NaN: unscorable), seq_group: [N] dense group index -> advantages [N], in
    the reward's dtype and on its device (computed in float64 on the CPU)."""
    if mode not in ADV_MODES[1:]:
        raise UsageError(
            f"adv must be one of {', '.join(ADV_MODES[1:])} to recompute; got {mode!r}"
        )
    exact = _advantages(reward.to("cpu", torch.float64), seq_group.cpu(), n_groups, mode)
    return exact.to(reward.device, reward.dtype)


def _advantages(
    reward: torch.Tensor, seq_group: torch.Tensor, n_groups: int, mode: AdvMode
) -> torch.Tensor:
    """`recompute_advantages` of a float64 reward on the CPU."""
    unscorable = torch.isnan(reward)
    reward = reward.masked_fill(unscorable, 0.0)
    zeros = torch.zeros(n_groups, dtype=reward.dtype, device=reward.device)
    shared = zeros.index_add(0, seq_group, torch.ones_like(reward)) > 1
    count = zeros.index_add(0, seq_group, (~unscorable).to(reward.dtype))
    total = zeros.index_add(0, seq_group, reward)
    mean = torch.where(shared, total / count.clamp(min=1.0), zeros)
    centered = (reward - mean[seq_group]).masked_fill(unscorable, 0.0)
    if mode == "center":
        return centered
    if mode == "zscore":
        sq = zeros.index_add(0, seq_group, centered * centered)
        var = sq / (count - 1.0).clamp(min=1.0)
        std = torch.where(shared, var.sqrt(), torch.ones_like(var))
        return centered / (std[seq_group] + ZSCORE_EPS)
    n = count[seq_group]  # rloo; one rewarded member of a shared group: no other, A = 0
    others = (total[seq_group] - reward) / (n - 1.0).clamp(min=1.0)
    alone = torch.where(shared[seq_group], torch.zeros_like(reward), reward)
    return torch.where(n > 1, reward - others, alone).masked_fill(unscorable, 0.0)
