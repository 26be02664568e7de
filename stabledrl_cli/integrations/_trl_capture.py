"""One optimizer step of a TRL run, gathered micro-batch by micro-batch, then logged.

Framework-free: the trainer subclass (`_trl_trainer`) hands each micro-batch's tensors to
`StepBuffer.add` and the step's scalars to `StepBuffer.log`. Recording never breaks training:
the first failure is reported once on stderr (and to `stabledrl record`, which then exits
non-zero) and recording stops, noted in the run (its manifest's `recording_stopped`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from stabledrl_cli.capture._status import RecordingFailure
from stabledrl_cli.dump import Recorder
from stabledrl_cli.dump._schema import LOSS_AUX
from stabledrl_cli.errors import UsageError
from stabledrl_cli.importers._names import standard_source
from stabledrl_cli.integrations._rows import every_row

LOGGED_SCALARS = ("entropy", "kl", "clip_frac", "clip_frac_low", "clip_frac_high", "step_time")
"""The standard scalars a step takes from the metrics TRL logs, under the names `stabledrl
import` gives them (STANDARD_SOURCES: `entropy`, `kl`, `clip_ratio/region_mean`, ...)."""
ROLLOUT_REWARD_SOURCE = "reward"
"""TRL's metric of a generated rollout's mean reward (one value a rollout, appended as TRL
generates it): a step during which TRL generated one records their mean as `rollout_reward`,
and how many it is a mean of as `rollout_count`."""


@dataclass
class MicroBatch:
    """What TRL's loss used for one micro-batch. Token arrays are [B, L] (L = completion
    length of the micro-batch); per-sequence arrays are [B]."""

    logp: torch.Tensor
    logp_old: torch.Tensor
    advantages: torch.Tensor
    """[B, L] (TRL's [B] broadcast over the completion)."""
    mask: torch.Tensor
    """[B, L] completion_mask times tool_mask: the scored tokens."""
    kept: torch.Tensor
    """[B, L] bool, the completion's tokens (completion_mask): what is recorded (a row that
    keeps none keeps its first position, `_rows.every_row`)."""
    loss_scale: torch.Tensor
    """[B, L] the normaliser of each token's term in the step's (all ranks') objective."""
    group_id: torch.Tensor
    reward: torch.Tensor
    loss: float
    """The micro-batch's returned (already accumulation-scaled) loss."""
    loss_weight: torch.Tensor | None = None
    logp_ref: torch.Tensor | None = None
    logp_rollout: torch.Tensor | None = None
    token_count: torch.Tensor | None = None
    """[B] the tokens each row's log-prob sums over (a sequence-unit trainer's)."""
    loss_aux: float | None = None
    """The part of `loss` that is the MoE router loss TRL added (its coefficient times the
    router's load-balancing loss, scaled as TRL scales it), None without one."""


@dataclass
class LoggedMetrics:
    """The metrics TRL logs, step by step. TRL appends each value it computes to a list
    (`trainer._metrics["train"]`: one a micro-batch for the loss's, one a rollout or an
    optimizer step for others) and its `log` gives each list's mean over its values that are
    not NaN, then empties them all; the values appended since the previous optimizer step are
    this step's own."""

    marks: dict[str, tuple[list[float], int]] = field(default_factory=dict)
    """TRL's name -> (its list, the values it held at the previous step)."""

    def step(self, metrics: Mapping[str, list[float]]) -> dict[str, float]:
        """The step's LOGGED_SCALARS: each one's values since the previous step, averaged as
        TRL's `log` averages them (a mean over the values that are not NaN; none, where TRL
        logs None). With logging_steps=1 each is the value TRL logs for the step. And
        `rollout_reward` where TRL generated rollouts during the step: the mean of their
        rewards as TRL logs `reward` (NaN where it logs None: none scored), the mark of a
        rollout begun in the step that `rollouts.reward_draws` reads; and `rollout_count`,
        how many rollouts that is a mean of (a log written every k steps averages them)."""
        scalars: dict[str, float] = {}
        for standard in LOGGED_SCALARS:
            name = standard_source(standard, metrics)
            if name is None:
                continue
            valid = [v for v in self._since(name, metrics) if not math.isnan(v)]
            if valid:
                scalars[standard] = sum(valid) / len(valid)
        begun = self._since(ROLLOUT_REWARD_SOURCE, metrics)
        if begun:  # TRL generated rollouts during the step: their mean, NaN when none scored
            valid = [v for v in begun if not math.isnan(v)]
            scalars["rollout_reward"] = sum(valid) / len(valid) if valid else math.nan
            scalars["rollout_count"] = float(len(valid))
        self.marks = {name: (values, len(values)) for name, values in metrics.items()}
        return scalars

    def _since(self, name: str, metrics: Mapping[str, list[float]]) -> list[float]:
        """The values TRL appended to its list `name` since the previous step."""
        values = metrics.get(name, [])
        held, count = self.marks.get(name, (None, 0))
        return values[count if held is values else 0 :]


def _flat(rows: list[torch.Tensor], kept: list[torch.Tensor]) -> torch.Tensor:
    """Concatenates the kept tokens of each micro-batch, row-major: [T]."""
    return torch.cat([r[k] for r, k in zip(rows, kept, strict=True)])


def _group_split(group_id: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] uint8: 1 where the sequence's group has fewer than `group_size` sequences here."""
    _, inverse, counts = torch.unique(group_id, return_inverse=True, return_counts=True)
    split: torch.Tensor = counts[inverse] < group_size
    return split.to(torch.uint8)


class StepBuffer:
    """Collects one optimizer step's micro-batches and logs them to a Recorder."""

    def __init__(self, recorder: Recorder, group_size: int) -> None:
        self.recorder = recorder
        self.group_size = group_size
        self.micro: list[MicroBatch] = []
        self.inner_step = 0
        self.failure = RecordingFailure()
        self.logged = LoggedMetrics()

    @property
    def failed(self) -> bool:
        """Whether recording is off (after its first failure)."""
        return self.failure.off

    def warn(self, what: str, exc: BaseException, step: int) -> None:
        """Reports the first failure on stderr and to `stabledrl record`; stops recording,
        noted in the run as stopped at `step` (the optimizer step it cannot record)."""
        message = self.failure.fail(exc, f"recording {what} failed")
        if message is not None:
            self.recorder.note_stop(message, step)

    def add(self, micro: MicroBatch, inner_step: int) -> None:
        """One micro-batch (moved to CPU); the first of a step sets the step's inner_step."""
        if not self.micro:
            self.inner_step = inner_step
        self.micro.append(micro)

    def log(
        self,
        step: int,
        *,
        grad_norm: float,
        max_grad_norm: float,
        lr: float,
        metrics: Mapping[str, list[float]],
    ) -> None:
        """Logs the gathered micro-batches as optimizer step `step`, with its LOGGED_SCALARS
        (`metrics`: TRL's lists, `LoggedMetrics`), then empties the buffer. UsageError when
        none was gathered: the step's loss never went through TRL's."""
        logged = self.logged.step(metrics)
        micro, self.micro = self.micro, []
        if not micro:
            raise UsageError(
                "no micro-batch went through TRL's _compute_loss (a compute_loss override "
                "that does not call it is not recorded)"
            )
        kept = [every_row(m.kept) for m in micro]

        def tokens(name: str) -> torch.Tensor:
            return _flat([getattr(m, name) for m in micro], kept)

        def optional(name: str) -> torch.Tensor | None:
            return None if getattr(micro[0], name) is None else tokens(name)

        sizes = [m.kept.shape[0] for m in micro]
        offsets = torch.tensor([0, *sizes[:-1]]).cumsum(0)
        seq_id = torch.cat(
            [
                (torch.arange(n) + o).unsqueeze(1).expand_as(k)[k]
                for n, o, k in zip(sizes, offsets.tolist(), kept, strict=True)
            ]
        )
        group_id = torch.cat([m.group_id for m in micro])
        reward = torch.cat([m.reward for m in micro])
        micro_batch = torch.cat(
            [torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(sizes)]
        )
        counts = [m.token_count for m in micro if m.token_count is not None]
        token_count = torch.cat(counts) if counts else None
        clip = min(1.0, max_grad_norm / (grad_norm + 1e-6)) if max_grad_norm > 0 else 1.0
        if micro[0].loss_aux is not None:  # kept apart from the policy's loss, as TRL adds it
            logged[LOSS_AUX] = sum(m.loss_aux or 0.0 for m in micro)
        self.recorder.log_step(
            step,
            logp=tokens("logp"),
            logp_old=tokens("logp_old"),
            advantages=tokens("advantages"),
            mask=tokens("mask"),
            seq_id=seq_id,
            group_id=group_id,
            reward=reward,
            micro_batch=micro_batch,
            group_split=_group_split(group_id, self.group_size),
            token_count=token_count,
            logp_ref=optional("logp_ref"),
            logp_rollout=optional("logp_rollout"),
            loss_weight=optional("loss_weight"),
            loss_scale=tokens("loss_scale"),
            grad_norm=grad_norm,
            grad_norm_clipped=grad_norm * clip if math.isfinite(grad_norm) else grad_norm,
            loss=sum(m.loss for m in micro),
            lr=lr,
            inner_step=self.inner_step,
            scalars=logged,
        )
        self.failure.stopped(self.recorder.stopped, f"recording step {step}")
