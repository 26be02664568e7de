"""What the two false-alarm benchmarks share (flat_reward_collapse.py and
flat_likelihood_warning.py): the seed and format options, and their output, a table of rows or
JSON."""

from __future__ import annotations

import argparse
import json


def add_common_arguments(parser: argparse.ArgumentParser, margin: float) -> None:
    """--seeds, --first-seed, --margin (default `margin`) and --format."""
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--margin", type=float, default=margin)
    parser.add_argument("--format", choices=["table", "json"], default="table")


def seed_range(args: argparse.Namespace) -> range:
    """The seeds the options name."""
    return range(args.first_seed, args.first_seed + args.seeds)


SHARES = ("false", "found")
"""The columns that hold a share of the runs, shown with two decimals."""


def emit(args: argparse.Namespace, title: str, settings: dict, rows: list[dict]) -> None:
    """Prints the rows: JSON (settings, the seeds and margin, the rows), or a table of every
    row's values, headed by `title` and the rows' keys (a None shown as -)."""
    seeds = seed_range(args)
    if args.format == "json":
        header = {"seeds": [seeds.start, seeds.stop - 1], **settings, "margin": args.margin}
        print(json.dumps({**header, "rows": rows}, indent=2))
        return
    print(f"seeds {seeds.start}-{seeds.stop - 1}, margin {args.margin}: {title}")
    print(" ".join(f"{key:>7}" for key in rows[0]))
    for row in rows:
        cells = [
            "-" if value is None
            else value if isinstance(value, str)
            else f"{value:.2f}" if key in SHARES else f"{value:g}"
            for key, value in row.items()
        ]  # fmt: skip
        print(" ".join(f"{cell:>7}" for cell in cells))
