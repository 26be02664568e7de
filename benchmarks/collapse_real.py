"""The collapse warning on real runs: the built-in example and tiny TRL GRPOTrainer runs,
each labelled by a reward rule fixed before any warning was looked at.

Phase 1 (`record`) records the corpus below, skipping runs already in the cache: the example
(`stabledrl record`, grpo, 400 steps, one process a run, through collapse_suite's `record`)
at five learning rates and seeds 1-4; and tiny TRL 1.16 GRPOTrainer runs
(tests/trl_scripts/tiny_grpo.py) through `RecordingGRPOTrainer`, 80 steps of 8 completions:
grpo, dapo and dr_grpo at lr 1e-3 (num_iterations 1 and 2, one with lr warm-up),
two runs at lr 0.3 and a reward function that returns 0 from its 41st call.

Phase 2 (`evaluate`) labels each run by `label` (the rule below), reads where the collapse
warning first fired and what `inspect` observed, replays the run's own policy for its risk and
bias steps, and prints the confusion table of warning against label and one line a run.

The label (fixed in advance): r_k the reward of rollout k (one draw a rollout, as the
observed-collapse rule reads it), K rollouts, q = max(5, K // 4), floor the declared reward
range's low end (else 0); B the best mean of q consecutive rollouts, L the mean of the last q,
s the standard deviation of r. Collapsed when (L - floor) < (B - floor) / 2 and
B - L > 3 s sqrt(2 / q), or >= 5 % of the recorded grad norms are not finite, or the median
grad norm of the last quarter of steps is over 10 times that of the first quarter.

    python benchmarks/collapse_real.py record              # ~12 min on one core, resumable
    python benchmarks/collapse_real.py evaluate --format json

docs/collapse.md ("On real runs") quotes `evaluate`'s figures.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "trl_scripts"))
from collapse_suite import (  # type: ignore[import-not-found]
    Arm,
    RunSpec,
    mark_recorded,
    record,
    record_options,
    recorded_as,
)
from extras import require_extra

from stabledrl_cli.dump import Run, open_run
from stabledrl_cli.replay.engine import replay
from stabledrl_cli.replay.observed import observe
from stabledrl_cli.replay.rollouts import REWARD_DRAW_SCALARS, run_reward_draws

EXAMPLE_LRS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
EXAMPLE_SEEDS = (1, 2, 3, 4)
EXAMPLE_STEPS = 400
TRL_STEPS = 80
TRL_REWARD_RANGE = (0.0, 6.0)


@dataclass(frozen=True)
class TrlRun:
    """One tiny GRPOTrainer run: `config` overrides tiny_grpo's GRPOConfig; `zero_after` makes
    the reward function return 0 from its (zero_after + 1)-th call."""

    name: str
    config: dict[str, Any]
    zero_after: int | None = None


def _trl(name: str, loss: str, lr: float, seed: int, iterations: int = 1, **extra: Any) -> TrlRun:
    zero_after = extra.pop("zero_after", None)
    config = {"loss_type": loss, "learning_rate": lr, "seed": seed,
              "num_iterations": iterations, **extra}  # fmt: skip
    return TrlRun(name, config, zero_after)


TRL_RUNS = (
    _trl("trl_grpo_s0", "grpo", 1e-3, 0),
    _trl("trl_dapo_ni2_s1", "dapo", 1e-3, 1, 2),
    _trl("trl_drgrpo_ni2_warmup_s3", "dr_grpo", 1e-3, 3, 2, warmup_ratio=0.2),
    _trl("trl_dapo_s8", "dapo", 1e-3, 8),
    _trl("trl_grpo_lr0.3_s0", "grpo", 0.3, 0),
    _trl("trl_grpo_lr0.3_ni2_s7", "grpo", 0.3, 7, 2),
    _trl("trl_grpo_reward_zero_s2", "grpo", 1e-3, 2, zero_after=40),
)


def example_specs(steps: int, seeds: Sequence[int] = EXAMPLE_SEEDS) -> list[RunSpec]:
    return [
        RunSpec(Arm(f"lr{lr:g}", "grpo", lr), seed, "llada", steps)
        for lr in EXAMPLE_LRS
        for seed in seeds
    ]


def record_trl(run: TrlRun, cache: Path, steps: int) -> Path:
    """Records one tiny TRL run into the cache in this process, on one CPU thread."""
    import tiny_grpo  # type: ignore[import-not-found]

    from stabledrl_cli.integrations.trl import RecordingGRPOTrainer

    out = cache / run.name
    if recorded_as(out, trl_settings(run, steps)):
        return out
    calls = 0

    def count_b(completions: list[str], **kwargs: Any) -> list[float]:
        nonlocal calls
        calls += 1
        rewards: list[float] = tiny_grpo.count_b(completions, **kwargs)
        return [0.0] * len(rewards) if run.zero_after and calls > run.zero_after else rewards

    config = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
              "steps_per_generation": 1, "max_steps": steps, **run.config}  # fmt: skip
    trainer = RecordingGRPOTrainer(
        model=tiny_grpo.tiny_model(run.config["seed"]),
        reward_funcs=count_b,
        args=tiny_grpo.tiny_config(str(cache / f"{run.name}_trl"), **config),
        train_dataset=tiny_grpo.tiny_dataset(),
        processing_class=tiny_grpo.tiny_tokenizer(),
        stabledrl_out=out,
        stabledrl_reward_range=TRL_REWARD_RANGE,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    mark_recorded(out, trl_settings(run, steps))
    return out


def trl_settings(run: TrlRun, steps: int) -> dict[str, Any]:
    """What a cached TRL run was recorded with."""
    return {"config": run.config, "zero_after": run.zero_after, "steps": steps}


# --- phase 2 ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Label:
    """The fixed rule's verdict on one run and the figures it read."""

    collapsed: bool
    reason: str | None
    """"reward", "nonfinite" or "grad growth"; None when not collapsed."""
    best: float
    last: float
    rollouts: int


