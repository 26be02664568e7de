"""Recording overhead of the optimizer hooks (`stabledrl record -- python train.py`, with no code
change in the script): the training-step time of a plain PyTorch loop run under `record`,
over the same loop run directly.

The loop is this file run with --loop: an MLP of about 6.3 M parameters (6 residual blocks of
512 -> 1024 -> 512) on CPU, AdamW, batch 64, clip_grad_norm_ (--no-clip: without), one thread.
A step is timed from the forward pass to the end of `optimizer.step()`, which is where the
hooks do their work (the pre-hook's gradient norms, the post-hook's step record; the step
files are written by the Recorder's own thread). Plain and recorded runs alternate, --repeats
of each; each run's first --warmup steps are left out. The figure is the ratio of the median
step times over all kept steps of each kind, in one run of this benchmark.

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

ROOT = Path(__file__).resolve().parents[1]


def loop(steps: int, clip: bool, times_file: Path) -> None:
    """The plain training loop (never imports stabledrl); writes its step times as JSON."""
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
    inputs, targets = torch.randn(64, width), torch.randn(64, 1)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - start)
    times_file.write_text(json.dumps(times))


def _run(recorded: bool, args: argparse.Namespace, work: Path) -> list[float]:
    times_file = work / "times.json"
    command = [sys.executable, __file__, "--loop", "--steps", str(args.steps),
               "--times", str(times_file)] + ([] if args.clip else ["--no-clip"])  # fmt: skip
    if recorded:
        command = [sys.executable, "-m", "stabledrl_cli", "record", "--out", str(work / "run"),
                   "--force", "--", *command]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
           os.environ.get("PYTHONPATH")]))}  # fmt: skip
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    times: list[float] = json.loads(times_file.read_text())
    return times[args.warmup :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--loop", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--times", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop:
        loop(args.steps, args.clip, args.times)
        return
    times: dict[bool, list[float]] = {False: [], True: []}
    medians: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for recorded in (False, True):
                kept = _run(recorded, args, Path(tmp))
                times[recorded] += kept
                medians[recorded].append(statistics.median(kept))
    plain, recorded = statistics.median(times[False]), statistics.median(times[True])
    clip = "clip_grad_norm_" if args.clip else "no clipping"
    print(f"6.3 M-parameter MLP, AdamW, {clip}, 1 thread, {args.repeats} x {args.steps} steps "
          f"(first {args.warmup} left out): median step time")  # fmt: skip
    print(f"  python loop.py                      {plain * 1e3:8.2f} ms")
    print(f"  stabledrl record -- python loop.py  {recorded * 1e3:8.2f} ms")
    print(f"  ratio recorded/plain                {recorded / plain:8.3f}")
    per_run = [r / p for p, r in zip(medians[False], medians[True], strict=True)]
    print(f"  per-repeat ratios                   {' '.join(f'{r:.3f}' for r in per_run)}")


if __name__ == "__main__":
    main()
