"""A replay sets torch's intra-op threads to 1 for its pass and restores them. Replays that
threads of one process ran side by side each restored the count it found on entering, which
for all but the first was the 1 another had set: measured, torch.set_num_threads(2), then 12
replays on a 6-thread pool left torch.get_num_threads() at 1 (5 runs of 5), every later
computation of the process single-threaded; and a replay still running once the first ended
ran on 2 threads. The first block now sets 1 and the last restores what the first found."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import stabledrl_cli as sd
from stabledrl_cli.replay.engines import single_torch_thread


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("two_threads")
def test_overlapping_blocks_keep_one_thread_and_restore_the_count() -> None:
    first, second = single_torch_thread(), single_torch_thread()
    first.__enter__()
    second.__enter__()
    assert torch.get_num_threads() == 1
    first.__exit__(None, None, None)
    assert torch.get_num_threads() == 1  # the second block is still under way
    second.__exit__(None, None, None)
    assert torch.get_num_threads() == 2


@pytest.mark.usefixtures("two_threads")
def test_replays_run_side_by_side_leave_torch_threads_as_they_were(tmp_path: Path) -> None:
    logp = torch.linspace(-2.0, -0.5, 64).reshape(4, 16)
    with sd.Recorder(tmp_path / "run", policy="grpo") as recorder:
        for step in range(3):
            recorder.log_step(step, logp=logp, logp_old=logp + 0.125, advantages=torch.ones(4))
    with ThreadPoolExecutor(4) as pool:
        steps = list(pool.map(lambda _: sd.replay(tmp_path / "run", "grpo").steps, range(8)))
    assert steps == [3] * 8
    assert torch.get_num_threads() == 2
