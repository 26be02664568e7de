"""`Recording`: the state of one process's recording of `stabledrl record -- CMD`'s run, which
`bootstrap` (the optimizer hooks' half of a step, the run's Recorder) and `_log_policy_batch`
(a policy batch's half) share. `bootstrap.recording` holds this process's; a test that drives
them in its own process starts from a fresh one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stabledrl_cli.capture._run_lock import RunLock
from stabledrl_cli.capture._status import RecordingFailure

if TYPE_CHECKING:
    from stabledrl_cli.capture._step_pairing import Step
    from stabledrl_cli.dump import Recorder
    from stabledrl_cli.dump._policy import PolicyLike


class Recording:
    """What one recording changes as its steps come (every attribute starts as a process
    that has recorded nothing has it)."""

    def __init__(self) -> None:
        self.lock = RunLock()
        """Held while a step is recorded (a fork replaces it: `bootstrap._forked`)."""
        self.recorder: Recorder | None = None
        """The run's Recorder, opened by the first step to write."""
        self.failure = RecordingFailure()
        """The first failure, after which recording is off."""
        self.last: Step | None = None
        """The last step written (its halves are kept until the next step starts)."""
        self.hooks_first: bool | None = None
        """Whether the loop's optimizer step comes before its batch: the order of the first
        step that paired both halves (None until one has)."""
        self.held: Step | None = None
        """The hooks' first step, waiting for the next event to open the run."""
        self.integration = False
        """Whether an integration records this process (`bootstrap.integration_records`)."""
        self.hooks_start = 0
        """The run's step of the hooks' optimizer step 0: in a run the script resumes, the
        first step it records again (or appends)."""
        self.closed = False
        """Whether `bootstrap.close` ran: a step logged after it (a daemon thread's, still
        training as the process exits) is left out, where it opened the run again, which the
        closing Recorder (or the run it closed) refused: a recording failure after a training
        that ended well."""
        self.opening = False
        """Whether the run's Recorder is being made (`bootstrap.open_recorder`)."""
        self.first_batch_logged = False
        """Whether log_policy_batch was called (`_step_pairing.warn_numbered_from_1` looks at
        the first batch)."""
        self.batch_policy: str | PolicyLike | None = None
        """The policy the first batch named (its `policy`, else record's --policy): the
        run's."""
        self.warned_policy_changed = False
        """Whether a batch naming another policy than the run's has warned (once)."""
        self.batch_kwargs: dict[str, Any] | None = None
        """The `recorder_kwargs` the first batch gave: those the run was opened with."""
        self.warned_kwargs_changed = False
        """Whether a batch giving other `recorder_kwargs` than the first one's has warned."""
        self.warned_no_token = False
        """Whether a batch with no token has warned that such batches are not recorded."""
