"""Files the user names on the command line: a baseline or an imported log is read bounded
and never waits on a FIFO or reads a device for ever; an output (baseline, JUnit, archive,
plot) replaces a regular file atomically, and anything else of that name (a symlink, a FIFO, a
device) is written in place, as a shell's `>` writes it, never replaced by a file. Only FIFOs
and symlinks under the test's own directory are used: a regression must not replace a device
of the machine."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from _cli import cli_command, cli_environment, run_cli
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli._atomic import output_path, write_output
from stabledrl_cli._regular import NotRegularFile, open_regular
from stabledrl_cli.cli.app import app
from stabledrl_cli.errors import WriteError
from stabledrl_cli.replay import baseline_file

runner = CliRunner()
QUICK = 60.0
"""Seconds a refusal may take in a real process (the refused read or write itself is instant)."""
GATED = ("check", "-p", "grpo", "--max-nonfinite", "1000")
"""A check of one policy with a gate that passes, before the run's path."""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("user_files") / "run"
    rng = np.random.default_rng(0)
    with sd.Recorder(path, policy="grpo", unit="token") as rec:
        for step in range(4):
            logp_old = -rng.random((4, 6)).astype(np.float32)
            rec.log_step(
                step,
                logp=logp_old + 0.01,
                logp_old=logp_old,
                advantages=rng.normal(size=4).astype(np.float32),
                mask=np.ones((4, 6), dtype=bool),
                group_id=np.arange(4) // 2,
                reward=rng.random(4).astype(np.float32),
            )
    return path


def _read_fifo(fifo: Path) -> tuple[threading.Thread, list[bytes]]:
    """A thread that opens `fifo` for reading and collects all that is written to it."""
    received: list[bytes] = []

    def read() -> None:
        with open(fifo, "rb") as handle:
            received.append(handle.read())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader, received


def test_a_baseline_that_is_a_fifo_or_a_device_is_refused_unread(run, tmp_path):
    """`check -b` of a FIFO with no writer waited for ever, and of /dev/zero read until the
    machine killed it: each is now one line and exit 3 at once (a device is only opened, never
    read, so /dev/zero is safe to name here)."""
    fifo = tmp_path / "baseline.json"
    os.mkfifo(fifo)
    said = {
        fifo: "the baseline pipe gave nothing (no process wrote to it)",
        Path("/dev/zero"): "the baseline is not a file or a pipe",
    }
    for named, why in said.items():
        done = run_cli("check", run, "-b", named, "--format", "json", timeout=QUICK)
        assert done.returncode == 3, done.stderr
        assert done.stderr == f"error: {named}: {why}\n"


