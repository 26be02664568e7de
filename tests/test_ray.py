"""`replay --engine ray`: steps sharded across the workers of a local Ray cluster (2 CPUs, one
cluster for the module: Ray starts slowly) give the local replay's JSON byte for byte, and a
worker that dies mid-shard costs a retry of its shard, never a lost or doubled step.

Without ray installed, the cluster tests skip (saying so); the missing-extra ones still run.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from _corpus import seq_id_past_int32, tiny_run
from _fsspec_runs import answering
from typer.testing import CliRunner, Result

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import open_run
from stabledrl_cli.errors import (
    ConfigError,
    InputError,
    UsageError,
    WorkerDiedError,
    install_command,
)
from stabledrl_cli.replay import ray_engine
from stabledrl_cli.replay.config import replay_config
from stabledrl_cli.replay.engine import replay, replay_run
from stabledrl_cli.replay.engines import named_engine
from stabledrl_cli.replay.process_engine import ProcessEngine
from stabledrl_cli.replay.ray_engine import RayEngine
from stabledrl_cli.replay.shards import ShardTask, plan_shards, stream_shard

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
NO_RAY = "ray is not installed (pip install -e '.[ray]'): the Ray engine's tests need it"


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster of 2 CPUs for the module's tests."""
    ray = pytest.importorskip("ray", reason=NO_RAY)
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


def synthetic_run(path: Path, *, steps: int = 23) -> Path:
    """A 2-rank token run with sketches on every third step, a NaN step, noise-floor steps
    (inner_step 0) every other step, and step 9's data corrupted (skipped by the reader)."""
    rng = np.random.default_rng(7)
    for rank in range(2):
        with sd.Recorder(
            path, policy="grpo", reward_range=(0.0, 1.0), world_size=2, rank=rank
        ) as rec:
            for step in range(steps):
                logp = -rng.random((4, 5)).astype(np.float32) * 3
                logp_old = logp + rng.normal(scale=0.2, size=(4, 5)).astype(np.float32)
                if step == 12 and rank == 1:
                    logp[1, 2] = np.nan
                extra = {}
                if step % 3 == 0:
                    extra["unit_grad_sketch"] = rng.normal(size=(20, 8)).astype(np.float32)
                rec.log_step(
                    step,
                    logp=logp,
                    logp_old=logp_old,
                    advantages=rng.standard_normal(4).astype(np.float32),
                    mask=(rng.random((4, 5)) > 0.2),
                    group_id=np.array([0, 0, 1, 1]),
                    reward=rng.random(4).astype(np.float32),
                    grad_norm=1.0 + step % 5,
                    loss=0.1 * step,
                    inner_step=step % 2,
                    **extra,
                )
    victim = path / "steps" / "step-00000009.rank-0000.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return synthetic_run(tmp_path_factory.mktemp("ray") / "run")


def test_plan_shards_are_contiguous_whole_chunks_covering_each_step_once():
    numbers = [0, 1, 2, 4, 5, 8, 9, 10, 11, 15]
    shards = plan_shards(numbers, 3, chunk_size=3)
    assert [n for shard in shards for n in shard] == numbers
    assert len(shards) == 3
    for shard in shards[:-1]:
        assert len(shard) % 3 == 0
    assert plan_shards(numbers, 50, chunk_size=4) == [(0, 1, 2, 4), (5, 8, 9, 10), (11, 15)]
    assert plan_shards([], 4, chunk_size=2) == []


def test_fixture_replay_is_the_local_json_byte_for_byte(cluster, grpo_fixture, grpo_fixture_replay):
    sharded = replay(grpo_fixture, ["grpo", "stabledrl"], device="cpu", engine=RayEngine(workers=2))
    assert sharded.to_json() == grpo_fixture_replay.to_json()


def test_synthetic_replay_is_the_local_json_byte_for_byte(cluster, synthetic):
    settings = {"device": "cpu", "chunk_size": 2, "detail": True}
    local = replay(synthetic, **settings)
    sharded = replay(synthetic, **settings, engine=RayEngine(workers=2))
    assert local.steps == 22 and len(local.skipped) == 1  # step 9 skipped, alike
    assert len(plan_shards(open_run(synthetic).step_numbers, 8, 2)) == 8  # more shards than CPUs
    assert sharded.to_json() == local.to_json()
    assert sharded.skipped == local.skipped
    assert local.observed.noise_floor_units > 0 and local.observed.nonfinite_steps == [12]


