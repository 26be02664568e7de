"""Record a verl actor's optimizer steps (verl 0.9.x, the engine workers).

verl trains the actor in Ray worker processes: `install()` must run inside each of them. The
clean way is Ray's per-worker setup hook, given to `ray.init` through verl's config:

    python -m verl.trainer.main_ppo ... \\
      +ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=$HOOK \\
      +ray_kwargs.ray_init.runtime_env.env_vars.STABLEDRL_RUN_DIR=/abs/path/runs/mine

with HOOK=stabledrl_cli.integrations.verl.install. Under `stabledrl record --out DIR --
python -m verl.trainer.main_ppo ...` the run directory is already exported as
$STABLEDRL_RUN_DIR (a local Ray cluster's workers inherit the driver's environment) and the
setup hook is the only addition; $STABLEDRL_FORCE=1 overwrites an existing run and
$STABLEDRL_REWARD_RANGE=LOW,HIGH (0,1 for a success rate) records the reward's range, the
observed-collapse rule's floor (Ray calls the hook with no argument). Steps are
numbered by each process from 0, so a job resumed from a checkpoint needs a new directory or
$STABLEDRL_FORCE=1. Without a run directory `install()` does nothing, so the hook is
harmless in every other process. In one process (a custom loop
driving an engine) call `install(out=...)` before training; under `stabledrl record` an `out`
other than record's --out is refused (UsageError), since record would find no step. A second
`install(out=...)` naming another directory than the first is refused too (UsageError naming
both); `uninstall()` closes the run, after which `install()` may record elsewhere.

What is hooked, in the worker process:
- `BaseEngine.train_batch`: one call is one optimizer step (zero_grad, forward/backward over
  the micro-batches, `optimizer_step()`), i.e. one stabledrl step per (ppo epoch,
  mini-batch). When its loss function is the actor's `ppo_loss`, each micro-batch's loss call
  is wrapped: after verl's own loss, the tensors it used (`capture_micro_batch`) are taken,
  and the engine's `optimizer_step()` is shadowed on the instance for the step to read the
  pre-clip norm it returns (verl skips the update when it is not finite: `update_skipped`).
  verl's critic and SFT losses pass through untouched, and so does any other loss, said in
  one warning naming it; the actor's loss under on-policy distillation
  (`distillation_ppo_loss`) or one of its own (a partial given verl's ActorConfig) is
  refused like a configuration the catalogue cannot express (below). A policy loss the user
  registered (`register_policy_loss`, under a name of its own or over verl's) is recorded
  with no policy, the manifest's `meta.policy_unidentified` naming it.
- `TrainingWorker.train_batch`: the step its engine took is written once it returns, with
  verl's own metrics of the step (gathered over the data-parallel ranks there): `clip_frac`,
  `kl` and verl's loss terms under its names (`logged_scalars`). Without `TrainingWorker` the
  step is written at once, without them.
- `TrainingWorker.train_mini_batch`: once per rollout, the data-parallel ranks exchange their
  `uid`s and whether their part of the rollout holds tokens verl's rollout rejection sampling
  left in token-mean's count (one `all_gather_object`), so every rank maps the same spec
  (token-mean: `agg=recorded`, from the first step of the first such rollout: a later one
  turns the run's spec to it there, `meta.rejected_tokens_from_step` naming the step, in one
  warning a rank), prompt groups get the same global id on every rank and
  a group with members on another rank or in another mini-batch is marked `group_split`
  (the manifest's `meta.num_generations`, rollout.n, lets the join of the ranks clear the marks
  of a group whose members are all in the step; none is recorded when the first rollout has a
  group of another size, a prompt's own `__rollout_n__`; a later rollout with such a group
  records no prompt groups when the run has several ranks, said in one warning).

Engines: exercised on verl's FSDP2 engine (tests/verl_scripts). Megatron, torchtitan and
automodel inherit `train_batch` and call the loss function and `optimizer_step()` the same
way but are untested here (docs/frameworks.md, "Record a verl job": where a Megatron job
records). The recorded `loss` is verl's own `pg_loss`, before the micro-batch count Megatron
multiplies it by and its pipeline schedule divides back out.

Each data-parallel rank writes its own step files (rank = verl's data-parallel rank); only
the rank that holds a model-parallel group's outputs records (sequence-parallel local rank 0
under Ulysses). Recording never breaks training: a configuration the catalogue cannot
express (`policy_for_actor_config`), a verl outside SUPPORTED_VERL met by `install()` without
`out` (the setup hook: raising there would crash every Ray worker) or any recording failure
is reported once on stderr (and to `stabledrl record`) and recording stops; the steps
before it stay, and a run already opened notes the stop (its manifest's `recording_stopped`,
which `inspect` and `watch` show).
"""

