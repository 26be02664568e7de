"""Whether one policy's whole per-step computation, fused and compiled ahead of time, reaches
the read floor.

    python benchmarks/fused_policy.py                      # 8 steps of 200,256,1024
    python benchmarks/fused_policy.py --shape 2000,64,512 --steps 40

`fused_bound.py` bounds eight sums of clipped policies; this measures everything a replay
computes per step for one policy, `grpo` (PPO's conditional clip, eps 0.2, each sequence's
token mean averaged over the scored sequences). `grpo_row` computes, from the step's arrays as
a replay reads them (logp, logp_old, advantages, the mask, seq_id and any per-sequence array,
for the number of sequences), the step's whole row of device metrics
(`columns.device_metrics()`, as `metrics.step_metrics` returns it for `replay -p grpo`): what
`prepare` derives per step (the ratio, the scored mask, each sequence's length and the
normaliser), the policy's coefficients, objective and discard set with `Policy.weights`'
guards (a non-finite input shows as a NaN coefficient, a zeroed term stays exactly 0), the
counts on each side of A, the update norm, weight_max, ess_frac, net_push, the masses, and
TRL's and verl's clip metrics (TRL's low_min and high_max too) and verl's ppo_kl over one
micro-batch. It is written for fusion:
no host sync, no branch on data (`torch.where` where the eager code takes a finite-sum fast
path), float64 accumulators for the sums the replay takes in float64. Two choices made the
fused loop several times faster: each sequence's length is counted in `LANES` interleaved
copies (`fused_bound.LANES`: adding each token into its sequence's one count makes every
addition wait on the last), and the counts are summed in int32 and shared (a discarded count
is TRL's low plus high hits), not each in its own int64 sum.

Each step's row is checked against the replay's own (`prepare`d as the replay does, then
`Policy.weights` and `step_metrics`): the counts equal, every other figure within 1e-6
relative (the objective and net_push, whose terms cancel, within 1e-6 of their terms'
magnitude: `SCALES`), NaN where it is NaN, on the steps and on two damaged copies of the first
(`damaged`); the largest relative deviation of each figure is printed. Then
printed, in CPU milliseconds a step on one thread (least of `--repeats`, freed memory kept for
reuse as a replay computes, `_memory.heap_kept`): the time to read the step (every array loaded
and copied, the read floor), the replay's own per-step computation (prepare, weights,
step_metrics), `grpo_row` run eagerly, and `grpo_row` exported for any number of positions and
sequences and built by AOTInductor into a package under `--cache` (once per torch build and
source of `grpo_row`), with the build time (or "cached") and a fresh process's load time
through torch's C++ loader (`fused_bound.load_ms`).

What it does not measure: the other policies (the catalogue), recorded gradient geometry (a
run without one: update_norm is the coefficients' norm, cosine_to_own NaN), several
micro-batches or ranks (the synthetic run records none), a KL term, loss weights, recomputed
advantages, the rollout correction, and seq_id renumbering (with a per-sequence array, as here,
seq_id indexes it; without one `prepare` renumbers ids with `torch.unique`, a shape that
depends on the data). The figures grpo cannot have (clipped counts 0; TRL's cispo and vespo
metrics, verl's clipfrac_lower and cosine_to_own NaN) are constants of the row. Nor does it
time the replay's reading thread, the chunk's host copy or the derived columns.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import math

import torch
from arguments import at_least
from fused_bound import LANES, ahead_of_time, least_ms, load_ms
from synthetic_runs import add_step_options, open_cached

from stabledrl_cli._memory import heap_kept
from stabledrl_cli.dump import Step
from stabledrl_cli.policies import get_policy
from stabledrl_cli.policies.ppo import VERL_LOG_RATIO_CLAMP
from stabledrl_cli.replay import columns, step_data
from stabledrl_cli.replay.engine import resolve_policies
from stabledrl_cli.replay.framework import VERL_MASKED_MEAN_EPS
from stabledrl_cli.replay.metrics import step_metrics
from stabledrl_cli.replay.step_data import Arrays

SPEC = "grpo"
_CONFIG = get_policy(SPEC).config
LOW, HIGH = 1.0 - _CONFIG.eps_low, 1.0 + _CONFIG.high
COUNTS = {"nonfinite_coefs"} | {
    c.name for c in columns.COLUMNS if c.derive is None and c.kind == "int"
}
"""The row's counts: checked equal (nonfinite_coefs, a count, is a float column)."""
INPUTS = ("logp", "logp_old", "advantages", "mask", "seq_id", "reward")
"""The step's arrays `grpo_row` takes, in order (reward for the number of sequences only)."""


