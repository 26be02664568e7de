"""A tiny GRPO setup for tests and benchmarks: nothing from a hub, runs on CPU in seconds.

`tiny_parts()` gives a trainer's arguments other than `args`: a 2-layer Qwen2 model built
from a config, a word-level tokenizer over a 12-word vocabulary, a dataset of 8 prompts, and
a reward that counts the word "b".
`tiny_config(out, **overrides)` is a GRPOConfig with num_iterations=2 (ratios move) and
gradient_accumulation_steps (2) != steps_per_generation (4); `tiny_rloo_config` the same run
as an RLOOConfig (beta 0: no reference model unless asked). `env_masked_rollout()` is a
`rollout_func` whose `env_mask` masks a whole completion now and then.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from trl import GRPOConfig, RLOOConfig

WORDS = ["<pad>", "<eos>", "a", "b", "c", "d", "e", "f", "g", "h", "say", "go"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over WORDS (pad 0, eos 1)."""
    vocab = {word: i for i, word in enumerate(WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


def tiny_model(seed: int = 0) -> Qwen2ForCausalLM:
    """A 2-layer, 32-wide Qwen2 with the tokenizer's vocabulary, seeded."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config)


def tiny_model_dir(path: str, seed: int = 0) -> str:
    """Saves `tiny_model(seed)` under `path` and returns it: TRL builds the reference model
    (beta > 0) from the policy's path."""
    tiny_model(seed).save_pretrained(path)
    return path


def tiny_dataset(n: int = 8) -> Dataset:
    """n short prompts."""
    letters = WORDS[2:10]
    return Dataset.from_dict({"prompt": [f"say {letters[i % 8]} go" for i in range(n)]})


def count_b(completions: list[str], **_: Any) -> list[float]:
    """Reward: the number of "b" words in the completion."""
    return [float(text.split().count("b")) for text in completions]


def env_masked_rollout(seed: int = 0) -> Callable[[list[str], Any], dict[str, list[Any]]]:
    """A GRPOTrainer `rollout_func`: each prompt's completion is 2-6 seeded random words (one
    shorter than 6 ends with <eos>), each logprob -2.4; its `env_mask` gives the second token
    to the environment, and every fifth completion whole (a row without a scored token)."""
    generator = torch.Generator().manual_seed(seed)
    made = 0

    def rollout(prompts: list[str], trainer: Any) -> dict[str, list[Any]]:
        nonlocal made
        out: dict[str, list[Any]] = {
            "prompt_ids": [], "completion_ids": [], "logprobs": [], "env_mask": []
        }  # fmt: skip
        for prompt in prompts:
            n = int(torch.randint(2, 7, (1,), generator=generator))
            ids = torch.randint(2, len(WORDS), (n,), generator=generator).tolist()
            if n < 6:
                ids[-1] = WORDS.index("<eos>")
            env_mask = [0] * n if made % 5 == 2 else [1, 0, *[1] * (n - 2)]
            made += 1
            out["prompt_ids"].append(trainer.processing_class(prompt)["input_ids"])
            out["completion_ids"].append(ids)
            out["logprobs"].append([-2.4] * n)
            out["env_mask"].append(env_mask)
        return out

    return rollout


def tiny_parts(seed: int = 0) -> dict[str, Any]:
    """The tiny run's trainer arguments other than `args`: `tiny_model(seed)`, the reward
    `count_b`, `tiny_dataset()` and `tiny_tokenizer()`."""
    return {
        "model": tiny_model(seed),
        "reward_funcs": count_b,
        "train_dataset": tiny_dataset(),
        "processing_class": tiny_tokenizer(),
    }


def _tiny_args(out: str, **overrides: Any) -> dict[str, Any]:
    """The tiny run's trainer arguments; overrides win."""
    args: dict[str, Any] = {
        "output_dir": out,
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "max_completion_length": 6,
        "num_iterations": 2,
        "gradient_accumulation_steps": 2,
        "steps_per_generation": 4,
        "max_steps": 4,
        "learning_rate": 3e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
        "temperature": 1.0,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    args.update(overrides)
    return args


def tiny_config(out: str, **overrides: Any) -> GRPOConfig:
    """GRPOConfig for the tiny run; overrides win."""
    return GRPOConfig(**_tiny_args(out, **overrides))


def tiny_rloo_config(out: str, **overrides: Any) -> RLOOConfig:
    """RLOOConfig for the tiny run, beta 0 unless overridden (TRL's default, 0.05, loads a
    reference model: pass `tiny_model_dir` as the model); overrides win."""
    return RLOOConfig(**_tiny_args(out, **{"beta": 0.0, **overrides}))
