"""How closely replay reproduces TRL's own loss: for each TRL 1.16 configuration of the
parity tests (tests/trl_scripts/tiny_configs.py), a tiny `RecordingGRPOTrainer` run on CPU
(tests/trl_scripts/tiny_grpo.py: num_iterations=2, gradient_accumulation_steps=2,
steps_per_generation=4, 4 optimizer steps; `RecordingRLOOTrainer` for the `rloo*` ones) is
recorded, and replay's objective of the run's own policy is compared with the loss TRL
logged, step by step (loss = -J). Prints, per
configuration, the policy spec the run recorded, the worst relative error over its steps and
the worst absolute one (a step whose loss is near 0 has a large relative error from float32
rounding alone). TRL's own log lines go to stderr.

    python benchmarks/trl_parity.py                  # every configuration
    python benchmarks/trl_parity.py --only vespo luspo
    python benchmarks/trl_parity.py --trainer rloo   # the RLOOTrainer configurations
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "trl_scripts"))

from extras import require_extra
from tiny_configs import PARITY, RLOO_PARITY  # type: ignore[import-not-found]

import stabledrl_cli as sd

CONFIGS = {**PARITY, **RLOO_PARITY}


def parity(name: str, where: Path) -> tuple[str, float, float]:
    """(recorded spec, worst relative error, worst absolute error) of one configuration. TRL's
    pieces are imported here, once the options are parsed: `--help` needs no trl extra."""
    from tiny_grpo import (  # type: ignore[import-not-found]
        count_b,
        tiny_config,
        tiny_dataset,
        tiny_model,
        tiny_model_dir,
        tiny_rloo_config,
        tiny_tokenizer,
    )

    from stabledrl_cli.integrations.trl import RecordingGRPOTrainer, RecordingRLOOTrainer

    config = CONFIGS[name]
    with contextlib.redirect_stdout(sys.stderr):  # TRL prints each logged step
        model = tiny_model_dir(str(where / "model")) if config.get("beta") else tiny_model()
        rloo = name in RLOO_PARITY
        trainer = (RecordingRLOOTrainer if rloo else RecordingGRPOTrainer)(
            model=model,
            reward_funcs=count_b,
            args=(tiny_rloo_config if rloo else tiny_config)(str(where / "trl_out"), **config),
            train_dataset=tiny_dataset(),
            processing_class=tiny_tokenizer(),
            stabledrl_out=where / "run",
        )
        trainer.train()
    logged = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    spec = trainer.stabledrl_policy.spec
    own = sd.replay(where / "run", policies=[spec], device="cpu").own
    assert own is not None
    worst_rel = worst_abs = 0.0
    for step, objective in zip(own.series["step"], own.series["objective"], strict=True):
        loss = logged[int(step)]
        error = abs(-float(objective) - loss)
        worst_abs = max(worst_abs, error)
        worst_rel = max(worst_rel, error / abs(loss) if loss else error)
    return spec, worst_rel, worst_abs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), help="these configurations")
    parser.add_argument(
        "--trainer", choices=["grpo", "rloo"], help="the configurations of this trainer only"
    )
    args = parser.parse_args()
    require_extra("trl", "trl", "datasets")
    names = args.only or {None: CONFIGS, "grpo": PARITY, "rloo": RLOO_PARITY}[args.trainer]
    width = max(len("configuration"), *map(len, names))
    print(f"{'configuration':<{width}} {'worst rel':>10} {'worst abs':>10}  policy spec recorded")
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            spec, rel, absolute = parity(name, Path(tmp))
        print(f"{name:<{width}} {rel:>10.2g} {absolute:>10.2g}  {spec}", flush=True)


if __name__ == "__main__":
    main()
