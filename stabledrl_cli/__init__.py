"""stabledrl: a flight recorder and what-if simulator for RL training of (diffusion) LMs.

The public API: `Recorder`, `open_run`, `replay`, `get_policy`, `Policy`, `PolicyBatch`,
`Weights`, `log_policy_batch` and `__version__`. Each name is imported on first use (PEP 562),
so `import stabledrl_cli`, `stabledrl --help` and `stabledrl policies` never import torch.

Errors are the classes of `stabledrl_cli.errors`, each a `StabledrlError`, with the command
line's exit code: `UsageError` (2: a bad argument, setting or policy spec, such as
`get_policy("nope")`, `replay(run, device=1)` or a `Recorder` over a run without
`overwrite=True`), `InputError` (3: a missing, unreadable or corrupt run, or one with
nothing to replay, from `open_run` and `replay`), `WriteError` (4: a step or an output that
could not be written) and `WorkerDiedError` (71: a worker of `replay`'s processes or Ray
engine died). `log_policy_batch` never raises: it returns False when the step was not
recorded. `replay` returns a `ReplayResult`: `.to_json()` is the JSON document of `stabledrl
replay --format json`, `.to_dict()` the same as Python objects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stabledrl_cli._lazy import lazy_getattr
from stabledrl_cli._version import __version__

if TYPE_CHECKING:
    from stabledrl_cli.capture import log_policy_batch
    from stabledrl_cli.dump import Recorder, open_run
    from stabledrl_cli.policies import Policy, PolicyBatch, Weights, get_policy
    from stabledrl_cli.replay.engine import replay

# Public name -> the module that defines it.
_HOMES: dict[str, str] = {
    "Policy": "stabledrl_cli.policies",
    "PolicyBatch": "stabledrl_cli.policies",
    "Recorder": "stabledrl_cli.dump",
    "Weights": "stabledrl_cli.policies",
    "get_policy": "stabledrl_cli.policies",
    "log_policy_batch": "stabledrl_cli.capture",
    "open_run": "stabledrl_cli.dump",
    "replay": "stabledrl_cli.replay.engine",
}

__all__ = [
    "Policy",
    "PolicyBatch",
    "Recorder",
    "Weights",
    "__version__",
    "get_policy",
    "log_policy_batch",
    "open_run",
    "replay",
]


__getattr__ = lazy_getattr(__name__, _HOMES, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
