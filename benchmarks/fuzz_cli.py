"""Fuzz the command line: random combinations of every command's options, sensible and hostile
values, on copies of the recorded fixture runs and a baseline.

Each run picks a command (`inspect`, `replay`, `tune`, `check`, `diff`, `watch --once`, `pack`,
`policies`, `import`; `--commands` picks others, `record` and `branch` among them), its
arguments, and one to four of its options, read from the commands
themselves (a new option is fuzzed without a change here), each given a value that parses (four
times in five, where this file knows the option) or one of a pool of hostile ones (NaN, 1e400,
a 30-digit integer, an empty string, a device, a FIFO-like path, a spec of 300 characters,
reversed ranges and sizes). The command runs in this process through typer's CliRunner and
must end as docs/exit-codes.md says a command ends: an exit code of 0-4, never 70 (a bug of
the tool), no exception escaping, no traceback, no output line of more than
`LONGEST_LINE` characters, within `SECONDS_A_RUN`. A `replay` or `tune` line is given
`--engine processes --workers 2` one time in four (drawn apart, so a seed's other draws stay
the same); `--engine ray` starts a cluster: not fuzzed here.

`record` and `branch` train (seconds a line), so they are fuzzed only when `--commands` names
them, always with a few RL steps: the built-in example with one to five of its options, or
`record -- python SCRIPT` with a small script of this file's (policy batches, scalar steps only,
an exit code of its own, nothing recorded), into a fresh run directory or an awkward one (a
file, a folder that is no run, a read-only folder, a name with odd characters, a run's
`steps`); `branch` of a run recorded with checkpoints once a fuzz, or of one without. A run
that `record` or `branch` made with exit 0 must then replay with exit 0 (a run of scalar
steps only, which has nothing to replay: be inspected).

    python benchmarks/fuzz_cli.py --runs 1000 --seed 0
    nice python benchmarks/fuzz_cli.py --commands record,branch --runs 100 --seed 1

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
from click.testing import Result  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from stabledrl_cli.cli.app import app, load_command  # noqa: E402

LONGEST_LINE = 1000
"""Characters an output line may have: a crafted value is cut in a message (docs/trust.md)."""

SECONDS_A_RUN = 120
"""A run longer than this is a hang (the fixture runs replay in about a second)."""

ENDINGS = {0, 1, 2, 3, 4}
"""The exit codes a command may end with on any input (docs/exit-codes.md): 70 is a bug,
71 the machine's limits."""

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


RL_STEPS = ("1", "2", "3", "5")
"""`--rl-steps` of a `record` or `branch` line: a few steps, a line in seconds."""

TRAINING_VALUES = {
    "guard": ("skip", "scale"),
    "guard-rule": ("zclip", "skip-step", "zclip:z=2"),
    "seed": ("0", "3"),
    "checkpoint-every": ("1", "2", "4"),
    "lr": ("1e-4", "1e-2", "10"),
    "estimator": ("llada", "elbo"),
    "unit": ("sequence", "token"),
    "geometry": ("gram", "sketch"),
    "geometry-every": ("1", "2"),
    "geometry-k": ("4", "16"),
    "geometry-params": ("*", "*.weight", "nothing*"),
    "geometry-seed": ("0", "5"),
    "geometry-method": ("auto", "exact", "jvp"),
    "geometry-dtype": ("float32", "float16"),
    "at": ("0", "2", "4", "7", "100"),
}
"""Values that parse for `record` and `branch` where they differ from the other commands'
(`--guard` names a mode there, a rule elsewhere) or are theirs alone."""

COMMAND_OPTIONS = ("--policy", "--optimizer-hooks")
"""`record`'s options that apply to `-- CMD` (the example's are refused there)."""

SCRIPT_STEPS = 3
"""Optimizer steps of a fuzzed `record -- python SCRIPT`."""

SCRIPTS = {
    "batches": "sd.log_policy_batch(step, policy='grpo', logp=-np.ones(4), logp_old=-np.ones(4),"
    " advantages=np.array([1.0, -1.0, 0.5, -0.5]), reward=np.full(4, 0.5),"
    " recorder_kwargs={'unit': 'sequence'})",
    "scalars": "",
    "exits": "sys.exit(3) if step == 1 else None",
}
"""Scripts a `record` line may wrap, each a statement after every optimizer step: one that logs
a policy batch, one that records scalar steps only, one that exits 3 midway (and `nothing`, a
script that trains nothing: no step to record)."""

