"""The TRL integration against a real `trl.RLOOTrainer` (1.16.x) on CPU.

The tiny run of tests/trl_scripts/tiny_grpo.py as an RLOOConfig (`tiny_rloo_config`):
num_iterations=2 so ratios move, gradient_accumulation_steps (2) != steps_per_generation (4).
Each completion is one recorded entry (RLOO clips the ratio of its summed log-probs); the
run's own policy, replayed, reproduces TRL's logged loss and clip_ratio/* on every step.
The 2-rank torchrun RLOO run is checked in tests/test_integration_trl.py
(test_two_ranks_with_torchrun), trained in the same launch as the 2-rank GRPO run.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _cli import cli_command
from _steps import policy_batch
from _trl import assert_replays_trl_rloo, child_env, logged_steps, tiny, train
from test_readme import block_after
from tiny_configs import RLOO_PARITY  # (plain data beside the tiny run's helpers, on _trl's path)

import stabledrl_cli as sd

__all__ = ["tiny"]  # the tiny run's fixture, shared with the GRPO tests

SNIPPET_PARTS = (
    "from tiny_grpo import count_b, tiny_dataset, tiny_model, tiny_rloo_config, tiny_tokenizer\n"
    "model, tokenizer, dataset, reward = tiny_model(), tiny_tokenizer(), tiny_dataset(), count_b\n"
    "config = tiny_rloo_config('trl_out')\n"
)
"""What docs/frameworks.md's RLOO snippet takes as given: the tiny run's parts."""


@pytest.mark.parametrize("case", list(RLOO_PARITY))
def test_own_policy_reproduces_trl_rloo(tiny: Any, tmp_path: Path, case: str) -> None:
    out = tmp_path / "run"
    trainer = train(tiny, out, rloo=True, **RLOO_PARITY[case])
    spec = trainer.stabledrl_policy.spec
    eps_high = trainer.args.epsilon_high or trainer.args.epsilon
    assert (
        spec
        == sd.get_policy(
            f"ppo:agg=micro-token-mean,eps_low={trainer.args.epsilon},eps_high={eps_high}"
        ).spec
    )
    logged = logged_steps(trainer.state.log_history)
    run = sd.open_run(out)
    assert run.unit == "sequence" and run.policy_spec == spec and run.group_ids == "global"
    assert run.manifest["meta"]["trainer"] == "RLOOTrainer"
    assert run.step_numbers == sorted(logged) == [1, 2, 3, 4]
    accumulation = trainer.args.gradient_accumulation_steps
    recorded = sd.get_policy(f"{spec.replace('micro-token-mean', 'recorded')}")
    for step in run:
        assert step.scalars["grad_norm"] == logged[step.step]["grad_norm"]
        assert step.scalars["loss"] == pytest.approx(logged[step.step]["loss"], rel=1e-6)
        assert step.num_sequences == 4 * accumulation  # one entry a completion
        assert step["seq_id"].tolist() == list(range(step.num_sequences))
        assert sorted(set(step["micro_batch"].tolist())) == list(range(accumulation))
        # the recorded normaliser is TRL's: replayed as is, the same objective
        batch = policy_batch(step)
        assert float(recorded.weights(batch).objective) == pytest.approx(
            float(trainer.stabledrl_policy.weights(batch).objective), rel=1e-6
        )
    # the update's index on its rollout: each rollout serves 4 updates (2 on each pass)
    assert [s.scalars["inner_step"] for s in run] == [0, 1, 2, 3]
    own = assert_replays_trl_rloo(out, spec, logged)
    if trainer.args.epsilon < 0.2:  # ratios leave the small epsilons: TRL clips
        assert max(own.series["trl_clip_ratio_region_mean"]) > 0
    if case == "rloo-epsilons":  # on both sides
        assert max(own.series["trl_clip_ratio_low_mean"]) > 0
        assert max(own.series["trl_clip_ratio_high_mean"]) > 0
    if case == "rloo-beta-normalized":  # the KL is in the advantages, not in the spec
        meta = run.manifest["meta"]
        assert meta["beta"] == 0.1 and meta["normalize_advantages"] is True
        assert meta["reward_weights"] == [1.0] and meta["reward_clip_range"] is None
    if case == "rloo-truncated":  # rows TRL masks whole stay entries: logps 0, ratio 1
        truncated = [int((s["logp"] == 0).sum()) for s in run]
        assert all(n > 0 for n in truncated)
        assert all(bool((s["logp_old"][s["logp"] == 0] == 0).all()) for s in run)


def test_readme_rloo_snippet_records_under_stabledrl_record(tmp_path: Path) -> None:
    """docs/frameworks.md's RLOO snippet, as written, after the tiny run's parts, under `stabledrl
    record`: it records into the directory `record` gives it."""
    pytest.importorskip("trl")
    (tmp_path / "train.py").write_text(SNIPPET_PARTS + block_after("trl-rloo-snippet") + "\n")
    cmd = [*cli_command(), "record", "--out", "run", "--", sys.executable, "train.py"]
    done = subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    run = sd.open_run(tmp_path / "run")
    assert run.step_numbers == [1, 2, 3, 4] and run.unit == "sequence"
    assert run.policy_spec == "ppo:agg=micro-token-mean"  # TRL's default epsilons


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_adv_rloo_recomputes_trls_advantages_unless_the_kl_shaped_the_rewards(
    tiny: Any, tmp_path: Path, beta: float
) -> None:
    """With each prompt's completions in one step (steps_per_generation equal to the
    accumulation steps), `adv=rloo` recomputes from the recorded rewards the advantages TRL
    computed: the own policy replays to the same per-step rows either way. With beta 0.1 TRL
    first subtracts beta times each completion's summed log ratio to the reference model from
    its reward, which the recorded reward (the reward functions') leaves out: the rows part
    once the policy has left the reference, after the first rollout's two steps. The same to
    float32 rounding: TRL computes the leave-one-out means in float32, a replay in float64."""
    out = tmp_path / "run"
    trainer = train(tiny, out, rloo=True, steps_per_generation=2, beta=beta)
    run = sd.open_run(out)
    assert not any(bool(step["group_split"].any()) for step in run)
    assert run.manifest["meta"]["beta"] == beta
    spec = trainer.stabledrl_policy.spec
    result = sd.replay(out, [spec, f"{spec},adv=rloo"])
    recorded, recomputed = (list(p.series.iter_rows()) for p in result.policies)
    same = [_close(a, b) for a, b in zip(recorded, recomputed, strict=True)]
    assert same == ([True] * 4 if beta == 0.0 else [True, True, False, False])


def _close(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two replayed rows alike to float32 rounding (1e-5 relative, 1e-6 absolute: an
    on-policy objective is a residue of 0), a NaN alike a NaN."""
    return a.keys() == b.keys() and all(
        x == y
        or (x != x and y != y)
        or (
            isinstance(x, float)
            and isinstance(y, float)
            and math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6)
        )
        for x, y in ((a[k], b[k]) for k in a)
    )


