"""`stabledrl policies`: the catalogue (name, family, defaults, formula, source).

With `-p SPEC` (repeatable) it shows just those specs with every parameter resolved, which makes
it the place to validate a spec from the shell: a bad spec exits 2 with the valid choices.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from stabledrl_cli.cli._options import FormatOpt, PolicyOpt
from stabledrl_cli.cli._output import OutputFormat, out, print_json
from stabledrl_cli.policies import STANDARD_CATALOGUE, catalogue, get_policy
from stabledrl_cli.policies._base import format_value


def _params_text(params: dict[str, Any], required: list[str]) -> str:
    parts = [
        f"{key}={'(required)' if key in required else format_value(value)}"
        for key, value in params.items()
        if value is not None or key in required
    ]
    return " ".join(parts)


def _catalogue_rows() -> list[dict[str, Any]]:
    rows = []
    for entry in catalogue():
        required = list(entry.cls.required_keys)
        rows.append(
            {
                "name": entry.name,
                "spec": entry.name,
                "family": entry.family,
                "params": entry.default_params(),
                "required": required,
                "keys": entry.keys,
                "formula": entry.formula,
                "source": entry.source,
            }
        )
    return rows


def _spec_rows(specs: list[str]) -> list[dict[str, Any]]:
    rows = []
    for spec in specs:
        policy = get_policy(spec)
        rows.append(
            {
                "name": policy.name,
                "spec": policy.spec,
                "family": policy.family,
                "params": policy.params,
                "required": [],
                "keys": list(policy.params),
                "formula": policy.formula,
                "source": policy.source,
            }
        )
    return rows


def command(policy: PolicyOpt = None, fmt: FormatOpt = OutputFormat.table) -> None:
    """List the policy catalogue: name, family, defaults, formula and source."""
    rows = _spec_rows(policy) if policy else _catalogue_rows()
    if fmt == OutputFormat.json:
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
            "spec: NAME or NAME:key=value,...  every policy also takes beta (KL, needs logp_ref) "
            "and adv=recorded|center|zscore|rloo; agg=token-mean|seq-mean-token-mean|"
            "seq-mean-token-sum|constant (max_len)|recorded (loss_scale)",
            highlight=False,
        )
