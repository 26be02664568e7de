"""The old import path of `pack_run`, kept only until cli/pack.py imports it from
`stabledrl_cli.dump`; then this module goes."""

from __future__ import annotations

from stabledrl_cli.dump._packer import PackSummary, pack_run

__all__ = ["PackSummary", "pack_run"]