@pytest.fixture(scope="module")
def synthetic_bad_data(tmp_path_factory) -> Path:
    """The synthetic run with step 15's data bad too (rank 0's first seq_id past int32, the
    file well-formed): a replay skips it as it skips step 9."""
    path = synthetic_run(tmp_path_factory.mktemp("ray-bad") / "run")
    seq_id_past_int32(path / "steps" / "step-00000015.rank-0000.safetensors")
    return path


def test_a_step_of_bad_data_is_skipped_alike_by_both_engines(cluster, synthetic_bad_data):
    settings = {"device": "cpu", "chunk_size": 2, "detail": True}
    local = replay(synthetic_bad_data, **settings)
    sharded = replay(synthetic_bad_data, **settings, engine=RayEngine(workers=2))
    assert local.steps == 21  # steps 9 (unreadable) and 15 (bad data) skipped
    assert len(local.skipped) == 2 and local.skipped[1].startswith("step 15: ")
    assert "cannot join the ranks' seq_id: rank 0's lie in [0, 2147483647]" in local.skipped[1]
    assert sharded.skipped == local.skipped
    assert sharded.to_json() == local.to_json()
    args = ["replay", str(synthetic_bad_data), "-p", "grpo", "--format", "json", "--device", "cpu"]
    cli_local = runner.invoke(app, args)
    cli_sharded = runner.invoke(app, [*args, "--engine", "ray", "--workers", "2"])
    assert cli_local.exit_code == cli_sharded.exit_code == 0, cli_sharded.output
    assert cli_sharded.stdout == cli_local.stdout
    assert json.loads(cli_sharded.stdout)["steps"] == 21
    for done in (cli_local, cli_sharded):
        warning = [line for line in done.stderr.splitlines() if "step 15:" in line]
        assert len(warning) == 1 and "skipped 2 " in warning[0], done.stderr


def test_workers_read_a_run_through_its_url(cluster, synthetic):
    """Each worker opens the run from the driver's URL (fsspec), not from a copy."""
    url = synthetic.absolute().as_uri()
    local = replay(synthetic, ["grpo"], device="cpu", chunk_size=3)
    sharded = replay(url, ["grpo"], device="cpu", chunk_size=3, engine=RayEngine(workers=2))
    assert sharded.run == url
    assert dataclasses.replace(sharded, run=local.run).to_json() == local.to_json()


def test_workers_bounds_the_shards_computed_at_once_on_a_joined_cluster(
    cluster, synthetic, tmp_path
):
    """--workers 1 on a cluster of 2 CPUs (one joined, not started for the replay) computes one
    shard at a time, as the docs and the advice after a worker died (fewer --workers) say.
    Before, every shard was submitted at once and the cluster ran one a CPU."""
    log = tmp_path / "shards"
    log.mkdir()

    def timed(task: ShardTask) -> object:
        start = time.monotonic()
        rows = stream_shard(task)
        time.sleep(0.3)
        (log / f"{start}").write_text(f"{start} {time.monotonic()}")
        return rows

    result = replay(synthetic, ["grpo"], device="cpu", engine=RayEngine(workers=1, shard_fn=timed))
    assert result.to_json() == replay(synthetic, ["grpo"], device="cpu").to_json()
    spans = sorted(tuple(map(float, f.read_text().split())) for f in log.iterdir())
    assert len(spans) == 4
    assert all(end <= later for (_, end), (later, _) in itertools.pairwise(spans)), spans


SLOW_SHARDS = """
import sys, time
from stabledrl_cli.cli.app import main
from stabledrl_cli.replay import ray_engine

READY, computing = sys.argv.pop(1), ray_engine.map_shards


def slow_shards(ray, fn, *args, **kwargs):
    def slow(task):
        open(READY, "w").close()
        time.sleep(120)
        return fn(task)

    return computing(ray, slow, *args, **kwargs)


ray_engine.map_shards = slow_shards
main()
"""


