"""A CUDA device index past the GPUs torch sees (`device="cuda:1"` on a one-GPU machine, a
config copied from a bigger one) is a usage error naming the device and the count, before
the replay: torch would fail later, deep in the replay ('invalid device ordinal', exit 70)."""

from __future__ import annotations

import pytest
import torch

from stabledrl_cli._device import resolve_device
from stabledrl_cli.errors import UsageError


@pytest.fixture
def one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch sees one CUDA device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.mark.parametrize("device", ["cuda:1", "cuda:7", torch.device("cuda", 2)])
def test_a_cuda_index_past_the_gpus_is_refused(one_gpu, device):
    with pytest.raises(UsageError, match=r"torch sees 1 CUDA device \(cuda:0\)"):
        resolve_device(device)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "auto"])
def test_the_gpus_torch_sees_are_taken(one_gpu, device):
    assert resolve_device(device).type == "cuda"
