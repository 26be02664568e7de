"""The `Recorder`'s arguments checked, and the manifest of the run they describe
(`new_manifest`)."""

from __future__ import annotations

import datetime as _dt
import difflib
import functools
import inspect
import math
import numbers
import os
import reprlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any, ParamSpec, TypeVar

from stabledrl_cli._version import __version__
from stabledrl_cli.dump._arguments import json_checked
from stabledrl_cli.dump._policy import PolicyLike, policy_entry
from stabledrl_cli.dump._schema import FIELDS
from stabledrl_cli.dump._versions import RUN_KIND, written_version
from stabledrl_cli.errors import UsageError, quoted, type_name
from stabledrl_cli.spec import SpecValue, reads_as_zero, spec_float, whole_number
from stabledrl_cli.vocab import GroupIds, LossNorm, Unit


def fixed_time() -> float | None:
    """SOURCE_DATE_EPOCH when set (the reproducible-builds convention): the time a recording
    then gives every wall clock reading, so that it can be reproduced byte for byte; UsageError
    naming it for a value that is no time (text, NaN, past the clock's range)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if not epoch:
        return None
    try:
        seconds = float(epoch)
        _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc)
    except (ValueError, OverflowError, OSError):
        raise UsageError(
            f"SOURCE_DATE_EPOCH must be a time in seconds since 1970-01-01 UTC, got {quoted(epoch)}"
        ) from None
    return seconds


def checked_reward_range(value: object, name: str = "reward_range") -> tuple[float, float]:
    """(low, high), two finite numbers (or their text) with low < high, else UsageError
    naming `name`; given as an ordered pair (`_pair`), not one text (`"01"`, whose characters
    would read as (0, 1)), a dict (its keys) or a set (no order)."""
    if isinstance(value, (str, bytes)):
        raise UsageError(f"{name} must be (low, high), a pair, not text; got {value!r}")
    pair = _pair(value)
    if pair is None:
        raise UsageError(
            f"{name} must be (low, high), a list, tuple, array or tensor of two numbers; "
            f"got {type_name(value)} {_shown(value)}"
        )
    try:
        low, high = (float(v) for v in pair)
    except (TypeError, ValueError, OverflowError):
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise UsageError(f"{name} must be (low, high), finite, low < high; got {_shown(value)}")
    return low, high


def _pair(value: object) -> list[numbers.Real | Decimal | str] | None:
    """The two entries of `value` when it is an ordered pair (a list, a tuple, a config's
    list, a 1-d numpy array or torch tensor of two), each a real number (a Decimal too, as
    log_step takes it), its 0-d array or tensor, or text; else None (a bool is no number)."""
    shape = getattr(value, "shape", None)
    if shape is not None:
        entries = _plain(value) if tuple(shape) == (2,) else None
    elif isinstance(value, Sequence) and len(value) == 2:
        entries = [_plain(entry) for entry in value]
    else:
        entries = None
    if not isinstance(entries, list) or len(entries) != 2:
        return None
    real = (numbers.Real, Decimal, str)
    pair = [e for e in entries if isinstance(e, real) and not isinstance(e, bool)]
    return pair if len(pair) == 2 else None


def _shown(value: object) -> str:
    """`value` for an error line: its repr shortened (`reprlib`), on one line."""
    return " ".join(reprlib.repr(value).split())


def _plain(value: object) -> object:
    """A numpy array or torch tensor as Python numbers or lists (`tolist`), None when it has
    no data (a meta tensor); any other value as it is."""
    tolist = getattr(value, "tolist", None)
    if tolist is None or not hasattr(value, "shape"):
        return value
    try:
        return tolist()
    except (RuntimeError, TypeError, ValueError):
        return None


def reward_range_text(text: str, name: str) -> tuple[float, float]:
    """A reward range written LOW,HIGH (`name`: where it was given, say --reward-range), each
    number in ASCII notation (`spec_float`: not `1_0` nor other scripts' digits, which float()
    reads) and not one too small for a float (`1e-400` would read as 0), checked as
    `checked_reward_range` checks one; else UsageError saying how to write it."""
    try:
        parts = [(part, spec_float(part.strip())) for part in text.split(",")]
        if any(reads_as_zero(part, value) for part, value in parts):
            raise ValueError("a number too small for a float")
        return checked_reward_range([value for _, value in parts])
    except (ValueError, UsageError):
        raise UsageError(
            f"{name} {quoted(text)}: give LOW,HIGH, two finite numbers with LOW < HIGH "
            "(0,1 for a success rate)"
        ) from None


def whole_count(value: int) -> int:
    """A count given as a numpy or 0-d torch integer as the int it holds; anything else as it
    is, for the Recorder's checks to refuse."""
    number = whole_number(value)
    return value if number is None else number


