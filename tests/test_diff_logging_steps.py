"""`diff` of a run of every step against a log written every k steps (transformers'
`logging_steps=k`), imported from its trainer_state.json: each row holds the means over the
steps since the row before (loss, TRL's metrics), its step's own grad_norm and lr. Compared
step by step, the two parted at the first row on loss; the import keeps k, and diff compares
the other run's means over each row's steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import Recorder
from stabledrl_cli.importers import import_log

LOSS = [0.1, 0.3, 0.5, 0.7, 0.9, 1.1, 1.3]
"""Steps 1-7's own loss."""
BEGUN = {1: [0.25], 3: [0.5], 4: [0.1, 0.3], 5: [0.75], 7: [1.0]}
"""The rewards of the rollouts begun at steps 1, 3, 4, 5, 7 (two at step 4: TRL's log of
steps 4-6 averages three, 0.3833, not the steps' two means, 0.475)."""


def _recording(path: Path, steps: range = range(1, 8), loss: list[float] = LOSS) -> Path:
    """A recording of steps `steps`, each with its own `loss`, grad_norm, entropy and reward
    (the rollouts begun in it, `BEGUN`: their `rollout_reward` and `rollout_count`)."""
    logp = np.zeros(4, np.float32)
    with Recorder(path, policy="grpo", unit="sequence") as rec:
        for step in steps:
            begun = BEGUN.get(step, [])
            mark = (
                {"rollout_reward": sum(begun) / len(begun), "rollout_count": len(begun)}
                if begun
                else {}
            )
            rec.log_step(
                step, logp=logp, logp_old=logp, advantages=np.ones(4, np.float32),
                loss=loss[step - 1], grad_norm=float(step), inner_step=0 if begun else 1,
                reward_mean=mark.get("rollout_reward", 0.0),
                scalars={"entropy": 2.0 * step, **mark},
            )  # fmt: skip
    return path


WINDOWS = {1: [1], 3: [2, 3], 6: [4, 5, 6], 7: [7]}
"""logging_steps=3 and logging_first_step: rows at 1, 3, 6 and the last step, 7, each over
the steps since the row before."""


def _log(tmp_path: Path, *, say: bool, k: int = 3, windows: dict[int, list[int]] = WINDOWS) -> Path:
    """TRL's log of the same training, a row a window of `windows`; trainer_state.json
    (saying `k`) or its list alone."""
    rows = []
    for row, steps in windows.items():
        entry = {"step": row, "loss": float(np.mean([LOSS[s - 1] for s in steps]))}
        entry |= {"grad_norm": float(row), "entropy": float(np.mean([2.0 * s for s in steps]))}
        begun = [r for s in steps for r in BEGUN.get(s, [])]
        rows.append(entry | ({"reward": float(np.mean(begun))} if begun else {}))
    document: object = {"global_step": 7, "logging_steps": k, "log_history": rows}
    state = tmp_path / ("trainer_state.json" if say else "history.json")
    state.write_text(json.dumps(document if say else rows))
    out = tmp_path / (f"imported-{k}" if say else "alone")
    summary = import_log(state, out, log_format="trainer_state")
    assert summary.logging_steps == (k if say else None)
    return out


def _diff(a: Path, b: Path) -> tuple[int, dict]:
    done = CliRunner().invoke(app, ["diff", str(a), str(b), "--device", "cpu", "-f", "json"])
    assert done.exit_code in (0, 1), done.output
    return done.exit_code, json.loads(done.stdout)