from __future__ import annotations

import atexit
import importlib.metadata
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stabledrl_cli.capture._record_out import refuse_another_run_dir
from stabledrl_cli.capture._status import RecordingFailure
from stabledrl_cli.capture.bootstrap import ENV_RUN_DIR, env_force, integration_records
from stabledrl_cli.dump._arguments import path_argument, switch_argument
from stabledrl_cli.dump._recorder_args import checked_reward_range, reward_range_text
from stabledrl_cli.errors import MissingExtraError, UsageError, install_command
from stabledrl_cli.integrations._verl_facts import SUPPORTED_VERL, supported_verl
from stabledrl_cli.integrations._verl_policy import LOSS_MODES, policy_for_actor_config

if TYPE_CHECKING:
    from stabledrl_cli.integrations._verl_session import Session

__all__ = [
    "LOSS_MODES",
    "SUPPORTED_VERL",
    "check_verl_version",
    "install",
    "installed",
    "policy_for_actor_config",
    "uninstall",
]

_lock = threading.Lock()

ENV_REWARD_RANGE = "STABLEDRL_REWARD_RANGE"
"""LOW,HIGH: the reward range `install()` records when it is given none."""


def check_verl_version() -> str:
    """The installed verl version; MissingExtraError when verl is absent, UsageError when it is
    outside SUPPORTED_VERL."""
    try:
        version = importlib.metadata.version("verl")
    except importlib.metadata.PackageNotFoundError:
        raise MissingExtraError(
            f"the verl integration needs verl: {install_command('verl')}"
        ) from None
    if not supported_verl(version):
        raise UsageError(
            f"the verl integration supports verl {SUPPORTED_VERL}; found verl {version}"
        )
    return version


_session: Session | None = None


def installed() -> bool:
    """True when this process records verl's optimizer steps."""
    return _session is not None


def install(
    out: str | os.PathLike[str] | None = None,
    *,
    overwrite: bool | None = None,
    reward_range: tuple[float, float] | None = None,
) -> bool:
    """Hooks verl's engine in this process. out: the run directory, default
    $STABLEDRL_RUN_DIR; without either this does nothing and returns False. overwrite: replace
    an existing run (default $STABLEDRL_FORCE, which the rank's first Recorder of the command
    takes: a later process of the rank finds the steps recorded and does not replace them).
    reward_range: (low, high) the reward spans, recorded in the manifest (default
    $STABLEDRL_REWARD_RANGE, LOW,HIGH; else none). Returns True when recording is installed.
    Once installed, a call without `out` or with the same directory returns True and changes
    nothing; one naming another directory raises UsageError naming both (its steps would go
    on into the first: uninstall() first). Raises UsageError for an `overwrite` that is not
    None, True or False, for a `reward_range` that is not two finite numbers, low < high, for
    an `out` that is empty or no path, and when `out` is another
    directory than $STABLEDRL_RUN_DIR (`stabledrl record --out`, whose optimizer hooks stand
    down for verl: record would find no step there), and MissingExtraError / UsageError when verl is
    absent or not 0.9.x or $STABLEDRL_REWARD_RANGE is no LOW,HIGH and `out` is given; without
    `out` (the Ray setup hook) that is one warning, `stabledrl record` is told, and this
    returns False."""
    global _session
    if overwrite is not None:
        switch_argument(overwrite, "overwrite")
    if reward_range is not None:
        reward_range = checked_reward_range(reward_range)
    with _lock:
        if _session is not None:
            _refuse_another_out(_session.out, out)
            return True
        target = _run_dir(out)
        if not target:
            return False
        try:
            check_verl_version()
            span = reward_range if reward_range is not None else _env_reward_range()
            if overwrite is None:  # a bad switch is refused here; the Recorder takes it
                env_force()  # (`_run_env.forced_run`): once for the command, never again
        except UsageError as exc:
            if out is not None:
                raise
            # the Ray setup hook: raising there would crash every Ray worker
            RecordingFailure().fail(exc, "cannot record this process")
            return False
        _session = session = _hooked_session(Path(target), overwrite, span)
    integration_records()  # the optimizer hooks of `stabledrl record` stand down
    atexit.register(session.close)
    return True


