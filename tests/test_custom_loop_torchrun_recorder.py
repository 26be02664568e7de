"""A hand-written torchrun loop whose ranks each make `Recorder(path)` without their rank: the
ranks are one world_size 1 run's rank 0, and every rank but the one that locks it first is
refused. The refusal says so (its rank, of how many, and the Recorder to make), not 'close
it first': the other process holding it is a sibling rank, which it cannot close."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import stabledrl_cli as sd
from stabledrl_cli.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
HOLD = """
import sys
import stabledrl_cli as sd
rec = sd.Recorder(sys.argv[1], policy="grpo")
print("open", flush=True)
sys.stdin.read()
rec.close()
"""


@pytest.fixture
def held_by_another_rank(tmp_path: Path) -> Iterator[Path]:
    """The run at tmp_path/run, its rank 0 held by a Recorder in another process."""
    run = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert child.stdout is not None and child.stdin is not None
    try:
        assert child.stdout.readline() == "open\n"
        yield run
    finally:
        child.stdin.close()
        child.wait(timeout=30)


def test_a_rank_that_gave_no_rank_is_told_its_own(
    held_by_another_rank: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError) as refused:
        sd.Recorder(held_by_another_rank, policy="grpo")
    message = str(refused.value)
    assert "this process is rank 1 of 2" in message
    assert "Recorder(path, world_size=2, rank=1)" in message
    assert "close it first" not in message


def test_one_process_is_still_told_to_close_the_other(
    held_by_another_rank: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(UsageError, match="in another process; close it first"):
        sd.Recorder(held_by_another_rank, policy="grpo")


def test_a_rank_with_its_own_world_size_is_refused_as_before(
    held_by_another_rank: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Recorder that gives world_size=2, rank=0 where another process holds rank 0 (two jobs
    on one directory) is not told to give the rank it gave."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="in another process; close it first"):
        sd.Recorder(held_by_another_rank, policy="grpo", world_size=2, rank=0)
