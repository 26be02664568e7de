"""A verl recording against verl's own log of the same job (its file logger's JSON lines, as
verl's trainer writes them, imported): the numbers stabledrl shows of the recording are
comparable with verl's dashboard, and a recording is counted as the log counts it, a training
step (a rollout) at a time: a baseline written from the imported log, `check`'s notes and
`inspect` of a job blown up at its first update. verl's real FSDP2 engine is trained on CPU
(verl_scripts/fsdp_engine_run.py, as tests/test_integration_verl.py runs it), the module's
jobs in one process."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

verl = pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")

from _ports import free_port  # noqa: E402
from test_integration_verl import KL_LOSS, StubEngine, actor_config, rollout  # noqa: E402
from typer.testing import CliRunner, Result  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.ppo.metric_utils import compute_data_metrics  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.logger.aggregate_logger import LocalLogger  # noqa: E402
from verl.utils.metric import reduce_metrics  # noqa: E402
from verl.utils.tracking import Tracking  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402

from stabledrl_cli.cli.app import app  # noqa: E402
from stabledrl_cli.integrations import verl as stabledrl_verl  # noqa: E402

ENGINE_SCRIPT = Path(__file__).parent / "verl_scripts" / "fsdp_engine_run.py"
ROLLOUTS = 3
"""Times the job trains its rollout (2 ppo epochs x 2 mini-batches: 4 optimizer steps each)
before the NaN one (1 optimizer step): verl's training steps 1-3, then 4."""
BLOWN_UP = {"actor": KL_LOSS, "rollouts": 2, "optimizer": {"lr": 1e20}}
"""Two rollouts (2 ppo epochs x 2 mini-batches: optimizer steps 0-3, 4-7), then the NaN
mini-batch (step 8): verl's training steps 1, 2 and 3. The first update, at lr 1e20, leaves
the model's every later loss and grad norm NaN: optimizer steps 1-8 are non-finite, in all 3
training steps."""


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of the module's three engine jobs, trained in one process (torch and verl
    imported once): job0 with KL_LOSS over ROLLOUTS rollouts, job1 the script's plain job
    (one rollout, then the NaN mini-batch: training steps 1 and 2), job2 BLOWN_UP. Each holds
    run/ and result.json."""
    tmp = tmp_path_factory.mktemp("verl-jobs")
    command = [sys.executable, str(ENGINE_SCRIPT)]
    for number, settings in enumerate(({"actor": KL_LOSS, "rollouts": ROLLOUTS}, {}, BLOWN_UP)):
        command += [tmp / f"job{number}" / "run", tmp / f"job{number}" / "result.json"]
        command += ["vanilla", json.dumps(settings)]
        (tmp / f"job{number}").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    done = subprocess.run(
        [*map(str, command)], env=env, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp


@pytest.fixture(scope="module")
def plain_job(jobs: Path) -> tuple[Path, list[dict[str, Any]]]:
    """(the recorded run, verl's logged actor metrics of each training step) of job1."""
    return jobs / "job1" / "run", json.loads((jobs / "job1" / "result.json").read_text())["logged"]


@pytest.fixture(scope="module")
def job(jobs: Path) -> tuple[Path, list[dict[str, Any]]]:
    """(the recorded run, verl's log lines of it: each training step's actor metrics as the
    trainer reduces them, with `critic/score/mean`, the mean score of the step's sequences,
    and the trainer's counters, as `RayPPOTrainer.fit` logs them) of job0."""
    tmp = jobs / "job0"
    logged = json.loads((tmp / "result.json").read_text())["logged"]
    scores = rollout(n_prompts=4, seed=1)["token_level_scores"].sum(-1)
    batches = [scores] * ROLLOUTS + [scores[:6]]  # the script's NaN batch: its first 6 rows
    lines = []
    for step, (metrics, batch) in enumerate(zip(logged, batches, strict=True), start=1):
        line = {**metrics, "critic/score/mean": float(batch.mean()), "training/global_step": step}
        lines.append({**line, "actor/entropy": 2.5, "timing_s/step": 1.0})
    return tmp / "run", lines


@pytest.fixture(scope="module")
def blown_up(jobs: Path) -> tuple[Path, Path]:
    """(the recorded run, verl's log of it imported: its file logger's lines, as
    `RayPPOTrainer.fit` logs each training step's actor metrics, from step 1) of job2."""
    tmp = jobs / "job2"
    logged = json.loads((tmp / "result.json").read_text())["logged"]
    lines = [{**metrics, "training/global_step": n} for n, metrics in enumerate(logged, start=1)]
    with pytest.MonkeyPatch.context() as mp:
        return tmp / "run", imported(tmp, lines, mp)


def verl_log(path: Path, lines: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> Path:
    """`lines` written by verl's own file logger at `path`, a line a training step from 1."""
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(path))
    tracking = Tracking("project", "experiment", ["file"])
    for step, metrics in enumerate(lines, start=1):
        tracking.log(data=metrics, step=step)
    tracking.logger["file"].finish()
    return path


def imported(tmp_path: Path, lines: list[dict[str, Any]], mp: pytest.MonkeyPatch) -> Path:
    """verl's log of `lines`, imported by `stabledrl import`."""
    out = tmp_path / "imported"
    done = CliRunner().invoke(
        app, ["import", str(verl_log(tmp_path / "v.jsonl", lines, mp)), "--out", str(out)]
    )
    assert done.exit_code == 0, done.output
    return out


def diff(a: Path, b: Path) -> tuple[int, dict[str, Any]]:
    """`stabledrl diff A B --format json`: (its exit code, its document)."""
    done = CliRunner().invoke(app, ["diff", str(a), str(b), "--format", "json"])
    return done.exit_code, json.loads(done.stdout)


def damaged_copy(run: Path, tmp_path: Path, steps: Iterable[int], lost: str = "deleted") -> Path:
    """A copy of the recording `run` whose step files of `steps` are deleted, or torn (cut to
    their first 100 bytes) with `lost="torn"`."""
    damaged = tmp_path / "run"
    shutil.copytree(run, damaged)
    for n in steps:
        step = damaged / "steps" / f"step-{n:08d}.safetensors"
        if lost == "torn":
            step.write_bytes(step.read_bytes()[:100])
        else:
            step.unlink()
    return damaged


def test_a_recording_and_verls_log_of_it_are_compared_by_training_step(
    job: tuple[Path, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`diff` of a verl recording (optimizer steps 0-12) against verl's log of the same job
    (training steps 1-4) paired optimizer step 1 with training step 1 and parted there (exit
    1: loss 0.79862, the second mini-batch's, against verl's 0.870076, the mean of the
    rollout's 4 updates). The recording is now compared a training step at a time, numbered
    as verl's log: they never part, either way round."""
    run, lines = job
    log = imported(tmp_path, lines, monkeypatch)
    for a, b in ((run, log), (log, run)):
        code, result = diff(a, b)
        assert code == 0, result
        assert result["parted_at"] is None
        assert (result["steps_a"], result["steps_b"], result["common"]) == (4, 4, 4)
        assert (result["only_a"], result["only_b"]) == ([], [])
        assert "compared a training step at a time" in result["notes"][0]


def test_a_training_step_verl_logged_otherwise_parts_there(
    job: tuple[Path, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The alignment hides no difference: a log whose training step 2 holds another grad
    norm (a spike in one of its updates) parts from the recording at step 2, on grad_norm,
    the recording's figure the mean of that rollout's 4 optimizer steps, as verl's."""
    run, lines = job
    changed = [dict(line) for line in lines]
    changed[1]["actor/grad_norm"] *= 1.5
    code, result = diff(run, imported(tmp_path, changed, monkeypatch))
    assert code == 1
    assert result["parted_at"] == 2
    assert [f["field"] for f in result["first"]["scalars"]["fields"]] == ["grad_norm"]
    mine = next(row["a"]["grad_norm"] for row in result["around"] if row["step"] == 2)
    assert mine == pytest.approx(lines[1]["actor/grad_norm"], rel=1e-6)


def test_a_log_whose_first_steps_train_no_actor_lines_up_from_its_first_actor_update(
    job: tuple[Path, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verl's `critic_warmup=1` logs training step 1 without an actor update (its score, no
    `actor/*`): the recording's first rollout is the log's step 2, its last step 5."""
    run, lines = job
    warmup = {"critic/score/mean": lines[0]["critic/score/mean"], "training/global_step": 1}
    code, result = diff(run, imported(tmp_path, [warmup, *lines], monkeypatch))
    assert code == 0, result
    assert (result["steps_a"], result["common"], result["only_b"]) == (4, 4, [[1, 1]])
    assert "A's rollout from step 0 as B's step 2" in result["notes"][0]


@pytest.mark.parametrize("lost", ["torn", "deleted"])
@pytest.mark.parametrize("torn_step", [5, 4, 7])
def test_a_training_step_with_an_unreadable_step_file_is_unreadable_not_compared(
    job: tuple[Path, list[dict[str, Any]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    torn_step: int,
    lost: str,
) -> None:
    """A torn step file leaves its training step (2) unreadable in the recording, listed so,
    and not compared; the others are: optimizer step 5, the second rollout's second update,
    and step 4, its first. With step 4 unread, the rollout's other steps (inner_step above 0)
    were grouped with the rollout before, so training step 1's means took in step 2's updates
    and parted from verl's log at step 1 (reward_mean 0.0714286 against 0.0833333); each
    step's rollout now starts at its step minus its inner_step. A deleted step file 5 or 7
    left training step 2 compared by the means of its other 3 updates, parted from verl's of
    its 4 (exit 1), where a deleted step 4 made it unreadable: it is unreadable too."""
    run, lines = job
    torn = damaged_copy(run, tmp_path, [torn_step], lost)
    code, result = diff(torn, imported(tmp_path, lines, monkeypatch))
    assert code == 0, result
    assert (result["unreadable_a"], result["only_b"], result["common"]) == ([[2, 2]], [[2, 2]], 3)


@pytest.mark.parametrize("rollout", [1, 0])
@pytest.mark.parametrize("lost", ["torn", "deleted"])
def test_a_rollout_whose_every_step_file_is_lost_keeps_the_training_steps_after_it_numbered(
    job: tuple[Path, list[dict[str, Any]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    lost: str,
    rollout: int,
) -> None:
    """The second rollout's 4 step files (optimizer steps 4-7) deleted: the recording's
    rollouts were numbered by their places in the list of those left, so its third rollout
    (steps 8-11) was compared as verl's step 2 and its fourth as step 3: diff parted at step
    2 (exit 1; loss 0.8145 against verl's 0.8358) and only_b named step 4. Torn, the 4 steps
    were each a rollout of its own: training step 1 was listed unreadable and the diff parted
    at step 2 too. A rollout is now numbered from its optimizer steps (4 a rollout here):
    training step 2 is missing from the recording, or unreadable, and the others agree. The
    first rollout's (steps 0-3) lost, they were numbered from the first step read: the diff
    parted at step 1 (exit 1), verl's step 4 only in B; the recording numbers from step 0."""
    run, lines = job
    damaged = damaged_copy(run, tmp_path, range(4 * rollout, 4 * rollout + 4), lost)
    code, result = diff(damaged, imported(tmp_path, lines, monkeypatch))
    assert code == 0, result
    assert (result["parted_at"], result["common"]) == (None, 3)
    found = result["unreadable_a"] if lost == "torn" else result["only_b"]
    assert found == [[rollout + 1, rollout + 1]]


@pytest.mark.parametrize(("kept", "common"), [([4, 5, 6, 7, 12], 2), ([4, 5, 6, 7], 1)])
def test_a_recording_with_no_rollout_read_to_the_next_still_numbers_it_from_step_0(
    job: tuple[Path, list[dict[str, Any]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kept: list[int],
    common: int,
) -> None:
    """Only the second rollout (steps 4-7) left whole, and the NaN step 12: no rollout was
    read up to the next one's start, so no length was known and the rollouts were numbered in
    turn from the first read: steps 4-7 were verl's training step 1, the diff parted there
    (exit 1). A rollout starts at a multiple of the length, which its steps read bound
    below: starting at step 4 and 4 steps long, it is 4 long, and steps 4-7 are step 2."""
    run, lines = job
    damaged = damaged_copy(run, tmp_path, set(range(13)) - set(kept))
    code, result = diff(damaged, imported(tmp_path, lines, monkeypatch))
    assert code == 0, result
    assert (result["parted_at"], result["common"]) == (None, common)
    assert "A's rollout from step 4 as B's step 2" in result["notes"][0]


@pytest.mark.parametrize("kept", [[8, 9, 10, 11], [12]])
def test_a_recording_whose_rollouts_cannot_be_numbered_is_not_compared(
    job: tuple[Path, list[dict[str, Any]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kept: list[int],
) -> None:
    """Only steps 8-11 left (a rollout 4 or 8 steps long) or the NaN step 12: its rollouts
    were numbered in turn from the first read, as verl's training step 1, and the diff parted
    there (exit 1; loss 0.814512 or NaN against verl's 0.870076), where verl's step is 3 or
    4. Which training step they are is not known: nothing is compared, one line says why."""
    run, lines = job
    damaged = damaged_copy(run, tmp_path, set(range(13)) - set(kept))
    log = imported(tmp_path, lines, monkeypatch)
    done = CliRunner().invoke(app, ["diff", str(damaged), str(log)])
    assert done.exit_code == 3, done.output
    assert done.stdout == ""
    assert "first rollout's step files are all lost" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_inspect_reads_a_reward_a_training_step_when_a_rollouts_first_step_is_unreadable(
    job: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """With the second rollout's first step file torn (step 4), inspect's reward series took
    that rollout's other steps (5-7, inner_step 1-3) into the first rollout's draw: 3 values
    (0.0714, 0.0833, 0) beside its 4 training steps of grad_norm, where verl logs a
    `critic/score/mean` for each of the 4 (0.0833, 0.0833, 0.0833, 0). A verl recording's
    rollout now starts at its steps' step minus inner_step, as verl's training steps do: 4
    draws, the first rollout's verl's own."""
    run, lines = job
    torn = damaged_copy(run, tmp_path, [4], "torn")
    done = CliRunner().invoke(app, ["inspect", str(torn), "--format", "json"])
    series = json.loads(done.stdout)["series"]
    assert series["reward_mean"]["steps"] == series["grad_norm"]["steps"] == len(lines)
    first = lines[0]["critic/score/mean"]
    assert series["reward_mean"]["first"] == pytest.approx(first, rel=1e-6)


class Norms(StubEngine):
    """The stand-in engine whose optimizer steps return the pre-clip norms `norms`, in turn."""

    def __init__(self, norms: list[float]) -> None:
        super().__init__()
        self.norms = norms

    def optimizer_step(self) -> float:
        return self.norms.pop(0)


def score_mean(data: Any) -> float:
    """verl's `critic/score/mean` of a rollout (the trainer's `compute_data_metrics`)."""
    shown = ("prompts", "responses", "attention_mask", "response_mask", "token_level_scores")
    tensors = {key: data[key] for key in shown}
    tensors["token_level_rewards"] = data["token_level_scores"]
    tensors["advantages"] = tensors["returns"] = data["advantages"]
    batch = DataProto.from_dict(tensors=tensors)
    return float(compute_data_metrics(batch, use_critic=False)["critic/score/mean"])


def trained(
    run: Path, monkeypatch: pytest.MonkeyPatch, norms: list[float], infinite: int = -1
) -> list[dict[str, Any]]:
    """verl's lines (`actor/grad_norm`, `critic/score/mean`) of 2 training steps of 2
    mini-batches each, recorded into `run` by the hook: verl's ppo_loss on the stand-in
    engine whose updates have the pre-clip norms `norms`; row `infinite` of the first
    rollout scored inf."""
    monkeypatch.setenv("STABLEDRL_STATUS_FILE", str(run.parent / "status"))
    assert stabledrl_verl.install(run)
    engine, loss = Norms(list(norms)), functools.partial(ppo_loss, config=actor_config())
    lines = []
    try:
        for seed, row in ((1, infinite), (2, -1)):
            data = rollout(seed=seed, infinite=row)
            grad_norms = []
            for n, mini in enumerate(tu.make_iterator(data, mini_batch_size=6, epochs=1, seed=0)):
                tu.assign_non_tensor(mini, global_batch_size=6, update_lr_scheduler=n == 1)
                output = engine.train_batch(mini, loss_function=loss)
                grad_norms.append(output["metrics"]["grad_norm"])
            scores = {"critic/score/mean": score_mean(data)}
            lines.append({**reduce_metrics({"actor/grad_norm": grad_norms}), **scores})
    finally:
        stabledrl_verl.uninstall()
    return lines


def test_an_infinite_grad_norm_or_score_is_compared_as_verl_logs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verl logs a training step's `actor/grad_norm` as np.mean over its optimizer steps, inf
    when one update's norm is (an overflow, the update skipped), and `critic/score/mean` inf
    when a score is. The recording's training-step means made every non-finite mean NaN, so
    `diff` against verl's console log of the same job parted at step 1 (grad_norm nan vs inf,
    reward_mean nan vs inf). Its file log spells inf `null`, read as NaN: no parting there
    either."""
    lines = trained(tmp_path / "run", monkeypatch, [0.5, math.inf, 0.25, 0.75], infinite=3)
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        for step, line in enumerate(lines, start=1):
            LocalLogger().log(line, step=step)
    assert console.getvalue().startswith(
        "step:1 - actor/grad_norm:np.float64(inf) - critic/score/mean:inf"
    )
    (tmp_path / "console.txt").write_text(console.getvalue())
    logs = {
        "console": tmp_path / "console.txt",
        "file": verl_log(tmp_path / "v.jsonl", lines, monkeypatch),
    }
    assert '"actor/grad_norm":null' in logs["file"].read_text()
    for kind, log in logs.items():
        out = tmp_path / f"imported-{kind}"
        done = CliRunner().invoke(app, ["import", str(log), "--out", str(out)])
        assert done.exit_code == 0, done.output
        code, result = diff(tmp_path / "run", out)
        assert code == 0, (kind, result)
        assert (result["parted_at"], result["common"]) == (None, 2)


def test_watch_names_the_training_step_of_a_non_finite_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A verl recording's non-finite update (optimizer step 3, the second rollout's second)
    is at training step 2 on verl's dashboard: `watch` named optimizer step 3 alone while
    `inspect` named both; it now says `step 3 (training step 2)`, and its JSON holds
    `nonfinite_training_steps`."""
    trained(tmp_path / "run", monkeypatch, [0.5, 0.25, 0.75, math.nan])
    done = CliRunner().invoke(app, ["watch", str(tmp_path / "run"), "--once", "-f", "json"])
    state = json.loads(done.stdout)
    assert (state["nonfinite_steps"], state["nonfinite_training_steps"]) == ([3], [2])
    done = CliRunner().invoke(app, ["watch", str(tmp_path / "run"), "--once"])
    assert "recorded non-finite: step 3 (training step 2)" in done.stdout


def test_watch_shows_each_steps_training_step_reward_as_verl_logs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """watch's table showed each optimizer step's own mini-batch reward_mean (0 and 0.167 for
    training step 1, whose `critic/score/mean` verl logs as 0.0833) beside a non-finite line
    that already names verl's training steps. Each row now names its training step and shows
    that training step's reward, as verl logs it."""
    lines = trained(tmp_path / "run", monkeypatch, [0.5, 0.25, 0.75, 0.6])
    done = CliRunner().invoke(app, ["watch", str(tmp_path / "run"), "--once", "-f", "json"])
    assert done.exit_code == 0, done.output
    recent = json.loads(done.stdout)["recent"]
    assert [row["training_step"] for row in recent] == [1, 1, 2, 2]
    logged = [line["critic/score/mean"] for line in lines]
    assert [row["reward_mean"] for row in recent] == pytest.approx(
        [logged[0], logged[0], logged[1], logged[1]]
    )
    assert logged[0] == pytest.approx(1 / 12)
    done = CliRunner().invoke(app, ["watch", str(tmp_path / "run"), "--once"])
    header = next(line for line in done.stdout.splitlines() if "reward" in line and "┃" in line)
    assert header.split("┃")[:3] == [" step ", " training step ", " reward "]


def test_watch_stacks_its_headers_to_show_a_verl_recordings_table_whole_in_60_columns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The training step column took watch's table of a verl recording to 66 columns: at 60
    rich cut every header ('st…', 'training st…', 'rewa…', 'dri…'). The headers now stack a
    word a line where the table does not fit, as replay's do."""
    trained(tmp_path / "run", monkeypatch, [0.5, 0.25, 0.75, 0.6])
    done = CliRunner().invoke(
        app, ["watch", str(tmp_path / "run"), "--once"], env={"COLUMNS": "60"}
    )
    table = [line for line in done.stdout.splitlines() if "┃" in line or "│" in line]
    assert max(map(len, table)) <= 60 and not any("…" in line for line in table), table
    assert table[0].split("┃")[1] == " training "


@pytest.mark.parametrize("rollout", [1, 0])
def test_inspect_and_watch_number_training_steps_past_a_lost_rollout(
    job: tuple[Path, list[dict[str, Any]]], tmp_path: Path, rollout: int
) -> None:
    """The second rollout's step files (optimizer steps 4-7) deleted: the non-finite update
    (optimizer step 12, training step 4 in verl's log) was named training step 3 by `inspect`
    and `watch`, and watch's rows of steps 8-12 training steps 2 and 3: rollouts were
    numbered by their places among those left. They are numbered from their optimizer steps,
    as `diff` numbers them, from step 0 (the first rollout's deleted, from the first step
    left, they were training step 3 too)."""
    run, _ = job
    damaged = damaged_copy(run, tmp_path, range(4 * rollout, 4 * rollout + 4))
    done = CliRunner().invoke(app, ["inspect", str(damaged), "--format", "json"])
    observed = json.loads(done.stdout)["observed"]
    assert (observed["nonfinite_steps"], observed["nonfinite_training_steps"]) == ([12], [4])
    done = CliRunner().invoke(app, ["watch", str(damaged), "--once", "-f", "json"])
    state = json.loads(done.stdout)
    assert state["nonfinite_training_steps"] == [4]
    recent = {row["step"]: row["training_step"] for row in state["recent"]}
    kept = [n for n in range(12) if n // 4 != rollout]
    assert recent == {n: n // 4 + 1 for n in kept} | {12: 4}


def test_rollouts_that_each_lost_a_step_keep_their_training_steps(
    job: tuple[Path, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps 1, 5 and 9 deleted (one of each whole rollout's 4): no rollout was read whole, so
    none told their length and the rollouts after the first were not numbered: watch showed
    training step `None` on steps 4-12 and diff compared training step 1 alone (only_b
    [2, 4]), training step 4 not at all. A rollout whose step before the next start was read
    is that long."""
    run, lines = job
    damaged = damaged_copy(run, tmp_path, (1, 5, 9))
    done = CliRunner().invoke(app, ["watch", str(damaged), "--once", "-f", "json"])
    recent = {row["step"]: row["training_step"] for row in json.loads(done.stdout)["recent"]}
    assert recent == {n: n // 4 + 1 for n in range(13) if n not in (1, 5, 9)}
    code, result = diff(damaged, imported(tmp_path, lines, monkeypatch))
    assert code == 0, result  # training steps 1-3 lack a step: not compared
    assert (result["unreadable_a"], result["common"]) == ([[1, 3]], 1)


def test_watch_shows_a_training_step_the_recording_does_not_tell_as_a_dash(
    job: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """Steps 2-3 (the first rollout's last) and 6-12 deleted: no rollout tells their length
    (2 or 4), so steps 4-5 have no training step; the table showed it as 'None'."""
    run, _ = job
    damaged = damaged_copy(run, tmp_path, (2, 3, *range(6, 13)))
    done = CliRunner().invoke(app, ["watch", str(damaged), "--once"], env={"COLUMNS": "100"})
    cells = {
        int(row.split("│")[0]): row.split("│")[1].strip()
        for row in done.stdout.splitlines()
        if "│" in row
    }
    assert cells == {0: "1", 1: "1", 4: "-", 5: "-"}, done.stdout


def diffed(run: Path, log: Path) -> tuple[list[str], dict[str, Any]]:
    """`stabledrl diff RUN LOG`'s table lines and its JSON document."""
    table = CliRunner().invoke(app, ["diff", str(run), str(log), "--device", "cpu"])
    document = CliRunner().invoke(
        app, ["diff", str(run), str(log), "--device", "cpu", "--format", "json"]
    )
    return table.stdout.splitlines(), json.loads(document.stdout)


def test_lr_compared_where_verls_log_has_it_is_not_said_to_be_uncompared(
    plain_job: tuple[Path, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verl's log imports its `actor/lr` a step later (the lr a step's update used), so its
    first step has none; the table said `not compared, recorded by A only: lr` while it
    compared lr at every later step. The recording's lr is compared at training step 2, the
    log's first with one: the table says so beside the steps it lacks it (`lr (compared at the
    1 step both record it)`), and the JSON's `unshared_compared` counts it; reward_mean, which
    this log never holds, is still listed alone."""
    run, logged = plain_job
    lines, document = diffed(run, imported(tmp_path, logged, monkeypatch))
    assert document["unshared"] == {"a": ["lr", "reward_mean"], "b": []}
    assert document["unshared_compared"] == {"lr": 1}
    expected = "not compared, recorded by A only: lr (compared at the 1 step both record it), "
    assert any(line.startswith(expected) for line in lines), lines
    assert document["parted_at"] is None


def test_an_lr_the_log_differs_in_parts_at_the_step_it_was_compared(
    plain_job: tuple[Path, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same log with training step 1's actor/lr (the lr of step 2's updates) doubled: the
    runs part at step 2 on lr, the step the table names as lr's compared one."""
    run, logged = plain_job
    changed = [dict(metrics) for metrics in logged]
    changed[0]["actor/lr"] = 2 * changed[0]["actor/lr"]
    lines, document = diffed(run, imported(tmp_path, changed, monkeypatch))
    assert document["parted_at"] == 2
    assert [f["field"] for f in document["first"]["scalars"]["fields"]] == ["lr"]
    assert document["unshared_compared"] == {"lr": 1}
    assert "scalars     part at step 2" in lines


# -- non-finite counts of a job blown up at its first update (BLOWN_UP) ----------------------
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
