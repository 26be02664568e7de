"""The wrappers `install()` puts on verl's engine (`BaseEngine.train_batch`) and training
worker (`TrainingWorker.train_mini_batch`), recording into the per-process `Session` they
share (`_verl_session`), and how they tell the actor's loss from others verl trains with.

`train_batch` is one optimizer step: the wrapper hands the engine a loss function that calls
verl's own `ppo_loss` and then captures the micro-batch, and shadows the engine's
`optimizer_step` on the instance to read the pre-clip norm it returns; after the step it
logs the micro-batches as one stabledrl step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.workers.config import ActorConfig

from stabledrl_cli.errors import UsageError
from stabledrl_cli.integrations._verl_capture import (
    Groups,
    MicroBatch,
    StepLog,
    capture_micro_batch,
    rejects_tokens,
)
from stabledrl_cli.integrations._verl_policy import custom_loss_refused, distillation_refused
from stabledrl_cli.integrations._verl_session import PendingStep, Session

LossFunction = Callable[..., Any]


def _is_partial_of(loss_function: Any, module: str, name: str) -> bool:
    """True for a `functools.partial(module.name, config=...)`."""
    func = getattr(loss_function, "func", None)
    return (
        getattr(func, "__name__", "") == name
        and getattr(func, "__module__", "") == module
        and "config" in getattr(loss_function, "keywords", {})
    )


def _is_actor_loss(loss_function: Any) -> bool:
    """True for the actor's `functools.partial(ppo_loss, config=...)`."""
    return _is_partial_of(loss_function, "verl.workers.utils.losses", "ppo_loss")


def _is_distillation_loss(loss_function: Any) -> bool:
    """True for the actor's loss under `distillation.enabled` (`distillation_ppo_loss`)."""
    return _is_partial_of(
        loss_function, "verl.trainer.distillation.losses", "distillation_ppo_loss"
    )


VERLS_UNRECORDED_LOSSES = ("value_loss", "sft_loss")
"""verl's own losses that train no policy (a critic's, SFT's): they pass through unsaid."""


def _loss_name(loss_function: Any) -> str:
    """The loss function's module.name (a partial's function's)."""
    func = getattr(loss_function, "func", loss_function)
    module = getattr(func, "__module__", None)
    name = getattr(func, "__qualname__", None) or type(func).__name__
    return f"{module}.{name}" if module else name


def _refusal(loss_function: Any) -> UsageError | None:
    """Why an actor's loss cannot be recorded: verl's distillation loss, or a loss of its own
    given verl's actor config (`functools.partial(loss, config=ActorConfig)`, as verl's
    trainer gives ppo_loss); else None."""
    if _is_distillation_loss(loss_function):
        return distillation_refused()
    keywords = getattr(loss_function, "keywords", None)
    config = keywords.get("config") if isinstance(keywords, dict) else None
    if isinstance(config, ActorConfig) and not _is_actor_loss(loss_function):
        return custom_loss_refused(_loss_name(loss_function))
    return None


def _is_unrecorded_verl_loss(loss_function: Any) -> bool:
    """True for verl's own critic and SFT losses (`VERLS_UNRECORDED_LOSSES`)."""
    return any(
        _is_partial_of(loss_function, "verl.workers.utils.losses", name)
        for name in VERLS_UNRECORDED_LOSSES
    )


def _learning_rate(engine: Any) -> float | None:
    optimizer = getattr(engine, "optimizer", None)
    groups = getattr(optimizer, "param_groups", None)
    return float(groups[0]["lr"]) if groups else None


def _clip_threshold(engine: Any) -> float | None:
    value = getattr(getattr(engine, "optimizer_config", None), "clip_grad", None)
    return float(value) if value is not None else None


