"""A multi-rank run replays the loss its ranks optimised. Under DistributedDataParallel each
rank's loss is its own (a mean over its own tokens or sequences) and the all-reduce averages
the ranks' gradients: recorded with `loss_norm="per_rank"`, a replay normalises each rank's
part alone and divides by the ranks. The default, "global", is the normalisation over every
rank's part (verl's `agg_loss` with the global token count, TRL's dapo): the joined step's.

Before, a replay pooled every rank's tokens whatever the ranks did: with a rank of 1 token
beside one of 24 the replayed update pointed the other way (a torch DDP run on gloo gave
w.grad -0.0451, the pooled coefficients +0.1040), and with an empty rank it was 2x the
trained one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import stabledrl_cli as sd
from stabledrl_cli.errors import InputError, UsageError

EPS = 0.2
LENGTHS = {"uneven": [[1], [8, 8, 8]], "empty": [[], [8, 8, 8]], "three": [[2, 5], [4], [3, 3, 1]]}


def _parts(lengths: list[list[int]]) -> list[dict[str, torch.Tensor]]:
    """Each rank's part of one step: flat tokens, their sequence ids, advantages."""
    gen = torch.Generator().manual_seed(3)
    parts = []
    for sizes in lengths:
        n = sum(sizes)
        seq_id = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes).long())
        adv = (torch.rand(len(sizes), generator=gen) - 0.4)[seq_id]
        logp_old = -torch.rand(n, generator=gen)
        logp = logp_old + 0.3 * torch.randn(n, generator=gen)
        parts.append({"logp": logp, "logp_old": logp_old, "advantages": adv, "seq_id": seq_id})
    return parts


def _rank_loss(part: dict[str, torch.Tensor], logp: torch.Tensor, agg: str) -> torch.Tensor:
    """A rank's PPO-clip loss over its own part: its token mean (ppo) or the mean over its
    sequences of their token means (grpo); 0 on an empty part."""
    ratio = torch.exp(logp - part["logp_old"])
    adv = part["advantages"]
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - EPS, 1 + EPS) * adv)
    if agg == "token-mean":
        return per_token.sum() / max(len(per_token), 1)
    seq_id, n = part["seq_id"], int(part["seq_id"].max()) + 1 if len(part["seq_id"]) else 0
    sums = torch.zeros(n).index_add(0, seq_id, per_token)
    counts = torch.zeros(n).index_add(0, seq_id, torch.ones_like(per_token))
    return (sums / counts).sum() / max(n, 1)


def _trained(parts: list[dict[str, torch.Tensor]], agg: str) -> tuple[float, float]:
    """(J, |dJ/dlogp|) of what DDP optimised: the mean of the ranks' losses (the all-reduce
    averages their gradients), J = -loss."""
    logps = [p["logp"].clone().requires_grad_(True) for p in parts]
    loss = sum(_rank_loss(p, lp, agg) for p, lp in zip(parts, logps, strict=True)) / len(parts)
    assert isinstance(loss, torch.Tensor)
    loss.backward()
    coef = torch.cat([lp.grad for lp in logps if lp.grad is not None])
    return -loss.item(), float(coef.norm())


def _record(path: Path, parts: list[dict[str, torch.Tensor]], **kwargs: object) -> None:
    for rank, part in enumerate(parts):
        with sd.Recorder(path, world_size=len(parts), rank=rank, **kwargs) as recorder:  # type: ignore[arg-type]
            recorder.log_step(0, **part)


def _replayed(path: Path, spec: str) -> tuple[float, float]:
    [policy] = json.loads(sd.replay(path, policies=[spec]).to_json())["policies"]
    [row] = policy["steps"]
    return row["objective"], row["update_norm"]


@pytest.mark.parametrize("layout", sorted(LENGTHS))
@pytest.mark.parametrize(("spec", "agg"), [("ppo", "token-mean"), ("grpo", "seq-mean-token-mean")])
def test_a_per_rank_run_replays_what_ddp_optimised(tmp_path, layout, spec, agg):
    parts = _parts(LENGTHS[layout])
    _record(tmp_path / "run", parts, policy=spec, loss_norm="per_rank")
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["loss_norm"] == "per_rank"
    objective, norm = _replayed(tmp_path / "run", spec)
    trained_objective, trained_norm = _trained(parts, agg)
    assert objective == pytest.approx(trained_objective, rel=1e-5)
    assert norm == pytest.approx(trained_norm, rel=1e-5)


