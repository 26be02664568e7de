"""`stabledrl record --force -- sh -c 'python a.py && python b.py'` with TRL's recording
trainer in both: --force replaces the run once, as for log_policy_batch and the optimizer
hooks; b's trainer finds the run a's recorded and is refused, those steps kept."""

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
    with pytest.raises(UsageError, match="already exists and is not empty"):
        trainer.train()
    kept = sd.open_run(run)
    assert kept.step_numbers == [0] and kept.manifest["policy"] is None
