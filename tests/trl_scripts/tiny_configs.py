"""The TRL GRPOConfig overrides of the tiny run (`tiny_grpo.tiny_config`) that the TRL parity
tests (tests/test_integration_trl.py) and `benchmarks/trl_parity.py` record and replay, by
name: every loss type and the options that change the loss; then RLOO's (`RLOO_PARITY`).
Plain data: importing it needs no TRL."""

from __future__ import annotations

from typing import Any

PARITY: dict[str, dict[str, Any]] = {
    "grpo": {"loss_type": "grpo"},
    "bnpo": {"loss_type": "bnpo"},
    "dr_grpo": {"loss_type": "dr_grpo"},
    "dapo": {"loss_type": "dapo", "epsilon_high": 0.28},
    "dapo-token-mean": {"loss_type": "dapo", "gradient_accumulation_steps": 4},
    "cispo": {"loss_type": "cispo", "epsilon_high": 1.05},
    "sapo": {"loss_type": "sapo"},
    "gspo": {"loss_type": "grpo", "importance_sampling_level": "sequence"},
    "delta": {"loss_type": "dapo", "delta": 1.5},
    # a delta TRL takes below 1 + epsilon_high (it recommends above): A > 0 past it discarded
    "delta-below-eps-high": {"loss_type": "dapo", "delta": 1.1},
    "gspo-delta-below-eps-high": {
        "loss_type": "grpo",
        "importance_sampling_level": "sequence",
        "delta": 1.1,
    },
    "beta": {"loss_type": "grpo", "beta": 0.1, "use_bias_correction_kl": False},
    "entropy-mask": {"loss_type": "dapo", "top_entropy_quantile": 0.5},
    "beta-bias-corrected": {"loss_type": "grpo", "beta": 0.1},  # TRL's default correction
    "luspo": {"loss_type": "luspo"},
    "luspo-sequence": {"loss_type": "luspo", "importance_sampling_level": "sequence"},
    "vespo": {"loss_type": "vespo"},
    "vespo-beta": {"loss_type": "vespo", "beta": 0.1, "gradient_accumulation_steps": 4},
    "entropy-mask-beta": {"loss_type": "dapo", "top_entropy_quantile": 0.5, "beta": 0.1},
    # truncated completions (no EOS in 6 tokens) keep no token: every step has some
    "truncated": {"loss_type": "grpo", "mask_truncated_completions": True},
    "epsilons": {"loss_type": "grpo", "epsilon": 0.05, "epsilon_high": 0.1},
    # 3 micro-batches a pass over the generation batch, 2 a step: step 2 spans both passes
    "steps-per-generation-3": {"loss_type": "dapo", "steps_per_generation": 3},
    "grad-clip": {"loss_type": "grpo", "max_grad_norm": 0.05},  # clips every step
    # options users combine, several to a run (all but the accumulation-4 ones also mask
    # truncated completions; scale_rewards changes only the advantages)
    "bnpo-delta-beta-trunc": {
        "loss_type": "bnpo",
        "delta": 1.5,
        "beta": 0.1,
        "mask_truncated_completions": True,
        "scale_rewards": "batch",
    },
    "dr_grpo-3-iterations": {
        "loss_type": "dr_grpo",
        "delta": 1.5,
        "epsilon_high": 0.28,
        "mask_truncated_completions": True,
        "num_iterations": 3,
        "scale_rewards": "none",
    },
    "dapo-off-policy-beta": {
        "loss_type": "dapo",
        "off_policy_mask_threshold": 0.01,
        "beta": 0.1,
        "mask_truncated_completions": True,
    },
    # delta, beta, 3 passes; 2 rows a micro-batch: a group of 4 spans two of them
    "grpo-accumulation-4": {
        "loss_type": "grpo",
        "delta": 1.5,
        "beta": 0.1,
        "gradient_accumulation_steps": 4,
        "per_device_train_batch_size": 2,
        "num_iterations": 3,
    },
    "cispo-accumulation-4": {
        "loss_type": "cispo",
        "epsilon_high": 1.05,
        "gradient_accumulation_steps": 4,
        "per_device_train_batch_size": 2,
    },
    "gspo-beta-off-policy": {
        "loss_type": "grpo",
        "importance_sampling_level": "sequence",
        "beta": 0.1,
        "use_bias_correction_kl": False,
        "off_policy_mask_threshold": 0.01,
        "mask_truncated_completions": True,
    },
    "luspo-sequence-beta": {
        "loss_type": "luspo",
        "importance_sampling_level": "sequence",
        "beta": 0.1,
        "use_bias_correction_kl": False,
        "mask_truncated_completions": True,
    },
    "vespo-sequence": {
        "loss_type": "vespo",
        "importance_sampling_level": "sequence",
        "mask_truncated_completions": True,
    },
    # sequence-level sampling under the other PPO-clip loss types: gspo, their normaliser
    "gspo-dapo": {
        "loss_type": "dapo",
        "importance_sampling_level": "sequence",
        "epsilon_high": 0.28,
    },
    "gspo-bnpo": {
        "loss_type": "bnpo",
        "importance_sampling_level": "sequence",
        "mask_truncated_completions": True,
    },
    "gspo-dr_grpo": {"loss_type": "dr_grpo", "importance_sampling_level": "sequence"},
    "sapo-beta-truncated": {
        "loss_type": "sapo",
        "beta": 0.1,
        "mask_truncated_completions": True,
        "scale_rewards": "batch",
    },
}

RLOO_PARITY: dict[str, dict[str, Any]] = {
    "rloo": {},  # TRL's RLOOConfig defaults but beta 0 (tiny_rloo_config)
    # small epsilons: the second pass's sequence ratios leave them on both sides
    "rloo-epsilons": {"epsilon": 0.02, "epsilon_high": 0.05},
    # beta folds each completion's KL into its reward; normalized advantages
    "rloo-beta-normalized": {"beta": 0.1, "normalize_advantages": True},
    # truncated completions (no EOS in 6 tokens) keep no token: log-probs 0, ratio 1
    "rloo-truncated": {"mask_truncated_completions": True, "epsilon": 0.02},
    # 4 micro-batches a step, a rollout of 8 (gradient_accumulation_steps = steps_per_generation
    # would make each rollout's first step on-policy over whole groups: a loss of 0, whose
    # float32 residue has no relative error to compare)
    "rloo-accumulation-4": {
        "gradient_accumulation_steps": 4,
        "steps_per_generation": 8,
        "epsilon": 0.05,
    },
}
"""The RLOOConfig overrides of the tiny run (`tiny_grpo.tiny_rloo_config`) that the RLOO
parity tests (tests/test_integration_trl_rloo.py) and `benchmarks/trl_parity.py --trainer
rloo` record and replay, by name."""
