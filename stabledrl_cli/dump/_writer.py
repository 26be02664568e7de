"""`Recorder`: writes a run directory (format v1), one durable file per optimizer step.

Durability. By default `log_step` returns once the step's file is fsynced, renamed to its
final name and the directory fsynced: a crash after that cannot lose it. With
`async_writes=True`, `log_step` checks the inputs and writes the whole file under its final
name (the caller may reuse its tensors at once; a process killed next, kill -9 or the
out-of-memory killer, keeps it), unfsynced, then hands the fsync to a writer thread through a
queue of `queue_size` entries (a `log_step` that finds the queue full waits for room in it).
A crash of the machine (power loss) may take at most `queue_size + 1` steps that `log_step`
had returned for: the ones waiting in the queue and the one being fsynced, missing or read
as damaged (their checksums). A SIGTERM
that would end the process at once (its default action, when the Recorder is made in the
main thread) loses none: the queue is written first (`_sigterm`). Short of a crash of the
machine, readers never see a partial file under a final name. How recording ends (close,
the end of the process, a failed write, a forked child) is `_recorder_end`'s.

A Recorder may be used from several threads: each `log_step` (and `rewrite_step`) holds the
Recorder's lock, so a step's check, encoding and hand-over happen whole, in the order the
calls take the lock; the step numbers must increase in that order (threads take turns). A
close that a signal handler makes in the thread of a step under way waits for that step.

Keywords of `Recorder` beyond the run's facts: `group_ids` ("per_rank", the default, or
"global": the recorded group_ids are global prompt-group ids, see `_schema`), `loss_norm`
("global", the default, or "per_rank": each rank normalised its loss over its own part, see
`_schema`), `source` (format
1.2: where the run came from, e.g. {"kind": "import", ...}), `overwrite`, `resume` and
`resume_from` (how an existing directory is treated, see `_setup`). `policy=None` (format 1.2)
records that the run's policy is not known.
`log_step` takes every field of `_schema.FIELDS` as a keyword, among them (format 1.1) the
per-sequence `micro_batch` (int [N], each sequence's micro-batch within the optimizer step)
and `group_split` (bool or 0/1 [N], 1 where the sequence's prompt group is known to be split
across optimizer steps or ranks), and (format 1.3, unit "sequence" only) `token_count` (int
[N] >= 0, how many tokens each sequence's log-probs sum over). A `log_step` with no batch
array at all writes a scalar step (format 1.2): its scalars, and `param_grad_norm` if given.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stabledrl_cli._atomic import write_error
from stabledrl_cli._run_env import forced_run, records_out
from stabledrl_cli.dump._arguments import path_argument, step_number, switch_argument
from stabledrl_cli.dump._file_names import STEPS_DIR, step_file_name
from stabledrl_cli.dump._input_arrays import ArrayInput, ScalarInput
from stabledrl_cli.dump._inputs import build_step
from stabledrl_cli.dump._manifest import WORLD_SIZE_LIMIT
from stabledrl_cli.dump._policy import PolicyLike, replayed_fields
from stabledrl_cli.dump._recorder_args import (
    checked_reward_range,
    dict_argument,
    fixed_time,
    keyword_names,
    keywords_checked,
    new_manifest,
    param_name_list,
    refuse_unknown_keywords,
    sketch_seed,
    whole_count,
)
from stabledrl_cli.dump._recorder_end import RecorderEnd
from stabledrl_cli.dump._run_target import check_not_in_a_run
from stabledrl_cli.dump._schema import is_count
from stabledrl_cli.dump._setup import prepared_run, refuse_in_the_way
from stabledrl_cli.dump._step_metadata import step_metadata
from stabledrl_cli.dump._step_writes import (
    StepWrite,
    discard_failed,
    write_step_file,
)
from stabledrl_cli.dump._stfile import encode_step
from stabledrl_cli.dump._suspect_values import positive_logp, reward_outside
from stabledrl_cli.dump._training_end import warned_at_the_end
from stabledrl_cli.errors import UsageError, WriteError, warn
from stabledrl_cli.spec import SpecValue
from stabledrl_cli.vocab import (
    GROUP_IDS,
    LOSS_NORMS,
    ON_WRITE_ERROR,
    UNITS,
    GroupIds,
    LossNorm,
    OnWriteError,
    Unit,
)

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


class Recorder(RecorderEnd):
    """Records a training run, one optimizer step at a time (format in docs/run-format.md).

    >>> with Recorder("runs/mine", policy="dapo:eps_high=0.28") as rec:
    ...     rec.log_step(0, logp=logp, logp_old=logp_old, advantages=adv, mask=mask)

    policy: a spec string (more parameters may come in `policy_params`; a key given in both is
    refused), a resolved policy object with .name, .spec and .params (see `_policy`), or None
    when the run's policy is not known (a run of scalar steps, format 1.2); a catalogue policy
    its `unit` rules out (stabledrl:level=token on sequence units) is refused. source: where
    the run came from, a JSON object with a string "kind" (format 1.2), or None.
    Refuses an existing non-empty directory unless `overwrite=True` (removes this recorder's
    own step files and, on rank 0, rewrites the manifest; not given, it is True for the run
    directory of `stabledrl record --force`: `_run_env.forced_run`) or `resume=True`
    (continues the run: steps at or after `resume_from` are replaced, earlier ones kept and
    verified; see `_setup`). Refuses a `path` inside another run (its steps, checkpoints or
    branches folder, or anywhere else: `_run_target.check_not_in_a_run`), but for a branch run,
    RUN/branches/NAME. Rank 0 gives the run a
    new identity (the manifest's `run_id`) when it creates or overwrites it, and a rank whose
    resume replaces its steps (`_setup`). With
    `world_size > 1` every rank makes its own Recorder on the same path, giving its `rank`
    (refused without one: it is 0 only for world_size 1); rank 0 writes the manifest, each
    rank its own step files. `group_ids="global"` says that
    the recorded group_ids are prompt-group ids shared by all ranks. `loss_norm="per_rank"`
    says that each rank normalised its loss over its own part of the step (its own token or
    sequence counts) and the data-parallel all-reduce averaged the ranks' gradients, as a
    plain DistributedDataParallel loop does; the default "global" says the normalisers counted
    every rank's part. A relative `path` is
    taken from the working directory as the Recorder is made: a later `os.chdir` of the
    process (hydra's job chdir, say) does not move the run.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        policy: str | PolicyLike | None = "grpo",
        policy_params: Mapping[str, SpecValue] | None = None,
        meta: dict[str, Any] | None = None,
        unit: Unit = "token",
        estimator: dict[str, Any] | None = None,
        reward_range: tuple[float, float] | None = None,
        world_size: int = 1,
        rank: int | None = None,
        overwrite: bool | None = None,
        async_writes: bool = False,
        queue_size: int = 8,
        geometry: dict[str, Any] | None = None,
        param_names: Iterable[str] | None = None,
        group_ids: GroupIds = "per_rank",
        loss_norm: LossNorm = "global",
        resume: bool = False,
        resume_from: int | None = None,
        on_write_error: OnWriteError = "raise",
        source: dict[str, Any] | None = None,
    ) -> None:
        if unit not in UNITS:
            raise UsageError(f"unit {unit!r} is not one of: {', '.join(UNITS)}")
        if group_ids not in GROUP_IDS:
            raise UsageError(f"group_ids {group_ids!r} is not one of: {', '.join(GROUP_IDS)}")
        if loss_norm not in LOSS_NORMS:
            raise UsageError(f"loss_norm {loss_norm!r} is not one of: {', '.join(LOSS_NORMS)}")
        world_size, queue_size = whole_count(world_size), whole_count(queue_size)
        if not (is_count(world_size) and 1 <= world_size <= WORLD_SIZE_LIMIT):
            raise UsageError(
                f"world_size must be an int in [1, {WORLD_SIZE_LIMIT}], got {world_size!r}"
            )
        if rank is None and world_size > 1:  # each process would take rank 0
            raise UsageError(
                f"rank= is missing: a Recorder of world_size={world_size} records one rank, "
                f"and each process gives its own: Recorder(path, world_size={world_size}, "
                "rank=R) (under torchrun, R is int(os.environ['RANK']))"
            )
        rank = whole_count(0 if rank is None else rank)
        if not (is_count(rank) and 0 <= rank < world_size):
            raise UsageError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        if on_write_error not in ON_WRITE_ERROR:
            raise UsageError(
                f"on_write_error {on_write_error!r} is not one of: {', '.join(ON_WRITE_ERROR)}"
            )
        if not (is_count(queue_size) and queue_size >= 1):
            raise UsageError(f"queue_size must be an int >= 1, got {queue_size!r}")
        if overwrite is not None:
            overwrite = switch_argument(overwrite, "overwrite")
        resume = switch_argument(resume, "resume")
        async_writes = switch_argument(async_writes, "async_writes")
        if resume and overwrite:
            raise UsageError("resume=True continues a run, overwrite=True replaces it: pick one")
        if resume_from is not None and not resume:
            raise UsageError("resume_from goes with resume=True")
        if resume_from is not None:
            resume_from = step_number(resume_from, "resume_from")
        if reward_range is not None:
            reward_range = checked_reward_range(reward_range)
        if param_names is not None:
            param_names = param_name_list(param_names)
        if source is not None and not (
            isinstance(source, dict) and isinstance(source.get("kind"), str) and source["kind"]
        ):
            raise UsageError(f"source must be a dict with a non-empty string kind, got {source!r}")
        if policy is None and policy_params:
            raise UsageError("policy_params go with a policy; policy=None records none")
        if policy_params is not None:
            policy_params = dict_argument(policy_params, "policy_params")
        path = path_argument(path)
        try:  # where it is now: the process may chdir later
            self.path = Path(path).absolute()
        except OSError as exc:  # a relative path in a working directory since removed
            raise write_error(Path(path), exc) from None
        check_not_in_a_run(self.path, "path", branch=True)
        if records_out(self.path):  # a file put in its place while record's command runs
            refuse_in_the_way(self.path)
        self._fixed_time = fixed_time()
        self._steps_dir = os.fspath(self.path / STEPS_DIR)
        self.unit = unit
        self.world_size = world_size
        self.rank = rank
        self._sketch_seed = sketch_seed(geometry)
        manifest = new_manifest(
            policy=policy,
            policy_params=policy_params,
            meta=meta,
            unit=unit,
            estimator=estimator,
            reward_range=reward_range,
            world_size=world_size,
            group_ids=group_ids,
            loss_norm=loss_norm,
            geometry=geometry,
            param_names=param_names,
            source=source,
            created=self._now(),
        )
        self._policy_spec: str | None = manifest["policy"] and manifest["policy"]["spec"]
        self._policy_fields = replayed_fields(self._policy_spec, unit)
        """What a policy batch must hold for the replay of the run's own policy."""
        if overwrite is None:  # `stabledrl record --force` of its --out, unless resumed
            overwrite = forced_run(self.path, rank) and not resume  # once the arguments pass
        with prepared_run(
            self.path,
            manifest,
            rank=rank,
            world_size=world_size,
            overwrite=overwrite,
            resume=resume,
            resume_from=resume_from,
        ) as (self.manifest, self._last_step, self._writer_lock):  # undone if cut short
            dropped = weakref.finalize(self, self._writer_lock.release)  # one dropped unclosed
            if resume_from is not None:
                kept = self._last_step
                if kept is not None and resume_from > kept + 1:  # a gap readers report, said now
                    whose = f" (rank {rank})" if world_size > 1 else ""
                    warn(
                        f"stabledrl: warning: {self.path}: resume_from={resume_from} is past "
                        f"the run's last step{whose}, {kept}: steps {kept + 1}.."
                        f"{resume_from - 1} will be missing (inspect reports the gap)\n"
                    )
                self._last_step = resume_from - 1 if resume_from > 0 else None
            self.resumed_after: int | None = (
                self._last_step if resume and resume_from is None else None
            )
            """The run's last step that a resume without `resume_from` kept (the steps go on after
            it), else None: a training resumed from an earlier checkpoint gives resume_from."""
            span = self.manifest.get("reward_range")  # a resumed run's own
            self._reward_range: tuple[float, float] | None = (
                (float(span[0]), float(span[1])) if span else None
            )
            self._warned: set[str] = set()
            """What `_warn_of_inputs` warned of ("reward", "logp"): each once a Recorder."""
            names = self.manifest.get("param_names")  # a resumed run's own
            self._num_params = len(names) if isinstance(names, list) else None
            self._rewriting = False
            super().__init__(
                on_write_error, async_writes=async_writes, queue_size=queue_size, dropped=dropped
            )

    @property
    def last_step(self) -> int | None:
        """The last step this rank holds: logged, or kept by a resume (one from `resume_from`
        holds the step before it); None before any."""
        return self._last_step

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
        needs to be replayed (`_policy.replayed_fields`: logp_ref for beta > 0, ...). Raises
        UsageError naming the field for a missing field, a bad shape, dtype or id, or a keyword
        that is none of these (nothing is written), WriteError if the file cannot be written."""
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
            tensors, values, num_sequences = build_step(
                unit=self.unit,
                step=step,
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
            item = StepWrite(
                self._steps_dir, name, encode_step(tensors, metadata), step, self._rewriting
            )
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

    def _warn_of_inputs(
        self, step: int, tensors: dict[str, np.ndarray], values: dict[str, float]
    ) -> None:
        """Warns, each once, of a step's inputs recorded as given that the training should hear
        of while it trains (inspect and replay say so after it): a reward outside the run's
        reward_range, a positive log-probability."""
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
        whose = f" (rank {self.rank})" if self.world_size > 1 else ""
        for line in said:
            warn(f"stabledrl: warning: {self.path}{whose}: step {step}: {line}\n")

    def _now(self) -> float:
        """Wall-clock seconds, or SOURCE_DATE_EPOCH when it was set as the Recorder was made."""
        return self._fixed_time if self._fixed_time is not None else time.time()

    def rewrite_step(self, step: int, **fields: Any) -> None:
        """Records the last step logged (same number) again, with `fields` (log_step's
        keywords) as its whole content: its file is replaced atomically, or removed when that
        write fails. `record`'s optimizer hooks use it to add the second half of a step
        (capture/bootstrap.py). UsageError naming a keyword that is not log_step's."""
        self._check_process("rewrite_step")
        refuse_unknown_keywords(
            fields, keyword_names(Recorder.log_step), "a keyword of rewrite_step"
        )
        with self._step_under_way():
            self._rewriting = True
            try:
                self.log_step(step, **fields)
            finally:
                self._rewriting = False

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

    def __enter__(self) -> Recorder:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        """UsageError: a Recorder is not sent to another process (a spawned DataLoader worker's
        dataset, a Pool task's argument), whose copy would write into the run unguarded."""
        raise UsageError(
            f"{self.path}: a Recorder cannot be sent to another process (pickled or copied): "
            "a process records with its own Recorder, or logs from the one that made it"
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "recording"
        if self.stopped is not None:  # log_step writes nothing more
            state = f"stopped at step {self.stopped_step}"
        return f"Recorder({str(self.path)!r}, unit={self.unit!r}, rank={self.rank}, {state=})"
