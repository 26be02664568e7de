"""What the optimizer hooks keep in this process (`optimizer_hooks`, `_clip_records`,
`_pending_clips`): a view of each optimizer that stepped, the clips of gradients no step has
claimed yet, and whether recording is on here (`fail` turns it off)."""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch.optim.optimizer import Optimizer
from torch.utils.hooks import RemovableHandle

from stabledrl_cli.capture import _fsdp1, bootstrap
from stabledrl_cli.capture._ranks import RankStopped
from stabledrl_cli.errors import warn


def root_sum_squares(values: Iterable[float]) -> float:
    return math.sqrt(sum(v * v for v in values))


GradState = tuple["weakref.ref[torch.Tensor]", int]
"""A gradient, weakly held (a gradient freed by zero_grad() is no step's), and its version."""


@dataclass
class Clip:
    """One clip_grad_norm_ or clip_grads_with_norm_ call: its parameters' pre-clip gradient
    norms and its total norm."""

    norms: dict[int, float]
    """id(parameter) -> the L2 norm of its gradient before clipping (plain gradients)."""
    total: torch.Tensor | float | None
    """What it returned (or was given), when that is an L2 norm read without a collective
    (else None)."""
    local: dict[int, list[float]] = field(default_factory=dict)
    """id(sharded parameter) -> the local norms of its parts before clipping (an FSDP1 shard's
    parts, a DTensor's local shard: `_norms.measure`), summed over the ranks at the step."""
    summed: bool = False
    """Its L2 result is summed at the step from its parameters' whole norms: reading the
    DTensor it returned would be a collective of the hooks' own, which a rank that stopped
    recording would not make."""
    shared: bool = False
    """Its total is the total_norm given to clip_grads_with_norm_, which the calls clipping
    each group of one clip share: a step counts each such total once."""
    unreduced: dict[int, torch.Tensor] = field(default_factory=dict)
    """id(parameter) -> a copy of its Partial DTensor gradient before clipping
    (`_norms.unreduced_copies`), reduced whole at the step instead of the clipped one."""
    after: dict[int, GradState] = field(default_factory=dict)
    """id(parameter) -> its gradient as the clip left it (`grad_states`)."""
    nonfinite: set[int] = field(default_factory=set)
    """id() of each parameter whose plain gradient held a NaN or an inf before a clip that
    may have made it finite (clip_grad_value_ clamps an inf to the clip value)."""

    def parameters(self) -> set[int]:
        """id() of each parameter it clipped (that had a gradient)."""
        return {*self.norms, *self.local}

    def beyond(self, clipped: set[int]) -> Clip:
        """This clip without the parameters in `clipped` (another clip's: `_pending_clips`): its L2
        result is then summed from the other parameters' norms, taken before it clipped
        them."""
        return Clip(
            {key: norm for key, norm in self.norms.items() if key not in clipped},
            None,
            {key: norms for key, norms in self.local.items() if key not in clipped},
            summed=True,
            unreduced={key: copy for key, copy in self.unreduced.items() if key not in clipped},
            after=self.after,
            nonfinite=self.nonfinite - clipped,
        )

    def l2(self, whole: dict[int, float]) -> float | None:
        """Its L2 result (`whole`: id(parameter) -> whole gradient norm), or None."""
        if self.total is not None:
            return float(self.total)
        if not self.summed:
            return None
        held = (whole[key] for key in self.local if key in whole)
        return root_sum_squares([*self.norms.values(), *held])


@dataclass
class Stats:
    """One optimizer step's gradient statistics (taken in the pre-hook)."""

    grad_norm: float | None
    """None when no parameter had a gradient (and nothing was clipped)."""
    nonfinite: int
    lrs: list[float | None]
    """Each group's learning rate (None for a group without one)."""
    group_norms: list[float | None]
    """Each group's gradient norm (None for a group with no gradient)."""
    module_norms: list[tuple[str, float]]
    skipped: bool = False
    """A GradScaler found an inf or a NaN: the optimizer's step() skips the update itself
    (`optimizer_hooks`)."""


