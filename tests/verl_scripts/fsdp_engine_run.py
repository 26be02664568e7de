"""Drives verl 0.9's real `TrainingWorker` (FSDP2 engine) on CPU (gloo), hook installed.

    python fsdp_engine_run.py OUT RESULT.json LOSS_MODE SETTINGS [...]           (one process)
    torchrun --nproc-per-node 2 fsdp_engine_run.py OUT RESULT.json LOSS_MODE SETTINGS [...]

Each four arguments are a job, the jobs run one after the other in the same processes (torch
and verl imported once). A job trains a tiny random Llama through
`TrainingWorker.train_mini_batch` with verl's own `ppo_loss` (what
`ActorRolloutRefWorker.update_actor` calls; `policy_loss.loss_mode` LOSS_MODE, e.g. vanilla;
kl_cov with kl_cov_ratio 0.2): one rollout for 2 ppo epochs x 2 mini-batches, then a
mini-batch with a NaN advantage (verl skips that update). SETTINGS, a JSON object, sets more:
"actor" (ActorConfig fields, e.g. use_kl_loss, loss_scale_factor, entropy_coeff), "engine"
(FSDPEngineConfig fields, e.g. use_dynamic_bsz, micro_batch_size_per_gpu) and
"optimizer" (FSDPOptimizerConfig fields, e.g. lr_warmup_steps), "rollouts" (how many times
the first rollout is trained before the NaN one, default 1), "seed" (of the mini-batches'
shuffle, plus the rank; default 0), "calculate_entropy" (as verl's
trainer sets it), "own_rollout_n" (the batches, 0 the rollout and 1 the NaN one, whose
prompt 1 takes prompt 0's uid: one prompt of 6 responses, as a prompt's own
`__rollout_n__` gives it in verl's v1 trainer), "rejected" (the [rank, row, token] whose
response_mask alone is zeroed in the rollout that rank trains, as verl's v1 trainer's rollout
rejection sampling leaves it; token -1: the whole response), "rejected_from" (the first
rollout so rejected, default 0) and "hook" (false: train without the hook, OUT left
unwritten; default true). Each job builds its own model, worker and hook
(install(OUT), uninstall() at its end), and each rank writes verl's own logged metrics of
each mini-batch to RESULT.json (rank 0) or RESULT.json.rank<r> ("steps"), and the actor's
metrics of each rollout as verl's trainer logs them ("logged": `rename_dict(..., "actor/")`
reduced by `reduce_metrics`, as `_update_actor` and `fit` do). Rank 0 writes the line
"fsdp_engine_run.py: job N" to stderr as job N (from 0) starts.

Where CPU stops, and the stand-ins used here: verl falls back to the CUDA platform without an
accelerator, so a CPU platform is registered through verl's plugin registry (cpu_platform)
and the FSDP engine, registered for cuda/npu only, is selected with VERL_ENGINE_DEVICE;
FlashAttention is replaced by sdpa (`override_config`); verl's model build imports a class
that TRL 1.16 no longer has whenever TRL is installed, so that TRL probe is turned off; the
worker runs outside Ray (it reads RANK, WORLD_SIZE and MASTER_* itself). Not run: Ray, the
rollout (vLLM/SGLang need a GPU) and the trainer loop around `update_actor`.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ["VERL_PLATFORM"] = "cpu"
os.environ["VERL_ENGINE_DEVICE"] = "cuda"  # the FSDP engine registers for cuda/npu only
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29533")
os.environ.setdefault("RANK", "0")
os.environ.setdefault("WORLD_SIZE", "1")
os.environ.setdefault("LOCAL_RANK", "0")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import cpu_platform  # noqa: E402, F401  (registers the "cpu" platform before verl reads it)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

dist.init_process_group("gloo")

import verl.models.transformers.monkey_patch as monkey_patch  # noqa: E402
from distributed_exit import exit_without_finalizing  # noqa: E402
from tensordict import NonTensorStack  # noqa: E402
from test_integration_verl import actor_config, rollout  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from verl.trainer.config.config import CheckpointConfig  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.metric import reduce_metrics  # noqa: E402
from verl.utils.py_functional import rename_dict  # noqa: E402
from verl.workers.config import (  # noqa: E402
    FSDPEngineConfig,
    FSDPOptimizerConfig,
    HFModelConfig,
    TrainingWorkerConfig,
)
from verl.workers.engine_workers import TrainingWorker  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402

from stabledrl_cli.integrations import verl as stabledrl_verl  # noqa: E402

monkey_patch.is_trl_available = lambda: False  # verl 0.9.1 + trl 1.16: see the docstring


def tiny_model(path: str) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    vocab = {f"t{i}": i for i in range(64)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t1")
    fast.save_pretrained(path)


def worker(path: str, engine: dict[str, Any], optimizer: dict[str, Any]) -> TrainingWorker:
    """verl's own TrainingWorker (outside Ray: it reads RANK, WORLD_SIZE, MASTER_* itself),
    its FSDPEngineConfig fields overridden by `engine`, its FSDPOptimizerConfig's by
    `optimizer`."""
    model = HFModelConfig(
        path=path, use_remove_padding=True, override_config={"attn_implementation": "sdpa"}
    )
    config = TrainingWorkerConfig(
        model_type="language_model",
        model_config=model,
        engine_config=FSDPEngineConfig(
            **{
                "strategy": "fsdp2",
                "use_torch_compile": False,
                "model_dtype": "fp32",
                "micro_batch_size_per_gpu": 2,
                "max_token_len_per_gpu": 24,  # dynamic batching: several micro-batches, reordered
                **engine,
            }
        ),
        optimizer_config=FSDPOptimizerConfig(**{"lr": 1e-3, "clip_grad": 0.5, **optimizer}),
        checkpoint_config=CheckpointConfig(),
    )
    built = TrainingWorker(config)
    built.reset()  # builds the model and optimizer
    return built


def train(out: str, result: str, loss_mode: str, settings: str) -> None:
    """One job: OUT RESULT.json LOSS_MODE SETTINGS (the module docstring)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    options = json.loads(settings)
    model_dir = [tempfile.mkdtemp() if rank == 0 else None]
    if rank == 0:
        tiny_model(model_dir[0] or "")
    dist.broadcast_object_list(model_dir, src=0)
    hooked = bool(options.get("hook", True))
    if hooked:
        assert stabledrl_verl.install(out, overwrite=True)
    actor = worker(model_dir[0] or "", options.get("engine", {}), options.get("optimizer", {}))
    policy_loss = {"kl_cov_ratio": 0.2} if loss_mode == "kl_cov" else {}
    config = actor_config(loss_mode=loss_mode, policy_loss=policy_loss, **options.get("actor", {}))
    actor.set_loss_fn(functools.partial(ppo_loss, config=config))
    data = rollout(n_prompts=4 * world, seed=1).exclude("_logp")
    mine = tu.index_select_tensor_dict(data, torch.arange(rank, data.shape[0], world))
    rejected = mine.clone()
    for at, row, token in options.get("rejected", []):
        if at == rank:
            rejected["response_mask"][row, slice(None) if token < 0 else token] = 0
    mini = 6
    bad = tu.index_select_tensor_dict(mine, torch.arange(mini))
    bad["advantages"][0, 0] = float("nan")
    steps, logged = [], []
    rollouts = range(int(options.get("rollouts", 1)))
    start = int(options.get("rejected_from", 0))
    batches = [(rejected if n >= start else mine, 2) for n in rollouts] + [(bad, 1)]
    for number, (batch, epochs) in enumerate(batches):
        if number in options.get("own_rollout_n", []):
            uids = ["prompt-0" if uid == "prompt-1" else uid for uid in batch["uid"]]
            batch = batch.clone()
            batch["uid"] = NonTensorStack(*uids)
        tu.assign_non_tensor(
            batch,
            global_batch_size=mini * world,
            mini_batch_size=mini * world,
            epochs=epochs,
            seed=int(options.get("seed", 0)) + rank,
            dataloader_kwargs={"shuffle": True},
            calculate_entropy=bool(options.get("calculate_entropy", False)),
            temperature=1.0,
        )
        output = actor.train_mini_batch(batch)
        metrics = tu.get(output, "metrics")
        logged.append(reduce_metrics(rename_dict(dict(metrics), "actor/")))
        for n in range(len(metrics["grad_norm"])):
            steps.append(
                {  # verl's logged values of each mini-batch (optimizer step)
                    name: float(metrics[key][n])
                    for name, key in (
                        ("grad_norm", "grad_norm"),
                        ("pg_loss", "actor/pg_loss"),
                        ("pg_clipfrac", "actor/pg_clipfrac"),
                        ("pg_clipfrac_lower", "actor/pg_clipfrac_lower"),
                        ("ppo_kl", "actor/ppo_kl"),
                        ("kl_loss", "kl_loss"),
                        ("entropy_loss", "actor/entropy_loss"),
                    )
                    # kl_cov logs no clip fractions; kl_loss needs use_kl_loss, entropy_loss
                    # calculate_entropy
                    if key in metrics
                }
            )
    if hooked:
        stabledrl_verl.uninstall()
    target = result if rank == 0 else f"{result}.rank{rank}"
    results = {"rank": rank, "world": world, "steps": steps, "logged": logged}
    Path(target).write_text(json.dumps(results))


if __name__ == "__main__":
    jobs = sys.argv[1:]
    assert jobs and len(jobs) % 4 == 0, "usage: see the module docstring"
    for number, start in enumerate(range(0, len(jobs), 4)):
        if dist.get_rank() == 0:  # where each job's lines on stderr start
            print(f"fsdp_engine_run.py: job {number}", file=sys.stderr, flush=True)
        train(*jobs[start : start + 4])
    dist.destroy_process_group()
    exit_without_finalizing()
