"""Multi-rank runs with real processes: 2 ranks under torchrun on gloo (CPU), each logging its
shard of every step (tests/multirank_scripts/shard_train.py, a plain PyTorch GRPO loop).

The three launches (2 ranks under `stabledrl record`, the same training in one process, and
2 ranks of which one dies) run at once, in one module fixture.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from _cli import cli_command
from safetensors.numpy import load_file
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app

SCRIPT = Path(__file__).resolve().parent / "multirank_scripts" / "shard_train.py"
ROOT = Path(__file__).resolve().parents[1]
STEPS, DIE_AT = 6, 3
LOGGED_SCALARS = ("step", "loss", "grad_norm", "inner_step", "reward_mean", "nonfinite")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
RECORD = [*cli_command(), "record", "--policy", "grpo", "--out"]


def _env() -> dict[str, str]:
    """A child's environment: this checkout first on the path, no run directory inherited."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    for name in ("STABLEDRL_RUN_DIR", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    return env


@dataclass
class Launched:
    two_ranks: Path
    """`stabledrl record -- torchrun` of 2 ranks, each with log_policy_batch."""
    one_process: Path
    """`stabledrl record -- python` of the same training in one process."""
    dead: Path
    """2 ranks, a Recorder each; rank 1 exits abruptly in step DIE_AT."""
    dead_returncode: int


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Launched:
    tmp = tmp_path_factory.mktemp("multirank")
    runs = Launched(tmp / "two", tmp / "one", tmp / "dead", 0)
    commands = {
        "two": [*RECORD, str(runs.two_ranks), "--", *TORCHRUN, str(SCRIPT)],
        "one": [*RECORD, str(runs.one_process), "--", sys.executable, str(SCRIPT), "--one-process"],
        "dead": [*TORCHRUN, str(SCRIPT), "--out", str(runs.dead), "--die-at", str(DIE_AT)],
    }
    processes = {
        name: subprocess.Popen(
            cmd, cwd=tmp, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for name, cmd in commands.items()
    }
    outputs = {name: p.communicate(timeout=300)[0] for name, p in processes.items()}
    for name in ("two", "one"):
        assert processes[name].returncode == 0, outputs[name][-3000:]
    runs.dead_returncode = processes["dead"].returncode
    return runs


def _replay_json(run: Path, *args: str) -> tuple[dict, str]:
    result = CliRunner().invoke(app, ["replay", str(run), "--format", "json", "--detail", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.stderr


def _rank_files(run: Path, rank: int) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (run / "steps").glob(f"*.rank-{rank:04d}.safetensors")}


# -- the merged run ----------------------------------------------------------------------------
def test_each_rank_writes_its_shard_under_record(launched: Launched) -> None:
    names = sorted(p.name for p in (launched.two_ranks / "steps").iterdir())
    assert names == [f"step-{s:08d}.rank-{r:04d}.safetensors" for s in range(STEPS) for r in (0, 1)]
    run = sd.open_run(launched.two_ranks)
    assert run.manifest["world_size"] == 2 and run.group_ids == "global"
    assert run.integrity.ok
    assert [s.num_sequences for s in run] == [12] * STEPS


def test_replay_of_the_merged_run_equals_the_one_process_recording(launched: Launched) -> None:
    merged, _ = _replay_json(launched.two_ranks)
    single, _ = _replay_json(launched.one_process)
    assert merged.pop("run") != single.pop("run")
    assert merged == single  # every policy, summary and per-step row
    assert [row["step"] for row in merged["policies"][0]["steps"]] == list(range(STEPS))
    own = next(p for p in merged["policies"] if p["own"])
    assert own["spec"] == "grpo" and own["summary"]["loss_parity"] < 1e-6  # the loop's loss
    two, one = sd.open_run(launched.two_ranks), sd.open_run(launched.one_process)
    for a, b in zip(two, one, strict=True):  # the joined step is the one-process step, bitwise
        assert a.fields == b.fields
        for name in sorted(a.fields):
            np.testing.assert_array_equal(a[name].numpy(), b[name].numpy(), err_msg=name)
        for name in LOGGED_SCALARS:  # not wall_time (nor a step's time, were it recorded)
            assert a.scalars[name] == b.scalars[name], name


def test_a_group_split_across_ranks_stays_one_group(launched: Launched) -> None:
    steps = launched.two_ranks / "steps"
    shards = [load_file(steps / f"step-00000000.rank-{r:04d}.safetensors") for r in (0, 1)]
    assert shards[0]["group_id"].tolist() == [0, 0, 0, 0, 1, 1]  # group 1: two on each rank
    assert shards[1]["group_id"].tolist() == [1, 1, 2, 2, 2, 2]
    step = sd.open_run(launched.two_ranks).step(0)
    assert step["group_id"].tolist() == [0] * 4 + [1] * 4 + [2] * 4  # global ids: not offset
    assert step["seq_id"].unique().tolist() == list(range(12))
    # the advantages are centred on the whole group, across the ranks
    advantages = step["advantages"].view(12, -1)[:, 0].double()
    assert advantages.view(3, 4).sum(dim=1).abs().max() < 1e-6


# -- --force / overwrite --------------------------------------------------------------------------
def test_overwrite_on_one_rank_never_touches_another_ranks_files(
    launched: Launched, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(launched.two_ranks, run)
    manifest = (run / "manifest.json").read_bytes()
    rank0, rank1 = _rank_files(run, 0), _rank_files(run, 1)
    sd.Recorder(
        run, policy="grpo", world_size=2, rank=1, overwrite=True, group_ids="global"
    ).close()
    assert _rank_files(run, 0) == rank0 and _rank_files(run, 1) == {}
    assert (run / "manifest.json").read_bytes() == manifest  # rank 1 never writes it
    shutil.rmtree(run / "steps")
    shutil.copytree(launched.two_ranks / "steps", run / "steps")
    sd.Recorder(
        run, policy="grpo", world_size=2, rank=0, overwrite=True, group_ids="global"
    ).close()
    assert _rank_files(run, 1) == rank1 and _rank_files(run, 0) == {}


RANK1_ONLY = textwrap.dedent(
    """
    import numpy as np
    import stabledrl_cli as sd

    ok = sd.log_policy_batch(
        0, logp=np.zeros((6, 4), "float32"), logp_old=np.zeros((6, 4), "float32"),
        advantages=np.zeros(6, "float32"), group_id=np.array([1, 1, 2, 2, 2, 2]),
        recorder_kwargs={"group_ids": "global"},
    )
    assert ok
    """
)


def test_record_force_on_a_relaunched_rank_keeps_the_others_files(
    launched: Launched, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`stabledrl record --force` around rank 1 alone (a relaunched node): the bootstrap takes
    RANK and WORLD_SIZE from the environment and replaces rank 1's files only."""
    run = tmp_path / "run"
    shutil.copytree(launched.two_ranks, run)
    rank0 = _rank_files(run, 0)
    script = tmp_path / "rank1.py"
    script.write_text(RANK1_ONLY)
    for name, value in {**_env(), "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    cmd = ["record", "--out", str(run), "--policy", "grpo", "--force", "--", sys.executable]
    result = CliRunner().invoke(app, [*cmd, str(script)])
    assert result.exit_code == 0, result.output
    assert _rank_files(run, 0) == rank0
    assert sorted(_rank_files(run, 1)) == ["step-00000000.rank-0001.safetensors"]
    reread = sd.open_run(run)
    assert reread.step_numbers == [0]
    assert {f.step for f in reread.integrity.findings if f.kind == "missing_rank"} == {
        1,
        2,
        3,
        4,
        5,
    }


# -- a rank that dies ------------------------------------------------------------------------------
def test_a_dead_rank_leaves_the_other_ranks_steps_readable(launched: Launched) -> None:
    assert launched.dead_returncode != 0
    run = sd.open_run(launched.dead)
    assert sorted(_rank_files(launched.dead, 0)) == [
        f"step-{s:08d}.rank-0000.safetensors" for s in range(DIE_AT + 1)
    ]
    assert len(_rank_files(launched.dead, 1)) == DIE_AT
    assert run.step_numbers == list(range(DIE_AT))
    [finding] = run.integrity.findings
    assert (finding.kind, finding.step) == ("missing_rank", DIE_AT)
    assert "incomplete" in finding.message and "rank(s) [1]" in finding.message
    result = CliRunner().invoke(app, ["inspect", str(launched.dead), "--format", "json"])
    assert result.exit_code == 0, result.output
    inspected = json.loads(result.stdout)
    assert inspected["integrity"]["findings"] == [finding.to_dict()]


def test_the_complete_steps_of_a_dead_rank_run_replay(launched: Launched) -> None:
    dead, warning = _replay_json(launched.dead, "-p", "grpo")
    assert f"step {DIE_AT}: incomplete" in warning and "skipped 1" in warning
    assert dead["steps"] == DIE_AT
    whole, _ = _replay_json(launched.two_ranks, "-p", "grpo", "--steps", f"0:{DIE_AT}")
    # the same training up to its death: the same rows as the complete run's first steps
    assert dead["policies"][0]["steps"] == whole["policies"][0]["steps"]


# -- ranks that stop recording -----------------------------------------------------------------
BOTH_STOP = textwrap.dedent(
    """
    import errno, os
    import numpy as np
    import stabledrl_cli as sd

    rank, real_writev, failed = int(os.environ["RANK"]), os.writev, []

    def full_once(fd, buffers):  # the step's write fails; the notes after it go through
        if not failed:
            failed.append(fd)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_writev(fd, buffers)

    for step in range(5):
        if step == 2 + rank:
            os.writev = full_once
        sd.log_policy_batch(
            step, logp=np.zeros((6, 4), "float32"), logp_old=np.zeros((6, 4), "float32"),
            advantages=np.zeros(6, "float32"), group_id=np.array([0, 0, 1, 1, 2, 2]),
        )
    print(f"rank {rank} trained 5 steps")
    """
)


def test_both_ranks_that_stop_under_record_keep_their_notes(tmp_path: Path) -> None:
    """`stabledrl record -- torchrun` of 2 ranks whose disk refuses one write each (rank 0's
    step 2, rank 1's step 3): both train on. Before, the manifest's one note was the last
    rank's to stop, the other's stop was lost; each rank's note file now keeps its own."""
    run, script = tmp_path / "run", tmp_path / "both_stop.py"
    script.write_text(BOTH_STOP)
    result = subprocess.run(
        [*RECORD, str(run), "--", *TORCHRUN, str(script)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "rank 0 trained 5 steps" in result.stdout and "rank 1 trained 5 steps" in result.stdout
    assert result.returncode == 4, result.stderr[-3000:]
    shown = CliRunner().invoke(app, ["inspect", str(run)], env={"COLUMNS": "300"})
    assert shown.exit_code == 0, shown.output
    for rank, step in ((0, 2), (1, 3)):
        assert f"stopped at step {step} (rank {rank}):" in shown.stdout
    stops = sd.open_run(run).recording_stops
    assert [(n["rank"], n["step"]) for n in stops] == [(0, 2), (1, 3)]
