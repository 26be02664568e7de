"""What a replay uses of a step's data: the fields it reads (`read_arrays`) with their lengths
and counts checked, the fields a policy needs (`check_step`), the arrays moved to the device
(`to_device`), the prepared batch, geometry and micro-batches (`usable`), and the
collapse-warning and noise-floor measures taken on the host (`host_measures`). A step whose
data a replay cannot use raises an InputError naming the run and the step (`rejection`
turns it into the reason a replay reports)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from stabledrl_cli.dump import Run, Step
from stabledrl_cli.dump._schema import GRAM_KEY, SKETCH_KEY, SKETCH_SCALE_KEY
from stabledrl_cli.errors import InputError
from stabledrl_cli.policies import Policy, PolicyBatch, PreparedBatch, prepare
from stabledrl_cli.replay.framework import MicroBatches, micro_batches
from stabledrl_cli.replay.measurements import (
    NOISE_FLOOR_INNER_STEP,
    NoiseFloor,
    OwnLikelihood,
    host_array,
    logratio_moments,
    unit_token_counts,
)
from stabledrl_cli.replay.run_facts import run_ranks
from stabledrl_cli.replay.step_geometry import StepGeometry
from stabledrl_cli.vocab import Unit

BASE_FIELDS = ("logp", "logp_old", "advantages", "mask", "seq_id")
"""Fields every policy needs."""
TOKEN_FIELDS = (*BASE_FIELDS, "logp_ref", "logp_rollout", "loss_weight", "loss_scale")
"""Per-entry fields a replay reads when present (each as long as logp)."""
SEQUENCE_FIELDS = ("group_id", "reward", "micro_batch", "group_split", "token_count")
"""Per-sequence fields a replay reads when present."""
GEOMETRY_FIELDS = (GRAM_KEY, SKETCH_KEY)

Arrays = dict[str, torch.Tensor]

Measures = tuple[OwnLikelihood, NoiseFloor]
"""A step's collapse-warning measurement and noise-floor moments (each empty when the step is
not one), taken on the host and pooled once the step is prepared."""


def rejection(step: int, exc: InputError, where: str) -> tuple[int, str]:
    """(step, the reason) of a step rejected with `exc`: its message without the run's
    location, starting with "step N: "."""
    reason = str(exc).removeprefix(f"{where}: ")
    if not reason.startswith(f"step {step}"):
        reason = f"step {step}: {reason}"
    return step, reason


def check_step(step: Step, policies: Sequence[Policy], unit: Unit, where: str) -> None:
    """InputError (exit 3) for a field a policy needs that the step lacks."""
    for name in BASE_FIELDS:
        if name not in step.fields:
            raise InputError(f"{where}: step {step.step} has no {name!r}, which every policy needs")
    for policy in policies:
        missing = sorted(policy.required_fields(unit) - step.fields)
        if missing:
            names = ", ".join(repr(name) for name in missing)
            raise InputError(
                f"{where}: step {step.step} has no {names}, which policy {policy.spec!r} needs"
            )


def read_arrays(step: Step, where: str, *, per_rank: bool = False) -> Arrays:
    """The step's arrays a replay uses (CPU), with their lengths checked, and the step's counts
    against them: its sequences against the ones seq_id names (N = max(seq_id) + 1: no
    sequence without an entry), its scored entries against the mask's; a recorded
    token_count is >= 0. `per_rank` (a run whose ranks normalised their own losses,
    `run_per_rank`): a step joined from several ranks has its sequences' ranks as "rank"."""
    names = (*TOKEN_FIELDS, *SEQUENCE_FIELDS, *GEOMETRY_FIELDS)
    arrays = {name: step[name] for name in names if name in step.fields}
    length = arrays["logp"].reshape(-1).shape[0]
    for name in TOKEN_FIELDS:
        if name in arrays and arrays[name].reshape(-1).shape[0] != length:
            raise InputError(
                f"{where}: step {step.step}: {name} has {arrays[name].numel()} entries but logp "
                f"has {length} (mismatched array lengths)"
            )
    present = [n for n in SEQUENCE_FIELDS if n in arrays]
    for name in present[1:]:
        if arrays[name].shape != arrays[present[0]].shape:
            raise InputError(
                f"{where}: step {step.step}: {present[0]} has {arrays[present[0]].numel()} "
                f"entries but {name} has {arrays[name].numel()} (mismatched array lengths)"
            )
    seq_id, mask = host_array(arrays["seq_id"]), host_array(arrays["mask"])
    named = int(np.maximum.reduce(seq_id)) + 1 if seq_id.size else 0
    if named < step.num_sequences:  # per-sequence entries of a sequence no entry is of
        raise InputError(
            f"{where}: step {step.step}: seq_id names {named} sequences (its largest id + 1), "
            f"the step has {step.num_sequences}"
        )
    scored = int(np.count_nonzero(mask))
    if scored != step.num_scored_tokens:
        raise InputError(
            f"{where}: step {step.step}: mask scores {scored} entries, the step counts "
            f"{step.num_scored_tokens} scored"
        )
    counts = arrays.get("token_count")
    if counts is not None and counts.numel() and int(counts.min()) < 0:
        raise InputError(
            f"{where}: step {step.step}: token_count holds {int(counts.min())}; a sequence's "
            "token count is a whole number >= 0"
        )
    if per_rank and step.rank_sequences:
        sizes = torch.tensor(step.rank_sequences)
        arrays["rank"] = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    return arrays


