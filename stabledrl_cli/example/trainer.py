"""The built-in example: RL on a tiny masked diffusion LM, recorded step by step.

Algorithm (GRPO-style, as StableDRL's code runs it on LLaDA), simplified to fit a CPU minute:
1. Pretrain the model briefly on noisy sorted answers, so rewards start in between.
2. Each rollout: P prompts x G completions by iterative unmasking; reward = fraction correct;
   group-relative advantages A_i = r_i - mean(group) (no std division).
3. The old log-likelihood is computed once at rollout time, under its own mask sample.
4. mu inner iterations: score the same sequences under a mask (a fresh independent one for
   `unit=sequence`, which is StableDRL's code and puts masking noise in the ratio; the rollout's
   mask for `same_mask` and for `unit=token`), ask the catalogue policy for dJ/dlogp, and
   minimise `-(coef.detach() * logp).sum()`; clip the grad norm; AdamW.
5. Optional gradient geometry (`geometry=GeometryConfig(...)`): after the backward and before
   `optimizer.step()`, the per-unit gradients of exactly the logp that the loss used (same
   tokens, noise masks and weights, same parameters) give the Gram matrix or sketch of the
   step, and `grad_norm_covered` is the pre-clip norm over the covered parameters. The loss's
   gradient is -sum_u coef_u grad(logp_u), so sqrt(coef^T K coef) is that norm.
6. Optional checkpoints (`checkpoints=CheckpointPlan(...)`) at rollout boundaries, and resume
   from one (`resume=`): pretraining is skipped, the model, AdamW state and generator state are
   restored, and the loop continues at the checkpoint's step and rollout, bit for bit as the
   original run went on under the same policy (example/checkpoint.py).
Simplifications: one mask sample per estimate, digits-only sampling, no KL, no reference model.

All randomness of training comes from one `torch.Generator` seeded with `seed` (CPU):
a seed gives bit-identical recorded arrays on CPU. Nothing else may draw from it: the
geometry's sketch matrix has its own generator, and a Gram draws nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from stabledrl_cli.capture.geometry import GeometryConfig, covered_grad_norm, covered_parameters
from stabledrl_cli.dump import Recorder
from stabledrl_cli.dump._training_end import cut_short
from stabledrl_cli.errors import UsageError
from stabledrl_cli.example._model import TinyDiffusionLM
from stabledrl_cli.example.checkpoint import (
    CheckpointPlan,
    TrainingState,
    check_resumable,
    restore,
    save_checkpoint,
)
from stabledrl_cli.example.config import ExampleConfig
from stabledrl_cli.example.estimator import MaskSample, draw_mask, sequence_logp, token_logp
from stabledrl_cli.example.pretrain import pretrain
from stabledrl_cli.example.rollout_state import guard_record, training_state
from stabledrl_cli.example.run_setup import model_config
from stabledrl_cli.example.sampler import NonFiniteOutput, generate
from stabledrl_cli.example.step_geometry import geometry_keywords, geometry_unit_fn
from stabledrl_cli.example.task import SortTask
from stabledrl_cli.guard import Guard
from stabledrl_cli.policies import Policy, PolicyBatch, Weights, get_policy
from stabledrl_cli.vocab import Unit


@dataclass
class StepInfo:
    """What one optimizer step produced, handed to `on_step` observers (CPU tensors)."""

    step: int
    inner_step: int
    rollout: int
    reward_mean: float
    grad_norm: float
    loss: float
    arrays: dict[str, torch.Tensor] = field(repr=False)
    coef: torch.Tensor = field(repr=False)
    grad_norm_covered: float | None = None
    """Pre-clip norm over the geometry's covered parameters (None without geometry)."""
    geometry: dict[str, Any] = field(default_factory=dict, repr=False)
    """The step's recorded geometry (`unit_grad_gram` or `unit_grad_sketch`, CPU), or {}."""


