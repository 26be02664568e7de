"""Every verl loss mode the integration records, under every `loss_agg_mode`, against verl
0.9.1's own functions on the same tensors: a rollout trained through the hook as the
documented path records it (`install()`, the engine's `train_batch` with verl's `ppo_loss`),
then `replay --format json` of the run's own policy gives, on each optimizer step, verl's
loss (its registered policy-loss function, `agg_loss` and, with `use_kl_loss`, `kl_penalty`,
called directly on the micro-batches' padded tensors with the global normalisers `ppo_loss`
sets) and verl's pg_clipfrac, pg_clipfrac_lower and ppo_kl (the mean over the step's
micro-batches; none where verl returns none). The rollout has rollout importance weights, a
sequence without a scored token (counted in verl's global_batch_size) and ratios that the
clips bind.

The combinations the catalogue cannot express are refused in one warning line each while
training goes on: verl's loss modes clip_cov and dro, geo_mean with a KL loss, sapo with a
KL loss under another aggregation than seq-mean-token-mean."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")

from tensordict import TensorDict
from test_integration_verl import actor_config, model_output, rollout, train
from typer.testing import CliRunner
from verl.trainer.ppo import core_algos
from verl.utils import tensordict_utils as tu
from verl.workers.config import ActorConfig
from verl.workers.engine.utils import prepare_micro_batches
from verl.workers.utils.padding import no_padding_2_padding

from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import open_run
from stabledrl_cli.integrations import verl as stabledrl_verl
from stabledrl_cli.integrations._verl_policy import AGG_MODES, LOSS_MODES

METRICS = ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl")
UNSCORED = [2]
"""A row of the first step without a scored token."""
SCALE = 0.9
"""The spread of the rollout's log ratios: the clips and trust regions bind somewhere."""
SETTINGS: dict[str, dict[str, Any]] = {"kl_cov": {"policy_loss": {"kl_cov_ratio": 0.2}}}
"""Per loss mode, actor settings beside loss_mode and loss_agg_mode (kl_cov: enough tokens
to penalise in a micro-batch)."""
KL_LOSS = {"use_kl_loss": True, "kl_loss_coef": 0.05}


