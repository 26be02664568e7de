"""The built-in example's side of the branch protocol (stabledrl_cli.branching): train one
branch from a checkpoint under another policy and record it as a run of its own."""

from __future__ import annotations

import json
import os
import re
import typing
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from stabledrl_cli._atomic import write_error
from stabledrl_cli._device import resolve_device
from stabledrl_cli.capture.branch_protocol import BRANCHES_DIR, CHECKPOINTS_DIR, BranchRequest
from stabledrl_cli.capture.geometry import GeometryConfig
from stabledrl_cli.dump import Recorder
from stabledrl_cli.dump._manifest_edits import manifest_now
from stabledrl_cli.dump._run_files import symlink_refused
from stabledrl_cli.dump._run_target import check_replaceable, os_file
from stabledrl_cli.dump._schema import (
    MANIFEST_NAME,
    STEP_FILE_RE,
    STEPS_DIR,
    STOP_NOTE_RE,
    TEMP_FILE_RE,
    TEMP_STOP_NOTE_RE,
    WRITER_LOCK_RE,
)
from stabledrl_cli.errors import InputError, UsageError, quoted
from stabledrl_cli.example.checkpoint import TrainingState, checkpoint_files, load_checkpoint
from stabledrl_cli.example.config import MAX_RL_STEPS, ExampleConfig
from stabledrl_cli.example.trainer import (
    StepInfo,
    TrainResult,
    check_restorable,
    recorder_kwargs,
    train,
)
from stabledrl_cli.guard import Guard
from stabledrl_cli.policies import get_policy
from stabledrl_cli.policies._spec import base_type
from stabledrl_cli.vocab import GuardMode

_SETTING_TYPES: dict[object, tuple[tuple[type, ...], str]] = {
    int: ((int,), "an integer"),
    float: ((int, float), "a number"),
    bool: ((bool,), "true or false"),
}
"""A setting's annotated type -> the Python types a checkpoint's value may have, in words (bool
is an int to isinstance: only a bool setting takes one); a Literal or str setting: a string."""


def branch_config(saved: dict[str, object], request: BranchRequest) -> ExampleConfig:
    """The checkpoint's settings with the request's policy and end step (at + steps).

    A checkpoint is data: settings that are unknown, missing, of another type or out of range
    are an InputError (exit 3) naming it."""
    where = request.checkpoint
    hints = typing.get_type_hints(ExampleConfig)
    unknown = [str(key) for key in saved if key not in hints]  # a key may be of any type
    missing = [key for key in hints if key not in saved]
    if unknown or missing:
        what = [f"unknown {quoted(', '.join(unknown))}"] if unknown else []
        what += [f"missing {', '.join(missing)}"] if missing else []
        raise InputError(f"{where}: settings this version cannot use ({'; '.join(what)})")
    for key, hint in hints.items():
        value, kind = saved[key], base_type(hint)
        allowed, name = _SETTING_TYPES.get(kind, ((str,), "a string"))
        optional = kind is not hint and value is None
        if not optional and (
            not isinstance(value, allowed) or (kind is not bool and isinstance(value, bool))
        ):
            raise InputError(f"{where}: setting {key} is not {name} (a {type(value).__name__})")
    try:
        config = ExampleConfig(**saved)  # type: ignore[arg-type]
    except UsageError as exc:
        raise InputError(f"{where}: settings the example cannot take ({exc})") from None
    return replace(config, policy=request.policy, steps=request.at + request.steps)


def branch_geometry(state: TrainingState) -> GeometryConfig | None:
    """The geometry the checkpoint's run recorded, which its branch records too (None: none).
    Settings that are not a `GeometryConfig`'s are an InputError (exit 3) naming the file."""
    saved = state.geometry
    if saved is None:
        return None
    params = saved.get("params")
    try:
        if params is not None and not all(isinstance(p, str) for p in params):
            raise TypeError("params are not name patterns")
        return GeometryConfig(**{**saved, "params": None if params is None else tuple(params)})
    except (TypeError, UsageError) as exc:
        where = state.source or f"the checkpoint at step {state.step}"
        raise InputError(f"{where}: geometry settings the example cannot take ({exc})") from None