SCRIPT = """import sys

import numpy as np
import torch

import stabledrl_cli as sd

layer = torch.nn.Linear(3, 1)
adam = torch.optim.Adam(layer.parameters())
for step in range({steps}):
    adam.zero_grad()
    layer(torch.ones(3)).square().sum().backward()
    adam.step()
    {each}
"""

ODD_NAME = "odd name 'é\n$HOME*?\\"
"""A run directory's name a shell would mangle: a quote, a newline, a glob, a backslash."""


@dataclass(frozen=True)
class Places:
    """The files a run may name: two recorded runs, a baseline, paths of every kind, outputs."""

    grpo: Path
    stabledrl: Path
    baseline: Path
    work: Path

    @property
    def checkpointed(self) -> Path:
        """A run of the example with checkpoints, which `branch` lines branch (made by
        `record_checkpointed` when `branch` is fuzzed)."""
        return self.work / "checkpointed"

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


def made_dirs(places: Places) -> tuple[str, ...]:
    """The fresh run directories `record` lines may make, which `branch` lines may branch."""
    return tuple(str(places.work / "made" / name) for name in "abcdefghij")


def run_dirs(places: Places) -> tuple[str, ...]:
    """Where `record --out` and `branch --out` may be told to write: fresh directories, half
    the time (the same one again is a run already there), and the awkward ones."""
    work = places.work
    return (
        *made_dirs(places),
        str(work / "file.txt"),
        str(work / "not-a-run"),
        str(work / "read-only"),
        str(work / "read-only" / "run"),
        str(work / ODD_NAME),
        str(places.grpo / "steps" / "run"),
        "",
        "memory://bucket/run",
    )


def training_values(
    command: str, places: Places, good: dict[str, tuple[str, ...]]
) -> dict[str, tuple[str, ...]]:
    """`good_values` for `record` or `branch` (`good`: the other commands'); `branch` may also
    be told to write into the run it branches (a refusal), never `record`, which would replace
    it."""
    outs = run_dirs(places)
    if command == "branch":
        outs += (str(places.checkpointed), str(places.checkpointed / "checkpoints" / "x"))
    return {**good, **TRAINING_VALUES, "out": outs}


def value(
    option: str,
    good: dict[str, tuple[str, ...]],
    places: Places,
    rng: random.Random,
    sensible: float = 0.8,
) -> str:
    """A value for `option`: one that parses, where `good` knows one, with the probability
    `sensible`; else a hostile one."""
    name = option.lstrip("-")
    pool = good[name] if name in good and rng.random() < sensible else hostile_values(name, places)
    return rng.choice(pool)


def with_options(
    line: list[str],
    offered: dict[str, bool],
    k: int,
    good: dict[str, tuple[str, ...]],
    places: Places,
    rng: random.Random,
    sensible: float = 0.8,
) -> list[str]:
    """`line` with `k` of the `offered` options (name -> whether it is a flag), each with a
    value (one that parses with the probability `sensible`)."""
    for option in rng.sample(sorted(offered), k=min(len(offered), k)):
        if offered[option]:
            line.append(option)
        else:
            line += [option, value(option, good, places, rng, sensible)]
    return line


def record_line(places: Places, good: dict[str, tuple[str, ...]], rng: random.Random) -> list[str]:
    """`record` of the example with a few RL steps, checkpoints half the time, and one to
    five of its options (and
    `--geometry` or `--guard`, four times in five, where an option needs it; the options it
    refuses one time in five), or of a script with up to two of the options a command
    takes (one time in five an example's); `--force` half the time, values that parse nine
    times in ten."""
    line = ["record", "--out", rng.choice(good["out"]), *rng.choice(([], ["--force"]))]
    offered = options("record")
    del offered["--out"], offered["--force"]
    script = rng.choice((None, None, *SCRIPTS, "nothing"))
    if script is None:
        line += ["--rl-steps", value("--rl-steps", {"rl-steps": RL_STEPS}, places, rng, 0.95)]
        line += rng.choice(([], ["--checkpoint-every", "2"]))  # for branch lines
        del offered["--rl-steps"]
        if rng.random() < 0.8:
            del offered["--optimizer-hooks"], offered["--steps"]  # a command's; deprecated
        line = with_options(line, offered, rng.randint(1, 5), good, places, rng, 0.9)
        for needs, given in (
            ("--geometry-", ["--geometry", "sketch"]),
            ("--guard-", ["--guard", "skip"]),
        ):
            wanted = any(part.startswith(needs) for part in line)
            if wanted and given[0] not in line and rng.random() < 0.8:
                line += given
        return line
    if rng.random() < 0.8:
        offered = {name: offered[name] for name in COMMAND_OPTIONS}
    line = with_options(line, offered, rng.randint(0, 2), good, places, rng, 0.9)
    return [*line, "--", sys.executable, str(places.work / "scripts" / f"{script}.py")]


