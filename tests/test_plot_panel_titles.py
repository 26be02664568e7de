"""The replay plot's panel titles stay within their panels."""

from __future__ import annotations

import dataclasses

import pytest
from _plots import drawn_figure

import stabledrl_cli as sd
from stabledrl_cli.replay.plot import plot_replay

pytest.importorskip("matplotlib")


@pytest.mark.parametrize("count", [2, 13])
def test_each_panel_title_fits_over_its_panel(grpo_fixture, grpo_fixture_replay, tmp_path,
                                              monkeypatch, count):  # fmt: skip
    """A panel's title (its spec, then risk, bias, discarded and the median) was one line:
    over three columns (13 policies or more) every title ran into the next panel's, 'grpo' and
    its figures too, and over two a long spec did the same."""
    spec = "two-sided:delta=4,eps_high=0.3456789012345678,eps_low=0.123456789012345"
    policies = [
        dataclasses.replace(grpo_fixture_replay.policies[i % 2], spec=spec if i % 3 else "grpo")
        for i in range(count)
    ]
    many = dataclasses.replace(grpo_fixture_replay, policies=policies)
    fig = drawn_figure(monkeypatch, many, tmp_path / "titles.png", sd.open_run(grpo_fixture))
    renderer = fig.canvas.get_renderer()
    panels = fig.axes[2:]  # after the legend and the reward panel
    assert len(panels) == count
    for ax in panels:
        left_title = ax._left_title  # the title set with loc="left"
        assert left_title.get_text()
        title = left_title.get_window_extent(renderer)
        panel = ax.get_window_extent(renderer)
        assert title.x1 <= panel.x1 + 1, (left_title.get_text(), title.x1, panel.x1)


def test_a_run_named_with_dollar_signs_is_plotted_as_named(grpo_fixture_replay, grpo_fixture,
                                                           tmp_path):  # fmt: skip
    """A run's name is text, never mathtext: `replay --plot` and `tune --plot` of a run named
    `r$\\frac{a$x` ended 'internal error: ValueError: ... ParseSyntaxException' (exit 70)."""
    from stabledrl_cli.tune.front import rank
    from stabledrl_cli.tune.plot import plot_front

    named = dataclasses.replace(grpo_fixture_replay, run=str(tmp_path / "r$\\frac{a$x"))
    plot_replay(named, tmp_path / "replay.png", sd.open_run(grpo_fixture))
    plot_front(rank(named, ["grpo", "stabledrl"]), tmp_path / "tune.png")
    assert (tmp_path / "replay.png").stat().st_size and (tmp_path / "tune.png").stat().st_size
