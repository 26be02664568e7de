"""How often the observed-collapse rule reports a collapse on a run that never collapsed, and
how often it finds one on a run whose success rate really fell.

Each step's `reward_mean` is the success rate of BATCH independent 0/1 rewards:
- a flat run draws every step with the same probability P for STEPS steps: nothing happened to
  the policy, so any collapse the rule reports is noise (the `false` column);
- a falling run draws its first half with P and its second half with P / 10: the success rate
  fell tenfold at the middle step, a collapse the rule should report. It is `found` when the
  rule reports it no earlier than W steps before the middle step (a report earlier still is
  noise); `delay` is the median of reported step - middle step over the runs where it is found.

The rule is the one replay, inspect and check apply (`detectors.observed_reward_collapse`,
docs/collapse.md), with the reward range (0, 1), W = `--window` (10 by default) and the noise
margin c = `--margin` (`COLLAPSE_NOISE_MARGIN` by default; `--margin=-1000` turns the noise
test off, which is the rule before it). Seeds are split: the margin was
chosen on seeds 0-99 (`--first-seed 0`), the docs quote seeds 100-199 (`--first-seed 100`).

    python benchmarks/flat_reward_collapse.py --first-seed 100     # the docs' table
    python benchmarks/flat_reward_collapse.py --margin 2.5 --rates 0.02 --batches 16
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from false_alarms import add_common_arguments, emit, seed_range

from stabledrl_cli.replay.config import COLLAPSE_NOISE_MARGIN, DEFAULT_COLLAPSE_WINDOW
from stabledrl_cli.replay.detectors import observed_reward_collapse


def rewards(rate: float, batch: int, steps: int, seed: int, falling: bool) -> np.ndarray:
    """One run's per-step success rates (numpy's generator seeded `seed`); a falling run's
    second half is drawn with rate / 10."""
    rates = np.full(steps, rate)
    if falling:
        rates[steps // 2 :] = rate / 10
    return np.random.default_rng(seed).binomial(batch, rates) / batch


def row(rate: float, batch: int, steps: int, seeds: range, window: int, margin: float) -> dict:
    """The share of flat runs reported collapsed, the share of falling runs found collapsed,
    and the median delay of the found ones, over `seeds`."""
    numbers = np.arange(steps)

    def collapse(falling: bool, seed: int) -> int | None:
        series = rewards(rate, batch, steps, seed, falling)
        return observed_reward_collapse(numbers, series, (0.0, 1.0), window, margin)

    false = sum(collapse(False, seed) is not None for seed in seeds)
    reported = [collapse(True, seed) for seed in seeds]
    delays = [step - steps // 2 for step in reported if step is not None]
    found = [delay for delay in delays if delay >= -window]
    return {
        "rate": rate,
        "batch": batch,
        "steps": steps,
        "false": false / len(seeds),
        "found": len(found) / len(seeds),
        "delay": statistics.median(found) if found else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.3])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--steps", type=int, nargs="+", default=[300, 1000, 3000])
    parser.add_argument("--window", type=int, default=DEFAULT_COLLAPSE_WINDOW)
    add_common_arguments(parser, COLLAPSE_NOISE_MARGIN)
    args = parser.parse_args()
    rows = [
        row(rate, batch, steps, seed_range(args), args.window, args.margin)
        for rate in args.rates for batch in args.batches for steps in args.steps
    ]  # fmt: skip
    title = f"window {args.window}: flat runs reported collapsed, falling runs found"
    emit(args, title, {"window": args.window}, rows)


if __name__ == "__main__":
    main()
