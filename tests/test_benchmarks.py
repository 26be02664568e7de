"""The benchmarks behind the README's figures refuse options they cannot measure with, in one
usage line (argparse's exit 2), instead of running and dying on an empty median."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import runpy
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest

from stabledrl_cli.errors import install_command

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--steps", "3", "--warmup", "3"], "--steps more than --warmup (3)"),
        (["--repeats", "1", "--steps", "2", "--warmup", "1", "--paired-steps", "4"],
         "--paired-steps at least 2 x --block (4 steps in blocks of 5"),
        (["--block", "1"], "--block must be >= 2"),
    ],
)  # fmt: skip
def test_hook_overhead_refuses_a_shape_that_times_no_step(args: list[str], words: str) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "hook_overhead.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert words in done.stderr.splitlines()[-1]
    assert done.stdout == ""


def test_trl_parity_aligns_its_columns_under_the_longest_configuration_name(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("trl")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as `python benchmarks/...` has it
    spec = importlib.util.spec_from_file_location(
        "trl_parity", ROOT / "benchmarks" / "trl_parity.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "parity", lambda name, where: ("grpo", 2.5e-07, 2.2e-08))
    names = ["grpo", "gspo-delta-below-eps-high"]
    monkeypatch.setattr(sys, "argv", ["trl_parity.py", "--only", *names])
    module.main()
    header, *rows = capsys.readouterr().out.splitlines()
    ends = {re.match(r"\S+\s+\S+", line).end() for line in rows}  # type: ignore[union-attr]
    assert ends == {header.index("worst rel") + len("worst rel")}, [header, *rows]


def test_the_docs_count_the_configurations_trl_parity_runs() -> None:
    """`benchmarks/trl_parity.py --trainer grpo` (and `rloo`) run the configurations of
    tests/trl_scripts/tiny_configs.py: docs/frameworks.md says how many its figures cover."""
    sys.path.insert(0, str(ROOT / "tests" / "trl_scripts"))
    try:
        from tiny_configs import PARITY, RLOO_PARITY  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(ROOT / "tests" / "trl_scripts"))
    page = " ".join((ROOT / "docs" / "frameworks.md").read_text(encoding="utf-8").split())
    assert f"trl_parity.py --trainer grpo` records {len(PARITY)} TRL configurations" in page
    assert f"trl_parity.py --trainer rloo`: {len(RLOO_PARITY)} RLOO configurations" in page


def test_calibrate_drift_refuses_runs_shorter_than_its_longest_window(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run shorter than a window has no rolling mean to judge: the table read `nan` and
    'does NOT separate' for that window (the default's), under numpy's all-NaN warnings."""
    spec = importlib.util.spec_from_file_location(
        "calibrate_drift", ROOT / "benchmarks" / "calibrate_drift.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as refused:
        module.main(["--seeds", "1", "--steps", "8", "--estimators", "elbo", "--record-only",
                     "--runs-dir", str(tmp_path)])  # fmt: skip
    assert refused.value.code == 2
    assert "--steps 8 is shorter than the window of 50 steps" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


PRELOADED_RUNNER = """
import json, os, runpy, sys, tempfile
import h5py, numpy, torch  # what most benchmarks import before they parse: once, not a script
import stabledrl_cli.replay.engine

root, commands = sys.argv[1], json.loads(sys.argv[2])
started = {}
for script, *args in commands:
    err = tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:  # the benchmark, as `python SCRIPT ARGS` runs it: its own process and streams
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(err.fileno(), 2)
        code = 1
        try:
            sys.argv = [os.path.join(root, script), *args]
            sys.path[0] = os.path.dirname(sys.argv[0])
            runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    started[pid] = (" ".join([script, *args]), err)
stderrs = {}
for pid, (command, err) in started.items():
    os.waitpid(pid, 0)
    err.seek(0)
    stderrs[command] = err.read().decode(errors="replace")
print(json.dumps(stderrs))
"""
"""Runs each benchmark command given as JSON (argv[2]) in a process of its own, forked from one
that imported torch, numpy and h5py once (each benchmark imports them before it parses its
options: 18 interpreters importing torch took most of this test's time); prints each command's
stderr as JSON."""


def test_each_benchmark_command_of_a_code_block_parses_as_written() -> None:
    """Each `python benchmarks/NAME.py ...` line of a README or docs code block, its options
    followed by one no script takes: argparse names that option, not a missing argument
    (the Development block's bare `collapse_suite.py` lacked its phase: exit 2)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    commands = {
        tuple(shlex.split(found.group(1), comments=True))
        for page in pages
        for block in re.findall(r"```[a-z]*\n(.*?)```", page.read_text(encoding="utf-8"), re.S)
        for found in re.finditer(r"^python (benchmarks/\S+\.py.*)$", block, re.M)
    }
    assert len(commands) >= 15
    given = [
        [*(command[: command.index(">")] if ">" in command else command),
         "--not-an-option-of-any-benchmark"]
        for command in sorted(commands)
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", PRELOADED_RUNNER, str(ROOT), json.dumps(given)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    stderrs = json.loads(done.stdout)
    assert len(stderrs) == len(commands)
    refused = [
        f"{command}: {stderr.strip()[-200:]}"
        for command, stderr in stderrs.items()
        if "unrecognized arguments: --not-an-option-of-any-benchmark" not in stderr
    ]
    assert not refused, refused


def test_collapse_real_records_and_evaluates_one_short_run_of_each_kind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`collapse_real.py record` then `evaluate --format json` on one short example run (one
    `stabledrl record` process) and one short TRL run: the JSON keys docs/collapse.md names."""
    pytest.importorskip("trl")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import collapse_real  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    names = ["lr0.001_llada_seed1", "trl_grpo_reward_zero_s2"]
    shape = ["--cache", str(tmp_path), "--steps", "8", "--trl-steps", "3", "--seeds", "1",
             "--only", *names]  # fmt: skip
    assert collapse_real.main(["record", *shape]) == 0
    capsys.readouterr()
    assert collapse_real.main(["evaluate", *shape, "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["confusion"]) == {"warned_collapsed", "quiet_collapsed", "warned_held",
                                        "quiet_held"}  # fmt: skip
    assert sum(report["confusion"].values()) == 2
    assert set(report["held_flagged"]) <= {"example", "trl"}
    assert [(r["name"], r["kind"], r["steps"]) for r in report["runs"]] == [
        (names[0], "example", 8), (names[1], "trl", 3)
    ]  # fmt: skip
    assert set(report["runs"][0]) == {
        "name", "kind", "label", "steps", "warning_first", "observed_collapse",
        "recorded_spikes", "nonfinite", "risk_steps", "bias_steps",
    }  # fmt: skip
    assert set(report["runs"][0]["label"]) == {"collapsed", "reason", "best", "last", "rollouts"}


COMMANDS = sorted(
    path for path in (ROOT / "benchmarks").glob("*.py") if "ArgumentParser(" in path.read_text()
)


@pytest.mark.parametrize("path", COMMANDS, ids=[path.stem for path in COMMANDS])
def test_a_benchmarks_help_says_its_whole_first_paragraph(
    path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--help` describes a benchmark by its docstring's first paragraph, not its first line
    (flat_likelihood_warning.py's stopped at '... never fell, and')."""
    monkeypatch.syspath_prepend(str(path.parent))
    monkeypatch.setattr(sys, "argv", [path.name, "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(path), run_name="__main__")
    assert done.value.code == 0
    docstring = ast.get_docstring(ast.parse(path.read_text()))
    assert docstring
    paragraph = " ".join(docstring.split("\n\n")[0].split())
    shown = " ".join(capsys.readouterr().out.split()).replace("- ", "-")
    assert paragraph.replace("- ", "-") in shown


@pytest.mark.parametrize(
    ("script", "args", "module", "extra", "present"),
    [
        ("trl_overhead.py", [], "trl", "trl", ()),
        ("trl_parity.py", ["--only", "grpo"], "datasets", "trl", ("trl",)),
        ("collapse_real.py", ["record", "--only", "trl_grpo_s0"], "trl", "trl", ()),
        ("ray_speedup.py", ["--repeats", "1"], "ray", "ray", ()),
    ],
)
def test_a_benchmark_without_its_extra_names_the_install_command(
    script: str,
    args: list[str],
    module: str,
    extra: str,
    present: tuple[str, ...],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without its extra, a benchmark ended in a ModuleNotFoundError traceback once its work
    had started (collapse_real.py record: after the example runs, minutes in). It says so in
    one line with the install command, exit 2, as a stabledrl command does. `present`: modules
    stood in for (installed or not here), so the one named is `module` in any environment."""
    for name in present:  # the benchmark exits before it uses them
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(ROOT / "benchmarks"), *sys.path])
    monkeypatch.setattr(sys, "argv", [str(ROOT / "benchmarks" / script), *args])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(sys.argv[0], run_name="__main__")
    assert done.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == (
        f"error: {script} needs {module}, which is not installed: {install_command(extra)}\n"
    )
    assert captured.out == ""
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("script", "args", "words"),
    [
        ("trl_overhead.py", ["--steps", "1"], "--steps: must be >= 2, got 1"),
        ("trl_overhead.py", ["--threads", "0"], "--threads: must be >= 1, got 0"),
        ("tune_cost.py", ["--repeats", "0"], "--repeats: must be >= 1, got 0"),
        ("ray_speedup.py", ["--repeats", "0"], "--repeats: must be >= 1, got 0"),
        ("replay_speed.py", ["--repeats", "-1"], "--repeats: must be >= 1, got -1"),
        ("geometry_cost.py", ["--trainer-repeats", "0"], "--trainer-repeats: must be >= 1"),
        ("archive_open.py", ["--repeats", "x"], "--repeats: expected an integer, got 'x'"),
        ("fused_policy.py", ["--steps", "0"], "--steps: must be >= 1, got 0"),
        ("geometry_cost.py", ["--seqs", "0"], "--seqs: must be >= 1, got 0"),
        ("geometry_cost.py", ["--trainer-steps", "0"], "--trainer-steps: must be >= 1, got 0"),
        ("fused_bound.py", ["--policies", "0"], "--policies: must be >= 1, got 0"),
        ("hook_overhead.py", ["--warmup", "-1"], "--warmup: must be >= 0, got -1"),
    ],
)
def test_a_benchmark_refuses_a_count_that_measures_nothing(
    script: str,
    args: list[str],
    words: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--repeats 0 (tune_cost, ray_speedup, replay_speed...), trl_overhead's --steps 1 (its
    first step is not timed) or --threads 0 ran, then ended in 'StatisticsError: no median
    for empty data' (or torch's RuntimeError) after the work: argparse's usage line now."""
    monkeypatch.setattr(sys, "path", [str(ROOT / "benchmarks"), *sys.path])
    monkeypatch.setattr(sys, "argv", [str(ROOT / "benchmarks" / script), *args])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(sys.argv[0], run_name="__main__")
    assert done.value.code == 2
    assert words in capsys.readouterr().err.splitlines()[-1]
