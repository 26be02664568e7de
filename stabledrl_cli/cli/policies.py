"""`stabledrl policies`: the catalogue (name, family, defaults, formula, source, conventions).

With `-p SPEC` (repeatable) it shows just those specs with every parameter resolved, which makes
it the place to validate a spec from the shell: a bad spec exits 2 with the valid choices.
"""

from __future__ import annotations

from typing import TypedDict

from rich.console import Group, RenderableType
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from stabledrl_cli.cli._options import FormatOpt, PolicyOpt
from stabledrl_cli.cli._output import out, print_json
from stabledrl_cli.policies import (
    CONVENTIONS,
    REGISTRY,
    STANDARD_CATALOGUE,
    PolicyEntry,
    catalogue,
    resolve_spec,
)
from stabledrl_cli.policies._config import ParamValue
from stabledrl_cli.spec import SPEC_SYNTAX, format_value, wrap_spec
from stabledrl_cli.tables import narrowest_width
from stabledrl_cli.vocab import ADV_MODES, AGGS, ROLLOUT_IS, ROWS


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
    conventions: str


def _params_text(params: dict[str, ParamValue], required: list[str]) -> Text:
    """`key=value` pairs joined by spaces; a required key without a value says so."""
    parts = []
    for key, value in params.items():
        if key in required:
            parts.append(f"{key}=(required)")
        elif value is not None:
            parts.append(f"{key}={format_value(value)}")
    return Text(" ".join(parts))


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
        conventions=entry.conventions_of(params),
    )


def _catalogue_rows() -> list[PolicyRow]:
    return [_row(entry, entry.name, entry.defaults, list(entry.required)) for entry in catalogue()]


def _spec_rows(specs: list[str]) -> list[PolicyRow]:
    """A row for each policy the specs name, once: two specs of one policy (`dapo` and
    `dapo:eps_high=0.28`) are one row, as replay replays them once."""
    rows: dict[str, PolicyRow] = {}
    for spec in specs:
        entry, config = resolve_spec(spec)
        canonical = entry.spec_of(config)
        rows.setdefault(canonical, _row(entry, canonical, config.params(), []))
    return list(rows.values())


def _table(rows: list[PolicyRow], specs: bool) -> Table:
    """One row per policy; the parameters column is at least as wide as its longest
    `key=value`, so a pair is never split."""
    table = Table(title="policy specs" if specs else "policies", show_lines=False)
    table.add_column("spec" if specs else "name", no_wrap=True)
    table.add_column("family", no_wrap=True)
    table.add_column("parameters" if specs else "defaults", overflow="fold")
    table.add_column("formula", overflow="fold")
    table.add_column("source", overflow="fold")
    table.add_column("conventions", overflow="fold")
    for row in rows:
        table.add_row(
            Text(row["spec"] if specs else row["name"]),
            Text(row["family"]),
            _params_text(row["params"], row["required"]),
            Text(row["formula"]),
            Text(row["source"]),
            Text(row["conventions"]),
        )
    return table


def _fits(rows: list[PolicyRow], specs: bool) -> bool:
    """Whether the table fits the terminal with no word of any cell folded."""
    return narrowest_width(_table(rows, specs), out) <= out.width


def _blocks(rows: list[PolicyRow], specs: bool) -> Group:
    """The narrow layout: per policy its name and family, then one labelled line each for
    its parameters, formula, source and conventions (wrapped between words, never inside a pair)."""
    blocks: list[RenderableType] = [Text("policy specs" if specs else "policies", style="italic")]
    for row in rows:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(no_wrap=True, style="dim")
        grid.add_column(overflow="fold")
        grid.add_row(
            "parameters" if specs else "defaults", _params_text(row["params"], row["required"])
        )
        grid.add_row("formula", Text(row["formula"]))
        grid.add_row("source", Text(row["source"]))
        grid.add_row("conventions", Text(row["conventions"]))
        # a spec too long for a line broken after its name or a comma, never inside a value
        lines = wrap_spec(row["spec"] if specs else row["name"], out.width, whole=True)
        beside = len(lines[-1]) + 2 + len(row["family"]) <= out.width
        heading = Text.assemble(("\n".join(lines), "bold"), "  " if beside else "\n", row["family"])
        blocks.append(Group(heading, Padding(grid, (0, 0, 0, 2))))
    return Group(*blocks)


def command(policy: PolicyOpt = None, fmt: FormatOpt = "table") -> None:
    """List the policy catalogue: name, family, defaults, formula, source and conventions."""
    rows = _spec_rows(policy) if policy else _catalogue_rows()
    if fmt == "json":
        print_json(
            {"policies": rows, "standard_catalogue": STANDARD_CATALOGUE, "conventions": CONVENTIONS}
        )
        return
    out.print(
        _table(rows, bool(policy)) if _fits(rows, bool(policy)) else _blocks(rows, bool(policy))
    )
    if not policy:
        without_agg = " and ".join(sorted(n for n, e in REGISTRY.items() if "agg" not in e.keys))
        out.print(
            f"spec: {SPEC_SYNTAX}.  Every policy also takes beta (KL, needs logp_ref), "
            f"adv={'|'.join(ADV_MODES)}, rows={'|'.join(ROWS)} and "
            f"tis={'|'.join(ROLLOUT_IS)} with tis_min, tis_max (needs logp_rollout); all but "
            f"{without_agg} take agg={'|'.join(AGGS)} (constant needs max_len, recorded needs "
            "loss_scale)",
            highlight=False,
            soft_wrap=False,
        )
        out.print(f"conventions: {CONVENTIONS}", highlight=False, soft_wrap=False)
