"""What a person sees at 80, 120 and 250 columns: `policies` never splits a `key=value` pair
nor a long line past the terminal (a table when it fits whole, one block a policy when not)."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import re
import shutil

import pytest
from _corpus import tiny_run
from conftest import fixture_run
from rich.console import JUPYTER_DEFAULT_COLUMNS, Console
from rich.measure import Measurement
from rich.table import Table
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli._inspect_tables import series_table
from stabledrl_cli.cli.app import app
from stabledrl_cli.replay.gate import GateResult
from stabledrl_cli.replay.recorded import SeriesStats
from stabledrl_cli.replay.report import print_detail
from stabledrl_cli.replay.top_sequences import TopSequence
from stabledrl_cli.spec import format_value
from stabledrl_cli.tables import print_fitted

WIDTHS = (80, 120, 250)
LONG_SPEC = "tis=token-truncate,tis_min=0.000001,tis_max=123456.789,beta=0.001"
runner = CliRunner()


def _run(args: list[str], width: int) -> str:
    result = runner.invoke(app, args, env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    return result.stdout


def _pairs(args: list[str]) -> set[str]:
    """Every `key=value` the table shows, from the JSON of the same command."""
    rows = json.loads(_run([*args, "--format", "json"], 250))["policies"]
    return {
        f"{key}=(required)" if key in row["required"] else f"{key}={format_value(value)}"
        for row in rows
        for key, value in row["params"].items()
        if value is not None or key in row["required"]
    }


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize(
    "args",
    [
        ["policies"],
        ["policies", "-p", "gspo", "-p", "two-sided:delta=4", "-p", "dapo"],
        ["policies", "-p", f"grpo:{LONG_SPEC},eps_low=0.1,eps_high=0.28,kl_max=1e30", "-p", "is"],
    ],
)
def test_policies_never_split_a_pair_and_fit_the_width(args, width):
    """A spec given with -p heads its block: one longer than the terminal
    (`grpo:beta=0.001,...,tis_min=1e-06`, 106 characters) was printed whole on one line, past
    80 columns; it is broken after its name or a comma, as replay and tune break one."""
    text = _run(args, width)
    assert max(len(line) for line in text.splitlines()) <= width
    words = set(text.replace("│", " ").split())
    for pair in _pairs(args):
        assert pair in words, f"{pair} is split at {width} columns"


def test_piped_output_without_columns_keeps_whole_rows(monkeypatch):
    """The README: piped with COLUMNS unset, a table keeps its natural width up to 250
    columns (a file or a grep gets whole rows), not the 80 rich assumes of a non-terminal."""
    monkeypatch.delenv("COLUMNS", raising=False)
    text = runner.invoke(app, ["policies"]).stdout
    assert "┃ name" in text
    assert 80 < max(len(line) for line in text.splitlines()) <= 250


def test_policies_is_a_table_when_wide_and_blocks_when_narrow():
    assert "┃ name" in _run(["policies"], 250)
    narrow = _run(["policies"], 80)
    assert "┃" not in narrow and re.search(r"\n  defaults +eps_low=0\.2 eps_high=0\.2", narrow)


POLICIES = ["-p", "grpo", "-p", "two-sided:delta=4", "-p", "cispo"]


@pytest.fixture(scope="module")
def grpo_figures(grpo_fixture) -> dict[str, list[str]]:
    """Each policy's cells of the default view, from the replay's JSON."""
    data = json.loads(_run(["replay", str(grpo_fixture), *POLICIES, "-f", "json"], 250))
    cells = {}
    for p in data["policies"]:
        s = p["summary"]
        risk = s["collapsed_steps"]
        cells[p["spec"]] = [
            f"{s['discard_frac']:.1%}", str(len(s["drift_steps"])), str(len(risk)),
            str(risk[0]) if risk else "-",
        ]  # fmt: skip
    return cells


def _row(text: str, spec: str) -> str:
    rows = [line for line in text.splitlines() if line.startswith(f"│ {spec} ")]
    assert len(rows) == 1, f"{spec}: {len(rows)} table lines"
    return rows[0]


@pytest.mark.parametrize("width", (60, 80))
@pytest.mark.parametrize("args", [["policies"], ["replay", "GRPO", "--detail"]])
def test_no_output_line_ends_in_padding(grpo_fixture, args, width):
    """Rich pads a table's last column and keeps the space a wrapped line broke at: piped to a
    file, every such line carried invisible spaces (`policies` at 80 columns: 133 lines)."""
    args = [str(grpo_fixture) if a == "GRPO" else a for a in args]
    result = runner.invoke(app, args, env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    padded = [line for line in result.output.splitlines() if line.endswith(" ")]
    assert not padded, padded[:3]


@pytest.mark.parametrize("width", WIDTHS)
def test_replay_default_view_fits_one_line_a_policy(grpo_fixture, grpo_figures, width):
    text = _run(["replay", str(grpo_fixture), *POLICIES, "--device", "cpu"], width)
    assert max(len(line) for line in text.splitlines()) <= width
    for spec, cells in grpo_figures.items():
        words = _row(text, spec).replace("│", " ").split()
        assert all(cell in words for cell in cells), (spec, cells, words)
    assert "first risk: the first step flagged" in text  # the legend, a line per column
    assert "best: fewest bias steps" in text


@pytest.mark.parametrize("width", WIDTHS)
def test_replay_without_geometry_wraps_its_note_to_the_width(tmp_path, width):
    """The note under the table of a run without gradient geometry (89 characters) wraps."""
    text = _run(["replay", str(tiny_run(tmp_path / "run")), "--device", "cpu"], width)
    assert max(len(line) for line in text.splitlines()) <= width
    assert "update norm = coefficient norm" in text
    assert "no gradient geometry" in " ".join(text.split())


def test_replay_wide_and_no_legend(grpo_fixture, grpo_figures):
    text = _run(["replay", str(grpo_fixture), *POLICIES, "--wide", "--no-legend"], 80)
    assert "norm max" in text and "cos own" in text
    for spec, cells in grpo_figures.items():  # overflowing the terminal, never cut nor wrapped
        words = _row(text, spec).replace("│", " ").split()
        assert all(cell in words for cell in cells) and "…" not in _row(text, spec)
    assert "best: fewest bias steps" not in text and "first risk: the first" not in text


def test_replay_warns_on_an_empty_step_range(grpo_fixture):
    result = runner.invoke(
        app, ["replay", str(grpo_fixture), "-p", "grpo", "--steps", "1000:2000"],
        env={"COLUMNS": "80"},
    )  # fmt: skip
    assert result.exit_code == 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: --steps 1000:2000 selects no step of "
        f"{grpo_fixture} (160 steps replayed); no per-step rows"
    ]


def _check_rows(text: str) -> list[tuple[str, str, str, str, str]]:
    """The (policy, gate, status, figure, limit) of each gate's line of a check table: its
    policy in its own column, or a line of its own above its gates (a baseline gate then shown
    by its key in the baseline file)."""
    cells = [
        [cell.strip() for cell in line.strip("│").split("│")]
        for line in text.splitlines()
        if line.startswith("│ ")
    ]
    if "┃ policy" in text:
        return [(policy, gate, status, figure, limit) for policy, gate, status, figure, limit,
                *_ in cells if policy]  # fmt: skip
    rows, policy = [], None
    for gate, status, figure, limit, *_ in cells:
        if not gate:  # the next line of a gate's wrapped detail
            continue
        if not status:  # a policy's line
            policy = gate
            continue
        name = gate if gate in GATE_NAMES else f"baseline.{gate}"
        rows.append((policy, name, status, figure, limit))
    return rows


GATE_NAMES = {"max_collapsed", "max_discard_frac", "max_nonfinite", "max_spikes",
              "reward_collapse"}  # fmt: skip
"""The gates that are not read against a baseline file."""


@functools.cache
def _expected_rows(args: tuple[str, ...]) -> list[tuple[str, str, str, str, str]]:
    """Each gate's (policy, gate, status, figure, limit), from the JSON of the same check
    (one command whatever the width: run once for the widths)."""
    result = runner.invoke(app, [*args, "--format", "json"], env={"COLUMNS": "250"})
    return [
        (g["policy"] or "(run)", g["gate"], "ok" if g["ok"] else "FAILED",
         *GateResult(**g).shown())
        for g in json.loads(result.stdout)["gates"]
    ]  # fmt: skip


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("baseline", [False, True], ids=["limits", "baseline"])
def test_check_prints_one_line_a_gate(grpo_fixture, baseline, width):
    """Every gate on a line of its own that fits the width, with its policy, status, figure
    and limit; the baseline's gate names (up to 45 characters) made the table 114 wide."""
    gates = (
        ["-b", str(grpo_fixture.parent / "grpo.baseline.json")]
        if baseline
        else [*POLICIES, "--max-collapsed", "0", "--max-discard-frac", "0.5"]
    )
    args = ["check", str(grpo_fixture), *gates, "--device", "cpu"]
    result = runner.invoke(app, args, env={"COLUMNS": str(width)})
    assert result.exit_code == (0 if baseline else 1), result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= width, result.stdout
    assert _check_rows(result.stdout) == _expected_rows(tuple(args))


