"""The TRL integration against a real `trl.GRPOTrainer` (1.16.x) on CPU: what it refuses
(a trl of another version, a config no policy expresses, a run directory it cannot take)
and how a training resumed from TRL's checkpoint is recorded. The tiny run (tests/_trl.py),
recorded and checked against TRL's log: tests/test_integration_trl.py.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _cli import cli_command, record_python
from _trl import (
    SCRIPTS,
    TRAINERS,
    child_env,
    logged_steps,
    tiny,
    train,
)

import stabledrl_cli as sd
from stabledrl_cli.errors import InputError, MissingExtraError, UsageError, install_command
from stabledrl_cli.integrations import trl as integration

__all__ = ["tiny"]  # the tiny run's fixture (tests/_trl.py)


# -- the module without trl, and the version gate --------------------------------------------
@pytest.mark.parametrize("trainer", TRAINERS)
def test_missing_trl_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch, trainer: str
) -> None:
    def absent(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", absent)
    with pytest.raises(MissingExtraError, match=re.escape(install_command("trl"))):
        getattr(integration, trainer)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_other_trl_version_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch, trainer: str
) -> None:
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.17.0")
    with pytest.raises(UsageError, match=r"supports trl 1\.16\.x; found trl 1\.17\.0") as info:
        getattr(integration, trainer)
    assert "\n" not in str(info.value)


def test_package_imports_without_trl() -> None:
    code = (
        "import sys; sys.modules['trl'] = None\n"
        "import stabledrl_cli, stabledrl_cli.integrations.trl as m\n"
        "print(m.policy_for_config.__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=child_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "trl" not in done.stderr


# -- a config no policy expresses, a run directory the trainer cannot take -------------------
REFUSED = [
    ({"loss_type": "sapo", "importance_sampling_level": "sequence"}, "sequence-level"),
    ({"loss_type": "cispo", "importance_sampling_level": "sequence"}, "'dapo', 'luspo', 'vespo'"),
    ({"loss_type": "grpo", "entropy_coef": 0.01}, "entropy bonus"),
    # was a TypeError traceback (int(None)) at construction
    ({"loss_type": "dr_grpo", "max_completion_length": None}, "max_completion_length"),
]


@pytest.mark.parametrize(("config", "reason"), REFUSED)
def test_inexpressible_config_is_refused_in_one_line(
    tiny: Any, config: dict[str, Any], reason: str
) -> None:
    with pytest.raises(UsageError, match="cannot record this TRL run") as info:
        integration.policy_for_config(tiny.tiny_config("unused", **config))
    assert reason in str(info.value)
    assert "\n" not in str(info.value)


def test_a_refused_config_under_record_is_one_line_and_exit_2(tiny: Any, tmp_path: Path) -> None:
    """The trainer refuses the config inside the user's script: `record` says why in one line,
    no traceback, and exits with a usage error's code."""
    script = (
        "from tiny_grpo import *\n"
        "from stabledrl_cli.integrations.trl import RecordingGRPOTrainer\n"
        "RecordingGRPOTrainer(model=tiny_model(), reward_funcs=count_b,\n"
        "    args=tiny_config('o', loss_type='cispo', importance_sampling_level='sequence'),\n"
        "    train_dataset=tiny_dataset(), processing_class=tiny_tokenizer())\n"
    )
    done, errors = record_python(script, cwd=tmp_path, env=child_env())
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert errors == [
        "error: cannot record this TRL run: sequence-level sampling with loss_type 'cispo'; "
        "only 'grpo', 'bnpo', 'dr_grpo', 'dapo', 'luspo', 'vespo' map"
    ], done.stderr


@pytest.mark.parametrize("trainer", TRAINERS)
def test_no_run_directory_is_a_usage_error(
    tiny: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, trainer: str
) -> None:
    monkeypatch.delenv("STABLEDRL_RUN_DIR", raising=False)
    config = tiny.tiny_rloo_config if "RLOO" in trainer else tiny.tiny_config
    with pytest.raises(UsageError, match=f"{trainer} needs a run directory: pass stabledrl_out"):
        getattr(integration, trainer)(
            **tiny.tiny_parts(),
            args=config(str(tmp_path / "trl_out")),
        )


