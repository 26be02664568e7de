"""A verl gspo run recorded before the verl integration wrote verl's cap of the sequence log
ratio (log_ratio_max=10) replays, as its own policy, the loss verl computed: the recorded
spec with the cap, and a note naming both specs.

The replays run in this process (typer's CliRunner): what is checked is the JSON and the
note, not the process; the last test replays in a process of its own, as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app

OLD_SPEC = "gspo:agg=token-mean,eps_high=0.2,eps_low=0.2,form=token"
VERL_SPEC = "gspo:agg=token-mean,eps_high=0.2,eps_low=0.2,form=token,log_ratio_max=10"
VERL_META = {"framework": "verl", "verl_version": "0.9.1", "loss_mode": "gspo"}


def recorded_run(path: Path, spec: str, meta: dict[str, Any]) -> Path:
    """Two steps of three sequences of three tokens: the first sequence's mean log r is 10.5
    (past verl's cap) with A = -1, the others inside it."""
    with sd.Recorder(path, policy=spec, meta=meta) as rec:
        for step in range(2):
            rec.log_step(
                step,
                logp=[-0.5] * 9,
                logp_old=[-11.0, -11.0, -11.0, -0.6, -0.4, -0.5, -0.3, -0.7, -0.5],
                advantages=[-1.0] * 3 + [1.0] * 3 + [-0.5] * 3,
                seq_id=[0, 0, 0, 1, 1, 1, 2, 2, 2],
            )
    return path


def own_row(path: Path, *specs: str) -> tuple[dict[str, Any], str]:
    args = [a for spec in specs for a in ("-p", spec)]
    done = CliRunner().invoke(app, ["replay", str(path), *args, "--format", "json"])
    assert done.exit_code == 0, done.output
    (own,) = [p for p in json.loads(done.stdout)["policies"] if p["own"]]
    return own, " ".join(done.stderr.split())


@pytest.mark.parametrize(
    "recorded",
    [
        pytest.param(OLD_SPEC, id="token-form"),
        pytest.param(OLD_SPEC.removesuffix(",form=token"), id="sequence-form"),
    ],
)
def test_a_verl_gspo_recording_without_the_cap_replays_verls_loss_as_its_own(
    recorded: str, tmp_path: Path
) -> None:
    """The sequence form: recorded before the integration wrote verl's token form."""
    run = recorded_run(tmp_path / "run", recorded, VERL_META)
    own, notes = own_row(run)
    capped, uncapped = (
        [row["objective"] for row in sd.replay(run, [spec]).policies[0].steps]
        for spec in (VERL_SPEC, OLD_SPEC)
    )
    assert own["spec"] == VERL_SPEC
    assert [row["objective"] for row in own["steps"]] == pytest.approx(capped)
    assert capped != pytest.approx(uncapped)  # the cap binds on the first sequence
    assert (
        f"note: the run's own policy is '{VERL_SPEC}', the loss verl 0.9.1 computed: its "
        f"manifest's '{recorded}' lacks verl's cap of GSPO's sequence log ratio at 10 "
        "(recorded before stabledrl wrote it)"
    ) in notes


@pytest.mark.parametrize(
    ("spec", "meta"),
    [
        pytest.param(VERL_SPEC, VERL_META, id="verl-with-the-cap"),
        pytest.param(OLD_SPEC, {}, id="not-verl"),
        pytest.param(OLD_SPEC, {**VERL_META, "verl_version": "0.10.0"}, id="another-verl"),
        pytest.param(OLD_SPEC, {**VERL_META, "loss_mode": "vanilla"}, id="not-verls-gspo"),
        pytest.param(
            OLD_SPEC.replace("form=token", "form=token,log_ratio_max=5"), VERL_META, id="own-cap"
        ),
    ],
)
def test_other_recordings_replay_their_own_spec_as_written(
    spec: str, meta: dict[str, Any], tmp_path: Path
) -> None:
    run = recorded_run(tmp_path / "run", spec, meta)
    own, notes = own_row(run)
    assert own["spec"] == sd.get_policy(spec).spec
    assert "lacks verl's cap" not in notes


def test_the_recorded_spec_given_by_hand_is_replayed_as_written(tmp_path: Path) -> None:
    """-p names exactly what is replayed: the recorded spec, no longer the run's own."""
    run = recorded_run(tmp_path / "run", OLD_SPEC, VERL_META)
    done = CliRunner().invoke(app, ["replay", str(run), "-p", OLD_SPEC, "--format", "json"])
    assert done.exit_code == 0, done.stderr
    (row,) = json.loads(done.stdout)["policies"]
    assert (row["spec"], row["own"]) == (OLD_SPEC, False)
