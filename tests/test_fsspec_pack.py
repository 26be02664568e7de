"""`stabledrl pack URL OUT.h5`: a run read in place through fsspec (`memory://`, `file://`) packs
into the archive its local path packs into (the same datasets, filters and attributes; only
the names of the source, and of the files its findings name, are the URL), whose replay is
the same JSON; each step file is read once; a bad URL, a bad run at a URL or a URL as OUT is
one line on stderr with its exit code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import fsspec
import h5py
import numpy as np
import pytest
from _cli import run_cli_together
from _fsspec_runs import count_reads, small_run, to_memory
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
CORRUPT_FILE = "steps/step-00000005.rank-0000.safetensors"
"""The file `small_run` corrupts, inside the run."""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return small_run(tmp_path_factory.mktemp("fsspec_pack") / "run")


def url_of(run: Path, scheme: str) -> str:
    return to_memory(run) if scheme == "memory" else run.absolute().as_uri()


def pack_json(source: str, out: Path) -> dict:
    result = runner.invoke(app, ["pack", source, str(out), "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def contents(archive: Path) -> dict[str, object]:
    """Every attribute and dataset of an archive: name -> its value (a dataset's with its
    dtype, shape, chunks and filters)."""
    found: dict[str, object] = {}
    with h5py.File(archive, "r") as handle:
        for key, value in handle.attrs.items():
            found[f"@{key}"] = value

        def visit(name: str, item: object) -> None:
            if isinstance(item, h5py.Dataset):
                filters = (item.compression, item.compression_opts, item.shuffle, item.fletcher32)
                found[name] = (item.dtype.str, item.shape, item.chunks, filters, item[()])
                for key, value in item.attrs.items():
                    found[f"{name}@{key}"] = value

        handle.visititems(visit)
    return found


def same_value(a: object, b: object) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    return bool(a == b)


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_pack_of_a_url_is_the_pack_of_its_local_path(run_dir, tmp_path, monkeypatch, scheme):
    """Both archives hold the same datasets, values, filters and attributes, but the source's
    name (`source`, and the integrity findings' paths, with their checksum); replaying each
    (under the same name) prints the same JSON, byte for byte."""
    url = url_of(run_dir, scheme)
    (tmp_path / "local").mkdir()
    (tmp_path / "url").mkdir()
    local = pack_json(str(run_dir), tmp_path / "local" / "run.h5")
    remote = pack_json(url, tmp_path / "url" / "run.h5")
    assert (local["run"], remote["run"]) == (str(run_dir), url)
    assert [f["path"] for f in remote["integrity"]["findings"]] == [f"{url}/{CORRUPT_FILE}"]
    assert [f["path"] for f in local["integrity"]["findings"]] == [f"{run_dir}/{CORRUPT_FILE}"]
    for summary in (local, remote):
        del summary["run"], summary["out"]
        summary["integrity"]["findings"][0]["path"] = CORRUPT_FILE
    assert remote == local and remote["steps"] == 8
    assert remote["source_bytes"] == sum(
        f.stat().st_size for f in run_dir.rglob("*") if f.is_file()
    )

    packed = {name: contents(tmp_path / name / "run.h5") for name in ("local", "url")}
    assert (packed["local"].pop("@source"), packed["url"].pop("@source")) == (str(run_dir), url)
    local_integrity = packed["local"].pop("integrity")
    url_integrity = packed["url"].pop("integrity")
    del packed["local"]["integrity@crc32"], packed["url"]["integrity@crc32"]
    assert url_integrity[:4] == local_integrity[:4]  # dtype, shape, chunks, filters
    assert json.loads(url_integrity[4]) == [
        dict(f, path=f"{url}/{f['path'][len(str(run_dir)) + 1 :]}")
        for f in json.loads(local_integrity[4])
    ]
    assert packed["url"].keys() == packed["local"].keys() and "tokens/logp" in packed["url"]
    for name, value in packed["local"].items():
        assert same_value(packed["url"][name], value), name

    replays = []
    for name in ("local", "url"):
        monkeypatch.chdir(tmp_path / name)
        replayed = runner.invoke(
            app,
            [
                "replay",
                "run.h5",
                "-p",
                "grpo",
                "-p",
                "cispo",
                "--device",
                "cpu",
                "--format",
                "json",
            ],
        )
        assert replayed.exit_code == 0, replayed.output
        replays.append(replayed.stdout)
    assert replays[0] == replays[1] and json.loads(replays[0])["steps"] == 8


def test_pack_reads_each_step_file_of_a_url_once(run_dir, tmp_path, monkeypatch):
    """The pass that packs the steps checks each file in full as it reads it; the integrity
    report after it reads none again."""
    url = to_memory(run_dir)
    whole, _ = count_reads(monkeypatch)
    assert pack_json(url, tmp_path / "run.h5")["steps"] == 8
    step_files = [p for p in whole if "/steps/" in p]
    assert len(step_files) == len(set(step_files)) == 2 * 9  # every file of both ranks, once


def test_a_torn_step_at_a_url_is_packed_around_and_named_by_its_url(tmp_path):
    """A truncated step file: the run is packed without it (exit 0), the one warning line and
    the finding carried into the archive name the run and the file by the URL."""
    run = small_run(tmp_path / "run", world_size=1, steps=4, corrupt=False)
    url = to_memory(run)
    torn = "/" + url.removeprefix("memory://") + "/steps/step-00000002.safetensors"
    memory = fsspec.filesystem("memory")
    memory.pipe(torn, memory.cat_file(torn)[:-50])
    out = tmp_path / "run.h5"
    result = runner.invoke(app, ["pack", url, str(out)])
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if not line.startswith("packing:")]
    assert warned == [
        f"warning: {url} has 1 integrity finding(s) (torn); packed its 3 readable steps, left "
        "out 1 damaged and carried the findings into the archive (stabledrl inspect shows them)"
    ]
    inspected = runner.invoke(app, ["inspect", str(out), "--format", "json"])
    (finding,) = json.loads(inspected.stdout)["integrity"]["findings"]
    assert finding["kind"] == "torn" and finding["step"] == 2
    assert finding["path"] == f"{url}/steps/step-00000002.safetensors"


def one_error_line(result, code: int) -> str:
    assert result.exit_code == code, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and result.stdout == ""
    return line


def test_bad_url_runs_and_a_url_out_are_one_line_with_their_code(run_dir, tmp_path):
    out = str(tmp_path / "out.h5")
    missing = runner.invoke(app, ["pack", "memory://no/such/run", out])
    assert one_error_line(missing, 3) == "error: no such run: memory://no/such/run"
    unknown = runner.invoke(app, ["pack", "nope://bucket/run", out])
    assert one_error_line(unknown, 2) == "error: nope://bucket/run: unknown URL scheme nope://"
    chained = runner.invoke(app, ["pack", "simplecache::memory://bucket/run", out])
    assert "chained URLs are not read" in one_error_line(chained, 2)
    cut = small_run(tmp_path / "cut", world_size=1, steps=2, corrupt=False)
    url = to_memory(cut)
    manifest = "/" + url.removeprefix("memory://") + "/manifest.json"
    memory = fsspec.filesystem("memory")
    memory.pipe(manifest, memory.cat_file(manifest)[:40])
    truncated = runner.invoke(app, ["pack", url, out])
    assert one_error_line(truncated, 3).startswith(f"error: {url}/manifest.json: ")
    to_url = runner.invoke(app, ["pack", str(run_dir), "memory://bucket/out.h5"])
    assert one_error_line(to_url, 2) == (
        "error: memory://bucket/out.h5: pack writes OUT.h5 to a local path, not a URL"
    )
    assert list(tmp_path.glob("*.h5")) == []


def test_pack_url_exit_codes_in_a_real_process(run_dir, tmp_path):
    """In a real process: a file:// URL packs (exit 0) what its path packs; a missing one is
    exit 3, an unknown scheme exit 2, each in one line; a URL as OUT, a second way to exit 2,
    in this one."""
    out = tmp_path / "run.h5"
    cases = (
        ([run_dir.as_uri(), out, "--format", "json"], 0),
        ([(tmp_path / "missing").as_uri(), tmp_path / "a.h5"], 3),
        (["nope://x/run", tmp_path / "b.h5"], 2),
    )
    runs = run_cli_together(*(["pack", *args] for args, _ in cases), timeout=120)
    ended = [(done.returncode, done.stdout, done.stderr) for done in runs]
    url_out = runner.invoke(app, ["pack", run_dir.as_uri(), "file:///tmp/out.h5"])
    ended.append((url_out.exit_code, url_out.stdout, url_out.stderr))
    for code, (returncode, stdout, stderr) in zip([0, 3, 2, 2], ended, strict=True):
        assert returncode == code, stderr
        if code:
            assert len(stderr.strip().splitlines()) == 1 and stdout == ""
        else:
            assert json.loads(stdout)["run"] == run_dir.as_uri()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]


def test_a_store_that_cannot_list_the_run_leaves_no_archive(run_dir, tmp_path, monkeypatch):
    """The run's size is listed before the archive is written: a store whose listing fails
    is one line naming the URL (exit 3), and no archive."""
    url = to_memory(run_dir)

    def refused(self, path, **kwargs):
        raise PermissionError(f"access denied to {path}")

    monkeypatch.setattr(fsspec.implementations.memory.MemoryFileSystem, "find", refused)
    result = runner.invoke(app, ["pack", url, str(tmp_path / "run.h5")])
    assert one_error_line(result, 3) == f"error: {url}: cannot list it (access denied to {url})"
    assert list(tmp_path.iterdir()) == []


def test_the_docs_document_every_key_of_the_pack_json(run_dir, tmp_path):
    """A script reads `pack --format json`; docs/run-format.md (once the README) documented
    none of its keys."""
    summary = pack_json(str(run_dir), tmp_path / "run.h5")
    assert summary["integrity"]["findings"]
    text = (REPO / "docs" / "run-format.md").read_text()
    section = text[text.index("`pack --format json` prints one JSON document") :]
    section = section[: section.index("\n\n", section.index("| key |"))]
    rows = re.findall(r"^\| ((?:`[a-z_]+`(?:, )?)+) \|", section, re.M)
    documented = {key for row in rows for key in re.findall(r"`([a-z_]+)`", row)}
    assert documented == set(summary), documented ^ set(summary)
    integrity = next(line for line in section.splitlines() if line.startswith("| `integrity`"))
    for key in [*summary["integrity"], *summary["integrity"]["findings"][0]]:
        assert f"`{key}`" in integrity, key
