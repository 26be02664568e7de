"""Runs read in place through fsspec URLs: `memory://`, `file://`, `s3://` (with s3fs), any
filesystem fsspec knows, without copying the run first.

A run directory (`RemoteRun`) is read as a local one (`DirectoryRun`: the same listing rules,
header and data checksums, joins and findings); only the storage calls differ. The steps/
folder is listed on every access (a store has no directory time to tell a listing still
holds), each step file's header is read with a ranged read, and its whole bytes are read once
when its step is loaded: the data checksum is checked on those bytes and its arrays are views
of them. A file of more than `UNCHECKED_WHOLE_READ` bytes is read whole only once its header
says it holds that many. A packed `.h5` is read by h5py through an fsspec file object
(`RemoteArchiveRun`).

A run at a URL is named by that URL as given, protocol included, wherever a message, warning
or finding names it or one of its files (`memory://b/run/steps/step-00000005.safetensors`,
never the path on the filesystem, `/b/run/steps/...`), a filesystem's own error included;
credentials in it (`https://user:token@host/...`) are written `***` (`https://***@host/...`):
messages, JSON and the files written from the run never hold them (`redacted`).

What a URL may name (docs/trust.md): exactly one filesystem and a path on it. Chained URLs
(`simplecache::s3://...`) and the `reference://` filesystem, whose JSON maps paths to other
URLs, are refused; a link inside the run is never followed (an entry that is not a regular
file is a finding, never read); nothing read from a run names another location.
"""

from __future__ import annotations

import io
import os
import re
import struct
import zlib
from collections.abc import Callable
from contextlib import suppress
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from stabledrl_cli._url import URL_RE, redacted, redacted_in
from stabledrl_cli.dump._archive_checks import held_bytes
from stabledrl_cli.dump._archive_reader import ArchiveRun
from stabledrl_cli.dump._directory import DirectoryRun
from stabledrl_cli.dump._file_names import HDF5_SIGNATURE, MANIFEST_NAME, STEPS_DIR, step_file_name
from stabledrl_cli.dump._integrity import StepReadError
from stabledrl_cli.dump._manifest import MANIFEST_LIMIT
from stabledrl_cli.dump._run import Run
from stabledrl_cli.dump._run_files import symlink_refused
from stabledrl_cli.dump._stfile import (
    HEADER_LIMIT,
    FileKey,
    StepHeader,
    parse_header,
    too_large_to_read,
)
from stabledrl_cli.dump._stop_notes import STOP_NOTE_LIMIT
from stabledrl_cli.dump._store_file import StoreFile
from stabledrl_cli.dump._url_filesystem import local_path, unreachable, url_filesystem
from stabledrl_cli.dump._writer_lock import WriterState
from stabledrl_cli.errors import (
    InputError,
    UsageError,
    described,
    one_line,
)

MISSING_STATUSES = frozenset({404, 410})
"""The HTTP statuses that say nothing is there (any other, 401, 403, 500..., refuses a run that
may well be)."""
QUERY_RE = re.compile(r"[?#]")
"""Where a URL's query or fragment starts, which a filesystem of paths (`file://`, `memory://`)
reads as part of the path."""
UNCHECKED_WHOLE_READ = 64 << 20
"""Bytes of a step file read whole in one request before its header is read: a larger one's
header is read first, and the file only if it holds what the header says (a file padded past
its data is never loaded: a few GB of zeros after a 1 KB step)."""


def _file_key(info: dict[str, Any]) -> FileKey:
    """What changes when a file does: its size and its modification stamp (mtime, ETag...)."""
    stamp = next((info[k] for k in ("mtime", "LastModified", "ETag", "created") if k in info), "")
    return (0, int(info.get("size") or 0), zlib.crc32(str(stamp).encode()))


def _said(exc: OSError, root: str, url: str) -> str:
    """What the filesystem said of a failed call, `root` (the run's path on it) written as
    `url`: a store's errors name the path they were given."""
    text = exc.strerror or str(exc) or type(exc).__name__  # a timeout says nothing else
    text = text.replace(root, redacted(url).rstrip("/")) if root.strip("/") else text
    return redacted_in(text, url)


def _regular(info: dict[str, Any]) -> bool:
    return info.get("type") == "file" and not info.get("islink")


