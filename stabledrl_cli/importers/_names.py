"""Which logged metric becomes which scalar of a run (docs/importing.md has the table).

A logged name is looked up after a tracker's `train/` prefix is removed. Known names map to the
run format's standard scalars; each standard scalar lists its sources in order of preference,
and one run takes the first one its log has (the others are kept as extra scalars, so two
meanings never share a name). Names that are not metrics (the step, the epoch, timestamps),
evaluation metrics and a trainer's end-of-training summary are not imported. Everything else
is kept as an extra scalar under its own name, sanitised.
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterable
from dataclasses import dataclass, field
from typing import Literal

from stabledrl_cli.errors import InputError

STANDARD_SOURCES: dict[str, tuple[str, ...]] = {
    # A standard scalar's own name is one of its sources (a custom loop's log, written under
    # the run format's names), the last where a framework's name for it differs.
    # TRL `reward`: mean total reward of the generation batch; verl `critic/score/mean`: mean
    # sequence score; `critic/rewards/mean` is that score minus the in-reward KL penalty when
    # use_kl_in_reward is on (the same number when it is off), hence only a fallback.
    "reward_mean": ("reward", "critic/score/mean", "critic/rewards/mean", "reward_mean"),
    # The whole training loss of the step (TRL `loss`, verl `actor/loss`).
    "loss": ("loss", "actor/loss"),
    # Pre-clip global gradient norm (transformers' clip_grad_norm_ result; verl's engine's).
    "grad_norm": ("grad_norm", "actor/grad_norm"),
    "lr": ("learning_rate", "actor/lr", "lr"),
    "entropy": ("entropy", "actor/entropy"),
    # KL to the reference policy (TRL `kl`; verl's KL loss term `actor/kl_loss`). verl's
    # `actor/ppo_kl` is the KL to the rollout policy: another quantity, kept as an extra.
    "kl": ("kl", "actor/kl_loss"),
    # Tokens whose clipped term won (A > 0 and r > 1 + eps_high, or A < 0 and r < 1 - eps_low):
    # TRL's region, verl's pg_clipfrac (pg_losses2 > pg_losses1 is the same condition).
    "clip_frac": ("clip_ratio/region_mean", "actor/pg_clipfrac", "clip_frac"),
    # TRL's low and high sides. verl's `actor/pg_clipfrac_lower` is the dual-clip bound
    # (A < 0 and r > clip_ratio_c), not the low side: kept as an extra.
    "clip_frac_low": ("clip_ratio/low_mean", "clip_frac_low"),
    "clip_frac_high": ("clip_ratio/high_mean", "clip_frac_high"),
    "step_time": ("step_time", "timing_s/step", "perf/time_per_step"),
}
"""Standard scalar -> the logged names that carry it, most preferred first."""


LOGGED_AFTER_THE_STEP = frozenset({"actor/lr"})
"""Sources whose value at step s belongs to step s + 1: verl's `actor/lr` is the lr its
scheduler set after step s's updates (`lr_scheduler_step()` returns it), the lr of step
s + 1's. A run's `lr` is the one the step's update used (as the integrations record it and
transformers logs `learning_rate`), so step s takes the value logged at step s - 1."""


def standard_source(standard: str, logged: Container[str]) -> str | None:
    """The first of `standard`'s sources (`STANDARD_SOURCES`, in order of preference) that
    `logged` holds; None when it holds none."""
    return next((s for s in STANDARD_SOURCES[standard] if s in logged), None)


TRACKER_PREFIXES = ("train/",)
"""Removed before a name is looked up (what the W&B and TensorBoard callbacks prepend)."""

STEP_KEYS = ("step", "global_step", "train/global_step", "trainer/global_step", "Step", "_step")
"""Columns or keys that may hold the step, most preferred first (W&B's `_step` counts log calls,
so the trainer's own step is preferred)."""

WANDB_STEP = "_step"
"""The step key every row of a W&B history holds (`run.scan_history()`, exported as JSON): a
JSON log whose rows hold it is W&B's, whose strings are text (`StepTable.typed`)."""


def step_key_from(row: Container[str], key: str | None, where: str) -> str:
    """The step key of a log from `row` on, `key` that of the rows before (None: `row` is the
    first): the first of STEP_KEYS `row` holds, else `key`, which only `_step` gives way to. A
    W&B history takes its step metric from the row that first holds it (a TRL run's
    `train/global_step`, in each row from its callback's `define_metric` on: the rows before,
    a script's own, hold `_step` alone); another log's key is its own (a later row's `step`
    may count something else, and the rows after it hold none). InputError naming `where`
    when the first row holds none."""
    if key not in (None, WANDB_STEP):
        return key
    better = STEP_KEYS if key is None else STEP_KEYS[: STEP_KEYS.index(key)]
    found = next((k for k in better if k in row), key)
    if found is None:
        raise InputError(
            f"{where}: no step key (one of {', '.join(STEP_KEYS)}; or pass --step-key)"
        )
    return found


BOOKKEEPING = frozenset({
    *STEP_KEYS, "epoch", "_runtime", "_timestamp", "timestamp", "wall_time",
    "Wall time", "time", "total_flos", "training/global_step", "training/epoch",
})  # fmt: skip
"""Logged names that are not metrics of a step (verl's trainer logs its step and epoch as
`training/global_step` and `training/epoch` among the step's metrics)."""

PROFILING_PREFIX = "profiling/"
"""TRL's `profiling/Time taken: <Class>.<method>`: one call's seconds, logged to W&B (and
MLflow, Trackio) at each call, several a step, none in trainer_state.json: not a step's."""

_ROW_INDEX = re.compile(r"(Unnamed: \d+)?")
"""pandas' row index, which DataFrame.to_csv writes under an empty header (read back by pandas
and written again: `Unnamed: 0`)."""

SUMMARY = frozenset({
    "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss",
})  # fmt: skip
"""transformers' end-of-training summary (one row after the last step)."""

EVAL_PREFIXES = ("eval_", "eval/", "val/", "val-core/", "val-aux/", "test/", "validation/")
"""Evaluation metrics (transformers `eval_*`, trackers' `eval/*`, verl's `val-core/*`)."""

LISTED = 4
"""Names a message lists before `and N more`."""

NAME_LIMIT = 256
"""Longest metric name imported (characters, after sanitising)."""

Skip = Literal["bookkeeping", "eval", "summary", "not a scalar"]
"""Why a logged name is not imported."""

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-/@+:]")


