"""A free TCP port for the torch.distributed processes a test starts: a fixed port collides
when two such tests run at once (pytest -n 2, or two checkouts on one machine)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
