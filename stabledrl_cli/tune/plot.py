"""The front of a tune as a PNG: discarded gradient against risk steps, one point a setting."""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

from stabledrl_cli._atomic import output_path
from stabledrl_cli.errors import counted
from stabledrl_cli.replay.plot import require_matplotlib, run_name
from stabledrl_cli.replay.result import same_mass
from stabledrl_cli.tune.front import TuneReport


def _shared(points: list[tuple[int, float]]) -> list[tuple[tuple[int, float], int]]:
    """Each point of `points` (risk steps, discarded gradient in %) with how many settings it
    stands for: those at as many risk steps whose discarded gradients the ranking holds equal
    (`same_mass`: float32 rounding apart), counted at the first, the lowest, of them."""
    shared: list[tuple[tuple[int, float], int]] = []
    for x, y in sorted(points):
        if shared and shared[-1][0][0] == x and same_mass(shared[-1][0][1], y):
            shared[-1] = (shared[-1][0], shared[-1][1] + 1)
        else:
            shared.append(((x, y), 1))
    return shared


def plot_front(report: TuneReport, path: str | os.PathLike[str]) -> Path:
    """Draws every setting (x: risk steps, y: median discarded gradient; a point several
    share, as the ranking holds them equal, counted beside it), the front as a line and the
    recommendation circled; a note instead when no setting has a finite one; under the axes,
    the rules that judged no step of some setting. Written atomically. MissingExtraError
    without matplotlib."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.0, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for tuned, colour, label in ((True, "tab:blue", "setting"), (False, "tab:grey", "own")):
        points = [
            (len(s.risk_steps), s.mass_key * 100)
            for s in report.settings
            if s.tuned == tuned and math.isfinite(s.mass_key)
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.scatter(xs, ys, s=18, color=colour, label=label, zorder=2)
        for (x, y), count in _shared(points):  # one dot that stands for several
            if count > 1:
                ax.annotate(f"×{count}", (x, y), xytext=(5, 3), textcoords="offset points",
                            fontsize=8, color=colour)  # fmt: skip
    front = sorted(
        (len(s.risk_steps), s.mass_key * 100)
        for s in report.settings
        if s.on_front and math.isfinite(s.mass_key)
    )
    if front:
        ax.plot(*zip(*front, strict=True), color="tab:orange", label="front", zorder=1)
    best = report.recommended
    if best is not None and math.isfinite(best.mass_key):
        ax.scatter(
            [len(best.risk_steps)],
            [best.mass_key * 100],
            s=160,
            facecolors="none",
            edgecolors="tab:red",
            label=f"recommended: {best.spec}",
            zorder=3,
        )
    low, high = ax.get_xlim()  # a count of steps: whole ticks, two at least, none below 0
    if high - low < 2:
        low = max((low + high) / 2 - 1, -0.5)
        ax.set_xlim(low, low + 2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("risk steps (non-finite, spike or bias)")
    ax.set_ylabel("discarded gradient, median per step (%)")
    steps = counted(report.steps, "step")
    ax.set_title(  # the run's name as written: a `$` in it started mathtext
        f"stabledrl tune: {run_name(report.run)} ({steps})", parse_math=False
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    else:
        ax.text(0.5, 0.5, "no setting has a finite discarded gradient (n/a in the ranking)",
                ha="center", va="center", transform=ax.transAxes)  # fmt: skip
    if report.unjudged:  # as under tune's table: a count of 0 there is not a clean bill
        note = "\n".join(textwrap.fill(line, 100) for line in report.unjudged)
        ax.text(0, -0.16, note, va="top", fontsize=8, transform=ax.transAxes)
    target = Path(path)
    with output_path(target) as temp:
        fig.savefig(temp, format="png", dpi=110, bbox_inches="tight")
    return target
