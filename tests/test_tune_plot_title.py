"""`tune . --plot` (or `..`) titles its plot with the name of the run's folder; it read
'stabledrl tune:  (40 steps)' (and 'stabledrl tune: .. (40 steps)')."""

from __future__ import annotations

from pathlib import Path

import pytest
from _plots import kept_figures
from test_u3_tune_plot import _setting

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