def test_sigterm_stops_the_cluster_and_exits_143(synthetic, tmp_path):
    """SIGTERM while the shards compute: the cluster the replay started is stopped, and the
    command ends with the line and the code of a stop by SIGTERM. Before, Ray's handler aborted
    the process (exit 134, a C++ stack trace on stderr) or exited 1, and left Ray's agent
    processes running."""
    pytest.importorskip("ray", reason=NO_RAY)
    ready = tmp_path / "computing"
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("RAY_ADDRESS", None)
    args = [str(ready), "replay", str(synthetic), "--engine", "ray", "--workers", "1"]
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_SHARDS, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143, err
    assert err.splitlines()[-1] == "stopped by SIGTERM", err
    assert "SIGTERM received" not in err and not out


SIGTERM_AS_RAY_STARTS = """
import signal, sys, ray
from stabledrl_cli.cli.app import main


def starting(*args, **kwargs):
    sys.exit(signal.SIGTERM)  # what Ray's handler does with a SIGTERM while ray.init runs


ray.init = starting
main()
"""


def test_sigterm_while_the_cluster_starts_exits_143(synthetic):
    """Ray's handler, set while ray.init runs, exits with code 15 (sys.exit(SIGTERM)): the
    replay now stops as on a SIGTERM after the start, exit 143 with its line. Before, it
    ended with exit 15, a code docs/exit-codes.md does not have."""
    pytest.importorskip("ray", reason=NO_RAY)
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("RAY_ADDRESS", None)
    args = ["replay", str(synthetic), "--engine", "ray", "--workers", "1"]
    done = subprocess.run(
        [sys.executable, "-c", SIGTERM_AS_RAY_STARTS, *args],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 143, done.stderr
    assert done.stderr == "stopped by SIGTERM\n" and not done.stdout


def test_a_worker_dying_mid_shard_retries_that_shard_only(cluster, synthetic, tmp_path):
    """The worker computing the second shard reads a step of it, then exits: Ray computes
    that shard again; every step is replayed once."""
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    opened = open_run(synthetic)
    listed = opened.step_numbers
    victim = plan_shards(listed, 8, 2)[1][0]

    def dying_shard(task: ShardTask):
        log = attempts / f"shard-{task.steps[0]}"
        first = not log.exists()
        with log.open("a") as fh:
            fh.write(f"{os.getpid()}\n")
        if task.steps[0] == victim and first:
            run = open_run(task.source)
            next(run.steps_of(task.steps))  # mid-shard: a step read, no rows returned
            os._exit(1)
        return stream_shard(task)

    done: list[int] = []
    local = replay(synthetic, ["grpo", "stabledrl"], device="cpu", chunk_size=2)
    config = replay_config(device="cpu", chunk_size=2)
    sharded = replay_run(
        opened,
        ["grpo", "stabledrl"],
        config=config,
        progress=done.append,
        engine=RayEngine(workers=2, shard_fn=dying_shard),
    )
    tries = {log.name: log.read_text().split() for log in attempts.iterdir()}
    assert len(tries) == 8
    retried = tries.pop(f"shard-{victim}")
    assert len(retried) == 2 and retried[0] != retried[1]  # a new worker took it over
    assert all(len(pids) == 1 for pids in tries.values())
    assert sum(done) == len(listed) == 23  # progress counted each shard once
    assert sharded.steps == 22  # step 9 skipped
    assert sharded.to_json() == local.to_json()


def test_a_shard_whose_every_attempt_dies_ends_the_replay_naming_it(
    cluster, synthetic, monkeypatch
):
    """After Ray's retries, exit 71 and a line naming the shard's steps: not exit 70, 'a bug'
    (docs/exit-codes.md). One retry here: each attempt costs a worker started anew."""
    monkeypatch.setattr(ray_engine, "SHARD_RETRIES", 1)
    opened = open_run(synthetic)
    shards = plan_shards(opened.step_numbers, 8, 2)
    victim = shards[1]

    def dying_shard(task: ShardTask):
        if task.steps[0] == victim[0]:
            os._exit(1)  # every attempt: as a shard too large for the worker's memory
        return stream_shard(task)

    with pytest.raises(WorkerDiedError) as died:
        replay_run(
            opened,
            ["grpo"],
            config=replay_config(device="cpu", chunk_size=2),
            engine=RayEngine(workers=2, shard_fn=dying_shard),
        )
    assert died.value.exit_code == 71
    assert str(died.value).startswith(
        f"{synthetic}: a Ray worker died while computing steps {victim[0]}-{victim[-1]} "
        f"(shard 2 of {len(shards)}), after Ray's retries of it (WorkerCrashedError: "
    )
    assert str(died.value).endswith("; replay with fewer --workers or a lower --memory-budget")


def _run_missing_a_field_at(path: Path, missing: int) -> Path:
    """An 8-step run whose step `missing` lacks group_id and reward (adv=center needs them)."""
    with sd.Recorder(path, policy="grpo") as rec:
        for step in range(8):
            extra = {"group_id": np.array([0, 0, 1, 1]), "reward": np.array([1.0, 0, 1, 0])}
            if step == missing:
                extra = {}
            rec.log_step(
                step,
                logp=-np.ones((4, 2), np.float32),
                logp_old=-np.ones((4, 2), np.float32),
                advantages=np.array([1.0, -1.0, 0.5, -0.5], np.float32),
                **extra,
            )
    return path


def test_an_error_in_a_shard_is_the_local_error(cluster, tmp_path):
    """A step deep in the run lacking a field a policy needs: the same InputError as locally."""
    path = _run_missing_a_field_at(tmp_path / "run", 6)
    spec = "grpo:adv=center"
    with pytest.raises(InputError) as local:
        replay(path, [spec], device="cpu", chunk_size=2)
    with pytest.raises(InputError) as sharded:
        replay(path, [spec], device="cpu", chunk_size=2, engine=RayEngine(workers=2))
    assert str(sharded.value) == str(local.value)
    assert "step 6 has no" in str(local.value)


def test_cli_engine_ray_prints_the_local_json(cluster, synthetic):
    args = ["replay", str(synthetic), "-p", "grpo", "--format", "json", "--device", "cpu"]
    local = runner.invoke(app, [*args, "--chunk-size", "3"])
    sharded = runner.invoke(app, [*args, "--chunk-size", "3", "--engine", "ray", "--workers", "2"])
    assert local.exit_code == 0 and sharded.exit_code == 0, sharded.output
    assert sharded.stdout == local.stdout
    assert json.loads(sharded.stdout)["steps"] == 22


def test_tune_engine_ray_gives_the_local_json(cluster):
    """tune's settings sharded over the module's cluster: the local tune's JSON."""
    args = ["tune", str(REPO / "fixtures" / "stabledrl"), "-p", "stabledrl:c=2..8:log3",
            "--device", "cpu", "--format", "json"]  # fmt: skip
    local = runner.invoke(app, args)
    sharded = runner.invoke(app, [*args, "--engine", "ray", "--workers", "2"])
    assert local.exit_code == 0 and sharded.exit_code == 0, sharded.output
    assert json.loads(sharded.stdout) == json.loads(local.stdout)


def test_workers_without_engine_ray_is_a_usage_error(tmp_path):
    result = runner.invoke(app, ["replay", str(tmp_path), "--workers", "2"])
    assert result.exit_code == 2
    assert "--workers needs --engine processes or ray" in result.stderr


def test_engine_ray_without_ray_says_how_to_install_it_exit_2(synthetic):
    """A real process in which `import ray` fails: one stderr line with the install command."""
    code = (
        "import sys; sys.modules['ray'] = None; "
        "from stabledrl_cli.cli.app import main; "
        f"sys.argv = ['stabledrl', 'replay', {str(synthetic)!r}, '--engine', 'ray']; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and install_command("ray") in lines[0], done.stderr
    assert done.stdout == ""


def test_check_engine_ray_is_the_local_check(cluster, synthetic, tmp_path, monkeypatch):
    """`check --engine ray` gates the replay its workers computed (each shard leaves a mark):
    the local check's JSON and exit code."""
    marks = tmp_path / "shards"
    marks.mkdir()

    computing = ray_engine.map_shards

    def marked_shards(ray, fn, *args, **kwargs):
        def marked_shard(task: ShardTask):
            (marks / f"shard-{task.steps[0]}").touch()
            return fn(task)

        return computing(ray, marked_shard, *args, **kwargs)

    monkeypatch.setattr(ray_engine, "map_shards", marked_shards)
    args = ["check", str(synthetic), "-p", "grpo", "-p", "stabledrl", "--device", "cpu"]
    args += ["--max-nonfinite", "0", "--max-discard-frac", "0.5", "--format", "json"]
    local = runner.invoke(app, args)
    assert not any(marks.iterdir())
    sharded = runner.invoke(app, [*args, "--engine", "ray", "--workers", "2"])
    assert len(list(marks.iterdir())) >= 2
    assert local.exit_code == sharded.exit_code == 1, sharded.output  # step 12 is non-finite
    assert sharded.stdout == local.stdout
    data = json.loads(sharded.stdout)
    assert data["steps"] == 22 and data["gates_checked"] == 5 and data["tripped"] >= 1


def test_check_workers_without_engine_ray_is_a_usage_error(synthetic):
    result = runner.invoke(app, ["check", str(synthetic), "--max-spikes", "1", "--workers", "2"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --workers needs --engine processes or ray"


ENGINE_COMMANDS = {
    "replay": ["-p", "grpo", "--format", "json"],
    "check": ["-p", "grpo", "--max-nonfinite", "100", "--format", "json"],
    "tune": ["-p", "dapo:eps_high=0.2|0.3", "--format", "json"],
}
"""Each command that takes --engine, with arguments that let it run on a tiny run."""


@pytest.mark.parametrize("command", list(ENGINE_COMMANDS))
def test_ray_address_without_engine_ray_is_a_usage_error(tmp_path, command):
    """An explicit --ray-address with the local engine is refused, one line, before the run is
    read; RAY_ADDRESS in the environment alone (exported for every command) is not."""
    run = tiny_run(tmp_path / "run")
    args = [command, str(run), "--device", "cpu", *ENGINE_COMMANDS[command]]
    explicit = runner.invoke(app, [*args, "--ray-address", "10.0.0.5:6379"])
    assert explicit.exit_code == 2, explicit.output
    assert explicit.stderr == "error: --ray-address needs --engine ray\n"
    assert explicit.stdout == ""
    exported = runner.invoke(app, args, env={"RAY_ADDRESS": "10.0.0.5:6379"})
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)


@pytest.mark.parametrize("command", list(ENGINE_COMMANDS))
def test_an_empty_ray_address_is_a_usage_error(tmp_path, command):
    """`--ray-address "$HEAD"` with HEAD unset: refused before a cluster starts. Before, it
    was read as no address and the replay ran on a local cluster started for it, exit 0."""
    pytest.importorskip("ray", reason=NO_RAY)
    run = tiny_run(tmp_path / "run")
    args = [command, str(run), "--device", "cpu", *ENGINE_COMMANDS[command], "--engine", "ray"]
    result = runner.invoke(app, [*args, "--workers", "1", "--ray-address", ""])
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        "error: --ray-address is empty: give the cluster's address (host:6379, or auto), or "
        "leave the option out for a local cluster started for this run\n"
    )
    assert result.stdout == ""


def _replay_in_a_process(args: list[str]) -> subprocess.CompletedProcess[str]:
    """`stabledrl replay ARGS` in a process of its own, RAY_ADDRESS unset."""
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "stabledrl_cli", "replay", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )


def _replay_refused_before_ray_starts(
    monkeypatch: pytest.MonkeyPatch, args: list[str], address: str | None = None
) -> Result:
    """`stabledrl replay ARGS` in this process as in one with no cluster yet (the module's may
    run), with `address` as RAY_ADDRESS; asserts that Ray was never started or joined."""
    ray = pytest.importorskip("ray", reason=NO_RAY)
    starts: list[object] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: starts.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if address is not None:
        monkeypatch.setenv("RAY_ADDRESS", address)
    result = runner.invoke(app, ["replay", *args])
    assert starts == [], result.output
    return result


def test_a_local_cluster_of_more_workers_than_cpus_is_refused(synthetic, monkeypatch):
    """Not a cluster of a process a worker on a 2-core machine: one line naming --workers as
    the command spells it, exit 2, no cluster."""
    workers = len(os.sched_getaffinity(0)) + 1
    args = [str(synthetic), "--engine", "ray", "--workers", str(workers)]
    done = _replay_refused_before_ray_starts(monkeypatch, args)
    assert done.exit_code == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: --workers {workers}: a local Ray cluster runs one worker a CPU and this process "
        f"may use {workers - 1}; join a larger cluster with --ray-address (or RAY_ADDRESS)"
    ]


