"""The per-process `Session` the verl hooks (`_verl_hooks`) share: where the run is written,
the Recorder opened at the first optimizer step with the spec mapped from the actor's config,
and the state kept between steps (the pending step, the rollout's prompt groups, the first
failure).
"""

from __future__ import annotations

import importlib.metadata
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu

from stabledrl_cli.capture._status import RecordingFailure
from stabledrl_cli.dump import Recorder
from stabledrl_cli.dump._manifest_edits import change_manifest
from stabledrl_cli.dump._policy import policy_entry
from stabledrl_cli.dump._setup import RunNotEmpty
from stabledrl_cli.errors import warn
from stabledrl_cli.integrations._verl_capture import Groups, MicroBatch, StepLog, logged_scalars
from stabledrl_cli.integrations._verl_policy import (
    agg_mode,
    loss_mode,
    policy_changed,
    policy_for_actor_config,
    unidentified_loss,
)

REJECTED_FROM = "rejected_tokens_from_step"
"""The manifest's meta key naming the step from which the run's spec counts the tokens verl's
rollout rejection sampling left in token-mean's count (`Session._count_rejected`)."""


@dataclass
class PendingStep:
    """An optimizer step taken, not written yet."""

    log: StepLog
    recorder: Recorder
    micro: list[MicroBatch]
    groups: Groups | None