def branch_line(places: Places, good: dict[str, tuple[str, ...]], rng: random.Random) -> list[str]:
    """`branch` of the run with checkpoints, or of a run a `record` line may have made (with
    its options, and checkpoints half the time), or (one time in five) of a run without
    checkpoints or of no run, under one or two policies, a few RL steps each (hostile one time
    in twenty), with up to three more options (hostile one time in ten)."""
    made = rng.choice(made_dirs(places))
    other = rng.choice((*places.runs(), *places.odd_paths()))
    line = ["branch", rng.choice((str(places.checkpointed),) * 2 + (made,) * 2 + (other,))]
    for option in ("--at", "--policy", "--rl-steps"):
        line += [option, value(option, {**good, "rl-steps": RL_STEPS}, places, rng, 0.95)]
    offered = options("branch")
    del offered["--at"], offered["--rl-steps"]
    return with_options(line, offered, rng.randint(0, 3), good, places, rng, 0.9)


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
"""The commands fuzzed by default: a line takes about a second."""

TRAINING = ("record", "branch")
"""Commands that train, seconds a line: fuzzed when `--commands` names them."""

ENGINES = ("replay", "tune")
"""Commands whose line is given `--engine processes --workers 2` one time in four."""

WORKERS = ["--engine", "processes", "--workers", "2"]


def options(command: str) -> dict[str, bool]:
    """The command's options (name -> whether it is a flag), from the command itself."""
    found: dict[str, bool] = {}
    for param in load_command(command).params:
        if param.param_type_name == "option" and param.opts[0] not in NOT_FUZZED:
            found[param.opts[0]] = bool(getattr(param, "is_flag", False))
    return found


def command_line(
    places: Places,
    good: dict[str, dict[str, tuple[str, ...]]],
    rng: random.Random,
    engines: random.Random,
) -> list[str]:
    """One random command line of a command of `good` (command -> `good_values(places)`, or
    `training_values` for `record` and `branch`). `engines` draws whether a `replay` or `tune`
    line computes in worker processes, apart from `rng`: a seed's other lines stay the same."""
    command = rng.choice(tuple(good))
    if command == "record":
        return record_line(places, good[command], rng)
    if command == "branch":
        return branch_line(places, good[command], rng)
    line = [command, *arguments(command, places, rng)]
    line = with_options(line, options(command), rng.randint(1, 4), good[command], places, rng)
    if command in ENGINES and engines.random() < 0.25 and not {"--engine", "--workers"} & {*line}:
        line += WORKERS
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


def run(line: list[str]) -> tuple[Result | None, str | None]:
    """Run `line`: its result (None after a hang), and why it broke the command-line contract
    (None when it held)."""
    try:
        with time_limit(SECONDS_A_RUN):
            result = CliRunner().invoke(app, line, catch_exceptions=True)
    except TimeoutError as exc:
        return None, f"a hang: {exc}"
    output = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return result, f"an exception escaped: {result.exception!r:.300}"
    if result.exit_code not in ENDINGS:
        return result, f"exit {result.exit_code}: {output.strip()[-300:]}"
    if "Traceback (most recent call last)" in output:
        return result, "a traceback in the output"
    longest = max((len(text) for text in output.splitlines()), default=0)
    if longest > LONGEST_LINE:
        return result, f"an output line of {longest} characters"
    return result, None


def failure(line: list[str]) -> str | None:
    """Why running `line` broke the command-line contract, or None when it held."""
    return run(line)[1]


def made_run(line: list[str]) -> list[str] | None:
    """The line that must exit 0 once `line` did: a replay of the run `record` or `branch` made
    (an inspect of a run of scalar steps only); None for another command, or a script that
    records no policy batch."""
    if line[0] == "record":
        out = line[line.index("--out") + 1]
        script = Path(line[-1]).stem if "--" in line else "batches"
        return {"batches": ["replay", out], "scalars": ["inspect", out]}.get(script)
    if line[0] == "branch":
        folder = (
            Path(line[line.index("--out") + 1]) if "--out" in line else Path(line[1]) / "branches"
        )
        made = sorted(folder.glob("*@*"), key=lambda branch: branch.stat().st_mtime)
        return ["replay", str(made[-1]) if made else str(folder / "none")]
    return None


