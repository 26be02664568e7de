"""The note on the run's own policy (an old verl gspo recording replayed with verl's cap) is
printed once on stderr by every command that replays the run's own policy, as `replay` does."""

from __future__ import annotations

from pathlib import Path

from test_verl_recorded_gspo import OLD_SPEC, VERL_META, VERL_SPEC, recorded_run
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

NOTE = (
    f"note: the run's own policy is '{VERL_SPEC}', the loss verl 0.9.1 computed: its "
    f"manifest's '{OLD_SPEC}' lacks verl's cap of GSPO's sequence log ratio at 10 "
    "(recorded before stabledrl wrote it)"
)


def test_check_tune_and_watch_print_the_own_policy_note_once(tmp_path: Path) -> None:
    """check, tune and watch printed no note (replay alone did)."""
    run = recorded_run(tmp_path / "run", OLD_SPEC, VERL_META)
    commands = {
        "replay": ["replay", str(run)],
        "check": ["check", str(run), "--max-nonfinite", "5"],
        "tune": ["tune", str(run), "-p", "gspo:eps_low=0.1..0.2:2"],
        "watch": ["watch", str(run), "--once"],
    }
    for name, args in commands.items():
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, (name, result.stderr)
        assert " ".join(result.stderr.split()).count(NOTE) == 1, (name, result.stderr)
    no_own = CliRunner().invoke(
        app, ["tune", str(run), "-p", "gspo:eps_low=0.1..0.2:2", "--no-own"]
    )
    assert no_own.exit_code == 0, no_own.stderr
    assert "lacks verl's cap" not in no_own.stderr
