"""`check`'s absolute gates in `stabledrl watch`, over the steps read so far, and the refusal
of a policy gate on a run whose own policy replays no step (before torch loads, with --once)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from stabledrl_cli.cli._output import err
from stabledrl_cli.dump import Run
from stabledrl_cli.dump._integrity import integrity_warnings_ignored
from stabledrl_cli.errors import UsageError, counted
from stabledrl_cli.replay.evaluation import evaluate
from stabledrl_cli.replay.gate import GateResult, Gates
from stabledrl_cli.replay.run_facts import own_spec, print_own_policy_note, scalar_steps

if TYPE_CHECKING:
    from stabledrl_cli.replay.watch.follow import RunWatcher


def require_replayed(watcher: RunWatcher) -> None:
    """InputError when every step with a policy batch read so far was rejected."""
    refused = None if watcher.replay is None else watcher.replay.unreplayable()
    if refused is not None:
        raise refused


def refuse_policy_gates(watcher: RunWatcher, gates: Gates) -> None:
    """`_unreplayed_gates` when the own policy replayed no step (as `check` refuses a policy
    gate on a scalar run)."""
    replay = watcher.replay
    if not gates.policy_gates or replay is None or (replay.spec is not None and replay.steps):
        return
    raise _unreplayed_gates(watcher.path, gates, replay.run, own=replay.spec is not None)


def _unreplayed_gates(path: Path, gates: Gates, run: Run, *, own: bool) -> UsageError:
    """The UsageError for a policy gate on a run whose own policy replays no step: the run
    names no policy or one not in the catalogue (`own` False: no step it gains is replayed),
    or it is a scalar run so far."""
    if not own:
        why = (
            f"the run's policy {run.policy_spec!r} is none the catalogue replays (the note "
            "above says why)"
            if run.policy_spec is not None
            else "the run names no policy"
        )
    else:
        why = "it is a scalar run so far (per-step scalars only, no policy batch)"
    return UsageError(
        f"{path}: {', '.join(gates.policy_gates)} need(s) the own policy replayed, "
        f"and {why}; gate it with --max-spikes, --max-nonfinite or --fail-on-collapse"
    )


def refuse_unreplayed_gates(run: Run, path: Path, gates: Gates) -> None:
    """`refuse_policy_gates` of a `--once` watch before torch loads (a second), found from
    the run's headers: a policy gate on a run that names no policy the catalogue replays
    and has a readable step, or on a scalar run (`scalar_steps`), after the note on its own
    policy, as the watch prints it."""
    if not gates.policy_gates:
        return
    own = own_spec(run) is not None
    with integrity_warnings_ignored():  # the watch names the skipped step files later
        unreplayed = scalar_steps(run) > 0 if own else next(run.step_headers(), None) is not None
    if unreplayed:
        print_own_policy_note(run, err)
        raise _unreplayed_gates(path, gates, run, own=own)


def gates_so_far(watcher: RunWatcher, gates: Gates) -> list[GateResult]:
    """`check`'s absolute gates over the steps seen so far: the run-level ones on the recorded
    run (and the steps it lacks, `RunWatcher.lost_steps`), the policy ones on the own policy
    replayed (`refuse_policy_gates`)."""
    replay = watcher.replay
    if not gates.any or replay is None or not replay.seen:
        return []
    require_replayed(watcher)
    refuse_policy_gates(watcher, gates)
    result = replay.result() if replay.spec is not None and replay.steps else None
    return evaluate(result, gates, None, recorded=replay.recorded(), lost=watcher.lost_steps())


def report_gates(results: list[GateResult]) -> int:
    """Each tripped gate on stderr, or that they all hold; 1 if any tripped, else 0."""
    tripped = [r for r in results if not r.ok]
    for r in tripped:
        err.print(f"gate tripped: {r.policy or '(run)'} {r.gate}: {r.message}", highlight=False)
    if results and not tripped:
        hold = "holds" if len(results) == 1 else "hold"
        err.print(f"gates passed: {counted(len(results), 'gate')} {hold}", highlight=False)
    return 1 if tripped else 0