def lookup_name(name: str) -> str:
    """`name` without a tracker prefix (`train/loss` -> `loss`)."""
    for prefix in TRACKER_PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            return name[len(prefix) :]
    return name


def is_profiling(name: str) -> bool:
    """Whether a logged name is one of TRL's profiled calls (`PROFILING_PREFIX`), as logged or
    under a tracker's prefix."""
    return lookup_name(name).startswith(PROFILING_PREFIX)


def skip_reason(name: str) -> Skip | None:
    """Why a logged name is not imported, or None when it is a training metric; looked up as
    `lookup_name` gives it (transformers' TensorBoard and W&B callbacks log the summary as
    `train/train_runtime`, ...)."""
    if is_profiling(name):
        return "bookkeeping"
    name = lookup_name(name)
    if name in BOOKKEEPING or _ROW_INDEX.fullmatch(name):
        return "bookkeeping"
    if name in SUMMARY:
        return "summary"
    if name.startswith(EVAL_PREFIXES):
        return "eval"
    return None


def listed(names: list[str]) -> str:
    """`a, b, c, d and 2 more`: the first LISTED names, for a message."""
    shown = ", ".join(names[:LISTED])
    return shown + (f" and {len(names) - LISTED} more" if len(names) > LISTED else "")


def sanitise(name: str) -> str:
    """A logged name as an extra scalar's name: letters, digits and `_.-/@+:` kept, any other
    character `_`; empty path parts dropped; no leading `_` (reserved by the run format)."""
    parts = [_UNSAFE.sub("_", part.strip()) for part in name.split("/")]
    return "/".join(p for p in parts if p).lstrip("_") or "metric"


@dataclass
class NameMap:
    """Where each logged metric goes: a standard scalar or an extra one."""

    standard: dict[str, str] = field(default_factory=dict)
    """Logged name -> standard scalar."""
    extra: dict[str, str] = field(default_factory=dict)
    """Logged name -> extra scalar name."""

    def target(self, name: str) -> str:
        """The scalar a logged name is written as."""
        return self.standard.get(name) or self.extra[name]


def map_names(names: Iterable[str], reserved: Iterable[str]) -> NameMap:
    """Maps the training metrics of one log (names in first-seen order).

    reserved: names an extra scalar may not take (the run format's standard scalars); an extra
    whose sanitised name is taken gets a suffix `.2`, `.3`, ...
    """
    ordered = list(dict.fromkeys(names))
    by_lookup: dict[str, list[str]] = {}
    for name in ordered:
        by_lookup.setdefault(lookup_name(name), []).append(name)
    mapping = NameMap()
    for standard in STANDARD_SOURCES:
        source = standard_source(standard, by_lookup)
        if source is not None:
            mapping.standard[by_lookup[source][0]] = standard
    taken = set(reserved) | set(STANDARD_SOURCES)
    for name in ordered:
        if name in mapping.standard:
            continue
        base = sanitise(lookup_name(name))[:NAME_LIMIT]
        candidate, n = base, 1
        while candidate in taken:
            n += 1
            candidate = f"{base}.{n}"
        taken.add(candidate)
        mapping.extra[name] = candidate
    return mapping