@pytest.mark.parametrize(("usable", "workers", "expected"), [({0}, None, 1), ({0, 1}, 2, 2)])
def test_a_local_cluster_has_the_cpus_this_process_may_use(monkeypatch, usable, workers, expected):
    """A local cluster was sized from the machine's CPUs (os.cpu_count): under `taskset -c 0`, a
    Slurm job's or a container's cpuset, a Ray worker a CPU of the machine on one CPU. Now from
    the CPUs this process may use (its affinity)."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: usable, raising=False)
    assert ray_engine._local_workers(workers) == expected


def test_more_workers_than_this_process_may_use_are_refused(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    with pytest.raises(ConfigError, match="this process may use 1;"):
        ray_engine._local_workers(2)


def test_an_address_that_refuses_is_a_usage_error(synthetic):
    """Ray would retry it for minutes; the driver asks the address first. In a real process:
    the exit code of a refused cluster as a shell sees it."""
    pytest.importorskip("ray", reason=NO_RAY)
    args = [str(synthetic), "--engine", "ray", "--ray-address", "127.0.0.1:1"]
    done = _replay_in_a_process(args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: cannot join the Ray cluster at 127.0.0.1:1: "
    ), done.stderr


@pytest.fixture
def http_port() -> Iterator[int]:
    """The port of an HTTP server (as the dashboard's 8265 is), serving on a thread."""
    with answering(404) as url:
        yield int(url.rpartition(":")[2])


def test_an_address_that_answers_as_another_server_is_a_usage_error(
    synthetic, http_port, monkeypatch
):
    """RAY_ADDRESS at the dashboard's HTTP port (or any server but Ray's) accepts the connection:
    Ray then waited on it for more than 5 minutes, printing a log line every few seconds."""
    address = f"127.0.0.1:{http_port}"
    args = [str(synthetic), "--engine", "ray"]
    done = _replay_refused_before_ray_starts(monkeypatch, args, address=address)
    assert done.exit_code == 2, done.stderr
    assert done.stderr == (
        f"error: cannot join the Ray cluster at {address}: it answers, but not as Ray does "
        f"(gRPC); {ray_engine._RAY_PORTS}\n"
    )


def test_an_address_that_never_answers_is_refused_after_join_seconds(monkeypatch):
    """A port that accepts and stays silent (a hung server) is refused once JOIN_SECONDS pass."""
    monkeypatch.setattr(ray_engine, "JOIN_SECONDS", 0.2)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(UsageError, match="it accepts a connection but gave no answer within"):
            ray_engine._require_reachable(address)


def test_a_cluster_address_passes_the_check(cluster):
    """The check lets a Ray cluster's own address (its GCS, a gRPC server) through."""
    ray_engine._require_reachable(cluster.get_runtime_context().gcs_address)


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1:99999", "Port out of range 0-65535"),
        ("localhost:-5", "Port could not be cast to integer value as '-5'"),
        ("ray://127.0.0.1:70000", "Port out of range 0-65535"),
        ("[::1", "Invalid IPv6 URL"),
    ],
)
def test_an_address_of_no_port_is_a_usage_error(synthetic, address, why, monkeypatch):
    """Ray waits on a port out of range for minutes, and an unclosed IPv6 bracket was exit 70."""
    args = [str(synthetic), "--engine", "ray", "--ray-address", address]
    done = _replay_refused_before_ray_starts(monkeypatch, args)
    assert done.exit_code == 2, done.stderr
    assert done.stderr == f"error: cannot join the Ray cluster at {address}: {why}\n"


