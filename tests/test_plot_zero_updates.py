"""`replay --plot` titles of policies whose updates are all zero, or all non-finite."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _plots import drawn_figure

import stabledrl_cli as sd


def _panel_titles(monkeypatch: pytest.MonkeyPatch, run: Path, out: Path) -> list[str]:
    """The left titles of the replay plot's policy panels, as drawn, their wrapping undone."""
    figure = drawn_figure(monkeypatch, sd.replay(run, ["is", "grpo"], device="cpu"), out)
    return [" ".join(ax.get_title(loc="left").split()) for ax in figure.axes[2:]]


def _record(run: Path, logp: float, advantage: float) -> None:
    with sd.Recorder(run, policy="is") as recorder:
        for step in range(6):
            recorder.log_step(
                step,
                logp=torch.full((2, 3), logp),
                logp_old=torch.full((2, 3), -1.0),
                advantages=torch.tensor([advantage, -advantage]),
            )


def test_a_policy_whose_updates_are_all_zero_is_not_called_non_finite(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Zero advantages (a GRPO step whose groups all score alike) give a zero update: finite,
    but nothing a log axis can show. Its panel said '(no finite update)', as for NaN."""
    _record(tmp_path / "zero", logp=-1.0, advantage=0.0)
    titles = _panel_titles(monkeypatch, tmp_path / "zero", tmp_path / "zero.png")
    zero = "(every finite update is 0)"
    assert len(titles) == 2 and all(zero in title for title in titles), titles
    _record(tmp_path / "nan", logp=float("nan"), advantage=1.0)
    titles = _panel_titles(monkeypatch, tmp_path / "nan", tmp_path / "nan.png")
    assert len(titles) == 2 and all("(no finite update)" in title for title in titles), titles


def test_the_steps_of_a_zero_update_are_marked_not_left_blank(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Steps 3 and 4 score every group alike (zero advantages): their update is 0, which the
    log axis cannot show. The line just broke there, unmarked and unexplained, a gap like
    none in the legend; each such step now has a mark on the panel's bottom edge, named in
    the legend."""
    with sd.Recorder(tmp_path / "run", policy="grpo") as recorder:
        for step in range(8):
            advantage = 0.0 if step in (3, 4) else 1.0
            recorder.log_step(
                step,
                logp=torch.full((2, 3), -1.0 + 0.01 * step),
                logp_old=torch.full((2, 3), -1.0),
                advantages=torch.tensor([advantage, -advantage]),
            )
    result = sd.replay(tmp_path / "run", ["grpo"], device="cpu")
    figure = drawn_figure(monkeypatch, result, tmp_path / "run.png")
    legend_ax, _, panel = figure.axes
    marked = [list(line.get_xdata()) for line in panel.get_lines() if line.get_marker() == "o"]
    assert marked == [[3, 4]], marked
    labels = [text.get_text() for text in legend_ax.get_legend().get_texts()]
    assert "update 0 (bottom edge)" in labels, labels