def test_a_long_run_path_never_widens_a_table(grpo_fixture, tmp_path):
    """The title names the run; wherever the run lives, the table still fits 80 columns."""
    run = tmp_path / ("a-directory-name-long-enough-to-overflow-a-title-line" * 2) / "grpo"
    shutil.copytree(grpo_fixture, run)
    replay = _run(["replay", str(run), *POLICIES, "--device", "cpu"], 80)
    assert max(len(line) for line in replay.splitlines()) <= 80
    result = runner.invoke(app, ["check", str(run), *POLICIES, "--max-collapsed", "0",
                                 "--device", "cpu"], env={"COLUMNS": "80"})  # fmt: skip
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    # diff's and watch's first lines name the runs: wrapped too (they ran past 80 columns)
    for args in (["diff", str(run), str(grpo_fixture)], ["watch", str(run), "--once"]):
        result = runner.invoke(app, args, env={"COLUMNS": "80"})
        assert result.exit_code == 0, result.output
        assert max(len(line) for line in result.stdout.splitlines()) <= 80, result.stdout


def test_the_consoles_take_columns_when_they_print_not_when_made(monkeypatch):
    """The CLI's consoles are made at import; a COLUMNS set later (by a test runner's worker,
    or a program embedding the CLI) is the one a table is drawn to."""
    from stabledrl_cli.cli import _output

    monkeypatch.setenv("COLUMNS", "80")
    made_at_80 = (_output._DataConsole(), _output._LiveConsole(stderr=True))
    monkeypatch.setenv("COLUMNS", "137")
    assert [console.width for console in made_at_80] == [137, 137]
    assert _output._LiveConsole(width=90).width == 90
    assert _output._LiveConsole(force_jupyter=True).width == JUPYTER_DEFAULT_COLUMNS


