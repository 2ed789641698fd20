"""``boxoffice serve``: uvicorn worker processes, each with a listening socket of its own in one
``SO_REUSEPORT`` group (or all sharing one), each watching its socket through ``accept_descriptors``
descriptors.

Why more than one: libuv, under uvloop, accepts one connection per listening handle per event-loop iteration
since libuv 1.45 (https://github.com/libuv/libuv/pull/3696; the same change slowed Node.js 20,
https://github.com/nodejs/performance/issues/95). A worker busy serving requests runs few iterations a second,
so it took in only some 50-100 new connections a second. When 1,000 clients connected at once to a loaded
server, the last ones waited seconds in the kernel's accept queue before their first request was even read:
``GET /healthz`` p99 1.2-2.9 s, with 660 of them still queued 0.3 s into the run and 446 at 2 s
(loadtests/RESULTS.md; 0.11-0.13 s and an empty queue at 0.3 s with 32 descriptors). A
flash sale is exactly that: every buyer connects within seconds. Each descriptor (a ``dup`` of the one
socket) is a libuv handle of its own, so one iteration accepts up to ``accept_descriptors`` connections.

A descriptor costs nothing while no connection waits. A new connection costs up to workers x
``accept_descriptors`` ``accept`` calls that find nothing (each woken worker tries each descriptor once);
10,000 new connections a second (``Connection: close``) ran as fast with 16 or 64 descriptors as with one.

uvicorn has no option for this, so ``run`` does what ``uvicorn.run`` does for a port (bind the socket, then
``uvicorn.supervisors.Multiprocess`` for several workers, ``Server.run`` for one) with the extra descriptors.
If the installed uvicorn has no such supervisor, or one that takes other arguments (its signature changed in
2026), it logs so and serves through ``uvicorn.run``.

Why each worker has a socket of its own (``reuse_port``, on by default on Linux): workers that share one
listening socket race to accept, and a worker that wakes first takes up to ``accept_descriptors`` connections
at once. With ``--workers 2`` and wrk's 100 connections, one worker held 61-93 of them in 10 runs of 20, and
59-77 in 5 runs of 12 of a later A/B (loadtests/RESULTS.md); the worker with more connections makes its
clients wait longer, and that is the p99 of a closed-loop load. With ``SO_REUSEPORT`` every worker binds its
own socket to the same address and the kernel hands each new connection to one of them by a hash of its
addresses (socket(7), "SO_REUSEPORT"; Linux 3.9+), as nginx's ``listen ... reuseport`` does: even on average,
as coin flips are. The supervisor keeps a socket bound to the port but never listening on it (``port_holder``):
it holds the port while no worker listens and receives nothing.

The price: a connection waits for the worker it was given, even while another is idle, and a worker that
stops (a crash, or uvicorn's supervisor retiring it on SIGHUP, SIGTTOU or a failed health check) closes its
socket, and Linux resets the connections still queued in it, unless ``net.ipv4.tcp_migrate_req`` is 1
(Linux 5.14+, ip-sysctl.rst), which hands them to another socket of the group. ``run`` logs that at start-up.
New connections go to the other workers until the replacement has bound a new socket.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any

from service.settings import Settings

# uvicorn.Config sets up uvicorn's loggers in this process (boxoffice's own logging is set up in the workers),
# so what the supervisor says goes where uvicorn's "running on" line goes.
log = logging.getLogger("uvicorn.error")
APP = "service.app:create_app"
COALESCING_PROTOCOL = "service.coalesce:CoalescingHTTPProtocol"


def uvicorn_options(settings: Settings, *, host: str, port: int, workers: int) -> dict[str, Any]:
    """The options ``boxoffice serve`` gives uvicorn (``uvicorn.Config`` and ``uvicorn.run`` take the same)."""
    return {
        "factory": True,
        "host": host,
        "port": port,
        "workers": workers,
        "log_level": settings.log_level.lower(),
        "access_log": False,
        "timeout_graceful_shutdown": 10,
        "timeout_keep_alive": settings.keep_alive_seconds,
        "http": COALESCING_PROTOCOL if settings.coalesce_writes else "auto",
    }


def run(settings: Settings, *, host: str, port: int, workers: int) -> None:
    """Serve the API until SIGINT / SIGTERM, then return (as ``uvicorn.run`` does, a Ctrl-C is not an error).

    Raises SystemExit with uvicorn's start-up failure code (3) if the port is taken or a worker fails at
    start-up (e.g. PostgreSQL unreachable); ``uvicorn.run`` returns normally for the latter with several
    workers, which a process manager would take for a clean stop. As with ``uvicorn.run`` for several
    workers, the port is bound before the app starts (so uvicorn's "running on" line comes first), and
    ``--host ::`` listens on IPv4 too. With several workers and ``settings.reuse_port`` on Linux, each worker
    listens on a socket of its own (``WorkerListeners``); otherwise all share the one bound here.
    """
    import uvicorn

    options = uvicorn_options(settings, host=host, port=port, workers=workers)
    config = uvicorn.Config(APP, **options)
    # logs "running on"; exits with uvicorn's start-up failure code if the port is taken
    bound = config.bind_socket()
    if workers > 1 and settings.reuse_port and reuse_port_supported():
        family, address = bound.family, bound.getsockname()[:2]  # the port resolved, were it 0
        bound.close()
        held = [port_holder(family, address)]
        sockets: list[Any] = WorkerListeners(family, address, settings.accept_descriptors)
        if read_sysctl("net/ipv4/tcp_migrate_req") == "0":
            log.info(
                "each worker listens on a socket of its own; a worker that stops resets the connections "
                "queued in its socket (sysctl net.ipv4.tcp_migrate_req=1 hands them to another worker)"
            )
    else:
        sockets = listening_descriptors(bound, settings.accept_descriptors)
        held = sockets
    try:
        if workers == 1:
            with _sigterm_returns():
                uvicorn.Server(config).run(sockets=sockets)
            return
        try:
            from uvicorn.supervisors import Multiprocess

            supervisor = Multiprocess(config, sockets=sockets)
        except (ImportError, TypeError) as exc:  # another uvicorn: serve its own way, one descriptor
            log.warning("uvicorn's supervisor is not as expected (%s): one accept descriptor a worker", exc)
            close_all(held)
            uvicorn.run(APP, **options)
            return
        supervisor.run()
        if any(p.exitcode == _startup_failure() for p in getattr(supervisor, "processes", [])):
            sys.exit(_startup_failure())  # uvicorn's supervisor returns normally; one worker's Server exits 3
    except KeyboardInterrupt:
        pass  # uvicorn raises the SIGINT again once it has shut down; uvicorn.run swallows it too
    finally:
        close_all(held)


class _Terminated(Exception):
    """SIGTERM arrived: stop serving and return, as on SIGINT."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated


@contextlib.contextmanager
def _sigterm_returns() -> Iterator[None]:
    """Around one worker's ``Server.run``: a SIGTERM ends it as SIGINT does, and ``run`` returns.

    uvicorn's Server shuts down on SIGTERM, then raises the signal again with the handler it found
    (``Server.capture_signals``, since uvicorn 0.29): with Python's default one the process died there (exit
    143) and skipped its clean-up, such as removing its metrics folder. Several workers' supervisor returns
    on SIGTERM; now one worker does too."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except _Terminated:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def reuse_port_supported() -> bool:
    """Linux balances new connections over a ``SO_REUSEPORT`` group; some systems that have the option do
    not (macOS gives them all to one socket), so there the workers share one socket instead."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def read_sysctl(name: str) -> str | None:
    """The value of a sysctl (``name`` as under /proc/sys), or None where there is no such file."""
    try:
        with open(f"/proc/sys/{name}") as f:
            return f.read().strip()
    except OSError:
        return None


def reuse_port_socket(family: int, address: tuple[str, int], *, reuse_address: bool = True) -> socket.socket:
    """A TCP socket with ``SO_REUSEPORT`` (and ``SO_REUSEADDR`` unless told not to), bound to ``address`` and
    not yet listening.

    Raises OSError if the address is taken by a socket outside the group (one without ``SO_REUSEPORT`` or of
    another user)."""
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def port_holder(family: int, address: tuple[str, int]) -> socket.socket:
    """The supervisor's socket in the group: bound, never listening, so the kernel gives it no connection
    (only listening sockets take part in the balancing), and the port stays taken while no worker listens
    (at start-up, or while every worker restarts).

    It is bound without ``SO_REUSEADDR``: a bound socket that has it does not stop another program's socket
    with ``SO_REUSEADDR`` (as most servers set, uvicorn included) from binding and listening on the port,
    whatever its user. If that bind fails because connections of an earlier server without ``SO_REUSEPORT``
    linger in TIME_WAIT on the port, it binds with ``SO_REUSEADDR`` after all, and says so: then, for as long
    as this serve runs, another program can take the port while no worker listens (its workers then fail to
    bind, and serve exits 3), and a second ``boxoffice serve`` started at the same instant may join the group.
    Exits with uvicorn's start-up failure code if it cannot be bound."""
    try:
        try:
            return reuse_port_socket(family, address, reuse_address=False)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            log.warning(
                "%s is still in use (TIME_WAIT of a server without SO_REUSEPORT?): the port is held with "
                "SO_REUSEADDR, which keeps other servers off it only while a worker listens",
                address,
            )
            return reuse_port_socket(family, address)
    except OSError as exc:
        log.error("cannot bind %s for the workers' SO_REUSEPORT group: %s", address, exc)
        sys.exit(_startup_failure())


class WorkerListeners(list):
    """The listening descriptors of one worker, bound in the worker itself.

    uvicorn's supervisor hands every worker it starts (and restarts) the same ``sockets`` list, pickled into
    the new process. This list is empty in the supervisor and pickles as a call to ``bind_worker_listeners``,
    so each worker unpickles a socket of its own: ``descriptors`` descriptors of one new ``SO_REUSEPORT``
    socket bound to ``address`` (uvicorn then listens on each). ``family`` and ``address`` are those of the
    socket the supervisor bound first (``address`` is ``(host, port)``, the port already resolved).
    """

    def __init__(self, family: int, address: tuple[str, int], descriptors: int) -> None:
        super().__init__()
        self.family, self.address, self.descriptors = family, address, descriptors

    def __reduce__(self) -> tuple[Any, tuple[int, tuple[str, int], int]]:
        return bind_worker_listeners, (self.family, self.address, self.descriptors)


def bind_worker_listeners(family: int, address: tuple[str, int], descriptors: int) -> list[socket.socket]:
    """In a new worker: a ``SO_REUSEPORT`` socket bound to ``address``, as ``descriptors`` descriptors.

    If the bind fails, the worker exits with uvicorn's start-up failure code, on which uvicorn's supervisor
    stops instead of restarting it again and again."""
    try:
        return listening_descriptors(reuse_port_socket(family, address), descriptors)
    except OSError as exc:
        log.error("cannot bind %s: %s", address, exc)
        sys.exit(_startup_failure())


def _startup_failure() -> int:
    from uvicorn.config import STARTUP_FAILURE

    return STARTUP_FAILURE


def listening_descriptors(sock: Any, n: int) -> list[Any]:
    """``sock`` and ``n - 1`` duplicates of it: one listening socket, ``n`` descriptors (libuv handles)."""
    return [sock, *(sock.dup() for _ in range(n - 1))]


def close_all(sockets: list[Any]) -> None:
    for s in sockets:
        s.close()