class _AtUrl:
    """A run read through fsspec: named by its URL (`url`, `location`: as `redacted`), and opened
    in another process from it (`source`)."""

    url: str
    given: str

    def _at(self, given: str) -> None:
        self.given = given
        self.url = redacted(given)

    @property
    def location(self) -> str:
        return self.url

    @property
    def source(self) -> str:
        """The URL as given; a URL of this machine's files (`file://runs/a`, `local://`) as the
        `file://` URL of its absolute path, as a relative path's source is its absolute path: a
        worker whose working directory is another (a Ray node's) opens the same run."""
        local = local_path(self.given)
        return self.given if local is None else "file://" + local


class _FailingAsOSError:
    """A filesystem whose calls fail with OSError only: a store's own error types (httpx's
    from huggingface_hub, gcsfs's HttpError) are how a read fails mid-run, and the readers make
    an OSError a finding on the file it hit, or a one-line InputError."""

    def __init__(self, fs: Any) -> None:
        self._fs = fs

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._fs, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attribute(*args, **kwargs)
            except OSError:
                raise
            except Exception as exc:
                raise OSError(described(exc)) from exc

        return call


class RemoteRun(_AtUrl, DirectoryRun):
    """A run directory read through fsspec (module docstring). `path` is the path on the
    filesystem, where its files are read; messages and findings name each file by its URL
    (`named`)."""

    def __init__(self, url: str, fs: Any, root: str, *, verify: bool = True) -> None:
        self._at(url)
        self.fs = _FailingAsOSError(fs)
        self._infos: dict[str, dict[str, Any]] = {}
        """File path -> what the last listing said of it."""
        super().__init__(Path(root), verify=verify)

    def recorder_states(self) -> dict[int, WriterState] | None:
        """None: a run at a URL is not asked for its lock files' locks."""
        return None

    def named(self, path: Path) -> str:
        """`path` (under the run's path on the filesystem) as a URL: the run's URL as given,
        then the file's path inside the run."""
        inside = path.relative_to(self.path).as_posix()
        return self.url if inside == "." else f"{self.url.rstrip('/')}/{inside}"

    def _said(self, exc: OSError) -> str:
        return _said(exc, str(self.path), self.given)

    @property
    def size_bytes(self) -> int:
        try:
            found = self.fs.find(str(self.path), detail=True)
        except OSError as exc:
            raise InputError(f"{self.url}: cannot list it ({self._said(exc)})") from None
        return sum(int(info.get("size") or 0) for info in found.values())

    def _info(self, path: Path) -> dict[str, Any]:
        info = self._infos.get(str(path))
        if info is None:
            info = self.fs.info(str(path))
            self._infos[str(path)] = info
        return info

    def _exists(self, path: Path) -> bool:
        try:
            return bool(self.fs.exists(str(path)))
        except OSError:
            return False

    def _manifest_bytes(
        self, path: Path, limit: int = MANIFEST_LIMIT, what: str = "manifest"
    ) -> bytes:
        try:
            info = self.fs.info(str(path))
            if info.get("islink"):
                raise symlink_refused(self.named(path))
            if not _regular(info):
                raise InputError(f"{self.named(path)}: not a regular file")
            data: bytes = self.fs.cat_file(str(path), start=0, end=limit + 1)
        except OSError as exc:
            raise InputError(f"{self.named(path)}: unreadable {what} ({self._said(exc)})") from None
        return data

    def _note_bytes(self, path: Path) -> bytes:
        return self._manifest_bytes(path, STOP_NOTE_LIMIT, "note")

    def _entries(self, directory: Path) -> list[tuple[str, bool]]:
        info = self.fs.info(str(directory))
        if info.get("islink"):
            raise symlink_refused(self.named(directory))
        if info.get("type") != "directory":
            raise NotADirectoryError(str(directory))
        listed: dict[str, bool] = {}
        for info in self.fs.ls(str(directory), detail=True):
            name = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
            self._infos[str(directory / name)] = info
            # a name listed twice (a store's object and a prefix of that name) is no one file
            listed[name] = name not in listed and _regular(info)
        return sorted(listed.items())

    def _stamp(self, directory: Path) -> object | None:
        return None

    def _relisting_due(self, n: int, listed: dict[int, Path]) -> bool:
        """A store is listed whole each time (it has no `_stamp`): a step the last listing
        holds partial has it listed again only once a missing rank's file is there (one lookup
        a rank), so a live run's step reads whole, and reading a dead rank's partial steps one
        by one costs no listing (a LIST request) a step."""
        steps = self.path / STEPS_DIR
        return any(
            self._exists(steps / step_file_name(n, rank, self.world_size))
            for rank in range(self.world_size)
            if rank not in listed
        )

    def _file_key(self, path: Path) -> FileKey:
        return _file_key(self._info(path))

    def _header(
        self, path: Path, *, deep: bool, keep: bool = False, known: int | None = None
    ) -> StepHeader:
        """`_listed_header`; a file that fails it is read again when its size changed since
        the listing (a last step rewritten in place: read against its listed size it is torn)."""
        try:
            return self._listed_header(path, deep=deep, keep=keep, known=known)
        except StepReadError:
            if not self._changed(path):
                raise
            return self._listed_header(path, deep=deep, keep=keep, known=known)

    def _changed(self, path: Path) -> bool:
        """Whether the file at `path` is of another size than listed, its info then taken as
        it is now (a store's listing and its info of a file may differ in their stamps)."""
        try:
            now = self.fs.info(str(path))
        except OSError:
            return False
        if int(now.get("size") or 0) == int(self._info(path).get("size") or 0):
            return False
        self._infos[str(path)] = now
        return True

    def _listed_header(
        self, path: Path, *, deep: bool, keep: bool = False, known: int | None = None
    ) -> StepHeader:
        """The whole file in one read with `deep` or `keep` (a file of more than
        `UNCHECKED_WHOLE_READ` bytes only once its header, read first, says it holds that
        many), else its header by ranged reads; `key` is what the listing said of the file."""
        try:
            key = self._file_key(path)
            size = int(self._info(path).get("size") or 0)
            if not (deep or keep) or size > UNCHECKED_WHOLE_READ:
                header = self._ranged_header(path, size, known)
                if not (deep or keep):
                    return replace(header, key=key)
            try:
                data = self.fs.cat_file(str(path))
            except OSError as exc:
                if isinstance(exc.__cause__, MemoryError):
                    raise too_large_to_read(size) from None
                raise
            header = parse_header(
                io.BytesIO(data), len(data), deep=deep, keep_data=keep, known=known
            )
            return replace(header, key=key)
        except OSError as exc:
            raise StepReadError("unreadable", f"cannot read: {self._said(exc)}") from None

    def _ranged_header(self, path: Path, size: int, known: int | None) -> StepHeader:
        """The header of the step file at `path`, of `size` bytes, by two ranged reads;
        StepReadError when `size` is not what it says (torn, trailing bytes)."""
        head: bytes = self.fs.cat_file(str(path), start=0, end=8)
        if len(head) == 8:
            (length,) = struct.unpack("<Q", head)
            if length <= HEADER_LIMIT and 8 + length <= size:
                head += self.fs.cat_file(str(path), start=8, end=8 + length)
        return parse_header(io.BytesIO(head), size, deep=False, known=known)


