"""`inspect` never renders a huge `meta` value whole: the table cuts it, the JSON keeps it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from stabledrl_cli import Recorder
from stabledrl_cli.cli.app import app


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
