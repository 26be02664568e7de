"""`--plot FILE.png`: a replay as one picture that compares the policies.

On top, across the figure: the recorded reward (per step, and the observed-collapse rule's
rolling mean over W rollouts, one reward each), the recorded grad-norm spikes and non-finite
steps, the observed collapse and the run's collapse warning. Below, one small panel per
policy (two columns, three past 12 policies), all on the same step axis: the replayed update
norm divided by that policy's own median, on a log scale fitted to that policy alone (so a
bounded policy's wiggles are as visible as an unbounded one's blow-ups; the raw median is in
the panel's title). Each panel marks spikes, non-finite updates (at the top edge, never
clipped: a log axis cannot show NaN), risk steps (ticks along the bottom), zero updates
(circles along the bottom: a log axis cannot show 0 either), bias steps (shaded) and the
observed collapse. One legend for the whole figure sits above the panels, outside the data;
the footnote says what `(own)` and `(best)` mean (as in replay's table). Lines break over a
hole in the steps. The default catalogue fits in about 1100 px of height.

matplotlib is an optional extra (`pip install 'stabledrl[plot]'`), imported here
only, with the Agg backend (no display; the object API, so no global pyplot state is touched).
"""

from __future__ import annotations

import math
import os
import textwrap
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from stabledrl_cli._atomic import missing_directory, output_path
from stabledrl_cli.dump import Run, open_run
from stabledrl_cli.dump._views import StepSubset
from stabledrl_cli.errors import MissingExtraError, UsageError, counted, install_command
from stabledrl_cli.replay.config import format_step_range, in_range
from stabledrl_cli.replay.detectors import rolling_mean
from stabledrl_cli.replay.observed import is_verl_recording
from stabledrl_cli.replay.report import BEST_RULE, percent, proxy_reason
from stabledrl_cli.replay.result import PolicyResult, ReplayResult
from stabledrl_cli.replay.rollouts import REWARD_DRAW_SCALARS, run_reward_draws
from stabledrl_cli.spec import wrap_spec

INSTALL_COMMAND = install_command("plot")
OWN_NOTE = "(own): the policy the run was trained with. (best) is picked by the rule:"

_WIDTH_IN = 14.0
_DPI = 100
_HEAD_IN = 0.5  # the title
_LEGEND_IN = 0.55  # the figure's legend, a row of its own above the panels
_REWARD_IN = 2.0
_PANEL_IN = 1.5
_FOOT_IN = 0.7  # the x label and the (own)/(best) note
_PAD = 8  # points between a panel and its title, clear of the marks on the top edge
_MAX_ROWS = 6  # policy rows before a third column is used
_TITLE_POINTS = 9  # a policy panel's title
_CHAR_EMS = 0.62  # the width of the title font's digits and letters, at most, in ems
_LABEL_POINTS = 60  # a policy panel's y label and tick labels, left of it

# One colour per meaning, the same in every panel and in the legend.
_REWARD = "0.6"
_REWARD_MEAN = "black"
_NORM = "tab:blue"
_SPIKE = "tab:orange"
_NONFINITE = "black"
_RISK = "tab:purple"
_BIAS = "gold"
_COLLAPSE = "tab:red"
_WARNING = "tab:green"

Steps = npt.NDArray[np.int64]
Flags = npt.NDArray[np.bool_]


def require_matplotlib(*, load: bool = True) -> None:
    """MissingExtraError (exit 2) with the install command when matplotlib is absent.
    `load=False` only looks it up, without importing it (0.3 s), for a command checking its
    options before it reads the run; where a plot is drawn it is imported, and an install
    that fails to import is refused then."""
    try:
        found = import_module("matplotlib") if load else find_spec("matplotlib")
    except ImportError:  # an optional extra: imported only when plotting
        found = None
    if found is None:
        raise MissingExtraError(
            f"a plot needs matplotlib, which is not installed: {INSTALL_COMMAND}"
        ) from None