class RemoteArchiveRun(_AtUrl, ArchiveRun):
    """A packed .h5 read by h5py through an fsspec file object."""

    def __init__(
        self, url: str, store: StoreFile, root: str, info: dict[str, Any], *, verify: bool = True
    ) -> None:
        """store: the archive at `root` (`_archive_store`)."""
        self._at(url)
        self._size = size = int(info.get("size") or 0)
        local = local_path(url)
        if local is not None:  # a file:// URL: bounded as the path is, by what its disk holds
            with suppress(OSError):
                size = held_bytes(os.stat(local))
        super().__init__(
            Path(root),
            verify=verify,
            fileobj=store,
            size=size,
            key=_file_key(info),
        )

    def _reopen(self) -> Callable[[str], Run]:
        return partial(open_url, verify=self.verify)

    @property
    def size_bytes(self) -> int:
        return self._size


def _archive_store(url: str, file: Any, root: str, size: int) -> StoreFile | None:
    """The file at `root` (`file`, opened by its filesystem) as h5py reads it, when it begins
    as an HDF5 file does; else None (closed). Its signature is read through it, not by a
    ranged `cat_file`: a server that ignores ranges (Python's http.server) sent the whole body
    for that, where a file object reads a block. Its last byte is read too: a store that can
    read no further than its first block fails here, once, not under every step (exit 3)."""
    store = StoreFile(
        file,
        lambda: url_filesystem(url)[0].open(root, "rb"),
        lambda text: redacted_in(text, url),
    )
    try:
        if store.read(len(HDF5_SIGNATURE)) != HDF5_SIGNATURE:
            store.close()
            return None
        store.seek(max(size - 1, 0))
        store.read(1)
        store.seek(0)
    except OSError:
        store.close()
        raise InputError(f"{redacted(url)}: cannot read it: {store.take_failure()}") from None
    return store


