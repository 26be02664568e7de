"""JSON of the tool's figures: NaN and inf become null (JSON has neither; the `nonfinite`
flags carry the fact), numpy scalars become Python numbers."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from stabledrl_cli.errors import InputError, quoted


def json_safe(value: Any) -> Any:
    """`value` as JSON can carry it: numpy numbers as Python's, non-finite floats as None, and
    text with a name's bytes that are not UTF-8 spelled `\\xNN` (`json_text`)."""
    if isinstance(value, str):
        return json_text(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, dict):
        return {json_text(str(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def unicode_text(text: str) -> str:
    """`text` with the bytes that are not UTF-8 of a name decoded from them (Python's lone
    surrogates, as os.fsdecode gives) spelled `\\xNN`: text every reader of a run takes
    (`has_lone_surrogate`)."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def json_text(text: str) -> str:
    """`text` as every JSON reader takes it: as it is, or with the bytes that are not UTF-8 of
    a name decoded from them spelled `\\xNN` (`unicode_text`; any other lone surrogate
    `\\udNNN`): json.dumps would write a lone surrogate as an escape that strict readers,
    this tool's among them, refuse."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return unicode_text(text)
        except UnicodeEncodeError:  # a lone surrogate no name's byte gives
            return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def stand_in(data: object, tag: str) -> str:
    """A format string "\\0TAG-{}\\0" to stand in for values put into `data`'s JSON text
    afterwards: TAG is grown ("+") until no string of `data` holds NUL, TAG, "-" (a manifest
    may name its policy with any text), so the text of each stand-in, once formatted, is found
    only where it was put."""
    plain = json.dumps(data)
    while f"\\u0000{tag}-" in plain:
        tag += "+"
    return "\0" + tag + "-{}\0"


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def has_lone_surrogate(raw: bytes | str, value: object) -> bool:
    """Whether `value`, parsed from the JSON text `raw`, holds a string (a key included) with
    a lone surrogate (an unpaired `\\ud800` escape, or its bytes): text that is not Unicode,
    which no output can print. RecursionError for a value nested past the encoder's depth."""
    escaped = "\\u" in raw if isinstance(raw, str) else b"\\u" in raw
    if raw.isascii() and not escaped:
        return False
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class _LongInteger(ValueError):
    """An integer past the digits Python converts (`sys.get_int_max_str_digits`)."""


def _integer(text: str) -> int:
    """A JSON integer; _LongInteger past Python's digit limit (its own message is a hint to
    call sys.set_int_max_str_digits, meant for code, not for the user of a command)."""
    try:
        return int(text)
    except ValueError:
        raise _LongInteger(
            f"an integer of {len(text.lstrip('-'))} digits (at most "
            f"{sys.get_int_max_str_digits()} are read)"
        ) from None


class _RepeatedKey(ValueError):
    """A key given twice in one JSON object."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object; _RepeatedKey when a key repeats (Python's parser keeps the last value,
    other parsers the first: which one the writer meant is not known)."""
    value = dict(pairs)
    if len(value) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKey(f"the key {quoted(key)} appears twice in one object")
            seen.add(key)
    return value


class NotUtf8(ValueError):
    """JSON text in bytes that are not UTF-8 (UTF-16, say)."""


def utf8_text(raw: bytes | str) -> str:
    """The text of JSON bytes read as UTF-8, the only encoding of the tool's files (a leading
    byte-order mark dropped, as JSON lets a reader); NotUtf8 for any other bytes, which
    json.loads would decode as UTF-16 or UTF-32 when their first bytes look so, and for a NUL
    byte, which UTF-16 or UTF-32 text of JSON holds and UTF-8 JSON never does."""
    if isinstance(raw, str):
        return raw
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise NotUtf8("not UTF-8 JSON") from None
    if "\0" in text:
        raise NotUtf8("not UTF-8 JSON")
    return text


JSON_ITEM_LIMIT = 4_000_000
"""The most JSON values (`json_items`) an input file may hold unless its reader says fewer:
parsed, each costs 30 to 70 bytes (an empty array, 3 bytes of text, 56 parsed), so a file
of many small values (`[[],[],...]`) would cost GBs; the largest real inputs, a long run's
trainer_state.json, hold about half of it."""


def json_items(raw: bytes | str) -> int:
    """An upper bound on how many JSON values the text `raw` holds, counted without parsing
    it: each value past the first follows a comma or opens an array or object (the count
    includes those characters inside strings, so it never falls short)."""
    if isinstance(raw, str):
        return raw.count(",") + raw.count("[") + raw.count("{")
    return raw.count(b",") + raw.count(b"[") + raw.count(b"{")


def parse_strict(
    raw: bytes | str,
    where: str,
    what: str,
    *,
    allow_nan: bool = False,
    parse_float: Callable[[str], float] = float,
    max_items: int = JSON_ITEM_LIMIT,
) -> object:
    """Strict JSON (no NaN or Infinity unless `allow_nan`: Python's own writers emit them) of an
    input file; InputError (exit 3) naming `where` and `what` for text that is not JSON, nests
    past the parser's depth, repeats a key in an object, holds a lone surrogate
    (`has_lone_surrogate`), is bytes that are not UTF-8 (`utf8_text`) or holds more than
    `max_items` values (`json_items`, before it is parsed). parse_float: reads each JSON
    number with a fraction or exponent."""
    if (items := json_items(raw)) > max_items:
        raise InputError(
            f"{where}: unreadable {what}: {items:,} JSON values (commas and brackets counted), "
            f"more than the {max_items:,} read"
        )
    try:
        text = utf8_text(raw)
        value = json.loads(
            text,
            parse_constant=None if allow_nan else _no_constant,
            parse_float=parse_float,
            parse_int=_integer,
            object_pairs_hook=_object,
        )
        lone = has_lone_surrogate(text, value)
    except RecursionError:
        raise InputError(
            f"{where}: unreadable {what}: not valid JSON (nested too deeply)"
        ) from None
    except (NotUtf8, _LongInteger, _RepeatedKey) as exc:
        raise InputError(f"{where}: unreadable {what}: {exc}") from None
    except ValueError as exc:
        why = "empty, no JSON" if not raw.strip() else f"not valid JSON ({exc})"
        raise InputError(f"{where}: unreadable {what}: {why}") from None
    if lone:
        raise InputError(
            f"{where}: unreadable {what}: a string with a lone surrogate (not Unicode)"
        )
    return value
