"""The one policy-spec grammar: `NAME` or `NAME:key=value,key=value`.

Ground floor: the run format (which records a spec) and the policy catalogue (which resolves
one) both read and write specs through this module; it knows no policy. The canonical text of
a spec has its keys sorted and each value in its shortest round-tripping form, so the same
policy always reads the same in a manifest, a replay and a baseline.
"""

from __future__ import annotations

import operator
import re
import sys
import textwrap
from collections.abc import Mapping
from typing import SupportsIndex, TypeVar, cast

from stabledrl_cli.errors import UsageError, quoted, quoted_spec

SPEC_SYNTAX = "NAME or NAME:key=value,key=value"
MAX_WINDOW = 10**9
"""The most steps any window may span (a guard's window or warm-up, a replay's or a baseline's
windows): past it a value is a typo, and a C-sized buffer (a deque's maxlen) would overflow."""
SpecValue = str | int | float | bool
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_KEY = re.compile(r"[A-Za-z0-9_]+")
INT_DIGITS = 30
"""The most digits of a spec's integer: a longer one is past every range (a range check compares
it as a float, which overflows past 308 digits), and a range error quotes it whole."""
_INTEGER = re.compile(rf"[+-]?[0-9]{{1,{INT_DIGITS}}}")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
"""Decimal or exponent notation, in one way only: text that is not fails in linear time."""
_NON_FINITE = re.compile(r"[+-]?(?:inf|infinity|nan)", re.IGNORECASE)

_Value = TypeVar("_Value")


def plain_number(value: _Value) -> _Value:
    """A numpy integer, float or bool, or a 0-d numpy array of one, as the Python value it
    holds (np.int64(5) -> 5; np.True_ -> True; a float in the shortest form that reads back as
    its own dtype: np.float32(0.2) -> 0.2, as it was written); anything else as it is (for the
    checks to take or refuse: a setting that takes a number refuses a bool). A sweep's
    setting, or a policy parameter, read from an array. numpy is not imported here: a value
    can be one of its numbers only once it is loaded."""
    np = sys.modules.get("numpy")
    if np is None:
        return value
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, np.bool_):
        return cast(_Value, bool(value))
    if isinstance(value, np.integer):
        return cast(_Value, int(value))
    if isinstance(value, np.floating):
        return cast(_Value, float(str(value)))
    return value


def whole_number(value: object) -> int | None:
    """`value` as the int it is or holds (a numpy or 0-d torch integer), else None (a bool,
    which would be taken for 0 or 1, a float, text, a float tensor or one with no data)."""
    if type(value) is int:
        return value
    if isinstance(value, SupportsIndex) and not isinstance(value, bool):
        try:
            return operator.index(value)
        except (TypeError, RuntimeError):  # a float tensor; a tensor with no data (meta)
            return None
    return None


def spec_int(text: str) -> int:
    """A spec's integer: 1 to `INT_DIGITS` ASCII digits with an optional sign (`12`, `-3`);
    ValueError otherwise, where Python's int() would also take `1_0` or other scripts' digits."""
    if not _INTEGER.fullmatch(text):
        raise ValueError(f"not an integer: {quoted(text)}")
    return int(text)


def spec_float(text: str) -> float:
    """A spec's number: ASCII decimal or exponent notation (`0.2`, `.5`, `-1e-4`), or `inf` or
    `nan` (which the callers refuse as not finite); ValueError otherwise, where Python's
    float() would also take `1_0` or other scripts' digits."""
    if not (_DECIMAL.fullmatch(text) or _NON_FINITE.fullmatch(text)):
        raise ValueError(f"not a number: {quoted(text)}")
    return float(text)


def reads_as_zero(text: str, value: float) -> bool:
    """Whether `value`, `spec_float(text)`, is 0 where `text` names a nonzero number: one too
    small for a float (`1e-400`: float() underflows), which a caller refuses rather than read
    as 0."""
    return value == 0 and any(digit in "123456789" for digit in text.lower().partition("e")[0])