def to_device(chunk: list[Arrays], device: torch.device) -> None:
    """Moves a chunk's arrays to the device with one transfer per field (in place)."""
    if device.type == "cpu":
        return
    names = {name for arrays in chunk for name in arrays}
    for name in names:
        holders = [arrays for arrays in chunk if name in arrays]
        if len({a[name].dtype for a in holders}) != 1:
            for arrays in holders:
                arrays[name] = arrays[name].to(device)
            continue
        shapes = [a[name].shape for a in holders]
        flat = torch.cat([a[name].reshape(-1) for a in holders]).to(device, non_blocking=True)
        pieces = torch.split(flat, [math.prod(s) for s in shapes])
        for arrays, piece, shape in zip(holders, pieces, shapes, strict=True):
            arrays[name] = piece.reshape(shape)


def prepared(step: Step, arrays: Arrays, unit: Unit, where: str, ranks: int) -> PreparedBatch:
    """The step's prepared batch, joined from `ranks` ranks; a bad step's InputError names the
    run and the step."""
    batch = PolicyBatch(
        logp=arrays["logp"].reshape(-1),
        logp_old=arrays["logp_old"],
        advantages=arrays["advantages"],
        mask=arrays["mask"],
        seq_id=arrays["seq_id"],
        group_id=arrays.get("group_id"),
        reward=arrays.get("reward"),
        logp_ref=arrays.get("logp_ref"),
        logp_rollout=arrays.get("logp_rollout"),
        loss_weight=arrays.get("loss_weight"),
        loss_scale=arrays.get("loss_scale"),
        micro_batch=arrays.get("micro_batch"),
        group_split=arrays.get("group_split"),
        unit=unit,
        ranks=ranks,
        rank=arrays.get("rank"),
    )
    try:
        return prepare(batch)
    except InputError as exc:
        raise InputError(f"{where}: step {step.step}: {exc}") from None


def step_geometry(step: Step, arrays: Arrays, prep: PreparedBatch, where: str) -> StepGeometry:
    """The step's recorded gradient geometry on the device (kind "coef" without any)."""
    scale = step.scalars.get(SKETCH_SCALE_KEY)
    try:
        return StepGeometry.from_arrays(
            arrays.get(GRAM_KEY), arrays.get(SKETCH_KEY), scale, prep, step.step
        )
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None


def step_micro_batches(
    step: Step, arrays: Arrays, prep: PreparedBatch, where: str, ranks: int
) -> MicroBatches:
    """The step's micro-batches (one without a recorded `micro_batch`), over `ranks` ranks."""
    return micro_batches(
        prep,
        arrays.get("micro_batch"),
        arrays["seq_id"],
        seq_is_raw="group_id" in arrays or "reward" in arrays,
        where=f"{where}: step {step.step}",
        ranks=ranks,
    )


def usable(
    step: Step, arrays: Arrays, unit: Unit, where: str, ranks: int
) -> tuple[PreparedBatch, StepGeometry, MicroBatches]:
    """The step's prepared batch, geometry and micro-batches: every check of its data a replay
    makes before it evaluates a policy (InputError naming the run and step: module
    docstring)."""
    prep = prepared(step, arrays, unit, where, ranks)
    geometry = step_geometry(step, arrays, prep, where)
    return prep, geometry, step_micro_batches(step, arrays, prep, where, ranks)


def replay_rejection(run: Run, step: Step) -> tuple[tuple[int, str] | None, Arrays]:
    """Whether a replay would reject `step`, a step of `run` with a policy batch, read and
    checked on the CPU as the streaming pass does (`read_arrays`, `usable`): (step, reason)
    (`rejection`) or None, and the arrays read (empty when they could not be)."""
    where = run.location
    try:
        arrays = read_arrays(step, where, per_rank=run_per_rank(run))
    except InputError as exc:
        return rejection(step.step, exc, where), {}
    try:
        usable(step, arrays, run_unit(run), where, run_ranks(run))
    except InputError as exc:
        return rejection(step.step, exc, where), arrays
    return None, arrays


def run_per_rank(run: Run) -> bool:
    """Whether the run's ranks normalised their losses each over their own part (the
    manifest's `loss_norm`)."""
    return run.loss_norm == "per_rank"


def run_unit(run: Run) -> Unit:
    """What the run's entries score (the reader has validated the manifest's unit)."""
    return "sequence" if run.unit == "sequence" else "token"


def array_bytes(arrays: Arrays) -> int:
    """Bytes held by a step's arrays."""
    return sum(a.numel() * a.element_size() for a in arrays.values())


def host_token_counts(arrays: Arrays, unit: Unit) -> np.ndarray | None:
    """[U] each unit's recorded token count in a sequence run, on the host
    (`unit_token_counts` of the step's seq_id and token_count); None for a token run or a
    step without counts."""
    counts = arrays.get("token_count")
    return unit_token_counts(
        unit, host_array(arrays["seq_id"]), None if counts is None else host_array(counts)
    )


def host_measures(step: Step, arrays: Arrays, unit: Unit) -> Measures:
    """The step's collapse-warning measurement (steps with inner_step 0 or none recorded),
    noise-floor moments (inner_step 0) and whether it has a nonzero advantage, from its arrays
    on the host."""
    likelihood, floor = OwnLikelihood(), NoiseFloor()
    mask = host_array(arrays["mask"])
    likelihood.note_advantages(step.step, host_array(arrays["advantages"]), mask)
    inner = step.scalars.get("inner_step")
    if OwnLikelihood.wanted(inner):
        logp_old = host_array(arrays["logp_old"])
        likelihood.add(step.step, inner, logp_old, mask, host_token_counts(arrays, unit))
        if inner == NOISE_FLOOR_INNER_STEP:
            floor.add(*logratio_moments(host_array(arrays["logp"]), logp_old, mask))
    return likelihood, floor
