"""An archive's object names are the file's data: a refusal names the object, cut at
`QUOTE_LIMIT` characters when a crafted file makes its name megabytes long (before, the
whole name went into the one error line)."""

from __future__ import annotations

from pathlib import Path

import h5py
import pytest
from _corpus import packed
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

runner = CliRunner()
LONG = "n" * 200_000


def _crafted(archive: Path, how: str) -> None:
    with h5py.File(archive, "a") as handle:
        if how == "soft link":
            handle[f"scalars/{LONG}"] = h5py.SoftLink("/tokens/logp")
        elif how == "external link":
            handle[f"scalars/{LONG}"] = h5py.ExternalLink("other.h5", "/x")
        else:  # a dataset storing its bytes in another file
            handle.create_dataset(
                f"scalars/{LONG}", shape=(4,), dtype="f4", external=[("other.bin", 0, 16)]
            )


@pytest.mark.parametrize("how", ["soft link", "external link", "external storage"])
def test_a_refused_object_of_a_huge_name_is_named_cut(tmp_path: Path, how: str) -> None:
    archive = packed(tmp_path / "a")
    _crafted(archive, how)
    result = runner.invoke(app, ["inspect", str(archive)])
    assert result.exit_code == 3, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {archive}: refused: "), lines[0][:300]
    assert len(lines[0]) < 500 + len(str(archive)), len(lines[0])
    assert "nnnnnnnnnn" in lines[0] and f"({len(LONG) + 8:,} characters)" in lines[0]


def test_a_short_name_is_named_whole(tmp_path: Path) -> None:
    archive = packed(tmp_path / "a")
    with h5py.File(archive, "a") as handle:
        handle["scalars/odd"] = h5py.SoftLink("/tokens/logp")
    result = runner.invoke(app, ["inspect", str(archive)])
    assert result.stderr == f"error: {archive}: refused: scalars/odd is a soft link\n"
    assert result.exit_code == 3
