"""`stabledrl record`'s built-in example, run: trained into its Recorder with a progress bar
(or progress lines off a terminal), then its summary and what its guard did on stderr. Torch
and the trainer are imported when it runs, so `record --help` is fast."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import TYPE_CHECKING

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from stabledrl_cli._atomic import write_error
from stabledrl_cli.cli._output import ProgressLines, err, progress_enabled
from stabledrl_cli.errors import counted
from stabledrl_cli.example.config import ExampleConfig
from stabledrl_cli.replay.guard_rules import too_few_norms
from stabledrl_cli.vocab import GuardMode

if TYPE_CHECKING:
    from stabledrl_cli.capture.geometry import GeometryConfig
    from stabledrl_cli.example.trainer import StepInfo, TrainResult
    from stabledrl_cli.guard import Guard
    from stabledrl_cli.policies import Policy


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("reward {task.fields[reward]:.3f}"),
        TimeRemainingColumn(),
        console=err,
        disable=not progress_enabled(),
    )


def _summary(
    config: ExampleConfig,
    policy: Policy,
    geometry: GeometryConfig | None,
    result: TrainResult,
    out: Path,
) -> Table:
    summary = Table(title="stabledrl record: built-in example", show_header=False)
    summary.add_row("policy", policy.spec)
    summary.add_row(
        "estimator",
        f"{config.estimator_kind}, unit {config.unit}, "
        f"same mask {config.estimator_config.same_mask}",
    )
    if geometry is not None:
        every = f", every {geometry.every} steps" if geometry.every > 1 else ""
        k = f", k {geometry.k} ({geometry.method})" if geometry.kind == "sketch" else ""
        summary.add_row("geometry", f"{geometry.kind}{k}{every}")
    summary.add_row("steps", str(result.steps))
    summary.add_row("reward (first 10%)", f"{result.start_reward:.3f}")
    summary.add_row("final reward (last 10%)", f"{result.final_reward:.3f}")
    if result.nonfinite_steps:
        skipped = ""
        if result.nonfinite_skipped == result.nonfinite_steps:
            skipped = " (updates skipped)"
        elif result.nonfinite_skipped:
            skipped = f" ({counted(result.nonfinite_skipped, 'update')} skipped)"
        summary.add_row("non-finite steps", f"{result.nonfinite_steps}{skipped}")
    if result.diverged_at is not None:
        stopped = f"weights or outputs not finite after step {result.diverged_at}: stopped"
        summary.add_row("diverged", stopped)
    summary.add_row("wall time", f"{result.wall_seconds:.1f} s")
    summary.add_row("ms / RL step", f"{result.ms_per_step:.1f}")
    summary.add_row("run", str(out))
    return summary


def run_example(
    out: Path,
    force: bool,
    config: ExampleConfig,
    device: str,
    geometry: GeometryConfig | None,
    threads: int,
    checkpoint_every: int | None,
    guard_mode: GuardMode | None,
    guard_rule: str | None,
) -> None:
    """Trains the example of `config` on `device` into a new run at `out` (replacing the one
    there with `force`), with `geometry`, checkpoints every `checkpoint_every` steps and a
    guard of `guard_mode` and `guard_rule` when given."""
    # torch and the trainer load here, when the example runs (not for `record --help`).
    import torch

    from stabledrl_cli._device import resolve_device
    from stabledrl_cli.capture.branch_protocol import checkpoints_dir
    from stabledrl_cli.cli._option_names import option_names
    from stabledrl_cli.dump import Recorder
    from stabledrl_cli.example.checkpoint import CheckpointPlan
    from stabledrl_cli.example.old_run import old_run_files, remove_old_run_files
    from stabledrl_cli.example.run_setup import recorder_kwargs
    from stabledrl_cli.example.trainer import train
    from stabledrl_cli.guard import Guard
    from stabledrl_cli.policies import get_policy

    torch_device = resolve_device(device)
    policy = get_policy(config.policy)
    with option_names({"rule": "--guard-rule"}):
        guard = Guard(guard_mode, guard_rule) if guard_mode is not None else None
    kwargs = recorder_kwargs(config, policy, geometry)
    if guard is not None:
        kwargs["meta"]["guard"] = guard.manifest_note()
    torch.set_num_threads(threads)
    progress = _progress()
    task_id = progress.add_task("pretraining", total=config.steps, reward=float("nan"))
    lines = None if progress_enabled() else ProgressLines(f"RL ({policy.spec}) steps", config.steps)
    rewards: list[float] = []

    def on_step(info: StepInfo) -> None:
        rewards.append(info.reward_mean)
        window = rewards[-20:]
        reward = sum(window) / len(window)
        progress.update(task_id, advance=1, reward=reward)
        if lines is not None:
            lines.update(len(rewards), f"reward {reward:.3f}")

    def on_phase(phase: str) -> None:
        progress.update(task_id, description=f"RL ({policy.spec})" if phase == "rl" else phase)
        if lines is not None and phase == "pretrain":
            err.print(f"pretraining ({config.pretrain_steps} steps)", highlight=False)

    directory = checkpoints_dir(out)  # a symlink is refused before the run changes
    plan = None
    if checkpoint_every is not None:
        if directory.exists() and not directory.is_dir():  # so is a file in its place
            raise write_error(
                directory, NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            )
        plan = CheckpointPlan(directory=directory, every=checkpoint_every)
    old = old_run_files(out)  # refused before the run changes
    with (
        Recorder(out, overwrite=force, **kwargs) as recorder,
        progress,
    ):
        remove_old_run_files(old)  # a run recorded over another keeps no checkpoint or branch
        result = train(
            config,
            recorder=recorder,
            device=torch_device,
            on_step=on_step,
            on_phase=on_phase,
            geometry=geometry,
            checkpoints=plan,
            guard=guard,
        )
    err.print(_summary(config, policy, geometry, result, out))
    if guard is not None:
        err.print(_guard_line(guard, result.guard_scaled, config.max_grad_norm), highlight=False)


def _guard_line(guard: Guard, scaled: int, max_grad_norm: float) -> str:
    """`record`'s closing line on what the guard did: the steps it skipped, and those it
    scaled, apart from the steps it flagged to scale whose gradient clip_grad_norm_ had
    already cut further (`Decision.apply` leaves them: the run is as it would be unguarded)."""
    counts = guard.counts
    done = f"guard ({guard.mode}, {guard.manifest_note()['rule']}): "
    done += f"{counted(counts['skip'], 'step')} skipped, "
    if counts["scale"] == scaled:
        done += f"{scaled} scaled (recorded as guard_action)"
    else:
        left = counts["scale"] - scaled
        done += (
            f"{counted(counts['scale'], 'step')} flagged to scale (recorded as guard_action), "
            f"{scaled} of them scaled: clip_grad_norm_ (--max-grad-norm {max_grad_norm:g}) had "
            f"already cut {f'the other {left}' if scaled else 'each one'}'s gradient further"
        )
    asked = sum(counts.values())
    if asked and not guard.judged:  # as replay --guard says it of the same run
        why = too_few_norms(guard.rule.collected, guard.rule.collects, asked, "it was given")
        done += f"; its rule judged no step ({why})"
    return done