def test_a_baseline_from_a_shells_process_substitution_is_read(run, tmp_path):
    """`check -b <(git show main:ci/baseline.json)`, a baseline read from version control in
    CI, was refused: 'the baseline is not a regular file', exit 3. A pipe is read to its end
    (within PIPE_SECONDS, at most BASELINE_LIMIT bytes), a slow writer waited for."""
    written = tmp_path / "b.json"
    wrote = runner.invoke(app, ["check", str(run), "-p", "grpo", "--write-baseline", str(written)])
    assert wrote.exit_code == 0, wrote.output
    command = " ".join(shlex.quote(str(part)) for part in cli_command("check", run))
    done = subprocess.run(
        ["bash", "-c", f"{command} -b <(sleep 0.5; cat {shlex.quote(str(written))})"],
        capture_output=True, text=True, timeout=QUICK, env=cli_environment(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "check passed" in done.stderr


def test_a_baseline_pipe_whose_writer_never_ends_is_refused(run, tmp_path, monkeypatch):
    monkeypatch.setattr(baseline_file, "PIPE_SECONDS", 0.3)
    fifo = tmp_path / "baseline.json"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)  # holds the FIFO open for writing, writes nothing
    try:
        result = runner.invoke(app, ["check", str(run), "-p", "grpo", "-b", str(fifo)])
    finally:
        os.close(writer)
    assert result.exit_code == 3, result.output
    assert result.stderr == (
        f"error: {fifo}: cannot read the baseline (its writer gave no end in 0.3 s)\n"
    )


def test_a_baseline_through_a_symlink_is_read(run, tmp_path):
    written = tmp_path / "v3.json"
    wrote = runner.invoke(app, ["check", str(run), "-p", "grpo", "--write-baseline", str(written)])
    assert wrote.exit_code == 0, wrote.output
    link = tmp_path / "baseline.json"
    link.symlink_to(written)
    checked = runner.invoke(app, ["check", str(run), "-b", str(link)])
    assert checked.exit_code == 0, checked.output


def test_outputs_through_a_symlink_write_its_target_and_keep_the_link(run, tmp_path):
    """A baseline and a JUnit report named by a symlink (to a file, or to nothing yet) write
    the file it names; before, the rename replaced the link itself with a file."""
    kept, missing = tmp_path / "kept.json", tmp_path / "missing.xml"
    kept.write_text("old")
    baseline_link, junit_link = tmp_path / "baseline.json", tmp_path / "check.xml"
    baseline_link.symlink_to(kept)
    junit_link.symlink_to(missing)
    done = runner.invoke(
        app,
        [*GATED, str(run), "--write-baseline", str(baseline_link), "--junit", str(junit_link)],
    )
    assert done.exit_code == 0, done.output
    assert baseline_link.is_symlink() and junit_link.is_symlink()
    assert '"schema"' in kept.read_text() and missing.read_text().startswith("<?xml")


def test_outputs_to_a_fifo_are_streamed_to_its_reader(run, tmp_path):
    """A JUnit report and a baseline named by a FIFO go to the process reading it; before, the
    rename replaced the FIFO with a file and the reader never got a byte."""
    junit, baseline = tmp_path / "junit.fifo", tmp_path / "baseline.fifo"
    os.mkfifo(junit)
    os.mkfifo(baseline)
    readers = [_read_fifo(junit), _read_fifo(baseline)]
    done = runner.invoke(
        app,
        [*GATED, str(run), "--junit", str(junit), "--write-baseline", str(baseline)],
    )
    assert done.exit_code == 0, done.output
    for reader, _ in readers:
        reader.join(QUICK)
    (_, xml), (_, text) = readers
    assert xml[0].startswith(b"<?xml") and b'"schema"' in text[0]
    assert stat.S_ISFIFO(os.lstat(junit).st_mode) and stat.S_ISFIFO(os.lstat(baseline).st_mode)


def test_an_output_to_a_fifo_nobody_reads_is_refused_at_once(run, tmp_path):
    """Opening a FIFO for writing waits for a reader: the write is refused instead (exit 4,
    one line), in a real process that would otherwise hang."""
    fifo = tmp_path / "check.xml"
    os.mkfifo(fifo)
    done = run_cli(*GATED, run, "--junit", fifo, timeout=QUICK)
    assert done.returncode == 4, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"error: --junit {fifo}: cannot write it (a FIFO that no process reads)"
    )
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_each_report_that_cannot_be_written_is_named_by_its_option(run):
    """`check --junit /dev/full --write-baseline /dev/full` printed 'error: /dev/full: cannot
    write it (no space left on device)' twice: which report failed, the lines did not say."""
    args = [*GATED, str(run), "--junit", "/dev/full", "--write-baseline", "/dev/full"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 4, done.output
    assert done.stderr.splitlines()[-2:] == [
        "error: --write-baseline /dev/full: cannot write it (no space left on device)",
        "error: --junit /dev/full: cannot write it (no space left on device)",
    ]


@pytest.mark.parametrize("stdout", ["pipe", "file"])
def test_a_report_to_a_link_to_the_standard_output_is_printed(run, tmp_path, stdout):
    """`--junit /dev/stdout` is a link to the process's standard output, as this link is:
    the report is printed there with the table (the link, like /dev/stdout, is left as it
    was). When the standard output is a file, the report goes in at the descriptor's offset:
    replacing the file, or truncating it as a shell's `>` would, lost the table."""
    link = tmp_path / "stdout.xml"
    link.symlink_to("/proc/self/fd/1")
    command = cli_command(*GATED, run, "--junit", link)
    printed = tmp_path / "printed.txt"
    with open(printed, "w") as into:
        done = subprocess.run(
            command,
            stdout=subprocess.PIPE if stdout == "pipe" else into,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_environment(),
            timeout=QUICK,
        )
    assert done.returncode == 0, done.stderr
    text = done.stdout if stdout == "pipe" else printed.read_text()
    report = text.index("<?xml"), text.index("</testsuites>")
    table = text.index("┏"), text.index("max_nonfinite │")  # the table, whole, after it
    assert report[0] < report[1] < table[0] < table[1]
    assert link.is_symlink()


@pytest.mark.parametrize("how", ["write_output", "output_path"])
def test_a_regular_file_is_replaced_and_a_link_written_through(tmp_path, how):
    """The two writers agree: a regular file (or no file) is replaced by a new file, and so
    is a link's target, the link kept; a failed write in place is a WriteError naming what
    the user named."""

    def write(target: Path, data: bytes) -> None:
        if how == "write_output":
            write_output(target, data)
            return
        with output_path(target) as temp:
            temp.write_bytes(data)

    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"old")
    inode = plain.stat().st_ino
    write(plain, b"new")
    assert plain.read_bytes() == b"new" and plain.stat().st_ino != inode
    target, link = tmp_path / "target.bin", tmp_path / "link.bin"
    target.write_bytes(b"old and longer")
    inode = target.stat().st_ino
    link.symlink_to(target)
    write(link, b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"
    assert target.stat().st_ino != inode  # replaced whole, beside it
    fifo = tmp_path / "nobody.fifo"
    os.mkfifo(fifo)
    with pytest.raises(WriteError, match=r"nobody\.fifo: cannot write it"):
        write(fifo, b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["plain.bin", "target.bin", "link.bin", "nobody.fifo"]
    )


def test_a_named_input_is_opened_only_when_it_is_a_regular_file(tmp_path):
    """The one way a run's files, a baseline and an imported log are opened: a FIFO with no
    writer, a directory and (unless links are followed) a symlink are refused at once, on
    the open descriptor, and a regular file is read with its size."""
    data = tmp_path / "data.json"
    data.write_bytes(b"{}")
    fifo, link = tmp_path / "fifo.json", tmp_path / "link.json"
    os.mkfifo(fifo)
    link.symlink_to(data)
    for name in (fifo, tmp_path):
        with pytest.raises(NotRegularFile):
            open_regular(name)
    with pytest.raises(OSError):
        open_regular(link, follow_links=False)
    for name in (data, link):
        handle, info = open_regular(name)
        with handle:
            assert (handle.read(), info.st_size) == (b"{}", 2)


def test_an_imported_log_that_is_a_fifo_is_refused_unread(tmp_path):
    fifo = tmp_path / "metrics.jsonl"
    os.mkfifo(fifo)
    done = run_cli("import", fifo, "--out", tmp_path / "run", timeout=QUICK)
    assert done.returncode == 3, done.stderr
    assert done.stderr == f"error: {fifo}: not a regular file\n"


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_an_import_onto_a_file_names_it_as_given(tmp_path, monkeypatch, force):
    """`import LOG --out f` over a file said 'error: /abs/path/f exists and is not a
    directory' (the Recorder's absolute path, after the log was read), where record says
    '--out f' and every other line of import names the path as given."""
    monkeypatch.chdir(tmp_path)
    Path("f").write_text("mine")
    log = Path(__file__).resolve().parents[1] / "fixtures/imports/trl-lr0.3/trainer_state.json"
    done = CliRunner().invoke(app, ["import", str(log), "--out", "f", *force])
    assert (done.exit_code, done.stderr) == (2, "error: f exists and is not a directory\n")
    assert Path("f").read_text() == "mine"
