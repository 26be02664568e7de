"""A step header's own values in the reason its step is skipped are cut, as every value of an
input's is: a tensor name, a dtype, a `step` or `_rank` of a megabyte (a header may hold 100
MB) made a reason of that size, a warning line of megabytes on stderr, and an `inspect` whose
integrity table, wrapping the reason, took over 60 s for a step file of 60 MB."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _corpus import read_step, rewrite_step, step_path, tiny_run
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

runner = CliRunner()
LONG = 1_000_000
"""Characters of the crafted value: one megabyte."""
REASON_LIMIT = 400
"""Characters a reason may take: the file's path and a few values cut at their limits."""


def _extra_tensor(name: str, dtype: object) -> Callable[[dict[str, Any], bytes], bytes]:
    def change(header: dict[str, Any], data: bytes) -> bytes:
        header[name] = {"dtype": dtype, "shape": [1], "data_offsets": [len(data), len(data) + 4]}
        return data + bytes(4)

    return change


def _extra_tensor_of_shape(shape: list[int]) -> Callable[[dict[str, Any], bytes], bytes]:
    """A tensor of `shape` over 4 bytes: 200,000 dimensions of 2**62 took minutes to multiply
    out (inspect was still at it after 60 s, on a step file of 4 MB)."""

    def change(header: dict[str, Any], data: bytes) -> bytes:
        header["z"] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + 4]}
        return data + bytes(4)

    return change


def _metadata(key: str, value: str) -> Callable[[dict[str, Any], bytes], bytes]:
    def change(header: dict[str, Any], data: bytes) -> bytes:
        header["__metadata__"][key] = value
        return data

    return change


def _many_dimensions(header: dict[str, Any], data: bytes) -> bytes:
    header["logp"]["shape"] += [1] * 100_000  # the same bytes: each dimension is 1
    return data


CHANGES = {
    "tensor_name": _extra_tensor("z" * LONG, "STR"),
    "dtype": _extra_tensor("z", "Z" * LONG),
    "step": _metadata("step", "9" * LONG),
    "rank": _metadata("_rank", "9" * LONG),
    "world_size": _metadata("_world_size", "9" * LONG),
    "shape": _many_dimensions,
    "shape_of_huge_dimensions": _extra_tensor_of_shape([2**62] * 200_000),
}


@pytest.mark.parametrize("what", CHANGES)
def test_a_long_header_value_makes_a_short_reason(tmp_path: Path, what: str) -> None:
    run = tiny_run(tmp_path / "run")
    path = step_path(run, 1)
    header, data = read_step(path)
    rewrite_step(path, header, CHANGES[what](header, data))
    result = runner.invoke(app, ["inspect", str(run), "--format", "json"])
    assert result.exit_code == 0, result.output
    (finding,) = json.loads(result.stdout)["integrity"]["findings"]
    assert (finding["kind"], finding["step"]) == ("unreadable", 1)
    assert len(finding["message"]) < REASON_LIMIT, finding["message"][:REASON_LIMIT]
    assert "characters)" in finding["message"] or "..." in finding["message"]


def test_replay_warns_of_it_in_a_short_line(tmp_path: Path) -> None:
    run = tiny_run(tmp_path / "run")
    path = step_path(run, 1)
    header, data = read_step(path)
    rewrite_step(path, header, _extra_tensor("z" * LONG, "STR")(header, data))
    result = runner.invoke(app, ["replay", str(run), "-p", "grpo"])
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("warning: skipped")]
    assert len(line) < 2 * REASON_LIMIT + len(str(run)), line[: 2 * REASON_LIMIT]
    assert f"tensor {'z' * 40!r}... ({LONG:,} characters): unknown dtype" in line
