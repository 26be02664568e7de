"""A researcher's first custom dLLM loop: the mistakes refused in one line that names the fix
(a loop's per-token log-probs under unit "sequence", per-sequence sums under unit "token"),
a policy that changes mid-run under `stabledrl record`, the loop's two recordings, a Recorder
and `stabledrl record`, compared by diff, and the check of a spec on one step that
docs/custom-loops.md gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _bootstrap_state import fresh_recording
from test_readme import block_after
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.capture import bootstrap, log_policy_batch
from stabledrl_cli.cli.app import app
from stabledrl_cli.errors import UsageError

B, L = 8, 6


def _log(run: Path, unit: str, logp: torch.Tensor) -> None:
    with sd.Recorder(run, policy="grpo", unit=unit) as rec:
        rec.log_step(
            0,
            logp=logp,
            logp_old=logp - 0.1,
            advantages=torch.randn(B),
            group_id=torch.arange(B) // 4,
            reward=torch.rand(B),
        )


def test_per_token_log_probs_under_unit_sequence_name_unit_token(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as refused:
        _log(tmp_path / "run", "sequence", -torch.rand(B, L))
    assert str(refused.value).endswith("; per-token log-probs are unit 'token'")


def test_log_probs_summed_per_sequence_under_unit_token_name_unit_sequence(
    tmp_path: Path,
) -> None:
    with pytest.raises(UsageError) as refused:
        _log(tmp_path / "run", "token", -torch.rand(B, L).sum(1))
    assert str(refused.value) == (
        "seq_id: required for flat per-token arrays (or pass [B, L] arrays); one entry a "
        "sequence (its log-probs summed, an ELBO) is unit 'sequence'"
    )


def test_a_mask_of_weights_names_loss_weight(tmp_path: Path) -> None:
    """A loop's per-token weights (here 0.5 and 1) given as the mask."""
    with sd.Recorder(tmp_path / "run", policy="grpo") as rec, pytest.raises(UsageError) as refused:
        logp = -torch.rand(B, L)
        weights = torch.where(torch.arange(L) < 3, 0.5, 1.0).expand(B, L)
        rec.log_step(0, logp=logp, logp_old=logp, advantages=torch.randn(B), mask=weights)
    assert str(refused.value) == "mask: values must be 0 or 1 (a weight per entry is loss_weight)"


def _scalar_run(path: Path, **scalars: float) -> Path:
    with sd.Recorder(path, policy="grpo", unit="sequence") as rec:
        for step in range(3):
            logp = -torch.ones(4)
            rec.log_step(
                step, logp=logp, logp_old=logp, advantages=torch.ones(4), grad_norm=1.0, **scalars
            )
    return path


def test_the_hooks_nonfinite_grads_against_a_recorder_run_is_no_parting(tmp_path: Path) -> None:
    """The loop recorded with its Recorder and under `stabledrl record -- python loop.py`
    (whose optimizer hooks add nonfinite_grads): diff read 'scalars part at step 0 /
    nonfinite_grads: absent vs 0 / parted at step 0', exit 1, on bit-identical training."""
    recorder = _scalar_run(tmp_path / "recorder")
    hooks = _scalar_run(tmp_path / "hooks", nonfinite_grads=0)
    result = CliRunner().invoke(app, ["diff", str(recorder), str(hooks)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "scalars     equal on all 3 compared steps" in result.stdout
    assert "but for nonfinite_grads (compared bit for bit only)" in result.stdout
    counted = _scalar_run(tmp_path / "counted", nonfinite_grads=2)
    assert CliRunner().invoke(app, ["diff", str(hooks), str(counted)]).exit_code == 1


def test_the_spec_check_of_custom_loops_md_passes_and_catches_a_wrong_spec() -> None:
    """docs/custom-loops.md's check of a spec on one step runs as written, and trips on the
    specs it names as not the loop's loss."""
    block = block_after("spec-check")
    exec(compile(block, "spec-check", "exec"), {})
    for wrong in ('"ppo"', 'f"grpo:beta={beta}"'):
        with pytest.raises(AssertionError):
            exec(compile(block.replace('f"ppo:beta={beta}"', wrong), "spec-check", "exec"), {})


def test_a_policy_changed_mid_run_warns_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A loop that anneals its KL coefficient in the spec it logs: the later specs were
    dropped without a word (the run read ppo:beta=0.04 on every step, and replay scored its
    steps 2 and 3 with it)."""
    fresh_recording(monkeypatch, tmp_path / "run", tmp_path / "status")
    batch = {"logp": -torch.rand(4), "logp_old": -torch.rand(4), "advantages": torch.randn(4)}
    kwargs = {"unit": "sequence"}
    for step, beta in enumerate((0.04, 0.04, 0.02, 0.01)):
        spec = "ppo:beta=0.04,eps_low=0.2" if step == 1 else f"ppo:beta={beta}"
        batch["logp_ref"] = -torch.rand(4)
        assert log_policy_batch(step, policy=spec, recorder_kwargs=kwargs, **batch)
    bootstrap.close()
    assert capsys.readouterr().err.splitlines() == [
        "stabledrl: warning: log_policy_batch(2) names the policy ppo:beta=0.02, where the "
        "run's, its first batch's, is ppo:beta=0.04: a run has one policy, and replay scores "
        "every step with it as the run's own"
    ]
    assert sd.open_run(tmp_path / "run").policy_spec == "ppo:beta=0.04"


def test_later_batches_naming_no_policy_keep_the_scripts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under `record --policy grpo`, a script whose first batch names dapo and later ones
    none: the run's is dapo (said once), and the later batches change nothing."""
    fresh_recording(monkeypatch, tmp_path / "run", tmp_path / "status")
    monkeypatch.setenv(bootstrap.ENV_POLICY, "grpo")
    batch = {"logp": -torch.rand(4), "logp_old": -torch.rand(4), "advantages": torch.randn(4)}
    for step in range(3):
        policy = "dapo" if step == 0 else None
        assert log_policy_batch(step, policy=policy, recorder_kwargs={"unit": "sequence"}, **batch)
    bootstrap.close()
    assert capsys.readouterr().err.splitlines() == [
        "stabledrl: warning: log_policy_batch(policy=...) names dapo, record --policy grpo: "
        "the run records the script's, dapo"
    ]


def test_inspect_says_the_rewards_fall_below_the_declared_range(tmp_path: Path) -> None:
    """+-1 rewards recorded with the docs' reward_range=(0.0, 1.0): the collapse rule measures
    from their lowest mean instead, which reported a collapse at step 82 of a run whose
    success rate went 0.7 -> 0.45, where (-1, 1) reports none; inspect showed '[0.0, 1.0]'."""
    rewards = torch.tensor([[1.0, -1.0, -1.0, -1.0], [1.0, 1.0, -1.0, 1.0]])
    with sd.Recorder(tmp_path / "run", policy="grpo", unit="sequence", reward_range=(0, 1)) as rec:
        for step, reward in enumerate(rewards):
            logp = -torch.rand(4)
            rec.log_step(step, logp=logp, logp_old=logp, advantages=reward, reward=reward)
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "run")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert (
        "[0.0, 1.0]; the rewards fall below it (reward_mean -0.5): the collapse rule measures "
        "from their lowest"
    ) in result.stdout
