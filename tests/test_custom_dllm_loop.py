"""examples/custom_dllm_loop.py, the recipe of docs/custom-loops.md: a hand-written StableDRL
(sequence ELBO) or d1 (per-token, same mask) loop on the built-in model, recorded and replayed.
The replay of the run's own policy must give the loop's own loss on every step."""

from __future__ import annotations

import json
import math
import os
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom_dllm_loop.py"
BRIEF = ["--rollouts", "2", "--pretrain-steps", "10"]  # 4 optimizer steps


def _own_steps(run: Path) -> tuple[dict, list[dict]]:
    result = CliRunner().invoke(app, ["replay", str(run), "--format", "json", "--detail"])
    assert result.exit_code == 0, result.output
    own = next(p for p in json.loads(result.stdout)["policies"] if p["own"])
    return own, own["steps"]


def _assert_replay_gives_the_loops_loss(run: Path) -> None:
    own, rows = _own_steps(run)
    losses = {s.step: s.scalars["loss"] for s in sd.open_run(run)}
    assert [row["step"] for row in rows] == sorted(losses) == [0, 1, 2, 3]
    for row in rows:  # replay's objective J is minus the loop's loss
        assert row["objective"] == pytest.approx(-losses[row["step"]], rel=1e-5, abs=1e-7)
    assert own["summary"]["loss_parity"] < 1e-5


def test_stabledrl_style_under_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """log_policy_batch under `stabledrl record`: unit sequence, ELBO under fresh masks."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.delenv("STABLEDRL_RUN_DIR", raising=False)
    run = tmp_path / "run"
    # The example pretrains with another optimizer first: without the hooks (docs/custom-loops.md)
    cmd = ["record", "--out", str(run), "--no-optimizer-hooks", "--", sys.executable]
    cmd += [str(EXAMPLE), *BRIEF]
    result = CliRunner().invoke(app, cmd)
    assert result.exit_code == 0, result.output
    opened = sd.open_run(run)
    assert opened.policy_spec == "stabledrl:norm=batch"
    assert opened.manifest["unit"] == "sequence"
    estimator = opened.manifest["estimator"]
    assert (estimator["kind"], estimator["same_mask"], estimator["mask_samples"]) == (
        "elbo",
        False,
        1,
    )
    first = opened.step(0)
    assert first.num_tokens == first.num_sequences == 32  # one ELBO per sequence
    # a fresh mask at theta == theta_old: log r is masking noise, not zero
    assert (first["logp"] - first["logp_old"]).abs().max() > 0
    _assert_replay_gives_the_loops_loss(run)


def test_under_the_optimizer_hooks_pretraining_numbers_the_run_as_the_page_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/custom-loops.md, on why the example is recorded with --no-optimizer-hooks: under
    the hooks its pretraining steps number the run, so RL batch 0 falls behind the last of
    them and recording stops (exit 2). The step the page names is the last of the example's
    default pretraining (the page said 9, of 100 pretraining steps: 99)."""
    default = re.search(r'"--pretrain-steps", type=int, default=(\d+)', EXAMPLE.read_text())
    said = re.search(r"fall behind\s+step (\d+)", (ROOT / "docs" / "custom-loops.md").read_text())
    assert default and said
    assert int(said.group(1)) == int(default.group(1)) - 1
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.delenv("STABLEDRL_RUN_DIR", raising=False)
    cmd = ["record", "--out", str(tmp_path / "run"), "--", sys.executable, str(EXAMPLE), *BRIEF]
    result = CliRunner().invoke(app, cmd)
    assert result.exit_code == 2, result.output
    said = "log_policy_batch(0) comes after optimizer step 9:"  # of 10 steps
    assert said in " ".join(result.output.split())


def test_the_examples_own_usage_records_it_as_the_page_does() -> None:
    """The example's docstring is the first usage a reader copies: its `stabledrl record`
    lines gave no --no-optimizer-hooks, so they recorded nothing and exited 2 (the test
    above), where docs/custom-loops.md's commands record."""
    text = EXAMPLE.read_text().replace("\\\n", "")  # a command continued onto the next line
    usage = [" ".join(line.split()) for line in text.splitlines()]
    record = [line for line in usage if line.startswith("stabledrl record")]
    page = " ".join((ROOT / "docs" / "custom-loops.md").read_text().replace("\\\n", "").split())
    assert len(record) == 2
    for line in record:
        assert "--no-optimizer-hooks" in line and line in page, line