def test_a_run_of_every_step_is_compared_by_its_means_over_each_rows_steps(
    tmp_path: Path,
) -> None:
    """The windows are transformers': from the step after the row before, not k steps
    back (row 1 alone, 2-3, 4-6, then the last step's 7 alone), either run first."""
    recorded, imported = _recording(tmp_path / "run"), _log(tmp_path, say=True)
    for a, b, side in ((recorded, imported, "a"), (imported, recorded, "b")):
        exit_code, data = _diff(a, b)
        assert (exit_code, data["parted_at"], data["compared"]) == (0, None, 4), side
        assert data["unshared"][side] == ["inner_step"]
        other = "B" if side == "a" else "A"
        assert data["notes"][0].startswith(f"{other} is a log written every 3 steps")
    changed = [*LOSS[:4], LOSS[4] + 0.3, *LOSS[5:]]  # step 5's loss: row 6's mean parts
    exit_code, data = _diff(_recording(tmp_path / "changed", loss=changed), imported)
    assert (exit_code, data["parted_at"]) == (1, 6)
    assert data["first"]["scalars"]["fields"] == [{"field": "loss", "what": "1 vs 0.9"}]


def test_a_log_of_a_row_an_epoch_is_compared_over_each_epochs_steps(tmp_path: Path) -> None:
    """logging_strategy="epoch" with TRL's default logging_steps, 10, and epochs of 3 and 4
    steps: the state's logging_steps is not the rows' spacing, a row's window still starts
    after the row before."""
    epochs = _log(tmp_path, say=True, k=10, windows={3: [1, 2, 3], 7: [4, 5, 6, 7]})
    exit_code, data = _diff(_recording(tmp_path / "run"), epochs)
    assert (exit_code, data["parted_at"], data["compared"]) == (0, None, 2)


def test_the_import_says_its_rows_are_means(tmp_path: Path) -> None:
    """The import's table said nothing of k: it now names it, and what a row holds."""
    _log(tmp_path, say=True)
    done = CliRunner().invoke(
        app, ["import", str(tmp_path / "trainer_state.json"), "--out", str(tmp_path / "again")]
    )
    assert done.exit_code == 0, done.output
    assert "written every 3 steps (logging_steps): a row's loss and TRL's metrics are" in " ".join(
        done.stdout.split()
    )


def test_a_row_whose_steps_the_run_lacks_is_compared_with_the_steps_own(tmp_path: Path) -> None:
    """A recording without step 5 cannot give row 6's mean: its step 6 is compared as it is."""
    imported = _log(tmp_path, say=True)
    cut = _recording(tmp_path / "cut", range(1, 5))  # steps 1-4
    exit_code, data = _diff(cut, imported)
    assert (exit_code, data["parted_at"], data["only_b"]) == (0, None, [[6, 7]])
    gapped = tmp_path / "gapped"
    logp = np.zeros(4, np.float32)
    with Recorder(gapped, policy="grpo", unit="sequence") as rec:
        for step in (1, 2, 3, 4, 6):
            rec.log_step(
                step, logp=logp, logp_old=logp, advantages=np.ones(4, np.float32),
                loss=LOSS[step - 1], grad_norm=float(step),
            )  # fmt: skip
    exit_code, data = _diff(gapped, imported)
    assert (exit_code, data["parted_at"]) == (1, 6)
    assert data["first"]["scalars"]["fields"][0] == {"field": "loss", "what": "1.1 vs 0.9"}


def test_a_log_that_does_not_say_is_compared_step_by_step_with_a_note(tmp_path: Path) -> None:
    recorded, alone = _recording(tmp_path / "run"), _log(tmp_path, say=False)
    exit_code, data = _diff(recorded, alone)
    assert (exit_code, data["parted_at"]) == (1, 3)
    assert data["notes"] == [
        "B is an imported log whose rows skip steps A holds (step 2, between rows 1 and 3) and "
        "that does not say how it was written: a log written every k steps holds at a row "
        "means over the steps since the row before (loss, TRL's metrics), compared here with "
        "A's step alone (import its trainer_state.json, which says)"
    ]
    table = CliRunner().invoke(app, ["diff", str(recorded), str(alone)]).stdout
    assert "note: B is an imported log whose rows skip steps A holds" in table
    exit_code, data = _diff(recorded, _log(tmp_path, say=True, k=1))  # it says: every step
    assert (exit_code, data["parted_at"], data["notes"]) == (1, 3, [])