def _finite_median(values: np.ndarray) -> np.float64:
    """The median of the finite values (NaN when there are none)."""
    finite = values[np.isfinite(values)]
    return np.median(finite) if len(finite) else np.float64(np.nan)


def label(run: Run) -> Label:
    series = run.scalar_series_many([*REWARD_DRAW_SCALARS, "grad_norm"])
    _, rewards = run_reward_draws({k: series[k] for k in REWARD_DRAW_SCALARS})
    rewards = rewards[np.isfinite(rewards)]
    floor = run.reward_range[0] if run.reward_range else 0.0
    if not len(rewards):
        return Label(False, None, math.nan, math.nan, 0)
    q = min(max(5, len(rewards) // 4), len(rewards))
    best = float(np.convolve(rewards, np.ones(q) / q, mode="valid").max())
    last = float(rewards[-q:].mean())
    fell = (last - floor) < 0.5 * (best - floor) and best - last > 3 * float(
        rewards.std()
    ) * math.sqrt(2 / q)
    grad = series["grad_norm"][1]
    quarter = len(grad) // 4
    with np.errstate(divide="ignore", invalid="ignore"):
        growth = _finite_median(grad[-quarter:]) / _finite_median(grad[:quarter])
    nonfinite = 1 - np.isfinite(grad).mean() if len(grad) else 0.0
    reasons = {"reward": fell, "nonfinite": nonfinite >= 0.05, "grad growth": growth > 10}
    reason = next((name for name, hit in reasons.items() if hit), None)
    return Label(reason is not None, reason, round(best, 3), round(last, 3), len(rewards))


@dataclass(frozen=True)
class Row:
    name: str
    kind: str
    """"example" or "trl"."""
    label: Label
    steps: int
    warning_first: int | None
    observed_collapse: int | None
    recorded_spikes: int
    nonfinite: int
    risk_steps: int
    bias_steps: int


def evaluate_run(name: str, kind: str, path: Path) -> Row:
    run = open_run(path)
    observed = observe(run)
    own = replay(run, policies=[run.policy_spec or "grpo"], device="cpu").policies[0]
    return Row(
        name=name,
        kind=kind,
        label=label(run),
        steps=len(run.step_numbers),
        warning_first=observed.collapse_warning.first_step,
        observed_collapse=observed.first_reward_collapse,
        recorded_spikes=len(observed.recorded_spike_steps),
        nonfinite=len(observed.nonfinite_steps),
        risk_steps=len(own.summary.collapsed_steps),
        bias_steps=len(own.summary.drift_steps),
    )


def confusion(rows: Sequence[Row]) -> dict[str, int]:
    pairs = [(r.warning_first is not None, r.label.collapsed) for r in rows]
    return {
        "warned_collapsed": pairs.count((True, True)),
        "quiet_collapsed": pairs.count((False, True)),
        "warned_held": pairs.count((True, False)),
        "quiet_held": pairs.count((False, False)),
    }


def held_flagged(rows: Sequence[Row]) -> dict[str, dict[str, int]]:
    """kind -> how many held runs it has, and how many of them show a recorded spike, a risk
    step and a bias step."""
    held: dict[str, dict[str, int]] = {}
    for r in rows:
        if not r.label.collapsed:
            counts = held.setdefault(r.kind, {"runs": 0, "spike": 0, "risk": 0, "bias": 0})
            counts["runs"] += 1
            counts["spike"] += r.recorded_spikes > 0
            counts["risk"] += r.risk_steps > 0
            counts["bias"] += r.bias_steps > 0
    return held


def _cell(value: int | None) -> str:
    return "-" if value is None else str(value)


def print_report(rows: Sequence[Row], write: Callable[[str], None]) -> None:
    counts = confusion(rows)
    collapsed = counts["warned_collapsed"] + counts["quiet_collapsed"]
    write(f"{len(rows)} runs, {collapsed} collapsed by the fixed rule")
    write(f"{'':10} {'warned':>7} {'quiet':>6}")
    write(f"{'collapsed':10} {counts['warned_collapsed']:>7} {counts['quiet_collapsed']:>6}")
    write(f"{'held':10} {counts['warned_held']:>7} {counts['quiet_held']:>6}")
    write("")
    write(f"{'run':24} {'label':11} {'warn':>4} {'obs':>4} {'spikes':>6} {'nonfin':>6} "
          f"{'risk':>4} {'bias':>4}")  # fmt: skip
    for r in rows:
        verdict = r.label.reason if r.label.collapsed else "held"
        write(f"{r.name:24} {verdict:11} {_cell(r.warning_first):>4} "
              f"{_cell(r.observed_collapse):>4} {r.recorded_spikes:>6} {r.nonfinite:>6} "
              f"{r.risk_steps:>4} {r.bias_steps:>4}")  # fmt: skip
    write("")
    for kind, c in held_flagged(rows).items():
        write(f"held {kind} runs: {c['runs']}, with a recorded spike {c['spike']}, "
              f"a risk step {c['risk']}, a bias step {c['bias']}")  # fmt: skip
    write("warn: first collapse warning; obs: inspect's observed collapse; spikes, nonfin:")
    write("recorded grad-norm spikes and non-finite steps; risk, bias: steps the replay of")
    write("the run's own policy flags.")


def corpus(steps: int, trl_steps: int, seeds: Sequence[int]) -> list[tuple[str, str, Any]]:
    """(name, kind, what records it) of every run."""
    return [
        *((spec.name, "example", spec) for spec in example_specs(steps, seeds)),
        *((run.name, "trl", run) for run in TRL_RUNS),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", choices=("record", "evaluate"))
    parser.add_argument("--cache", type=Path, default=Path("runs/collapse_real"))
    parser.add_argument("--steps", type=int, default=EXAMPLE_STEPS, help="example steps")
    parser.add_argument("--trl-steps", type=int, default=TRL_STEPS)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(EXAMPLE_SEEDS))
    parser.add_argument("--only", nargs="+", default=None, help="run names")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    args = parser.parse_args(argv)
    runs = [r for r in corpus(args.steps, args.trl_steps, args.seeds)
            if args.only is None or r[0] in args.only]  # fmt: skip
    if args.phase == "record":
        if any(kind == "trl" for _, kind, _ in runs):  # before the example runs, minutes long
            require_extra("trl", "trl", "datasets")
        args.cache.mkdir(parents=True, exist_ok=True)
        for i, (name, kind, what) in enumerate(runs, 1):
            started = time.perf_counter()
            if kind == "example":
                record(what, args.cache)
            else:
                record_trl(what, args.cache, args.trl_steps)
            print(f"[{i}/{len(runs)}] {name} {time.perf_counter() - started:.0f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
        return 0
    settings = {
        name: record_options(what) if kind == "example" else trl_settings(what, args.trl_steps)
        for name, kind, what in runs
    }
    missing = [name for name in settings if not recorded_as(args.cache / name, settings[name])]
    if missing:
        raise SystemExit(
            f"{args.cache / missing[0]}: not recorded with these options; run `record` first"
        )
    rows = [evaluate_run(name, kind, args.cache / name) for name, kind, _ in runs]
    if args.format == "json":
        report = {"confusion": confusion(rows), "held_flagged": held_flagged(rows),
                  "runs": [asdict(r) for r in rows]}  # fmt: skip
        print(json.dumps(report, indent=2))
    else:
        print_report(rows, print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
