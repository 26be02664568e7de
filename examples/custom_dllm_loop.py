r"""A custom dLLM RL loop, recorded: StableDRL's or d1's loss on the built-in tiny model.

    stabledrl record --out runs/custom --no-optimizer-hooks -- python examples/custom_dllm_loop.py
    stabledrl record --out runs/d1 --no-optimizer-hooks -- \
        python examples/custom_dllm_loop.py --style d1
    python examples/custom_dllm_loop.py --out runs/custom   # a Recorder, no `record`

(Its pretraining steps another optimizer first, which the optimizer hooks would count as the
run's steps: docs/custom-loops.md.)

Both styles write their loss by hand, with the variable names of the public code, and log
each optimizer step with `log_policy_batch` (or a `Recorder`):

- `--style stabledrl` (JianyuanZhong/StableDRL, `compute_loss_spg` with `use_snis`): the unit
  is the sequence. `ref_elbo` is each sequence's ELBO estimate at rollout time under its own
  mask (the old policy: logp_old); every inner step draws a fresh mask and `per_seq_elbo` is the
  current ELBO (logp, the tensor the gradient flows through); the weights are a softmax over the
  batch of min(per_seq_elbo - ref_elbo, log ais_clip_iw); loss = -sum(w * A * per_seq_elbo).
  Policy spec: `stabledrl:norm=batch` (one softmax over the step's 4 prompts; the public
  code's softmax runs over one prompt's completions a round, `stabledrl`: docs/custom-loops.md).
- `--style d1` (dllm-reasoning/d1, `DiffuGRPOTrainer.compute_loss`): the unit is the token.
  Every completion token is masked and each prompt token with probability p_mask_prompt,
  under `mask_seeds[this_itr_idx]`, the same seed for the old, current and reference log-probs
  (`old_per_token_logps`, `per_token_logps`, `ref_per_token_logps`); loss = PPO clip plus
  beta times the k3 KL, token mean over `completion_mask`. Policy spec: `ppo:beta=0.04`.

Advantages are A = r - mean of the prompt's group (no std division), as in both codes. The
task, model, sampler and estimators are the built-in example's (stabledrl_cli/example).
"""

from __future__ import annotations

import argparse
import copy
import math

import torch

import stabledrl_cli as sd
from stabledrl_cli.example import ModelConfig, SortTask, TinyDiffusionLM, generate
from stabledrl_cli.example.estimator import draw_mask, sequence_logp, token_logp
from stabledrl_cli.example.pretrain import pretrain
from stabledrl_cli.example.task import VOCAB_SIZE

PROMPTS, NUM_GENERATIONS, NUM_ITERATIONS, LR, MAX_GRAD_NORM = 4, 8, 2, 1e-4, 1.0
AIS_CLIP_IW = 5.0  # StableDRL's clip on the sequence importance weight (its `ais_clip_iw`)
EPSILON, BETA, P_MASK_PROMPT = 0.2, 0.04, 0.3  # d1's defaults
SPECS = {  # the loss each style computes, as a catalogue policy spec (defaults left out)
    "stabledrl": "stabledrl:norm=batch",  # c = 5 = AIS_CLIP_IW, one softmax over the step
    "d1": "ppo:beta=0.04",  # eps 0.2 both sides, token mean over the step, k3 KL
}

ESTIMATORS = {
    "elbo": "mean over hidden",  # StableDRL's `per_seq_elbo`: mean log p over masked tokens
    "llada": "1/(t*L_c) (LLaDA)",  # LLaDA's 1/t-weighted sum
}


def recorder_kwargs(style: str, estimator: str) -> dict[str, object]:
    """What the manifest records about the loop: unit, estimator settings, reward range."""
    if style == "stabledrl":
        settings: dict[str, object] = {
            "kind": estimator,
            "mask_samples": 1,  # num_t: Monte Carlo masks per ELBO estimate
            "same_mask": False,  # a fresh mask every inner step (random_masking=True)
            "mask_scheme": "t~U(0,1) per sequence, each completion position hidden with prob t",
            "weighting": ESTIMATORS[estimator],
        }
        unit = "sequence"
    else:
        settings = {
            "kind": "d1 one-step",
            "mask_samples": 1,
            "same_mask": True,  # mask_seeds[this_itr_idx] for old, current and reference
            "mask_scheme": f"every completion token masked, prompt tokens with p={P_MASK_PROMPT}",
            "weighting": "none (per-token log-prob)",
        }
        unit = "token"
    return {"unit": unit, "estimator": settings, "reward_range": (0.0, 1.0),
            "meta": {"source": "examples/custom_dllm_loop.py"}}  # fmt: skip


