"""Which format a file is: its kind (`RUN_KIND`; `NotARun` for what is no run) and its
format version, written and checked.

A file records the oldest format version that describes it: 1.0, 1.1 when it uses a 1.1
addition (the step fields `micro_batch` and `group_split`, or group_ids = "global"), 1.2 when
it uses a 1.2 addition (a scalar step; a null policy or a `source` in the manifest), 1.3 when
it uses a 1.3 addition (the step field `token_count`), so that a run without them reads as
1.0 everywhere. A reader refuses a newer major version and reads a newer minor one, ignoring
the fields it does not know.
"""

from __future__ import annotations

import re

from stabledrl_cli.errors import InputError, shown


class NotARun(InputError):
    """A path that is no run: an HDF5 file whose root names it something else (a replay
    report), or what is neither a directory nor a regular file."""


RUN_KIND = "stabledrl-run"
FORMAT_VERSION = "1.3"
"""The newest format version this tool reads and writes."""
FORMAT_MAJOR = 1
PER_RANK_VERSION = "2.0"
"""The format version of a manifest whose `loss_norm` is "per_rank": a reader of major version
1 knows no `loss_norm` and would replay the run as "global", with other figures and no word,
where it refuses a major version it does not know ("upgrade stabledrl")."""
MANIFEST_MAJOR = 2
"""The newest major version of a manifest this tool reads: 1, or `PER_RANK_VERSION`'s."""
BASE_VERSION = "1.0"
"""The version of a file that uses no 1.1, 1.2 or 1.3 addition."""
SCALAR_STEP_VERSION = (1, 2)
"""The first version in which a step file may hold no policy batch (a scalar step)."""


def written_version(
    uses_1_1: bool,
    uses_1_2: bool = False,
    uses_1_3: bool = False,
    *,
    loss_norm: str = "global",
    world_size: int = 1,
) -> str:
    """The format version to record in a file: `PER_RANK_VERSION` for the manifest (or
    archive) of a run of several ranks whose `loss_norm` is "per_rank" (one rank's part is
    the whole step, which a reader of major version 1 replays alike), else 1.3 if it uses a
    1.3 addition, else 1.2 if it uses a 1.2 addition, else 1.1 if it uses a 1.1 addition,
    else 1.0."""
    if loss_norm == "per_rank" and world_size > 1:
        return PER_RANK_VERSION
    if uses_1_3:
        return "1.3"
    if uses_1_2:
        return "1.2"
    return "1.1" if uses_1_1 else BASE_VERSION


_VERSION_RE = re.compile(r"([0-9]{1,9})\.([0-9]{1,9})")
"""A format version: a string of ASCII digits, a dot, ASCII digits (at most 9 each)."""


def parse_version(text: object, what: str) -> tuple[int, int]:
    """ "1.0" -> (1, 0); anything else (a number, other digits than ASCII's, more than 9
    digits a part) is corrupt input."""
    match = _VERSION_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise InputError(f"{what}: malformed format version {shown(text)}")
    return int(match.group(1)), int(match.group(2))


def check_readable_version(
    text: object, what: str, newest_major: int = FORMAT_MAJOR
) -> tuple[int, int]:
    """A major version newer than `newest_major` is refused (an archive's may be 2:
    `_layout.ARCHIVE_MAJOR`); a newer minor is read, its new fields ignored."""
    major, minor = parse_version(text, what)
    if major > newest_major:
        raise InputError(
            f"{what}: run format {major}.{minor} is newer than this tool reads "
            f"({newest_major}.x); upgrade stabledrl"
        )
    if major < FORMAT_MAJOR:
        raise InputError(f"{what}: run format {major}.{minor} is not supported")
    return major, minor


def known_version_below(version: tuple[int, int]) -> str | None:
    """The newest version of a manifest's (or an archive's) major this stabledrl knows, when
    the (readable) `version` is a newer minor of it, whose added fields it leaves unread; None
    else."""
    known = FORMAT_VERSION if version[0] == FORMAT_MAJOR else PER_RANK_VERSION
    return known if version > parse_version(known, known) else None
