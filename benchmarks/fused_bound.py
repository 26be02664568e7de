"""How close one fused kernel a step could bring a catalogue replay to the read floor.

    python benchmarks/fused_bound.py                      # 8 steps of 200,256,1024
    python benchmarks/fused_bound.py --shape 2000,64,512 --steps 40

Not the replay: a lower bound for what fusing its passes could reach. On the steps of a
synthetic run (`replay_speed.py`'s, cached), one function computes, for P clipped policies at
once (PPO's conditional clip with P pairs of bounds, token-mean aggregation), each policy's
coefficients and eight of its per-step sums: the objective, the discarded count and mass, the
update norm, the sums of the weights and of their squares, the largest weight and the net push.
The real catalogue computes more (ten families, sequence-level ratios, the frameworks' clip
metrics, non-finite guards). Printed, in CPU milliseconds a step on one thread (least of
`--repeats`): the time to read the step (every array loaded and copied, as the read floor),
that function run eagerly, and the same function compiled by `torch.compile` (its C++ code
fused into a few loops), with the compile time and both as multiples of the read.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from synthetic_runs import add_step_options, open_cached

Kernel = Callable[..., torch.Tensor]


def clipped_policies(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
) -> torch.Tensor:
    """[P, 8] float64 sums of P PPO-clipped policies of bounds low, high [P, 1] on one step."""
    ratio = torch.exp(logp - logp_old)
    scored = mask.to(logp.dtype)
    norm = scored.sum().clamp(min=1.0)
    reference = adv * scored / norm
    value = torch.minimum(ratio * adv, torch.clamp(ratio, low, high) * adv)
    discarded = ((adv > 0) & (ratio > high)) | ((adv < 0) & (ratio < low))
    coef = torch.where(discarded, 0.0, ratio * reference)
    weight = coef / torch.where(reference != 0, reference, 1.0)
    wide = coef.double()
    return torch.stack(
        [
            (value * scored / norm).sum(1, dtype=torch.float64),
            (discarded & mask).sum(1).double(),
            torch.where(discarded, (ratio * reference).abs(), 0.0).sum(1, dtype=torch.float64),
            (wide * wide).sum(1).sqrt(),
            weight.sum(1, dtype=torch.float64),
            (weight.double() ** 2).sum(1),
            weight.amax(1).double(),
            wide.sum(1) - reference.sum(dtype=torch.float64),
        ],
        dim=1,
    )


def least_ms(work: Callable[[], object], steps: int, repeats: int) -> float:
    """Least CPU milliseconds a step of `work` (one call over every step) over `repeats`."""
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        work()
        best = min(best, (time.process_time() - started) / steps * 1e3)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_options(parser)
    parser.add_argument("--policies", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = open_cached(args)
    names = ("logp", "logp_old", "advantages", "mask")
    chosen = [step for _, step in zip(range(args.steps), run.steps(), strict=False)]

    def read() -> list[list[torch.Tensor]]:
        return [[step[name].clone() for name in sorted(step.fields)] for step in chosen]

    steps = [
        [step[name].reshape(-1).clone() for name in names[:3]] + [step["mask"].reshape(-1) != 0]
        for step in chosen
    ]
    eps = torch.linspace(0.1, 0.3, args.policies)[:, None]
    bounds = (1.0 - eps, 1.0 + eps + 0.08)

    def apply(kernel: Kernel) -> None:
        for arrays in steps:
            kernel(*arrays, *bounds)

    read_ms = least_ms(read, len(chosen), args.repeats)
    eager_ms = least_ms(lambda: apply(clipped_policies), len(chosen), args.repeats)
    compiled = torch.compile(clipped_policies, dynamic=True)
    started = time.perf_counter()
    compiled(*steps[0], *bounds)
    compile_s = time.perf_counter() - started
    fused_ms = least_ms(lambda: apply(compiled), len(chosen), args.repeats)
    positions = steps[0][0].numel()
    print(f"{args.shape.name}: {positions} positions a step, {args.policies} clipped policies")
    print(f"read the step          {read_ms:8.2f} ms   1.00x")
    print(f"eager, one function    {eager_ms:8.2f} ms {eager_ms / read_ms:6.2f}x")
    print(f"compiled (fused)       {fused_ms:8.2f} ms {fused_ms / read_ms:6.2f}x")
    print(f"compile time           {compile_s:8.1f} s")


if __name__ == "__main__":
    main()