def test_token_counts_are_trls_completion_lengths(
    tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each recorded completion's token_count is the number of tokens TRL summed its log-prob
    over (its completion_mask's sum in `_compute_loss`), 0 for a completion TRL masks whole
    (mask_truncated_completions); the collapse warning then measures per token."""
    from stabledrl_cli.integrations._trl_trainer import TRL

    lengths: list[list[int]] = []
    compute_loss = TRL.RLOOTrainer._compute_loss

    def counted(self: Any, model: Any, inputs: dict[str, Any]) -> Any:
        lengths.append(inputs["completion_mask"].sum(1).tolist())
        return compute_loss(self, model, inputs)

    monkeypatch.setattr(TRL.RLOOTrainer, "_compute_loss", counted)
    out = tmp_path / "run"
    trainer = train(tiny, out, rloo=True, mask_truncated_completions=True)
    run = sd.open_run(out)
    accumulation = trainer.args.gradient_accumulation_steps
    recorded = [step["token_count"].tolist() for step in run]
    expected = [
        [n for part in lengths[i : i + accumulation] for n in part]
        for i in range(0, len(lengths), accumulation)
    ]
    assert recorded == expected and len(recorded) == 4
    counts = [count for step in recorded for count in step]
    assert 0 in counts and max(counts) > 0  # some completions truncated, some not
    assert sd.replay(out, device="cpu").observed.collapse_warning.measure == "token"