def check_plot_path(path: str | os.PathLike[str]) -> Path:
    """The plot's target: a .png in an existing directory (UsageError otherwise)."""
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise UsageError(f"{target}: a plot is a PNG; give a file name ending in .png")
    problem = missing_directory(target)
    if problem is not None:
        raise UsageError(f"{target}: {problem}")
    return target


def grid_shape(count: int) -> tuple[int, int]:
    """(rows, columns) of the policy panels: two columns (one for a single policy), a third
    once two would need more than `_MAX_ROWS` rows."""
    columns = 1 if count <= 1 else 2 if count <= 2 * _MAX_ROWS else 3
    return max(1, math.ceil(count / columns)), columns


def _marks_at_edge(ax: Any, steps: Steps, edge: float, **style: Any) -> None:
    """Markers at `steps` on the top (edge 1) or bottom (edge 0) of the panel, not clipped."""
    if steps.size:
        ax.plot(steps, np.full(steps.size, edge), linestyle="none",
                transform=ax.get_xaxis_transform(), clip_on=False, zorder=5,
                **style)  # fmt: skip


def _broken_at_holes(steps: Steps, values: npt.ArrayLike) -> tuple[Any, Any]:
    """`steps` and `values` with a NaN point in each hole, where the steps jump by more than
    twice their usual (median) stride: a line through them breaks there, not bridging steps
    that have no value."""
    stride = np.diff(steps)
    holes = np.flatnonzero(stride > 2 * np.median(stride)) + 1 if stride.size else stride
    return (
        np.insert(steps.astype(np.float64), holes, np.nan),
        np.insert(np.asarray(values, dtype=np.float64), holes, np.nan),
    )


def _plot_series(ax: Any, steps: Steps, values: npt.ArrayLike, **style: Any) -> None:
    """A line through `values` at `steps`, broken over holes and non-finite values; a point
    with no neighbour on it (which a line does not draw) as a dot."""
    xs, ys = _broken_at_holes(steps, values)
    ax.plot(xs, ys, **style)
    drawn = np.isfinite(ys)
    before, after = np.r_[False, drawn[:-1]], np.r_[drawn[1:], False]
    alone = drawn & ~before & ~after
    ax.plot(xs[alone], ys[alone], linestyle="none", marker=".", color=style["color"])


def _mark_run_events(ax: Any, result: ReplayResult) -> None:
    """The observed collapse (dashed red) and the collapse warning (dash-dot green)."""
    collapse = result.observed.first_reward_collapse
    if collapse is not None:
        ax.axvline(collapse, color=_COLLAPSE, linestyle="--", linewidth=1.2, alpha=0.9)
    warning = result.observed.collapse_warning.first_step
    if warning is not None:
        ax.axvline(warning, color=_WARNING, linestyle="-.", linewidth=1.2, alpha=0.9)


def _reward_panel(ax: Any, result: ReplayResult, run: Run) -> None:
    series = run.scalar_series_many(REWARD_DRAW_SCALARS)
    steps, reward = series["reward_mean"]
    if steps.size:
        _plot_series(ax, steps, reward, color=_REWARD, linewidth=0.8)
        # The observed-collapse rule's mean: over W rollouts, one reward each, at its first step.
        rollouts, draws = run_reward_draws(series, verl=is_verl_recording(run))
        scored = ~np.isnan(draws)  # an unscored rollout is no draw, as for the rule
        rollouts, draws = rollouts[scored], draws[scored]
        window = result.observed.collapse_window
        means = rolling_mean(draws, window) if draws.size >= window else np.full(draws.size, np.nan)
        ax.plot(rollouts, means, color=_REWARD_MEAN, linewidth=1.6)
    if not np.isfinite(reward).any():
        what = "no finite reward recorded" if steps.size else "no reward recorded"
        ax.text(0.5, 0.5, what, transform=ax.transAxes, ha="center", va="center")
    observed = result.observed

    def shown(marked: list[int]) -> Steps:  # drawn outside the axes: only those in view
        at = np.asarray(marked, dtype=np.int64)
        return at[in_range(at, result.step_range)] if _ranged(result) else at

    _marks_at_edge(ax, shown(observed.recorded_spike_steps), 1.0, marker="v", color=_SPIKE,
                   markersize=6)  # fmt: skip
    _marks_at_edge(ax, shown(observed.nonfinite_steps), 1.0, marker="x", color=_NONFINITE,
                   markersize=6)  # fmt: skip
    _mark_run_events(ax, result)
    if observed.first_reward_collapse is not None:
        events = [f"observed collapse at step {observed.first_reward_collapse}"]
    elif observed.unjudged("first_reward_collapse") is not None:  # as replay's table says
        events = ["observed collapse not judged"]
    else:
        events = ["no observed collapse"]
    warning = observed.collapse_warning
    if warning.first_step is not None:
        lead = (
            "" if warning.lead_steps is None else f", {counted(warning.lead_steps, 'step')} ahead"
        )
        events.append(f"collapse warning from step {warning.first_step}{lead}")
    elif observed.unjudged("collapse_warning_first_step") is not None:
        events.append("collapse warning not judged")
    ax.set_title("recorded reward: " + "; ".join(events), loc="left", fontsize=10, pad=_PAD)
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)