@dataclass
class OptimizerView:
    """What the hooks keep about one optimizer."""

    index: int
    names: dict[int, str] | None = None
    params: tuple[int, ...] = ()
    """id() of its parameters, group by group, as its latest step found them."""
    ids: frozenset[int] = frozenset()
    shards: dict[int, _fsdp1.Shard] | None = None
    """id(parameter) -> its FSDP1 Shard, for the parameters that are one (None: not looked)."""
    pending: Stats | None = None
    last_end: float | None = None
    steps_taken: int = 0
    """Its `step()` calls that ran (the post-hook's count)."""
    closure_at: int | None = None
    """Where its step()'s arguments hold the closure (`_optimizers._closure_position`)."""
    stepping: bool = False
    """A step() is under way: its pre-hook ran, its post-hook not yet (`_step_watchers._raised`)."""
    closure: bool = False
    """The step under way was given a closure (`optimizer_hooks._measured`)."""
    awaiting: bool = False
    """That closure has not returned yet: the step's statistics are still to take."""


@dataclass
class OtherSteps:
    """Another optimizer's steps since the previous recorded step: how many, and the last's
    statistics. Kept by its index, not with its view: an optimizer dropped before the run's
    next step (a new one made at each step) still has its steps recorded."""

    last: Stats
    steps: int = 0
    skipped: int = 0
    """Of those, the steps a GradScaler skipped or whose step() raised."""


@dataclass
class HookState:
    """The hooks' state in this process."""

    handles: list[RemovableHandle] = field(default_factory=list)
    views: weakref.WeakKeyDictionary[Optimizer, OptimizerView] = field(
        default_factory=weakref.WeakKeyDictionary
    )
    run_optimizer: weakref.ref[Optimizer] | None = None
    under_way: threading.local = field(default_factory=threading.local)
    """In each thread, `step`: the optimizer whose step() is under way there, weakly held
    (`_step_end.nested`)."""
    optimizers_seen: int = 0
    indices: dict[tuple[str, tuple[tuple[torch.Size, ...], ...]], list[int]] = field(
        default_factory=dict
    )
    """An optimizer's class and its parameters' shapes, group by group -> the index of each
    optimizer of them that stepped (`_optimizers._index`)."""
    others: dict[int, OtherSteps] = field(default_factory=dict)
    """Index -> another optimizer's steps that no recorded step holds yet."""
    rooted: tuple[list[weakref.ref[torch.Tensor]], dict[int, str]] | None = None
    """The parameters the root modules last named, and their names
    (`_param_names._root_names`)."""
    next_step: int = 0
    collect_calls: int = 0
    """How many times a new optimizer's first step asked for a garbage collection to look for a
    dropped run optimizer (`_optimizers.collected_run_optimizer`)."""
    clips: list[Clip] = field(default_factory=list)
    clip_wrapper: Callable[..., torch.Tensor] | None = None
    torch_clipping: int = 0
    """Depth of the hooks' own clip wrappers running torch's clip: the clip_grads_with_norm_
    and get_total_norm calls made inside it are that clip's, already recorded."""
    l2_total: bool | None = None
    """Whether the latest get_total_norm call since the last step took an L2 norm (None:
    none)."""
    fsdp_clip_wrapper: Callable[..., torch.Tensor] | None = None
    scaler_wrapper: Callable[..., float | None] | None = None
    on: bool = False


state = HookState()


def uninstall() -> None:
    """Removes the optimizer hooks; the clip_grad_norm_ and GradScaler.step wrappers stay, as
    pass-throughs."""
    state.on = False
    state.under_way = threading.local()
    for handle in state.handles:
        handle.remove()
    state.handles = []
    state.clips.clear()


def fail(exc: BaseException, context: str) -> None:
    """Recording is off here: the hooks go at this rank's next step, after its last collective
    (`_step_stats._leave`); at once when another rank stopped (RankStopped)."""
    if isinstance(exc, RankStopped):  # that rank reported its failure; this one stops
        uninstall()
        warn(f"stabledrl: warning: {context}: {exc}; recording is off here too\n")
        return
    bootstrap.hook_failed(exc, context)
