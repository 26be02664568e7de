"""The README's TRL snippet, runnable: the tiny parts, then the one-line change.

Run it as `stabledrl record --out DIR -- python snippet_train.py`; it records into DIR.
"""

from tiny_grpo import count_b, tiny_config, tiny_dataset, tiny_model, tiny_tokenizer

model, tokenizer, dataset, reward = tiny_model(), tiny_tokenizer(), tiny_dataset(), count_b
config = tiny_config("trl_out")

# --- README snippet -------------------------------------------------------------------------
from stabledrl_cli.integrations.trl import RecordingGRPOTrainer  # noqa: E402 (was trl.GRPOTrainer)

trainer = RecordingGRPOTrainer(
    model=model,
    reward_funcs=reward,
    args=config,
    train_dataset=dataset,
    processing_class=tokenizer,
)
trainer.train()
# --- end of README snippet ------------------------------------------------------------------