def _spans(steps: Steps, flags: Flags) -> list[tuple[int, int]]:
    """Consecutive flagged entries as (first step, last step) spans."""
    spans: list[tuple[int, int]] = []
    start = None
    for i, on in enumerate(flags):
        if on and start is None:
            start = i
        if start is not None and (not on or i == len(flags) - 1):
            end = i if on else i - 1
            spans.append((int(steps[start]), int(steps[end])))
            start = None
    return spans


def _relative_limits(ratio: npt.NDArray[np.float64]) -> tuple[float, float]:
    """A log y-range around this policy's own values, never narrower than 0.5x to 2x."""
    low, high = min(float(ratio.min()), 0.5), max(float(ratio.max()), 2.0)
    return low / 1.4, high * 1.4


def _title_characters(columns: int) -> int:
    """Characters of a policy panel's title line that fit over the panel, beside its y label
    and ticks, in a grid of `columns` panels a row."""
    points = _WIDTH_IN * 72 / columns - _LABEL_POINTS
    return int(points / (_TITLE_POINTS * _CHAR_EMS))


def _policy_title(policy: PolicyResult, scale: str, width: int, ranged: bool) -> str:
    """The spec and its tags, wrapped at its commas to `width` characters a line (a value
    longer than that is broken), then the panel's figures and `scale` (what the norms are
    divided by), wrapped too, on lines of their own. `ranged`: the panel shows the steps of
    `--steps` only, and its figures count those (the summary's count the whole run); a
    range that selects no step is said instead of them."""
    summary = policy.summary
    series = policy.series
    risk, drift = len(summary.collapsed_steps), len(summary.drift_steps)
    discard_frac = summary.discard_frac
    if ranged:
        risk, drift = int(np.sum(series["collapsed"])), int(np.sum(series["drift"]))
        tokens = float(np.sum(series["tokens"]))
        discard_frac = float(np.sum(series["discarded"])) / tokens if tokens else 0.0
    tags = "".join(t for t, on in ((" (own)", policy.own), (" (best)", policy.best)) if on)
    named = wrap_spec(policy.spec + tags, width)
    if not len(series["step"]):  # a --steps range that selects none: no figure says anything
        return "\n".join([*named, "no step in the --steps range"])
    # A rule that judged no step leaves a count of 0 that says nothing (replay's table says so
    # under its counts).
    spikes = " (spikes not judged)" if "spike" in summary.unjudged else ""
    bias = "not judged" if "drift" in summary.unjudged else str(drift)
    figures = f"risk {risk}{spikes} · bias {bias} · discarded {percent(discard_frac)} ({scale})"
    return "\n".join(named + textwrap.wrap(figures, width))


