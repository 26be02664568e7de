"""Replay throughput and memory: steps/s and peak memory for a short and a long run.

Synthesizes one run of --steps steps with the Recorder (sequence units, --sequences a step,
like the built-in example's 64), then replays the first 500 steps (a copy holding only them)
and all of it, each in a fresh subprocess so peak RSS is that replay's alone; then prints the
JSON (every per-step row) to /dev/null as `replay --format json` does. Memory must not grow
with the run's length beyond the output itself: O(steps x policies) scalars, kept as columns.
`--traced` adds tracemalloc's peak of Python allocations (slower, and its bookkeeping inflates
RSS, so compare RSS without it).

    python benchmarks/replay_speed.py                    # 500 vs 2000 steps, 10 policies
    python benchmarks/replay_speed.py --steps 4000 --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np


def synthesize(path: Path, steps: int, sequences: int, seed: int = 0) -> None:
    from stabledrl_cli.dump import Recorder

    rng = np.random.default_rng(seed)
    group = (np.arange(sequences) // 8).astype(np.int32)
    with Recorder(path, policy="grpo", unit="sequence", reward_range=(0.0, 1.0),
                  overwrite=True) as rec:  # fmt: skip
        for step in range(steps):
            reward = rng.random(sequences).astype(np.float32)
            means = np.array([reward[group == g].mean() for g in group], dtype=np.float32)
            logp_old = (-5 + rng.normal(size=sequences)).astype(np.float32)
            rec.log_step(
                step,
                logp=(logp_old + 0.5 * rng.normal(size=sequences)).astype(np.float32),
                logp_old=logp_old,
                advantages=reward - means,
                seq_id=np.arange(sequences, dtype=np.int32),
                group_id=group,
                reward=reward,
                grad_norm=float(rng.random()),
                loss=0.0,
                reward_mean=float(reward.mean()),
            )


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(path: str, device: str, chunk_size: int, traced: bool) -> dict[str, float]:
    """One replay (run in a child process): wall time and peak RSS of the replay (and with
    `traced`, tracemalloc's peak), then peak RSS once its JSON is printed."""
    from stabledrl_cli.replay.engine import replay

    if traced:
        tracemalloc.start()
    started = time.perf_counter()
    result = replay(path, device=device, chunk_size=chunk_size)
    seconds = time.perf_counter() - started
    traced_peak = tracemalloc.get_traced_memory()[1] / 2**20 if traced else math.nan
    replay_rss = _peak_rss_mb()
    with open(os.devnull, "w") as sink:
        for piece in result.iter_json():
            sink.write(piece)
    return {
        "steps": result.steps,
        "policies": len(result.policies),
        "seconds": seconds,
        "steps_per_s": result.steps / seconds,
        "peak_rss_mb": replay_rss,
        "traced_peak_mb": traced_peak,
        "json_peak_rss_mb": _peak_rss_mb(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--short", type=int, default=500)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/stabledrl-replay-speed"))
    parser.add_argument("--traced", action="store_true", help="also measure with tracemalloc")
    parser.add_argument("--child", nargs=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child[0], args.device, args.chunk_size, args.traced)))
        return 0

    long_run, short_run = args.dir / f"long-{args.steps}", args.dir / f"short-{args.short}"
    if not (long_run / "manifest.json").is_file():
        started = time.perf_counter()
        synthesize(long_run, args.steps, args.sequences)
        print(f"synthesized {long_run} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if not (short_run / "manifest.json").is_file():
        (short_run / "steps").mkdir(parents=True)
        shutil.copy(long_run / "manifest.json", short_run / "manifest.json")
        for step in range(args.short):
            name = f"step-{step:08d}.safetensors"
            shutil.copy(long_run / "steps" / name, short_run / "steps" / name)

    print(f"| steps | policies | seconds | steps/s | peak RSS MB | traced peak MB | "
          f"peak RSS with JSON MB | (device {args.device}, chunk {args.chunk_size}) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for run in (short_run, long_run):
        child = subprocess.run(
            [sys.executable, __file__, "--child", str(run), "--device", args.device,
             "--chunk-size", str(args.chunk_size), *(["--traced"] if args.traced else [])],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        m = json.loads(child.stdout.strip().splitlines()[-1])
        print(
            f"| {m['steps']} | {m['policies']} | {m['seconds']:.1f} | {m['steps_per_s']:.0f} | "
            f"{m['peak_rss_mb']:.0f} | {m['traced_peak_mb']:.1f} | {m['json_peak_rss_mb']:.0f} | |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
