"""How often the observed-collapse rule reports a collapse on a run that never collapsed, and
how often it finds one on a run whose success rate really fell.

Each step's `reward_mean` is the success rate of BATCH independent 0/1 rewards:
- a flat run draws every step with the same probability P for STEPS steps: nothing happened to
  the policy, so any collapse the rule reports is noise (the `false` column);
- a falling run draws its first half with P and its second half with P / 10: the success rate
  fell tenfold at the middle step, a collapse the rule should report. It is `found` when the
  rule reports it no earlier than W steps before the middle step (a report earlier still is
  noise); `delay` is the median of reported step - middle step over the runs where it is found.

`--mu MU` (default 1) reuses each rollout over MU optimizer steps (ppo_epochs,
num_iterations): STEPS counts optimizer steps, a run draws STEPS / MU rollouts and logs each
one's success rate on its MU steps, inner_step 0 .. MU - 1, as a recorder does; the fall is
at the middle step. The rule reads one draw a rollout (`rollouts.reward_draws`), as replay,
inspect and check do; `--count-reused` reads every logged step as a draw instead, which is
the rule before that.

The rule is the one replay, inspect and check apply (`detectors.observed_reward_collapse`,
docs/collapse.md), with the reward range (0, 1), W = `--window` (10 by default) and the noise
margin c = `--margin` (`COLLAPSE_NOISE_MARGIN` by default; `--margin=-1000` turns the noise
test off, which is the rule before it). Seeds are split: the margin was
chosen on seeds 0-99 (`--first-seed 0`), the docs quote seeds 100-199 (`--first-seed 100`).

    python benchmarks/flat_reward_collapse.py --first-seed 100     # the docs' table
    python benchmarks/flat_reward_collapse.py --margin 2.5 --rates 0.02 --batches 16
    python benchmarks/flat_reward_collapse.py --first-seed 100 --mu 4 [--count-reused]
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
from stabledrl_cli.replay.rollouts import reward_draws


def rewards(
    rate: float, batch: int, steps: int, seed: int, falling: bool, mu: int = 1
) -> np.ndarray:
    """One run's per-step success rates (numpy's generator seeded `seed`), each rollout's
    logged on `mu` steps in a row; a falling run's second half is drawn with rate / 10."""
    rollouts = steps // mu
    rates = np.full(rollouts, rate)
    if falling:
        rates[rollouts // 2 :] = rate / 10
    return np.repeat(np.random.default_rng(seed).binomial(batch, rates) / batch, mu)


def row(
    rate: float,
    batch: int,
    steps: int,
    seeds: range,
    window: int,
    margin: float,
    mu: int = 1,
    count_reused: bool = False,
) -> dict:
    """The share of flat runs reported collapsed, the share of falling runs found collapsed,
    and the median delay of the found ones (in optimizer steps), over `seeds`."""
    numbers = np.arange(steps // mu * mu)
    inner = numbers % mu

    def collapse(falling: bool, seed: int) -> int | None:
        series = rewards(rate, batch, steps, seed, falling, mu)
        drawn = (numbers, series) if count_reused else reward_draws(numbers, series, numbers, inner)
        return observed_reward_collapse(*drawn, (0.0, 1.0), window, margin)

    false = sum(collapse(False, seed) is not None for seed in seeds)
    reported = [collapse(True, seed) for seed in seeds]
    middle = steps // mu // 2 * mu
    delays = [step - middle for step in reported if step is not None]
    found = [delay for delay in delays if delay >= -window * (1 if count_reused else mu)]
    return {
        "rate": rate,
        "batch": batch,
        "steps": steps,
        "false": false / len(seeds),
        "found": len(found) / len(seeds),
        "delay": statistics.median(found) if found else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.3])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--steps", type=int, nargs="+", default=[300, 1000, 3000])
    parser.add_argument("--window", type=int, default=DEFAULT_COLLAPSE_WINDOW)
    parser.add_argument("--mu", type=int, default=1, help="optimizer steps per rollout")
    parser.add_argument(
        "--count-reused", action="store_true", help="read every logged step as a draw"
    )
    add_common_arguments(parser, COLLAPSE_NOISE_MARGIN)
    args = parser.parse_args()
    if args.mu < 1:
        parser.error(f"--mu must be >= 1, got {args.mu}")
    rows = [
        row(rate, batch, steps, seed_range(args), args.window, args.margin, args.mu,
            args.count_reused)
        for rate in args.rates for batch in args.batches for steps in args.steps
    ]  # fmt: skip
    read = ", every logged step a draw" if args.count_reused else ""
    title = (
        f"window {args.window}, mu {args.mu}{read}: flat runs reported collapsed, "
        "falling runs found"
    )
    settings = {"window": args.window, "mu": args.mu, "count_reused": args.count_reused}
    emit(args, title, settings, rows)


if __name__ == "__main__":
    main()
