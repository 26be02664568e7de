"""A plain PyTorch GRPO loop that records itself with one call per optimizer step.

The CI recipe (docs/ci.md) runs it: `stabledrl record --out runs/ci --policy grpo -- python
examples/train_logged.py --max-steps 100 --seed 0`. Outside `stabledrl record`,
`log_policy_batch` does nothing and training runs as usual.

The task is deliberately tiny: a policy over 8 tokens learns to emit token 3; the reward of a
sampled sequence is the fraction of its tokens equal to 3. Each step samples G completions for
each of P prompts, takes group-relative advantages, and minimises the GRPO loss with one
optimizer step per rollout (so logp_old == logp: inner_step 0).
"""

from __future__ import annotations

import argparse

import torch

import stabledrl_cli as sd

VOCAB, LENGTH, PROMPTS, GROUP = 8, 6, 4, 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    logits = torch.nn.Parameter(torch.zeros(LENGTH, VOCAB))
    optimizer = torch.optim.Adam([logits], lr=args.lr)
    for step in range(args.max_steps):
        with torch.no_grad():
            probs = torch.softmax(logits, dim=-1).expand(PROMPTS * GROUP, -1, -1)
            tokens = torch.multinomial(probs.reshape(-1, VOCAB), 1).reshape(-1, LENGTH)
        reward = (tokens == 3).float().mean(dim=1)
        grouped = reward.reshape(PROMPTS, GROUP)
        advantages = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
        logp = torch.log_softmax(logits, dim=-1).expand(PROMPTS * GROUP, -1, -1)
        logp = logp.gather(2, tokens[..., None])[..., 0]  # [B, L]
        ratio = torch.exp(logp - logp.detach())
        loss = -(ratio * advantages[:, None]).mean()
        optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([logits], 1.0)
        sd.log_policy_batch(
            step,
            logp=logp.detach(),
            logp_old=logp.detach(),
            advantages=advantages,
            mask=torch.ones_like(logp, dtype=torch.uint8),
            group_id=torch.arange(PROMPTS).repeat_interleave(GROUP),
            reward=reward,
            grad_norm=grad_norm,
            loss=loss.detach(),
            inner_step=0,
            reward_mean=reward.mean(),
            recorder_kwargs={"reward_range": (0.0, 1.0)},
        )
        optimizer.step()


if __name__ == "__main__":
    main()