def test_pack_wraps_its_summary_to_the_width(grpo_fixture, tmp_path, monkeypatch):
    """pack's one line names the run and the archive (99 columns for the grpo fixture): it
    wraps at the width, its words whole, as import's does."""
    monkeypatch.chdir(tmp_path)
    text = _run(["pack", str(grpo_fixture), "grpo.h5"], 80)
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert text.split()[:3] == ["packed", "160", "steps"]
    assert {str(grpo_fixture), "grpo.h5:", "MB", "->"} <= set(text.split())


def test_diff_wraps_the_title_naming_both_own_policies(grpo_fixture, tmp_path):
    """The title over diff's table names each run's own policy spec: runs trained with
    settings of their own made it 113 wide; it wraps at the width, each spec whole."""
    specs = {"a": "grpo:eps_high=0.28,eps_low=0.15", "b": "two-sided:delta=4"}
    text = _diff_of_own_policies(grpo_fixture, tmp_path, specs)
    assert max(len(line) for line in text.splitlines()) <= 80, text
    words = text.split()
    assert f"(A {specs['a']}," in " ".join(words) and f"B {specs['b']})" in " ".join(words)


def _diff_of_own_policies(grpo_fixture, tmp_path, specs: dict[str, str], width: int = 80) -> str:
    """diff's output at `width` columns of two runs that part, their own policies `specs`."""
    for (name, spec), run in zip(
        specs.items(), (grpo_fixture, fixture_run("stabledrl")), strict=True
    ):
        shutil.copytree(run, tmp_path / name)
        manifest = tmp_path / name / "manifest.json"
        data = json.loads(manifest.read_text())
        data["policy"]["spec"] = spec
        manifest.write_text(json.dumps(data))
    result = runner.invoke(app, ["diff", str(tmp_path / "a"), str(tmp_path / "b")],
                           env={"COLUMNS": str(width)})  # fmt: skip
    assert result.exit_code == 1, result.output  # they part
    return result.stdout


