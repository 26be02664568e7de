"""`stabledrl branch`: branches of the built-in example from a run's checkpoints, recorded as
runs, judged beside the one-step replay; the environment protocol; exit 3 without checkpoints."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from stabledrl_cli.branching import BranchOutcome
from stabledrl_cli.capture.bootstrap import ENV_RUN_DIR
from stabledrl_cli.capture.branch_protocol import (
    ENV_BRANCH_AT,
    ENV_BRANCH_STEPS,
    ENV_POLICY_OVERRIDE,
    ENV_RESUME_CHECKPOINT,
    BranchRequest,
    checkpoints_dir,
)
from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import Recorder, open_run
from stabledrl_cli.errors import UsageError
from stabledrl_cli.example import ExampleConfig
from stabledrl_cli.example.__main__ import main as example_main
from stabledrl_cli.example.checkpoint import CheckpointPlan
from stabledrl_cli.example.run_setup import recorder_kwargs
from stabledrl_cli.example.trainer import train
from stabledrl_cli.policies import get_policy


def _record(out: Path, config: ExampleConfig, every: int | None) -> Path:
    plan = None if every is None else CheckpointPlan(directory=checkpoints_dir(out), every=every)
    with Recorder(out, **recorder_kwargs(config, get_policy(config.policy))) as recorder:
        train(config, recorder=recorder, checkpoints=plan)
    return out


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("branch") / "run"
        yield _record(out, ExampleConfig(seed=3, steps=24, pretrain_steps=20), every=8)
    finally:
        torch.set_num_threads(threads)


def test_branch_records_each_policy_as_a_run_and_reports_it_beside_the_replay(recorded):
    args = ["branch", str(recorded), "--at", "8", "-p", "grpo", "-p", "stabledrl"]
    result = CliRunner().invoke(app, [*args, "--rl-steps", "8", "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["requested_at"], report["at"], report["steps"]) == (8, 8, 8)
    assert report["original"] == {
        "first_reward_collapse": report["original"]["first_reward_collapse"],
        "not_judged": report["original"]["not_judged"],
        "skipped_steps": [],
        "stopped_at": None,
        "live": None,
    }
    assert [b["policy"] for b in report["branches"]] == ["grpo", "stabledrl"]
    for entry in report["branches"]:
        assert set(entry) == {
            "policy", "run", "steps", "collapsed", "first_reward_collapse", "not_judged",
            "final_reward", "diverged_at", "replay", "compared", "agree",
        }  # fmt: skip
        assert set(entry["replay"]) == {"collapsed_steps", "drift_steps", "flagged", "unjudged"}
        assert all(step >= 8 for step in entry["replay"]["collapsed_steps"])
        assert entry["collapsed"] is None  # 4 reward draws: the rule judges no step
        assert entry["first_reward_collapse"] is None and entry["not_judged"] is not None
        in_span = [s for s in entry["replay"]["collapsed_steps"] if s <= 15]
        assert entry["compared"] == {
            "first": 8, "last": 15, "branch_steps": 8, "replayed_steps": 8, "complete": True,
            "flagged": bool(in_span),
        }  # fmt: skip
        assert entry["agree"] is None
        run_dir = Path(entry["run"])
        assert run_dir == recorded / "branches" / f"{entry['policy']}@8"
        branch = open_run(run_dir)
        assert branch.step_numbers == list(range(8, 16)) and entry["steps"] == 8
        assert branch.policy_spec == entry["policy"]
        assert branch.manifest["meta"]["branch"]["at"] == 8
        assert branch.manifest["meta"]["example_config"]["policy"] == entry["policy"]

    # The run's own policy from its checkpoint is the original run, bit for bit.
    original, own = open_run(recorded), open_run(recorded / "branches" / "grpo@8")
    for n in own.step_numbers:
        assert torch.equal(original.step(n)["logp"], own.step(n)["logp"])

    again = CliRunner().invoke(app, [*args, "--rl-steps", "8"])
    assert again.exit_code == 2 and "not empty" in again.stderr
    assert "pass --force" in again.stderr, again.stderr  # the option that overwrites them


def test_a_branch_whose_collapse_the_rule_cannot_judge_is_not_called_held(recorded, tmp_path):
    """The fixture's 24 steps are 6 rollouts (mu = 4): a trajectory of the original's steps
    before 8 and a branch's 8 steps has 4 reward draws, fewer than the collapse window's 10,
    so the observed-collapse rule judges none of it. The table said 'held' for the original
    and each branch, and 'agree: yes' (JSON: collapsed false, agree true): a claim nothing
    measured."""
    args = ["branch", str(recorded), "--at", "8", "-p", "stabledrl", "--rl-steps", "8"]
    out = ["--out", str(tmp_path / "b"), "--force"]
    result = CliRunner().invoke(app, [*args, *out, "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    why = "the collapse rule judges no step"
    assert why in report["original"]["not_judged"]
    (entry,) = report["branches"]
    assert entry["collapsed"] is None and entry["first_reward_collapse"] is None
    assert entry["not_judged"] == (
        "the trajectory has 4 finite reward draws (one a rollout), no 10 in a row (the "
        f"collapse window): {why}"
    )
    assert entry["agree"] is None
    table = CliRunner().invoke(app, [*args, *out], env={"COLUMNS": "80"})
    assert table.exit_code == 0, table.output
    text = " ".join(table.stdout.split())
    assert "held" not in text and "the original run's collapse not judged" in text, text
    row = next(line for line in table.stdout.splitlines() if line.startswith("│ stabledrl"))
    cells = [c.strip() for c in row.strip("│").split("│")]
    assert cells[1].startswith("not judged") and cells[5] == "n/a", cells


def test_a_step_between_checkpoints_is_said_to_take_the_one_before(recorded, tmp_path):
    """--at 10 between the checkpoints at 8 and 16 branches at 8 (docs/branching.md: 'the
    nearest one before it'); the title said '(nearest checkpoint to 10)', which 8 is not
    always (checkpoints at 0 and 12: --at 10 took 0, 'nearest to 10')."""
    args = ["branch", str(recorded), "--at", "10", "-p", "grpo", "--rl-steps", "2"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    title = result.stdout.splitlines()[0]
    assert " at step 8 (the last checkpoint before step 10), 2 steps each;" in title, title


def test_the_protocol_round_trips_through_the_environment(tmp_path):
    request = BranchRequest(
        checkpoint=tmp_path / "step-00000008.pt",
        policy="dapo:eps_high=0.28",
        run_dir=tmp_path / "branch",
        at=8,
        steps=16,
    )
    env = request.to_env()
    assert env["STABLEDRL_RUN_DIR"] == str(tmp_path / "branch")
    assert env["STABLEDRL_POLICY_OVERRIDE"] == "dapo:eps_high=0.28"
    assert BranchRequest.from_env(env) == request
    assert BranchRequest.from_env({}) is None
    with pytest.raises(UsageError, match="STABLEDRL_BRANCH_AT"):
        BranchRequest.from_env({k: v for k, v in env.items() if k != ENV_BRANCH_AT})
    with pytest.raises(UsageError, match="integer"):
        BranchRequest.from_env({**env, ENV_BRANCH_AT: "eight"})
    assert ENV_RESUME_CHECKPOINT in env


def test_a_run_without_checkpoints_exits_3_saying_how_to_record_them(tmp_path):
    run = _record(tmp_path / "plain", ExampleConfig(seed=3, steps=2, pretrain_steps=1), None)
    result = CliRunner().invoke(app, ["branch", str(run), "--at", "0", "-p", "grpo"])
    assert result.exit_code == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--checkpoint-every" in lines[0]
    assert not (run / "branches").exists()


def test_an_unknown_policy_is_a_usage_error_whatever_the_run_holds(tmp_path):
    """`branch RUN -p nosuch` on a run without checkpoints said the run had none (exit 3): a
    typo reported as the run's fault. The specs are resolved before the run is read."""
    run = _record(tmp_path / "plain", ExampleConfig(seed=3, steps=2, pretrain_steps=1), None)
    result = CliRunner().invoke(app, ["branch", str(run), "--at", "0", "-p", "nosuch"])
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("error: unknown policy 'nosuch'; valid: ppo, grpo")


@pytest.mark.parametrize("steps", [["--rl-steps", "2"], []], ids=["rl-steps", "default"])
def test_a_run_with_no_step_after_the_checkpoint_exits_3_before_training(recorded, tmp_path, steps):
    """The original's steps from the checkpoint on are gone: there is no replay to set a branch
    beside. It trained the branches and reported `agree: yes` on nothing (with --rl-steps), or
    refused 'a branch must train >= 1 step, got 0' (exit 2) without."""
    run = tmp_path / "cut"
    shutil.copytree(recorded, run, ignore=shutil.ignore_patterns("branches"))
    for n in range(16, 24):
        (run / "steps" / f"step-{n:08d}.safetensors").unlink()
    result = CliRunner().invoke(app, ["branch", str(run), "--at", "16", "-p", "grpo", *steps])
    assert result.exit_code == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no step at or after step 16" in lines[0], lines
    assert "last step 15" in lines[0]
    assert not (run / "branches").exists()


def test_the_table_and_its_legend_fit_80_columns(recorded, tmp_path):
    """The legend under the table was one 600-character line at COLUMNS=80, and the table's
    title (which names the run) a line as long as the run's path."""
    args = ["branch", str(recorded), "--at", "8", "-p", "grpo", "--rl-steps", "2"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= 80, result.stdout
    assert (
        "n/a when partial, when the branch is not judged, or when the collapse is before the "
        "branch point (the original's), as the two would judge different spans"
        in " ".join(result.stdout.split())
    )


def test_a_replay_rule_that_judged_no_step_is_named_not_shown_as_none(recorded, tmp_path):
    """The fixture's 24 steps are fewer than the drift rule's window of 50: the replay judged
    no step's bias. The table said 'replay drift steps: none' (JSON `drift_steps: []`) and no
    more, where replay and tune say the rule judged nothing and its 0 says nothing."""
    args = ["branch", str(recorded), "--at", "8", "-p", "grpo", "--rl-steps", "2"]
    args += ["--out", str(tmp_path), "--force"]
    result = CliRunner().invoke(app, [*args, "-f", "json"])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(result.stdout)["branches"]
    assert entry["replay"]["drift_steps"] == []
    why = "the drift rule judges a step after 50 finite net_push values in a row"
    assert entry["replay"]["unjudged"]["drift"].startswith(why), entry["replay"]
    table = CliRunner().invoke(app, args, env={"COLUMNS": "80"})
    assert table.exit_code == 0, table.output
    assert max(len(line) for line in table.stdout.splitlines()) <= 80, table.stdout
    text = " ".join(table.stdout.split())
    assert f"replay drift steps: not judged ({why}" in text, text


def test_a_replay_that_covers_part_of_the_branch_says_so_and_does_not_judge(recorded, tmp_path):
    """The original holds steps 8-9 only from the checkpoint on, the branch trains 8-15: the
    replay covers 2 of its 8 steps. It reported `agree: true` comparing the two spans."""
    run = tmp_path / "cut"
    shutil.copytree(recorded, run, ignore=shutil.ignore_patterns("branches"))
    for n in range(10, 24):
        (run / "steps" / f"step-{n:08d}.safetensors").unlink()
    args = ["branch", str(run), "--at", "8", "-p", "grpo", "--rl-steps", "8"]
    result = CliRunner().invoke(app, [*args, "-f", "json"])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(result.stdout)["branches"]
    assert entry["steps"] == 8
    assert entry["compared"] == {
        "first": 8, "last": 15, "branch_steps": 8, "replayed_steps": 2, "complete": False,
        "flagged": False,
    }  # fmt: skip
    assert entry["agree"] is None
    table = CliRunner().invoke(app, [*args, "--force"])
    assert table.exit_code == 0, table.output
    (row,) = [line for line in table.stdout.splitlines() if line.startswith("│ grpo")]
    cells = [cell.strip() for cell in row.strip("│ ").split("│")]
    assert cells[-2:] == ["8-15 (partial: 2 of 8 steps replayed)", "n/a"], row


def test_a_torn_step_of_the_original_is_named_and_counted_not_skipped_silently(recorded, tmp_path):
    """The original's last step file is torn: the branch still trains to the original's end
    (it trained one step fewer per torn tail step, and said nothing), stderr names the skipped
    step as replay does, and the JSON lists it and counts the branch as partly replayed."""
    run = tmp_path / "torn"
    shutil.copytree(recorded, run, ignore=shutil.ignore_patterns("branches"))
    os.truncate(run / "steps" / "step-00000023.safetensors", 50)
    result = CliRunner().invoke(app, ["branch", str(run), "--at", "16", "-p", "grpo", "-f", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["steps"] == 8 and report["original"]["skipped_steps"] == [23]
    (entry,) = report["branches"]
    assert entry["steps"] == 8
    assert entry["compared"] == {
        "first": 16, "last": 23, "branch_steps": 8, "replayed_steps": 7, "complete": False,
        "flagged": entry["compared"]["flagged"],
    }  # fmt: skip
    assert entry["agree"] is None
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr
    assert warnings[0].startswith(
        f"warning: skipped 1 unreadable, incomplete or invalid step of {run} (step 23: torn: "
    )
    assert warnings[0].endswith("); replayed 23; `stabledrl inspect` lists the reader's findings")


def test_the_docs_document_every_key_of_a_branchs_json_entry():
    """docs/branching.md's table of a branch's entry left out its policy, run and steps."""
    entry = BranchOutcome(
        policy="grpo", run=Path("b"), steps=8, first_reward_collapse=None, final_reward=0.5,
        replay_collapsed_steps=[20], span=(8, 15), replayed_in_span=8,
    ).to_dict()  # fmt: skip
    text = (Path(__file__).resolve().parents[1] / "docs" / "branching.md").read_text()
    section = text[text.index("| JSON key | meaning |") :]
    section = section[: section.index("\n\n")]
    documented = {
        key
        for line in section.splitlines()
        for key in re.findall(r"`([a-z_.]+)`", line.split(" | ")[0])
    }
    keys = {
        f"{key}.{inner}"
        for key, value in entry.items()
        if isinstance(value, dict)
        for inner in value
    }
    keys |= {key for key, value in entry.items() if not isinstance(value, dict)}
    assert keys <= documented, keys - documented


def test_agree_compares_the_branchs_steps_only():
    """A replay risk step after the branch's last step is outside what the branch trained: it
    neither makes the two agree nor disagree (it made them disagree)."""
    held = BranchOutcome(
        policy="grpo", run=Path("b"), steps=8, first_reward_collapse=None, final_reward=0.5,
        replay_collapsed_steps=[20], span=(8, 15), replayed_in_span=8,
    )  # fmt: skip
    assert held.replay_flagged and not held.flagged_in_span
    assert held.agree is True
    collapsed = replace(held, first_reward_collapse=12)
    assert collapsed.agree is False
    assert replace(collapsed, replay_collapsed_steps=[15]).agree is True
    assert replace(collapsed, replayed_in_span=7).agree is None


def test_a_collapse_before_the_branch_point_is_not_the_branchs_to_agree_on():
    """Branched at 136 from a grpo run that collapsed at 121: the rule over the trajectory
    finds the original's collapse, 15 steps before the branch trained any step. agree was
    False (stabledrl's replay flagged nothing in 136..155), blaming the replay for a collapse
    outside the span it compares."""
    branch = BranchOutcome(
        policy="stabledrl", run=Path("b"), steps=20, first_reward_collapse=121, final_reward=0.2,
        span=(136, 155), replayed_in_span=20,
    )  # fmt: skip
    assert branch.collapsed and branch.complete and not branch.flagged_in_span
    assert branch.agree is None
    assert replace(branch, first_reward_collapse=136).agree is False


def _drop_a_key(state: dict) -> None:
    state["model"].popitem()


def _shrink_a_moment(state: dict) -> None:
    moments = state["optimizer"]["state"][0]
    moments["exp_avg"] = moments["exp_avg"][:1]


def _rng_of_floats(state: dict) -> None:
    state["rng"] = torch.zeros(3)


def _no_param_groups(state: dict) -> None:
    del state["optimizer"]["param_groups"]


@pytest.mark.parametrize("spoil", [_drop_a_key, _shrink_a_moment, _rng_of_floats, _no_param_groups])
def test_a_checkpoint_whose_state_does_not_fit_the_model_exits_3(recorded, tmp_path, spoil):
    """A checkpoint of the right format whose model, AdamW state or generator state does not
    fit the model its settings make is bad input: one line naming it, exit 3. It was an
    internal error (exit 70) from load_state_dict or set_state, or from AdamW's first step."""
    run = tmp_path / "spoilt"
    shutil.copytree(recorded, run, ignore=shutil.ignore_patterns("branches"))
    path = checkpoints_dir(run) / "step-00000008.pt"
    state = torch.load(path, weights_only=True)
    spoil(state)
    torch.save(state, path)
    # in this process (the exit codes of `branch` in a real one: the tests above)
    args = ["branch", str(run), "--at", "8", "-p", "grpo", "--rl-steps", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3, result.output
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and f"{path}: " in error[0] and "does not fit" in error[0], error
    assert "internal error" not in result.stderr
    assert not (run / "branches").exists()  # refused before a branch run is opened


_CANNOT = "settings the example cannot take ("


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"group_size": 2.5}, "setting group_size is not an integer (a float)"),
        ({"seed": 1.5}, "setting seed is not an integer (a float)"),
        ({"mu": True}, "setting mu is not an integer (a bool)"),
        ({"same_mask": "yes"}, "setting same_mask is not true or false (a str)"),
        ({"unit": 3}, "setting unit is not a string (a int)"),
        ({"lr": -1.0}, "settings the example cannot take (lr must be a finite number > 0"),
        ({"unit": "word"}, "settings the example cannot take (unit must be one of"),
        ({"group_size": 10**9}, "settings the example cannot take (a rollout of group_size"),
        ({"pretrain_batch": 10**9}, "settings the example cannot take (pretrain_batch must"),
        ({"digits": 10**9}, "settings the example cannot take (digits must be in [1, 64]"),
        # a usage error 'meta must be JSON-serializable' (exit 2), or trained on NaN
        ({"max_grad_norm": math.inf}, _CANNOT + "max_grad_norm must be a finite number > 0"),
        ({"pretrain_noise": math.nan}, _CANNOT + "pretrain_noise must be a number in [0, 1]"),
        ({"pretrain_lr": -1.0}, _CANNOT + "pretrain_lr must be a finite number > 0"),
        ({"pretrain_steps": -3}, _CANNOT + "pretrain_steps must be >= 0"),
        ({"digits": None}, "setting digits is not an integer (a NoneType)"),
        ({"colour": 1}, "settings this version cannot use (unknown 'colour')"),
        ({"mu": None, "-": "mu"}, "settings this version cannot use (missing mu)"),
        ({7: 1}, "settings this version cannot use (unknown '7')"),
    ],
)
def test_a_checkpoint_with_settings_the_example_cannot_take_exits_3(
    recorded, tmp_path, change, message
):
    """A checkpoint is data: its settings of another type or out of range were an internal
    error (exit 70: `manual_seed expected a long`, `repeat_interleave` on a float) or a usage
    error (exit 2) that did not name the checkpoint; a boolean mu or a string same_mask ran;
    a group_size of 10**9 tried to allocate 448 GB (exit 70, or the machine's OOM killer)."""
    run = tmp_path / "spoilt"
    shutil.copytree(recorded, run, ignore=shutil.ignore_patterns("branches"))
    path = checkpoints_dir(run) / "step-00000008.pt"
    state = torch.load(path, weights_only=True)
    state["config"].update({k: v for k, v in change.items() if k != "-"})
    state["config"].pop(change.get("-", ""), None)
    torch.save(state, path)
    args = ["branch", str(run), "--at", "8", "-p", "grpo", "--rl-steps", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3, result.output
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and error[0].startswith(f"error: {path}: {message}"), error
    assert not (run / "branches").exists()
    assert "steps into" not in result.stderr  # no branch announced: none started


def _cispo_at_16(recorded: Path, tmp_path: Path) -> BranchRequest:
    """Two steps of cispo from the checkpoint at step 16, into tmp_path/cispo@16."""
    return BranchRequest(
        checkpoint=checkpoints_dir(recorded) / "step-00000016.pt",
        policy="cispo",
        run_dir=tmp_path / "cispo@16",
        at=16,
        steps=2,
    )


def test_the_example_honours_the_environment_in_a_process_of_its_own(recorded, tmp_path):
    request = _cispo_at_16(recorded, tmp_path)
    env = {**os.environ, **request.to_env()}
    command = [sys.executable, "-m", "stabledrl_cli.example"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"branch cispo@16: 2 steps in {request.run_dir}\n"
    branch = open_run(request.run_dir)
    assert branch.step_numbers == [16, 17] and branch.policy_spec == get_policy("cispo").spec


def test_the_example_without_a_branch_request_says_what_to_set(monkeypatch, capsys):
    monkeypatch.delenv(ENV_RESUME_CHECKPOINT, raising=False)
    assert example_main() == 2
    assert ENV_RESUME_CHECKPOINT in capsys.readouterr().err


@pytest.mark.parametrize("dangling", [False, True], ids=["file", "dangling-symlink"])
@pytest.mark.parametrize("force", [[], ["--force"]], ids=["no-force", "force"])
def test_a_file_where_a_branch_run_goes_is_refused_before_any_branch_trains(
    recorded, tmp_path, force, dangling
):
    """A regular file at RUN/branches/POLICY@STEP: without --force the line was the bare
    'Not a directory' (exit 3); with it, the branches before that policy's trained first and
    the refusal (exit 2) came after them. A symlink to nothing there was said to exist."""
    run = tmp_path / "run"
    shutil.copytree(recorded, run, ignore=shutil.ignore_patterns("branches"))
    (run / "branches").mkdir()
    in_the_way = run / "branches" / "grpo@8"
    if dangling:
        in_the_way.symlink_to(tmp_path / "gone")
    else:
        in_the_way.write_text("not a run")
    args = ["--at", "8", "-p", "stabledrl", "-p", "grpo", "--rl-steps", "2", *force]
    result = CliRunner().invoke(app, ["branch", str(run), *args])
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    said = (
        f"is a symlink to {tmp_path / 'gone'}, which does not exist"
        if dangling
        else "exists and is not a directory"
    )
    assert lines == [f"error: {in_the_way} {said}"]
    assert sorted(p.name for p in (run / "branches").iterdir()) == ["grpo@8"]


@pytest.mark.parametrize("entry", ["directory", "fifo"])
def test_a_checkpoint_name_that_is_no_file_is_refused_naming_it(recorded, tmp_path, entry):
    """`mkdir RUN/checkpoints/step-00000016.pt`: the listing skipped it silently and
    `branch --at 16` branched from step 8 without saying so (a FIFO so named alike; loaded, it
    would block). The entry is the checkpoint at 16, and it is refused: one line naming it,
    exit 3, before any branch run is opened."""
    run = tmp_path / "odd"
    shutil.copytree(recorded, run, ignore=shutil.ignore_patterns("branches"))
    path = checkpoints_dir(run) / "step-00000016.pt"
    path.unlink()
    if entry == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    args = ["branch", str(run), "--at", "20", "-p", "grpo", "--rl-steps", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3, result.output
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error == [f"error: {path}: not a checkpoint (not a regular file)"], result.stderr
    assert not (run / "branches").exists()


def test_a_checkpoint_that_is_a_symlink_is_refused_not_read_through_it(recorded, tmp_path):
    """`RUN/checkpoints/step-00000016.pt` a symlink to a file outside the run (a crafted run's
    link to /etc/passwd, or to another run's checkpoint): branch read the file it points at,
    and from a checkpoint elsewhere branched as from the run's own, exit 0. A checkpoint is
    never read through a link: one line naming it, exit 3, before any branch run is opened."""
    run = tmp_path / "linked"
    shutil.copytree(recorded, run, ignore=shutil.ignore_patterns("branches"))
    path = checkpoints_dir(run) / "step-00000016.pt"
    elsewhere = tmp_path / "elsewhere.pt"
    path.rename(elsewhere)
    path.symlink_to(elsewhere)
    args = ["branch", str(run), "--at", "20", "-p", "grpo", "--rl-steps", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3, result.output
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error == [f"error: {path}: not a checkpoint (a symlink, never followed)"]
    assert not (run / "branches").exists()


def test_branch_runs_are_never_written_through_a_symlinked_branches_folder(recorded, tmp_path):
    """RUN/branches that is a symlink: exit 3 before any branch trains, one line naming it.
    Before, each branch run was recorded into the folder it points at, out of the run (a
    run given with --out may be a link: it is the user's)."""
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    shutil.copytree(recorded, run, ignore=shutil.ignore_patterns("branches"))
    elsewhere.mkdir()
    (run / "branches").symlink_to(elsewhere)
    args = ["branch", str(run), "--at", "8", "-p", "grpo", "--rl-steps", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {run / 'branches'}: a symlink (nothing in a run is followed out of it)"
    ]
    assert list(elsewhere.iterdir()) == []


def test_a_far_step_file_never_makes_the_default_branch_train_past_the_bound(recorded, tmp_path):
    """A torn `steps/step-99999999.safetensors` (100 bytes of a real step) in a run of steps
    0-23: branch without --rl-steps trained to it, 99999992 steps ('branch grpo@8: 99999992
    steps into ...'), hours and GBs of step files, past the 100,000 that --rl-steps takes.
    The default count is bounded as the option is: exit 2, one line saying to pass
    --rl-steps, before any branch trains."""
    run = tmp_path / "run"
    shutil.copytree(recorded, run, ignore=shutil.ignore_patterns("branches"))
    steps = run / "steps"
    (steps / "step-99999999.safetensors").write_bytes(
        (steps / "step-00000023.safetensors").read_bytes()[:100]
    )
    result = CliRunner().invoke(app, ["branch", str(run), "--at", "8", "-p", "grpo"])
    assert result.exit_code == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {run}: 99999992 steps from the checkpoint at step 8 to the last step file "
        "(step 99999999), more than the 100000 a branch trains; pass --rl-steps N (steps=N)"
    ]
    assert not (run / "branches").exists()


def test_the_example_replaces_a_branch_run_under_stabledrl_force(
    recorded, tmp_path, monkeypatch, capsys
):
    """`python -m stabledrl_cli.example` ignored $STABLEDRL_FORCE, which `record` and the
    integrations honour: run again into its STABLEDRL_RUN_DIR with STABLEDRL_FORCE=1 it was
    refused ('not empty; pass overwrite=True', an option it has none of), exit 2. It now
    replaces the run; without the switch the line says to set it; a switch that is no switch
    is refused naming it, and the run stays."""
    request = _cispo_at_16(recorded, tmp_path)
    for name, value in request.to_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("STABLEDRL_FORCE", raising=False)
    threads = torch.get_num_threads()
    try:
        assert example_main() == 0
        first = open_run(request.run_dir).manifest["run_id"]
        assert example_main() == 2
        assert capsys.readouterr().err == (
            f"stabledrl: error: {request.run_dir} is not empty; set STABLEDRL_FORCE=1 to "
            "replace the run in it\n"
        )
        monkeypatch.setenv("STABLEDRL_FORCE", "maybe")
        assert example_main() == 2
        assert "$STABLEDRL_FORCE='maybe': not a switch" in capsys.readouterr().err
        assert open_run(request.run_dir).manifest["run_id"] == first
        monkeypatch.setenv("STABLEDRL_FORCE", "1")
        assert example_main() == 0
    finally:
        torch.set_num_threads(threads)
    replaced = open_run(request.run_dir)
    assert replaced.manifest["run_id"] != first and replaced.step_numbers == [16, 17]


@pytest.mark.parametrize("where", [".", "steps/x", "checkpoints/x"])
def test_the_example_never_records_a_branch_over_or_into_its_original(
    recorded, tmp_path, monkeypatch, capsys, where
):
    """STABLEDRL_RUN_DIR naming the checkpoint's own run, with STABLEDRL_FORCE=1: the branch
    replaced the original's 24 steps with its 2 (its checkpoints left describing another
    trajectory); naming a folder inside its steps, it wrote a run there. `stabledrl branch`
    refuses both; so does the module now, exit 2, before anything changes."""
    run = tmp_path / "run"
    shutil.copytree(recorded, run, ignore=shutil.ignore_patterns("branches"))
    request = replace(
        _cispo_at_16(recorded, tmp_path),
        checkpoint=checkpoints_dir(run) / "step-00000016.pt",
        run_dir=run / where,
    )
    for name, value in request.to_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("STABLEDRL_FORCE", "1")
    assert example_main() == 2
    line = capsys.readouterr().err
    assert line.startswith("stabledrl: error: ") and line.count("\n") == 1
    assert "the run it branches from; pass another STABLEDRL_RUN_DIR" in line
    assert open_run(run).step_numbers == list(range(24))
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "manifest.json", "steps"]
    assert not (run / "steps" / "x").exists()


@pytest.mark.parametrize(
    ("raised", "code", "line"),
    [
        (KeyboardInterrupt(), 130, "interrupted"),
        (RuntimeError("boom"), 70, "internal error: RuntimeError: boom (a bug: rerun with "),
    ],
    ids=["ctrl-c", "a-bug"],
)
def test_the_example_ends_as_the_commands_do_without_a_traceback(
    recorded, tmp_path, monkeypatch, capsys, raised, code, line
):
    """Ctrl-C on `python -m stabledrl_cli.example` printed a 40-line KeyboardInterrupt
    traceback (the process killed by SIGINT); an error not of stabledrl's a traceback too.
    Now one line and the code `stabledrl` gives (130, 70); STABLEDRL_DEBUG=1: the traceback."""
    for name, value in _cispo_at_16(recorded, tmp_path).to_env().items():
        monkeypatch.setenv(name, value)

    def stopped(*args: object, **kwargs: object) -> None:
        raise raised

    monkeypatch.setattr("stabledrl_cli.example.__main__.train_branch", stopped)
    monkeypatch.delenv("STABLEDRL_DEBUG", raising=False)
    assert example_main() == code
    assert capsys.readouterr().err.startswith(f"stabledrl: error: {line}")
    monkeypatch.setenv("STABLEDRL_DEBUG", "1")
    assert example_main() == code
    assert "Traceback (most recent call last)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("steps", "says"),
    [("100001", "at most 100000 steps, got 100001"), ("1" * 5000, "(5,000 characters)")],
    ids=["past-the-bound", "5000-digits"],
)
def test_the_branch_variables_are_read_within_bounds(
    recorded, tmp_path, monkeypatch, capsys, steps, says
):
    """STABLEDRL_BRANCH_STEPS=10**30: `python -m stabledrl_cli.example` trained until stopped
    (199 step files in 40 s), past the 100,000 steps `branch --rl-steps` takes; 5000 digits:
    the line quoted them whole. Now one short line, exit 2, before the branch run is made."""
    monkeypatch.setenv(ENV_RESUME_CHECKPOINT, str(checkpoints_dir(recorded) / "step-00000008.pt"))
    monkeypatch.setenv(ENV_POLICY_OVERRIDE, "grpo")
    monkeypatch.setenv(ENV_RUN_DIR, str(tmp_path / "branch"))
    monkeypatch.setenv(ENV_BRANCH_AT, "8")
    monkeypatch.setenv(ENV_BRANCH_STEPS, steps)
    assert example_main() == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and len(lines[0]) < 200, err
    assert not (tmp_path / "branch").exists()


def test_a_branch_whose_weights_diverge_says_where_it_stopped(tmp_path):
    """A branch whose weights went non-finite stopped after 2 of its 12 steps, where the
    table said only 'not judged, reward 0.213' under '12 steps each' and the JSON gave
    'steps': 2 without why; both now say after which step it diverged."""
    config = ExampleConfig(seed=0, steps=2, pretrain_steps=5, lr=1e30, skip_nonfinite=False)
    run = _record(tmp_path / "run", config, every=4)
    args = ["branch", str(run), "--at", "0", "-p", "grpo", "--rl-steps", "12"]
    report = json.loads(CliRunner().invoke(app, [*args, "--format", "json"]).stdout)
    (entry,) = report["branches"]
    assert (report["steps"], entry["steps"], entry["diverged_at"]) == (12, 2, 1)
    table = CliRunner(env={"COLUMNS": "200"}).invoke(app, [*args, "--force"])
    assert table.exit_code == 0, table.output
    assert ", diverged after step 1 " in table.stdout


@pytest.mark.parametrize(
    ("spec", "field"), [("grpo:beta=0.1", "logp_ref"), ("grpo:tis=token-truncate", "logp_rollout")]
)
def test_a_policy_the_example_cannot_train_is_a_usage_error(recorded, tmp_path, spec, field):
    """`branch RUN -p grpo:beta=0.1` exited 3, 'RUN: step 0 has no logp_ref, which policy
    ... needs', as if the run were unreadable (and named step 0 of a branch at 8), where
    `record -p` and the protocol refuse the same policy as a usage error; now it is one too:
    exit 2, the line `record` gives, before any branch trains."""
    out = tmp_path / "branches"
    args = ["branch", str(recorded), "--at", "8", "-p", "grpo", "-p", spec, "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert f"needs {field}, which the built-in example does not compute" in line
    assert not out.exists()


@pytest.mark.parametrize(
    "geometry", [{"kind": "cube"}, {"k": "many"}, {"params": [1]}, {"colour": 1}, [1, 2]]
)
def test_a_checkpoint_whose_geometry_the_example_cannot_take_exits_3(recorded, tmp_path, geometry):
    """Checkpoints carry the geometry their run records (a branch records it too): settings
    that are not a GeometryConfig's are refused as the checkpoint's other settings are."""
    saved = {"kind": "gram", **geometry} if isinstance(geometry, dict) else geometry
    _branch_of_spoilt_checkpoint_refused(recorded, tmp_path, "geometry", saved, "")


def _branch_of_spoilt_checkpoint_refused(
    recorded: Path, tmp_path: Path, key: str, value: object, said: str
) -> None:
    """A copy of `recorded` whose step-8 checkpoint holds `value` under `key`: branching it
    exits 3 in one line naming the checkpoint, then `said`, before any branch trains."""
    run = tmp_path / "spoilt"
    shutil.copytree(recorded, run, ignore=shutil.ignore_patterns("branches"))
    path = checkpoints_dir(run) / "step-00000008.pt"
    state = torch.load(path, weights_only=True)
    state[key] = value
    torch.save(state, path)
    args = ["branch", str(run), "--at", "8", "-p", "grpo", "--rl-steps", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {path}: {said}"), line
    assert not (run / "branches").exists()


@pytest.mark.parametrize(
    ("guard", "said"),
    [
        ({"mode": "skip", "rule": "nope", "norms": torch.zeros(8, dtype=torch.float64)},
         "a guard the example cannot take"),
        ({"mode": "hold", "rule": "zclip", "norms": torch.zeros(8, dtype=torch.float64)},
         "a guard the example cannot take"),
        ({"mode": "skip", "rule": "zclip", "norms": torch.zeros(8)},
         "guard norms that are not a float64 vector"),
        ({"mode": "skip", "rule": "zclip", "norms": [1.0] * 8},
         "guard norms that are not a float64 vector"),
        ({"mode": "skip", "rule": "zclip", "norms": torch.zeros(3, dtype=torch.float64)},
         "3 guard norms for the 8 steps before step 8 (one a step)"),
    ],
)  # fmt: skip
def test_a_checkpoint_whose_guard_the_example_cannot_take_exits_3(recorded, tmp_path, guard, said):
    """Checkpoints carry their run's guard and the grad norms it was asked about, from which a
    branch rebuilds it: a guard or norms that could not have been written are refused as the
    checkpoint's other settings are, before any branch trains."""
    _branch_of_spoilt_checkpoint_refused(recorded, tmp_path, "guard", guard, said)


def test_record_force_removes_the_branches_of_the_run_it_replaces(recorded, tmp_path):
    """`record --force` over a run kept RUN/branches: the new run carried the branch runs of
    the one it replaced (`branch` of the old run, then `record --force`: branches/grpo@8 still
    there, its steps another run's). They go with the old run's steps and checkpoints; anything
    in RUN/branches that is not a branch run's is refused before the run changes."""
    run = tmp_path / "run"
    shutil.copytree(recorded, run, ignore=shutil.ignore_patterns("branches"))  # other tests'
    args = ["branch", str(run), "--at", "8", "-p", "grpo", "--rl-steps", "2"]
    assert CliRunner().invoke(app, args).exit_code == 0
    left = run / "branches" / "grpo@8" / "steps" / ".step-00000010.safetensors.tmp-4242"
    left.write_bytes(b"half a step")  # a killed branch's: a run's file too
    shutil.copytree(run, tmp_path / "mine")
    record = ["record", "--force", "--rl-steps", "1", "--device", "cpu"]

    result = CliRunner().invoke(app, [*record, "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in run.iterdir()) == ["manifest.json", "steps"]  # as a new run

    mine = tmp_path / "mine"
    note = mine / "branches" / "grpo@8" / "notes.txt"
    note.write_text("mine")
    before = sorted(p.name for p in (mine / "steps").iterdir())
    refused = CliRunner().invoke(app, [*record, "--out", str(mine)])
    assert refused.exit_code == 2, refused.output
    assert refused.stderr.startswith(f"error: {note}: not a file of a branch run; ")
    assert note.read_text() == "mine"  # nothing changed
    assert sorted(p.name for p in (mine / "steps").iterdir()) == before
    assert (mine / "branches" / "grpo@8" / "manifest.json").is_file()


def test_a_branch_of_a_live_run_says_up_to_which_step_it_read(recorded, tmp_path, monkeypatch):
    """Steps landed on the original while a branch read it: the branch counted its default
    steps from the listing and replayed that listing (`open_snapshot`), yet said nothing of
    the steps it did not read, on stderr nor in its JSON."""
    import stabledrl_cli.replay.engine as engine

    run = tmp_path / "run"
    shutil.copytree(recorded, run, ignore=shutil.ignore_patterns("branches"))
    config = ExampleConfig(**open_run(run).manifest["meta"]["example_config"])
    last = open_run(run).step(23)
    batch = {name: torch.from_numpy(last.array(name).copy()) for name in last.fields}
    replay = engine.replay
    with Recorder(run, resume=True, **recorder_kwargs(config, get_policy("grpo"))) as rec:

        def steps_land(*args, **kwargs):
            for step in range(24, 28):
                rec.log_step(step, **batch)
            return replay(*args, **kwargs)

        monkeypatch.setattr(engine, "replay", steps_land)
        args = ["branch", str(run), "--at", "16", "-p", "grpo", "--out", str(tmp_path / "b")]
        result = CliRunner().invoke(app, [*args, "-f", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["steps"] == 8 and data["branches"][0]["compared"]["last"] == 23
    live = {"listed_steps": 24, "to_step": 23, "landed_steps": 4, "held": True}
    assert data["original"]["live"] == live
    said = " ".join(result.stderr.split())
    assert (
        "the branch read the 24 steps listed when the branch began (to step 23), not the 4 "
        "steps finished since"
    ) in said


def test_an_original_whose_recording_stopped_is_not_said_to_have_held(tmp_path):
    """An original the built-in example stopped (its weights were not finite after step 108 of
    `record --lr 1e-3 --no-skip-nonfinite`) had its stop warned of on stderr, and the table's
    title said 'the original run held' under it: the rule saw no fall before the stop, and
    nothing saw the run after it. The title and the JSON now name the stop."""
    config = ExampleConfig(seed=3, steps=48, pretrain_steps=20)
    out = tmp_path / "run"
    plan = CheckpointPlan(directory=checkpoints_dir(out), every=8)
    with Recorder(out, **recorder_kwargs(config, get_policy(config.policy))) as recorder:
        train(config, recorder=recorder, checkpoints=plan)
        recorder.note_stop("training stopped (its weights were not finite after step 47)", 48)
    args = ["branch", str(out), "--at", "40", "-p", "grpo", "--out", str(tmp_path / "b")]
    result = CliRunner().invoke(app, [*args, "--format", "json"])
    assert result.exit_code == 0, result.output
    original = json.loads(result.stdout)["original"]
    assert original["stopped_at"] == 48 and original["first_reward_collapse"] is None
    table = CliRunner().invoke(app, [*args, "--force"], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    title = " ".join(table.stdout.split())
    assert "the original run held" not in title, title
    assert "the original run showed no collapse before its recording stopped at step 48" in title
