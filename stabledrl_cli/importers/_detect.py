"""Which kind of log a path is, from its name and its first bytes."""

from __future__ import annotations

from pathlib import Path

from stabledrl_cli.errors import InputError
from stabledrl_cli.importers._crc32c import masked_crc32c
from stabledrl_cli.importers._files import LINE_LIMIT, open_log, subdirectories
from stabledrl_cli.importers._names import listed
from stabledrl_cli.importers._tfevents import EVENT_PATTERN, holds_events
from stabledrl_cli.importers._verl_console import SCAN_LIMIT, holds_console_steps
from stabledrl_cli.vocab import ImportFormat

TRAINER_STATE = "trainer_state.json"
_SNIFF = 4096
_SUFFIXES: dict[str, ImportFormat] = {
    ".csv": "csv",
    ".tsv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}


def log_path(path: Path, log_format: ImportFormat | None) -> Path:
    """The file or directory to read: a directory holding trainer_state.json stands for it."""
    if path.is_dir() and log_format in (None, "trainer_state") and (path / TRAINER_STATE).is_file():
        return path / TRAINER_STATE
    return path


def detect_format(path: Path) -> ImportFormat:
    """The format of the log at `path` (after `log_path`); InputError when it cannot tell."""
    if path.is_dir():
        if holds_events(path):
            return "tfevents"
        raise directory_refused(path, None)
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise InputError(f"{path}: no such file or directory") from None
    except OSError as exc:  # a symlink loop, a name longer than the file system takes, ...
        raise InputError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if path.name == TRAINER_STATE:
        return "trainer_state"
    if path.suffix.lower() in _SUFFIXES:  # before the name: `run-X-tag-T.csv`, TensorBoard's
        return _SUFFIXES[path.suffix.lower()]  # CSV of an X named after its event file, is CSV
    if "tfevents" in path.name and path.suffix.lower() != ".json":  # .json: a per-tag export
        return "tfevents"
    with open_log(path) as handle:
        head = handle.read(_SNIFF)
        if len(head) >= 12 and masked_crc32c(head[:8]) == int.from_bytes(head[8:12], "little"):
            return "tfevents"
        text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
        if b"\n" not in text:  # a first line longer than the sniff (verl's rows often are)
            handle.seek(len(head) - len(text))
            text = handle.readline(LINE_LIMIT)
    first = text.split(b"\n", 1)[0]
    if first.startswith(b"[") and text[1:].lstrip()[:1] == b"{":  # a JSON array of objects:
        # the rows of a log_history (json.dump of trainer.state.log_history, indented or not)
        return "trainer_state"
    if first.startswith(b"[") and first[1:].lstrip()[:1] in (b"[", b"]", b""):  # a JSON array
        return "tensorboard_json"
    if first.startswith(b"{"):  # one object per line, or one document (over many lines, or
        # on one, as json.dump writes it: its log_history tells it from a row)
        row = first.rstrip().endswith(b"}") and b'"log_history"' not in first
        return "jsonl" if row else "trainer_state"
    if any(d in first for d in (b",", b"\t", b";")):
        return "csv"
    if holds_console_steps(path):
        return "verl_console"
    raise InputError(
        f"{path}: cannot tell what kind of log this is (no JSON, CSV or TensorBoard data, no "
        f"verl console line `step:N - name:value` in its first {SCAN_LIMIT >> 20} MiB); pass "
        "--format-in"
    )


def directory_refused(path: Path, log_format: ImportFormat | None) -> InputError:
    """The refusal of directory `path` (after `log_path`) as a log of `log_format` (None: of
    any), naming its subdirectories that hold a log."""
    if log_format in ("jsonl", "csv", "tensorboard_json", "verl_console"):
        return InputError(f"{path}: a directory; a {log_format} log is one file")
    logs = subdirectories(path, lambda d: (d / TRAINER_STATE).is_file() or holds_events(d))
    held = (
        "its subdirectory {} holds a log" if len(logs) == 1 else "its subdirectories {} hold logs"
    )
    hint = f" ({held.format(listed(logs))}: import one)" if logs else ""
    wanted = TRAINER_STATE if log_format else f"{TRAINER_STATE} or {EVENT_PATTERN} files"
    return InputError(f"{path}: a directory without {wanted}{hint}")
