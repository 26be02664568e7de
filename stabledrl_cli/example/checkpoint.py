"""Checkpoints of the built-in example, for bit-exact resume and for `stabledrl branch`.

Where: `RUN/checkpoints/step-XXXXXXXX.pt`, XXXXXXXX the optimizer step the checkpoint resumes
at (the first step it has not taken yet).

When: only at a rollout boundary (inner step 0, before the rollout's prompts are drawn). With
`every = N`, a checkpoint is written at the first rollout boundary at or after each multiple
of N (step 0, the end of pretraining, included). With the default mu = 4 and N a multiple of
4, that is exactly every N steps. A boundary needs no rollout batch in the checkpoint: the
batch (prompts, completions, old log-likelihoods) is drawn afresh from the restored
generator, exactly as the original run drew it.

What: the model's parameters, the AdamW state (moments and step counts), the one training
generator's state, the step and rollout index, the example's settings (`ExampleConfig`
as a dict), the geometry the run records (`GeometryConfig` as a dict, or None) and its
guard (mode, rule and the grad norms fed to it so far, or None). Written
with `torch.save` through `_atomic.write_atomic`; read with `torch.load(weights_only=True)`,
which accepts tensors, numbers, strings, lists and dicts only: a checkpoint is data, never
code. torch.save stores its zip archive's members
uncompressed; one whose members would unpack to more than the file's size (a compressed one,
or a size it does not hold) is refused before torch.load allocates them.
"""

from __future__ import annotations

import io
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from stabledrl_cli._atomic import fsync_dir, write_atomic, write_error
from stabledrl_cli._regular import NotRegularFile, open_regular
from stabledrl_cli.errors import InputError, UsageError, quoted

FORMAT = "stabledrl-example-checkpoint/1"
"""The `format` key every checkpoint carries."""
RESUMABLE_FIELDS_FREE = ("policy", "steps")
"""ExampleConfig fields a resumed run may change; every other one must match the checkpoint."""


@dataclass(frozen=True, kw_only=True)
class TrainingState:
    """Everything the RL loop needs to continue at a rollout boundary."""

    step: int
    """The next optimizer step to take."""
    rollout: int
    """The next rollout's index."""
    model: dict[str, torch.Tensor]
    """The model's `state_dict()` (CPU)."""
    optimizer: dict[str, Any]
    """The AdamW `state_dict()` (moments and step counts, CPU tensors)."""
    rng: torch.Tensor
    """The training generator's `get_state()` (uint8)."""
    config: dict[str, Any]
    """`dataclasses.asdict(ExampleConfig)` of the run that wrote it."""
    geometry: dict[str, Any] | None = None
    """`dataclasses.asdict(GeometryConfig)` of the geometry the run records, which a branch
    records too; None for a run without (or a checkpoint written before the key)."""
    guard: dict[str, Any] | None = None
    """The run's guard: `mode`, `rule` (its canonical spec) and `norms` (float64 [n]: every
    grad norm it was asked about, in order, from which a branch rebuilds its state); None
    for an unguarded run (or a checkpoint written before the key)."""
    source: Path | None = None
    """The file it was read from (named in messages), None for a state not read from one."""


@dataclass(frozen=True, kw_only=True)
class CheckpointPlan:
    """Where and how often `train` writes checkpoints."""

    directory: Path
    every: int

    def __post_init__(self) -> None:
        if self.every < 1:
            raise UsageError(f"checkpoint interval must be an integer >= 1, got {self.every}")

    def next_due(self, step: int) -> int:
        """The multiple of `every` after the one a checkpoint at `step` satisfied."""
        return (step // self.every + 1) * self.every


def checkpoint_path(directory: Path, step: int) -> Path:
    """The file of the checkpoint that resumes at `step`."""
    return directory / f"step-{step:08d}.pt"


def save_checkpoint(directory: Path, state: TrainingState) -> Path:
    """Writes `state` atomically as `directory/step-XXXXXXXX.pt`; -> its path."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(directory, exc) from None
    buffer = io.BytesIO()
    torch.save(
        {
            "format": FORMAT,
            "step": state.step,
            "rollout": state.rollout,
            "model": state.model,
            "optimizer": state.optimizer,
            "rng": state.rng,
            "config": state.config,
            "geometry": state.geometry,
            "guard": state.guard,
        },
        buffer,
    )
    target = write_atomic(checkpoint_path(directory, state.step), buffer.getvalue())
    fsync_dir(directory)
    return target


def load_checkpoint(path: str | Path) -> TrainingState:
    """The state a checkpoint holds; InputError (exit 3) for a file that is not one."""
    path = Path(path)
    if path.is_symlink():  # it would read a file the run does not hold (docs/trust.md)
        raise InputError(f"{path}: not a checkpoint (a symlink, never followed)")
    try:
        # a FIFO so named would block torch.load; a link put there since is not followed
        fh, info = open_regular(path, follow_links=False)
        with fh, warnings.catch_warnings():  # torch warns of a pickle protocol it did not write
            warnings.simplefilter("ignore")
            unpacked = _unpacked_size(fh)
            if unpacked > info.st_size:
                raise InputError(
                    f"{path}: not a readable checkpoint (its zip archive unpacks to {unpacked} "
                    f"bytes, more than its {info.st_size})"
                )
            data = torch.load(fh, map_location="cpu", weights_only=True)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{path}: no such checkpoint") from None
    except NotRegularFile:
        raise InputError(f"{path}: not a checkpoint (not a regular file)") from None
    except Exception as exc:  # torch raises many kinds for a file that is not a checkpoint
        raise InputError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
    found = data.get("format") if isinstance(data, dict) else None
    family = FORMAT.rpartition("/")[0] + "/"
    if isinstance(found, str) and found != FORMAT and found.startswith(family):
        raise InputError(
            f"{path}: a checkpoint of format {quoted(found)}, which this version of stabledrl "
            f"cannot read (it reads {FORMAT})"
        )
    if found != FORMAT:
        raise InputError(f"{path}: not a stabledrl example checkpoint (format {FORMAT})")
    try:
        return TrainingState(
            step=_count(data["step"], "step", path),
            rollout=_count(data["rollout"], "rollout", path),
            model=dict(data["model"]),
            optimizer=dict(data["optimizer"]),
            rng=data["rng"],
            config=dict(data["config"]),
            geometry=None if data.get("geometry") is None else dict(data["geometry"]),
            guard=None if data.get("guard") is None else dict(data["guard"]),
            source=path,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: incomplete checkpoint ({exc})") from None


def _unpacked_size(handle: BinaryIO) -> int:
    """The bytes torch.load would unpack from the file at `handle` when it reads it as a zip
    archive (it begins with a zip entry, as torch decides): its members' sizes, as its
    directory gives them; 0 for a file torch reads otherwise (its legacy format). A zip
    archive whose directory cannot be read raises zipfile.BadZipFile."""
    start = handle.read(4)
    handle.seek(0)
    if start != b"PK\x03\x04":
        return 0
    try:
        with zipfile.ZipFile(handle) as archive:
            return sum(member.file_size for member in archive.infolist())
    finally:
        handle.seek(0)


def _count(value: object, key: str, path: Path) -> int:
    """A checkpoint's step or rollout: an int >= 0 (a float, infinite or fractional, is refused,
    never truncated), else an InputError naming it."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= 0:
            return value
        what = "negative"
    else:
        what = f"a {type(value).__name__}"
    raise InputError(f"{path}: its {key} is not a whole number >= 0 ({what})")


