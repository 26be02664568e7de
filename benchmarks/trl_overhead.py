"""Recording overhead of the TRL integration: optimizer-step time of `RecordingGRPOTrainer`
over plain `trl.GRPOTrainer` on the tiny CPU run of the tests (tests/trl_scripts/tiny_grpo.py).

A step's time runs from TRL's `on_step_begin` to `on_step_end`: generation (when due), every
micro-batch's forward and backward, the optimizer update and, recorded, the step file written
and fsynced. Recorded and plain runs alternate, --repeats of each; the figure is the median
step time (first step of each run left out: it carries one-off warm-up) and their ratio, and
the time spent in the integration's own code a step (less noisy than a ratio of two medians
on a shared machine).
The tiny model makes the fixed per-step cost of writing a file as large as it will ever be
relative to the step; a real model's steps are longer and the ratio closer to 1.

    python benchmarks/trl_overhead.py                 # 3 repeats of 8 steps, dapo
    python benchmarks/trl_overhead.py --repeats 5 --steps 12 --loss-type grpo
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from arguments import at_least
from extras import require_extra

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "trl_scripts"))

RECORDING_TIME = [0.0]
"""Seconds spent in the integration's own work (capture of micro-batches, step assembly and
the write), summed over the recorded runs."""


def _timed(function: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            RECORDING_TIME[0] += time.perf_counter() - start

    return wrapper


def trl_trainers() -> tuple[dict[bool, Any], Any]:
    """({recorded: trainer class}, a callback class timing each optimizer step), the recording
    trainer's own work timed into RECORDING_TIME. Imported once the options are parsed:
    `--help` needs no trl extra."""
    from transformers import TrainerCallback
    from trl.trainer.grpo_trainer import GRPOTrainer

    from stabledrl_cli.integrations._trl_capture import StepBuffer
    from stabledrl_cli.integrations.trl import RecordingGRPOTrainer

    StepBuffer.log = _timed(StepBuffer.log)  # type: ignore[method-assign]
    RecordingGRPOTrainer._sd_micro_batch = _timed(RecordingGRPOTrainer._sd_micro_batch)  # type: ignore[method-assign]

    class StepTimer(TrainerCallback):  # type: ignore[misc]
        """Wall time of each optimizer step, on_step_begin to on_step_end."""

        def __init__(self) -> None:
            self.start = 0.0
            self.times: list[float] = []

        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.times.append(time.perf_counter() - self.start)

    return {False: GRPOTrainer, True: RecordingGRPOTrainer}, StepTimer


def step_times(
    trainers: dict[bool, Any],
    timer_class: Any,
    recorded: bool,
    steps: int,
    loss_type: str,
    work: Path,
) -> list[float]:
    """Step times of one tiny run, `recorded` or not (`trl_trainers`; the first step left
    out)."""
    import tiny_grpo  # type: ignore[import-not-found]

    timer = timer_class()
    kwargs: dict[str, Any] = {"stabledrl_out": work / "run", "stabledrl_overwrite": True}
    trainer = trainers[recorded](
        model=tiny_grpo.tiny_model(),
        reward_funcs=tiny_grpo.count_b,
        args=tiny_grpo.tiny_config(str(work / "trl_out"), max_steps=steps, loss_type=loss_type),
        train_dataset=tiny_grpo.tiny_dataset(64),
        processing_class=tiny_grpo.tiny_tokenizer(),
        callbacks=[timer],
        **(kwargs if recorded else {}),
    )
    trainer.train()
    return timer.times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument(
        "--steps", type=at_least(2), default=8, help="steps a run (its first is not timed)"
    )
    parser.add_argument("--loss-type", default="dapo")
    parser.add_argument("--threads", type=at_least(1), default=1)
    args = parser.parse_args()
    require_extra("trl", "trl", "datasets")
    torch.set_num_threads(args.threads)
    trainers, timer_class = trl_trainers()
    times: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for recorded in (False, True):
                times[recorded] += step_times(
                    trainers, timer_class, recorded, args.steps, args.loss_type, Path(tmp)
                )
    plain, with_recording = statistics.median(times[False]), statistics.median(times[True])
    own = RECORDING_TIME[0] / (args.repeats * args.steps)
    print(f"tiny TRL run ({args.loss_type}, {args.repeats} x {args.steps} steps, "
          f"{args.threads} thread(s)): median optimizer-step time")  # fmt: skip
    print(f"  trl.GRPOTrainer        {plain * 1e3:8.1f} ms")
    print(f"  RecordingGRPOTrainer   {with_recording * 1e3:8.1f} ms")
    print(f"  ratio recorded/plain   {with_recording / plain:8.3f}")
    print(f"  recording's own work   {own * 1e3:8.1f} ms a step (capture, assembly, write; "
          f"{own / plain:.1%} of the plain median)")  # fmt: skip


if __name__ == "__main__":
    main()
