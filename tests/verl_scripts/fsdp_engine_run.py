"""Drives verl 0.9's real FSDP2 engine on CPU (gloo) with the stabledrl hook installed.

    python fsdp_engine_run.py OUT RESULT.json            (one process)
    torchrun --nproc-per-node 2 fsdp_engine_run.py OUT RESULT.json

A tiny random Llama is trained by `FSDPEngineWithLMHead.train_batch` with verl's own
`ppo_loss`, over one rollout, 2 ppo epochs x 2 mini-batches; then a mini-batch with a NaN
advantage (verl skips that update). The rollout's prompt groups are numbered the way the
`TrainingWorker.train_mini_batch` hook numbers them (its module needs packages a CPU machine
lacks). Each rank writes verl's own per-step metrics to RESULT.json (rank 0) or
RESULT.json.rank<r>.

Where CPU stops: verl falls back to the CUDA platform without an accelerator, so a CPU
platform is registered through verl's plugin registry (cpu_platform); FlashAttention is
replaced by sdpa (`override_config`); and verl's model build imports a class TRL 1.16 no
longer has when TRL is installed, so that TRL probe is turned off here.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ["VERL_PLATFORM"] = "cpu"
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
from test_integration_verl import actor_config, rollout  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from verl.trainer.config.config import CheckpointConfig  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig  # noqa: E402
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402

from stabledrl_cli.integrations import _verl_hooks  # noqa: E402
from stabledrl_cli.integrations import verl as stabledrl_verl  # noqa: E402
from stabledrl_cli.integrations._verl_capture import Groups  # noqa: E402

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


def engine(path: str) -> FSDPEngineWithLMHead:
    model = HFModelConfig(
        path=path, use_remove_padding=True, override_config={"attn_implementation": "sdpa"}
    )
    config = FSDPEngineConfig(
        strategy="fsdp2", use_torch_compile=False, model_dtype="fp32", micro_batch_size_per_gpu=2
    )
    optim = FSDPOptimizerConfig(lr=1e-3, clip_grad=0.5)
    built = FSDPEngineWithLMHead(model, config, optim, CheckpointConfig())
    built.initialize()
    return built


def main(out: str, result: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    model_dir = [tempfile.mkdtemp() if rank == 0 else None]
    if rank == 0:
        tiny_model(model_dir[0] or "")
    dist.broadcast_object_list(model_dir, src=0)
    eng = engine(model_dir[0] or "")
    assert stabledrl_verl.install(out, overwrite=True)
    session = stabledrl_verl._session
    assert session is not None
    config = actor_config()
    loss = functools.partial(ppo_loss, config=config)
    data = rollout(n_prompts=4 * world, seed=1).exclude("_logp")
    mine = tu.index_select_tensor_dict(data, torch.arange(rank, data.shape[0], world))
    # what the train_mini_batch hook does once per rollout
    session.groups = Groups.of(
        _verl_hooks._all_uids([str(u) for u in mine["uid"]], eng.get_data_parallel_group())
    )
    mini, epochs = 6, 2
    steps = []
    batches = list(tu.make_iterator(mine, mini_batch_size=mini, epochs=epochs, seed=rank))
    bad = tu.index_select_tensor_dict(mine, torch.arange(mini))
    bad["advantages"][0, 0] = float("nan")
    batches.append(bad)
    for i, mb in enumerate(batches):
        tu.assign_non_tensor(
            mb,
            global_batch_size=mini * world,
            use_remove_padding=True,
            use_dynamic_bsz=False,
            micro_batch_size_per_gpu=2,
            max_token_len_per_gpu=1000,
            use_fused_kernels=False,
            calculate_entropy=False,
            temperature=1.0,
            update_lr_scheduler=i in (len(batches) - 2, len(batches) - 1),
        )
        with eng.train_mode():
            output = eng.train_batch(mb, loss_function=loss)
        metrics = output["metrics"]
        steps.append(
            {
                "grad_norm": float(metrics["grad_norm"]),
                "pg_loss": [float(v) for v in metrics["actor/pg_loss"].values],
                "pg_clipfrac": [float(v) for v in metrics["actor/pg_clipfrac"].values],
                "pg_clipfrac_lower": [float(v) for v in metrics["actor/pg_clipfrac_lower"].values],
            }
        )
    stabledrl_verl.uninstall()
    target = result if rank == 0 else f"{result}.rank{rank}"
    Path(target).write_text(json.dumps({"rank": rank, "world": world, "steps": steps}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