class SpecError(UsageError):
    """A spec the grammar cannot read: the message names the spec, `reason` alone says what
    is wrong with it (for a caller that names the spec its own way)."""

    def __init__(self, spec: str, kind: str, reason: str) -> None:
        super().__init__(f"bad {kind} spec {quoted_spec(spec)}: {reason}")
        self.reason = reason


def split_spec(spec: str, kind: str = "policy") -> tuple[str, dict[str, str]]:
    """'ppo:eps_low=0.1' -> ('ppo', {'eps_low': '0.1'}); raw values, not yet typed. `kind`:
    what the spec names, for the error line (a policy, a guard): UsageError for an empty
    spec, `SpecError` for a bad one."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"empty {kind} spec; expected {SPEC_SYNTAX}")
    name, colon, rest = spec.strip().partition(":")
    name = name.strip()
    if not _NAME.fullmatch(name):
        raise SpecError(spec, kind, f"{quoted(name)} is not a name ({SPEC_SYNTAX})")
    raw: dict[str, str] = {}
    if colon and not rest.strip():
        raise SpecError(spec, kind, f"nothing after ':'; expected {SPEC_SYNTAX}")
    if rest.strip():
        for part in rest.split(","):
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key or not value:
                raise SpecError(
                    spec, kind, f"{quoted(part.strip())} is not key=value; expected {SPEC_SYNTAX}"
                )
            if not _KEY.fullmatch(key):
                raise SpecError(spec, kind, f"{quoted(key)} is not a key name")
            if key in raw:
                raise SpecError(spec, kind, f"key {quoted(key)} given twice")
            raw[key] = value
    return name, raw


class _SpecWrapper(textwrap.TextWrapper):
    """Breaks a line at its spaces and after each colon or comma, as between words: a spec
    after its name's colon and between its `key=value` parts, never inside one."""

    wordsep_simple_re = re.compile(r"(\s+|(?<=[:,])(?=\S))")


def wrap_spec(text: str, width: int, *, whole: bool = False) -> list[str]:
    """`text` (a spec, maybe tagged after it) in lines of at most `width` characters, each
    broken after its name's colon or a comma where it can be (a part longer than `width` is
    broken inside; with `whole`, a line of its own)."""
    wrapper = _SpecWrapper(max(width, 1), break_long_words=not whole, break_on_hyphens=False)
    return wrapper.wrap(text)


def wrap_line(text: str, width: int, *, whole: bool = False) -> list[str]:
    """A line of text that may name specs, wrapped at its spaces to `width`; a word longer
    than that (a long spec) broken as `wrap_spec` breaks it, never inside a key=value."""
    lines = textwrap.wrap(text, max(width, 1), break_long_words=False, break_on_hyphens=False)
    return [part for line in lines for part in wrap_spec(line, width, whole=whole)]


def format_value(value: SpecValue) -> str:
    """Spec text of a parameter value; parsing it back gives the same value (1.0 -> '1')."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value + 0.0)  # -0.0 + 0.0 is 0.0: -0 and 0 are one value, one spec
        return text[:-2] if text.endswith(".0") else text
    return str(value)


def format_spec(name: str, params: Mapping[str, SpecValue | None] | None = None) -> str:
    """The canonical spec text: the name, then `key=value` with keys sorted (None values left
    out). UsageError for a name, key or value that the grammar cannot carry.

    >>> format_spec("grpo", {"eps_low": 0.2})
    'grpo:eps_low=0.2'
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UsageError(f"policy name {name!r} must be a non-empty word such as 'grpo'")
    parts = []
    for key in sorted(params or {}):
        value = (params or {})[key]
        if value is None:
            continue
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise UsageError(f"policy parameter {key!r} must be a word such as 'eps_low'")
        if not isinstance(value, (str, int, float, bool)):
            raise UsageError(
                f"policy parameter {key}={value!r} must be a number, bool or string, "
                f"not {type(value).__name__}"
            )
        text = format_value(value)
        if not text or any(c in text for c in ",:= "):
            raise UsageError(f"policy parameter {key}={quoted(text)} cannot go into a spec string")
        parts.append(f"{key}={text}")
    return name + (":" + ",".join(parts) if parts else "")
