"""Under the optimizer hooks, `log_policy_batch(n)` and the run optimizer's n-th `step()` are one
step. A loop whose batch numbers and optimizer steps part (it skips `optimizer.step()` on an
inf gradient, or took optimizer steps before its first batch) has its recording stopped: the
line that says so names the two halves that part and the way out, not only that a step number
'does not follow' another the script never logged."""

from __future__ import annotations

import math

import pytest
from _record_here import record_python_here

from stabledrl_cli import open_run

SCRIPT = """
import torch
import stabledrl_cli as sd

model = torch.nn.Linear(2, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range({warm_up}):
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
for step in range(4):
    model(torch.ones(1, 2)).sum().backward()
    sd.log_policy_batch(step, logp=[-1.0], logp_old=[-1.0], advantages=[1.0], seq_id=[0])
    if step != {skipped}:  # the loop's own skip of a step with an inf gradient
        optimizer.step()
    optimizer.zero_grad()
print("trained")
"""

HOW = (
    "under the optimizer hooks, a batch's number is its optimizer step's (the run optimizer's "
    "step() calls, from 0): number the batches so, or record with --no-optimizer-hooks"
)


@pytest.mark.parametrize(
    ("warm_up", "skipped", "said"),
    [
        (0, 1, "recording optimizer step 1: optimizer step 1 comes after log_policy_batch(2)"),
        (3, -1, "log_policy_batch failed at step 0: log_policy_batch(0) comes after optimizer "
                "step 2"),
    ],
    ids=["a skipped optimizer.step()", "optimizer steps before the first batch"],
)  # fmt: skip
def test_batches_and_optimizer_steps_that_part_are_named(
    tmp_path, monkeypatch, capfd, warm_up, skipped, said
):
    """Before: 'recording optimizer step 1: step 1 does not follow step 2; steps must
    increase' and 'log_policy_batch failed at step 0: step 0 does not follow step 2; steps must
    increase'."""
    script = SCRIPT.format(warm_up=warm_up, skipped=skipped)
    done, errors = record_python_here(monkeypatch, capfd, script, "-p", "grpo", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "trained" in done.stdout
    assert errors == [f"error: recording failed: {said}: {HOW}"], done.stderr


LOGGED_AFTER = """
import torch
import stabledrl_cli as sd

model = torch.nn.Linear(2, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(5):
    model(torch.ones(1, 2)).sum().backward()
    if step != {skipped}:  # the loop's own skip of a step with an inf gradient
        optimizer.step()
    optimizer.zero_grad()
    sd.log_policy_batch(step, logp=[-1.0], logp_old=[-1.0], advantages=[1.0], seq_id=[0])
print("trained")
"""


def test_a_skipped_optimizer_step_of_a_loop_that_logs_after_it_is_warned_of(
    tmp_path, monkeypatch, capfd
):
    """A loop that logs each batch after its optimizer step and skips step() at step 2: from
    there on each batch is paired with the next iteration's optimizer step (batch 2 with the
    step of iteration 3, ...), which nothing said (exit 0, no line). The hooks cannot tell it
    from a loop that turned to logging its batches first, which pairs rightly: the step that
    pairs a batch logged first, in a loop that paired its first batch after, warns once."""
    script = LOGGED_AFTER.format(skipped=2)
    done, _ = record_python_here(monkeypatch, capfd, script, "-p", "grpo", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "trained" in done.stdout
    warned = [line for line in done.stderr.splitlines() if "came before" in line]
    assert warned == [
        "stabledrl: warning: log_policy_batch(2) came before its optimizer step, where the "
        "loop's first batch came after its own: if the loop skipped an optimizer.step() (an "
        "inf gradient, without a GradScaler), each batch from there on is recorded with the "
        f"next iteration's optimizer step; {HOW}"
    ], done.stderr
    assert open_run(tmp_path / "run").step_numbers == [0, 1, 2, 3, 4]


CLIPPED_AND_SKIPPED = """
import math, sys
import torch
import stabledrl_cli as sd

torch.manual_seed(0)
model = torch.nn.Linear(2, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
zero = optimizer.zero_grad if sys.argv[1] == "optimizer" else model.zero_grad
for step in range(5):
    zero()
    model(torch.randn(3, 2)).sum().backward()
    if step == 2:
        model.weight.grad[0, 0] = float("nan")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    sd.log_policy_batch(step, logp=[-1.0], logp_old=[-1.0], advantages=[1.0], seq_id=[0],
                        loss=float(step))
    if math.isfinite(grad_norm):  # the loop's own rule: no update on a NaN gradient
        optimizer.step()
print("trained")
"""


@pytest.mark.parametrize("zero", ["optimizer", "model"])
def test_a_step_the_loop_skips_after_its_clip_is_recorded_as_skipped(
    tmp_path, monkeypatch, capfd, zero
):
    """A loop that clips, logs its batch, and skips optimizer.step() on a NaN grad norm: the
    iteration's gradients, which the clip measured, are zeroed with no step. Before, the skip
    was not recorded, the next optimizer step took its number, 'optimizer step 2 comes after
    log_policy_batch(3)' stopped recording (exit 2), and the NaN was in no step. Now it is
    recorded as a GradScaler's skip is: optimizer_skipped 1, its NaN grad norm, with its
    batch; every later batch with its own optimizer step."""
    script = CLIPPED_AND_SKIPPED.replace("sys.argv[1]", repr(zero))
    done, errors = record_python_here(monkeypatch, capfd, script, "-p", "grpo", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "trained" in done.stdout and not errors, done.stderr
    run = open_run(tmp_path / "run")
    assert run.step_numbers == [0, 1, 2, 3, 4]
    for n in run.step_numbers:
        scalars = run.step(n).scalars
        assert scalars["loss"] == n, (n, scalars)
        assert scalars.get("optimizer_skipped", 0.0) == (n == 2), (n, scalars)
        assert math.isnan(scalars["grad_norm"]) == (n == 2), (n, scalars)
    assert run.step(2).scalars["nonfinite_grads"] == 1


def test_a_batch_logged_once_a_round_is_named(tmp_path, monkeypatch, capfd):
    """A loop that logs each accumulation round of a step (StableDRL's grad_accumulation, a
    micro-batch) with the step's number: the second call stopped recording with 'step 0 does
    not follow step 0; steps must increase', which did not say that a step is one call."""
    script = (
        "import stabledrl_cli as sd\n"
        "for step in range(2):\n"
        "    for round_idx in range(2):\n"
        "        sd.log_policy_batch(step, logp=[-1.0], logp_old=[-1.0], advantages=[1.0],"
        " seq_id=[0])\n"
        "print('trained')\n"
    )
    done, errors = record_python_here(monkeypatch, capfd, script, "-p", "grpo", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "trained" in done.stdout
    assert errors == [
        "error: recording failed: log_policy_batch failed at step 0: log_policy_batch(0) was "
        "called twice: a step is one call, after its last backward(), its micro-batches' (or "
        "accumulation rounds') arrays concatenated, micro_batch= naming each sequence's"
    ], done.stderr
    assert open_run(tmp_path / "run").step_numbers == [0]
