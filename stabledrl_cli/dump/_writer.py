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
the end of the process, a failed write, a forked child) is `_recorder_end`'s; how a step
is recorded (its keywords, several threads) is `_recorder_steps`'s.

Keywords of `Recorder` beyond the run's facts: `group_ids` ("per_rank", the default, or
"global": the recorded group_ids are global prompt-group ids, see `_schema`), `loss_norm`
("global", the default, or "per_rank": each rank normalised its loss over its own part, see
`_schema`), `source` (format
1.2: where the run came from, e.g. {"kind": "import", ...}), `overwrite`, `resume` and
`resume_from` (how an existing directory is treated, see `_setup`). `policy=None` (format 1.2)
records that the run's policy is not known. `overwrite` not given is `_run_env.forced_run`;
rank 0 gives the run a new identity (the manifest's `run_id`) when it creates or overwrites
it, and so does a rank whose resume replaces its steps (`_setup`); a path inside another run
is refused by `_run_target.check_not_in_a_run`. The class docstring is the user's (`help`).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from stabledrl_cli._atomic import write_error
from stabledrl_cli._batch_inputs import WORLD_SIZE_LIMIT
from stabledrl_cli._run_env import forced_run, records_out
from stabledrl_cli.dump._arguments import path_argument, step_number, switch_argument
from stabledrl_cli.dump._file_names import STEPS_DIR
from stabledrl_cli.dump._policy import PolicyLike, own_policy_reads
from stabledrl_cli.dump._recorder_args import (
    checked_reward_range,
    dict_argument,
    fixed_time,
    keyword_names,
    new_manifest,
    param_name_list,
    refuse_unknown_keywords,
    sketch_seed,
    whole_count,
)
from stabledrl_cli.dump._recorder_steps import RecorderSteps
from stabledrl_cli.dump._run_target import check_not_in_a_run
from stabledrl_cli.dump._schema import is_count
from stabledrl_cli.dump._setup import prepared_run, refuse_in_the_way
from stabledrl_cli.errors import UsageError, warn
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


class Recorder(RecorderSteps):
    """Records a training run, one optimizer step at a time (format in docs/run-format.md).

    >>> with Recorder("runs/mine", policy="dapo:eps_high=0.28") as rec:
    ...     rec.log_step(0, logp=logp, logp_old=logp_old, advantages=adv, mask=mask)

    path: the run directory (made if missing; a relative path is taken from the working
    directory as the Recorder is made, so a later `os.chdir` does not move the run).
    policy: the loss the loop computes, as a catalogue spec ("grpo", "stabledrl:c=3"), a
    catalogue Policy (`get_policy`), or your own name (not checked); None when the run's
    policy is not known (a run of scalar steps). policy_params: more parameters of a spec
    string (a key also in the spec is refused). meta, estimator: JSON objects stored in the
    manifest (`inspect` shows them). unit: "token" (per-token log-probs) or "sequence" (one
    estimate a sequence, an ELBO). reward_range: (low, high) of the rewards, which the
    collapse rule reads. world_size, rank: with several ranks, each makes its own Recorder
    on the same path with its rank (rank 0 writes the manifest). group_ids: "per_rank", or
    "global" when the ranks share prompt-group ids. loss_norm: "global", or "per_rank" when
    each rank normalised its loss over its own part. overwrite: replace an existing run
    (this rank's step files; not given, True for `stabledrl record --force`'s run). resume,
    resume_from: continue an existing run after its last step, or from `resume_from` on
    (the steps from it are replaced, earlier ones kept and verified). async_writes,
    queue_size: fsync each step in a thread, with at most `queue_size` steps waiting.
    on_write_error: "raise" (WriteError from `log_step`) or "warn" (warn once on stderr
    and stop recording, so the training goes on). geometry, param_names: gradient geometry
    and per-parameter grad norms (docs/geometry.md). source: where the run came from, a
    JSON object with a string "kind".

    UsageError (nothing recorded) for a bad argument, a catalogue policy given a bad value
    or one its `unit` rules out (stabledrl:level=token on sequence units), an existing
    non-empty directory without `overwrite=True` or `resume=True`, a `path` inside another
    run (but a branch run, RUN/branches/NAME), or a rank another open Recorder records;
    WriteError when the run cannot be written. Use it as a context manager: leaving the
    `with` block closes the run, noting an error or Ctrl-C that ended it.
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
        self._policy_fields, self._policy_micro = own_policy_reads(self._policy_spec, unit)
        """What a policy batch must hold for the replay of the run's own policy, and the
        setting of that policy that reads micro_batch (a step without it warns)."""
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

    def __enter__(self) -> Recorder:
        """The Recorder itself: the `with` block's end closes it (`__exit__`)."""
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
