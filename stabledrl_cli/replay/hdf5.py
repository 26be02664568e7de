"""The archival output of a replay: the HDF5 report (`replay --out report.h5`).

Per policy, one dataset per reported per-step column (`columns.COLUMNS`: the JSON's `steps`
vocabulary; bool as uint8, str as UTF-8 strings), with the run, the policy specs, the
contract's `observed` and `collapse_warning` entries and each policy's summary as attributes,
and the kind tag
`stabledrl-replay-report`, which `open_run` refuses as not a run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stabledrl_cli._atomic import output_path
from stabledrl_cli._json import json_safe
from stabledrl_cli.errors import InputError
from stabledrl_cli.replay import columns
from stabledrl_cli.replay.result import ReplayResult

REPORT_KIND = "stabledrl-replay-report"
REPORT_VERSION = "1.0"


def _json(value: object) -> str:
    return json.dumps(json_safe(value), allow_nan=False)


def write_hdf5(result: ReplayResult, path: str | os.PathLike[str]) -> Path:
    """The per-step per-policy columns of `result` to one HDF5 file, written atomically or in
    place (`_atomic.output_path`; WriteError when it cannot be written)."""
    target = Path(path)
    with output_path(target) as temp, h5py.File(temp, "w") as handle:
        handle.attrs["kind"] = REPORT_KIND
        handle.attrs["report_version"] = REPORT_VERSION
        handle.attrs["run"] = result.run
        handle.attrs["run_policy_spec"] = result.run_policy_spec or ""
        handle.attrs["steps"] = result.steps
        handle.attrs["scalar_steps"] = result.scalar_steps
        handle.attrs["skipped_steps"] = result.skipped_steps
        handle.attrs["missing_steps"] = result.missing_steps
        handle.attrs["geometry"] = result.geometry
        handle.attrs["geometry_coverage"] = result.geometry_coverage
        handle.attrs["unjoined_geometry"] = result.unjoined.kind or ""
        handle.attrs["observed"] = _json(result.observed.contract_dict())
        handle.attrs["collapse_warning"] = _json(result.observed.collapse_warning.to_dict())
        handle.attrs["guards"] = _json([g.to_dict() for g in result.observed.guards])
        streak = result.observed.unscored_streak
        handle.attrs["unscored_streak"] = _json(streak.to_dict() if streak else None)
        handle.attrs["threads"] = result.threads
        handle.attrs["policy_specs"] = json.dumps([p.spec for p in result.policies])
        policies = handle.create_group("policies")
        for index, p in enumerate(result.policies):
            group = policies.create_group(f"{index:02d}")
            group.attrs["name"] = p.name
            group.attrs["spec"] = p.spec
            group.attrs["params"] = _json(p.params)
            group.attrs["own"] = p.own
            group.attrs["best"] = p.best
            group.attrs["summary"] = _json(p.summary_dict())  # NaN and inf as null
            for column in columns.reported_columns():
                values = np.asarray(p.series[column.name])
                if column.kind == "str":
                    data = np.array([str(v) for v in values], dtype=object)
                    group.create_dataset(column.name, data=data, dtype=h5py.string_dtype())
                elif column.kind == "bool":
                    group.create_dataset(column.name, data=values.astype(np.uint8))
                else:
                    group.create_dataset(column.name, data=values)
    return target


def read_hdf5(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A report back as {"attrs": {...}, "policies": [{"attrs": {...}, column: array}]}."""
    with h5py.File(path, "r") as handle:
        if handle.attrs.get("kind") != REPORT_KIND:
            raise InputError(f"{path} is not a stabledrl replay report")
        data: dict[str, Any] = {"attrs": dict(handle.attrs), "policies": []}
        for name in sorted(handle["policies"]):
            group = handle["policies"][name]
            entry: dict[str, Any] = {"attrs": dict(group.attrs)}
            for key in group:
                entry[key] = group[key][()]
            data["policies"].append(entry)
    return data
