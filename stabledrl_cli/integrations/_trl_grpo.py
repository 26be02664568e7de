"""`RecordingGRPOTrainer`: `trl.GRPOTrainer` (1.16.x) that records every optimizer step, one
entry a token: what GRPO's `_compute_loss` multiplied into each token's term (its masks,
`get_high_entropy_mask` and `get_off_policy_mask` read as it runs) and its normaliser for each
`loss_type` (`_sd_loss_scale`). What the recording trainers share: `_trl_trainer`.
"""

from __future__ import annotations

from typing import Any

import torch

from stabledrl_cli.errors import warn
from stabledrl_cli.integrations._trl_capture import MicroBatch
from stabledrl_cli.integrations._trl_policy import (
    cispo_cap_warning,
    policy_for_config,
    uses_loss_weight,
)
from stabledrl_cli.integrations._trl_trainer import (
    GROUP_KEY,
    REWARD_KEY,
    TRL,
    RecordingTrainer,
    cpu_float32,
)
from stabledrl_cli.policies import Policy


class RecordingGRPOTrainer(RecordingTrainer, TRL.GRPOTrainer):  # type: ignore[misc]
    """`trl.GRPOTrainer` that records each optimizer step into a run directory, one entry a
    token (`RecordingTrainer` says the arguments)."""

    _sd_trainer = "GRPOTrainer"

    def _sd_check_arguments(self, given: dict[str, Any]) -> None:
        config = given.get("args")
        if isinstance(config, TRL.GRPOConfig):  # None: TRL's default config, which maps
            policy_for_config(config, rollout_func=given.get("rollout_func") is not None)

    def _sd_policy(self) -> Policy:
        capped = cispo_cap_warning(self.args)
        if capped is not None and self.accelerator.is_main_process:  # one line a run
            warn(capped)
        return policy_for_config(self.args, rollout_func=self.rollout_func is not None)

    def _sd_meta(self) -> dict[str, Any]:
        args = self.args
        return {
            "loss_type": args.loss_type,
            "importance_sampling_level": args.importance_sampling_level,
            # how TRL made the recorded advantages from the recorded rewards (adv=zscore is
            # scale_rewards="group" with sum_then_normalize)
            "scale_rewards": args.scale_rewards,
            "multi_objective_aggregation": args.multi_objective_aggregation,
            "loss_scale": "per-token normaliser of the all-rank objective "
            "(TRL's micro-batch normaliser times world size)",
        }

    def get_high_entropy_mask(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        mask: torch.Tensor = super().get_high_entropy_mask(*args, **kwargs)
        if self._sd_seen is not None:
            self._sd_seen["entropy_mask"] = mask.detach()
        return mask

    def get_off_policy_mask(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        mask: torch.Tensor = super().get_off_policy_mask(*args, **kwargs)
        if self._sd_seen is not None:
            self._sd_seen["off_policy_mask"] = mask.detach()
        return mask

    def _sd_micro_batch(
        self, inputs: dict[str, Any], loss: torch.Tensor, seen: dict[str, torch.Tensor]
    ) -> MicroBatch:
        """What `_compute_loss` used for this micro-batch, on CPU."""
        logp = seen["logp"]
        completion_mask = inputs["completion_mask"]
        mask = (
            completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        )
        old = inputs.get("old_per_token_logps")
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        weight: torch.Tensor | None = None
        if uses_loss_weight(self.args):
            weight = torch.ones_like(logp)
            for name in ("entropy_mask", "off_policy_mask"):
                if name in seen:
                    weight = weight * seen[name]
            if self.use_vllm and self.vllm_importance_sampling_correction:
                weight = weight * inputs["importance_sampling_ratio"]
        ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        rollout = inputs.get("sampling_per_token_logps")
        return MicroBatch(
            logp=cpu_float32(logp),
            logp_old=cpu_float32(logp if old is None else old),
            advantages=cpu_float32(advantages.expand_as(logp)),
            mask=cpu_float32(mask),
            kept=completion_mask.detach().bool().cpu(),
            loss_scale=cpu_float32(self._sd_loss_scale(inputs, mask).expand_as(logp)),
            group_id=inputs[GROUP_KEY].detach().cpu(),
            reward=cpu_float32(inputs[REWARD_KEY]),
            loss=float(loss.detach()),
            loss_weight=None if weight is None else cpu_float32(weight.expand_as(logp)),
            logp_ref=None if ref is None else cpu_float32(ref),
            logp_rollout=None if rollout is None else cpu_float32(rollout),
        )

    def _sd_loss_scale(self, inputs: dict[str, Any], mask: torch.Tensor) -> torch.Tensor:
        """[B, 1] or 0-d: TRL's normaliser of each token's term in this micro-batch (train
        mode, `_compute_loss`), times the world size: DDP averages the ranks' gradients, so
        this is the normaliser in the objective over all ranks."""
        accumulation = float(self.current_gradient_accumulation_steps)
        ranks = self.accelerator.num_processes
        rows = mask.shape[0]
        loss_type = self.loss_type
        scale: torch.Tensor
        if loss_type in ("grpo", "sapo"):
            scale = accumulation * rows * mask.sum(-1, keepdim=True).clamp(min=1.0)
        elif loss_type == "bnpo":
            scale = accumulation * mask.sum().clamp(min=1.0)
        elif loss_type == "dr_grpo":
            scale = torch.tensor(accumulation * rows * self.max_completion_length)
        elif loss_type == "luspo":  # each row's token sum, averaged over every row
            scale = torch.tensor(accumulation * rows)
        else:  # dapo, cispo, vespo
            items = inputs["num_items_in_batch"].clamp(min=1.0) / ranks
            scale = items * accumulation / self.args.steps_per_generation
        normaliser: torch.Tensor = (scale * ranks).to(torch.float32)
        return normaliser
