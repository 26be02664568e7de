"""`replay --plot` and `check --plot`: a real PNG from a fixture's (shared) replay; the
missing-extra path."""

from __future__ import annotations

import dataclasses
import math
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _plots import drawn_figure, nonfinite_run
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.errors import MissingExtraError, UsageError
from stabledrl_cli.policies import STANDARD_CATALOGUE
from stabledrl_cli.replay.plot import INSTALL_COMMAND, grid_shape, plot_replay, require_matplotlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _height(policies: int) -> int:
    """The figure's height in pixels for this many policy panels (title 0.5 in, legend
    0.55 in, reward 2 in, 1.5 in a row of panels, footnote 0.7 in, at 100 dpi)."""
    rows, _ = grid_shape(policies)
    return round((0.5 + 0.55 + 2.0 + 1.5 * rows + 0.7) * 100)


def _share(rgb: np.ndarray, colour: tuple[float, float, float], tol: float = 0.06) -> int:
    """Pixels within `tol` of `colour` in every channel."""
    return int((np.abs(rgb - np.asarray(colour)) < tol).all(axis=-1).sum())


def test_replay_plot_of_a_fixture_is_a_plausible_png(grpo_fixture, grpo_fixture_replay, tmp_path):
    # The grpo fixture collapses, with spikes, risk and bias steps: every mark is drawn.
    out = tmp_path / "grpo.png"
    assert plot_replay(grpo_fixture_replay, out, sd.open_run(grpo_fixture)) == out
    width, height = _png_size(out)
    assert (width, height) == (1400, _height(2))  # two policies side by side
    assert 30_000 < out.stat().st_size < 2_000_000
    import matplotlib.colors
    import matplotlib.image

    pixels = matplotlib.image.imread(out)
    assert pixels.shape[:2] == (height, width)
    rgb = pixels[..., :3]
    assert rgb.std() > 0.05  # not a blank canvas
    for name in ("tab:red", "tab:purple", "tab:orange", "tab:blue", "tab:green"):
        # observed collapse, risk ticks, spikes, norms, collapse warning: each its own colour
        assert _share(rgb, matplotlib.colors.to_rgb(name)) > 20, name
    bias = 0.7 + 0.3 * np.asarray(matplotlib.colors.to_rgb("gold"))  # 30% gold over white
    assert _share(rgb, tuple(bias)) > 1000  # grpo's bias steps are shaded
    assert [p.name for p in tmp_path.iterdir()] == ["grpo.png"]  # no temporary file left


def test_the_default_catalogue_fits_in_1200_pixels(grpo_fixture, grpo_fixture_replay, tmp_path):
    count = len(STANDARD_CATALOGUE)
    policies = [grpo_fixture_replay.policies[i % 2] for i in range(count)]
    many = dataclasses.replace(grpo_fixture_replay, policies=policies)
    out = plot_replay(many, tmp_path / "all.png", sd.open_run(grpo_fixture))
    assert _png_size(out) == (1400, _height(count)) and _height(count) <= 1200
    assert grid_shape(count) == (math.ceil(count / 2), 2)
    assert grid_shape(1) == (1, 1) and grid_shape(13) == (5, 3) and grid_shape(30) == (10, 3)


