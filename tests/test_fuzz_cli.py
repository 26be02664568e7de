"""The command line keeps its contract under random option combinations: a short, seeded run of
benchmarks/fuzz_cli.py (its long-running version), and its checks shown to catch a command that
breaks the contract."""

from __future__ import annotations

import hashlib
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fuzz_cli import LONGEST_LINE, broken, command_names, failure, fuzz, made_run, main, run

import stabledrl_cli.cli.inspect as inspect_command
import stabledrl_cli.cli.replay as replay_command
from stabledrl_cli.errors import InputError

FIXTURE = str(Path(__file__).resolve().parents[1] / "fixtures" / "grpo")


def _contents(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_random_command_lines_keep_the_contract() -> None:
    """60 command lines of the fuzzed commands (3,200 more, 800 from each of seeds 1-4, held
    when the fuzzer was written): no exit 70, escaped exception, traceback, hang or flooding
    line; and the checkout's fixtures as they were (`check --write-baseline` given the fixture
    baseline's own path once overwrote it with an archive: the commands write to copies)."""
    fixtures = Path(FIXTURE).parent
    before = _contents(fixtures)
    said: list[str] = []
    assert fuzz(60, seed=0, report=said.append) == []
    assert said == []
    assert _contents(fixtures) == before


def test_a_command_that_crashes_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error the tool does not expect is exit 70 (a bug of the tool): the fuzzer says so."""

    def crash(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(inspect_command, "summarize", crash)
    why = failure(["inspect", FIXTURE])
    assert why is not None and why.startswith("exit 70")


def test_a_message_that_floods_a_line_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal that quotes a crafted value whole makes a line the fuzzer flags."""

    def refuse(*args: object) -> None:
        raise InputError("x" * (LONGEST_LINE + 1))

    monkeypatch.setattr(inspect_command, "summarize", refuse)
    why = failure(["inspect", FIXTURE])
    assert why is not None and why.startswith("an output line of")


def test_the_run_a_record_made_is_replayed_and_a_failure_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `record` that exits 0 must leave a run that replays (exit 0): a replay that refuses
    it breaks the contract, and the fuzzer names the replay's line."""

    def refuse(*args: object) -> None:
        raise InputError("no step could be read")

    monkeypatch.setattr(replay_command, "open_snapshot", refuse)
    out = str(tmp_path / "run")
    why = broken(["record", "--out", out, "--rl-steps", "1", "--device", "cpu"], random.Random(0))
    assert why is not None
    assert why.startswith(f"its run then, `stabledrl replay {out}")
    assert why.endswith("exit 3: error: no step could be read")
    monkeypatch.undo()
    result, why = run(["replay", out])
    assert why is None and result is not None and result.exit_code == 0


def test_what_must_follow_a_record_or_a_branch(tmp_path: Path) -> None:
    """A run of policy batches is replayed, one of scalar steps only inspected, a script that
    records nothing followed by nothing; a branch's newest run is replayed."""
    scripts = tmp_path / "scripts"
    assert made_run(["record", "--out", "r", "--rl-steps", "2"]) == ["replay", "r"]
    assert made_run(["record", "--out", "r", "--", "py", str(scripts / "batches.py")]) == [
        "replay",
        "r",
    ]
    assert made_run(["record", "--out", "r", "--", "py", str(scripts / "scalars.py")]) == [
        "inspect",
        "r",
    ]
    assert made_run(["record", "--out", "r", "--", "py", str(scripts / "nothing.py")]) is None
    assert made_run(["inspect", "r"]) is None
    (tmp_path / "out" / "grpo@4").mkdir(parents=True)
    line = ["branch", "run", "--at", "4", "-p", "grpo", "--out", str(tmp_path / "out")]
    assert made_run(line) == ["replay", str(tmp_path / "out" / "grpo@4")]


def test_commands_are_picked_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    """`--commands record,branch` picks the commands that train; an unknown one is argparse's
    usage error (exit 2), naming it, before any line runs."""
    assert command_names("record, branch,record") == ("record", "branch")
    with pytest.raises(SystemExit) as ended:
        main(["--commands", "record,train"])
    assert ended.value.code == 2
    assert "unknown command 'train'" in capsys.readouterr().err
