"""Where a replay's compute goes: torch's profiler over the streaming pass of a synthetic run.

    python benchmarks/replay_profile.py                          # 8 steps of 200,256,1024
    python benchmarks/replay_profile.py --shape 50,64,512,128 --policies grpo --top 8
    python benchmarks/replay_profile.py --policies grpo --whole   # and the whole replay

Reads `--steps` steps of the run of `--shape` (built and cached as `replay_speed.py` does),
then runs a replay's streaming pass over them (`replay.stream.stream_run`, reading included,
from the page cache) on one thread: once untimed, three times timed (the least CPU time is
shown: a shared machine only adds), once under torch's profiler. Prints the positions a step,
the time to read a step, the pass's CPU time a step without the profiler, the top-level
tensor operations a step and their mean time, and the call sites in `stabledrl_cli` that
spend the most operator time, with their operations a step. `--whole` then replays every step
of the run as `stabledrl replay` does (its reading on a thread of its own) and prints the wall
time and the share of it the computing thread spent on a CPU: what is left is waiting (for the
reader, the GIL or a CPU), the most that overlapping could still win; and the wall time of the
same replay with each step's row a row of zeros instead of the policies' weights and metrics:
what the rest of a replay costs, which no faster policy code can remove.
"""

from __future__ import annotations

import argparse
import collections
import time
from typing import Any
from unittest.mock import patch

import torch
from synthetic_runs import add_step_options, open_cached
from torch.profiler import ProfilerActivity, profile

from stabledrl_cli.dump import Run, Step
from stabledrl_cli.errors import InputError
from stabledrl_cli.replay import columns, step_data, stream
from stabledrl_cli.replay.engine import replay, resolve_policies
from stabledrl_cli.replay.step_data import Arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_options(parser)
    parser.add_argument("--policies", help="comma-separated specs (default: the catalogue)")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument(
        "--whole",
        action="store_true",
        help="also time a replay of every step and the share the computing thread was busy",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = open_cached(args)
    policies, own = resolve_policies(run, args.policies.split(",") if args.policies else None)
    started = time.perf_counter()
    steps = []
    for step in run.steps():
        if len(steps) == args.steps:
            break
        step_data.read_arrays(step, run.location)
        steps.append(step)
    read_ms = (time.perf_counter() - started) / len(steps) * 1e3
    device = torch.device("cpu")

    def compute() -> None:
        stream.stream_run(run, policies, own, device, steps=steps)

    compute()
    samples = []
    for _ in range(3):
        cpu = time.process_time()
        compute()
        samples.append((time.process_time() - cpu) / len(steps) * 1e3)
    cpu_ms = min(samples)
    verbose = torch._C._profiler._ExperimentalConfig(verbose=True)
    with profile(
        activities=[ProfilerActivity.CPU], with_stack=True, experimental_config=verbose
    ) as profiled:
        compute()
    top_level = [
        e
        for e in profiled.events()
        if e.name.startswith("aten::")
        and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))
    ]
    spent: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    for event in top_level:
        ours = [frame for frame in event.stack or () if "stabledrl_cli" in frame]
        site = ours[0].split("stabledrl_cli/")[-1] if ours else "(elsewhere)"
        spent[site] += event.cpu_time_total
        calls[site] += 1
    n = len(steps)
    total_us = sum(e.cpu_time_total for e in top_level)
    print(f"{args.shape.name}: {steps[0].num_tokens} positions a step, {len(policies)} "
          f"policies, {n} steps, 1 thread")  # fmt: skip
    print(f"read: {read_ms:.1f} ms a step; the pass: {cpu_ms:.1f} ms of CPU a step")
    print(f"top-level tensor operations: {len(top_level) / n:.0f} a step, "
          f"{total_us / len(top_level):.1f} us each under the profiler")  # fmt: skip
    print(f"{'ms/step':>8} {'ops/step':>8}  call site (operator time under the profiler)")
    for site, micros in spent.most_common(args.top):
        print(f"{micros / 1e3 / n:8.2f} {calls[site] / n:8.0f}  {site[:60]}")
    if args.whole:
        print(whole_replay(run, [p.spec for p in policies]))


def whole_replay(run: Run, specs: list[str]) -> str:
    """The replay of every step, as `stabledrl replay` runs it (reading on its own thread):
    its wall time and how much of it the computing thread (this one) spent on a CPU (the rest
    it waited: for the reader, for the GIL, or for a CPU); then the wall time of the same
    replay without the policies' computation (`_prepared_only`)."""
    replay(run, specs, device="cpu")  # untimed: the page cache and the heap warm
    wall, busy = time.perf_counter(), time.thread_time()
    result = replay(run, specs, device="cpu")
    wall, busy = time.perf_counter() - wall, time.thread_time() - busy
    with patch.object(stream, "_step_row", _prepared_only):
        bare = time.perf_counter()
        replay(run, specs, device="cpu")
        bare = time.perf_counter() - bare
    return (
        f"whole replay ({result.steps} steps, reading on its own thread): {wall:.2f} s, "
        f"the computing thread on a CPU {busy / wall:.0%} of it\n"
        f"the same without the policies' weights and metrics (a row of zeros a step): "
        f"{bare:.2f} s"
    )


def _prepared_only(item: tuple[Step, Arrays], **kwargs: Any) -> stream.StepRow | InputError:
    """`stream._step_row` without the policies: the step prepared and checked as a replay
    does, its row zeros. A replay through it costs what reading, preparing, the checks, the
    collapse warning's measurements and the report cost on their own."""
    step, arrays = item
    try:
        _, geometry, _ = step_data.usable(
            step, arrays, kwargs["unit"], kwargs["where"], kwargs["ranks"]
        )
    except InputError as exc:
        return exc
    shape = (len(kwargs["policies"]), len(columns.device_metrics()))
    return torch.zeros(shape, dtype=torch.float64), geometry.kind, None


if __name__ == "__main__":
    main()