def test_check_figures_fit_80_columns(grpo_fixture, tmp_path):
    """check --write-baseline without a gate shows the figures it writes, a column per metric
    headed by its baseline key: 107 wide at 80 columns; the keys now stack a word a line."""
    written = tmp_path / "base.json"
    args = ["check", str(grpo_fixture), *POLICIES, "--write-baseline", str(written)]
    text = _run([*args, "--device", "cpu"], 80)
    assert max(len(line) for line in text.splitlines()) <= 80, text
    baseline = json.loads(written.read_text())["policies"]
    for spec, metrics in baseline.items():
        words = _row(text, spec).replace("│", " ").split()
        assert len(words) == 1 + len(metrics) and words[0] == spec
    headers = " ".join(line for line in text.splitlines() if line.startswith("┃"))
    assert {"collapsed", "discard", "update", "median"} <= set(headers.replace("┃", " ").split())


def test_tune_ranks_a_grid_of_two_keys_in_80_columns(tmp_path):
    """A sweep over two keys names each setting by both (30 characters): the ranking was 84
    wide at 80 columns; its headers now stack a word a line, each setting shown whole."""
    grid = "grpo:eps_low=0.1|0.3,eps_high=0.2|0.28"
    args = ["tune", str(tiny_run(tmp_path / "run")), "-p", grid, "--no-own", "--device", "cpu"]
    lines = _run(args, 80).splitlines()
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    settings = [s["spec"] for s in json.loads(_run([*args, "-f", "json"], 250))["settings"]]
    assert len(settings) == 4
    for spec in settings:
        assert len([line for line in lines if f"│ {spec} " in line]) == 1, spec
    headers = [line for line in lines if line.startswith("┃")]
    assert "disc." in headers[0] and "grad" in headers[1]  # "disc. grad", stacked


def test_inspect_shows_each_recorded_series_name_whole(grpo_fixture, tmp_path):
    """inspect's recorded series at 80 columns folded a name inside its cell (grad_norm /
    _clipped, inner_ste / p). Each name is now whole on its line, the non-finite count wrapped
    under the step count: 80 columns; where a name is too long for the table to fit the width,
    each series is a block, its name whole on a line (the table overflowed the terminal)."""
    lines = _run(["inspect", str(grpo_fixture)], 80).splitlines()
    table = lines[lines.index("Recorded series (finite values)") :]
    assert max(len(line) for line in table) <= 80, "\n".join(table)
    for name in ("grad_norm_clipped", "grad_norm_covered", "inner_step", "surrogate_loss"):
        assert len([line for line in table if line.startswith(f"│ {name} ")]) == 1, name
    long_name = "completions/mean_terminated_length_of_the_clipped_ones"
    with sd.Recorder(tmp_path / "run", policy=None) as rec:
        for step in range(3):
            rec.log_step(step, grad_norm=float("nan"), scalars={long_name: 1.0})
    lines = _run(["inspect", str(tmp_path / "run")], 80).splitlines()
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    assert lines.count(long_name) == 1 and lines.count("grad_norm") == 1