def count(flags: torch.Tensor) -> torch.Tensor:
    """0-d int32: True entries of a bool tensor (int32 accumulators, half int64's lanes; the
    export bounds the positions below 2**31)."""
    return flags.sum(dtype=torch.int32)


def grpo_row(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    seq_id: torch.Tensor,
    per_sequence: torch.Tensor,
) -> torch.Tensor:
    """[1, M] float64: grpo's device metrics of one step (module docstring). Token arrays [T]
    (mask and seq_id of any integer dtype, seq_id in [0, N)); per_sequence: any [N] array."""
    dtype = logp.dtype
    nan = torch.tensor(math.nan, dtype=torch.float64)
    zero = torch.zeros((), dtype=torch.float64)
    # prepare: the scored mask, the ratio, each sequence's scored tokens.
    scored = mask != 0
    seq = seq_id.long()
    log_ratio = logp - logp_old
    ratio = torch.exp(log_ratio)
    # Each sequence's scored tokens, counted in LANES interleaved copies (fused_bound.LANES).
    lanes = seq * LANES + torch.arange(seq.shape[0], device=seq.device) % LANES
    slots = torch.zeros(per_sequence.shape[0] * LANES, dtype=dtype, device=logp.device)
    seq_len = slots.index_add(0, lanes, scored.to(dtype)).view(-1, LANES).sum(1)
    live = (seq_len > 0).sum().to(dtype).clamp(min=1.0)
    norm = live * seq_len.clamp(min=1.0)[seq]  # seq-mean-token-mean: N |y_i|
    # Policy.weights: PPO's conditional clip, the guards.
    eligible = scored & (adv != 0)
    product = ratio * adv
    ra = torch.where(adv != 0, product, 0.0)  # 0 where A = 0 even if r overflowed
    value = torch.minimum(ra, torch.clamp(ratio, LOW, HIGH) * adv)
    lower, upper = (adv < 0) & (ratio < LOW), (adv > 0) & (ratio > HIGH)
    either = lower | upper  # PPO's discard set and both frameworks' clip hits
    scale = torch.ones_like(norm) / norm
    coef = torch.where(scored & ~either, scale * ra, 0.0)
    objective = torch.where(scored, scale * value, 0.0).sum().double()
    finite = torch.isfinite(logp) & torch.isfinite(logp_old) & torch.isfinite(adv)
    coef = torch.where(scored & ~finite & torch.isfinite(coef), math.nan, coef)
    discarded = either & scored  # either implies A != 0: the eligible ones
    # step_metrics: the REINFORCE and IS references, the weights.
    reinforce = torch.where(eligible, adv / norm, 0.0)
    is_abs = torch.where(scored, product / norm, 0.0).abs()
    n_counted = count(eligible).double()
    ref_sum, ref_abs = reinforce.sum(dtype=torch.float64), reinforce.abs().sum(dtype=torch.float64)
    pg = torch.where(eligible, coef, 0.0)
    w = pg / torch.where(eligible, reinforce, 1.0)
    sum_w, sum_w2 = w.sum(dtype=torch.float64), (w.double() ** 2).sum()
    # amax propagates NaN, and off the counted tokens w is 0/1 (never NaN): NaN where a weight is.
    top = torch.where(eligible, w, -math.inf).amax().double()
    top = torch.where(n_counted == 0, nan, top)
    ess = torch.where(sum_w2 != 0, sum_w * sum_w / (n_counted * sum_w2), nan)
    push = (pg.sum(dtype=torch.float64) - ref_sum) / torch.where(ref_abs > 0, ref_abs, 1.0)
    push = torch.where(ref_abs > 0, push, torch.where(torch.isfinite(push), 0.0, push))
    is_mass = is_abs.sum(dtype=torch.float64)
    # framework_metrics over one micro-batch: TRL's denominator clamped, verl's plus eps.
    n_scored, n_lower, n_upper = count(scored), count(lower & scored), count(upper & scored)
    trl, verl = n_scored.double().clamp(min=1.0), n_scored.double() + VERL_MASKED_MEAN_EPS
    kl = torch.where(scored, -log_ratio.clamp(-VERL_LOG_RATIO_CLAMP, VERL_LOG_RATIO_CLAMP), 0.0)
    # TRL's low_min and high_max: each sequence's share of its scored tokens hit, the least
    # and the largest over the sequences that score one (NaN when none does).
    per_seq = torch.zeros(per_sequence.shape[0], dtype=torch.float64, device=logp.device)
    length, has = seq_len.double().clamp(min=1.0), seq_len > 0
    low_share = per_seq.index_add(0, seq, (lower & scored).double()) / length
    high_share = per_seq.index_add(0, seq, (upper & scored).double()) / length
    low_min = torch.where(has, low_share, math.inf).amin()
    high_max = torch.where(has, high_share, -math.inf).amax()
    computed = {
        "tokens": n_counted,
        "discarded": n_lower + n_upper,
        "clipped": zero,
        "update_norm": (coef.double() ** 2).sum().sqrt(),
        "cosine_to_own": nan,
        "weight_max": top,
        "ess_frac": torch.where(torch.isnan(sum_w2), nan, ess),
        "net_push": push,
        "discarded_pos": n_upper,
        "discarded_neg": n_lower,
        "objective": objective,
        "scored_tokens": n_scored,
        "clipped_pos": zero,
        "clipped_neg": zero,
        "trl_clip_ratio_low_mean": n_lower / trl,
        "trl_clip_ratio_high_mean": n_upper / trl,
        "trl_clip_ratio_region_mean": (n_lower + n_upper) / trl,
        "trl_cispo_clip_ratio": nan,
        "trl_vespo_phi_seq_mean": nan,
        "trl_clip_ratio_low_min": torch.where(has.any(), low_min, nan),
        "trl_clip_ratio_high_max": torch.where(has.any(), high_max, nan),
        "verl_pg_clipfrac": (n_lower + n_upper) / verl,
        "verl_pg_clipfrac_lower": nan,
        "verl_ppo_kl": kl.double().sum() / verl,
        "discarded_mass": torch.where(discarded, is_abs, 0.0).sum(dtype=torch.float64),
        "is_mass": is_mass,
        "objective_mass": is_mass,
        "nonfinite_coefs": count(scored & ~torch.isfinite(coef)),
    }
    return torch.stack([computed[name].double() for name in columns.device_metrics()])[None, :]


