"""Spec text: `NAME` or `NAME:key=value,key=value`, values typed from the config annotations."""

from __future__ import annotations

import math
import types
import typing
from typing import Any, Literal

from stabledrl_cli.errors import UsageError

SPEC_SYNTAX = "NAME or NAME:key=value,key=value"


def split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """'ppo:eps_low=0.1' -> ('ppo', {'eps_low': '0.1'}); raw values, not yet typed."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"empty policy spec; expected {SPEC_SYNTAX}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    raw: dict[str, str] = {}
    if rest.strip():
        for part in rest.split(","):
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key or not value:
                raise UsageError(
                    f"bad policy spec {spec!r}: {part.strip()!r} is not key=value; "
                    f"expected {SPEC_SYNTAX}"
                )
            if key in raw:
                raise UsageError(f"bad policy spec {spec!r}: key {key!r} given twice")
            raw[key] = value
    elif rest == "" and spec.strip().endswith(":"):
        raise UsageError(f"bad policy spec {spec!r}: nothing after ':'; expected {SPEC_SYNTAX}")
    return name, raw


def _base_type(hint: Any) -> Any:
    """float | None -> float; Literal stays as is."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint


def convert_value(key: str, text: str, hint: Any) -> Any:
    """Types one spec value; a wrong type raises UsageError naming what was expected."""
    kind = _base_type(hint)
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if text not in choices:
            raise UsageError(f"{key} must be one of {', '.join(choices)}; got {text!r}")
        return text
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            raise UsageError(f"{key} expects a number, got {text!r}") from None
        if not math.isfinite(value):
            raise UsageError(f"{key} expects a finite number, got {text!r}")
        return value
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise UsageError(f"{key} expects an integer, got {text!r}") from None
    return text