def test_inspect_breaks_a_series_name_longer_than_the_width(tmp_path):
    """A recorded scalar of a 250-character name (an import keeps up to 256) headed its block
    on one line of 250 columns at 80, where the run table's list of scalars wraps it. It is
    broken at the width, its lines together the name."""
    long_name = "m" * 120 + "/" + "n" * 129
    with sd.Recorder(tmp_path / "run", policy=None) as rec:
        for step in range(3):
            rec.log_step(step, grad_norm=1.0, scalars={long_name: 1.0})
    lines = _run(["inspect", str(tmp_path / "run")], 80).splitlines()
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    series = lines[lines.index("Recorded series (finite values)") :]
    first = next(i for i, line in enumerate(series) if line.startswith("mmm"))
    assert "".join(series[first : first + 4]) == long_name


def test_the_series_left_out_of_blocks_are_counted_within_the_width():
    """Past the 200 series shown, the caption counting the rest ran to 50 columns at 40 (the
    terminal broke it inside a word) where the series were blocks. It wraps at its spaces."""
    stats = SeriesStats(
        steps=3, nonfinite=0, first=1.0, last=2.0, min=1.0, max=2.0, mean=1.5, median=1.5,
        tail=1.5,
    )  # fmt: skip
    series = {f"a_long_recorded_metric_name_number_{n}": stats for n in range(250)}
    console = Console(width=40, record=True, file=io.StringIO(), soft_wrap=True)
    print_fitted(series_table(series, "Recorded series (finite values)"), console)
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 40, lines[-2:]
    assert " ".join(lines[-2:]) == "... and 50 more series: --format json has them all"


LONG_SPECS = tuple(
    f"ppo:agg=seq-mean-token-mean,eps_high=0.28,eps_low={low},rows=all"
    for low in ("0.123456", "0.123457")
)
"""Two 67-character specs that part late, as a sweep's settings do."""


def _spec_cells(text: str, column: int) -> list[str]:
    """The cells of a table's `column` (1: its first), a line each."""
    return [line.split("│")[column].strip() for line in text.splitlines() if line.startswith("│")]


def _shown_whole(text: str, column: int, specs: tuple[str, ...] = LONG_SPECS) -> None:
    """Each of `specs` is in the column's lines joined, each key=value whole on a line."""
    cells = _spec_cells(text, column)
    for spec in specs:
        assert spec in "".join(cells), cells
        for part in re.split("[:,]", spec):
            assert any(part in cell for cell in cells), (part, cells)


@pytest.mark.parametrize("command", ["replay", "tune", "check"])
def test_long_specs_are_folded_at_their_commas_in_80_columns(tmp_path, command):
    """Two 67-character specs made replay's table 115 columns wide at 80, tune's 112 and the
    figures of check --write-baseline 119, a spec on one line. Each is now broken at its
    commas onto the lines below its row: 72, 76 and 77 wide. replay --wide still shows a spec
    on one line (every column, overflowing)."""
    run = str(tiny_run(tmp_path / "run"))
    args = [command, run, "-p", LONG_SPECS[0], "-p", LONG_SPECS[1], "--device", "cpu"]
    if command == "check":
        args += ["--write-baseline", str(tmp_path / "baseline.json")]
    if command == "tune":
        sweep = "ppo:agg=seq-mean-token-mean,eps_high=0.28,eps_low=0.123456|0.123457,rows=all"
        args = ["tune", run, "-p", sweep, "--device", "cpu"]
    text = _run(args, 80)
    assert max(len(line) for line in text.splitlines()) <= 80, text
    _shown_whole(text, 2 if command == "tune" else 1)
    if command == "replay":
        wide = _run([*args, "--wide"], 80)
        for spec in LONG_SPECS:
            assert len([line for line in wide.splitlines() if f"│ {spec} " in line]) == 1


