"""The Ray engine: a replay's streaming pass sharded across the workers of a Ray cluster.

`RayEngine().stream(...)` cuts the run's listing into shards (`shards.plan_shards`), runs
`shards.stream_shard` on each as a Ray task (one CPU each; one GPU each on `cuda`), and joins
the shards' per-step rows in step order (`shards.merge_streams`); `engine.replay_run` then
computes everything run-level on the driver, as for a local replay, so the result is the local
one byte for byte. A worker that dies mid-shard (killed, out of memory, its node lost) is
replaced and its shard computed again from the start by Ray (`SHARD_RETRIES` times): a shard's
rows are taken once, from the attempt that finished; a shard whose last attempt died too ends the
replay (`WorkerDiedError`, exit 71, naming its steps). An error of the tool itself in a shard
(a step lacking a field a policy needs) is not retried: it is raised on the driver as it would be
locally, and the other shards are cancelled.

Every worker opens the run from its `Run.source`: the same path on every node (a shared file
system) or a URL every node can read (fsspec, `docs/scaling.md`), and needs the same stabledrl
version (a shard refuses another).

`ray` is an optional extra (`pip install 'stabledrl[ray]'`); it is imported only when the
engine runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TypeVar
from urllib.parse import urlsplit

from stabledrl_cli._device import resolve_device
from stabledrl_cli._process import usable_cpus
from stabledrl_cli.dump import Run
from stabledrl_cli.errors import (
    ConfigError,
    MissingExtraError,
    UsageError,
    WorkerDiedError,
    described,
    install_command,
    task_cause,
)
from stabledrl_cli.policies import Policy
from stabledrl_cli.replay.config import ReplayConfig, check_workers
from stabledrl_cli.replay.shards import (
    WORKER_ADVICE,
    ShardTask,
    merge_streams,
    shard_named,
    shard_tasks,
    stream_shard,
)
from stabledrl_cli.replay.stream import StreamedRun

INSTALL_HINT = install_command("ray")
SHARD_RETRIES = 3
"""Times Ray computes a shard again after the worker computing it died."""
JOIN_SECONDS = 10.0
"""How long the driver waits for a cluster's address to accept a connection before it gives up
(Ray itself retries an address that refuses for many minutes)."""

Rows = TypeVar("Rows")


def require_ray() -> ModuleType:
    """The `ray` module; MissingExtraError (exit 2) with the install command without it."""
    try:
        import ray
    except ImportError:
        raise MissingExtraError(f"the Ray engine needs ray: {INSTALL_HINT}") from None
    module: ModuleType = ray
    return module


@dataclass
class RayEngine:
    """A replay's streaming pass on a Ray cluster (module docstring).

    address: the cluster to join (None: `RAY_ADDRESS`, else a local cluster of `workers`
    CPUs started for this replay and stopped after it; "auto": the local node's running one).
    workers: shards computed at once (None: the cluster's CPUs).
    shard_fn: what a worker runs on a shard (`shards.stream_shard`).
    """

    address: str | None = None
    workers: int | None = None
    shard_fn: Callable[[ShardTask], StreamedRun] = field(default=stream_shard, repr=False)

    def __post_init__(self) -> None:
        check_workers(self.workers)

    def stream(
        self,
        run: Run,
        policies: list[Policy],
        own_index: int | None,
        config: ReplayConfig,
        progress: Callable[[int], None] | None,
    ) -> StreamedRun:
        """Every policy over every readable step of `run`, shard by shard on the cluster."""
        ray = require_ray()
        if urlsplit(run.source).scheme == "memory":
            raise UsageError(
                f"{run.location}: a memory:// run lives in this process only, so Ray's workers "
                "cannot read it: replay it with the local engine, or from a path or URL every "
                "node can read"
            )
        if str(config.device).startswith("cuda") and _starts_a_cluster(ray, self.address):
            resolve_device(config.device)  # its node is this one: refused before it starts
        with _cluster(ray, self.address, self.workers) as workers:
            tasks, sizes = shard_tasks(run, policies, own_index, config, workers)
            gpus = 1 if str(config.device).startswith("cuda") else 0
            if gpus and not ray.cluster_resources().get("GPU"):
                raise UsageError("device cuda was asked for, but the Ray cluster has no GPU")
            parts = map_shards(
                ray,
                self.shard_fn,
                tasks,
                sizes,
                progress,
                gpus,
                workers=workers,
                location=run.location,
            )
        return merge_streams(run, parts, len(policies))


@contextlib.contextmanager
def _cluster(ray: ModuleType, address: str | None, workers: int | None) -> Iterator[int]:
    """Joins (or starts) the cluster: -> the shards to compute at once; leaves only a cluster
    it joined. Meanwhile stdout is stderr: Ray prints its notes (a worker died, a task is
    retried) on stdout, which holds the replay's data."""
    with contextlib.redirect_stdout(sys.stderr):
        started = False
        if not ray.is_initialized():
            address = _asked_address(address)
            options: dict[str, Any] = {
                "include_dashboard": False,
                "logging_level": logging.ERROR,
                "log_to_driver": False,
            }
            if address is None:  # a new cluster, even beside one that `ray start` left running
                address = "local"
                options["num_cpus"] = _local_workers(workers)
            else:
                _require_reachable(address)
            sigterm = _sigterm_handler()
            try:
                try:
                    with _ctrl_c_held() as held:
                        ray.init(address=address, **options)
                finally:
                    _restore_sigterm(sigterm)
            except Exception as exc:  # Ray's own errors include a bare Exception (node start)
                where = "a new local cluster" if address == "local" else address
                raise UsageError(
                    f"cannot start or join the Ray cluster ({where}): {_join_error(exc)}"
                ) from None
            except SystemExit as stop:  # Ray's handler while it starts: sys.exit(SIGTERM)
                if stop.code != signal.SIGTERM:
                    raise
                ray.shutdown()  # the processes its node started
                signal.raise_signal(signal.SIGTERM)  # to the handler Ray's replaced
                raise
            except KeyboardInterrupt:  # a second Ctrl-C while it starts (`_ctrl_c_held`)
                ray.shutdown()  # what its node started so far, as far as Ray knows it
                raise
            started = True
        try:
            if started and held.is_set():
                raise KeyboardInterrupt  # the Ctrl-C held while it started: stopped now
            yield workers or max(int(ray.cluster_resources().get("CPU", 1)), 1)
        finally:
            if started:
                ray.shutdown()


@contextlib.contextmanager
def _ctrl_c_held() -> Iterator[threading.Event]:
    """Inside: a first Ctrl-C is held, set on the event it yields, and a second one raises
    KeyboardInterrupt at once. While `ray.init` starts a node, a KeyboardInterrupt cut it short
    before Ray knew of its processes, and `ray.shutdown` left its agents (`ray::DashboardAgent`,
    `ray::RuntimeEnvAgent`) running for good; held, the cluster starts and is then stopped. Only
    Python's own Ctrl-C handler in the main thread is replaced: an ignored SIGINT (a shell's
    background job) or a caller's handler stays as it is."""
    held = threading.Event()
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield held
        return

    def hold(signum: int, frame: object) -> None:
        if held.is_set():
            raise KeyboardInterrupt
        held.set()

    signal.signal(signal.SIGINT, hold)
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _asked_address(address: str | None) -> str | None:
    """The cluster to join: `address`, else `RAY_ADDRESS`; None for a new local one."""
    return address or os.environ.get("RAY_ADDRESS") or None


def _starts_a_cluster(ray: ModuleType, address: str | None) -> bool:
    """Whether the replay starts a new local cluster (on this node) rather than joining one."""
    return not ray.is_initialized() and _asked_address(address) is None


def _join_error(exc: Exception) -> str:
    """Ray's error from `ray.init`, with what its cause says: Ray's `Failed to connect to Ray
    cluster at ADDR` holds nothing else, the cause (a traceback as text) the error itself, its
    first sentence kept; for a token refused, what the driver needs."""
    why = str(exc)
    cause = str(exc.__cause__ or "").strip()
    if cause:
        last = cause.splitlines()[-1].removeprefix("ray.exceptions.").split(". ")[0]
        why = f"{why} ({last})"
    if "InvalidAuthToken" in why:
        why += (
            "; a cluster that `ray start` started takes a driver with RAY_AUTH_MODE=token and "
            "its token (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)"
        )
    return why


def _sigterm_handler() -> signal.Handlers | Callable[..., Any] | int | None:
    """SIGTERM's handler now, None where it cannot be set again (outside the main thread, or
    one not set from Python)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.getsignal(signal.SIGTERM)


def _restore_sigterm(handler: signal.Handlers | Callable[..., Any] | int | None) -> None:
    """SIGTERM's handler from before `ray.init` put Ray's in its place: Ray's driver aborted the
    process on SIGTERM (exit 134, a C++ stack trace on stderr) or exited 1, leaving its agent
    processes running; the command's own (`stopped_by_sigterm`) stops the cluster first."""
    if handler is not None:
        signal.signal(signal.SIGTERM, handler)


def _local_workers(workers: int | None) -> int:
    """The CPUs of a local cluster started for `workers` (None: those this process may use,
    `usable_cpus`): at most one worker a CPU, since a local cluster of more would start a
    process for each."""
    cpus = usable_cpus()
    if workers is not None and workers > cpus:
        raise ConfigError(
            "workers",
            f"{workers}: a local Ray cluster runs one worker a CPU and this process may use "
            f"{cpus}; join a larger cluster with --ray-address (or RAY_ADDRESS)",
        )
    return workers or cpus


def _require_reachable(address: str) -> None:
    """UsageError unless `address` ("host:port" or "ray://host:port"; "auto" and other forms are
    left to Ray) accepts a TCP connection and answers as a gRPC server does (Ray's GCS and its
    client server are gRPC servers), within `JOIN_SECONDS` in all: one whose port is not one (out
    of range, not a number), whose host is malformed, or that answers as another server (the
    dashboard's HTTP port) or not at all, is refused, where Ray would wait on it for minutes."""
    try:
        parts = urlsplit(address if "://" in address else f"//{address}")
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise UsageError(f"cannot join the Ray cluster at {address}: {exc}") from None
    if host is None or port is None:
        return
    deadline = time.monotonic() + JOIN_SECONDS
    try:
        sock = socket.create_connection((host, port), timeout=JOIN_SECONDS)
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise UsageError(f"cannot join the Ray cluster at {address}: {why}") from None
    answer = b""
    with sock:
        if _tls():  # a TLS cluster's server takes a handshake first: left to Ray
            return
        try:
            sock.sendall(_HTTP2_PREFACE)
            while len(answer) < _FRAME_HEADER:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = sock.recv(_FRAME_HEADER - len(answer))
                if not chunk:
                    break
                answer += chunk
        except TimeoutError:
            raise UsageError(
                f"cannot join the Ray cluster at {address}: it accepts a connection but gave no "
                f"answer within {JOIN_SECONDS:g} s; {_RAY_PORTS}"
            ) from None
        except OSError:  # reset by a server that does not speak HTTP/2: no answer, below
            pass
    if len(answer) < _FRAME_HEADER or answer[3] != _SETTINGS:
        raise UsageError(
            f"cannot join the Ray cluster at {address}: it answers, but not as Ray does "
            f"(gRPC); {_RAY_PORTS}"
        )


_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
"""What an HTTP/2 (gRPC) client sends first: the connection preface and an empty SETTINGS frame,
to which a gRPC server answers with a SETTINGS frame of its own."""
_FRAME_HEADER = 9
_SETTINGS = 4
_RAY_PORTS = (
    "give the head node's GCS address (host:6379 by default) or its Ray Client's "
    "(ray://host:10001), not the dashboard's (8265)"
)


def _tls() -> bool:
    """Whether Ray's connections use TLS (`RAY_USE_TLS`, as Ray reads it)."""
    return os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")


def map_shards(
    ray: ModuleType,
    fn: Callable[[ShardTask], Rows],
    tasks: Sequence[ShardTask],
    sizes: Sequence[int],
    progress: Callable[[int], None] | None = None,
    gpus: int = 0,
    *,
    workers: int,
    location: str,
) -> list[Rows]:
    """`fn` over `tasks` as Ray tasks, at most `workers` at once (a joined cluster would run one
    a CPU of it), -> their results in task order; `progress(sizes[i])` as task i finishes. A
    task whose worker died is retried (`SHARD_RETRIES`), and one whose last attempt died too
    raises WorkerDiedError naming it (and the run's `location`); the tool's own error in one is
    raised here. Once a task fails, the tasks before it are waited for and the later ones
    cancelled or never started, and the first failing task's error in task order is raised (a
    local replay raises its first step's error, not the first to arrive)."""
    lost = (
        ray.exceptions.WorkerCrashedError,
        ray.exceptions.OutOfMemoryError,
        ray.exceptions.NodeDiedError,
    )
    remote = ray.remote(fn).options(
        num_cpus=1, num_gpus=gpus, max_retries=SHARD_RETRIES, retry_exceptions=False
    )
    index: dict[Any, int] = {}
    results: dict[int, Rows] = {}
    failed: dict[int, Exception] = {}
    pending: list[Any] = []
    while True:
        first_failed = min(failed, default=len(tasks))
        while len(index) < first_failed and len(pending) < workers:
            ref = remote.remote(tasks[len(index)])
            index[ref] = len(index)
            pending.append(ref)
        waited = [ref for ref in pending if index[ref] < first_failed]
        if not waited:
            break
        done, _ = ray.wait(waited, num_returns=1)
        pending.remove(done[0])
        i = index[done[0]]
        try:
            results[i] = ray.get(done[0])
        except ray.exceptions.RayError as exc:
            failed[i] = exc
            continue
        if progress is not None:
            progress(sizes[i])
    if not failed:
        return [results[i] for i in range(len(tasks))]
    for ref in pending:
        ray.cancel(ref, force=True)
    i = min(failed)
    first = failed[i]
    if isinstance(first, lost):
        raise WorkerDiedError(
            f"{location}: a Ray worker died while computing "
            f"{shard_named(tasks[i], i, len(tasks))}, after Ray's retries of it "
            f"({described(first)}); {WORKER_ADVICE}"
        ) from None
    cause = task_cause(first)
    if cause is not None:
        raise cause from None
    raise first