def test_a_global_run_replays_the_normalisation_over_every_ranks_part(tmp_path):
    """verl's token-mean (each rank's sum over the global token count, times dp_size, then the
    all-reduce's mean) and TRL's dapo: the pooled token mean, which the default keeps."""
    parts = _parts(LENGTHS["uneven"])
    _record(tmp_path / "run", parts, policy="ppo")
    assert "loss_norm" not in json.loads((tmp_path / "run" / "manifest.json").read_text())
    logps = [p["logp"].clone().requires_grad_(True) for p in parts]
    tokens = sum(len(p["logp"]) for p in parts)
    ranks = len(parts)
    losses = [
        _rank_loss(p, lp, "token-mean") * len(lp) / tokens * ranks
        for p, lp in zip(parts, logps, strict=True)
    ]
    loss = sum(losses) / ranks
    assert isinstance(loss, torch.Tensor)
    loss.backward()
    coef = torch.cat([lp.grad for lp in logps if lp.grad is not None])
    objective, norm = _replayed(tmp_path / "run", "ppo")
    assert objective == pytest.approx(-loss.item(), rel=1e-5)
    assert norm == pytest.approx(float(coef.norm()), rel=1e-5)
    # the same step read per rank is another objective: the choice is the run's data
    per_rank = tmp_path / "per_rank"
    _record(per_rank, parts, policy="ppo", loss_norm="per_rank")
    assert _replayed(per_rank, "ppo")[0] != pytest.approx(objective, rel=1e-3)


def test_a_ranks_micro_batches_are_its_own(tmp_path):
    """micro-token-mean on a per-rank run: each micro-batch's token mean, averaged over its
    rank's micro-batches, then over the ranks (rank 0 has 2 micro-batches, rank 1 one)."""
    parts = _parts([[2, 5], [7, 3]])
    micro = [np.array([0, 1]), np.array([0, 0])]
    spec = "ppo:agg=micro-token-mean"
    for rank, part in enumerate(parts):
        kwargs = {"world_size": 2, "rank": rank, "policy": spec, "loss_norm": "per_rank"}
        with sd.Recorder(tmp_path, **kwargs) as recorder:  # type: ignore[arg-type]
            recorder.log_step(0, micro_batch=micro[rank], **part)
    means = []
    for part, micro_ids in zip(parts, micro, strict=True):
        logp = part["logp"]
        by_micro = [
            _rank_loss({k: v[part_mask] for k, v in part.items()}, logp[part_mask], "token-mean")
            for m in np.unique(micro_ids)
            for part_mask in [torch.from_numpy(micro_ids[part["seq_id"].numpy()] == m)]
        ]
        means.append(sum(by_micro) / len(by_micro))
    assert _replayed(tmp_path, spec)[0] == pytest.approx(-float(sum(means) / 2), rel=1e-5)


def test_loss_norm_is_checked(tmp_path):
    with pytest.raises(UsageError, match="loss_norm 'mean' is not one of: global, per_rank"):
        sd.Recorder(tmp_path / "run", loss_norm="mean")  # type: ignore[arg-type]
    _record(tmp_path / "run", _parts(LENGTHS["uneven"]), policy="ppo", loss_norm="per_rank")
    with pytest.raises(UsageError, match="its loss_norm is 'per_rank', this recorder's 'global'"):
        sd.Recorder(tmp_path / "run", world_size=2, rank=0, policy="ppo", resume=True)


def test_only_a_run_of_several_ranks_says_per_rank_with_format_2(tmp_path):
    """A reader of major version 1 refuses a 2.0 run: a run of one rank recorded per_rank,
    which it would replay alike (its part is the whole step), said 2.0 all the same."""
    parts = _parts(LENGTHS["uneven"])
    for name, ranks, norm in (("one", parts[1:], "per_rank"), ("two", parts, "per_rank")):
        _record(tmp_path / name, ranks, policy="ppo", loss_norm=norm)
    _record(tmp_path / "one_global", parts[1:], policy="ppo")
    version = {
        name: json.loads((tmp_path / name / "manifest.json").read_text())["format_version"]
        for name in ("one", "two", "one_global")
    }
    assert version == {"one": "1.0", "two": "2.0", "one_global": "1.0"}
    assert _replayed(tmp_path / "one", "ppo") == _replayed(tmp_path / "one_global", "ppo")


