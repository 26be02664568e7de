"""`--plot FILE.png`: a replay as one picture, on a shared step axis.

Top panel: the recorded reward (per step, and its rolling mean over the observed-collapse
window W), with the recorded grad-norm spikes. Then one panel per policy: the replayed update
norm on a log scale shared by the panels (so magnitudes compare), spikes (red triangles),
non-finite updates (black crosses at the top edge: a log axis cannot show NaN or inf),
collapsed steps (red ticks along the bottom) and drift (shaded). The observed collapse is a
dashed vertical line through every panel.

matplotlib is an optional extra (`pip install 'stabledrl[plot]'`), imported here only, with
the Agg backend (no display; the object API, so no global pyplot state is touched).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from stabledrl_cli._atomic import atomic_path
from stabledrl_cli.dump import Run, open_run
from stabledrl_cli.errors import MissingExtraError, UsageError
from stabledrl_cli.replay.detectors import collapse_window, rolling_mean
from stabledrl_cli.replay.result import PolicyResult, ReplayResult

INSTALL_COMMAND = "pip install 'stabledrl[plot]'"
_WIDTH_IN = 11.0
_REWARD_HEIGHT_IN = 2.2
_POLICY_HEIGHT_IN = 1.6
_DPI = 110


def require_matplotlib() -> None:
    """MissingExtraError (exit 2) with the install command when matplotlib is absent."""
    try:
        import matplotlib  # noqa: F401  (an optional extra: imported only when plotting)
    except ImportError:
        raise MissingExtraError(
            f"a plot needs matplotlib, which is not installed: {INSTALL_COMMAND}"
        ) from None


def check_plot_path(path: str | os.PathLike[str]) -> Path:
    """The plot's target: a .png in an existing directory (UsageError otherwise)."""
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise UsageError(f"{target}: a plot is a PNG; give a file name ending in .png")
    if not target.parent.is_dir():
        raise UsageError(f"{target}: directory {target.parent} does not exist")
    return target


