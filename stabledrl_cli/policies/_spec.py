"""Typing a spec's raw values (`stabledrl_cli.spec` splits the text) from the config's
annotations: numbers, integers and `Literal` choices."""

from __future__ import annotations

import math
import types
import typing
from typing import Literal

from stabledrl_cli.errors import UsageError, quoted
from stabledrl_cli.spec import INT_DIGITS, reads_as_zero, spec_float, spec_int


def base_type(hint: object) -> object:
    """float | None -> float; Literal stays as is."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint


def finite_number(key: str, text: str) -> float:
    """`text` as a finite float (`spec.spec_float`); UsageError naming `key` otherwise, and for
    a nonzero number that reads as 0 (`1e-400`: float() underflows)."""
    try:
        value = spec_float(text)
    except ValueError:
        raise UsageError(f"{key} expects a number, got {quoted(text)}") from None
    if not math.isfinite(value):
        raise UsageError(f"{key} expects a finite number, got {quoted(text)}")
    if reads_as_zero(text, value):
        raise UsageError(f"{key}: {quoted(text)} is too small for a float: it reads as 0")
    return value


def convert_value(key: str, text: str, hint: object) -> str | int | float:
    """Types one spec value; a wrong type raises UsageError naming what was expected."""
    kind = base_type(hint)
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if text not in choices:
            raise UsageError(f"{key} must be one of {', '.join(choices)}; got {quoted(text)}")
        return text
    if kind is float:
        return finite_number(key, text)
    if kind is int:
        try:
            return spec_int(text)
        except ValueError:
            raise UsageError(
                f"{key} expects an integer of at most {INT_DIGITS} digits, got {quoted(text)}"
            ) from None
    return text
