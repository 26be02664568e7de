"""One optimizer step's arrays, as given (`PolicyBatch`) and as every policy consumes them
(`PreparedBatch`: flat tensors on one device, dense indices, the ratio and segment sums).

`prepare` runs once per step; a replay then evaluates every policy on the same prepared batch,
so the ratio, the per-sequence means and the recomputed advantages are computed once.

Shapes and defaults of `PolicyBatch`:
- `logp`, `logp_old`: [T] (flat) or [B, L]; `[B, L]` is flattened row-major and every output
  is [T] = [B * L] in that order.
- `advantages`: same shape as `logp`, or [B] or [B, 1] (one per row) with [B, L] `logp`.
- `mask`: same shape as `logp`, nonzero = scored; default all ones. Unscored tokens get
  `coef = 0` whatever their values (padding may hold anything).
- `seq_id`: [T] (or [B, L]) integer sequence of each token. Default: the row index for
  [B, L] input; for flat input each token is its own sequence, which is what runs recorded
  with `unit: sequence` give (one entry per sequence). When `group_id` or `reward` is given,
  seq_id indexes them and must lie in [0, N); otherwise any integers, densified in sorted order.
- `group_id`: [N] per sequence; default: one group.
- `reward`: [N] per sequence (needed by `adv=center|zscore|rloo`).
- `micro_batch`: [N] per sequence, the micro-batch of the optimizer step it was in (any
  integers); default: the step is one micro-batch (`agg=micro-token-mean` and
  `agg=seq-mean-token-sum-norm` normalize per micro-batch).
- `group_split`: [N] per sequence, nonzero where the sequence's prompt group is known to be
  split across optimizer steps or ranks: `adv=center|zscore|rloo` refuses to recompute a
  baseline from such a group's part (it would silently treat one group as two).
- `logp_ref`, `loss_weight`, `loss_scale`: same shape as `logp`; `loss_scale` may also be one
  number (a 0-d tensor, say `completion_length.sum()`), the normaliser of every unit, as
  `Recorder.log_step` takes it.
- `unit`: "token" or "sequence" (what one entry is; see docs/run-format.md). Under "sequence"
  each entry is a whole sequence: a `seq_id` that repeats is refused (InputError).
- `ranks`: how many data-parallel ranks' files the step joins (a run's `world_size`); default
  1. A loss each rank sums over its own micro-batches (`gmpo:mean=micro`) is averaged over
  them, as the ranks' gradient all-reduce averages.
- `rank`: [N] per sequence, the data-parallel rank in [0, ranks) whose part of the step the
  sequence was in, for a step whose ranks each normalised their loss over their own part (a
  run recorded with `loss_norm="per_rank"`); default None: the normalisers count the whole
  step. Given, every `agg` normaliser is counted over each rank's part alone and multiplied by
  `ranks` (each rank's mean, averaged over the ranks as the all-reduce does), and a
  micro-batch is one rank's: a rank's part is one micro-batch without a `micro_batch`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar

import numpy as np
import torch

from stabledrl_cli._batch_inputs import rows_of_entries, stack_tensors
from stabledrl_cli.errors import InputError, UsageError, one_line
from stabledrl_cli.policies._advantages import recompute_advantages
from stabledrl_cli.policies._masked import above, as_bytes, below, count, finite_sum, keep_times
from stabledrl_cli.spec import whole_number
from stabledrl_cli.vocab import ADV_MODES, UNITS, AdvMode, Unit

_T = TypeVar("_T")

ArrayLike = torch.Tensor | np.ndarray[Any, Any] | Sequence[float] | float
"""What a batch field accepts: a torch tensor (any device), a numpy array, a list, a scalar."""


@dataclass(frozen=True, kw_only=True)
class PolicyBatch:
    """One step's arrays: torch tensors (any device) or numpy arrays of real numbers.
    `Policy.weights` (`prepare`) raises InputError naming the field for shapes that disagree,
    ids out of range, and an array of text, objects or complex values, a sparse one, or a
    tensor on the meta device."""

    logp: ArrayLike
    """log pi_theta of each scored unit: [T] or [B, L]."""
    logp_old: ArrayLike
    """log pi_old (the sampler, or its recompute): same shape as logp."""
    advantages: ArrayLike
    """Per token (same shape as logp) or per row ([B] with [B, L] logp)."""
    mask: ArrayLike | None = None
    """Nonzero = scored; default all ones."""
    seq_id: ArrayLike | None = None
    """[T] sequence of each token; default row index ([B, L]) or one sequence a token (flat)."""
    group_id: ArrayLike | None = None
    """[N] group (prompt) of each sequence; default one group."""
    logp_ref: ArrayLike | None = None
    """log pi_ref, for the KL term (beta > 0)."""
    logp_rollout: ArrayLike | None = None
    """log pi of the rollout engine (vLLM, SGLang), for the rollout correction (tis=...)."""
    reward: ArrayLike | None = None
    """[N] reward of each sequence, for adv=center|zscore|rloo."""
    loss_weight: ArrayLike | None = None
    """Per-token multiplier the run applied to each token's term; default 1."""
    loss_scale: ArrayLike | None = None
    """Per-token normalizer the run actually used (agg=recorded), or one number for every
    token."""
    micro_batch: ArrayLike | None = None
    """[N] micro-batch of each sequence within the step; default one micro-batch."""
    group_split: ArrayLike | None = None
    """[N] nonzero where the sequence's group is split across steps or ranks."""
    unit: Unit = "token"
    """What one entry is: "token", or "sequence" for sequence-level likelihood estimators."""
    ranks: int = 1
    """Data-parallel ranks whose micro-batches the step joins (a run's world_size)."""
    rank: ArrayLike | None = None
    """[N] data-parallel rank of each sequence, when each rank normalised its own loss."""


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


