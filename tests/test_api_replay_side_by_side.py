"""Replays that threads of one process run side by side each set a process-wide setting for
their pass: a warnings filter ignoring the reader's `RunIntegrityWarning` (they count the steps
they skip), and torch's intra-op threads (1). Each restored what it found on entering, which for
all but the first was another replay's setting: measured, after 12 replays on a 6-thread pool
the ignore filter stayed in `warnings.filters` for good (3 runs of 3), so the process's own
reading of a run (`for step in run`) skipped damaged steps without a word. The first replay in
now makes the settings and the last out restores what the first found."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

import torch

import stabledrl_cli as sd
from stabledrl_cli.dump import RunIntegrityWarning
from stabledrl_cli.replay.engines import LocalEngine
from stabledrl_cli.replay.stream import StreamedRun


class _Paced(LocalEngine):
    """The local pass, entered at once and left when told: two replays then overlap as the
    test orders them."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.leave = threading.Event()

    def stream(self, *arguments: Any) -> StreamedRun:
        self.entered.set()
        assert self.leave.wait(60)
        assert torch.get_num_threads() == 1  # a replay computes on one thread throughout
        return super().stream(*arguments)


def test_overlapping_replays_restore_the_settings_they_found(tmp_path: Path) -> None:
    logp = torch.linspace(-2.0, -0.5, 64).reshape(4, 16)
    with sd.Recorder(tmp_path / "run", policy="grpo") as recorder:
        for step in range(3):
            recorder.log_step(step, logp=logp, logp_old=logp + 0.125, advantages=torch.ones(4))
    filters = list(warnings.filters)
    threads = torch.get_num_threads()
    first, second = _Paced(), _Paced()
    results: list[int] = []

    def replayed(engine: _Paced) -> None:
        results.append(sd.replay(tmp_path / "run", "grpo", engine=engine).steps)

    runs = [threading.Thread(target=replayed, args=(engine,)) for engine in (first, second)]
    runs[0].start()
    assert first.entered.wait(60)
    runs[1].start()
    assert second.entered.wait(60)
    first.leave.set()  # the first in is the first out
    runs[0].join(60)
    second.leave.set()
    runs[1].join(60)
    assert results == [3, 3]
    assert warnings.filters == filters
    assert not any(f[0] == "ignore" and f[2] is RunIntegrityWarning for f in warnings.filters)
    assert torch.get_num_threads() == threads
