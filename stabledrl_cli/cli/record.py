"""`stabledrl record`: train and record the built-in example, or wrap any training command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from stabledrl_cli.cli._options import DeviceOpt
from stabledrl_cli.cli._output import err, progress_enabled
from stabledrl_cli.errors import UsageError


class EstimatorChoice(str, Enum):
    elbo = "elbo"
    llada = "llada"


class UnitChoice(str, Enum):
    sequence = "sequence"
    token = "token"


class GeometryChoice(str, Enum):
    gram = "gram"
    sketch = "sketch"
    none = "none"


class SketchMethodChoice(str, Enum):
    auto = "auto"
    exact = "exact"
    jvp = "jvp"


class GeometryDtypeChoice(str, Enum):
    float32 = "float32"
    float16 = "float16"


def _default_estimator(unit: UnitChoice) -> str:
    """llada shows the instability most clearly (README table); it scores whole sequences."""
    return "llada" if unit is UnitChoice.sequence else "elbo"


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"--out {out} is not empty; pass --force to overwrite it")


def _run_command(out: Path, cmd: list[str], force: bool, policy: str | None) -> None:
    """Run CMD with STABLEDRL_RUN_DIR exported; its exit code becomes ours."""
    from stabledrl_cli.capture.bootstrap import ENV_FORCE, ENV_POLICY, ENV_RUN_DIR

    if shutil.which(cmd[0]) is None:
        raise UsageError(f"command not found: {cmd[0]}")
    if policy is not None:
        from stabledrl_cli.policies import get_policy

        get_policy(policy)  # a bad spec is a usage error here, not a warning in the child
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env[ENV_RUN_DIR] = str(out.resolve())
    env[ENV_FORCE] = "1" if force else "0"
    if policy is not None:
        env[ENV_POLICY] = policy
    err.print(f"recording [bold]{' '.join(cmd)}[/] into {out}", highlight=False)
    code = subprocess.call(cmd, env=env)
    if code != 0:
        err.print(f"the training command exited with code {code}", highlight=False)
    if not (out / "manifest.json").is_file():
        err.print(
            "[yellow]warning:[/] the command recorded nothing "
            "(call stabledrl_cli.log_policy_batch(step, ...) once per optimizer step)",
            highlight=False,
        )
    raise typer.Exit(code)


def _run_example(
    out: Path, force: bool, config: object, device: str, geometry: object | None, threads: int
) -> None:
    import torch
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.table import Table

    from stabledrl_cli._device import resolve_device
    from stabledrl_cli.dump import Recorder
    from stabledrl_cli.example.trainer import recorder_kwargs, train
    from stabledrl_cli.policies import get_policy

    torch_device = resolve_device(device)
    policy = get_policy(config.policy)
    torch.set_num_threads(threads)
    show = progress_enabled()
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("reward {task.fields[reward]:.3f}"),
        TimeRemainingColumn(),
        console=err,
        disable=not show,
    )
    task_id = progress.add_task("pretraining", total=config.steps, reward=float("nan"))
    rewards: list[float] = []

    def on_step(info: object) -> None:
        rewards.append(info.reward_mean)
        window = rewards[-20:]
        progress.update(task_id, advance=1, reward=sum(window) / len(window))

    def on_phase(phase: str) -> None:
        progress.update(task_id, description=f"RL ({policy.spec})" if phase == "rl" else phase)

    with (
        Recorder(out, overwrite=force, **recorder_kwargs(config, policy, geometry)) as recorder,
        progress,
    ):
        result = train(
            config,
            recorder=recorder,
            device=torch_device,
            on_step=on_step,
            on_phase=on_phase,
            geometry=geometry,
        )

    summary = Table(title="stabledrl record: built-in example", show_header=False)
    summary.add_row("policy", policy.spec)
    summary.add_row(
        "estimator",
        f"{config.estimator}, unit {config.unit}, same mask {config.estimator_config.same_mask}",
    )
    if geometry is not None:
        every = f", every {geometry.every} steps" if geometry.every > 1 else ""
        k = f", k {geometry.k} ({geometry.method})" if geometry.kind == "sketch" else ""
        summary.add_row("geometry", f"{geometry.kind}{k}{every}")
    summary.add_row("steps", str(result.steps))
    summary.add_row("reward (first 10%)", f"{result.start_reward:.3f}")
    summary.add_row("final reward (last 10%)", f"{result.final_reward:.3f}")
    if result.nonfinite_steps:
        skipped = " (updates skipped)" if config.skip_nonfinite else ""
        summary.add_row("non-finite steps", f"{result.nonfinite_steps}{skipped}")
    if result.diverged_at is not None:
        summary.add_row("diverged", f"weights not finite after step {result.diverged_at}: stopped")
    summary.add_row("wall time", f"{result.wall_seconds:.1f} s")
    summary.add_row("ms / RL step", f"{result.ms_per_step:.1f}")
    summary.add_row("run", str(out))
    err.print(summary)


def command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to write.")],
    cmd: Annotated[
        list[str] | None,
        typer.Argument(help="A training command after `--`; without one, the built-in example."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a non-empty --out.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Example: training seed.")] = 0,
    steps: Annotated[int, typer.Option("--steps", help="Example: RL optimizer steps.")] = 400,
    lr: Annotated[float, typer.Option("--lr", help="Example: AdamW learning rate.")] = 1e-4,
    policy: Annotated[
        str | None,
        typer.Option(
            "--policy", "-p", help="Policy spec that makes the loss (example default: grpo)."
        ),
    ] = None,
    estimator: Annotated[
        EstimatorChoice | None,
        typer.Option(
            "--estimator",
            help="Example: log-likelihood estimator (default: llada for sequence units, "
            "elbo for token units).",
            show_default=False,
        ),
    ] = None,
    same_mask: Annotated[
        bool, typer.Option("--same-mask", help="Example: old and new ELBO share one mask.")
    ] = False,
    unit: Annotated[
        UnitChoice, typer.Option("--unit", help="Example: what a recorded unit is.")
    ] = UnitChoice.sequence,
    max_grad_norm: Annotated[
        float, typer.Option("--max-grad-norm", help="Example: clip_grad_norm_ bound.")
    ] = 1.0,
    skip_nonfinite: Annotated[
        bool,
        typer.Option(
            "--skip-nonfinite/--no-skip-nonfinite",
            help="Example: skip the update of a step whose grad norm is not finite.",
        ),
    ] = True,
    geometry: Annotated[
        GeometryChoice,
        typer.Option(
            "--geometry",
            help="Example: per-step gradient geometry of the units, for true update norms in "
            "replay: gram (exact U x U) or sketch (U x k).",
        ),
    ] = GeometryChoice.none,
    geometry_every: Annotated[
        int, typer.Option("--geometry-every", help="Example: geometry on every Nth step only.")
    ] = 1,
    geometry_k: Annotated[int, typer.Option("--geometry-k", help="Example: sketch width k.")] = 256,
    geometry_params: Annotated[
        list[str] | None,
        typer.Option(
            "--geometry-params",
            help="Example: covered parameter names (fnmatch pattern, repeatable; default all).",
            show_default=False,
        ),
    ] = None,
    geometry_seed: Annotated[
        int, typer.Option("--geometry-seed", help="Example: seed of the sketch matrix Omega.")
    ] = 0,
    geometry_method: Annotated[
        SketchMethodChoice,
        typer.Option(
            "--geometry-method",
            help="Example: sketch from exact per-unit gradients, forward-mode JVPs, or auto.",
        ),
    ] = SketchMethodChoice.auto,
    geometry_dtype: Annotated[
        GeometryDtypeChoice,
        typer.Option(
            "--geometry-dtype",
            help="Example: geometry storage; float16 (sketch only) with a per-step scale.",
        ),
    ] = GeometryDtypeChoice.float32,
    device: DeviceOpt = "auto",
    threads: Annotated[
        int,
        typer.Option(
            "--threads",
            min=1,
            help="Example: CPU threads. 1 by default: the model is too small to gain from more, "
            "and the arrays are then the same on any machine (the fixtures are made so).",
        ),
    ] = 1,
) -> None:
    """Train and record the built-in tiny dLLM RL example, or record `-- CMD ...`."""
    _check_out(out, force)
    if cmd:
        if geometry is not GeometryChoice.none:
            raise UsageError(
                "--geometry records the built-in example; a training script passes "
                "geometry to its Recorder (see stabledrl_cli.capture.geometry)"
            )
        _run_command(out, cmd, force, policy)
        return
    from stabledrl_cli.capture.geometry import GeometryConfig
    from stabledrl_cli.example.trainer import ExampleConfig

    geometry_config = None
    if geometry is not GeometryChoice.none:
        geometry_config = GeometryConfig(
            kind=geometry.value,
            every=geometry_every,
            k=geometry_k,
            seed=geometry_seed,
            params=tuple(geometry_params) if geometry_params else None,
            method=geometry_method.value,
            storage_dtype=geometry_dtype.value,
        )

    config = ExampleConfig(
        seed=seed,
        steps=steps,
        lr=lr,
        policy=policy or "grpo",
        estimator=estimator.value if estimator else _default_estimator(unit),
        same_mask=same_mask,
        unit=unit.value,
        max_grad_norm=max_grad_norm,
        skip_nonfinite=skip_nonfinite,
    )
    _run_example(out, force, config, device, geometry_config, threads)
    sys.stderr.flush()
