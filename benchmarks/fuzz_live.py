"""Fuzz the readers of a run that is still being written, and of one whose writer was killed.

Each run starts a writer in real processes: a small script of this file's recording steps with
`Recorder` in a loop with tiny sleeps (synchronous or `async_writes=True`, one rank or two in
two processes, token or sequence units, steps of 64 or 4,096 tokens a sequence, with or without
a geometry sketch), or `stabledrl record --rl-steps N` of the built-in example. At random
moments it runs readers in parallel on the run (`inspect --format json`, `replay --format json`,
`check --max-collapsed 1000`, `watch --once`, `pack RUN out.h5 --force`, and `open_run(RUN)`
iterating its steps), and it ends the writer by a signal at a random moment (SIGKILL, SIGTERM,
SIGSTOP with readers run while it is stopped, then SIGCONT) or lets it finish.

Every reader must end with an exit code of 0-4 (docs/exit-codes.md) and at most one error line,
never a traceback, a hang (`SECONDS_A_READ`) or exit 70. Once the writer has ended, every step
it had finished (its `log_step` returned, on every rank) must read back with `open_run`.

    nice python benchmarks/fuzz_live.py --runs 20 --seed 0

Each failure is printed with the seed and run that reproduce it; exit status 1 if any.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from arguments import at_least  # noqa: E402
from fuzz_cli import ENDINGS  # noqa: E402

SECONDS_A_READ = 120
"""A reader longer than this is a hang (a small live run reads in a few seconds)."""

WRITER = r"""
import sys, time
import numpy as np
from stabledrl_cli import Recorder

out, steps, rank, ranks, asynchronous, unit, sketch, sleep, length = sys.argv[1:10]
steps, rank, ranks, sleep, length = int(steps), int(rank), int(ranks), float(sleep), int(length)
rng = np.random.default_rng(rank)
recorder = Recorder(out, policy="grpo", unit=unit, world_size=ranks, rank=rank,
                    async_writes=asynchronous == "1", reward_range=(0.0, 1.0))
