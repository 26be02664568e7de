"""A real tiny TRL GRPOTrainer run on CPU and its trainer_state.json (what `stabledrl import`
reads). The committed fixtures come from:

    cd tests/trl_scripts
    python make_trainer_state.py ../../fixtures/imports/trl-lr0.2/trainer_state.json \
        learning_rate=0.2
    python make_trainer_state.py ../../fixtures/imports/trl-lr0.3/trainer_state.json

At lr 0.2 the tiny policy learns the task (reward 0.38 -> 6, the maximum) and its gradient
norm spikes on the way (steps 23-25); at lr 0.3 it degenerates at once and its reward
collapses to 0 (observed collapse at step 21). TRL logs the reward every other step
(num_iterations = 2 reuses each generation), the other metrics every step.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import tiny_grpo
from trl import GRPOTrainer

SETTINGS: dict[str, Any] = {
    "max_steps": 60,
    "learning_rate": 0.3,
    "beta": 0.04,
    "steps_per_generation": 2,
    "lr_scheduler_type": "constant",
}
"""The fixture run's GRPOConfig overrides of tiny_grpo.tiny_config."""


def trainer_state(work: Path, **overrides: Any) -> dict[str, Any]:
    """Trains the tiny run in `work` and returns its trainer_state.json as a dict."""
    config = {**SETTINGS, **overrides}
    trainer = GRPOTrainer(
        model=tiny_grpo.tiny_model_dir(str(work / "model")),
        reward_funcs=tiny_grpo.count_b,
        args=tiny_grpo.tiny_config(str(work / "out"), **config),
        train_dataset=tiny_grpo.tiny_dataset(),
        processing_class=tiny_grpo.tiny_tokenizer(),
    )
    trainer.train()
    trainer.save_state()
    state: dict[str, Any] = json.loads((work / "out" / "trainer_state.json").read_text())
    return state


def main(target: str, **overrides: Any) -> None:
    with tempfile.TemporaryDirectory() as work:
        state = trainer_state(Path(work), **overrides)
    Path(target).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], **{k: json.loads(v) for k, v in (a.split("=") for a in sys.argv[2:])})
