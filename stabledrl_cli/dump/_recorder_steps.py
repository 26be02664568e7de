"""How a `Recorder` records a step: `RecorderSteps`, the part of the Recorder that checks a
`log_step` call, builds and encodes the step's file and writes it (or queues its fsync).

A Recorder may be used from several threads: each `log_step` (and `rewrite_step`) holds the
Recorder's lock, so a step's check, encoding and hand-over happen whole, in the order the
calls take the lock; the step numbers must increase in that order (threads take turns). A
close that a signal handler makes in the thread of a step under way waits for that step.

`log_step` takes every field of `_schema.FIELDS` as a keyword, among them (format 1.1) the
per-sequence `micro_batch` (int [N], each sequence's micro-batch within the optimizer step)
and `group_split` (bool or 0/1 [N], 1 where the sequence's prompt group is known to be split
across optimizer steps or ranks), and (format 1.3, unit "sequence" only) `token_count` (int
[N] >= 0, how many tokens each sequence's log-probs sum over). A `log_step` with no batch
array at all writes a scalar step (format 1.2): its scalars, and `param_grad_norm` if given.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

from stabledrl_cli.dump._arguments import step_number
from stabledrl_cli.dump._file_names import step_file_name
from stabledrl_cli.dump._input_arrays import ArrayInput, ScalarInput
from stabledrl_cli.dump._inputs import build_step
from stabledrl_cli.dump._recorder_args import keywords_checked
from stabledrl_cli.dump._recorder_end import RecorderEnd
from stabledrl_cli.dump._step_encoding import encode_step
from stabledrl_cli.dump._step_metadata import step_metadata
from stabledrl_cli.dump._step_writes import StepWrite, discard_failed, write_step_file
from stabledrl_cli.dump._suspect_values import positive_logp, reward_outside
from stabledrl_cli.dump._training_end import warned_at_the_end
from stabledrl_cli.errors import UsageError, WriteError, one_line, warn
from stabledrl_cli.vocab import Unit

if TYPE_CHECKING:
    import numpy as np


def resumed_before(last: int, step: int, keyword: str = "resume_from") -> str:
    """What a Recorder resumed without `resume_from` on a run that ends at step `last` says
    of a `step` at or before it: the training resumed from an earlier checkpoint, and gives
    the Recorder `keyword` (how the script passes resume_from)."""
    return (
        f" (the run this Recorder resumed ends at step {last}; a training resumed from an "
        f"earlier checkpoint passes {keyword}={step}, which records the steps from {step} "
        "on again)"
    )


class RecorderSteps(RecorderEnd):
    """The recording of a Recorder's steps (module docstring); the `Recorder` sets the run's
    facts below before it records a step."""

    unit: Unit
    resumed_after: int | None
    _fixed_time: float | None
    _steps_dir: str
    _sketch_seed: int | None
    _policy_spec: str | None
    _policy_fields: frozenset[str]
    _policy_micro: str | None
    _reward_range: tuple[float, float] | None
    _warned: set[str]
    _num_params: int | None
    _rewriting: bool

    # -- recording ----------------------------------------------------------------------------
    @keywords_checked
    def log_step(
        self,
        step: int,
        *,
        logp: ArrayInput | None = None,
        logp_old: ArrayInput | None = None,
        advantages: ArrayInput | None = None,
        mask: ArrayInput | None = None,
        seq_id: ArrayInput | None = None,
        group_id: ArrayInput | None = None,
        reward: ArrayInput | None = None,
        micro_batch: ArrayInput | None = None,
        group_split: ArrayInput | None = None,
        token_count: ArrayInput | None = None,
        logp_ref: ArrayInput | None = None,
        logp_rollout: ArrayInput | None = None,
        loss_weight: ArrayInput | None = None,
        loss_scale: ArrayInput | None = None,
        unit_grad_gram: ArrayInput | None = None,
        unit_grad_sketch: ArrayInput | None = None,
        grad_norm_covered: ScalarInput | None = None,
        param_grad_norm: ArrayInput | None = None,
        token_ids: ArrayInput | None = None,
        grad_norm: ScalarInput | None = None,
        grad_norm_clipped: ScalarInput | None = None,
        loss: ScalarInput | None = None,
        lr: ScalarInput | None = None,
        inner_step: ScalarInput | None = None,
        reward_mean: ScalarInput | None = None,
        unit_grad_sketch_scale: ScalarInput | None = None,
        entropy: ScalarInput | None = None,
        kl: ScalarInput | None = None,
        clip_frac: ScalarInput | None = None,
        clip_frac_low: ScalarInput | None = None,
        clip_frac_high: ScalarInput | None = None,
        step_time: ScalarInput | None = None,
        nonfinite_grads: ScalarInput | None = None,
        scalars: Mapping[str, ScalarInput] | None = None,
    ) -> None:
        """Records one optimizer step. Token arrays: [T], or [B, L] with mask [B, L] (then
        seq_id defaults to the row, and advantages may be [B]; loss_scale may be one number,
        the step's normaliser of every unit). Per-sequence [N]: group_id, reward (or [N, 1],
        a reward model's scores), micro_batch (int >= 0), group_split (bool or 0/1), token_count
        (unit "sequence": each sequence's number of tokens, whole numbers >= 0). With no batch array
        at all the step is a scalar step (its scalars, and param_grad_norm [P] if given); with
        some, logp, logp_old and advantages are required, and each field the run's own policy
        needs to be replayed (logp_ref for beta > 0, reward and group_id for adv=center,
        ...). Raises UsageError naming the field for a missing field, a bad shape, dtype or
        id, or a keyword that is none of these (nothing is written), WriteError if the file
        cannot be written, or the step not held in memory to write it (unless the Recorder's
        on_write_error is "warn")."""
        self._check_process("log_step")  # (before the lock, which a fork may copy held)
        with self._step_under_way():
            if self._closed:
                call = "rewrite_step" if self._rewriting else "log_step"
                raise UsageError(f"{call} on a closed Recorder")
            if self.stopped is not None:
                return
            step = step_number(step)
            if self._rewriting and self._last_step is None:
                raise UsageError(f"rewrite_step({step}) before any step was logged")
            if self._rewriting and step != self._last_step:
                raise UsageError(
                    f"rewrite_step rewrites the last step ({self._last_step}), not {step}"
                )
            if self._last_step is not None and step <= self._last_step and not self._rewriting:
                if step == self._last_step and self._last_step != self.resumed_after:
                    raise UsageError(
                        f"step {step} was logged already: a step is one log_step call "
                        "(rewrite_step replaces the last one)"
                    )
                raise UsageError(
                    f"step {step} does not follow step {self._last_step}; steps must increase"
                    + (
                        resumed_before(self._last_step, step)
                        if self._last_step == self.resumed_after
                        else ""
                    )
                )
            try:
                item = self._step_write(
                    step,
                    arrays={
                        "logp": logp,
                        "logp_old": logp_old,
                        "advantages": advantages,
                        "mask": mask,
                        "seq_id": seq_id,
                        "group_id": group_id,
                        "reward": reward,
                        "micro_batch": micro_batch,
                        "group_split": group_split,
                        "token_count": token_count,
                        "logp_ref": logp_ref,
                        "logp_rollout": logp_rollout,
                        "loss_weight": loss_weight,
                        "loss_scale": loss_scale,
                        "unit_grad_gram": unit_grad_gram,
                        "unit_grad_sketch": unit_grad_sketch,
                        "param_grad_norm": param_grad_norm,
                        "token_ids": token_ids,
                    },
                    scalars={
                        "grad_norm": grad_norm,
                        "grad_norm_clipped": grad_norm_clipped,
                        "loss": loss,
                        "lr": lr,
                        "inner_step": inner_step,
                        "reward_mean": reward_mean,
                        "grad_norm_covered": grad_norm_covered,
                        "unit_grad_sketch_scale": unit_grad_sketch_scale,
                        "entropy": entropy,
                        "kl": kl,
                        "clip_frac": clip_frac,
                        "clip_frac_low": clip_frac_low,
                        "clip_frac_high": clip_frac_high,
                        "step_time": step_time,
                        "nonfinite_grads": nonfinite_grads,
                    },
                    user_scalars=scalars,
                )
            except MemoryError as exc:  # a step no memory holds (a view `.expand`ed by mistake)
                name = step_file_name(step, self.rank, self.world_size)
                reason = f"step {step}: cannot write it, out of memory ({one_line(exc)})"
                self._write_failed(WriteError(f"{self._steps_dir}/{name}: {reason}"), step)
                return
            try:
                write_step_file(item, durable=self._writer is None)
                if self._writer is not None:
                    self._writer.queue.put(item._replace(parts=[]))
            except WriteError as exc:
                self._step_failed(exc, item)
                return
            except BaseException:  # a Ctrl-C: the step is not recorded, its file not kept
                if not item.replaces:  # (a rewrite's first half is: its fsync may be queued)
                    discard_failed(item)
                raise
            self._last_step = step
            self._raise_writer_error()  # an earlier step's failed fsync: this one is written

    def _step_write(
        self,
        step: int,
        *,
        arrays: Mapping[str, ArrayInput | None],
        scalars: Mapping[str, ScalarInput | None],
        user_scalars: Mapping[str, ScalarInput] | None,
    ) -> StepWrite:
        """`log_step`'s inputs checked and encoded as the file of `step` (`build_step`): the
        write to make. UsageError as `log_step` says; MemoryError for a step no memory holds."""
        tensors, values, num_sequences = build_step(
            unit=self.unit,
            step=step,
            arrays=arrays,
            scalars=scalars,
            user_scalars=user_scalars,
            num_params=self._num_params,
        )
        scalar_step = "logp" not in tensors
        if not scalar_step and tensors["logp"].shape[0] == 0 and self.world_size == 1:
            raise UsageError("logp: a step needs at least one token")
        missing = [] if scalar_step else sorted(self._policy_fields.difference(tensors))
        if missing:
            raise UsageError(
                f"step {step} has no {', '.join(map(repr, missing))}, which the run's policy "
                f"{self._policy_spec!r} needs: pass it, or record the policy the loop computes"
            )
        self._warn_of_inputs(step, tensors, values)
        values.setdefault("wall_time", self._now())
        metadata = step_metadata(
            tensors,
            values,
            num_sequences,
            rank=self.rank,
            world_size=self.world_size,
            sketch_seed=self._sketch_seed,
        )
        name = step_file_name(step, self.rank, self.world_size)
        return StepWrite(
            self._steps_dir, name, encode_step(tensors, metadata), step, self._rewriting
        )

    def _warn_of_inputs(
        self, step: int, tensors: dict[str, np.ndarray], values: dict[str, float]
    ) -> None:
        """Warns, each once, of a step's inputs recorded as given that the training should hear
        of while it trains (inspect and replay say so after it): a reward outside the run's
        reward_range, a positive log-probability, a step without the micro_batch its run's
        policy reads."""
        said = []
        if self._reward_range is not None and "reward" not in self._warned:
            outside = reward_outside(self._reward_range, tensors, values)
            if outside is not None:
                self._warned.add("reward")
                said.append(
                    f"{outside} lies outside the run's reward_range {list(self._reward_range)}, "
                    "which the collapse rule reads: declare the range the rewards span (said "
                    "once)"
                )
        if "logp" in tensors and "logp" not in self._warned:
            counts = tensors.get("token_count")  # (a sequence run's: [N], by seq_id)
            tokens = None if counts is None else counts[tensors["seq_id"]]
            found = positive_logp(tensors, tensors["mask"], tokens)
            if found is not None:
                self._warned.add("logp")
                said.append(
                    f"{found[0]} holds a positive value ({found[1]:g}) among its scored entries, "
                    "where a log-probability, and an ELBO estimate of one, is <= 0: logits, or a "
                    "sign flipped? (recorded as given; inspect lists such steps; said once)"
                )
        if (
            self._policy_micro is not None
            and "logp" in tensors
            and "micro_batch" not in tensors
            and "micro_batch" not in self._warned
        ):
            self._warned.add("micro_batch")
            said.append(
                f"the run's policy {self._policy_spec!r} reads each step's micro-batches "
                f"({self._policy_micro}), and the step records no micro_batch: it is replayed "
                "as one micro-batch; pass micro_batch, each sequence's gradient-accumulation "
                "round (0 for every sequence of a step of one) (said once)"
            )
        whose = f" (rank {self.rank})" if self.world_size > 1 else ""
        for line in said:
            warn(f"stabledrl: warning: {self.path}{whose}: step {step}: {line}\n")

    def _now(self) -> float:
        """Wall-clock seconds, or SOURCE_DATE_EPOCH when it was set as the Recorder was made."""
        return self._fixed_time if self._fixed_time is not None else time.time()

    @contextmanager
    def _step_under_way(self) -> Iterator[None]:
        """Holds the Recorder's lock for a step. A close made meanwhile by a signal handler in
        this thread (which the lock lets through) is done once the step is written whole or
        given up, a failed write it reports then a warning line (its caller has returned)."""
        with self._lock:
            if self._step_thread is not None:  # rewrite_step's own log_step
                yield
                return
            self._step_thread = threading.get_ident()
            try:
                yield
            finally:
                self._step_thread = None
                if self._close_deferred:
                    self._close_deferred = False
                    with warned_at_the_end():
                        self.close()
