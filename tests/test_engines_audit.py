"""An audit of the engines beyond one process and of runs read at a URL: what each one must
still do when a replay is stopped, a worker fails, or a URL is bad (docs/scaling.md)."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
from _corpus import flip_bit, step_path, tiny_run
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli._url import redacted
from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import open_run
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.engine import resolve_policies
from stabledrl_cli.replay.shards import shard_tasks, stream_shard

runner = CliRunner()
NO_RAY = "ray is not installed (pip install -e '.[ray]'): the Ray engine's tests need it"


@pytest.fixture
def default_ctrl_c():
    """Python's own Ctrl-C handler, whatever the test process was started with (a background
    job's shell starts it with SIGINT ignored, where a Ctrl-C is no Ctrl-C)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _cluster_starting(monkeypatch: pytest.MonkeyPatch, ctrl_c: int) -> list[str]:
    """`ray.init` of a new local cluster that gets `ctrl_c` Ctrl-Cs while its node starts
    (Ray's processes already running, the driver not yet connected) -> what happened to the
    cluster, in order: "started" once init returned, "stopped" at each `ray.shutdown`."""
    ray = pytest.importorskip("ray", reason=NO_RAY)
    happened: list[str] = []

    def init(*args: object, **kwargs: object) -> None:
        for _ in range(ctrl_c):
            signal.raise_signal(signal.SIGINT)
        happened.append("started")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: happened.append("stopped"))
    return happened


def test_ctrl_c_while_a_local_cluster_starts_stops_it_once_started(
    tmp_path, monkeypatch, default_ctrl_c
):
    """Ctrl-C while the replay's local Ray cluster starts: the start is let finish, then the
    cluster is stopped, exit 130. Before, the KeyboardInterrupt cut `ray.init` short with no
    `ray.shutdown`, and each such Ctrl-C left Ray's agent processes (`ray::DashboardAgent`,
    `ray::RuntimeEnvAgent`) running for good (seen: `replay RUN --engine ray`, SIGINT 6 s
    after the start)."""
    run = tiny_run(tmp_path / "run")
    happened = _cluster_starting(monkeypatch, ctrl_c=1)
    result = runner.invoke(app, ["replay", str(run), "--engine", "ray", "--workers", "1"])
    assert result.exit_code == 130, result.stderr
    assert result.stderr.splitlines()[-1] == "error: interrupted"
    assert happened == ["started", "stopped"]
    assert not result.stdout


def test_a_second_ctrl_c_while_the_cluster_starts_stops_at_once(
    tmp_path, monkeypatch, default_ctrl_c
):
    """A second Ctrl-C while the cluster starts stops the replay at once (a start that hangs
    can always be left), and what Ray has started is still asked to stop."""
    run = tiny_run(tmp_path / "run")
    happened = _cluster_starting(monkeypatch, ctrl_c=2)
    result = runner.invoke(app, ["replay", str(run), "--engine", "ray", "--workers", "1"])
    assert result.exit_code == 130, result.stderr
    assert result.stderr.splitlines()[-1] == "error: interrupted"
    assert happened == ["stopped"]


