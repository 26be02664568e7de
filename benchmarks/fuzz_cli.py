"""Fuzz the command line: random combinations of every command's options, sensible and hostile
values, on copies of the recorded fixture runs and a baseline.

Each run picks a command (`inspect`, `replay`, `tune`, `check`, `diff`, `watch --once`, `pack`,
`policies`, `import`), its arguments, and one to four of its options, read from the commands
themselves (a new option is fuzzed without a change here), each given a value that parses (four
times in five, where this file knows the option) or one of a pool of hostile ones (NaN, 1e400,
a 30-digit integer, an empty string, a device, a FIFO-like path, a spec of 300 characters,
reversed ranges and sizes). The command runs in this process through typer's CliRunner and
must end as docs/exit-codes.md says a command ends: an exit code of 0-4, never 70 (a bug of
the tool), no exception escaping, no traceback, no output line of more than
`LONGEST_LINE` characters, within `SECONDS_A_RUN`. `record` and `branch` train (seconds each)
and `--engine ray` starts a cluster: not fuzzed here.

    python benchmarks/fuzz_cli.py --runs 1000 --seed 0

Each failure is printed with its command line; exit status 1 if any.
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from arguments import at_least  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from stabledrl_cli.cli.app import app, load_command  # noqa: E402

LONGEST_LINE = 1000
"""Characters an output line may have: a crafted value is cut in a message (docs/trust.md)."""

SECONDS_A_RUN = 120
"""A run longer than this is a hang (the fixture runs replay in about a second)."""

ENDINGS = {0, 1, 2, 3, 4}
"""The exit codes a command run in this process may end with (docs/exit-codes.md)."""

NOT_FUZZED = ("--ray-address",)
"""Options that reach outside this process (a Ray cluster's address)."""

POLICIES = (
    "grpo",
    "stabledrl",
    "ppo:eps_low=0.1",
    "dapo",
    "gspo",
    "cispo",
    "sapo",
    "is",
    "reinforce",
    "vespo",
    "dual-clip",
    "two-sided:delta=3",
    "gmpo",
    "dppo",
    "clip-cov",
    "kl-cov",
    "gpg",
    "gppo",
    "grpo:eps_low=0.1..0.3",
)
"""Specs that parse: every family, and a sweep (which `tune` takes and `replay` refuses)."""

HOSTILE_NUMBERS = ("0", "-1", "nan", "inf", "-inf", "1e308", "1e-320", "9" * 30, "1e400", "x", "")
HOSTILE_TEXT = ("", ":", "x" * 300, "grpo:", "grpo:eps_low=0.1,eps_low=0.2", "dapo:eps_high=nan")
HOSTILE_RANGES = ("3:1", ":", "-5:", "0:0", "a:b", "1:2:3", "::", "99999999999999999999:")
HOSTILE_SIZES = ("0", "1e400", "-1M", "99999999T", "M", "16 M")


@dataclass(frozen=True)
class Places:
    """The files a run may name: two recorded runs, a baseline, paths of every kind, outputs."""

    grpo: Path
    stabledrl: Path
    baseline: Path
    work: Path

    def runs(self) -> tuple[str, ...]:
        return (str(self.grpo), str(self.stabledrl))

    def odd_paths(self) -> tuple[str, ...]:
        """Paths that are no run: a text file, an empty folder, a device, a missing path, a
        run's subfolder, a URL of nothing."""
        return (
            str(self.work / "file.txt"),
            str(self.work / "empty"),
            "/dev/null",
            str(self.work / "missing"),
            str(self.grpo / "steps"),
            "memory://nothing/here",
        )


def good_values(places: Places) -> dict[str, tuple[str, ...]]:
    """Values that parse, by option name (without its dashes)."""
    out = places.work
    return {
        "format": ("table", "json"),
        "device": ("cpu",),
        "engine": ("local",),
        "metrics": ("trl", "verl", "counts"),
        "policy": POLICIES,
        "guard": ("zclip", "skip-step", "none", "zclip:z=2"),
        "steps": ("10:20", "0:5", "150:", "5"),
        "until": ("50", "10"),
        "memory-budget": ("64K", "1M", "16M"),
        "chunk-size": ("1", "3", "64"),
        "threads": ("1", "2"),
        "workers": ("1", "2"),
        "out": (str(out / "out.h5"),),
        "plot": (str(out / "out.png"),),
        "junit": (str(out / "out.xml"),),
        "write-baseline": (str(out / "written.json"),),
        "baseline": (str(places.baseline),),
        "compression": ("fast", "small"),
        "reward-range": ("0,1",),
        "window": ("1", "5", "50"),
        "collapse-window": ("1", "3", "10"),
        "spike-factor": ("1.5", "10"),
        "drift-threshold": ("-0.1", "0"),
        "max-grad-norm": ("0.5", "1"),
        "context": ("0", "3"),
        "atol": ("0", "1e-6"),
        "rtol": ("0", "1e-3"),
        "recent": ("1", "5"),
        "interval": ("0.1",),
        "until-idle": ("0.1",),
        "max-collapsed": ("0", "1"),
        "max-discard-frac": ("0.1", "1"),
        "max-nonfinite": ("0", "10"),
        "max-spikes": ("0", "100"),
        "max-lost-steps": ("0",),
    }


def hostile_values(name: str, places: Places) -> tuple[str, ...]:
    """Values a command must refuse (or take) without a crash, by the kind of option."""
    if name in ("out", "plot", "junit", "write-baseline", "baseline"):
        return (*places.odd_paths(), *places.runs(), str(places.baseline))
    if name in ("policy", "guard", "format", "device", "engine", "metrics", "compression"):
        return (*HOSTILE_TEXT, "cuda", "tpu", "bogus")
    if name in ("steps", "until"):
        return HOSTILE_RANGES + HOSTILE_NUMBERS
    if name == "memory-budget":
        return HOSTILE_SIZES
    if name == "reward-range":
        return ("1,0", "nan,1", "0", "a,b", "0,inf")
    return HOSTILE_NUMBERS


def arguments(command: str, places: Places, rng: random.Random) -> list[str]:
    """The command's positional arguments (a run, or two; an archive to write)."""
    run = rng.choice(places.runs())
    if command in ("inspect", "replay", "tune", "check"):
        return [run]
    if command == "watch":
        return [run, "--once"]
    if command == "diff":
        return [run, rng.choice(places.runs())]
    if command == "pack":
        target = rng.choice((str(places.work / f"packed{rng.randint(0, 3)}.h5"), "/dev/null"))
        return [run, target, "--force"]
    if command == "import":
        source = rng.choice((*places.odd_paths(), run))
        return [source, "--out", str(places.work / f"imported{rng.randint(0, 3)}"), "--force"]
    return []


COMMANDS = ("inspect", "replay", "tune", "check", "diff", "watch", "pack", "policies", "import")


def options(command: str) -> dict[str, bool]:
    """The command's options (name -> whether it is a flag), from the command itself."""
    found: dict[str, bool] = {}
    for param in load_command(command).params:
        if param.param_type_name == "option" and param.opts[0] not in NOT_FUZZED:
            found[param.opts[0]] = bool(getattr(param, "is_flag", False))
    return found


def command_line(places: Places, good: dict[str, tuple[str, ...]], rng: random.Random) -> list[str]:
    """One random command line (`good`: `good_values(places)`)."""
    command = rng.choice(COMMANDS)
    line = [command, *arguments(command, places, rng)]
    offered = options(command)
    for option in rng.sample(sorted(offered), k=min(len(offered), rng.randint(1, 4))):
        if offered[option]:
            line.append(option)
            continue
        name = option.lstrip("-")
        pool = good[name] if name in good and rng.random() < 0.8 else hostile_values(name, places)
        line += [option, rng.choice(pool)]
    return line


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """TimeoutError once `seconds` have passed (the main thread's alarm)."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def failure(line: list[str]) -> str | None:
    """Why running `line` broke the command-line contract, or None when it held."""
    try:
        with time_limit(SECONDS_A_RUN):
            result = CliRunner().invoke(app, line, catch_exceptions=True)
    except TimeoutError as exc:
        return f"a hang: {exc}"
    output = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return f"an exception escaped: {result.exception!r:.300}"
    if result.exit_code not in ENDINGS:
        return f"exit {result.exit_code}: {output.strip()[-300:]}"
    if "Traceback (most recent call last)" in output:
        return "a traceback in the output"
    longest = max((len(text) for text in output.splitlines()), default=0)
    if longest > LONGEST_LINE:
        return f"an output line of {longest} characters"
    return None


def fixture_places(work: Path) -> Places:
    """Copies of the recorded fixture runs and of a baseline in `work`: a command may write
    into any path it is given (`check --write-baseline BASELINE`), so none is the checkout's."""
    for name in ("grpo", "stabledrl"):
        shutil.copytree(ROOT / "fixtures" / name, work / name)
    shutil.copyfile(ROOT / "fixtures/grpo.baseline.json", work / "grpo.baseline.json")
    (work / "file.txt").write_text("not a run\n")
    (work / "empty").mkdir()
    return Places(work / "grpo", work / "stabledrl", work / "grpo.baseline.json", work)


def fuzz(runs: int, seed: int, report: Callable[[str], None]) -> list[tuple[list[str], str]]:
    """`runs` random command lines from `seed`; each (line, why) that broke the contract."""
    rng = random.Random(seed)
    failures = []
    with tempfile.TemporaryDirectory(prefix="stabledrl-fuzz-cli-") as work:
        places = fixture_places(Path(work))
        good = good_values(places)
        for _ in range(runs):
            line = command_line(places, good, rng)
            why = failure(line)
            if why is not None:
                failures.append((line, why))
                report(f"stabledrl {' '.join(repr(part) for part in line)}: {why}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=at_least(1), default=200, help="command lines to run")
    parser.add_argument("--seed", type=at_least(0), default=0, help="the random seed")
    args = parser.parse_args(argv)
    failures = fuzz(args.runs, args.seed, lambda text: print(text, flush=True))
    print(f"{args.runs} command lines, {len(failures)} broke the contract")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