@dataclass
class Session:
    """This process's recording: where to write, and the state between optimizer steps."""

    out: Path
    overwrite: bool | None
    """True or False as install() was given it; None: record's --force, which the Recorder
    takes once for the command (`_run_env.forced_run`)."""
    reward_range: tuple[float, float] | None = None
    """(low, high) the reward spans, recorded in the manifest."""
    recorder: Recorder | None = None
    """Opened at the first recorded step (it needs the rank and the actor's config)."""
    policy_spec: str = ""
    """The spec the run records, mapped from the actor's config and its first micro-batch;
    "" when the actor's loss is a user's (`unidentified_loss`: the run records no policy)."""
    rejected_tokens: bool = False
    """Whether a step so far held tokens verl's rollout rejection sampling left out of the
    loss but not of token-mean's count (`rejects`): the run's spec then takes verl's
    recorded normaliser, which replays every step, earlier ones too (`_count_rejected`)."""
    rollout_rejects: bool = False
    """Whether the current rollout holds such tokens on some data-parallel rank (gathered by
    `train_mini_batch`, so that every rank maps the same spec)."""
    mapped: tuple[int | None, torch.dtype] = (None, torch.float32)
    """The (response_width, logp_dtype) of the first micro-batch, which the run's spec maps
    (once it is open)."""
    step: int = 0
    """The next step number (this process's count of recorded optimizer steps)."""
    inner_step: int = 0
    """Updates since the current rollout arrived."""
    groups: Groups | None = None
    """The current rollout's prompt groups, when `train_mini_batch` gathered them."""
    in_worker: bool = False
    """Inside `TrainingWorker.train_batch`, which writes the step once verl's metrics of it
    are in."""
    pending: PendingStep | None = None
    """The step the engine took, waiting for verl's metrics of it (`in_worker`)."""
    failure: RecordingFailure = field(default_factory=RecordingFailure)
    group_size: int | None = None
    """The run's `meta.num_generations` (once it is open; None without one)."""
    world_size: int = 1
    """The run's data-parallel ranks (once it is open)."""
    said_group_sizes: bool = False
    """Whether `check_group_sizes` has warned."""
    unrecorded: set[str] = field(default_factory=set)
    """The losses of verl's engine that are not recorded and have been said (`passed_over`)."""
    originals: dict[str, Callable[..., Any]] = field(default_factory=dict)
    """verl's own methods, restored by `uninstall()`."""

    def fail(self, exc: BaseException, context: str) -> None:
        """Reports the first failure once (stderr and `stabledrl record`); recording stops,
        noted in the run (its manifest's `recording_stopped`) once the Recorder is open."""
        message = self.failure.fail(exc, context)
        if message is not None and self.recorder is not None:
            self.recorder.note_stop(message, self.step)

    def passed_over(self, name: str) -> None:
        """Says once that the engine trains with the loss `name`, which is not recorded."""
        if name not in self.unrecorded and not self.off:
            self.unrecorded.add(name)
            warn(
                f"stabledrl: warning: verl's engine trains with the loss {name}, which is not "
                "recorded (verl's ppo_loss is): its steps are not in the run\n"
            )

    def check_group_sizes(self) -> None:
        """Leaves the prompt groups of the current rollout unrecorded (`Groups.recorded`)
        when it has a group of another size than the run's `num_generations` (written at its
        first step: a later rollout's prompts took their own `__rollout_n__`) and the run has
        several ranks, whose join would take the part of such a group a step holds for the
        whole group when its size is num_generations; said once. Every rank decides the same
        (the rollout's groups are gathered over the ranks). One rank's step has no join: its
        split marks are the rollout's own sizes, kept. The group of verl's padding samples
        is no prompt's (`Groups.prompt_sizes`): its rows are unscored, whatever the join reads."""
        size, groups = self.group_size, self.groups
        if groups is None or size is None or self.world_size == 1 or self.off:
            return
        other = sorted(groups.prompt_sizes() - {size})
        if not other:
            return
        self.groups = replace(groups, recorded=False)
        if not self.said_group_sizes:
            self.said_group_sizes = True
            warn(
                f"stabledrl: warning: a rollout has prompt groups of {other[0]} responses, "
                f"not the run's num_generations {size} (a prompt's own __rollout_n__): the "
                "steps of such a rollout record no prompt groups (group_id, group_split), "
                "since the join of the ranks would read part of such a group as whole; a "
                "replay that recomputes advantages (adv=) is refused at them\n"
            )

    @property
    def off(self) -> bool:
        """Whether recording is off (after its first failure)."""
        return self.failure.off

    def close(self) -> None:
        """Closes the Recorder (registered with atexit; safe to call twice)."""
        recorder, self.recorder = self.recorder, None
        if recorder is not None:
            try:
                recorder.close()
            except Exception as exc:
                self.fail(exc, "closing the verl run")

    def write(self, output: TensorDict | None) -> None:
        """Writes the pending step as step `step`, with the scalars `logged_scalars` takes
        from verl's metrics of it in `output`, `TrainingWorker.train_batch`'s (None: without
        them)."""
        pending, self.pending = self.pending, None
        if pending is None or self.off:
            return
        try:
            if output is not None:
                pending.log.scalars.update(logged_scalars(tu.get(output, "metrics")))
            pending.log.write(pending.recorder, self.step, pending.micro, pending.groups)
            self.failure.stopped(pending.recorder.stopped, f"recording step {self.step}")
            self.step += 1
        except Exception as exc:
            self.fail(exc, f"recording step {self.step}")

    def open(self, engine: Any, config: Any, micro: list[MicroBatch]) -> Recorder:
        """The Recorder of this data-parallel rank, opened on the first step; UsageError when
        a step's micro-batches map to another policy than the run's (`_same_policy`)."""
        if self.recorder is None:
            world_size = int(engine.get_data_parallel_size())
            unidentified = unidentified_loss(config)
            policy = None
            if unidentified is None:
                self.rejected_tokens = self.rejects(micro)
                self.mapped = (micro[0].response_width, micro[0].logp_dtype)
                policy = policy_for_actor_config(
                    config, *self.mapped, rejected_tokens=self.rejected_tokens
                )
                self.policy_spec = policy.spec
            else:
                warn(
                    f"stabledrl: warning: {unidentified}; its steps are recorded with no "
                    "policy (the manifest's meta.policy_unidentified)\n"
                )
            generations = _num_generations(config, self.groups)
            self.group_size = generations.get("num_generations")
            self.world_size = world_size
            try:
                self.recorder = Recorder(
                    self.out,
                    policy=policy,
                    meta={
                        "framework": "verl",
                        "verl_version": importlib.metadata.version("verl"),
                        "loss_mode": loss_mode(config),
                        "loss_agg_mode": agg_mode(config),
                        "loss_scale_factor": _meta_number(config.loss_scale_factor),
                        "loss": "verl's policy loss (pg + kl) of a rank; the step's is their mean",
                        **generations,
                        **({"policy_unidentified": unidentified} if unidentified else {}),
                        **self._rejected_from(config),
                    },
                    reward_range=self.reward_range,
                    world_size=world_size,
                    rank=int(engine.get_data_parallel_rank()) if world_size > 1 else 0,
                    overwrite=self.overwrite,
                    group_ids="global"
                    if self.groups is not None or world_size == 1
                    else "per_rank",
                    on_write_error="warn",
                )
            except RunNotEmpty as exc:  # in the words of what verl's recording takes
                raise exc.advised(  # (each process numbers its steps from 0)
                    "verl's recording continues no run: record a later job into a --out of its own",
                    "pass install(overwrite=True) or set $STABLEDRL_FORCE=1 to replace the run "
                    "(verl's recording continues no run: a resumed job records into a new "
                    "directory)",
                ) from None
        if self.policy_spec:
            self._same_policy(config, micro)
        return self.recorder

    def rejects(self, micro: list[MicroBatch]) -> bool:
        """Whether this step's rollout (on some rank) or micro-batches hold tokens rollout
        rejection sampling left in token-mean's count (`MicroBatch.rejected_tokens`)."""
        return self.rollout_rejects or any(m.rejected_tokens for m in micro)

    def _rejected_from(self, config: Any) -> dict[str, int]:
        """The manifest's meta.rejected_tokens_from_step, this step, when rejected tokens map
        the run's spec to another (token-mean's agg=recorded); else none."""
        if not self.rejected_tokens:
            return {}
        plain = policy_for_actor_config(config, *self.mapped).spec
        return {} if plain == self.policy_spec else {REJECTED_FROM: self.step}

    def _same_policy(self, config: Any, micro: list[MicroBatch]) -> None:
        """UsageError when this step's micro-batches map to another policy than the run's:
        seq-mean-token-sum-norm without loss_scale_factor divides by each micro-batch's padded
        response width, kl_cov and dppo compute in its log-probs' dtype, and the run's spec
        holds the first step's. The first step to hold rejected tokens changes the run's spec
        instead (`_count_rejected`)."""
        recorder = self.recorder
        if recorder is not None and not self.rejected_tokens and self.rejects(micro):
            self._count_rejected(config, recorder)
        rejected = self.rejected_tokens
        for width, dtype in {(m.response_width, m.logp_dtype) for m in micro}:
            spec = policy_for_actor_config(
                config, response_width=width, logp_dtype=dtype, rejected_tokens=rejected
            ).spec
            if spec != self.policy_spec:
                raise policy_changed(spec, self.policy_spec)

    def _count_rejected(self, config: Any, recorder: Recorder) -> None:
        """Maps the run's spec again at this step, the first to hold rejected tokens: the
        first step's with them (token-mean: agg=recorded, verl's normaliser, which every step
        recorded, so the earlier steps replay by it too). A spec that changes goes into the
        manifest with meta.rejected_tokens_from_step, said in one warning."""
        self.rejected_tokens = True
        policy = policy_for_actor_config(config, *self.mapped, rejected_tokens=True)
        if policy.spec == self.policy_spec:
            return
        entry, step = policy_entry(policy, None), self.step

        def turned(manifest: dict[str, Any]) -> None:  # one rewrite: no reader sees half of it
            manifest["policy"] = entry
            manifest["meta"] = {**manifest.get("meta", {}), REJECTED_FROM: step}

        change_manifest(recorder.path, turned)
        warn(
            f"stabledrl: warning: step {self.step} holds tokens verl's rollout rejection "
            f"sampling left in token-mean's count: the run's spec is now {policy.spec}, not "
            f"{self.policy_spec} (meta.rejected_tokens_from_step; verl's normaliser, recorded "
            "at every step, replays the earlier steps too)\n"
        )
        self.policy_spec = policy.spec


def _meta_number(value: Any) -> Any:
    """A verl setting as the run's meta holds it: as it is, or a float JSON has not (inf, nan:
    a loss_scale_factor verl does not divide by) as its text."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def _num_generations(config: Any, groups: Groups | None) -> dict[str, int]:
    """The manifest's `num_generations`: the responses verl generates a prompt
    (`rollout_n`, rollout.n), by which a multi-rank join tells a whole group; none unknown,
    nor when a group of the rollout has another size (verl's v1 trainer takes a prompt's own
    `__rollout_n__`): a join would take a part of a larger group for a whole one. The group
    of verl's padding samples is no prompt's (`Groups.prompt_sizes`)."""
    n = getattr(config, "rollout_n", None)
    if type(n) is not int or n <= 0:
        return {}
    if groups is not None and groups.prompt_sizes() - {n}:
        return {}
    return {"num_generations": n}
