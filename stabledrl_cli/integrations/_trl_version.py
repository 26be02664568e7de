"""Which TRL releases the integration supports, and the check that refuses the others."""

from __future__ import annotations

import importlib.metadata

from stabledrl_cli.errors import MissingExtraError, UsageError, install_command

SUPPORTED_TRL = "1.16.x"
"""The TRL releases whose private GRPOTrainer and RLOOTrainer methods the integration
overrides."""


def check_trl_version() -> str:
    """The installed TRL version; MissingExtraError when TRL is absent, UsageError when it is
    outside SUPPORTED_TRL."""
    try:
        version = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        raise MissingExtraError(
            f"the TRL integration needs trl: {install_command('trl')}"
        ) from None
    if version.split(".")[:2] != ["1", "16"]:
        raise UsageError(f"the TRL integration supports trl {SUPPORTED_TRL}; found trl {version}")
    return version
