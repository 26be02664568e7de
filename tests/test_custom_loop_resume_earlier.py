"""A training that crashed after step 4 and resumes from its checkpoint of step 3 into the
same run with `resume=True` alone: the run goes on after its last step, so step 3 is refused.
The refusal names the way out, resume_from=3, not only 'steps must increase' (a Recorder) or
'number the batches so, or record with --no-optimizer-hooks' (under the optimizer hooks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _record_here import record_python_here

import stabledrl_cli as sd
from stabledrl_cli.capture.bootstrap import HOOKS_SOURCE
from stabledrl_cli.errors import UsageError


def _batch(step: int) -> dict[str, torch.Tensor]:
    logp = -torch.rand(2, 3, generator=torch.Generator().manual_seed(step))
    return {"logp": logp, "logp_old": logp, "advantages": torch.tensor([1.0, -1.0])}


def test_a_recorder_resumed_after_its_last_step_names_resume_from(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with sd.Recorder(run, policy="grpo") as rec:
        for step in range(5):
            rec.log_step(step, **_batch(step))
    with sd.Recorder(run, policy="grpo", resume=True) as rec:
        assert rec.resumed_after == 4
        with pytest.raises(UsageError) as refused:
            rec.log_step(3, **_batch(3))
    assert str(refused.value) == (
        "step 3 does not follow step 4; steps must increase (the run this Recorder resumed "
        "ends at step 4; a training resumed from an earlier checkpoint passes resume_from=3, "
        "which records the steps from 3 on again)"
    )
    with sd.Recorder(run, policy="grpo", resume=True, resume_from=3) as rec:
        assert rec.resumed_after is None
        rec.log_step(3, **_batch(3))
    assert sd.open_run(run).step_numbers == [0, 1, 2, 3]


def test_a_step_logged_twice_after_a_resume_is_refused_as_before(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with sd.Recorder(run, policy="grpo") as rec:
        rec.log_step(0, **_batch(0))
    with sd.Recorder(run, policy="grpo", resume=True) as rec:
        rec.log_step(1, **_batch(1))
        with pytest.raises(UsageError) as refused:
            rec.log_step(1, **_batch(1))
    assert str(refused.value) == (
        "step 1 was logged already: a step is one log_step call (rewrite_step replaces the "
        "last one)"
    )


SCRIPT = """
import torch
import stabledrl_cli as sd

model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(3, 6):  # resumed from the checkpoint of step 3
    optimizer.zero_grad()
    model(torch.randn(2, 4)).pow(2).mean().backward()
    optimizer.step()
    logp = -torch.rand(2, 3)
    sd.log_policy_batch(step, logp=logp, logp_old=logp, advantages=torch.ones(2),
                        recorder_kwargs={"resume": True})
"""


def test_under_the_optimizer_hooks_the_refusal_names_recorder_kwargs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The hooks number the resumed training's optimizer steps on from the run's last (5, 6,
    ...), so its batch 3 comes after optimizer step 5. The crashed training's run of steps 0-4
    (each a batch and its optimizer step's scalars, as record's hooks write them) is written
    in this process."""
    with sd.Recorder(tmp_path / "run", policy="grpo", source=HOOKS_SOURCE) as rec:
        for step in range(5):
            rec.log_step(step, **_batch(step), grad_norm=1.0, lr=0.1)
    done, errors = record_python_here(
        monkeypatch, capfd, SCRIPT, "-p", "grpo", "--force", cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr
    assert errors[-1] == (
        "error: recording failed: log_policy_batch failed at step 3: log_policy_batch(3) comes "
        "after optimizer step 5 (the run this Recorder resumed ends at step 4; a training "
        "resumed from an earlier checkpoint passes recorder_kwargs resume_from=3, which "
        "records the steps from 3 on again)"
    )


def test_a_resume_given_another_reward_range_or_estimator_says_the_run_keeps_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A loop resumed with its reward range corrected to (-1, 1) for its +-1 rewards: the run
    kept (0, 1) without a word, and its observed reward collapse stayed at step 82 where
    (-1, 1) finds none (success rate 0.7, then 0.45, 120 steps of 16 rewards)."""
    run = tmp_path / "run"
    estimator = {"kind": "elbo", "mask_samples": 2}
    with sd.Recorder(run, policy="grpo", reward_range=(0.0, 1.0), estimator=estimator) as rec:
        rec.log_step(0, **_batch(0))
    capsys.readouterr()
    with sd.Recorder(run, policy="grpo", resume=True, reward_range=(0, 1), estimator=estimator):
        pass
    with sd.Recorder(run, policy="grpo", resume=True):
        pass
    assert capsys.readouterr().err == ""
    with sd.Recorder(
        run, policy="grpo", resume=True, reward_range=(-1.0, 1.0), estimator={"kind": "elbo"}
    ):
        pass
    assert capsys.readouterr().err.splitlines() == [
        f"stabledrl: warning: {run}: a resumed run keeps its reward_range [0.0, 1.0]; this "
        "recorder's [-1.0, 1.0] is not recorded (a run has one, for every step)",
        f"stabledrl: warning: {run}: a resumed run keeps its estimator {json.dumps(estimator)}; "
        'this recorder\'s {"kind": "elbo"} is not recorded (a run has one, for every step)',
    ]
    assert sd.open_run(run).reward_range == (0.0, 1.0)
