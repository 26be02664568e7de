"""What a later process of `stabledrl record --force -- sh -c 'python a.py && python b.py'`
is told when its first step finds the run an earlier one of the command made (--force taken
for the rank: `_run_env.force_taken`): how the opener at hand continues it, and whether the
run holds a step. The processes are opened here, the earlier one's switch file in place."""

from __future__ import annotations

from pathlib import Path

import pytest

from stabledrl_cli.capture import bootstrap
from stabledrl_cli.dump import Recorder
from stabledrl_cli.errors import UsageError


def _after_an_earlier_process(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """b's environment under `record --force --out run`: a.py's Recorder took the switch."""
    ranks = run.parent / "ranks"
    ranks.mkdir()
    (ranks / "replaced.rank-0").touch()
    for name, value in [("RUN_DIR", run), ("FORCE", "1"), ("RANKS_DIR", ranks)]:
        monkeypatch.setenv(f"STABLEDRL_{name}", str(value))


def _refused(run: Path, monkeypatch: pytest.MonkeyPatch, *, batch: bool) -> str:
    """The line b's first step gets, its run opened by log_policy_batch (`batch`) or by the
    optimizer hooks alone."""
    _after_an_earlier_process(run, monkeypatch)
    monkeypatch.setattr(bootstrap, "_closed_at_child_end", True)  # no exit handler to leave
    with pytest.raises(UsageError) as refused:
        bootstrap.open_recorder("grpo" if batch else None, {}, batch=batch, hooks=not batch)
    return str(refused.value)


def test_a_later_process_under_force_is_told_to_resume_not_to_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """b.py's first log_policy_batch found the run a.py recorded (the switch is taken once)
    and was told '... run `stabledrl record --force` to record into it', the option the user
    had given."""
    run = tmp_path / "run"
    with Recorder(run, policy="grpo") as recorder:
        recorder.log_step(0, grad_norm=1.0)
    assert _refused(run, monkeypatch, batch=True) == (
        f"{run} already exists and is not empty (manifest.json): an earlier process of the "
        "command recorded it (--force replaces the run once); a later one continues it with "
        "log_policy_batch's recorder_kwargs resume=True"
    )


def test_the_hooks_are_not_told_of_log_policy_batch_they_do_not_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: '... a later one continues it with log_policy_batch's recorder_kwargs
    resume=True', to a script the optimizer hooks record, which has no such call (the hooks
    open the run with no recorder_kwargs: they continue no run)."""
    run = tmp_path / "run"
    with Recorder(run, policy=None) as recorder:
        recorder.log_step(0, grad_norm=1.0)
    assert _refused(run, monkeypatch, batch=False) == (
        f"{run} already exists and is not empty (manifest.json): an earlier process of the "
        "command recorded it (--force replaces the run once); the optimizer hooks do not "
        "continue a run (log_policy_batch's recorder_kwargs resume=True does): record a "
        "later process with a `stabledrl record --out` of its own"
    )


def test_a_run_the_earlier_process_recorded_no_step_in_is_said_to_be_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """a.py's Recorder replaced the run, then its first step failed (log_policy_batch with no
    seq_id): the run holds a manifest and no step. Before, b was told that an earlier process
    of the command recorded it."""
    run = tmp_path / "run"
    Recorder(run, policy="grpo").close()
    assert _refused(run, monkeypatch, batch=True) == (
        f"{run} already exists and is not empty (manifest.json): an earlier process of the "
        "command replaced it and recorded no step (--force replaces the run once); a later "
        "one continues it with log_policy_batch's recorder_kwargs resume=True"
    )


def test_a_recorder_of_the_scripts_own_is_told_of_the_earlier_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A custom loop's Recorder on record's --out (`--no-optimizer-hooks`) in b.py: before,
    '... pass overwrite=True to replace the run, or resume=True to continue it', not saying
    why the --force the user gave did not replace it, nor that overwrite=True replaces the
    steps a.py recorded."""
    run = tmp_path / "run"
    with Recorder(run, policy="grpo") as recorder:
        recorder.log_step(0, grad_norm=1.0)
    _after_an_earlier_process(run, monkeypatch)
    with pytest.raises(UsageError) as refused:
        Recorder(run, policy="grpo")
    assert str(refused.value) == (
        f"{run} already exists and is not empty (manifest.json): an earlier process of the "
        "command recorded it (--force replaces the run once); a later Recorder continues it "
        "with resume=True (overwrite=True replaces it)"
    )
