"""`watch --max-lost-steps`: a step some rank never wrote is lost once the run gains no step.

A 2-rank torchrun whose rank 1 died in step 3 (rank 0 had written it) left steps 0-2 whole and
step 3 without rank 1's file. `check RUN --max-lost-steps 0` tripped (1 step lost), but a
live `watch RUN --max-lost-steps 0` that saw the recording end ("the recording's process ended
without closing it (killed?)") said "gates passed", exit 0, and so did `watch RUN.h5 --once
--max-lost-steps 0` on its packed archive: the watch took the step for one a lagging rank has
not written yet, which a run that gains no step never has. While the run is recorded it still
is not lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import Recorder, open_run, pack_run
from stabledrl_cli.dump._file_names import writer_lock_name
from stabledrl_cli.dump._writer_lock import _kernel
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.watch.follow import RunWatcher
from stabledrl_cli.replay.watch.state import WatchState

GATE = ["--max-lost-steps", "0", "--device", "cpu"]
LOST = "1 step lost (1 skipped, 0 missing between recorded ones), limit 0"


def _ranks(run: Path) -> list[Recorder]:
    """Two ranks recording scalar steps 0-9 each, then rank 0 step 10: rank 1's is to come."""
    ranks = [Recorder(run, policy=None, world_size=2, rank=rank) for rank in (0, 1)]
    for recorder in ranks:
        for n in range(10):
            recorder.log_step(n, grad_norm=1.0 + 0.1 * (n % 3), loss=0.5, lr=1e-3)
    ranks[0].log_step(10, grad_norm=1.0, loss=0.5, lr=1e-3)
    return ranks


def test_a_step_a_rank_never_wrote_is_lost_once_the_recording_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    ranks = _ranks(run)
    live = CliRunner().invoke(app, ["watch", str(run), "--once", *GATE])
    assert live.exit_code == 0, live.output  # rank 1 may still write step 10
    sleeps = 0

    def between_polls(seconds: float) -> None:
        nonlocal sleeps
        sleeps += 1
        if sleeps == 1:  # the training ends: rank 1 never writes step 10
            for recorder in ranks:
                recorder.close()
        if sleeps > 5:
            raise KeyboardInterrupt

    monkeypatch.setattr("stabledrl_cli.cli._watch_loop.time.sleep", between_polls)
    ended = CliRunner().invoke(app, ["watch", str(run), *GATE])
    assert "the recording closed: stopped (10 steps seen)" in ended.stderr
    assert ended.exit_code == 1, ended.stderr
    assert ended.stderr.rstrip().endswith(f"gate tripped: (run) max_lost_steps: {LOST}")
    assert "step 10: incomplete, no file for rank(s) [1]" in ended.stderr


def _lost_as_check(run: Path) -> None:
    """`watch --once` trips the gate as check does: step 10 is lost."""
    args = [*GATE, "-f", "json"]
    watch = CliRunner().invoke(app, ["watch", str(run), "--once", *args])
    check = CliRunner().invoke(app, ["check", str(run), *args])
    assert watch.exit_code == 1 == check.exit_code, watch.output
    gates = json.loads(watch.stdout)["gates"]
    assert gates == json.loads(check.stdout)["gates"]
    assert gates[0]["message"] == LOST


