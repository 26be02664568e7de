"""One optimizer step's arrays as every policy consumes them (`PreparedBatch`): flat tensors
on one device, dense indices, and the quantities the policies share (the ratio, segment sums,
the recomputed advantages), each computed once per step."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar

import numpy as np
import torch

from stabledrl_cli.errors import UsageError
from stabledrl_cli.policies._advantages import recompute_advantages
from stabledrl_cli.policies._masked import (
    above,
    as_bytes,
    below,
    both,
    count,
    finite_sum,
    keep_times,
    nonzero,
)
from stabledrl_cli.vocab import ADV_MODES, AdvMode, Unit

_T = TypeVar("_T")

_EXACT_COUNTS = (torch.float32, torch.float64)
"""Dtypes that hold every count of scored tokens below `_COUNTED_EXACTLY` exactly."""
_COUNTED_EXACTLY = 2**24
"""Tokens a step may hold for its sequences' lengths to be counted as integers: below it a
float32 sum of ones is exact too, so both ways give the same lengths."""


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
                both(mask, nonzero(adv)),
                both(mask, above(adv, 0.0)),
                both(mask, below(adv, 0.0)),
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
