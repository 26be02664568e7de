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
machine, readers never see a partial file under a final name. `close()` (or
leaving the `with` block) drains the queue; at exit, the queue of a Recorder that was never
closed is drained too (even when the Recorder was dropped; in a child
process of `multiprocessing`, as its target returns: `_child_end`), unless its caller closes
it at exit itself (`closed_by_caller_at_exit`); a write that fails then is a warning line. A
Recorder dropped unclosed keeps its rank's lock (`_writer_lock`) until its queue is written. Once
its writes are done, `close()` marks a world_size 1 run `recording_closed` in its manifest
(best effort): a reader following the run knows no step will come. A rank of a larger run adds
itself to the manifest's `recording_closed_ranks` instead, and the rank that completes them
marks the run `recording_closed` (`_setup.close_rank`). An open Recorder's run
has no mark, so a killed recording never leaves one; `resume=True` and `overwrite=True`
remove it.

A failed write (a full disk, a read-only directory) raises WriteError (exit 4) naming the
file, from `log_step` (async: once the steps queued before it are made durable; one that is
not leads that one error, `_step_failed`); an fsync that fails in the writer thread (async:
"not made durable", also for a file gone from under its name) once from the next
`log_step`, `flush` or `close` (with the later steps whose fsyncs failed before it, their
files removed; a `log_step` that raises it has written its own step; a close as a `with`
block ends on an exception warns instead: the block's exception goes on); its temporary file
is removed and the steps written before it stay intact. The Recorder goes on: each later
step is written, or fails, on its own. A failed `rewrite_step` also removes the step's
earlier file (its first half, which would otherwise read as a whole step), as far as the
directory lets it: that step is not recorded. With
`on_write_error="warn"` (what `record -- CMD` and the integrations pass: recording must never
stop training) the first failure instead prints one warning on stderr (async: the steps
queued behind it stay under their names, not made durable), stops recording (later
`log_step` calls return at once) and records in the manifest's `recording_stopped`
({step, rank, reason}) that and why recording stopped (best effort: a full disk may refuse
that too); a rank of a world_size > 1 run first writes the same note into a file of its own,
`steps/stopped.rank-NNNN.json`, which no other rank writes (the manifest holds one note, the
last rank's to stop, and a node's own directory may have none).

A Recorder may be used from several threads: each `log_step` (and `rewrite_step`) holds the
Recorder's lock, so a step's check, encoding and hand-over happen whole, in the order the
calls take the lock; the step numbers must increase in that order (threads take turns). A
close that a signal handler makes in the thread of a step under way waits for that step.

A Recorder writes from the process that made it: in a forked child `log_step` and `flush`
raise UsageError (the child would write under the parent's file names, and its copy of the
queue has no writer thread), and `close` leaves the parent's writer alone.

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

import atexit
import datetime as _dt
import functools
import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np

from stabledrl_cli._atomic import write_error
from stabledrl_cli._child_end import at_child_end
from stabledrl_cli._run_env import forced_run, records_out
from stabledrl_cli._sigterm import steps_written_on_sigterm
from stabledrl_cli._version import __version__
from stabledrl_cli.dump._inputs import ArrayInput, ScalarInput, build_step
from stabledrl_cli.dump._policy import PolicyLike, policy_entry, replayed_fields
from stabledrl_cli.dump._schema import (
    COUNT_FIELDS,
    EXTENSION_FIELDS,
    FIELDS,
    META_FORMAT,
    META_NUM_SEQUENCES,
    META_NUM_TOKENS,
    META_RANK,
    META_SCORED_REWARDS,
    META_SCORED_TOKENS,
    META_SKETCH_SEED,
    META_WORLD_SIZE,
    RECORDING_CLOSED,
    RECORDING_STOPPED,
    RUN_KIND,
    STEPS_DIR,
    WORLD_SIZE_LIMIT,
    is_count,
    json_checked,
    path_argument,
    step_file_name,
    step_number,
    switch_argument,
    written_version,
)
from stabledrl_cli.dump._setup import amend_manifest, close_rank, prepare_run, refuse_in_the_way
from stabledrl_cli.dump._step_writes import (
    Failure,
    StepWrite,
    StopNote,
    WriteThread,
    discard_failed,
    raise_failures,
    write_step_file,
    writer_failure,
)
from stabledrl_cli.dump._stfile import encode_step
from stabledrl_cli.errors import InputError, UsageError, WriteError, quoted, warn
from stabledrl_cli.spec import SpecValue, reads_as_zero, spec_float, whole_number
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


def _fixed_time() -> float | None:
    """SOURCE_DATE_EPOCH when set (the reproducible-builds convention): the time a recording
    then gives every wall clock reading, so that it can be reproduced byte for byte; UsageError
    naming it for a value that is no time (text, NaN, past the clock's range)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if not epoch:
        return None
    try:
        seconds = float(epoch)
        _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc)
    except (ValueError, OverflowError, OSError):
        raise UsageError(
            f"SOURCE_DATE_EPOCH must be a time in seconds since 1970-01-01 UTC, got {quoted(epoch)}"
        ) from None
    return seconds


def checked_reward_range(
    value: Iterable[float | str], name: str = "reward_range"
) -> tuple[float, float]:
    """(low, high), two finite numbers (or their text) with low < high, else UsageError
    naming `name`."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise UsageError(f"{name} must be (low, high), finite, low < high; got {value!r}")
    return low, high


def reward_range_text(text: str, name: str) -> tuple[float, float]:
    """A reward range written LOW,HIGH (`name`: where it was given, say --reward-range), each
    number in ASCII notation (`spec_float`: not `1_0` nor other scripts' digits, which float()
    reads) and not one too small for a float (`1e-400` would read as 0), checked as
    `checked_reward_range` checks one; else UsageError saying how to write it."""
    try:
        parts = [(part, spec_float(part.strip())) for part in text.split(",")]
        if any(reads_as_zero(part, value) for part, value in parts):
            raise ValueError("a number too small for a float")
        return checked_reward_range([value for _, value in parts])
    except (ValueError, UsageError):
        raise UsageError(
            f"{name} {quoted(text)}: give LOW,HIGH, two finite numbers with LOW < HIGH "
            "(0,1 for a success rate)"
        ) from None


def _whole(value: int) -> int:
    """A count given as a numpy or 0-d torch integer as the int it holds; anything else as it
    is, for the Recorder's checks to refuse."""
    number = whole_number(value)
    return value if number is None else number


def _names(value: Iterable[str]) -> list[str]:
    """`param_names` as a list: any iterable of strings (a generator of a model's names), not
    one string (its characters); else UsageError."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise UsageError(f"param_names must be a list of strings, got {type(value).__name__}")
    names = list(value)
    for index, name in enumerate(names):
        if not isinstance(name, str):
            raise UsageError(
                f"param_names must be a list of strings; entry {index} is {type(name).__name__}"
            )
    return names


def _object(value: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    """`value` as a dict of its own (None: empty), else UsageError naming `what`."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise UsageError(f"{what} must be a dict, got {type(value).__name__}")
    return dict(value)


def _sketch_seed(geometry: object) -> int | None:
    """The Omega seed of a Recorder's `geometry` entry (`sketch.seed`, as
    `GeometryConfig.to_manifest` writes it), None when it gives none: what each sketch of the
    rank records as `_sketch_seed`."""
    sketch = geometry.get("sketch") if isinstance(geometry, Mapping) else None
    seed = sketch.get("seed") if isinstance(sketch, Mapping) else None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
        return None
    return seed


def resumed_before(last: int, step: int, keyword: str = "resume_from") -> str:
    """What a Recorder resumed without `resume_from` on a run that ends at step `last` says
    of a `step` at or before it: the training resumed from an earlier checkpoint, and gives
    the Recorder `keyword` (how the script passes resume_from)."""
    return (
        f" (the run this Recorder resumed ends at step {last}; a training resumed from an "
        f"earlier checkpoint passes {keyword}={step}, which records the steps from {step} "
        "on again)"
    )


class Recorder:
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
    verified; see `_setup`). Rank 0 gives the run a new identity (the manifest's `run_id`)
    when it creates or overwrites it, and a rank whose resume replaces its steps (`_setup`). With
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
        world_size, queue_size = _whole(world_size), _whole(queue_size)
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
        rank = _whole(0 if rank is None else rank)
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
            resume_from = step_number(resume_from)
        if reward_range is not None:
            reward_range = checked_reward_range(reward_range)
        if param_names is not None:
            param_names = _names(param_names)
        if source is not None and not (
            isinstance(source, dict) and isinstance(source.get("kind"), str) and source["kind"]
        ):
            raise UsageError(f"source must be a dict with a non-empty string kind, got {source!r}")
        if policy is None and policy_params:
            raise UsageError("policy_params go with a policy; policy=None records none")
        if policy_params is not None:
            policy_params = _object(policy_params, "policy_params")
        path = path_argument(path)
        try:  # where it is now: the process may chdir later
            self.path = Path(path).absolute()
        except OSError as exc:  # a relative path in a working directory since removed
            raise write_error(Path(path), exc) from None
        if records_out(self.path):  # a file put in its place while record's command runs
            refuse_in_the_way(self.path)
        if overwrite is None:  # `stabledrl record --force` of its --out, unless resumed
            overwrite = forced_run(self.path, rank) and not resume
        self._fixed_time = _fixed_time()
        self._steps_dir = os.fspath(self.path / STEPS_DIR)
        self.unit = unit
        self.world_size = world_size
        self.rank = rank
        self._sketch_seed = _sketch_seed(geometry)
        manifest: dict[str, Any] = {
            "format": RUN_KIND,
            "format_version": written_version(
                group_ids == "global",
                policy is None or source is not None,
                loss_norm=loss_norm,
                world_size=world_size,
            ),
            "tool_version": __version__,
            "created": _dt.datetime.fromtimestamp(self._now(), _dt.timezone.utc).isoformat(
                timespec="seconds"
            ),
            "meta": json_checked(_object(meta, "meta"), "meta"),
            "policy": policy_entry(policy, policy_params) if policy is not None else None,
            "unit": unit,
            "estimator": json_checked(_object(estimator, "estimator"), "estimator"),
            "reward_range": list(reward_range) if reward_range is not None else None,
            "world_size": world_size,
            "group_ids": group_ids,
            **({"loss_norm": loss_norm} if loss_norm == "per_rank" else {}),
            "geometry": (
                json_checked(_object(geometry, "geometry"), "geometry")
                if geometry is not None
                else None
            ),
            "param_names": param_names,
            "fields": {name: {"per": s.per, "dtype": s.dtype} for name, s in FIELDS.items()},
        }
        if source is not None:
            manifest["source"] = json_checked(dict(source), "source")
        self._policy_spec: str | None = manifest["policy"] and manifest["policy"]["spec"]
        self._policy_fields = replayed_fields(self._policy_spec, unit)
        """What a policy batch must hold for the replay of the run's own policy."""
        self.manifest, self._last_step, self._writer_lock = prepare_run(
            self.path,
            manifest,
            rank=rank,
            world_size=world_size,
            overwrite=overwrite,
            resume=resume,
            resume_from=resume_from,
        )
        dropped = weakref.finalize(self, self._writer_lock.release)  # one dropped unclosed
        if resume_from is not None:
            kept = self._last_step
            if kept is not None and resume_from > kept + 1:  # a gap readers report, said now
                whose = f" (rank {rank})" if world_size > 1 else ""
                warn(
                    f"stabledrl: warning: {self.path}: resume_from={resume_from} is past the "
                    f"run's last step{whose}, {kept}: steps {kept + 1}..{resume_from - 1} will be "
                    "missing (inspect reports the gap)\n"
                )
            self._last_step = resume_from - 1 if resume_from > 0 else None
        self.resumed_after: int | None = self._last_step if resume and resume_from is None else None
        """The run's last step that a resume without `resume_from` kept (the steps go on after
        it), else None: a training resumed from an earlier checkpoint gives resume_from."""
        names = self.manifest.get("param_names")  # a resumed run's own
        self._num_params = len(names) if isinstance(names, list) else None
        self.on_write_error: OnWriteError = on_write_error
        self.stopped: str | None = None
        """Why recording stopped (on_write_error="warn" after a failed write, or `note_stop`),
        else None."""
        self.stopped_step: int | None = None
        """The step whose write failed when recording stopped (an async write's failure is
        noticed at a later step's `log_step`), else None."""
        self._interrupted: str | None = None
        """How the training was cut short (`note_interrupted`), noted as it closes; None: it
        was not."""
        self._unapplied = False
        """The exception came in the optimizer step of the last step the run holds: its
        update never applied (`note_interrupted`)."""
        self._unnoted_stop: dict[str, Any] | None = None
        """The `recording_stopped` note the manifest refused (a full disk), else None: the
        run is marked closed only once it holds it, or it would read as a whole recording."""
        self._stop_note = StopNote(self.path, self.rank, self.world_size)
        self._closed = False
        self._closed_marked = False
        """Whether close marked the run `recording_closed` (or, with several ranks, this rank
        closed: `close_rank`)."""
        self._pid = os.getpid()
        """The process that made this Recorder, the only one it writes from."""
        self._rewriting = False
        self._lock = threading.RLock()
        """Held by each log_step (rewrite_step, flush's check, close): one step at a time."""
        self._step_thread: int | None = None
        """The thread whose log_step (or rewrite_step) is under way, else None."""
        self._close_deferred = False
        """Whether a close came from that thread itself (a signal handler) during the step."""
        self._writer: WriteThread | None = None
        if async_writes:
            self._writer = WriteThread(queue_size, halt_on_error=on_write_error == "warn")
            self._writer.start()
            # one dropped unclosed notes a failure found at the end as it would have
            noted = self._stop_note if on_write_error == "warn" else None
            self._at_exit = functools.partial(
                _close_at_exit, weakref.ref(self), self._writer, self.path, noted
            )
            atexit.register(self._at_exit)
            self._cancel_at_child_end = at_child_end(self._at_exit)
            self._cancel_on_sigterm = steps_written_on_sigterm(
                functools.partial(
                    _written_on_sigterm, weakref.ref(self), self._writer, self.path, noted
                )
            )
            # one dropped unclosed frees its rank once its queued steps are written; not at
            # exit, where the thread still writes what a late exit handler logs (`_at_exit`)
            dropped.detach()
            weakref.finalize(
                self, self._writer.release_when_written, self._writer_lock
            ).atexit = False

    @property
    def last_step(self) -> int | None:
        """The last step this rank holds: logged, or kept by a resume (one from `resume_from`
        holds the step before it); None before any."""
        return self._last_step

    # -- recording ----------------------------------------------------------------------------
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
        the step's normaliser of every unit). Per-sequence [N]: group_id,
        reward, micro_batch (int >= 0), group_split (bool or 0/1), token_count (unit
        "sequence": each sequence's number of tokens, whole numbers >= 0). With no batch array
        at all the step is a scalar step (its scalars, and param_grad_norm [P] if given); with
        some, logp, logp_old and advantages are required, and each field the run's own policy
        needs to be replayed (`_policy.replayed_fields`: logp_ref for beta > 0, ...). Raises
        UsageError naming the field for a missing field, a bad shape, dtype or id (nothing is
        written), WriteError if the file cannot be written."""
        self._check_process("log_step")  # (before the lock, which a fork may copy held)
        with self._step_under_way():
            if self._closed:
                raise UsageError("log_step on a closed Recorder")
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
            values.setdefault("wall_time", self._now())
            # repr of a float round-trips exactly; 'nan' and 'inf' parse back with float()
            metadata = {name: repr(value) for name, value in values.items()}
            mask = tensors.get("mask")
            extended = not tensors.keys().isdisjoint(EXTENSION_FIELDS)
            counted = not tensors.keys().isdisjoint(COUNT_FIELDS)
            metadata.update({
                META_FORMAT: written_version(extended, scalar_step, counted),
                META_RANK: str(self.rank),
                META_WORLD_SIZE: str(self.world_size),
                META_NUM_TOKENS: str(mask.shape[0] if mask is not None else 0),
                META_NUM_SEQUENCES: str(num_sequences),
                META_SCORED_TOKENS: str(np.count_nonzero(mask) if mask is not None else 0),
            })  # fmt: skip
            if "reward" in tensors:
                scored = np.count_nonzero(~np.isnan(tensors["reward"]))
                metadata[META_SCORED_REWARDS] = str(scored)
            if "unit_grad_sketch" in tensors and self._sketch_seed is not None:
                metadata[META_SKETCH_SEED] = str(self._sketch_seed)
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

    def _now(self) -> float:
        """Wall-clock seconds, or SOURCE_DATE_EPOCH when it was set as the Recorder was made."""
        return self._fixed_time if self._fixed_time is not None else time.time()

    def rewrite_step(self, step: int, **fields: Any) -> None:
        """Records the last step logged (same number) again, with `fields` (log_step's
        keywords) as its whole content: its file is replaced atomically, or removed when that
        write fails. `record`'s optimizer hooks use it to add the second half of a step
        (capture/bootstrap.py)."""
        self._check_process("rewrite_step")
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
                    with _warned_at_the_end():
                        self.close()

    def _check_process(self, call: str) -> None:
        """UsageError in a child forked from the process that made this Recorder: the child
        would write its steps under the parent's file names, and its copy of the writer queue
        has no thread to empty it."""
        if os.getpid() != self._pid:
            raise UsageError(
                f"{call} in a forked child process (pid {os.getpid()}) of the process that made "
                f"the Recorder (pid {self._pid}): a process records with its own Recorder"
            )

    def flush(self) -> None:
        """Waits until every queued step is durable (a no-op for synchronous writes)."""
        self._check_process("flush")
        if self._writer is not None:
            self._writer.queue.join()
        with self._lock:
            self._raise_writer_error()

    def _raise_writer_error(self) -> None:
        """Reports the writer thread's failed writes since the last report, once."""
        failures = self._writer_failures(drained=False)
        if failures:
            first = failures[0]
            error = writer_failure(self.path, failures)
            self._write_failed(error, first.step, cause=first.error)

    def _writer_failures(self, *, drained: bool) -> list[Failure]:
        """The writer thread's failed writes not yet reported, oldest first; `drained`: once
        every queued step is made durable or has failed."""
        writer = self._writer
        if writer is None or self.stopped is not None:
            return []
        failures = writer.take_failures()
        if drained and writer.is_alive():
            writer.queue.join()
            failures += writer.take_failures()
        return failures

    def _step_failed(self, error: WriteError, item: StepWrite) -> None:
        """Reports that `item`'s own write failed (`error`), after removing what the write left
        under the step's name (`discard_failed`). With async writes the steps
        queued before it are made durable first (that first half too): when one of them is
        not, the one report names the first such step (and the stop note's step is that
        one), then the later ones and `item`'s."""
        failures = self._writer_failures(drained=True)
        discard_failed(item)
        step = item.step
        if not failures:
            self._write_failed(error, step)
            return
        first = failures[0]
        message = writer_failure(self.path, failures)
        own = WriteError(f"{message}; step {step} not written either: {error}")
        self._write_failed(own, first.step, cause=first.error)

    def _write_failed(
        self, error: WriteError, step: int | None, cause: BaseException | None = None
    ) -> None:
        """Raises `error`, or (on_write_error="warn") warns once, stops recording and notes it
        in the manifest."""
        if self.on_write_error == "raise":
            raise error from cause
        warn(f"stabledrl: warning: recording stopped, training goes on: {error}\n")
        self._note_stop(str(error), step)

    def note_stop(self, reason: str, step: int | None) -> None:
        """Stops recording for `reason`, which the caller has reported (an integration that
        cannot record `step`, training going on): later steps are not written, and the stop
        is noted as a failed write's is under on_write_error="warn". A no-op once stopped."""
        with self._lock:
            if self.stopped is None and not self._closed:
                self._note_stop(reason, step)

    def note_interrupted(
        self, cause: BaseException | None = None, *, unapplied: bool = False
    ) -> None:
        """The training was cut short, by Ctrl-C or by `cause` (the exception that ended it;
        None: a KeyboardInterrupt): as the Recorder closes, once its steps are written, the
        run notes it after the last step it holds (the manifest's `recording_stopped`: how,
        `cut_short`; the Recorder is not stopped by it, so no failure is reported), unless a
        failed write stopped recording already: closed on the way out, the run would read as
        a finished one of fewer steps. `unapplied`: the exception came in the optimizer step
        of the last step the run holds (CUDA out of memory in Adam's first step), whose batch
        is recorded but whose update never applied: the note says so. The first note holds
        (a with-block's after an integration's own)."""
        if self._interrupted is None:
            self._interrupted = cut_short(cause or KeyboardInterrupt())
            self._unapplied = unapplied

    def _note_stop(self, reason: str, step: int | None) -> None:
        """Marks the Recorder stopped and notes it (`_write_stop_note`)."""
        self.stopped, self.stopped_step = reason, step
        self._write_stop_note(reason, step)

    def _write_stop_note(self, reason: str, step: int | None) -> None:
        """Notes the stop (`StopNote`); one the manifest refused is tried again before the run
        is marked closed."""
        refused = self._stop_note.write(reason, step)
        if refused is not None:
            self._unnoted_stop = refused

    def close(self) -> None:
        """Drains the queue (async mode), stops the writer and marks the run `recording_closed`
        (with several ranks, this rank closed: module docstring). Idempotent; a close interrupted
        while it drains (a second Ctrl-C) is finished by the next call, at the latest by the
        one at exit. In a forked child it only closes the child's copy: the writer is the
        parent's. Once nothing is left to write, the rank is free for another Recorder
        (`_writer_lock`). Made by a signal handler in the thread of a step under way, it
        writes the queued steps and leaves the rest to the step's end. As the interpreter
        ends (a generator holding a with-Recorder block, finalized after the exit handlers), it
        is too late to write (imports fail): the run reads unclosed, as a Recorder left open."""
        if sys.is_finalizing():
            return
        if self._step_thread == threading.get_ident():  # a signal handler's, during a step
            self._close_deferred = True
            if self._writer is not None and self._writer.is_alive():
                self._writer.queue.join()  # the steps before it, for a handler that os._exits
            return
        own = os.getpid() == self._pid
        writer = self._writer if own else None
        try:
            if writer is not None and writer.is_alive():
                with self._lock:  # a log_step under way in another thread is queued first
                    self._closed = True
                    writer.stop()
                    self._cancel_on_sigterm()
                    self._drop_exit_handlers()  # (held the writer until the process ended)
                    self._raise_writer_error()
            if own:
                self._note_cut_short()
                self._mark_run_closed(closing=True)
            self._closed = True
        finally:
            if writer is None or not writer.is_alive():
                self._writer_lock.release()

    def _note_cut_short(self) -> None:
        """Notes how the training was cut short (`note_interrupted`), after the run's last
        step, before the run is marked closed; nothing once a failed write stopped it."""
        if self._interrupted and self.stopped is None and not self._closed_marked:
            last = self._last_step
            after = "before its first step" if last is None else f"after step {last}"
            if last is not None and self._unapplied:
                after = f"in step {last}, its update not applied"
            step = None if last is None else last + 1
            self._write_stop_note(f"training {self._interrupted} {after}", step)

    def end_at_exit(self) -> None:
        """At exit (the Recorder's own exit handler, async_writes): its queued steps are
        written and the run marked closed, as by `close`, but the Recorder stays open, writing
        at once: an exit handler of the script registered before the Recorder was made runs
        after this one (Python runs them last-registered first), and a step it logs is
        recorded rather than refused (which would skip the rest of that handler)."""
        if self._closed or os.getpid() != self._pid:
            self.close()  # finishes a close interrupted while it drained; a forked child's copy
            return
        writer = self._writer
        if writer is not None and writer.is_alive():
            with self._lock:
                writer.stop()
                self._cancel_on_sigterm()
                try:
                    self._raise_writer_error()
                finally:
                    self._writer = None  # later steps are written by log_step itself
        self._note_cut_short()
        self._mark_run_closed(closing=False)
        self._writer_lock.release()  # the process ends: the run reads as closed, not died

    def _mark_run_closed(self, *, closing: bool) -> None:
        """Marks the run `recording_closed` (with several ranks, this rank closed: module
        docstring), once, best effort, under the lock: a log_step under way in another thread
        lands first. `closing`: the Recorder closes with it (`close`); else it goes on writing
        at once (`end_at_exit`)."""
        if self._closed_marked:
            return
        with self._lock:
            self._closed = self._closed or closing
            self._closed_marked = True
            with suppress(ValueError, InputError, WriteError):  # best effort
                if self._unnoted_stop is not None:  # never closed as if whole: unmarked then
                    amend_manifest(self.path, RECORDING_STOPPED, self._unnoted_stop)
                    self._unnoted_stop = None
                if self.world_size == 1:
                    amend_manifest(self.path, RECORDING_CLOSED, True)
                else:
                    close_rank(self.path, self.rank, self.world_size)

    def closed_by_caller_at_exit(self) -> None:
        """Leaves closing this Recorder at exit to the caller (`close`), which does it later
        than the Recorder's own exit handler (async_writes) would run: that handler is
        removed. `record -- CMD` closes its run after every exit handler of the command, so
        that one registered before the run opened may still log a step."""
        if self._writer is not None:
            self._drop_exit_handlers()

    def _drop_exit_handlers(self) -> None:
        """Removes this Recorder's exit handlers (async_writes), which hold its writer."""
        atexit.unregister(self._at_exit)
        self._cancel_at_child_end()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, traceback: object) -> None:
        """Closes the Recorder. When the block raised, its exception goes on: a failed write
        that the close reports (async writes) is then a warning, not an error in its place;
        the run first notes how its training was cut short (`note_interrupted`), but by a
        `sys.exit(0)` or a generator's close, a normal end (`normal_end`)."""
        if exc is None or normal_end(exc):
            self.close()
            return
        self.note_interrupted(exc)
        try:
            self.close()
        except WriteError as error:
            warn(f"stabledrl: warning: {error}\n")

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


def normal_end(exc: BaseException) -> bool:
    """Whether an exception that ends a training is the script's own normal end, which notes
    no stop: sys.exit(0) (or sys.exit() alone), or GeneratorExit, a generator of steps whose
    consumer took no more (a `break` out of its loop, its `close()`), no failure of them."""
    if isinstance(exc, GeneratorExit):
        return True
    return isinstance(exc, SystemExit) and exc.code in (None, 0)


def cut_short(cause: BaseException) -> str:
    """How an exception that ended a training cut it short, in a few words for its run's stop
    note: `interrupted (Ctrl-C)`, `ended by sys.exit(2)`, `stopped by RuntimeError: CUDA out
    of memory` (its message's first line, at most `_CAUSE_SHOWN` characters; its type alone
    when its str() raises, which must not replace it)."""
    if isinstance(cause, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if isinstance(cause, SystemExit):
        return f"ended by sys.exit({cause.code!r})"
    try:
        text = str(cause)
    except Exception:
        text = ""
    lines = text.strip().splitlines()
    message = lines[0] if lines else ""
    if len(message) > _CAUSE_SHOWN:
        message = message[: _CAUSE_SHOWN - 3] + "..."
    return f"stopped by {type(cause).__name__}" + (f": {message}" if message else "")


_CAUSE_SHOWN = 200
"""The most characters of an exception's message a stop note gives."""


def _close_at_exit(
    ref: weakref.ref[Recorder], writer: WriteThread, path: Path, noted: StopNote | None
) -> None:
    """At exit: closes the Recorder; one dropped unclosed still has its queued steps written.
    A write that fails then, and that its caller has not been told of, is one warning line: no
    caller is left to raise it to."""
    recorder = ref()
    with _warned_at_the_end():
        if recorder is not None:
            uncaught = _uncaught_at_exit()
            if uncaught is not None:
                recorder.note_interrupted(uncaught)
            recorder.end_at_exit()
        else:  # (in a forked child the copy's thread is not alive: nothing to do)
            writer.stop()
            raise_failures(writer, path, noted)


def _uncaught_at_exit() -> BaseException | None:
    """The uncaught exception that ends the script (Python keeps it as `sys.last_value` as it
    prints it, before the exit handlers run), else None. None in an interactive session too
    (the REPL, IPython), where it is an error shown earlier that ended nothing, and for one
    that did not come up through the script's top level (`sys.last_traceback`'s first frame has
    a caller): an error that ended nothing, kept there by what showed it (pytest keeps a failed
    test's, `code.InteractiveInterpreter` a command's)."""
    if hasattr(sys, "ps1") or sys.flags.interactive or "IPython" in sys.modules:
        return None
    uncaught = getattr(sys, "last_value", None)
    trace = getattr(sys, "last_traceback", None)
    if trace is None or trace.tb_frame.f_back is not None:
        return None
    return uncaught if isinstance(uncaught, BaseException) else None


def _written_on_sigterm(
    ref: weakref.ref[Recorder], writer: WriteThread, path: Path, noted: StopNote | None
) -> None:
    """On a SIGTERM that ends the process at once (`_sigterm`): the queued steps are written,
    without the Recorder's lock (the training thread may have been stopped holding it), and
    the run is left unclosed, as a killed recording leaves it. A write that fails then is one
    warning line, as at exit."""
    if writer.is_alive():
        writer.queue.join()
    recorder = ref()
    with _warned_at_the_end():
        if recorder is not None:
            recorder._raise_writer_error()
        else:
            raise_failures(writer, path, noted)


@contextmanager
def _warned_at_the_end() -> Iterator[None]:
    """A WriteError as the process ends is one warning line: no caller is left to raise it to."""
    try:
        yield
    except WriteError as error:
        warn(f"stabledrl: warning: {error}\n")