def test_a_memory_run_is_refused_before_a_cluster_starts(synthetic):
    """memory:// lives in the driver's process: its workers could not read it."""
    ray = pytest.importorskip("ray", reason=NO_RAY)
    from _fsspec_runs import to_memory

    url = to_memory(synthetic)
    started = ray.is_initialized()
    with pytest.raises(UsageError, match="a memory:// run lives in this process only"):
        replay(open_run(url), ["grpo"], device="cpu", engine=RayEngine(workers=1))
    assert ray.is_initialized() == started


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is of cuda where torch has none")
def test_cuda_without_a_gpu_is_refused_before_a_local_cluster_starts(synthetic, monkeypatch):
    """A new local cluster's node is this one: `--device cuda` where torch sees no GPU is the
    local replay's usage error, before Ray starts (it took ~10 s to start, then refuse)."""
    args = [str(synthetic), "--engine", "ray", "--workers", "1", "--device", "cuda"]
    result = _replay_refused_before_ray_starts(monkeypatch, args)
    assert result.exit_code == 2, result.stderr
    assert result.stderr == "error: device 'cuda' was asked for, but torch sees no CUDA device\n"


def test_the_api_takes_an_engine_by_its_cli_name(synthetic):
    """`replay(..., engine="local")` is the default replay; "ray" is a `RayEngine()`."""
    local = replay(synthetic, ["grpo"], device="cpu")
    assert replay(synthetic, ["grpo"], device="cpu", engine="local").to_json() == local.to_json()
    assert isinstance(named_engine("ray"), RayEngine)
    assert isinstance(named_engine("processes"), ProcessEngine)
    with pytest.raises(
        UsageError, match="engine must be 'local', 'processes', 'ray' or an engine object"
    ):
        replay(synthetic, ["grpo"], device="cpu", engine="dask")  # type: ignore[arg-type]


