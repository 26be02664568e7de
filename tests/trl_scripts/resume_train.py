"""The tiny run under `stabledrl record`, checkpointed every 2 steps; with an argument, resumed
from that checkpoint directory (`python resume_train.py trl_out/checkpoint-2`)."""

import sys

from tiny_grpo import count_b, tiny_config, tiny_dataset, tiny_model, tiny_tokenizer

from stabledrl_cli.integrations.trl import RecordingGRPOTrainer

trainer = RecordingGRPOTrainer(
    model=tiny_model(),
    reward_funcs=count_b,
    args=tiny_config("trl_out", save_strategy="steps", save_steps=2),
    train_dataset=tiny_dataset(),
    processing_class=tiny_tokenizer(),
)
trainer.train(resume_from_checkpoint=sys.argv[1] if len(sys.argv) > 1 else None)
