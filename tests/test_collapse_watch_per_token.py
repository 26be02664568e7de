"""watch's collapse-warning alert says what the warning measured: on a sequence run that
records token counts, the per-token likelihood, as replay and inspect say."""

from __future__ import annotations

from pathlib import Path

from test_observed import _growing_sequence_run

from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.watch.follow import RunWatcher


def _warning_alerts(path: Path) -> list[str]:
    watcher = RunWatcher(path, ReplayConfig(device="cpu"))
    return [f"{a.step}: {a.message}" for a in watcher.poll() if a.kind == "collapse_warning"]


def test_a_per_token_warning_is_alerted_as_per_token(tmp_path: Path) -> None:
    """It read 'own-sample likelihood 0.5+ nats below its best', the words of a per-sequence
    measure, where the replay's line reads 'own-sample per-token likelihood fell by > 0.5'."""
    _growing_sequence_run(tmp_path / "drop", counts=True, drop_at=25)
    assert _warning_alerts(tmp_path / "drop") == [
        "27: own-sample per-token likelihood 0.5+ nats below its best"
    ]


def test_a_per_unit_warning_keeps_its_words(tmp_path: Path) -> None:
    _growing_sequence_run(tmp_path / "sums", counts=False)
    alerts = _warning_alerts(tmp_path / "sums")
    assert len(alerts) == 1 and alerts[0].endswith(
        ": own-sample likelihood 0.5+ nats below its best"
    )