def test_inspect_breaks_a_long_policy_at_its_commas(tmp_path):
    """inspect folded a run's 67-character policy at the column's edge, inside a value:
    'ppo:agg=seq-mean-token-mean,eps_high=0.28,eps_low=0.1' over '23456,rows=all', eps_low
    read as 0.1. It is now broken at a comma."""
    with sd.Recorder(tmp_path / "run", policy=LONG_SPECS[0]) as rec:
        rec.log_step(0, grad_norm=1.0)
    text = _run(["inspect", str(tmp_path / "run")], 80)
    assert max(len(line) for line in text.splitlines()) <= 80, text
    _shown_whole(text[: text.index("Integrity")], 2, LONG_SPECS[:1])


def test_watch_breaks_a_long_own_policy_at_its_commas(tmp_path):
    """watch --once folded a 110-character own policy at the 80th column, inside a value
    ('...,rows=all,tis=token-tr' over 'uncate,...'). It is now on the lines below its step
    count, broken at its commas."""
    spec = f"{LONG_SPECS[0]},tis=token-truncate,tis_max=2.5,tis_min=0.5"
    with sd.Recorder(tmp_path / "run", policy=spec) as rec:
        rec.log_step(0, grad_norm=1.0)
    lines = _run(["watch", str(tmp_path / "run"), "--once", "--device", "cpu"], 80).splitlines()
    assert max(len(line) for line in lines) <= 80, lines
    start = lines.index("steps: 1 (last 0); own policy:") + 1
    shown = lines[start : start + 2]
    assert "".join(shown) == spec and all(line.endswith(",") for line in shown[:-1]), shown


LONGER = "ppo:adv=rloo,agg=seq-mean-token-mean,eps_high=0.2812345,eps_low=0.1234567,rows=all"
"""A spec of 83 characters: past a line of 80."""


def _lines_from(lines: list[str], start: str) -> list[str]:
    """The lines from the first that starts with `start` to the end."""
    return lines[next(i for i, line in enumerate(lines) if line.startswith(start)) :]


def _broken_between_pairs(lines: list[str], spec: str) -> None:
    """`spec` is in `lines` broken only between its parts: each key=value whole on a line."""
    assert spec in "".join(lines), lines
    for part in re.split("[:,]", spec):
        assert any(part in line for line in lines), (part, lines)


def test_tune_breaks_a_long_recommended_setting_between_its_pairs(tmp_path):
    """tune's recommended line split an 83-character setting at the 80th column, inside a
    value. It now breaks after a comma."""
    sweep = LONGER.replace("eps_low=0.1234567", "eps_low=0.1234567|0.1234568")
    args = ["tune", str(tiny_run(tmp_path / "run")), "-p", sweep, "--no-own", "--device", "cpu"]
    lines = _run(args, 80).splitlines()
    recommended = _lines_from(lines, "recommended:")
    assert max(len(line) for line in recommended) <= 80, recommended
    spec = json.loads(_run([*args, "-f", "json"], 250))["recommended"]
    _broken_between_pairs(recommended, spec)


def test_diff_breaks_a_long_own_policy_in_its_title_between_its_pairs(grpo_fixture, tmp_path):
    """diff's title over its table split an 83-character own policy at the 80th column, inside
    a value. It now breaks after a comma."""
    text = _diff_of_own_policies(grpo_fixture, tmp_path, {"a": LONGER, "b": "stabledrl"})
    title = _lines_from(text.splitlines(), "around step")
    title = title[: next(i for i, line in enumerate(title) if "step" in line.split()[:1])]
    assert max(len(line) for line in title) <= 80, title
    _broken_between_pairs(title, LONGER)


def test_replay_breaks_the_runs_own_policy_between_its_pairs(grpo_fixture):
    """replay's note that the run's own policy is not replayed split it at 60 columns inside a
    pair, 'eps_high' over '=0.2': copied, it is another spec. It now breaks after a comma."""
    own = sd.open_run(grpo_fixture).policy_spec
    lines = _run(["replay", str(grpo_fixture), "-p", "dapo", "--device", "cpu"], 60).splitlines()
    note = _lines_from(lines, "the run's own policy")
    note = note[: next(i for i, line in enumerate(note) if "is not among" in line) + 1]
    assert max(len(line) for line in note) <= 60, note
    _broken_between_pairs(note, own)