@pytest.fixture
def recording(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """install() on a fresh run directory (the status file `stabledrl record` would read
    beside it); uninstalled after the test."""
    monkeypatch.setenv("STABLEDRL_STATUS_FILE", str(tmp_path / "status"))
    assert stabledrl_verl.install(tmp_path / "run")
    yield tmp_path / "run"
    stabledrl_verl.uninstall()


def trained_rollout() -> TensorDict:
    """The rollout `train(config, unscored=UNSCORED, scale=SCALE)` trains on."""
    data = rollout(scale=SCALE)
    for key in ("response_mask", "loss_mask"):
        data[key][UNSCORED] = 0
    return data


def verls_steps(config: ActorConfig) -> list[tuple[float, dict[str, float]]]:
    """(loss, the mean of each metric over the micro-batches) of each optimizer step `train`
    takes: its mini-batches of 6 rows, split into the micro-batches of 2 the stub engine
    makes, each micro-batch's loss from verl's own functions (module docstring)."""
    policy_loss = core_algos.get_policy_loss_fn(config.policy_loss.loss_mode)
    steps = []
    for mini in tu.make_iterator(trained_rollout(), mini_batch_size=6, epochs=1, seed=0):
        tokens = int(mini["loss_mask"].sum())
        tu.assign_non_tensor(mini, global_batch_size=6, dp_size=1, batch_num_tokens=tokens)
        tu.assign_non_tensor(mini, use_dynamic_bsz=False, micro_batch_size_per_gpu=2)
        config.global_batch_info.update(
            dp_size=1,
            batch_num_tokens=tokens,
            global_batch_size=6,
            loss_scale_factor=config.loss_scale_factor,
        )
        total, metrics = 0.0, {}
        micro_batches = prepare_micro_batches(mini)[0]
        for micro in micro_batches:
            logp = no_padding_2_padding(model_output(micro)["log_probs"], micro)
            mask = micro["response_mask"].to(torch.bool)
            loss, logged = policy_loss(
                old_log_prob=micro["old_log_probs"],
                log_prob=logp,
                advantages=micro["advantages"],
                response_mask=mask,
                loss_agg_mode=config.loss_agg_mode,
                config=config,
                rollout_is_weights=micro["rollout_is_weights"],
            )
            if config.use_kl_loss:
                kl = core_algos.kl_penalty(logp, micro["ref_log_prob"], config.kl_loss_type)
                kl_loss = core_algos.agg_loss(
                    kl, mask, config.loss_agg_mode, **config.global_batch_info
                )
                loss = loss + config.kl_loss_coef * kl_loss
            total += float(loss)
            for name, value in logged.items():
                metrics[name] = metrics.get(name, 0.0) + float(value) / len(micro_batches)
        steps.append((total, metrics))
    return steps


def own_replay(run: Path) -> dict[str, Any]:
    """The run's own policy's entry of `replay RUN -p SPEC --format json`."""
    spec = open_run(run).policy_spec or ""
    done = CliRunner().invoke(app, ["replay", str(run), "-p", spec, "--format", "json"])
    assert done.exit_code == 0, done.output
    (own,) = json.loads(done.stdout)["policies"]
    assert own["own"]
    return own


def assert_replay_gives_verls_steps(
    recording: Path, capsys: pytest.CaptureFixture[str], settings: dict[str, Any]
) -> None:
    train(actor_config(**settings), unscored=UNSCORED, scale=SCALE)
    stabledrl_verl.uninstall()
    assert "stabledrl:" not in capsys.readouterr().err
    own = own_replay(recording)
    verl = verls_steps(actor_config(**settings))
    assert [row["step"] for row in own["steps"]] == [0, 1]
    clipped = 0.0
    for row, (loss, metrics) in zip(own["steps"], verl, strict=True):
        assert -row["objective"] == pytest.approx(loss, rel=1e-5, abs=1e-6)
        for name in METRICS:
            logged = metrics.get(f"actor/{name}")
            replayed = row[f"verl_{name}"]
            assert (replayed is None) == (logged is None), name
            if logged is not None:
                assert replayed == pytest.approx(logged, rel=1e-5, abs=1e-6), name
        clipped += metrics.get("actor/pg_clipfrac", 0.0)
    if settings["loss_mode"] not in ("sapo", "gpg", "kl_cov"):  # verl reports 0 or none
        assert clipped > 0


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", LOSS_MODES)
def test_replay_gives_verls_own_loss_and_metrics(
    mode: str, agg: str, recording: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = {"loss_mode": mode, "loss_agg_mode": agg, **SETTINGS.get(mode, {})}
    assert_replay_gives_verls_steps(recording, capsys, settings)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_replay_gives_verls_own_loss_with_its_kl_loss(
    agg: str, recording: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """verl's KL loss (low_var_kl) takes the aggregation of the policy term: the spec's beta."""
    settings = {"loss_mode": "cispo", "loss_agg_mode": agg, **KL_LOSS}
    assert_replay_gives_verls_steps(recording, capsys, settings)


@pytest.mark.parametrize("side", ["clip_ratio_low", "clip_ratio_high"])
@pytest.mark.parametrize("mode", ["vanilla", "gspo", "cispo", "dppo_tv", "dppo_kl", "geo_mean"])
def test_an_infinite_clip_ratio_is_recorded_as_verl_trains_it(
    mode: str, side: str, recording: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`clip_ratio_high=inf` (or `clip_ratio_low=inf`): verl clips that side of the ratio
    (dppo: of the probability change; geo_mean: of log r) nowhere, and trains. It was refused
    in one line (`eps_high expects a finite number, got 'inf'`); it is recorded with the bound
    1e9, which no ratio inside verl's clamps reaches, and replays verl's loss and metrics."""
    settings = {"loss_mode": mode, "loss_agg_mode": "seq-mean-token-mean", side: math.inf}
    assert_replay_gives_verls_steps(recording, capsys, settings)
    bound = {"clip_ratio_low": "low", "clip_ratio_high": "high"}[side]
    assert f"_{bound}=1000000000" in (open_run(recording).policy_spec or "")


@pytest.mark.parametrize(
    ("mode", "agg"),
    [("vanilla", "token-mean"), ("gspo", "seq-mean-token-sum"), ("geo_mean", AGG_MODES[-1])],
)
def test_a_loss_scale_factor_verl_does_not_divide_by_may_be_inf(
    mode: str, agg: str, recording: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """verl divides by `loss_scale_factor` under seq-mean-token-sum-norm only (and not in
    geo_mean's term): an infinite one elsewhere trains as verl's loss without it. The
    recording stopped at its first step ('meta must be JSON-serializable: Out of range float
    values are not JSON compliant'); the run's meta now names it as text."""
    settings = {"loss_mode": mode, "loss_agg_mode": agg, "loss_scale_factor": math.inf}
    assert_replay_gives_verls_steps(recording, capsys, settings)
    assert open_run(recording).manifest["meta"]["loss_scale_factor"] == "inf"


@pytest.mark.parametrize(
    ("settings", "said"),
    [
        ({"loss_mode": "clip_cov"}, "loss_mode 'clip_cov': verl zeroes a random draw"),
        ({"loss_mode": "dro", "policy_loss": {"dro_beta": 0.1}}, "loss_mode 'dro' is not one of"),
        ({"loss_mode": "geo_mean", **KL_LOSS}, "loss_mode 'geo_mean' with use_kl_loss"),
        (
            {"loss_mode": "sapo", "loss_agg_mode": "token-sum", **KL_LOSS},
            "loss_mode 'sapo' with use_kl_loss and loss_agg_mode 'token-sum'",
        ),
    ],
    ids=["clip-cov", "dro", "geo-mean-kl", "sapo-kl-token-sum"],
)
def test_a_loss_the_catalogue_cannot_express_is_refused_in_one_line_and_training_goes_on(
    settings: dict[str, Any], said: str, recording: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Recorded as another policy, replay would compare another loss with verl's: it is not
    recorded at all, said in one line, and every update runs."""
    outputs = train(actor_config(**settings), unscored=UNSCORED, scale=SCALE)
    stabledrl_verl.uninstall()
    assert len(outputs) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("stabledrl: warning: recording step 0: cannot record this verl run: ")
    assert said in line and line.endswith("; recording is off, training continues")
    assert (recording.parent / "status").read_text().startswith("2\t")
    assert not list(recording.glob("steps/*.safetensors"))
