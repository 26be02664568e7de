"""Runs read in place through fsspec URLs (dump/_remote.py): a run directory and a packed .h5
at `memory://` and `file://` URLs replay, check, inspect and diff to the local path's JSON
(only `run`, which names the URL, differs), each step file is read whole once, and hostile
URLs are refused in one line with their exit code by every command that reads a run (`pack`
and `watch`, which take a local path only, refuse any URL in one line)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import open_run, pack_run
from stabledrl_cli.dump._remote import RemoteRun
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.engine import replay, replay_run

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
POLICIES = ["grpo", "stabledrl", "cispo"]


def small_run(path: Path, *, world_size: int = 2, steps: int = 9, corrupt: bool = True) -> Path:
    """A token run over `world_size` ranks with noise-floor steps, a sketch step, and (corrupt)
    step 5's data corrupted on rank 0 (skipped by every reader)."""
    rng = np.random.default_rng(3)
    for rank in range(world_size):
        with sd.Recorder(
            path, policy="grpo", reward_range=(0.0, 1.0), world_size=world_size, rank=rank
        ) as rec:
            for step in range(steps):
                logp = -rng.random((4, 6)).astype(np.float32) * 2
                extra = {"unit_grad_sketch": rng.normal(size=(24, 4)).astype(np.float32)}
                rec.log_step(
                    step,
                    logp=logp,
                    logp_old=logp + rng.normal(scale=0.1, size=(4, 6)).astype(np.float32),
                    advantages=rng.standard_normal(4).astype(np.float32),
                    mask=rng.random((4, 6)) > 0.1,
                    group_id=np.array([0, 0, 1, 1]),
                    reward=rng.random(4).astype(np.float32),
                    grad_norm=1.0 + step,
                    loss=0.1 * step,
                    inner_step=step % 2,
                    **(extra if step == 4 else {}),
                )
    if corrupt:
        victim = next((path / "steps").glob("step-00000005*"))
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0xFF
        victim.write_bytes(bytes(data))
    return path


def to_memory(local: Path) -> str:
    """A copy of a run directory or file on fsspec's in-memory filesystem -> its URL."""
    memory = fsspec.filesystem("memory")
    root = f"/{uuid.uuid4().hex}/{local.name}"
    if local.is_file():
        memory.pipe(root, local.read_bytes())
    for file in sorted(local.rglob("*")):
        if file.is_file():
            memory.pipe(f"{root}/{file.relative_to(local).as_posix()}", file.read_bytes())
    return f"memory://{root.lstrip('/')}"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return small_run(tmp_path_factory.mktemp("fsspec") / "run")


@pytest.fixture(scope="module")
def local_replay(run_dir):
    return replay(run_dir, POLICIES, device="cpu", chunk_size=4, detail=True)


def same_json(result, local) -> bool:
    """Equal to the local replay's JSON, byte for byte, once `run` (the URL) is set aside."""
    return dataclasses.replace(result, run=local.run).to_json() == local.to_json()


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_directory_url_replays_to_the_local_json(run_dir, local_replay, scheme):
    url = to_memory(run_dir) if scheme == "memory" else run_dir.absolute().as_uri()
    result = replay(url, POLICIES, device="cpu", chunk_size=4, detail=True)
    assert result.run == url
    assert same_json(result, local_replay)
    assert result.skipped == local_replay.skipped and len(result.skipped) == 1
    assert local_replay.steps == 8 and local_replay.observed.noise_floor_units > 0


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_archive_url_replays_to_the_local_json(run_dir, tmp_path, scheme):
    good = small_run(tmp_path / "good", world_size=1)
    archive = tmp_path / "run.h5"
    pack_run(open_run(good), archive)
    local = replay(archive, POLICIES, device="cpu")
    url = to_memory(archive) if scheme == "memory" else archive.absolute().as_uri()
    result = replay(url, POLICIES, device="cpu")
    assert result.run == url and same_json(result, local)
    assert open_run(url).integrity.findings == open_run(archive).integrity.findings


