"""How a replay runs and what it flags: `ReplayConfig` and its calibrated defaults.

Every default of a replay is declared here once; the CLI's options fall back to these
(docs/collapse.md explains the rules they feed).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from stabledrl_cli.errors import ConfigError, quoted, type_name
from stabledrl_cli.replay.guards import DEFAULT_GUARDS, make_guard
from stabledrl_cli.spec import MAX_WINDOW, plain_number, spec_float, spec_int, whole_number
from stabledrl_cli.vocab import Device

DEFAULT_MEMORY_BUDGET = 16 * 2**20
"""Bytes of step arrays held at a time: the chunk being computed and the chunk read ahead of it,
half the budget each (a chunk closes at the step that reaches its half; a step larger than
that is a chunk of its own). Reading steps one at a time is no slower on the CPU; a larger
budget batches the transfers to a GPU."""
DEFAULT_THREADS = 1
"""CPU threads a replay computes on: one by default, so its speed does not depend on the
machine's core count or on what else runs on it (its figures depend on neither: each step is
computed on one thread, whatever the count)."""
MAX_THREADS = 256
"""The most CPU threads any command computes with (torch crashed on 100000, and overflowed past
2**31): more than a machine's cores only adds contention."""
DEFAULT_SPIKE_FACTOR = 10.0
"""A spike is an update norm above 10x the median of the previous finite non-zero steps."""
SPIKE_HISTORY = 20
"""Previous finite steps whose median a spike is measured against."""
SPIKE_MIN_HISTORY = 5
"""Finite steps needed before a step can be judged a spike."""
# Drift defaults, calibrated by benchmarks/calibrate_drift.py on the built-in example (elbo
# and llada estimators, seeds 1-3, never the fixtures' seed 0, 400 steps). The lowest 50-step
# rolling mean of net_push was <= -0.179 for independent-mask grpo (all six runs), >= -0.120
# for stabledrl and >= -0.008 for same-mask grpo. 50 steps separates them with the widest gap
# (10 and 20 separate too, with narrower ones); the threshold is the gap's midpoint.
DEFAULT_WINDOW = 50
"""Steps in the rolling mean of net_push that the drift detector tests."""
DEFAULT_DRIFT_THRESHOLD = -0.15
"""Drift: the rolling mean of net_push is below this."""
DEFAULT_COLLAPSE_WINDOW = 10
"""W of the observed-collapse rule: the rolling mean of the recorded reward over 10 steps. Fixed,
never a function of the run's length, so a trajectory's collapse step does not move when it is
recorded longer (ten steps, so a few noisy rewards cannot make a collapse)."""
UNSCORED_STREAK_MIN = 10
"""Policy-batch steps in a row without a policy-gradient update (no token scored, or no scored
unit with a nonzero advantage) that `observed.unscored_streak` names: fewer are common where a
batch of a sparse reward has no success, or a rollout of a few steps is masked by chance. Fixed
in steps, never a share of the run, so a streak is named as soon as it is that long, and on a
run still being written (docs/collapse.md)."""
COLLAPSE_NOISE_MARGIN = 3.5
"""c of the observed-collapse rule's noise test: a drop counts once it exceeds
c + sqrt(2 ln(n / W)) standard errors of a W-step mean (n: the rewarded steps so far). Chosen
with benchmarks/flat_reward_collapse.py on seeds 0-99 as the smallest half-integer c whose worst
cell reports under 5 % of flat runs as collapsed (c = 3: 7 %; 3.5: 4 %)."""
# Collapse warning defaults, calibrated by the lead on benchmarks/collapse_suite.py (calibration
# seeds 1 and 2; the held-out seeds and the fixtures' seed 0 were not used to choose them).
DEFAULT_WARNING_WINDOW = 3
"""Measurements of the own-sample likelihood the collapse warning takes the median of."""
DEFAULT_WARNING_DROP = 0.5
"""The collapse warning fires when that median falls this many nats below its best so far."""
WARNING_NOISE_MARGIN = 3.0
"""c of the collapse warning's noise test: the fall must also exceed c + 2 sqrt(2 ln(j / 3))
standard errors of a 3-measurement mean (a median of 3 strays about 1.16 times as far, which c
absorbs), on two measurements in a row. Chosen with benchmarks/flat_likelihood_warning.py on
seeds 0-99 as the smallest half-integer c whose worst gaussian cell warns on under 5 % of
flat series (c = 2.5: 9 %; 3: 3 %)."""
DEFAULT_TOP_K = 5
"""Sequences named per flagged step with `detail`."""
CLIP_EPS = 1e-6
"""torch.nn.utils.clip_grad_norm_'s epsilon: scale = max_norm / (norm + 1e-6)."""