SCALES: dict[str, str | float] = {"objective": "objective_mass", "net_push": 1.0}
"""Figures whose terms cancel, and whose deviation is relative to the magnitude of their terms
when that is larger than the figure: a figure's name, or a number. The compiled exp rounds
about one ratio in fifty to the other float32 neighbour of the eager one, and the order of the
float32 objective's additions differs; on these steps the objective is 1e-5 to 1e-7 of the sum
of its terms' magnitudes (which `objective_mass` nearly is: the replay's own float32 sum is up
to 4e-5 of itself from the exact one), and net_push, a difference of two sums over the
REINFORCE reference's absolute sum (each of magnitude about 1), is down to 5e-5."""


def deviations(
    fused: torch.Tensor, replayed: torch.Tensor, scales: dict[str, str | float] = SCALES
) -> dict[str, float]:
    """Each figure's relative deviation of a [1, M] row from the replay's (0 where both are NaN
    or equal; relative to the magnitude of its terms where `scales` names it); asserts the
    counts equal and NaN where NaN."""
    names = columns.device_metrics()
    figures = dict(zip(names, replayed[0].tolist(), strict=True))
    out = {}
    for name, a, b in zip(names, fused[0].tolist(), replayed[0].tolist(), strict=True):
        assert math.isnan(a) == math.isnan(b), (name, a, b)
        assert name not in COUNTS or a == b, (name, a, b)
        terms = scales.get(name, 0.0)
        scale = max(abs(b), abs(figures[terms] if isinstance(terms, str) else terms))
        out[name] = 0.0 if a == b or math.isnan(b) else abs(a - b) / scale
    return out


