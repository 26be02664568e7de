"""Peak memory of a replay of many policies, on a synthetic run.

    python benchmarks/replay_memory.py                   # 1024 policies over 1600x8x32
    python benchmarks/replay_memory.py --policies 256 --shape 400,8,32 --output replay.json

The run is written by the project's Recorder (`synthetic_runs.py`, cached under `--cache`);
the policies are `--policies` GRPO settings (eps_low 0.0500, 0.0502, ...). The replay is the
command's, `stabledrl replay RUN -p SPEC ... --format json`, in a child process; printed: its
peak resident memory (the child's own, from wait4), its wall time, and the size of the
per-step metrics a replay keeps of every policy ([steps, policies, 26] float64). `--output`
keeps the replay's JSON, to compare two versions' output byte for byte.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synthetic_runs import Shape, cached_run

from stabledrl_cli.replay.columns import device_metrics

MB = 2**20


def policy_specs(count: int) -> list[str]:
    """`count` distinct GRPO settings."""
    return [f"grpo:eps_low={0.05 + i * 0.0002:.4f}" for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=Shape.parse, default=Shape.parse("1600,8,32"))
    parser.add_argument("--policies", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path(os.devnull))
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "stabledrl-bench"
    )
    args = parser.parse_args(argv)
    directory, _ = cached_run(args.shape, args.seed, args.cache)
    command = [sys.executable, "-m", "stabledrl_cli", "replay", str(directory), "--format", "json"]
    for spec in policy_specs(args.policies):
        command += ["-p", spec]
    started = time.perf_counter()
    with args.output.open("wb") as output:
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    rows = args.shape.steps * args.policies * len(device_metrics()) * 8
    print(f"replay of {args.policies} policies over {args.shape.name}: exit {child.returncode}")
    print(f"peak RSS {usage.ru_maxrss / 1024:.0f} MB, {seconds:.0f} s")
    print(f"per-step metrics of every policy: {rows / MB:.0f} MB")
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
