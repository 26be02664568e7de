"""`prepare`: one step's `PolicyBatch` flattened, moved and indexed once into the
`PreparedBatch` every policy consumes.

`prepare` runs once per step; a replay then evaluates every policy on the same prepared batch,
so the ratio, the per-sequence means and the recomputed advantages are computed once.
"""

from __future__ import annotations

import numpy as np
import torch

from stabledrl_cli._batch_inputs import WORLD_SIZE_LIMIT, rows_of_entries, stack_tensors
from stabledrl_cli.errors import InputError, UsageError, one_line
from stabledrl_cli.policies._masked import nonzero
from stabledrl_cli.policies._policy_batch import ArrayLike, PolicyBatch
from stabledrl_cli.policies._prepared_batch import PreparedBatch
from stabledrl_cli.spec import whole_number
from stabledrl_cli.vocab import UNITS


def _as_tensor(value: ArrayLike, name: str, device: torch.device | None) -> torch.Tensor:
    """`value` as a tensor on `device` (None: where it is); InputError naming `name` for what
    holds no real numbers (text, objects, a ragged list, complex values, whose imaginary part
    would be dropped), no data (a tensor on the meta device) or is not dense (sparse). A list
    of tensors is the tensor they stack into (`stack_tensors`)."""
    try:
        stacked = stack_tensors(value)
    except (RuntimeError, TypeError, ValueError) as exc:  # shapes or devices that differ
        raise InputError(f"{name}: cannot be read as an array ({one_line(exc)})") from None
    if stacked is not None:
        tensor = stacked
    elif isinstance(value, torch.Tensor):
        tensor = value.detach()
    elif isinstance(value, np.ndarray) or np.isscalar(value) or isinstance(value, (list, tuple)):
        try:
            array = np.asarray(value)
        except (RuntimeError, TypeError, ValueError) as exc:  # ragged; tensors numpy refuses
            raise InputError(f"{name}: cannot be read as an array ({one_line(exc)})") from None
        if array.dtype.kind not in "biuf":
            raise InputError(f"{name}: expected real numbers, got dtype {array.dtype}")
        tensor = torch.as_tensor(array)
    else:
        raise InputError(f"{name}: expected a torch tensor or numpy array, got {type(value)!r}")
    if tensor.is_complex():
        raise InputError(f"{name}: expected real numbers, got dtype {tensor.dtype}")
    if tensor.is_meta:
        raise InputError(f"{name}: a tensor on the meta device holds no data")
    if tensor.layout != torch.strided:
        raise InputError(f"{name}: a {tensor.layout} tensor; pass a dense one (.to_dense())")
    return tensor if device is None else tensor.to(device)


