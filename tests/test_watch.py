"""`stabledrl watch`: following a run while it is written.

The runs are the committed grpo fixture (which degrades: risk steps, recorded non-finite
steps, the collapse warning, the reward collapse), landed a few steps at a time, and the same
steps re-recorded by a `Recorder` in a thread while the watch reads them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import fixture_run
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import Recorder, open_run
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.engine import replay_run
from stabledrl_cli.replay.follow import RunWatcher

CPU = ReplayConfig(device="cpu")
ROOT = Path(__file__).resolve().parents[1]


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
    assert state.first_reward_collapse == grpo_replay.observed.first_reward_collapse == 108
    assert [a.step for a in alerts if a.kind == "risk"] == expected.collapsed_steps
    assert [a.step for a in alerts if a.kind == "collapse_warning"] == [60]
    assert [a.step for a in alerts if a.kind == "nonfinite"] == [92, 93, 94, 95]
    assert alerts == state.alerts
    row = state.recent[-1]
    assert row.discard_frac == pytest.approx(grpo_replay.policies[0].series["discard_frac"][-1])
    # Followed a piece at a time, the replay equals one over the whole run.
    assert watcher.replay is not None
    followed, whole = watcher.replay.result().to_dict(), grpo_replay.to_dict()
    assert followed.pop("run") == str(live) and whole.pop("run") == str(grpo_fixture)
    assert json.dumps(followed, sort_keys=True) == json.dumps(whole, sort_keys=True)


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
    step landed for --until-idle seconds, and has raised each alert once."""
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
        ["watch", str(live), "--until-idle", "4", "--interval", "0.05", "--device", "cpu",
         "--max-collapsed", "3"],
    )  # fmt: skip
    thread.join(timeout=60)
    assert "idle for 4 s: stopped (60 steps seen)" in result.stderr
    alerts = [line for line in result.stderr.splitlines() if line.startswith("alert: ")]
    assert alerts[:3] == [f"alert: step {n}: risk: grpo replayed: an update norm spike"
                          for n in (29, 30, 31)]  # fmt: skip
    assert len(alerts) == len(set(alerts))
    assert "alert: step 60: collapse_warning" not in result.stderr  # step 60 never landed
    assert result.exit_code == 1  # 4 risk steps (29, 30, 31, 59) > --max-collapsed 3
    assert "gate tripped: grpo max_collapsed" in result.stderr


def _subprocess(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "stabledrl_cli", "watch", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_exit_codes_in_a_real_process(grpo_fixture, tmp_path):
    tripped = _subprocess(str(grpo_fixture), "--once", "--max-collapsed", "0", "--device", "cpu")
    assert tripped.returncode == 1 and "risk steps: 29, 30, 31" in tripped.stdout
    held = _subprocess(str(grpo_fixture), "--once", "--max-collapsed", "100", "--device", "cpu")
    assert held.returncode == 0 and "gates passed: 1 gate holds" in held.stderr
    missing = _subprocess(str(tmp_path / "nope"), "--once")
    assert missing.returncode == 3 and missing.stderr.count("\n") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _subprocess(str(empty), "--until-idle", "0.2", "--interval", "0.05").returncode == 3
    assert _subprocess(str(grpo_fixture), "-f", "json").returncode == 2
    assert _subprocess(str(grpo_fixture), "--interval", "0").returncode == 2


def test_ctrl_c_stops_the_watch_cleanly(grpo_fixture, monkeypatch):
    """Ctrl-C (KeyboardInterrupt in the poll loop): a last line, exit 130, no traceback."""
    calls = {"n": 0}

    def interrupted(seconds: float) -> None:
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr("stabledrl_cli.cli.watch.time.sleep", interrupted)
    result = CliRunner().invoke(app, ["watch", str(grpo_fixture), "--device", "cpu"])
    assert result.exit_code == 130 and calls["n"] == 1
    assert "stopped (160 steps seen)" in result.stderr and "Traceback" not in result.stderr
