"""The one error map of the CLI: one stderr line and the documented exit code."""

import errno

import pytest
import typer
from typer.testing import CliRunner

from stabledrl_cli.cli.app import INTERNAL_ERROR, _mapped
from stabledrl_cli.errors import InputError, UsageError, WriteError


def _app_raising(exc: BaseException) -> typer.Typer:
    app = typer.Typer()

    def fail() -> None:
        raise exc

    app.command("fail")(_mapped(fail))
    app.command("ok")(_mapped(lambda: None))
    return app


@pytest.mark.parametrize(
    ("exc", "code", "text"),
    [
        (UsageError("bad spec"), 2, "bad spec"),
        (InputError("corrupt step"), 3, "corrupt step"),
        (WriteError("out.json: cannot write it (no space left on device)"), 4, "no space left"),
        (PermissionError(errno.EACCES, "Permission denied", "/runs/x"), 3, "/runs/x"),
        (RuntimeError("kaput"), INTERNAL_ERROR, "internal error: RuntimeError: kaput"),
    ],
)
def test_errors_are_one_line_with_their_exit_code(exc, code, text):
    result = CliRunner().invoke(_app_raising(exc), ["fail"])
    assert result.exit_code == code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0]
    assert "Traceback" not in result.output


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("STABLEDRL_DEBUG", "1")
    result = CliRunner().invoke(_app_raising(RuntimeError("kaput")), ["fail"])
    assert isinstance(result.exception, RuntimeError)
