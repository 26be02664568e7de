"""A file output that is the command's own standard output (`/dev/stdout`, or the file stdout
is redirected to): `pack` pipes its archive on with the summary on stderr; a report of
`replay`, `check` or `tune` that is binary (`--out`'s HDF5, `--plot`'s PNG), whose results
go to stdout too, is refused (exit 2) instead of written into one stream with them (an HDF5
report that ended in the results table); a text report (`--junit`) is printed beside them
(tests/test_user_files.py), but for results printed as JSON (`--format json`), refused too."""

from __future__ import annotations

import subprocess
from pathlib import Path

from _cli import TIMEOUT, cli_command, cli_environment
from _corpus import tiny_run

import stabledrl_cli as sd


def _run_to(stdout: Path, *args: object) -> subprocess.CompletedProcess[str]:
    """`stabledrl ARGS...` in a process of its own, its stdout written to the file `stdout`."""
    with stdout.open("wb") as sink:
        return subprocess.run(
            cli_command(*args), stdout=sink, stderr=subprocess.PIPE, text=True,
            env=cli_environment(), stdin=subprocess.DEVNULL, timeout=TIMEOUT,
        )  # fmt: skip


def test_an_archive_packed_to_stdout_holds_the_archive_alone(tmp_path: Path) -> None:
    run = tiny_run(tmp_path / "run")
    piped = tmp_path / "piped.h5"
    done = _run_to(piped, "pack", run, "/dev/stdout", "--force")
    assert done.returncode == 0, done.stderr
    assert "packed 4 steps" in done.stderr
    assert sd.open_run(piped).step_numbers == sd.open_run(run).step_numbers
    assert b"packed" not in piped.read_bytes()[-200:]
    json_too = _run_to(tmp_path / "x.h5", "pack", run, "/dev/stdout", "--force", "--format", "json")
    assert json_too.returncode == 2
    assert json_too.stderr == (
        "error: /dev/stdout is the standard output, where --format json prints the summary; "
        "give a file name, or drop --format json (the summary then goes to stderr)\n"
    )


def test_a_report_on_stdout_is_refused_before_the_replay(tmp_path: Path) -> None:
    run = tiny_run(tmp_path / "run")
    report = tmp_path / "report.h5"
    for args, flag, target in [
        (("replay", run, "--out", "/dev/stdout"), "--out", "/dev/stdout"),
        (("replay", run, "--out", report), "--out", report),
        (("check", run, "--max-collapsed", "9", "--plot", report.with_suffix(".png")),
         "--plot", report.with_suffix(".png")),
    ]:  # fmt: skip
        done = _run_to(target if flag == "--plot" else report, *args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr == (
            f"error: {flag} {target} is the standard output, where the results are printed; "
            "give a file name\n"
        )
        assert Path(target if flag == "--plot" else report).read_bytes() == b""


def test_reports_and_stdout_all_to_dev_null_are_no_clash(tmp_path: Path) -> None:
    run = tiny_run(tmp_path / "run")
    with open("/dev/null", "wb") as sink:
        done = subprocess.run(
            cli_command("replay", run, "--out", "/dev/null"), stdout=sink,
            stderr=subprocess.PIPE, text=True, env=cli_environment(), timeout=TIMEOUT,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_a_text_report_on_stdout_is_refused_under_format_json(tmp_path: Path) -> None:
    """`check --format json` prints only JSON: a `--junit` or `--write-baseline` that is its
    stdout would go before the JSON into one stream, which no JSON reader then takes (it was
    written there, exit 0). Refused before the replay, as pack's archive is (exit 2)."""
    run = tiny_run(tmp_path / "run")
    for flag in ("--junit", "--write-baseline"):
        printed = tmp_path / f"printed{flag}.json"
        done = _run_to(
            printed, "check", run, "--max-nonfinite", "9", flag, "/dev/stdout", "--format", "json"
        )
        assert done.returncode == 2, (flag, done.stderr)
        assert done.stderr == (
            f"error: {flag} /dev/stdout is the standard output, where --format json prints the "
            "results; give a file name, or drop --format json (the report is then printed "
            "beside the table)\n"
        )
        assert printed.read_bytes() == b""
