"""`stabledrl watch`: following a run while it is written.

The runs are the committed grpo fixture (which degrades: risk steps, recorded non-finite
steps, the collapse warning, the reward collapse), landed a few steps at a time, and the same
steps re-recorded by a `Recorder` in a thread while the watch reads them; and scalar runs
(per-step scalars only, nothing to replay) written by a Recorder or recorded from a plain
PyTorch script by `stabledrl record`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from _cli import cli_command, cli_environment, run_cli, run_cli_together
from conftest import fixture_run
from typer.testing import CliRunner, Result

from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import Recorder, open_run
from stabledrl_cli.dump._manifest_edits import amend_manifest
from stabledrl_cli.dump._policy import policy_entry
from stabledrl_cli.errors import InputError
from stabledrl_cli.replay import incremental
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.engine import NothingToReplay, replay_run
from stabledrl_cli.replay.observed import observe
from stabledrl_cli.replay.recorded import recorded_run
from stabledrl_cli.replay.watch import follow, rank_files
from stabledrl_cli.replay.watch import manifest as watched_manifest
from stabledrl_cli.replay.watch.follow import RunWatcher
from stabledrl_cli.replay.watch.state import WatchState

CPU = ReplayConfig(device="cpu")
HANG_SECONDS = 60.0
"""A hang guard: far above the seconds a watch of a small run takes."""


def _land(source: Path, target: Path, steps: range) -> None:
    """Lands step files as a Recorder does: written under a temporary name, then renamed."""
    (target / "steps").mkdir(parents=True, exist_ok=True)
    for n in steps:
        name = f"step-{n:08d}.safetensors"
        temp = target / "steps" / f".{name}.tmp-1"
        shutil.copyfile(source / "steps" / name, temp)
        os.replace(temp, target / "steps" / name)


def _land_manifest(source: Path, target: Path) -> None:
    """Lands the manifest as a Recorder does: whole, by a rename (a watcher never reads half)."""
    temp = target.parent / f"{target.name}.manifest.tmp"
    shutil.copyfile(source / "manifest.json", temp)
    os.replace(temp, target / "manifest.json")


@pytest.fixture(scope="module")
def grpo_replay(grpo_fixture):
    return replay_run(open_run(grpo_fixture), ["grpo"], config=CPU)


def test_a_watcher_follows_a_run_landing_step_by_step(grpo_fixture, grpo_replay, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    watcher = RunWatcher(live, CPU, recent=5)
    assert watcher.poll() == []
    assert "manifest.json" in (watcher.state().waiting or "")

    _land_manifest(grpo_fixture, live)
    assert watcher.poll() == [] and "first step" in (watcher.state().waiting or "")

    # A step in flight (half a file under its temporary name) is never read.
    (live / "steps").mkdir()
    half = (grpo_fixture / "steps" / "step-00000000.safetensors").read_bytes()[:1000]
    (live / "steps" / ".step-00000000.safetensors.tmp-42").write_bytes(half)
    assert watcher.poll() == [] and watcher.state().steps == 0

    alerts = []
    for start, stop in ((0, 40), (40, 41), (41, 100), (100, 160)):
        _land(grpo_fixture, live, range(start, stop))
        new = watcher.poll()
        state = watcher.state()
        assert state.steps == stop and state.last_step == stop - 1
        assert [row.step for row in state.recent] == list(range(max(0, stop - 5), stop))
        assert all(a.step < stop for a in new)
        alerts += new
    assert watcher.poll() == []  # nothing new: no alert twice

    expected = grpo_replay.policies[0].summary
    state = watcher.state()
    assert state.risk_steps == expected.collapsed_steps
    assert state.drift_steps == expected.drift_steps
    assert state.nonfinite_steps == grpo_replay.observed.nonfinite_steps == [92, 93, 94, 95]
    assert state.collapse_warning == grpo_replay.observed.collapse_warning.first_step == 60
    assert state.first_reward_collapse == grpo_replay.observed.first_reward_collapse == 132
    assert [a.step for a in alerts if a.kind == "risk"] == expected.collapsed_steps
    assert [a.step for a in alerts if a.kind == "collapse_warning"] == [60]
    assert [a.step for a in alerts if a.kind == "nonfinite"] == [92, 93, 94, 95]
    # The recorded grad-norm spikes are the replayed risk steps here: alerted once, as risk.
    assert state.spike_steps == grpo_replay.observed.recorded_spike_steps
    assert set(state.spike_steps) <= set(state.risk_steps)
    assert [a for a in alerts if a.kind == "grad_norm_spike"] == []
    assert alerts == state.alerts
    row = state.recent[-1]
    assert row.discard_frac == pytest.approx(grpo_replay.policies[0].series["discard_frac"][-1])
    # Followed a piece at a time, the replay equals one over the whole run.
    assert watcher.replay is not None
    followed, whole = watcher.replay.result().to_dict(), grpo_replay.to_dict()
    assert followed.pop("run") == str(live) and whole.pop("run") == str(grpo_fixture)
    assert json.dumps(followed, sort_keys=True) == json.dumps(whole, sort_keys=True)


def test_a_stretch_of_drift_is_one_alert_however_the_steps_are_numbered(grpo_fixture, tmp_path):
    """A run that records a batch every other step: its replayed steps are 0, 2, 4, ... One
    stretch of drift (98..158, every replayed step among them drifts) was an alert a step."""
    strided = tmp_path / "strided"
    strided.mkdir()
    _land_manifest(grpo_fixture, strided)
    _land(grpo_fixture, strided, range(0, 160, 2))
    watcher = RunWatcher(strided, CPU)
    alerts = watcher.poll()
    state = watcher.state()
    assert state.drift_steps == list(range(98, 160, 2))
    assert [a.step for a in alerts if a.kind == "drift"] == [98]


def _once(run: Path, *args: str) -> tuple[int, dict, str]:
    result = CliRunner().invoke(
        app, ["watch", str(run), "--once", "-f", "json", "--device", "cpu", *args]
    )
    return result.exit_code, json.loads(result.stdout), result.stderr


def test_once_exits_with_the_gates_code_as_check_does(grpo_fixture):
    code, data, stderr = _once(grpo_fixture, "--max-collapsed", "0", "--max-nonfinite", "5")
    check = CliRunner().invoke(
        app,
        ["check", str(grpo_fixture), "-p", "grpo", "--max-collapsed", "0", "--max-nonfinite",
         "5", "-f", "json", "--device", "cpu"],
    )  # fmt: skip
    assert code == 1 == check.exit_code
    assert data["gates"] == json.loads(check.stdout)["gates"]
    assert not data["ok"] and data["steps"] == 160 and data["own_policy"] == "grpo"
    assert "gate tripped: grpo max_collapsed" in stderr
    assert stderr.count("alert: step") == len(data["alerts"])
    stable, data, _ = _once(fixture_run("stabledrl"), "--max-collapsed", "0")
    assert stable == 0 and data["ok"] and data["alerts"] == []
    ungated, data, _ = _once(grpo_fixture)
    assert ungated == 0 and data["gates"] == []


def test_once_reads_a_run_a_recorder_is_writing(grpo_fixture, tmp_path):
    """A Recorder in a thread re-records the fixture's steps; `watch --once` between its
    batches sees exactly the steps written so far."""
    source = open_run(grpo_fixture)
    live = tmp_path / "live"
    go, done = threading.Semaphore(0), threading.Semaphore(0)
    batches = [(0, 8), (8, 30), (30, 36)]

    def writer() -> None:
        manifest = source.manifest
        with Recorder(
            live,
            policy=manifest["policy"]["spec"],
            unit=manifest["unit"],
            reward_range=tuple(manifest["reward_range"]),
        ) as recorder:
            for start, stop in batches:
                go.acquire()
                for n in range(start, stop):
                    step = source.step(n)
                    names = ("logp", "logp_old", "advantages", "mask", "seq_id", "group_id")
                    recorder.log_step(
                        n,
                        **{name: step[name] for name in (*names, "reward")},
                        grad_norm=step.scalars["grad_norm"],
                        loss=step.scalars["loss"],
                        inner_step=int(step.scalars["inner_step"]),
                    )
                done.release()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _start, stop in batches:
            go.release()
            done.acquire()
            code, data, _ = _once(live)
            assert code == 0 and data["steps"] == stop and data["last_step"] == stop - 1
            assert [row["step"] for row in data["recent"]] == list(range(max(0, stop - 10), stop))
    finally:
        for _ in batches:
            go.release()
        thread.join(timeout=60)
    whole = replay_run(open_run(live), ["grpo"], config=CPU).policies[0].summary
    assert data["risk_steps"] == whole.collapsed_steps != []  # proxy norms: no geometry here
    first = whole.collapsed_steps[0]
    assert data["alerts"][0] == {
        "kind": "risk",
        "step": first,
        "message": "grpo replayed: an update norm spike",
    }


def test_a_time_bounded_watch_follows_a_writer_until_idle(grpo_fixture, tmp_path):
    """The watch starts before the run exists; a writer lands 60 steps; the watch stops once no
    step landed for --until-idle seconds, and has raised each alert once. (The writer lands its
    steps within a fraction of a second: a bound of 2.5 s leaves a loaded CI machine a margin,
    and each second of it is a second the test sits idle.)"""
    live = tmp_path / "live"
    live.mkdir()

    def writer() -> None:
        _land_manifest(grpo_fixture, live)
        for n in range(60):
            _land(grpo_fixture, live, range(n, n + 1))

    thread = threading.Thread(target=writer)
    thread.start()
    result = CliRunner().invoke(
        app,
        ["watch", str(live), "--until-idle", "2.5", "--interval", "0.05", "--device", "cpu",
         "--max-collapsed", "3"],
    )  # fmt: skip
    thread.join(timeout=60)
    assert "idle for 2.5 s: stopped (60 steps seen)" in result.stderr
    alerts = [line for line in result.stderr.splitlines() if line.startswith("alert: ")]
    assert alerts[:3] == [f"alert: step {n}: risk: grpo replayed: an update norm spike"
                          for n in (29, 30, 31)]  # fmt: skip
    assert len(alerts) == len(set(alerts))
    assert "alert: step 60: collapse_warning" not in result.stderr  # step 60 never landed
    assert result.exit_code == 1  # 4 risk steps (29, 30, 31, 59) > --max-collapsed 3
    assert "gate tripped: grpo max_collapsed" in result.stderr


def test_exit_codes_in_a_real_process(grpo_fixture, tmp_path):
    """A process of its own for each exit code; a second way to a code in this one."""
    empty = tmp_path / "empty"
    empty.mkdir()
    tripped, held, missing, json_format = run_cli_together(
        ["watch", grpo_fixture, "--once", "--max-collapsed", "0", "--device", "cpu"],
        ["watch", grpo_fixture, "--once", "--max-collapsed", "100", "--device", "cpu"],
        ["watch", tmp_path / "nope", "--once"],
        ["watch", grpo_fixture, "-f", "json"],
    )
    assert tripped.returncode == 1 and "risk steps: 29, 30, 31" in tripped.stdout
    assert held.returncode == 0 and "gates passed: 1 gate holds" in held.stderr
    assert missing.returncode == 3 and missing.stderr.count("\n") == 1
    assert json_format.returncode == 2
    idle = CliRunner().invoke(
        app, ["watch", str(empty), "--until-idle", "0.2", "--interval", "0.05"]
    )
    assert idle.exit_code == 3
    no_interval = CliRunner().invoke(app, ["watch", str(grpo_fixture), "--interval", "0"])
    assert no_interval.exit_code == 2


def test_ctrl_c_stops_the_watch_cleanly(grpo_fixture, monkeypatch):
    """Ctrl-C (KeyboardInterrupt in the poll loop): a last line, exit 130, no traceback."""
    calls = {"n": 0}

    def interrupted(seconds: float) -> None:
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr("stabledrl_cli.cli._watch_loop.time.sleep", interrupted)
    result = CliRunner().invoke(app, ["watch", str(grpo_fixture), "--device", "cpu"])
    assert result.exit_code == 130 and calls["n"] == 1
    assert "stopped (160 steps seen)" in result.stderr and "Traceback" not in result.stderr


def _scalar_step(recorder: Recorder, n: int) -> None:
    """A scalar step (no policy batch): a steady grad norm, a spike at step 25, NaN at 12."""
    norm = 1.0 + 0.1 * (n % 3)
    recorder.log_step(
        n,
        grad_norm=math.nan if n == 12 else 500.0 if n == 25 else norm,
        loss=0.5,
        reward_mean=0.5,
        lr=1e-3,
    )


def _scalar_run(path: Path, steps: Iterable[int], **kwargs: object) -> Path:
    with Recorder(path, **kwargs) as recorder:  # type: ignore[arg-type]
        for n in steps:
            _scalar_step(recorder, n)
    return path


def test_a_watcher_follows_a_scalar_run_as_check_reads_it(tmp_path):
    """Scalar steps (what `record`'s optimizer hooks or a Recorder given scalars alone write)
    have nothing to replay: they are counted, their recorded scalars observed and alerted on."""
    live = tmp_path / "live"
    watcher = RunWatcher(live, CPU, recent=3)
    with Recorder(live) as recorder:  # its own policy, grpo, never replayed: no batch
        for start, stop in ((0, 10), (10, 20), (20, 30)):
            for n in range(start, stop):
                _scalar_step(recorder, n)
            watcher.poll()
            state = watcher.state()
            assert state.waiting is None and state.steps == stop == state.scalar_steps
            assert state.last_step == stop - 1 and state.replayed_steps == 0
            assert [row.step for row in state.recent] == list(range(stop - 3, stop))
            assert all(row.discard_frac is None and row.risk is None for row in state.recent)
    whole = open_run(live)
    observed = observe(whole)
    assert state.own_policy == state.recorded_policy == "grpo"
    assert state.spike_steps == observed.recorded_spike_steps == [25]
    assert state.nonfinite_steps == observed.nonfinite_steps == [12]
    assert state.risk_steps == state.drift_steps == []
    assert [(a.kind, a.step) for a in state.alerts] == [("nonfinite", 12), ("grad_norm_spike", 25)]
    assert state.recent[-1].grad_norm == pytest.approx(1.2)
    assert watcher.replay is not None
    with pytest.raises(NothingToReplay, match="nothing to replay: a scalar run"):
        watcher.replay.result()
    assert watcher.replay.recorded().series_dict() == recorded_run(whole, observed).series_dict()


def test_a_scalar_step_that_gains_its_batch_is_replayed(grpo_fixture, grpo_replay, tmp_path):
    """`record` writes an optimizer step first and rewrites it with the step's policy batch:
    a watcher that read the step as a scalar step reads it again and replays it."""
    scalars = _scalar_run(tmp_path / "scalars", (10, 40))
    live = tmp_path / "live"
    live.mkdir()
    _land_manifest(grpo_fixture, live)
    _land(grpo_fixture, live, range(10))
    _land(scalars, live, range(10, 11))
    watcher = RunWatcher(live, CPU)
    watcher.poll()
    state = watcher.state()
    assert (state.steps, state.replayed_steps, state.scalar_steps) == (11, 10, 1)
    _land(grpo_fixture, live, range(10, 40))  # step 10 rewritten with its batch
    _land(scalars, live, range(40, 41))  # and step 40 is a scalar step so far
    watcher.poll()
    state = watcher.state()
    assert (state.steps, state.replayed_steps, state.scalar_steps) == (41, 40, 1)
    assert state.risk_steps == [s for s in grpo_replay.policies[0].summary.collapsed_steps
                                if s < 40]  # fmt: skip


def test_recent_0_shows_no_table(tmp_path):
    """--recent 0 printed the table's header row and rule with no step under them."""
    run = _scalar_run(tmp_path / "run", range(8), policy=None)
    shown = CliRunner().invoke(app, ["watch", str(run), "--once", "--recent", "0"])
    assert shown.exit_code == 0, shown.stderr
    # 8 steps: fewer reward values than the collapse window, so the rule judged none of them;
    # no policy batch, so neither did the collapse warning's
    assert (
        shown.stdout.splitlines()[-1] == "collapse warning: not judged; reward collapse: not judged"
    )
    with_rows = CliRunner().invoke(app, ["watch", str(run), "--once", "--recent", "2"])
    header = "step ┃ reward ┃ grad norm ┃ discard ┃ risk ┃ drift"
    assert with_rows.stdout.splitlines()[-4].split() == header.split()


def test_once_on_a_scalar_run_shows_and_gates_its_recorded_scalars(tmp_path):
    run = _scalar_run(tmp_path / "run", range(30), policy=None)
    result = CliRunner().invoke(app, ["watch", str(run), "--once", "--recent", "3"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1:7] == [
        "steps: 30 (last 29); own policy: none recorded: no replay",
        "scalar steps: 30 of 30 (recorded scalars only, no policy batch to replay)",
        "risk steps: - (nothing replayed)",
        "drift steps: - (nothing replayed)",
        "recorded grad-norm spikes: step 25",
        "recorded non-finite: step 12",
    ]
    assert max(len(line) for line in lines[1:]) <= 80  # the first names the run
    assert "alert: step 25: grad_norm_spike: recorded grad_norm > 10x its recent median" in (
        result.stderr
    )
    code, data, stderr = _once(run, "--max-spikes", "0", "--max-nonfinite", "1")
    check = CliRunner().invoke(
        app, ["check", str(run), "--max-spikes", "0", "--max-nonfinite", "1", "-f", "json"]
    )
    assert code == 1 == check.exit_code and not data["ok"]
    assert data["gates"] == json.loads(check.stdout)["gates"]
    assert "gate tripped: (run) max_spikes: 1 grad-norm spike step, limit 0" in stderr
    assert data["own_policy"] is None and data["recorded_policy"] is None
    assert (data["steps"], data["scalar_steps"], data["replayed_steps"]) == (30, 30, 0)
    assert data["spike_steps"] == [25] and data["nonfinite_steps"] == [12]
    assert data["recent"][-1]["discard_frac"] is None
    code, data, _ = _once(run, "--max-spikes", "1", "--fail-on-collapse")
    assert code == 0 and data["ok"] and len(data["gates"]) == 2
    refused = CliRunner().invoke(app, ["watch", str(run), "--once", "--max-collapsed", "0"])
    assert refused.exit_code == 2
    assert "--max-collapsed need(s) the own policy replayed, and the run names no policy" in (
        refused.stderr
    )


SCRIPT = """\
import torch

torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
for step in range(30):
    x = torch.randn(8, 4) * (1000.0 if step == 25 else 1.0)
    optimizer.zero_grad()
    (model(x) ** 2).mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
"""


@pytest.fixture(scope="module")
def recorded_script(tmp_path_factory) -> Path:
    """A plain PyTorch script recorded by `stabledrl record -- python script.py`: scalar
    steps of its optimizer, with a gradient spike at step 25 (clipped, so the next steps are
    not)."""
    folder = tmp_path_factory.mktemp("recorded")
    script = folder / "train.py"
    script.write_text(SCRIPT)
    done = run_cli("record", "--out", folder / "run", "--", sys.executable, script)
    assert done.returncode == 0, done.stderr
    return folder / "run"


def test_once_on_a_recorded_script_exits_with_the_gates_code(recorded_script):
    run = recorded_script
    plain = CliRunner().invoke(app, ["watch", str(run), "--once"])
    gates = ["--max-spikes", "0", "--max-nonfinite", "0"]
    tripped = CliRunner().invoke(app, ["watch", str(run), "--once", *gates])
    refused = CliRunner().invoke(app, ["watch", str(run), "--once", "--max-discard-frac", "0.5"])
    assert plain.exit_code == 0, plain.stderr
    assert "steps: 30 (last 29); own policy: none recorded: no replay" in plain.stdout
    assert "recorded grad-norm spikes: step 25" in plain.stdout
    assert tripped.exit_code == 1
    assert "gate tripped: (run) max_spikes: 1 grad-norm spike step, limit 0" in tripped.stderr
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1


@contextmanager
def _watching(
    *args: object, seen: str
) -> Iterator[tuple[subprocess.Popen[str], list[str], threading.Event]]:
    """A real `watch` process, its stderr read line by line into the list; the event is set
    at the first line that starts with `seen`. Killed on the way out."""
    watch = subprocess.Popen(
        cli_command("watch", *args), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
        text=True, env=cli_environment(),
    )  # fmt: skip
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        assert watch.stderr is not None
        for line in watch.stderr:
            lines.append(line)
            if line.startswith(seen):
                found.set()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        yield watch, lines, found
    finally:
        watch.kill()
        reader.join(timeout=60)


def test_a_watch_follows_a_scalar_run_while_it_gains_steps(tmp_path):
    """A real `watch` process sees the first steps of a Recorder's scalar run (its alert for
    step 12 is on stderr), then the rest land and the Recorder closes; it stops on its own
    once it read them, with the gates' code."""
    live = tmp_path / "live"
    args = (live, "--interval", "0.05", "--max-spikes", "0")
    with _watching(*args, seen="alert: step 12: nonfinite") as (watch, lines, seen_first):
        with Recorder(live, policy=None) as recorder:
            for n in range(20):
                _scalar_step(recorder, n)
            assert seen_first.wait(timeout=120), "".join(lines)
            for n in range(20, 30):
                _scalar_step(recorder, n)
        code = watch.wait(timeout=120)
    stderr = "".join(lines)
    assert code == 1, stderr
    assert "alert: step 25: grad_norm_spike" in stderr
    assert "the recording closed: stopped (30 steps seen)" in stderr
    assert "gate tripped: (run) max_spikes: 1 grad-norm spike step, limit 0" in stderr
    assert "Traceback" not in stderr


def _landed_40(fixture: Path, tmp_path: Path) -> Path:
    """The fixture's manifest and first 40 steps (risk steps 29-31) landed in tmp_path/live."""
    live = tmp_path / "live"
    live.mkdir()
    _land_manifest(fixture, live)
    _land(fixture, live, range(40))
    return live


def _watched_40(fixture: Path, tmp_path: Path) -> tuple[Path, RunWatcher]:
    """`_landed_40`, and a watcher that has polled it once."""
    live = _landed_40(fixture, tmp_path)
    watcher = RunWatcher(live, CPU, recent=3)
    watcher.poll()
    return live, watcher


def test_a_watcher_starts_over_on_a_run_replaced_under_it(grpo_fixture, tmp_path):
    """A run re-recorded over the watched directory (`record --force`, or removed and written
    again) is another run: the watcher drops what it read of the old one (its steps, its own
    policy, its alerts) and follows the new one from its first step; a manifest only rewritten
    with `recording_stopped` (a Recorder's own note) is the same run. Before, the old run's
    steps and policy stayed, and the new run's steps were ignored up to the old last step."""
    live, watcher = _watched_40(grpo_fixture, tmp_path)
    before = watcher.state()
    assert (before.steps, before.own_policy) == (40, "grpo") and before.alerts

    manifest = json.loads((live / "manifest.json").read_text())
    manifest["recording_stopped"] = {"step": 40, "rank": 0, "reason": "disk full"}
    (live / "manifest.json").write_text(json.dumps(manifest))
    assert watcher.poll() == [] and watcher.state() == before

    shutil.rmtree(live)
    assert watcher.poll() == []
    assert (
        watcher.state().waiting
        == f"waiting for {live} to appear (a run directory or a packed archive)"
    )

    _scalar_run(live, range(5), policy=None)
    assert watcher.poll() == []
    state = watcher.state()
    assert (state.steps, state.last_step, state.scalar_steps) == (5, 4, 5)
    assert (state.own_policy, state.recorded_policy, state.alerts) == (None, None, [])
    assert [row.grad_norm for row in state.recent] == pytest.approx([1.2, 1.0, 1.1])

    _scalar_run(live, range(3), overwrite=True)  # `record --force` over it: grpo, 3 steps
    watcher.poll()
    state = watcher.state()
    assert (state.steps, state.recorded_policy) == (3, "grpo")
    assert watcher.replaced == 2  # the removal and the rewrite; the note was not one

    shutil.rmtree(live)
    live.write_text("not a run")  # the path is a file now: not a run, exit 3
    with pytest.raises(InputError):
        watcher.poll()


def test_the_live_watch_says_when_the_run_was_replaced(grpo_fixture, tmp_path, monkeypatch):
    """Between two polls the run is recorded again over (a scalar run of 4 steps): one line
    says so, and the watch goes on with the new run alone (its gates, its steps)."""
    live = _landed_40(grpo_fixture, tmp_path)
    polls = {"n": 0}

    def between_polls(seconds: float) -> None:
        polls["n"] += 1
        if polls["n"] == 1:
            _scalar_run(live, range(4), overwrite=True)

    monkeypatch.setattr("stabledrl_cli.cli._watch_loop.time.sleep", between_polls)
    args = ["watch", str(live), "--until-idle", "0", "--max-nonfinite", "0", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    line = f"{live}: the run changed under the watch: following it from its start"
    assert result.stderr.count(line) == 1
    assert "stopped (4 steps seen)" in result.stderr and "gates passed" in result.stderr
    assert result.exit_code == 0


def _norms_run(path: Path, steps: Iterable[int], norm: float, **kwargs: object) -> None:
    """Scalar steps of one grad norm (a run that tells which recording wrote each step)."""
    with Recorder(path, policy=None, **kwargs) as recorder:  # type: ignore[arg-type]
        for n in steps:
            recorder.log_step(n, grad_norm=norm, loss=0.5)


def _norms(watcher: RunWatcher) -> list[float | None]:
    return [row.grad_norm for row in watcher.state().recent]


def _normalised_steps(recorder: Recorder, steps: Iterable[int]) -> None:
    """Steps of a token-mean run that record their normaliser (`loss_scale`, as verl's
    integration does): step 10's is 1/100 of the others', a spike only `agg=recorded` sees;
    step 9's recorded grad norm is a spike."""
    rng = np.random.default_rng(0)
    for n in steps:
        batch = _batch(rng)
        scale = np.full(8, 0.08 if n == 10 else 8.0, dtype="float32")
        recorder.log_step(n, **batch, loss_scale=scale, grad_norm=50.0 if n == 9 else 1.0)


def _amend_policy(path: Path, spec: str) -> None:
    """The manifest amended as verl's integration amends it when rejected tokens show up."""
    amend_manifest(path, "policy", policy_entry(spec, None))


def test_a_policy_amended_mid_watch_is_the_runs_for_every_step(tmp_path):
    """verl's integration amends a run's policy mid-run (token-mean turns `agg=recorded`, the
    same run_id). The watcher reads the run again under the new policy, as a fresh watcher
    reads it (step 10 a risk step now), says so in `policy_changes`, and raises no alert twice.
    Before, it took the run for a replaced one (`replaced` 1) and raised its alerts again."""
    live = tmp_path / "live"
    recorder = Recorder(live, policy="dapo")
    _normalised_steps(recorder, range(12))
    watcher = RunWatcher(live, CPU, recent=3)
    assert [(a.kind, a.step) for a in watcher.poll()] == [("grad_norm_spike", 9)]
    assert watcher.state().risk_steps == []
    _amend_policy(live, "dapo:agg=recorded")
    assert [(a.kind, a.step) for a in watcher.poll()] == [("risk", 10)]
    amend_manifest(live, "meta", {"rejected_tokens_from_step": 12})  # the same policy
    assert watcher.poll() == []
    assert watcher.replaced == 0 and watcher.state().risk_steps == [10]
    assert watcher.policy_changes == [
        follow.PolicyChange(was="dapo", now="dapo:agg=recorded", after_step=11, replayed=True)
    ]
    fresh = RunWatcher(live, CPU, recent=3)
    fresh.poll()
    assert _comparable(watcher) == _comparable(fresh)
    recorder.close()


def test_a_policy_amended_while_a_poll_reads_names_the_last_step_judged_before(
    tmp_path, monkeypatch
):
    """The policy amended after a poll listed steps 5-11 and before it read them: they were
    never judged under the old policy, so the change is after step 4, the last step a poll
    judged under it. Before, it named step 11."""
    live = tmp_path / "live"
    recorder = Recorder(live, policy="dapo")
    _normalised_steps(recorder, range(5))
    watcher = RunWatcher(live, CPU)
    watcher.poll()
    _normalised_steps(recorder, range(5, 12))
    extend = incremental.OwnReplay.extend

    def amended_first(replay: incremental.OwnReplay, numbers: list[int]) -> list[int]:
        monkeypatch.setattr(incremental.OwnReplay, "extend", extend)  # once
        _amend_policy(live, "dapo:agg=recorded")
        return extend(replay, numbers)

    monkeypatch.setattr(incremental.OwnReplay, "extend", amended_first)
    assert [(a.kind, a.step) for a in watcher.poll()] == [("grad_norm_spike", 9), ("risk", 10)]
    assert [change.after_step for change in watcher.policy_changes] == [4]
    recorder.close()


def test_the_live_watch_says_once_when_the_runs_policy_changed(tmp_path, monkeypatch):
    """The policy amended at one poll, the meta at the next, then 8 more steps: one line
    names the change, every alert is printed once. Before, "the run changed under the watch"
    twice, and step 9's alert three times."""
    live = tmp_path / "live"
    recorder = Recorder(live, policy="dapo")
    _normalised_steps(recorder, range(12))
    polls = {"n": 0}

    def between_polls(seconds: float) -> None:
        polls["n"] += 1
        if polls["n"] == 1:
            _amend_policy(live, "dapo:agg=recorded")
        if polls["n"] == 2:
            amend_manifest(live, "meta", {"rejected_tokens_from_step": 12})
            _normalised_steps(recorder, range(12, 20))
            recorder.close()

    monkeypatch.setattr("stabledrl_cli.cli._watch_loop.time.sleep", between_polls)
    result = CliRunner().invoke(app, ["watch", str(live), "--device", "cpu", "--recent", "0"])
    lines = result.stderr.splitlines()
    assert [line for line in lines if line.startswith("alert:")] == [
        "alert: step 9: grad_norm_spike: recorded grad_norm > 10x its recent median",
        "alert: step 10: risk: dapo:agg=recorded replayed: an update norm spike",
    ]
    changed = f"{live}: the run's policy is now dapo:agg=recorded (was dapo, through step 11)"
    assert result.stderr.count(changed) == 1 and "changed under the watch" not in result.stderr
    assert "stopped (20 steps seen)" in result.stderr and result.exit_code == 0


def test_a_policy_amended_out_of_the_catalogue_is_named_before_its_gate_is_refused(
    tmp_path, monkeypatch
):
    """The run's policy amended to one the catalogue lacks under --max-collapsed: the line
    naming the change says no step is replayed, then the gate is refused (exit 2). Before,
    the refusal came first and the line never printed."""
    live = tmp_path / "live"
    recorder = Recorder(live, policy="dapo")
    _normalised_steps(recorder, range(12))
    entry = {"spec": "mine:x=1", "name": "mine", "params": {"x": 1}}
    monkeypatch.setattr(
        "stabledrl_cli.cli._watch_loop.time.sleep",
        lambda seconds: amend_manifest(live, "policy", entry),
    )
    args = ["watch", str(live), "--device", "cpu", "--max-collapsed", "3"]
    result = CliRunner().invoke(app, args)
    changed = f"{live}: the run's policy is now mine:x=1 (was dapo, through step 11): no step"
    assert result.stderr.count(changed) == 1 and result.exit_code == 2
    assert result.stderr.index(changed) < result.stderr.index("error: ")
    recorder.close()


def test_a_run_re_recorded_into_a_byte_identical_manifest_is_followed_anew(tmp_path, monkeypatch):
    """`record --force` of the same config under SOURCE_DATE_EPOCH between two polls: the
    manifests are the same but for the run identity (`run_id`), new with each recording. The
    watcher starts over on it and shows the new run alone. Before, with nothing in the manifest
    to tell the runs apart, it went on with the old run's steps 0-9 beside the new one's 10-11."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    live = tmp_path / "live"
    _norms_run(live, range(10), 1.0)
    watcher = RunWatcher(live, CPU, recent=12)
    watcher.poll()
    first = json.loads((live / "manifest.json").read_text())
    _norms_run(live, range(12), 2.0, overwrite=True)
    watcher.poll()
    assert watcher.replaced == 1 and _norms(watcher) == [2.0] * 12
    second = json.loads((live / "manifest.json").read_text())
    assert first.pop("run_id") != second.pop("run_id") and first == second


def test_a_resume_that_writes_read_steps_again_is_followed_anew(tmp_path):
    """A resume that appends keeps the run identity: the watch goes on. One from an earlier
    step (`resume_from`) writes steps the watch read again under the same names: it gives the
    run a new identity, and the watch starts over. Before, steps 5-11 were kept as first read
    (grad norm 1.0), the resumed training's (3.0) never read."""
    live = tmp_path / "live"
    _norms_run(live, range(10), 1.0)
    watcher = RunWatcher(live, CPU, recent=12)
    watcher.poll()
    _norms_run(live, range(10, 12), 1.0, resume=True)
    watcher.poll()
    assert watcher.replaced == 0 and _norms(watcher) == [1.0] * 12
    _norms_run(live, range(5, 12), 3.0, resume=True, resume_from=5)
    watcher.poll()
    assert watcher.replaced == 1 and _norms(watcher) == [1.0] * 5 + [3.0] * 7


def test_a_run_re_recorded_while_a_poll_reads_it_is_not_mixed_into_it(tmp_path, monkeypatch):
    """The run is re-recorded after a poll listed its steps and before it read them: the
    steps it reads are the new run's, under the names the old run's had. The poll sees the
    new run identity once it has read, drops what it read and reads the new run from its
    start. Before, that poll showed the old run's steps 0-3 (grad norm 1.0) with the new
    run's 4-9 (2.0; step 4, the last one read, is read again) as one run (the next poll
    started over)."""
    live = tmp_path / "live"
    _norms_run(live, range(5), 1.0)
    watcher = RunWatcher(live, CPU, recent=12)
    watcher.poll()
    _norms_run(live, range(5, 10), 1.0, resume=True)  # the same run, grown
    extend = incremental.OwnReplay.extend

    def re_recorded_first(replay: incremental.OwnReplay, numbers: list[int]) -> list[int]:
        monkeypatch.setattr(incremental.OwnReplay, "extend", extend)  # once
        _norms_run(live, range(12), 2.0, overwrite=True)
        return extend(replay, numbers)

    monkeypatch.setattr(incremental.OwnReplay, "extend", re_recorded_first)
    watcher.poll()
    assert watcher.replaced == 1 and _norms(watcher) == [2.0] * 12


def test_a_watcher_starts_over_when_steps_it_read_are_removed(grpo_fixture, tmp_path):
    """Steps the watcher read, removed under it: the run on disk is not
    the one it read, so it starts over on what is there. It kept showing, alerting and gating
    the removed steps (the grpo fixture's risk steps 29-31, with their files gone)."""
    live, watcher = _watched_40(grpo_fixture, tmp_path)
    assert watcher.state().risk_steps == [29, 30, 31]
    for n in range(20, 40):
        (live / "steps" / f"step-{n:08d}.safetensors").unlink()
    assert watcher.poll() == []
    state = watcher.state()
    assert (state.steps, state.last_step, state.risk_steps, state.alerts) == (20, 19, [], [])
    assert watcher.replaced == 1
    assert watcher.poll() == [] and watcher.replaced == 1  # once


def test_an_error_while_following_is_one_line_of_its_own(grpo_fixture, tmp_path, monkeypatch):
    """The manifest turned unreadable between two polls: exit 3 and the error on a line of its
    own (it was glued to the last line of the view, printed without its newline)."""
    live = _landed_40(grpo_fixture, tmp_path)

    def between_polls(seconds: float) -> None:
        (live / "manifest.json").write_text('{"bad')

    monkeypatch.setattr("stabledrl_cli.cli._watch_loop.time.sleep", between_polls)
    result = CliRunner().invoke(app, ["watch", str(live), "--until-idle", "0", "--device", "cpu"])
    assert result.exit_code == 3
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: "), errors


def test_a_manifest_removed_as_the_watcher_opens_the_run_is_waited_for(
    grpo_fixture, tmp_path, monkeypatch
):
    """The manifest gone between the watcher seeing it and reading its key (a run removed as
    the watch starts): the watcher waits, as for a path with no manifest yet. It raised
    FileNotFoundError (an internal error, exit 70)."""
    live = _landed_40(grpo_fixture, tmp_path)
    real_key = watched_manifest.file_key

    def gone(st: os.stat_result) -> tuple[int, int, int]:
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(watched_manifest, "file_key", gone)
    watcher = RunWatcher(live, CPU, recent=3)
    assert watcher.poll() == [] and "manifest.json" in (watcher.state().waiting or "")
    monkeypatch.setattr(watched_manifest, "file_key", real_key)
    watcher.poll()
    assert watcher.state().steps == 40


def _stop_recording(run: Path) -> None:
    """What a Recorder with on_write_error='warn' notes when a write fails (docs/recording.md)."""
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["recording_stopped"] = {"step": 40, "rank": 0, "reason": "disk full"}
    (run / "manifest.json").write_text(json.dumps(manifest))


def test_a_stopped_recording_is_named_by_once_and_by_the_live_watch(
    grpo_fixture, tmp_path, monkeypatch
):
    """Recording stopped (a failed write) while training goes on: the run gains no step, so
    an idle watch, or a cron `--once` whose gates pass, would say nothing of it. One warning
    line says so (it was silent: only `inspect` showed it)."""
    live = _landed_40(grpo_fixture, tmp_path)
    stopped = "recording stopped at step 40 (rank 0): disk full"

    def between_polls(seconds: float) -> None:
        _stop_recording(live)

    monkeypatch.setattr("stabledrl_cli.cli._watch_loop.time.sleep", between_polls)
    args = ["watch", str(live), "--until-idle", "0", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if stopped in line] == [
        f"warning: {live}: {stopped}; the training's later steps are not in the run"
    ]
    once = CliRunner().invoke(app, ["watch", str(live), "--once", "--device", "cpu"])
    assert once.exit_code == 0 and once.stderr.count(stopped) == 1


def test_a_poll_reads_only_the_steps_that_landed_since_the_last_poll(
    grpo_fixture, tmp_path, monkeypatch
):
    """A poll reads the new steps (and the last one again) and derives the
    run's observed behaviour once per change, never per step seen: before, each poll re-read
    every step seen (three times) and re-ran the rules over the whole run twice, so a poll
    with no new step of a 20,000-step run took a second."""
    from stabledrl_cli.dump._directory import DirectoryRun

    reads: list[int] = []
    rules = {"n": 0}
    read_files, observe_run = DirectoryRun._records, incremental.observe

    def counted_read(self: DirectoryRun, n: int, *args: object, **kwargs: object) -> object:
        reads.append(n)
        return read_files(self, n, *args, **kwargs)  # type: ignore[arg-type]

    def counted_rules(*args: object, **kwargs: object) -> object:
        rules["n"] += 1
        return observe_run(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(DirectoryRun, "_records", counted_read)
    monkeypatch.setattr(incremental, "observe", counted_rules)

    def polled(watcher: RunWatcher) -> tuple[list[int], int]:
        reads.clear()
        rules["n"] = 0
        watcher.poll()
        watcher.state()
        return sorted(set(reads)), rules["n"]

    live = tmp_path / "scalars"
    _scalar_run(live, range(60), policy=None)
    watcher = RunWatcher(live, CPU, recent=3)
    polled(watcher)
    assert polled(watcher) == ([59], 0)  # the last step, a scalar step, read again
    assert polled(watcher) == ([59], 0)
    with Recorder(live, policy=None, resume=True) as recorder:
        for n in range(60, 63):
            _scalar_step(recorder, n)
    assert polled(watcher) == ([59, 60, 61, 62], 1)
    assert polled(watcher) == ([62], 0)
    fresh = RunWatcher(live, CPU, recent=3)
    fresh.poll()
    assert watcher.state() == fresh.state()

    batches = _landed_40(grpo_fixture, tmp_path)
    watcher = RunWatcher(batches, CPU, recent=3)
    polled(watcher)
    assert polled(watcher) == ([39], 0)  # the last step's header (its optimizer half may come)
    _land(grpo_fixture, batches, range(40, 45))
    assert polled(watcher) == ([39, 40, 41, 42, 43, 44], 1)
    fresh = RunWatcher(batches, CPU, recent=3)
    fresh.poll()
    assert watcher.state() == fresh.state()


def test_a_poll_parses_only_the_step_file_names_new_to_the_listing(tmp_path, monkeypatch):
    """The steps directory is listed at each poll, but a name listed before is not parsed
    again: before, every poll within two seconds of a write (or after one) re-parsed every
    file name of the run, 0.27 s of a poll on a 20,000-step run."""
    from stabledrl_cli.dump import _listing

    parsed: list[str] = []
    reason_of = _listing.unknown_reason

    def counted(name: str, regular: bool, world_size: int) -> str | None:
        parsed.append(name)
        return reason_of(name, regular, world_size)

    monkeypatch.setattr(_listing, "unknown_reason", counted)
    live = _scalar_run(tmp_path / "live", range(60), policy=None)
    watcher = RunWatcher(live, CPU)
    watcher.poll()
    assert len(parsed) == 60
    parsed.clear()
    with Recorder(live, policy=None, resume=True) as recorder:
        for n in range(60, 63):
            _scalar_step(recorder, n)
    parsed.clear()  # the Recorder's own listing
    watcher.poll()
    assert parsed == [f"step-{n:08d}.safetensors" for n in range(60, 63)]
    assert watcher.state().steps == 63


def test_sigterm_stops_the_watch_as_ctrl_c_does(grpo_fixture, tmp_path):
    """SIGTERM (what `timeout`, systemd and Kubernetes send): the last view and the stopped
    line on stderr, exit 143 (128 + SIGTERM). Before, the process died at once: no view, no
    line, and the shell saw the signal. The run is a copy of the fixture without the
    `recording_closed` mark (a run still recording), so the watch waits for the signal."""
    live = tmp_path / "live"
    shutil.copytree(grpo_fixture, live)
    manifest = json.loads((live / "manifest.json").read_text())
    manifest.pop("recording_closed", None)
    (live / "manifest.json").write_text(json.dumps(manifest))
    args = (live, "--interval", "0.05", "--recent", "2", "--device", "cpu")
    with _watching(*args, seen="alert: ") as (watch, lines, polled):  # after a poll's view
        assert polled.wait(timeout=120), "".join(lines)
        watch.send_signal(signal.SIGTERM)
        code = watch.wait(timeout=120)
    stderr = "".join(lines)
    assert code == 143, stderr
    assert "steps: 160 (last 159); own policy: grpo" in stderr  # the last view
    assert stderr.endswith("stopped (160 steps seen)\n") and "Traceback" not in stderr


def _stop_as_the_console_leaves_its_buffer(monkeypatch, stop: BaseException, at: int) -> None:
    """Raises `stop` as a signal's handler would at the entry of rich's `_exit_buffer` (the
    `at`-th call), before it counts the exit: where a Ctrl-C or SIGTERM lands when it comes as
    the watch prints a line."""
    from rich.console import Console

    leave = Console._exit_buffer
    calls = iter(range(1, 10**9))

    def landing(self: Console) -> None:
        if next(calls) == at:
            raise stop
        leave(self)

    monkeypatch.setattr(Console, "_exit_buffer", landing)


@pytest.mark.parametrize("stop, code", [(KeyboardInterrupt(), 130), (None, 143)])
def test_a_stop_that_lands_as_a_line_is_printed_loses_no_later_line(
    grpo_fixture, tmp_path, monkeypatch, stop, code
):
    """Ctrl-C or SIGTERM landing as rich left its buffer after an alert's line (a stop in
    the first call of `_exit_buffer`, before it counted the exit): the console stayed one
    buffer deep, and nothing after was written: no last view, no `stopped (160 steps seen)`,
    exit 130 or 143 all the same (test_sigterm_stops_the_watch_as_ctrl_c_does failed so on a
    loaded machine). The lines after the stop are written, those buffered before them too."""
    from stabledrl_cli.cli._signals import Terminated

    live = tmp_path / "live"
    shutil.copytree(grpo_fixture, live)  # no recording_closed mark: the watch goes on
    _stop_as_the_console_leaves_its_buffer(monkeypatch, stop or Terminated(), at=3)
    args = ["watch", str(live), "--interval", "0.01", "--recent", "2", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == code, result.output
    assert "steps: 160 (last 159); own policy: grpo" in result.stderr
    assert result.stderr.endswith("stopped (160 steps seen)\n"), result.stderr
    _stop_as_the_console_leaves_its_buffer(monkeypatch, stop or Terminated(), at=3)
    once = CliRunner().invoke(app, ["watch", str(live), "--once", "--device", "cpu"])
    if stop is None:  # --once stopped by SIGTERM says so
        assert once.exit_code == 143 and once.stderr.endswith("stopped by SIGTERM\n"), once.output
    else:
        assert once.exit_code == 130 and once.stderr.endswith("error: interrupted\n"), once.output


def test_a_closed_stderr_exits_141_not_as_a_tripped_gate(grpo_fixture):
    """`stabledrl watch RUN --once 2>&1 | head -2` (its alerts are on stderr): rich's own
    broken-pipe handling of the stderr console exited 1, a tripped gate to cron or CI, with
    no gate given. A closed stderr now ends it as a closed stdout does: quietly, exit 141."""
    from stabledrl_cli.cli.app import BROKEN_PIPE

    for args in (["--once"], ["--interval", "0.05"]):
        watch = subprocess.Popen(
            cli_command("watch", grpo_fixture, *args, "--device", "cpu"),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_environment(),
        )  # fmt: skip
        assert watch.stderr is not None
        watch.stderr.close()  # before the watch writes its first alert
        assert watch.wait(timeout=HANG_SECONDS) == BROKEN_PIPE, args


_POLL_THAT_WAITS = """
import signal, sys
from stabledrl_cli.replay import incremental
from stabledrl_cli.replay.watch import follow
def poll(self):
    sys.stderr.write("polling\\n")
    sys.stderr.flush()
    signal.pause()
follow.RunWatcher.poll = poll
from stabledrl_cli.cli.app import main
sys.argv = ["stabledrl", *sys.argv[1:]]
main()
"""
"""A `stabledrl` whose watcher's poll says so on stderr, then waits for a signal."""


def test_sigterm_stops_a_watch_once_with_one_line(grpo_fixture):
    """SIGTERM while `--once` reads the run: one line on stderr and exit 143, as the live watch
    ends. Before, the process died at once: no line, and the shell saw the signal (-15)."""
    command = [sys.executable, "-c", _POLL_THAT_WAITS, "watch", str(grpo_fixture), "--once"]
    watch = subprocess.Popen(
        command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env=cli_environment(),
    )  # fmt: skip
    try:
        assert watch.stderr is not None
        assert watch.stderr.readline() == "polling\n"
        watch.send_signal(signal.SIGTERM)
        stderr = watch.stderr.read()
        code = watch.wait(timeout=120)
    finally:
        watch.kill()
    assert code == 143, stderr
    assert stderr == "stopped by SIGTERM\n"


def _watched_to_the_end(
    monkeypatch: pytest.MonkeyPatch, live: Path, finish: Callable[[], None]
) -> tuple[Result, int]:
    """`watch live --max-spikes 0` in this process, `finish()` called at its first sleep
    between polls and Ctrl-C at its sixth; -> its result and how often it slept."""
    sleeps = 0

    def between_polls(seconds: float) -> None:
        nonlocal sleeps
        sleeps += 1
        if sleeps == 1:
            finish()
        if sleeps > 5:
            raise KeyboardInterrupt

    monkeypatch.setattr("stabledrl_cli.cli._watch_loop.time.sleep", between_polls)
    return CliRunner().invoke(app, ["watch", str(live), "--max-spikes", "0"]), sleeps


def test_a_watch_ends_once_the_recording_closed_and_its_steps_are_read(tmp_path, monkeypatch):
    """A Recorder closed (its run marked `recording_closed`) between two polls: the next poll
    reads the steps that landed meanwhile and the watch ends as `--until-idle` does, with the
    gates' code; the mark is no change of run. Before, only a signal or --until-idle ended it
    (here the sixth sleep's Ctrl-C, exit 130)."""
    live = tmp_path / "live"
    recorder = Recorder(live, policy=None)
    for n in range(20):
        _scalar_step(recorder, n)

    def finish() -> None:
        for n in range(20, 30):
            _scalar_step(recorder, n)
        recorder.close()

    result, sleeps = _watched_to_the_end(monkeypatch, live, finish)
    assert result.exit_code == 1 and sleeps == 1, result.stderr
    assert "the recording closed: stopped (30 steps seen)" in result.stderr
    assert "gate tripped: (run) max_spikes: 1 grad-norm spike step" in result.stderr
    assert "changed under the watch" not in result.stderr

    watcher = RunWatcher(live, CPU)
    watcher.poll()
    assert watcher.closed and watcher.state().steps == 30
    with Recorder(live, policy=None, resume=True) as recorder:
        watcher.poll()
        assert not watcher.closed and watcher.replaced == 0  # resumed: open again
        _scalar_step(recorder, 30)
    watcher.poll()
    assert watcher.closed and watcher.state().steps == 31

    empty = tmp_path / "empty"
    Recorder(empty, policy=None).close()
    result = CliRunner().invoke(app, ["watch", str(empty)])
    assert result.exit_code == 3
    assert result.stderr.endswith(f"{empty}: the recording closed with no readable step\n")


_RECORD_THEN_WAIT = """
import math, sys, time
from stabledrl_cli.dump import Recorder
recorder = Recorder(sys.argv[1], policy=None)
for n in range(int(sys.argv[2])):
    recorder.log_step(n, grad_norm=500.0 if n == 25 else 1.0, loss=0.5, reward_mean=0.5, lr=1e-3)
print("recorded", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize(("steps", "code"), [(30, 1), (0, 3)])
def test_a_watch_ends_once_the_recording_process_is_killed(tmp_path, monkeypatch, steps, code):
    """A Recorder's process killed (-9: the out-of-memory killer, say) never marks its run
    closed; the watch now ends once it read what landed, as for a closed one (the gates'
    code; 3 with no step), whether it was killed between two polls (30 steps) or before the
    watch's first (no step). Before, it waited for ever (only --until-idle or a signal ended
    it; here the sixth sleep's Ctrl-C, exit 130)."""
    live = tmp_path / "live"
    recorder = subprocess.Popen(
        [sys.executable, "-c", _RECORD_THEN_WAIT, str(live), str(steps)],
        stdout=subprocess.PIPE, text=True, env=cli_environment(),
    )  # fmt: skip

    def kill() -> None:
        recorder.kill()
        recorder.wait()

    try:
        assert recorder.stdout is not None and recorder.stdout.readline() == "recorded\n"
        if not steps:
            kill()  # before the watch's first poll: it never sees the Recorder's lock held
        result, _ = _watched_to_the_end(monkeypatch, live, kill)
    finally:
        kill()
    stderr = result.stderr
    assert result.exit_code == code, stderr
    ended = "the recording's process ended without closing it (killed?)"
    if steps:
        assert "alert: step 25: grad_norm_spike" in stderr.partition(ended)[0]  # before the kill
        assert f"{ended}: stopped (30 steps seen)" in stderr
        assert "gate tripped: (run) max_spikes: 1 grad-norm spike step, limit 0" in stderr
    else:
        assert stderr.endswith(f"{live}: {ended} with no readable step\n")
    assert "Traceback" not in stderr


@pytest.mark.parametrize("marked", [True, False])
def test_a_watch_ends_once_every_rank_of_a_run_closed(tmp_path, monkeypatch, marked):
    """The last rank of a run of several to close marks it `recording_closed` (each adds
    itself to `recording_closed_ranks`): the watch ends on it as on a run of one rank's. A run
    without the mark (an older Recorder's, or a mark that did not land) ends once every rank
    whose Recorder the watch saw recording let its lock go, after reading what landed. Before,
    only --until-idle or a signal ended it (here the sixth sleep's Ctrl-C, exit 130). A rank
    it never saw recording keeps it waiting."""
    live = tmp_path / "live"
    ranks = [Recorder(live, policy=None, world_size=2, rank=rank) for rank in (0, 1)]

    def steps(numbers: range) -> None:
        for recorder in ranks:
            for n in numbers:
                _scalar_step(recorder, n)

    steps(range(20))

    def finish() -> None:
        steps(range(20, 30))
        for recorder in ranks:
            recorder.close()
        if not marked:
            manifest = json.loads((live / "manifest.json").read_text())
            del manifest["recording_closed"], manifest["recording_closed_ranks"]
            (live / "manifest.json").write_text(json.dumps(manifest))

    result, sleeps = _watched_to_the_end(monkeypatch, live, finish)
    assert result.exit_code == 1 and sleeps == 1 + (not marked), result.stderr
    ended = "the recording closed" if marked else "every Recorder of the run closed"
    assert f"{ended}: stopped (30 steps seen)" in result.stderr
    assert "gate tripped: (run) max_spikes: 1 grad-norm spike step" in result.stderr

    late = tmp_path / "late"
    Recorder(late, policy=None, world_size=2, rank=0).close()  # rank 1 not seen recording
    watcher = RunWatcher(late, CPU)
    for _ in range(3):
        watcher.poll()
    assert watcher.writers_ended is None

    dropped = tmp_path / "dropped"  # one rank, never closed: no mark, its lock let go
    recorder = Recorder(dropped, policy=None)
    _scalar_step(recorder, 0)
    watcher = RunWatcher(dropped, CPU)
    watcher.poll()
    del recorder
    watcher.poll()
    assert watcher.writers_ended is None  # one poll is not enough
    watcher.poll()
    assert watcher.writers_ended == "closed" and not watcher.closed


def test_a_follower_replays_the_guards_its_config_names(tmp_path):
    """The follower's observed behaviour reports the grad-norm guards of its config, as
    `observe` and a replay do: it replayed the default ones whatever the config named."""
    config = ReplayConfig(device="cpu", guards=("skip-step",))
    live = _scalar_run(tmp_path / "live", range(40), policy=None)
    watcher = RunWatcher(live, config)
    watcher.poll()
    assert watcher.replay is not None
    followed = watcher.replay.observed().guards
    assert [g.spec for g in followed] == ["skip-step"]
    whole = observe(open_run(live), config).guards
    assert [json.dumps(g.to_dict()) for g in followed] == [json.dumps(g.to_dict()) for g in whole]


def test_a_watcher_feeds_the_guards_only_the_new_steps(tmp_path, monkeypatch):
    """The grad-norm guards of the observed behaviour are fed each new step once (the last
    one, a scalar step that may still change, on copies of them), and report what `observe`
    reports over the whole run, after the last step is rewritten too. Before, each poll
    with a new step replayed them over the whole run, twice: 0.3 s of a poll on a
    20,000-step run."""
    from stabledrl_cli.replay.guard_rules import SkipStep

    updates = {"n": 0}
    update = SkipStep.update

    def counted(self: SkipStep, grad_norm: float, loss: float | None = None) -> object:
        updates["n"] += 1
        return update(self, grad_norm, loss)

    monkeypatch.setattr(SkipStep, "update", counted)

    def guards(watcher: RunWatcher) -> list[str]:
        assert watcher.replay is not None
        return [json.dumps(g.to_dict()) for g in watcher.replay.observed().guards]

    def whole(path: Path) -> list[str]:
        return [json.dumps(g.to_dict()) for g in observe(open_run(path)).guards]

    live = _scalar_run(tmp_path / "live", range(200), policy=None)
    watcher = RunWatcher(live, CPU)
    watcher.poll()
    with Recorder(live, policy=None, resume=True) as recorder:
        for n in range(200, 203):
            _scalar_step(recorder, n)
        updates["n"] = 0
        watcher.poll()
        watcher.state()
        assert updates["n"] == 4  # steps 199-201, and 202 (the last) on a copy
        assert guards(watcher) == whole(live)
        recorder.rewrite_step(202, grad_norm=900.0, loss=50.0)
        watcher.poll()
        assert guards(watcher) == whole(live)
        last = json.loads(guards(watcher)[-1])["acted"][-1]  # skip-step's
        assert (last["step"], last["action"]) == (202, "skip")


def _batch(rng: np.random.Generator) -> dict[str, object]:
    """A small policy batch (log_step's keywords), with its loss."""
    logp = rng.normal(size=8).astype("float32")
    return {
        "logp": logp,
        "logp_old": logp + 0.1,
        "advantages": rng.normal(size=8).astype("float32"),
        "seq_id": np.repeat(np.arange(4), 2).astype("int32"),
        "group_id": np.array([0, 0, 1, 1], dtype="int32"),
        "reward": np.array([1.0, 0.0, 0.5, 0.5], dtype="float32"),
        "loss": 0.25,
    }


def test_a_batch_step_that_gains_its_optimizer_half_is_read_again(tmp_path):
    """`record` writes a step's policy batch (log_policy_batch, before backward) and rewrites
    it with its optimizer step's half (grad norm, lr) when optimizer.step() runs: a watcher
    that read the batch alone reads the step again, as a fresh one would read it (its recorded
    grad-norm spike, its guards, its row). Before, the batch step read was never read again:
    the spike at step 30 was missed for good (spike steps [], the row's grad norm None)."""
    rng = np.random.default_rng(0)
    live = tmp_path / "live"
    recorder = Recorder(live, policy="grpo")
    for n in range(30):
        recorder.log_step(n, grad_norm=1.0 + 0.1 * (n % 3), lr=1e-3, **_batch(rng))
    half = _batch(rng)
    recorder.log_step(30, **half)
    watcher = RunWatcher(live, CPU, recent=2)
    watcher.poll()
    assert watcher.state().spike_steps == []
    recorder.rewrite_step(30, grad_norm=500.0, lr=1e-3, **half)
    alerts = watcher.poll()
    assert [(a.step, a.kind) for a in alerts] == [(30, "grad_norm_spike")]

    def whole() -> tuple[WatchState, list[str]]:
        fresh = RunWatcher(live, CPU, recent=2)
        fresh.poll()
        assert fresh.replay is not None and watcher.replay is not None
        return fresh.state(), [str(g.to_dict()) for g in fresh.replay.observed().guards]

    def seen() -> tuple[WatchState, list[str]]:
        assert watcher.replay is not None
        return watcher.state(), [str(g.to_dict()) for g in watcher.replay.observed().guards]

    assert seen() == whole()
    assert watcher.state().spike_steps == [30]
    recorder.log_step(31, grad_norm=1.0, lr=1e-3, **_batch(rng))
    recorder.close()
    watcher.poll()
    assert seen() == whole()


def _comparable(watcher: RunWatcher) -> tuple[str, list[str]]:
    """A watcher's state but its alerts (raised as steps were read: a step rewritten since keeps
    its alert), and its guards' reports, as JSON (NaN equal to NaN)."""
    state = watcher.state().to_dict()
    state.pop("alerts")
    observed = watcher.replay.observed() if watcher.replay and watcher.replay.seen else None
    guards = [] if observed is None else [g.to_dict() for g in observed.guards]
    return json.dumps(state, sort_keys=True), [json.dumps(g, sort_keys=True) for g in guards]


@pytest.mark.parametrize("seed", range(8))
def test_a_watcher_polled_anywhere_sees_what_a_fresh_one_sees(tmp_path, seed):
    """Property: whatever the polls' boundaries, a watcher that read a run poll by poll shows
    what a fresh watcher reading it at once shows (every figure, row and guard report; its
    alerts hold the fresh one's). The run is written as `record` writes one: steps whole, or
    in two halves (the batch then its optimizer step's scalars, or the scalars then the batch:
    a rewrite of the last step), with grad-norm spikes and NaNs; the polls fall at random
    points, between two halves too."""
    rng = np.random.default_rng(seed)
    live = tmp_path / "live"
    recorder = Recorder(live, policy="grpo")
    watcher = RunWatcher(live, CPU, recent=3)
    for n in range(40):
        half = _batch(rng)
        norm = float(rng.choice([1.0, 1.1, 1.2, 500.0, math.nan], p=[0.3, 0.3, 0.3, 0.05, 0.05]))
        scalars = {"grad_norm": norm, "lr": 1e-3}
        way = rng.integers(3)
        if way == 0:
            recorder.log_step(n, **half, **scalars)
        else:
            recorder.log_step(n, **(half if way == 1 else scalars))
            if rng.random() < 0.5:
                watcher.poll()
            recorder.rewrite_step(n, **half, **scalars)
        if rng.random() < 0.3:
            watcher.poll()
            fresh = RunWatcher(live, CPU, recent=3)
            fresh.poll()
            assert _comparable(watcher) == _comparable(fresh), n
            assert set(map(str, fresh.state().alerts)) <= set(map(str, watcher.state().alerts))
    recorder.close()


def test_a_run_resumed_while_a_poll_lists_it_is_not_closed(tmp_path, monkeypatch):
    """A closed run resumed between the poll's read of its mark and its listing (the resume
    removes the mark, then the steps it writes again): the poll's listing is not every step
    the run will have, so the watch does not end. Before, the poll took the mark read before
    for the listing made after: closed, over a run cut to 5 steps while training went on."""
    from stabledrl_cli.dump._directory import DirectoryRun

    live = _scalar_run(tmp_path / "live", range(10), policy=None)
    listed = DirectoryRun.listed_step_numbers
    resumed: list[Recorder] = []

    def resumed_first(self: DirectoryRun) -> list[int]:
        if not resumed:
            resumed.append(Recorder(live, policy=None, resume=True, resume_from=5))
        return listed.fget(self)  # type: ignore[attr-defined, no-any-return]

    monkeypatch.setattr(DirectoryRun, "listed_step_numbers", property(resumed_first))
    watcher = RunWatcher(live, CPU)
    watcher.poll()
    assert (watcher.state().steps, watcher.closed) == (5, False)
    for n in range(5, 12):
        _scalar_step(resumed[0], n)
    resumed[0].close()
    watcher.poll()
    assert (watcher.state().steps, watcher.closed) == (12, True)


def test_a_watch_run_from_another_thread_than_the_main_one(tmp_path):
    """The watch called from a thread that is not the main one (a script that checks its run
    from a worker thread): no SIGTERM handler is set (Python allows one only in the main
    thread), and the watch runs as anywhere else. Before, --once and the live watch both
    failed on the handler: exit 70, 'internal error: ValueError: signal only works in main
    thread'."""
    live = _scalar_run(tmp_path / "live", range(30), policy=None)  # closed: the watch ends
    codes: dict[str, tuple[int, str]] = {}

    def watch() -> None:
        for name, more in (("once", ["--once"]), ("live", ["--interval", "0.01"])):
            result = CliRunner().invoke(app, ["watch", str(live), "--max-spikes", "0", *more])
            codes[name] = (result.exit_code, result.stderr.splitlines()[-1])

    worker = threading.Thread(target=watch)
    worker.start()
    worker.join()
    tripped = "gate tripped: (run) max_spikes: 1 grad-norm spike step, limit 0 (step 25)"
    assert codes == {"once": (1, tripped), "live": (1, tripped)}


def test_a_packed_archive_is_closed_once_read(grpo_fixture, tmp_path):
    """An archive gains no step, marked `recording_closed` or not (the committed fixture is
    not): its first poll reads every step and the watch ends. Before, a watch of it never
    ended on its own."""
    from stabledrl_cli.dump._packer import pack_run

    archive = tmp_path / "grpo.h5"
    pack_run(open_run(grpo_fixture), archive)
    assert "recording_closed" not in open_run(archive).manifest
    watcher = RunWatcher(archive, recent=2)
    watcher.poll()
    assert watcher.closed and len(watcher.replay.seen) == 160


def test_a_manifest_replaced_by_a_fifo_under_the_watch_is_not_waited_on(
    grpo_fixture, tmp_path, monkeypatch
):
    """The manifest turned into a FIFO between two polls: the watcher reads it as readers do
    (a regular file only, never opened blocking), so the run is 'not a run', exit 3. Before,
    it opened the FIFO to compare the manifest and waited for a writer for ever (a link to
    /dev/zero was read until memory ran out)."""
    live = _landed_40(grpo_fixture, tmp_path)
    fifo = live / "manifest.json"

    def between_polls(seconds: float) -> None:
        fifo.unlink()
        os.mkfifo(fifo)

    monkeypatch.setattr("stabledrl_cli.cli._watch_loop.time.sleep", between_polls)
    results: list[object] = []
    args = ["watch", str(live), "--until-idle", "0", "--device", "cpu"]
    watching = threading.Thread(target=lambda: results.append(CliRunner().invoke(app, args)))
    watching.start()
    watching.join(HANG_SECONDS)
    if watching.is_alive():  # it waits on the FIFO: a writer lets it go, then it is a failure
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        watching.join()
        pytest.fail("the watch waited on the FIFO")
    (result,) = results
    assert result.exit_code == 3, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == [f"error: {fifo}: not a regular file"], result.stderr


def test_a_manifest_rewritten_past_the_parsers_depth_under_the_watch_is_one_error_line(
    grpo_fixture, tmp_path, monkeypatch
):
    """The manifest rewritten between two polls as a JSON nested past the parser's depth:
    the watcher reads it as readers do, so the run is unreadable, one line and exit 3.
    Before, its comparison of the manifests raised RecursionError (internal error, exit 70)."""
    live = _landed_40(grpo_fixture, tmp_path)
    manifest = live / "manifest.json"

    def between_polls(seconds: float) -> None:
        manifest.write_text("[" * 100_000 + "]" * 100_000)

    monkeypatch.setattr("stabledrl_cli.cli._watch_loop.time.sleep", between_polls)
    args = ["watch", str(live), "--until-idle", "0", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "nested too deeply" in errors[0], result.stderr


def test_a_stopped_recordings_reason_of_several_lines_is_one_warning_line(grpo_fixture, tmp_path):
    """The recording_stopped reason is the Recorder's error text (an OSError naming a path,
    which may hold a newline) or a crafted manifest's: its warning stays one line. Before,
    each newline of the reason began a line of its own."""
    live = _landed_40(grpo_fixture, tmp_path)
    manifest = json.loads((live / "manifest.json").read_text())
    reason = "recording failed: /runs/a\nb/steps: No space left on device\n\nforged line"
    manifest["recording_stopped"] = {"step": 40, "rank": 0, "reason": reason}
    (live / "manifest.json").write_text(json.dumps(manifest))
    once = CliRunner().invoke(app, ["watch", str(live), "--once", "--device", "cpu"])
    assert once.exit_code == 0, once.output
    told = [line for line in once.stderr.splitlines() if "b/steps" in line or "forged" in line]
    assert told == [
        f"warning: {live}: recording stopped at step 40 (rank 0): "
        "recording failed: /runs/a b/steps: No space left on device forged line; the "
        "training's later steps are not in the run"
    ]


def _two_rank_run(path: Path, steps: dict[int, range], **kwargs: object) -> Path:
    """A run of world_size 2 whose rank r recorded `steps[r]` (a small batch each)."""
    rng = np.random.default_rng(0)
    for rank, numbers in steps.items():
        with Recorder(path, policy="grpo", world_size=2, rank=rank, **kwargs) as rec:
            for n in numbers:
                logp_old = -rng.random((2, 3)).astype(np.float32)
                rec.log_step(
                    n, logp=logp_old + 0.01, logp_old=logp_old,
                    advantages=np.array([1.0, -1.0], np.float32),
                )  # fmt: skip
    return path


def test_once_names_a_damaged_step_file_but_not_a_rank_still_writing(tmp_path):
    """`watch --once` skipped a torn step file in silence, where replay and check name it
    (docs/exit-codes.md says it does too). A step whose other rank has not landed its file
    yet is a live run's lag, not damage: no warning."""
    run = _two_rank_run(tmp_path / "run", {0: range(5)})
    writing = Recorder(run, policy="grpo", world_size=2, rank=1)  # still writing: run unclosed
    logp_old = -np.ones((2, 3), np.float32)
    for n in range(4):
        writing.log_step(
            n, logp=logp_old + 0.01, logp_old=logp_old, advantages=np.array([1.0, -1.0], np.float32)
        )
    code, _, stderr = _once(run)
    assert code == 0 and "unreadable" not in stderr, stderr
    (run / "steps" / "step-00000002.rank-0001.safetensors").write_bytes(b"garbage")
    code, data, stderr = _once(run)
    assert code == 0 and data["steps"] == 3, stderr
    warning = [line for line in stderr.splitlines() if "unreadable" in line]
    assert warning == [
        f"warning: skipped 1 unreadable step of {run} (step 2: torn: 7 bytes, shorter than a "
        "safetensors header); `stabledrl inspect` lists every finding"
    ], stderr
    writing.close()


def test_a_recording_over_the_run_counts_as_one_replacement(tmp_path):
    """A recording over a watched run removes its step files, then writes its manifest: a
    watcher that polled between the two counted (and `watch` announced) two replacements."""
    run = tmp_path / "run"
    _two_rank_run(run, {0: range(3), 1: range(3)})
    watcher = RunWatcher(run, CPU)
    watcher.poll()
    assert watcher.state().steps == 3
    for file in (run / "steps").iterdir():  # what the new recording's ranks do first
        file.unlink()
    watcher.poll()
    _two_rank_run(run, {0: range(2), 1: range(2)}, overwrite=True)  # a new manifest, steps
    watcher.poll()
    assert watcher.replaced == 1 and watcher.state().steps == 2


def test_a_rank_that_restarts_alone_and_writes_steps_again_is_read_again(tmp_path):
    """Rank 1 of a 2-rank run restarts alone and resumes from step 7, writing steps 7-9 again
    between two polls (their file names as before), its rewards now 1 where they were 0: the
    watcher kept rank 1's old part of steps 7 and 8 (reward 0.0 where a watch started then
    reads 0.5), since only rank 0's resume gave the run a new run_id. Each rank's does now."""
    run = tmp_path / "run"

    def record(rank: int, steps: range, reward: float, **kwargs: object) -> None:
        with Recorder(run, policy="grpo", world_size=2, rank=rank, **kwargs) as rec:
            for n in steps:
                logp = np.full((2, 3), -1.0, np.float32)
                rec.log_step(
                    n, logp=logp, logp_old=logp, advantages=np.array([1.0, -1.0], np.float32),
                    reward=np.full(2, reward, np.float32),
                )  # fmt: skip

    record(0, range(10), 0.0)
    record(1, range(10), 0.0)
    watcher = RunWatcher(run, CPU)
    watcher.poll()
    record(1, range(7, 10), 1.0, resume=True, resume_from=7)
    watcher.poll()
    fresh = RunWatcher(run, CPU)
    fresh.poll()
    assert [row.reward_mean for row in fresh.state().recent[-3:]] == [0.5, 0.5, 0.5]
    assert watcher.replaced == 1 and watcher.state() == fresh.state()


def _landed_but(source: Path, target: Path, missing: int, end: int = 40) -> Path:
    """`target`: steps 0 to `end` - 1 of the run `source` landed as a Recorder lands them, but
    step `missing`."""
    target.mkdir()
    _land_manifest(source, target)
    _land(source, target, range(missing))
    _land(source, target, range(missing + 1, end))
    return target


def test_a_step_that_lands_after_a_later_one_is_read_and_alerted_once(grpo_fixture, tmp_path):
    """Step files that land out of order (a copy or sync of a run into the watched directory
    that renames them in another order): a step below the last one read that is new to the
    listing is read, and the steps after it are replayed again with it in their history, so
    the view is what a fresh watch (and a replay) gives; an alert already raised is not raised
    again. It was never read: the watch showed 39 of 40 steps and no risk alert at step 30."""
    live = _landed_but(grpo_fixture, tmp_path / "live", 30)
    watcher = RunWatcher(live, CPU, recent=3)
    first = watcher.poll()
    assert [(a.kind, a.step) for a in first] == [("risk", 29), ("risk", 31)]
    _land(grpo_fixture, live, range(30, 31))
    assert [(a.kind, a.step) for a in watcher.poll()] == [("risk", 30)]
    fresh = RunWatcher(live, CPU, recent=3)
    fresh.poll()
    state, expected = watcher.state(), fresh.state()
    assert state.steps == 40 and watcher.replaced == 0
    assert sorted(state.alerts, key=lambda a: a.step) == expected.alerts
    assert {**state.to_dict(), "alerts": []} == {**expected.to_dict(), "alerts": []}
    assert watcher.poll() == []


@pytest.mark.parametrize("mode", [["--once"], ["--until-idle", "0", "--interval", "0.01"]])
def test_a_run_whose_every_step_is_torn_names_them_beside_its_error(grpo_fixture, tmp_path, mode):
    """No step of the run can be read: exit 3, and a warning line before the error says why
    (the torn files), as check and diff say. The error came alone ('the run has no readable
    step yet'), which read as if no step had landed."""
    run = tmp_path / "torn"
    run.mkdir()
    _land_manifest(grpo_fixture, run)
    _land(grpo_fixture, run, range(3))
    for path in (run / "steps").iterdir():
        path.write_bytes(path.read_bytes()[:500])
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "recording_closed": True}))
    done = CliRunner().invoke(app, ["watch", str(run), *mode, "--device", "cpu"])
    assert done.exit_code == 3, done.stderr  # in a real process: test_exit_codes_in_a_real_process
    lines = [line for line in done.stderr.splitlines() if line.startswith(("warning", "error"))]
    assert len(lines) == 2, done.stderr
    assert lines[0].startswith(
        f"warning: skipped 3 unreadable steps of {run} (steps 0..2 (3 steps): torn"
    )
    assert lines[1].startswith(f"error: {run}: ")


def test_a_late_step_first_listed_half_copied_is_read_once_complete(grpo_fixture, tmp_path):
    """A step that lands below the last one read by a copy that writes it in place (`cp`, a
    sync without temporary names) is listed half written, skipped as damaged by the poll that
    reads the run again, and complete at the next: it is read then, as a fresh watch reads
    it. It was not new to the listing any more, so it was never read: 39 of 40 steps, no risk
    alert at step 30. A step that stays damaged reads the run again no more."""
    live = _landed_but(grpo_fixture, tmp_path / "live", 30)
    watcher = RunWatcher(live, CPU, recent=3)
    assert [(a.kind, a.step) for a in watcher.poll()] == [("risk", 29), ("risk", 31)]
    name = "step-00000030.safetensors"
    data = (grpo_fixture / "steps" / name).read_bytes()
    (live / "steps" / name).write_bytes(data[: len(data) // 2])  # the copy under way
    assert watcher.poll() == [] and watcher.state().steps == 39
    (live / "steps" / name).write_bytes(data)  # the copy done
    assert [(a.kind, a.step) for a in watcher.poll()] == [("risk", 30)]
    fresh = RunWatcher(live, CPU, recent=3)
    fresh.poll()
    state, expected = watcher.state(), fresh.state()
    assert state.steps == 40 and watcher.replaced == 0
    assert {**state.to_dict(), "alerts": []} == {**expected.to_dict(), "alerts": []}
    torn = _landed_but(grpo_fixture, tmp_path / "torn", 3)
    stays = RunWatcher(torn, CPU, recent=3)
    stays.poll()
    name = "step-00000003.safetensors"
    (torn / "steps" / name).write_bytes((grpo_fixture / "steps" / name).read_bytes()[:100])
    stays.poll()
    opened = stays.replay
    stays.poll()
    assert stays.replay is opened and stays.state().steps == 39  # not read again


def test_once_names_the_rank_behind_and_how_far_each_rank_got(tmp_path):
    """A 2-rank run whose rank 1 stopped writing at step 2 (rank 0 at 19): `watch --once`
    said only "steps: 3 (last 2)", as a run that stopped at step 2 would. It now names rank
    1 and how far each rank got, in the view and in the JSON."""
    run = _two_rank_run(tmp_path / "run", {0: range(20), 1: range(3)})
    code, data, _ = _once(run)
    assert code == 0 and data["steps"] == 3
    assert data["ranks"] == [
        {"rank": 0, "step_files": 20, "last_step": 19},
        {"rank": 1, "step_files": 3, "last_step": 2},
    ]
    assert data["ranks_behind"] == [1]
    shown = CliRunner().invoke(app, ["watch", str(run), "--once", "--device", "cpu"])
    assert shown.exit_code == 0, shown.output
    assert "ranks: 2, rank 0 at step 19; behind: rank 1 at step 2" in shown.stdout.splitlines()
    whole = _two_rank_run(tmp_path / "whole", {0: range(4), 1: range(4)})
    code, data, _ = _once(whole)
    assert data["ranks_behind"] == [] and data["ranks"][1]["last_step"] == 3
    shown = CliRunner().invoke(app, ["watch", str(whole), "--once", "--device", "cpu"])
    assert "ranks: 2, each at step 3" in shown.stdout.splitlines()


def test_a_rank_that_wrote_nothing_is_named_beside_the_error(tmp_path):
    """Rank 1 silent from the start: no step is whole. The error said only that the run had no
    readable step yet; it now says which rank wrote nothing."""
    run = _two_rank_run(tmp_path / "run", {0: range(5)})
    for args in (["--once"], ["--until-idle", "0", "--interval", "0.01"]):
        result = CliRunner().invoke(app, ["watch", str(run), *args, "--device", "cpu"])
        assert result.exit_code == 3, result.output
        error = result.stderr.splitlines()[-1]
        assert error.endswith("(ranks: 2, rank 0 at step 4; behind: rank 1 wrote no step file)")


def test_ranks_behind_at_one_step_share_a_name_and_the_line_is_bounded(tmp_path):
    """A run of 16 ranks, 15 of them behind: ranks in a row at one step are named together
    (`ranks 1..4`), and past five such names the rest are counted, so the line stays short
    whatever the world size."""
    world = 16
    last = {0: 3, **{r: 1 for r in range(1, 5)}, 5: 0, 6: 2, 7: 0, 8: 2, 9: 0}
    for rank in range(world):
        with Recorder(tmp_path / "run", policy=None, world_size=world, rank=rank) as rec:
            for n in range(last.get(rank, 0) + 1):
                _scalar_step(rec, n)
    shown = CliRunner().invoke(app, ["watch", str(tmp_path / "run"), "--once"])
    assert shown.exit_code == 0, shown.output
    line = next(line for line in shown.stdout.splitlines() if line.startswith("ranks:"))
    assert line == (
        "ranks: 16, rank 0 at step 3; behind: ranks 1..4 at step 1, rank 5 at step 0, rank 6 "
        "at step 2, rank 7 at step 0, rank 8 at step 2 (+7 more ranks)"
    )


def test_rank_progress_parses_only_the_names_new_to_the_folder(tmp_path, monkeypatch):
    """How far each rank got is counted as file names land: a poll parses only the names new
    since the last one (a run of 20,000 steps of 8 ranks holds 160,000 names), and a name gone
    (a rank's files removed by its relaunch) has the folder counted again."""
    parsed: list[str] = []
    parse = rank_files.canonical_step

    def counted(name: str) -> tuple[int, int] | None:
        parsed.append(name)
        return parse(name)

    monkeypatch.setattr(rank_files, "canonical_step", counted)
    run = _two_rank_run(tmp_path / "run", {0: range(6), 1: range(4)})
    watcher = RunWatcher(run, CPU)
    watcher.poll()
    assert watcher.state().ranks_behind == [1] and len(parsed) == 10
    parsed.clear()
    watcher.poll()
    assert watcher.state().ranks_behind == [1] and parsed == []
    _two_rank_run(run, {1: range(4, 6)}, resume=True)
    watcher.poll()
    assert watcher.state().steps == 6
    assert sorted(parsed) == [f"step-{n:08d}.rank-0001.safetensors" for n in (4, 5)]
    assert watcher.state().ranks_behind == [] and len(parsed) == 2
    for name in ("step-00000005.rank-0001.safetensors", "step-00000004.rank-0001.safetensors"):
        (run / "steps" / name).unlink()
    state = watcher.state()
    assert state.ranks_behind == [1] and state.ranks[1].step_files == 4


def test_once_names_consecutive_damaged_steps_as_one_range(tmp_path):
    """50 torn step files in a row (steps 40..89 of 100): the warning named the first three
    one by one ("step 40: torn: ...; step 41: torn: ...; step 42: torn: ...; ...") and never
    said where the damage ends; it names them as inspect's table rows them."""
    run = tmp_path / "run"
    _norms_run(run, range(100), 1.0)
    for n in range(40, 90):
        victim = run / "steps" / f"step-{n:08d}.safetensors"
        victim.write_bytes(victim.read_bytes()[:60])
    code, data, stderr = _once(run)
    assert code == 0 and data["steps"] == 50
    warning = [line for line in stderr.splitlines() if line.startswith("warning: skipped")]
    assert len(warning) == 1 and warning[0].startswith(
        f"warning: skipped 50 unreadable steps of {run} (steps 40..89 (50 steps): torn: header "
        "cut at 60 of "
    ), warning


def test_a_watch_that_ends_names_the_damaged_steps_before_its_gates(tmp_path):
    """A closed run whose steps 4..5 are torn: `--once` named them, the live watch that ended
    on the closed recording (then evaluated the same gates over the same steps) said nothing,
    so a CI job's `watch --until-idle ... --max-spikes 0` passed over skipped steps silently.
    A watch that ends names them, as --once does, before its gates' lines."""
    run = tmp_path / "run"
    _norms_run(run, range(10), 1.0)
    for n in (4, 5):
        victim = run / "steps" / f"step-{n:08d}.safetensors"
        victim.write_bytes(victim.read_bytes()[:60])
    result = CliRunner().invoke(app, ["watch", str(run), "--interval", "0.01", "--max-spikes", "9"])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    warning = [n for n, line in enumerate(lines) if line.startswith("warning: skipped 2 unre")]
    assert len(warning) == 1 and "(steps 4..5 (2 steps): torn: " in lines[warning[0]], lines
    assert lines[warning[0] - 1] == "the recording closed: stopped (8 steps seen)"
    assert lines[warning[0] + 1] == "gates passed: 1 gate holds"


def test_the_live_view_keeps_the_newest_steps_on_a_short_terminal(tmp_path, monkeypatch):
    """A terminal shorter than the view (15 rows; 20 lines: 8 of state, the table's header and
    its last 10 steps): rich cropped the view at the bottom, where the newest steps are, so
    the live watch showed steps 10..14 and '...', never step 19. The table now keeps the last
    steps that fit; the view printed when the watch stops has them all."""
    import io
    import re

    from stabledrl_cli.cli import _output, _watch_loop

    live = tmp_path / "live"
    recorder = Recorder(live, policy=None)  # open: the watch goes on
    for n in range(20):
        _scalar_step(recorder, n)
    screen = io.StringIO()
    console = _output._LineConsole(
        file=screen, force_terminal=True, width=80, height=15, soft_wrap=True, markup=False
    )
    monkeypatch.setattr(_watch_loop, "err", console)
    drawn: list[str] = []

    def between_polls(seconds: float) -> None:
        drawn.append(re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue()))
        raise KeyboardInterrupt

    monkeypatch.setattr("stabledrl_cli.cli._watch_loop.time.sleep", between_polls)
    result = CliRunner().invoke(app, ["watch", str(live), "--interval", "0.01"])
    assert result.exit_code == 130, result.output
    # the view as last drawn before the first wait: an alert printed above the live view (NaN
    # at step 12) has it drawn again below, so the screen holds it more than once
    view = drawn[0][drawn[0].rindex("stabledrl watch") :]
    rows = [line.split()[0] for line in view.splitlines() if "│" in line]
    assert rows[-1] == "19" and "..." not in view, view
    assert 0 < len(rows) < 10
    final = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())[len(drawn[0]) :]
    assert [line.split()[0] for line in final.splitlines() if "│" in line] == [
        str(n) for n in range(10, 20)
    ], final
    recorder.close()


def test_the_live_view_wraps_a_line_wider_than_the_terminal(grpo_fixture, tmp_path, monkeypatch):
    """On an 80-column terminal the live view cut each line at the 80th column: 10 steps of
    a run, and the drift line read `drift steps: none (not judged: the drift rule judges a
    step after 50 finite net_`, the rest of why lost (the console soft-wraps, so rich's live
    display crops). Its lines now wrap, as --once's do."""
    import io
    import re

    from stabledrl_cli.cli import _output, _watch_loop

    live = tmp_path / "live"
    live.mkdir()
    _land_manifest(grpo_fixture, live)
    _land(grpo_fixture, live, range(10))
    screen = io.StringIO()
    console = _output._LineConsole(
        file=screen, force_terminal=True, width=80, height=40, soft_wrap=True, markup=False
    )
    monkeypatch.setattr(_watch_loop, "err", console)

    def between_polls(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("stabledrl_cli.cli._watch_loop.time.sleep", between_polls)
    result = CliRunner().invoke(app, ["watch", str(live), "--interval", "0.01", "--device", "cpu"])
    assert result.exit_code == 130, result.output
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert max(len(line) for line in drawn.splitlines()) <= 80
    words = " ".join(drawn.split())
    assert "net_push values in a row, and the run has 10 steps)" in words, drawn


def test_a_reward_of_minus_infinity_leaves_the_collapse_judged(tmp_path, recwarn):
    """A run whose reward falls from 1 to 0 at step 40 and that once recorded a reward of
    -inf (a reward function's score for an invalid completion): the floor of the collapse
    rule was that -inf, every level inf - inf or inf, so the rule found no collapse however
    the reward fell ('reward collapse: none': no alert, --fail-on-collapse passed) and numpy's
    'RuntimeWarning: invalid value encountered in subtract' was printed on stderr. The floor
    is the lowest finite reward; the -inf makes its own windows NaN, as a NaN does."""
    rng = np.random.default_rng(0)
    rewards = np.concatenate([np.full(40, 1.0), np.full(40, 0.0)]) + rng.normal(0, 0.01, 80)
    found = {}
    for bad in (None, 75):
        run = tmp_path / f"run-{bad}"
        with Recorder(run, policy=None) as recorder:
            for n, reward in enumerate(rewards):
                recorder.log_step(n, reward_mean=-math.inf if n == bad else reward)
        code, data, _ = _once(run, "--fail-on-collapse")
        found[bad] = (code, data["first_reward_collapse"])
    assert found[75] == found[None] == (1, 45)
    assert [str(w.message) for w in recwarn if w.category is RuntimeWarning] == []


@pytest.mark.skipif(bool(__import__("torch").cuda.is_available()), reason="needs no CUDA device")
def test_a_device_torch_does_not_see_is_refused_before_the_watch_waits(tmp_path):
    """`watch RUN --device cuda` on a machine without CUDA, started before the training (its
    run not there yet): the device was checked only when the run's first step was replayed,
    so the watch waited (for hours, beside a real training) and then failed, exit 2; with
    --until-idle it ended 'no step landed', exit 3. It is refused at once, exit 2."""
    args = ["watch", str(tmp_path / "later"), "--device", "cuda", "--until-idle", "0"]
    result = CliRunner().invoke(app, [*args, "--interval", "0.01"])
    assert result.exit_code == 2, result.output
    assert result.stderr == "error: device 'cuda' was asked for, but torch sees no CUDA device\n"


def test_a_policy_gate_on_a_run_with_no_policy_is_refused_when_the_run_is_read(
    tmp_path, monkeypatch
):
    """`watch RUN --max-collapsed 0` on a live run that names no policy: no step it gains can
    ever be replayed, but the gate was refused only when the watch ended (the recording
    closed, --until-idle), hours later beside a real training; here a Ctrl-C at the fourth
    sleep ended it first, exit 130. It is refused at the first poll that reads the manifest,
    exit 2, as at the end. (A run that names a policy but is scalar so far may still gain a
    batch: refused at the end only, as before.)"""
    live = tmp_path / "live"
    recorder = Recorder(live, policy=None)  # open: the watch goes on
    for n in range(3):
        _scalar_step(recorder, n)
    sleeps = {"n": 0}

    def between_polls(seconds: float) -> None:
        sleeps["n"] += 1
        if sleeps["n"] > 3:
            raise KeyboardInterrupt

    monkeypatch.setattr("stabledrl_cli.cli._watch_loop.time.sleep", between_polls)
    result = CliRunner().invoke(app, ["watch", str(live), "--max-collapsed", "0"])
    assert result.exit_code == 2 and sleeps["n"] == 0, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"error: {live}: --max-collapsed need(s) the own policy replayed, and the run names no "
        "policy; gate it with --max-spikes, --max-nonfinite or --fail-on-collapse"
    )
    recorder.close()


def test_a_run_under_a_file_is_refused_not_waited_for(tmp_path):
    """`watch notes.txt/run`: no run can ever appear under a regular file, yet the live watch
    waited for its manifest until killed (`--once` said 'no such run', exit 3). It is refused
    at once, as `--once` refuses it."""
    (tmp_path / "notes.txt").write_text("x")
    run = tmp_path / "notes.txt" / "run"
    result = CliRunner().invoke(app, ["watch", str(run), "--until-idle", "30"])
    assert result.exit_code == 3, result.output
    assert result.stderr.splitlines()[-1] == f"error: no such run: {run}"
