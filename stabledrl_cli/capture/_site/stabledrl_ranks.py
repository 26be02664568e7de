"""The name of the empty file by which a process of `record`'s command says that it runs as a
rank (RANK-of-WORLD_SIZE, in record's $STABLEDRL_RANKS_DIR): written by the sitecustomize
beside this module, read by `record` (cli/_wrap_outcome.py), one rule for both. It imports nothing:
the sitecustomize imports it at the start of every Python process of the command.
"""

from __future__ import annotations

RANK_DIGITS = 9
"""Digits of the longest rank or world size announced: any larger is no launcher's."""
_BETWEEN = "-of-"


def _number(text: str) -> int | None:
    """The number `text` spells in at most RANK_DIGITS ASCII decimal digits, else None."""
    if text.isascii() and text.isdigit() and len(text) <= RANK_DIGITS:
        return int(text)
    return None


def rank_file_name(rank: object, world_size: object) -> str | None:
    """The name that announces rank `rank` of `world_size` (decimal numbers, as RANK and
    WORLD_SIZE give them, or ints); None when either is no rank's number."""
    number, size = _number(str(rank)), _number(str(world_size))
    if number is None or size is None:
        return None
    return f"{number}{_BETWEEN}{size}"


def announced_rank(name: str) -> tuple[int, int] | None:
    """The (rank, world_size) that the file name `name` announces; None when it is no
    `rank_file_name`."""
    rank, between, world_size = name.partition(_BETWEEN)
    number, size = _number(rank), _number(world_size)
    if not between or number is None or size is None:
        return None
    return number, size
