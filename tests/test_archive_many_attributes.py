"""An archive whose object holds 20,000 attributes is read: the check of each attribute's type
opened them by their index, which libhdf5 finds by walking the attributes before it (each
open longer than the last), and 20,000 of them, on a group of a 2 MB archive, took past the 20 s
that reading an archive's metadata may take: `inspect` refused it as a crafted archive.
They are listed once and opened by name."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from _corpus import packed
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app


def test_an_object_of_20000_attributes_is_read(tmp_path: Path) -> None:
    archive = packed(tmp_path)
    with h5py.File(archive, "r+", libver="latest") as handle:  # dense storage, written fast
        group = handle.create_group("notes")
        scalar, value = h5py.h5s.create(h5py.h5s.SCALAR), np.array(1, dtype="<i8")
        for i in range(20_000):
            h5py.h5a.create(group.id, f"a{i}".encode(), h5py.h5t.STD_I64LE, scalar).write(value)
    result = CliRunner().invoke(app, ["inspect", str(archive), "--format", "json"])
    assert result.exit_code == 0, result.stderr
