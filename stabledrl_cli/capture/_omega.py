"""The seeded Gaussian projection Omega [P, k] of the gradient sketch, generated piecewise.

Omega is never drawn from the global RNG and never has to exist as one P x k matrix. It is
stored transposed, one factor per covered parameter: `Omega_i^T: [k, n_i]` for the i-th covered
parameter (in the order `covered_parameters` returns: module order, `named_parameters()`), so
that Omega = concat_i(Omega_i^T).T. Its rows come in blocks of `OMEGA_BLOCK_ROWS` sketch
columns; block b of parameter i is `randn(OMEGA_BLOCK_ROWS, n_i)` from its own
`torch.Generator(device).manual_seed(omega_seed(seed, i, b))`. Hence:
- the same seed gives the same Omega on every rank (same device type), so sketches add up
  across ranks;
- a sketch of width k is the first k columns of a wider one with the same seed;
- a JVP over a chunk of columns needs only those rows, not all of Omega.
CPU and CUDA generators give different streams: the manifest records the device type.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

# Sketch columns per generator block: few generator calls per parameter, and a JVP chunk of
# columns regenerates at most one block it does not use.
OMEGA_BLOCK_ROWS = 16
# Keep the whole of Omega in memory across steps when it is at most this large (it is the same
# matrix every step; regenerating ~P*k normals each step would dominate a small model's cost).
OMEGA_CACHE_BYTES = 256 << 20
# Omega rows the exact sketch generates at a time when Omega is not kept whole: a parameter's
# whole factor [k, n_i] is k / U times its per-unit gradients [U, n_i], and would set the peak.
OMEGA_CHUNK_BYTES = 64 << 20

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def omega_seed(seed: int, param_index: int, block: int) -> int:
    """The generator seed of block `block` of parameter `param_index`: splitmix64 chained."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ param_index) ^ block)


def omega_rows(
    seed: int, param_index: int, numel: int, start: int, stop: int, device: torch.device
) -> torch.Tensor:
    """Rows start..stop of Omega_i^T, i.e. sketch columns start..stop of one parameter.

    Returns `[stop - start, numel]` float32 on `device`. Never touches the global RNG.
    """
    gen = torch.Generator(device=device)
    parts = []
    first, last = start // OMEGA_BLOCK_ROWS, (stop - 1) // OMEGA_BLOCK_ROWS
    for block in range(first, last + 1):
        gen.manual_seed(omega_seed(seed, param_index, block))
        rows = torch.randn(
            OMEGA_BLOCK_ROWS, numel, generator=gen, device=device, dtype=torch.float32
        )
        lo = max(start - block * OMEGA_BLOCK_ROWS, 0)
        hi = min(stop - block * OMEGA_BLOCK_ROWS, OMEGA_BLOCK_ROWS)
        parts.append(rows[lo:hi])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class OmegaFactors:
    """Omega^T of one (seed, k, covered sizes, device), one factor `[k, n_i]` per parameter.

    Factors are generated on first use and kept when the whole of Omega fits in
    `OMEGA_CACHE_BYTES`; otherwise every call regenerates the rows it needs.
    """

    def __init__(self, seed: int, numels: Sequence[int], k: int, device: torch.device) -> None:
        self.seed, self.numels, self.k, self.device = seed, tuple(numels), k, device
        self.kept = sum(self.numels) * k * 4 <= OMEGA_CACHE_BYTES
        self._factors: dict[int, torch.Tensor] = {}

    def rows(self, param_index: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows start..stop (default all k) of Omega_i^T: `[stop - start, n_i]` float32."""
        stop = self.k if stop is None else stop
        if self.kept:
            factor = self._factors.get(param_index)
            if factor is None:
                factor = omega_rows(
                    self.seed, param_index, self.numels[param_index], 0, self.k, self.device
                )
                self._factors[param_index] = factor
            return factor[start:stop]
        return omega_rows(
            self.seed, param_index, self.numels[param_index], start, stop, self.device
        )


def omega_chunk_rows(numel: int) -> int:
    """Rows of Omega_i^T (sketch columns) to generate at a time for a parameter of `numel`
    entries: whole blocks within `OMEGA_CHUNK_BYTES`, at least one block."""
    blocks = OMEGA_CHUNK_BYTES // (4 * numel * OMEGA_BLOCK_ROWS)
    return max(1, blocks) * OMEGA_BLOCK_ROWS


@functools.lru_cache(maxsize=2)
def omega_factors(seed: int, numels: tuple[int, ...], k: int, device: torch.device) -> OmegaFactors:
    """The (memoized) Omega of a sketch: the same object for the same seed, k, sizes, device."""
    return OmegaFactors(seed, numels, k, device)
