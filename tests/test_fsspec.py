"""Runs read in place through fsspec URLs (dump/_remote.py): a run directory and a packed .h5
at `memory://` and `file://` URLs replay, check, inspect and diff to the local path's JSON
(only `run`, which names the URL, differs), each step file is read whole once, messages and
findings name a file by the URL as given, and hostile URLs are refused in one line with their
exit code by every command that reads a run (`watch`, which takes a local path only, refuses
any URL in one line). `pack` of a URL: test_fsspec_pack.py."""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import io
import json
import os
import subprocess
from pathlib import Path

import fsspec
import h5py
import pytest
from _cli import cli_command, cli_environment, run_cli_together
from _fsspec_runs import (
    answering,
    count_reads,
    ipv6_loopback,
    served,
    small_run,
    stalled,
    to_memory,
)
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import RunIntegrityWarning, _remote, _url_filesystem, open_run, pack_run
from stabledrl_cli.dump._remote import RemoteRun
from stabledrl_cli.dump._store_file import StoreFile
from stabledrl_cli.errors import InputError
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.engine import replay, replay_run

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
POLICIES = ["grpo", "stabledrl", "cispo"]


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


def test_an_archive_over_http_replays_to_the_local_json(tmp_path):
    """An asynchronous filesystem's file (http's; s3fs's, gcsfs's) waits on its process's event
    loop thread, which the archive probe's fork does not copy: the probe hung its 20 s, and the
    archive was refused as 'a corrupt or crafted archive' (exit 3). The probe's child now opens
    the file anew."""
    archive = tmp_path / "run.h5"
    pack_run(open_run(small_run(tmp_path / "good", world_size=1, steps=3, corrupt=False)), archive)
    local = replay(archive, POLICIES, device="cpu")
    with served(tmp_path) as root:
        url = f"{root}/run.h5"
        result = replay(url, POLICIES, device="cpu")
        inspected = runner.invoke(app, ["inspect", url, "--format", "json"])
    assert result.run == url and same_json(result, local)
    assert inspected.exit_code == 0, inspected.output
    assert json.loads(inspected.stdout)["run"] == url


def test_an_archive_on_an_ipv6_host_is_read_not_refused_as_chained(tmp_path):
    """`inspect http://[::1]:PORT/run.h5`: the `::` of the IPv6 literal host was taken for
    fsspec's chaining, 'chained URLs are not read' (exit 2), of a URL that chains nothing. An
    IPv6 host is read as any other; a chained URL is still refused."""
    archive = tmp_path / "run.h5"
    pack_run(open_run(small_run(tmp_path / "good", world_size=1, steps=3, corrupt=False)), archive)
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    with served(tmp_path, host="::1") as root:
        inspected = runner.invoke(app, ["inspect", f"{root}/run.h5", "--format", "json"])
        chained = runner.invoke(app, ["inspect", f"simplecache::{root}/run.h5"])
    assert inspected.exit_code == 0, inspected.output
    assert json.loads(inspected.stdout)["run"] == f"{root}/run.h5"
    assert chained.exit_code == 2 and "chained URLs are not read" in chained.stderr


def test_an_archive_on_a_server_that_ignores_ranges(tmp_path, monkeypatch):
    """Python's http.server sends the whole file for a ranged GET: the signature's ranged read
    got the whole body (all of it held in memory), not 8 bytes, and the archive was 'not a
    run' (exit 3). It is read through the file object h5py reads: an archive within its first
    block (5 MB; 4 KB here) replays; a larger one is refused at once, quoting the store (each
    step's read would fail, and each failed read held a connection: it hung)."""
    http = pytest.importorskip("fsspec.implementations.http")
    archive = tmp_path / "run.h5"
    pack_run(open_run(small_run(tmp_path / "good", world_size=1, steps=3, corrupt=False)), archive)
    local = replay(archive, POLICIES, device="cpu")
    with served(tmp_path, ranges=False) as root:
        url = f"{root}/run.h5"
        result = replay(url, POLICIES, device="cpu")
        monkeypatch.setattr(http, "DEFAULT_BLOCK_SIZE", 4096)
        http.HTTPFileSystem.clear_instance_cache()
        refused = runner.invoke(app, ["inspect", url])
    http.HTTPFileSystem.clear_instance_cache()
    assert same_json(result, local)
    assert refused.exit_code == 3, refused.output
    assert refused.stderr.startswith(
        f"error: {url}: cannot read it: the store failed (ValueError: The HTTP server doesn't "
        "appear to support range requests."
    )
    assert len(refused.stderr.splitlines()) == 1


def test_a_run_directory_over_http_says_how_to_read_it(run_dir):
    """http:// lists no directory (a server's listing is a page, a file): a run directory
    served so was 'not a run (expected a run directory or a .h5 archive)', which it is. The
    line says what it is and how to read it (exit 3 as before)."""
    with served(run_dir.parent) as root:
        results = [runner.invoke(app, ["inspect", f"{root}/run{end}"]) for end in ("/", "")]
        stray = runner.invoke(app, ["inspect", f"{root}/"])
    for end, result in zip(("/", ""), results, strict=True):
        assert result.exit_code == 3, result.output
        assert result.stderr == (
            f"error: {root}/run{end} is a run directory that http:// cannot read: it lists no "
            "directory (a server's page is a file); pack the run (stabledrl pack) and give the "
            ".h5's URL\n"
        )
    assert stray.exit_code == 3 and "is not a run" in stray.stderr


