"""Human and archival outputs of a replay: the rich tables (stdout) and the HDF5 report.

The HDF5 report (`--out report.h5`) holds, per policy, one dataset per per-step key (the JSON's
`steps` vocabulary), with the run and the policy specs as attributes and the kind tag
`stabledrl-replay-report`, which `open_run` refuses as not a run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from stabledrl_cli.errors import InputError, UsageError
from stabledrl_cli.replay.result import STEP_KEYS, ReplayResult

REPORT_KIND = "stabledrl-replay-report"
REPORT_VERSION = "1.0"
_LIST_LIMIT = 8  # step lists longer than this are cut in the table (JSON has them all)
FOOTER = (
    "A replay is a one-step counterfactual: each step's recorded batch and weights, scored by "
    "another policy. It does not simulate the trajectory that policy would have trained."
)


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}g}"


def _steps_text(steps: list[int]) -> str:
    if not steps:
        return "-"
    shown = ",".join(str(s) for s in steps[:_LIST_LIMIT])
    more = len(steps) - _LIST_LIMIT
    return f"{shown} (+{more})" if more > 0 else shown


def _lead_text(lead: int | None) -> str:
    if lead is None:
        return "-"
    return f"{lead} early" if lead > 0 else ("0" if lead == 0 else f"{-lead} late")


def print_summary(result: ReplayResult, console: Console) -> None:
    """One row per policy, the run's own policy and the best one marked."""
    captions = {
        "coef": "* update norm = coefficient norm ||coef||, a proxy: the run recorded no "
        "gradient geometry",
        "mixed": f"* on the {1 - result.geometry_coverage:.0%} of steps without gradient "
        "geometry, update norm = coefficient norm ||coef||, a proxy in other units (spikes "
        "compare each step with steps of its own kind)",
    }
    caption = captions.get(result.geometry)
    star = "*" if caption else ""
    table = Table(
        title=f"Replay of {result.run}: {result.steps} steps, geometry {result.geometry} "
        f"(coverage {result.geometry_coverage:.0%})",
        title_justify="left",
        caption=caption,
        caption_justify="left",
    )
    for column in (
        "policy",
        "discard",
        "+A/-A",
        "mass",
        "clipped",
        f"norm med{star}",
        f"norm max{star}",
        "cos own",
        "spikes",
        "drift",
        "collapsed",
        "lead",
    ):
        table.add_column(column, overflow="fold")
    for p in result.policies:
        s = p.summary
        marks = [m for m, on in (("own", p.own), ("best", p.best)) if on]
        if s.get("update_norm_approximate"):
            marks.append("approx. norm")
        name = p.spec + (f" ({', '.join(marks)})" if marks else "")
        table.add_row(
            name,
            f"{s['discard_frac']:.1%}",
            f"{s['discarded_pos']}/{s['discarded_neg']}",
            "n/a" if s["discarded_mass_frac"] is None else f"{s['discarded_mass_frac']:.1%}",
            str(s["clipped"]),
            _num(s["update_norm_median"]),
            _num(s["update_norm_max"]),
            _num(s["cosine_to_own_median"]),
            _steps_text(s["spike_steps"]),
            str(len(s["drift_steps"])),
            _steps_text(s["collapsed_steps"]),
            _lead_text(s["lead_steps"]),
        )
    console.print(table)
    print_observed(result, console)
    notes = []
    own = result.own
    if own is None:
        notes.append(
            f"the run's own policy ({result.run_policy_spec or 'not recorded'}) is not among "
            "the replayed policies"
        )
    else:
        s = own.summary
        notes.append(
            f"own policy {own.spec}: loss parity {_num(s['loss_parity'])} (median relative "
            f"error of -J vs the recorded loss), fidelity {_num(s['fidelity'])}"
            + (" (needs gradient geometry)" if s["fidelity"] is None else "")
        )
    notes.append(FOOTER)
    for note in notes:
        console.print(note, highlight=False)


def print_observed(result: ReplayResult, console: Console) -> None:
    obs = result.observed
    collapse = obs.get("first_reward_collapse")
    early = [
        f"{p.spec} ({p.summary['lead_steps']} steps early)"
        for p in result.policies
        if p.summary["lead_steps"] is not None and p.summary["lead_steps"] > 0
    ]
    floor = obs.get("noise_floor_logratio_std")
    lines = [
        "observed (recorded run): first reward collapse "
        + ("none" if collapse is None else f"at step {collapse}")
        + f"; recorded grad-norm spikes: {_steps_text(obs.get('recorded_spike_steps', []))}"
        + f"; noise floor std log r: {_num(floor)}",
    ]
    if collapse is not None:
        lines.append(
            "flag steps before the observed collapse: " + (", ".join(early) if early else "none")
        )
    for line in lines:
        console.print(line, highlight=False)


