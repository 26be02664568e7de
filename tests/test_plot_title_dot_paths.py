"""`tune . --plot` (or `..`) titles its plot with the name of the run's folder; it read
'stabledrl tune:  (40 steps)' (and 'stabledrl tune: .. (40 steps)'), and `replay . --plot`
'stabledrl replay of : what each policy's update ...'."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _cli import ROOT
from _plots import drawn_figure, kept_figures
from test_tune_plot import _setting

import stabledrl_cli as sd
from stabledrl_cli.tune.front import TuneReport
from stabledrl_cli.tune.plot import plot_front


@pytest.mark.parametrize(("given", "inside"), [(".", "run"), ("..", "run/steps"), ("run/", ".")])
def test_a_run_given_as_a_dot_path_is_named_in_the_title(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: str, inside: str
) -> None:
    (tmp_path / "run" / "steps").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / inside)
    setting = _setting("is", 0, 0.0)
    report = TuneReport(given, 40, [setting], setting, "", threads=1)
    drawn = kept_figures(monkeypatch)
    plot_front(report, tmp_path / "front.png")
    (figure,) = drawn
    assert figure.axes[0].get_title() == "stabledrl tune: run (40 steps)"


def test_a_replay_of_a_dot_path_is_named_in_the_title(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "myrun"
    shutil.copytree(ROOT / "fixtures" / "grpo", run)
    monkeypatch.chdir(run)
    result = sd.replay(".", ["grpo"], device="cpu", step_range=(0, 8))
    title = drawn_figure(monkeypatch, result, tmp_path / "run.png").get_suptitle()
    assert title.startswith("stabledrl replay of myrun: what"), title
