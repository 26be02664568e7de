"""Bounds on a step's scalars: refused past MAX_SCALARS at write, a file holding more is an
unreadable step (a finding) at read, and `inspect` draws a bounded series table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli import _inspect_tables as inspect_cli
from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import _schema, _step_encoding, _stfile
from stabledrl_cli.errors import UsageError


def _step(rec: sd.Recorder, step: int, scalars: dict[str, float]) -> None:
    rec.log_step(
        step,
        logp=np.zeros(4, np.float32),
        logp_old=np.zeros(4, np.float32),
        advantages=np.ones(4, np.float32),
        seq_id=np.array([0, 0, 1, 1]),
        group_id=np.array([0, 0]),
        reward=np.zeros(2),
        scalars=scalars,
    )


def test_log_step_refuses_more_scalars_than_the_bound(tmp_path: Path) -> None:
    with sd.Recorder(tmp_path / "run") as rec:
        too_many = {f"s{i}": 1.0 for i in range(_schema.MAX_SCALARS + 1)}
        with pytest.raises(UsageError, match="10,001 names, more than the 10,000"):
            _step(rec, 0, too_many)
        _step(rec, 0, {f"s{i}": 1.0 for i in range(_schema.MAX_SCALARS)})
    assert len(sd.open_run(tmp_path / "run").step(0).scalars) > _schema.MAX_SCALARS


def test_a_step_file_over_the_bound_is_a_finding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with sd.Recorder(tmp_path / "run") as rec:
        _step(rec, 0, {"a": 1.0})
        _step(rec, 1, {f"s{i}": 1.0 for i in range(50)})
    monkeypatch.setattr(_stfile, "MAX_METADATA", 40)
    result = CliRunner().invoke(app, ["replay", str(tmp_path / "run"), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert "step 1: unreadable: header metadata has 6" in result.stderr
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "run"), "--format", "json"])
    assert result.exit_code == 0
    assert '"unreadable"' in result.stdout


def test_inspect_draws_a_bounded_series_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with sd.Recorder(tmp_path / "run") as rec:
        _step(rec, 0, {f"mine{i:02}": float(i) for i in range(30)})
    monkeypatch.setattr(inspect_cli, "SERIES_SHOWN", 10)
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "run")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "mine05" in result.stdout and "mine29" not in result.stdout
    assert "more series: --format json has them all" in result.stdout
    assert "more: --format json has them all" in result.stdout
    json_out = CliRunner().invoke(app, ["inspect", str(tmp_path / "run"), "--format", "json"])
    assert "mine29" in json_out.stdout


def test_a_step_file_of_too_many_tensors_is_a_finding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with sd.Recorder(tmp_path / "run", policy=None) as rec:
        rec.log_step(0, loss=1.0)
        rec.log_step(1, loss=1.0)
    step_file = tmp_path / "run" / "steps" / "step-00000001.safetensors"
    header = _stfile.read_header(step_file, deep=False)
    assert not header.tensors
    tensors = {f"extra{i}": np.zeros(0, np.uint8) for i in range(8)}
    metadata = {k: v for k, v in header.metadata.items() if not k.startswith("_crc32")}
    step_file.write_bytes(b"".join(bytes(p) for p in _step_encoding.encode_step(tensors, metadata)))
    assert sd.open_run(tmp_path / "run").integrity.ok  # a newer minor's fields: ignored
    monkeypatch.setattr(_stfile, "MAX_TENSORS", 7)
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "run"), "--format", "json"])
    assert result.exit_code == 0, result.output
    (finding,) = json.loads(result.stdout)["integrity"]["findings"]
    assert finding["message"] == (
        "step 1: unreadable: header has 8 tensors, more than the 7 a step holds"
    )


def test_a_step_header_of_too_many_json_items_is_refused_before_it_is_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crafted header of small items (`[[],[],...]`, 3 bytes each) parsed into 26x its size
    (100 MB: 2.6 GB); it is now an unreadable step, counted before json.loads is called."""
    with sd.Recorder(tmp_path / "run", policy=None) as rec:
        rec.log_step(0, loss=1.0)
        rec.log_step(1, loss=1.0)
    crafted = b'{"x":[' + b",".join([b"[]"] * _stfile.HEADER_ITEM_LIMIT) + b"]}"
    crafted += b" " * (-len(crafted) % 8)
    step_file = tmp_path / "run" / "steps" / "step-00000001.safetensors"
    step_file.write_bytes(len(crafted).to_bytes(8, "little") + crafted)
    parsed: list[int] = []
    decode = _stfile.utf8_text  # what the reader calls on a header just before parsing it
    monkeypatch.setattr(_stfile, "utf8_text", lambda raw: parsed.append(len(raw)) or decode(raw))
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "run"), "--format", "json"])
    assert result.exit_code == 0, result.output
    (finding,) = json.loads(result.stdout)["integrity"]["findings"]
    assert finding["message"] == (
        "step 1: unreadable: header holds 2,000,001 JSON items, more than the 1,000,000 a "
        "step holds"
    )
    assert all(size < 1000 for size in parsed)  # step 0's header only, never the crafted one


def test_log_step_refuses_a_header_its_readers_would_not_parse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_step_encoding, "HEADER_ITEM_LIMIT", 100)
    with sd.Recorder(tmp_path / "run") as rec:
        refused = r"header holds [\d,]+ JSON items .* more than the 100 "
        with pytest.raises(UsageError, match=refused):
            _step(rec, 0, {"a,b,c" * 20: 1.0})
        _step(rec, 0, {"abc": 1.0})
    run = sd.open_run(tmp_path / "run")
    assert run.step_numbers == [0] and run.integrity.ok
