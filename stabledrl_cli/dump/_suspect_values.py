"""Values of a step that are no error but likely a loop's bug, of which the Recorder warns and
`inspect` tells: a log-probability above 0 (logits passed, or a flipped sign), a reward outside
the run's declared reward_range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def reward_outside(
    span: tuple[float, float], tensors: Mapping[str, np.ndarray], values: Mapping[str, float]
) -> str | None:
    """The first of a step's rewards (`reward`, else its `reward_mean`) that lies outside
    `span`, its run's declared reward_range, said as `a reward of -1`; None when none does
    (NaN is no reward: a completion not scored). Rewards are compared as stored, in float32
    (0.3 is 0.3000000119 there, a reward at the end of (0, 0.3)); a reward_mean beside them
    is theirs, or a mean of them (in float64: 0.3000000119 too), and not compared."""
    low, high = span
    reward = tensors.get("reward")
    if reward is not None:
        outside = np.flatnonzero((reward < low) | (reward > high))  # (a float is weak: float32)
        return f"a reward of {float(reward[outside[0]]):g}" if outside.size else None
    mean = values.get("reward_mean", math.nan)
    return f"a reward_mean of {mean:g}" if mean < low or mean > high else None


LOGP_FIELDS = ("logp", "logp_old", "logp_ref", "logp_rollout")
"""The fields of log-probabilities (or a dLLM's Monte Carlo ELBO estimates of them): <= 0."""

LOGP_ROUNDING = 1e-4
"""The most a token's log-probability may lie above 0 and still be read as 0 rounded: float32
rounds a logit x, and x - logsumexp(x), to within 2^-24 |x| each (6e-6 together at |x| = 50,
6e-5 at 512), so a near-certain token's log-probability can come out a few units in the last
place above 0 (1.2e-7 from a log_softmax of x - log(sum(exp(x))), or a logsumexp taken apart
from x). Logits passed as logp (values of order 1) and a flipped sign (-log p, above 1e-4 for
any token of p < 0.9999) lie far above it. A unit 'sequence' entry, a sum over its sequence's
tokens, is bounded by it times its recorded `token_count` (`positive_logp`)."""


def positive_logp(
    arrays: Mapping[str, np.ndarray], mask: np.ndarray, tokens: np.ndarray | None
) -> tuple[str, float] | None:
    """The first of a step's `LOGP_FIELDS` (each [T], as `mask`) that holds a finite value
    above its entry's bound where `mask` is set, with its largest such value: logits passed,
    or a flipped sign; None when none does (NaN and inf are the step's `nonfinite`). The bound
    is `LOGP_ROUNDING`, times the entry's token count where `tokens` [T] gives it (a sequence
    run's `token_count[seq_id]`: a sum of that many rounded tokens; a count of 0 is bounded as
    1); None: each entry is bounded as one token (a token run, or a sequence run without
    token_count, whose entries' lengths are unknown). One pass over a field whose largest value
    is at most the least bound, the common case."""
    bound: float | np.ndarray = LOGP_ROUNDING
    least = LOGP_ROUNDING  # no entry above it, no entry above its own bound
    if tokens is not None and tokens.size:
        bound = LOGP_ROUNDING * np.maximum(tokens, 1)
        least = float(np.minimum.reduce(bound, axis=None))
    for name in LOGP_FIELDS:
        values = arrays.get(name)
        if values is None or not values.size or np.maximum.reduce(values, axis=None) <= least:
            continue
        with np.errstate(invalid="ignore"):
            positive = values[(values > bound) & np.isfinite(values) & mask.astype(bool)]
        if positive.size:
            return name, float(np.maximum.reduce(positive))
    return None