@pytest.mark.parametrize(
    ("status", "says"),
    [
        (401, "the server answered 401 Unauthorized"),
        (403, "the server answered 403 Forbidden"),
        (500, "the server answered 500 Internal Server Error"),
    ],
)
def test_an_http_refusal_is_not_a_missing_run(status, says):
    """fsspec says FileNotFoundError for any HTTP error: a run the server refused to give (a
    wrong password, 403, a server's failure) was 'no such run'. The line quotes the answer
    (exit 3 as before); a 404 is still 'no such run'."""
    with answering(status) as root:
        result = runner.invoke(app, ["inspect", f"{root}/run.h5"])
    assert result.exit_code == 3, result.output
    assert result.stderr == f"error: cannot read {root}/run.h5: {says}\n"
    with answering(404) as root:
        missing = runner.invoke(app, ["inspect", f"{root}/run.h5"])
    assert missing.stderr == f"error: no such run: {root}/run.h5\n"


def test_each_step_file_is_read_whole_once(run_dir, local_replay, monkeypatch):
    """A replay reads each step file's bytes once (headers by ranged reads), the integrity
    check after the pass included."""
    url = to_memory(run_dir)
    whole, _ = count_reads(monkeypatch)
    run = open_run(url)
    assert isinstance(run, RemoteRun)
    result = replay_run(run, POLICIES, config=ReplayConfig(device="cpu", chunk_size=4))
    assert result.steps == local_replay.steps
    step_files = [p for p in whole if "/steps/" in p]
    assert len(step_files) == len(set(step_files)) == 2 * 9  # every file of both ranks, once


def test_a_replay_makes_one_request_a_step_file(tmp_path, monkeypatch):
    """On object storage a request costs a round trip: a replay of a URL run reads each step
    file once, whole, and no header apart. Before, listing the run read every header first by
    two ranged reads: three requests a file; then the first step's header still was read
    apart, to check its fields against the policies (the pass checks them now)."""
    url = to_memory(small_run(tmp_path / "run", world_size=1, steps=6, corrupt=False))
    whole, ranged = count_reads(monkeypatch)
    result = replay_run(open_run(url), POLICIES, config=ReplayConfig(device="cpu"))
    assert result.steps == 6
    step_files = sorted(p for p in whole if "/steps/" in p)
    assert len(step_files) == len(set(step_files)) == 6
    assert [p for p in ranged if "/steps/" in p] == []


def test_a_step_file_padded_past_its_data_is_never_read_whole(tmp_path, monkeypatch):
    """A step file with gigabytes of zeros after its data (3 GB sparse: `file://` inspect and
    replay took 3.4 GB and 9-16 s, where the local path takes 0.26 GB) was read whole, then
    found to hold trailing bytes. A file larger than `UNCHECKED_WHOLE_READ` (here 4 KB, the
    padding 1 MB) has its header read first, and is skipped as a local run skips it."""
    monkeypatch.setattr(_remote, "UNCHECKED_WHOLE_READ", 4096)
    run = small_run(tmp_path / "run", world_size=1, steps=3, corrupt=False)
    with open(run / "steps" / "step-00000001.safetensors", "ab") as padded:
        padded.write(bytes(1 << 20))
    url = to_memory(run)
    whole, _ = count_reads(monkeypatch)
    result = replay(url, POLICIES, device="cpu")
    assert result.steps == 2
    assert not [p for p in whole if p.endswith("step-00000001.safetensors")], whole
    messages = [f.message for f in open_run(url).integrity.findings]
    assert messages == [f.message for f in open_run(run).integrity.findings]
    assert messages == [f"step 1: unreadable: {1 << 20} trailing bytes"]


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
        # an archive's filesystem said 'cannot reach it (IsADirectoryError: ... <cwd>)'
        ("zip://run", 2, "zip://run: zip:// reads inside an archive that only a chained URL"),
        ("tar://run", 2, "tar://run: tar:// reads inside an archive that only a chained URL"),
        ("memory://no/such/run", 3, "no such run: memory://no/such/run"),
        # a scheme holding `_` was read as a local path (`no such run: async_wrapper:/x`)
        (
            "async_wrapper:///x",
            2,
            "async_wrapper:///x: async_wrapper:// cannot be opened from a URL alone (",
        ),
        # ftp's filesystem connects when it is made; dir's fails on a URL with no path
        ("ftp://127.0.0.1:1/run", 2, "ftp://127.0.0.1:1/run: cannot reach it (ConnectionRefused"),
        ("dir://x", 2, "dir://x: cannot reach it ("),
        # http's filesystem connects on its first look, and fsspec says FileNotFoundError for a
        # refused connection too: it was 'no such run' (exit 3), as if the server had said 404
        ("http://127.0.0.1:1/run", 2, "http://127.0.0.1:1/run: cannot reach it (Client"),
        # fsspec's data filesystem reads `data://data:...`; a path without `data:` raised its
        # IndexError, an internal error (exit 70)
        (
            "data://text/plain;base64,aGVsbG8=",
            2,
            "cannot read data://text/plain;base64,aGVsbG8=: the filesystem fails on it "
            "(IndexError: list index out of range)",
        ),
    ],
)
@pytest.mark.parametrize("command", ["replay", "check", "inspect", "diff"])
def test_hostile_urls_one_line_and_exit_code(run_dir, command, url, code, says):
    result = runner.invoke(app, reading(command, url, run_dir))
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], result.stderr
    assert result.stdout == ""