def test_a_packed_per_rank_run_replays_as_its_directory(tmp_path):
    """The archive keeps each rank's sequences of each step (`steps/rank_sequences`): its
    replay normalises each rank's part as the directory's does."""
    from typer.testing import CliRunner

    from stabledrl_cli.cli.app import app

    run, archive = tmp_path / "run", tmp_path / "run.h5"
    _record(run, _parts(LENGTHS["three"]), policy="ppo", loss_norm="per_rank")
    packed = CliRunner().invoke(app, ["pack", str(run), str(archive)])
    assert packed.exit_code == 0, packed.output
    assert sd.open_run(archive).step(0).rank_sequences == (2, 1, 3)
    directory, from_archive = (json.loads(sd.replay(p).to_json()) for p in (run, archive))
    assert directory.pop("run") != from_archive.pop("run")
    assert from_archive == directory


def test_a_per_rank_archive_without_its_ranks_sequences_is_refused(tmp_path):
    """Without `steps/rank_sequences` the archive of a per_rank run of 2 ranks replayed as a
    global one, with no word: update norm 0.0559 where its directory's is 0.1781."""
    import h5py
    from typer.testing import CliRunner

    from stabledrl_cli.cli.app import app

    run, archive = tmp_path / "run", tmp_path / "run.h5"
    _record(run, _parts(LENGTHS["uneven"]), policy="ppo", loss_norm="per_rank")
    assert CliRunner().invoke(app, ["pack", str(run), str(archive)]).exit_code == 0
    with h5py.File(archive, "a") as handle:
        del handle["steps/rank_sequences"]
    with pytest.raises(InputError, match=r"corrupt run archive \(no steps/rank_sequences: "):
        sd.open_run(archive).step(0)


@pytest.mark.parametrize(
    "spec",
    [
        "dapo",
        "cispo",
        "gspo",
        "gmpo:mean=micro",
        "gmpo",
        "kl-cov:ratio=0.2",
        "clip-cov:ratio=1,lb=-1,ub=0.01",
        "reinforce:agg=token-sum",
        "ppo:agg=constant,max_len=8",
    ],
)
def test_a_per_rank_step_is_the_mean_of_its_ranks_replayed_alone(tmp_path, spec):
    """Whatever the policy's normaliser: the objective is the mean of each rank's part
    replayed as a run of its own, the coefficients each rank's over the ranks. gmpo's
    mean=step and kl-cov's step selection were over the joined step (objective -0.1412 and
    -0.1796 where the ranks' mean is -0.1802 and -0.1750), and clip-cov's means and draw
    (ratio 1: -0.0508 against -0.0522)."""
    parts = _parts(LENGTHS["three"])
    _record(tmp_path / "ranks", parts, policy=spec, loss_norm="per_rank")
    alone = []
    for rank, part in enumerate(parts):
        with sd.Recorder(tmp_path / f"rank{rank}", policy=spec) as recorder:
            recorder.log_step(0, **part)
        alone.append(_replayed(tmp_path / f"rank{rank}", spec))
    objective, norm = _replayed(tmp_path / "ranks", spec)
    assert objective == pytest.approx(np.mean([o for o, _ in alone]), rel=1e-5)
    assert norm == pytest.approx(np.sqrt(sum(n * n for _, n in alone)) / len(parts), rel=1e-5)


