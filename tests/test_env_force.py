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


def test_a_later_process_under_force_is_told_to_resume_not_to_force(tmp_path, monkeypatch):
    """`record --force -- sh -c 'python a.py && python b.py'`: b.py's first log_policy_batch
    found the run a.py recorded (the switch is taken once) and was told '... run `stabledrl
    record --force` to record into it', the option the user had given. A process of the
    command opened here (no process started): the rank's switch taken by an earlier one."""
    from stabledrl_cli.capture import bootstrap

    run, ranks = tmp_path / "run", tmp_path / "ranks"
    with Recorder(run, policy="grpo") as recorder:
        recorder.log_step(0, grad_norm=1.0)
    ranks.mkdir()
    (ranks / "replaced.rank-0").touch()  # a.py's Recorder took --force
    for name, value in [("RUN_DIR", run), ("FORCE", "1"), ("RANKS_DIR", ranks)]:
        monkeypatch.setenv(f"STABLEDRL_{name}", str(value))
    monkeypatch.setattr(bootstrap, "_closed_at_child_end", True)  # no exit handler to leave
    with pytest.raises(UsageError) as refused:
        bootstrap._open("grpo", {}, batch=True, hooks=False)
    assert str(refused.value) == (
        f"{run} already exists and is not empty (manifest.json): an earlier process of the "
        "command recorded it (--force replaces the run once); a later one continues it with "
        "log_policy_batch's recorder_kwargs resume=True"
    )
