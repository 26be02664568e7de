"""Shared test settings and fixtures: a stable terminal, seeded global generators, the
committed fixture runs, and their replays computed once per session (a fixture replay takes
seconds)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

# One intra-op thread in each test process and in each process a test starts (they inherit
# it): the 2 pytest workers already fill the machine's 2 cores, and torch's default of a
# thread a core made their threads spin against each other (measured: farm-bench, median
# of 2, test_record_exit_code_note and test_trl_cut_short: 26 % less CPU). A test of
# thread counts sets its own.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from stabledrl_cli.replay.engine import replay
from stabledrl_cli.replay.result import ReplayResult

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"


def _checked_no_sync(fd) -> None:
    """os.fsync in the tests' own processes: checks the descriptor (a closed or bad one still
    raises OSError) and waits for no disk."""
    os.fstat(fd if isinstance(fd, int) else fd.fileno())


@pytest.fixture(scope="session", autouse=True)
def _no_disk_flush() -> Iterator[None]:
    """The runs the tests write in-process skip the disk flush (os.fsync, each step file and
    its directory: about 4 ms each on the CI machine, 28 s of one test writing 3300 steps).
    No test can observe it (that needs the machine to crash), and every other write is as in
    use; the commands the tests start as processes fsync as users' do."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fsync", _checked_no_sync)
        yield


@pytest.fixture(autouse=True)
def _seeded_global_generators() -> None:
    """A test that draws from torch's or numpy's global generator (`torch.rand`,
    `np.random.rand`) draws the same values on every run, whichever tests its worker ran
    before it."""
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _stable_terminal(monkeypatch):
    """Stable table output: no colour, a fixed width, no debug tracebacks."""
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("STABLEDRL_DEBUG", raising=False)


def fixture_run(policy_name: str) -> Path:
    """The committed fixture run of `policy_name`: a missing one fails (fixtures are committed,
    so a test that skipped here would pass on a checkout that lost them)."""
    for manifest in sorted(FIXTURES.glob("*/manifest.json")):
        data = json.loads(manifest.read_text())
        if (data.get("policy") or {}).get("name") == policy_name:
            return manifest.parent
    pytest.fail(f"no {policy_name} run under {FIXTURES} (record them: see fixtures/README.md)")


@pytest.fixture(scope="session")
def grpo_fixture() -> Path:
    """The committed grpo run of the built-in example, which degrades."""
    return fixture_run("grpo")


@pytest.fixture(scope="session")
def grpo_fixture_replay(grpo_fixture) -> ReplayResult:
    """grpo and stabledrl replayed over the degrading grpo fixture, once per session."""
    return replay(grpo_fixture, ["grpo", "stabledrl"], device="cpu")


@pytest.fixture(scope="session")
def stabledrl_fixture_replay() -> ReplayResult:
    """stabledrl and grpo replayed over the stable stabledrl fixture, once per session."""
    return replay(fixture_run("stabledrl"), ["stabledrl", "grpo"], device="cpu")
