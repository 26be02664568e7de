"""Run under torchrun: the tiny GRPO run recorded on every rank (gloo on CPU).

usage: torchrun --nproc_per_node 2 ddp_train.py (RUN_DIR LOG_JSON LOSS_TYPE|rloo)...
("rloo": the tiny RLOO run, epsilon 0.02). Each triple is one training, in order, in the
same launch (the ranks start once); rank 0 writes its TRL log_history to LOG_JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tiny_grpo import tiny_config, tiny_parts, tiny_rloo_config

from stabledrl_cli.integrations.trl import RecordingGRPOTrainer, RecordingRLOOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distributed_exit import exit_without_finalizing


def main(run_dir: str, log_json: Path, loss_type: str) -> None:
    trl_out = str(Path(run_dir).parent / "trl_out")
    if loss_type == "rloo":
        trainer_class: type = RecordingRLOOTrainer
        config = tiny_rloo_config(trl_out, epsilon=0.02, per_device_train_batch_size=2)
    else:
        trainer_class = RecordingGRPOTrainer
        config = tiny_config(trl_out, loss_type=loss_type, per_device_train_batch_size=2)
    trainer = trainer_class(
        **tiny_parts(),
        args=config,
        stabledrl_out=run_dir,
    )
    trainer.train()
    if trainer.accelerator.process_index == 0:
        log_json.write_text(json.dumps(trainer.state.log_history))


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if not arguments or len(arguments) % 3:
        sys.exit(__doc__)
    for i in range(0, len(arguments), 3):
        main(arguments[i], Path(arguments[i + 1]), arguments[i + 2])
    exit_without_finalizing()
