"""Recording overhead of the optimizer hooks (`stabledrl record -- python train.py`, with no code
change in the script): the training-step time of a plain PyTorch loop run under `record`,
over the same loop run directly.

The loop is this file run with --loop: an MLP of about 6.3 M parameters (6 residual blocks of
512 -> 1024 -> 512) on CPU, AdamW, batch 64, clip_grad_norm_ (--no-clip: without), one thread.
A step is timed from the forward pass to the end of `optimizer.step()`, which is where the
hooks do their work (the pre-hook's gradient norms, the post-hook's step record; the step
files are written by the Recorder's own thread). Plain and recorded runs alternate, --repeats
of each; each run's first --warmup steps are left out. The figure is the ratio of the median
step times over all kept steps of each kind, in one run of this benchmark; beside it, the
median of the repeats' own ratios (steadier when the machine's load drifts) and the growth
of the clip + optimizer.step() part of a step, where the hooks' own work lies.

Then, in one process (--paired-steps), the same loop in blocks of --block steps with the
hooks installed and removed in turn, recording into a scratch run as under `record`: a
machine whose load drifts slows both kinds alike, so this ratio is the steadier figure; and
the time spent in the hooks' own code (pre-hook: norms, groups, modules; post-hook: the step
record handed to the Recorder), the least noisy figure. With clip_grad_norm_, the hooks
compute it as torch does (get_total_norm, clip_grads_with_norm_), at torch's own cost.

    python benchmarks/hook_overhead.py                    # 5 repeats of 40 steps
    python benchmarks/hook_overhead.py --repeats 7 --steps 60 --no-clip
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from arguments import at_least

ROOT = Path(__file__).resolve().parents[1]


def _model_and_data() -> tuple[Any, Any, Any, Any]:
    """(model, AdamW, inputs, targets) of the benchmark's loop."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.norm = torch.nn.LayerNorm(width)
            self.up = torch.nn.Linear(width, 2 * width)
            self.down = torch.nn.Linear(2 * width, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))

    width = 512
    model = torch.nn.Sequential(*(Block(width) for _ in range(6)), torch.nn.Linear(width, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, optimizer, torch.randn(64, width), torch.randn(64, 1)


def _step(model: Any, optimizer: Any, inputs: Any, targets: Any, clip: bool) -> tuple[float, float]:
    """One training step: (its seconds, the seconds of its clip + optimizer.step() part)."""
    import torch

    start = time.perf_counter()
    loss = torch.nn.functional.mse_loss(model(inputs), targets)
    optimizer.zero_grad()
    loss.backward()
    update = time.perf_counter()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    end = time.perf_counter()
    return end - start, end - update


def loop(steps: int, clip: bool, times_file: Path) -> None:
    """The plain training loop (never imports stabledrl); writes its step times as JSON."""
    model, optimizer, inputs, targets = _model_and_data()
    times, updates = [], []
    for _ in range(steps):
        step, update = _step(model, optimizer, inputs, targets, clip)
        times.append(step)
        updates.append(update)
    times_file.write_text(json.dumps({"step": times, "update": updates}))


HOOK_TIME = [0.0]
"""Seconds spent in the optimizer hooks' pre- and post-hook, summed (the paired run)."""
OWN_TIMES: list[float] = []
"""The hooks' own seconds in each kept step with the hooks (the paired run)."""
FIRST_STEP = [0.0]
"""The hooks' own seconds in their first step (module names looked up once)."""


def _timed(function: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            HOOK_TIME[0] += time.perf_counter() - start

    return wrapper


def paired(steps: int, block: int, clip: bool, work: Path) -> tuple[list[float], list[float]]:
    """In one process, blocks of `block` steps with the hooks installed and removed in turn
    (load drift cancels): (step times without, step times with)."""
    os.environ.update({"STABLEDRL_RUN_DIR": str(work / "paired"), "STABLEDRL_FORCE": "1"})
    from stabledrl_cli.capture import _hook_state, bootstrap, optimizer_hooks

    # The hooks' own work: what the registered hooks call (`_step_hooks`), timed.
    for name, hook in optimizer_hooks._step_hooks.items():
        optimizer_hooks._step_hooks[name] = _timed(hook)

    model, optimizer, inputs, targets = _model_and_data()
    optimizer_hooks.install()
    start = HOOK_TIME[0]
    _step(model, optimizer, inputs, targets, clip)  # the first: module names are looked up
    FIRST_STEP[0] = HOOK_TIME[0] - start
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(steps):
        hooked = (i // block) % 2 == 1
        if hooked:
            optimizer_hooks.install()
        else:
            _hook_state.uninstall()
        start = HOOK_TIME[0]
        step, _ = _step(model, optimizer, inputs, targets, clip)
        if i % block:  # the first step of a block carries the switch
            times[hooked].append(step)
            if hooked:
                OWN_TIMES.append(HOOK_TIME[0] - start)
    _hook_state.uninstall()
    bootstrap.close()
    return times


def _run(recorded: bool, args: argparse.Namespace, work: Path) -> dict[str, list[float]]:
    times_file = work / "times.json"
    command = [sys.executable, __file__, "--loop", "--steps", str(args.steps),
               "--times", str(times_file)] + ([] if args.clip else ["--no-clip"])  # fmt: skip
    if recorded:
        command = [sys.executable, "-m", "stabledrl_cli", "record", "--out", str(work / "run"),
                   "--force", "--", *command]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
           os.environ.get("PYTHONPATH")]))}  # fmt: skip
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    times: dict[str, list[float]] = json.loads(times_file.read_text())
    return {kind: values[args.warmup :] for kind, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=at_least(0), default=3)
    parser.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--paired-steps", type=int, default=200)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--loop", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--times", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop:
        loop(args.steps, args.clip, args.times)
        return
    # every median below needs a kept step: a run's steps after --warmup, and a hooked block
    # (the second of each pair) with a step after the first, which carries the switch
    if args.repeats < 1 or args.steps <= args.warmup:
        parser.error(f"--repeats must be >= 1 and --steps more than --warmup ({args.warmup})")
    if args.block < 2 or args.paired_steps < 2 * args.block:
        parser.error(
            "--block must be >= 2 and --paired-steps at least 2 x --block "
            f"({args.paired_steps} steps in blocks of {args.block} time no step with the hooks)"
        )
    times: dict[tuple[bool, str], list[float]] = {}
    per_repeat: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for recorded in (False, True):
                kept = _run(recorded, args, Path(tmp))
                for kind, values in kept.items():
                    times.setdefault((recorded, kind), []).extend(values)
                per_repeat[recorded].append(statistics.median(kept["step"]))
    median = {key: statistics.median(values) for key, values in times.items()}
    plain, recorded = median[False, "step"], median[True, "step"]
    clip = "clip_grad_norm_" if args.clip else "no clipping"
    print(f"6.3 M-parameter MLP, AdamW, {clip}, 1 thread, {args.repeats} x {args.steps} steps "
          f"(first {args.warmup} left out): median times")  # fmt: skip
    print("                                        step    clip + optimizer.step()")
    for label, key in (("python loop.py", False), ("stabledrl record -- python loop.py", True)):
        step, update = median[key, "step"] * 1e3, median[key, "update"] * 1e3
        print(f"  {label:36} {step:7.2f} ms {update:9.2f} ms")
    print(f"  ratio recorded/plain (step)          {recorded / plain:7.3f}")
    extra = median[True, "update"] - median[False, "update"]
    print(f"  hooks' cost a step (update's growth)  {extra * 1e3:6.2f} ms = {extra / plain:.1%} of "
          "the plain step")  # fmt: skip
    ratios = [r / p for p, r in zip(per_repeat[False], per_repeat[True], strict=True)]
    print(f"  per-repeat step ratios               {' '.join(f'{r:.3f}' for r in ratios)}")
    print(f"  median per-repeat ratio              {statistics.median(ratios):7.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        without, with_hooks = paired(args.paired_steps, args.block, args.clip, Path(tmp))
    plain, hooked = statistics.median(without), statistics.median(with_hooks)
    print(f"one process, blocks of {args.block} steps with and without the hooks in turn "
          f"({args.paired_steps} steps, first of a block left out): median step time")  # fmt: skip
    print(f"  without the hooks                    {plain * 1e3:7.2f} ms")
    print(f"  with the hooks                       {hooked * 1e3:7.2f} ms")
    print(f"  ratio with/without                   {hooked / plain:7.3f}")
    own = statistics.median(OWN_TIMES)
    print(f"  the hooks' own work (pre + post)     {own * 1e3:7.2f} ms a step = {own / plain:.2%}"
          " of the step without")  # fmt: skip
    print(f"  the same, first step (names found)   {FIRST_STEP[0] * 1e3:7.2f} ms, once")


if __name__ == "__main__":
    main()
