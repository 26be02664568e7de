"""URLs as the tool names them: whether a location is one (`is_url`) and the URL as messages,
reports and written files give it, its credentials and secret query values written `***`
(`redacted`). Ground floor: the command-line options read it without importing the readers
(h5py: a tenth of a second of `stabledrl policies`' start)."""

from __future__ import annotations

import os
import re

URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+._-]*)(://|::)")
"""A URL: a scheme (fsspec's may hold `_`: `async_wrapper://`), then `://` (or `::`, fsspec's
chaining); a Windows drive letter has one colon and no slashes."""
SLASHLESS_FILE_RE = re.compile(r"^(?:file|local):(?!//)(.+)", re.I)
"""A local file URL without the `//` after its scheme (`file:runs/a`, RFC 8089's `file:/tmp/a`):
no URL to `is_url`, so a local path named `file:runs/a`."""
CREDENTIALS_RE = re.compile(r"://([^/?#]*)@")
"""What comes before a URL's host: its credentials (`user:password@`)."""
BROKEN_PASSWORD_RE = re.compile(r"://([^/?#@:\[]*:(?!\d*(?:[/?#]|$)).*)@")
"""Credentials whose password holds `/`, `?` or `#` unescaped (a base64 token's `/`), which
end the URL's host early: a user name, `:` and no port after it (`host:8000/` is a port), then
all up to the URL's last `@`."""
SECRET_QUERY_RE = re.compile(
    r"[?&]([^=&#]*(?:signature|sig|token|credential|secret|password|key)[^=&#]*)=([^&#]+)", re.I
)
"""A query parameter of a URL that carries a secret (a presigned URL's `X-Amz-Signature`,
`X-Amz-Security-Token`, `X-Goog-Credential`, an Azure SAS's `sig`): its name and value."""


def is_url(text: str) -> bool:
    """Whether `text` is a URL (`scheme://...`) rather than a local path."""
    return URL_RE.match(text) is not None


def redacted(url: str) -> str:
    """`url` as messages and reports name it: the credentials before its host, and the values
    of its query's secrets (`SECRET_QUERY_RE`), written `***`."""
    return redacted_in(url, url)


def redacted_in(text: str, url: str) -> str:
    """`text` (a message, a filesystem's error) with the credentials of `url` (`user:password`
    before a host, in each URL of a chain, and its query's secrets: `SECRET_QUERY_RE`) written
    `***`."""
    if not is_url(url):
        return text
    for credentials in CREDENTIALS_RE.findall(url) or BROKEN_PASSWORD_RE.findall(url):
        text = text.replace(credentials + "@", "***@")
    for name, value in SECRET_QUERY_RE.findall(url):
        text = text.replace(f"{name}={value}", f"{name}=***")
    return text


def slashless_hint(path: str) -> str:
    """Why `path`, missing, names no run when it is a local file URL written without `//`
    (`file:runs/a`, read as a local path of that name): ` (...)` giving the URL of the path
    after the scheme. Else ''."""
    match = SLASHLESS_FILE_RE.match(path)
    if match is None:
        return ""
    url = "file://" + os.path.abspath(match.group(1))
    return (
        f" (a file URL takes '//' after its scheme, else it is read as a local path: give {url!r})"
    )
