"""`Recorder`: writes a run directory (format v1), one durable file per optimizer step.

Durability. By default `log_step` returns once the step's file is fsynced, renamed to its
final name and the directory fsynced: a crash after that cannot lose it. With
`async_writes=True`, `log_step` checks the inputs and encodes the file's bytes (a snapshot:
the caller may reuse its tensors at once), then hands them to a writer thread through a
queue of `queue_size` entries. On a crash (kill -9, power loss) at most `queue_size + 1` steps
that `log_step` had returned for are lost: the ones waiting in the queue and the one being
written. A step that is lost is lost whole: readers never see a partial file under a final
name. `close()` (or leaving the `with` block) drains the queue.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import json
import math
import operator
import os
import queue
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from stabledrl_cli.dump._inputs import build_step
from stabledrl_cli.dump._schema import (
    FIELDS,
    FORMAT_VERSION,
    MANIFEST_NAME,
    META_FORMAT,
    META_NUM_SEQUENCES,
    META_NUM_TOKENS,
    META_RANK,
    META_SCORED_TOKENS,
    META_WORLD_SIZE,
    RUN_KIND,
    STEP_FILE_RE,
    STEPS_DIR,
    TEMP_FILE_RE,
    UNITS,
    json_checked,
    policy_spec,
    step_file_name,
)
from stabledrl_cli.dump._stfile import encode_step, fsync_dir, write_atomic
from stabledrl_cli.errors import UsageError

_STOP = object()


def _tool_version() -> str:
    from stabledrl_cli import __version__

    return __version__


def _format_scalar(value: float) -> str:
    return repr(float(value))  # round-trips exactly; 'nan' and 'inf' parse back with float()


def _now() -> float:
    """Wall-clock seconds, or SOURCE_DATE_EPOCH when set, so a recording can be reproduced byte
    for byte (the reproducible-builds convention)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    return float(epoch) if epoch else time.time()