def _policy_panel(ax: Any, policy: PolicyResult, result: ReplayResult, title_width: int) -> None:
    series = policy.series
    steps = np.asarray(series["step"], dtype=np.int64)
    norm = np.asarray(series["update_norm"], dtype=np.float64)
    nonfinite = np.asarray(series["nonfinite"], dtype=bool) | ~np.isfinite(norm)
    shown = np.isfinite(norm) & (norm > 0)  # a log axis shows positive finite values only
    if shown.any():
        median = float(np.median(norm[shown]))
        scale = f"median {median:.3g}"
        ratio = norm / median
        # NaN breaks the line at steps it cannot show, instead of bridging them.
        _plot_series(ax, steps, np.where(shown, ratio, np.nan), color=_NORM, linewidth=1.0)
        spike = np.asarray(series["spike"], dtype=bool) & shown
        ax.plot(steps[spike], ratio[spike], linestyle="none", marker="^", color=_SPIKE,
                markersize=5, zorder=4)  # fmt: skip
        ax.set_yscale("log")
        ax.set_ylim(*_relative_limits(ratio[shown]))
    else:  # a zero update is finite, but a log axis cannot show it either
        scale = "every finite update is 0" if np.isfinite(norm).any() else "no finite update"
    _marks_at_edge(ax, steps[nonfinite], 1.0, marker="x", color=_NONFINITE, markersize=6)
    _marks_at_edge(ax, steps[norm == 0], 0.0, marker="o", color=_NORM, fillstyle="none",
                   markersize=5)  # fmt: skip
    collapsed = np.asarray(series["collapsed"], dtype=bool)
    _marks_at_edge(ax, steps[collapsed], 0.0, marker="|", color=_RISK, markersize=9)
    for start, stop in _spans(steps, np.asarray(series["drift"], dtype=bool)):
        ax.axvspan(start - 0.5, stop + 0.5, color=_BIAS, alpha=0.3, linewidth=0)
    _mark_run_events(ax, result)
    title = _policy_title(policy, scale, title_width, _ranged(result))
    ax.set_title(title, loc="left", fontsize=_TITLE_POINTS, pad=_PAD)
    ax.set_ylabel("× median")
    ax.grid(alpha=0.3)


def _legend_handles(result: ReplayResult) -> list[Any]:
    """One entry per mark used anywhere in the figure, in reading order."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    def line(colour: str, label: str, **style: Any) -> Any:
        return Line2D([], [], color=colour, label=label, **style)

    def mark(colour: str, marker: str, label: str) -> Any:
        return line(colour, label, marker=marker, markersize=8, linestyle="none")

    handles: list[Any] = [
        line(_REWARD, "reward per step", linewidth=0.8),
        line(_REWARD_MEAN, f"reward, rolling mean (W={result.observed.collapse_window} rollouts)",
             linewidth=1.6),
        line(_NORM, "update norm / policy's median", linewidth=1.0),
        mark(_SPIKE, "^", "spike (replayed ▲, recorded ▼)"),
        mark(_NONFINITE, "x", "non-finite step (top edge)"),
        mark(_RISK, "|", "risk step: spike or non-finite"),
        Patch(color=_BIAS, alpha=0.3, label="bias step: net_push rolling mean low (drift)"),
        line(_COLLAPSE, "observed collapse", linestyle="--"),
    ]  # fmt: skip
    if result.observed.collapse_warning.first_step is not None:
        handles.append(line(_WARNING, "collapse warning (first step)", linestyle="-."))
    if any(np.any(np.asarray(p.series["update_norm"]) == 0) for p in result.policies):
        handles.append(line(_NORM, "update 0 (bottom edge)", marker="o", fillstyle="none",
                            markersize=6, linestyle="none"))  # fmt: skip
    return handles


def _footnote(result: ReplayResult) -> str:
    why = proxy_reason(result)
    where = "Update" if result.geometry == "coef" else "On steps without geometry, update"
    proxy = f"  {where} norms are coefficient norms (a proxy): {why}." if why else ""
    text = f"step\n{OWN_NOTE} {BEST_RULE}.{proxy}"
    return "\n".join(textwrap.fill(line, 190) for line in text.splitlines())


def _ranged(result: ReplayResult) -> bool:
    """Whether the policies' series hold the steps of a `--steps` range only."""
    return result.step_range != (None, None)


