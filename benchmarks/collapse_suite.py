"""The labelled collapse benchmark: many runs of the built-in example, each labelled by the
observed-collapse rule, and every detector scored on the held-out runs.

Phase 1 (`record`) trains and records the grid below with `stabledrl record`, one process a
run, skipping runs already in the cache; phase 2 (`evaluate`) labels every run and scores the
detectors. The grid spans seeds, both estimators, five policies at the example's learning
rate, and two controls that must never warn: a frozen run (lr 1e-9: the weights do not move)
and a low-lr run (lr 1e-6: they move, too little to collapse).

Seeds are split before anything is looked at: calibration seeds tune a detector's settings,
held-out seeds score it. Seed 0 (the fixtures' seed) is always held out.

Phase 3 (`branches`) asks the ground truth of "would another policy have held": it records
grpo runs with checkpoints, re-trains each from two checkpoints before its collapse under
every policy (`stabledrl_cli.branching.run_branches`, what `stabledrl branch` runs), observes
whether each branch collapsed, and counts how often the one-step replay's flags of that policy
on the recorded batches (from the branch point on) agree with the branch's outcome.

    python benchmarks/collapse_suite.py record            # ~20 min on one core, resumable
    python benchmarks/collapse_suite.py evaluate --json collapse_suite.json
    python benchmarks/collapse_suite.py branches --json branches.json   # ~10 min

The figures of the README and docs/collapse.md are `benchmarks/results/collapse_suite.json`
and `benchmarks/results/collapse_branches.json`, written by the last two commands.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from stabledrl_cli.branching import BranchOutcome, run_branches
from stabledrl_cli.dump import Run, open_run
from stabledrl_cli.replay.engine import replay
from stabledrl_cli.replay.observed import observe

CALIBRATION_SEEDS = (1, 2)
HELD_OUT_SEEDS = (0, 3)
ESTIMATORS = ("llada", "elbo")
EXAMPLE_LR = 1e-4
FROZEN_LR = 1e-9
LOW_LR = 1e-6
DEFAULT_STEPS = 400


@dataclass(frozen=True)
class Arm:
    """One configuration of the grid, run once per seed and estimator."""

    name: str
    policy: str
    lr: float
    same_mask: bool = False
    control: str | None = None
    """"frozen" or "low-lr": a run that must not collapse and must not warn."""


ARMS = (
    Arm("grpo", "grpo", EXAMPLE_LR),
    Arm("dapo", "dapo", EXAMPLE_LR),
    Arm("stabledrl", "stabledrl", EXAMPLE_LR),
    Arm("cispo", "cispo", EXAMPLE_LR),
    Arm("grpo-same-mask", "grpo", EXAMPLE_LR, same_mask=True),
    Arm("grpo-frozen", "grpo", FROZEN_LR, control="frozen"),
    Arm("grpo-low-lr", "grpo", LOW_LR, control="low-lr"),
)


@dataclass(frozen=True)
class RunSpec:
    arm: Arm
    seed: int
    estimator: str
    steps: int

    @property
    def name(self) -> str:
        return f"{self.arm.name}_{self.estimator}_seed{self.seed}"

    @property
    def held_out(self) -> bool:
        return self.seed in HELD_OUT_SEEDS


def grid(steps: int) -> list[RunSpec]:
    seeds = sorted(CALIBRATION_SEEDS + HELD_OUT_SEEDS)
    return [
        RunSpec(arm, seed, estimator, steps)
        for arm, seed, estimator in itertools.product(ARMS, seeds, ESTIMATORS)
    ]


def recorded_as(out: Path, settings: object) -> bool:
    """Whether `out` is a finished run recorded with `settings` (what its `.done` holds): a
    cached run recorded with others (fewer steps, another lr) is recorded again, never read
    as this one."""
    done = out / ".done"
    return done.is_file() and done.read_text() == _settings_text(settings)


def mark_recorded(out: Path, settings: object) -> None:
    """Marks `out` a finished run recorded with `settings`."""
    (out / ".done").write_text(_settings_text(settings))


def _settings_text(settings: object) -> str:
    return json.dumps(settings, sort_keys=True) + "\n"


def record_options(spec: RunSpec, extra: Sequence[str] = ()) -> list[str]:
    """`stabledrl record`'s options for `spec` (after `--out`)."""
    return [
        "--force", "--threads", "1", "--seed", str(spec.seed), "--rl-steps", str(spec.steps),
        "--lr", repr(spec.arm.lr), "--policy", spec.arm.policy, "--estimator", spec.estimator,
        *(["--same-mask"] if spec.arm.same_mask else []), *extra,
    ]  # fmt: skip


def record(spec: RunSpec, cache: Path, *, suffix: str = "", extra: Sequence[str] = ()) -> Path:
    """Records one run into the cache (a finished run of the same options is kept)."""
    out = cache / f"{spec.name}{suffix}"
    options = record_options(spec, extra)
    if recorded_as(out, options):
        return out
    command = [sys.executable, "-m", "stabledrl_cli", "record", "--out", str(out), *options]
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000"}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    mark_recorded(out, options)
    return out


