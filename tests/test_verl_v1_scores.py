"""The rewards of a verl 0.9 job under its default trainer (`trainer.use_v1=True`): the v1
trainer hands the actor the reward's `rm_scores` and never its `token_level_scores` (it sets
them, equal, on its own copy for the advantages), so the recording read no score: every
step's `reward` NaN and no `reward_mean`, the observed-collapse rule and diff's reward left
with nothing."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

verl = pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")

import torch  # noqa: E402
from tensordict import NonTensorStack, TensorDict  # noqa: E402
from test_integration_verl import (  # noqa: E402
    StubEngine,
    actor_config,
    nested_responses,
    rollout,
)
from test_verl_dashboard import diff, imported, score_mean  # noqa: E402
from typer.testing import CliRunner  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402

from stabledrl_cli.cli.app import app  # noqa: E402
from stabledrl_cli.dump import open_run  # noqa: E402
from stabledrl_cli.integrations import verl as stabledrl_verl  # noqa: E402
from stabledrl_cli.integrations._verl_capture import Groups  # noqa: E402
from stabledrl_cli.integrations._verl_session import Session, _num_generations  # noqa: E402

PAD_UID = "pad" + "0123456789abcdef" * 2
"""A uid of verl's v1 padding samples ("pad" + a uuid4's hex)."""


def with_padding(data: TensorDict, pads: list[int]) -> TensorDict:
    """`data` whose rows `pads` are verl's v1 padding samples: their uid "pad" + a hex, their
    response unscored."""
    uids = [str(u) for u in data["uid"]]
    for row in pads:
        uids[row] = PAD_UID
    data["uid"] = NonTensorStack(*uids)
    for key in ("response_mask", "loss_mask"):
        data[key][pads] = 0
    return data


@pytest.mark.parametrize("nested", [True, False], ids=["v1-nested", "padded"])
def test_a_batch_of_rm_scores_records_its_rewards(tmp_path: Path, nested: bool) -> None:
    """The rollout's scores as `rm_scores` only (nested, as the v1 trainer hands them over;
    and padded): each recorded sequence's reward is its scores' sum, and each step's
    reward_mean their mean, as verl's `critic/score/mean` takes them."""
    data = rollout()
    sums = data["token_level_scores"].sum(-1)
    if nested:
        data = nested_responses(data)
    data["rm_scores"] = data["token_level_scores"]
    data = data.exclude("token_level_scores")
    engine = StubEngine()
    loss = functools.partial(ppo_loss, config=actor_config())
    assert stabledrl_verl.install(tmp_path / "run")
    try:
        for mb in tu.make_iterator(data, mini_batch_size=6, epochs=1, seed=0):
            tu.assign_non_tensor(mb, global_batch_size=6)
            engine.train_batch(mb, loss_function=loss)
    finally:
        stabledrl_verl.uninstall()
    steps = list(open_run(tmp_path / "run"))
    assert len(steps) == 2
    rewards = torch.cat([step["reward"] for step in steps])
    assert sorted(rewards.tolist()) == sorted(sums.tolist())
    for step in steps:
        assert step.scalars["reward_mean"] == pytest.approx(float(step["reward"].mean()))


def test_verls_padding_samples_are_not_in_the_reward_mean(tmp_path: Path) -> None:
    """The v1 trainer appends no-op samples to make the batch divisible by the mini-batch
    size (`upsample_batch_to_divisible_size`: uid "pad" + a uuid4's hex, response unscored,
    rm_scores 0), and leaves them out of `critic/score/mean`. The recording counted their 0
    scores: a mini-batch of 4 real sequences and 2 padding ones recorded reward_mean 2/3 of
    verl's. They are now unscored (reward NaN), so reward_mean is the mean over the real
    sequences; they stay in the step, which verl's sequence count holds."""
    pads = [4, 5, 10, 11]
    data = with_padding(rollout(), pads)
    data["token_level_scores"][pads] = 0.0
    data["token_level_scores"][[0, 6]] = 1.0  # a real sequence scored in each mini-batch
    sums = data["token_level_scores"].sum(-1)
    engine = StubEngine()
    loss = functools.partial(ppo_loss, config=actor_config())
    assert stabledrl_verl.install(tmp_path / "run")
    try:
        for mb in tu.make_iterator(data, mini_batch_size=6, epochs=1, seed=None):
            tu.assign_non_tensor(mb, global_batch_size=6)
            engine.train_batch(mb, loss_function=loss)
    finally:
        stabledrl_verl.uninstall()
    steps = list(open_run(tmp_path / "run"))
    real = [row for row in range(12) if row not in pads]
    assert len(steps) == 2 and sum(int(step["reward"].numel()) for step in steps) == 12
    assert sum(int(step["reward"].isnan().sum()) for step in steps) == len(pads)
    for step, rows in zip(steps, (real[:4], real[4:]), strict=True):
        assert step.scalars["reward_mean"] == pytest.approx(float(sums[rows].mean()))


