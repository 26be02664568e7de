"""`--engine processes`: the run's shards computed by worker processes of this machine, joined
into exactly the JSON of a local replay (docs/scaling.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from _corpus import bad_seq_id, tiny_run
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import open_run
from stabledrl_cli.replay import process_engine
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.engine import replay_run
from stabledrl_cli.replay.process_engine import ProcessEngine

runner = CliRunner()


def test_a_replay_on_worker_processes_is_the_local_one_byte_for_byte(grpo_fixture):
    config = ReplayConfig(device="cpu", chunk_size=8)
    local = replay_run(open_run(grpo_fixture), ["grpo", "stabledrl"], config=config)
    steps: list[int] = []
    shared = replay_run(
        open_run(grpo_fixture),
        ["grpo", "stabledrl"],
        config=config,
        engine=ProcessEngine(workers=2),
        progress=steps.append,
    )
    assert shared.to_json() == local.to_json()
    assert sum(steps) == local.steps and len(steps) == 8  # 4 shards a worker, as each ended


def test_a_bad_step_is_skipped_and_named_as_locally(tmp_path):
    run = bad_seq_id(tiny_run(tmp_path / "run", steps=6), 2)
    local = runner.invoke(app, ["replay", str(run), "-f", "json", "--device", "cpu"])
    shared = runner.invoke(
        app,
        ["replay", str(run), "-f", "json", "--device", "cpu", "--engine", "processes",
         "--workers", "2"],
    )  # fmt: skip
    assert shared.exit_code == local.exit_code == 0, shared.stderr
    assert json.loads(shared.stdout) == json.loads(local.stdout)
    assert shared.stderr.replace("\r", "").count("step 2:") == 1


def test_workers_and_engines_are_checked_in_one_line(tmp_path):
    run = tiny_run(tmp_path / "run", steps=3)
    cases = [
        (["--workers", "0", "--engine", "processes"], "error: --workers must be an integer >= 1"),
        (["--workers", "2"], "error: --workers needs --engine processes or ray"),
        (
            ["--engine", "processes", "--ray-address", "h:1"],
            "error: --ray-address needs --engine ray",
        ),
    ]
    for options, line in cases:
        done = subprocess.run(
            [sys.executable, "-m", "stabledrl_cli", "replay", str(run), *options],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 2 and done.stderr.strip() == line, done.stderr


def _dies(task: object) -> None:
    os._exit(9)  # a worker killed mid-shard (out of memory, say)


def test_a_worker_that_dies_ends_the_replay_naming_it(grpo_fixture, monkeypatch):
    monkeypatch.setattr(process_engine, "stream_shard", _dies)  # forked workers inherit it
    with pytest.raises(RuntimeError, match="a replay worker process died"):
        replay_run(
            open_run(grpo_fixture),
            ["grpo"],
            config=ReplayConfig(device="cpu"),
            engine=ProcessEngine(workers=2),
        )
