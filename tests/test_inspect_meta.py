"""`inspect` never renders a huge `meta` value whole: the table cuts it, the JSON keeps it; a
meta number that reads as infinity is a corrupt manifest, as in the format's other fields."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest
import torch
from typer.testing import CliRunner

from stabledrl_cli import Recorder
from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import open_run, pack_run
from stabledrl_cli.dump._archive_checks import CRC_ATTR, index_crc


def test_a_huge_meta_value_is_cut_in_the_table(tmp_path: Path) -> None:
    big = "x" * 500_000
    with Recorder(tmp_path / "run", policy="grpo", meta={"big": big}) as rec:
        logp = torch.zeros(2, 3)
        rec.log_step(0, logp=logp, logp_old=logp, advantages=torch.tensor([1.0, -1.0]),
                     mask=torch.ones(2, 3, dtype=torch.uint8))  # fmt: skip
    table = CliRunner().invoke(app, ["inspect", str(tmp_path / "run")])
    assert table.exit_code == 0, table.output
    assert len(table.stdout) < 20_000
    assert "500,000 characters" in table.stdout
    data = CliRunner().invoke(app, ["inspect", str(tmp_path / "run"), "--format", "json"])
    assert json.loads(data.stdout)["meta"]["big"] == big


def test_a_meta_of_many_keys_shows_50_and_counts_the_rest(tmp_path: Path) -> None:
    """A config flattened into meta (40,000 keys: 9 s and 3.9 MB of table before, rich
    rendering each row) shows its first 50 keys and a row counting the rest; the JSON keeps
    every key."""
    meta = {f"k{i}": i for i in range(1000)}
    run = _recorded(tmp_path / "run", meta)
    table = CliRunner().invoke(app, ["inspect", str(run)], env={"COLUMNS": "80"})
    assert table.exit_code == 0, table.output
    shown = [line for line in table.stdout.splitlines() if line.startswith("│ meta.k")]
    assert len(shown) == 50 and "│ meta.k49 " in shown[-1], shown[-1:]
    assert "950 more keys: --format json has them all" in table.stdout
    data = CliRunner().invoke(app, ["inspect", str(run), "--format", "json"])
    assert json.loads(data.stdout)["meta"] == meta


def test_a_long_meta_key_folds_and_leaves_the_values_their_room(tmp_path: Path) -> None:
    """A meta key of 300 characters took the whole 80 columns: every value of the run table
    read blank. It folds in the first column, cut at 200 characters as a value is."""
    run = _recorded(tmp_path / "run", {"y" * 300: "kept", "lr": 0.1})
    table = CliRunner().invoke(app, ["inspect", str(run)], env={"COLUMNS": "80"})
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert "grpo" in next(line for line in lines if line.startswith("│ policy "))
    assert "kept" in next(line for line in lines if line.startswith("│ meta.yyy"))
    keys = "".join(line.split("│")[1].replace(" ", "") for line in lines if line[:1] == "│")
    assert "y" * 195 + "...(300characters;--formatjsonhasitwhole)" in keys, keys


def _recorded(path: Path, meta: dict[str, object]) -> Path:
    with Recorder(path, policy="grpo", meta=meta) as rec:
        logp = torch.zeros(2, 3)
        rec.log_step(0, logp=logp, logp_old=logp, advantages=torch.tensor([1.0, -1.0]),
                     mask=torch.ones(2, 3, dtype=torch.uint8))  # fmt: skip
    return path


@pytest.mark.parametrize(
    ("literal", "where"),
    [
        ('{"lr": 1e999}', "meta.lr"),
        ('{"sweep": [0.1, {"lr": -1e999}]}', "meta.sweep[1].lr"),
    ],
)
def test_a_meta_number_that_reads_as_infinity_is_a_corrupt_manifest(
    tmp_path: Path, literal: str, where: str
) -> None:
    """The manifest is strict JSON without infinities (a Recorder never writes one): a literal
    that parses as inf, in meta as in reward_range, is exit 3 with one line naming where it
    is, in a run directory and in an archive; never shown as inf or null."""
    run = _recorded(tmp_path / "run", {})
    archive = tmp_path / "run.h5"
    pack_run(open_run(run), archive)
    manifest = run / "manifest.json"
    assert '"meta": {}' in manifest.read_text()
    manifest.write_text(manifest.read_text().replace('"meta": {}', f'"meta": {literal}'))
    with h5py.File(archive, "r+") as handle:
        text = handle["manifest"][()].decode()
        assert '"meta": {}' in text
        text = text.replace('"meta": {}', f'"meta": {literal}')
        del handle["manifest"]
        handle.create_dataset("manifest", data=text, dtype=h5py.string_dtype())
        handle["manifest"].attrs[CRC_ATTR] = index_crc(text)
    for path in (run, archive):
        for args in (["inspect", str(path)], ["replay", str(path), "-p", "grpo"]):
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 3, result.output
            lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
            assert lines == result.stderr.strip().splitlines() and len(lines) == 1, result.stderr
            assert where in lines[0] and "infinity" in lines[0], lines[0]


def test_an_integer_past_a_float_s_range_in_meta_is_shown_exactly(tmp_path: Path) -> None:
    """meta is free-form: an integer JSON holds exactly (10**400) is shown as it is."""
    run = _recorded(tmp_path / "run", {"big": 10**400})
    data = CliRunner().invoke(app, ["inspect", str(run), "--format", "json"])
    assert data.exit_code == 0, data.output
    assert json.loads(data.stdout)["meta"]["big"] == 10**400


def test_an_integer_past_python_s_digit_limit_is_named_not_a_python_hint(tmp_path: Path) -> None:
    """A manifest integer of 5000 digits (past the 4300 Python converts) was reported as 'not
    valid JSON (Exceeds the limit (4300 digits) for integer string conversion ...; use
    sys.set_int_max_str_digits() to increase the limit)': a hint for Python code, not for the
    user of a command. The line says what the number is and the bound."""
    run = _recorded(tmp_path / "run", {"big": 1})
    manifest = run / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"big": 1', '"big": ' + "9" * 5000))
    result = CliRunner().invoke(app, ["inspect", str(run)])
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(manifest) in lines[0], result.stderr
    assert "an integer of 5000 digits (at most 4300 are read)" in lines[0], lines[0]
    assert "sys.set_int_max_str_digits" not in lines[0]