@pytest.mark.parametrize(
    "spec",
    [
        "stabledrl:norm=batch",
        "stabledrl:norm=group",
        "stabledrl:norm=micro",
        "stabledrl:norm=group,rows=all",
        "stabledrl:norm=micro,level=token",
        "ppo:agg=micro-token-mean",
    ],
)
def test_stabledrl_softmaxes_each_ranks_part_alone(tmp_path, spec):
    """A StableDRL loop under DDP runs its softmax over its own rank's batch (or its rounds,
    or its groups) and the all-reduce averages the ranks' losses: with ranks of 1 and 2 groups
    and micro-batches, and an empty rank, the objective is the mean over the ranks of each
    rank's part replayed alone. Before, norm=batch put one softmax over the joined step
    (objective -0.0432 where the ranks' mean is -0.0063), norm=group and norm=micro averaged
    over every rank's groups or rounds at once (-0.0437 against -0.0062)."""
    parts = [*_parts([[2, 3], [4, 1, 2, 3]]), _parts([[]])[0]]
    groups = [np.array([0, 0]), np.array([0, 0, 1, 1]), np.array([], dtype=int)]
    micro = [np.array([0, 0]), np.array([0, 1, 1, 1]), np.array([], dtype=int)]
    for rank, part in enumerate(parts):
        kwargs = {"world_size": 3, "rank": rank, "policy": spec, "loss_norm": "per_rank"}
        with sd.Recorder(tmp_path / "ranks", **kwargs) as recorder:  # type: ignore[arg-type]
            recorder.log_step(0, group_id=groups[rank], micro_batch=micro[rank], **part)
    alone = []
    for rank, part in enumerate(parts[:2]):
        with sd.Recorder(tmp_path / f"rank{rank}", policy=spec) as recorder:
            recorder.log_step(0, group_id=groups[rank], micro_batch=micro[rank], **part)
        alone.append(_replayed(tmp_path / f"rank{rank}", spec))
    objective, norm = _replayed(tmp_path / "ranks", spec)
    assert objective == pytest.approx(sum(o for o, _ in alone) / 3, rel=1e-5)
    assert norm == pytest.approx(np.sqrt(sum(n * n for _, n in alone)) / 3, rel=1e-5)


def test_inspect_says_how_the_ranks_normalised(tmp_path):
    """The replay's figures of a multi-rank run rest on its loss_norm: inspect shows it, in
    its table and JSON, for the directory and its archive alike. Before, neither said it."""
    from typer.testing import CliRunner

    from stabledrl_cli.cli.app import app

    runner = CliRunner()
    _record(tmp_path / "run", _parts(LENGTHS["uneven"]), policy="ppo", loss_norm="per_rank")
    _record(tmp_path / "global", _parts(LENGTHS["uneven"]), policy="ppo")
    assert (
        runner.invoke(app, ["pack", str(tmp_path / "run"), str(tmp_path / "run.h5")]).exit_code == 0
    )
    for run, norm in (("run", "per_rank"), ("run.h5", "per_rank"), ("global", "global")):
        shown = runner.invoke(app, ["inspect", str(tmp_path / run), "--format", "json"])
        assert json.loads(shown.stdout)["loss_norm"] == norm
        table = runner.invoke(app, ["inspect", str(tmp_path / run)], env={"COLUMNS": "80"})
        assert f"2 (loss_norm {norm}: " in table.stdout


def test_diff_notes_runs_whose_ranks_normalised_apart(tmp_path):
    """Equal arrays recorded once per_rank and once global are other losses to a replay
    (ppo: objective -0.0292 against 0.2674 on ranks of 1 and 24 tokens): diff, which compares
    the arrays, said only 'they never part: every step both hold equal, bit for bit'."""
    from typer.testing import CliRunner

    from stabledrl_cli.cli.app import app

    parts = _parts(LENGTHS["uneven"])
    _record(tmp_path / "per_rank", parts, policy="ppo", loss_norm="per_rank")
    _record(tmp_path / "global", parts, policy="ppo")
    args = ["diff", str(tmp_path / "per_rank"), str(tmp_path / "global")]
    shown = CliRunner().invoke(app, args, env={"COLUMNS": "80"})
    assert shown.exit_code == 0, shown.output
    note = "note: A says loss_norm per_rank, B global: equal arrays replay as other losses"
    assert note in shown.stdout.splitlines()
    _record(tmp_path / "one", parts[1:], policy="ppo", loss_norm="per_rank")
    _record(tmp_path / "one_global", parts[1:], policy="ppo")
    args = ["diff", str(tmp_path / "one"), str(tmp_path / "one_global"), "--format", "json"]
    assert json.loads(CliRunner().invoke(app, args).stdout)["notes"] == []


