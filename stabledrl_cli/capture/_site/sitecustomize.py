"""Put on a child's PYTHONPATH by `stabledrl record -- CMD`: installs the optimizer hooks
(`stabledrl_cli.capture.optimizer_hooks`) the moment the child finishes importing torch, then
runs the sitecustomize module this one hides, if there is one.

It imports nothing heavy: a child that never imports torch never imports torch or stabledrl
because of it. A child interpreter that cannot import stabledrl warns once, when it imports
torch, and trains unrecorded.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

_HERE = os.path.dirname(os.path.abspath(__file__))


def _install_hooks() -> None:
    try:
        from stabledrl_cli.capture import optimizer_hooks
    except Exception as exc:
        sys.stderr.write(
            f"stabledrl: warning: optimizer hooks off, this Python ({sys.executable}) cannot "
            f"import stabledrl_cli: {exc}\n"
        )
        return
    optimizer_hooks.install()


class _TorchWatch(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when `torch` is imported, it lets the other finders find it and
    runs `_install_hooks` once torch's own module has executed. One shot."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        loader = spec.loader if spec is not None else None
        if loader is None:
            return spec
        exec_module = loader.exec_module

        def exec_then_install(module: ModuleType) -> None:
            exec_module(module)
            _install_hooks()

        loader.exec_module = exec_then_install  # type: ignore[method-assign]
        return spec


def _chain() -> None:
    """Imports the sitecustomize that this one hides on sys.path, as Python would have."""
    me = sys.modules.pop(__name__)
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    try:
        importlib.import_module("sitecustomize")
    except ImportError as exc:
        if exc.name != "sitecustomize":
            raise
    finally:
        sys.path[:] = saved
        sys.modules.setdefault(__name__, me)


if "torch" in sys.modules:
    _install_hooks()
else:
    sys.meta_path.insert(0, _TorchWatch())
_chain()
