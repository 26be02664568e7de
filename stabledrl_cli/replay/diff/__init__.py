"""Diff: where two recorded runs part, the machinery of `stabledrl diff` (docs/diff.md).

`runs` (`diff_runs`: the step-by-step comparison), `alignment` (how the steps of two runs line
up: imported logs' windows, verl's training steps, rollouts' reward draws), `steps` (the
comparison of one step's fields), `values` (how two arrays or scalars differ within a
tolerance), `figures` (each run's figures side by side around the parting) and `result` (the
typed result and its JSON). `diff_runs` is re-exported here: `stabledrl_cli.replay.diff.diff_runs`
is its documented path.
"""

from __future__ import annotations

from stabledrl_cli.replay.diff.runs import diff_runs

__all__ = ["diff_runs"]
