"""How a child process ended, in words and as the shell's exit code; the CPUs this process
may run children on."""

from __future__ import annotations

import os
import signal

SIGNALLED = 128
"""A shell reports a process killed by signal N as exit code 128 + N (137 for SIGKILL)."""


def how_it_ended(returncode: int) -> str:
    """A child's end from its return code (negative: the signal that killed it, as Python
    reports it): `exited with code 3`, `was killed by SIGKILL (often the out-of-memory
    killer)`."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    oom = " (often the out-of-memory killer)" if name == "SIGKILL" else ""
    return f"was killed by {name}{oom}"


def shell_exit_code(returncode: int) -> int:
    """The exit code a shell reports for a child with this return code: itself, or 128 + N for
    one killed by signal N."""
    return SIGNALLED - returncode if returncode < 0 else returncode


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity (`taskset`, a Slurm job's or a
    container's cpuset), where the system tells it, else the machine's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity on this system (macOS, Windows)
        return os.cpu_count() or 1