def test_stabledrl_force_false_does_not_replace_the_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """$STABLEDRL_FORCE=false read as true (any text but empty or 0 did): the trainer replaced
    the run. It is off now, and text that is no switch is refused naming it."""
    from stabledrl_cli.integrations._trl_run_dir import run_dir

    monkeypatch.setenv("STABLEDRL_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("STABLEDRL_FORCE", "false")
    assert run_dir(None, False, "RecordingGRPOTrainer") == (tmp_path / "run", False)
    monkeypatch.setenv("STABLEDRL_FORCE", "yes")
    assert run_dir(None, False, "RecordingGRPOTrainer") == (tmp_path / "run", True)
    monkeypatch.setenv("STABLEDRL_FORCE", "maybe")
    with pytest.raises(UsageError, match=re.escape("$STABLEDRL_FORCE='maybe': not a switch")):
        run_dir(None, False, "RecordingGRPOTrainer")


def test_a_run_directory_other_than_records_out_is_refused_in_one_line(
    tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under `stabledrl record --out other`, a trainer given stabledrl_out="mine" would record
    into mine while the optimizer hooks stand down: record then found no step in other and
    said no optimizer.step() ran. The trainer refuses it before training, in one line. Here
    record's $STABLEDRL_RUN_DIR is set in this process: the refusal is raised where the one of
    test_a_refused_config_under_record_is_one_line_and_exit_2 is (the trainer's construction),
    which shows that record prints it as one line and exits 2."""
    monkeypatch.setenv("STABLEDRL_RUN_DIR", str(tmp_path / "other"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError) as refused:
        integration.RecordingGRPOTrainer(
            **tiny.tiny_parts(), args=tiny.tiny_config("o", max_steps=1), stabledrl_out="mine"
        ).train()
    assert str(refused.value) == (
        "RecordingGRPOTrainer's stabledrl_out=mine is not the run directory of "
        f"`stabledrl record --out` ($STABLEDRL_RUN_DIR), {tmp_path / 'other'}: leave "
        "stabledrl_out out (it defaults to record's --out) or give both the same directory"
    )
    assert not (tmp_path / "mine").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("trainer", TRAINERS)
def test_an_overwrite_that_is_not_true_or_false_is_refused_and_the_run_kept(
    tiny: Any, tmp_path: Path, trainer: str
) -> None:
    """Before: stabledrl_overwrite="false" (a config's text) was taken for its truth value,
    and train() replaced the run's steps with its own."""
    out = tmp_path / "run"
    with sd.Recorder(out, policy=None) as recorder:
        recorder.log_step(0, loss=1.0)
    config = tiny.tiny_rloo_config if "RLOO" in trainer else tiny.tiny_config
    with pytest.raises(UsageError) as refused:
        getattr(integration, trainer)(
            **tiny.tiny_parts(),
            args=config(str(tmp_path / "trl_out")),
            stabledrl_out=out,
            stabledrl_overwrite="false",
        )
    assert str(refused.value) == "stabledrl_overwrite must be True or False, not str"
    assert sd.open_run(out).step_numbers == [0]


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("", "stabledrl_out is empty: name the run's directory"),
        (3, "stabledrl_out must be a str or a path object, not int"),
    ],
)
def test_a_run_directory_that_names_no_directory_is_refused_at_construction(
    tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out: object, message: str
) -> None:
    """Before: stabledrl_out="" was taken for the working directory (train() then raised 'DIR
    already exists and is not empty', or with stabledrl_overwrite=True made it a run), and 3
    raised TypeError from pathlib."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError) as refused:
        integration.RecordingGRPOTrainer(
            **tiny.tiny_parts(), args=tiny.tiny_config(str(tmp_path / "trl_out")), stabledrl_out=out
        )
    assert str(refused.value) == message
    assert list(tmp_path.iterdir()) == []


def test_records_out_given_again_as_stabledrl_out_is_taken(
    tiny: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The same directory, named another way (relative to the working directory), is no
    conflict."""
    from stabledrl_cli.integrations._trl_run_dir import run_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STABLEDRL_RUN_DIR", str(tmp_path / "run"))
    assert run_dir("run", False, "RecordingGRPOTrainer") == (Path("run"), False)


@pytest.fixture(scope="module")
def checkpointed(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny run with TRL's default loss, trained and recorded once for the module's tests
    that only read it or resume from it: its run directory ("run", which a test that writes
    to it copies first), TRL's checkpoint at step 2 ("checkpoint") and TRL's log
    ("log_history"). Checkpointing (save_steps=2) does not change what is trained."""
    out = tmp_path_factory.mktemp("checkpointed") / "run"
    trainer = train(tiny, out, save_strategy="steps", save_steps=2)
    return {
        "run": out,
        "checkpoint": out.parent / "trl_out" / "checkpoint-2",
        "log_history": trainer.state.log_history,
    }


def test_groups_rewards_and_advantages(checkpointed: dict[str, Any]) -> None:
    """Global group ids and rewards travel with TRL's shuffled rows: recomputing each group's
    z-scored advantages from the recorded rewards gives the recorded advantages. Steps 1-2 are
    the first pass over the one generation batch (steps 3-4 the second, num_iterations=2)."""
    out = checkpointed["run"]
    rows: dict[int, list[tuple[float, float]]] = {}
    for step in sd.open_run(out).steps(1, 3):
        seq_id, adv = step["seq_id"], step["advantages"]
        for i, (group, reward) in enumerate(
            zip(step["group_id"].tolist(), step["reward"].tolist(), strict=True)
        ):
            rows.setdefault(group, []).append((reward, float(adv[seq_id == i][0])))
    run = sd.open_run(out)
    assert run.group_ids == "global"
    meta = run.manifest["meta"]  # the recipe of the advantages: adv=zscore's
    assert meta["trainer"] == "GRPOTrainer"
    assert meta["scale_rewards"] == "group" and meta["reward_weights"] == [1.0]
    assert meta["multi_objective_aggregation"] == "sum_then_normalize"
    split = torch.cat([step["group_split"] for step in run.steps(1, 3)])
    assert split.any()  # a group of 4 rows cut by the 2-step shuffle is marked, not hidden
    assert sorted(rows) == list(range(4))  # one generation: 4 prompts
    for members in rows.values():
        assert len(members) == 4  # num_generations, whole across the steps
        rewards = torch.tensor([r for r, _ in members])
        expected = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
        assert torch.allclose(torch.tensor([a for _, a in members]), expected, atol=1e-5)


# -- resume ----------------------------------------------------------------------------------
def _tiny_trainer(tiny: Any, tmp_path: Path, out: Path) -> Any:
    """A recording trainer of the tiny run with TRL's default loss into `out`, untrained (its
    output_dir, which holds no checkpoint, in `tmp_path`)."""
    return integration.RecordingGRPOTrainer(
        **tiny.tiny_parts(),
        args=tiny.tiny_config(str(tmp_path / "trl_out")),
        stabledrl_out=out,
    )


def test_resume_from_checkpoint_continues_the_run(
    tiny: Any, checkpointed: dict[str, Any], tmp_path: Path
) -> None:
    """A run checkpointed at step 2 and resumed: steps 1-2 kept, 3-4 replaced by the resumed
    training's, and the replay still matches TRL's log of the resumed part."""
    out = tmp_path / "run"
    shutil.copytree(checkpointed["run"], out)
    kept = {s.step: s.scalars["loss"] for s in sd.open_run(out).steps(1, 3)}
    trainer = integration.RecordingGRPOTrainer(
        **tiny.tiny_parts(),
        args=tiny.tiny_config(str(tmp_path / "trl_out"), learning_rate=1e-2),
        stabledrl_out=out,
    )
    trainer.train(resume_from_checkpoint=str(checkpointed["checkpoint"]))
    run = sd.open_run(out)
    assert run.step_numbers == [1, 2, 3, 4]
    assert {s.step: s.scalars["loss"] for s in run.steps(1, 3)} == kept
    resumed = logged_steps(trainer.state.log_history)  # steps 1-2 come from the checkpoint
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in run.steps(3, 5):
        assert step.scalars["grad_norm"] == resumed[step.step]["grad_norm"]
    assert checkpointed["log_history"] != trainer.state.log_history


def test_resume_into_a_new_run_directory_records_from_the_checkpoint(
    tiny: Any, checkpointed: dict[str, Any], tmp_path: Path
) -> None:
    """Resumed from checkpoint-2 into a run directory that holds no run (the first part was
    not recorded, or elsewhere): training runs and the new run holds TRL's steps 3-4."""
    out = tmp_path / "resumed"
    trainer = _tiny_trainer(tiny, tmp_path, out)
    trainer.train(resume_from_checkpoint=str(checkpointed["checkpoint"]))
    assert trainer.state.global_step == 4
    run = sd.open_run(out)
    assert run.step_numbers == [3, 4]
    logged = logged_steps(trainer.state.log_history)
    for step in run:
        assert step.scalars["grad_norm"] == logged[step.step]["grad_norm"]


@pytest.mark.parametrize("checkpoint", ["last", "absent", "unloadable", "not UTF-8"])
def test_a_resume_trl_refuses_leaves_the_run_as_it_was(
    tiny: Any, checkpointed: dict[str, Any], tmp_path: Path, checkpoint: str
) -> None:
    """train(resume_from_checkpoint=...) that TRL refuses with its own error: True with no
    checkpoint in output_dir, a checkpoint path that is not there, a checkpoint whose model
    weights are gone or whose trainer_state.json is not UTF-8 (ones TRL cannot load). With
    overwrite (the resumed command under `stabledrl record --force`) too, the run's steps are
    all still there: none was removed for a training that never ran. TRL's error is its own,
    not shown as raised while handling one of the recorder's."""
    out = tmp_path / "run"
    shutil.copytree(checkpointed["run"], out)
    trainer = integration.RecordingGRPOTrainer(
        **tiny.tiny_parts(),
        args=tiny.tiny_config(str(tmp_path / "trl_out")),  # holds no checkpoint
        stabledrl_out=out,
        stabledrl_overwrite=True,
    )
    path = tmp_path / "checkpoint-2"
    if checkpoint in ("unloadable", "not UTF-8"):
        shutil.copytree(checkpointed["checkpoint"], path)
    if checkpoint == "unloadable":
        (path / "model.safetensors").unlink()
    if checkpoint == "not UTF-8":
        (path / "trainer_state.json").write_bytes(b'{"global_step": 2, "note": "\xff"}')
    resume = True if checkpoint == "last" else str(path)
    said = "codec can't decode" if checkpoint == "not UTF-8" else "checkpoint"
    with pytest.raises(ValueError, match=said) as info:  # TRL's (transformers') own error
        trainer.train(resume_from_checkpoint=resume)
    assert info.value.__context__ is None
    assert sd.open_run(out).step_numbers == [1, 2, 3, 4]


def test_a_checkpoint_whose_rng_state_trl_cannot_load_leaves_the_run_as_it_was(
    tiny: Any, checkpointed: dict[str, Any], tmp_path: Path
) -> None:
    """transformers loads a checkpoint's RNG state only as the epoch's training starts, after
    its on_train_begin: a truncated rng_state.pth (a save killed mid-write) makes train()
    raise there, before any step. The run's steps 1-4 are all still there, none removed for
    a resume that never trained."""
    out = tmp_path / "run"
    shutil.copytree(checkpointed["run"], out)
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(checkpointed["checkpoint"], checkpoint)
    rng = checkpoint / "rng_state.pth"
    rng.write_bytes(rng.read_bytes()[:100])
    trainer = _tiny_trainer(tiny, tmp_path, out)
    with pytest.raises(RuntimeError, match="checkpoint file is corrupted"):  # torch's own
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 2  # no step trained
    assert sd.open_run(out).step_numbers == [1, 2, 3, 4]


def test_a_corrupt_earlier_step_warns_once_and_the_resume_trains(
    tiny: Any, checkpointed: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Resumed into a run whose step 1 file has a flipped byte: the Recorder cannot continue
    the run (it verifies the steps it keeps) and changes nothing. As for a checkpoint whose
    trainer_state.json cannot be read, that is one warning line and TRL's training runs
    unrecorded, the run's steps as they were."""
    out = tmp_path / "run"
    shutil.copytree(checkpointed["run"], out)
    step_file = out / "steps" / "step-00000001.safetensors"
    data = bytearray(step_file.read_bytes())
    data[-10] ^= 0xFF
    step_file.write_bytes(bytes(data))
    trainer = _tiny_trainer(tiny, tmp_path, out)
    trainer.train(resume_from_checkpoint=str(checkpointed["checkpoint"]))
    assert trainer.state.global_step == 4
    warnings = [line for line in capsys.readouterr().err.splitlines() if "stabledrl:" in line]
    assert len(warnings) == 1, warnings
    assert "step 1 (step-00000001.safetensors) is unreadable" in warnings[0]
    assert warnings[0].endswith("recording is off, training continues")
    assert sd.open_run(out, verify=False).step_numbers == [1, 2, 3, 4]


def _files(run: Path) -> dict[str, bytes]:
    """Every file under `run`, by its path in it: what a refused resume must leave as it was."""
    return {str(f.relative_to(run)): f.read_bytes() for f in sorted(run.rglob("*")) if f.is_file()}


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (
            {"loss_type": "grpo"},
            "its policy is 'dapo:agg=recorded,eps_high=0.2', this recorder's 'grpo'",
        ),
        (
            {"epsilon": 0.1},
            "its policy is 'dapo:agg=recorded,eps_high=0.2', "
            "this recorder's 'dapo:agg=recorded,eps_high=0.1,eps_low=0.1'",
        ),
        ({"world_size": 2}, "its world_size is 2, this recorder's 1"),
    ],
    ids=["loss_type", "epsilon", "world_size"],
)
def test_a_resume_the_run_cannot_take_warns_once_and_trains(
    tiny: Any,
    checkpointed: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, Any],
    said: str,
) -> None:
    """Resumed into the run by a trainer whose policy is another (a changed loss_type, or
    epsilon), or by another world size than the run's (a run its manifest says 2 ranks
    recorded): the Recorder cannot continue the run and changes nothing. As for a corrupt
    earlier step, that is one warning line naming both, and TRL's training runs to its end
    unrecorded, every file of the run as it was."""
    out = tmp_path / "run"
    shutil.copytree(checkpointed["run"], out)
    if "world_size" in change:
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["world_size"] = change.pop("world_size")
        (out / "manifest.json").write_text(json.dumps(manifest))
    before = _files(out)
    trainer = integration.RecordingGRPOTrainer(
        **tiny.tiny_parts(), args=tiny.tiny_config(str(tmp_path / "trl_out"), **change),
        stabledrl_out=out,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=str(checkpointed["checkpoint"]))
    assert trainer.state.global_step == 4
    warnings = [line for line in capsys.readouterr().err.splitlines() if "stabledrl:" in line]
    assert warnings == [
        f"stabledrl: warning: recording the run failed: cannot resume {out}: {said}; "
        "recording is off, training continues"
    ]
    assert _files(out) == before