def _nonzero(values: torch.Tensor) -> torch.Tensor:
    """[...] bool values != 0 (NaN is nonzero). On the CPU numpy compares (twenty times faster
    than torch's comparison to bool there); elsewhere, and for dtypes numpy lacks, torch."""
    if values.device.type == "cpu":
        try:
            array = values.numpy()
        except (TypeError, RuntimeError):  # bfloat16 and kin; a conjugate view
            return values != 0
        return torch.from_numpy(array != 0)
    return values != 0


def _both(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """[...] bool first & second of two bool tensors, by numpy on the CPU (three times faster
    than torch's there)."""
    if first.device.type == "cpu":
        return torch.from_numpy(np.logical_and(first.numpy(), second.numpy()))
    return first & second


_EXACT_COUNTS = (torch.float32, torch.float64)
"""Dtypes that hold every count of scored tokens below `_COUNTED_EXACTLY` exactly."""
_COUNTED_EXACTLY = 2**24
"""Tokens a step may hold for its sequences' lengths to be counted as integers: below it a
float32 sum of ones is exact too, so both ways give the same lengths."""


def _compute_dtype(logp: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    if logp.is_floating_point():
        # At least float32: half-precision ratios overflow at log r ~ 11.
        return torch.promote_types(logp.dtype, torch.float32)
    return torch.float32


@dataclass(eq=False)
class PreparedBatch:
    """Flat tensors on one device and dtype, dense indices, and shared derived quantities.

    Token arrays are [T]; per-sequence arrays are [N] over dense sequence ids (sequences without
    scored tokens included, flagged by `seq_live`); per-group arrays are [G].
    """

    logp: torch.Tensor
    logp_old: torch.Tensor
    advantages_recorded: torch.Tensor
    mask: torch.Tensor
    """[T] bool, scored tokens."""
    seq: torch.Tensor
    """[T] int64 dense sequence index in [0, n_seq)."""
    seq_group: torch.Tensor
    """[N] int64 dense group index in [0, n_groups_total)."""
    n_seq: int
    n_groups_total: int
    logp_ref: torch.Tensor | None = None
    logp_rollout: torch.Tensor | None = None
    reward: torch.Tensor | None = None
    """[N] per sequence, or None."""
    loss_weight: torch.Tensor | None = None
    loss_scale: torch.Tensor | None = None
    micro_batch: torch.Tensor | None = None
    """[N] int64 dense micro-batch index of each sequence in [0, n_micro), or None."""
    split_sequences: int = 0
    """Sequences whose prompt group is split across steps or ranks (recorded `group_split`)."""
    has_group_id: bool = False
    unit: Unit = "token"
    ranks: int = 1
    """Data-parallel ranks whose micro-batches the step joins (`PolicyBatch.ranks`)."""
    seq_rank: torch.Tensor | None = None
    """[N] int64 rank in [0, ranks) of each sequence (`PolicyBatch.rank`): each rank normalised
    its own part; None: the normalisers count the whole step."""
    _adv_cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _memo: dict[Hashable, Any] = field(default_factory=dict, init=False, repr=False)
    """Per-step shared tensors (`memo`); a `dataclasses.replace` copy starts its own."""

    @property
    def device(self) -> torch.device:
        return self.logp.device

    @property
    def dtype(self) -> torch.dtype:
        return self.logp.dtype

    @property
    def num_tokens(self) -> int:
        return self.logp.shape[0]

    def fields_present(self) -> set[str]:
        names = {"logp_ref", "logp_rollout", "reward", "loss_weight", "loss_scale"}
        present = {name for name in names if getattr(self, name) is not None}
        if self.has_group_id:
            present.add("group_id")
        return present

    # --- shared per-token quantities -------------------------------------------------------
    @cached_property
    def log_ratio(self) -> torch.Tensor:
        """[T] log r = logp - logp_old."""
        return self.logp - self.logp_old

    @cached_property
    def ratio(self) -> torch.Tensor:
        """[T] r = exp(log r), unclamped: an overflow to inf is a finding, not a nuisance."""
        return torch.exp(self.log_ratio)

    def clamped_ratio(self, bound: float) -> torch.Tensor:
        """[T] exp(clamp(log r, -bound, bound)) (verl's overflow guard), once per step and bound."""
        return self.memo(
            ("clamped_ratio", bound), lambda: torch.exp(self.log_ratio.clamp(-bound, bound))
        )

    @cached_property
    def weight(self) -> torch.Tensor:
        """[T] loss_weight, or ones."""
        if self.loss_weight is None:
            return torch.ones_like(self.logp)
        return self.loss_weight

    @cached_property
    def finite_inputs(self) -> torch.Tensor:
        """[T] bool: logp, logp_old and loss_weight are finite (advantages are checked apart)."""
        finite = torch.isfinite(self.logp) & torch.isfinite(self.logp_old)
        if self.loss_weight is not None:
            finite &= torch.isfinite(self.loss_weight)
        return finite

    def memo(self, key: Hashable, build: Callable[[], _T]) -> _T:
        """`build()` once per step and key: what several policies share (a normalizer)."""
        if key not in self._memo:
            self._memo[key] = build()
        value: _T = self._memo[key]
        return value

    def memo_of(self, name: str, tensor: torch.Tensor, build: Callable[[], _T]) -> _T:
        """`build()` once per step for this very tensor (by identity: the memo holds the
        tensor, so its id cannot pass to another while the step lives)."""
        key = (name, id(tensor))
        held = self._memo.get(key)
        if held is None or held[0] is not tensor:
            held = (tensor, build())
            self._memo[key] = held
        value: _T = held[1]
        return value

    def weight_over(self, norm: torch.Tensor) -> torch.Tensor:
        """[T] w_t / norm_t, once per step and normalizer (policies sharing an aggregation
        share its `norm` tensor)."""
        if self.loss_weight is None and norm.shape == self.logp.shape and norm.dtype == self.dtype:
            # 1 / norm_t: the same bits as ones / norm, without the ones
            return self.memo_of("weight_over", norm, lambda: torch.reciprocal(norm))
        return self.memo_of("weight_over", norm, lambda: self.weight / norm)

    def signs(self, adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[T] bool each, once per step and advantages tensor: scored tokens with A != 0
        (eligible), with A > 0 and with A < 0."""
        mask = self.mask
        return self.memo_of(
            "signs",
            adv,
            lambda: (
                _both(mask, _nonzero(adv)),
                _both(mask, above(adv, 0.0)),
                _both(mask, below(adv, 0.0)),
            ),
        )

    def eligible(self, mode: AdvMode = "recorded") -> torch.Tensor:
        """[T] bool: scored with a non-zero advantage under `mode` (cached per mode)."""
        return self.signs(self.advantages(mode))[0]

    def nonfinite_inputs(self, mode: AdvMode = "recorded") -> torch.Tensor | None:
        """[T] bool: scored tokens with a non-finite logp, logp_old, loss_weight or advantage
        under `mode`; None when there is none (known on the CPU: finite sums prove it without
        a pass of isfinite; elsewhere the mask is always returned, so no step syncs)."""
        key = ("nonfinite_inputs", mode)
        if key not in self._memo:
            adv = self.advantages(mode)
            sources = [self.logp, self.logp_old, adv]
            if self.loss_weight is not None:
                sources.append(self.loss_weight)
            cpu = self.device.type == "cpu"
            unsafe: torch.Tensor | None = None
            if not (cpu and all(finite_sum(t) for t in sources)):
                unsafe = self.mask & ~(self.finite_inputs & torch.isfinite(adv))
                if cpu and not bool(unsafe.any()):
                    unsafe = None
            self._memo[key] = unsafe
        held: torch.Tensor | None = self._memo[key]
        return held

    # --- segment sums ------------------------------------------------------------------------
    @cached_property
    def row_length(self) -> int | None:
        """L when the tokens are the N sequences' rows of L entries each, in order (seq is
        0...0 1...1 ...: the [B, L] layout of a padded batch), else None. Segment sums are
        then row sums of an [N, L] view: one vectorized pass instead of a scatter."""
        n, t = self.n_seq, self.num_tokens
        if n == 0 or t % n or t == n:
            return None
        length = t // n
        if self.device.type == "cpu":  # numpy compares in half torch.equal's time
            by_row = self.seq.numpy().reshape(n, length) == np.arange(n)[:, None]
            return length if bool(by_row.all()) else None
        rows = torch.arange(n, device=self.device)[:, None].expand(n, length)
        return length if torch.equal(self.seq.view(n, length), rows) else None

    def seq_sum(self, values: torch.Tensor) -> torch.Tensor:
        """[..., T] -> [..., N]: sum over the scored tokens of each sequence (unscored ones never
        enter), for each row of leading dimensions (several policies' coefficients at once)."""
        masked = keep_times(self.mask, values)
        lead = masked.shape[:-1]
        if self.row_length is not None:
            return masked.view(*lead, self.n_seq, self.row_length).sum(dim=-1)
        out = torch.zeros(*lead, self.n_seq, dtype=values.dtype, device=values.device)
        return out.index_add_(-1, self.seq, masked)

    def per_token(self, per_seq: torch.Tensor) -> torch.Tensor:
        """[N] -> [T]: each token's sequence's value (a broadcast copy of the [N, L] layout on a
        padded batch, several times faster than gathering by `seq`)."""
        if self.row_length is not None:
            return per_seq[:, None].expand(self.n_seq, self.row_length).reshape(-1)
        return per_seq[self.seq]

    def group_sum(self, per_seq: torch.Tensor) -> torch.Tensor:
        """[N] -> [G]: sum over the sequences of each group."""
        out = torch.zeros(self.n_groups_total, dtype=per_seq.dtype, device=per_seq.device)
        return out.index_add_(0, self.seq_group, per_seq)

    @cached_property
    def seq_len(self) -> torch.Tensor:
        """[N] number of scored tokens of each sequence (0 for all-masked ones)."""
        if self.dtype not in _EXACT_COUNTS or self.num_tokens >= _COUNTED_EXACTLY:
            return self.seq_sum(torch.ones_like(self.logp))
        scored = as_bytes(self.mask)
        if self.row_length is not None:
            counted = scored.view(self.n_seq, self.row_length).sum(dim=-1, dtype=torch.int32)
        else:
            counted = torch.zeros(self.n_seq, dtype=torch.int32, device=self.device)
            counted.index_add_(0, self.seq, scored.to(torch.int32))
        return counted.to(self.dtype)

    @cached_property
    def seq_live(self) -> torch.Tensor:
        """[N] bool: the sequence has at least one scored token."""
        return self.seq_len > 0

    @cached_property
    def seq_len_tokens(self) -> torch.Tensor:
        """[T] |y_i| of each token's sequence, clamped to >= 1."""
        return self.per_token(self.seq_len.clamp(min=1.0))

    @cached_property
    def num_live_seqs(self) -> torch.Tensor:
        """0-d N: sequences with at least one scored token, clamped to >= 1."""
        return self.seq_live.sum().to(self.dtype).clamp(min=1.0)

    @cached_property
    def num_rows(self) -> torch.Tensor:
        """0-d: every sequence of the step, scored or not (TRL's rows), clamped to >= 1."""
        return torch.tensor(float(max(self.n_seq, 1)), dtype=self.dtype, device=self.device)

    @cached_property
    def seq_micro(self) -> torch.Tensor:
        """[N] micro-batch index of each sequence (all 0 without a recorded `micro_batch`)."""
        if self.micro_batch is None:
            return torch.zeros(self.n_seq, dtype=torch.int64, device=self.device)
        return self.micro_batch

    @cached_property
    def num_micro(self) -> int:
        """K: micro-batches of the step (distinct `micro_batch` values; 1 without them)."""
        return 1 if self.micro_batch is None else int(self.micro_batch.max()) + 1

    def micro_sum(self, per_seq: torch.Tensor) -> torch.Tensor:
        """[N] -> [K]: sum over the sequences of each micro-batch."""
        out = torch.zeros(self.num_micro, dtype=per_seq.dtype, device=per_seq.device)
        return out.index_add_(0, self.seq_micro, per_seq)

    @cached_property
    def num_scored(self) -> torch.Tensor:
        """0-d Z: scored tokens, clamped to >= 1."""
        return count(self.mask).to(self.dtype).clamp(min=1.0)

    @cached_property
    def group_live_seqs(self) -> torch.Tensor:
        """[G] number of live sequences of each group."""
        return self.group_sum(self.seq_live.to(self.dtype))

    @cached_property
    def group_live(self) -> torch.Tensor:
        """[G] bool: the group has at least one scored token."""
        return self.group_live_seqs > 0

    @cached_property
    def num_live_groups(self) -> torch.Tensor:
        """0-d: groups with at least one scored token, clamped to >= 1."""
        return self.group_live.sum().to(self.dtype).clamp(min=1.0)

    @cached_property
    def seq_mean_log_ratio(self) -> torch.Tensor:
        """[N] mean of log r over each sequence's scored tokens (GSPO's log s_i, StableDRL's
        log w_i); 0 for all-masked sequences (they never reach a coefficient)."""
        return self.seq_sum(self.log_ratio) / self.seq_len.clamp(min=1.0)

    # --- advantages --------------------------------------------------------------------------
    def advantages(self, mode: AdvMode = "recorded") -> torch.Tensor:
        """[T] advantages under `mode` (recorded | center | zscore | rloo), cached per mode."""
        if mode not in self._adv_cache:
            if mode == "recorded":
                self._adv_cache[mode] = self.advantages_recorded
            elif mode in ADV_MODES:
                if self.reward is None:
                    raise UsageError(
                        f"adv={mode} recomputes advantages from per-sequence rewards, "
                        "but this batch has no `reward`"
                    )
                if self.split_sequences:
                    raise UsageError(
                        f"adv={mode} recomputes each prompt group's baseline, but "
                        f"{self.split_sequences} sequences of this step belong to groups split "
                        "across steps or ranks (group_split): their baselines would come from "
                        "part of a group; replay them with adv=recorded"
                    )
                per_seq = recompute_advantages(
                    self.reward, self.seq_group, self.n_groups_total, mode
                )
                self._adv_cache[mode] = self.per_token(per_seq)
            else:
                raise UsageError(f"unknown adv mode {mode!r}; valid: {', '.join(ADV_MODES)}")
        return self._adv_cache[mode]


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
    if ranks is None or ranks < 1:
        raise UsageError(f"ranks must be an integer >= 1, got {batch.ranks!r}")
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
        mask = _nonzero(mask_t.reshape(-1))

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