def test_check_refuses_a_baseline_of_policies_replayed_with_another_loss_norm(tmp_path):
    """A per_rank run checked against a global run's baseline of equal arrays tripped on
    update_norm_median 0.1781 against 0.0559, and gspo passed (0.0230 under 0.0362), with no
    word that the figures are of other losses. A run of one rank counts as either."""
    from typer.testing import CliRunner

    from stabledrl_cli.cli.app import app

    runner = CliRunner()
    parts = _parts(LENGTHS["uneven"])
    _record(tmp_path / "per_rank", parts, policy="ppo", loss_norm="per_rank")
    _record(tmp_path / "global", parts, policy="ppo")
    _record(tmp_path / "one", parts[1:], policy="ppo", loss_norm="per_rank")
    base = tmp_path / "base.json"
    args = ["check", str(tmp_path / "global"), "-p", "ppo", "--write-baseline", str(base)]
    assert runner.invoke(app, args).exit_code == 0
    assert json.loads(base.read_text())["run"]["loss_norm"] == "global"
    shown = runner.invoke(app, ["check", str(tmp_path / "per_rank"), "-b", str(base)])
    assert shown.exit_code == 3, shown.output
    assert "policy figures are of loss_norm global" in shown.stderr
    assert "replays as per_rank: other losses, not comparable" in shown.stderr
    one = runner.invoke(app, ["check", str(tmp_path / "one"), "-b", str(base)])
    assert one.exit_code in (0, 1), one.output
    assert "loss_norm" not in one.stderr


@pytest.mark.parametrize("logged", [False, True])
def test_an_empty_rank_adds_a_loss_of_0_and_the_loss_parity_holds(tmp_path, logged):
    """Rank 0's part empty, rank 1 logging its own loss: the joined loss was rank 1's alone
    when rank 0 logged none, twice the ranks' mean that DDP optimised (0.281 for 0.141), and
    the own policy's loss_parity 0.5 where each part replays its rank's loss exactly. An empty
    part that logged no loss now adds a loss of 0, as one that logged its 0 does."""
    parts = _parts(LENGTHS["empty"])
    for rank, part in enumerate(parts):
        own = _rank_loss(part, part["logp"], "token-mean").item()  # 0 on the empty part
        loss = {"loss": own} if len(part["logp"]) or logged else {}
        with sd.Recorder(
            tmp_path, world_size=2, rank=rank, policy="ppo", loss_norm="per_rank"
        ) as recorder:
            recorder.log_step(0, **part, **loss)
    trained, _ = _trained(parts, "token-mean")
    assert sd.open_run(tmp_path).step(0).scalars["loss"] == pytest.approx(-trained, rel=1e-6)
    [policy] = json.loads(sd.replay(tmp_path, policies=["ppo"]).to_json())["policies"]
    assert policy["summary"]["loss_parity"] < 1e-6


def test_each_ranks_loss_aux_leaves_the_loss_parity_exact(tmp_path):
    """Three ranks each logging its own loss and its own MoE router loss apart (`loss_aux`,
    as the TRL integration does on every process): the join took rank 0's loss_aux beside the
    ranks' mean loss, and the own policy's loss_parity was 0.082 where each part replays its
    rank's policy loss exactly. loss_aux is now the mean over the loss's ranks too."""
    parts = _parts(LENGTHS["three"])
    aux = [0.01, 0.05, 0.02]
    for rank, part in enumerate(parts):
        own = _rank_loss(part, part["logp"], "token-mean").item()
        with sd.Recorder(
            tmp_path, world_size=3, rank=rank, policy="ppo", loss_norm="per_rank"
        ) as recorder:
            recorder.log_step(0, **part, loss=own + aux[rank], scalars={"loss_aux": aux[rank]})
    assert sd.open_run(tmp_path).step(0).scalars["loss_aux"] == pytest.approx(np.mean(aux))
    [policy] = json.loads(sd.replay(tmp_path, policies=["ppo"]).to_json())["policies"]
    assert policy["summary"]["loss_parity"] < 1e-6
