"""A recorded TRL run carries, step by step, the standard scalars TRL logs (entropy, kl, the
clip fractions, step time) with TRL's values, as `stabledrl import` of the same training's
trainer_state.json gives them; a baseline written from either run gates the other."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from _trl import tiny, train
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.replay.rollouts import REWARD_DRAW_SCALARS, run_reward_draws

__all__ = ["tiny"]

FROM_LOG = ("reward_mean", "loss", "grad_norm", "lr", "entropy", "kl", "clip_frac",
            "clip_frac_low", "clip_frac_high", "step_time")  # fmt: skip
"""The standard scalars TRL's log gives the tiny run (beta > 0: kl)."""

EVERY_STEP = {"num_iterations": 1, "steps_per_generation": 2, "beta": 0.04, "max_steps": 3}
"""A rollout a step, so that TRL logs every metric at every step (its reward too)."""


def _standard(run: Any) -> dict[int, dict[str, float]]:
    """The standard scalars of each step of `run`."""
    return {s.step: {k: v for k, v in s.scalars.items() if k in FROM_LOG} for s in run}


def _recorded_and_imported(tiny: Any, tmp_path: Path, rloo: bool, **config: Any) -> Any:
    """(trainer, recorded run, run imported from its trainer_state.json) of the tiny run
    trained with `config` (`_trl.train`'s keywords)."""
    recorded = tmp_path / "recorded"
    trainer = train(tiny, recorded, rloo=rloo, **config)
    state = tmp_path / "trainer_state.json"
    trainer.state.save_to_json(str(state))
    imported = tmp_path / "imported"
    result = CliRunner().invoke(app, ["import", str(state), "--out", str(imported)])
    assert result.exit_code == 0, result.stderr
    return trainer, recorded, imported