def _reward(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """(steps [S], reward_mean [S]) as recorded."""
    return run.scalar_series("reward_mean")


def _mark_collapse(ax: Any, collapse: int | None) -> None:
    if collapse is not None:
        ax.axvline(collapse, color="tab:red", linestyle="--", linewidth=1.2, alpha=0.8)


def _reward_panel(ax: Any, result: ReplayResult, run: Run) -> None:
    steps, reward = _reward(run)
    collapse = result.observed.first_reward_collapse
    if steps.size:
        window = min(collapse_window(steps.size), steps.size)
        ax.plot(steps, reward, color="0.7", linewidth=0.8, label="reward_mean")
        ax.plot(
            steps,
            rolling_mean(reward, window),
            color="tab:blue",
            linewidth=1.6,
            label=f"rolling mean (W={window})",
        )
    else:
        ax.text(0.5, 0.5, "no reward recorded", transform=ax.transAxes, ha="center", va="center")
    spikes = result.observed.recorded_spike_steps
    if spikes:
        ax.plot(
            spikes,
            np.full(len(spikes), 1.0),
            linestyle="none",
            marker="v",
            color="tab:orange",
            transform=ax.get_xaxis_transform(),
            clip_on=False,
            label="recorded grad-norm spike",
        )
    _mark_collapse(ax, collapse)
    if collapse is not None:
        ax.plot(
            [], [], color="tab:red", linestyle="--", label=f"observed collapse (step {collapse})"
        )
    title = "recorded reward" + (
        f": observed collapse at step {collapse}"
        if collapse is not None
        else ": no observed collapse"
    )
    ax.set_title(f"{Path(result.run).name}  {title}", loc="left", fontsize=10)
    ax.set_ylabel("reward")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left", fontsize=7, frameon=False, ncol=4)
    ax.grid(alpha=0.3)


def _norm_limits(result: ReplayResult) -> tuple[float, float] | None:
    """One log y-range for every policy panel, so magnitudes compare across panels."""
    norms = np.concatenate(
        [np.asarray(p.series["update_norm"], dtype=np.float64) for p in result.policies]
        or [np.zeros(0)]
    )
    positive = norms[np.isfinite(norms) & (norms > 0)]
    if positive.size == 0:
        return None
    return float(positive.min()) / 1.5, float(positive.max()) * 2.0


def _policy_panel(
    ax: Any,
    policy: PolicyResult,
    collapse: int | None,
    limits: tuple[float, float] | None,
    proxy: bool,
) -> None:
    series = policy.series
    steps = np.asarray(series["step"], dtype=np.int64)
    norm = np.asarray(series["update_norm"], dtype=np.float64)
    spike = np.asarray(series["spike"], dtype=bool)
    nonfinite = np.asarray(series["nonfinite"], dtype=bool) | ~np.isfinite(norm)
    collapsed = np.asarray(series["collapsed"], dtype=bool)
    drift = np.asarray(series["drift"], dtype=bool)
    shown = np.isfinite(norm) & (norm > 0)  # a log axis shows positive finite values only
    ax.plot(steps[shown], norm[shown], color="tab:blue", linewidth=1.0, label="update norm")
    if spike.any():
        hit = spike & shown
        ax.plot(steps[hit], norm[hit], linestyle="none", marker="^", color="tab:red",
                markersize=6, label="spike")  # fmt: skip
    if nonfinite.any():
        ax.plot(steps[nonfinite], np.full(int(nonfinite.sum()), 0.97), linestyle="none",
                marker="x", color="black", transform=ax.get_xaxis_transform(),
                label="non-finite update")  # fmt: skip
    if collapsed.any():
        ax.plot(steps[collapsed], np.full(int(collapsed.sum()), 0.02), linestyle="none",
                marker="|", markersize=10, color="tab:red", transform=ax.get_xaxis_transform(),
                label="collapsed step")  # fmt: skip
    for i, (start, stop) in enumerate(_runs(steps, drift)):
        ax.axvspan(start - 0.5, stop + 0.5, color="tab:orange", alpha=0.15, linewidth=0,
                   label="drift" if i == 0 else None)  # fmt: skip
    _mark_collapse(ax, collapse)
    if limits is not None:
        ax.set_yscale("log")
        ax.set_ylim(*limits)
    summary = policy.summary
    tags = " ".join(t for t, on in (("[own]", policy.own), ("[best]", policy.best)) if on)
    ax.set_title(
        f"{policy.spec} {tags}  collapsed {len(summary.collapsed_steps)}, "
        f"drift {len(summary.drift_steps)}, discard_frac {summary.discard_frac:.3g}",
        loc="left",
        fontsize=9,
    )
    ax.set_ylabel("coef norm (proxy)" if proxy else "update norm")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=7, frameon=False, ncol=5)


def _runs(steps: np.ndarray, flags: np.ndarray) -> list[tuple[int, int]]:
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


def plot_replay(result: ReplayResult, path: str | os.PathLike[str], run: Run | None = None) -> Path:
    """Draws `result` (and `run`'s recorded reward; default: reopened from result.run) to a PNG.

    Written atomically (WriteError when it cannot be). MissingExtraError (exit 2) without
    matplotlib.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    target = check_plot_path(path)
    run = run if run is not None else open_run(result.run)
    count = len(result.policies)
    fig = Figure(
        figsize=(_WIDTH_IN, _REWARD_HEIGHT_IN + _POLICY_HEIGHT_IN * count),
        dpi=_DPI,
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(
        count + 1,
        1,
        sharex=True,
        squeeze=False,
        height_ratios=[_REWARD_HEIGHT_IN] + [_POLICY_HEIGHT_IN] * count,
    )[:, 0]
    _reward_panel(axes[0], result, run)
    collapse = result.observed.first_reward_collapse
    limits = _norm_limits(result)
    for ax, policy in zip(axes[1:], result.policies, strict=True):
        _policy_panel(ax, policy, collapse, limits, proxy=result.geometry == "coef")
    axes[-1].set_xlabel("step")
    fig.suptitle(
        "stabledrl replay: one-step counterfactuals on the recorded batches "
        f"({result.steps} steps, geometry {result.geometry})",
        fontsize=10,
    )
    with atomic_path(target) as temp:
        fig.savefig(temp, format="png")
    return target
