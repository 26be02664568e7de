"""The one buffer of a replay's per-step rows of device metrics ([steps, policies, metrics]),
written in place a block of steps at a time."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from stabledrl_cli.replay import columns

if TYPE_CHECKING:
    import torch


class RowBuffer:
    """Per-step rows of device metrics (`columns.device_metrics()`, float64) of `policies`
    policies, each block of steps' rows written in place after the last: room for `expected`
    rows at the start, grown past that to at least twice its rows (a buffer that outgrows
    them is copied O(log S) times), so the rows are held once, plus the block being written."""

    def __init__(self, expected: int, policies: int) -> None:
        self._buffer = np.empty(
            (expected, policies, len(columns.device_metrics())), dtype=np.float64
        )
        self._filled = 0

    def __len__(self) -> int:
        return self._filled

    @property
    def rows(self) -> np.ndarray:
        """[S, P, M] the rows written so far: a view of the buffer."""
        return self._buffer[: self._filled]

    def append(self, block: np.ndarray | torch.Tensor) -> None:
        """Writes `block` ([steps, P, M]) after the rows written so far."""
        end = self._filled + len(block)
        if end > len(self._buffer):
            rows = max(end, 2 * len(self._buffer))
            bigger = np.empty((rows, *self._buffer.shape[1:]), dtype=self._buffer.dtype)
            bigger[: self._filled] = self.rows
            self._buffer = bigger
        target = self._buffer[self._filled : end]
        if isinstance(block, np.ndarray):
            target[...] = block
        else:  # a tensor: torch is loaded
            import torch

            torch.from_numpy(target).copy_(block)
        self._filled = end
