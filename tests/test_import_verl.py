"""`stabledrl import` of the logs verl 0.9.1 itself writes, then `inspect` and `check` of them.

The log is written by verl's own `Tracking` (its console, file and tensorboard backends, as
`trainer.logger` selects them), one call per step as `RayPPOTrainer.fit` makes it, with the
metrics of a step computed by verl's own code: the actor's from `ppo_loss` on each
micro-batch, aggregated as the engine and `_update_actor` aggregate them
(`Metric.aggregate_dp`, `reduce_metrics`, `rename_dict(..., "actor/")`), the batch's from
`compute_data_metrics`, `compute_timing_metrics` (timed by `marked_timer`) and
`compute_throughout_metrics`, validation from `process_validation_metrics`. What no CPU piece
of verl computes without a model and an optimizer, the actor's `grad_norm` and `lr`, and its
entropy, are given (under the names the engine's `_postprocess_output` and the trainer log
them).
Ray, the rollout (vLLM/SGLang need a GPU) and the trainer loop itself are not run, nor is
the trainer's module imported (it imports the rollout servers; in verl 0.9.1 their router
needs `cachetools`, of verl's `verl-core` extra).
"""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")
pytest.importorskip("tensorboard", reason="needs tensorboard (the dev extra)")

from test_integration_verl import actor_config, micro_batches, model_output, rollout
from verl import DataProto
from verl.trainer.ppo.metric_utils import (
    compute_data_metrics,
    compute_throughout_metrics,
    compute_timing_metrics,
    process_validation_metrics,
)
from verl.utils.metric import reduce_metrics
from verl.utils.metric.utils import Metric
from verl.utils.profiler import marked_timer
from verl.utils.py_functional import append_to_dict, rename_dict
from verl.utils.tracking import Tracking
from verl.workers.utils.losses import ppo_loss

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app

runner = CliRunner()
VERL_STANDARD = {
    "reward_mean": "critic/score/mean",
    "loss": "actor/loss",
    "grad_norm": "actor/grad_norm",
    "lr": "actor/lr",
    "entropy": "actor/entropy",
    "kl": "actor/kl_loss",
    "clip_frac": "actor/pg_clipfrac",
    "step_time": "timing_s/step",
}
"""Where docs/importing.md says each standard scalar of a verl log comes from."""


def _actor_metrics(td: Any, step: int, grad_norm: float) -> dict[str, Any]:
    """The actor's metrics of one trainer step, as `_update_actor` returns them: each
    mini-batch's micro-batch metrics aggregated by the engine, then reduced over the
    mini-batches by `reduce_metrics`."""
    config = actor_config(use_kl_loss=True, kl_loss_coef=0.05)
    mini_batches: dict[str, list[Any]] = {}
    for mini in micro_batches(td, mini=6, micro=2):
        merged: dict[str, Any] = {}
        loss = 0.0
        for micro in mini:
            micro_loss, metrics = ppo_loss(config, model_output(micro), micro)
            loss += float(micro_loss)
            for name, value in metrics.items():
                if isinstance(value, Metric):
                    merged.setdefault(name, value.init_list()).extend(value)
                else:
                    merged.setdefault(name, []).append(value)
        output = {n: Metric.aggregate_dp([v]) if isinstance(v, Metric) else v
                  for n, v in merged.items()}  # fmt: skip
        output.update(loss=loss, grad_norm=grad_norm, lr=1e-6 * step, mfu=0.0)
        append_to_dict(mini_batches, output)
    actor = rename_dict(reduce_metrics(mini_batches), "actor/")
    actor["perf/mfu/actor"] = actor.pop("actor/mfu")
    return actor


def _validation_metrics(seed: int) -> dict[str, Any]:
    """verl's validation metrics, named as `RayPPOTrainer._val_metrics_update` names them."""
    accuracy = [float((seed + i) % 3 == 0) for i in range(8)]
    uids = [f"q{i // 2}" for i in range(8)]
    found = process_validation_metrics(["gsm8k"] * 8, uids, {"acc": accuracy})
    named = {}
    for source, variables in found.items():
        for var, metrics in variables.items():
            n_max = max(int(name.split("@")[-1].split("/")[0]) for name in metrics)
            for name, value in metrics.items():
                core = name.startswith(("mean", "maj", "best")) and f"@{n_max}" in name
                named[f"val-{'core' if core else 'aux'}/{source}/{var}/{name}"] = value
    return named