def branch_guard(state: TrainingState) -> Guard | None:
    """The checkpoint's guard, in the state the run's guard was in when it was written (its
    rule fed the same grad norms), which the branch trains under; None for an unguarded run.
    A mode, rule or norms `Guard` cannot take are an InputError (exit 3) naming the file."""
    saved = state.guard
    if saved is None:
        return None
    where = state.source or f"the checkpoint at step {state.step}"
    norms = saved.get("norms")
    if not isinstance(norms, torch.Tensor) or norms.dtype != torch.float64 or norms.dim() != 1:
        raise InputError(f"{where}: guard norms that are not a float64 vector")
    if norms.numel() != state.step:  # the guard is asked about every step
        raise InputError(
            f"{where}: {norms.numel()} guard norms for the {state.step} steps before step "
            f"{state.step} (one a step)"
        )
    try:
        guard = Guard(typing.cast(GuardMode, saved.get("mode")), saved.get("rule"))
    except UsageError as exc:
        raise InputError(f"{where}: a guard the example cannot take ({exc})") from None
    for norm in norms.tolist():
        guard.rule.update(norm)
    return guard


_RUN_FILES = (STEP_FILE_RE, TEMP_FILE_RE, STOP_NOTE_RE, TEMP_STOP_NOTE_RE, WRITER_LOCK_RE)
"""The names of what a Recorder leaves in a run's steps/ folder."""
_TEMP_MANIFEST_RE = re.compile(rf"^\.{re.escape(MANIFEST_NAME)}\.tmp-[0-9a-f-]+\Z")
"""A manifest a killed Recorder left half-written (`_manifest_edits._write_manifest`)."""


def _run_files(run: Path) -> list[Path]:
    """The files of the branch run `run` (its manifest, its steps/ folder's step files, notes,
    locks and temporaries, and a file browser's files in either folder), folders last;
    UsageError naming the first other entry, or a manifest that is no stabledrl run's."""
    files: list[Path] = []

    def refused(entry: Path) -> UsageError:
        return UsageError(
            f"{entry}: not a file of a branch run; recording over the run (--force) removes "
            "its branches, never another file: remove it, or record elsewhere"
        )

    if os.path.islink(run) or not run.is_dir():
        raise refused(run)
    for entry in sorted(run.iterdir()):
        if entry.name == STEPS_DIR and entry.is_dir() and not entry.is_symlink():
            for name in sorted(os.listdir(entry)):
                known = any(pattern.match(name) for pattern in _RUN_FILES)
                if not known and not os_file(entry / name):
                    raise refused(entry / name)
                files.append(entry / name)
            files.append(entry)
        elif entry.name == MANIFEST_NAME or _TEMP_MANIFEST_RE.match(entry.name):
            if entry.name == MANIFEST_NAME:
                check_replaceable(run)
            files.append(entry)
        elif os_file(entry):
            files.append(entry)
        else:
            raise refused(entry)
    return [*files, run]


def old_branches(run_dir: Path) -> list[Path]:
    """The files of the branch runs of the run at `run_dir` (RUN/branches, `stabledrl branch`),
    folders after their contents; [] without any. A run recorded again over (`record --force`)
    must not keep the branches of the run it replaces. Refused before anything is removed:
    RUN/branches as a symlink (InputError), as no folder (a file, which `branch` could never
    write into) or anything in it that is not a branch run (UsageError naming it); a file
    browser's file (.DS_Store) in it or in a branch run goes with them."""
    base = run_dir / BRANCHES_DIR
    if os.path.islink(base):
        raise symlink_refused(str(base))
    if not os.path.lexists(base):
        return []
    if not base.is_dir():
        raise UsageError(
            f"{base}: not a folder of branch runs; recording over the run (--force) removes "
            "its branches, never another file: remove it, or record elsewhere"
        )
    files = [
        path
        for run in sorted(base.iterdir())
        for path in ([run] if os_file(run) else _run_files(run))
    ]
    return [*files, base]


def old_run_files(run_dir: Path) -> list[Path]:
    """What the built-in example wrote beside the run at `run_dir` that a run recorded over it
    must not keep: its checkpoints (`checkpoint_files`) and its branch runs (`old_branches`),
    folders after their contents. Refused as those refuse, before anything is removed; a
    UsageError names an entry named as a checkpoint that is no file (a directory
    `step-00000008.pt`: the new run would save its checkpoint there, or `branch` read it), and
    `run_dir` holding such files but no run (no manifest): they are no run's (a project's own
    `checkpoints/step-00001000.pt`), and --force replaces a run only."""
    checkpoints = checkpoint_files(run_dir)
    for path in checkpoints:
        if not path.is_symlink() and not path.is_file():
            raise UsageError(
                f"{path}: not a checkpoint file; recording over the run (--force) removes its "
                "checkpoints, never another file: remove it, or record elsewhere"
            )
    files = [*checkpoints, *old_branches(run_dir)]
    if files and not os.path.lexists(run_dir / MANIFEST_NAME):
        raise UsageError(
            f"{files[0]}: no run's ({run_dir} holds no {MANIFEST_NAME}); recording over a run "
            "(--force) removes its checkpoints and branches, never what is no run's: remove "
            "it, or record elsewhere"
        )
    return files