@dataclass
class TrainResult:
    """What a training run did, for the summary `record` prints."""

    steps: int
    """RL optimizer steps taken by this call, from the checkpoint it resumed when it resumed
    one (fewer than asked when the model diverged)."""
    start_reward: float
    """Mean reward over the first 10% of the steps."""
    final_reward: float
    """Mean reward over the last 10% of the steps."""
    wall_seconds: float
    """Pretraining and RL, wall clock."""
    rl_seconds: float
    """The RL phase alone, wall clock."""
    nonfinite_steps: int
    """Steps whose grad norm or loss was not finite (recorded; their update skipped by default)."""
    nonfinite_skipped: int
    """Those of `nonfinite_steps` whose update was not taken (by `skip_nonfinite`, or by the
    guard, which skips a non-finite grad norm whatever `skip_nonfinite` says)."""
    diverged_at: int | None
    """The step after which the weights, or the outputs they gave, were not finite (the run
    stopped there), or None."""
    guard_scaled: int = 0
    """Steps whose gradient the guard scaled (`Decision.apply`): a step it flagged to scale
    whose clipped gradient clip_grad_norm_ had already cut further is not one."""

    @property
    def ms_per_step(self) -> float:
        """Wall milliseconds per RL step."""
        return 1000.0 * self.rl_seconds / max(self.steps, 1)