@pytest.fixture(scope="module")
def over_several_steps(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(trainer, recorded, imported) of the tiny run with TRL's defaults, its rollouts trained
    over several steps (max_steps 6), trained once for the tests that read it."""
    return _recorded_and_imported(tiny, tmp_path_factory.mktemp("defaults"), False, max_steps=6)


@pytest.mark.parametrize("rloo", [False, True], ids=["grpo", "rloo"])
def test_a_recorded_run_holds_the_scalars_its_log_gives(
    tiny: Any, tmp_path: Path, rloo: bool
) -> None:
    """The recorded run held reward_mean, loss, grad_norm and lr only: a baseline from the
    imported log tripped baseline.present on recorded.clip_frac, entropy, kl. Now both runs
    hold the same standard scalars, step by step, and each run passes the other's baseline."""
    _, recorded, imported = _recorded_and_imported(tiny, tmp_path, rloo, **EVERY_STEP)
    mine, theirs = _standard(sd.open_run(recorded)), _standard(sd.open_run(imported))
    assert sorted(mine) == sorted(theirs) == [1, 2, 3]
    for step, logged in theirs.items():
        assert set(logged) == set(FROM_LOG)
        assert set(mine[step]) == set(logged), step
        for name, value in logged.items():
            if name == "step_time":  # TRL's own float, through JSON and back
                assert mine[step][name] == value
            else:
                assert mine[step][name] == pytest.approx(value, rel=1e-6, abs=1e-7), name
    for run, other in ((imported, recorded), (recorded, imported)):
        baseline = tmp_path / f"{run.name}.json"
        written = CliRunner().invoke(app, ["check", str(run), "--write-baseline", str(baseline)])
        assert written.exit_code == 0, written.stderr
        figures = json.loads(baseline.read_text())
        figures["policies"] = {}  # the recorded run's replays: a log has none
        figures["observed"] = {"nonfinite_steps": figures["observed"]["nonfinite_steps"]}
        assert set(figures["recorded"]) == set(FROM_LOG) - {"loss", "lr", "step_time"}
        baseline.write_text(json.dumps(figures))
        gated = CliRunner().invoke(app, ["check", str(other), "-b", str(baseline)])
        assert gated.exit_code == 0, gated.stdout + gated.stderr


def test_a_step_holds_its_own_metrics_when_trl_logs_several_steps_at_once(
    tiny: Any, tmp_path: Path
) -> None:
    """logging_steps=2: TRL logs the mean over two steps' values; each recorded step holds
    the mean over its own, the values TRL logs for it with logging_steps=1."""
    config = {**EVERY_STEP, "max_steps": 4}
    once = train(tiny, tmp_path / "a" / "run", **config)
    twice = train(tiny, tmp_path / "b" / "run", **config, logging_steps=2)
    each = _standard(sd.open_run(tmp_path / "a" / "run"))
    paired = _standard(sd.open_run(tmp_path / "b" / "run"))
    logged = {h["step"]: h for h in twice.state.log_history if "clip_ratio/region_mean" in h}
    assert sorted(logged) == [2, 4]
    for step in (1, 2, 3, 4):
        assert paired[step]["entropy"] == each[step]["entropy"]
        assert paired[step]["kl"] == each[step]["kl"]
    pair_mean = (paired[1]["entropy"] + paired[2]["entropy"]) / 2
    assert logged[2]["entropy"] == pytest.approx(pair_mean, rel=1e-12)
    assert once.state.log_history[0]["entropy"] == each[1]["entropy"]
    assert not math.isnan(each[1]["entropy"])


def test_a_baseline_from_trls_log_gates_the_recording_of_a_rollout_over_several_steps(
    over_several_steps: Any, tmp_path: Path
) -> None:
    """TRL's defaults of the tiny run: a rollout trained over 4 steps (steps_per_generation 4,
    gradient_accumulation_steps 2, num_iterations 2), the second cut at step 6. TRL logs
    `reward` once a rollout, at its first step; the recorded run's reward_mean statistics were
    over its 6 steps (mean 0.5417 where the log's were 0.6562), so the baseline written from
    TRL's own log of the run failed `check` of its recording (reward_mean.mean and .tail).
    They are now over the rollouts' draws: TRL's numbers, and the baseline holds both ways."""
    trainer, recorded, imported = over_several_steps
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert len(rewards) == 2
    runner = CliRunner()
    stats = {}
    for run in (recorded, imported):
        done = runner.invoke(app, ["inspect", str(run), "--format", "json"])
        assert done.exit_code == 0, done.output
        stats[run.name] = json.loads(done.stdout)["series"]["reward_mean"]
    for stat in ("steps", "first", "last", "min", "max", "mean", "tail"):
        assert stats["recorded"][stat] == pytest.approx(stats["imported"][stat], rel=1e-6), stat
    assert stats["recorded"]["mean"] == pytest.approx(sum(rewards) / 2, rel=1e-6)
    for run, other in ((imported, recorded), (recorded, imported)):
        baseline = tmp_path / f"{run.name}.json"
        written = runner.invoke(app, ["check", str(run), "--write-baseline", str(baseline)])
        assert written.exit_code == 0, written.output
        figures = json.loads(baseline.read_text())
        only = {"recorded": {"reward_mean": figures["recorded"]["reward_mean"]}}
        baseline.write_text(json.dumps({**figures, **only, "policies": {}, "observed": {}}))
        gated = runner.invoke(app, ["check", str(other), "-b", str(baseline)])
        assert gated.exit_code == 0, gated.output


def test_a_step_whose_loss_went_nan_is_nan_where_trls_log_shows_a_finite_loss(
    tiny: Any, tmp_path: Path
) -> None:
    """transformers' logging_nan_inf_filter (on by default) logs no non-finite loss: step 2,
    whose loss is NaN (a weight made NaN as it begins), is logged with loss 0.0 beside its
    grad_norm NaN (docs/importing.md, `loss`). The recorded step holds the loss NaN, as
    computed, and both runs count the step non-finite."""
    from transformers import TrainerCallback

    class Poison(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 1:  # step 2 trains on step 1's rollout: no generation
                with torch.no_grad():
                    next(kwargs["model"].parameters()).mul_(math.nan)

    trainer, recorded, imported = _recorded_and_imported(
        tiny, tmp_path, False, max_steps=2, callbacks=[Poison()]
    )
    logged = {h["step"]: h for h in trainer.state.log_history if "grad_norm" in h}
    assert logged[2]["loss"] == 0.0 and math.isnan(logged[2]["grad_norm"])
    mine, theirs = sd.open_run(recorded).step(2), sd.open_run(imported).step(2)
    assert math.isnan(mine.scalars["loss"]) and theirs.scalars["loss"] == 0.0
    assert mine.scalars["nonfinite"] > 0 and theirs.scalars["nonfinite"] > 0


def test_diff_of_a_recording_and_trls_log_of_a_rollout_over_several_steps_does_not_part(
    over_several_steps: Any,
) -> None:
    """The tiny run's rollouts are trained over 4 steps each (steps_per_generation 4,
    gradient_accumulation_steps 2, num_iterations 2). `diff` of the recording and its
    imported log parted at step 1 (reward_mean 0.375 vs TRL's 0.3125): each step's own reward
    against TRL's one a rollout. It compares reward_mean one a rollout, as TRL logs it."""
    trainer, recorded, imported = over_several_steps
    logged = {h["step"]: h["reward"] for h in trainer.state.log_history if "reward" in h}
    assert sorted(logged) == [1, 5]
    done = CliRunner().invoke(app, ["diff", str(recorded), str(imported), "--format", "json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert (report["parted_at"], report["first"]["scalars"], report["compared"]) == (None, None, 6)
    assert "reward_mean" not in report["unshared"]["a"]
    steps = {s.step: s.scalars for s in sd.open_run(recorded)}
    assert steps[1]["reward_mean"] != pytest.approx(logged[1], rel=1e-3)  # each step its own


def test_rollouts_begun_inside_a_step_are_drawn_as_trl_logs_them(tiny: Any, tmp_path: Path) -> None:
    """gradient_accumulation_steps 4, steps_per_generation 2, num_iterations 3: a rollout (6
    micro-batches) begins inside steps 2 and 5, which train the one before it too. TRL logged
    `reward` at steps 1, 2, 4, 5 (0.375, 0.25, 1.375, 0.75); the draws merged each rollout
    begun inside a step with the one before (steps 1 and 4: 0.3125, 1.0625), so the
    recording's reward statistics were not its log's and `diff` of the two parted at step 1.
    The capture records `rollout_reward` where TRL generated a rollout, TRL's number: the
    draws are TRL's `reward` at every step that logs one."""
    config = {"gradient_accumulation_steps": 4, "steps_per_generation": 2, "num_iterations": 3}
    trainer, recorded, imported = _recorded_and_imported(
        tiny, tmp_path, False, **config, max_steps=6
    )
    logged = {h["step"]: h["reward"] for h in trainer.state.log_history if "reward" in h}
    assert sorted(logged) == [1, 2, 4, 5]
    run = sd.open_run(recorded)
    assert [s.scalars["inner_step"] for s in run] == [0, 1, 1, 0, 1, 1]  # 2, 5: begun inside
    steps, draws = run_reward_draws(run.scalar_series_many(REWARD_DRAW_SCALARS))
    assert dict(zip(steps.tolist(), draws.tolist(), strict=True)) == logged
    runner = CliRunner()
    stats = {}
    for path in (recorded, imported):
        done = runner.invoke(app, ["inspect", str(path), "--format", "json"])
        assert done.exit_code == 0, done.output
        stats[path.name] = json.loads(done.stdout)["series"]
    assert stats["recorded"]["reward_mean"] == stats["imported"]["reward_mean"]
    assert not {"rollout_reward", "rollout_count"} & set(stats["recorded"])  # reward's draws
    done = runner.invoke(app, ["diff", str(recorded), str(imported), "--format", "json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert (report["parted_at"], report["first"]["scalars"], report["compared"]) == (None, None, 6)
    assert "rollout_reward" not in report["unshared"]["a"]


def test_diff_of_a_recording_and_its_log_written_every_two_steps_compares_their_means(
    tiny: Any, tmp_path: Path
) -> None:
    """logging_steps=2: TRL's row at step 2 holds the means over steps 1 and 2 (loss, reward,
    entropy, clip ratios), grad_norm and lr step 2's own. `diff` of the recording and its
    imported log parted at step 2 (loss 0.0520725 vs -0.0858591: step 2's own against the
    mean); the import keeps trainer_state.json's logging_steps and diff compares the
    recording's means over each row's steps, saying so. A log that does not say how it was
    written (log_history saved alone) is compared step by step, with a note."""
    trainer, recorded, imported = _recorded_and_imported(
        tiny, tmp_path, False, logging_steps=2, max_steps=4
    )
    source = sd.open_run(imported).manifest["source"]
    assert source["logging_steps"] == 2
    runner = CliRunner()
    done = runner.invoke(app, ["diff", str(recorded), str(imported), "--format", "json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert (report["parted_at"], report["first"]["scalars"], report["compared"]) == (None, None, 2)
    assert report["only_a"] == [[1, 1], [3, 3]]
    assert "reward_mean" not in report["unshared"]["a"]
    assert report["notes"][0].startswith("B is a log written every 2 steps")
    steps = {s.step: s.scalars for s in sd.open_run(recorded)}
    logged = {h["step"]: h for h in trainer.state.log_history if "grad_norm" in h}
    pair = (steps[1]["loss"] + steps[2]["loss"]) / 2
    assert logged[2]["loss"] == pytest.approx(pair, rel=1e-5)
    assert logged[2]["loss"] != pytest.approx(steps[2]["loss"], rel=1e-3)  # the mean, not 2's
    table = runner.invoke(app, ["diff", str(imported), str(recorded)])  # either way round
    assert table.exit_code == 0 and "note: A is a log written every 2 steps" in table.stdout
    history = tmp_path / "history.json"
    history.write_text(json.dumps(trainer.state.log_history))
    alone = tmp_path / "alone"
    assert runner.invoke(app, ["import", str(history), "--out", str(alone)]).exit_code == 0
    assert "logging_steps" not in sd.open_run(alone).manifest["source"]
    done = runner.invoke(app, ["diff", str(recorded), str(alone), "--format", "json"])
    assert done.exit_code == 1 and json.loads(done.stdout)["parted_at"] == 2
    note = json.loads(done.stdout)["notes"][0]
    assert note.startswith("B is an imported log whose rows skip steps A holds (step 3")


def test_a_row_over_steps_of_several_rollouts_each_weighs_them_as_trl(
    tiny: Any, tmp_path: Path
) -> None:
    """gradient_accumulation_steps 3, steps_per_generation 2, logging_steps=2: step 1
    generates two rollouts, step 2 one, and TRL's row at step 2 logs `reward` as the mean of
    the three (0.4167), where the mean of the steps' two means is 0.375: diff parted there on
    reward_mean. Each step records `rollout_count`, the means are weighted by it."""
    config = {"gradient_accumulation_steps": 3, "steps_per_generation": 2, "num_iterations": 1}
    trainer, recorded, imported = _recorded_and_imported(
        tiny, tmp_path, False, **config, per_device_train_batch_size=2, num_generations=2,
        logging_steps=2, max_steps=2,
    )  # fmt: skip
    steps = {s.step: s.scalars for s in sd.open_run(recorded)}
    assert [steps[n]["rollout_count"] for n in (1, 2)] == [2, 1]
    logged = next(h["reward"] for h in trainer.state.log_history if "reward" in h)
    weighted = (2 * steps[1]["rollout_reward"] + steps[2]["rollout_reward"]) / 3
    assert logged == pytest.approx(weighted, rel=1e-12)
    assert logged != pytest.approx((steps[1]["rollout_reward"] + steps[2]["rollout_reward"]) / 2)
    done = CliRunner().invoke(app, ["diff", str(recorded), str(imported), "--format", "json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["first"]["scalars"] is None
