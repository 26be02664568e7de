"""Cost of gradient-geometry capture against one optimizer step, on the example's model.

    python benchmarks/geometry_cost.py [--repeats 5] [--threads 1] [--seqs 64] [--chunk 64]
                                       [--batched] [--part capture|trainer|both]
                                       [--trainer-steps 16] [--trainer-repeats 3]

Part `capture` (below) times each capture in isolation. Part `trainer` runs the real example
trainer (`stabledrl_cli.example.trainer.train`, what `stabledrl record` runs) for
`--trainer-steps` RL steps per case, after a short pretraining (20 steps: the timing does not
depend on the starting reward), and reports ms per RL optimizer step (rollout generation,
old/new log-likelihoods, backward, clip, AdamW, and for recorded cases the step file and the
geometry), the median over `--trainer-repeats` runs, as a ratio to the same trainer
unrecorded; and the bytes per step of the step files it wrote (mean file size, and what the
geometry adds to it). Sequence-unit cases use the example's default (LLaDA ELBO, 64 units);
token-unit cases the ELBO scored per token (64 x 5 = 320 units).

The model is the built-in example's `TinyDiffusionLM` (2 bidirectional blocks, d=64, vocab 13,
12 positions, ~100k parameters) with 64 sequences of the sort task scored by the sequence
ELBO (one mask sample). One optimizer step = forward + backward + clip_grad_norm_ + AdamW.
Each capture is timed on the same batch; the table prints the median wall time over
`--repeats` runs (after one warm-up), its ratio to the optimizer step, and the bytes the
capture adds to a step file (float32). Token-unit rows score the 5 completion tokens of
each sequence (320 units) under the same mask, through a per-row function (`--batched` adds
the whole-batch `BatchLogp` form, which pays a backward pass of the batch per unit).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
from pathlib import Path

import torch
from arguments import at_least
from timing import median_seconds

from stabledrl_cli.capture.geometry import (
    BatchLogp,
    GeometryConfig,
    capture_geometry,
    covered_parameters,
)
from stabledrl_cli.dump import Recorder
from stabledrl_cli.example import ModelConfig, SortTask, TinyDiffusionLM, draw_mask, token_logp
from stabledrl_cli.example import unit_logp as example_unit_logp
from stabledrl_cli.example.run_setup import recorder_kwargs
from stabledrl_cli.example.trainer import ExampleConfig, train
from stabledrl_cli.policies import get_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=at_least(1), default=5)
    parser.add_argument("--threads", type=at_least(1), default=1, help="torch intra-op threads")
    parser.add_argument("--seqs", type=at_least(1), default=64, help="sequences per step")
    parser.add_argument("--chunk", type=at_least(1), default=64, help="GeometryConfig.chunk_size")
    parser.add_argument(
        "--batched", action="store_true", help="also time token units through BatchLogp (slow)"
    )
    parser.add_argument("--part", choices=("capture", "trainer", "both"), default="both")
    parser.add_argument("--trainer-steps", type=at_least(1), default=16, help="RL steps per case")
    parser.add_argument("--trainer-repeats", type=at_least(1), default=3, help="runs per case")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part in ("capture", "both"):
        capture_table(args)
    if args.part in ("trainer", "both"):
        trainer_table(args)


def capture_table(args: argparse.Namespace) -> None:
    """Each capture alone on one batch of the example's model, against one optimizer step."""
    gen = torch.Generator().manual_seed(0)
    task = SortTask()
    model = TinyDiffusionLM(ModelConfig(seq_len=task.seq_len))
    model.reset_parameters(gen)
    prompts = task.sample_prompts(args.seqs, gen)
    tokens = torch.cat([prompts, task.answers(prompts)], dim=1)
    sample = draw_mask(args.seqs, task.prompt_len, task.length, "elbo", gen)
    coef = torch.randn(args.seqs, generator=gen) / args.seqs
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    n_params = sum(p.numel() for p in model.parameters())

    def optimizer_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logp = (sample.weights * token_logp(model, tokens, sample.noise_mask)).sum(dim=1)
        (-(coef * logp).sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    def seq_unit(call, tok, noise, weights):
        return example_unit_logp(model, call.params, tok, noise, weights)

    seq_inputs = (tokens, sample.noise_mask, sample.weights)
    # Token units: the completion positions of every sequence, same mask (320 units for 64).
    completion = slice(task.prompt_len, task.seq_len)

    def token_rows(call, tok, noise):  # per row: the sequence's 5 completion tokens
        return token_logp(call, tok[None], noise[None])[0, completion]

    def token_batch(call, tok, noise):  # the whole batch at once: [U]
        return token_logp(call, tok, noise)[:, completion].reshape(-1)

    tok_inputs = (tokens, sample.noise_mask)
    n_tokens = args.seqs * task.length

    step_s = median_seconds(optimizer_step, args.repeats)
    cases = [
        ("gram", "sequence", seq_unit, seq_inputs, GeometryConfig(kind="gram")),
        ("sketch exact k=64", "sequence", seq_unit, seq_inputs,
         GeometryConfig(kind="sketch", k=64, method="exact")),
        ("sketch exact k=256", "sequence", seq_unit, seq_inputs,
         GeometryConfig(kind="sketch", k=256, method="exact")),
        ("sketch jvp k=32", "sequence", seq_unit, seq_inputs,
         GeometryConfig(kind="sketch", k=32, method="jvp")),
        ("sketch jvp k=64", "sequence", seq_unit, seq_inputs,
         GeometryConfig(kind="sketch", k=64, method="jvp")),
        ("gram", "token", token_rows, tok_inputs, GeometryConfig(kind="gram")),
        ("sketch exact k=256", "token", token_rows, tok_inputs,
         GeometryConfig(kind="sketch", k=256, method="exact")),
        ("sketch jvp k=64", "token", token_rows, tok_inputs,
         GeometryConfig(kind="sketch", k=64, method="jvp")),
    ]  # fmt: skip
    if args.batched:
        cases.append(
            ("gram BatchLogp", "token", BatchLogp(token_batch), tok_inputs,
             GeometryConfig(kind="gram"))
        )  # fmt: skip
    covered = covered_parameters(model, GeometryConfig())
    print(
        f"model: {n_params} parameters ({sum(p.numel() for _, p in covered)} covered), "
        f"{args.seqs} sequences, {n_tokens} completion tokens, threads={args.threads}, "
        f"repeats={args.repeats}, chunk_size={args.chunk}"
    )
    print(f"optimizer step (fwd+bwd+clip+AdamW): {step_s * 1e3:.1f} ms")
    print(f"{'capture':<20} {'unit':<9} {'U':>5} {'ms':>9} {'x step':>8} {'bytes/step':>11}")
    before = torch.random.get_rng_state()
    for name, unit, fn, inputs, config in cases:
        arrays: dict[str, torch.Tensor] = {}

        config = dataclasses.replace(config, chunk_size=args.chunk)

        def run(fn=fn, inputs=inputs, config=config, arrays=arrays) -> None:
            arrays.update(capture_geometry(model, fn, inputs, config, step=0))

        seconds = median_seconds(run, args.repeats)
        stored = sum(t.numel() * t.element_size() for t in arrays.values())
        n_units = next(iter(arrays.values())).shape[0]
        print(
            f"{name:<20} {unit:<9} {n_units:>5} {seconds * 1e3:>9.1f} "
            f"{seconds / step_s:>8.1f} {stored:>11}"
        )
    assert torch.equal(torch.random.get_rng_state(), before), "capture consumed the global RNG"


def _trainer_case(
    config: ExampleConfig, geometry: GeometryConfig | None, recorded: bool
) -> tuple[float, float | None]:
    """One run of the example trainer -> (ms per RL step, mean step-file bytes or None)."""
    if not recorded:
        return train(config).ms_per_step, None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run"
        kwargs = recorder_kwargs(config, get_policy(config.policy), geometry)
        with Recorder(path, **kwargs) as recorder:
            result = train(config, recorder=recorder, geometry=geometry)
        sizes = [f.stat().st_size for f in (path / "steps").iterdir()]
    return result.ms_per_step, statistics.mean(sizes)


def trainer_table(args: argparse.Namespace) -> None:
    """ms per RL step of the real example trainer, per geometry option, vs unrecorded."""
    base = {"steps": args.trainer_steps, "pretrain_steps": 20}
    units = {
        "sequence": ExampleConfig(**base),
        "token": ExampleConfig(**base, unit="token", estimator="elbo"),
    }
    chunk = {"chunk_size": args.chunk}
    cases: list[tuple[str, str, GeometryConfig | None, bool]] = []
    for unit in units:
        cases += [
            ("unrecorded", unit, None, False),
            ("recorded, no geometry", unit, None, True),
            ("gram", unit, GeometryConfig(kind="gram", **chunk), True),
            ("gram, every 4", unit, GeometryConfig(kind="gram", every=4, **chunk), True),
            ("sketch exact k=256", unit,
             GeometryConfig(kind="sketch", k=256, method="exact", **chunk), True),
            ("sketch jvp k=64", unit,
             GeometryConfig(kind="sketch", k=64, method="jvp", **chunk), True),
        ]  # fmt: skip
    train(ExampleConfig(steps=4, pretrain_steps=2), geometry=GeometryConfig(kind="gram"))  # warm-up
    print()
    print(
        f"example trainer: {args.trainer_steps} RL steps per run, median of "
        f"{args.trainer_repeats} runs, threads={args.threads}, chunk_size={args.chunk}"
    )
    header = (
        f"{'case':<24} {'unit':<9} {'ms/step':>9} {'x unrec.':>9} {'bytes/step':>11} "
        f"{'geometry B':>11}"
    )
    print(header)
    baseline: dict[str, float] = {}
    plain_bytes: dict[str, float] = {}
    for name, unit, geometry, recorded in cases:
        runs = [_trainer_case(units[unit], geometry, recorded) for _ in range(args.trainer_repeats)]
        ms = statistics.median(r[0] for r in runs)
        size = runs[0][1]
        baseline.setdefault(unit, ms)
        if recorded and geometry is None:
            plain_bytes[unit] = size
        size_text = f"{size:>11.0f}" if size is not None else f"{'-':>11}"
        extra = size - plain_bytes[unit] if size is not None and geometry is not None else None
        extra_text = f"{extra:>11.0f}" if extra is not None else f"{'-':>11}"
        print(
            f"{name:<24} {unit:<9} {ms:>9.1f} {ms / baseline[unit]:>9.2f} {size_text} {extra_text}"
        )


if __name__ == "__main__":
    main()
