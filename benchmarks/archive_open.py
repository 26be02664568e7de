"""What opening a packed run costs against opening its directory.

For each `--shape` (built and cached as `replay_speed.py` does), opens the run directory and
its `.h5` `--repeats` times each in this one process, torch imported first as a replay has it,
and prints the median milliseconds of `open_run` for each and, of the archive's, the part spent
in its probe (`dump._archive_probe.probe`: the fork, and the child's checks and reads of the
metadata and index); then, to split the probe, a bare fork of this process (the child exits at
once) and the child's work run here, unforked; then the CPU time of an archive's opening, which
a loaded machine disturbs less than its wall time: this process's own (the median; the fork's
copy of the page tables is charged to it) and its probe child's (the mean, from the kernel's
accounting of the reaped children). This is the fixed cost an archive adds to every command
that reads it, beside the per-step reads that `replay_speed.py` measures.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch  # noqa: F401  # loaded before the open, as in a replay: the fork copies it
from arguments import at_least
from synthetic_runs import Shape, add_step_options, cached_run
from timing import median_seconds

from stabledrl_cli.dump import _archive_file, _archive_probe, open_run


def _median_ms(action: Callable[[], object], repeats: int) -> float:
    return median_seconds(action, repeats) * 1e3


def _fork_ms(repeats: int) -> float:
    """Median time for `os.fork` to return in this process (the child, which exits at once,
    is reaped untimed: the probe does not wait for its child's exit either)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        times.append(time.perf_counter() - started)
        os.waitpid(pid, 0)
    return statistics.median(times) * 1e3


def _cpu_ms(archive: Path, repeats: int) -> list[float]:
    """CPU ms of opening the archive: this process's (median) and the probe child's (mean)."""
    own = []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(repeats):
        started = time.thread_time()
        open_run(archive).close()
        own.append(time.thread_time() - started)
        for pid in list(_archive_probe._UNREAPED):  # its exit, then its CPU is counted
            os.waitpid(pid, 0)
            _archive_probe._UNREAPED.discard(pid)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    child = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return [statistics.median(own) * 1e3, child / repeats * 1e3]


def _row(directory: Path, archive: Path, repeats: int, probe_times: list[float]) -> list[float]:
    """dir, h5, probe, bare fork and unforked child work, median ms each; then the CPU ms of
    opening the archive (`_cpu_ms`)."""
    probe_times.clear()
    dir_ms = _median_ms(lambda: open_run(directory), repeats)
    h5_ms = _median_ms(lambda: open_run(archive), repeats)
    probe_ms = statistics.median(probe_times) * 1e3
    size = archive.stat().st_size
    work_ms = _median_ms(lambda: _archive_probe._child_report(archive, str(archive), size), repeats)
    return [dir_ms, h5_ms, probe_ms, _fork_ms(repeats), work_ms, *_cpu_ms(archive, repeats)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_options(parser)
    parser.set_defaults(shape=None)
    parser.add_argument("--repeats", type=at_least(1), default=41)
    args = parser.parse_args()
    shapes = [args.shape] if args.shape else [Shape.parse(s) for s in ("50,64,512", "2000,8,64")]
    probe_times: list[float] = []
    real_probe = _archive_file.probe

    def timed_probe(*probe_args: object, **kwargs: object) -> object:
        started = time.perf_counter()
        try:
            return real_probe(*probe_args, **kwargs)  # type: ignore[arg-type]
        finally:
            probe_times.append(time.perf_counter() - started)

    _archive_file.probe = timed_probe  # type: ignore[assignment]
    columns = ("dir ms", "h5 ms", "probe ms", "fork ms", "unforked ms", "h5 cpu", "child cpu")
    print(f"{'run':16s}" + "".join(f"{c:>12s}" for c in columns))
    for shape in shapes:
        directory, archive = cached_run(shape, args.seed, Path(args.cache))
        row = _row(directory, archive, args.repeats, probe_times)
        print(f"{shape.name:16s}" + "".join(f"{v:12.2f}" for v in row))


if __name__ == "__main__":
    main()
