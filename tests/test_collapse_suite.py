"""benchmarks/collapse_suite.py's branch phase trains its branches as `stabledrl branch` and the
record phase do: on one CPU thread (the figures then do not depend on the machine's cores)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import collapse_suite


def test_the_branch_phase_trains_on_one_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[int] = []

    def run_branches(run_dir: Path, **_: object) -> SimpleNamespace:
        threads.append(torch.get_num_threads())
        return SimpleNamespace(at=40, branches=[])

    monkeypatch.setattr(collapse_suite, "record", lambda spec, cache, **_: cache / spec.name)
    monkeypatch.setattr(collapse_suite, "run_branches", run_branches)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert collapse_suite.main(["branches", "--cache", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(before)
    assert threads and set(threads) == {1}
