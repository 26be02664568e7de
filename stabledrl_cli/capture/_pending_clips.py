"""The clips no optimizer step has claimed yet (`optimizer_hooks`): each clip wrapper of
`_clip_records` keeps its Clip here (`keep`) until the next step of its parameters' optimizer
claims it (`take_clips`) and counts its total (`clip_totals`). A gradient's state
(`grad_states`, `unchanged`) tells a clip whose gradients were zeroed or made again since (the
script skipped that step's optimizer.step()) from one a later clip clips again."""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable

import torch

from stabledrl_cli.capture._hook_state import Clip, GradState, OptimizerView, state

PENDING_CLIPS = 8
"""clip_grad_norm_ results kept for an optimizer step to claim (the oldest are dropped)."""


def grad_states(params: Iterable[torch.Tensor]) -> dict[int, GradState]:
    """id(parameter) -> its gradient and that gradient's version counter (`unchanged`)."""
    return {id(p): (weakref.ref(p.grad), p.grad._version) for p in params if p.grad is not None}


def unchanged(then: GradState | None, now: GradState | None) -> bool:
    """Whether a gradient is the one it was, neither zeroed, made again nor changed in place
    since (no gradient then and now: nothing happened to it either)."""
    if then is None or now is None:
        return then is now
    return then[0]() is now[0]() and then[1] == now[1]


def keep(clip: Clip, before: dict[int, GradState], params: Iterable[torch.Tensor]) -> None:
    """Keeps a clip of `params` for the next step of their optimizer to claim (`before`: their
    `grad_states` as it began). A parameter that a clip kept before it clipped
    too counts for one of the two: the earlier, when the gradient is as that clip left it
    (this clip clips it again: a clip_grad_norm_ with max_norm=inf that reads the norm, then
    the real one), else this one (the earlier clip's gradient is gone since, zeroed or made
    again: the script skipped that step's optimizer.step())."""
    clip.after = grad_states(params)
    again: set[int] = set()
    kept: list[Clip] = []
    for pending in state.clips:
        shared = pending.parameters() & clip.parameters()
        same = {key for key in shared if unchanged(pending.after.get(key), before.get(key))}
        again |= same
        if shared - same:
            pending = pending.beyond(shared - same)
        if pending.norms or pending.local:
            kept.append(pending)
    if again:
        clip = clip.beyond(again)
    if clip.norms or clip.local:
        kept.append(clip)
    state.clips[:] = kept[-PENDING_CLIPS:]


def take_clips(view: OptimizerView) -> list[Clip]:
    """The clip_grad_norm_ calls on this optimizer's parameters since its last step, which
    are consumed. A clip of other optimizers' parameters too (an actor and a critic clipped
    together) gives each optimizer its own parameters' part, summed from their norms before
    it: its total is no optimizer's."""
    mine: list[Clip] = []
    kept: list[Clip] = []
    for clip in state.clips:
        params = clip.parameters()
        others = params - view.ids
        if others == params:
            kept.append(clip)
        elif others:
            mine.append(clip.beyond(others))
            kept.append(clip.beyond(params - others))
        else:
            mine.append(clip)
    state.clips[:] = kept
    return mine


def clip_totals(clips: list[Clip], whole: dict[int, float]) -> list[float]:
    """The L2 totals of a step's clips (`whole`: id(parameter) -> whole gradient norm), each
    total that clip_grads_with_norm_ calls shared counted once."""
    totals: list[float] = []
    shared: set[float | None] = set()
    for clip in clips:
        total = clip.l2(whole)
        if total is None:
            continue
        if clip.shared:
            key = None if math.isnan(total) else total
            if key in shared:
                continue
            shared.add(key)
        totals.append(total)
    return totals
