"""A JSON-lines or CSV log that a live writer appends to while it is imported was read past
the end it had when opened: a writer faster than the import (700 MB in 15 s onto a log of 3
lines) ended it with 'more than 2000000 lines', a bound of lines that were not there when the
import began. The log is read as it was when opened, as an event file is: lines appended
later are not imported."""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import pytest

from stabledrl_cli.importers import _files, read_log

LOGS = {
    "log.jsonl": (
        '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n',
        '{"step": 3, "loss": 9}\n',
    ),
    "log.csv": ("step,loss\n1,0.5\n2,0.25\n", "3,9\n"),
}


@pytest.mark.parametrize("name", LOGS)
def test_lines_appended_after_the_log_was_opened_are_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    text, appended = LOGS[name]
    log = tmp_path / name
    log.write_text(text)
    opened = _files.open_log

    class Appended(io.BufferedReader):
        """The log, onto which a live writer appends 1000 lines once the import reads it."""

        written = False

        def readline(self, size: int | None = -1, /) -> bytes:
            if not self.written:
                with open(log, "a") as writer:
                    writer.write(appended * 1000)
                self.written = True
            return super().readline(size)

    def open_live(path: Path, limit: int = _files.INPUT_LIMIT) -> BinaryIO:
        return Appended(opened(path, limit).detach())  # type: ignore[attr-defined]

    monkeypatch.setattr(_files, "open_log", open_live)
    _, _, table = read_log(log)
    assert table.steps == {1: {"loss": 0.5}, 2: {"loss": 0.25}}
    assert table.replaced == 0 and not table.warnings