def test_a_local_cluster_that_fails_to_start_is_a_usage_error(synthetic, monkeypatch):
    """Ray raises a bare Exception when its node does not start in time (a raylet killed or
    too slow on a loaded machine): one line, exit 2 as for a cluster that cannot be joined,
    not exit 70's 'internal error ... please report it'."""
    ray = pytest.importorskip("ray", reason=NO_RAY)
    timed_out = "The current node timed out during startup."

    def failing_init(*args: object, **kwargs: object) -> None:
        raise Exception(timed_out)  # Ray's own type for it

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", failing_init)
    result = runner.invoke(app, ["replay", str(synthetic), "--engine", "ray", "--workers", "1"])
    assert result.exit_code == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: cannot start or join the Ray cluster (a new local cluster): {timed_out}"
    ]


REFUSED_TOKEN = """Failed to connect to GCS. Last connection error: \
Traceback (most recent call last):
  File "python/ray/includes/common.pxi", line 119, in ray._raylet.check_status
ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: Authentication token is missing \
or incorrect. Note: RAY_AUTH_MODE is currently 'disabled' (not 'token'). Ensure that the token...
"""
"""The cause of Ray 2.60's ConnectionError when a cluster refuses the driver's token (abridged)."""


def test_a_cluster_that_refuses_the_token_says_so(synthetic, monkeypatch):
    """Joining a cluster of token authentication without the token: the error line says why
    and what the driver needs. Before, it said only `Failed to connect to Ray cluster at ADDR`,
    as for a cluster that is down."""
    ray = pytest.importorskip("ray", reason=NO_RAY)

    def refused(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379") from (
            RuntimeError(REFUSED_TOKEN)
        )

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refused)
    args = ["replay", str(synthetic), "--engine", "ray", "--ray-address", "auto"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: cannot start or join the Ray cluster (auto): Failed to connect to Ray cluster at "
        "10.0.0.5:6379 (AuthenticationError: RPC error: InvalidAuthToken: Authentication token "
        "is missing or incorrect); a cluster that `ray start` started takes a driver with "
        "RAY_AUTH_MODE=token and its token (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or "
        "RAY_AUTH_TOKEN)"
    ]


