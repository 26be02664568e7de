"""The live-run fuzzer's checks catch what they are for: a smoke test of
benchmarks/fuzz_live.py (its long-running version, with real writers killed at random)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fuzz_live import judged, lost_steps, read, reader_lines

from stabledrl_cli import Recorder


def test_the_live_fuzzer_reads_a_run_and_catches_a_broken_contract(tmp_path: Path) -> None:
    """A reader of a good run passes; exit 70, a traceback, two error lines and a hang are
    flagged; a finished step whose file is gone is reported lost, the others not."""
    run = tmp_path / "run"
    with Recorder(run, policy="grpo") as recorder:
        for step in range(2):
            logp = -np.ones((2, 3), dtype=np.float32)
            recorder.log_step(step, logp=logp, logp_old=logp, advantages=np.ones(2, np.float32))
    assert read(reader_lines(run, tmp_path)[:1]) == []
    assert judged(["x"], 0, "") is None
    assert (judged(["x"], 70, "error: a bug") or "").startswith("exit 70")
    assert (judged(["x"], 3, "Traceback (most recent call last):") or "").startswith("a traceback")
    assert (judged(["x"], 3, "error: a\nerror: b") or "").startswith("2 error lines")
    assert (judged(["x"], None, "") or "").startswith("hung")
    (run / "steps" / "step-00000001.safetensors").unlink()
    lost = lost_steps(run, {0, 1})
    assert len(lost) == 1 and lost[0].startswith("1: InputError")