def check_workers(workers: int | None, limit: int | None = None) -> None:
    """ConfigError (a UsageError naming `workers`) unless `workers` (an engine's shards
    computed at once) is None or an integer >= 1 (and at most `limit`, when given)."""
    if workers is not None and (
        isinstance(workers, bool)
        or not isinstance(workers, int)
        or workers < 1
        or (limit is not None and workers > limit)
    ):
        bound = ">= 1" if limit is None else f"in [1, {limit}]"
        raise ConfigError("workers", f"must be an integer {bound}, got {workers!r}")


StepRange = tuple[int | None, int | None]
"""(start, stop) meaning start <= step < stop; None: open on that side."""


@dataclass(frozen=True, kw_only=True)
class ReplayConfig:
    """How a replay runs and what it flags."""

    device: Device | str = "auto"
    """auto | cpu | cuda | mps (auto: cuda, then mps, then cpu)."""
    chunk_size: int | None = None
    """At most this many steps read and moved to the device at a time; None: as many as fit
    `memory_budget` (results do not depend on the chunking)."""
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    """Bytes of step arrays held at a time (bounds memory): the chunk computed and the one read
    ahead, half each."""
    threads: int = DEFAULT_THREADS
    """Steps computed side by side, each on one CPU thread (torch's intra-op threads stay at 1
    during the replay): the figures are the same for any count."""
    spike_factor: float = DEFAULT_SPIKE_FACTOR
    """A spike: update_norm above this many times the median of the previous 20 finite non-zero
    steps. The recorded run's grad-norm spikes (`Observed.recorded_spike_steps`) use it too."""
    window: int = DEFAULT_WINDOW
    """Steps in the rolling mean of net_push that the drift detector tests."""
    drift_threshold: float = DEFAULT_DRIFT_THRESHOLD
    """Drift: the rolling mean of net_push is below this (REINFORCE sits at 0)."""
    max_grad_norm: float | None = None
    """clip_grad_norm_ bound for `clip_scale`; None: no clipping (clip_scale 1)."""
    collapse_window: int = DEFAULT_COLLAPSE_WINDOW
    """W of the observed-collapse rule on the recorded reward (docs/collapse.md)."""
    warning_window: int = DEFAULT_WARNING_WINDOW
    """Collapse warning: measurements in the mean of the own-sample likelihood."""
    warning_drop: float = DEFAULT_WARNING_DROP
    """Collapse warning: the drop (nats) of that mean below its best so far that warns."""
    step_range: StepRange = (None, None)
    """Per-step rows reported for start <= step < stop (the replay itself covers the run)."""
    detail: bool = False
    """Name the top sequences of each flagged step in the reported range."""
    lean: bool = False
    """Leave out the per-step columns a ranking does not read, as `tune` does: the frameworks'
    clip metrics, weight_max, ess_frac and cosine_to_own are NaN, the clipped and per-sign
    discarded counts 0; and evaluate a step's policies in groups (`stream._step_row`): every
    other column is unchanged, but for the last float32 bits of the norms with a sketch."""
    guards: tuple[str, ...] = DEFAULT_GUARDS
    """Adaptive grad-norm guards replayed over the recorded grad norms (replay/guards.py)."""
    top_k: int = DEFAULT_TOP_K
    """Sequences named per flagged step."""

    def __post_init__(self) -> None:
        checks = (
            (
                "device",
                "must be a device name such as 'cpu' or 'cuda:1', not "
                + type(self.device).__name__,
                _device(self.device),
            ),
            ("detail", _NOT_A_BOOL + type_name(self.detail), isinstance(self.detail, bool)),
            ("lean", _NOT_A_BOOL + type_name(self.lean), isinstance(self.lean, bool)),
            (
                "guards",
                "must be a tuple of guard specs (strings), not " + _type_names(self.guards),
                isinstance(self.guards, tuple | list)
                and all(isinstance(spec, str) for spec in self.guards),
            ),
            (
                "chunk_size",
                "must be an integer >= 1",
                self.chunk_size is None or _positive_int(self.chunk_size),
            ),
            ("memory_budget", "must be an integer >= 1", _positive_int(self.memory_budget)),
            (
                "threads",
                f"must be an integer in [1, {MAX_THREADS}]",
                _positive_int(self.threads) and self.threads <= MAX_THREADS,
            ),
            (
                "spike_factor",
                "must be a finite number > 1",
                _finite(self.spike_factor) and self.spike_factor > 1,
            ),
            ("window", _WINDOW_RANGE, _window(self.window)),
            ("drift_threshold", "must be finite", _finite(self.drift_threshold)),
            ("collapse_window", _WINDOW_RANGE, _window(self.collapse_window)),
            ("warning_window", _WINDOW_RANGE, _window(self.warning_window)),
            (
                "warning_drop",
                "must be a finite number > 0",
                _finite(self.warning_drop) and self.warning_drop > 0,
            ),
            (
                "max_grad_norm",
                "must be a finite number > 0",
                self.max_grad_norm is None
                or (_finite(self.max_grad_norm) and self.max_grad_norm > 0),
            ),
            ("top_k", "must be an integer >= 1", _positive_int(self.top_k)),
        )
        for field, problem, ok in checks:
            if not ok:
                raise ConfigError(field, problem + _wrong_type(field, getattr(self, field)))
        for spec in self.guards:
            make_guard(spec)  # a bad guard spec is a usage error naming it
        step_range = _step_range(self.step_range)
        if step_range is None:
            raise ConfigError(
                "step_range",
                f"must be (start, stop), each an integer or None, got {self.step_range!r}",
            )
        object.__setattr__(self, "step_range", step_range)
        start, stop = step_range
        if any(bound is not None and bound < 0 for bound in (start, stop)):
            raise ConfigError(
                "step_range",
                f"{format_step_range(self.step_range)} has a negative bound: steps are "
                "numbered from 0, not counted back from the last",
            )
        if start is not None and stop is not None and stop <= start:
            raise ConfigError(
                "step_range",
                f"{format_step_range(self.step_range)} is empty (start <= step < stop)",
            )


