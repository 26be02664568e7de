"""The plots as drawn: their matplotlib figures, for the tests that read their titles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import stabledrl_cli as sd
from stabledrl_cli.dump import Run
from stabledrl_cli.replay.plot import plot_replay


def nonfinite_run(path: Path) -> Path:
    """A run of 6 steps whose every replayed update is non-finite (NaN log-probs) and which
    records no reward, under policy `is`."""
    import torch

    with sd.Recorder(path, policy="is") as recorder:
        for step in range(6):
            recorder.log_step(
                step,
                logp=torch.full((2, 3), float("nan")),
                logp_old=torch.full((2, 3), -1.0),
                advantages=torch.tensor([1.0, -1.0]),
            )
    return path


def kept_figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """A list that each figure saved from now on is appended to, as it is saved."""
    from matplotlib.figure import Figure

    drawn: list[Figure] = []
    savefig = Figure.savefig

    def keep(fig: Figure, *args: object, **kwargs: object) -> None:
        drawn.append(fig)
        savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return drawn


def drawn_figure(
    monkeypatch: pytest.MonkeyPatch,
    result: sd.ReplayResult,
    path: Path,
    run: Run | None = None,
) -> Any:
    """The figure `plot_replay(result, path, run)` draws, kept as it is saved."""
    drawn = kept_figures(monkeypatch)
    plot_replay(result, path, run)
    (figure,) = drawn
    return figure