def test_each_step_file_is_read_whole_once(run_dir, local_replay, monkeypatch):
    """A replay reads each step file's bytes once (headers by ranged reads), the integrity
    check after the pass included."""
    whole: list[str] = []
    original = fsspec.implementations.memory.MemoryFileSystem.cat_file

    def counting(self, path, start=None, end=None, **kwargs):
        if start is None and end is None:
            whole.append(path)
        return original(self, path, start=start, end=end, **kwargs)

    url = to_memory(run_dir)
    monkeypatch.setattr(fsspec.implementations.memory.MemoryFileSystem, "cat_file", counting)
    run = open_run(url)
    assert isinstance(run, RemoteRun)
    result = replay_run(run, POLICIES, config=ReplayConfig(device="cpu", chunk_size=4))
    assert result.steps == local_replay.steps
    step_files = [p for p in whole if "/steps/" in p]
    assert len(step_files) == len(set(step_files)) == 2 * 9  # every file of both ranks, once


def test_a_link_inside_a_file_url_run_is_never_followed(tmp_path):
    """A step-file name that is a symlink (to a good step of another run) is a finding and is
    not read, as in a local run."""
    run = small_run(tmp_path / "run", world_size=1, steps=4, corrupt=False)
    other = small_run(tmp_path / "other", world_size=1, steps=6, corrupt=False)
    os.symlink(
        other / "steps" / "step-00000005.safetensors", run / "steps" / "step-00000005.safetensors"
    )
    opened = open_run(run.absolute().as_uri())
    assert opened.step_numbers == [0, 1, 2, 3]
    kinds = {f.kind for f in opened.integrity.findings}
    assert "unknown_file" in kinds
    assert [f.message for f in opened.integrity.findings] == [
        f.message for f in open_run(run).integrity.findings
    ]


def _missing_package_scheme() -> str:
    """A scheme fsspec knows whose package is not installed here."""
    for scheme, package in (("s3", "s3fs"), ("gcs", "gcsfs"), ("abfs", "adlfs"), ("oci", "ocifs")):
        if importlib.util.find_spec(package) is None:
            return scheme
    pytest.fail("every candidate filesystem package is installed")


@pytest.mark.parametrize(
    ("url", "code", "says"),
    [
        ("nope://bucket/run", 2, "unknown URL scheme nope://"),
        (f"{_missing_package_scheme()}://bucket/run", 2, "needs a package"),
        ("simplecache::memory://bucket/run", 2, "chained URLs are not read"),
        ("reference://run", 2, "maps paths to other URLs"),
        ("memory://no/such/run", 3, "no such run: memory://no/such/run"),
    ],
)
@pytest.mark.parametrize("command", ["replay", "check", "inspect", "diff"])
def test_hostile_urls_one_line_and_exit_code(run_dir, command, url, code, says):
    result = runner.invoke(app, reading(command, url, run_dir))
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], result.stderr
    assert result.stdout == ""


def reading(command: str, url: str, other: Path) -> list[str]:
    """`command` reading the run at `url` (diff: against the run at `other`; check: with a
    gate, which it needs before it opens the run)."""
    extra = {"check": ["--max-spikes", "1"], "diff": [str(other)]}.get(command, [])
    return [command, url, *extra]


