"""TRL 1.16's own `GRPOTrainer._compute_loss`, run through `RecordingGRPOTrainer`'s override on
crafted micro-batches a tiny training run does not reach: a completion masked whole, a
micro-batch of one token, a zero-variance group (A = 0), log-ratios of 20 to 80, vLLM-style
token weights. The recorded step, replayed with the run's own policy, gives TRL's loss, TRL's
clip metrics, and minus autograd's gradient of TRL's loss as each token's coefficient.

Only the model's forward is replaced (`_Forward`): it returns the crafted log-probs."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from _steps import policy_batch
from _trl import SKIP_REASON, TRL_METRICS

trl = pytest.importorskip("trl", reason=SKIP_REASON)

import stabledrl_cli as sd  # noqa: E402
from stabledrl_cli.dump import Recorder  # noqa: E402
from stabledrl_cli.integrations._rows import every_row  # noqa: E402
from stabledrl_cli.integrations._trl_capture import StepBuffer  # noqa: E402
from stabledrl_cli.integrations._trl_grpo import RecordingGRPOTrainer  # noqa: E402
from stabledrl_cli.integrations._trl_trainer import GROUP_KEY, REWARD_KEY  # noqa: E402

ROWS, WIDTH = 4, 5
SCORED = 18
"""Scored tokens of the step: 14 in micro-batch 0 (row 1 and one padding position masked), 4."""


class _Accelerator:
    """One process: gathers and reductions are the identity."""

    num_processes = 1
    process_index = 0
    is_main_process = True
    sync_gradients = True

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    gather_for_metrics = gather

    def reduce(self, x: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return x

    def pad_across_processes(self, x: torch.Tensor, **_: Any) -> torch.Tensor:
        return x


class _Forward(trl.GRPOTrainer):  # type: ignore[misc]
    """TRL's trainer whose model forward returns the crafted log-probs and entropies."""

    _next: tuple[torch.Tensor, torch.Tensor]

    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any) -> Any:
        logp, entropy = self._next
        return logp, entropy, None


class _Trainer(RecordingGRPOTrainer, _Forward):  # type: ignore[misc]
    """The recording trainer over `_Forward` (MRO: the recording overrides, then TRL's)."""


def _trainer(config: Any, out: Path) -> _Trainer:
    """The recording trainer's state for one optimizer step, without a model or a dataset."""
    trainer = object.__new__(_Trainer)
    trainer.args = config
    for name in ("loss_type", "beta", "top_entropy_quantile", "off_policy_mask_threshold",
                 "importance_sampling_level", "max_completion_length", "use_vllm",
                 "vllm_importance_sampling_correction", "num_generations"):  # fmt: skip
        setattr(trainer, name, getattr(config, name))
    trainer.epsilon_low = config.epsilon
    trainer.epsilon_high = (
        config.epsilon_high if config.epsilon_high is not None else config.epsilon
    )
    trainer.aux_loss_enabled = False
    trainer.rollout_func = None
    trainer._entropy_bonus_enabled = False
    trainer.model = SimpleNamespace(training=True)
    trainer.current_gradient_accumulation_steps = config.gradient_accumulation_steps
    trainer.accelerator = _Accelerator()
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer.state = SimpleNamespace(global_step=0)
    trainer._sd_rollout_step = 0
    trainer._sd_seen = None
    trainer.stabledrl_policy = trainer._sd_policy()
    recorder = Recorder(out, policy=trainer.stabledrl_policy, group_ids="global")
    trainer._sd_buffer = StepBuffer(recorder, group_size=config.num_generations)
    return trainer


def _micro_batches(gen: torch.Generator, weighted: bool) -> list[dict[str, torch.Tensor]]:
    """Micro-batch 0: a completion masked whole (row 1), a zero-variance group (rows 2-3, A = 0)
    and log-ratios of 20 to 80 either way; micro-batch 1: completions of one token. As in TRL,
    every micro-batch has the same rows (per_device_train_batch_size); whole groups of 2."""
    logp = -torch.rand(ROWS, WIDTH, generator=gen) * 3
    log_ratio = torch.randn(ROWS, WIDTH, generator=gen) * 0.3
    log_ratio[0, :4] = torch.tensor([20.0, -35.0, 80.0, -80.0])
    log_ratio[2, 0], log_ratio[3, 1] = 45.0, -60.0
    mask = torch.ones(ROWS, WIDTH, dtype=torch.long)
    mask[0, 4] = 0
    mask[1] = 0
    first = {
        "logp": logp,
        "old": logp - log_ratio,
        "adv": torch.tensor([1.0, -1.0, 0.0, 0.0]),
        "mask": mask,
        "group": torch.tensor([0, 0, 1, 1]),
    }
    one = -torch.rand(ROWS, 1, generator=gen)
    second = {
        "logp": one,
        "old": one - torch.tensor([[0.5], [-30.0], [0.1], [50.0]]),
        "adv": torch.tensor([-0.7, 0.7, 0.3, -0.3]),
        "mask": torch.ones(ROWS, 1, dtype=torch.long),
        "group": torch.tensor([2, 2, 3, 3]),
    }
    micro = [first, second]
    for m in micro:
        m["entropy"] = torch.rand(m["logp"].shape, generator=gen)
        m["ref"] = m["logp"] - 0.2 * torch.randn(m["logp"].shape, generator=gen)
        if weighted:
            m["is_ratio"] = 0.5 + torch.rand(m["logp"].shape, generator=gen)
    return micro


