"""How close a fused computation of a step could bring a catalogue replay to the read floor.

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
fused into a few loops), with the compile time and both as multiples of the read. Everything
is timed as a replay computes, with freed memory kept for reuse (`_memory.heap_kept`).

`torch.compile` compiles again in every new process (a warm cache shortens it, not away), so
the same function is also compiled ahead of time: exported with any number of positions and
built by AOTInductor into a package (a shared library) under `--cache`, once per torch build
and P. Printed: the time that build took (or "cached"), how long a fresh
process takes to load the package (median of three fresh interpreters, torch already
imported, through torch's C++ package loader: `torch._inductor.aoti_load_package` imports
the compiler first, a second more) and the packaged function's time a step. Its figures are
checked against the direct function's like the bucket sums' (1e-6 relative).

A third way needs no compiler: `bucketed_policies` computes the same [P, 8] from statistics of
buckets. Each of those policies treats a token by the side of A and where r falls among the P
pairs of bounds, so one pass sorts every eligible token into one of 2(2P+1) buckets (numpy
counts the bounds below r), six `bincount`s sum what the eight quantities need in each bucket
(tokens, A, rA, (rA)^2, r, r^2, in float64) and a scatter takes each bucket's largest r; each
policy's figures are then sums over its kept and discarded buckets, tiny [P, buckets]
arithmetic. The passes over the tokens do not grow with P. Its figures are checked against
the direct function's: the discarded counts equal, the rest within 1e-6 relative or 1e-9 (the
direct function rounds each token's products to float32, r A w / (A w) is r to an ulp; the
buckets sum float64 products).
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from arguments import at_least
from synthetic_runs import add_step_options, open_cached

from stabledrl_cli._memory import heap_kept

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


LANES = 8
"""Copies of each bucket that consecutive tokens cycle through: most tokens of a step fall in
one bucket (r near 1), and adding each into the same sum makes every addition wait for the
last one (a histogram's dependency chain); eight lanes made a bincount 3.8x faster."""


@functools.cache
def _lanes(tokens: int, slots: int) -> torch.Tensor:
    """[tokens] int32 offsets slots x (i mod LANES): token i's lane."""
    return (torch.arange(tokens, dtype=torch.int32) % LANES) * slots


def bucketed_policies(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
) -> torch.Tensor:
    """`clipped_policies` from bucket statistics (module docstring): the same [P, 8]."""
    ratio = torch.exp(logp - logp_old)
    norm = mask.sum().clamp(min=1).double()
    count = low.shape[0]
    # r < low  <=>  r <= the float32 just below low: both kinds of bound as "r <= boundary".
    below_low = torch.nextafter(low[:, 0], torch.tensor(-math.inf))
    boundaries, order = torch.sort(torch.cat([high[:, 0], below_low]))
    place = torch.empty_like(order)
    place[order] = torch.arange(2 * count)
    high_at, low_at = place[:count, None], place[count:, None]
    width = 2 * count + 1
    slots = 4 * width
    assert slots <= 256, "the uint8 keys hold up to 31 policies"
    # key = (bounds below r) + width (A > 0) + 2 width (not eligible), counted in uint8 by
    # numpy's comparisons (several times faster than torch's on the CPU, and than bucketize).
    r_host, a_host, m_host = ratio.numpy(), adv.numpy(), mask.numpy()
    keys = (a_host > 0).view(np.uint8) * np.uint8(width)
    keys += (~(m_host & (a_host != 0))).view(np.uint8) * np.uint8(2 * width)
    for bound in boundaries.numpy():
        keys += r_host > bound
    bucket_of = torch.from_numpy(keys)
    key = bucket_of.to(torch.int32) + _lanes(keys.size, slots)
    ra = ratio * adv

    def per_bucket(weights: torch.Tensor | None) -> torch.Tensor:
        """[2 width] float64 sums of `weights` (None: tokens) in each eligible bucket."""
        w = None if weights is None else weights.double()
        lanes = torch.bincount(key, weights=w, minlength=LANES * slots).view(LANES, slots)
        return lanes.sum(0)[: 2 * width].double()

    n, sum_a, sum_ra, sum_ra2 = (
        per_bucket(None),
        per_bucket(adv),
        per_bucket(ra),
        per_bucket(ra * ra),
    )
    sum_r, sum_r2 = per_bucket(ratio), per_bucket(ratio * ratio)
    top_r = torch.full((slots,), -math.inf, dtype=ratio.dtype)
    top_r = top_r.scatter_reduce(0, bucket_of.long(), ratio, reduce="amax")[: 2 * width].double()
    bucket = torch.arange(width).repeat(2)[None, :]
    positive = torch.arange(2 * width)[None, :] >= width
    dropped_pos = positive & (bucket > high_at)
    dropped_neg = ~positive & (bucket <= low_at)
    dropped = dropped_pos | dropped_neg
    kept = ~dropped

    def over(buckets: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return (buckets * values[None, :]).sum(1)

    objective = over(kept, sum_ra) + high[:, 0].double() * over(dropped_pos, sum_a)
    objective = (objective + low[:, 0].double() * over(dropped_neg, sum_a)) / norm
    mass = (over(dropped_pos, sum_ra) - over(dropped_neg, sum_ra)) / norm
    tops = torch.where(kept, top_r[None, :], -math.inf).amax(1).clamp(min=0.0)
    return torch.stack(
        [
            objective,
            over(dropped, n),
            mass,
            over(kept, sum_ra2).sqrt() / norm,
            over(kept, sum_r),
            over(kept, sum_r2),
            tops,
            (over(kept, sum_ra) - sum_a.sum()) / norm,
        ],
        dim=1,
    )


def ahead_of_time(
    package: Path,
    function: Kernel,
    inputs: tuple[torch.Tensor, ...],
    dynamic: tuple[dict[int, torch.export.Dim] | None, ...],
) -> float | None:
    """Build `function` into an AOTInductor package at `package` for `inputs`' shapes, their
    dims in `dynamic` (one entry an input, None: static) free, unless it exists -> the seconds
    the build took (None: it was there)."""
    if package.exists():
        return None
    started = time.perf_counter()
    module = type("Exported", (torch.nn.Module,), {"forward": staticmethod(function)})()
    exported = torch.export.export(module, inputs, dynamic_shapes=dynamic)
    package.parent.mkdir(parents=True, exist_ok=True)
    building = package.with_suffix(".building.pt2")
    torch._inductor.aoti_compile_and_package(exported, package_path=str(building))
    building.replace(package)
    return time.perf_counter() - started


_LOAD_TIMER = """
import sys, time
import torch
started = time.perf_counter()
torch._C._aoti.AOTIModelPackageLoader(sys.argv[1], "model", False, 1, -1)
print(time.perf_counter() - started)
"""
"""A fresh process loading a package with torch's C++ loader, as `aoti_load_package` does
after importing the compiler (`torch._inductor`, about a second here) around it."""


def load_ms(package: Path, repeats: int = 3) -> float:
    """Median milliseconds a fresh interpreter (torch imported) takes to load `package`."""
    times = [
        float(
            subprocess.run(
                [sys.executable, "-c", _LOAD_TIMER, str(package)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
        for _ in range(repeats)
    ]
    return statistics.median(times) * 1e3


def least_ms(work: Callable[[], object], steps: int, repeats: int) -> float:
    """Least CPU milliseconds a step of `work` (one call over every step) over `repeats`."""
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        work()
        best = min(best, (time.process_time() - started) / steps * 1e3)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_options(parser)
    parser.add_argument("--policies", type=at_least(1), default=10)
    parser.add_argument("--repeats", type=at_least(1), default=5)
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

    for arrays in steps:
        direct, bucketed = clipped_policies(*arrays, *bounds), bucketed_policies(*arrays, *bounds)
        assert torch.equal(direct[:, 1], bucketed[:, 1]), (direct, bucketed)  # discarded
        assert torch.allclose(direct, bucketed, rtol=1e-6, atol=1e-9), (direct, bucketed)
    package = args.cache / "aot" / f"torch-{torch.__version__}-policies-{args.policies}.pt2"
    free = torch.export.Dim("positions", min=2, max=2**31 - 2)
    per_position = ({0: free},) * len(steps[0]) + (None,) * len(bounds)
    build_s = ahead_of_time(package, clipped_policies, (*steps[0], *bounds), per_position)
    packaged = torch._inductor.aoti_load_package(str(package))
    for arrays in steps:
        direct, fused = clipped_policies(*arrays, *bounds), packaged(*arrays, *bounds)
        assert torch.equal(direct[:, 1], fused[:, 1]), (direct, fused)
        assert torch.allclose(direct, fused, rtol=1e-6, atol=1e-9), (direct, fused)
    with heap_kept():  # as a replay computes: freed memory reused, no fresh page faults
        read_ms = least_ms(read, len(chosen), args.repeats)
        eager_ms = least_ms(lambda: apply(clipped_policies), len(chosen), args.repeats)
        bucketed_ms = least_ms(lambda: apply(bucketed_policies), len(chosen), args.repeats)
        compiled = torch.compile(clipped_policies, dynamic=True)
        started = time.perf_counter()
        compiled(*steps[0], *bounds)
        compile_s = time.perf_counter() - started
        fused_ms = least_ms(lambda: apply(compiled), len(chosen), args.repeats)
        packaged_ms = least_ms(lambda: apply(packaged), len(chosen), args.repeats)
    positions = steps[0][0].numel()
    print(f"{args.shape.name}: {positions} positions a step, {args.policies} clipped policies")
    print(f"read the step          {read_ms:8.2f} ms   1.00x")
    print(f"eager, one function    {eager_ms:8.2f} ms {eager_ms / read_ms:6.2f}x")
    print(f"eager, bucket sums     {bucketed_ms:8.2f} ms {bucketed_ms / read_ms:6.2f}x")
    print(f"compiled (fused)       {fused_ms:8.2f} ms {fused_ms / read_ms:6.2f}x")
    print(f"compile time           {compile_s:8.1f} s")
    print(f"ahead of time (fused)  {packaged_ms:8.2f} ms {packaged_ms / read_ms:6.2f}x")
    built = "cached" if build_s is None else f"{build_s:.1f} s"
    print(f"  its build            {built:>8}")
    print(f"  its load             {load_ms(package):8.1f} ms")


if __name__ == "__main__":
    main()
