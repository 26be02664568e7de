"""The checks of the arguments the public API shares (a step number, a switch, a path,
values written as JSON): each refuses with a UsageError naming the argument."""

from __future__ import annotations

import json
import os
import sys
from typing import TypeVar, cast

from stabledrl_cli.dump._schema import STEP_LIMIT
from stabledrl_cli.errors import UsageError, quoted, type_name
from stabledrl_cli.spec import plain_number, whole_number

_Json = TypeVar("_Json")


def json_checked(value: _Json, what: str) -> _Json:
    """`value` with each numpy number or bool in it as the Python value it holds (`_plain`);
    UsageError naming the argument for values that JSON cannot hold, text that is not Unicode
    too (a lone surrogate, which every reader of the run refuses: `_json.has_lone_surrogate`),
    and an integer past the digits Python converts (its own message is a hint for code)."""
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False, default=_plain_or_refused)
        text.encode("utf-8")
        return _plain(value)
    except (TypeError, ValueError, RecursionError) as exc:  # (nested past the encoder's depth)
        if "integer string conversion" in str(exc):
            limit = sys.get_int_max_str_digits()
            exc = ValueError(f"an integer of more than {limit} digits (at most {limit} are read)")
        raise UsageError(f"{what} must be JSON-serializable: {exc}") from None


def _plain_or_refused(value: object) -> object:
    """json.dumps's hook for what it cannot write: a numpy number, bool or 0-d array as the
    Python value it holds (`spec.plain_number`), else TypeError, json's own."""
    plain = plain_number(value)
    if plain is value:
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
    return plain


def _plain(value: _Json) -> _Json:
    """`value` with each numpy number, bool or 0-d array in it, at any depth of its dicts,
    lists and tuples, as the Python value it holds: a config read from arrays (checked by
    `json_checked`: no cycle, a depth JSON takes)."""
    if isinstance(value, dict):
        return cast(_Json, {key: _plain(item) for key, item in value.items()})
    if isinstance(value, list | tuple):
        return cast(_Json, [_plain(item) for item in value])
    return plain_number(value)


def step_number(value: object, name: str = "step") -> int:
    """An int >= 0 (a numpy or 0-d torch integer is fine), else UsageError naming `name`."""
    step = whole_number(value)
    if step is None or not 0 <= step <= STEP_LIMIT:
        raise UsageError(f"{name} must be an int in [0, 2**63 - 1], got {value!r}")
    return step


def switch_argument(value: object, name: str) -> bool:
    """`value`, the switch `name`, when it is True or False, else UsageError: its truth value
    would be taken for it (overwrite="false" would replace the run). A numpy bool is the bool
    it holds."""
    value = plain_number(value)
    if not isinstance(value, bool):
        raise UsageError(f"{name} must be True or False, not {type_name(value)}")
    return value


def path_argument(path: object, name: str = "path", what: str = "the run's directory") -> str:
    """A run's `path` as given to `Recorder` or `open_run` (or an integration's run directory,
    or `pack_run`'s archive: `what`, the argument `name`): a non-empty str or path object (its
    text returned), else UsageError (None, a number, bytes; "" would be the working directory,
    which no caller means; a NUL, which the system refuses)."""
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not isinstance(text, str):
        raise UsageError(f"{name} must be a str or a path object, not {type(path).__name__}")
    if not text:
        raise UsageError(f"{name} is empty: name {what}")
    if "\x00" in text:
        raise UsageError(f"{name} {quoted(text)} holds a NUL character, which no file name can")
    return text
