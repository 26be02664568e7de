"""The tiny run under `stabledrl record`, checkpointed every 2 steps; with an argument, resumed
from that checkpoint directory (`python resume_train.py trl_out/checkpoint-2`), and with a
second one resumed with that loss_type (`... trl_out/checkpoint-2 grpo`)."""

import sys

from tiny_grpo import tiny_config, tiny_parts

from stabledrl_cli.integrations.trl import RecordingGRPOTrainer

changed = {"loss_type": sys.argv[2]} if len(sys.argv) > 2 else {}
trainer = RecordingGRPOTrainer(
    **tiny_parts(),
    args=tiny_config("trl_out", save_strategy="steps", save_steps=2, **changed),
)
trainer.train(resume_from_checkpoint=sys.argv[1] if len(sys.argv) > 1 else None)