for step in range(steps):
    batch = 8
    logp = -rng.exponential(1.0, size=(batch, length) if unit == "token" else batch)
    arrays = dict(
        logp=logp.astype(np.float32),
        logp_old=(logp + rng.normal(0.0, 0.05, size=logp.shape)).astype(np.float32),
        advantages=rng.normal(size=batch).astype(np.float32),
        group_id=(np.arange(batch) // 4).astype(np.int32),
        reward=rng.uniform(size=batch).astype(np.float32),
    )
    if unit == "token":
        arrays["mask"] = np.ones((batch, length), dtype=np.uint8)
    if sketch == "1":
        units = batch * length if unit == "token" else batch
        arrays["unit_grad_sketch"] = rng.normal(size=(units, 4)).astype(np.float32)
        arrays["grad_norm_covered"] = 1.0
    recorder.log_step(step, grad_norm=1.0, loss=float(rng.normal()), **arrays)
    print(step, flush=True)
    time.sleep(sleep)
recorder.close()
print("closed", flush=True)
"""


@dataclass
class Writer:
    """The writing processes of one run and the steps each has said it finished."""

    processes: list[subprocess.Popen[str]]
    record_steps: int | None = None
    """The steps of `record --rl-steps N`, which says none finished: all once it exits 0."""
    finished: list[set[int]] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def follow(self) -> None:
        """Read each process's stdout in a thread: a step number is a finished step."""
        for process in self.processes:
            done: set[int] = set()
            self.finished.append(done)

            def read(process: subprocess.Popen[str] = process, done: set[int] = done) -> None:
                assert process.stdout is not None
                for line in process.stdout:
                    if line.strip().isdigit():
                        done.add(int(line))

            thread = threading.Thread(target=read, daemon=True)
            thread.start()
            self.threads.append(thread)

    def signal(self, number: int) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.kill(process.pid, number)

    def wait(self) -> None:
        for process in self.processes:
            try:
                process.wait(timeout=SECONDS_A_READ)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for thread in self.threads:
            thread.join(timeout=10)

    def finished_steps(self) -> set[int]:
        """Steps every rank finished."""
        if self.record_steps is not None:
            ended = self.processes[0].returncode == 0
            return set(range(self.record_steps)) if ended else set()
        return set.intersection(*self.finished)


def start_writer(run: Path, rng: random.Random, script: Path) -> tuple[Writer, str]:
    """A writer of a random kind recording to `run`, and how it was made (to reproduce)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if rng.random() < 0.2:
        steps = rng.randint(2, 6)
        line = [sys.executable, "-m", "stabledrl_cli", "record", "--out", str(run)]
        line += ["--rl-steps", str(steps), "--device", "cpu"]
        process = subprocess.Popen(
            line, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, env=env
        )
        return Writer([process], record_steps=steps), " ".join(line[1:])
    ranks = rng.choice((1, 1, 2))
    asynchronous = rng.choice(("0", "1"))
    unit = rng.choice(("token", "sequence"))
    sketch = rng.choice(("0", "1"))
    steps = str(rng.randint(5, 60))
    sleep = str(rng.choice((0.0, 0.002, 0.01)))
    length = str(rng.choice((64, 4096)))  # a long step is more often killed mid-write
    processes = []
    for rank in range(ranks):
        line = [sys.executable, str(script), str(run), steps, str(rank), str(ranks)]
        line += [asynchronous, unit, sketch, sleep, length]
        processes.append(
            subprocess.Popen(
                line, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
            )
        )
    writer = Writer(processes)
    writer.follow()
    how = f"writer ranks={ranks} async={asynchronous} unit={unit} sketch={sketch}"
    return writer, f"{how} steps={steps} sleep={sleep} length={length}"


READ_STEPS = (
    "import sys\n"
    "from stabledrl_cli import open_run\n"
    "from stabledrl_cli.errors import StabledrlError\n"
    "try:\n"
    "    for step in open_run(sys.argv[1]):\n"
    "        step['logp']\n"
    "except StabledrlError as error:\n"
    "    print(f'error: {error}', file=sys.stderr)\n"
    "    sys.exit(3)\n"
)


def reader_lines(run: Path, scratch: Path) -> list[list[str]]:
    """Every reader of the run, each a command line."""
    cli = [sys.executable, "-m", "stabledrl_cli"]
    return [
        [*cli, "inspect", str(run), "--format", "json"],
        [*cli, "replay", str(run), "--format", "json"],
        [*cli, "check", str(run), "--max-collapsed", "1000"],
        [*cli, "watch", str(run), "--once"],
        [*cli, "pack", str(run), str(scratch / "out.h5"), "--force"],
        [sys.executable, "-c", READ_STEPS, str(run)],
    ]


def judged(line: list[str], code: int | None, stderr: str) -> str | None:
    """Why a reader's ending breaks the contract, or None."""
    if code is None:
        return f"hung (more than {SECONDS_A_READ} s)"
    if code not in ENDINGS:
        return f"exit {code}: {stderr.strip()[-600:]}"
    if "Traceback" in stderr:
        return f"a traceback: {stderr.strip()[-600:]}"
    errors = [text for text in stderr.splitlines() if text.startswith("error")]
    if len(errors) > 1:
        return f"{len(errors)} error lines: {errors}"
    return None


def read(lines: list[list[str]]) -> list[tuple[list[str], str]]:
    """Run the readers in parallel; each failure with its command line."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1", COLUMNS="120")
    processes = [
        subprocess.Popen(
            line, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
        )
        for line in lines
    ]
    failures = []
    for line, process in zip(lines, processes, strict=True):
        try:
            _, stderr = process.communicate(timeout=SECONDS_A_READ)
            code: int | None = process.returncode
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
            code = None
        why = judged(line, code, stderr)
        if why is not None:
            failures.append((line, why))
    return failures


FINAL_CHECK = (
    "import sys, json\n"
    "from stabledrl_cli import open_run\n"
    "run = open_run(sys.argv[1])\n"
    "lost = []\n"
    "for n in json.loads(sys.argv[2]):\n"
    "    try:\n"
    "        run.step(n)['logp']\n"
    "    except Exception as error:\n"
    "        lost.append(f'{n}: {type(error).__name__}: {error}'[:300])\n"
    "print(json.dumps(lost))\n"
)


def lost_steps(run: Path, finished: set[int]) -> list[str]:
    """The finished steps that do not read back, each with why."""
    if not finished:
        return []
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    line = [sys.executable, "-c", FINAL_CHECK, str(run), json.dumps(sorted(finished))]
    done = subprocess.run(line, capture_output=True, text=True, env=env, timeout=SECONDS_A_READ)
    if done.returncode != 0:
        return [f"open_run failed: {done.stderr.strip()[-600:]}"]
    lost: list[str] = json.loads(done.stdout)
    return lost


def one_run(index: int, seed: int, workdir: Path, report: Callable[[str], None]) -> tuple[int, int]:
    """One writer with readers and a signal; the failures reported and the readers run."""
    rng = random.Random(f"{seed}-{index}")
    folder = workdir / f"run-{index}"
    folder.mkdir()
    script = workdir / "writer.py"
    run = folder / "run"
    writer, how = start_writer(run, rng, script)
    ending = rng.choice(("kill", "kill", "term", "stop", "none"))
    failures: list[tuple[list[str], str]] = []
    reads = 0
    for _ in range(rng.randint(1, 2)):
        time.sleep(rng.uniform(0.5, 3.0))
        picked = rng.sample(reader_lines(run, folder), rng.randint(1, 3))
        reads += len(picked)
        failures += read(picked)
    time.sleep(rng.uniform(0.0, 1.0))
    if ending == "kill":
        writer.signal(signal.SIGKILL)
    elif ending == "term":
        writer.signal(signal.SIGTERM)
    elif ending == "stop":
        writer.signal(signal.SIGSTOP)
        reads += 2
        failures += read(rng.sample(reader_lines(run, folder), 2))
        writer.signal(signal.SIGCONT)
    writer.wait()
    if run.exists():
        reads += len(reader_lines(run, folder))
        failures += read(reader_lines(run, folder))
    for line, why in failures:
        report(f"seed {seed} run {index} ({how}; {ending}): `{' '.join(line[1:])}` {why}")
    lost = lost_steps(run, writer.finished_steps())
    for text in lost:
        report(f"seed {seed} run {index} ({how}; {ending}): finished step lost: {text}")
    return len(failures) + len(lost), reads


def fuzz(runs: int, seed: int, report: Callable[[str], None]) -> tuple[int, int]:
    """`runs` seeded runs; the number of failures and of readers run."""
    with tempfile.TemporaryDirectory(prefix="stabledrl-fuzz-live-") as scratch:
        workdir = Path(scratch)
        (workdir / "writer.py").write_text(WRITER)
        counts = [one_run(index, seed, workdir, report) for index in range(runs)]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=at_least(1), default=10, help="writers (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="the first seed's number")
    args = parser.parse_args(argv)
    failures, reads = fuzz(args.runs, args.seed, lambda text: print(text, flush=True))
    print(f"{args.runs} runs, {reads} readers, seed {args.seed}: {failures} failures", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
