"""Runs for the fsspec tests (test_fsspec*.py): a small multi-rank run with a corrupt step, a
copy of a run on fsspec's in-memory filesystem, and a folder served over HTTP."""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np

import stabledrl_cli as sd


def small_run(path: Path, *, world_size: int = 2, steps: int = 9, corrupt: bool = True) -> Path:
    """A token run over `world_size` ranks with noise-floor steps, a sketch step, and (corrupt)
    step 5's data corrupted on rank 0 (skipped by every reader)."""
    rng = np.random.default_rng(3)
    for rank in range(world_size):
        with sd.Recorder(
            path, policy="grpo", reward_range=(0.0, 1.0), world_size=world_size, rank=rank
        ) as rec:
            for step in range(steps):
                logp = -rng.random((4, 6)).astype(np.float32) * 2
                extra = {"unit_grad_sketch": rng.normal(size=(24, 4)).astype(np.float32)}
                rec.log_step(
                    step,
                    logp=logp,
                    logp_old=logp + rng.normal(scale=0.1, size=(4, 6)).astype(np.float32),
                    advantages=rng.standard_normal(4).astype(np.float32),
                    mask=rng.random((4, 6)) > 0.1,
                    group_id=np.array([0, 0, 1, 1]),
                    reward=rng.random(4).astype(np.float32),
                    grad_norm=1.0 + step,
                    loss=0.1 * step,
                    inner_step=step % 2,
                    **(extra if step == 4 else {}),
                )
    if corrupt:
        victim = next((path / "steps").glob("step-00000005*"))
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0xFF
        victim.write_bytes(bytes(data))
    return path


def to_memory(local: Path) -> str:
    """A copy of a run directory or file on fsspec's in-memory filesystem -> its URL."""
    memory = fsspec.filesystem("memory")
    root = f"/{uuid.uuid4().hex}/{local.name}"
    if local.is_file():
        memory.pipe(root, local.read_bytes())
    for file in sorted(local.rglob("*")):
        if file.is_file():
            memory.pipe(f"{root}/{file.relative_to(local).as_posix()}", file.read_bytes())
    return f"memory://{root.lstrip('/')}"


def count_reads(monkeypatch) -> tuple[list[str], list[str]]:
    """From now on, the paths read by fsspec's in-memory filesystem: (each whole-file read's,
    each ranged read's, a header's)."""
    whole: list[str] = []
    ranged: list[str] = []
    original = fsspec.implementations.memory.MemoryFileSystem.cat_file

    def counting(self, path, start=None, end=None, **kwargs):
        (whole if start is None and end is None else ranged).append(path)
        return original(self, path, start=start, end=end, **kwargs)

    monkeypatch.setattr(fsspec.implementations.memory.MemoryFileSystem, "cat_file", counting)
    return whole, ranged


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Python's file server, which (3.11) ignores `Range`: a ranged GET gets the whole file."""

    def log_message(self, *args) -> None:
        pass


class _RangeHandler(_QuietHandler):
    """Python's file server answering a ranged GET with its bytes (206), as a store does."""

    def send_head(self):
        path = Path(self.translate_path(self.path))
        asked = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if asked is None or not path.is_file():
            return super().send_head()
        data = path.read_bytes()
        start = int(asked[1])
        body = data[start : int(asked[2]) + 1 if asked[2] else len(data)]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)


@contextlib.contextmanager
def served(folder: Path, *, ranges: bool = True, host: str = "127.0.0.1") -> Iterator[str]:
    """`folder` served over HTTP on `host` (an IPv6 one such as `::1` too), ranged reads
    answered (`ranges`) or given the whole file -> its URL (no slash)."""
    kind = _RangeHandler if ranges else _QuietHandler
    with _serving(functools.partial(kind, directory=str(folder)), host) as url:
        yield url


def ipv6_loopback() -> bool:
    """Whether this machine can serve on IPv6's loopback address `::1`."""
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def answering(status: int) -> Iterator[str]:
    """A server on 127.0.0.1 that answers every request with `status` -> its URL."""

    class Answer(_QuietHandler):
        def send_head(self):
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    with _serving(Answer) as url:
        yield url


@contextlib.contextmanager
def stalled() -> Iterator[str]:
    """A host on 127.0.0.1 that accepts every connection and never answers -> its URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        for connection in held:
            connection.close()


class _QuietServer(http.server.ThreadingHTTPServer):
    """A server whose dropped connections (a client that stops reading) print nothing: its
    thread's stderr is the command's under CliRunner."""

    def handle_error(self, request, client_address):
        pass


class _QuietServer6(_QuietServer):
    """`_QuietServer` on an IPv6 address."""

    address_family = socket.AF_INET6


@contextlib.contextmanager
def _serving(handler, host: str = "127.0.0.1") -> Iterator[str]:
    server = (_QuietServer6 if ":" in host else _QuietServer)((host, 0), handler)
    # shutdown() waits for the loop's next poll: 0.5 s by default, a second a test of two servers
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield f"http://{f'[{host}]' if ':' in host else host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
