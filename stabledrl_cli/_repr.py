"""A dataclass's repr that stays short on a long run and reads the same in every session: a
list of steps shows its first items and its length, so evaluating `result.observed` or a
policy's `summary` in a notebook prints a few lines whether the run has 100 steps or 100,000;
a set shows its items sorted (a step's `fields`), not in the session's hash order."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

SHOWN_ITEMS = 8
"""Items of a list shown before its length."""


def compact_repr(obj: Any) -> str:
    """`obj`'s dataclass repr, each list longer than SHOWN_ITEMS as `[a, b, ..., (N items)]`,
    each set (of strings) sorted."""
    parts = []
    for f in fields(obj):
        if not f.repr:
            continue
        value = getattr(obj, f.name)
        if isinstance(value, list) and len(value) > SHOWN_ITEMS:
            shown = ", ".join(repr(item) for item in value[:SHOWN_ITEMS])
            text = f"[{shown}, ... ({len(value)} items)]"
        elif isinstance(value, (set, frozenset)):
            text = f"{{{', '.join(repr(item) for item in sorted(value))}}}" if value else "set()"
        else:
            text = repr(value)
        parts.append(f"{f.name}={text}")
    return f"{type(obj).__name__}({', '.join(parts)})"
