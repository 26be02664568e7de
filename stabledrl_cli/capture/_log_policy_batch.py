"""`log_policy_batch`: a policy batch's half of a step, logged into the run of `stabledrl record
-- CMD` (`bootstrap`, which pairs it with the optimizer hooks' half and writes the step), after
the checks a batch gets first: the run's policy named again otherwise (one warning), so are
its `recorder_kwargs` (one warning), a batch with no token in a one-rank run (skipped, one
warning).

The run's state (its Recorder, lock, held and last steps, failure, and this module's own)
is `bootstrap.recording`, read at each call (a test gives the bootstrap a fresh one).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from stabledrl_cli.capture import bootstrap
from stabledrl_cli.capture._script_args import policies_differ, refuse_unknown, warn_policy_changed
from stabledrl_cli.capture._step_pairing import Step, snapshot, warn_numbered_from_1
from stabledrl_cli.errors import UsageError, warn

if TYPE_CHECKING:
    from stabledrl_cli.dump import Recorder
    from stabledrl_cli.dump._policy import PolicyLike


def _check_policy(step: int, policy: str | PolicyLike | None) -> None:
    """Notes the run's policy at the first batch that names one (its own, else record's
    --policy); a later batch naming another warns, once."""
    recording = bootstrap.recording
    if recording.batch_policy is None:
        recording.batch_policy = policy or os.environ.get(bootstrap.ENV_POLICY) or None
    elif (
        policy
        and not recording.warned_policy_changed
        and policies_differ(policy, recording.batch_policy)
    ):
        recording.warned_policy_changed = True
        warn_policy_changed(step, policy, recording.batch_policy)


def _differs(first: object, later: object) -> bool:
    """Whether a later `recorder_kwargs` value is another than the first batch's: False for
    values that do not compare to a truth value (arrays): no warning rather than a failure."""
    try:
        return bool(first != later)
    except Exception:  # (numpy's "truth value of an array is ambiguous", say)
        return False


def _check_recorder_kwargs(step: int, kwargs: Mapping[str, Any] | None) -> None:
    """Notes the `recorder_kwargs` the first batch gave, which open the run; a later batch that
    gives another value of one of their keys (an estimator's `mask_samples` raised mid-run)
    warns, once, naming those keys: the run keeps the first batch's."""
    recording = bootstrap.recording
    if recording.batch_kwargs is None:
        recording.batch_kwargs = dict(kwargs or {})
        return
    if kwargs is None or recording.warned_kwargs_changed:
        return
    missing = object()
    changed = [
        key
        for key, value in kwargs.items()
        if _differs(recording.batch_kwargs.get(key, missing), value)
    ]
    if changed:
        recording.warned_kwargs_changed = True
        warn(
            f"stabledrl: warning: log_policy_batch({step}) gives recorder_kwargs another "
            f"{', '.join(changed)} than the run's first batch did: the run was opened with the "
            "first batch's, and keeps them\n"
        )


def _no_token(step: int, fields: dict[str, Any], recorder: Recorder) -> bool:
    """Whether `fields` is a batch with no token in a one-rank run, a step the format has no
    place for (`Recorder.log_step` refuses it): the first one warns that such batches are not
    recorded. A rank's empty part of a multi-rank step is recorded."""
    logp = fields.get("logp")
    if logp is None or recorder.world_size > 1:
        return False
    from stabledrl_cli.dump._input_arrays import element_count  # loaded with the Recorder already

    if element_count(logp, "logp"):
        return False
    if not bootstrap.recording.warned_no_token:
        bootstrap.recording.warned_no_token = True
        warn(
            f"stabledrl: warning: log_policy_batch at step {step}: a batch with no token is "
            "not recorded (nor the next ones, without another warning); recording goes on\n"
        )
    return True


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
    (unit, estimator, meta, ...) are used by the call that opens the Recorder. Under the
    optimizer hooks, step n is merged with the n-th optimizer step (docs/recording.md, "Policy
    batches and optimizer steps in one run").
    Returns True when the step was recorded: written, or, in a run that the optimizer hooks
    opened (asynchronous writes), handed to the Recorder's writer thread, whose failure
    shows at a later call (False) and in `record`'s exit code. False also for a batch with no
    token in a one-rank run: the format has no such step, so it is skipped (the first one
    warns) and recording goes on; under the hooks its step stays the optimizer's scalar step.
    False too for a call that comes while this thread records another step (a signal
    handler's): it is refused with a warning, and recording goes on.
    A field or a `recorder_kwargs` key the Recorder does not take is a usage error (exit 2),
    named, as the steps `log_step` refuses are. Never raises.
    """
    recording = bootstrap.recording
    if (
        recording.failure.off
        or recording.closed
        or bootstrap.inside_a_step(f"log_policy_batch at step {step}")
    ):
        return False
    held = None  # a held optimizer step before this one, written (and the run opened) first
    try:
        refuse_unknown(fields, "log_step", "a field of log_policy_batch")
        if recorder_kwargs is not None and not isinstance(recorder_kwargs, Mapping):
            raise UsageError(
                f"recorder_kwargs must be a dict, got {type(recorder_kwargs).__name__}"
            )
        with recording.lock:
            first_batch = not recording.first_batch_logged
            recording.first_batch_logged = True
            kwargs = dict(recorder_kwargs or {})
            pairs_held = recording.held is not None and recording.held.number == step
            if not pairs_held:
                held = recording.held
                bootstrap.release_held(policy, kwargs)
                held = None
            recorder = bootstrap.open_recorder(policy, kwargs, batch=True, hooks=pairs_held)
            _check_policy(step, policy)
            _check_recorder_kwargs(step, recorder_kwargs)
            if _no_token(step, fields, recorder):
                bootstrap.release_held(policy, kwargs)  # the optimizer's half alone
                return False
            if recording.held is not None:  # (pairs_held)
                recording.held.batch = fields
                bootstrap.release_held(policy, kwargs)
                return not recording.failure.off
            if (
                recording.last is not None
                and recording.last.number == step
                and recording.last.batch is None
            ):
                recording.last.batch = fields
                return bootstrap.write_step(recording.last, recorder, replace=True)
            if first_batch:
                warn_numbered_from_1(recording.last, step)
            return bootstrap.write_step(Step(step, batch=snapshot(fields)), recorder, replace=False)
    except Exception as exc:  # named by the first step it loses: the held one's, if not written
        recording.failure.fail(
            exc,
            f"log_policy_batch failed at step {step}"
            if held is None
            else f"recording optimizer step {held.number}",
        )
        return False