def test_d1_style_with_a_recorder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Recorder made by the loop itself: unit token, the same mask for old and new. The
    example runs as its `python examples/custom_dllm_loop.py ...` would, in this process (no
    `record` around it: nothing of the process's own is tested)."""
    run = tmp_path / "run"
    monkeypatch.delenv("STABLEDRL_RUN_DIR", raising=False)
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--style", "d1", "--out", str(run), *BRIEF])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    opened = sd.open_run(run)
    assert opened.policy_spec == "ppo:beta=0.04"
    assert opened.manifest["unit"] == "token"
    assert opened.manifest["estimator"]["same_mask"] is True
    first = opened.step(0)
    assert first.num_tokens == 32 * 5 and "logp_ref" in first.fields
    # the same mask seed at theta == theta_old: the ratio is exactly 1
    assert (first["logp"] == first["logp_old"]).all()
    _assert_replay_gives_the_loops_loss(run)


def test_spg_loss_is_reinforce_with_recorded_length_weights(tmp_path: Path) -> None:
    """SPG without SNIS (SPGTrainer.compute_loss): -A * per_seq_logps weighted by completion
    length over the batch's total, which docs/custom-loops.md records as
    `reinforce:agg=recorded` with loss_weight = length and loss_scale = the total."""
    gen = torch.Generator().manual_seed(0)
    advantages, per_seq_logps = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    completion_length = torch.randint(1, 30, (8,), generator=gen).float()
    per_seq_loss = -advantages.unsqueeze(0) * per_seq_logps.unsqueeze(0)
    loss = (per_seq_loss * completion_length).sum() / completion_length.sum()
    spec = "reinforce:agg=recorded"
    with sd.Recorder(tmp_path / "run", policy=spec, unit="sequence") as recorder:
        recorder.log_step(0, logp=per_seq_logps, logp_old=per_seq_logps, advantages=advantages,
                          group_id=torch.arange(8) // 4, loss_weight=completion_length,
                          loss_scale=completion_length.sum().expand(8), loss=loss)  # fmt: skip
    own = sd.replay(tmp_path / "run", policies=[spec], device="cpu").own
    assert own is not None
    assert float(own.series["objective"][0]) == pytest.approx(-float(loss), rel=1e-6)


def test_stabledrl_step_of_accumulated_rounds_replays_the_loops_loss(tmp_path: Path) -> None:
    """StableDRL's configs accumulate 4 rounds a step (grad_accumulation), each one prompt's
    completions with a softmax of its own, loss / grad_accumulation each. docs/custom-loops.md
    records the rounds concatenated, groups numbered over the step, under the spec its table
    names: replaying it gives the loop's loss (the page said stabledrl:norm=batch with
    arange(B) // num_generations, one softmax over the step: loss parity 0.186)."""
    row = re.search(r"\| StableDRL, `use_snis=True` \| `([^`]+)`", (ROOT / "docs" /
                    "custom-loops.md").read_text())  # fmt: skip
    assert row
    spec, grad_accumulation, num_generations, c = row.group(1), 4, 8, 5.0
    gen = torch.Generator().manual_seed(0)
    rounds: list[dict[str, torch.Tensor]] = []
    losses = []
    for round_idx in range(grad_accumulation):
        per_seq_elbo = -1 + 0.5 * torch.randn(num_generations, generator=gen)
        ref_elbo = per_seq_elbo + 0.6 * torch.randn(num_generations, generator=gen)
        rewards = torch.rand(num_generations, generator=gen)
        advantages = rewards - rewards.mean()
        w = torch.softmax(torch.clamp(per_seq_elbo - ref_elbo, max=math.log(c)), dim=0)
        losses.append(-torch.sum(w * advantages * per_seq_elbo))
        b = num_generations
        rounds.append({"logp": per_seq_elbo, "logp_old": ref_elbo, "advantages": advantages,
                       "reward": rewards,
                       "group_id": round_idx * (b // num_generations)
                       + torch.arange(b) // num_generations})  # fmt: skip
    loss = sum(losses) / grad_accumulation
    with sd.Recorder(tmp_path / "run", policy=spec, unit="sequence") as recorder:
        recorder.log_step(0, **{k: torch.cat([r[k] for r in rounds]) for k in rounds[0]},
                          loss=loss, inner_step=0)  # fmt: skip
    own = sd.replay(tmp_path / "run", policies=[spec], device="cpu").own
    assert own is not None
    assert float(own.series["objective"][0]) == pytest.approx(-float(loss), rel=1e-5)
