"""verl loss modes and aggregations that tests/test_integration_verl.py checks on verl's own
`ppo_loss` but never trains on verl's real FSDP2 engine with the hook recording: gspo, sapo,
cispo, gpg, dppo_tv and dppo_kl, token-sum and seq-mean-token-sum, and the KL loss beside
sapo and gspo. One launch of tests/verl_scripts/fsdp_engine_run.py on one rank (the engine
needs a process of its own: verl's platform and torch.distributed are set as it starts)
trains each for 2 PPO epochs x 2 mini-batches, then a skipped update. Read as a user reads
it, `replay --format json` gives the recorded policy verl's logged pg_loss (plus
kl_loss_coef times its kl_loss), pg_clipfrac(_lower) and ppo_kl on every optimizer step, and
no collapse. And the hook leaves the training as verl trains it: the same logged metrics,
step by step, as the job trained without it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")

from test_integration_verl import engine_process, engine_result
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

KL_LOSS = {"use_kl_loss": True, "kl_loss_coef": 0.1}
MODES: dict[str, tuple[str, dict[str, Any], str]] = {
    "gspo": (
        "gspo",
        {},
        "gspo:agg=token-mean,eps_high=0.2,eps_low=0.2,form=token,log_ratio_max=10",
    ),
    "sapo": ("sapo", {}, "sapo:rows=all"),
    "cispo": ("cispo", {}, "cispo:eps_high=0.2,eps_low=0.2"),
    "gpg": ("gpg", {}, "reinforce"),
    "dppo-tv": ("dppo_tv", {}, "dppo:logp_dtype=bfloat16"),
    "dppo-kl": ("dppo_kl", {}, "dppo:divergence=kl,logp_dtype=bfloat16"),
    "token-sum": ("vanilla", {"actor": {"loss_agg_mode": "token-sum"}}, "dual-clip:agg=token-sum"),
    "seq-mean-token-sum": (
        "vanilla",
        {"actor": {"loss_agg_mode": "seq-mean-token-sum"}},
        "dual-clip:agg=seq-mean-token-sum,rows=all",
    ),
    "sapo-kl": (
        "sapo",
        {"actor": {**KL_LOSS, "loss_agg_mode": "seq-mean-token-mean"}},
        "sapo:beta=0.1,kl_max=10,kl_weight=none,rows=all",
    ),
    "gspo-kl-k3": (
        "gspo",
        {"actor": {**KL_LOSS, "kl_loss_type": "k3"}},
        "gspo:agg=token-mean,beta=0.1,eps_high=0.2,eps_low=0.2,form=token,kl_max=10,"
        "kl_weight=none,log_ratio_max=10",
    ),
    "unhooked": ("vanilla", {"hook": False}, ""),
    "hooked": ("vanilla", {}, "dual-clip"),
}
"""Each job: (policy_loss.loss_mode, the script's SETTINGS, the spec the run records), by
name; "unhooked" trains "hooked"'s job without the hook."""
MACHINE = ("actor/perf/", "actor/mfu")
"""verl's logged metrics of the machine (memory, throughput), not of the training."""


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory whose NAME/run and NAME/result.json each job of MODES wrote."""
    directory = tmp_path_factory.mktemp("verl-modes")
    jobs = [(directory / name, mode, settings) for name, (mode, settings, _) in MODES.items()]
    done = engine_process(1, jobs)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stabledrl:" not in done.stderr, done.stderr[-3000:]
    return directory


@pytest.mark.parametrize("name", [name for name in MODES if name != "unhooked"])
def test_the_cli_replay_gives_verls_logged_metrics(launched: Path, name: str) -> None:
    mode, settings, spec = MODES[name]
    run, ranks = engine_result(launched / name, 1)
    assert run.policy_spec == spec
    assert run.step_numbers == [0, 1, 2, 3, 4]
    assert run.step(4).scalars["update_skipped"] == 1
    done = CliRunner().invoke(app, ["replay", str(launched / name / "run"), "--format", "json"])
    assert done.exit_code == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["collapse_warning"]["steps"] == []
    (own,) = [p for p in document["policies"] if p["own"]]
    coef = float(settings.get("actor", {}).get("kl_loss_coef", 0.0))
    for row, logged in zip(own["steps"][:4], ranks[0]["steps"], strict=False):
        loss = logged["pg_loss"] + coef * logged.get("kl_loss", 0.0)
        assert -row["objective"] == pytest.approx(loss, rel=1e-6, abs=1e-6), row["step"]
        for metric in ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"):
            if metric in logged:  # gpg logs no clip fraction
                assert row[f"verl_{metric}"] == pytest.approx(logged[metric], abs=1e-6), metric
    assert mode == "gpg" or "pg_clipfrac" in ranks[0]["steps"][0]


def test_the_hook_leaves_the_training_as_verl_trains_it(launched: Path) -> None:
    hooked = json.loads((launched / "hooked" / "result.json").read_text())
    unhooked = json.loads((launched / "unhooked" / "result.json").read_text())
    assert len(hooked["steps"]) == 5
    assert hooked["steps"] == unhooked["steps"]
    for logged, other in zip(hooked["logged"], unhooked["logged"], strict=True):
        trained = {k: v for k, v in logged.items() if not k.startswith(MACHINE)}
        assert trained == {k: v for k, v in other.items() if not k.startswith(MACHINE)}
    assert not (launched / "unhooked" / "run").exists()
