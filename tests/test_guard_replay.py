"""A guarded run replayed: `replay` replays the run's own guard rule (`meta.guard.rule`) too,
marked as its own, and compares its decisions with the `guard_action` the guard recorded;
`inspect` counts what the guard did (docs/guard.md)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.guard import Guard
from stabledrl_cli.policies import PolicyBatch

runner = CliRunner()

RULE = "skip-step:sigma=3,window=6"
"""A rule that judges from the third step on: a few steps are enough."""
NORMS = [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 50.0, 1.0, 1.02, 0.98]
"""A steady grad norm with one spike, at step 6."""
LOSSES = [0.5, 0.5, 0.5, 9.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
"""A loss with a spike at step 3, which a guard given no loss never sees."""


def _guarded_run(
    path: Path,
    guard: Guard | None,
    *,
    actions: dict[int, float] | None = None,
    given: Callable[[int], dict[str, Any]] | None = None,
) -> Path:
    """A run of len(NORMS) steps whose guard (None: unguarded) was asked with the grad norm
    alone, as the built-in example asks it, and what `given(step)` adds to it (a loss, a
    batch); `actions` overrides the recorded guard_action of some steps (a guard that saw
    other numbers)."""
    rng = np.random.default_rng(0)
    meta = {} if guard is None else {"guard": guard.manifest_note()}
    with sd.Recorder(path, policy="grpo", reward_range=(0.0, 1.0), meta=meta) as rec:
        for step, (norm, loss) in enumerate(zip(NORMS, LOSSES, strict=True)):
            scalars = {}
            if guard is not None:
                more = {} if given is None else given(step)
                scalars = Guard.scalars(guard.before_step(grad_norm=norm, **more))
                if actions and step in actions:
                    scalars["guard_action"] = scalars["guard_rule_action"] = actions[step]
            logp = -rng.random((4, 3)).astype(np.float32)
            rec.log_step(
                step,
                logp=logp,
                logp_old=logp - 0.01,
                advantages=rng.standard_normal(4).astype(np.float32),
                mask=np.ones((4, 3)),
                group_id=np.array([0, 0, 1, 1]),
                reward=rng.random(4).astype(np.float32),
                grad_norm=norm,
                loss=loss,
                scalars=scalars,
            )
    return path


def _replay_json(run: Path, *args: str) -> dict:
    result = runner.invoke(app, ["replay", str(run), "-p", "grpo", "--format", "json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _replay_text(run: Path, *args: str) -> str:
    result = runner.invoke(app, ["replay", str(run), "-p", "grpo", *args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return " ".join(result.stdout.split())


def test_replay_replays_the_runs_own_rule_and_marks_it(tmp_path):
    """Before: only zclip and skip-step at their defaults were replayed, never the run's own
    skip-step:sigma=3,window=6, so nothing said what the guard's rule would do."""
    run = _guarded_run(tmp_path / "run", Guard(mode="skip", rule=RULE))
    guards = _replay_json(run)["guards"]
    assert [(g["guard"], g["own"]) for g in guards] == [
        ("zclip", False),
        ("skip-step", False),
        (RULE, True),
    ]
    own = guards[2]
    # Replayed over the grad norms alone, as the guard was asked: the loss spike at step 3 is
    # not the guard's, and the norm spike at step 6 is.
    assert [(s["step"], s["action"]) for s in own["acted"]] == [(6, "skip")]
    assert "skip-step:sigma=3,window=6 (the run's own guard) would skip 6" in _replay_text(run)


def test_the_own_rule_named_by_guard_is_replayed_once(tmp_path):
    run = _guarded_run(tmp_path / "run", Guard(mode="skip", rule=RULE))
    guards = _replay_json(run, "--guard", "skip-step:window=6,sigma=3")["guards"]
    assert [(g["guard"], g["own"]) for g in guards] == [(RULE, True)]
    assert [s["step"] for s in guards[0]["acted"]] == [6]


def test_an_unguarded_run_has_no_own_guard(tmp_path):
    guards = _replay_json(_guarded_run(tmp_path / "run", None))["guards"]
    assert [(g["guard"], g["own"], g["agreement"]) for g in guards] == [
        ("zclip", False, None),
        ("skip-step", False, None),
    ]


def test_the_recorded_decisions_agree_with_the_replayed_rule(tmp_path):
    run = _guarded_run(tmp_path / "run", Guard(mode="skip", rule=RULE))
    own = _replay_json(run)["guards"][2]
    assert own["agreement"] == {"compared": 10, "disagree": 0, "steps": []}
    assert "disagree" not in _replay_text(run)


def test_a_recorded_decision_the_rule_does_not_make_is_reported(tmp_path):
    """A guard that saw other numbers (its batch rule, a resume without the saved guard)
    recorded a skip at step 2 and none at the spike; the replay said nothing of it."""
    run = _guarded_run(tmp_path / "run", Guard(mode="skip", rule=RULE), actions={2: 2.0, 6: 0.0})
    own = _replay_json(run)["guards"][2]
    assert own["agreement"] == {"compared": 10, "disagree": 2, "steps": [2, 6]}
    text = _replay_text(run)
    assert (
        "the run's own guard recorded other decisions than its rule replayed on 2 of 10 steps: "
        "2,6" in text
    )


