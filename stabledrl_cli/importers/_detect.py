"""Which kind of log a path is, from its name and its first bytes."""

from __future__ import annotations

import re
from pathlib import Path

from stabledrl_cli.errors import InputError, counted
from stabledrl_cli.importers._crc32c import masked_crc32c
from stabledrl_cli.importers._files import (
    ENTRY_LIMIT,
    LINE_LIMIT,
    SCAN_LIMIT,
    first_line_kind,
    open_log,
    subdirectories,
)
from stabledrl_cli.importers._names import listed
from stabledrl_cli.importers._tfevents import EVENT_PATTERN, holds_events
from stabledrl_cli.importers._verl_console import SNIFF_LINE
from stabledrl_cli.importers._wandb import HEADER, WANDB_PATTERN, run_id, wandb_files
from stabledrl_cli.vocab import ImportFormat

TRAINER_STATE = "trainer_state.json"
LATEST_RUN = "latest-run"
"""W&B's link, in its `wandb/` folder, to the run started last."""
TRANSFORMERS_LINE = re.compile(rb"(?:^|\) )\{'[^'\n]+': ")
"""A line of transformers' console output: `print(logs)` (PrinterCallback) or the progress
bar's `tqdm.write(str(logs))` (ProgressCallback), a Python dict's repr, after a Ray actor's tag
or none."""
_CONSOLES = {"verl_console": SNIFF_LINE, "transformers_console": TRANSFORMERS_LINE}
"""The console logs told among a job's other output, verl's first: its trainer prints dicts
too (its validation metrics)."""
_SNIFF = 4096
_SUFFIXES: dict[str, ImportFormat] = {
    ".csv": "csv",
    ".tsv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".wandb": "wandb",
}


_DIRECTORY_KINDS: tuple[ImportFormat, ...] = ("trainer_state", "tfevents", "wandb")
"""The kinds of log a directory may stand for."""
_FILE_KINDS: tuple[ImportFormat, ...] = ("csv", "jsonl")
"""The kinds of log a directory holds beside them by their names' suffixes, each one file."""
_HELD_ORDER = (*_DIRECTORY_KINDS, *_FILE_KINDS)
"""The kinds of log a directory is looked at for, in the order its refusals name them."""


def log_path(path: Path, log_format: ImportFormat | None) -> Path:
    """The file or directory to read: a directory holding trainer_state.json stands for it,
    and one holding a W&B run file (`wandb/run-<date>-<id>/`, `wandb/latest-run`) for that.
    With no `log_format`, a directory holding logs of several kinds is refused, naming them:
    which one is meant is the user's to say."""
    if not path.is_dir():
        return path
    if log_format is None and len(held := _held_logs(path)) > 1:
        raise _several_kinds(path, held)
    state = path / TRAINER_STATE
    if log_format in (None, "trainer_state") and state.exists() and not state.is_dir():
        return state  # a FIFO too: its read refuses it, unopened
    if log_format in (None, "wandb"):
        runs = wandb_files(path)
        if len(runs) > 1:
            raise InputError(f"{path}: W&B run files {listed(runs)}: import one")
        if runs:
            return path / runs[0]
    return path


def _held_logs(path: Path) -> dict[ImportFormat, list[str]]:
    """The logs directory `path` holds of its own, by their names (among its first ENTRY_LIMIT
    entries; none when it cannot be listed), in `_HELD_ORDER`, each kind's names sorted: its
    trainer_state.json, event files and W&B run files, and CSV and JSON-lines files; a
    subdirectory so named is none."""
    held: dict[ImportFormat, list[str]] = {}
    try:
        for number, entry in enumerate(path.iterdir()):
            if number >= ENTRY_LIMIT:
                break
            kind = _named_kind(entry)
            if kind is not None and not entry.is_dir():  # an `eval.csv/` folder is no log
                held.setdefault(kind, []).append(entry.name)
    except OSError:
        pass  # read, and refused, as a directory of no log
    return {kind: sorted(held[kind]) for kind in _HELD_ORDER if kind in held}


def _named_kind(entry: Path) -> ImportFormat | None:
    """The kind of log a directory's entry is by its name, None for none."""
    if entry.name == TRAINER_STATE:
        return "trainer_state"
    if entry.match(EVENT_PATTERN):
        return "tfevents"
    if entry.match(WANDB_PATTERN):
        return "wandb"
    kind = _SUFFIXES.get(entry.suffix.lower())
    return kind if kind in _FILE_KINDS else None