def _step_range(value: object) -> StepRange | None:
    """`value` as a (start, stop) pair of ints or None (a numpy or 0-d torch integer is the
    int it holds), else None."""
    if not (isinstance(value, tuple | list) and len(value) == 2):
        return None
    start, stop = (None if bound is None else whole_number(bound) for bound in value)
    if (start is None) != (value[0] is None) or (stop is None) != (value[1] is None):
        return None
    return start, stop


def replay_config(
    *,
    device: Device | str = "auto",
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    threads: int | None = None,
    spike_factor: float | None = None,
    window: int | None = None,
    drift_threshold: float | None = None,
    max_grad_norm: float | None = None,
    collapse_window: int | None = None,
    warning_window: int | None = None,
    warning_drop: float | None = None,
    step_range: StepRange = (None, None),
    detail: bool = False,
    guards: tuple[str, ...] | None = None,
) -> ReplayConfig:
    """A `ReplayConfig` in which None stands for the default of that setting, and a numpy
    number or bool (a sweep's setting read from an array) for the Python value it holds."""
    return ReplayConfig(
        device=device,
        chunk_size=plain_number(chunk_size),
        memory_budget=_or_default(memory_budget, DEFAULT_MEMORY_BUDGET),
        threads=_or_default(threads, DEFAULT_THREADS),
        spike_factor=_or_default(spike_factor, DEFAULT_SPIKE_FACTOR),
        window=_or_default(window, DEFAULT_WINDOW),
        drift_threshold=_or_default(drift_threshold, DEFAULT_DRIFT_THRESHOLD),
        max_grad_norm=plain_number(max_grad_norm),
        collapse_window=_or_default(collapse_window, DEFAULT_COLLAPSE_WINDOW),
        warning_window=_or_default(warning_window, DEFAULT_WARNING_WINDOW),
        warning_drop=_or_default(warning_drop, DEFAULT_WARNING_DROP),
        step_range=step_range,
        detail=plain_number(detail),
        guards=DEFAULT_GUARDS if guards is None else guards,
    )


