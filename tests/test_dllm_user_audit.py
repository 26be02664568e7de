"""What a dLLM researcher recording their own RL loop (docs/custom-loops.md) runs into: misuses
the docs leave open that the Recorder should say, while the loop trains."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _bootstrap_state import fresh_recording

import stabledrl_cli as sd
from stabledrl_cli.capture import bootstrap, log_policy_batch
from stabledrl_cli.errors import UsageError


def _micro_batches(counts: tuple[int, int]) -> dict[str, np.ndarray]:
    """A d1-style token step of two gradient-accumulation rounds of 2 sequences each, whose
    rows score `counts` tokens a round (random-rate masks hide more in one round)."""
    rng = np.random.default_rng(0)
    logp = -rng.random((4, 4), dtype=np.float32) - 0.1
    mask = np.zeros((4, 4), dtype=bool)
    for row, count in zip(range(4), (counts[0], counts[0], counts[1], counts[1]), strict=True):
        mask[row, :count] = True
    return {
        "logp": logp,
        "logp_old": logp - 0.05,
        "advantages": np.array([1.0, -1.0, 0.5, -0.5], dtype=np.float32),
        "mask": mask,
        "group_id": np.array([0, 0, 1, 1], dtype=np.int32),
        "reward": np.array([1.0, 0.0, 0.75, 0.25], dtype=np.float32),
    }


@pytest.mark.parametrize(
    ("policy", "setting"),
    [
        ("ppo:agg=micro-token-mean", "agg=micro-token-mean"),
        ("stabledrl:norm=micro", "norm=micro"),
    ],
)
def test_a_policy_of_micro_batches_without_micro_batch_is_warned_of_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], policy: str, setting: str
) -> None:
    """custom-loops.md tells a d1 loop with gradient accumulation to record `micro_batch` and
    `agg=micro-token-mean`. A loop that gave the spec but not the field was recorded without a
    word, and replayed as one micro-batch a step: loss parity 0.154 on a d1-style loop of 2
    micro-batches of random-rate masks, found only after training. The first such step warns,
    once; the steps are recorded as given."""
    run = tmp_path / "run"
    with sd.Recorder(run, policy=policy, unit="token") as rec:
        for step in range(3):
            rec.log_step(step, **_micro_batches((1, 4)))
    assert capsys.readouterr().err == (
        f"stabledrl: warning: {run}: step 0: the run's policy {policy!r} reads each step's "
        f"micro-batches ({setting}), and the step records no micro_batch: it is replayed as "
        "one micro-batch; pass micro_batch, each sequence's gradient-accumulation round "
        "(0 for every sequence of a step of one) (said once)\n"
    )
    assert sd.open_run(run).step_numbers == [0, 1, 2]


@pytest.mark.parametrize(
    ("policy", "micro_batch"),
    [
        ("ppo:agg=micro-token-mean", np.array([0, 0, 1, 1], dtype=np.int32)),
        ("ppo", None),
        ("stabledrl:norm=group", None),
    ],
)
def test_micro_batches_recorded_or_not_read_say_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    policy: str,
    micro_batch: np.ndarray | None,
) -> None:
    """The step that records its micro-batches, and a policy that does not read them, record
    without a word."""
    extra = {} if micro_batch is None else {"micro_batch": micro_batch}
    with sd.Recorder(tmp_path / "run", policy=policy, unit="token") as rec:
        rec.log_step(0, **_micro_batches((1, 4)), **extra)
    assert capsys.readouterr().err == ""


def test_a_learning_rate_as_the_schedulers_list_of_one_is_recorded(tmp_path: Path) -> None:
    """`lr=scheduler.get_last_lr()`, torch's list of one lr a parameter group, was refused
    ('lr: expected a number, got list'), which under `stabledrl record` turns the whole run's
    recording off (exit 2), while the same value as a one-element tensor or array was taken.
    A list or tuple of one number is that number, as an array of one is."""
    run = tmp_path / "run"
    with sd.Recorder(run, policy="ppo", unit="token") as rec:
        rec.log_step(0, **_micro_batches((4, 4)), lr=[1e-3], grad_norm=(0.5,))
    assert sd.open_run(run).step(0).scalars["lr"] == 1e-3
    assert sd.open_run(run).step(0).scalars["grad_norm"] == 0.5


def test_a_learning_rate_list_of_several_groups_is_refused_naming_the_count(
    tmp_path: Path,
) -> None:
    """Two parameter groups' lrs are no one number: refused as an array of two is."""
    with (
        sd.Recorder(tmp_path / "run", policy="ppo", unit="token") as rec,
        pytest.raises(UsageError, match=r"^lr: expected a scalar, got 2 values$"),
    ):
        rec.log_step(0, **_micro_batches((4, 4)), lr=[1e-3, 1e-4])


def test_a_list_nested_in_the_list_of_one_is_refused_not_recursed(tmp_path: Path) -> None:
    """A list of one is read as its number; a list in it is no parameter group's lr. Read
    one level at a time, 2,000 nested lists ended in RecursionError."""
    nested: object = 1e-3
    for _ in range(2000):
        nested = [nested]
    with (
        sd.Recorder(tmp_path / "run", policy="ppo", unit="token") as rec,
        pytest.raises(UsageError, match=r"^lr: expected a number in the list, got list$"),
    ):
        rec.log_step(0, **_micro_batches((4, 4)), lr=nested)


def test_recorder_kwargs_changed_mid_run_warn_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A loop that raises its Monte Carlo masks from 1 to 4 at step 2 and says so in the
    estimator it passes each call (custom-loops.md's pattern): the run kept its first batch's
    estimator (`mask_samples` 1) without a word, as it kept a changed policy before that
    warned. The first call that gives another value of a key warns, once, naming the keys;
    a later call that gives fewer keys, or the same values, says nothing."""
    fresh_recording(monkeypatch, tmp_path / "run", tmp_path / "status")
    batch = {"logp": -torch.rand(4) - 0.1, "advantages": torch.randn(4)}
    first = {"unit": "sequence", "estimator": {"kind": "elbo", "mask_samples": 1}}
    later = {**first, "estimator": {"kind": "elbo", "mask_samples": 4}}
    for step, kwargs in enumerate((first, first, later, later, {"unit": "sequence"}, None)):
        assert log_policy_batch(
            step, policy="stabledrl", recorder_kwargs=kwargs, logp_old=batch["logp"], **batch
        )
    bootstrap.close()
    assert capsys.readouterr().err.splitlines() == [
        "stabledrl: warning: log_policy_batch(2) gives recorder_kwargs another estimator than "
        "the run's first batch did: the run was opened with the first batch's, and keeps them"
    ]
    assert sd.open_run(tmp_path / "run").manifest["estimator"]["mask_samples"] == 1