def print_detail(result: ReplayResult, console: Console) -> None:
    """Per-step rows of the reported range, one table a policy, then the flagged steps' top
    sequences."""
    start, stop = result.step_range
    span = f"{'' if start is None else start}:{'' if stop is None else stop}"
    for p in result.policies:
        marks = [m for m, on in (("own", p.own), ("best", p.best)) if on]
        table = Table(
            title=f"{p.spec}{' [' + ', '.join(marks) + ']' if marks else ''}: steps {span}",
            title_justify="left",
        )
        for column in (
            "step", "tokens", "discard", "clipped", "update norm", "clip scale", "cos own",
            "w max", "ess", "net push", "flags",
        ):  # fmt: skip
            table.add_column(column)
        for row in p.steps:
            flags = [k for k in ("nonfinite", "spike", "drift") if row[k]]
            table.add_row(
                str(row["step"]),
                str(row["tokens"]),
                f"{row['discard_frac']:.1%}",
                str(row["clipped"]),
                _num(row["update_norm"], 4),
                _num(row["clip_scale"]),
                _num(row["cosine_to_own"]),
                _num(row["weight_max"]),
                _num(row["ess_frac"]),
                _num(row["net_push"]),
                ",".join(flags) or "-",
            )
        console.print(table)
        for number, seqs in sorted(p.detail.items()):
            top = Table(
                title=f"{p.spec} step {number}: sequences contributing most", title_justify="left"
            )
            for column in ("seq id", "group", "reward", "advantage", "log ratio", "contribution"):
                top.add_column(column)
            for seq in seqs:
                top.add_row(
                    str(seq["seq_id"]),
                    "-" if seq["group"] is None else str(seq["group"]),
                    _num(seq["reward"]),
                    _num(seq["advantage"]),
                    _num(seq["log_ratio"]),
                    _num(seq["contribution"]),
                )
            console.print(top)


def _dataset_values(key: str, values: np.ndarray) -> np.ndarray:
    if key == "geometry":
        return np.array([str(v) for v in values], dtype=object)
    if values.dtype == bool:
        return values.astype(np.uint8)
    return values


def write_hdf5(result: ReplayResult, path: str | os.PathLike[str]) -> Path:
    """The per-step per-policy arrays of `result` to one HDF5 file (atomically replaced)."""
    import h5py

    target = Path(path)
    temp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(temp, "w") as handle:
            handle.attrs["kind"] = REPORT_KIND
            handle.attrs["report_version"] = REPORT_VERSION
            handle.attrs["run"] = result.run
            handle.attrs["run_policy_spec"] = result.run_policy_spec or ""
            handle.attrs["steps"] = result.steps
            handle.attrs["geometry"] = result.geometry
            handle.attrs["geometry_coverage"] = result.geometry_coverage
            head = result.to_dict(steps=False)  # the contract's JSON-safe values, no step rows
            handle.attrs["observed"] = json.dumps(head["observed"], allow_nan=False)
            handle.attrs["policy_specs"] = json.dumps([p.spec for p in result.policies])
            policies = handle.create_group("policies")
            for index, p in enumerate(result.policies):
                group = policies.create_group(f"{index:02d}")
                group.attrs["name"] = p.name
                group.attrs["spec"] = p.spec
                group.attrs["params"] = json.dumps(p.params)
                group.attrs["own"] = p.own
                group.attrs["best"] = p.best
                summary = head["policies"][index]["summary"]  # NaN and inf (--detail) as null
                group.attrs["summary"] = json.dumps(summary, allow_nan=False)
                for key in STEP_KEYS:
                    values = _dataset_values(key, np.asarray(p.series[key]))
                    if values.dtype == object:
                        group.create_dataset(key, data=values, dtype=h5py.string_dtype())
                    else:
                        group.create_dataset(key, data=values)
        os.replace(temp, target)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise UsageError(f"--out {target}: cannot write it ({exc})") from None
    return target


def read_hdf5(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A report back as {"attrs": {...}, "policies": [{"attrs": {...}, key: array}]}."""
    import h5py

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