def test_verls_padding_group_keeps_num_generations_and_the_prompt_groups(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A rollout of rollout.n 3 with 2 padding samples (their own uid, a group of 2): the run
    recorded no num_generations, as for a prompt of its own __rollout_n__, and on several
    ranks a later rollout padded so recorded no prompt groups, warned as 'prompt groups of 2
    responses, not the run's num_generations 3 (a prompt's own __rollout_n__)'. The padding
    group is no prompt's: num_generations is 3 and the groups are recorded, unsaid; a real
    group of another size still is refused."""
    prompts = [f"prompt-{i // 3}" for i in range(12)]
    padded = Groups.of([*prompts, PAD_UID, PAD_UID])
    config = actor_config()
    assert _num_generations(config, padded) == {"num_generations": 3}
    assert _num_generations(config, Groups.of([*prompts, "prompt-9", "prompt-9"])) == {}
    session = Session(Path("unused"), overwrite=False, group_size=3, world_size=2)
    session.groups = padded
    session.check_group_sizes()
    assert session.groups.recorded and capsys.readouterr().err == ""
    session.groups = Groups.of([*prompts, "prompt-9", "prompt-9"])
    session.check_group_sizes()
    assert not session.groups.recorded
    assert "prompt groups of 2 responses" in capsys.readouterr().err


def test_a_rollout_whose_mini_batches_verls_padding_fills_unevenly_draws_verls_score(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """9 real sequences and the 3 padding samples the v1 trainer appends for mini-batches of
    6, trained 2 ppo epochs without shuffling (verl's actor.shuffle default): each epoch's
    mini-batches hold 6 and 3 real sequences. The rollout's reward, the mean of its steps'
    reward_mean each weighed alike, was 0.5 (1 and 0) where verl logs `critic/score/mean`
    0.6667 over its 9 real sequences (the v1 trainer's metrics leave the padding out), so
    inspect's reward series, the observed-collapse rule's draws and diff against verl's log
    of the job (parted at step 1) read another reward than verl's dashboard. Each step now
    records `reward_count`, its scored sequences, and the rollout's reward weighs by it."""
    data = with_padding(rollout(seed=1), [9, 10, 11])
    scores = torch.zeros_like(data["token_level_scores"])
    scores[:6, 0] = 1.0  # the first mini-batch's 6 real sequences score 1, the other 3 none
    data["token_level_scores"] = scores
    real = tu.index_select_tensor_dict(data, torch.arange(9))
    logged = score_mean(real)  # the v1 trainer's `batch.select_idxs(non_padding_mask)`
    assert logged == pytest.approx(2 / 3)
    data["rm_scores"] = data["token_level_scores"]
    data = data.exclude("token_level_scores")
    run = tmp_path / "run"
    engine, loss = StubEngine(), functools.partial(ppo_loss, config=actor_config())
    assert stabledrl_verl.install(run)
    try:
        for n, mini in enumerate(tu.make_iterator(data, mini_batch_size=6, epochs=2)):
            tu.assign_non_tensor(mini, global_batch_size=6, update_lr_scheduler=n == 3)
            engine.train_batch(mini, loss_function=loss)
    finally:
        stabledrl_verl.uninstall()
    steps = list(open_run(run))
    assert [s.scalars["reward_mean"] for s in steps] == [1.0, 0.0, 1.0, 0.0]
    done = CliRunner().invoke(app, ["inspect", str(run), "--format", "json"])
    inspected = json.loads(done.stdout)
    series, curve = inspected["series"], inspected["observed"]["reward_curve"]
    assert "reward_count" not in series
    assert series["reward_mean"]["steps"] == 1
    assert series["reward_mean"]["mean"] == pytest.approx(logged, rel=1e-6)
    assert curve["first"] == pytest.approx(logged, rel=1e-6)
    line = {"actor/grad_norm": 0.7, "critic/score/mean": logged, "training/global_step": 1}
    code, result = diff(run, imported(tmp_path, [line], monkeypatch))
    assert code == 0, result
    assert (result["parted_at"], result["common"]) == (None, 1)
    assert [s.scalars["reward_count"] for s in steps] == [6, 3, 6, 3]