# --- phase 2: label, detect, score -----------------------------------------------------------
@dataclass(frozen=True)
class Labelled:
    """One recorded run, its label and where each detector first fired (None: never)."""

    name: str
    arm: str
    seed: int
    estimator: str
    held_out: bool
    control: str | None
    collapse: int | None
    """The observed-collapse rule's step (the label): None, the run did not collapse."""
    first: dict[str, int | None]
    """detector -> its first flagged step."""


DETECTORS: dict[str, str] = {
    "collapse_warning": "run-level collapse warning (own-sample likelihood drop)",
    "recorded_spike": "a recorded grad-norm spike (10x the median of the previous 20)",
    "recorded_nonfinite": "a recorded non-finite step",
    "own_risk": "replay of the run's own policy: a risk step (non-finite or spike)",
    "own_bias": "replay of the run's own policy: bias (rolling net_push below threshold)",
}


def _first(steps: Sequence[int]) -> int | None:
    return int(steps[0]) if len(steps) else None


def label(spec: RunSpec, run: Run) -> Labelled:
    observed = observe(run)
    own = replay(run, policies=[run.policy_spec or spec.arm.policy], device="cpu").policies[0]
    first = {
        "collapse_warning": observed.collapse_warning.first_step,
        "recorded_spike": _first(observed.recorded_spike_steps),
        "recorded_nonfinite": _first(observed.nonfinite_steps),
        "own_risk": _first(own.summary.collapsed_steps),
        "own_bias": _first(own.summary.drift_steps),
    }
    return Labelled(
        name=spec.name,
        arm=spec.arm.name,
        seed=spec.seed,
        estimator=spec.estimator,
        held_out=spec.held_out,
        control=spec.arm.control,
        collapse=observed.first_reward_collapse,
        first=first,
    )


@dataclass(frozen=True)
class Score:
    """A detector on a set of runs. A collapsing run counts as caught when the detector fired
    at or before the observed collapse (a flag only after it is a miss); any flag on a run that
    did not collapse is a false alarm."""

    runs: int
    collapsed: int
    caught: int
    false_alarms: int
    false_alarms_frozen: int
    false_alarms_low_lr: int
    median_lead: float | None
    """Median of (collapse step - first flag) over the caught runs."""

    @property
    def precision(self) -> float | None:
        flagged = self.caught + self.false_alarms
        return self.caught / flagged if flagged else None

    @property
    def recall(self) -> float | None:
        return self.caught / self.collapsed if self.collapsed else None


def score(runs: Sequence[Labelled], detector: str) -> Score:
    caught, leads, false_alarms = 0, [], {"all": 0, "frozen": 0, "low-lr": 0}
    for run in runs:
        first = run.first[detector]
        if run.collapse is not None:
            if first is not None and first <= run.collapse:
                caught += 1
                leads.append(run.collapse - first)
        elif first is not None:
            false_alarms["all"] += 1
            if run.control is not None:
                false_alarms[run.control] += 1
    return Score(
        runs=len(runs),
        collapsed=sum(run.collapse is not None for run in runs),
        caught=caught,
        false_alarms=false_alarms["all"],
        false_alarms_frozen=false_alarms["frozen"],
        false_alarms_low_lr=false_alarms["low-lr"],
        median_lead=float(statistics.median(leads)) if leads else None,
    )


