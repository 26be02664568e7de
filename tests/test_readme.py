"""The runnable blocks of the README and docs/ run as written: the TRL snippet (in the README
and docs/frameworks.md) is the one a test records with, the CI recipe and the GitHub
Actions steps of docs/ci.md (all but the install) pass, in order, with
`examples/train_logged.py` as the user's `train.py` (the workflow's record step is the
recipe's, run once), and docs/geometry.md's own loop records geometry a replay measures."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.replay.report import BEST_RULE

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
SNIPPET_SCRIPT = ROOT / "tests" / "trl_scripts" / "snippet_train.py"
TRAIN_SCRIPT = ROOT / "examples" / "train_logged.py"


def blocks_after(marker: str) -> list[str]:
    """Each fenced code block right after `<!-- test: MARKER -->` in the README and docs/."""
    pattern = rf"<!-- test: {re.escape(marker)} -->\n```[a-z]*\n(.*?)\n```"
    found = [
        block for page in PAGES for block in re.findall(pattern, page.read_text("utf-8"), re.S)
    ]
    assert found, f"no page has a code block marked {marker!r}"
    return found


def block_after(marker: str) -> str:
    """The one fenced code block marked `<!-- test: MARKER -->` in the README and docs/."""
    (block,) = blocks_after(marker)
    return block


def workflow_steps(yaml_text: str) -> list[str]:
    """The shell commands of the workflow's `run:` steps, in order (a `run: |` block joined)."""
    commands: list[str] = []
    lines = yaml_text.splitlines()
    i = 0
    while i < len(lines):
        found = re.match(r"^(\s*)(?:- )?run: (.*)$", lines[i])
        i += 1
        if not found:
            continue
        indent, value = len(found.group(1)), found.group(2)
        if value.strip() != "|":
            commands.append(value)
            continue
        block = []
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > indent):
            block.append(lines[i].strip())
            i += 1
        commands.append("\n".join(line for line in block if line))
    return commands


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def run_shell(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
    env.pop("STABLEDRL_DEBUG", None)
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_best_rule_reads_the_same_in_the_docs_as_in_the_tool() -> None:
    for page in (README, ROOT / "docs" / "replay.md"):
        assert " ".join(BEST_RULE.split()) in " ".join(page.read_text(encoding="utf-8").split())


def test_the_trl_snippet_is_the_one_a_test_records_with() -> None:
    script = SNIPPET_SCRIPT.read_text(encoding="utf-8")
    marked = re.search(r"# --- README snippet -+\n(.*?)\n# --- end of README snippet", script, re.S)
    assert marked, "the TRL snippet script lost its README markers"
    for block in blocks_after("trl-snippet"):
        assert block.strip() == marked.group(1).strip()


def test_the_ci_recipe_and_the_github_workflow_run_as_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the workflow's --plot needs the plot extra")
    shutil.copy(TRAIN_SCRIPT, tmp_path / "train.py")
    recipe = block_after("ci-recipe")
    done = run_shell(recipe, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ci" / "stability.baseline.json").is_file()

    steps = workflow_steps(block_after("github-actions"))
    install, *rest = steps
    assert install.startswith("pip install"), install
    assert len(rest) == 2, rest
    record, gate = rest
    # The workflow records its run as the recipe recorded the baseline's (the baseline's gates
    # are strict), so the recipe's run above is the one the workflow's first step records.
    assert record == recipe.splitlines()[0], record
    result = run_shell(gate, tmp_path)
    assert result.returncode == 0, f"{gate}\n{result.stderr}"
    assert (tmp_path / "reports" / "stability.xml").read_text().count("<testcase") > 0
    assert (tmp_path / "reports" / "stability.png").stat().st_size > 0


def test_record_geometry_beside_a_command_points_at_a_loop_that_records_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`record --geometry gram -- CMD` is refused; its line sent users to a module's source
    (`see stabledrl_cli.capture.geometry`), and no page said how a loop of their own records
    geometry. The line names the page's section, whose loop records it: replayed, its own
    policy's norm equals the recorded pre-clip norm."""
    refused = CliRunner().invoke(
        app, ["record", "--out", str(tmp_path / "run"), "--geometry", "gram", "--", "true"]
    )
    assert refused.exit_code == 2
    section = " ".join(refused.stderr.split()).partition("(docs/geometry.md, ")[2].partition(")")[0]
    assert section and f"\n## {section}\n" in (ROOT / "docs" / "geometry.md").read_text("utf-8")
    monkeypatch.chdir(tmp_path)
    exec(compile(block_after("geometry-loop"), "geometry-loop", "exec"), {})
    result = sd.replay("runs/geo", policies=["grpo"])
    assert result.geometry == "gram" and result.policies[0].summary_dict()["fidelity"] < 1e-5