def restore(
    state: TrainingState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> None:
    """Loads `state` into the model, its AdamW optimizer and the training generator.
    InputError (exit 3) when it does not fit them: other parameter names or shapes, an AdamW
    state that is not one of these parameters', a generator state that is not one, AdamW
    settings other than the optimizer's own (lr, betas, ...: they come from the settings
    `check_resumable` compares), or values training cannot go on from (a parameter or moment
    that is not finite, a step count that is not one finite number >= 0)."""
    where = state.source or f"the checkpoint at step {state.step}"
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        model.load_state_dict(state.model)
        generator.set_state(state.rng)
        optimizer.load_state_dict(state.optimizer)
    except (RuntimeError, TypeError, ValueError, KeyError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{where}: its state does not fit the model ({first})") from None
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{where}: its model parameter {name} is not finite")
    for group, own in zip(optimizer.param_groups, settings, strict=True):
        changed = [key for key, value in own.items() if not _same(group.get(key), value)]
        if changed:
            raise InputError(
                f"{where}: its AdamW settings differ from the optimizer's own "
                f"({', '.join(changed)}: a checkpoint of other settings, or edited)"
            )
        for param in group["params"]:
            _check_moments(optimizer.state.get(param, {}), param, where)


def _same(got: object, want: object) -> bool:
    """Whether a loaded optimizer setting is the built one: same type and value (a tuple's
    items alike; a tensor where a number was is not)."""
    if type(got) is not type(want):
        return False
    if isinstance(got, tuple) and isinstance(want, tuple):
        return len(got) == len(want) and all(map(_same, got, want))
    return bool(got == want)


def _check_moments(moments: dict[str, object], param: torch.Tensor, where: str | Path) -> None:
    """InputError unless a parameter's AdamW state is one training can go on from: moments of
    its shape, finite (the second >= 0), and a step count that is one finite number >= 0."""
    step = moments.get("step")
    if step is not None and not (
        isinstance(step, torch.Tensor)
        and step.numel() == 1
        and bool(torch.isfinite(step).all())
        and bool((step >= 0).all())
    ):
        raise InputError(f"{where}: its AdamW step count is not one finite number >= 0")
    for name in ("exp_avg", "exp_avg_sq"):
        value = moments.get(name)
        if value is None:
            continue
        if not (isinstance(value, torch.Tensor) and value.shape == param.shape):
            raise InputError(
                f"{where}: its state does not fit the model (AdamW {name} is not of its "
                f"parameter's shape {list(param.shape)})"
            )
        if not bool(torch.isfinite(value).all()) or (
            name == "exp_avg_sq" and bool((value < 0).any())
        ):
            raise InputError(f"{where}: its AdamW {name} is not finite (or is negative)")


def check_resumable(state: TrainingState, config: dict[str, Any]) -> None:
    """UsageError unless `config` (asdict of an ExampleConfig) differs from the checkpoint's
    settings only in `RESUMABLE_FIELDS_FREE`, and asks for more steps than it has taken."""
    differing = sorted(
        key
        for key in set(state.config) | set(config)
        if key not in RESUMABLE_FIELDS_FREE and state.config.get(key) != config.get(key)
    )
    if differing:
        raise UsageError(
            f"the checkpoint at step {state.step} was written with other settings "
            f"({', '.join(differing)}); only policy and steps may change on resume"
        )
    if int(config["steps"]) <= state.step:
        raise UsageError(
            f"steps must be > {state.step} to resume at step {state.step}, got {config['steps']}"
        )
