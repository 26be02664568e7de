"""`stabledrl record --force` over a verl job: --force replaces the run once for the command
(`_run_env.forced_run`), as for TRL's trainer, log_policy_batch and the optimizer hooks. A
later process that records the same rank (`sh -c 'python a.py && python b.py'`, a worker
started again) finds the steps the first one recorded: they are kept, never replaced."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

verl = pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")

from test_integration_verl import StubEngine, actor_config, rollout  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402

import stabledrl_cli as sd  # noqa: E402
from stabledrl_cli import _run_env  # noqa: E402
from stabledrl_cli.integrations import verl as stabledrl_verl  # noqa: E402


def _train(steps: int) -> None:
    """One process's verl job: `steps` mini-batches through the engine, recorded by the Ray
    setup hook's install() (no `out`: record's $STABLEDRL_RUN_DIR)."""
    engine, loss = StubEngine(), functools.partial(ppo_loss, config=actor_config())
    assert stabledrl_verl.install()
    try:
        for n, mini in enumerate(tu.make_iterator(rollout(), mini_batch_size=6, epochs=1)):
            if n == steps:
                break
            tu.assign_non_tensor(mini, global_batch_size=6)
            engine.train_batch(mini, loss_function=loss)
    finally:
        stabledrl_verl.uninstall()


def test_a_later_process_under_force_does_not_replace_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Before, install() read $STABLEDRL_FORCE without taking it, and every process of the
    command opened its rank's Recorder with overwrite=True: the second replaced the steps the
    first had recorded (2 steps, then 1: the run held 1)."""
    run, ranks = tmp_path / "run", tmp_path / "ranks"
    with sd.Recorder(run, policy=None) as recorder:  # the run --force replaces
        recorder.log_step(0, loss=1.0)
    ranks.mkdir()
    for name, value in [("RUN_DIR", run), ("RANKS_DIR", ranks)]:
        monkeypatch.setenv(f"STABLEDRL_{name}", str(value))

    monkeypatch.setenv("STABLEDRL_FORCE", "1")  # each process gets record's environment
    _train(steps=2)
    first = sd.open_run(run)
    assert first.step_numbers == [0, 1] and first.manifest["policy"] is not None
    capfd.readouterr()

    monkeypatch.setenv("STABLEDRL_FORCE", "1")
    monkeypatch.setattr(_run_env, "_TAKEN_HERE", set())  # a later process: none taken there
    _train(steps=1)
    kept = sd.open_run(run)
    assert kept.step_numbers == [0, 1] and kept.manifest["run_id"] == first.manifest["run_id"]
    # Before, the Recorder's words: '... pass overwrite=True to replace the run, or
    # resume=True to continue it', a resume verl's recording does not make.
    assert (
        f"{run} already exists and is not empty (manifest.json): an earlier process of the "
        "command recorded it (--force replaces the run once); verl's recording continues no "
        "run: record a later job into a --out of its own; recording is off"
    ) in capfd.readouterr().err


def test_a_run_there_outside_record_is_refused_in_verls_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The Ray setup hook's run directory ($STABLEDRL_RUN_DIR, no `stabledrl record`) holds a
    run: the line named the Recorder's resume=True, which verl's recording does not take."""
    run = tmp_path / "run"
    with sd.Recorder(run, policy=None) as recorder:
        recorder.log_step(0, loss=1.0)
    monkeypatch.setenv("STABLEDRL_RUN_DIR", str(run))
    monkeypatch.delenv("STABLEDRL_RANKS_DIR", raising=False)
    monkeypatch.delenv("STABLEDRL_FORCE", raising=False)
    _train(steps=1)
    assert (
        f"{run} already exists and is not empty (manifest.json); pass install(overwrite=True) "
        "or set $STABLEDRL_FORCE=1 to replace the run (verl's recording continues no run: a "
        "resumed job records into a new directory)"
    ) in capfd.readouterr().err
    assert sd.open_run(run).step_numbers == [0]