def test_inspect_counts_what_the_guard_did(tmp_path):
    """Before: inspect showed the guard's scalars' min and max alone: how many steps it
    skipped or scaled was nowhere."""
    run = _guarded_run(tmp_path / "run", Guard(mode="skip", rule=RULE), actions={2: 1.0})
    result = runner.invoke(app, ["inspect", str(run), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["guard"] == {
        "mode": "skip",
        "rule": RULE,
        "steps": 10,
        "skipped": 1,
        "scaled": 1,
        "skipped_steps": [6],
        "scaled_steps": [2],
    }
    table = runner.invoke(app, ["inspect", str(run)], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    text = " ".join(table.stdout.split())
    assert (
        f"│ guard │ skip, {RULE}: 1 step skipped (step 6), 1 scaled (step 2), of 10 recorded"
        in text
    )


def test_inspect_of_an_unguarded_run_has_no_guard(tmp_path):
    result = runner.invoke(
        app, ["inspect", str(_guarded_run(tmp_path / "run", None)), "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["guard"] is None
    assert "│ guard │" not in runner.invoke(app, ["inspect", str(tmp_path / "run")]).stdout


def test_a_scale_guard_agrees_with_its_rule_replayed(tmp_path):
    """Under mode scale a clip of the rule is recorded as scale (1), and so compared."""
    guard = Guard(mode="scale", rule="zclip:warmup=3")
    own = _replay_json(_guarded_run(tmp_path / "run", guard))["guards"][2]
    assert own["guard"] == "zclip:warmup=3" and own["own"]
    assert [(s["step"], s["action"]) for s in own["acted"]] == [(6, "clip")]
    assert own["agreement"] == {"compared": 10, "disagree": 0, "steps": []}


def test_no_guard_replays_no_own_rule_either(tmp_path):
    run = _guarded_run(tmp_path / "run", Guard(mode="skip", rule=RULE))
    assert _replay_json(run, "--guard", "none")["guards"] == []


def test_a_meta_guard_this_version_cannot_read_is_no_own_rule(tmp_path):
    """A manifest's meta.guard whose rule is no guard spec: replayed without it, not refused."""
    run = _guarded_run(tmp_path / "run", Guard(mode="skip", rule=RULE))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["meta"]["guard"]["rule"] = "skip-step:window=[bold]"
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert [g["own"] for g in _replay_json(run)["guards"]] == [False, False]
    result = runner.invoke(app, ["inspect", str(run), "--format", "json"])
    assert result.exit_code == 0, result.output
    guard = json.loads(result.stdout)["guard"]
    assert (guard["mode"], guard["rule"], guard["skipped_steps"]) == (None, None, [6])


def test_a_guard_whose_decisions_were_not_recorded_says_so(tmp_path):
    """meta.guard set, but the loop never logged `scalars=guard.scalars(decision)`: nothing
    to compare, and the table said nothing of it, as if the guard had agreed."""
    run = tmp_path / "run"
    guard = Guard(mode="skip", rule=RULE)
    _guarded_run(run, None)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["meta"] = {"guard": guard.manifest_note()}
    (run / "manifest.json").write_text(json.dumps(manifest))
    own = _replay_json(run)["guards"][2]
    assert own["own"] and own["agreement"] == {"compared": 0, "disagree": 0, "steps": []}
    assert (
        "the run's own guard recorded no guard_action to compare with its rule (log "
        "guard.scalars(decision) with each step)" in _replay_text(run)
    )


def test_a_default_rule_of_the_run_is_the_default_entry_marked_own(tmp_path):
    """A run guarded by skip-step at its defaults: the default skip-step entry is its own,
    replayed once, over the grad norms alone."""
    run = _guarded_run(tmp_path / "run", Guard(mode="skip"))
    guards = _replay_json(run)["guards"]
    assert [(g["guard"], g["own"]) for g in guards] == [("zclip", False), ("skip-step", True)]
    assert guards[1]["agreement"] == {"compared": 10, "disagree": 0, "steps": []}


def test_a_guard_given_the_loss_is_replayed_with_it(tmp_path):
    """A loop that gives its guard the loss: the guard skipped the loss spike at step 3, and
    the replay of its own rule is given the loss the guard was given (`guard_loss`), so it
    agrees. Before, the own rule was replayed on the grad norms alone and reported the guard
    as disagreeing with its rule at step 3."""
    guard = Guard(mode="skip", rule=RULE)
    run = _guarded_run(tmp_path / "run", guard, given=lambda step: {"loss": LOSSES[step]})
    own = _replay_json(run)["guards"][2]
    assert own["own"] and [a["step"] for a in own["acted"]] == [3, 6]
    assert own["agreement"] == {"compared": 10, "disagree": 0, "steps": []}


def test_a_step_the_batch_rule_skipped_is_no_disagreement_of_the_grad_norm_rule(tmp_path):
    """The batch rule skipped step 4 (a non-finite coefficient under grpo): the decision of
    the grad-norm rule itself is recorded too (`guard_rule_action`) and is what the replayed
    rule is compared with. Before, step 4 was reported as a disagreement."""

    def batch(step: int) -> dict[str, Any]:
        logp = torch.tensor([-1.0, -2.0, float("nan") if step == 4 else -1.0, -1.5])
        return {
            "batch": PolicyBatch(
                logp=logp,
                logp_old=torch.tensor([-1.0, -2.0, -1.0, -1.5]),
                advantages=torch.tensor([1.0, -1.0, 1.0, -1.0]),
                seq_id=torch.arange(4),
                unit="sequence",
            )
        }

    run = _guarded_run(tmp_path / "run", Guard(mode="skip", rule=RULE, policy="grpo"), given=batch)
    own = _replay_json(run)["guards"][2]
    assert [a["step"] for a in own["acted"]] == [6]
    assert own["agreement"] == {"compared": 10, "disagree": 0, "steps": []}