def test_an_http_host_that_refuses_is_exit_2_in_a_real_process(run_dir):
    """A URL whose host refuses the connection is a usage error (exit 2, docs/exit-codes.md),
    not a missing run (exit 3): over http, as over ftp."""
    (done,) = run_cli_together(["inspect", "http://127.0.0.1:1/run"])
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: http://127.0.0.1:1/run: cannot reach it (Client"), line
    assert done.stdout == ""


@pytest.mark.parametrize("name", ["run.h5", "run"])
def test_a_host_that_never_answers_is_an_error_not_a_hang(run_dir, monkeypatch, name):
    """A host that takes the connection and never answers held `inspect` past 400 s (aiohttp's
    5-minute timeout a request, then the next request's); now a stall of
    `HTTP_STALL_SECONDS` is a usage error (exit 2) that says so."""
    monkeypatch.setattr(_url_filesystem, "HTTP_STALL_SECONDS", 0.5)
    with stalled() as root:
        result = runner.invoke(app, ["inspect", f"{root}/{name}"])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {root}/{name}: ") and "no answer for 0.5 s" in line, line
    assert result.stdout == ""


def reading(command: str, url: str, other: Path) -> list[str]:
    """`command` reading the run at `url` (diff: against the run at `other`; check: with a
    gate, which it needs before it opens the run)."""
    extra = {"check": ["--max-spikes", "1"], "diff": [str(other)]}.get(command, [])
    return [command, url, *extra]


@pytest.mark.parametrize(
    "written",
    [
        "memory:///no/such/run",
        "memory://no//such/run/",
        "memory://no/such/run?version=2#step",
        "file:///no//such/run/",
        "no//such/./run/",
    ],
)
def test_a_missing_run_is_named_as_written(run_dir, written):
    result = runner.invoke(app, ["inspect", written])
    assert result.exit_code == 3, result.output
    assert result.stderr == f"error: no such run: {written}\n"


def test_a_url_scheme_is_read_in_any_case(run_dir, local_replay):
    """`FILE:///...` said "FILE:///...: Protocol not known: FILE" (exit 2), though the scheme
    had passed the known-scheme check: a URL's scheme has no case (RFC 3986). It is read as
    `file:///...`, and named as written."""
    written = "FILE://" + run_dir.absolute().as_posix()
    result = replay(written, POLICIES, device="cpu", chunk_size=4, detail=True)
    assert result.run == written and same_json(result, local_replay)
    assert runner.invoke(app, ["inspect", "Memory://no/run"]).stderr == (
        "error: no such run: Memory://no/run\n"
    )


def test_a_url_with_escapes_that_names_nothing_says_what_would(tmp_path):
    """`Path.as_uri()` writes a run at `/tmp/a b` as `file:///tmp/a%20b`; fsspec reads the
    path as written, so that URL names nothing: the line was a bare "no such run", as if the
    run were not there. It now gives the URL that names it; an escape that decodes to nothing
    keeps the bare line."""
    run = small_run(tmp_path / "a b", world_size=1, steps=2, corrupt=False)
    written = run.absolute().as_uri()
    assert "%20" in written
    result = runner.invoke(app, ["inspect", written])
    assert result.exit_code == 3, result.output
    assert result.stderr == (
        f"error: no such run: {written} (%-escapes are read as written: give "
        f"'file://{run.absolute()}')\n"
    )
    assert runner.invoke(app, ["inspect", f"file://{run.absolute()}"]).exit_code == 0
    missing = (tmp_path / "no run").absolute().as_uri()
    assert runner.invoke(app, ["inspect", missing]).stderr == f"error: no such run: {missing}\n"


@pytest.mark.parametrize("command", ["replay", "check", "inspect", "diff"])
def test_url_exit_codes(run_dir, tmp_path, command):
    """A process of its own for each exit code (replay's); the other commands in this one."""
    cases = (("nope://x/run", 2), ((tmp_path / "missing").as_uri(), 3))
    if command == "replay":
        runs = run_cli_together(*(reading(command, url, run_dir) for url, _ in cases), timeout=120)
        ended = [(done.returncode, done.stdout, done.stderr) for done in runs]
    else:
        results = [runner.invoke(app, reading(command, url, run_dir)) for url, _ in cases]
        ended = [(result.exit_code, result.stdout, result.stderr) for result in results]
    for (_, code), (returncode, stdout, stderr) in zip(cases, ended, strict=True):
        assert returncode == code, stderr
        assert len(stderr.strip().splitlines()) == 1 and stdout == ""


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


