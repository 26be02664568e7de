"""Replay speed and memory against the read floor, on synthetic runs of given shapes.

    python benchmarks/replay_speed.py                        # the README's shapes, 3 repeats
    python benchmarks/replay_speed.py --shape 20,64,512 --shape 10,64,512,128 --repeats 1
    python benchmarks/replay_speed.py --format json > replay_speed.json
    python benchmarks/replay_speed.py --clock cpu             # ratios of CPU time
    python benchmarks/replay_speed.py --render replay_speed.json --clock cpu
    python benchmarks/replay_speed.py --tasks "" --log-steps 80   # only log_step's cost

Each `--shape STEPS,SEQS,LEN[,K]` is a run written by the project's Recorder (realistic values,
`synthetic_runs.py`; K adds a k=K gradient sketch per token), built once and cached under
`--cache` (with its packed `.h5`) by shape and seed. For each run and each source (the run
directory and its `.h5`), each task runs `--repeats` times, each time in a fresh subprocess
(so its peak RSS, /proc's VmHWM, is its own); the table shows the median wall and CPU time of
the task itself (imports excluded), throughput in M positions/s (masked positions included),
the ratio to the read floor (the directory's, of the same run), the ratio of the `.h5` to the
directory for the same task, and the median peak RSS. Ratios and Mpos/s divide `--clock` time:
wall (default), or the task's CPU time, steadier on a shared machine. Tasks:

- floor: `open_run`, then every step's every tensor loaded and copied (`step[name].clone()`),
  through the same reader a replay uses, on as many threads as the replay: the time to just
  read the data.
- one: `replay(run, ["grpo"])`, one policy.
- catalogue: `replay(run)`, the run's own policy and the standard catalogue.

Then `log_step`: per shape, the median time of a synchronous `Recorder.log_step` of one step
(its checks, CRCs, write, fsync, rename, directory fsync) against a raw `safetensors` save of
the same arrays with the same durability (write, fsync, rename, fsync the directory),
alternated step by step, `--log-steps` of each; the ratio is the median of the pairs' ratios
(fsync times drift on a shared disk). The same calls' CPU time (`time.process_time`) gives a
`cpu ratio`, its pairs' median too: `log_step`'s own work against the save's (the fsyncs'
system time in both), which waiting on a busy disk's fsync, several ms in both, does not swamp
as it swamps the wall ratio. A report from before it renders `-` there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
from arguments import at_least
from synthetic_runs import Shape, cached_run, step_arrays

TASKS = ("floor", "one", "catalogue")
SOURCES = ("dir", "h5")
DEFAULT_SHAPES = (
    "200,256,1024", "20,256,1024", "2000,64,512", "50,64,512", "50,64,512,128", "2000,8,64"
)  # fmt: skip
WIDTH = 80


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: its own, not its parent's before exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# -- child side -------------------------------------------------------------------------------
def read_floor(path: str) -> dict[str, Any]:
    """Every tensor of every step loaded and copied, through the reader a replay uses."""
    from stabledrl_cli.dump import open_run

    run = open_run(path)
    tokens = nbytes = 0
    for step in run.steps():
        for name in sorted(step.fields):
            nbytes += step[name].clone().nbytes
        tokens += step.num_tokens
    return {"tokens": tokens, "bytes": nbytes}


def run_task(task: str, path: str, device: str, threads: int | None) -> dict[str, Any]:
    """One task (module docstring) in this process: its wall time, peak RSS and facts."""
    import torch

    from stabledrl_cli._device import resolve_device
    from stabledrl_cli.replay.engine import replay

    torch.set_num_threads(threads or 1)  # the floor reads on the threads a replay computes on
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    if task == "floor":
        facts = read_floor(path)
    else:
        result = replay(path, ["grpo"] if task == "one" else None, device=device, threads=threads)
        facts = {"steps": result.steps, "policies": len(result.policies), "threads": result.threads}
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "threads": torch.get_num_threads(),
        **facts,
        "seconds": seconds,
        "cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "peak_rss_mb": _peak_rss_mb(),
        "device": str(resolve_device(device)),
        "dtype": _compute_dtype(path),
        "torch": torch.__version__,
    }


def _compute_dtype(path: str) -> str:
    """The dtype a replay computes in: the first step's logp dtype, at least float32."""
    import torch

    from stabledrl_cli.dump import open_run

    logp = next(iter(open_run(path).steps()))["logp"]
    return str(torch.promote_types(logp.dtype, torch.float32)).removeprefix("torch.")


