"""A plain PyTorch GRPO loop, data-parallel on gloo (CPU): each rank logs its shard of a step.

usage:
    stabledrl record --out RUN --policy grpo -- torchrun --nproc-per-node 2 shard_train.py
    torchrun --nproc-per-node 2 shard_train.py --out RUN [--die-at K]   (a Recorder per rank)
    stabledrl record --out RUN --policy grpo -- python shard_train.py --one-process

A tiny bigram policy samples G = 3 prompt groups of 4 completions a rollout; the 12 sequences
are split evenly over 2 ranks, so group 1 has completions on both. Advantages are r - the
mean of the whole group (rewards are gathered over the ranks); the prompt-group ids are
global. The loss is grpo's (PPO clip, eps 0.2, each sequence's token mean, then the mean over
sequences); DistributedDataParallel averages the ranks' gradients. Two inner steps a rollout.

`--one-process` trains the same way in one process: it runs both shards itself, averages their
gradients as DDP does and logs the whole step at once. `--die-at K`: rank 1 exits abruptly in
step K, after rank 0 has logged its shard of it (rank 0 then fails at its next collective).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import stabledrl_cli as sd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distributed_exit import exit_without_finalizing

VOCAB, LENGTH, GROUPS, GROUP_SIZE, RANKS, INNER_STEPS, EPS = 8, 4, 3, 4, 2, 2, 0.2
SHARD = GROUPS * GROUP_SIZE // RANKS
RECORDER = {"unit": "token", "group_ids": "global", "reward_range": (0.0, 1.0)}


class Bigram(nn.Module):
    """p(token_t | token_{t-1}); the prompt is the token before the first."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, previous: torch.Tensor) -> torch.Tensor:
        """previous [B, L] -> log-probabilities [B, L, VOCAB]."""
        return torch.log_softmax(self.head(self.embed(previous)), dim=-1)


def token_logp(model: nn.Module, prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p of each token [B, L] given the previous one (the prompt before the first)."""
    previous = torch.cat([prompts[:, None], tokens[:, :-1]], dim=1)
    return model(previous).gather(-1, tokens[..., None])[..., 0]


def rollout_shard(model: nn.Module, rollout: int, shard: int) -> dict[str, torch.Tensor]:
    """Shard `shard`'s sequences of a rollout, sampled with its own seeded generator."""
    gen = torch.Generator().manual_seed(1000 * rollout + shard)
    first = shard * SHARD
    group_id = torch.arange(first, first + SHARD) // GROUP_SIZE
    prompts = group_id + 1
    tokens = torch.zeros(SHARD, LENGTH, dtype=torch.long)
    with torch.no_grad():
        previous = prompts
        for t in range(LENGTH):
            probs = model(previous[:, None])[:, 0].exp()
            tokens[:, t] = torch.multinomial(probs, 1, generator=gen)[:, 0]
            previous = tokens[:, t]
        logp_old = token_logp(model, prompts, tokens)
    lengths = torch.randint(2, LENGTH + 1, (SHARD,), generator=gen)
    mask = torch.arange(LENGTH)[None, :] < lengths[:, None]
    reward = ((tokens == prompts[:, None]) & mask).sum(1) / LENGTH  # quarters: exact sums
    return {
        "prompts": prompts,
        "tokens": tokens,
        "mask": mask,
        "group_id": group_id,
        "reward": reward.float(),
        "logp_old": logp_old,
    }


def advantages(rewards: torch.Tensor) -> torch.Tensor:
    """A = r - the mean reward of its group, over the whole rollout's rewards [G * GROUP_SIZE]."""
    grouped = rewards.view(GROUPS, GROUP_SIZE)
    return (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)


def grpo_loss(logp: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """PPO clip with the sequence's advantage, token mean per sequence, mean over sequences."""
    ratio = torch.exp(logp - batch["logp_old"])
    adv = batch["advantages"][:, None]
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - EPS, 1 + EPS) * adv)
    mask = batch["mask"].float()
    return ((per_token * mask).sum(1) / mask.sum(1)).mean()


