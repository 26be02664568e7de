"""Lazy public names (PEP 562): a package lists where each name lives, and its module is
imported on the name's first use, so importing the package (for `--help`, `policies`) costs
nothing of torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(
    package: str, homes: Mapping[str, str], namespace: dict[str, Any]
) -> Callable[[str], object]:
    """The package's module-level `__getattr__`: imports `homes[name]` on first access and
    caches the name in `namespace` (the package's globals)."""

    def __getattr__(name: str) -> object:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        namespace[name] = value
        return value

    return __getattr__
