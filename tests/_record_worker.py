"""A recording process for the crash and live-read tests.

    python tests/_record_worker.py OUT --steps N [--async-writes --queue-size Q] [--sleep S]
                                   [--stall-at K]

Records steps 0..N-1 with `Recorder`, each built by `make_step(seed, step)`, and prints each
step number to stdout (flushed) once `log_step` has returned for it. The tests regenerate the
same arrays from the seed to check what was read back, bit for bit. With `--stall-at K` the
write of step K stops half-way through its data, prints "stalled" and waits to be killed: a
crash in the middle of a write, at a known place. `killed_while_recording` kills a recording
process whose Recorders are open (imported by the tests).
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

import numpy as np


def make_step(seed: int, step: int, batch: int = 8, length: int = 512) -> dict:
    """Deterministic arrays of one step: [B, L] token arrays with a ragged mask."""
    rng = np.random.default_rng([seed, step])
    logp = -rng.exponential(1.0, size=(batch, length)).astype(np.float32)
    lengths = rng.integers(1, length + 1, size=batch)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.uint8)
    return {
        "logp": logp,
        "logp_old": (logp + rng.normal(0.0, 0.05, size=logp.shape)).astype(np.float32),
        "advantages": rng.normal(size=batch).astype(np.float32),
        "mask": mask,
        "group_id": (np.arange(batch) // 4).astype(np.int32),
        "reward": rng.uniform(size=batch).astype(np.float32),
        "grad_norm": float(rng.uniform(0.5, 2.0)),
        "loss": float(rng.normal()),
        "inner_step": step % 2,
    }


def stall_in_the_next_large_write() -> None:
    """The next os.writev of more than 4 KiB (a step file's data) writes half, then hangs."""
    real_writev = os.writev

    def writev(fd: int, buffers: list[memoryview]) -> int:
        data = b"".join(buffers)
        if len(data) <= 4096:
            return real_writev(fd, buffers)
        os.write(fd, data[: len(data) // 2])
        print("stalled", flush=True)
        while True:
            time.sleep(60)

    os.writev = writev


def killed_while_recording(path: Path, *, policy: str | None = None, ranks: int = 1) -> None:
    """A forked child records step 0 of each of `ranks` ranks of the run at `path`, then is
    killed (-9) with its Recorders open: their lock files are left, held by no process."""
    from stabledrl_cli import Recorder

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's
        recorders = [
            Recorder(path, policy=policy, world_size=ranks, rank=rank) for rank in range(ranks)
        ]
        for recorder in recorders:
            recorder.log_step(0, loss=1.0)
        os.write(write, b"1")
        signal.pause()
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.close(read)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--async-writes", action="store_true")
    parser.add_argument("--queue-size", type=int, default=8)
    parser.add_argument("--stall-at", type=int, default=None)
    args = parser.parse_args()

    from stabledrl_cli import Recorder

    with Recorder(
        args.out,
        policy="grpo",
        meta={"seed": args.seed},
        async_writes=args.async_writes,
        queue_size=args.queue_size,
    ) as rec:
        for step in range(args.steps):
            if step == args.stall_at:
                stall_in_the_next_large_write()
            rec.log_step(step, **make_step(args.seed, step))
            print(step, flush=True)
            if args.sleep:
                time.sleep(args.sleep)


if __name__ == "__main__":
    main()
