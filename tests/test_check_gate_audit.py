"""`stabledrl check` as a CI job runs it: the exit code says the verdict, whatever becomes of
the lines on stderr."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest
from _cli import TIMEOUT, cli_command, cli_environment
from _corpus import tiny_run
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app


@pytest.mark.parametrize(
    ("gate", "code", "ok"),
    [(("--max-nonfinite", "9"), 0, True), (("--max-collapsed", "0"), 1, False)],
    ids=["holds", "trips"],
)
def test_a_check_with_its_stderr_closed_exits_with_its_verdict(
    tmp_path: Path, gate: tuple[str, ...], code: int, ok: bool
) -> None:
    """`check ... 2>&-` (Python's sys.stderr None): its stderr lines go nowhere, its JSON to
    stdout and its exit code is the verdict's. It was 70, an internal error, held gate and
    tripped one alike: the replay's progress asked the missing stderr whether it is a
    terminal. (A tiny run's 4 steps leave max_collapsed not judged: tripped.)"""
    run = tiny_run(tmp_path / "run")
    command = shlex.join(cli_command("check", run, *gate, "--format", "json"))
    done = subprocess.run(
        f"exec {command} 2>&-", shell=True, capture_output=True, text=True,
        env=cli_environment(), stdin=subprocess.DEVNULL, timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode == code and done.stderr == "", (done.returncode, done.stderr)
    assert json.loads(done.stdout)["ok"] is ok


@pytest.mark.parametrize("flag", ["--write-baseline", "--junit"])
@pytest.mark.parametrize("place", ["manifest.json", "steps/report.xml"])
def test_a_report_into_another_run_is_refused_and_the_run_kept(
    tmp_path: Path, flag: str, place: str
) -> None:
    """`check ci --write-baseline old/manifest.json` replaced the manifest of the run `old`, a
    run kept nowhere else, with a baseline (exit 0, the run unreadable after), where a packed
    run is never replaced and a report inside the run read is refused. A report anywhere in
    another run is refused too, before the replay (exit 2), and that run left as it was."""
    run, other = tiny_run(tmp_path / "ci"), tiny_run(tmp_path / "old")
    before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    target = other / place
    done = CliRunner().invoke(app, ["check", str(run), "--max-nonfinite", "9", flag, str(target)])
    assert done.exit_code == 2, done.output
    assert done.stderr == (
        f"error: {flag} {target} is inside the run {other}; write it outside the run\n"
    )
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before


def test_rewriting_a_baseline_that_names_no_policy_keeps_it_so(tmp_path: Path) -> None:
    """`check RUN -b B --write-baseline B` rewrites B "with B's replay settings and policies"
    (docs/ci.md). A B that gates the run alone (`"policies": {}`) came back gating every policy
    of the catalogue, which the check had replayed for want of a list: the next check then
    gated policies nobody had chosen. The rewrite keeps B's policies, here none."""
    run = tiny_run(tmp_path / "run")
    baseline = tmp_path / "b.json"
    wrote = CliRunner().invoke(
        app, ["check", str(run), "-p", "grpo", "--write-baseline", str(baseline)]
    )
    assert wrote.exit_code == 0, wrote.output
    data = json.loads(baseline.read_text())
    data["policies"] = {}
    baseline.write_text(json.dumps(data))
    done = CliRunner().invoke(
        app, ["check", str(run), "-b", str(baseline), "--write-baseline", str(baseline)]
    )
    assert done.exit_code == 0, done.output
    assert json.loads(baseline.read_text())["policies"] == {}
    assert f"wrote baseline {baseline} (0 policies," in done.stderr


def test_a_run_shorter_than_the_baselines_trips_and_a_longer_one_is_noted(tmp_path: Path) -> None:
    """A run missing the baseline run's last steps (a training cut short, steps lost) passed
    its gates with a note: figures it never reached (a later collapse, a spike) cannot trip.
    Such a check now trips `baseline.present`; a longer run is still compared, with the note.
    (The first 20 of the 30 steps are alike: every other gate of the shorter run holds.)"""
    full, short = tiny_run(tmp_path / "full", steps=30), tiny_run(tmp_path / "short", steps=20)
    baseline = tmp_path / "baseline.json"
    wrote = CliRunner().invoke(
        app, ["check", str(full), "-p", "grpo", "--write-baseline", str(baseline)]
    )
    assert wrote.exit_code == 0, wrote.output
    done = CliRunner().invoke(app, ["check", str(short), "-b", str(baseline), "--format", "json"])
    assert done.exit_code == 1, done.output
    tripped = [g for g in json.loads(done.stdout)["gates"] if not g["ok"]]
    assert [g["gate"] for g in tripped] == ["baseline.present"]
    assert tripped[0]["message"] == (
        "the run has 20 steps, the baseline's run had 30: its gates cannot judge the steps it lacks"
    )
    shorter = tmp_path / "shorter.json"
    wrote = CliRunner().invoke(
        app, ["check", str(short), "-p", "grpo", "--write-baseline", str(shorter)]
    )
    assert wrote.exit_code == 0, wrote.output
    longer = CliRunner().invoke(app, ["check", str(full), "-b", str(shorter), "--format", "json"])
    assert "the baseline's run had 20: step counts are compared as they are" in longer.stderr
    assert "cannot judge the steps it lacks" not in longer.stdout
