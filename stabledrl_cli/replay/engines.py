"""Where a replay's streaming pass runs (`Engine`): this process (`LocalEngine`), or an engine
chosen by name (`named_engine`: "local", "processes", "ray"); and torch's one CPU thread
(`single_torch_thread`) a pass computes with, so that its figures do not depend on the
machine's cores.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Protocol

import torch

from stabledrl_cli._device import resolve_device
from stabledrl_cli._shared_setting import SharedSetting
from stabledrl_cli.dump import Run
from stabledrl_cli.errors import UsageError
from stabledrl_cli.policies import Policy
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.stream import StreamedRun, stream_run


def _one_torch_thread() -> Callable[[], None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    return partial(torch.set_num_threads, before)


single_torch_thread = SharedSetting(_one_torch_thread).held
"""torch's intra-op CPU threads set to 1 for the block, then restored: a replay's figures do
not depend on the machine's cores (reductions split across threads sum in another order) and a
shared machine is not oversubscribed. A replay's own `threads` compute steps side by side
instead (`stream.computing_threads`)."""


class Engine(Protocol):
    """Where a replay's streaming pass runs: this process (`LocalEngine`) or a cluster
    (`ray_engine.RayEngine`). Every run-level figure is computed from what it returns."""

    def stream(
        self,
        run: Run,
        policies: list[Policy],
        own_index: int | None,
        config: ReplayConfig,
        progress: Callable[[int], None] | None,
    ) -> StreamedRun:
        """Every policy over every readable step of `run`: `stream.stream_run`'s result."""
        ...


class LocalEngine:
    """The streaming pass in this process, on `config.device`."""

    def stream(
        self,
        run: Run,
        policies: list[Policy],
        own_index: int | None,
        config: ReplayConfig,
        progress: Callable[[int], None] | None,
    ) -> StreamedRun:
        """`stream.stream_run` over the whole run."""
        device = resolve_device(config.device)
        return stream_run(
            run,
            policies,
            own_index,
            device,
            chunk_size=config.chunk_size,
            memory_budget=config.memory_budget,
            progress=progress,
            lean=config.lean,
            threads=config.threads,
        )


def named_engine(name: str) -> Engine:
    """The engine `--engine NAME` runs on with its defaults: "local", "processes" (a worker
    process a CPU) or "ray" (a local Ray cluster, or the one `RAY_ADDRESS` names); UsageError
    for another name."""
    if name == "local":
        return LocalEngine()
    if name == "processes":
        from stabledrl_cli.replay.process_engine import ProcessEngine

        return ProcessEngine()
    if name == "ray":
        from stabledrl_cli.replay.ray_engine import RayEngine  # imports ray only when run

        return RayEngine()
    raise no_engine(name)


def no_engine(value: object) -> UsageError:
    """The error of an `engine` that is neither a known name nor an engine object."""
    return UsageError(
        f"engine must be 'local', 'processes', 'ray' or an engine object, got {value!r}"
    )
