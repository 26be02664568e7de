"""How often the observed-collapse rule reports a collapse on a run that never collapsed.

Each run is flat: every step's `reward_mean` is the success rate of BATCH independent 0/1
rewards with the same probability P, for STEPS steps, so nothing happened to the policy and
any collapse the rule reports is noise. The rule is the one replay, inspect and check apply
(`detectors.observed_reward_collapse`, docs/collapse.md: the W-step mean, W = `--window`, 10
by default, falls below half its best so far and stays there for 2W steps, or to the end),
with the reward range (0, 1).
It prints, per (P, BATCH, STEPS), the fraction of seeds on which a collapse is reported.

    python benchmarks/flat_reward_collapse.py                  # the default grid, 100 seeds
    python benchmarks/flat_reward_collapse.py --rates 0.03 --batches 64 --steps 300 --seeds 50
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stabledrl_cli.replay.config import DEFAULT_COLLAPSE_WINDOW
from stabledrl_cli.replay.detectors import observed_reward_collapse


def false_collapse_rate(rate: float, batch: int, steps: int, seeds: int, window: int) -> float:
    """The fraction of `seeds` flat runs (seed s: numpy's generator seeded s) on which the
    rule, with the collapse window `window`, reports a collapse."""
    numbers = np.arange(steps)
    reported = 0
    for seed in range(seeds):
        rewards = np.random.default_rng(seed).binomial(batch, rate, steps) / batch
        reported += observed_reward_collapse(numbers, rewards, (0.0, 1.0), window) is not None
    return reported / seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.3])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--steps", type=int, nargs="+", default=[300, 1000])
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--window", type=int, default=DEFAULT_COLLAPSE_WINDOW)
    parser.add_argument("--format", choices=["table", "json"], default="table")
    args = parser.parse_args()
    rows = [
        {"rate": rate, "batch": batch, "steps": steps,
         "false_collapse": false_collapse_rate(rate, batch, steps, args.seeds, args.window)}
        for rate in args.rates for batch in args.batches for steps in args.steps
    ]  # fmt: skip
    if args.format == "json":
        print(json.dumps({"seeds": args.seeds, "window": args.window, "rows": rows}, indent=2))
        return
    print(f"flat runs, {args.seeds} seeds each, window {args.window}: share reported as collapsed")
    print(f"{'P':>6} {'batch':>6} {'steps':>6} {'collapsed':>10}")
    for row in rows:
        rate, batch, steps, share = row["rate"], row["batch"], row["steps"], row["false_collapse"]
        print(f"{rate:>6} {batch:>6} {steps:>6} {share:>10.2f}")


if __name__ == "__main__":
    main()
