"""A TRL training that an exception ends (Ctrl-C, CUDA running out of memory, a callback's
error) says so in its recorded run, as a `with Recorder(...)` block's does. Before: the
recording trainer closed its Recorder on the way out as after a finished training, and the
run read as a closed, whole recording of fewer steps (`inspect`: 'closed: its Recorder
finished, the run gains no step')."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from _trl import tiny

import stabledrl_cli as sd
from stabledrl_cli.dump._manifest import RECORDING_CLOSED
from stabledrl_cli.dump._stop_notes import RECORDING_STOPPED

__all__ = ["tiny"]

CUT = [
    (KeyboardInterrupt(), "training interrupted (Ctrl-C) after step 2"),
    (RuntimeError("CUDA out of memory\nTried to allocate"), "training stopped by RuntimeError: "
     "CUDA out of memory after step 2"),
    (SystemExit(3), "training ended by sys.exit(3) after step 2"),
]  # fmt: skip


def _train(tiny: Any, out: Path, cut: BaseException | None, trainer: str) -> None:
    """The tiny run, recorded into `out`, that `cut` ends as step 2 ends (None: trains on)."""
    from transformers import TrainerCallback

    from stabledrl_cli.integrations import trl as integration

    class Cut(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if cut is not None and state.global_step == 2:
                raise cut

    config = tiny.tiny_rloo_config if "RLOO" in trainer else tiny.tiny_config
    getattr(integration, trainer)(
        **tiny.tiny_parts(),
        args=config(str(out.parent / "trl_out")),
        callbacks=[Cut()],
        stabledrl_out=out,
    ).train()


@pytest.mark.parametrize(("cut", "reason"), CUT)
def test_a_training_an_exception_ends_notes_it_in_its_run(
    tiny: Any, tmp_path: Path, cut: BaseException, reason: str
) -> None:
    out = tmp_path / "run"
    with pytest.raises(type(cut)):
        _train(tiny, out, cut, "RecordingGRPOTrainer")
    run = sd.open_run(out)
    assert run.step_numbers == [1, 2] and run.integrity.ok
    assert run.manifest[RECORDING_STOPPED] == {"step": 3, "rank": 0, "reason": reason}
    assert run.manifest[RECORDING_CLOSED] is True


def test_an_rloo_training_ctrl_c_ends_notes_it(tiny: Any, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _train(tiny, out, KeyboardInterrupt(), "RecordingRLOOTrainer")
    assert sd.open_run(out).manifest[RECORDING_STOPPED]["reason"] == CUT[0][1]


@pytest.mark.parametrize("cut", [None, SystemExit(0)])
def test_a_training_that_ends_normally_notes_no_stop(
    tiny: Any, tmp_path: Path, cut: BaseException | None
) -> None:
    """sys.exit(0) is a script's own normal end, as for a with-Recorder block."""
    out = tmp_path / "run"
    with contextlib.suppress(SystemExit):
        _train(tiny, out, cut, "RecordingGRPOTrainer")
    run = sd.open_run(out)
    assert RECORDING_STOPPED not in run.manifest and run.manifest[RECORDING_CLOSED] is True


def test_an_optimizer_step_that_raises_notes_its_update_unapplied(
    tiny: Any, tmp_path: Path
) -> None:
    """CUDA out of memory in the optimizer's step (Adam's first step makes its state): the step
    is recorded as its gradients were clipped, before TRL's optimizer step, whose update never
    applied. Before, the note said `after step 3` where TRL finished 2 steps."""
    from transformers import TrainerCallback

    from stabledrl_cli.integrations import trl as integration

    class OutOfMemory(TrainerCallback):  # type: ignore[misc]
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if state.global_step == 2:
                raise RuntimeError("CUDA out of memory")

    out = tmp_path / "run"
    trainer = integration.RecordingGRPOTrainer(
        **tiny.tiny_parts(),
        args=tiny.tiny_config(str(tmp_path / "trl_out")),
        callbacks=[OutOfMemory()],
        stabledrl_out=out,
    )
    with pytest.raises(RuntimeError):
        trainer.train()
    assert trainer.state.global_step == 2
    run = sd.open_run(out)
    assert run.step_numbers == [1, 2, 3]
    assert run.manifest[RECORDING_STOPPED] == {
        "step": 4,
        "rank": 0,
        "reason": "training stopped by RuntimeError: CUDA out of memory in step 3, its update "
        "not applied",
    }
