"""Start-up time of the CLI and the package: median wall time of several fresh processes.

    python benchmarks/startup.py [--runs 7]

Times `stabledrl --help`, `stabledrl policies`, the help of `replay` and `import`, and
`python -c "import stabledrl_cli"` (each a new interpreter, output discarded) and prints a
table of median, min and max seconds, plus whether each imported torch. None of them should:
torch alone takes about a second to import.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

PY = sys.executable
COMMANDS: dict[str, list[str]] = {
    "stabledrl --help": [PY, "-m", "stabledrl_cli", "--help"],
    "stabledrl policies": [PY, "-m", "stabledrl_cli", "policies"],
    "stabledrl replay --help": [PY, "-m", "stabledrl_cli", "replay", "--help"],
    "stabledrl import --help": [PY, "-m", "stabledrl_cli", "import", "--help"],
    "import stabledrl_cli": [PY, "-c", "import stabledrl_cli"],
    "import torch (yardstick)": [PY, "-c", "import torch"],
}
TORCH_PROBE = "import sys, runpy; sys.argv = {argv!r}; {body}\nprint('torch' in sys.modules)"


def wall_times(command: list[str], runs: int) -> list[float]:
    """Seconds from start to exit of `runs` fresh processes (after one warm-up run)."""
    times = []
    for i in range(runs + 1):
        started = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        if i:
            times.append(time.perf_counter() - started)
    return times


def imports_torch(command: list[str]) -> bool:
    """Runs the command's work in one interpreter and asks it whether torch got imported."""
    if command[1] == "-m":
        body = (
            "from stabledrl_cli.cli.app import app\n"
            "try:\n    app(prog_name='stabledrl')\nexcept SystemExit:\n    pass"
        )
        code = TORCH_PROBE.format(argv=["stabledrl", *command[3:]], body=body)
    else:
        code = f"{command[2]}\nimport sys\nprint('torch' in sys.modules)"
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1] == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per command")
    args = parser.parse_args()
    print(f"{'command':<26} {'median s':>9} {'min s':>7} {'max s':>7}  torch")
    for name, command in COMMANDS.items():
        times = wall_times(command, args.runs)
        torch = "yes" if imports_torch(command) else "no"
        print(
            f"{name:<26} {statistics.median(times):>9.3f} {min(times):>7.3f} "
            f"{max(times):>7.3f}  {torch}"
        )


if __name__ == "__main__":
    main()