def _holds_manifest(fs: Any, root: str) -> bool:
    """Whether `root`, a file to its filesystem, has a run's manifest under it: a run directory
    that the filesystem serves as a page (http's)."""
    try:
        return bool(fs.exists(f"{root.rstrip('/')}/{MANIFEST_NAME}"))
    except Exception:  # the filesystem's own errors: no manifest read
        return False


def _missing_hint(url: str, fs: Any, root: str) -> str:
    """Why a URL names nothing when another reading of it names a file: its path with its
    %-escapes decoded (`file:///tmp/a%20b`, as `Path.as_uri()` writes `/tmp/a b`: fsspec reads
    a URL's path as written), or, for a `file://localhost/PATH` (RFC 8089's host, which fsspec
    reads as the relative path `localhost/PATH`), `/PATH`, or its path without the query or
    fragment that the filesystem read as part of it (`file:///tmp/run?x=1`). Else ''."""
    match = URL_RE.match(url)
    rest = url[match.end() :] if match else ""
    written = unquote(redacted(url))
    candidates = [(unquote(root), f"%-escapes are read as written: give {written!r}")]
    in_root, in_url = QUERY_RE.search(root), QUERY_RE.search(url)
    if in_root is not None and in_url is not None:
        what = "a query" if in_root.group() == "?" else "a fragment"
        bare = redacted(url[: in_url.start()])
        candidates.append(
            (root[: in_root.start()], f"{what} is read as part of the path: give {bare!r}")
        )
    if rest.lower().startswith("localhost/") and local_path(url) is not None:
        path = rest[len("localhost") :]
        candidates.insert(0, (path, f"a host is read as part of the path: give 'file://{path}'"))
    for path, hint in candidates:
        try:
            if path != root and fs.exists(path):
                return f" ({hint})"
        except (OSError, ValueError):
            continue
    return ""


def open_url(url: str, *, verify: bool = True) -> Run:
    """The run (a directory or a packed .h5) at an fsspec URL; InputError (exit 3) for a
    missing run, one that is neither, or one the store refuses to let this user read, or a
    local URL's path the system cannot read (a symlink loop: as for a local path), UsageError
    (exit 2) for a URL that cannot be read at all (its host refuses the connection, cannot be
    found, its filesystem's code fails on it...)."""
    fs, root = url_filesystem(url)
    name = redacted(url)
    try:
        found = fs.info(root)  # a link here is the user's: its target's type
        directory = found.get("type") == "directory"
        file = fs.open(root, "rb") if found.get("type") == "file" else None
    except FileNotFoundError as exc:
        refused = exc.__cause__
        if isinstance(refused, OSError) and not isinstance(refused, FileNotFoundError):
            raise unreachable(url, refused) from None  # http's, for a host it cannot reach
        status = getattr(refused, "status", None)  # http's answer, whatever it was
        if isinstance(status, int) and status not in MISSING_STATUSES:
            answer = redacted_in(one_line(getattr(refused, "message", "")), url)
            raise InputError(f"cannot read {name}: the server answered {status} {answer}") from None
        raise InputError(f"no such run: {name}{_missing_hint(url, fs, root)}") from None
    except PermissionError as exc:
        raise InputError(f"cannot read {name}: {_said(exc, root, url)}") from None
    except OSError as exc:
        said = one_line(_said(exc, root, url))
        if local_path(url) is None:
            raise UsageError(f"cannot read {name}: {said}") from None
        if isinstance(exc, NotADirectoryError):  # a path under a file names nothing, as local
            raise InputError(f"no such run: {name}{_missing_hint(url, fs, root)}") from None
        raise InputError(f"cannot read {name}: {said}") from None  # a loop, EIO: as local
    except Exception as exc:  # the filesystem's own code (huggingface_hub's httpx errors...)
        why = f"{type(exc).__name__}: {redacted_in(one_line(exc), url)}"
        raise UsageError(f"cannot read {name}: the filesystem fails on it ({why})") from None
    if directory:
        return RemoteRun(url, fs, root, verify=verify)
    size = int(found.get("size") or 0)
    archive = None if file is None else _archive_store(url, file, root, size)
    if archive is not None:
        return RemoteArchiveRun(url, archive, root, found, verify=verify)
    if _holds_manifest(fs, root):
        raise InputError(
            f"{name} is a run directory that {url.partition(':')[0].lower()}:// cannot read: "
            "it lists no directory (a server's page is a file); pack the run (stabledrl "
            "pack) and give the .h5's URL"
        )
    raise InputError(f"{name} is not a run (expected a run directory or a .h5 archive)")