def d1_mask(n: int, task: SortTask, mask_seed: int) -> torch.Tensor:
    """d1's `forward_process`: [n, L] bool, every completion token and each prompt token with
    probability p_mask_prompt hidden; the same seed gives the same mask."""
    random_matrix = torch.rand(n, task.seq_len, generator=torch.Generator().manual_seed(mask_seed))
    prompt_index = torch.arange(task.seq_len) < task.prompt_len
    return ~prompt_index | (prompt_index & (random_matrix < P_MASK_PROMPT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--style", choices=["stabledrl", "d1"], default="stabledrl")
    parser.add_argument("--estimator", choices=sorted(ESTIMATORS), default="elbo")
    parser.add_argument("--rollouts", type=int, default=25)
    parser.add_argument("--pretrain-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="record with a Recorder into this run")
    args = parser.parse_args()

    torch.set_num_threads(1)
    rng = torch.Generator().manual_seed(args.seed)
    task = SortTask()
    model = TinyDiffusionLM(ModelConfig(vocab_size=VOCAB_SIZE, seq_len=task.seq_len))
    model.reset_parameters(rng)
    pretrain(model, task, steps=args.pretrain_steps, batch_size=32, lr=6e-4, noise=0.3,
             generator=rng, device=torch.device("cpu"))  # fmt: skip
    ref_model = copy.deepcopy(model).requires_grad_(False)  # d1's reference policy
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    spec = SPECS[args.style]
    kwargs = recorder_kwargs(args.style, args.estimator)
    recorder = None if args.out is None else sd.Recorder(args.out, policy=spec, **kwargs)
    n, step = PROMPTS * NUM_GENERATIONS, 0

    for _ in range(args.rollouts):
        prompts = task.sample_prompts(PROMPTS, rng).repeat_interleave(NUM_GENERATIONS, dim=0)
        completions = generate(model, prompts, task.length, rng)
        input_ids = torch.cat([prompts, completions], dim=1)
        rewards = task.reward(prompts, completions)
        grouped = rewards.view(-1, NUM_GENERATIONS)
        advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
        group_id = torch.arange(n) // NUM_GENERATIONS
        completion_mask = torch.ones(n, task.length, dtype=torch.uint8)
        # At rollout time, under no gradient: the old policy's estimates.
        with torch.no_grad():
            if args.style == "stabledrl":
                ref_sample = draw_mask(n, task.prompt_len, task.length, args.estimator, rng)
                ref_elbo = sequence_logp(model, input_ids, ref_sample)  # [n]
            else:
                mask_seeds = torch.randint(0, 2**12, (NUM_ITERATIONS,), generator=rng).tolist()
                old_per_token_logps, ref_per_token_logps = [], []
                for mask_seed in mask_seeds:
                    noise_mask = d1_mask(n, task, mask_seed)
                    old = token_logp(model, input_ids, noise_mask)[:, task.prompt_len :]
                    ref = token_logp(ref_model, input_ids, noise_mask)[:, task.prompt_len :]
                    old_per_token_logps.append(old)
                    ref_per_token_logps.append(ref)

        for this_itr_idx in range(NUM_ITERATIONS):
            if args.style == "stabledrl":
                # compute_loss_spg: a fresh mask, the current ELBO, SNIS weights.
                sample = draw_mask(n, task.prompt_len, task.length, args.estimator, rng)
                per_seq_elbo = sequence_logp(model, input_ids, sample)  # [n], with gradient
                log_iw = (per_seq_elbo - ref_elbo).detach()
                clipped_log_iw = torch.clamp(log_iw, max=math.log(AIS_CLIP_IW))
                normalized_weights = torch.softmax(clipped_log_iw, dim=0)
                loss = -torch.sum(normalized_weights * advantages * per_seq_elbo)
                fields = {"logp": per_seq_elbo, "logp_old": ref_elbo}
            else:
                # compute_loss: the iteration's mask seed, PPO clip, k3 KL, token mean.
                noise_mask = d1_mask(n, task, mask_seeds[this_itr_idx])
                per_token_logps = token_logp(model, input_ids, noise_mask)[:, task.prompt_len :]
                old = old_per_token_logps[this_itr_idx]
                ref = ref_per_token_logps[this_itr_idx]
                coef_1 = torch.exp(per_token_logps - old)
                coef_2 = torch.clamp(coef_1, 1 - EPSILON, 1 + EPSILON)
                per_token_loss = -torch.min(
                    coef_1 * advantages[:, None], coef_2 * advantages[:, None]
                )
                per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
                per_token_loss = per_token_loss + BETA * per_token_kl
                loss = (per_token_loss * completion_mask).sum() / completion_mask.sum()
                fields = {"logp": per_token_logps, "logp_old": old, "logp_ref": ref,
                          "mask": completion_mask}  # fmt: skip
            optimizer.zero_grad()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            # inner_step: the updates on this rollout before this one, here the iteration index
            # (d1's own this_itr_idx is not that count: docs/custom-loops.md)
            record = {**{k: v.detach() for k, v in fields.items()}, "advantages": advantages,
                      "group_id": group_id, "reward": rewards, "loss": loss.detach(),
                      "grad_norm": grad_norm, "lr": LR, "inner_step": this_itr_idx}  # fmt: skip
            if recorder is not None:
                recorder.log_step(step, **record)
            else:
                sd.log_policy_batch(step, policy=spec, recorder_kwargs=kwargs, **record)
            optimizer.step()
            step += 1
    if recorder is not None:
        recorder.close()


if __name__ == "__main__":
    main()
