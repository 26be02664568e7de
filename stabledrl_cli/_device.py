"""Device selection shared by replay, the example trainer and capture."""

from __future__ import annotations

import torch

from stabledrl_cli.errors import UsageError
from stabledrl_cli.vocab import DEVICES


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; `cuda` without a GPU is a usage error.

    device: one of `vocab.DEVICES`, a torch device string such as "cuda:1", or a torch.device,
    checked as its name is (a meta device, cuda without a GPU, or a GPU index past those torch
    sees, is a usage error).
    """
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} was asked for, but torch sees no CUDA device")
    if device.startswith("mps") and not _mps_available():
        raise UsageError(f"device {device!r} was asked for, but torch sees no MPS device")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise UsageError(f"unknown device {device!r}; valid: {', '.join(DEVICES)}") from exc
    if resolved.type not in DEVICES:  # meta, xpu, ...: nothing the tool computes on
        raise UsageError(f"unknown device {device!r}; valid: {', '.join(DEVICES)}")
    if resolved.type == "cuda" and resolved.index is not None:
        count = torch.cuda.device_count()  # else torch fails deep in the replay
        if resolved.index >= count:
            seen = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            raise UsageError(
                f"device {device!r} was asked for, but torch sees {count} CUDA "
                f"device{'s' if count != 1 else ''} ({seen})"
            )
    return resolved


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