def test_a_packed_run_lacks_the_step_a_rank_never_wrote_as_check_says(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for recorder in _ranks(run):
        recorder.close()
    archive = tmp_path / "run.h5"
    pack_run(open_run(run), archive)
    _lost_as_check(archive)


def test_once_on_a_killed_run_lacks_the_step_a_rank_never_wrote_as_check_says(
    tmp_path: Path,
) -> None:
    """Both ranks' processes killed: their lock files left, held by no process, signed under
    this machine's kernel. A live watch ends on them at its second poll; `watch --once`
    polled once, took step 10 for one rank 1 may still write and said 'gates passed', exit 0,
    where check trips. It now polls again, as the live watch does."""
    kernel = _kernel()
    if kernel is None:
        pytest.skip("no Linux boot id: a lock's state cannot be told here")
    run = tmp_path / "run"
    for recorder in _ranks(run):
        recorder.close()
    for rank in (0, 1):  # what a killed Recorder leaves
        (run / "steps" / writer_lock_name(rank)).write_bytes(kernel + b"\n")
    _lost_as_check(run)


@pytest.mark.parametrize(
    ("steps", "lacking"),
    [
        (
            {0: [n for n in range(10) if n != 5], 1: range(10)},
            "step 5: incomplete, no file for rank(s) [0]",
        ),
        ({0: range(10), 1: [*range(9), 10]}, "step 9: incomplete, no file for rank(s) [1]"),
    ],
)
def test_a_step_every_rank_went_past_is_lost_on_a_live_run(
    tmp_path: Path, steps: dict[int, list[int]], lacking: str
) -> None:
    """A rank that logged no step 5 (a part with no sequence, say) and went on to step 9:
    its step 5 never comes, since a rank's steps increase. `watch --once --max-lost-steps 0`
    on the run still recording said 'gates passed' (exit 0) where check trips. So it did of
    a step at the last step of the rank furthest behind, rank 1's step 9 that it skipped for
    step 10 where rank 0 is at step 9: each rank went past it or wrote it."""
    run = tmp_path / "run"
    ranks = [Recorder(run, policy=None, world_size=2, rank=rank) for rank in (0, 1)]
    for rank, recorder in enumerate(ranks):
        for n in steps[rank]:
            recorder.log_step(n, grad_norm=1.0 + 0.1 * (n % 3), loss=0.5, lr=1e-3)
    watched = CliRunner().invoke(app, ["watch", str(run), "--once", *GATE])
    check = CliRunner().invoke(app, ["check", str(run), *GATE])
    for recorder in ranks:
        recorder.close()
    assert watched.exit_code == 1 == check.exit_code, watched.stderr
    assert lacking in watched.stderr
    if 10 not in steps[1]:  # check counts step 10 too, which rank 0 may still write
        assert watched.stderr.rstrip().endswith(f"gate tripped: (run) max_lost_steps: {LOST}")


def test_a_step_a_rank_that_stopped_recording_lacks_is_lost_on_a_live_run(tmp_path: Path) -> None:
    """Rank 1's recording stopped at step 5 (a failed write, training going on), rank 0 went
    on to step 9: `watch --once --max-lost-steps 0` warned that the training's later steps
    are not in the run and said 'gates passed' (exit 0), where check counts steps 5-9 lost
    (5), since rank 1 had not gone past them; it never will."""
    run = tmp_path / "run"
    ranks = [Recorder(run, policy=None, world_size=2, rank=rank) for rank in (0, 1)]
    for n in range(10):
        for recorder in ranks[: 1 if n >= 5 else 2]:
            recorder.log_step(n, grad_norm=1.0 + 0.1 * (n % 3), loss=0.5, lr=1e-3)
    ranks[1].note_stop("disk full", 5)
    watched = CliRunner().invoke(app, ["watch", str(run), "--once", *GATE, "-f", "json"])
    check = CliRunner().invoke(app, ["check", str(run), *GATE, "-f", "json"])
    for recorder in ranks:
        recorder.close()
    assert watched.exit_code == 1 == check.exit_code, watched.stderr
    gates = json.loads(watched.stdout)["gates"]
    assert gates == json.loads(check.stdout)["gates"]
    assert gates[0]["message"].startswith("5 steps lost (5 skipped")


def test_a_resumed_rank_that_lags_is_waited_for(tmp_path: Path) -> None:
    """Both ranks of a 2-rank run stopped after step 4 (their notes say step 5) and resumed,
    appending: rank 0 wrote step 5, rank 1 not yet. The notes stayed as they were, so watch
    took rank 1 for stopped and `--once --max-lost-steps 0` counted step 5 lost (exit 1) where
    rank 1 is only behind; a resume now marks its rank's note `resumed`."""
    run = tmp_path / "run"
    ranks = [Recorder(run, policy=None, world_size=2, rank=rank) for rank in (0, 1)]
    for n in range(5):
        for recorder in ranks:
            recorder.log_step(n, grad_norm=1.0 + 0.1 * (n % 3), loss=0.5, lr=1e-3)
    for recorder in ranks:
        recorder.note_stop("training stopped by KeyboardInterrupt", 5)
        recorder.close()
    ranks = [Recorder(run, policy=None, world_size=2, rank=rank, resume=True) for rank in (0, 1)]
    ranks[0].log_step(5, grad_norm=1.0, loss=0.5, lr=1e-3)
    watched = CliRunner().invoke(app, ["watch", str(run), "--once", *GATE, "-f", "json"])
    stops = open_run(run).recording_stops
    for recorder in ranks:
        recorder.close()
    assert watched.exit_code == 0, watched.stderr
    assert [(note["rank"], note["step"], note.get("resumed")) for note in stops] == [
        (0, 5, True),
        (1, 5, True),
    ]


def test_a_resumed_ranks_stop_is_not_said_to_end_the_run(tmp_path: Path) -> None:
    """A rank that stopped at step 5 and resumed, appending steps 5-9: inspect and watch said
    of its note 'the training's later steps are not in the run', which holds them."""
    run = tmp_path / "run"
    recorder = Recorder(run, policy=None)
    for n in range(5):
        recorder.log_step(n, grad_norm=1.0, loss=0.5, lr=1e-3)
    recorder.note_stop("training stopped by KeyboardInterrupt", 5)
    recorder.close()
    with Recorder(run, policy=None, resume=True) as recorder:
        for n in range(5, 10):
            recorder.log_step(n, grad_norm=1.0, loss=0.5, lr=1e-3)
    shown = CliRunner().invoke(app, ["inspect", str(run)], env={"COLUMNS": "200"})
    watched = CliRunner().invoke(app, ["watch", str(run), "--once", *GATE])
    assert watched.exit_code == 0 == shown.exit_code, watched.output
    for text in (shown.stdout, watched.stderr):
        assert "KeyboardInterrupt; resumed since, its rank's later steps appended" in text
        assert "later steps are not in the run" not in text


def _fresh_state(run: Path) -> WatchState:
    """What a watch started now sees of `run` (as `--once` does)."""
    watcher = RunWatcher(run, ReplayConfig(device="cpu"))
    watcher.poll()
    return watcher.state()


def test_a_step_read_that_loses_a_ranks_file_is_read_as_the_run_now_is(tmp_path: Path) -> None:
    """A 2-rank run's step 3, read, then its rank 1 file removed (a user cleaning up): the
    watcher went on showing 10 steps, step 3 among them, where a watch started then (and
    check) reads 9 and counts step 3 lost. Now the run is followed again from its start, as
    when a step read is removed from a run of one rank."""
    run = tmp_path / "run"
    ranks = [Recorder(run, policy=None, world_size=2, rank=rank) for rank in (0, 1)]
    for recorder in ranks:
        for n in range(10):
            recorder.log_step(n, grad_norm=1.0 + 0.1 * (n % 3), loss=0.5, lr=1e-3)
    watcher = RunWatcher(run, ReplayConfig(device="cpu"))
    watcher.poll()
    (run / "steps" / "step-00000003.rank-0001.safetensors").unlink()
    watcher.poll()
    assert watcher.replaced == 1 and watcher.replay is not None
    assert watcher.replay.seen == [0, 1, 2, *range(4, 10)]
    assert watcher.state() == _fresh_state(run)
    for recorder in ranks:
        recorder.close()
    check = CliRunner().invoke(app, ["check", str(run), *GATE])
    assert check.exit_code == 1 and LOST in check.stdout + check.stderr


def test_a_run_whose_ranks_all_closed_before_the_watch_lacks_the_step_as_check_says(
    tmp_path: Path,
) -> None:
    """Both ranks closed before the watch started: no lock file left, and a run of several
    ranks was never marked closed, so `watch --once --max-lost-steps 0` took step 10 for one
    rank 1 may still write and said 'gates passed' (exit 0) where check trips. Each rank's
    close now adds it to `recording_closed_ranks` and the last one marks the run closed:
    inspect says so, as of a run of one rank, and so does the packed archive."""
    run = tmp_path / "run"
    ranks = _ranks(run)
    ranks[1].close()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["recording_closed_ranks"] == [1] and "recording_closed" not in manifest
    ranks[0].close()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["recording_closed_ranks"] == [0, 1] and manifest["recording_closed"] is True
    _lost_as_check(run)
    archive = tmp_path / "run.h5"
    pack_run(open_run(run), archive)
    for path in (run, archive):
        shown = CliRunner().invoke(app, ["inspect", str(path)], env={"COLUMNS": "200"})
        assert "closed: every rank's Recorder finished, the run gains no step" in shown.stdout


def test_a_rank_that_resumes_or_overwrites_reopens_the_closed_run(tmp_path: Path) -> None:
    """A rank recording again takes its close back before any step file changes (a watch must
    not end on the run while it writes); the other ranks' closes stand, and the run is closed
    again once that rank closes."""
    run = tmp_path / "run"
    for recorder in _ranks(run):
        recorder.close()

    def closed() -> tuple[list[int] | None, bool]:
        manifest = json.loads((run / "manifest.json").read_text())
        return manifest.get("recording_closed_ranks"), "recording_closed" in manifest

    resumed = Recorder(run, policy=None, world_size=2, rank=1, resume=True, resume_from=10)
    assert closed() == ([0], False)
    resumed.log_step(10, grad_norm=1.0, loss=0.5, lr=1e-3)
    resumed.close()
    assert closed() == ([0, 1], True)
    Recorder(run, policy=None, world_size=2, rank=1, overwrite=True).close()
    assert closed() == ([0, 1], True)
    again = Recorder(run, policy=None, world_size=2, rank=0, overwrite=True)
    assert closed() == (None, False)  # a fresh manifest
    again.close()
    assert closed() == ([0], False)


@pytest.mark.parametrize(
    ("world_size", "steps", "stop", "closed", "lost"),
    [  # check counted 2, 4, 0, 3 lost; watch 0, 0, 0, 1 (rank 0 lags in the first two)
        (2, {0: range(6), 1: range(8)}, 8, False, 0),
        (2, {0: range(6), 1: range(10)}, None, True, 0),
        (2, {0: range(10), 1: range(6)}, None, True, 4),
        (3, {0: range(10), 1: range(6), 2: [*range(7), 8, 9]}, None, False, 1),
        (2, {0: [0, 1, 2, 4, 5], 1: range(8)}, 8, False, 1),
    ],
)
def test_watch_and_check_tell_a_step_in_flight_from_a_lost_one_alike(
    tmp_path: Path,
    world_size: int,
    steps: dict[int, list[int]],
    stop: int | None,
    closed: bool,
    lost: int,
) -> None:
    """A step some rank lacks is in flight while every rank lacking it may still write it
    (its Recorder live, its recording not stopped) and has not gone past it; rank 1 is the one
    stopped or closed. check took every step for lost once any rank stopped or closed (a
    lagging live rank's too), watch waited on a closed rank's steps and, of several lagging
    ranks, went by the one furthest behind (step 7 that rank 2 went past)."""
    run = tmp_path / "run"
    ranks = [
        Recorder(run, policy=None, world_size=world_size, rank=rank) for rank in range(world_size)
    ]
    for rank, recorder in enumerate(ranks):
        for n in steps[rank]:
            recorder.log_step(n, grad_norm=1.0 + 0.1 * (n % 3), loss=0.5, lr=1e-3)
    if stop is not None:
        ranks[1].note_stop("disk full", stop)
    if closed:
        ranks[1].close()
    args = [*GATE, "-f", "json"]
    watch = CliRunner().invoke(app, ["watch", str(run), "--once", *args])
    check = CliRunner().invoke(app, ["check", str(run), *args])
    for recorder in ranks:
        recorder.close()
    gates = json.loads(watch.stdout)["gates"]
    assert gates == json.loads(check.stdout)["gates"], check.stderr
    assert gates[0]["figure"] == lost and watch.exit_code == (1 if lost else 0), watch.stderr
