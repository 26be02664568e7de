"""`stabledrl policies`: the table, `--format json`, `-p` specs, and exit 2 on a bad spec."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from _cli import run_cli_together
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.policies import REGISTRY, STANDARD_CATALOGUE

runner = CliRunner()


def test_table_lists_every_policy_with_formula_and_source(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # wide enough that no formula wraps
    result = runner.invoke(app, ["policies"])
    assert result.exit_code == 0, result.output
    for name in REGISTRY:
        assert name in result.stdout
    assert "min(r A, clip(r, 1-eps_low, 1+eps_high) A)" in result.stdout
    assert "delta=(required)" in result.stdout
    assert "eps_high=0.28" in result.stdout
    assert "arXiv:2603.06743" in result.stdout
    assert "seq-mean-token-mean as TRL and verl" in result.stdout  # sapo's conventions
    assert "a group of one has mean 0 and std 1" in result.stdout


def test_catalogue_text_is_shown_as_written_never_as_markup(monkeypatch):
    """A bracket in a formula or convention is text: rich markup would have eaten
    `[log 1e-8, 20]` (it did, in vespo's conventions)."""
    entry = REGISTRY["vespo"]
    odd = dataclasses.replace(entry, formula="[bold]f[/bold]", conventions="w in [log 1e-8, 20]")
    monkeypatch.setitem(REGISTRY, "vespo", odd)
    for width in ("400", "80"):
        monkeypatch.setenv("COLUMNS", width)
        result = runner.invoke(app, ["policies"])
        assert result.exit_code == 0, result.output
        assert "[bold]f[/bold]" in result.stdout and "[log 1e-8, 20]" in result.stdout, width


def test_narrow_terminal_shows_conventions_per_policy(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    result = runner.invoke(app, ["policies"])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("conventions") >= len(REGISTRY)


def test_json_is_data_on_stdout():
    result = runner.invoke(app, ["policies", "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = {row["name"]: row for row in data["policies"]}
    assert list(rows) == list(REGISTRY)
    assert rows["dapo"]["params"]["eps_high"] == 0.28
    assert rows["grpo"]["params"]["agg"] == "seq-mean-token-mean"
    assert rows["two-sided"]["required"] == ["delta"]
    assert rows["two-sided"]["params"]["delta"] is None
    assert rows["stabledrl"]["family"] == "self-normalized"
    assert all(row["formula"] and row["source"] for row in data["policies"])
    assert all(row["conventions"] for row in data["policies"])
    assert "verl" in data["conventions"]
    assert data["standard_catalogue"] == STANDARD_CATALOGUE


def test_policy_option_resolves_specs():
    result = runner.invoke(
        app, ["policies", "-p", "ppo:eps_low=0.1", "-p", "cispo:eps_high=0.28", "-f", "json"]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["policies"]
    assert [row["spec"] for row in rows] == [
        "ppo:eps_high=0.1,eps_low=0.1",
        "cispo:eps_high=0.28,eps_low=0.2",
    ]
    assert rows[0]["params"]["eps_high"] == 0.1
    table = runner.invoke(app, ["policies", "-p", "stabledrl:c=3"])
    assert table.exit_code == 0 and "stabledrl:c=3" in table.stdout


def test_a_specs_conventions_are_of_its_own_values():
    """`policies -p stabledrl:norm=micro` said 'groups averaged (norm=group)', the default's
    convention: each value of a key a convention rests on says its own, and no other's."""
    for entry in REGISTRY.values():
        for key, values in entry.clauses.items():
            for value, clause in values.items():
                spec = f"{entry.name}:{key}={value}"
                if entry.name == "stabledrl" and key == "level" and value == "token":
                    spec += ",rows=scored"
                args = ["policies", "-p", spec, "-f", "json"]
                result = runner.invoke(app, args)
                assert result.exit_code == 0, result.output
                [row] = json.loads(result.stdout)["policies"]
                assert clause in row["conventions"], spec
                others = [c for v, c in values.items() if v != value]
                assert not any(c in row["conventions"] for c in others), spec
    table = runner.invoke(app, ["policies", "-p", "stabledrl:norm=micro"])
    assert "norm=group" not in table.stdout and "(norm=micro)" in table.stdout


def test_a_long_spec_is_quoted_whole():
    """Specs of 51 characters were quoted to their first 40 ('ppo:agg=token-mean,eps_high=0.28,
    eps_low'... (51 characters)): two that part late read the same."""
    for value in ("0.1", "0.2"):
        spec = f"ppo:agg=token-mean,eps_high=0.28,eps_low={value},tis=zz"
        result = runner.invoke(app, ["policies", "-p", spec])
        assert result.exit_code == 2
        assert f"policy spec {spec!r}: tis must be" in " ".join(result.stderr.split())


def test_specs_of_one_policy_are_listed_once():
    """`-p dapo -p dapo:eps_high=0.28` resolve to one policy, which replay replays once;
    `policies` listed it twice."""
    args = ["policies", "-p", "dapo", "-p", "dapo:eps_high=0.28", "-p", "grpo", "-f", "json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert [row["spec"] for row in json.loads(result.stdout)["policies"]] == ["dapo", "grpo"]


def test_bad_spec_exits_2_with_one_line_naming_the_choices():
    result = runner.invoke(app, ["policies", "-p", "ppo:eps_lo=0.1"])
    assert result.exit_code == 2
    assert "valid keys: eps_low, eps_high" in " ".join(result.stderr.split())
    assert result.stdout == ""


def test_bad_spec_exit_code_through_a_real_process():
    proc, ok = run_cli_together(
        ["policies", "-p", "nope"],
        ["policies", "-p", "two-sided:delta=4", "--format", "json"],
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown policy 'nope'; valid: ppo, grpo, dapo" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["policies"][0]["params"]["delta"] == 4.0


def test_the_footer_names_every_shared_key_only_for_the_policies_that_take_it(monkeypatch):
    """The footer said 'Every policy also takes beta ... and adv=...; agg=...', where
    stabledrl and gmpo refuse agg ('unknown key 'agg' for policy 'stabledrl'')."""
    monkeypatch.setenv("COLUMNS", "400")
    footer = " ".join(runner.invoke(app, ["policies"]).stdout.split("spec: ", 1)[1].split())
    without = sorted(n for n, entry in REGISTRY.items() if "agg" not in entry.keys)
    assert without == ["gmpo", "stabledrl"]
    assert "all but gmpo and stabledrl take agg=token-mean|" in footer
    for key in ("beta", "adv=", "rows=", "tis="):
        assert key in footer.split("all but", 1)[0]


def test_the_docs_document_every_key_of_the_policies_json():
    """A script reads `policies --format json`; docs/policies.md documented none of its keys."""
    result = runner.invoke(app, ["policies", "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    text = (Path(__file__).resolve().parents[1] / "docs" / "policies.md").read_text()
    section = text[text.index("`stabledrl policies --format json` prints one JSON document") :]
    section = section[: section.index("\n\n", section.index("| key |"))]
    assert set(re.findall(r"^\| `([a-z_]+)` \|", section, re.M)) == set(data)
    row = next(line for line in section.splitlines() if line.startswith("| `policies`"))
    for key in data["policies"][0]:
        assert f"`{key}`" in row, key