def _extreme_micro_batches(gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """Micro-batch 0: every row A < 0, row 1 masked whole (TRL's 0 / 0, a NaN its nanmin skips),
    rows 0, 2, 3 with 2/4, 5/5 and 1/5 of their scored entries below 1 - eps; micro-batch 1:
    one token a row, row 0 (A > 0) above 1 + eps. TRL logs low_min (1/5 + 0) / 2 and high_max
    (0 + 1) / 2."""
    mask = torch.ones(ROWS, WIDTH, dtype=torch.long)
    mask[0, 4] = 0
    mask[1] = 0
    log_ratio = torch.zeros(ROWS, WIDTH)
    log_ratio[0, :2], log_ratio[1], log_ratio[2], log_ratio[3, 0] = -1.0, -1.0, -1.0, -1.0
    logp = -torch.rand(ROWS, WIDTH, generator=gen) * 3
    one = -torch.rand(ROWS, 1, generator=gen)
    micro = [
        {"logp": logp, "old": logp - log_ratio, "adv": torch.tensor([-1.0, -1.0, -0.5, -0.5]),
         "mask": mask, "group": torch.tensor([0, 0, 1, 1])},
        {"logp": one, "old": one - torch.tensor([[1.0], [-1.0], [0.0], [0.0]]),
         "adv": torch.tensor([0.7, -0.7, 0.3, -0.3]), "mask": torch.ones(ROWS, 1, dtype=torch.long),
         "group": torch.tensor([2, 2, 3, 3])},
    ]  # fmt: skip
    for m in micro:
        m["entropy"] = torch.rand(m["logp"].shape, generator=gen)
        m["ref"] = m["logp"]
    return micro


Crafted = Callable[[torch.Generator], list[dict[str, torch.Tensor]]]


def _run(
    config: Any, out: Path, crafted: Crafted | None = None
) -> tuple[_Trainer, float, torch.Tensor]:
    """Both micro-batches (`_micro_batches`, or `crafted(gen)`) through the recording
    `_compute_loss`, logged as step 1; returns the trainer, TRL's step loss and minus the
    gradient of TRL's loss w.r.t. each recorded token's log-prob (in the recorded order)."""
    trainer = _trainer(config, out)
    gen = torch.Generator().manual_seed(0)
    total, grads = 0.0, []
    batches = _micro_batches(gen, config.use_vllm) if crafted is None else crafted(gen)
    for m in batches:
        rows, width = m["logp"].shape
        leaf = m["logp"].clone().requires_grad_(True)
        trainer._next = (leaf, m["entropy"])
        inputs = {
            "prompt_ids": torch.zeros(rows, 1, dtype=torch.long),
            "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
            "completion_ids": torch.zeros(rows, width, dtype=torch.long),
            "completion_mask": m["mask"],
            "advantages": m["adv"],
            "old_per_token_logps": m["old"],
            "ref_per_token_logps": m["ref"],
            "num_items_in_batch": torch.tensor(float(SCORED)),
            GROUP_KEY: m["group"],
            REWARD_KEY: (m["adv"] > 0).float(),
        }
        if "is_ratio" in m:
            inputs["importance_sampling_ratio"] = m["is_ratio"]
        loss = trainer._compute_loss(None, inputs)
        total += float(loss.detach())
        (grad,) = torch.autograd.grad(loss, leaf)
        grads.append(-grad[every_row(m["mask"].bool())])
    assert trainer._sd_buffer is not None
    metrics = trainer._metrics["train"]  # as RecordingTrainer._get_grad_norm passes them
    trainer._sd_buffer.log(1, grad_norm=1.0, max_grad_norm=1.0, lr=1e-6, metrics=metrics)
    trainer._sd_buffer.recorder.close()
    return trainer, total, torch.cat(grads)


CONFIGS = {
    "grpo": {"loss_type": "grpo", "mask_truncated_completions": True},
    "bnpo": {"loss_type": "bnpo"},
    "dr_grpo": {"loss_type": "dr_grpo", "mask_truncated_completions": True},
    "dapo": {"loss_type": "dapo", "epsilon_high": 0.28},
    "dapo-recorded": {"loss_type": "dapo", "steps_per_generation": 4},
    "cispo": {"loss_type": "cispo", "epsilon_high": 1.5},
    "sapo": {"loss_type": "sapo", "mask_truncated_completions": True},
    "luspo": {"loss_type": "luspo"},
    "vespo": {"loss_type": "vespo"},
    "delta": {"loss_type": "grpo", "delta": 1.5, "mask_truncated_completions": True},
    "gspo": {
        "loss_type": "grpo",
        "importance_sampling_level": "sequence",
        "mask_truncated_completions": True,
    },
    "luspo-sequence": {"loss_type": "luspo", "importance_sampling_level": "sequence"},
    # GSPO with another aggregation: the sequence ratio's clip, TRL's loss_type normaliser
    "gspo-dapo": {"loss_type": "dapo", "importance_sampling_level": "sequence"},
    "gspo-dapo-recorded": {
        "loss_type": "dapo",
        "importance_sampling_level": "sequence",
        "steps_per_generation": 4,
    },
    "gspo-bnpo": {"loss_type": "bnpo", "importance_sampling_level": "sequence"},
    # TRL's two-sided clip on the sequence ratio (sequences with A < 0 past delta discarded)
    "gspo-delta": {
        "loss_type": "grpo",
        "importance_sampling_level": "sequence",
        "delta": 1.5,
        "mask_truncated_completions": True,
    },
    "gspo-dapo-delta": {"loss_type": "dapo", "importance_sampling_level": "sequence", "delta": 1.3},
    "luspo-sequence-delta": {
        "loss_type": "luspo",
        "importance_sampling_level": "sequence",
        "delta": 1.5,
    },
    "gspo-dr_grpo": {
        "loss_type": "dr_grpo",
        "importance_sampling_level": "sequence",
        "mask_truncated_completions": True,
    },
    # sapo, cispo and vespo: TRL's loss ignores delta, and the recorder keeps their spec
    "sapo-delta": {"loss_type": "sapo", "delta": 1.5, "mask_truncated_completions": True},
    "cispo-delta": {"loss_type": "cispo", "delta": 1.5},
    "vespo-delta": {"loss_type": "vespo", "delta": 1.5},
    "beta": {"loss_type": "grpo", "beta": 0.1, "mask_truncated_completions": True},
    "entropy-off-policy-beta": {
        "loss_type": "dapo",
        "beta": 0.1,
        "top_entropy_quantile": 0.5,
        "off_policy_mask_threshold": 0.05,
    },
    "vllm-weight": {
        "loss_type": "bnpo",
        "use_vllm": True,
        "vllm_importance_sampling_correction": True,
    },
    # weights on a sequence ratio, vLLM weights under the other loss types, asymmetric eps
    "gspo-entropy": {
        "mask_truncated_completions": True,
        "loss_type": "grpo",
        "importance_sampling_level": "sequence",
        "top_entropy_quantile": 0.5,
    },
    "gspo-dapo-vllm": {
        "loss_type": "dapo",
        "importance_sampling_level": "sequence",
        "use_vllm": True,
        "vllm_importance_sampling_correction": True,
    },
    "gspo-bnpo-vllm-beta": {
        "loss_type": "bnpo",
        "importance_sampling_level": "sequence",
        "use_vllm": True,
        "vllm_importance_sampling_correction": True,
        "beta": 0.1,
        "use_bias_correction_kl": False,
    },
    # GSPO's KL times the sequence ratio (use_bias_correction_kl, TRL's default)
    "gspo-beta": {
        "loss_type": "grpo",
        "importance_sampling_level": "sequence",
        "beta": 0.1,
        "mask_truncated_completions": True,
    },
    "vespo-seq-beta": {"loss_type": "vespo", "importance_sampling_level": "sequence", "beta": 0.1},
    "dr-entropy-trunc": {
        "loss_type": "dr_grpo",
        "top_entropy_quantile": 0.3,
        "mask_truncated_completions": True,
    },
    "luspo-vllm": {
        "loss_type": "luspo",
        "use_vllm": True,
        "vllm_importance_sampling_correction": True,
    },
    "delta-eps": {
        "mask_truncated_completions": True,
        "loss_type": "grpo",
        "epsilon": 0.1,
        "epsilon_high": 0.3,
        "delta": 1.5,
    },
    "cispo-vllm": {
        "loss_type": "cispo",
        "use_vllm": True,
        "vllm_importance_sampling_correction": True,
    },
    "sapo-entropy-vllm": {
        "mask_truncated_completions": True,
        "loss_type": "sapo",
        "top_entropy_quantile": 0.5,
        "use_vllm": True,
        "vllm_importance_sampling_correction": True,
    },
    "grpo-beta-biaskl-vllm": {
        "mask_truncated_completions": True,
        "loss_type": "grpo",
        "beta": 0.1,
        "use_vllm": True,
        "vllm_importance_sampling_correction": True,
    },
    "dapo-offpolicy-vllm": {
        "loss_type": "dapo",
        "off_policy_mask_threshold": 0.05,
        "use_vllm": True,
        "vllm_importance_sampling_correction": True,
    },
    "gspo-offpolicy-trunc": {
        "loss_type": "dapo",
        "importance_sampling_level": "sequence",
        "off_policy_mask_threshold": 0.05,
        "mask_truncated_completions": True,
    },
    "vespo-seq-entropy": {
        "loss_type": "vespo",
        "importance_sampling_level": "sequence",
        "top_entropy_quantile": 0.5,
    },
    "luspo-seq-entropy": {
        "loss_type": "luspo",
        "importance_sampling_level": "sequence",
        "top_entropy_quantile": 0.5,
    },
}


def _config(tmp_path: Path, **overrides: Any) -> Any:
    """TRL's config of the crafted step: 2 micro-batches of 2 groups of 2, one process."""
    return trl.GRPOConfig(
        output_dir=str(tmp_path / "trl"),
        report_to="none",
        use_cpu=True,
        num_generations=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_completion_length=WIDTH,
        **overrides,
    )


@pytest.mark.parametrize("case", list(CONFIGS))
def test_degenerate_micro_batches_replay_trls_loss_metrics_and_gradient(
    tmp_path: Path, case: str
) -> None:
    config = _config(tmp_path, num_iterations=2, **CONFIGS[case])
    trainer, loss, minus_grad = _run(config, tmp_path / "run")
    spec = trainer.stabledrl_policy.spec
    if CONFIGS[case]["loss_type"] in ("sapo", "cispo", "vespo"):
        assert "delta" not in spec
    step = sd.open_run(tmp_path / "run").step(1)
    assert step.scalars["loss"] == pytest.approx(loss, rel=1e-6)
    assert int(step["mask"].sum()) == SCORED
    weights = sd.get_policy(spec).weights(policy_batch(step))
    assert -float(weights.objective) == pytest.approx(loss, rel=1e-5, abs=1e-7)
    assert torch.isfinite(minus_grad).all()
    scale = float(minus_grad.abs().max())
    assert torch.allclose(weights.coef, minus_grad, rtol=1e-4, atol=1e-6 * scale)
    own = sd.replay(tmp_path / "run", [spec], device="cpu").own
    assert own is not None
    assert -float(own.series["objective"][0]) == pytest.approx(loss, rel=1e-5, abs=1e-7)
    logged = {
        k: [v for v in vals if not math.isnan(v)] for k, vals in trainer._metrics["train"].items()
    }
    names = {**TRL_METRICS, "trl_cispo_clip_ratio": "cispo_clip_ratio",
             "trl_vespo_phi_seq_mean": "vespo/phi_seq_mean"}  # fmt: skip
    compared = 0
    for column, name in names.items():
        if name in logged:
            expected = sum(logged[name]) / len(logged[name])
            assert float(own.series[column][0]) == pytest.approx(expected, abs=1e-6), column
            compared += 1
    assert compared > 0 or CONFIGS[case]["loss_type"] == "sapo"


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_trls_low_min_and_high_max_skip_a_row_masked_whole(tmp_path: Path, level: str) -> None:
    """clip_ratio/low_min and high_max, TRL's nanmin/nanmax over a micro-batch's rows (a row
    masked whole is skipped, not a 0) averaged over the micro-batches, replayed as logged."""
    config = _config(tmp_path, loss_type="grpo", importance_sampling_level=level)
    trainer, _, _ = _run(config, tmp_path / "run", _extreme_micro_batches)
    logged = trainer._metrics["train"]
    if level == "token":
        assert logged["clip_ratio/low_min"] == pytest.approx([0.2, 0.0])
        assert logged["clip_ratio/high_max"] == pytest.approx([0.0, 1.0])
    own = sd.replay(tmp_path / "run", [trainer.stabledrl_policy.spec], device="cpu").own
    assert own is not None
    for column in ("trl_clip_ratio_low_min", "trl_clip_ratio_high_max"):
        values = [v for v in logged[TRL_METRICS[column]] if not math.isnan(v)]
        expected = sum(values) / len(values)
        assert float(own.series[column][0]) == pytest.approx(expected, abs=1e-6), column


def _gentle_micro_batches(
    gen: torch.Generator, whole: bool, weighted: bool
) -> list[dict[str, torch.Tensor]]:
    """`_micro_batches`' layout (18 scored tokens) with log-ratios and KL offsets of a few
    tenths, so every sequence's KL term shows in the gradient: micro-batch 0 has rows of 4, 0
    (`whole`) or 1, 5 and 5 or 4 scored tokens, micro-batch 1 one token a row; vLLM-style
    token weights when `weighted`."""
    micro = []
    for width in (WIDTH, 1):
        logp = -torch.rand(ROWS, width, generator=gen) * 3
        mask = torch.ones(ROWS, width, dtype=torch.long)
        if width > 1:
            mask[0, 4] = 0
            mask[1, 0 if whole else 1 :] = 0
            mask[3, 4] = int(whole)
        base = len(micro) * 2
        micro.append({
            "logp": logp,
            "old": logp - 0.3 * torch.randn(logp.shape, generator=gen),
            "ref": logp - 0.5 * torch.randn(logp.shape, generator=gen),
            "adv": torch.tensor([1.0, -1.0, 0.5, -0.5]),
            "mask": mask,
            "group": torch.tensor([base, base, base + 1, base + 1]),
            "entropy": torch.rand(logp.shape, generator=gen),
        })  # fmt: skip
        if weighted:
            micro[-1]["is_ratio"] = 0.5 + torch.rand(logp.shape, generator=gen)
    return micro


KL_SEQUENCE_CONFIGS = {
    "grpo": {"loss_type": "grpo"},
    "dapo": {"loss_type": "dapo"},
    "bnpo": {"loss_type": "bnpo"},
    "dr_grpo": {"loss_type": "dr_grpo"},
    "luspo": {"loss_type": "luspo"},
    "delta": {"loss_type": "grpo", "delta": 1.1},
    "entropy": {"loss_type": "grpo", "top_entropy_quantile": 0.5},
    "vllm": {"loss_type": "bnpo", "use_vllm": True, "vllm_importance_sampling_correction": True},
    "vespo": {"loss_type": "vespo"},
}


@pytest.mark.parametrize("layout", ["rows-scored", "row-masked-whole", "on-policy"])
@pytest.mark.parametrize("case", list(KL_SEQUENCE_CONFIGS))
def test_gspos_kl_times_the_sequence_ratio_replays_trls_loss_and_gradient(
    tmp_path: Path, case: str, layout: str
) -> None:
    """TRL's sequence-level sampling with beta and use_bias_correction_kl (its default)
    multiplies each token's KL term by the sequence ratio, whose gradient reaches every token
    of the sequence, on policy too (TRL's old log-probs then are the detached new ones, s_i 1).
    Before kl_is=sequence the recording trainer refused the config; kl_is=token in its place is
    11% to 90% off some token's gradient on these batches (measured), this 8e-7 at most. A row
    masked whole needs mask_truncated_completions (rows=all)."""
    whole, on_policy = layout != "rows-scored", layout == "on-policy"
    config = _config(
        tmp_path,
        num_iterations=1 if on_policy else 2,
        importance_sampling_level="sequence",
        beta=0.1,
        mask_truncated_completions=whole,
        **KL_SEQUENCE_CONFIGS[case],
    )

    def crafted(gen: torch.Generator) -> list[dict[str, Any]]:
        micro: list[dict[str, Any]] = _gentle_micro_batches(gen, whole, config.use_vllm)
        for m in micro if on_policy else ():
            m["old"] = None
        return micro

    trainer, loss, minus_grad = _run(config, tmp_path / "run", crafted)
    spec = trainer.stabledrl_policy.spec
    assert "kl_is=sequence" in spec
    weights = sd.get_policy(spec).weights(policy_batch(sd.open_run(tmp_path / "run").step(1)))
    assert -float(weights.objective) == pytest.approx(loss, rel=1e-5)
    assert torch.allclose(weights.coef, minus_grad, rtol=1e-5, atol=1e-9)
