"""What a replay returns: `ReplayResult` (one a run) holding `PolicyResult`s (one a policy).

`to_dict()` is design.md's "Replay output" JSON contract (every key present, null where not
computable; NaN and inf become null when printed); `to_json()` prints it. Extensions beside the
contract's keys: per policy `summary.update_norm_approximate` and `summary.detail` (top
sequences of flagged steps, with `--detail`); per step `discarded_pos`, `discarded_neg`,
`discarded_mass_frac` and `objective`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stabledrl_cli._json import json_safe

# Per-step keys of the JSON contract, in its order, then the extensions.
STEP_KEYS = (
    "step",
    "tokens",
    "discarded",
    "discard_frac",
    "clipped",
    "geometry",
    "update_norm",
    "clip_scale",
    "cosine_to_own",
    "weight_max",
    "ess_frac",
    "net_push",
    "spike",
    "nonfinite",
    "drift",
    "collapsed",
    "discarded_pos",
    "discarded_neg",
    "discarded_mass_frac",
    "objective",
)


@dataclass
class PolicyResult:
    """One policy replayed over a run.

    `series`: per-step arrays [S] keyed by STEP_KEYS (numbers; `geometry` strings), aligned with
    `ReplayResult.step_numbers`. `summary`: the contract's summary keys.
    """

    name: str
    spec: str
    params: dict[str, Any]
    own: bool
    best: bool
    summary: dict[str, Any]
    series: dict[str, np.ndarray] = field(repr=False)
    detail: dict[int, list[dict[str, Any]]] = field(default_factory=dict, repr=False)
    """step -> top sequences of that flagged step (with `--detail`)."""

    @property
    def steps(self) -> list[dict[str, Any]]:
        """Per-step rows (dicts with STEP_KEYS) over the reported range."""
        return list(self.iter_steps())

    def iter_steps(self) -> Iterator[dict[str, Any]]:
        """The per-step rows one at a time, built from the columns `_ROW_BLOCK` steps at a
        time: the rows are output, so only a block of them is ever held as Python objects."""
        count = len(self.series["step"])
        for start in range(0, count, _ROW_BLOCK):
            block = [np.asarray(self.series[key][start : start + _ROW_BLOCK]).tolist()
                     for key in STEP_KEYS]  # fmt: skip
            for values in zip(*block, strict=True):
                yield dict(zip(STEP_KEYS, values, strict=True))

    def to_dict(self, *, steps: bool = True) -> dict[str, Any]:
        """The policy's entry of the JSON contract (`steps=False`: without its per-step rows)."""
        summary = dict(self.summary)
        if self.detail:
            summary["detail"] = {str(k): v for k, v in sorted(self.detail.items())}
        return {
            "name": self.name,
            "spec": self.spec,
            "params": dict(self.params),
            "own": self.own,
            "best": self.best,
            "summary": summary,
            "steps": self.steps if steps else [],
        }


@dataclass
class ReplayResult:
    """A replay of one run: every policy, and the run's observed behaviour beside them."""

    run: str
    steps: int
    """Steps replayed (the whole run; `--steps` restricts only the per-step rows)."""
    geometry: str
    geometry_coverage: float
    policies: list[PolicyResult]
    observed: dict[str, Any]
    run_policy_spec: str | None = None
    step_range: tuple[int | None, int | None] = (None, None)

    def policy(self, spec: str) -> PolicyResult:
        """The result of the policy with this canonical spec (KeyError lists the specs)."""
        for p in self.policies:
            if p.spec == spec:
                return p
        raise KeyError(
            f"no policy {spec!r} in this replay; it has {[p.spec for p in self.policies]}"
        )

    @property
    def own(self) -> PolicyResult | None:
        return next((p for p in self.policies if p.own), None)

    @property
    def best(self) -> PolicyResult | None:
        return next((p for p in self.policies if p.best), None)

    def to_dict(self, *, steps: bool = True) -> dict[str, Any]:
        """The JSON contract, NaN and inf already mapped to null (`steps=False`: every policy's
        `steps` left empty)."""
        return json_safe({
            "run": self.run,
            "steps": self.steps,
            "geometry": self.geometry,
            "geometry_coverage": self.geometry_coverage,
            "policies": [p.to_dict(steps=steps) for p in self.policies],
            "observed": {
                "first_reward_collapse": self.observed.get("first_reward_collapse"),
                "recorded_spike_steps": list(self.observed.get("recorded_spike_steps", [])),
                "noise_floor_logratio_std": self.observed.get("noise_floor_logratio_std"),
            },
        })  # fmt: skip

    def iter_json(self, indent: int | None = 2) -> Iterator[str]:
        """`to_json()` in pieces, the per-step rows serialized one at a time: printing a long
        run's JSON never holds all its rows as Python objects (`to_dict()` does)."""
        head = self.to_dict(steps=False)
        for i, policy in enumerate(head["policies"]):
            policy["steps"] = _ROWS_MARK.format(i)
        text = json.dumps(head, indent=indent, allow_nan=False)
        for i, policy in enumerate(self.policies):
            before, text = text.split(json.dumps(_ROWS_MARK.format(i)), 1)
            yield before
            yield from _json_list(policy.iter_steps(), indent, depth=3)
        yield text

    def to_json(self, indent: int | None = 2) -> str:
        """The JSON contract as text: json.dumps(self.to_dict(), indent=indent)."""
        return "".join(self.iter_json(indent))


# Rows are converted from the columns this many steps at a time.
_ROW_BLOCK = 1024
# Stands in for a policy's rows in the JSON head; a NUL cannot occur in any other string of it.
_ROWS_MARK = "\0rows-of-policy-{}\0"


def _json_list(rows: Iterator[dict[str, Any]], indent: int | None, depth: int) -> Iterator[str]:
    """A JSON list of `rows`, as json.dumps would print it at nesting `depth`, row by row."""
    if indent is None:
        inner = outer = ""
        separator = ", "
    else:
        inner, outer = "\n" + " " * (indent * (depth + 1)), "\n" + " " * (indent * depth)
        separator = ","
    first = True
    for row in rows:
        text = json.dumps(json_safe(row), indent=indent, allow_nan=False)
        yield ("[" if first else separator) + inner + text.replace("\n", inner)
        first = False
    yield "[]" if first else outer + "]"
