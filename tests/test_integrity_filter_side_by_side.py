"""`inspect`'s summary (and watch's, check's and a shard's pass) ignored the reader's
`RunIntegrityWarning` with a `warnings.catch_warnings` of its own, which restores the filters
it found: run beside a replay in another thread of the process, it found the replay's ignore
filter and put it back after the replay had removed it, for good. Every such pass now holds
the one shared setting (`dump._integrity.integrity_warnings_ignored`), whose last holder
restores the filters the first found."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from test_api_replay_side_by_side import _Paced

import stabledrl_cli as sd
from stabledrl_cli.dump import open_run
from stabledrl_cli.replay import inspection


def test_a_summary_beside_a_replay_leaves_no_filter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    logp = torch.linspace(-2.0, -0.5, 64).reshape(4, 16)
    with sd.Recorder(tmp_path / "run", policy="grpo") as recorder:
        for step in range(3):
            recorder.log_step(step, logp=logp, logp_old=logp + 0.125, advantages=torch.ones(4))
    filters = list(warnings.filters)
    entered, leave = threading.Event(), threading.Event()
    real = inspection._replayable

    def paced(run: Any) -> Any:
        entered.set()
        assert leave.wait(60)
        return real(run)

    monkeypatch.setattr(inspection, "_replayable", paced)
    engine = _Paced()
    replay = threading.Thread(target=sd.replay, args=(tmp_path / "run", "grpo"),
                              kwargs={"engine": engine})  # fmt: skip
    summary = threading.Thread(target=inspection.summarize, args=(open_run(tmp_path / "run"),))
    replay.start()
    assert engine.entered.wait(60)
    summary.start()
    assert entered.wait(60)
    engine.leave.set()  # the replay ends first, the summary after it
    replay.join(60)
    leave.set()
    summary.join(60)
    assert not replay.is_alive() and not summary.is_alive()
    assert warnings.filters == filters