def write_verl_log(
    directory: Path,
    monkeypatch: pytest.MonkeyPatch,
    steps: int,
    *,
    collapse_from: int | None = None,
    ratio_scale: float = 0.6,
    grad_norms: dict[int, float] | None = None,
    resumed_at: int = 0,
    backends: tuple[str, ...] = ("console", "file", "tensorboard"),
) -> tuple[Path, Path]:
    """verl's file log and tensorboard directory of a run of `steps` trainer steps (from 1,
    validated before training at step 0 and at step 4). From step `collapse_from` on every
    response scores 0; `ratio_scale` spreads the actor's ratios (more clipping);
    `grad_norms` gives a step's grad norm (else 1 + step / 100). `resumed_at`: the run
    resumes from that step's checkpoint (validated there, then trains the steps after it,
    each on another rollout than the first run's). `backends`: verl's `trainer.logger`."""
    log, events = directory / "verl.jsonl", directory / "tensorboard"
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(log))
    monkeypatch.setenv("TENSORBOARD_DIR", str(events))
    tracking = Tracking("project", "experiment", list(backends))
    tracking.log(data=_validation_metrics(resumed_at), step=resumed_at)
    for step in range(resumed_at + 1, steps + 1):
        timing: dict[str, float] = {}
        with marked_timer("step", timing):
            with marked_timer("gen", timing):
                td = rollout(seed=step + 100 * bool(resumed_at), scale=ratio_scale)
                if collapse_from is not None and step >= collapse_from:
                    td["token_level_scores"] = td["token_level_scores"] * 0
            with marked_timer("update_actor", timing):
                grad_norm = (grad_norms or {}).get(step, 1 + step / 100)
                metrics = _actor_metrics(td, step, grad_norm)
        metrics["actor/entropy"] = 2.0 - step / 100
        if step == 4:
            metrics.update(_validation_metrics(step))
        metrics.update({"training/global_step": step, "training/epoch": 0})
        tensors = {k: td[k] for k in ("prompts", "responses", "attention_mask", "response_mask")}
        tensors.update(
            token_level_scores=td["token_level_scores"],
            token_level_rewards=td["token_level_scores"],
            advantages=td["advantages"],
            returns=td["advantages"],
        )
        tokens = td["attention_mask"].sum(-1).tolist()
        batch = DataProto.from_dict(tensors=tensors, meta_info={"global_token_num": tokens})
        metrics.update(compute_data_metrics(batch=batch, use_critic=False))
        metrics.update(compute_timing_metrics(batch=batch, timing_raw=timing))
        metrics.update(compute_throughout_metrics(batch=batch, timing_raw=timing, n_gpus=1))
        tracking.log(data=metrics, step=step)
    tracking.finish()
    return log, events


def _import(source: Path, out: Path) -> dict[str, Any]:
    result = runner.invoke(app, ["import", str(source), "--out", str(out), "--format", "json"])
    assert result.exit_code == 0, result.output
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def _rows(log: Path) -> dict[int, dict[str, Any]]:
    return {row["step"]: row["data"] for row in map(json.loads, log.read_text().splitlines())}


