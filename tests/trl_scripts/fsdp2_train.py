"""Run under `stabledrl record` and torchrun: the tiny GRPO run, its model sharded by
accelerate's FSDP2 plugin (TRL's `fsdp`/`fsdp_config` arguments), on CPU with gloo, trained
twice in one launch (the ranks start once).

usage: stabledrl record --out RUN -- torchrun --nproc_per_node 2 fsdp2_train.py RUN_DIR OUT_JSON
First plain `trl.GRPOTrainer`, recorded by `stabledrl record`'s optimizer hooks into RUN; then
RecordingGRPOTrainer, recording into RUN_DIR as a script run outside `record` does: the
script takes $STABLEDRL_RUN_DIR out of its environment first (record would refuse another
directory than its own). In that order: a recording trainer has the hooks stand down for the
rest of the process. Rank 0 writes, for each training ("plain", "recording"), TRL's
log_history and what the model became to OUT_JSON.

accelerate (1.15) selects FSDP only on accelerator hosts: on CPU it keeps MULTI_CPU and wraps
the model in DDP without saying so. The script therefore has accelerate's backend choice
return what a GPU host gets (MULTI_GPU, here with gloo, the device kept on the CPU); the rest,
the FSDP2 sharding (`fully_shard`), the DTensor gradients, accelerate's clip and TRL's
logging, is the frameworks' own.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import accelerate.state
from accelerate.utils import DistributedType
from tiny_grpo import tiny_config, tiny_parts
from torch.distributed.tensor import DTensor
from trl import GRPOTrainer

from stabledrl_cli.integrations.trl import RecordingGRPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distributed_exit import exit_without_finalizing


def backend_of_a_gpu_host(*_: Any, **__: Any) -> tuple[str, DistributedType]:
    """`PartialState._prepare_backend` as on a GPU host, with gloo."""
    return "gloo", DistributedType.MULTI_GPU


def train(trainer_class: type, output_dir: Path, **recording: Any) -> tuple[int, dict[str, Any]]:
    """The tiny run sharded by FSDP2 on 2 ranks, trained: this process's rank, and TRL's log
    and what the model became."""
    config = tiny_config(
        str(output_dir),
        per_device_train_batch_size=2,
        use_cpu=False,
        bf16=False,
        fsdp=True,
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]},
    )
    trainer = trainer_class(
        **tiny_parts(),
        args=config,
        **recording,
    )
    trainer.train()
    model = trainer.model_wrapped
    return trainer.accelerator.process_index, {
        "log_history": trainer.state.log_history,
        "is_fsdp2": trainer.accelerator.is_fsdp2,
        "model": type(model).__name__,
        "dtensor_parameters": all(isinstance(p, DTensor) for p in model.parameters()),
    }


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    run_dir, out_json = Path(sys.argv[1]), Path(sys.argv[2])
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    accelerate.state.PartialState._prepare_backend = backend_of_a_gpu_host
    _, plain = train(GRPOTrainer, Path("plain_trl_out"))
    del os.environ["STABLEDRL_RUN_DIR"]
    rank, recording = train(RecordingGRPOTrainer, run_dir.parent / "trl_out", stabledrl_out=run_dir)
    if rank == 0:
        out_json.write_text(json.dumps({"plain": plain, "recording": recording}))


if __name__ == "__main__":
    main()
    exit_without_finalizing()