def train_batch_hook(session: Session) -> Callable[..., Any]:
    """`BaseEngine.train_batch`, recording the actor's optimizer steps into `session`."""
    original = session.originals["train_batch"]

    @functools.wraps(original)
    def train_batch(self: Any, data: TensorDict, loss_function: LossFunction) -> Any:
        actor = _is_actor_loss(loss_function)
        if not (actor or session.off) and self.is_mp_src_rank_with_outputs():
            refusal = _refusal(loss_function)
            if refusal is not None:
                session.fail(refusal, f"recording step {session.step}")
            elif not _is_unrecorded_verl_loss(loss_function):
                session.passed_over(_loss_name(loss_function))
        recording = not session.off and actor
        if not (recording and self.is_mp_src_rank_with_outputs()):
            return original(self, data, loss_function)
        config = getattr(loss_function, "keywords", {})["config"]
        micro: list[MicroBatch] = []
        seen: dict[str, Any] = {}

        def recording_loss(*args: Any, **kwargs: Any) -> Any:
            result = loss_function(*args, **kwargs)
            if "model_output" in kwargs and "data" in kwargs and not session.off:
                try:
                    micro.append(
                        capture_micro_batch(
                            config, kwargs["model_output"], kwargs["data"], result[1]
                        )
                    )
                except Exception as exc:
                    session.fail(exc, f"capturing a micro-batch of step {session.step}")
            return result

        step_fn = self.optimizer_step

        def optimizer_step() -> Any:
            try:
                seen["lr"] = _learning_rate(self)
            except Exception as exc:
                session.fail(exc, f"reading the learning rate of step {session.step}")
            grad_norm = step_fn()
            try:
                seen["grad_norm"] = float(grad_norm)
            except Exception as exc:
                session.fail(exc, f"reading the grad norm of step {session.step}")
            return grad_norm

        self.optimizer_step = optimizer_step
        try:
            outputs = original(self, data, recording_loss)
        finally:
            del self.optimizer_step
        last = bool(tu.get_non_tensor_data(data=data, key="update_lr_scheduler", default=False))
        if micro and "grad_norm" in seen and not session.off:
            try:
                log = StepLog(
                    grad_norm=seen["grad_norm"],
                    max_norm=_clip_threshold(self),
                    lr=seen["lr"],
                    inner_step=session.inner_step,
                )
                recorder = session.open(self, config, micro)
                session.pending = PendingStep(log, recorder, micro, session.groups)
            except Exception as exc:
                session.fail(exc, f"recording step {session.step}")
            if not session.in_worker:
                session.write(None)
        session.inner_step = 0 if last else session.inner_step + 1
        return outputs

    return train_batch


def worker_train_batch_hook(session: Session) -> Callable[..., Any]:
    """`TrainingWorker.train_batch`, writing the step its engine took with verl's metrics of
    it (gathered over the data-parallel ranks there)."""
    original = session.originals["worker_train_batch"]

    @functools.wraps(original)
    def train_batch(self: Any, data: TensorDict) -> Any:
        output = None
        session.in_worker = True
        try:
            output = original(self, data)
        finally:
            session.in_worker = False
            session.write(output)
        return output

    return train_batch


def _gathered(uids: list[str], rejects: bool, group: Any) -> tuple[list[str], bool]:
    """Every data-parallel rank's uids, in rank order, and whether any rank's part of the
    rollout holds rejected tokens (`rejects_tokens`), in one all_gather_object."""
    if not dist.is_available() or not dist.is_initialized():
        return uids, rejects
    if dist.get_world_size(group) == 1:
        return uids, rejects
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (uids, rejects), group=group)
    return [uid for rank_uids, _ in gathered for uid in rank_uids], any(r for _, r in gathered)


def train_mini_batch_hook(session: Session) -> Callable[..., Any]:
    """`TrainingWorker.train_mini_batch`, numbering the rollout's prompt groups globally and
    telling every rank whether some rank's part of it holds rejected tokens."""
    original = session.originals["train_mini_batch"]

    @functools.wraps(original)
    def train_mini_batch(self: Any, data: TensorDict) -> Any:
        engine = self.engine
        session.rollout_rejects = False
        # The gather is a collective: every rank of the group joins it, even one whose
        # recording is off, or the others would wait for it forever.
        if "uid" in data and engine.is_mp_src_rank_with_outputs():
            uids = [str(uid) for uid in data["uid"]]
            rejects = False
            try:
                rejects = rejects_tokens(data)
            except Exception as exc:
                session.fail(exc, "reading the rollout's rejected tokens")
            try:
                everyone, rejects = _gathered(uids, rejects, engine.get_data_parallel_group())
                session.groups, session.rollout_rejects = Groups.of(everyone), rejects
            except Exception as exc:
                session.groups = None
                session.fail(exc, "gathering the rollout's prompt groups")
            session.check_group_sizes()
        session.inner_step = 0
        return original(self, data)

    return train_mini_batch