def log_step_cost(shape: Shape, seed: int, count: int, where: Path) -> dict[str, Any]:
    """Median wall and CPU seconds of `Recorder.log_step` and of a raw safetensors save of the
    same arrays with the same fsyncs, alternated (`count` of each)."""
    from safetensors.numpy import save_file

    from stabledrl_cli._atomic import fsync_dir, fsync_file
    from stabledrl_cli.dump import Recorder
    from stabledrl_cli.dump._inputs import build_step

    arrays = step_arrays(shape, seed, 0)
    tensor_keys = {k: v for k, v in arrays.items() if isinstance(v, np.ndarray)}
    scalar_keys = {k: v for k, v in arrays.items() if not isinstance(v, np.ndarray)}
    flat, scalars, _ = build_step(
        unit="token", step=0, arrays=tensor_keys, scalars=scalar_keys, user_scalars=None,
        num_params=None,
    )  # fmt: skip
    metadata = {name: repr(value) for name, value in scalars.items()}
    raw_dir = where / "raw"
    raw_dir.mkdir()
    recorded, raw = [], []  # (wall, CPU) seconds of each call
    with Recorder(where / "run", policy="grpo", unit="token") as recorder:
        for step in range(count):
            started = time.perf_counter(), time.process_time()
            recorder.log_step(step, **arrays)  # type: ignore[arg-type]
            recorded.append(_since(started))
            started = time.perf_counter(), time.process_time()
            final, temp = raw_dir / f"step-{step:08d}.safetensors", raw_dir / f".tmp-{step}"
            save_file(flat, str(temp), metadata=metadata)
            fsync_file(temp)
            os.replace(temp, final)
            fsync_dir(raw_dir)
            raw.append(_since(started))
    return {
        "shape": shape.name,
        "bytes": sum(a.nbytes for a in flat.values()),
        "log_step_ms": 1000 * statistics.median(wall for wall, _ in recorded),
        "raw_save_ms": 1000 * statistics.median(wall for wall, _ in raw),
        "ratio": statistics.median(a[0] / b[0] for a, b in zip(recorded, raw, strict=True)),
        "log_step_cpu_ms": 1000 * statistics.median(cpu for _, cpu in recorded),
        "raw_save_cpu_ms": 1000 * statistics.median(cpu for _, cpu in raw),
        "cpu_ratio": statistics.median(a[1] / b[1] for a, b in zip(recorded, raw, strict=True)),
    }


def _since(started: tuple[float, float]) -> tuple[float, float]:
    """The wall and CPU seconds since `started` (`time.perf_counter()`, `time.process_time()`)."""
    return time.perf_counter() - started[0], time.process_time() - started[1]