def step_fields(
    batch: dict[str, torch.Tensor], logp: torch.Tensor, loss: torch.Tensor
) -> dict[str, torch.Tensor]:
    """What a rank logs for its shard (`Recorder.log_step`'s keywords)."""
    return {
        "logp": logp,
        "logp_old": batch["logp_old"],
        "advantages": batch["advantages"],
        "mask": batch["mask"],
        "group_id": batch["group_id"],
        "reward": batch["reward"],
        "loss": loss,
    }


def train_ranked(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == RANKS
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(Bigram())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    recorder = None
    if args.out is not None:  # a Recorder per rank, as a user would make it
        recorder = sd.Recorder(
            args.out, policy="grpo", world_size=world, rank=rank, overwrite=True, **RECORDER
        )
    for step in range(args.steps):
        rollout, inner = divmod(step, INNER_STEPS)
        if inner == 0:
            batch = rollout_shard(model.module, rollout, rank)
            rewards = [torch.zeros(SHARD) for _ in range(world)]
            dist.all_gather(rewards, batch["reward"])
            batch["advantages"] = advantages(torch.cat(rewards)).view(world, SHARD)[rank]
        logp = token_logp(model, batch["prompts"], batch["tokens"])
        loss = grpo_loss(logp, batch)
        optimizer.zero_grad()
        loss.backward()  # DDP averages the ranks' gradients here
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if rank == 1 and step == args.die_at:
            _die_after_rank0_logged(args, step)
        fields = step_fields(batch, logp, loss)
        if recorder is not None:
            recorder.log_step(step, grad_norm=grad_norm, inner_step=inner, **fields)
        else:
            sd.log_policy_batch(
                step, grad_norm=grad_norm, inner_step=inner, recorder_kwargs=RECORDER, **fields
            )
        optimizer.step()
    if recorder is not None:
        recorder.close()
    dist.destroy_process_group()


def _die_after_rank0_logged(args: argparse.Namespace, step: int) -> None:
    """Rank 1 dies in `step` once rank 0's shard of it is on disk (so the test is exact)."""
    run = Path(args.out or os.environ["STABLEDRL_RUN_DIR"])
    rank0_file = run / "steps" / f"step-{step:08d}.rank-0000.safetensors"
    deadline = time.monotonic() + 60
    while not rank0_file.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    os._exit(1)


def train_one_process(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = Bigram()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    for step in range(args.steps):
        rollout, inner = divmod(step, INNER_STEPS)
        if inner == 0:
            shards = [rollout_shard(model, rollout, shard) for shard in range(RANKS)]
            adv = advantages(torch.cat([s["reward"] for s in shards])).view(RANKS, SHARD)
            for shard, batch in enumerate(shards):
                batch["advantages"] = adv[shard]
        optimizer.zero_grad()
        grads, logged = [], []
        for batch in shards:
            logp = token_logp(model, batch["prompts"], batch["tokens"])
            loss = grpo_loss(logp, batch)
            grads.append(torch.autograd.grad(loss, list(model.parameters())))
            logged.append(step_fields(batch, logp, loss))
        for param, *parts in zip(model.parameters(), *grads, strict=True):
            param.grad = sum(g / RANKS for g in parts)  # DDP's average, in rank order
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        whole = {
            name: torch.cat([f[name].detach() for f in logged])
            for name in logged[0]
            if name != "loss"
        }
        whole["loss"] = torch.tensor(
            sum(f["loss"].item() for f in logged) / RANKS, dtype=torch.float64
        )
        sd.log_policy_batch(
            step, grad_norm=grad_norm, inner_step=inner, recorder_kwargs=RECORDER, **whole
        )
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default=None, help="record with a Recorder per rank")
    parser.add_argument("--die-at", type=int, default=None)
    parser.add_argument("--one-process", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.one_process:
        train_one_process(args)
    else:
        train_ranked(args)


if __name__ == "__main__":
    main()
    exit_without_finalizing()
