"""The package's docstring names the errors a user catches with the exit codes they have, and
its refusals name the functions the docs give."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import h5py
import pytest

import stabledrl_cli
from stabledrl_cli import errors
from stabledrl_cli.replay.hdf5 import REPORT_KIND

ROOT = Path(__file__).resolve().parents[1]


def test_each_error_the_package_docstring_names_has_the_exit_code_it_states() -> None:
    named = re.findall(r"`(\w+Error)` \((\d+):", " ".join((stabledrl_cli.__doc__ or "").split()))
    assert [name for name, _ in named] == [
        "UsageError", "InputError", "WriteError", "WorkerDiedError"
    ]  # fmt: skip
    for name, code in named:
        error = getattr(errors, name)
        assert issubclass(error, errors.StabledrlError)
        assert error.exit_code == int(code), name


def test_the_refusal_of_a_replay_report_names_a_documented_reader(tmp_path: Path) -> None:
    """`replay RUN --out report.h5` writes a report, which `open_run` (`inspect`, `replay`)
    refuses as no run: the line names the function that reads it back, as the docs do (it
    said `open it with read_hdf5`, a name no page gave and the package face does not hold)."""
    report = tmp_path / "report.h5"
    with h5py.File(report, "w") as handle:
        handle.attrs["kind"] = REPORT_KIND
    with pytest.raises(errors.InputError) as refused:
        stabledrl_cli.open_run(report)
    (reader,) = re.findall(r"stabledrl_cli(?:\.\w+)+", str(refused.value))
    module, _, name = reader.rpartition(".")
    assert callable(getattr(importlib.import_module(module), name))
    assert reader in (ROOT / "docs" / "replay-json.md").read_text(encoding="utf-8")
