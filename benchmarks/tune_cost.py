"""What a sweep costs: `tune` with 64 settings against a replay of the default catalogue (10
policies), on the same run, in one process, alternating, medians over repeats.

    python benchmarks/tune_cost.py [--run fixtures/grpo] [--repeats 5] [--threads 1]
    python benchmarks/tune_cost.py --shape 40,64,256     (a synthetic run of that shape)

The run is a recorded one (default: the grpo fixture, 160 steps of the built-in example), or
with `--shape` a synthetic one written by the Recorder (benchmarks/synthetic_runs.py, cached).
Both sides stream the run through the same replay engine, `tune`'s lean; the figure is the
ratio of their wall times (the target: a 64-setting sweep within 3x the catalogue).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from arguments import at_least

from stabledrl_cli.dump import open_run
from stabledrl_cli.policies import STANDARD_CATALOGUE
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.engine import replay_run
from stabledrl_cli.tune.grid import expand_all

HERE = Path(__file__).resolve().parent

SWEEP = [
    "dapo:eps_low=0.1..0.3:4,eps_high=0.2..0.5:4",
    "stabledrl:c=1.5..20:log16",
    "cispo:cap=1..10:16",
    "gppo:eps_high=0.1..0.4:16",
]
"""64 settings of four families."""


def seconds(run_path: Path, specs: list[str], *, lean: bool = False) -> float:
    """Wall time of one replay of `specs` (lean: as `tune` replays its settings)."""
    run = open_run(run_path)
    started = time.perf_counter()
    replay_run(run, specs, config=ReplayConfig(device="cpu", lean=lean))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=HERE.parent / "fixtures" / "grpo")
    parser.add_argument("--shape", help="STEPS,SEQS,LEN: a synthetic run instead of --run")
    parser.add_argument("--repeats", type=at_least(1), default=5)
    parser.add_argument("--threads", type=at_least(1), default=1)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "sdrl-bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run_path = args.run
    if args.shape:
        sys.path.insert(0, str(HERE))
        from synthetic_runs import Shape, cached_run

        run_path = cached_run(Shape.parse(args.shape), 0, args.cache)[0]
    settings = expand_all(SWEEP)
    assert len(settings) == 64, len(settings)
    catalogue = list(STANDARD_CATALOGUE)
    seconds(run_path, catalogue[:1])  # warm the page cache and the imports
    times: dict[str, list[float]] = {"catalogue (10)": [], "tune (64)": []}
    for _ in range(args.repeats):
        times["catalogue (10)"].append(seconds(run_path, catalogue))
        times["tune (64)"].append(seconds(run_path, settings, lean=True))
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"run: {run_path}  threads: {args.threads}  repeats: {args.repeats}")
    for name, value in medians.items():
        print(
            f"{name:<16} {value:8.2f} s  (min {min(times[name]):.2f}, max {max(times[name]):.2f})"
        )
    ratio = medians["tune (64)"] / medians["catalogue (10)"]
    print(f"tune (64) / catalogue (10): {ratio:.2f}x")


if __name__ == "__main__":
    main()