def test_resume_under_stabledrl_record_with_force_keeps_the_earlier_steps(
    checkpointed: dict[str, Any], tmp_path: Path
) -> None:
    """docs/frameworks.md's resume under `stabledrl record`: the resumed command needs --force (the
    run directory is not empty), and the run keeps steps 1-2 and continues with 3-4. The
    first training is the module's checkpointed run, which is resume_train.py's (the same
    config, checkpointed every 2 steps), trained once in this process."""
    shutil.copy(SCRIPTS / "resume_train.py", tmp_path / "train.py")
    shutil.copytree(checkpointed["run"], tmp_path / "run")
    shutil.copytree(checkpointed["checkpoint"], tmp_path / "trl_out" / "checkpoint-2")
    record = [*cli_command(), "record", "--out", "run"]
    script = [sys.executable, "train.py"]
    kept = {s.step: s.scalars["loss"] for s in sd.open_run(tmp_path / "run").steps(1, 3)}
    again = [*record, "--", *script, "trl_out/checkpoint-2"]
    done = subprocess.run(again, cwd=tmp_path, env=child_env(), capture_output=True, text=True)
    assert done.returncode == 2 and "pass --force" in done.stderr
    resumed = [*record, "--force", "--", *script, "trl_out/checkpoint-2"]
    done = subprocess.run(resumed, cwd=tmp_path, env=child_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    run = sd.open_run(tmp_path / "run")
    assert run.step_numbers == [1, 2, 3, 4]
    assert {s.step: s.scalars["loss"] for s in run.steps(1, 3)} == kept


def test_a_resume_with_other_advantage_settings_keeps_the_runs_meta(
    tiny: Any, checkpointed: dict[str, Any], tmp_path: Path
) -> None:
    """What docs/frameworks.md says of a resume whose trainer makes its advantages otherwise
    (scale_rewards="batch", the run's "group"): the policy spec is the same, so the run
    continues (steps 3-4 replaced), and its manifest's meta is still the first training's."""
    out = tmp_path / "run"
    shutil.copytree(checkpointed["run"], out)
    trainer = integration.RecordingGRPOTrainer(
        **tiny.tiny_parts(),
        args=tiny.tiny_config(str(tmp_path / "trl_out"), scale_rewards="batch"),
        stabledrl_out=out,
    )
    trainer.train(resume_from_checkpoint=str(checkpointed["checkpoint"]))
    run = sd.open_run(out)
    assert run.step_numbers == [1, 2, 3, 4]
    assert run.manifest["meta"]["scale_rewards"] == "group"


def test_a_new_training_into_an_existing_run_is_refused_before_it_trains(
    tiny: Any, checkpointed: dict[str, Any], tmp_path: Path
) -> None:
    """Not a resume: train() without resume_from_checkpoint into a directory that holds a run
    (another process's: a fresh script given the old DIR), without stabledrl_overwrite, is
    refused as its first step begins (UsageError, nothing trained), the run as it was."""
    out = tmp_path / "run"
    shutil.copytree(checkpointed["run"], out)
    before = _files(out)
    trainer = _tiny_trainer(tiny, tmp_path, out)
    with pytest.raises(UsageError, match="already exists and is not empty"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert _files(out) == before


def test_a_resume_by_another_policy_under_stabledrl_record_trains_and_exits_2(
    checkpointed: dict[str, Any], tmp_path: Path
) -> None:
    """docs/frameworks.md's resume under `stabledrl record --force`, with another loss_type than the
    run's: one warning line, the training runs to its end (TRL saves checkpoint-4), the run's
    steps and manifest are as they were (the `recording_closed` mark too, which record
    --force removes while the command runs and puts back, the command having changed nothing
    of the run: before, it stayed gone and a watch of the run never ended), and record exits
    2, the usage error's code."""
    shutil.copy(SCRIPTS / "resume_train.py", tmp_path / "train.py")
    shutil.copytree(checkpointed["run"], tmp_path / "run")
    shutil.copytree(checkpointed["checkpoint"], tmp_path / "trl_out" / "checkpoint-2")
    before = _files(tmp_path / "run")
    resumed = [
        *cli_command("record", "--out", "run", "--force"), "--",
        sys.executable, "train.py", "trl_out/checkpoint-2", "grpo",
    ]  # fmt: skip
    done = subprocess.run(resumed, cwd=tmp_path, env=child_env(), capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-2000:]
    warnings = [line for line in done.stderr.splitlines() if "stabledrl: warning" in line]
    assert len(warnings) == 1, warnings
    assert "this recorder's 'grpo'; recording is off, training continues" in warnings[0]
    assert (tmp_path / "trl_out" / "checkpoint-4" / "trainer_state.json").is_file()
    after = _files(tmp_path / "run")
    assert after == before


CRAFTED_STATES = {
    "not UTF-8": (b'{"global_step": 2, "note": "\xff"}', "not UTF-8 JSON"),
    "UTF-16": ('{"global_step": 2}'.encode("utf-16"), "not UTF-8 JSON"),
    "nested": (b'{"global_step": 2, "x": ' + b"[" * 99_999 + b"]" * 99_999 + b"}", "nested"),
    "a list": (b"[2]", "no global_step"),
    "no global_step": (b'{"log_history": []}', "no global_step"),
    "a text step": (b'{"global_step": "2"}', "no global_step"),
    "a fractional step": (b'{"global_step": 2.5}', "no global_step"),
    "a true step": (b'{"global_step": true}', "no global_step"),
    "a negative step": (b'{"global_step": -1}', "no global_step"),
    "a NaN step": (b'{"global_step": NaN}', "no global_step"),
    "a repeated key": (b'{"global_step": 2, "global_step": 3}', "appears twice"),
    "a long integer": (b'{"global_step": ' + b"9" * 5000 + b"}", "digits"),
}


@pytest.mark.parametrize("case", list(CRAFTED_STATES))
def test_a_crafted_trainer_state_is_refused_in_one_line(
    tiny: Any, tmp_path: Path, case: str
) -> None:
    """The checkpoint's trainer_state.json is read as every JSON input is (UTF-8, strict,
    bounded): one InputError line saying why, never a traceback's exception."""
    from stabledrl_cli.integrations._trl_run_dir import resume_step

    raw, reason = CRAFTED_STATES[case]
    (tmp_path / "trainer_state.json").write_bytes(raw)
    with pytest.raises(InputError, match=reason) as info:
        resume_step(None, str(tmp_path))
    assert str(info.value).startswith(str(tmp_path / "trainer_state.json"))
    assert "\n" not in str(info.value)


def test_a_trainer_state_with_non_finite_metrics_resumes_at_its_step(
    tiny: Any, tmp_path: Path
) -> None:
    """Python's JSON writer, transformers' too, writes a NaN or infinite metric as NaN or
    Infinity: a real checkpoint's log_history may hold them."""
    from stabledrl_cli.integrations._trl_run_dir import resume_step

    state = {"global_step": 2, "log_history": [{"grad_norm": math.nan, "loss": math.inf}]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    assert resume_step(None, str(tmp_path)) == 2


def test_a_trainer_state_past_the_size_bound_is_refused_unread(tiny: Any, tmp_path: Path) -> None:
    from stabledrl_cli.importers._files import DOCUMENT_LIMIT
    from stabledrl_cli.integrations._trl_run_dir import resume_step

    with open(tmp_path / "trainer_state.json", "wb") as state:
        state.truncate(DOCUMENT_LIMIT + 1)  # sparse: no disk used
    with pytest.raises(InputError, match="over the 128 MiB import limit"):
        resume_step(None, str(tmp_path))
    (tmp_path / "trainer_state.json").unlink()
    os.mkfifo(tmp_path / "trainer_state.json")  # no writer: a plain read waits for ever
    with pytest.raises(InputError, match="not a regular file"):
        resume_step(None, str(tmp_path))


def test_a_checkpoint_stabledrl_cannot_read_warns_once_and_training_runs(
    tiny: Any,
    checkpointed: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A checkpoint whose trainer_state.json has no global_step, which TRL loads (its step
    defaults to 0): recording is off with one warning line, and TRL's training runs."""
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(checkpointed["checkpoint"], checkpoint)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    del state["global_step"]
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    out = tmp_path / "run"
    trainer = _tiny_trainer(tiny, tmp_path, out)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 4
    warnings = [line for line in capsys.readouterr().err.splitlines() if "stabledrl:" in line]
    assert warnings == [
        "stabledrl: warning: recording the resumed training: "
        f"{checkpoint / 'trainer_state.json'}: not a trainer_state.json (no global_step: a "
        "whole number >= 0); recording is off, training continues"
    ]
    assert not out.exists()