@pytest.mark.parametrize("command", ["replay", "check", "inspect", "diff"])
def test_url_exit_codes_in_a_real_process(run_dir, tmp_path, command):
    for url, code in (("nope://x/run", 2), ((tmp_path / "missing").as_uri(), 3)):
        done = subprocess.run(
            [sys.executable, "-m", "stabledrl_cli", *reading(command, url, run_dir)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        assert done.returncode == code, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and done.stdout == ""


@pytest.mark.parametrize("command", ["replay", "check", "inspect", "diff"])
def test_a_file_url_that_is_not_a_run_exits_3(run_dir, tmp_path, command):
    stray = tmp_path / "notes.txt"
    stray.write_text("hello")
    result = runner.invoke(app, reading(command, stray.as_uri(), run_dir))
    assert result.exit_code == 3
    assert result.stderr.strip() == (
        f"error: {stray.as_uri()} is not a run (expected a run directory or a .h5 archive)"
    )


def cli_json(args: list[str], code: int = 0) -> dict:
    result = runner.invoke(app, [*args, "--format", "json"])
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


def url_of(run: Path, scheme: str) -> str:
    return to_memory(run) if scheme == "memory" else run.absolute().as_uri()


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_check_at_a_url_is_the_local_check(run_dir, tmp_path, scheme):
    """A baseline written from the local path holds, --strict, on the run at a URL; the JSON
    is the local one but for `run`; a tripped gate trips alike (exit 1)."""
    baseline = tmp_path / "baseline.json"
    gated = ["--device", "cpu", "-p", "grpo", "-p", "cispo"]
    cli_json(["check", str(run_dir), *gated, "--write-baseline", str(baseline), "--strict"])
    url = url_of(run_dir, scheme)
    local = cli_json(["check", str(run_dir), "-b", str(baseline), "--device", "cpu"])
    remote = cli_json(["check", url, "-b", str(baseline), "--device", "cpu"])
    assert remote.pop("run") == url and local.pop("run") == str(run_dir)
    assert remote == local and remote["ok"] and remote["steps"] == 8
    tripped = ["--max-spikes", "0", "--max-discard-frac", "0", *gated]
    local = cli_json(["check", str(run_dir), *tripped], code=1)
    remote = cli_json(["check", url, *tripped], code=1)
    assert remote.pop("run") == url and local.pop("run") == str(run_dir)
    assert remote == local and remote["tripped"] > 0


def without_locations(data: dict) -> dict:
    """inspect's JSON with the run's location set aside: `run`, and each finding's path
    (the path on the URL's filesystem) cut to its file name."""
    data = dict(data, run=None)
    findings = data["integrity"]["findings"]
    for finding in findings:
        finding["path"] = finding["path"] and Path(finding["path"]).name
    return data


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_inspect_at_a_url_is_the_local_inspect(run_dir, scheme):
    url = url_of(run_dir, scheme)
    local = cli_json(["inspect", str(run_dir)])
    remote = cli_json(["inspect", url])
    assert remote["run"] == url
    assert without_locations(remote) == without_locations(local)
    assert [f["step"] for f in remote["integrity"]["findings"]] == [5]
    table = runner.invoke(app, ["inspect", url])
    assert table.exit_code == 0 and url in table.stdout and "checksum" in table.stdout


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_diff_of_urls_is_the_local_diff(run_dir, tmp_path, scheme):
    """A URL against a path, and two URLs: the local diff's JSON but for the runs' names; a
    run that parts from it parts at the same step (exit 1)."""
    other = small_run(tmp_path / "other", steps=7, corrupt=False)
    url, other_url = url_of(run_dir, scheme), url_of(other, scheme)
    for a, b in ((url, str(run_dir)), (url, other_url)):
        local_b = str(run_dir) if b == str(run_dir) else str(other)
        local = cli_json(["diff", str(run_dir), local_b, "--device", "cpu"], code=int(b != local_b))
        remote = cli_json(["diff", a, b, "--device", "cpu"], code=int(b != local_b))
        assert (remote.pop("run_a"), remote.pop("run_b")) == (a, b)
        del local["run_a"], local["run_b"]
        assert remote == local
    assert remote["parted_at"] == local["parted_at"] is not None


@pytest.mark.parametrize(("command", "why"), [("pack", "source's path"), ("watch", "polls")])
def test_local_only_commands_refuse_a_url_in_one_line(run_dir, tmp_path, command, why):
    url = url_of(run_dir, "memory")
    args = [command, url, str(tmp_path / "out.h5")] if command == "pack" else [command, url]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {url}: {command} takes a local path, not a URL (")
    assert line.endswith("replay, check, inspect, diff and tune read a run at a URL")
    assert why in line and result.stdout == ""
    assert not (tmp_path / "out.h5").exists()