def damaged(arrays: Arrays) -> list[Arrays]:
    """Two copies of a step's arrays that take the guards' paths, each on three scored
    entries whose advantages are set to 0.5, -0.5 and 0: ratios overflowed to inf from finite
    log-probs (discarded, kept as -inf, and times A = 0), and non-finite inputs (a NaN logp, a
    -inf logp_old, a NaN advantage)."""
    at = torch.nonzero(arrays["mask"].reshape(-1) != 0)[:3, 0]
    adv = arrays["advantages"].reshape(-1).clone()
    adv[at] = torch.tensor([0.5, -0.5, 0.0])
    logp = arrays["logp"].reshape(-1).clone()
    logp[at] = arrays["logp_old"].reshape(-1)[at] + 100.0
    overflowed = {**arrays, "logp": logp, "advantages": adv}
    logp, logp_old = arrays["logp"].reshape(-1).clone(), arrays["logp_old"].reshape(-1).clone()
    logp[at[0]], logp_old[at[1]] = math.nan, -math.inf
    broken = {**arrays, "logp": logp, "logp_old": logp_old, "advantages": adv.clone()}
    broken["advantages"][at[2]] = math.nan
    return [overflowed, broken]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_options(parser)
    parser.add_argument("--repeats", type=at_least(1), default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = open_cached(args)
    where, unit, ranks = run.location, step_data.run_unit(run), step_data.run_ranks(run)
    policies, own = resolve_policies(run, [SPEC])
    chosen = [step for _, step in zip(range(args.steps), run.steps(), strict=False)]
    read = [(step, step_data.read_arrays(step, where)) for step in chosen]
    checked = read + [(chosen[0], arrays) for arrays in damaged(read[0][1])]

    def read_steps() -> list[list[torch.Tensor]]:
        return [[step[name].clone() for name in sorted(step.fields)] for step in chosen]

    def replayed(steps: list[tuple[Step, Arrays]] = read) -> list[torch.Tensor]:
        rows = []
        for step, arrays in steps:
            prep, geometry, micro = step_data.usable(step, arrays, unit, where, ranks)
            weights = [policy.weights(prep) for policy in policies]
            rows.append(step_metrics(prep, policies, weights, geometry, own, micro))
        return rows

    def fused(function: object, steps: list[tuple[Step, Arrays]] = read) -> list[torch.Tensor]:
        assert callable(function)
        return [function(*(arrays[name].reshape(-1) for name in INPUTS)) for _, arrays in steps]

    source = hashlib.sha256(inspect.getsource(grpo_row).encode()).hexdigest()[:12]
    package = args.cache / "aot" / f"torch-{torch.__version__}-{SPEC}-row-{source}.pt2"
    positions = torch.export.Dim("positions", min=2, max=2**31 - 2)
    sequences = torch.export.Dim("sequences", min=2, max=2**31 - 2)
    dims = ({0: positions},) * (len(INPUTS) - 1) + ({0: sequences},)
    example = tuple(read[0][1][name].reshape(-1) for name in INPUTS)
    build_s = ahead_of_time(package, grpo_row, example, dims)
    packaged = torch._inductor.aoti_load_package(str(package))
    worst = {"eager": dict.fromkeys(columns.device_metrics(), 0.0)}
    worst["ahead of time"] = dict(worst["eager"])
    itself = dict.fromkeys(SCALES, 0.0)  # the ahead-of-time figures relative to themselves
    for replay_row, eager_row, aot_row in zip(
        replayed(checked), fused(grpo_row, checked), fused(packaged, checked), strict=True
    ):
        for how, row in (("eager", eager_row), ("ahead of time", aot_row)):
            for name, deviation in deviations(row, replay_row).items():
                worst[how][name] = max(worst[how][name], deviation)
        for name, deviation in deviations(aot_row, replay_row, {}).items():
            if name in itself:
                itself[name] = max(itself[name], deviation)
    for how, figures in worst.items():
        assert max(figures.values()) <= 1e-6, (how, figures)
    with heap_kept():  # as a replay computes: freed memory reused, no fresh page faults
        read_ms = least_ms(read_steps, len(chosen), args.repeats)
        replay_ms = least_ms(replayed, len(chosen), args.repeats)
        eager_ms = least_ms(lambda: fused(grpo_row), len(chosen), args.repeats)
        packaged_ms = least_ms(lambda: fused(packaged), len(chosen), args.repeats)
    print(f"{args.shape.name}: {example[0].numel()} positions a step, {SPEC}'s whole row")
    print(f"read the step          {read_ms:8.2f} ms   1.00x")
    print(f"replay (eager)         {replay_ms:8.2f} ms {replay_ms / read_ms:6.2f}x")
    print(f"eager, one function    {eager_ms:8.2f} ms {eager_ms / read_ms:6.2f}x")
    print(f"ahead of time (fused)  {packaged_ms:8.2f} ms {packaged_ms / read_ms:6.2f}x")
    built = "cached" if build_s is None else f"{build_s:.1f} s"
    print(f"  its build            {built:>8}")
    print(f"  its load             {load_ms(package):8.1f} ms")
    print(f"largest relative deviation from the replay's row over {len(checked)} steps, two of")
    print("them damaged (0: equal; objective and net_push: of their terms, `SCALES`):")
    for name in columns.device_metrics():
        figures = "  ".join(f"{worst[how][name]:8.1e}" for how in worst)
        print(f"  {name:28} {figures}   (eager, ahead of time)")
    relative = ", ".join(f"{name} {deviation:.1e}" for name, deviation in itself.items())
    print(f"ahead of time, relative to the figure itself: {relative}")


if __name__ == "__main__":
    main()
