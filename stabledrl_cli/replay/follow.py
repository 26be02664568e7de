"""The former path of `watch.follow`'s `RunWatcher`, kept while benchmarks/fuzz_readers.py
imports it from here; it goes once that import names `stabledrl_cli.replay.watch.follow`."""

from __future__ import annotations

from stabledrl_cli.replay.watch.follow import RunWatcher

__all__ = ["RunWatcher"]