def test_the_first_failing_shard_in_step_order_is_raised_whichever_ends_first(cluster, tmp_path):
    """Two shards fail, the second first: the first shard's error is raised, as a local replay
    raises its first step's. Before, the first error to arrive was, so the step named could
    change from one run of the same command to the next."""
    marker = tmp_path / "second-failed"

    def shard(task: int):
        if task == 1:
            marker.touch()
            raise InputError("run: step 22 has no 'logp_ref'")
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # the second shard's error reaches the driver first
        raise InputError("run: step 20 has no 'logp_ref'")

    with pytest.raises(InputError) as raised:
        ray_engine.map_shards(cluster, shard, [0, 1], [1, 1], workers=2, location="run")  # type: ignore[arg-type]
    assert str(raised.value) == "run: step 20 has no 'logp_ref'"


def test_a_shard_error_names_the_run_as_given(cluster, tmp_path, monkeypatch):
    """A run given by a relative path: a worker opens it by its absolute path, and its error
    names the run as the local replay's does. Before, the message named the absolute path."""
    _run_missing_a_field_at(tmp_path / "run", 6)
    monkeypatch.chdir(tmp_path)
    spec = "grpo:adv=center"
    with pytest.raises(InputError) as local:
        replay("run", [spec], device="cpu", chunk_size=2)
    with pytest.raises(InputError) as sharded:
        replay("run", [spec], device="cpu", chunk_size=2, engine=RayEngine(workers=2))
    assert str(local.value).startswith("run: step 6 has no")
    assert str(sharded.value) == str(local.value)
