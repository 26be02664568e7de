"""The Ray engine's speed-up: a catalogue replay on 2 local Ray workers against 1, and against
the local engine on 1 and on 2 threads and on 2 local processes, in one run.

Synthesizes a token run with the Recorder (--steps steps of --sequences sequences x --tokens
tokens), then replays it with the default catalogue: locally (`threads` 1, then 2; then
`--engine processes` with 2 workers), then on a
local Ray cluster of 1 CPU, then of 2 CPUs (each cluster started once; one untimed replay
first, so the workers have imported torch). Every step is computed on 1 torch thread (a worker
per CPU), and every sharded or threaded replay's JSON is checked equal to the local one.
Prints the median wall time of --repeats replays of each, the ratios, and the cluster start-up
time (paid once per `replay --engine ray` that starts its own cluster; not paid when joining a
running one).

    python benchmarks/ray_speedup.py                      # 160 steps x 128 x 1024 tokens
    python benchmarks/ray_speedup.py --steps 48 --sequences 64 --tokens 256 --repeats 5

The default run (21M tokens, about 3 s of catalogue compute a core) is large enough that the
shards' compute, not Ray's per-task overhead, sets the time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from arguments import at_least
from extras import require_extra


def synthesize(path: Path, steps: int, sequences: int, tokens: int, seed: int = 0) -> None:
    """A token-unit grpo run: groups of 8 sequences, every 4th step at inner_step 0."""
    from stabledrl_cli.dump import Recorder

    rng = np.random.default_rng(seed)
    group = (np.arange(sequences) // 8).astype(np.int32)
    with Recorder(path, policy="grpo", reward_range=(0.0, 1.0)) as rec:
        for step in range(steps):
            reward = rng.random(sequences).astype(np.float32)
            means = np.array([reward[group == g].mean() for g in group], dtype=np.float32)
            logp_old = (-2 * rng.random((sequences, tokens))).astype(np.float32)
            rec.log_step(
                step,
                logp=(logp_old + 0.1 * rng.normal(size=(sequences, tokens))).astype(np.float32),
                logp_old=logp_old,
                advantages=reward - means,
                mask=rng.random((sequences, tokens)) > 0.1,
                group_id=group,
                reward=reward,
                grad_norm=float(rng.random()),
                loss=0.0,
                reward_mean=float(reward.mean()),
                inner_step=step % 4,
            )


def _without_threads(text: str) -> dict:
    data = json.loads(text)
    data.pop("threads")
    return data


def timed(fn, repeats: int) -> tuple[float, str]:
    """(median seconds over `repeats` calls, the JSON of the last)."""
    seconds, text = [], ""
    for _ in range(repeats):
        start = time.perf_counter()
        text = fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=at_least(1), default=160)
    parser.add_argument("--sequences", type=at_least(1), default=128)
    parser.add_argument("--tokens", type=at_least(1), default=1024)
    parser.add_argument("--chunk-size", type=at_least(1), default=4)
    parser.add_argument("--repeats", type=at_least(1), default=3)
    args = parser.parse_args()
    require_extra("ray", "ray")

    import ray

    from stabledrl_cli.replay.engine import replay
    from stabledrl_cli.replay.process_engine import ProcessEngine
    from stabledrl_cli.replay.ray_engine import RayEngine

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        synthesize(run, args.steps, args.sequences, args.tokens)
        settings = {"device": "cpu", "chunk_size": args.chunk_size}
        local_s, local_json = timed(lambda: replay(run, **settings).to_json(), args.repeats)
        threaded_s, threaded_json = timed(
            lambda: replay(run, **settings, threads=2).to_json(), args.repeats
        )
        assert _without_threads(threaded_json) == _without_threads(local_json), (
            "a replay on 2 threads differs from the one on 1"
        )
        processes_s, processes_json = timed(
            lambda: replay(run, **settings, engine=ProcessEngine(workers=2)).to_json(),
            args.repeats,
        )
        assert processes_json == local_json, "a replay on 2 processes differs from the local one"
        rows = [
            ("local engine (1 process)", local_s),
            ("local engine, 2 threads", threaded_s),
            ("2 local processes", processes_s),
        ]
        startup = {}
        for workers in (1, 2):
            start = time.perf_counter()
            ray.init(
                address="local",
                num_cpus=workers,
                include_dashboard=False,
                logging_level=logging.ERROR,
                log_to_driver=False,
            )
            startup[workers] = time.perf_counter() - start
            engine = RayEngine(workers=workers)

            def sharded(engine: RayEngine = engine) -> str:
                return replay(run, **settings, engine=engine).to_json()

            sharded()  # warm-up: the workers import torch
            seconds, text = timed(sharded, args.repeats)
            assert text == local_json, "a sharded replay's JSON differs from the local one"
            rows.append((f"ray engine, {workers} worker{'s' if workers > 1 else ''}", seconds))
            ray.shutdown()

    tokens = args.steps * args.sequences * args.tokens
    print(
        f"catalogue replay of {args.steps} steps x {args.sequences} sequences x {args.tokens} "
        f"tokens ({tokens / 1e6:.1f}M tokens), chunk {args.chunk_size}, 1 torch thread a "
        f"worker; median of {args.repeats}"
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
        f"load average at the end {os.getloadavg()[0]:.1f} (other processes share the CPUs)"
    )
    print(f"{'engine':<28} {'seconds':>8} {'Mtok/s':>7}")
    for name, seconds in rows:
        print(f"{name:<28} {seconds:8.2f} {tokens / seconds / 1e6:7.2f}")
    ray1, ray2 = rows[3][1], rows[4][1]
    print(f"speed-up, 2 workers against 1: {ray1 / ray2:.2f}x")
    print(f"speed-up, 2 workers against the local engine: {local_s / ray2:.2f}x")
    print(f"speed-up, the local engine on 2 threads against 1: {local_s / threaded_s:.2f}x")
    print(f"speed-up, 2 local processes against the local engine: {local_s / processes_s:.2f}x")
    print(
        f"cluster start-up (once per replay that starts its own): "
        f"{startup[1]:.1f} s (1 CPU), {startup[2]:.1f} s (2 CPUs)"
    )
    print("every sharded or threaded replay's JSON equals the local one: yes")


if __name__ == "__main__":
    main()