def test_check_plot_writes_even_when_a_gate_trips(grpo_fixture, tmp_path):
    out = tmp_path / "check.png"
    result = runner.invoke(
        app,
        ["check", str(grpo_fixture), "-p", "is", "--max-collapsed", "0", "--plot", str(out),
         "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 1 and f"wrote {out}" in result.stderr
    assert _png_size(out) == (1400, _height(1))


@pytest.mark.parametrize("command", ["replay", "check"])
def test_missing_matplotlib_says_how_to_get_it(command, grpo_fixture, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(MissingExtraError, match=re.escape(INSTALL_COMMAND)):
        require_matplotlib()
    assert issubclass(MissingExtraError, UsageError)
    out = tmp_path / "x.png"
    extra = ["--max-collapsed", "0"] if command == "check" else []
    result = runner.invoke(app, [command, str(grpo_fixture), *extra, "--plot", str(out)])
    assert result.exit_code == 2
    assert INSTALL_COMMAND in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["replay", "check", "tune"])
def test_a_matplotlib_that_fails_to_import_is_refused_before_the_replay(
    command, grpo_fixture, tmp_path, monkeypatch
):
    """The options' check only looks matplotlib up (importing it is 0.3 s): one installed but
    failing to import (built for another numpy) is still refused before any step is replayed."""
    broken = tmp_path / "site" / "matplotlib"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('built for another numpy')\n")
    monkeypatch.syspath_prepend(str(broken.parent))
    monkeypatch.delitem(sys.modules, "matplotlib", raising=False)

    def replayed(*args, **kwargs):
        raise AssertionError("the run was replayed")

    monkeypatch.setattr("stabledrl_cli.replay.engine.replay_run", replayed)
    extra = {"check": ["--max-collapsed", "0"], "tune": ["-p", "grpo"]}.get(command, [])
    out = tmp_path / "x.png"
    result = runner.invoke(app, [command, str(grpo_fixture), *extra, "--plot", str(out)])
    assert result.exit_code == 2, result.output
    assert INSTALL_COMMAND in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_plot_needs_a_png_name_in_an_existing_directory(grpo_fixture, tmp_path):
    result = runner.invoke(app, ["replay", str(grpo_fixture), "--plot", str(tmp_path / "x.svg")])
    assert result.exit_code == 2 and "ending in .png" in result.stderr
    result = runner.invoke(app, ["replay", str(grpo_fixture), "--plot", str(tmp_path / "no/x.png")])
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_plot_of_a_run_with_nothing_finite(tmp_path):
    """Every update non-finite and no reward: the picture is still drawn, not a crash."""
    nonfinite_run(tmp_path / "run")
    result = sd.replay(tmp_path / "run", ["is"], device="cpu")
    assert np.isnan(result.policies[0].series["update_norm"]).all()
    out = plot_replay(result, tmp_path / "nan.png")
    assert _png_size(out) == (1400, _height(1))


def _short_grpo_replay(run: Path, steps: int, **arrays: torch.Tensor) -> sd.ReplayResult:
    """grpo's replay of a run of `steps` identical 2 x 3 steps (r = e^0.1, A = +-1) recorded
    at `run`, each with `arrays` too."""
    with sd.Recorder(run, policy="grpo") as rec:
        for step in range(steps):
            rec.log_step(
                step,
                logp=torch.full((2, 3), -1.0),
                logp_old=torch.full((2, 3), -1.1),
                advantages=torch.tensor([1.0, -1.0]),
                **arrays,
            )
    return sd.replay(run, ["grpo"], device="cpu")


def _reward_panel(result: sd.ReplayResult, path: Path, monkeypatch) -> tuple[str, list[str]]:
    """The replay plot's reward panel as drawn: its left title and its texts."""
    reward_ax = drawn_figure(monkeypatch, result, path).axes[1]
    return reward_ax.get_title(loc="left"), [t.get_text() for t in reward_ax.texts]


@pytest.mark.parametrize("reward", [0.5, float("nan")])
def test_the_reward_panel_says_not_judged_where_the_collapse_rule_judged_no_step(
    tmp_path, monkeypatch, reward
):
    """A run too short for the collapse rules (2 rollouts: W = 10, the warning's window 3), or
    of NaN rewards only: the table says 'not judged', the plot said 'no observed collapse', a
    clean bill the rule never gave (and drew an empty reward panel with nothing to say why)."""
    result = _short_grpo_replay(tmp_path / "run", 2, reward=torch.full((2,), reward))
    assert result.observed.unjudged("first_reward_collapse") is not None
    title, texts = _reward_panel(result, tmp_path / "run.png", monkeypatch)
    assert "observed collapse not judged" in title and "no observed collapse" not in title
    assert "collapse warning not judged" in title
    assert (texts == ["no finite reward recorded"]) == math.isnan(reward), texts


def test_the_title_of_a_one_step_replay_counts_one_step(tmp_path, monkeypatch):
    """It read '(1 steps, geometry coef)'."""
    result = _short_grpo_replay(tmp_path / "run", 1)
    title = drawn_figure(monkeypatch, result, tmp_path / "run.png").get_suptitle()
    assert "(1 step, geometry coef)" in title, title


def test_a_panel_says_which_of_its_rules_judged_no_step(tmp_path, monkeypatch, grpo_fixture_replay):
    """On a run shorter than the drift window, with too few update norms for the spike rule,
    each panel read 'risk 0 · bias 0', a clean bill; replay's table says under its counts that
    they say nothing. A judged run's panel reads as before."""
    result = _short_grpo_replay(tmp_path / "run", 3)
    assert set(result.policies[0].summary.unjudged) == {"drift", "spike"}
    (panel,) = drawn_figure(monkeypatch, result, tmp_path / "run.png").axes[2:]
    title = " ".join(panel.get_title(loc="left").split())
    assert "risk 0 (spikes not judged) · bias not judged ·" in title, title
    judged = drawn_figure(monkeypatch, grpo_fixture_replay, tmp_path / "grpo.png").axes[2]
    assert "risk 28 · bias 111 ·" in " ".join(judged.get_title(loc="left").split())


def test_a_plot_of_a_steps_range_shows_that_range_and_counts_it(
    grpo_fixture, tmp_path, monkeypatch
):
    """`replay --steps 100:140 --plot` (the form of replay's help example) drew each policy's
    curve over 100..139 on an axis of the whole run, under a title counting the whole run
    ('risk 28 · bias 111', '(160 steps'), and the reward panel's edge marks of the steps
    outside it beside the axes. Every panel now shows the range, the policy titles count its
    steps, and the figure's title names it."""
    result = sd.replay(grpo_fixture, ["grpo"], device="cpu", step_range=(100, 140))
    figure = drawn_figure(monkeypatch, result, tmp_path / "range.png")
    assert "(steps 100:140 of 160 steps, geometry gram)" in figure.get_suptitle()
    reward_ax, panel = figure.axes[1], figure.axes[2]
    assert reward_ax.get_xlim() == panel.get_xlim() == (99.0, 140.0)
    series = result.policies[0].series
    risk, bias = int(np.sum(series["collapsed"])), int(np.sum(series["drift"]))
    assert (risk, bias) == (13, 40)
    assert f"risk {risk} · bias {bias} ·" in " ".join(panel.get_title(loc="left").split())
    for line in reward_ax.lines:  # the edge marks (a transform of their own) in view
        x = np.asarray(line.get_xdata(), dtype=float)
        assert x.size == 0 or ((x >= 99) & (x <= 140)).all() or line.get_linestyle() != "None"


def test_the_reward_panel_reads_its_steps_over_panels_narrower_than_it(
    grpo_fixture, grpo_fixture_replay, tmp_path, monkeypatch
):
    """The reward panel spans the figure; two policy panels a row are each half as wide, so
    its marks cannot be read off their axes (the fixture's observed collapse at step 132 is
    drawn over step 100 or so of the right panel). Its step labels were hidden, as if a panel
    of its width were below; they are shown over narrower panels, and hidden over a single
    policy's (its panel has the same axis right below)."""
    figure = drawn_figure(monkeypatch, grpo_fixture_replay, tmp_path / "two.png")
    labels = [t.get_text() for t in figure.axes[1].get_xticklabels() if t.get_visible()]
    assert any(label.strip() for label in labels), labels
    one = sd.replay(grpo_fixture, ["grpo"], device="cpu", step_range=(0, 20))
    reward_ax, panel = drawn_figure(monkeypatch, one, tmp_path / "one.png").axes[1:3]
    assert not [t for t in reward_ax.get_xticklabels() if t.get_visible() and t.get_text()]
    assert [t for t in panel.get_xticklabels() if t.get_visible() and t.get_text()]


def test_a_steps_range_that_selects_no_step_says_so(tmp_path, monkeypatch):
    """`replay --steps 100:200 --plot` over a 3-step run (replay warns: 'selects no step')
    titled its empty panel 'risk 0 · ... · discarded 0% (no finite update)', the words of a
    policy whose every update is NaN, over no step at all; it now says there is none."""
    run = tmp_path / "run"
    _short_grpo_replay(run, 3)
    result = sd.replay(run, ["grpo"], device="cpu", step_range=(100, 200))
    (panel,) = drawn_figure(monkeypatch, result, tmp_path / "run.png").axes[2:]
    title = " ".join(panel.get_title(loc="left").split())
    assert title == "grpo (own) no step in the --steps range", title


def test_a_panel_s_discarded_share_reads_as_replay_s_table(tmp_path, monkeypatch):
    """grpo discarding 2 of 720 tokens over the run: replay's table says 0.3%, the panel said
    'discarded 0%', as for a policy that discards none. It now reads as the table does."""
    run = tmp_path / "run"
    with sd.Recorder(run, policy="grpo") as rec:
        for step in range(60):
            logp_old = torch.full((2, 6), -1.0)
            if step in (10, 40):
                logp_old[0, 0] = -2.0  # r = e: past 1 + eps_high for A > 0, discarded
            rec.log_step(step, logp=torch.full((2, 6), -1.0), logp_old=logp_old,
                         advantages=torch.tensor([1.0, -1.0]))  # fmt: skip
    result = sd.replay(run, ["grpo"], device="cpu")
    assert result.policies[0].summary.discard_frac == pytest.approx(2 / 720)
    table = runner.invoke(app, ["replay", str(run), "-p", "grpo", "--device", "cpu"]).stdout
    assert "0.3%" in table
    (panel,) = drawn_figure(monkeypatch, result, tmp_path / "run.png").axes[2:]
    assert "discarded 0.3% (" in " ".join(panel.get_title(loc="left").split())


def test_the_reward_s_rolling_mean_is_the_collapse_rule_s(tmp_path, monkeypatch):
    """The observed-collapse rule reads one reward a rollout and its rolling mean over W of
    them (W=10 in the legend). The plot's mean was over W recorded steps: on 30 steps of 3
    passes a rollout (10 rollouts) it drew a W=10 mean from step 9 on, averaging 3 or 4
    rollouts. It is now the mean over W rollouts, drawn at each rollout's first step: one
    point here, at step 27."""
    run = tmp_path / "run"
    with sd.Recorder(run, policy="grpo") as rec:
        for step in range(30):
            rec.log_step(
                step,
                logp=torch.full((2, 3), -1.0),
                logp_old=torch.full((2, 3), -1.1),
                advantages=torch.tensor([1.0, -1.0]),
                reward=torch.full((2,), float(step // 3)),
                inner_step=step % 3,
            )
    result = sd.replay(run, ["grpo"], device="cpu")
    reward_ax = drawn_figure(monkeypatch, result, tmp_path / "run.png").axes[1]
    lines = reward_ax.get_lines()
    per_step, mean = lines[0], next(line for line in lines if line.get_color() == "black")
    assert len(per_step.get_xdata()) == 30
    xs, ys = np.asarray(mean.get_xdata()), np.asarray(mean.get_ydata(), dtype=float)
    drawn = np.isfinite(ys)
    assert list(xs[drawn]) == [27] and list(ys[drawn]) == [4.5], (xs, ys)


def test_lines_break_where_steps_are_missing(tmp_path, monkeypatch):
    """Steps 0-9 and 30-39 recorded, 10-29 missing: the reward and each policy's update norm
    were drawn as straight lines from step 9 to step 30, values no step had. Each line now
    breaks where the steps jump by more than twice their usual stride (steps 40, 42, ...
    after it, every other step, are still one line)."""
    run = tmp_path / "run"
    with sd.Recorder(run, policy="grpo") as rec:
        for step in [*range(10), *range(30, 40), *range(40, 60, 2)]:
            rec.log_step(
                step,
                logp=torch.full((2, 3), -1.0 + 0.01 * step),
                logp_old=torch.full((2, 3), -1.1),
                advantages=torch.tensor([1.0, -1.0]),
                reward=torch.full((2,), float(step)),
            )
    result = sd.replay(run, ["grpo"], device="cpu")
    figure = drawn_figure(monkeypatch, result, tmp_path / "run.png")
    reward_line = figure.axes[1].get_lines()[0]
    norm_line = figure.axes[2].get_lines()[0]
    for line in (reward_line, norm_line):
        xs = np.asarray(line.get_xdata(), dtype=float)
        ys = np.asarray(line.get_ydata(), dtype=float)
        # between the last point before the hole and the first after it, a NaN breaks the line
        at = int(np.flatnonzero(xs == 9)[0])
        assert np.isnan(ys[at + 1]) and xs[at + 2] == 30, (xs, ys)
        assert np.isnan(ys).sum() == 1, (xs, ys)


def test_a_one_step_run_s_values_are_drawn(tmp_path, monkeypatch):
    """A one-step run's reward and update norm are single points, which a line without markers
    does not draw: every panel was blank, the reward panel's y axis around a value not shown.
    A point with no neighbour on its line (one step, or one between holes or non-finite
    steps) is now drawn as a dot."""
    result = _short_grpo_replay(tmp_path / "run", 1, reward=torch.full((2,), 0.5))
    figure = drawn_figure(monkeypatch, result, tmp_path / "run.png")
    for ax in figure.axes[1:]:
        dots = [
            (list(line.get_xdata()), list(line.get_ydata()))
            for line in ax.get_lines()
            if line.get_marker() == "." and len(line.get_xdata())
        ]
        assert len(dots) == 1 and dots[0][0] == [0], dots
    reward_dots = [line for line in figure.axes[1].get_lines() if line.get_marker() == "."]
    assert list(reward_dots[0].get_ydata()) == [0.5]


def test_the_step_axis_is_ticked_at_whole_steps(tmp_path, monkeypatch):
    """Steps are whole numbers: a one-step run's axis was ticked -1.00, -0.75, ... 1.00, and
    a 2-step run's in quarters. Every tick is now a whole step."""
    for steps in (1, 2):
        result = _short_grpo_replay(tmp_path / f"run{steps}", steps)
        panel = drawn_figure(monkeypatch, result, tmp_path / f"run{steps}.png").axes[2]
        low, high = panel.get_xlim()
        ticks = [t for t in panel.get_xticks() if low <= t <= high]
        assert len(ticks) > 1 and all(float(t).is_integer() for t in ticks), (steps, ticks)


def test_the_reward_s_rolling_mean_leaves_out_an_unscored_rollout(tmp_path, monkeypatch):
    """A rollout none of whose samples was scored (reward NaN) is no draw for the collapse
    rule: over 20 rollouts with step 10's unscored, it judges 10 windows of W=10 draws. The
    plot's mean took the NaN in and drew 1 point (step 9), blank from there to the end; it now
    draws the rule's 10 means, at the scored rollouts 9, 11, 12, ..., 19."""
    run = tmp_path / "run"
    with sd.Recorder(run, policy="grpo") as rec:
        for step in range(20):
            rec.log_step(
                step,
                logp=torch.full((2, 3), -1.0),
                logp_old=torch.full((2, 3), -1.1),
                advantages=torch.tensor([1.0, -1.0]),
                reward=torch.full((2,), float("nan") if step == 10 else float(step)),
            )
    result = sd.replay(run, ["grpo"], device="cpu")
    assert result.observed.reward_windows == 10
    reward_ax = drawn_figure(monkeypatch, result, tmp_path / "run.png").axes[1]
    mean = next(line for line in reward_ax.get_lines() if line.get_color() == "black")
    xs, ys = np.asarray(mean.get_xdata()), np.asarray(mean.get_ydata(), dtype=float)
    drawn = np.isfinite(ys)
    assert list(xs[drawn]) == [9, *range(11, 20)], (xs, ys)
    scored = [float(s) for s in range(20) if s != 10]
    assert ys[drawn] == pytest.approx([np.mean(scored[i - 9 : i + 1]) for i in range(9, 19)])


def test_plot_without_its_run_draws_the_reward_of_the_steps_replayed(tmp_path, monkeypatch):
    """A replay of a live run's 6 steps, drawn without its run once 4 more landed: the
    run reopened with a fresh listing drew the reward of steps 0-9 beside rows of 0-5."""
    run, ones = tmp_path / "run", torch.ones(2, 3)
    batch = {"logp": -ones, "logp_old": -ones, "advantages": torch.tensor([1.0, -1.0])}
    with sd.Recorder(run, policy="grpo") as rec:
        for step in range(10):
            rec.log_step(step, reward=torch.tensor([1.0, 0.0]), **batch)
            if step == 5:
                result = sd.replay(run, ["grpo"], device="cpu")
    reward_ax = drawn_figure(monkeypatch, result, tmp_path / "live.png").axes[1]
    assert result.steps == 6 and max(reward_ax.lines[0].get_xdata()) == 5
