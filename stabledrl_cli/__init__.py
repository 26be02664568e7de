"""stabledrl: a flight recorder and what-if simulator for RL training of (diffusion) LMs.

The public API (CONTRACT in design.md): `Recorder`, `open_run`, `replay`, `get_policy`,
`PolicyBatch`, `log_policy_batch`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from stabledrl_cli.capture import log_policy_batch
from stabledrl_cli.dump import Recorder, open_run
from stabledrl_cli.policies import Policy, PolicyBatch, Weights, get_policy
from stabledrl_cli.replay.engine import replay

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