def _steps_range(result: ReplayResult, run_steps: Steps) -> tuple[float, float] | None:
    """The x-range every panel shares: the policies' steps and the recorded reward's, or the
    policies' alone when they hold a `--steps` range (every panel shows that range)."""
    steps = [np.asarray(p.series["step"], dtype=np.int64) for p in result.policies]
    if _ranged(result) and any(s.size for s in steps):
        run_steps = np.zeros(0, dtype=np.int64)
    every = np.concatenate([*steps, run_steps]) if steps or run_steps.size else run_steps
    if every.size == 0:
        return None
    return float(every.min()) - 1.0, float(every.max()) + 1.0


def _replayed_run(result: ReplayResult) -> Run:
    """The run `result` replayed, reopened: of a live run (`ReplayResult.live`), its steps up
    to the last the replay read, not those landed since."""
    run = open_run(result.run)
    if result.live is None or result.live.to_step is None:
        return run
    upto = result.live.to_step
    return StepSubset(run, [n for n in run.listed_whole_step_numbers if n <= upto])


def plot_replay(result: ReplayResult, path: str | os.PathLike[str], run: Run | None = None) -> Path:
    """Draws `result` (and `run`'s recorded reward; default: reopened from result.run, which
    names a URL without its credentials: pass the open `run` for a run read with them; a live
    run's to the last step replayed) to a PNG.

    Written atomically (WriteError when it cannot be). MissingExtraError (exit 2) without
    matplotlib.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    target = check_plot_path(path)
    run = run if run is not None else _replayed_run(result)
    rows, columns = grid_shape(len(result.policies))
    height = _HEAD_IN + _LEGEND_IN + _REWARD_IN + _PANEL_IN * rows + _FOOT_IN
    fig = Figure(figsize=(_WIDTH_IN, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(
        2 + rows, columns, height_ratios=[_LEGEND_IN, _REWARD_IN] + [_PANEL_IN] * rows
    )
    legend_ax = fig.add_subplot(grid[0, :])
    legend_ax.axis("off")
    legend_ax.legend(handles=_legend_handles(result), loc="center", ncol=5, fontsize=8,
                     frameon=False)  # fmt: skip
    reward_ax = fig.add_subplot(grid[1, :])
    reward_ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: shared by every panel
    _reward_panel(reward_ax, result, run)
    for i, policy in enumerate(result.policies):
        row, column = divmod(i, columns)
        ax = fig.add_subplot(grid[2 + row, column], sharex=reward_ax)
        _policy_panel(ax, policy, result, _title_characters(columns))
        below = i + columns < len(result.policies)
        ax.tick_params(labelbottom=not below)
    reward_ax.tick_params(labelbottom=columns > 1 or not result.policies)  # none right below
    limits = _steps_range(result, run.scalar_series("reward_mean")[0].astype(np.int64))
    if limits is not None:
        reward_ax.set_xlim(*limits)
    steps = counted(result.steps, "step")
    if _ranged(result):
        steps = f"steps {format_step_range(result.step_range)} of {steps}"
    fig.suptitle(
        f"stabledrl replay of {run_name(result.run)}: what each policy's update would have "
        f"been on the recorded batches ({steps}, geometry {result.geometry})",
        fontsize=12,
        parse_math=False,  # the run's name as written: a `$` in it started mathtext
    )
    fig.supxlabel(_footnote(result), fontsize=8)
    with output_path(target) as temp:
        fig.savefig(temp, format="png")
    return target


def run_name(run: str) -> str:
    """The run's folder name as written, for a plot's title; for `.`, `..` or `/`, the name of
    the folder they name (`tune . --plot` titled its plot `stabledrl tune:  (40 steps)`)."""
    name = Path(run).name
    if name in ("", ".", ".."):
        return Path(os.path.abspath(run)).name or run
    return name
