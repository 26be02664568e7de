"""`stabledrl tune --plot`, and the words of tune's table."""

from __future__ import annotations

from pathlib import Path

from _cli import run_cli
from _corpus import tiny_run
from _plots import kept_figures, nonfinite_run
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.tune.front import SettingFigures, TuneReport
from stabledrl_cli.tune.plot import plot_front


def test_a_plot_with_no_finite_setting_is_drawn_without_a_warning(tmp_path: Path) -> None:
    """Every replayed update non-finite: each setting's discarded gradient is n/a, so the
    front has no point to draw. The plot is written and stderr holds only tune's own lines;
    before, matplotlib's 'No artists with labels found to put in legend' UserWarning and the
    source line it quoted came out between them, above an empty frame."""
    nonfinite_run(tmp_path / "run")
    png = tmp_path / "front.png"
    sweep = "dapo:eps_high=0.2|0.3"
    result = run_cli("tune", tmp_path / "run", "-p", sweep, "--device", "cpu", "--plot", png)
    assert result.returncode == 0, result.stderr
    assert png.read_bytes().startswith(b"\x89PNG")
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("tuning 2 settings over ") and lines[-1] == f"wrote {png}"
    assert not [line for line in lines[1:-1] if not line.startswith("replaying")], lines


def _setting(spec: str, risk: int, mass: float) -> SettingFigures:
    return SettingFigures(
        spec=spec,
        risk_steps=list(range(risk)),
        nonfinite_steps=risk,
        spike_steps=0,
        drift_steps=0,
        discarded_mass=mass,
        discard_frac=mass,
        on_front=True,
    )


def test_the_title_of_a_one_step_tune_counts_one_step(tmp_path: Path, monkeypatch) -> None:
    """It read 'stabledrl tune: run (1 steps)'; replay's plot and tune's table say '1 step'."""
    setting = _setting("is", 0, 0.0)
    report = TuneReport("runs/run", 1, [setting], setting, "", threads=1)
    drawn = kept_figures(monkeypatch)
    plot_front(report, tmp_path / "front.png")
    (figure,) = drawn
    assert figure.axes[0].get_title() == "stabledrl tune: run (1 step)"


def test_the_risk_axis_counts_whole_steps(tmp_path: Path, monkeypatch) -> None:
    """Risk steps are a count: with every setting at 0 the axis was ticked -0.04 .. 0.04, and
    at 0 and 1 in halves; every tick is now a whole number of steps, none below 0."""
    for risks in ((0, 0), (0, 1), (0, 3), (4, 4)):
        settings = [_setting(f"is:c={i + 1}", risk, 0.1 * i) for i, risk in enumerate(risks)]
        report = TuneReport("runs/run", 9, settings, settings[0], "", threads=1)
        drawn = kept_figures(monkeypatch)
        plot_front(report, tmp_path / "front.png")
        (figure,) = drawn
        ax = figure.axes[0]
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert len(ticks) > 1 and all(float(t).is_integer() for t in ticks), (risks, ticks)
        assert low >= -0.5 and low <= min(risks) and max(risks) <= high, (risks, low, high)


def test_the_legend_covers_no_setting(tmp_path: Path, monkeypatch) -> None:
    """The legend was placed inside the axes, where matplotlib found the most room: on a
    sweep of 200 grpo settings all at 4 risk steps (its x axis 3..5) it was drawn over the
    recommended setting's point and circle. It now sits outside the axes, right of them."""
    settings = [_setting(f"grpo:eps_high={i},eps_low=0.4", 4, 0.28 + 0.002 * i) for i in range(20)]
    report = TuneReport("runs/run", 30, settings, settings[0], "", threads=1)
    drawn = kept_figures(monkeypatch)
    plot_front(report, tmp_path / "front.png")
    (figure,) = drawn
    ax = figure.axes[0]
    renderer = figure.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    assert not legend.overlaps(ax.get_window_extent(renderer)), (legend, ax.bbox)


def test_the_plot_says_which_rules_judged_no_step(tmp_path: Path, monkeypatch) -> None:
    """On a 30-step run the drift rule (a window of 50) judges no step: tune's table says under
    it 'bias: not judged (...): its 0 says nothing', and its recommendation that its 0 risk
    steps say nothing. The plot drew every setting at 0 risk steps with nothing to say so;
    it now shows the table's not-judged lines under its axes."""
    line = "bias: not judged (the drift rule judges a step after 50 ...): its 0 says nothing"
    setting = _setting("is", 0, 0.0)
    report = TuneReport("runs/run", 30, [setting], setting, "", threads=1, unjudged=[line])
    drawn = kept_figures(monkeypatch)
    plot_front(report, tmp_path / "front.png")
    (figure,) = drawn
    texts = [" ".join(t.get_text().split()) for t in figure.axes[0].texts]
    assert line in texts, texts


def test_settings_drawn_at_one_point_are_counted(tmp_path: Path, monkeypatch) -> None:
    """`tune -p 'stabledrl:c=1.5..20:log8'` on a short run: all 8 settings at 0 risk steps and
    0.0% discarded gradient were one dot, read as one setting; a point that stands for
    several settings now says how many ('×8')."""
    settings = [_setting(f"stabledrl:c={c}", 0, 0.0) for c in range(1, 9)]
    settings.append(_setting("is", 1, 0.5))
    report = TuneReport("runs/run", 30, settings, settings[0], "", threads=1)
    drawn = kept_figures(monkeypatch)
    plot_front(report, tmp_path / "front.png")
    (figure,) = drawn
    texts = [t.get_text() for t in figure.axes[0].texts]
    assert texts == ["×8"], texts


def test_the_table_legend_says_what_the_own_row_is(tmp_path: Path) -> None:
    """tune's table ends with the run's own policy, 'grpo (own)', unmarked and unranked; its
    legend explained '*', 'f' and every column but not that row, which reads as a setting
    that lost. A legend line now says what it is; with --no-own (no such row) none does."""
    tiny_run(tmp_path / "run", steps=6)
    args = ["tune", str(tmp_path / "run"), "-p", "dapo:eps_high=0.2|0.5", "--device", "cpu"]
    shown = CliRunner().invoke(app, args, env={"COLUMNS": "80"})
    assert shown.exit_code == 0, shown.output
    assert "grpo (own)" in shown.stdout
    legend = "(own): the policy the run was trained with, shown for reference, not ranked"
    assert legend in " ".join(shown.stdout.split())
    alone = CliRunner().invoke(app, [*args, "--no-own"], env={"COLUMNS": "80"})
    assert "(own)" not in alone.stdout
