"""Recorders for training frameworks: each records every optimizer step of a framework's own
trainer into a run directory (docs/run-format.md).

- `stabledrl_cli.integrations.trl`: `RecordingGRPOTrainer` and `RecordingRLOOTrainer`, TRL
  1.16.x (`pip install 'stabledrl[trl]'`);
- `stabledrl_cli.integrations.verl`: verl's engine hooks.

A framework is imported only when its integration module is used.
"""
