"""Getting data out of training: the `record -- CMD` bootstrap (`log_policy_batch`)."""

from __future__ import annotations

from stabledrl_cli.capture._log_policy_batch import log_policy_batch

__all__ = ["log_policy_batch"]