CORRUPT_FILE = "steps/step-00000005.rank-0000.safetensors"
"""The file `small_run` corrupts, inside the run."""


def without_locations(data: dict, location: str) -> dict:
    """inspect's JSON with the run's location set aside: `run`, and the prefix `location`
    of each finding's path (which must be there)."""
    data = dict(data, run=None)
    for finding in data["integrity"]["findings"]:
        assert finding["path"].startswith(location + "/"), finding
        finding["path"] = finding["path"][len(location) :]
    return data


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_inspect_at_a_url_is_the_local_inspect(run_dir, scheme):
    """The JSON of the local path's inspect, but that the run and each finding's file are
    named by the URL as given (protocol included)."""
    url = url_of(run_dir, scheme)
    local = cli_json(["inspect", str(run_dir)])
    remote = cli_json(["inspect", url])
    assert remote["run"] == url
    assert [f["path"] for f in remote["integrity"]["findings"]] == [f"{url}/{CORRUPT_FILE}"]
    assert without_locations(remote, url) == without_locations(local, str(run_dir))
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


def test_watch_refuses_a_url_in_one_line(run_dir):
    url = url_of(run_dir, "memory")
    result = runner.invoke(app, ["watch", url])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {url}: watch takes a local path, not a URL (")
    assert line.endswith("replay, check, inspect, diff, tune and pack read a run at a URL")
    assert "polls" in line and result.stdout == ""


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_step_messages_name_a_url_run_by_its_url(run_dir, scheme):
    """The warning of a skipped step, `Run.step`'s errors and the integrity findings name the
    run, or the step's file, by the URL as given (protocol included), never by its path on
    the URL's filesystem."""
    url = url_of(run_dir, scheme)
    run = open_run(url)
    why = "unreadable: data checksum mismatch (corrupt bytes)"
    with pytest.warns(RunIntegrityWarning) as caught:
        assert len(list(run.steps())) == 8
    assert [str(w.message) for w in caught] == [f"{url}: skipping step 5: {why}"]
    with pytest.raises(InputError) as corrupt:
        run.step(5)
    assert str(corrupt.value) == f"{url}: step 5 is {why}"
    with pytest.raises(InputError) as missing:
        run.step(50)
    assert str(missing.value) == f"{url}: no step 50"
    assert [(f.path, f.message) for f in run.integrity.findings] == [
        (f"{url}/{CORRUPT_FILE}", f"step 5: {why}")
    ]


def test_a_step_file_gone_bad_under_a_url_run_is_named_by_its_url(tmp_path):
    """A step file torn, or removed, after its header was checked: the error names the run
    and the file by their URL, a store's own error (which names the path it was given)
    included."""
    url = to_memory(small_run(tmp_path / "run", world_size=1, steps=4, corrupt=False))
    root = "/" + url.removeprefix("memory://")
    memory = fsspec.filesystem("memory")
    run = open_run(url)
    headers = {step.step: step for step in run.step_headers()}  # checked from headers alone
    torn = f"{root}/steps/step-00000001.safetensors"
    memory.pipe(torn, memory.cat_file(torn)[:-50])
    with pytest.raises(InputError) as error:
        headers[1]["logp"]
    assert str(error.value).startswith(f"{url}/steps/step-00000001.safetensors: cannot read it: ")
    memory.rm(f"{root}/steps/step-00000002.safetensors")
    with pytest.raises(InputError) as error:
        run.step(2)
    assert str(error.value) == (
        f"{url}: step 2 is unreadable: cannot read: {url}/steps/step-00000002.safetensors"
    )


def test_archive_findings_at_a_url_name_it_by_its_url(tmp_path):
    """A corrupt step of a packed .h5 at a URL (a byte of its logp_old, which its CRC-32 in
    checksums/ covers): its finding and the step's error name the archive by its URL."""
    out = tmp_path / "run.h5"
    pack_run(open_run(small_run(tmp_path / "run", world_size=1, corrupt=False)), out)
    with h5py.File(out, "r") as handle:
        info = handle["tokens/logp_old"].id.get_chunk_info(0)
        begin = int(handle["tokens/step_offsets"][3]) * 4
    data = bytearray(out.read_bytes())
    data[info.byte_offset + begin + 1] ^= 0xFF
    out.write_bytes(bytes(data))
    url = to_memory(out)
    findings = open_run(url).integrity.findings
    assert [(f.kind, f.path) for f in findings] == [("unreadable", f"{url}:tokens/logp_old")]
    with pytest.raises(InputError) as error:
        open_run(url).step(3)
    assert str(error.value).startswith(f"{url}: step 3 is unreadable: ")


@pytest.mark.parametrize("scheme", ["local", "FILE", "File"])
def test_no_report_is_written_inside_a_run_read_through_a_local_url(tmp_path, scheme):
    """`replay local:///RUN --out RUN/manifest.json` (or `FILE:///RUN`, a scheme read in any
    case) replaced the run's manifest with the report (exit 0): the check that refuses a report
    inside the run knew the run's local path only for a URL spelled `file://`. Any URL of the
    local filesystem is refused as its path is, before the replay."""
    run = small_run(tmp_path / "run", world_size=1, steps=2, corrupt=False)
    url = f"{scheme}://{run.absolute()}"
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    for args in (
        ["replay", url, "-p", "grpo", "--out", str(run / "manifest.json")],
        ["check", url, "--max-spikes", "1", "--junit", str(run / "steps" / "j.xml")],
        ["tune", url, "-p", "stabledrl:c=3..5:2", "--plot", str(run / "tune.png")],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.strip().splitlines() == [
            f"error: {args[-2]} {args[-1]} is inside the run {url}; write it outside the run"
        ]
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before


def test_a_url_whose_filesystem_raises_its_own_error_is_one_line(tmp_path):
    """`inspect hf://datasets/x/y` with the Hub unreachable ended as an internal error (exit
    70, httpx's ConnectError, which is no OSError, out of the filesystem's first call). Any
    error of a filesystem's own code on its first look at the URL is the URL's: exit 2, one
    line. The real huggingface_hub filesystem, pointed at a port that refuses connections."""
    pytest.importorskip("huggingface_hub")
    env = {k: v for k, v in cli_environment().items() if k != "HF_HUB_OFFLINE"}
    done = subprocess.run(
        cli_command("inspect", "hf://datasets/x/y"),
        env={**env, "HF_ENDPOINT": "http://127.0.0.1:1", "HF_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: cannot read hf://datasets/x/y: the filesystem fails on it (")
    assert "internal error" not in line and done.stdout == ""


def test_a_step_name_listed_twice_is_a_finding_and_never_read(tmp_path):
    """An object store can hold a step file and, under the same name, a prefix of other
    objects (`steps/step-00000001.safetensors` and `steps/step-00000001.safetensors/x`): its
    listing gives the name twice, a file and a directory. inspect called the good step 'torn:
    header cut at 0 of 784 bytes' (the directory's size, listed last, stood for the file's)
    while replay replayed it. The name is an `unknown_file` finding, never opened, by every
    reader alike, as a local run's FIFO of that name is."""
    from fsspec.implementations.memory import MemoryFile

    url = to_memory(small_run(tmp_path / "run", world_size=1, steps=4, corrupt=False))
    memory = fsspec.filesystem("memory")
    child = "/" + url.removeprefix("memory://") + "/steps/step-00000001.safetensors/x"
    memory.store[child] = MemoryFile(memory, child, b"x")  # what pipe refuses, a store holds
    run = open_run(url)
    assert run.step_numbers == [0, 2, 3]
    assert [(f.kind, f.step) for f in run.integrity.findings] == [
        ("unknown_file", None),
        ("gap", 1),
    ]
    assert replay(url, POLICIES, device="cpu").steps == 3


def test_a_url_given_as_a_run_to_write_is_refused(tmp_path, monkeypatch):
    """`import LOG --out s3://bucket/run` wrote the run into a local directory `./s3:/bucket/run`
    and said 'imported ... into s3:/bucket/run' (exit 0), as did `record --out` and `branch
    --out`: typer's Path made the URL a relative path. Each writes a local path, as `pack`
    does: a URL is refused, exit 2, one line, nothing written."""
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 0.5}\n')
    url = "memory://bucket/run"
    commands = {
        "import": ["import", log, "--out", url],
        "record": ["record", "--out", url, "--rl-steps", "1"],
        "branch": ["branch", tmp_path / "run", "--at", "0", "-p", "grpo", "--out", url],
        "pack": ["pack", tmp_path / "run", url],
    }
    (imported,) = run_cli_together(commands["import"], cwd=tmp_path)  # a real process for exit 2
    ended = {"import": (imported.returncode, imported.stderr)}
    monkeypatch.chdir(tmp_path)  # where a URL taken as a relative path would be written
    for command in ("record", "branch", "pack"):
        result = runner.invoke(app, [str(arg) for arg in commands[command]])
        ended[command] = (result.exit_code, result.stderr)
    what = {"import": "its run", "record": "its run", "branch": "its branch runs"}
    for command, (returncode, stderr) in ended.items():
        assert returncode == 2, (command, stderr)
        assert stderr.splitlines() == [
            f"error: {url}: {command} writes {what.get(command, 'OUT.h5')} to a local path, "
            "not a URL"
        ], command
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]


def test_a_file_url_naming_a_link_to_an_archive_reads_the_archive(run_dir, tmp_path):
    """The run's own path may be a link: it is the user's. `inspect /tmp/link.h5` read the
    archive it names, and so did `file:///tmp/linkdir` for a directory, but
    `file:///tmp/link.h5` said 'is not a run' (exit 3): a link at the URL itself was taken for
    a link inside a run. A link inside the run is still never followed."""
    archive = tmp_path / "run.h5"
    pack_run(open_run(small_run(tmp_path / "run", world_size=1, steps=2, corrupt=False)), archive)
    (tmp_path / "link.h5").symlink_to(archive)
    url = (tmp_path / "link.h5").as_uri()
    result = runner.invoke(app, ["inspect", url, "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["run"] == url
    assert open_run(url).step_numbers == open_run(archive).step_numbers == [0, 1]


def test_a_file_url_with_the_localhost_host_says_what_would_name_the_run(run_dir):
    """`file://localhost/PATH` names `/PATH` (RFC 8089), but fsspec reads it as the relative
    path `localhost/PATH`: the line was a bare 'no such run' for a run that is there. It now
    gives the URL that names it; a path that names nothing keeps the bare line."""
    path = run_dir.absolute().as_posix()
    for host in ("localhost", "LOCALHOST"):
        written = f"file://{host}{path}"
        result = runner.invoke(app, ["inspect", written])
        assert result.exit_code == 3, result.output
        assert result.stderr == (
            f"error: no such run: {written} (a host is read as part of the path: give "
            f"'file://{path}')\n"
        )
    missing = f"file://localhost{path}-missing"
    assert runner.invoke(app, ["inspect", missing]).stderr == f"error: no such run: {missing}\n"


def test_a_url_whose_query_or_fragment_hides_the_run_says_what_would_name_it(run_dir, tmp_path):
    """fsspec reads a `file://` URL's query and fragment as part of its path: `file:///RUN?x=1`
    said a bare 'no such run' (exit 3) for a run that is there. It now gives the URL that names
    it, its secrets never written; a path that names nothing keeps the bare line."""
    path = run_dir.absolute().as_posix()
    archive = tmp_path / "run.h5"
    pack_run(open_run(run_dir), archive)
    for url, what in (
        (f"file://{path}?x=1&X-Amz-Signature=s3cr3t", "a query"),
        (f"file://{path}#step", "a fragment"),
        (f"{archive.as_uri()}?v=2", "a query"),
    ):
        result = runner.invoke(app, ["inspect", url])
        assert result.exit_code == 3, result.output
        assert "s3cr3t" not in result.stderr
        bare = url.partition("?")[0].partition("#")[0]
        assert result.stderr.endswith(f" ({what} is read as part of the path: give {bare!r})\n")
    missing = f"file://{path}-missing?x=1"
    assert runner.invoke(app, ["inspect", missing]).stderr == f"error: no such run: {missing}\n"


@pytest.mark.parametrize("written", ["file:fixtures/grpo", "FILE:/no/such/run", "local:a/b"])
def test_a_file_url_without_slashes_says_how_to_write_it(written):
    """`file:fixtures/grpo` (no `//`) is no URL: it was read as a local path of that name and
    said a bare 'no such run' (exit 3), with no hint that the URL's form was at fault. The
    line (exit 3 still) now gives the `file://` URL of the path after the scheme."""
    result = runner.invoke(app, ["inspect", written])
    assert result.exit_code == 3, result.output
    url = "file://" + os.path.abspath(written.partition(":")[2])
    assert result.stderr == (
        f"error: no such run: {written} (a file URL takes '//' after its scheme, else it is "
        f"read as a local path: give {url!r})\n"
    )
    assert runner.invoke(app, ["inspect", "run:1"]).stderr == "error: no such run: run:1\n"


def test_a_url_given_as_a_local_input_file_is_refused(run_dir, tmp_path):
    """`check RUN -b s3://b/base.json` said 'no such baseline: s3:/b/base.json' and `import
    s3://b/log.jsonl` 's3:/b/log.jsonl: no such file or directory' (exit 3): typer's Path
    made the URL a local path, named mangled. Both read a local file: a URL is refused as the
    option is parsed, exit 2, named as written."""
    cases = [
        (["check", str(run_dir), "-b", "s3://b/base.json"], "'--baseline' / '-b'"),
        (["import", "s3://b/log.jsonl", "--out", str(tmp_path / "run")], "'SRC'"),
    ]
    for args, option in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        url = next(a for a in args if a.startswith("s3://"))
        assert result.stderr.startswith(
            f"error: Invalid value for {option}: {url} is a URL; give a local path ("
        ), result.stderr
        assert len(result.stderr.splitlines()) == 1


class _StoreDown(Exception):
    """A store's own error type, no OSError (huggingface_hub's httpx errors, gcsfs's HttpError)."""


def test_a_store_error_of_its_own_type_mid_read_is_a_step_read_failure(tmp_path, monkeypatch):
    """A connection lost while a run at a URL is read, raised as the store's own error type:
    the step it hit is unreadable, named by its URL, as one an OSError hits; the replay goes
    on. Before: 'internal error: _StoreDown: ...', exit 70."""
    url = to_memory(small_run(tmp_path / "run", world_size=1, steps=4, corrupt=False))
    memory = type(fsspec.filesystem("memory"))
    cat_file = memory.cat_file

    def dropped(self, path, *args, **kwargs):
        if path.endswith("step-00000002.safetensors"):
            raise _StoreDown("connection reset by the store")
        return cat_file(self, path, *args, **kwargs)

    monkeypatch.setattr(memory, "cat_file", dropped)
    result = CliRunner().invoke(app, ["replay", url, "-p", "grpo", "--format", "json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 3
    assert (
        f"step of {url} (step 2: unreadable: cannot read: _StoreDown: connection reset by the "
        "store); replayed 3"
    ) in " ".join(result.stderr.split())


def _store_down_for(monkeypatch, error: type[Exception], reads: int | None) -> None:
    """From now on, fsspec's in-memory files fail their next `reads` reads (None: every read)
    with `error`, as a store does whose connection drops."""
    from fsspec.implementations.memory import MemoryFile

    left = [reads]

    def failing(method):
        def call(self, *args):
            if left[0] is None or left[0] > 0:
                left[0] = None if left[0] is None else left[0] - 1
                raise error("connection reset by the store")
            return method(self, *args)

        return call

    for name in ("read", "readinto"):
        monkeypatch.setattr(MemoryFile, name, failing(getattr(MemoryFile, name)))


@pytest.mark.parametrize("error", [OSError, _StoreDown])
def test_a_store_failing_under_an_archive_says_so_not_corrupt(tmp_path, monkeypatch, error):
    """The store failing while a packed .h5 at a URL is opened: h5py reports what it was
    parsing, and the archive was called corrupt ('corrupt run archive (OSError)'), or the
    store's own error type ended as 'internal error: SystemError' (exit 70). Now one line
    says the store failed and quotes its error; exit 3, as for a file that cannot be read."""
    archive = tmp_path / "run.h5"
    pack_run(open_run(small_run(tmp_path / "run", world_size=1, steps=4, corrupt=False)), archive)
    url = to_memory(archive)
    _store_down_for(monkeypatch, error, None)
    result = CliRunner().invoke(app, ["replay", url, "-p", "grpo"])
    assert result.exit_code == 3, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {url}: cannot read it: the store failed "
        f"({error.__name__}: connection reset by the store)"
    ]


@pytest.mark.parametrize("error", [OSError, _StoreDown])
def test_a_store_failing_under_an_archives_step_skips_that_step_named_so(
    tmp_path, monkeypatch, error
):
    """A read of a packed .h5's step at a URL that the store fails once: the step was skipped
    with no reason anywhere (the integrity check's own read passed; 'replayed 3' of 4, nothing
    named), its error blamed on the step's bytes ('archive data checksum failed'). The step is
    skipped and named, unreadable because the store failed; the replay goes on, as for a run
    directory at a URL."""
    archive = tmp_path / "run.h5"
    pack_run(open_run(small_run(tmp_path / "run", world_size=1, steps=4, corrupt=False)), archive)
    run = open_run(to_memory(archive))
    _store_down_for(monkeypatch, error, 1)
    result = replay(run, ["grpo"], device="cpu")
    assert result.steps == 3
    assert result.skipped == [
        f"step 0: cannot read: the store failed ({error.__name__}: connection reset by the store)"
    ]


PRESIGNED = "?X-Amz-Credential=AKIDEXAMPLE&X-Amz-Expires=600&X-Amz-Signature="


@pytest.mark.parametrize("where", ["userinfo", "presigned query"])
def test_credentials_in_a_url_are_never_written(tmp_path, where):
    """A URL's credentials (`http://user:password@host/...`, a presigned URL's signature) were
    written wherever the run is named: the JSON's `run`, warnings, findings, error lines,
    pack's archive (its `source` and findings), replay's HDF5 report, check's JUnit report.
    They are written `***` there now; the run is still read with them."""
    archive = tmp_path / "served" / "run.h5"
    archive.parent.mkdir()
    pack_run(open_run(small_run(tmp_path / "run", world_size=1)), archive)
    secret = "s3cretPW"
    with served(archive.parent) as root:
        if where == "userinfo":
            url = root.replace("://", f"://alice:{secret}@") + "/run.h5"
            shown = root.replace("://", "://***@") + "/run.h5"
        else:
            url = f"{root}/run.h5{PRESIGNED}{secret}"
            shown = f"{root}/run.h5" + PRESIGNED.replace("AKIDEXAMPLE", "***") + "***"
        report, packed, junit = tmp_path / "r.h5", tmp_path / "p.h5", tmp_path / "j.xml"
        results = [
            runner.invoke(app, args)
            for args in (
                ["inspect", url, "--format", "json"],
                ["replay", url, "--format", "json", "-o", str(report)],
                ["check", url, "--max-spikes", "99", "--junit", str(junit), "--format", "json"],
                ["diff", url, str(tmp_path / "run"), "--format", "json"],
                ["pack", url, str(packed)],
                ["inspect", url.replace("run.h5", "none.h5")],
                ["inspect", url.replace(root.rpartition(":")[2], "1")],
                ["watch", url],
            )
        ]
    assert [r.exit_code for r in results] == [0, 0, 0, 0, 0, 3, 2, 2], "\n".join(
        r.output for r in results
    )
    assert json.loads(results[0].stdout)["run"] == shown
    written = [r.stdout + r.stderr for r in results]
    written += [p.read_bytes().decode("latin-1") for p in (report, packed, junit)]
    assert [text for text in written if secret in text] == []
    assert shown in results[1].stderr and "***" in results[6].stderr
    with h5py.File(packed) as handle:
        assert handle.attrs["source"] == shown


def test_a_store_error_naming_the_url_hides_its_credentials(tmp_path, monkeypatch):
    """A store's error that names the file it failed on, with the credentials of its URL, was
    quoted as it was: 'cannot read it: the store failed (OSError: /alice:s3cretPW@bucket/...'.
    They are written `***` there too."""
    from fsspec.implementations.memory import MemoryFile

    archive = tmp_path / "run.h5"
    pack_run(open_run(small_run(tmp_path / "run", world_size=1, steps=3, corrupt=False)), archive)
    fsspec.filesystem("memory").pipe("/alice:s3cretPW@bucket/run.h5", archive.read_bytes())

    def failing(self, *args):
        raise OSError(f"{self.path}: connection reset by the store")

    monkeypatch.setattr(MemoryFile, "read", failing)
    monkeypatch.setattr(MemoryFile, "readinto", failing)
    result = runner.invoke(app, ["inspect", "memory://alice:s3cretPW@bucket/run.h5"])
    assert result.exit_code == 3, result.output
    assert result.stderr == (
        "error: memory://***@bucket/run.h5: cannot read it: the store failed (OSError: "
        "/***@bucket/run.h5: connection reset by the store)\n"
    )


def test_a_store_error_that_says_nothing_is_named_by_its_type(tmp_path, monkeypatch):
    """A store's error with no message (fsspec's FSTimeoutError, after a server stalled
    mid-body) was quoted 'the store failed (TimeoutError: )' under an archive, and as nothing
    under a run directory ('step 1 is unreadable: cannot read: '). It is named by its type."""
    from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

    directory = small_run(tmp_path / "run", world_size=1, steps=3, corrupt=False)
    archive = tmp_path / "run.h5"
    pack_run(open_run(directory), archive)
    url, run = to_memory(archive), open_run(to_memory(directory))

    def stalled_cat(self, path, start=None, end=None, **kwargs):
        raise TimeoutError

    monkeypatch.setattr(MemoryFileSystem, "cat_file", stalled_cat)
    with pytest.raises(InputError, match=r"step 1 is unreadable: cannot read: TimeoutError$"):
        run.step(1)

    def stalled(self, *args):
        raise TimeoutError

    monkeypatch.setattr(MemoryFile, "read", stalled)
    monkeypatch.setattr(MemoryFile, "readinto", stalled)
    result = runner.invoke(app, ["inspect", url])
    assert result.exit_code == 3, result.output
    assert result.stderr == f"error: {url}: cannot read it: the store failed (TimeoutError)\n"


def test_no_garbage_collection_starts_while_the_store_is_read(tmp_path):
    """h5py holds its lock while it reads an archive through `StoreFile`, and an asynchronous
    store's read (http's) waits on its event loop's thread: a garbage collection there that
    freed an h5py object waited on that lock, and the read hung (the probe's 20 s: 'refused:
    ... a corrupt or crafted archive', exit 3, 2 in 80 runs of
    test_credentials_in_a_url_are_never_written under -n 2 and load). No collection starts,
    on any thread, while the store is read; it runs again after."""
    archive = tmp_path / "run.h5"
    pack_run(open_run(small_run(tmp_path / "run", world_size=1, steps=2, corrupt=False)), archive)
    collecting: list[bool] = []

    class Store(io.BytesIO):
        def read(self, size=-1):
            collecting.append(gc.isenabled())
            return super().read(size)

        def seek(self, offset, whence=io.SEEK_SET):
            collecting.append(gc.isenabled())
            return super().seek(offset, whence)

    with h5py.File(StoreFile(Store(archive.read_bytes())), "r") as handle:
        assert handle.attrs["source"] == str(tmp_path / "run")
    assert collecting and not any(collecting)
    assert gc.isenabled()


def test_a_last_step_rewritten_in_place_after_the_listing_is_read_as_it_is_now(tmp_path):
    """The Recorder rewrites its last step in place (`record`'s optimizer hooks add to it)
    after a reader at a `file://` URL listed the run: the step was read against its listed
    size and skipped, 'step 4: torn: header cut at 288 of 312 bytes', where the local path
    reads it."""
    import shutil

    import stabledrl_cli as sd

    run, again = tmp_path / "run", tmp_path / "again"
    for path, extra in ((run, {}), (again, {"reward_mean": 0.75})):
        with sd.Recorder(path, policy=None) as rec:
            for step in range(5):
                rec.log_step(step, grad_norm=1.0, loss=0.5, **(extra if step == 4 else {}))
    opened = open_run(run.as_uri())
    with opened.snapshot():
        assert opened.listed_step_numbers == [0, 1, 2, 3, 4]
        last = "steps/step-00000004.safetensors"
        shutil.copy(again / last, run / "steps" / ".rewritten")
        os.replace(run / "steps" / ".rewritten", run / last)
        assert [header.step for header in opened.step_headers()] == [0, 1, 2, 3, 4]
        assert opened.header_findings() == []
        steps, rewards = opened.scalar_series("reward_mean")
        assert (steps.tolist(), rewards.tolist()) == ([4], [0.75])
