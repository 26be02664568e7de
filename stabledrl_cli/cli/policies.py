"""`stabledrl policies`: the catalogue (name, family, defaults, formula, source).

With `-p SPEC` (repeatable) it shows just those specs with every parameter resolved, which makes
it the place to validate a spec from the shell: a bad spec exits 2 with the valid choices.
"""

from __future__ import annotations

from typing import TypedDict

from rich.table import Table

from stabledrl_cli.cli._options import FormatOpt, PolicyOpt
from stabledrl_cli.cli._output import out, print_json
from stabledrl_cli.policies import STANDARD_CATALOGUE, PolicyEntry, catalogue, resolve_spec
from stabledrl_cli.policies._config import ParamValue
from stabledrl_cli.spec import SPEC_SYNTAX, format_value
from stabledrl_cli.vocab import ADV_MODES, AGGS


class PolicyRow(TypedDict):
    """One row of `policies --format json` (a catalogue name, or a resolved spec)."""

    name: str
    spec: str
    family: str
    params: dict[str, ParamValue]
    required: list[str]
    keys: list[str]
    formula: str
    source: str


def _params_text(params: dict[str, ParamValue], required: list[str]) -> str:
    """`key=value` pairs joined by spaces; a required key without a value says so."""
    parts = []
    for key, value in params.items():
        if key in required:
            parts.append(f"{key}=(required)")
        elif value is not None:
            parts.append(f"{key}={format_value(value)}")
    return " ".join(parts)


def _row(
    entry: PolicyEntry, spec: str, params: dict[str, ParamValue], required: list[str]
) -> PolicyRow:
    return PolicyRow(
        name=entry.name,
        spec=spec,
        family=entry.family,
        params=params,
        required=required,
        keys=entry.keys,
        formula=entry.formula,
        source=entry.source,
    )


def _catalogue_rows() -> list[PolicyRow]:
    return [_row(entry, entry.name, entry.defaults, list(entry.required)) for entry in catalogue()]


def _spec_rows(specs: list[str]) -> list[PolicyRow]:
    rows = []
    for spec in specs:
        entry, config = resolve_spec(spec)
        rows.append(_row(entry, entry.spec_of(config), config.params(), []))
    return rows


def command(policy: PolicyOpt = None, fmt: FormatOpt = "table") -> None:
    """List the policy catalogue: name, family, defaults, formula and source."""
    rows = _spec_rows(policy) if policy else _catalogue_rows()
    if fmt == "json":
        print_json({"policies": rows, "standard_catalogue": STANDARD_CATALOGUE})
        return
    table = Table(title="policies" if not policy else "policy specs", show_lines=False)
    table.add_column("name" if not policy else "spec", no_wrap=True)
    table.add_column("family", no_wrap=True)
    table.add_column("defaults" if not policy else "parameters", overflow="fold")
    table.add_column("formula", overflow="fold")
    table.add_column("source", overflow="fold")
    for row in rows:
        table.add_row(
            row["name"] if not policy else row["spec"],
            row["family"],
            _params_text(row["params"], row["required"]),
            row["formula"],
            row["source"],
        )
    out.print(table)
    if not policy:
        out.print(
            f"spec: {SPEC_SYNTAX}.  Every policy also takes beta (KL, needs logp_ref) and "
            f"adv={'|'.join(ADV_MODES)}; agg={'|'.join(AGGS)} "
            "(constant needs max_len, recorded needs loss_scale)",
            highlight=False,
        )
