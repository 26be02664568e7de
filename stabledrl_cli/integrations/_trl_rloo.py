"""`RecordingRLOOTrainer`: `trl.RLOOTrainer` (1.16.x) that records every optimizer step.

RLOO's loss (`RLOOTrainer._compute_loss`) is a PPO clip of a sequence ratio: each
completion's log-prob is the sum of its tokens' over the completion mask (`logps`, and
`old_logps` from generation time), its ratio `exp(logps - old_logps)`, its advantage the
leave-one-out one TRL made at generation time, and the loss `-min(r A, clamp(r) A)` averaged
over the micro-batch's completions (every row, a masked one too: its log-probs are 0, its
ratio 1), which the HF Trainer divides by the accumulation steps. So one recorded entry is a
completion (`unit: sequence`): logp = `logps`, logp_old = `old_logps`, token_count = the
completion mask's sum (the tokens each log-prob sums over: 0 for a completion TRL masks whole,
`mask_truncated_completions`), and the policy is `ppo` over those entries with each
micro-batch's mean (`rloo_policy_for_config`).
"""

from __future__ import annotations

from typing import Any

import torch

from stabledrl_cli.integrations._trl_capture import MicroBatch
from stabledrl_cli.integrations._trl_policy import rloo_policy_for_config
from stabledrl_cli.integrations._trl_trainer import (
    GROUP_KEY,
    REWARD_KEY,
    TRL,
    RecordingTrainer,
    cpu_float32,
)
from stabledrl_cli.policies import Policy
from stabledrl_cli.vocab import Unit


class RecordingRLOOTrainer(RecordingTrainer, TRL.RLOOTrainer):  # type: ignore[misc]
    """`trl.RLOOTrainer` that records each optimizer step into a run directory, one entry a
    completion (`RecordingTrainer` says the arguments)."""

    _sd_trainer = "RLOOTrainer"
    _sd_unit: Unit = "sequence"

    def _sd_policy(self) -> Policy:
        return rloo_policy_for_config(self.args)

    def _sd_meta(self) -> dict[str, Any]:
        args = self.args
        return {
            # how TRL made the recorded advantages from the recorded rewards: each reward
            # clipped to reward_clip_range, minus beta times the completion's summed
            # log(pi_old / pi_ref), less the mean of its group's others, then normalized over
            # the generation batch when normalize_advantages
            "beta": float(args.beta),
            "reward_clip_range": args.reward_clip_range,
            "normalize_advantages": args.normalize_advantages,
            "loss_scale": "per-completion normaliser of the all-rank objective (the "
            "micro-batch's completions times gradient accumulation steps times world size)",
        }

    def _sd_micro_batch(
        self, inputs: dict[str, Any], loss: torch.Tensor, seen: dict[str, torch.Tensor]
    ) -> MicroBatch:
        """What `_compute_loss` used for this micro-batch, on CPU: [B, 1] entries."""
        completion_mask = inputs["completion_mask"]
        logps = (seen["logp"] * completion_mask).sum(1)  # TRL's own expression, same floats
        rows = logps.shape[0]
        accumulation = self.current_gradient_accumulation_steps
        every = torch.ones(rows, 1)
        return MicroBatch(
            logp=cpu_float32(logps).unsqueeze(1),
            logp_old=cpu_float32(inputs["old_logps"]).unsqueeze(1),
            advantages=cpu_float32(inputs["advantages"]).unsqueeze(1),
            mask=every,
            kept=every.bool(),
            loss_scale=every * float(rows * accumulation * self.accelerator.num_processes),
            group_id=inputs[GROUP_KEY].detach().cpu(),
            reward=cpu_float32(inputs[REWARD_KEY]),
            loss=float(loss.detach() / accumulation),  # as the HF Trainer divides it
            token_count=completion_mask.sum(1).detach().cpu(),  # the tokens each sum is over
        )