def param_name_list(value: Iterable[str]) -> list[str]:
    """`param_names` as a list: any ordered iterable of strings (a generator of a model's
    names, a dict's keys), each once; not one string (its characters) nor a set (whose order,
    that of `param_grad_norm`, is not kept); else UsageError."""
    if isinstance(value, (str, bytes, set, frozenset)) or not isinstance(value, Iterable):
        raise UsageError(f"param_names must be a list of strings, got {type(value).__name__}")
    names = list(value)
    seen: set[str] = set()
    for index, name in enumerate(names):
        if not isinstance(name, str):
            raise UsageError(
                f"param_names must be a list of strings; entry {index} is {type(name).__name__}"
            )
        if name in seen:
            raise UsageError(
                f"param_names names {quoted(name)} twice: each name is one entry of param_grad_norm"
            )
        seen.add(name)
    return names


def refuse_unknown_keywords(given: Iterable[object], taken: Sequence[str], what: str) -> None:
    """UsageError naming the first of `given` (in sorted order, as text: a dict's keys may be
    of any type) that is not in `taken` (a
    misspelt keyword: `logpp=`), saying `is not {what}`, with the name it resembles if any,
    else where they are listed (all of them make a line past 80 columns)."""
    unknown = sorted(set(given).difference(taken), key=str)
    if not unknown:
        return
    name = unknown[0]
    close = difflib.get_close_matches(str(name), taken, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"help(Recorder) lists the {len(taken)}"
    raise UsageError(f"{name!r} is not {what} ({hint})")


@functools.cache
def keyword_names(function: Callable[..., object]) -> list[str]:
    """The names of `function`'s keyword-only parameters (log_step's fields and scalars)."""
    parameters = inspect.signature(function).parameters.values()
    return [p.name for p in parameters if p.kind is p.KEYWORD_ONLY]


_P = ParamSpec("_P")
_R = TypeVar("_R")


def keywords_checked(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """`method` refusing a keyword it does not take in `refuse_unknown_keywords`'s line (`is
    not a keyword of METHOD`, with a hint), not Python's TypeError; its signature kept for
    type checkers and `help`."""
    taken = frozenset(inspect.signature(method).parameters)
    what = f"a keyword of {method.__name__}"

    @functools.wraps(method)
    def checked(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if not taken.issuperset(kwargs):
            refuse_unknown_keywords(kwargs, keyword_names(method), what)
        return method(*args, **kwargs)

    return checked


def dict_argument(value: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    """`value` as a dict of its own (None: empty), else UsageError naming `what`."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise UsageError(f"{what} must be a dict, got {type(value).__name__}")
    return dict(value)


def sketch_seed(geometry: object) -> int | None:
    """The Omega seed of a Recorder's `geometry` entry (`sketch.seed`, as
    `GeometryConfig.to_manifest` writes it; a numpy integer as the int the manifest holds),
    None when it gives none: what each sketch of the rank records as `_sketch_seed`."""
    sketch = geometry.get("sketch") if isinstance(geometry, Mapping) else None
    seed = whole_number(sketch.get("seed")) if isinstance(sketch, Mapping) else None
    return seed if seed is not None and 0 <= seed < 1 << 64 else None


def new_manifest(
    *,
    policy: str | PolicyLike | None,
    policy_params: dict[str, SpecValue] | None,
    meta: Mapping[str, Any] | None,
    unit: Unit,
    estimator: Mapping[str, Any] | None,
    reward_range: tuple[float, float] | None,
    world_size: int,
    group_ids: GroupIds,
    loss_norm: LossNorm,
    geometry: Mapping[str, Any] | None,
    param_names: list[str] | None,
    source: dict[str, Any] | None,
    created: float,
) -> dict[str, Any]:
    """The manifest of a new run recorded with these arguments (checked by the Recorder),
    made at `created` (seconds since 1970); UsageError for a bad policy (`policy_entry`), or
    a `meta`, `estimator`, `geometry` or `source` that JSON cannot hold."""
    manifest: dict[str, Any] = {
        "format": RUN_KIND,
        "format_version": written_version(
            group_ids == "global",
            policy is None or source is not None,
            loss_norm=loss_norm,
            world_size=world_size,
        ),
        "tool_version": __version__,
        "created": _dt.datetime.fromtimestamp(created, _dt.timezone.utc).isoformat(),
        "meta": json_checked(dict_argument(meta, "meta"), "meta"),
        "policy": policy_entry(policy, policy_params) if policy is not None else None,
        "unit": unit,
        "estimator": json_checked(dict_argument(estimator, "estimator"), "estimator"),
        "reward_range": list(reward_range) if reward_range is not None else None,
        "world_size": world_size,
        "group_ids": group_ids,
        **({"loss_norm": loss_norm} if loss_norm == "per_rank" else {}),
        "geometry": (
            json_checked(dict_argument(geometry, "geometry"), "geometry")
            if geometry is not None
            else None
        ),
        "param_names": param_names,
        "fields": {name: {"per": s.per, "dtype": s.dtype} for name, s in FIELDS.items()},
    }
    if source is not None:
        manifest["source"] = json_checked(dict(source), "source")
    return manifest
