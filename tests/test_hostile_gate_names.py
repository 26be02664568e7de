"""A step file may name a scalar with megabytes of characters, and a baseline may gate that
series: the gate `baseline.recorded.NAME.STAT` went whole into its stderr line, the table's
cell (wrapped over hundreds of lines) and the JUnit test case's name (the XML as large as the
input). The name is cut there as any value of an input is, its length said; two names cut
alike stay two test cases; `--format json` has the gate whole."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from _corpus import edit_header, tiny_run
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

runner = CliRunner()
LONG = 100_000
NAME = "s" * LONG
TWIN = "s" * (LONG - 1) + "t"
"""Cut at 40 characters, as `NAME` is: the same text, the same length."""


def _checked(tmp_path: Path, *args: str) -> list[str]:
    """`check`'s arguments on a run recording NAME and TWIN, gating both against a baseline
    (their max above 0 trips), and a series the run lacks."""
    run = edit_header(
        tiny_run(tmp_path / "run"), 1, lambda h: h["__metadata__"].update({NAME: "1.5", TWIN: "2"})
    )
    tol = {"value": 0.0, "worse": "higher", "abs_tol": 0.0, "rel_tol": 0.0}
    settings = {"spike_factor": 10.0, "window": 50, "drift_threshold": -0.15}
    recorded = {NAME: {"max": tol, "min": tol}, TWIN: {"max": tol}, "u" * LONG: {"max": tol}}
    baseline = tmp_path / "baseline.json"
    baseline.write_text(
        json.dumps(
            {
                "schema": "stabledrl-baseline",
                "version": 1,
                "replay": settings,
                "recorded": recorded,
                "policies": {},
            }
        )
    )
    return ["check", str(run), "--baseline", str(baseline), *args]


def test_a_gate_on_a_long_series_name_is_a_short_line(tmp_path: Path) -> None:
    args = _checked(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.stderr[:500]
    lines = [line for line in result.stderr.splitlines() if line.startswith("  (run) ")]
    assert len(lines) == 4, lines
    assert all(len(line) < 300 + len(str(tmp_path)) for line in lines), [
        line[:300] for line in lines
    ]
    cut = f"recorded.{'s' * 40!r}... ({LONG:,} characters)"
    assert f"  (run) baseline.{cut}.max: {cut}.max 1.5, baseline 0:" in result.stderr
    assert len(result.stdout) < 20_000, len(result.stdout)
    assert f"{cut}.min" in result.stdout


def test_the_json_has_the_gate_whole(tmp_path: Path) -> None:
    args = _checked(tmp_path, "--format", "json")
    result = runner.invoke(app, args)
    gates = {gate["gate"] for gate in json.loads(result.stdout)["gates"]}
    assert {f"baseline.recorded.{NAME}.max", f"baseline.recorded.{TWIN}.max"} <= gates


def test_the_junit_names_are_cut_and_unique(tmp_path: Path) -> None:
    report = tmp_path / "junit.xml"
    args = _checked(tmp_path, "--junit", str(report))
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.stderr[:500]
    assert report.stat().st_size < 10_000, report.stat().st_size
    names = [case.get("name", "") for case in ET.parse(report).iter("testcase")]
    assert len(names) == len(set(names)) == 4, names
    cut = f"recorded.{'s' * 40!r}... ({LONG:,} characters)"
    assert f"baseline.{cut}.max" in names  # NAME's
    assert f"baseline.{cut}.max #2" in names  # TWIN's
    assert f"baseline.present (recorded.{'u' * 40!r}... ({LONG:,} characters).max)" in names
