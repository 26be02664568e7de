"""A verl recording counted as verl's own log of the same job counts it: a training step (a
rollout) at a time, where its figures meet verl's (a baseline written from the imported log,
`check`'s notes, `inspect`). verl's real FSDP2 engine is trained on CPU
(verl_scripts/fsdp_engine_run.py, as tests/test_verl_dashboard.py runs it), at a learning rate
that blows the model up at its first update: every later optimizer step is non-finite."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

verl = pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")

from _ports import free_port  # noqa: E402
from test_integration_verl import KL_LOSS  # noqa: E402
from typer.testing import CliRunner, Result  # noqa: E402
from verl.utils.tracking import Tracking  # noqa: E402

from stabledrl_cli.cli.app import app  # noqa: E402

ENGINE_SCRIPT = Path(__file__).parent / "verl_scripts" / "fsdp_engine_run.py"
BLOWN_UP = {"actor": KL_LOSS, "rollouts": 2, "optimizer": {"lr": 1e20}}
"""Two rollouts (2 ppo epochs x 2 mini-batches: optimizer steps 0-3, 4-7), then the NaN
mini-batch (step 8): verl's training steps 1, 2 and 3. The first update, at lr 1e20, leaves
the model's every later loss and grad norm NaN: optimizer steps 1-8 are non-finite, in all 3
training steps."""


@pytest.fixture(scope="module")
def blown_up(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the recorded run, verl's log of it imported: its file logger's lines, as
    `RayPPOTrainer.fit` logs each training step's actor metrics, from step 1)."""
    tmp = tmp_path_factory.mktemp("verl-blown-up")
    command = [sys.executable, ENGINE_SCRIPT, tmp / "run", tmp / "result.json", "vanilla"]
    done = subprocess.run(
        [*map(str, command), json.dumps(BLOWN_UP)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    logged = json.loads((tmp / "result.json").read_text())["logged"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VERL_FILE_LOGGER_PATH", str(tmp / "verl.jsonl"))
        tracking = Tracking("project", "experiment", ["file"])
        for step, metrics in enumerate(logged, start=1):
            tracking.log(data={**metrics, "training/global_step": step}, step=step)
        tracking.logger["file"].finish()
    assert cli("import", tmp / "verl.jsonl", "--out", tmp / "imported").exit_code == 0
    return tmp / "run", tmp / "imported"


def cli(*args: object) -> Result:
    """`stabledrl ARGS...`, in this process."""
    return CliRunner().invoke(app, [str(a) for a in args])


def checked(run: Path, *args: object) -> tuple[int, dict[str, Any]]:
    """`stabledrl check RUN ARGS... --format json`: (its exit code, its document)."""
    done = cli("check", run, *args, "--device", "cpu", "--format", "json")
    return done.exit_code, json.loads(done.stdout)


def gate(document: dict[str, Any], name: str) -> dict[str, Any]:
    """The check's gate `name`."""
    return next(g for g in document["gates"] if g["gate"] == name)


def test_a_baseline_from_verls_log_counts_the_recordings_non_finite_training_steps(
    blown_up: tuple[Path, Path], tmp_path: Path
) -> None:
    """A baseline written from verl's imported log (3 training steps, each NaN) failed the
    recording of the same job: `observed.nonfinite_steps 8, baseline 3` (its optimizer steps
    1-8). The recording's count is now of its training steps, as the log's: it passes, and a
    baseline written from the recording holds the same count."""
    run, imported = blown_up
    from_log, from_run = tmp_path / "log.json", tmp_path / "run.json"
    assert cli("check", imported, "--write-baseline", from_log).exit_code == 0
    code, document = checked(run, "-b", from_log)
    assert code == 0, document
    assert gate(document, "baseline.observed.nonfinite_steps")["figure"] == 3
    assert cli("check", run, "--write-baseline", from_run, "-p", "grpo").exit_code == 0
    for written in (from_log, from_run):
        assert json.loads(written.read_text())["observed"]["nonfinite_steps"]["value"] == 3


def test_a_tripped_non_finite_count_names_the_training_steps(
    blown_up: tuple[Path, Path], tmp_path: Path
) -> None:
    """Beyond the baseline, the message names where the count passed it in training steps
    (what it counts); --max-nonfinite still counts the recorded optimizer steps, as it counts
    the replayed updates."""
    run, imported = blown_up
    baseline = tmp_path / "log.json"
    assert cli("check", imported, "--write-baseline", baseline).exit_code == 0
    written = json.loads(baseline.read_text())
    written["observed"]["nonfinite_steps"]["value"] = 1
    baseline.write_text(json.dumps(written))
    code, document = checked(run, "-b", baseline)
    assert code == 1
    message = gate(document, "baseline.observed.nonfinite_steps")["message"]
    assert message.endswith("; past it at training step 2 (training steps 1, 2, 3)"), message
    code, document = checked(run, "--max-nonfinite", 7, "-p", "grpo")
    assert code == 1
    assert gate(document, "max_nonfinite")["figure"] == 8


def test_the_step_count_note_counts_the_recordings_training_steps_too(
    blown_up: tuple[Path, Path], tmp_path: Path
) -> None:
    """`check` of the recording against a baseline from verl's log noted `run has 9 steps, the
    baseline's run had 3`: optimizer steps against training steps, the same job. Either
    count matching is no note now; another count is noted in both."""
    run, imported = blown_up
    baseline = tmp_path / "log.json"
    assert cli("check", imported, "--write-baseline", baseline).exit_code == 0
    done = cli("check", run, "-b", baseline, "--device", "cpu")
    assert done.exit_code == 0, done.output
    assert "note:" not in done.stderr
    written = json.loads(baseline.read_text())
    written["run"]["steps"] = 5
    baseline.write_text(json.dumps(written))
    done = cli("check", run, "-b", baseline, "--device", "cpu")
    assert done.exit_code == 0, done.output
    assert (
        "has 9 steps (optimizer steps; 3 training steps, a line each in verl's log), the "
        "baseline's run had 5: step counts are compared as they are"
    ) in " ".join(done.stderr.split())


def test_inspect_names_the_training_step_of_each_non_finite_step(
    blown_up: tuple[Path, Path],
) -> None:
    """`inspect` listed the recording's non-finite steps `1, 2, 3, 4, 5, 6, 7, 8`, optimizer
    steps, where verl's dashboard shows training steps 1-3: it names those too, in the table
    and (a key of its own, the others as they were) in the JSON."""
    run, _ = blown_up
    done = cli("inspect", run)
    assert done.exit_code == 0, done.output
    row = next(line for line in done.stdout.splitlines() if "non-finite steps" in line)
    assert "│ 1, 2, 3, 4, 5, 6, 7, 8 (training steps 1, 2, 3) " in row, row
    done = cli("inspect", run, "--format", "json")
    observed = json.loads(done.stdout)["observed"]
    assert observed["nonfinite_steps"] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert observed["nonfinite_training_steps"] == [1, 2, 3]


def test_a_rollout_whose_first_step_is_unreadable_keeps_its_training_step(
    blown_up: tuple[Path, Path], tmp_path: Path
) -> None:
    """A torn step file at a rollout's first optimizer step (step 4, training step 2's)
    merged its rollout into the one before: `1, 2, 3, 5, 6, 7, 8 (training steps 1, 2)`, step
    8 numbered 2 where verl's log has 3. Its later steps' inner_step counts back to where it
    started: training steps 1, 2, 3, counted as the log's."""
    run, _ = blown_up
    torn = tmp_path / "torn"
    shutil.copytree(run, torn)
    step = torn / "steps" / "step-00000004.safetensors"
    step.write_bytes(step.read_bytes()[:100])
    done = cli("inspect", torn, "--format", "json")
    observed = json.loads(done.stdout)["observed"]
    assert observed["nonfinite_steps"] == [1, 2, 3, 5, 6, 7, 8]
    assert observed["nonfinite_training_steps"] == [1, 2, 3]