def _rollout_arrays(
    config: ExampleConfig,
    reward: torch.Tensor,
    advantages: torch.Tensor,
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    score_mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Per-unit arrays in the recorded layout (flat, row-major).

    Sequence unit: one entry per sequence. Token unit: the completion positions of every
    sequence, [B * L_c], with mask = the hidden positions that the estimator scored.
    """
    n = reward.shape[0]
    group_id = torch.arange(n, device=reward.device) // config.group_size
    if config.unit == "sequence":
        seq_id = torch.arange(n, device=reward.device)
        mask = torch.ones(n, dtype=torch.uint8, device=reward.device)
        per_unit_adv = advantages
    else:
        width = logp.shape[1]
        seq_id = torch.arange(n, device=reward.device).repeat_interleave(width)
        mask = score_mask.reshape(-1).to(torch.uint8)
        per_unit_adv = advantages.repeat_interleave(width)
        logp, logp_old = logp.reshape(-1), logp_old.reshape(-1)
    return {
        "logp": logp,
        "logp_old": logp_old,
        "advantages": per_unit_adv,
        "mask": mask,
        "seq_id": seq_id.to(torch.int32),
        "group_id": group_id.to(torch.int32),
        "reward": reward,
    }


def policy_loss(
    policy: Policy, arrays: dict[str, torch.Tensor], unit: Unit
) -> tuple[torch.Tensor, Weights]:
    """The example's loss: `-(coef.detach() * logp).sum()` with coef = dJ/dlogp from `policy`.

    arrays: the recorded layout (`logp` [T] still attached to the graph). Its gradient is
    -sum_u coef_u grad(logp_u): the catalogue's update, whatever the policy.
    Returns (loss, the policy's weights).
    """
    weights = policy.weights(
        PolicyBatch(
            logp=arrays["logp"].detach(),
            logp_old=arrays["logp_old"],
            advantages=arrays["advantages"],
            mask=arrays["mask"],
            seq_id=arrays["seq_id"],
            group_id=arrays["group_id"],
            reward=arrays["reward"],
            unit=unit,
        )
    )
    return -(weights.coef.detach() * arrays["logp"]).sum(), weights


def note_cut_short(recorder: Recorder, how: str, first: int, end: int) -> None:
    """Notes in `recorder`'s run that its training of steps `first`..`end` - 1 was cut short,
    `how` (`cut_short` of the Ctrl-C or error; a divergence), at the first step it does not
    hold (`Recorder.note_stop`: the manifest's `recording_stopped`, which `inspect` and
    `replay` show): closed by its `with` block on the way out, the run would read as a
    finished one of fewer steps."""
    last = recorder.last_step
    at = first if last is None or last < first else last + 1
    recorder.note_stop(
        f"training {how} at step {at}, {at - first} of the {end - first} steps asked "
        f"({first}..{end - 1}) recorded",
        at,
    )


def train(
    config: ExampleConfig,
    *,
    recorder: Recorder | None = None,
    device: torch.device | str = "cpu",
    on_step: Callable[[StepInfo], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    geometry: GeometryConfig | None = None,
    checkpoints: CheckpointPlan | None = None,
    resume: TrainingState | None = None,
    guard: Guard | None = None,
) -> TrainResult:
    """Pretrain, then run RL optimizer steps up to step `config.steps`, logging each to
    `recorder`.

    geometry: record each step's gradient geometry and `grad_norm_covered` (None or kind
    "none": neither). It draws nothing from the training generator: the same seed gives the
    same run with and without it.
    checkpoints: write a checkpoint at the first rollout boundary at or after each multiple of
    `checkpoints.every` (example/checkpoint.py).
    resume: continue from a checkpoint instead of pretraining; `config` may differ from the
    checkpoint's settings only in policy and steps (UsageError otherwise).
    guard: asked before each `optimizer.step()` (stabledrl_cli.guard): a step it skips is not
    taken, a step it scales has its gradient scaled; each decision is in the step's scalars.
    """
    if geometry is not None and geometry.kind == "none":
        geometry = None
    if resume is not None:
        check_resumable(resume, asdict(config))
    device = torch.device(device)
    policy = get_policy(config.policy)
    estimator = config.estimator_config
    task = SortTask(length=config.digits)
    started = time.perf_counter()
    rng = torch.Generator().manual_seed(config.seed)  # the one training RNG (see module doc)

    model = TinyDiffusionLM(model_config(config))
    model.reset_parameters(rng)
    model.to(device)
    if geometry is not None:
        covered_parameters(model, geometry)  # a pattern that matches nothing fails now
    unit_fn = geometry_unit_fn(config.unit, task.prompt_len)
    if resume is None:
        if on_phase is not None:
            on_phase("pretrain")
        pretrain(
            model,
            task,
            steps=config.pretrain_steps,
            batch_size=config.pretrain_batch,
            lr=config.pretrain_lr,
            noise=config.pretrain_noise,
            generator=rng,
            device=device,
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    if resume is not None:
        restore(resume, model, optimizer, rng)
    if on_phase is not None:
        on_phase("rl")
    rl_started = time.perf_counter()
    n_seq = config.prompts_per_rollout * config.group_size
    prompt_len, width = task.prompt_len, task.length

    def estimate(tokens: torch.Tensor, sample: MaskSample) -> torch.Tensor:
        """[B] sequence ELBOs, or [B, L_c] per-token log-probs (token unit)."""
        mask_sample = MaskSample(sample.noise_mask.to(device), sample.weights.to(device))
        if config.unit == "sequence":
            return sequence_logp(model, tokens, mask_sample)
        return token_logp(model, tokens, mask_sample.noise_mask)[:, prompt_len:]

    rewards_seen: list[float] = []
    nonfinite = nonfinite_skipped = guard_scaled = 0
    diverged_at: int | None = None
    step = first_step = 0 if resume is None else resume.step
    rollout = 0 if resume is None else resume.rollout
    due = 0 if checkpoints is None or resume is None else checkpoints.next_due(step)
    if resume is not None and (resume.guard is None) != (guard is None):
        raise UsageError(
            "a resume goes on under the guard its checkpoint holds (`branch.branch_guard`): "
            + ("give it" if guard is None else "the checkpoint holds none")
        )
    guard_norms: list[float] = (
        [] if resume is None or resume.guard is None else resume.guard["norms"].tolist()
    )
    try:
        while step < config.steps:
            if checkpoints is not None and step >= due:
                save_checkpoint(
                    checkpoints.directory,
                    training_state(
                        step,
                        rollout,
                        model,
                        optimizer,
                        rng,
                        config,
                        geometry,
                        None if guard is None else guard_record(guard, guard_norms),
                    ),
                )
                due = checkpoints.next_due(step)
            prompts = task.sample_prompts(config.prompts_per_rollout, rng)
            prompts = prompts.repeat_interleave(config.group_size, dim=0).to(device)
            try:
                completions = generate(model, prompts, width, rng)
            except NonFiniteOutput:  # finite weights whose activations overflow
                diverged_at = step - 1
                break
            tokens = torch.cat([prompts, completions], dim=1)
            reward = task.reward(prompts, completions)
            group_mean = reward.view(-1, config.group_size).mean(dim=1, keepdim=True)
            advantages = (reward.view(-1, config.group_size) - group_mean).reshape(-1)
            old_sample = draw_mask(n_seq, prompt_len, width, estimator.kind, rng)
            with torch.no_grad():
                logp_old = estimate(tokens, old_sample)

            for inner_step in range(config.mu):
                if step >= config.steps:
                    break
                if estimator.same_mask:
                    sample = old_sample
                else:
                    sample = draw_mask(n_seq, prompt_len, width, estimator.kind, rng)
                logp = estimate(tokens, sample)
                score_mask = sample.noise_mask[:, prompt_len:].to(device)
                arrays = _rollout_arrays(config, reward, advantages, logp, logp_old, score_mask)
                surrogate, weights = policy_loss(policy, arrays, config.unit)
                coef = weights.coef.detach()
                optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward(surrogate)
                covered_norm = covered_grad_norm(model, geometry) if geometry is not None else None
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
                clip_scale = min(1.0, config.max_grad_norm / (grad_norm + 1e-6))
                # On the parameters and inputs this backward used, before the optimizer moves them.
                step_geometry = geometry_keywords(
                    model,
                    geometry,
                    unit_fn,
                    (tokens, sample.noise_mask.to(device), sample.weights.to(device)),
                    step,
                )
                decision = None
                if guard is not None:
                    decision = guard.before_step(grad_norm=grad_norm)
                    guard_norms.append(grad_norm)
                guarded = decision is not None and decision.skip
                scaled = 1.0  # the guard's factor on the clipped gradient (Decision.apply)
                if decision is not None and not guarded:
                    scaled = decision.apply(params, applied=clip_scale)
                    guard_scaled += scaled < 1.0
                stepped = (math.isfinite(grad_norm) or not config.skip_nonfinite) and not guarded
                if stepped:
                    optimizer.step()

                loss = -float(weights.objective)
                reward_mean = float(reward.mean())
                if not math.isfinite(grad_norm) or not math.isfinite(loss):
                    nonfinite += 1
                    nonfinite_skipped += not stepped
                rewards_seen.append(reward_mean)
                cpu_arrays = {k: v.detach().cpu() for k, v in arrays.items()}
                if recorder is not None:
                    recorder.log_step(
                        step,
                        **cpu_arrays,
                        grad_norm=grad_norm,
                        grad_norm_clipped=grad_norm * clip_scale * scaled,
                        loss=loss,
                        lr=config.lr,
                        inner_step=inner_step,
                        grad_norm_covered=covered_norm,
                        **step_geometry,
                        scalars={
                            "rollout": rollout,
                            "surrogate_loss": float(surrogate.detach()),
                            **(Guard.scalars(decision) if decision is not None else {}),
                        },
                    )
                if on_step is not None:
                    on_step(
                        StepInfo(
                            step=step,
                            inner_step=inner_step,
                            rollout=rollout,
                            reward_mean=reward_mean,
                            grad_norm=grad_norm,
                            loss=loss,
                            arrays=cpu_arrays,
                            coef=coef.cpu(),
                            grad_norm_covered=covered_norm,
                            geometry=step_geometry,
                        )
                    )
                step += 1
                if not all(bool(torch.isfinite(p).all()) for p in params):
                    diverged_at = step - 1
                    break
            rollout += 1
            if diverged_at is not None:
                break

    except BaseException as cut:  # Ctrl-C, an error: the run must not read as a finished one
        if recorder is not None:
            note_cut_short(recorder, cut_short(cut), first_step, config.steps)
        raise
    if recorder is not None and diverged_at is not None:  # nor a run that diverged
        how = f"stopped (its weights or outputs were not finite after step {diverged_at})"
        note_cut_short(recorder, how, first_step, config.steps)

    finished = time.perf_counter()
    window = max(1, len(rewards_seen) // 10)
    return TrainResult(
        steps=step - first_step,
        start_reward=sum(rewards_seen[:window]) / window,
        final_reward=sum(rewards_seen[-window:]) / window,
        wall_seconds=finished - started,
        rl_seconds=finished - rl_started,
        nonfinite_steps=nonfinite,
        nonfinite_skipped=nonfinite_skipped,
        diverged_at=diverged_at,
        guard_scaled=guard_scaled,
    )