def _env_reward_range() -> tuple[float, float] | None:
    """$STABLEDRL_REWARD_RANGE's LOW,HIGH; None when it is unset or empty."""
    text = os.environ.get(ENV_REWARD_RANGE, "")
    return reward_range_text(text, f"${ENV_REWARD_RANGE}") if text else None


def _hooked_session(
    out: Path, overwrite: bool | None, reward_range: tuple[float, float] | None
) -> Session:
    """A new recording into `out`, verl's engine (and TrainingWorker) methods wrapped for it."""
    from verl.workers.engine.base import BaseEngine

    from stabledrl_cli.integrations._verl_hooks import (
        train_batch_hook,
        train_mini_batch_hook,
        worker_train_batch_hook,
    )
    from stabledrl_cli.integrations._verl_session import Session

    session = Session(out, overwrite, reward_range)
    session.originals["train_batch"] = BaseEngine.train_batch
    BaseEngine.train_batch = train_batch_hook(session)
    worker = _training_worker()
    if worker is not None:
        session.originals["train_mini_batch"] = worker.train_mini_batch
        worker.train_mini_batch = train_mini_batch_hook(session)
        session.originals["worker_train_batch"] = worker.train_batch
        worker.train_batch = worker_train_batch_hook(session)
    return session


def _refuse_another_out(recording: Path, out: str | os.PathLike[str] | None) -> None:
    """UsageError when `out` names another directory than the one this process already records
    into: its steps would go on into the first one."""
    if out is not None and os.path.realpath(out) != os.path.realpath(recording):
        raise UsageError(
            f"install(out={os.fspath(out)}): this process already records into {recording}; "
            "call uninstall() first to record into another directory"
        )


def _run_dir(out: str | os.PathLike[str] | None) -> str | os.PathLike[str] | None:
    """`out`, else $STABLEDRL_RUN_DIR; UsageError when `out` is empty or no path, or when
    both are there and name two directories."""
    if out is None:
        return os.environ.get(ENV_RUN_DIR)
    out = path_argument(out, "out")
    refuse_another_run_dir(out, f"install(out={os.fspath(out)})", "call install() without out")
    return out


def uninstall() -> None:
    """Restores verl's methods and closes the run (a no-op when not installed)."""
    global _session
    with _lock:
        session, _session = _session, None
    if session is None:
        return
    from verl.workers.engine.base import BaseEngine

    BaseEngine.train_batch = session.originals["train_batch"]
    worker = _training_worker()
    if worker is not None and "train_mini_batch" in session.originals:
        worker.train_mini_batch = session.originals["train_mini_batch"]
        worker.train_batch = session.originals["worker_train_batch"]
    session.close()


def _training_worker() -> type[Any] | None:
    """verl's `TrainingWorker`, or None where its module cannot be imported (it needs the
    rollout server's packages, e.g. uvicorn, which a verl worker always has): without it the
    engine is still recorded, with prompt groups numbered per rank."""
    try:
        from verl.workers.engine_workers import TrainingWorker
    except ImportError:
        return None
    worker: type[Any] = TrainingWorker
    return worker
