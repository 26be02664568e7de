"""`stabledrl record --force -- sh -c 'python a.py && python b.py'` with TRL's recording
trainer in both: --force replaces the run once, as for log_policy_batch and the optimizer
hooks; b's trainer finds the run a's recorded and is refused, those steps kept, in words of
the trainer's arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from _trl import tiny

import stabledrl_cli as sd
from stabledrl_cli.errors import UsageError

__all__ = ["tiny"]


def test_a_later_process_under_force_does_not_replace_the_run(
    tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, the trainer read $STABLEDRL_FORCE itself and overwrote the run a.py had
    recorded (measured with a real record of two tiny runs: exit 0, a's steps gone)."""
    from stabledrl_cli.integrations.trl import RecordingGRPOTrainer

    run, ranks = tmp_path / "run", tmp_path / "ranks"
    with sd.Recorder(run, policy=None) as recorder:
        recorder.log_step(0, loss=1.0)
    ranks.mkdir()
    (ranks / "replaced.rank-0").touch()  # a.py's Recorder took --force
    for name, value in [("RUN_DIR", run), ("FORCE", "1"), ("RANKS_DIR", ranks)]:
        monkeypatch.setenv(f"STABLEDRL_{name}", str(value))
    trainer = RecordingGRPOTrainer(
        **tiny.tiny_parts(), args=tiny.tiny_config(str(tmp_path / "trl_out"), max_steps=1)
    )
    with pytest.raises(UsageError) as refused:
        trainer.train()
    kept = sd.open_run(run)
    assert kept.step_numbers == [0] and kept.manifest["policy"] is None
    # Before, the Recorder's own words: '... pass overwrite=True to replace the run, or
    # resume=True to continue it', arguments a trainer does not take.
    assert str(refused.value) == (
        f"{run} already exists and is not empty (manifest.json): an earlier process of the "
        "command recorded it (--force replaces the run once); a later trainer continues it "
        "with train(resume_from_checkpoint=CHECKPOINT), or replaces it with "
        "stabledrl_overwrite=True"
    )


def test_a_run_in_stabledrl_out_is_refused_in_the_trainers_words(
    tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside `stabledrl record`, the refusal named the Recorder's overwrite=True and
    resume=True, which the trainer takes as stabledrl_overwrite=True and a resumed train()."""
    from stabledrl_cli.integrations.trl import RecordingGRPOTrainer

    monkeypatch.delenv("STABLEDRL_RUN_DIR", raising=False)
    run = tmp_path / "run"
    with sd.Recorder(run, policy=None) as recorder:
        recorder.log_step(0, loss=1.0)
    trainer = RecordingGRPOTrainer(
        **tiny.tiny_parts(),
        args=tiny.tiny_config(str(tmp_path / "trl_out"), max_steps=1),
        stabledrl_out=run,
    )
    with pytest.raises(UsageError) as refused:
        trainer.train()
    assert str(refused.value) == (
        f"{run} already exists and is not empty (manifest.json); pass "
        "stabledrl_overwrite=True to replace the run, or continue it with "
        "train(resume_from_checkpoint=CHECKPOINT)"
    )
    assert sd.open_run(run).step_numbers == [0]