def _several_kinds(path: Path, held: dict[ImportFormat, list[str]]) -> InputError:
    """The refusal of directory `path` holding logs of several kinds (`_held_logs`)."""
    named = [
        counted(len(names), f"{EVENT_PATTERN} file") if kind == "tfevents" else listed(names)
        for kind, names in held.items()
    ]
    picks = " or ".join(kind for kind in held if kind in _DIRECTORY_KINDS)
    pick = f", or pass --format-in {picks}" if picks else ""
    return InputError(
        f"{path}: logs of {len(held)} kinds ({'; '.join(named)}): import one: give its file{pick}"
    )


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
        if not head:  # a job that ended before it logged: no format to pass
            raise InputError(f"{path}: empty file")
        if len(head) >= 12 and masked_crc32c(head[:8]) == int.from_bytes(head[8:12], "little"):
            return "tfevents"
        if head.startswith(HEADER):
            return "wandb"
        text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
        if not text and len(head) < _SNIFF:  # a job that printed blank lines only
            raise InputError(f"{path}: empty file (blank lines only)")
        if b"\n" not in text:  # a first line longer than the sniff (verl's rows often are)
            handle.seek(len(head) - len(text))
            text = handle.readline(LINE_LIMIT)
    first = text.split(b"\n", 1)[0]
    if first.startswith(b"[") and text[1:].lstrip()[:1] == b"{":  # a JSON array of objects:
        # the rows of a log_history (json.dump of trainer.state.log_history, indented or not)
        return "trainer_state"
    if first.startswith(b"[") and first[1:].lstrip()[:1] in (b"[", b"]", b""):  # a JSON array
        return "tensorboard_json"
    if TRANSFORMERS_LINE.match(first):  # a Python dict's repr, not JSON: a console's line
        return _console_format(path)
    if first.startswith(b"{"):  # one object per line, or one document (over many lines, or
        # on one, as json.dump writes it: its log_history tells it from a row)
        row = first.rstrip().endswith(b"}") and b'"log_history"' not in first
        return "jsonl" if row else "trainer_state"
    if any(d in first for d in (b",", b"\t", b";")):  # a header, or a job's first line
        return _console_format(path, "csv")  # (Ray's `2026-12-06 02:00:00,123\tINFO ...`)
    return _console_format(path)


def _console_format(path: Path, otherwise: ImportFormat | None = None) -> ImportFormat:
    """The format of a console log among a job's other output: verl's; transformers' is
    refused; a file of neither is of the format `otherwise`, or (None) of a kind that cannot
    be told."""
    console = first_line_kind(path, _CONSOLES)
    if console == "verl_console":
        return "verl_console"
    if console == "transformers_console":
        raise transformers_console_refused(path)
    if otherwise is not None:
        return otherwise
    raise InputError(
        f"{path}: cannot tell what kind of log this is (no JSON, CSV or TensorBoard data, no "
        f"verl console line `step:N - name:value` in its first {SCAN_LIMIT >> 20} MiB); pass "
        "--format-in"
    )


def _started(run: str) -> str:
    """When W&B run directory `run` (`run-20261206_074646-<id>`, `offline-run-...`) started,
    as text that sorts as the times do."""
    return run.partition("run-")[2]


def transformers_console_refused(path: Path) -> InputError:
    """The refusal of transformers' (TRL's) console output, which no format reads: its lines
    carry no step number (the step goes to `log_history` alone), and its progress bar prints
    each float to 4 significant digits."""
    return InputError(
        f"{path}: transformers' console output (`{{'loss': ...}}` lines), which holds no step "
        "numbers (and values to 4 digits): import the run's trainer_state.json (in its "
        "output_dir's checkpoint-N folders, or trainer.state.save_to_json(PATH)), or log it "
        'with report_to="tensorboard"'
    )


def directory_refused(path: Path, log_format: ImportFormat | None) -> InputError:
    """The refusal of directory `path` (after `log_path`) as a log of `log_format` (None: of
    any), naming its subdirectories that hold a log; W&B's `wandb/` folder (of W&B runs alone)
    naming its newest run (its `latest-run`), as which run is meant is the user's to say."""
    if log_format in ("jsonl", "csv", "tensorboard_json", "verl_console"):
        return InputError(f"{path}: a directory; a {log_format} log is one file")
    logs = subdirectories(
        path, lambda d: (d / TRAINER_STATE).is_file() or holds_events(d) or bool(wandb_files(d))
    )
    runs = [n for n in logs if n != LATEST_RUN and wandb_files(path / n)]
    if log_format in (None, "wandb") and runs and len(runs) == len(logs) - (LATEST_RUN in logs):
        # W&B's folder: its newest run is the likely one, not a sure one (another may start)
        newest = LATEST_RUN if LATEST_RUN in logs else max(runs, key=_started)
        ids = len({run_id(run) or run for run in runs})
        held = counted(len(runs), "W&B run")
        if ids < len(runs):  # a resumed run is written one directory a start
            held = f"{counted(len(runs), 'W&B run directory')} of {counted(ids, 'run')} (resumed)"
        if len(runs) == 1:
            return InputError(f"{path}: {held}: import its directory, {path / newest}")
        return InputError(f"{path}: {held}: import one ({path / newest} is the newest)")
    held = (
        "its subdirectory {} holds a log" if len(logs) == 1 else "its subdirectories {} hold logs"
    )
    hints = [f"{held.format(listed(logs))}: import one"] if logs else []
    files = [name for names in _held_logs(path).values() for name in names]
    if log_format is None and files:  # each a log to give as a file
        one = "the log {}: give it" if len(files) == 1 else "the logs {}: give one of them"
        hints.insert(0, f"it holds {one.format(listed(files))}")
    hint = f" ({'; '.join(hints)})" if hints else ""
    wanted = {
        None: f"{TRAINER_STATE}, {EVENT_PATTERN} files or a {WANDB_PATTERN} file",
        "wandb": f"a {WANDB_PATTERN} file",
    }.get(log_format, TRAINER_STATE)
    return InputError(f"{path}: a directory without {wanted}{hint}")