def _float32(value: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


def test_verls_own_file_log_lands_under_the_documented_names_and_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log, _ = write_verl_log(tmp_path, monkeypatch, steps=5)
    rows = _rows(log)
    summary = _import(log, tmp_path / "run")
    assert summary["mapped"] == VERL_STANDARD
    assert summary["steps"] == 5 and (summary["first_step"], summary["last_step"]) == (1, 5)
    assert summary["skipped_rows"] == {"eval": 1}  # the validation before training, step 0
    validation = {n for row in rows.values() for n in row if n.startswith("val-")}
    assert validation and all(summary["not_imported"][n] == "eval" for n in validation)
    assert summary["nonfinite"] == {} and summary["non_numeric"] == {}
    counters = {"training/global_step", "training/epoch"}  # the trainer's, as `epoch` is
    assert all(summary["not_imported"][n] == "bookkeeping" for n in counters)
    training = {n for row in rows.values() for n in row} - validation - counters
    assert training - set(VERL_STANDARD.values()) == set(summary["extra"])
    assert all(summary["extra"][n] == n for n in summary["extra"])  # names kept as logged
    for kept_apart in ("actor/ppo_kl", "actor/pg_clipfrac_lower", "critic/rewards/mean",
                       "perf/time_per_step", "response_length/mean", "actor/pg_loss"):  # fmt: skip
        assert kept_apart in summary["extra"]
    run = sd.open_run(tmp_path / "run")
    assert run.step_numbers == [1, 2, 3, 4, 5]
    for step in run:
        row = rows[step.step]
        for standard, name in VERL_STANDARD.items():
            if standard == "lr":  # logged after the step's update: the next step's
                previous = rows.get(step.step - 1, {}).get(name)
                assert step.scalars.get(standard) == previous, step.step
                continue
            assert step.scalars[standard] == row[name], (step.step, standard)
        for name, extra in summary["extra"].items():
            assert step.scalars[extra] == row[name], (step.step, name)


def test_verls_tensorboard_log_imports_as_its_file_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same run through verl's tensorboard backend: the same steps, names and values (as
    float32, what add_scalar keeps)."""
    log, events = write_verl_log(tmp_path, monkeypatch, steps=4)
    from_file = _import(log, tmp_path / "from-file")
    from_events = _import(events, tmp_path / "from-events")
    assert from_events["format"] == "tfevents"
    for key in ("mapped", "extra", "not_imported", "steps", "first_step", "last_step"):
        assert from_events[key] == from_file[key], key
    for file_step, events_step in zip(
        sd.open_run(tmp_path / "from-file"), sd.open_run(tmp_path / "from-events"), strict=True
    ):
        assert events_step.step == file_step.step
        names = set(file_step.scalars) - {"wall_time"}
        assert names == set(events_step.scalars) - {"wall_time"}
        for name in names:
            assert events_step.scalars[name] == _float32(file_step.scalars[name]), name


def test_a_baseline_of_an_imported_verl_run_gates_verl_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`check --write-baseline` of a healthy verl run's import: its own import and its
    tensorboard log's pass; a run whose reward collapses, and one that clips more with a grad
    norm spike, trip the gates of what went wrong, and only those."""
    steps = 24
    good, good_events = write_verl_log(tmp_path / "good", monkeypatch, steps)
    collapsed, _ = write_verl_log(tmp_path / "collapsed", monkeypatch, steps, collapse_from=12)
    clipping, _ = write_verl_log(
        tmp_path / "clipping", monkeypatch, steps, ratio_scale=3.0, grad_norms={15: 40.0}
    )
    for name, log in (("good", good), ("good-events", good_events), ("collapsed", collapsed),
                      ("clipping", clipping)):  # fmt: skip
        _import(log, tmp_path / "runs" / name)
    baseline = tmp_path / "baseline.json"
    wrote = runner.invoke(
        app, ["check", str(tmp_path / "runs" / "good"), "--write-baseline", str(baseline)]
    )
    assert wrote.exit_code == 0, wrote.output
    written = json.loads(baseline.read_text())
    assert set(written["recorded"]) == {"reward_mean", "grad_norm", "clip_frac", "entropy", "kl"}
    assert written["policies"] == {}

    def tripped(name: str) -> set[str]:
        done = runner.invoke(
            app, ["check", str(tmp_path / "runs" / name), "-b", str(baseline), "--format", "json"]
        )
        assert done.exit_code in (0, 1), done.output
        failed = {g["gate"] for g in json.loads(done.stdout)["gates"] if not g["ok"]}
        assert (done.exit_code == 1) == bool(failed), done.output
        return failed

    assert tripped("good") == set()
    assert tripped("good-events") == set()
    assert tripped("collapsed") == {
        "baseline.observed.first_reward_collapse",
        "baseline.recorded.reward_mean.mean",
        "baseline.recorded.reward_mean.tail",
    }
    clipped = tripped("clipping")
    assert {"baseline.recorded.clip_frac.mean", "baseline.recorded.grad_norm.max"} <= clipped
    assert not any("reward" in gate or "entropy" in gate for gate in clipped), clipped


def test_a_nan_grad_norm_in_verls_logs_is_a_nonfinite_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verl skips an update whose grad norm is not finite and logs it: orjson writes NaN and
    inf as null in the file log, add_scalar keeps them in the event file; either import
    counts the step non-finite."""
    log, events = write_verl_log(
        tmp_path, monkeypatch, steps=3, grad_norms={2: math.nan, 3: math.inf}
    )
    assert _rows(log)[2]["actor/grad_norm"] is None
    for source, name in ((log, "file"), (events, "events")):
        summary = _import(source, tmp_path / name)
        assert summary["nonfinite"] == {"grad_norm": 2}, name
        values = [s.scalars["grad_norm"] for s in sd.open_run(tmp_path / name)]
        assert values[0] == pytest.approx(1.01) and not np.isfinite(values[1:]).any(), name


def test_a_resumed_verl_run_imports_its_restart_from_tensorboard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verl resumed from step 3's checkpoint after reaching step 5: its tensorboard directory
    (the same for both runs) imports steps 1-3 of the first run and 4-6 of the second, the
    first run's 4-5 dropped; its file log, which verl truncates as a run starts, holds 4-6."""
    log, events = write_verl_log(tmp_path, monkeypatch, steps=5)
    first = _rows(log)
    time.sleep(1.1)  # event file names order the runs by the second they started
    write_verl_log(tmp_path, monkeypatch, steps=6, resumed_at=3)
    second = _rows(log)
    assert sorted(second) == [3, 4, 5, 6]  # 3: the validation on resuming
    summary = _import(events, tmp_path / "run")
    assert summary["steps"] == 6 and summary["preempted"] > 0
    for step in sd.open_run(tmp_path / "run"):
        row = (first if step.step <= 3 else second)[step.step]
        for standard, name in VERL_STANDARD.items():
            if standard == "lr":  # logged after the step's update: the next step's
                before = (first if step.step <= 4 else second).get(step.step - 1, {})
                expected = _float32(before[name]) if name in before else None
                assert step.scalars.get(standard) == expected, step.step
                continue
            assert step.scalars[standard] == _float32(row[name]), (step.step, standard)
    assert _import(log, tmp_path / "file")["steps"] == 3
