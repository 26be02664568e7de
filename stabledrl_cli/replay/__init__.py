"""Replay: stream a recorded run through policies; collapse detectors; observed behaviour.

`config` (settings and their defaults), `columns` (every per-step column, declared once),
`metrics` (device computation of a step), `framework` (TRL's and verl's own clip metrics),
`stream` (the streaming pass), `summary`, `engine` (`replay`, `replay_run`), `result` (the
typed result and its JSON); `observed` and `inspection` (the recorded run itself, with the
collapse warning of `detectors`); `report` (tables), `hdf5`, `plot`; `baseline`, `figures`,
`gate`, `junit` (CI checks).
"""