def _compute_dtype(logp: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    if logp.is_floating_point():
        # At least float32: half-precision ratios overflow at log r ~ 11.
        return torch.promote_types(logp.dtype, torch.float32)
    return torch.float32


def _split_count(group_split: ArrayLike | None, n_seq: int, device: torch.device) -> int:
    """How many sequences are marked in `group_split` ([N]); 0 without it."""
    if group_split is None:
        return 0
    flags = _as_tensor(group_split, "group_split", device).reshape(-1)
    if flags.numel() != n_seq:
        raise InputError(f"group_split has {flags.numel()} entries, expected {n_seq}")
    return int((flags != 0).sum())


def _flat_like(
    value: ArrayLike | None,
    name: str,
    shape: torch.Size,
    device: torch.device,
    dtype: torch.dtype,
    *,
    one_number: bool = False,
) -> torch.Tensor | None:
    """`value` as a [T] tensor of `dtype` on `device`, given in `shape` (or as its T values);
    `one_number`: a 0-d value is every entry's (loss_scale, the step's one normaliser)."""
    if value is None:
        return None
    tensor = _as_tensor(value, name, device)
    if one_number and tensor.ndim == 0:
        tensor = tensor.expand(shape)
    if tuple(tensor.shape) != tuple(shape) and tensor.numel() == int(np.prod(shape)):
        tensor = tensor.reshape(shape)
    if tuple(tensor.shape) != tuple(shape):
        raise InputError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    return tensor.to(dtype).reshape(-1)


def _dense_index(ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    uniques, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    return inverse.to(torch.int64), int(uniques.numel())


def prepare(
    batch: PolicyBatch, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> PreparedBatch:
    """Flatten, move and index one step's arrays once, for every policy.

    device: default the device of `logp` (cpu for numpy). dtype: default the floating dtype of
    `logp`, promoted to at least float32. Raises InputError on inconsistent shapes or ids, and
    on an array of no real numbers (text, complex), of no data (the meta device) or not dense;
    UsageError on an unknown unit, or a `batch` that is no PolicyBatch.
    """
    if isinstance(batch, PreparedBatch):
        return batch
    if not isinstance(batch, PolicyBatch):
        raise UsageError(f"a batch is a PolicyBatch, not {type(batch).__name__}")
    if batch.unit not in UNITS:
        raise UsageError(f"unknown unit {batch.unit!r}; valid: {', '.join(UNITS)}")
    ranks = whole_number(batch.ranks)  # a numpy or 0-d torch integer: the int it holds
    if ranks is None or not 1 <= ranks <= WORLD_SIZE_LIMIT:
        raise UsageError(
            f"ranks must be an integer in [1, {WORLD_SIZE_LIMIT}], got {batch.ranks!r}"
        )
    target = torch.device(device) if device is not None else None
    logp_raw = _as_tensor(batch.logp, "logp", target)
    if logp_raw.ndim not in (1, 2):
        raise InputError(f"logp must be [T] or [B, L], got shape {tuple(logp_raw.shape)}")
    dev = logp_raw.device
    ctype = _compute_dtype(logp_raw, dtype)
    shape = logp_raw.shape
    if batch.unit == "sequence" and len(shape) == 2 and shape[1] != 1 and batch.seq_id is None:
        raise InputError(rows_of_entries(tuple(shape)))
    num_tokens = int(logp_raw.numel())
    logp = logp_raw.to(ctype).reshape(-1)
    logp_old = _flat_like(batch.logp_old, "logp_old", shape, dev, ctype)
    if logp_old is None:
        raise InputError("logp_old is required (the same shape as logp)")

    adv = _as_tensor(batch.advantages, "advantages", dev).to(ctype)
    if len(shape) == 2 and tuple(adv.shape) in ((shape[0],), (shape[0], 1)):
        adv = adv.reshape(shape[0], 1).expand(shape)
    elif adv.ndim == 0:
        adv = adv.expand(shape)
    if tuple(adv.shape) != tuple(shape) and adv.numel() == num_tokens:
        adv = adv.reshape(shape)
    if tuple(adv.shape) != tuple(shape):
        raise InputError(
            f"advantages has shape {tuple(adv.shape)}; expected {tuple(shape)}"
            + (f", ({shape[0]},) or ({shape[0]}, 1)" if len(shape) == 2 else "")
        )
    adv = adv.reshape(-1)

    if batch.mask is None:
        mask = torch.ones(num_tokens, dtype=torch.bool, device=dev)
    else:
        mask_t = _as_tensor(batch.mask, "mask", dev)
        if mask_t.numel() != num_tokens:
            raise InputError(f"mask has shape {tuple(mask_t.shape)}, expected {tuple(shape)}")
        mask = nonzero(mask_t.reshape(-1))

    group_raw = None if batch.group_id is None else _as_tensor(batch.group_id, "group_id", dev)
    reward = None if batch.reward is None else _as_tensor(batch.reward, "reward", dev).to(ctype)
    micro_raw = (
        None if batch.micro_batch is None else _as_tensor(batch.micro_batch, "micro_batch", dev)
    )
    rank_raw = None if batch.rank is None else _as_tensor(batch.rank, "rank", dev)
    per_seq = {
        name: arr
        for name, arr in (
            ("group_id", group_raw),
            ("reward", reward),
            ("micro_batch", micro_raw),
            ("rank", rank_raw),
        )
        if arr is not None
    }
    for name, arr in per_seq.items():
        if arr.ndim != 1:
            raise InputError(f"{name} must be [N] (one per sequence), got {tuple(arr.shape)}")
    lengths = {name: int(arr.shape[0]) for name, arr in per_seq.items()}
    if len(set(lengths.values())) > 1:
        raise InputError(
            "per-sequence arrays disagree in length: "
            + ", ".join(f"{name} has {n} entries" for name, n in lengths.items())
        )
    per_seq_len = next(iter(lengths.values()), None)

    if batch.seq_id is not None:
        seq_raw = _as_tensor(batch.seq_id, "seq_id", dev)
        if seq_raw.numel() != num_tokens:
            raise InputError(f"seq_id has {seq_raw.numel()} entries, expected {num_tokens}")
        seq_raw = seq_raw.reshape(-1).to(torch.int64)
    elif len(shape) == 2:
        seq_raw = torch.arange(shape[0], device=dev).repeat_interleave(shape[1])
    else:
        seq_raw = torch.arange(num_tokens, device=dev)
    if batch.unit == "sequence":
        repeats = num_tokens - int(torch.unique(seq_raw).numel())
        if repeats:
            raise InputError(
                f"seq_id: unit 'sequence' records one entry per sequence, but {repeats} of "
                f"its {num_tokens} entries repeat another's id (token-level data?)"
            )

    if per_seq_len is not None and num_tokens:
        lowest, highest = (int(bound) for bound in torch.aminmax(seq_raw))
        if lowest < 0 or highest >= per_seq_len:
            raise InputError(
                f"seq_id must index the {per_seq_len} per-sequence entries of "
                f"{'/'.join(lengths)}; got ids in [{lowest}, {highest}]"
            )
    if per_seq_len is not None:
        seq, n_seq = seq_raw, per_seq_len
    elif batch.seq_id is None:
        seq, n_seq = seq_raw, (shape[0] if len(shape) == 2 else num_tokens)
    else:
        seq, n_seq = _dense_index(seq_raw)

    if group_raw is not None:
        seq_group, n_groups = _dense_index(group_raw)
    else:
        seq_group, n_groups = torch.zeros(n_seq, dtype=torch.int64, device=dev), 1
    seq_rank = None if rank_raw is None else _rank_index(rank_raw, ranks)
    micro = micro_raw
    if seq_rank is not None and micro_raw is None:  # each rank's part is a micro-batch
        micro = seq_rank
    elif seq_rank is not None and micro_raw is not None:  # (rank, micro_batch) pairs
        local, width = _dense_index(micro_raw)
        micro = seq_rank * width + local

    return PreparedBatch(
        logp=logp,
        logp_old=logp_old,
        advantages_recorded=adv,
        mask=mask,
        seq=seq,
        seq_group=seq_group,
        n_seq=n_seq,
        n_groups_total=n_groups,
        logp_ref=_flat_like(batch.logp_ref, "logp_ref", shape, dev, ctype),
        logp_rollout=_flat_like(batch.logp_rollout, "logp_rollout", shape, dev, ctype),
        reward=reward,
        loss_weight=_flat_like(batch.loss_weight, "loss_weight", shape, dev, ctype),
        loss_scale=_flat_like(batch.loss_scale, "loss_scale", shape, dev, ctype, one_number=True),
        micro_batch=None if micro is None else _dense_index(micro)[0],
        split_sequences=_split_count(batch.group_split, n_seq, dev),
        has_group_id=group_raw is not None,
        unit=batch.unit,
        ranks=ranks,
        seq_rank=seq_rank,
    )


def _rank_index(rank: torch.Tensor, ranks: int) -> torch.Tensor:
    """`PolicyBatch.rank` as int64, InputError unless whole numbers in [0, ranks)."""
    if rank.is_floating_point() and not torch.equal(rank, rank.trunc()):
        raise InputError("rank must hold whole numbers, the rank of each sequence")
    index = rank.to(torch.int64)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= ranks):
        raise InputError(
            f"rank must lie in [0, {ranks}) (ranks={ranks}); got ranks in "
            f"[{int(index.min())}, {int(index.max())}]"
        )
    return index
