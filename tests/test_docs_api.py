"""The package's docstring names the errors a user catches with the exit codes they have."""

from __future__ import annotations

import re

import stabledrl_cli
from stabledrl_cli import errors


def test_each_error_the_package_docstring_names_has_the_exit_code_it_states() -> None:
    named = re.findall(r"`(\w+Error)` \((\d+):", " ".join((stabledrl_cli.__doc__ or "").split()))
    assert [name for name, _ in named] == [
        "UsageError", "InputError", "WriteError", "WorkerDiedError"
    ]  # fmt: skip
    for name, code in named:
        error = getattr(errors, name)
        assert issubclass(error, errors.StabledrlError)
        assert error.exit_code == int(code), name