@pytest.mark.parametrize("corrupt", [0, 2])
def test_a_step_of_corrupt_data_is_left_out_of_every_figure_as_the_workers_leave_it(
    tmp_path, corrupt
):
    """A step whose header reads but whose data fails its checksum is skipped by the replay,
    and the recorded grad norms the guards replay leave it out too, the first step as any
    other, as the workers of `--engine processes` and `ray` leave it out. Before, the local
    engine counted the first step's grad norm (zclip and skip-step `steps` 6 of 5 replayed,
    read from its header before the pass), where the other engines gave 5."""
    run = tiny_run(tmp_path / "run", steps=6)
    flip_bit(step_path(run, corrupt), -1)
    result = runner.invoke(
        app, ["replay", str(run), "-p", "grpo", "-f", "json", "--engine", "local"]
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["steps"] == 5
    assert [guard["steps"] for guard in report["guards"]] == [5, 5]


def _replayed_by_each_engine(run, spec: str) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of `replay RUN -p spec -f json` by the local engine and by
    `--engine processes` (whose driver checks the request before its workers start)."""
    results = []
    for engine in ("local", "processes"):
        args = ["replay", str(run), "-p", spec, "-f", "json", "--engine", engine]
        result = runner.invoke(app, [*args, *(["--workers", "1"] if engine != "local" else [])])
        results.append((result.exit_code, result.stdout, result.stderr))
    return results


def test_a_field_missing_after_a_damaged_first_step_is_named_alike_by_every_engine(tmp_path):
    """A run without logp_ref whose first step's data fails its checksum, replayed with a KL
    term: every engine refuses it naming the same step, the first whole one (step 1), as the
    local pass reads it. Before, the driver of `--engine processes` and `ray` named step 0
    from its header alone, the local engine step 1."""
    run = tiny_run(tmp_path / "run", steps=4)
    flip_bit(step_path(run, 0), -1)
    local, processes = _replayed_by_each_engine(run, "grpo:beta=0.04")
    assert local[0] == 3 and "step 1 has no 'logp_ref'" in local[2], local
    assert processes == local


def test_a_damaged_first_step_lacking_a_field_the_others_hold_is_skipped_by_every_engine(
    tmp_path,
):
    """Only the first step lacks logp_ref, and its data fails its checksum: the local pass
    skips it as damaged and replays the other steps with a KL term; the driver of the other
    engines must too. Before, it refused the run from step 0's header (exit 3)."""
    run = tmp_path / "run"
    rng = np.random.default_rng(0)
    with sd.Recorder(run, policy="grpo") as rec:
        for step in range(4):
            logp = -rng.random((4, 3)).astype(np.float32)
            batch = {"logp": logp, "logp_old": logp + 0.01, "mask": np.ones((4, 3))}
            if step:
                batch["logp_ref"] = logp - 0.02
            rec.log_step(step, advantages=rng.standard_normal(4).astype(np.float32), **batch)
    flip_bit(step_path(run, 0), -1)
    local, processes = _replayed_by_each_engine(run, "grpo:beta=0.04")
    assert local[0] == 0, local[2]
    assert json.loads(local[1])["steps"] == 3
    assert processes[:2] == local[:2], processes[2]


@pytest.mark.parametrize("scheme", ["file", "local"])
def test_a_relative_local_url_is_the_same_run_to_a_worker_in_another_directory(
    tmp_path, monkeypatch, scheme
):
    """`replay file://runs/demo --engine ray`: a worker on another node, whose working
    directory is another, opens the run the driver read, as it does for the relative path
    `runs/demo` (sent as its absolute path). Before, the URL was sent as given and a worker
    elsewhere looked for `runs/demo` under its own directory: no such run, or another run."""
    tiny_run(tmp_path / "here" / "run")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    driver = open_run(f"{scheme}://run")
    policies, own = resolve_policies(driver, ["grpo"])
    tasks, _ = shard_tasks(driver, policies, own, ReplayConfig(device="cpu"), 1)
    monkeypatch.chdir(tmp_path / "elsewhere")  # a Ray worker on another node
    steps = [n for task in tasks for n in stream_shard(task).step_numbers.tolist()]
    assert steps == [0, 1, 2, 3]
    assert driver.location == f"{scheme}://run"


@pytest.mark.parametrize("secret", ["ab/cd+ef==", "ab#cd", "ab?cd"])
def test_a_password_holding_a_slash_is_never_printed(secret):
    """A URL's password with `/`, `#` or `?` unescaped (a base64 token holds `/`) ends the URL's
    host early, so the URL cannot be read; the error line printed it whole, password included
    (`error: no such run: http://alice:ab/cd+ef==@127.0.0.1:1/run.h5`). It is written `***`."""
    url = f"http://alice:{secret}@127.0.0.1:1/run.h5"
    result = runner.invoke(app, ["inspect", url])
    assert result.exit_code in (2, 3), result.output
    assert secret not in result.output
    assert "http://***@127.0.0.1:1/run.h5" in result.stderr


@pytest.mark.parametrize(
    "url",
    [
        "hf://datasets/org/name@main/run.h5",  # a revision
        "http://127.0.0.1:8000/runs/exp@v2/run.h5",  # a port, then an @ in the path
        "http://[::1]:8000/runs/exp@v2/run.h5",
        "s3://bucket/a:b@c/run",
    ],
)
def test_an_at_sign_after_the_host_is_no_password(url):
    """An `@` in a URL's path, after its host, hides nothing."""
    assert redacted(url) == url
