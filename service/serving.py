"""``boxoffice serve``: uvicorn worker processes sharing one listening socket, each watching it through
``accept_descriptors`` descriptors.

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
"""

from __future__ import annotations

import logging
from typing import Any

from service.settings import Settings

log = logging.getLogger("boxoffice.serving")
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

    Raises SystemExit as uvicorn does: port in use, a worker that fails at start-up. As with ``uvicorn.run``
    for several workers, the socket is bound before the app starts (so uvicorn's "running on" line comes
    first), and ``--host ::`` listens on IPv4 too.
    """
    import uvicorn

    options = uvicorn_options(settings, host=host, port=port, workers=workers)
    config = uvicorn.Config(APP, **options)
    sockets = listening_descriptors(config.bind_socket(), settings.accept_descriptors)
    try:
        if workers == 1:
            uvicorn.Server(config).run(sockets=sockets)
            return
        try:
            from uvicorn.supervisors import Multiprocess

            supervisor = Multiprocess(config, sockets=sockets)
        except (ImportError, TypeError) as exc:  # another uvicorn: serve its own way, one descriptor
            log.warning("uvicorn's supervisor is not as expected (%s): one accept descriptor a worker", exc)
            close_all(sockets)
            uvicorn.run(APP, **options)
            return
        supervisor.run()
    except KeyboardInterrupt:
        pass  # uvicorn raises the SIGINT again once it has shut down; uvicorn.run swallows it too
    finally:
        close_all(sockets)


def listening_descriptors(sock: Any, n: int) -> list[Any]:
    """``sock`` and ``n - 1`` duplicates of it: one listening socket, ``n`` descriptors (libuv handles)."""
    return [sock, *(sock.dup() for _ in range(n - 1))]


def close_all(sockets: list[Any]) -> None:
    for s in sockets:
        s.close()