def test_replay_stacks_its_headers_to_fit_a_long_pair_in_60_columns(tmp_path):
    """At 60 columns replay's table was 65 wide: `agg=seq-mean-token-mean,` (24 characters)
    had 19 beside the headers on a line. Where a pair does not fit, the headers stack a word
    a line, which leaves it room: 60 wide, each pair whole."""
    run = str(tiny_run(tmp_path / "run"))
    args = ["replay", run, "-p", LONG_SPECS[0], "-p", "grpo", "--device", "cpu", "--no-legend"]
    text = _run(args, 60)
    table = [line for line in text.splitlines() if line[:1] in "┏┃┡│└"]
    assert max(len(line) for line in table) <= 60, "\n".join(table)
    _shown_whole(text, 1, LONG_SPECS[:1])
    assert "first" in table[1] and "risk" in table[2]  # "first risk", stacked


def test_inspect_keeps_the_run_id_whole_in_60_columns(tmp_path):
    """At 60 columns inspect folded the 32-character run id inside (30 and 2), and its
    integrity line ran to 67 columns. The labels now wrap at their spaces to leave the id and
    the policy's lines whole, and the line wraps: 60 wide."""
    with sd.Recorder(tmp_path / "run", policy=LONG_SPECS[0], unit="sequence") as rec:
        rec.log_step(0, grad_norm=1.0)
    text = _run(["inspect", str(tmp_path / "run")], 60)
    run_id = json.loads(_run(["inspect", str(tmp_path / "run"), "-f", "json"], 60))["run_id"]
    run = text[: text.index("Observed")].splitlines()
    assert max(len(line) for line in run) <= 60, "\n".join(run)
    assert any(f"│ {run_id} " in line for line in run), "\n".join(run)
    _shown_whole(text[: text.index("Integrity")], 2, LONG_SPECS[:1])


PAIR = "dapo:agg=seq-mean-token-mean"
"""A spec with a 24-character pair: tables beside it ran past 60 columns."""


def _fits_in_blocks(text: str, width: int) -> None:
    """`text` fits `width` and holds no table line (its rows are blocks)."""
    assert max(len(line) for line in text.splitlines()) <= width, text
    assert not any(line[:1] in "┏┃│" for line in text.splitlines()), text


def test_tune_and_check_figures_are_blocks_where_no_table_fits(tmp_path):
    """At 60 columns, with a 24-character pair, tune's ranking was 69 wide and the figures of
    check --write-baseline 76 (stacked headers and folded specs were not enough). Each row is
    now a block: its spec whole on a line, then `header: cell` pairs."""
    run = str(tiny_run(tmp_path / "run"))
    args = ["tune", run, "-p", f"{PAIR},eps_high=0.2|0.28", "--device", "cpu"]
    text = _run(args, 60)
    _fits_in_blocks(text[: text.index("* recommended")], 60)
    ranked = json.loads(_run([*args, "-f", "json"], 250))
    for s in ranked["settings"]:
        mark = "* " if s["spec"] == ranked["recommended"] else "f " if s["on_front"] else ""
        heading = f"{mark}{s['spec']}{'' if s['tuned'] else ' (own)'}"
        assert heading in text.splitlines(), (heading, text)
    written = tmp_path / "base.json"
    args = ["check", run, "-p", PAIR, "-p", "grpo", "--write-baseline", str(written)]
    text = _run([*args, "--device", "cpu"], 60)
    _fits_in_blocks(text[text.index("figures of") :], 60)
    lines = text.splitlines()
    for spec, metrics in json.loads(written.read_text())["policies"].items():
        block = " ".join(lines[lines.index(spec) + 1 :][:3])
        assert all(f"{key}: " in block for key in metrics), (spec, block)


