"""A setting the library refuses (`ConfigError`, named as the library spells it) said as the
command's option that gave it, for every command whose options become library settings."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from stabledrl_cli.errors import ConfigError, UsageError

FLAGS = {"step_range": "--steps"}
"""Library setting -> its option, where the option is not --SETTING-WITH-DASHES."""


@contextmanager
def option_names(flags: Mapping[str, str] = FLAGS) -> Iterator[None]:
    """Turns a `ConfigError` (a setting named as the library spells it) into a usage error
    naming the command's option (`flags`: setting -> option, where it is not
    --SETTING-WITH-DASHES)."""
    try:
        yield
    except ConfigError as exc:
        flag = flags.get(exc.field, "--" + exc.field.replace("_", "-"))
        raise UsageError(f"{flag} {exc.problem}") from None
