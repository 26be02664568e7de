"""How a step's two halves pair (`bootstrap`): `log_policy_batch(n, ...)` and the optimizer
hooks' step n are one step, whichever comes first; the refusals and warnings of a loop whose
batch numbers and optimizer steps have parted."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stabledrl_cli.errors import UsageError, warn


@dataclass
class Step:
    """A step being written: its number and its two halves (Recorder.log_step keywords)."""

    number: Any
    batch: dict[str, Any] | None = None
    hooks: dict[str, Any] | None = None
    hooks_first: bool = field(init=False)
    """Whether the optimizer's half came first (the step was made with it)."""

    def __post_init__(self) -> None:
        self.hooks_first = self.hooks is not None

    def fields(self) -> dict[str, Any]:
        """Both halves as one set of log_step keywords; the batch's win, scalars merged: a
        scalar the batch gives in `scalars` (step_time, say) that the hooks give as a keyword
        is the batch's alone (log_step refuses one given both ways)."""
        hooks, batch = dict(self.hooks or {}), dict(self.batch or {})
        batch_scalars = dict(batch.pop("scalars", None) or {})
        scalars = {**(hooks.pop("scalars", None) or {}), **batch_scalars}
        merged = {name: v for name, v in hooks.items() if name not in batch_scalars}
        merged.update(batch)
        if scalars:
            merged["scalars"] = scalars
        return merged


NUMBERED_BY_STEPS = (
    "under the optimizer hooks, a batch's number is its optimizer step's (the run optimizer's "
    "step() calls, from 0): number the batches so, or record with --no-optimizer-hooks"
)


_warned_order = False


def warn_order_turned(number: Any) -> None:
    """Warns once that step `number` paired its batch before its optimizer step, where the
    loop's first step paired it after: what a loop that logs after the step and skipped one
    shows (each later batch then pairs with the next iteration's step), or one that changed
    its order."""
    global _warned_order
    if _warned_order:
        return
    _warned_order = True
    warn(
        f"stabledrl: warning: log_policy_batch({number}) came before its optimizer step, where "
        "the loop's first batch came after its own: if the loop skipped an optimizer.step() "
        "(an inf gradient, without a GradScaler), each batch from there on is recorded with "
        f"the next iteration's optimizer step; {NUMBERED_BY_STEPS}\n"
    )


def warn_numbered_from_1(last: Step | None, number: int) -> None:
    """Warns when the run's first batch, `number`, which pairs with no optimizer step yet,
    comes right after the optimizer step before it, which had no batch: what a loop shows
    whose batches are numbered from 1 (a global_step counted after the update) and logged
    after the step (each batch then pairs with the next iteration's optimizer step), or one
    that logs its first batch at step 1, before its step."""
    if last is None or last.batch is not None or last.number != number - 1:
        return
    warn(
        f"stabledrl: warning: the loop's first batch, log_policy_batch({number}), came after "
        f"optimizer step {number - 1}, which had none: a loop that numbers its batches from 1 "
        "(a global_step counted after the update) has each batch recorded with the next "
        f"iteration's optimizer step; {NUMBERED_BY_STEPS}\n"
    )


def refuse_parted(step: Step, last: Step, resumed_after: int | None) -> None:
    """UsageError when `step`, one half alone, does not follow `last`, the run's last step,
    which holds only the other half: the loop's batch numbers and its optimizer steps have
    parted (an optimizer.step() the loop skipped, optimizer steps before its first batch, a
    training resumed from a checkpoint before `resumed_after`, the last step of the run the
    Recorder resumed without resume_from), or when `step` is a batch of the number `last`'s
    batch has (a loop that logs each micro-batch or accumulation round of a step). Another half
    behind one of its own kind is left to the Recorder's refusal."""
    from stabledrl_cli.dump._arguments import step_number
    from stabledrl_cli.dump._recorder_steps import resumed_before

    number, behind = step_number(step.number), step_number(last.number)
    if number > behind:
        return
    if number == behind and step.batch is not None and last.batch is not None:
        raise UsageError(
            f"log_policy_batch({number}) was called twice: a step is one call, after its last "
            "backward(), its micro-batches' (or accumulation rounds') arrays concatenated, "
            "micro_batch= naming each sequence's"
        )
    if step.hooks is not None and last.hooks is None:
        parted = f"optimizer step {number} comes after log_policy_batch({behind})"
    elif step.batch is not None and last.batch is None:
        parted = f"log_policy_batch({number}) comes after optimizer step {behind}"
    else:
        return
    if resumed_after is not None and number <= resumed_after:
        keyword = "recorder_kwargs resume_from"
        raise UsageError(parted + resumed_before(resumed_after, number, keyword))
    raise UsageError(f"{parted}: {NUMBERED_BY_STEPS}")


def snapshot(fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` (log_step keywords) with each array, tensor and list copied into a numpy
    array of its own: a batch that waits for its optimizer step's half is written again then,
    and the script may have reused its buffers since `log_policy_batch` returned."""
    from stabledrl_cli.dump._input_arrays import to_numpy  # loaded with the Recorder already

    def copy(name: str, value: Any) -> Any:
        return (
            value
            if value is None or isinstance(value, (int, float))
            else to_numpy(value, name).copy()
        )

    out = {name: copy(name, value) for name, value in fields.items() if name != "scalars"}
    scalars = fields.get("scalars")
    if scalars is not None:
        out["scalars"] = {k: copy(f"scalars[{k!r}]", v) for k, v in dict(scalars).items()}
    return out
