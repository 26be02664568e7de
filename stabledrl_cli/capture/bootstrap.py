"""The child side of `stabledrl record --out DIR -- CMD`: `log_policy_batch`.

`record` exports to the training command:
- STABLEDRL_RUN_DIR: the run directory to write;
- STABLEDRL_FORCE: "1" when --force was given (overwrite a non-empty directory);
- STABLEDRL_POLICY: the --policy spec, when given;
- STABLEDRL_STATUS_FILE: a file of `record`'s, where the child reports a recording failure.

Inside the child, the first `log_policy_batch` call opens a Recorder on the run directory;
under a launcher that sets torch.distributed's RANK and WORLD_SIZE (torchrun, accelerate,
deepspeed) it records as that rank, each rank writing its own step files (`recorder_kwargs`
may still pass `rank` and `world_size`);
every call logs one step; the Recorder is closed at interpreter exit. Recording must never
break training: the first failure is reported once on stderr as a warning, every later call
is a no-op that returns False, and training goes on.

How the parent learns of a failure: `report_failure` appends one line `CODE<TAB>MESSAGE` to
the status file (CODE is the exit code the failure maps to: 2 for a usage error such as a
missing policy, 3 for bad input arrays, 4 for a run that could not be written). After the
command exits, `record` reads that file: a reported failure, or a run with no step at all,
makes it exit non-zero with the reason, unless the command's own non-zero exit code wins.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import TYPE_CHECKING, Any

from stabledrl_cli.errors import InputError, StabledrlError, UsageError, WriteError

if TYPE_CHECKING:
    from stabledrl_cli.dump import Recorder
    from stabledrl_cli.dump._policy import PolicyLike

ENV_RUN_DIR = "STABLEDRL_RUN_DIR"
ENV_FORCE = "STABLEDRL_FORCE"
ENV_POLICY = "STABLEDRL_POLICY"
ENV_STATUS_FILE = "STABLEDRL_STATUS_FILE"
ENV_TORCH_RANK = "RANK"
ENV_TORCH_WORLD_SIZE = "WORLD_SIZE"

NO_POLICY = (
    "no policy to record: pass one to `stabledrl record`, e.g. `--policy grpo`, or to the "
    "first call, e.g. `log_policy_batch(step, policy='grpo', ...)`"
)

_lock = threading.Lock()
_recorder: Recorder | None = None


def report_failure(code: int, message: str) -> None:
    """Tell the parent `record` that recording failed (a no-op outside `record -- CMD`)."""
    path = os.environ.get(ENV_STATUS_FILE)
    if not path:
        return
    line = f"{code}\t{' '.join(message.split())}\n"
    try:
        with open(path, "a", encoding="utf-8") as status:
            status.write(line)
    except OSError as exc:
        sys.stderr.write(f"stabledrl: warning: cannot report to {path}: {exc}\n")


class RecordingFailure:
    """Recording must never break the training it observes: the first failure of a recording
    is reported once, as a warning on stderr and to the parent `stabledrl record`
    (`report_failure`); from then on recording is off and training goes on. `log_policy_batch`,
    the TRL integration and the verl integration all report through one of these."""

    def __init__(self) -> None:
        self.off = False

    def fail(self, exc: BaseException, context: str) -> None:
        """Warns once and tells `stabledrl record`; recording is off from now on. A tool
        error keeps its exit code; anything else the Recorder could not take is bad input."""
        if self.off:
            return
        self.off = True
        if isinstance(exc, StabledrlError):
            code, reason = exc.exit_code, str(exc)
        else:
            code, reason = InputError.exit_code, f"{type(exc).__name__}: {exc}"
        message = f"{context}: {reason}"
        sys.stderr.write(f"stabledrl: warning: {message}; recording is off, training continues\n")
        sys.stderr.flush()
        report_failure(code, message)

    def stopped(self, reason: str | None, context: str) -> bool:
        """After a `log_step`: when the Recorder stopped itself (`on_write_error="warn"`: it
        has warned already and noted it in the manifest), recording is off and `stabledrl
        record` is told, with no second warning. -> whether recording is off."""
        if reason is not None and not self.off:
            self.off = True
            report_failure(WriteError.exit_code, f"{context}: {reason}")
        return self.off


_failure = RecordingFailure()


def _launcher_rank() -> dict[str, int]:
    """{"rank", "world_size"} from torch.distributed's RANK and WORLD_SIZE (set by torchrun),
    else {} (one process). A value that is not an integer is a UsageError."""
    rank, world_size = os.environ.get(ENV_TORCH_RANK), os.environ.get(ENV_TORCH_WORLD_SIZE)
    if rank is None or world_size is None:
        return {}
    try:
        return {"rank": int(rank), "world_size": int(world_size)}
    except ValueError:
        raise UsageError(
            f"{ENV_TORCH_RANK}={rank!r} and {ENV_TORCH_WORLD_SIZE}={world_size!r} must be integers"
        ) from None


def _open(policy: str | PolicyLike | None, recorder_kwargs: dict[str, Any]) -> Recorder:
    global _recorder
    if _recorder is not None:
        return _recorder
    run_dir = os.environ.get(ENV_RUN_DIR)
    if not run_dir:
        raise UsageError(f"{ENV_RUN_DIR} is not set (run the script under `stabledrl record`)")
    policy = policy or os.environ.get(ENV_POLICY)
    if not policy:
        raise UsageError(NO_POLICY)
    from stabledrl_cli.dump import Recorder  # the training script may never log a step

    force = os.environ.get(ENV_FORCE, "") not in ("", "0")
    recorder_kwargs.setdefault("on_write_error", "warn")  # a full disk never stops training
    for name, value in _launcher_rank().items():
        recorder_kwargs.setdefault(name, value)
    _recorder = Recorder(run_dir, policy=policy, overwrite=force, **recorder_kwargs)
    atexit.register(close)
    return _recorder


def log_policy_batch(
    step: int,
    *,
    policy: str | PolicyLike | None = None,
    recorder_kwargs: dict[str, Any] | None = None,
    **fields: Any,
) -> bool:
    """Log one optimizer step to the run that `stabledrl record -- CMD` set up.

    `fields` are `Recorder.log_step`'s keyword arguments (logp, logp_old, advantages, mask,
    seq_id, group_id, reward, grad_norm, loss, ...). `policy` (a spec such as
    "dapo:eps_high=0.28", or a catalogue policy; else STABLEDRL_POLICY) and `recorder_kwargs`
    (unit, estimator, meta, ...) are used by the first call, which opens the Recorder.
    Returns True when the step was recorded. Never raises.
    """
    if _failure.off:
        return False
    try:
        with _lock:
            recorder = _open(policy, dict(recorder_kwargs or {}))
            recorder.log_step(step, **fields)
        return not _failure.stopped(recorder.stopped, f"recording stopped at step {step}")
    except Exception as exc:
        _failure.fail(exc, f"log_policy_batch failed at step {step}")
        return False


def close() -> None:
    """Close the Recorder (registered with atexit; safe to call twice)."""
    global _recorder
    with _lock:
        recorder, _recorder = _recorder, None
    if recorder is not None:
        try:
            recorder.close()
        except Exception as exc:
            _failure.fail(
                WriteError(str(exc)) if isinstance(exc, OSError) else exc, "closing the run"
            )
