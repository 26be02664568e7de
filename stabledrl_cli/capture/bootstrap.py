"""The child side of `stabledrl record --out DIR -- CMD`: `log_policy_batch`.

`record` exports STABLEDRL_RUN_DIR (and STABLEDRL_FORCE, STABLEDRL_POLICY when given) to the
training command. Inside it, the first `log_policy_batch` call opens a Recorder on that
directory; every call logs one step; the Recorder is closed at interpreter exit.
Recording must never break training: any failure is reported once on stderr as a warning,
and every later call is a no-op that returns False.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import Any

ENV_RUN_DIR = "STABLEDRL_RUN_DIR"
ENV_FORCE = "STABLEDRL_FORCE"
ENV_POLICY = "STABLEDRL_POLICY"

_lock = threading.Lock()
_recorder: Any = None
_disabled = False


def _warn_once(message: str) -> None:
    global _disabled
    if not _disabled:
        sys.stderr.write(f"stabledrl: warning: {message}; recording is off, training continues\n")
        sys.stderr.flush()
    _disabled = True


def _open(policy: str | None, recorder_kwargs: dict[str, Any]) -> Any:
    global _recorder
    if _recorder is not None:
        return _recorder
    run_dir = os.environ.get(ENV_RUN_DIR)
    if not run_dir:
        raise RuntimeError(f"{ENV_RUN_DIR} is not set (run the script under `stabledrl record`)")
    policy = policy or os.environ.get(ENV_POLICY)
    if not policy:
        raise RuntimeError(f"no policy: pass policy= to log_policy_batch or set {ENV_POLICY}")
    from stabledrl_cli.dump import Recorder

    force = os.environ.get(ENV_FORCE, "") not in ("", "0")
    _recorder = Recorder(run_dir, policy=policy, overwrite=force, **recorder_kwargs)
    atexit.register(close)
    return _recorder


def log_policy_batch(
    step: int,
    *,
    policy: str | None = None,
    recorder_kwargs: dict[str, Any] | None = None,
    **fields: Any,
) -> bool:
    """Log one optimizer step to the run that `stabledrl record -- CMD` set up.

    `fields` are `Recorder.log_step`'s keyword arguments (logp, logp_old, advantages, mask,
    seq_id, group_id, reward, grad_norm, loss, ...). `policy` (else STABLEDRL_POLICY) and
    `recorder_kwargs` (policy_params, unit, estimator, meta, ...) are used by the first call,
    which opens the Recorder. Returns True when the step was recorded. Never raises.
    """
    if _disabled:
        return False
    try:
        with _lock:
            recorder = _open(policy, dict(recorder_kwargs or {}))
            recorder.log_step(step, **fields)
        return True
    except Exception as exc:
        _warn_once(f"log_policy_batch failed at step {step}: {type(exc).__name__}: {exc}")
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
            _warn_once(f"closing the run failed: {type(exc).__name__}: {exc}")
