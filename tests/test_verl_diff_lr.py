"""`stabledrl diff` of a verl recording against verl's imported log of the same job, trained
on verl's real FSDP2 engine on CPU (verl_scripts/fsdp_engine_run.py): the log's `actor/lr`
is imported a step later (the lr a step's update used), so its first step has none, and the
table said `not compared, recorded by A only: lr` while it compared lr at every later step
(and parted there when they differ)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

verl = pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")

from _ports import free_port  # noqa: E402
from typer.testing import CliRunner  # noqa: E402
from verl.utils.tracking import Tracking  # noqa: E402

from stabledrl_cli.cli.app import app  # noqa: E402

ENGINE_SCRIPT = Path(__file__).parent / "verl_scripts" / "fsdp_engine_run.py"


def verl_log(path: Path, logged: list[dict[str, Any]]) -> None:
    """verl's file logger's lines, one a training step from 1, as `RayPPOTrainer.fit` logs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VERL_FILE_LOGGER_PATH", str(path))
        tracking = Tracking("project", "experiment", ["file"])
        for step, metrics in enumerate(logged, start=1):
            tracking.log(data=metrics, step=step)
        tracking.logger["file"].finish()


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """(the recorded run, verl's logged actor metrics of each training step): one rollout of
    2 ppo epochs x 2 mini-batches, then the NaN mini-batch (training steps 1 and 2)."""
    tmp = tmp_path_factory.mktemp("verl-diff")
    command = [sys.executable, ENGINE_SCRIPT, tmp / "run", tmp / "result.json", "vanilla", "{}"]
    done = subprocess.run(
        [str(part) for part in command],
        env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "run", json.loads((tmp / "result.json").read_text())["logged"]


def diffed(run: Path, log: Path) -> tuple[list[str], dict[str, Any]]:
    """`stabledrl diff RUN LOG`'s table lines and its JSON document."""
    table = CliRunner().invoke(app, ["diff", str(run), str(log), "--device", "cpu"])
    document = CliRunner().invoke(
        app, ["diff", str(run), str(log), "--device", "cpu", "--format", "json"]
    )
    return table.stdout.splitlines(), json.loads(document.stdout)


def imported(tmp_path: Path, logged: list[dict[str, Any]]) -> Path:
    log = tmp_path / "verl.jsonl"
    verl_log(log, logged)
    done = CliRunner().invoke(app, ["import", str(log), "--out", str(tmp_path / "log")])
    assert done.exit_code == 0, done.output
    return tmp_path / "log"


def test_lr_compared_where_verls_log_has_it_is_not_said_to_be_uncompared(
    job: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The recording's lr is compared at training step 2, the log's first with one: the table
    says so beside the steps it lacks it (`lr (compared at the 1 step both record it)`), and
    the JSON's `unshared_compared` counts it; reward_mean, which this log never holds, is
    still listed alone."""
    run, logged = job
    lines, document = diffed(run, imported(tmp_path, logged))
    assert document["unshared"] == {"a": ["lr", "reward_mean"], "b": []}
    assert document["unshared_compared"] == {"lr": 1}
    expected = "not compared, recorded by A only: lr (compared at the 1 step both record it), "
    assert any(line.startswith(expected) for line in lines), lines
    assert document["parted_at"] is None


def test_an_lr_the_log_differs_in_parts_at_the_step_it_was_compared(
    job: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The same log with training step 1's actor/lr (the lr of step 2's updates) doubled: the
    runs part at step 2 on lr, the step the table names as lr's compared one."""
    run, logged = job
    changed = [dict(metrics) for metrics in logged]
    changed[0]["actor/lr"] = 2 * changed[0]["actor/lr"]
    lines, document = diffed(run, imported(tmp_path, changed))
    assert document["parted_at"] == 2
    assert [f["field"] for f in document["first"]["scalars"]["fields"]] == ["lr"]
    assert document["unshared_compared"] == {"lr": 1}
    assert "scalars     part at step 2" in lines
