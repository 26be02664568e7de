"""A CUDA device index past the GPUs torch sees (`device="cuda:1"` on a one-GPU machine, a
config copied from a bigger one) is a usage error naming the device and the count, before
the replay: torch would fail later, deep in the replay ('invalid device ordinal', exit 70)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from stabledrl_cli._device import resolve_device
from stabledrl_cli.cli.app import app
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


@pytest.mark.parametrize(
    "command", [["replay"], ["check", "--max-spikes", "9"], ["watch", "--once"]]
)
def test_the_cli_takes_a_gpu_by_its_index(one_gpu, command):
    """`--device cuda:1` was refused by the option itself ("'cuda:1' is not one of 'auto',
    'cpu', 'cuda', 'mps'") on any machine, though the library takes it and docs/replay.md says the
    option does: now the option takes cuda:N and the command checks it against the GPUs torch
    sees (one here: cuda:1 is refused naming them); a name that is no device is refused by
    the option."""
    run = str(Path(__file__).parents[1] / "fixtures" / "grpo")
    past = CliRunner().invoke(app, [*command, run, "--device", "cuda:1"])
    assert past.exit_code == 2, past.output
    assert "torch sees 1 CUDA device (cuda:0)" in past.stderr
    bad = CliRunner().invoke(app, [*command, run, "--device", "gpu"])
    assert bad.exit_code == 2
    assert "'gpu' is not one of auto, cpu, cuda, cuda:N, mps" in bad.stderr


@pytest.mark.parametrize("device", ["cuda", "mps", "cuda:3"])
def test_tune_refuses_a_missing_device_in_one_line(device, monkeypatch):
    """`tune --device cuda` without a GPU printed its 'tuning 1 setting over RUN' header, then
    the refusal: two lines for one bad option. The refusal is now the only line, as replay's."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    run = str(Path(__file__).parents[1] / "fixtures" / "grpo")
    result = CliRunner().invoke(app, ["tune", run, "-p", "grpo", "--device", device])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        f"error: device {device!r} was asked for, but torch sees no "
        f"{'MPS' if device == 'mps' else 'CUDA'} device"
    ]
