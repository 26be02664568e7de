"""A run with steps missing between recorded ones (a step file deleted, replaced by a link, or
never written by a recording resumed after a crash): every command that replays it says so."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from _corpus import step_path, tiny_run
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.replay.hdf5 import read_hdf5

runner = CliRunner()


def _holed(tmp_path: Path, how: str) -> Path:
    """A tiny run whose steps 2 and 3 are gone (`deleted`) or are links (`linked`)."""
    run = tiny_run(tmp_path / "run", steps=12)
    for step in (2, 3):
        step_path(run, step).unlink()
        if how == "linked":
            os.symlink(os.devnull, step_path(run, step))
    return run


@pytest.mark.parametrize("how", ["deleted", "linked"])
@pytest.mark.parametrize(
    "command",
    [
        ["replay", "-p", "grpo"],
        ["check", "--max-collapsed", "0"],
        ["tune", "-p", "dapo:eps_high=0.2|0.3"],
    ],
)
def test_steps_missing_between_recorded_ones_are_said(tmp_path, how, command):
    """Steps 2 and 3 of a run recorded every step gone: replay, check and tune replayed the
    other 6 and said nothing (exit 0, no line on stderr); the results stand on the steps
    held, and one warning names the missing ones."""
    run = _holed(tmp_path, how)
    result = runner.invoke(app, [command[0], str(run), *command[1:]])
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert line == (
        f"warning: {run} misses steps between its recorded ones (steps 2..3 missing (2 "
        "step(s), stride 1)): never written, or lost; replayed 10; `stabledrl inspect` lists "
        "the reader's findings"
    ), line


def test_the_json_counts_the_steps_missing_and_skipped(tmp_path):
    """replay's JSON held no word of a damaged run: `steps` 9 alone, for a run whose steps 2
    and 3 were gone and step 5 torn. It counts them: `missing_steps` 2, `skipped_steps` 1;
    0 and 0 for the whole run."""
    run = _holed(tmp_path, "deleted")
    step_path(run, 5).write_bytes(b"x")
    whole = tiny_run(tmp_path / "whole", steps=12)
    for path, counts in ((run, (9, 2, 1)), (whole, (12, 0, 0))):
        result = runner.invoke(app, ["replay", str(path), "-p", "grpo", "-f", "json"])
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert (data["steps"], data["missing_steps"], data["skipped_steps"]) == counts
        report = tmp_path / f"{path.name}.h5"
        wrote = runner.invoke(app, ["replay", str(path), "-p", "grpo", "--out", str(report)])
        assert wrote.exit_code == 0, wrote.output
        attrs = read_hdf5(report)["attrs"]
        assert (attrs["steps"], attrs["missing_steps"], attrs["skipped_steps"]) == counts


def test_a_run_recorded_every_few_steps_has_no_missing_step(tmp_path):
    """Steps recorded at a stride (0, 2, 4, 6) miss none."""
    run = tiny_run(tmp_path / "run", steps=8)
    for step in (1, 3, 5, 7):
        step_path(run, step).unlink()
    result = runner.invoke(app, ["replay", str(run), "-p", "grpo"])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr, result.stderr


@pytest.mark.parametrize("how", ["deleted", "linked"])
def test_watch_once_says_the_steps_missing_too(tmp_path, how):
    """`watch --once` over the same run read its 10 steps, passed its gate and said nothing of
    steps 2 and 3."""
    run = _holed(tmp_path, how)
    result = runner.invoke(app, ["watch", str(run), "--once", "--max-nonfinite", "0"])
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert line == (
        f"warning: {run} misses steps between its recorded ones (steps 2..3 missing (2 "
        "step(s), stride 1)): never written, or lost; `stabledrl inspect` lists every finding"
    ), line


def test_check_of_a_run_of_scalar_steps_says_so_too(tmp_path):
    """`check` of a run of scalar steps only (an optimizer-hooks recording, an import) whose
    step 2 was deleted and step 3 torn read the 8 others and said nothing of either: no line
    on stderr, the JSON's `steps` 8 alone. It warns as a replay does, and its JSON counts
    them, as check's JSON of a replayed run does."""
    run = tmp_path / "run"
    with sd.Recorder(run, policy=None) as recorder:
        for step in range(10):
            recorder.log_step(step, grad_norm=1.0 + 0.01 * step, loss=0.5)
    step_path(run, 2).unlink()
    step_path(run, 3).write_bytes(b"x")
    result = runner.invoke(app, ["check", str(run), "--max-spikes", "5", "-f", "json"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: skipped 1 unreadable, incomplete or invalid step of {run} (step 3: torn: 1 "
        "byte, shorter than a safetensors header); read 8; `stabledrl inspect` lists the "
        "reader's findings",
        f"warning: {run} misses steps between its recorded ones (step 2 missing (1 step(s), "
        "stride 1)): never written, or lost; read 8; `stabledrl inspect` lists the reader's "
        "findings",
    ], result.stderr
    data = json.loads(result.stdout)
    assert (data["steps"], data["skipped_steps"], data["missing_steps"]) == (8, 1, 1)
    whole = tiny_run(tmp_path / "whole", steps=12)
    replayed = runner.invoke(app, ["check", str(whole), "--max-collapsed", "0", "-f", "json"])
    data = json.loads(replayed.stdout)
    assert (data["steps"], data["skipped_steps"], data["missing_steps"]) == (12, 0, 0)


def test_a_step_skipped_at_packing_is_not_also_missing(tmp_path):
    """A run with step 5 torn, packed: replaying the archive warned of step 5 twice, skipped
    (torn) and missing between recorded ones (the archive holds no step 5); the directory
    warned once. Both warn once."""
    run = tiny_run(tmp_path / "run", steps=12)
    step_path(run, 5).write_bytes(b"x")
    archive = tmp_path / "run.h5"
    assert runner.invoke(app, ["pack", str(run), str(archive)]).exit_code == 0
    for path in (run, archive):
        result = runner.invoke(app, ["replay", str(path), "-p", "grpo", "-f", "json"])
        assert result.exit_code == 0, result.output
        warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1 and "step 5: torn" in warnings[0], result.stderr
        data = json.loads(result.stdout)
        assert (data["skipped_steps"], data["missing_steps"]) == (1, 0)


def _live_batch(step: int, collapsed_from: int) -> dict[str, torch.Tensor]:
    reward = torch.zeros(2) if step >= collapsed_from else torch.tensor([1.0, 0.0])
    ones = torch.ones(2, 3)
    return {
        "logp": -ones,
        "logp_old": -ones,
        "advantages": torch.tensor([1.0, -1.0]),
        "mask": ones,
        "reward": reward,
    }


def test_a_replay_of_a_live_run_reads_one_snapshot(tmp_path):
    """Steps that landed while a replay ran were read by its observed rules only: 6 steps
    replayed, yet 'first_reward_collapse' 35, a step it never read. Every figure now comes from
    the steps listed when the replay began."""
    from stabledrl_cli.dump import open_run
    from stabledrl_cli.replay.engine import replay_run

    run = tmp_path / "run"
    with sd.Recorder(run, policy="grpo") as rec:
        for step in range(6):
            rec.log_step(step, **_live_batch(step, 30))

        def record_more(_: int) -> None:
            while rec.last_step < 40:
                rec.log_step(rec.last_step + 1, **_live_batch(rec.last_step + 1, 30))

        result = replay_run(open_run(run), ["grpo"], progress=record_more)
    assert result.steps == 6 and result.observed.first_reward_collapse is None
    data = json.loads(result.to_json())
    assert data["steps"] == 6 and data["observed"]["first_reward_collapse"] is None
    assert data["live"] == {
        "listed_steps": 6,
        "to_step": 5,
        "landed_steps": 35,
        "held": True,
    }


def test_replay_of_a_live_run_says_up_to_which_step_it_read(tmp_path):
    run = tmp_path / "run"
    with sd.Recorder(run, policy="grpo") as rec:
        for step in range(3):
            rec.log_step(step, **_live_batch(step, 30))
        live = runner.invoke(app, ["replay", str(run), "--policy", "grpo"])
    closed = runner.invoke(app, ["replay", str(run), "--policy", "grpo"])
    assert live.exit_code == closed.exit_code == 0, live.output
    said = " ".join(live.stderr.split())
    assert (
        f"warning: {run} is being recorded now (a live Recorder holds it); the replay read the "
        "3 steps listed when the replay began (to step 2)"
    ) in said
    assert "being recorded" not in closed.stderr


def test_the_json_of_each_command_says_it_read_a_live_run(tmp_path):
    """replay, check, tune and pack warned on stderr of a live run, yet their JSON (the
    contract a CI job reads) had no word of it. Each now has "live", the warning's figures."""
    run = tmp_path / "run"
    commands = {
        "replay": ["replay", str(run), "-p", "grpo", "--format", "json"],
        "check": ["check", str(run), "-p", "grpo", "--max-nonfinite", "3", "--format", "json"],
        "tune": ["tune", str(run), "-p", "dapo:eps_high=0.2..0.3:2", "--format", "json"],
        "pack": ["pack", str(run), str(tmp_path / "run.h5"), "--force", "--format", "json"],
    }
    with sd.Recorder(run, policy="grpo") as rec:
        for step in range(3):
            rec.log_step(step, **_live_batch(step, 30))
        live = {name: runner.invoke(app, argv) for name, argv in commands.items()}
    closed = runner.invoke(app, commands["check"])
    for name, result in live.items():
        assert result.exit_code == 0, (name, result.output)
        said = json.loads(result.stdout)["live"]
        assert said == {"listed_steps": 3, "to_step": 2, "landed_steps": 0, "held": True}, name
        assert "the 3 steps listed when the" in " ".join(result.stderr.split()), name
    assert closed.exit_code == 0 and json.loads(closed.stdout)["live"] is None


def test_a_replay_says_a_recording_that_ended_while_it_read(tmp_path):
    """The Recorder logged 14 more steps and closed while a replay read 6: the replay said
    nothing of it, its JSON "live": null, as of a run read whole."""
    from stabledrl_cli.dump import open_run
    from stabledrl_cli.replay.engine import replay_run

    run = tmp_path / "run"
    rec = sd.Recorder(run, policy="grpo")
    for step in range(6):
        rec.log_step(step, **_live_batch(step, 30))

    def finish(_: int) -> None:
        while rec.last_step < 19:
            rec.log_step(rec.last_step + 1, **_live_batch(rec.last_step + 1, 30))
        rec.close()

    result = replay_run(open_run(run), ["grpo"], progress=finish)
    assert result.steps == 6
    assert json.loads(result.to_json())["live"] == {
        "listed_steps": 6,
        "to_step": 5,
        "landed_steps": 14,
        "held": False,
    }


@pytest.mark.parametrize("change", ["rewritten", "removed"])
def test_a_replay_reads_the_last_step_as_it_read_it_first(tmp_path, change):
    """The Recorder rewrites its last step (`record`'s optimizer hooks add its grad norm) or
    removes it (a failed rewrite) while a replay reads: the replay's rows read step 11 as it
    was, its observed rules the rewritten file (recorded_spike_steps [11] beside a row of the
    old step), its skipped steps the removed one (12 steps replayed and 1 skipped). Each file
    is now read as the replay first read it."""
    from stabledrl_cli.dump import open_run
    from stabledrl_cli.replay.engine import replay_run

    run = tmp_path / "run"
    with sd.Recorder(run, policy="grpo") as rec:
        for step in range(12):
            rec.log_step(step, grad_norm=1.0, **_live_batch(step, 30))

        def change_last(done: int) -> None:
            if done < 12:
                return
            if change == "rewritten":
                rec.rewrite_step(11, grad_norm=1e9, **_live_batch(11, 0))
            else:
                step_path(run, 11).unlink()

        result = replay_run(open_run(run), ["grpo"], progress=change_last)
    assert result.steps == 12 and result.skipped_steps == 0
    assert result.observed.recorded_spike_steps == []
    assert result.observed.first_reward_collapse is None


def test_diff_of_a_live_run_says_up_to_which_step_it_read(tmp_path):
    """diff read a live run as listed when it began (`open_snapshot`) and said nothing of it:
    'the runs agree' over 3 steps of a run that had more by then."""
    done, live = tmp_path / "done", tmp_path / "live"
    with sd.Recorder(done, policy="grpo") as rec:
        for step in range(5):
            rec.log_step(step, **_live_batch(step, 30))
    with sd.Recorder(live, policy="grpo") as rec:
        for step in range(3):
            rec.log_step(step, **_live_batch(step, 30))
        result = runner.invoke(app, ["diff", str(done), str(live)])
        as_json = runner.invoke(app, ["diff", str(done), str(live), "--format", "json"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())
    assert f"warning: {live} is being recorded now" in said
    assert "the diff read the 3 steps listed when the diff began (to step 2)" in said
    assert f"warning: {done} is being" not in said
    data = json.loads(as_json.stdout)  # the JSON said nothing of it
    assert data["live_a"] is None
    assert data["live_b"] == {"listed_steps": 3, "to_step": 2, "landed_steps": 0, "held": True}


def test_a_step_some_live_rank_has_not_written_yet_is_not_lost(tmp_path):
    """Two ranks recording, rank 1 a step behind: `check --max-lost-steps 0` failed the live
    run (exit 1, 'step 7: incomplete, no file for rank(s) [1]', skipped_steps 1), though the
    step was in flight. It is not lost while every rank's Recorder lives; it is once rank 1
    closed without it."""
    run = tmp_path / "run"
    ranks = [sd.Recorder(run, policy="grpo", world_size=2, rank=rank) for rank in (0, 1)]
    for step in range(8):
        for rec in ranks[: 1 if step == 7 else 2]:
            rec.log_step(step, **_live_batch(step, 30))
    argv = ["check", str(run), "-p", "grpo", "--max-lost-steps", "0", "--format", "json"]
    live = runner.invoke(app, argv)
    ranks[1].close()
    lost = runner.invoke(app, argv)
    ranks[0].close()
    assert live.exit_code == 0, live.output
    assert json.loads(live.stdout)["skipped_steps"] == 0
    assert "incomplete" not in live.stderr
    assert lost.exit_code == 1 and json.loads(lost.stdout)["skipped_steps"] == 1


def test_a_step_finished_while_a_replay_read_it_is_not_lost(tmp_path):
    """Rank 1 a step behind when the replay listed the run, then it wrote step 7 and both
    ranks closed while the replay read: step 7 was skipped ('incomplete, no file for rank(s)
    [1]', skipped_steps 1) though `live` counted it landed since."""
    from stabledrl_cli.dump import open_run
    from stabledrl_cli.replay.engine import replay_run

    run = tmp_path / "run"
    ranks = [sd.Recorder(run, policy="grpo", world_size=2, rank=rank) for rank in (0, 1)]
    for step in range(8):
        for rec in ranks[: 1 if step == 7 else 2]:
            rec.log_step(step, **_live_batch(step, 30))

    def finish(_: int) -> None:
        if ranks:
            ranks[1].log_step(7, **_live_batch(7, 30))
            for rec in ranks:
                rec.close()
            ranks.clear()

    result = replay_run(open_run(run), ["grpo"], progress=finish)
    assert (result.steps, result.skipped_steps) == (7, 0), result.skipped
    assert result.live is not None and result.live.landed_steps == 1


def test_a_run_resumed_while_a_replay_read_it_is_refused(tmp_path):
    """A run resumed from step 5 while a replay read its 10 steps: the result said 10 steps
    replayed and 2 skipped (steps 8 and 9, which it had replayed, gone since), its observed
    rules reading the resumed steps 5-7. The run is another recording now (a new run_id)."""
    from stabledrl_cli.dump import open_run
    from stabledrl_cli.errors import InputError
    from stabledrl_cli.replay.engine import replay_run

    run = tmp_path / "run"
    with sd.Recorder(run, policy="grpo") as rec:
        for step in range(10):
            rec.log_step(step, **_live_batch(step, 30))

    def resume(_: int) -> None:
        with sd.Recorder(run, policy="grpo", resume=True, resume_from=5) as again:
            for step in range(5, 8):
                again.log_step(step, **_live_batch(step, 6))

    with pytest.raises(InputError, match="recorded again while the replay read it"):
        replay_run(open_run(run), ["grpo"], progress=resume)
    appended = tmp_path / "appended"
    with sd.Recorder(appended, policy="grpo") as rec:
        for step in range(3):
            rec.log_step(step, **_live_batch(step, 30))

    def append(_: int) -> None:  # a resume after the last step keeps the run's identity
        with sd.Recorder(appended, policy="grpo", resume=True, resume_from=3) as again:
            again.log_step(3, **_live_batch(3, 30))

    assert replay_run(open_run(appended), ["grpo"], progress=append).steps == 3
    opened = open_run(appended)
    (appended / "manifest.json").write_text("{")  # unreadable now: no sign of another recording
    assert not opened.recorded_again()
    (appended / "manifest.json").unlink()  # gone: being recorded over
    assert opened.recorded_again()


def test_steps_copied_in_while_a_replay_read_the_run_name_no_recorder(tmp_path, capsys):
    """Steps 7-9 copied into a run (rsync from the training host) while a replay read it: the
    warning said the run 'was recorded on while the replay read it (its Recorder has closed
    since)', of a directory no Recorder ever wrote."""
    import shutil

    from stabledrl_cli.cli._live import note_live
    from stabledrl_cli.dump import open_run
    from stabledrl_cli.replay.engine import replay_run

    source, run = tmp_path / "source", tmp_path / "run"
    with sd.Recorder(source, policy="grpo") as rec:
        for step in range(10):
            rec.log_step(step, **_live_batch(step, 30))
    (run / "steps").mkdir(parents=True)
    shutil.copy(source / "manifest.json", run / "manifest.json")
    files = sorted((source / "steps").glob("step-*"))
    for path in files[:7]:
        shutil.copy(path, run / "steps" / path.name)

    def copy_rest(_: int) -> None:
        for path in files[7:]:
            shutil.copy(path, run / "steps" / path.name)

    result = replay_run(open_run(run), ["grpo"], progress=copy_rest)
    note_live(result.live, str(run), "the replay read", "replay")
    said = " ".join(capsys.readouterr().err.split())
    assert f"warning: {run} was written to while the replay read it (no live Recorder" in said
    assert "Recorder has closed" not in said
    assert "the 7 steps listed when the replay began (to step 6), not the 3 steps" in said


def test_a_resume_caught_while_it_removes_steps_is_refused(tmp_path, monkeypatch):
    """A resume from step 5 killed (or still at work) after it removed step 5, before the
    new run_id it wrote only once its step files were gone: a replay that listed the run
    before said 9 steps replayed, 1 skipped ('step 5: unreadable: cannot stat'), and did not
    refuse the run as recorded again; its steps 6-9 were about to be written again."""
    from stabledrl_cli.dump import _resume, open_run
    from stabledrl_cli.errors import InputError
    from stabledrl_cli.replay.config import ReplayConfig
    from stabledrl_cli.replay.engine import replay_run

    run = tmp_path / "run"
    with sd.Recorder(run, policy="grpo") as rec:
        for step in range(10):
            rec.log_step(step, **_live_batch(step, 30))
    remove = _resume.remove_file

    def killed_after_one(path):
        remove(path)
        raise KeyboardInterrupt

    def resume(done: int) -> None:
        if done == 2:
            monkeypatch.setattr(_resume, "remove_file", killed_after_one)
            with pytest.raises(KeyboardInterrupt):
                sd.Recorder(run, policy="grpo", resume=True, resume_from=5)

    config = ReplayConfig(chunk_size=2)
    with pytest.raises(InputError, match="recorded again while the replay read it"):
        replay_run(open_run(run), ["grpo"], config=config, progress=resume)


def test_diff_does_not_call_a_step_in_flight_unreadable(tmp_path):
    """Two live 2-rank runs, rank 1 a step behind in each: diff warned 'skipped 1 incomplete
    step (step 7: incomplete, no file for rank(s) [1])' and printed 'unreadable in A, not
    compared: 7' of a step still being written, which check counts neither skipped nor
    lost."""
    recorders = []
    for name in ("a", "b"):
        ranks = [sd.Recorder(tmp_path / name, policy=None, world_size=2, rank=r) for r in (0, 1)]
        for step in range(8):
            for rec in ranks[: 1 if step == 7 else 2]:
                rec.log_step(step, grad_norm=1.0 + step, loss=0.5)
        recorders += ranks
    result = runner.invoke(app, ["diff", str(tmp_path / "a"), str(tmp_path / "b")])
    for rec in recorders:
        rec.close()
    assert result.exit_code == 0, result.output
    assert "incomplete" not in result.stderr and "unreadable" not in result.stdout
    assert "steps: A 7, B 7, both 7 (compared 7)" in result.stdout