def remove_old_run_files(files: list[Path]) -> None:
    """Removes the `files` of `old_run_files`; WriteError naming one that cannot be removed."""
    for path in files:
        try:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            raise write_error(path, exc) from None


def _as_json(value: object) -> object:
    """`value` as a manifest holds it (tuples as lists...), to compare with one read back."""
    return json.loads(json.dumps(value))


def check_its_run(state: TrainingState, kwargs: dict[str, Any]) -> None:
    """InputError (exit 3) when a checkpoint in a run's checkpoints folder says another run
    than that run's manifest (a hand-edited seed, say): its settings (`config`), the geometry
    it records and its guard (`kwargs`: the branch's Recorder arguments, made from the
    checkpoint) must be the run's, or its branch would train and record, under the run's name,
    what the run never was. A checkpoint outside a run, or of a run whose manifest cannot be
    read, says no run to compare."""
    where = state.source
    if where is None or where.parent.name != CHECKPOINTS_DIR:
        return
    run = where.parent.parent
    try:
        manifest = manifest_now(run)
    except (InputError, ValueError, OSError):
        return
    meta = manifest.get("meta")
    meta = meta if isinstance(meta, dict) else {}
    claims = {
        "its settings are": (_as_json(state.config), meta.get("example_config")),
        "its geometry is": (_as_json(kwargs["geometry"]), manifest.get("geometry")),
        "its guard is": (_as_json(kwargs["meta"].get("guard")), meta.get("guard")),
    }
    for what, (held, runs) in claims.items():
        if held == runs:
            continue
        if isinstance(held, dict) and isinstance(runs, dict):
            key = next(k for k in (*held, *runs) if held.get(k) != runs.get(k))
            said = f"{key} {held.get(key)!r} in the checkpoint, {runs.get(key)!r} in the run"
        else:
            said = f"{_some(held)} in the checkpoint, {_some(runs)} in the run"
        raise InputError(
            f"{where}: not a checkpoint of the run it is in: {what} not the run's "
            f"({said}: {run / MANIFEST_NAME})"
        )


def _some(value: object) -> str:
    return "none" if value is None else "one"


def train_branch(
    request: BranchRequest,
    *,
    force: bool = False,
    device: str = "cpu",
    on_step: Callable[[int], None] | None = None,
    on_start: Callable[[], None] | None = None,
) -> TrainResult:
    """Resumes `request.checkpoint`, trains `request.steps` steps under `request.policy` and
    records them (steps at .. at + steps - 1) into `request.run_dir`.

    The manifest's meta carries `branch`: the checkpoint, its step and the policy override.
    UsageError for more than MAX_RL_STEPS steps; InputError when the checkpoint does not
    resume at `request.at`, says another run than the one it is in (`check_its_run`), or its
    state does not fit the model (checked before the branch
    run is opened). `on_start` is called once the
    checkpoint is taken, before the first step trains.
    """
    if request.steps > MAX_RL_STEPS:
        raise UsageError(
            f"a branch of the example trains at most {MAX_RL_STEPS} steps, got {request.steps}"
        )
    state = load_checkpoint(request.checkpoint)
    if state.step != request.at:
        raise InputError(
            f"{request.checkpoint} resumes at step {state.step}, not at step {request.at}"
        )
    config = branch_config(state.config, request)
    check_restorable(state, config)  # before the branch run is opened (and --force clears it)
    geometry = branch_geometry(state)
    guard = branch_guard(state)
    policy = get_policy(config.policy)
    kwargs = recorder_kwargs(config, policy, geometry)
    if guard is not None:
        kwargs["meta"]["guard"] = guard.manifest_note()
    check_its_run(state, kwargs)
    kwargs["meta"]["branch"] = {
        "checkpoint": os.path.abspath(request.checkpoint),  # not the cwd's relative path
        "at": request.at,
        "steps": request.steps,
        "policy_override": policy.spec,
    }

    def step_done(info: StepInfo) -> None:
        if on_step is not None:
            on_step(info.step)

    with Recorder(request.run_dir, overwrite=force, **kwargs) as recorder:
        if on_start is not None:
            on_start()
        return train(
            config,
            recorder=recorder,
            device=resolve_device(device),
            on_step=step_done,
            geometry=geometry,
            resume=state,
            guard=guard,
        )
