"""$STABLEDRL_FORCE, read by the TRL and verl integrations and by a recorded script's first
step: `false` (or a typo) replaced an existing run, as any text but empty or 0 did. And the
other switches of the environment a Recorder reads: torchrun's RANK and WORLD_SIZE."""

from __future__ import annotations

import pytest

from stabledrl_cli.capture._process_rank import launcher_rank
from stabledrl_cli.capture.bootstrap import env_force
from stabledrl_cli.dump import Recorder
from stabledrl_cli.dump._writer_lock import _held_elsewhere
from stabledrl_cli.errors import UsageError


@pytest.mark.parametrize("text", ["1", "true", "TRUE", "yes", "on", " On "])
def test_a_switch_on_replaces(monkeypatch, text):
    monkeypatch.setenv("STABLEDRL_FORCE", text)
    assert env_force() is True


@pytest.mark.parametrize("text", ["", "0", "false", "False", "no", "off", " 0 "])
def test_a_switch_off_does_not(monkeypatch, text):
    monkeypatch.setenv("STABLEDRL_FORCE", text)
    assert env_force() is False


def test_unset_is_off(monkeypatch):
    monkeypatch.delenv("STABLEDRL_FORCE", raising=False)
    assert env_force() is False


@pytest.mark.parametrize("text", ["maybe", "2", "fasle", "-1"])
def test_any_other_text_is_refused_naming_it(monkeypatch, text):
    monkeypatch.setenv("STABLEDRL_FORCE", text)
    with pytest.raises(UsageError) as refused:
        env_force()
    assert str(refused.value).startswith(f"$STABLEDRL_FORCE={text!r}: not a switch; give 1 ")


def test_a_long_text_is_cut_in_the_refusal(monkeypatch):
    """A value of 100,000 characters (a variable set from a file by mistake) went whole into
    the line: it is quoted cut at 40 characters, its length said."""
    monkeypatch.setenv("STABLEDRL_FORCE", "x" * 100_000)
    with pytest.raises(UsageError) as refused:
        env_force()
    message = str(refused.value)
    assert len(message) < 300, message[:300]
    assert message.startswith(f"$STABLEDRL_FORCE={'x' * 40!r}... (100,000 characters): not a ")


def test_take_removes_it_from_the_environment(monkeypatch):
    monkeypatch.setenv("STABLEDRL_FORCE", "1")
    assert env_force(take=True) is True
    assert env_force() is False


def test_a_recorder_refused_for_its_arguments_leaves_the_switch(tmp_path, monkeypatch):
    """Under `record --force`, a script's Recorder refused for a bad policy took the switch
    all the same, and the script's corrected Recorder was then refused as if --force were not
    given ('... already exists and is not empty (manifest.json); run `stabledrl record --force`
    ...'). The switch is taken once the Recorder's arguments are checked."""
    run = tmp_path / "run"
    with Recorder(run, policy=None) as recorder:
        recorder.log_step(0, loss=1.0)
    monkeypatch.setenv("STABLEDRL_RUN_DIR", str(run))
    monkeypatch.setenv("STABLEDRL_FORCE", "1")
    with pytest.raises(UsageError, match="eps_low must be a finite number >= 0"):
        Recorder(run, policy="grpo:eps_low=-1")
    with Recorder(run, policy="grpo") as recorder:
        assert recorder.manifest["policy"]["spec"] == "grpo"


def test_a_long_rank_of_the_launcher_is_cut_in_the_refusal(monkeypatch):
    """torchrun's RANK and WORLD_SIZE that are no integers are refused naming them: a value of
    100,000 characters went whole into the line."""
    monkeypatch.setenv("RANK", "r" * 100_000)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError) as refused:
        launcher_rank()
    message = str(refused.value)
    assert len(message) < 300, message[:300]
    assert message == (
        f"RANK={'r' * 40!r}... (100,000 characters) and WORLD_SIZE='2' must be integers"
    )


@pytest.mark.parametrize(
    ("rank", "world_size"), [("r" * 100_000, "2"), ("0", "2" * 5000), ("0", "\u00b2")]
)
def test_a_crafted_launcher_rank_in_a_held_runs_refusal(monkeypatch, tmp_path, rank, world_size):
    """A run held by a Recorder of another process is refused saying which rank the launcher
    made this process: a RANK of 100,000 characters went whole into the line, and a WORLD_SIZE
    of 5,000 digits (or one that is a digit but no decimal: `²`) raised ValueError from int(),
    an internal error. Such values are no launcher's: the line names none."""
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", world_size)
    message = str(_held_elsewhere(tmp_path, 0, "in another process", 1))
    assert message.startswith(f"{tmp_path}: rank 0 of this run is being recorded by another")
    assert len(message) < 300 + len(str(tmp_path)), message[:300]
    assert "RANK and WORLD_SIZE" not in message


def test_a_launchers_rank_is_named_in_a_held_runs_refusal(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    message = str(_held_elsewhere(tmp_path, 0, "in another process", 1))
    assert message.endswith(
        "this process is rank 1 of 2 (RANK and WORLD_SIZE, set by its launcher), and each rank "
        "records its own steps: Recorder(path, world_size=2, rank=1)"
    )