def test_a_settings_mark_heads_its_spec_where_the_spec_is_broken():
    """tune at 40 columns put a setting's mark on a line of its own ('*', then
    'dapo:agg=seq-mean-token-mean,' and 'eps_high=0.25'): a spec wider than the line took
    the whole of the next. The mark now starts the spec's first line."""
    table = Table()
    for header in ("", "setting", "risk", "disc. grad"):
        table.add_column(header, no_wrap=True)
    table.add_row("*", "dapo:agg=seq-mean-token-mean,eps_high=0.25", "6", "30.5%")
    console = Console(width=40, record=True, file=io.StringIO(), soft_wrap=True)
    print_fitted(table, console, lead=2)
    assert console.export_text().splitlines() == [
        "* dapo:agg=seq-mean-token-mean,",
        "eps_high=0.25",
        "  risk: 6  disc. grad: 30.5%",
    ]


def test_inspect_series_and_diffs_around_step_table_fit_60_columns(grpo_fixture, tmp_path):
    """At 60 columns inspect's recorded series were 70 wide, diff's nine columns around the
    step where two runs part 71: a block a series (its name, then its figures), a step."""
    text = _run(["inspect", str(grpo_fixture)], 60)
    series = text[text.index("Recorded series") :]
    _fits_in_blocks(series, 60)
    assert "grad_norm_clipped" in series.splitlines() and "  steps: 160  first: " in series
    text = _diff_of_own_policies(grpo_fixture, tmp_path, {"a": "grpo", "b": PAIR}, width=60)
    around = text[text.index("around step") :]
    _fits_in_blocks(around, 60)
    assert re.search(r"^step: \d+\n  rew A: \S+  rew B: ", around, re.M), around


def _with_top(result, spec=None):
    """`result` with one flagged step, 29, and its top sequence, in each policy (`--detail`)."""
    top = [
        TopSequence(
            seq_id=60, group=7, reward=0.2, advantage=-0.275, log_ratio=-0.00345, contribution=38.9
        )
    ]
    policies = [
        dataclasses.replace(p, detail={29: top}, spec=spec or p.spec) for p in result.policies
    ]
    return dataclasses.replace(result, policies=policies)


def test_detail_tables_are_sized_without_measuring_each_cell(grpo_fixture_replay, monkeypatch):
    """`replay --detail` prints the per-step rows and a table per flagged step's top sequences
    (478 on the grpo fixture): rich measured every cell of each to size its columns, 45% of
    the 2.7 s the tables took to print. Given the widths of their widest cells, rich measures
    none where a table fits."""
    result = _with_top(grpo_fixture_replay)
    measured = []
    get = Measurement.get.__func__

    def counted(cls, console, options, renderable):
        if not isinstance(renderable, Table):
            measured.append(renderable)
        return get(cls, console, options, renderable)

    monkeypatch.setattr(Measurement, "get", classmethod(counted))
    console = Console(file=io.StringIO(), width=80)
    print_detail(result, console, legend=False)
    text = console.file.getvalue()
    assert "step 29: sequences contributing most" in text and "│ 38.9 " in text
    assert not measured, measured[:5]


@pytest.mark.parametrize("width", (50, 80))
def test_detail_top_sequences_are_never_cut_and_their_title_wraps(grpo_fixture_replay, width):
    """A flagged step's top sequences (`--detail`) were a table rich fitted to the terminal:
    in 50 columns it cut their figures (-0.275 shown as -0.2…, on 1,853 lines of the grpo
    fixture's), and in 80 a long spec's title ran past it (98 characters). Where the table
    does not fit it is a block a sequence, its figures whole, and its title is wrapped, at a
    comma or a space."""
    spec = "grpo:agg=seq-mean-token-sum,eps_high=0.28,eps_low=0.15,rows=all"
    console = Console(file=io.StringIO(), width=width, soft_wrap=True)  # as stdout's
    print_detail(_with_top(grpo_fixture_replay, spec), console, legend=False)
    text = console.file.getvalue()
    assert "…" not in text
    if width == 80:
        assert "│ -0.275    │ -0.00345  │ 38.9         │" in text
    else:
        assert "seq id: 60\n  group: 7  reward: 0.2  advantage: -0.275\n" in text
        assert "  log ratio: -0.00345  contribution: 38.9\n" in text
    titles = [line for line in text.splitlines() if "step 29" in line or "contributing" in line]
    assert titles and max(map(len, titles)) <= width, titles
