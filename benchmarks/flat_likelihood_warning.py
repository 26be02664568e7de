"""How often the collapse warning fires on a run whose own-sample likelihood never fell, and
how often it fires on one whose likelihood did fall.

Each series is the warning's per-step measurement (docs/collapse.md: the median of `logp_old`
over a step's scored units), drawn as white noise around -1 for N measurements: `gaussian`,
of standard deviation SIGMA nats, or heavy-tailed `t2` (Student's t with 2 degrees of
freedom, scaled to the median absolute deviation of the gaussian noise of the same SIGMA: the
same typical spread, with rare large strays), `--noise` (one or both):
- a flat series never changes: any warning is noise (the `false` column);
- a falling series drops by FALL nats (`--fall`, 1 by default: twice the warning's 0.5 nats)
  at its middle measurement. It is `found` when the warning fires at or after the middle;
  `delay` is the median of first warning - middle, in measurements, over the runs found.
`--outlier X` (one or more) adds X nats to one measurement of each series, at a seeded place
in its first half (before any fall): a single odd batch, which must not warn by itself; 0 is
no outlier.

The rule is `detectors.collapse_warning` with its defaults (window 3, drop 0.5 nats) and the
noise margin c = `--margin` (`WARNING_NOISE_MARGIN` by default; `--margin=-1000` turns the
noise test off, which is the rule before it). The margin was chosen on seeds 0-99
(`--first-seed 0`); the docs quote seeds 100-199 (`--first-seed 100`).

    python benchmarks/flat_likelihood_warning.py --first-seed 100 --noise gaussian t2 \
        --outlier 0 -2   # the docs' table
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from false_alarms import add_common_arguments, emit, seed_range

from stabledrl_cli.replay.config import WARNING_NOISE_MARGIN
from stabledrl_cli.replay.detectors import collapse_warning

NOISES = ("gaussian", "t2")
T2_SCALE = 0.6744897501960817 / 0.816496580927726
"""Gaussian over t(2) median absolute deviation (their 75th percentiles: 0.6745 and
1 / sqrt(1.5)): t(2) draws times this have the typical spread of standard normal ones."""


def measurements(
    sigma: float, length: int, seed: int, fall: float, noise: str = "gaussian", outlier: float = 0
) -> np.ndarray:
    """One run's measurements (numpy's generator seeded `seed`): `noise` of scale `sigma`,
    `outlier` nats added to one measurement of the first half, lowered by `fall` from the
    middle one on."""
    generator = np.random.default_rng(seed)
    if noise == "t2":
        draws = T2_SCALE * generator.standard_t(2, length)
    else:
        draws = generator.standard_normal(length)
    values = -1.0 + sigma * draws
    values[generator.integers(length // 2)] += outlier
    values[length // 2 :] -= fall
    return values


def row(
    noise: str, outlier: float, sigma: float, length: int, seeds: range, fall: float, margin: float
) -> dict:
    """The share of flat series that warn, of falling ones found, and the median delay."""
    steps = np.arange(length)

    def first(fall_by: float, seed: int) -> int | None:
        values = measurements(sigma, length, seed, fall_by, noise, outlier)
        warns = collapse_warning(steps, values, noise_margin=margin)
        return int(warns[0]) if warns.size else None

    false = sum(first(0.0, seed) is not None for seed in seeds)
    delays = [step - length // 2 for seed in seeds if (step := first(fall, seed)) is not None]
    found = [delay for delay in delays if delay >= 0]
    return {
        "noise": noise,
        "outlier": outlier,
        "sigma": sigma,
        "length": length,
        "false": false / len(seeds),
        "found": len(found) / len(seeds),
        "delay": statistics.median(found) if found else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.5, 2.0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--fall", type=float, default=1.0)
    parser.add_argument("--noise", choices=NOISES, nargs="+", default=["gaussian"])
    parser.add_argument("--outlier", type=float, nargs="+", default=[0.0])
    add_common_arguments(parser, WARNING_NOISE_MARGIN)
    args = parser.parse_args()
    rows = [
        row(noise, outlier, sigma, length, seed_range(args), args.fall, args.margin)
        for noise in args.noise for outlier in args.outlier
        for sigma in args.sigmas for length in args.lengths
    ]  # fmt: skip
    title = f"fall {args.fall} nats: flat series that warn, falling ones found"
    emit(args, title, {"fall": args.fall}, rows)


if __name__ == "__main__":
    main()
