"""Replay: stream a recorded run through policies; collapse detectors; observed behaviour.

`config` (settings and their defaults), `columns` (every per-step column, declared once;
`derivations`, those computed on the host), `metrics` (device computation of a step, with its
`step_geometry`; `top_sequences` for `--detail`), `framework` (TRL's and verl's own clip
metrics), `stream` (the streaming pass), `summary`, `engine` (`replay`, `replay_run`;
`engines`, where its pass runs), `result` (the typed result and its JSON; `step_series`, its
per-step columns);
`observed` and `inspection` (the recorded run itself, with the collapse warning of
`detectors` over the reward draws of `rollouts`; `measurements` gathers its per-step
figures); `report` (tables; `report_observed`, its lines on the recorded run), `hdf5`,
`plot`; `baseline`, `figures`, `gate`, `evaluation`, `junit` (CI checks). Sub-packages:
`diff` and `watch` (`stabledrl diff`'s and `stabledrl watch`'s machinery).
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stabledrl_cli.replay.result import ReplayResult


class _ReplayPackage(types.ModuleType):
    """This package, callable as `stabledrl_cli.replay(...)`: importing it (or any module in
    it) makes `stabledrl_cli.replay` this package instead of the public function `replay`, so
    calling it calls `engine.replay`, whichever of the two the name holds."""

    def __call__(self, *args: Any, **kwargs: Any) -> ReplayResult:
        from stabledrl_cli.replay.engine import replay

        return replay(*args, **kwargs)


sys.modules[__name__].__class__ = _ReplayPackage