def guard_specs(guards: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """A replay's guards (`replay(guards=)`, `--guard`) as `ReplayConfig` takes them: None for
    the default guards, a lone spec for one guard, "none" for no guard. ConfigError for
    anything but specs, and for "none" beside a guard, which would silently overrule it."""
    if guards is None:
        return None
    specs = [guards] if isinstance(guards, str) else guards
    if not (isinstance(specs, list | tuple) and all(isinstance(spec, str) for spec in specs)):
        raise ConfigError(
            "guards", f"must be a guard spec or a list of them, not {type(guards).__name__}"
        )
    others = tuple(spec for spec in specs if spec != "none")
    if others and len(others) < len(specs):
        raise ConfigError(
            "guard",
            f"none (no guard) contradicts {', '.join(map(repr, others))}: give one or the other",
        )
    return others


_NOT_A_BOOL = "must be True or False, not "

_Setting = TypeVar("_Setting")


def _or_default(value: _Setting | None, default: _Setting) -> _Setting:
    """`value` as `spec.plain_number` gives it, or `default` for None."""
    return default if value is None else plain_number(value)


def _device(value: object) -> bool:
    """Whether `value` is a device name or a torch.device (torch is loaded if one exists)."""
    torch = sys.modules.get("torch")
    return isinstance(value, str) or (torch is not None and isinstance(value, torch.device))


_INTEGER_SETTINGS = frozenset(
    {
        "chunk_size",
        "memory_budget",
        "threads",
        "window",
        "collapse_window",
        "warning_window",
        "top_k",
    }
)
_NUMBER_SETTINGS = frozenset({"spike_factor", "drift_threshold", "warning_drop", "max_grad_norm"})


def _wrong_type(field: str, value: object) -> str:
    """', not TYPE' when a numeric setting is refused for its type rather than its size
    (threads=2.0, memory_budget=b"16M"); '' otherwise (the other settings name the type in
    their own words)."""
    if field in _INTEGER_SETTINGS:
        fits = type(value) is int
    elif field in _NUMBER_SETTINGS:
        fits = type(value) in (int, float)
    else:
        return ""
    return "" if fits else f", not {type_name(value)}"


def _type_names(value: object) -> str:
    """`value`'s type, and its items' when it is a tuple or list ("list of int")."""
    if isinstance(value, tuple | list):
        items = sorted({type(item).__name__ for item in value if not isinstance(item, str)})
        return f"{type(value).__name__} of {', '.join(items)}"
    return type(value).__name__


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


_WINDOW_RANGE = f"must be an integer in [1, {MAX_WINDOW:.0e}]"


def _window(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WINDOW


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_step_range(text: str | None) -> StepRange:
    """'A:B' -> (A, B) meaning A <= step < B; either side may be empty ('100:', ':50'); 'A'
    alone is the one step A; ':' every step. None (not given) -> (None, None). An empty text
    is refused: `--steps "$RANGE"` with $RANGE unset is no range, and asked for every step's
    row."""
    if text is None:
        return None, None
    if text.strip() == "":
        raise ConfigError("step_range", "is empty; give A:B (A <= step < B), or : for every step")
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            value = spec_int(start.strip())
            return value, value + 1
        return (
            spec_int(start.strip()) if start.strip() else None,
            spec_int(stop.strip()) if stop.strip() else None,
        )
    except ValueError:
        raise ConfigError(
            "step_range", f"expects A:B (A <= step < B), got {quoted(text)}"
        ) from None


def in_range(steps: np.ndarray, step_range: StepRange) -> np.ndarray:
    """[S] bool: start <= step < stop."""
    start, stop = step_range
    keep = np.ones(steps.shape[0], dtype=bool)
    if start is not None:
        keep &= steps >= start
    if stop is not None:
        keep &= steps < stop
    return keep


def format_step_range(step_range: StepRange) -> str:
    """(A, B) -> 'A:B', an open side left empty."""
    start, stop = step_range
    return f"{'' if start is None else start}:{'' if stop is None else stop}"


SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
"""Suffixes of a byte size (binary multiples; a trailing B or iB is allowed)."""


def parse_size(text: str, field: str = "memory_budget") -> int:
    """'256M' -> 268435456: bytes, with an optional K, M, G or T suffix (powers of 1024;
    'MB' and 'MiB' mean the same). ConfigError naming `field` on anything else."""
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = cleaned, ""
    if cleaned and cleaned[-1] in SIZE_UNITS:
        number, unit = cleaned[:-1], cleaned[-1]
    try:
        value = spec_float(number.strip())
    except ValueError:
        value = math.nan
    size = value * SIZE_UNITS[unit]  # inf for 1e308T
    if not (math.isfinite(size) and size >= 1):
        raise ConfigError(field, f"expects a size such as 256M or 1G, got {quoted(text)}")
    return int(size)


def format_size(size: int) -> str:
    """268435456 -> '256M': bytes as `parse_size` reads them, in the largest unit that
    divides them."""
    scale, unit = max((scale, unit) for unit, scale in SIZE_UNITS.items() if size % scale == 0)
    return f"{size // scale}{unit}"