# -- parent side ------------------------------------------------------------------------------
def _child(args: list[str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(memory_kb / 2**20, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def measure_run(
    shape: Shape, paths: dict[str, Path], args: argparse.Namespace, log: Any
) -> dict[str, Any]:
    """Every (source, task) of one run: repeats, medians, ratios."""
    rows: list[dict[str, Any]] = []
    for source in args.sources:
        _warm(paths[source])
        for task in args.tasks:
            samples = []
            for repeat in range(args.repeats):
                log(f"{shape.name} {source} {task} ({repeat + 1}/{args.repeats})")
                threads = ["--threads", str(args.threads)] if args.threads else []
                samples.append(
                    _child([task, str(paths[source]), "--device", args.device, *threads])
                )
            log(f"{shape.name} {source} {task}: {[round(s['seconds'], 2) for s in samples]} s")
            rows.append({
                "source": source,
                "task": task,
                "seconds": [s["seconds"] for s in samples],
                "cpu_seconds": [s["cpu_seconds"] for s in samples],
                "median_wall_s": statistics.median(s["seconds"] for s in samples),
                "median_cpu_s": statistics.median(s["cpu_seconds"] for s in samples),
                "peak_rss_mb": statistics.median(s["peak_rss_mb"] for s in samples),
                "policies": samples[0].get("policies"),
                "device": samples[0]["device"],
                "dtype": samples[0]["dtype"],
                "threads": samples[0]["threads"],
                "torch": samples[0]["torch"],
            })  # fmt: skip
    return {
        "shape": shape.name,
        "steps": shape.steps,
        "sequences": shape.sequences,
        "length": shape.length,
        "sketch_k": shape.sketch_k,
        "positions": shape.tokens,
        "bytes": {source: _size(path) for source, path in paths.items()},
        "rows": rows,
    }


def _warm(path: Path) -> None:
    """Reads every file of a run once, so that each task starts from a warm page cache."""
    for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            while handle.read(1 << 24):
                pass


def memory_scaling(report: dict[str, Any]) -> list[tuple[str, str, float, float]]:
    """(shorter run, 10x longer run, peak RSS of each) of the catalogue from the directory,
    for every pair of runs of one step shape whose step counts differ tenfold."""
    peaks = {
        run["shape"]: (run["steps"], (run["sequences"], run["length"], run["sketch_k"]), row)
        for run in report["runs"]
        for row in run["rows"]
        if row["source"] == "dir" and row["task"] == "catalogue"
    }
    return [
        (short, long, peaks[short][2]["peak_rss_mb"], peaks[long][2]["peak_rss_mb"])
        for short in peaks
        for long in peaks
        if peaks[short][1] == peaks[long][1] and peaks[long][0] == 10 * peaks[short][0]
    ]


def add_ratios(report: dict[str, Any], clock: str) -> None:
    """Each row's throughput and ratios (to the directory's read floor, and of the `.h5` to
    the directory), of the median wall or CPU time (`clock`: "wall" or "cpu")."""
    report["clock"] = clock
    for run in report["runs"]:
        rows = run["rows"]
        for row in rows:
            row["median_s"] = row[f"median_{clock}_s"]
            row["mtok_per_s"] = run["positions"] / row["median_s"] / 1e6
        by_key = {(r["source"], r["task"]): r for r in rows}
        floor = by_key.get(("dir", "floor"))
        for row in rows:
            row["x_floor"] = row["median_s"] / floor["median_s"] if floor else None
            same = by_key.get(("dir", row["task"]))
            row["x_dir"] = row["median_s"] / same["median_s"] if same and row is not same else None


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(report: dict[str, Any]) -> str:
    """The report as text of at most `WIDTH` columns."""
    first = next((row for run in report["runs"] for row in run["rows"]), None)
    prose = (
        f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
        f"{report['machine']['memory_gb']} GB, {report['machine']['os']}."
    )
    if first is not None:
        prose += (
            f" Device {first['device']}, dtype {first.get('dtype', 'float32')}, "
            f"torch {first['torch']}, replay on "
            f"{report['replay_threads']} thread(s); medians of {report['repeats']}, ratios of "
            f"{report['clock']} time."
        )
    lines = textwrap.wrap(prose, WIDTH)
    header = (
        f"{'run':<17} {'src':<3} {'task':<9} {'wall s':>8} {'cpu s':>8} {'Mpos/s':>7} "
        f"{'x floor':>7} {'x dir':>6} {'RSS MB':>7}"
    )
    if report["runs"]:
        lines += [header, "-" * len(header)]
    for run in report["runs"]:
        for row in run["rows"]:
            lines.append(
                f"{run['shape']:<17} {row['source']:<3} {row['task']:<9} "
                f"{row['median_wall_s']:>8.2f} {row['median_cpu_s']:>8.2f} "
                f"{row['mtok_per_s']:>7.1f} "
                f"{_ratio(row['x_floor']):>7} {_ratio(row['x_dir']):>6} "
                f"{row['peak_rss_mb']:>7.0f}"
            )
    for short, long, short_mb, long_mb in memory_scaling(report):
        lines += textwrap.wrap(
            f"Peak memory of the catalogue from {long}: {long_mb:.0f} MB, "
            f"{long_mb / short_mb:.2f}x that from the 10x shorter {short} ({short_mb:.0f} MB).",
            WIDTH,
        )
    if report["log_step"]:
        header = (
            f"{'log_step of one step':<24} {'MB':>7} {'log_step ms':>12} {'raw save ms':>12} "
            f"{'ratio':>6} {'cpu ratio':>9}"
        )
        lines += ["", header, "-" * len(header)]
        for row in report["log_step"]:  # (a report from before the CPU figures has no cpu_ratio)
            lines.append(
                f"{row['shape']:<24} {row['bytes'] / 2**20:>7.1f} {row['log_step_ms']:>12.2f} "
                f"{row['raw_save_ms']:>12.2f} {row['ratio']:>6.2f} "
                f"{_ratio(row.get('cpu_ratio')):>9}"
            )
    assert all(len(line) <= WIDTH for line in lines), "table wider than 80 columns"
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shape",
        action="append",
        type=Shape.parse,
        metavar="STEPS,SEQS,LEN[,K]",
        help=f"a run to measure (repeatable; default {' '.join(DEFAULT_SHAPES)})",
    )
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--threads", type=at_least(1), help="replay's --threads (default: replay's own, 1)"
    )
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "stabledrl-bench"
    )
    parser.add_argument(
        "--tasks", default=",".join(TASKS), help="comma-separated subset of " + ",".join(TASKS)
    )
    parser.add_argument("--sources", default=",".join(SOURCES), help="dir,h5 or one of them")
    parser.add_argument(
        "--log-steps", type=int, default=40, help="log_step samples a shape (0: skip)"
    )
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument(
        "--render", type=Path, help="print the table of an earlier --format json report"
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="what Mpos/s and the ratios divide: wall time, or the task's CPU time (steadier "
        "on a shared machine; with several torch threads it adds them up)",
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--child-log-step", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_task(args.child[0], args.child[1], args.device, args.threads)))
        return 0
    if args.render:
        earlier = json.loads(args.render.read_text())
        add_ratios(earlier, args.clock)
        print(table(earlier))
        return 0
    shapes = args.shape or [Shape.parse(s) for s in DEFAULT_SHAPES]
    if args.child_log_step:
        with tempfile.TemporaryDirectory(dir=args.cache) as where:
            cost = log_step_cost(Shape.parse(args.child_log_step[0]), args.seed,
                                 int(args.child_log_step[1]), Path(where))  # fmt: skip
        print(json.dumps(cost))
        return 0
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.sources = [s for s in args.sources.split(",") if s]
    if not set(args.tasks) <= set(TASKS) or not set(args.sources) <= set(SOURCES):
        parser.error(f"--tasks: a subset of {','.join(TASKS)}; --sources: of {','.join(SOURCES)}")

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    args.cache.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(["python", "benchmarks/replay_speed.py", *(argv or sys.argv[1:])]),
        "repeats": args.repeats,
        "runs": [],
        "log_step": [],
    }
    for shape in shapes if args.tasks else ():  # --tasks "": only log_step, no run is built
        directory, archive = cached_run(shape, args.seed, args.cache, log)
        paths = {"dir": directory, "h5": archive}
        report["runs"].append(measure_run(shape, paths, args, log))
    for shape in shapes if args.log_steps else ():
        log(f"log_step {shape.name}")
        report["log_step"].append(_child_log_step(shape, args))
    replays = [r for run in report["runs"] for r in run["rows"] if r["task"] != "floor"]
    report["replay_threads"] = replays[0]["threads"] if replays else args.threads
    add_ratios(report, args.clock)
    print(json.dumps(report, indent=2) if args.format == "json" else table(report))
    return 0


def _child_log_step(shape: Shape, args: argparse.Namespace) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--cache", str(args.cache), "--seed", str(args.seed),
         "--child-log-step", shape.name.replace("+k", ","), str(args.log_steps)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"log_step child failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


if __name__ == "__main__":
    raise SystemExit(main())
