"""Starts a local Ray with stabledrl's verl hook as the per-worker setup hook (as verl's
`ray_kwargs.ray_init.runtime_env` passes it) and prints, as JSON, what a Ray worker sees.

    python ray_setup_hook.py RUN_DIR
"""

from __future__ import annotations

import json
import os
import sys

import ray


@ray.remote
def probe() -> dict[str, object]:
    from verl.workers.engine.base import BaseEngine

    from stabledrl_cli.integrations import verl as stabledrl_verl

    return {
        "installed": stabledrl_verl.installed(),
        "hooked": hasattr(BaseEngine.train_batch, "__wrapped__"),
        "pid": os.getpid(),
    }


if __name__ == "__main__":
    ray.init(
        num_cpus=1,
        include_dashboard=False,
        runtime_env={
            "worker_process_setup_hook": "stabledrl_cli.integrations.verl.install",
            "env_vars": {"STABLEDRL_RUN_DIR": sys.argv[1]},
        },
    )
    try:
        print(json.dumps({**ray.get(probe.remote()), "driver_pid": os.getpid()}))
    finally:
        ray.shutdown()