def _checked_reward_range(value: Any) -> tuple[float, float]:
    """(low, high), two finite numbers with low < high, else UsageError."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise UsageError(f"reward_range must be (low, high), finite, low < high; got {value!r}")
    return low, high


def _step_number(value: Any) -> int:
    """An int >= 0 (a numpy or 0-d torch integer is fine), else UsageError."""
    try:
        step = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        step = None
    if step is None or step < 0:
        raise UsageError(f"step must be an int >= 0, got {value!r}")
    return step


class _Writer(threading.Thread):
    """Writes queued (path, parts) in order; keeps the first error for the caller."""

    def __init__(self, queue_size: int) -> None:
        super().__init__(name="stabledrl-recorder", daemon=True)
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is _STOP:
                    return
                if self.error is None:
                    write_atomic(*item)
            except BaseException as exc:
                self.error = exc
            finally:
                self.queue.task_done()


class Recorder:
    """Records a training run, one optimizer step at a time (format v1, see design.md).

    >>> with Recorder("runs/mine", policy="grpo", policy_params={"eps_low": 0.2}) as rec:
    ...     rec.log_step(0, logp=logp, logp_old=logp_old, advantages=adv, mask=mask)

    Refuses an existing non-empty directory unless `overwrite=True`, which removes the run's
    own files (manifest and steps), nothing else. With `world_size > 1` every rank makes its
    own Recorder on the same path; rank 0 writes the manifest, each rank its own step files.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        policy: str = "grpo",
        policy_params: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
        unit: str = "token",
        estimator: dict[str, Any] | None = None,
        reward_range: tuple[float, float] | None = None,
        world_size: int = 1,
        rank: int = 0,
        overwrite: bool = False,
        async_writes: bool = False,
        queue_size: int = 8,
        geometry: dict[str, Any] | None = None,
        param_names: list[str] | None = None,
    ) -> None:
        if unit not in UNITS:
            raise UsageError(f"unit {unit!r} is not one of: {', '.join(UNITS)}")
        if not (isinstance(world_size, int) and world_size >= 1):
            raise UsageError(f"world_size must be an int >= 1, got {world_size!r}")
        if not (isinstance(rank, int) and 0 <= rank < world_size):
            raise UsageError(f"rank must be in [0, {world_size}), got {rank!r}")
        if not (isinstance(queue_size, int) and queue_size >= 1):
            raise UsageError(f"queue_size must be an int >= 1, got {queue_size!r}")
        if reward_range is not None:
            reward_range = _checked_reward_range(reward_range)
        if param_names is not None and not all(isinstance(n, str) for n in param_names):
            raise UsageError("param_names must be a list of strings")
        self.path = Path(path)
        self.unit = unit
        self.world_size = world_size
        self.rank = rank
        self.manifest: dict[str, Any] = {
            "format": RUN_KIND,
            "format_version": FORMAT_VERSION,
            "tool_version": _tool_version(),
            "created": _dt.datetime.fromtimestamp(_now(), _dt.timezone.utc).isoformat(
                timespec="seconds"
            ),
            "meta": json_checked(dict(meta or {}), "meta"),
            "policy": {
                "spec": policy_spec(policy, policy_params),
                "name": policy,
                "params": json_checked(dict(policy_params or {}), "policy_params"),
            },
            "unit": unit,
            "estimator": json_checked(dict(estimator or {}), "estimator"),
            "reward_range": list(reward_range) if reward_range is not None else None,
            "world_size": world_size,
            "geometry": json_checked(dict(geometry), "geometry") if geometry is not None else None,
            "param_names": list(param_names) if param_names is not None else None,
            "fields": {name: {"per": s.per, "dtype": s.dtype} for name, s in FIELDS.items()},
        }
        self._num_params = len(param_names) if param_names is not None else None
        self._last_step: int | None = None
        self._closed = False
        self._prepare(overwrite)
        self._writer: _Writer | None = None
        if async_writes:
            self._writer = _Writer(queue_size)
            self._writer.start()
            atexit.register(_close_at_exit, weakref.ref(self))

    # -- set-up -----------------------------------------------------------------------------
    def _step_files(self, steps: Path, *, any_rank: bool) -> list[str]:
        """Step files (final or temporary) in `steps`: this rank's, or with `any_rank` all."""
        if not steps.is_dir():
            return []
        names = []
        for name in os.listdir(steps):
            match = STEP_FILE_RE.match(name) or TEMP_FILE_RE.match(name)
            if match is None:
                continue
            file_rank = int(match.group(2)) if match.group(2) is not None else 0
            if any_rank or self.world_size == 1 or file_rank == self.rank:
                names.append(name)
        return names

    def _prepare(self, overwrite: bool) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"{self.path} exists and is not a directory")
        steps = self.path / STEPS_DIR
        if not overwrite and self.path.is_dir():
            # Other ranks may have made steps/ already: only what this rank would clobber counts.
            others = [n for n in os.listdir(self.path) if n != STEPS_DIR] if self.rank == 0 else []
            mine = self._step_files(steps, any_rank=False)
            if others or mine:
                raise UsageError(
                    f"{self.path} already exists and is not empty ({(others + mine)[0]}); "
                    "pass overwrite=True (record --force) to replace the run"
                )
        if overwrite:
            # Rank 0 replaces the whole run; another rank only its own files.
            for name in self._step_files(steps, any_rank=self.rank == 0):
                (steps / name).unlink(missing_ok=True)
        steps.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            text = json.dumps(self.manifest, indent=2, allow_nan=False) + "\n"
            write_atomic(self.path / MANIFEST_NAME, [text.encode()])
            fsync_dir(self.path.parent if self.path.parent != self.path else self.path)

    # -- recording ----------------------------------------------------------------------------
    def log_step(
        self,
        step: int,
        *,
        logp: Any,
        logp_old: Any,
        advantages: Any,
        mask: Any = None,
        seq_id: Any = None,
        group_id: Any = None,
        reward: Any = None,
        logp_ref: Any = None,
        logp_rollout: Any = None,
        loss_weight: Any = None,
        loss_scale: Any = None,
        unit_grad_gram: Any = None,
        unit_grad_sketch: Any = None,
        grad_norm_covered: Any = None,
        param_grad_norm: Any = None,
        token_ids: Any = None,
        grad_norm: Any = None,
        grad_norm_clipped: Any = None,
        loss: Any = None,
        lr: Any = None,
        inner_step: Any = None,
        reward_mean: Any = None,
        unit_grad_sketch_scale: Any = None,
        scalars: dict[str, float] | None = None,
    ) -> None:
        """Records one optimizer step. Token arrays: [T], or [B, L] with mask [B, L] (then
        seq_id defaults to the row, and advantages may be [B]). group_id, reward: [N].
        Raises UsageError naming the field for a bad shape, dtype or id."""
        if self._closed:
            raise UsageError("log_step on a closed Recorder")
        self._raise_writer_error()
        step = _step_number(step)
        if self._last_step is not None and step <= self._last_step:
            raise UsageError(
                f"step {step} does not follow step {self._last_step}; steps must increase"
            )
        tensors, values = build_step(
            unit=self.unit,
            step=step,
            arrays={
                "logp": logp,
                "logp_old": logp_old,
                "advantages": advantages,
                "mask": mask,
                "seq_id": seq_id,
                "group_id": group_id,
                "reward": reward,
                "logp_ref": logp_ref,
                "logp_rollout": logp_rollout,
                "loss_weight": loss_weight,
                "loss_scale": loss_scale,
                "unit_grad_gram": unit_grad_gram,
                "unit_grad_sketch": unit_grad_sketch,
                "param_grad_norm": param_grad_norm,
                "token_ids": token_ids,
            },
            scalars={
                "grad_norm": grad_norm,
                "grad_norm_clipped": grad_norm_clipped,
                "loss": loss,
                "lr": lr,
                "inner_step": inner_step,
                "reward_mean": reward_mean,
                "grad_norm_covered": grad_norm_covered,
                "unit_grad_sketch_scale": unit_grad_sketch_scale,
            },
            user_scalars=scalars,
            num_params=self._num_params,
        )
        values.setdefault("wall_time", _now())
        metadata = {name: _format_scalar(v) for name, v in values.items()}
        ids = tensors["seq_id"]
        metadata.update({
            META_FORMAT: FORMAT_VERSION,
            META_RANK: str(self.rank),
            META_WORLD_SIZE: str(self.world_size),
            META_NUM_TOKENS: str(tensors["logp"].shape[0]),
            META_NUM_SEQUENCES: str(int(ids.max()) + 1 if ids.size else 0),
            META_SCORED_TOKENS: str(int(tensors["mask"].sum(dtype="int64"))),
        })  # fmt: skip
        final = self.path / STEPS_DIR / step_file_name(step, self.rank, self.world_size)
        parts = encode_step(tensors, metadata)
        if self._writer is None:
            write_atomic(final, parts)
        else:
            self._writer.queue.put((final, parts))
        self._last_step = step

    def flush(self) -> None:
        """Waits until every queued step is durable (a no-op for synchronous writes)."""
        if self._writer is not None:
            self._writer.queue.join()
        self._raise_writer_error()

    def _raise_writer_error(self) -> None:
        if self._writer is not None and self._writer.error is not None:
            exc = self._writer.error
            raise OSError(f"recording to {self.path} failed: {exc}") from exc

    def close(self) -> None:
        """Drains the queue (async mode) and stops the writer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.queue.put(_STOP)
            self._writer.join()
            self._raise_writer_error()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Recorder({str(self.path)!r}, unit={self.unit!r}, rank={self.rank})"


def _close_at_exit(ref: weakref.ref[Recorder]) -> None:
    recorder = ref()
    if recorder is not None:
        recorder.close()
