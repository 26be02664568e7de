"""$STABLEDRL_FORCE, read by the TRL and verl integrations and by a recorded script's first
step: `false` (or a typo) replaced an existing run, as any text but empty or 0 did."""

from __future__ import annotations

import pytest

from stabledrl_cli.capture.bootstrap import env_force
from stabledrl_cli.dump import Recorder
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
    assert message.startswith(f"$STABLEDRL_FORCE={'x' * 40!r}... (100000 characters): not a ")


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
