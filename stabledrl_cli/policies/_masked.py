"""Masked tensor arithmetic shared by the policies and the replay's metrics: masks made by
comparing (`above`, `nonzero`, `both`), a value kept where a mask holds and exactly 0
elsewhere, sums and counts over a mask.

Each has a CPU fast path (products with the mask's bytes, numpy's bit counting), checked by a
finite sum, and a device path that never syncs with the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch


def as_bytes(flags: torch.Tensor) -> torch.Tensor:
    """A bool tensor viewed as uint8 0/1 (no copy): products with it are several times faster
    on the CPU than with the bool tensor itself."""
    return flags.view(torch.uint8)


def above(values: torch.Tensor, bound: float) -> torch.Tensor:
    """[...] bool values > bound, compared in values' dtype as torch compares a tensor with a
    number (NaN is above nothing). On the CPU numpy compares (six times faster than torch's
    comparisons to bool there); elsewhere torch."""
    return _compare(values, bound, np.greater, torch.gt)


def below(values: torch.Tensor, bound: float) -> torch.Tensor:
    """[...] bool values < bound (as `above`)."""
    return _compare(values, bound, np.less, torch.lt)


_HOST_COMPARED = (torch.float32, torch.float64)
"""The dtypes numpy compares for `above` and `below` (it has no bfloat16)."""


def _compare(
    values: torch.Tensor,
    bound: float,
    host: Callable[[np.ndarray, np.generic], np.ndarray],
    device: Callable[[torch.Tensor, float], torch.Tensor],
) -> torch.Tensor:
    if values.device.type == "cpu" and values.dtype in _HOST_COMPARED:
        array = values.numpy()
        return torch.from_numpy(host(array, array.dtype.type(bound)))
    return device(values, bound)


def nonzero(values: torch.Tensor) -> torch.Tensor:
    """[...] bool values != 0 (NaN is nonzero). On the CPU numpy compares (twenty times faster
    than torch's comparison to bool there); elsewhere, and for dtypes numpy lacks, torch."""
    if values.device.type == "cpu":
        try:
            array = values.numpy()
        except (TypeError, RuntimeError):  # bfloat16 and kin; a conjugate view
            return values != 0
        return torch.from_numpy(array != 0)
    return values != 0


def both(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """[...] bool first & second of two bool tensors, by numpy on the CPU (three times faster
    than torch's there)."""
    if first.device.type == "cpu":
        return torch.from_numpy(np.logical_and(first.numpy(), second.numpy()))
    return first & second


def finite_sum(values: torch.Tensor) -> bool:
    """Whether the sum of a CPU tensor is finite (then no entry is NaN or inf, and no product
    with it overflowed): one vectorized sum read on the host."""
    return math.isfinite(float(values.sum()))


def count(flags: torch.Tensor) -> torch.Tensor:
    """0-d int64: True entries of a bool tensor. On the CPU numpy counts them (five times
    faster than any torch reduction of a bool tensor there, and the count wrapped through a 0-d
    array: a third of `torch.tensor`'s cost on an int); elsewhere a sum, no sync."""
    if flags.device.type == "cpu":
        return torch.from_numpy(np.array(np.count_nonzero(flags.numpy()), dtype=np.int64))
    return flags.sum()


def counts(flags: Sequence[torch.Tensor]) -> torch.Tensor:
    """[n] int64: True entries of each bool tensor, `count` of each in one tensor."""
    if flags and flags[0].device.type == "cpu":
        tallies = [np.count_nonzero(f.numpy()) for f in flags]
        return torch.from_numpy(np.array(tallies, dtype=np.int64))
    return torch.stack([count(f) for f in flags])


def keep_times(keep: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """value where keep, else exactly 0: a zeroed term stays 0 even where value overflowed to
    inf (a discarded token with r = inf has the coefficient 0, not 0 * inf = NaN). Non-finite
    *inputs* still show: `Policy.weights` turns their coefficient into NaN.

    On the CPU, where `torch.where` is several times slower than a product, this is
    `value * keep` whenever that product is finite everywhere (then it equals the `where`,
    up to the sign of a zero): a finite sum proves it, else the `where` runs."""
    if value.device.type == "cpu":
        product = value * as_bytes(keep)
        if finite_sum(product):
            return product
    return torch.where(keep, value, torch.zeros((), dtype=value.dtype, device=value.device))


def masked_sum(keep: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """0-d sum of value over keep ([T] each), entries outside keep never entering (an inf
    there is not 0 * inf); a product and one sum on the CPU when that sum is finite."""
    if value.device.type == "cpu":
        total = (value * as_bytes(keep)).sum()
        if math.isfinite(float(total)):
            return total
    return torch.where(keep, value, torch.zeros((), dtype=value.dtype, device=value.device)).sum()


def count_nonfinite(coef: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """0-d int64: entries of mask whose coef is NaN or inf (a finite sum proves there are none,
    on the CPU, without a pass of isfinite)."""
    if coef.device.type == "cpu" and finite_sum(coef):
        return torch.zeros((), dtype=torch.int64)
    return (mask & ~torch.isfinite(coef)).sum()


def ratio_times(ratio: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """[T] r A, exactly 0 where A = 0 even if r overflowed to inf (the term is 0 there). A
    finite product is that already (r A = 0 where A = 0): the CPU skips the comparison then."""
    product = ratio * adv
    if product.device.type == "cpu" and finite_sum(product):
        return product
    return keep_times(adv != 0, product)
