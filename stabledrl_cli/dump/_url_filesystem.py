"""What a run's location names: the fsspec filesystem and path of a URL (`url_filesystem`),
and whether a path lies in a run on this machine (`inside_local_run`), without h5py: the
commands check their output paths against the run before anything is read."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from stabledrl_cli._url import URL_RE, redacted, redacted_in
from stabledrl_cli.errors import MissingExtraError, UsageError, one_line

REFUSED_PROTOCOLS = frozenset({"reference"})
"""Filesystems whose files point to other locations."""
IPV6_HOST_RE = re.compile(r"(://(?:[^/?#@]*@)?)\[[0-9A-Fa-f:.]*\]")
"""An IPv6 literal host (`http://[::1]:8000/run.h5`), whose `::` chains nothing."""
HTTP_STALL_SECONDS = 60.0
"""Seconds an HTTP(S) host may leave a connection attempt or a read without an answer before
the request fails (aiohttp's own bound is 5 minutes a request, however fast the bytes come)."""


def url_filesystem(url: str) -> tuple[Any, str]:
    """-> (the fsspec filesystem, the path on it) of a run URL.

    UsageError (exit 2): a chained or refused URL, an unknown scheme, a scheme whose package
    is not installed (MissingExtraError, naming it), an archive's filesystem (`zip://`, whose
    archive only a chained URL names), a filesystem that cannot be made (a host
    that refuses the connection or cannot be found: some filesystems connect when made)."""
    match = URL_RE.match(url)
    name = redacted(url)
    if match is None:
        raise UsageError(f"{name!r} is not a URL")
    protocol = match.group(1).lower()
    if "::" in IPV6_HOST_RE.sub(r"\1", url, count=1):
        raise UsageError(f"{name}: chained URLs are not read; give the run's own URL")
    if protocol in REFUSED_PROTOCOLS:
        raise UsageError(f"{name}: {protocol}:// maps paths to other URLs; give the run's own URL")
    try:
        import fsspec
        from fsspec.archive import AbstractArchiveFileSystem
    except ImportError:
        raise MissingExtraError(f"{name}: reading URLs needs fsspec: pip install fsspec") from None
    if protocol not in fsspec.available_protocols():
        raise UsageError(f"{name}: unknown URL scheme {protocol}://")
    try:
        archive = issubclass(fsspec.get_filesystem_class(protocol), AbstractArchiveFileSystem)
    except ImportError as exc:
        raise MissingExtraError(
            f"{name}: {protocol}:// needs a package: {redacted_in(str(exc), url)}"
        ) from None
    if archive:
        raise UsageError(
            f"{name}: {protocol}:// reads inside an archive that only a chained URL can name, "
            "and those are not read: unpack it and give the run's own path"
        )
    try:
        # fsspec's url_to_fs would split an IPv6 host's `::` as a chain; a scheme's case is no
        # part of it
        spelled = protocol + url[match.end(1) :]
        kind = fsspec.get_filesystem_class(protocol)
        options = {**kind._get_kwargs_from_urls(spelled), **_storage_options(protocol)}
        fs, root = fsspec.filesystem(protocol, **options), kind._strip_protocol(spelled)
    except ImportError as exc:
        raise MissingExtraError(
            f"{name}: {protocol}:// needs a package: {redacted_in(str(exc), url)}"
        ) from None
    except ValueError as exc:
        raise UsageError(f"{name}: {redacted_in(one_line(exc), url)}") from None
    except TypeError as exc:  # a filesystem that needs arguments a URL cannot give
        why = redacted_in(one_line(exc), url)
        raise UsageError(
            f"{name}: {protocol}:// cannot be opened from a URL alone ({why})"
        ) from None
    except Exception as exc:  # the filesystem's own code, connecting: any failure is the URL's
        raise unreachable(url, exc) from None
    return fs, str(root)


def _storage_options(protocol: str) -> dict[str, Any]:
    """The options a filesystem is made with: HTTP(S) requests fail on a stall of
    `HTTP_STALL_SECONDS`, never on their length."""
    if protocol not in ("http", "https"):
        return {}
    import aiohttp

    stall = aiohttp.ClientTimeout(
        total=None, sock_connect=HTTP_STALL_SECONDS, sock_read=HTTP_STALL_SECONDS
    )
    return {"client_kwargs": {"timeout": stall}}


def unreachable(url: str, exc: BaseException) -> UsageError:
    """The usage error (exit 2) of a URL whose host could not be reached, saying why."""
    if isinstance(exc, TimeoutError):
        stall = f"{HTTP_STALL_SECONDS:g} s"
        return UsageError(f"{redacted(url)}: cannot reach it (no answer for {stall})")
    why = redacted_in(one_line(exc), url)
    return UsageError(f"{redacted(url)}: cannot reach it ({type(exc).__name__}: {why})")


def local_path(location: str) -> str | None:
    """The path on this machine that a run's location names: a path as given, a URL of the
    local filesystem (`file://`, `local://`, its scheme in any case) as its reader reads it;
    None for a URL of another filesystem. UsageError as `url_filesystem` for a local URL it
    refuses."""
    match = URL_RE.match(location)
    if match is None:
        return location
    from fsspec.implementations.local import LocalFileSystem

    if match.group(1).lower() not in LocalFileSystem.protocol:
        return None
    return url_filesystem(location)[1]


def inside_local_run(target: Path, location: str) -> bool:
    """Whether `target` is the run at `location` (an archive) or lies in its directory, when
    that run is on this machine (a path, or a URL of the local filesystem): links resolved
    (realpath, not resolve: a link loop at `target` is no error here). A run in another store
    holds no local file."""
    local = local_path(location)
    return local is not None and Path(os.path.realpath(target)).is_relative_to(
        os.path.realpath(local)
    )