def broken(line: list[str], engines: random.Random) -> str | None:
    """Why `line`, or the replay of the run it made, broke the contract; None when both held
    (the replay sometimes in worker processes, as `engines` draws)."""
    result, why = run(line)
    then = made_run(line) if result is not None and result.exit_code == 0 else None
    if why is not None or then is None:
        return why
    if then[0] == "replay" and engines.random() < 0.25:
        then += WORKERS
    result, why = run(then)
    if why is None and result is not None and result.exit_code != 0:
        why = f"exit {result.exit_code}: {result.output.strip()[-300:]}"
    return None if why is None else f"its run then, `stabledrl {' '.join(then)}`: {why}"


def fixture_places(work: Path) -> Places:
    """Copies of the recorded fixture runs and of a baseline in `work`: a command may write
    into any path it is given (`check --write-baseline BASELINE`), so none is the checkout's;
    and the scripts and awkward directories of `record` lines."""
    for name in ("grpo", "stabledrl"):
        shutil.copytree(ROOT / "fixtures" / name, work / name)
    shutil.copyfile(ROOT / "fixtures/grpo.baseline.json", work / "grpo.baseline.json")
    (work / "file.txt").write_text("not a run\n")
    (work / "empty").mkdir()
    (work / "not-a-run").mkdir()
    (work / "not-a-run" / "notes.txt").write_text("a file of yours\n")
    (work / "read-only").mkdir(mode=0o555)
    (work / "scripts").mkdir()
    for name, each in SCRIPTS.items():
        (work / "scripts" / f"{name}.py").write_text(SCRIPT.format(steps=SCRIPT_STEPS, each=each))
    (work / "scripts" / "nothing.py").write_text("print('nothing trained')\n")
    return Places(work / "grpo", work / "stabledrl", work / "grpo.baseline.json", work)


def record_checkpointed(places: Places) -> None:
    """Record the run that `branch` lines branch: 8 steps, a checkpoint every 4."""
    line = [
        "record",
        "--out",
        str(places.checkpointed),
        "--rl-steps",
        "8",
        "--checkpoint-every",
        "4",
    ]
    result, why = run([*line, "--device", "cpu"])
    if why is not None or result is None or result.exit_code != 0:
        raise SystemExit(f"could not record the run to branch: {why or (result and result.output)}")


def fuzz(
    runs: int, seed: int, report: Callable[[str], None], commands: tuple[str, ...] = COMMANDS
) -> list[tuple[list[str], str]]:
    """`runs` random command lines of `commands` from `seed`; each (line, why) that broke the
    contract."""
    rng = random.Random(seed)
    engines = random.Random(f"engines {seed}")
    failures = []
    with tempfile.TemporaryDirectory(prefix="stabledrl-fuzz-cli-") as work:
        places = fixture_places(Path(work))
        good = good_values(places)
        tables = {
            command: training_values(command, places, good) if command in TRAINING else good
            for command in commands
        }
        if "branch" in commands:
            record_checkpointed(places)
        for _ in range(runs):
            line = command_line(places, tables, rng, engines)
            why = broken(line, engines)
            if why is not None:
                failures.append((line, why))
                report(f"stabledrl {' '.join(repr(part) for part in line)}: {why}")
    return failures


def command_names(text: str) -> tuple[str, ...]:
    """An argparse type: commands separated by commas, each one this file fuzzes."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",")))
    unknown = [name for name in names if name not in (*COMMANDS, *TRAINING)]
    if unknown or not names:
        known = ", ".join((*COMMANDS, *TRAINING))
        raise argparse.ArgumentTypeError(
            f"unknown command {unknown[0] if unknown else text!r}: one of {known}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=at_least(1), default=200, help="command lines to run")
    parser.add_argument("--seed", type=at_least(0), default=0, help="the random seed")
    parser.add_argument(
        "--commands",
        type=command_names,
        default=COMMANDS,
        help="the commands to fuzz, separated by commas (default: all but record and branch,"
        " which train for seconds a line)",
    )
    args = parser.parse_args(argv)
    failures = fuzz(args.runs, args.seed, lambda text: print(text, flush=True), args.commands)
    print(f"{args.runs} command lines, {len(failures)} broke the contract")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
