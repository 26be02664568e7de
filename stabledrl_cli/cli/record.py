"""`stabledrl record`: train and record the built-in example, or wrap any training command.

The example's options default to None: an option not given takes `ExampleConfig`'s default
(quoted in the help), so each default lives once, in the library. The example runs in
_record_example.py, a training command (-- CMD) in _wrap.py; their torch-heavy parts (trainer,
Recorder, geometry) are imported when they run, so `record --help` is fast.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from stabledrl_cli.cli._local import local_output
from stabledrl_cli.cli._options import device_option, number_option, on_command_line
from stabledrl_cli.cli._output import err
from stabledrl_cli.cli._record_example import run_example
from stabledrl_cli.cli._wrap import run_command
from stabledrl_cli.cli.app import after_separator, debug_requested
from stabledrl_cli.dump._run_target import (
    check_out,
    check_replaceable,
    directory_or_nothing,
    os_file,
)
from stabledrl_cli.dump._setup import RECORD_FORCE_HINT
from stabledrl_cli.errors import UsageError
from stabledrl_cli.example.config import MAX_RL_STEPS, ExampleConfig
from stabledrl_cli.replay.config import MAX_THREADS
from stabledrl_cli.vocab import (
    Estimator,
    GeometryDtype,
    GeometryKind,
    GuardMode,
    SketchMethod,
    Unit,
)

DEFAULTS = ExampleConfig()
EXAMPLE = "Built-in example"
GEOMETRY = "Gradient geometry (built-in example)"
GEOMETRY_NUMBERS = ("every", "k", "seed")
"""The geometry settings given as --geometry-NAME numbers."""


def _check_out(out: Path, force: bool) -> None:
    check_out(out)
    # a file browser's file (.DS_Store: a folder made in Finder) makes no folder a run's
    if directory_or_nothing(out, f"--out {out}") and not all(map(os_file, out.iterdir())):
        check_replaceable(out)  # before the command starts: its recorder would refuse
        if not force:
            raise UsageError(f"--out {out} is not empty; pass --force {RECORD_FORCE_HINT}")


STEPS_DEPRECATED = (
    "record --steps is deprecated: use --rl-steps (--steps is a step range in replay)"
)


def _deprecated_steps(rl_steps: int | None, steps: int | None) -> int | None:
    """The step count from --rl-steps, or from the hidden --steps alias with one warning."""
    if steps is None:
        return rl_steps
    if rl_steps is not None and rl_steps != steps:
        raise UsageError("--steps is the old name of --rl-steps: give one of them")
    err.print(f"[yellow]warning:[/] {STEPS_DEPRECATED}", highlight=False, markup=True)
    return steps


def _example_options_given(ctx: typer.Context) -> list[str]:
    """The options of the built-in example (its help panels) given on the
    command line, each by the name given (`--no-skip-nonfinite` for a flag's off side)."""
    given = []
    for param in ctx.command.params:
        panel = getattr(param, "rich_help_panel", None)
        if param.name is None or not on_command_line(param.name):
            continue
        if panel in (EXAMPLE, GEOMETRY):
            off = ctx.params[param.name] is False and param.secondary_opts
            given.append(param.secondary_opts[0] if off else param.opts[0])
    return given


def _default(name: str) -> str:
    """`ExampleConfig`'s default of a field, for the help."""
    return f"default {getattr(DEFAULTS, name)}"


def command(
    ctx: typer.Context,
    out_arg: Annotated[
        str, typer.Option("--out", "-o", help="Run directory to write, a local path.")
    ],
    cmd: Annotated[
        list[str] | None,
        typer.Argument(
            help="A training command after `--`; without one, the built-in example.",
            metavar="-- CMD...",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Record into a non-empty --out: a new recording replaces its run; a "
            "training that resumes it (TRL's train(resume_from_checkpoint=...)) continues it.",
        ),
    ] = False,
    policy: Annotated[
        str | None,
        typer.Option(
            "--policy",
            "-p",
            metavar="SPEC",
            help=f"Policy spec that makes the example's loss ({_default('policy')}); with -- "
            "CMD, the policy the command's log_policy_batch records (no default there: one or "
            "the first call's policy= is needed; a policy= it names wins, with a warning).",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[
        int | None,
        number_option(
            "--seed", kind=int, help=f"Training seed ({_default('seed')}).", rich_help_panel=EXAMPLE
        ),
    ] = None,
    rl_steps: Annotated[
        int | None,
        number_option(
            "--rl-steps",
            kind=int,
            min=1,
            max=MAX_RL_STEPS,
            help=f"RL optimizer steps to train, 1 to {MAX_RL_STEPS} ({_default('steps')}).",
            rich_help_panel=EXAMPLE,
        ),
    ] = None,
    steps: Annotated[
        int | None,
        number_option(
            "--steps",
            kind=int,
            min=1,
            max=MAX_RL_STEPS,
            hidden=True,
            help="Deprecated alias of --rl-steps.",
            rich_help_panel=EXAMPLE,
        ),
    ] = None,
    checkpoint_every: Annotated[
        int | None,
        number_option(
            "--checkpoint-every",
            kind=int,
            min=1,
            metavar="N",
            help="Save a checkpoint (model, AdamW state, RNG) into RUN/checkpoints at the first "
            "rollout boundary at or after every N steps, for `stabledrl branch`. Default: none.",
            rich_help_panel=EXAMPLE,
        ),
    ] = None,
    lr: Annotated[
        float | None,
        number_option(
            "--lr",
            kind=float,
            help=f"AdamW learning rate ({_default('lr')}).",
            rich_help_panel=EXAMPLE,
        ),
    ] = None,
    estimator: Annotated[
        Estimator | None,
        typer.Option(
            "--estimator",
            help="Log-likelihood estimator (default llada for sequence units, elbo for token "
            "units).",
            rich_help_panel=EXAMPLE,
        ),
    ] = None,
    same_mask: Annotated[
        bool | None,
        typer.Option(
            "--same-mask",
            help="Old and new ELBO share one mask (the control).",
            rich_help_panel=EXAMPLE,
            show_default=False,
        ),
    ] = None,
    unit: Annotated[
        Unit | None,
        typer.Option(
            "--unit", help=f"What a recorded unit is ({_default('unit')}).", rich_help_panel=EXAMPLE
        ),
    ] = None,
    max_grad_norm: Annotated[
        float | None,
        number_option(
            "--max-grad-norm",
            kind=float,
            help=f"clip_grad_norm_ bound ({_default('max_grad_norm')}).",
            rich_help_panel=EXAMPLE,
        ),
    ] = None,
    skip_nonfinite: Annotated[
        bool | None,
        typer.Option(
            "--skip-nonfinite/--no-skip-nonfinite",
            help="Skip the update of a step whose grad norm is not finite (default "
            f"{'--skip-nonfinite' if DEFAULTS.skip_nonfinite else '--no-skip-nonfinite'}).",
            rich_help_panel=EXAMPLE,
            show_default=False,
        ),
    ] = None,
    optimizer_hooks: Annotated[
        bool,
        typer.Option(
            "--optimizer-hooks/--no-optimizer-hooks",
            help="With -- CMD: record every torch optimizer.step() of the command (grad "
            "norms, lr, step time; docs/recording.md), beside its log_policy_batch calls.",
        ),
    ] = True,
    device: Annotated[str, device_option(EXAMPLE)] = "auto",
    threads: Annotated[
        int,
        number_option(
            "--threads",
            kind=int,
            min=1,
            max=MAX_THREADS,
            help=f"CPU threads, 1 to {MAX_THREADS}. 1: the model is too small to gain from more, "
            "and the arrays are then the same on any machine (the fixtures are made so).",
            rich_help_panel=EXAMPLE,
        ),
    ] = 1,
    guard: Annotated[
        GuardMode | None,
        typer.Option(
            "--guard",
            help="Guard each step before optimizer.step(): skip or scale down a flagged one "
            "(stabledrl_cli.guard; default: off).",
            rich_help_panel=EXAMPLE,
        ),
    ] = None,
    guard_rule: Annotated[
        str | None,
        typer.Option(
            "--guard-rule",
            metavar="SPEC",
            help="The guard's grad-norm rule (default skip-step for skip, zclip for scale).",
            rich_help_panel=EXAMPLE,
        ),
    ] = None,
    geometry: Annotated[
        GeometryKind | None,
        typer.Option(
            "--geometry",
            help="Per-step gradient geometry of the units, for true update norms in replay: "
            "gram (exact U x U) or sketch (U x k). Default: none.",
            rich_help_panel=GEOMETRY,
        ),
    ] = None,
    geometry_every: Annotated[
        int | None,
        number_option(
            "--geometry-every",
            kind=int,
            help="Geometry on every Nth step only (default 1: every step).",
            rich_help_panel=GEOMETRY,
        ),
    ] = None,
    geometry_k: Annotated[
        int | None,
        number_option(
            "--geometry-k", kind=int, help="Sketch width k (default 256).", rich_help_panel=GEOMETRY
        ),
    ] = None,
    geometry_params: Annotated[
        list[str] | None,
        typer.Option(
            "--geometry-params",
            metavar="PATTERN",
            help="Covered parameter names (fnmatch pattern, repeatable; default all).",
            rich_help_panel=GEOMETRY,
            show_default=False,
        ),
    ] = None,
    geometry_seed: Annotated[
        int | None,
        number_option(
            "--geometry-seed",
            kind=int,
            help="Seed of the sketch matrix Omega (default 0).",
            rich_help_panel=GEOMETRY,
        ),
    ] = None,
    geometry_method: Annotated[
        SketchMethod | None,
        typer.Option(
            "--geometry-method",
            help="Sketch from exact per-unit gradients, forward-mode JVPs, or auto (the "
            "default: exact while the per-unit gradients fit in 1 GiB, else jvp).",
            rich_help_panel=GEOMETRY,
        ),
    ] = None,
    geometry_dtype: Annotated[
        GeometryDtype | None,
        typer.Option(
            "--geometry-dtype",
            help="Geometry storage (default float32); float16 (sketch only) with a per-step scale.",
            rich_help_panel=GEOMETRY,
        ),
    ] = None,
) -> None:
    """Train and record the built-in tiny dLLM RL example, or record `-- CMD ...`.

    A command is recorded two ways, alone or together: every torch optimizer.step() of its
    Python processes becomes a scalar step (grad norms, lr, step time; no code change), and
    each stabledrl_cli.log_policy_batch(step, ...) call records a policy batch, merged into
    optimizer step number `step` (docs/recording.md).
    """
    after = after_separator(ctx)
    if cmd and (after is None or len(cmd) > len(after)):  # some of it came before `--`
        raise UsageError(
            "put the training command after --: stabledrl record --out RUN -- CMD (before --, "
            "the command's own options would be read as record's)"
        )
    if not cmd and after is not None:  # `-- $TRAIN` with $TRAIN empty
        raise UsageError(
            "no command after --: give the training command after it, or leave -- out to "
            "record the built-in example"
        )
    rl_steps = _deprecated_steps(rl_steps, steps)
    out = local_output(out_arg, "record", "its run")
    _check_out(out, force)
    geometry_given = any(
        option is not None
        for option in (
            geometry_every,
            geometry_k,
            geometry_params,
            geometry_seed,
            geometry_method,
            geometry_dtype,
        )
    )
    if cmd:
        if checkpoint_every is not None:
            raise UsageError(
                "--checkpoint-every checkpoints the built-in example; a training script saves "
                "its own checkpoints (docs/branching.md)"
            )
        if geometry is not None or geometry_given:
            raise UsageError(
                "--geometry records the built-in example; a training script captures its "
                "own and logs it with each step (docs/geometry.md, In your own training loop)"
            )
        given = _example_options_given(ctx)
        if given:
            raise UsageError(
                f"{', '.join(given)}: for the built-in example; a training command (-- CMD) "
                "trains with its own settings"
            )
        run_command(out, cmd, force, policy, optimizer_hooks, debug=debug_requested(ctx))
        return
    if on_command_line("optimizer_hooks"):
        flag = "--optimizer-hooks" if optimizer_hooks else "--no-optimizer-hooks"
        raise UsageError(
            f"{flag}: for a training command (-- CMD); the built-in example records its steps "
            "through its own Recorder"
        )
    from stabledrl_cli.cli._option_names import option_names  # the example's settings as options

    geometry_config = None
    sketch_settings = {
        "--geometry-k": geometry_k,
        "--geometry-seed": geometry_seed,
        "--geometry-method": geometry_method,
    }
    given_to_gram = [name for name, value in sketch_settings.items() if value is not None]
    if geometry == "gram" and given_to_gram:
        raise UsageError(
            f"{', '.join(given_to_gram)}: for --geometry sketch; a Gram matrix is exact (no "
            "width, no Omega, no method to choose)"
        )
    if geometry is not None:
        from stabledrl_cli.capture.geometry import GeometryConfig  # imports torch

        base = GeometryConfig(kind=geometry)
        with option_names({f"geometry {name}": f"--geometry-{name}" for name in GEOMETRY_NUMBERS}):
            geometry_config = replace(
                base,
                every=base.every if geometry_every is None else geometry_every,
                k=base.k if geometry_k is None else geometry_k,
                seed=base.seed if geometry_seed is None else geometry_seed,
                params=tuple(geometry_params) if geometry_params else base.params,
                method=base.method if geometry_method is None else geometry_method,
                storage_dtype=base.storage_dtype if geometry_dtype is None else geometry_dtype,
            )
    elif geometry_given:
        raise UsageError("the --geometry-* options need --geometry gram or --geometry sketch")
    with option_names({"steps": "--rl-steps"}):
        config = ExampleConfig(
            seed=DEFAULTS.seed if seed is None else seed,
            steps=DEFAULTS.steps if rl_steps is None else rl_steps,
            lr=DEFAULTS.lr if lr is None else lr,
            policy=DEFAULTS.policy if policy is None else policy,
            estimator=estimator,  # None: the library picks it by unit
            same_mask=DEFAULTS.same_mask if same_mask is None else same_mask,
            unit=DEFAULTS.unit if unit is None else unit,
            max_grad_norm=DEFAULTS.max_grad_norm if max_grad_norm is None else max_grad_norm,
            skip_nonfinite=DEFAULTS.skip_nonfinite if skip_nonfinite is None else skip_nonfinite,
        )
    if guard_rule is not None and guard is None:
        raise UsageError("--guard-rule needs --guard skip or --guard scale")
    run_example(
        out, force, config, device, geometry_config, threads, checkpoint_every, guard, guard_rule
    )