def _text(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(title: str, runs: Sequence[Labelled], write: Callable[[str], None]) -> None:
    write(f"{title}: {len(runs)} runs, {sum(r.collapse is not None for r in runs)} collapsed")
    write(f"{'detector':20} {'prec':>5} {'recall':>6} {'false':>5} {'frozen':>6} "
          f"{'low-lr':>6} {'lead':>5}")  # fmt: skip
    for detector in DETECTORS:
        s = score(runs, detector)
        write(f"{detector:20} {_text(s.precision):>5} {_text(s.recall):>6} {s.false_alarms:>5} "
              f"{s.false_alarms_frozen:>6} {s.false_alarms_low_lr:>6} "
              f"{_text(s.median_lead, 0):>5}")  # fmt: skip


def evaluate(specs: Sequence[RunSpec], cache: Path) -> list[Labelled]:
    labelled = []
    for spec in specs:
        path = cache / spec.name
        if not recorded_as(path, record_options(spec)):
            raise SystemExit(f"{path}: not recorded with these options; run `record` first")
        labelled.append(label(spec, open_run(path)))
    return labelled


# --- phase 3: branches as ground truth ---------------------------------------------------------
BRANCH_RUNS = tuple(
    RunSpec(ARMS[0], seed, estimator, 240) for seed in HELD_OUT_SEEDS for estimator in ESTIMATORS
)
BRANCH_AT = (40, 80)
BRANCH_POLICIES = ("grpo", "dapo", "cispo", "sapo", "stabledrl")
CHECKPOINT_EVERY = 40


@dataclass(frozen=True)
class BranchRow:
    run: str
    at: int
    policy: str
    collapsed: bool
    risk_flagged: bool
    bias_flagged: bool


def branch_rows(cache: Path) -> list[BranchRow]:
    """Trains the branches in this process on one CPU thread, as `stabledrl branch` and the
    record phase do (`--threads 1`): a branch is then the same whatever the machine's cores."""
    torch.set_num_threads(1)
    rows = []
    for spec in BRANCH_RUNS:
        run_dir = record(
            spec, cache, suffix="_ckpt", extra=("--checkpoint-every", str(CHECKPOINT_EVERY))
        )
        for at in BRANCH_AT:
            report = run_branches(run_dir, at=at, policies=BRANCH_POLICIES, force=True)
            outcome: BranchOutcome
            for outcome in report.branches:
                rows.append(
                    BranchRow(
                        run=run_dir.name,
                        at=report.at,
                        policy=outcome.policy,
                        collapsed=outcome.collapsed,
                        risk_flagged=outcome.replay_flagged,
                        bias_flagged=bool(outcome.replay_drift_steps),
                    )
                )
            print(f"{run_dir.name} @ {report.at}: "
                  + ", ".join(f"{o.policy} {'collapsed' if o.collapsed else 'held'}"
                              for o in report.branches), file=sys.stderr, flush=True)  # fmt: skip
    return rows


def agreement(rows: Sequence[BranchRow], flag: Callable[[BranchRow], bool]) -> dict[str, int]:
    """The confusion counts of a one-step flag against the branch outcome."""
    return {
        "flagged_collapsed": sum(flag(r) and r.collapsed for r in rows),
        "flagged_held": sum(flag(r) and not r.collapsed for r in rows),
        "clear_collapsed": sum(not flag(r) and r.collapsed for r in rows),
        "clear_held": sum(not flag(r) and not r.collapsed for r in rows),
    }


def print_branches(rows: Sequence[BranchRow], write: Callable[[str], None]) -> dict[str, object]:
    flags: dict[str, Callable[[BranchRow], bool]] = {
        "risk": lambda r: r.risk_flagged,
        "bias": lambda r: r.bias_flagged,
        "risk or bias": lambda r: r.risk_flagged or r.bias_flagged,
    }
    write(f"branches: {len(rows)} ({sum(r.collapsed for r in rows)} collapsed)")
    write(f"{'one-step flag':14} {'agree':>6} {'flag+coll':>9} {'flag+held':>9} "
          f"{'clear+coll':>10} {'clear+held':>10}")  # fmt: skip
    summary: dict[str, object] = {}
    for name, flag in flags.items():
        counts = agreement(rows, flag)
        agree = (counts["flagged_collapsed"] + counts["clear_held"]) / len(rows) if rows else 0.0
        summary[name] = {**counts, "agreement": agree}
        write(f"{name:14} {agree:>6.2f} {counts['flagged_collapsed']:>9} "
              f"{counts['flagged_held']:>9} {counts['clear_collapsed']:>10} "
              f"{counts['clear_held']:>10}")  # fmt: skip
    write("")
    for policy in BRANCH_POLICIES:
        mine = [r for r in rows if r.policy.split(":")[0] == policy]
        write(f"  {policy:10} collapsed {sum(r.collapsed for r in mine)}/{len(mine)}, "
              f"risk-flagged {sum(r.risk_flagged for r in mine)}/{len(mine)}")  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", choices=("record", "evaluate", "branches"))
    parser.add_argument("--cache", type=Path, default=Path("runs/collapse_suite"))
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    specs = grid(args.steps)
    if args.phase == "record":
        args.cache.mkdir(parents=True, exist_ok=True)
        for i, spec in enumerate(specs, 1):
            started = time.perf_counter()
            record(spec, args.cache)
            print(f"[{i}/{len(specs)}] {spec.name} {time.perf_counter() - started:.0f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
        return 0
    if args.phase == "branches":
        args.cache.mkdir(parents=True, exist_ok=True)
        rows = branch_rows(args.cache)
        summary = print_branches(rows, print)
        if args.json is not None:
            report = {"runs": [s.name for s in BRANCH_RUNS], "at": list(BRANCH_AT),
                      "policies": list(BRANCH_POLICIES), "agreement": summary,
                      "branches": [asdict(r) for r in rows]}  # fmt: skip
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        return 0
    runs = evaluate(specs, args.cache)
    held = [r for r in runs if r.held_out]
    calibration = [r for r in runs if not r.held_out]
    print_table(f"held-out seeds {HELD_OUT_SEEDS}", held, print)
    print()
    print_table(f"calibration seeds {CALIBRATION_SEEDS}", calibration, print)
    print()
    for name, text in DETECTORS.items():
        print(f"{name}: {text}")
    if args.json is not None:
        report = {
            "calibration_seeds": list(CALIBRATION_SEEDS),
            "held_out_seeds": list(HELD_OUT_SEEDS),
            "steps": args.steps,
            "detectors": DETECTORS,
            "scores": {
                split: {d: {**asdict(score(group, d)), "precision": score(group, d).precision,
                            "recall": score(group, d).recall} for d in DETECTORS}
                for split, group in (("held_out", held), ("calibration", calibration))
            },
            "runs": [asdict(r) for r in runs],
        }  # fmt: skip
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
