"""What `replay`'s table says of runs with little to judge: a run of one step ("1 step", and
"not judged" with why where a rule of the recorded run judged no step, not "none"), a run
whose spikes were judged and none found ("none", not "-"), and a `--steps` range that
selects no step (a warning, and no empty per-step tables)."""

from __future__ import annotations

import json

from _corpus import tiny_run
from conftest import fixture_run
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.replay.guards import GuardReplay
from stabledrl_cli.replay.report_observed import guards_text

runner = CliRunner()


def _replay(*args: str) -> tuple[str, str]:
    """stdout joined into one line of words (its wrapping undone), and stderr."""
    result = runner.invoke(app, ["replay", *args, "-p", "grpo"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return " ".join(result.stdout.split()), result.stderr


def test_a_one_step_run_is_not_judged(tmp_path):
    text, _ = _replay(str(tiny_run(tmp_path / "run", steps=1)))
    assert ": 1 step, geometry" in text
    assert "first reward collapse not judged (the run's reward_mean has 1 finite value" in text
    assert "recorded grad-norm spikes: not judged (the run recorded 1 finite, nonzero" in text
    assert (
        "collapse warning: not judged (the run has 1 own-sample likelihood (one a rollout" in text
    )
    assert "observed collapse not judged" in text
    assert "collapse none" not in text


def test_spikes_judged_and_none_found_read_none(tmp_path):
    text, _ = _replay(str(tiny_run(tmp_path / "run", steps=12)))
    assert "recorded grad-norm spikes: none;" in text


def test_a_judged_run_reads_as_before():
    text, _ = _replay(str(fixture_run("grpo")))
    assert "first reward collapse at step 132; recorded grad-norm spikes: steps 29,30,31" in text
    assert "collapse warning: first at step 60" in text and "observed collapse at 132" in text


def test_an_empty_step_range_prints_no_empty_tables():
    text, stderr = _replay(str(fixture_run("grpo")), "--steps", "1000:2000")
    assert "--steps 1000:2000 selects no step" in stderr
    assert "steps 1000:2000" not in text and "┃ step ┃" not in text
    assert "flags:" not in text  # no legend for tables not shown
    assert "Replay of" in text and "│ grpo (own) │ 44.0%" in text


def test_detail_over_every_step_is_titled_so():
    """--detail without --steps: each per-step table is titled 'every step', where it read
    'steps :'."""
    text, _ = _replay(str(fixture_run("grpo")), "--detail", "--no-legend")
    assert "grpo (own): every step" in text and "steps :" not in text
    ranged, _ = _replay(str(fixture_run("grpo")), "--steps", "100:", "--no-legend")
    assert "grpo (own): steps 100:" in ranged


def test_an_empty_step_range_of_a_one_step_run_counts_one_step(tmp_path):
    """The warning said '(1 steps replayed)'."""
    _, stderr = _replay(str(tiny_run(tmp_path / "run", steps=1)), "--steps", "5:9")
    assert "(1 step replayed); no per-step rows" in " ".join(stderr.split())


def test_a_guard_that_judged_no_step_says_so(tmp_path):
    """30 recorded grad norms: skip-step starts judging after 64 (its window // 2), so it
    judged none, yet the line read 'skip-step would act on none', a clean bill; the JSON
    gave no way to tell. zclip (25 norms of warmup) judged the last 5."""
    run = str(tiny_run(tmp_path / "run", steps=30))
    text, _ = _replay(run)
    assert "zclip would act on none;" in text
    assert (
        "skip-step judged no step (its statistics need more than the 30 grad norms recorded)"
        in text
    )
    result = runner.invoke(app, ["replay", run, "-p", "grpo", "--format", "json"])
    judged = {g["guard"]: g["judged"] for g in json.loads(result.stdout)["guards"]}
    assert judged == {"zclip": 5, "skip-step": 0}


def test_zclip_unjudged_counts_the_nonzero_norms_it_collected():
    """zclip (and skip-step) leave norms of 0 out of their statistics: of 40 recorded norms, 30
    of them 0 (steps with nothing to learn), zclip collected 10 of its 25 of warmup. The line
    said it needed 'more than the 40 recorded grad norms', which read as if the run were too
    short."""
    replay = GuardReplay()
    replay.extend((step, 0.0 if step % 4 else 1.0 + step / 100, None, None) for step in range(40))
    text = guards_text(replay.reports())
    assert (
        "zclip judged no step (its statistics need more than the 10 nonzero finite grad norms "
        "of the 40 recorded)" in text
    )
    assert (
        "skip-step judged no step (its statistics need more than the 10 nonzero finite grad "
        "norms of the 40 recorded)" in text
    )
