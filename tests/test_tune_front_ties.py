"""`tune`'s front, recommendation and plot on settings that discard the same gradient: figures
that differ only in float32 rounding are one figure, not a ranking."""

from __future__ import annotations

import json
from pathlib import Path

from _plots import kept_figures
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.tune.front import SettingFigures, TuneReport, _dominates
from stabledrl_cli.tune.plot import plot_front

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _setting(spec: str, risk: int, mass: float | None) -> SettingFigures:
    return SettingFigures(
        spec=spec,
        risk_steps=list(range(risk)),
        nonfinite_steps=0,
        spike_steps=risk,
        drift_steps=0,
        discarded_mass=mass,
        discard_frac=0.4,
    )


def test_a_loss_rescaled_by_max_len_ties_on_the_front():
    """`agg=constant,max_len=L` only rescales the loss: every L discards the same share of the
    gradient. On fixtures/grpo the four settings' medians came out 0.57838078 to 0.57838083
    (float32 rounding of each token's term under a different scale) and the front held
    max_len=101 alone, the recommendation too, though the table showed 57.8% for each and the
    tie-break is the first setting given. All four are now on the front, max_len=32
    recommended."""
    sweep = "dapo:agg=constant,max_len=32..1000:log4"
    result = CliRunner().invoke(
        app, ["tune", str(FIXTURES / "grpo"), "-p", sweep, "--device", "cpu", "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    tuned = [s for s in data["settings"] if s["tuned"]]
    masses = [s["discarded_mass_frac"] for s in tuned]
    assert len(set(masses)) > 1 and max(masses) - min(masses) < 1e-6 * max(masses), masses
    assert [s["on_front"] for s in tuned] == [True] * 4
    assert data["front"] == [s["spec"] for s in tuned]
    assert data["recommended"] == "dapo:agg=constant,max_len=32"


def test_a_real_difference_in_discarded_gradient_still_dominates():
    """The tolerance is float32's rounding, far below the table's 0.1%: 0.5% less discarded
    gradient at as many risk steps dominates, as fewer risk steps do; n/a is dominated by any
    figure."""
    low, high = _setting("a", 3, 0.575), _setting("b", 3, 0.578)
    assert _dominates(low, high) and not _dominates(high, low)
    noisy = _setting("c", 3, 0.578 * (1 + 1e-7))
    assert not _dominates(high, noisy) and not _dominates(noisy, high)
    assert _dominates(_setting("d", 2, 0.578 * (1 + 1e-7)), high)
    assert _dominates(high, _setting("e", 3, None)) and not _dominates(_setting("e", 3, None), high)
    zero, tiny = _setting("f", 0, 0.0), _setting("g", 0, 1e-9)
    assert _dominates(zero, tiny)


def test_settings_a_float32_rounding_apart_are_counted_as_one_point(tmp_path: Path, monkeypatch):
    """`tune fixtures/grpo -p 'dapo:agg=constant,max_len=32..1000:log4' -p dapo`: five settings
    at 114 risk steps and 57.83808% discarded gradient, one dot, three of their medians
    apart in the eighth digit (float32 rounding). The plot counted the two exactly equal ones,
    '×2'; the ranking holds all five equal, and the point now says '×5'. A setting 0.5% apart
    is a point of its own."""
    masses = [0.57838078351888186, 0.5783808065397184, 0.57838080771677184]
    masses += [0.57838080771677184, 0.5783808284427228]
    settings = [_setting(f"dapo:agg=constant,max_len={i}", 114, m) for i, m in enumerate(masses)]
    settings.append(_setting("dapo:eps_high=0.5", 114, 0.575))
    report = TuneReport("runs/run", 160, settings, settings[0], "", threads=1)
    drawn = kept_figures(monkeypatch)
    plot_front(report, tmp_path / "front.png")
    (figure,) = drawn
    texts = figure.axes[0].texts
    assert [t.get_text() for t in texts] == ["×5"]
    assert tuple(texts[0].xy) == (114, masses[0] * 100)
