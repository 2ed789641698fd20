"""Responses written once per event-loop iteration: uvicorn's HTTP protocol with coalesced writes.

uvicorn writes a response's head when the app sends ``http.response.start`` and its body when it sends
``http.response.body``: two ``write`` calls, which uvloop passes to the kernel at once, one ``send`` each.
A small JSON response thus costs two system calls and two TCP segments. Each response leaves on its own,
between the Python work of the next requests. Every segment can wake the client, and waking a process on
another CPU of a VM costs an inter-processor interrupt.

``CoalescingHTTPProtocol`` is uvicorn's own protocol (``AutoHTTPProtocol``: httptools, else h11) with one
change: its transport keeps what is written during the current event-loop iteration. One callback, at the
start of the next iteration (``loop.call_soon``), hands each connection's bytes to the real transport in one
``write``, for all connections together. The holds whose Redis replies came back together thus leave in one
burst. ``boxoffice serve`` uses it unless ``BOXOFFICE_COALESCE_WRITES=false``.

Measured (loadtests/RESULTS.md), interleaved A/B on 2 cores with the load generator beside: holds/s +27 % and
``/healthz`` +47 %. A hold's API CPU fell from 73 to 61 us and the load generator's from 20 to 10 us, and
hold p99 at 100 clients fell from 12.4 to 8.9 ms.

What is kept, and when it leaves:

* Bytes keep their order per connection. They reach the real transport at the start of the next iteration, or
  at once when a connection keeps ``MAX_KEPT_BYTES`` or more. That way flow control still works: the real
  transport pauses a large or streaming response (``pause_writing``), as it would without this.
* ``write`` copies what it keeps, and raises ``TypeError`` for anything but bytes-like data, in the caller,
  as the transport would.
* ``close`` and ``write_eof`` write what is kept first. ``abort`` drops it, as it drops the transport's
  own buffer.
* A client that half-closes (sends EOF after its request) gets what uvicorn's own protocol sends it.
  uvicorn answers ``eof_received`` with None, so uvloop closes the transport at once. ``eof_received``
  therefore writes what is kept first, and a write to a transport that is closing goes straight through.
  Once the connection is lost, uvloop refuses writes (``RuntimeError``), and what is kept is dropped.
* A connection whose write fails at the start of the next iteration is aborted and the failure goes to the
  loop's exception handler; the other connections are written all the same.
* Limit: a loop closed while a flush is still scheduled (``run_until_complete``, then ``close``) stays in
  ``_pending`` until the process ends. uvicorn, ``asyncio.run`` and uvloop run the flush first.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

MAX_KEPT_BYTES = 65536
"""Past this many bytes kept for one connection, they go to the real transport at once (uvicorn's own
high-water mark for pausing the app, ``uvicorn.protocols.http.flow_control.HIGH_WATER_LIMIT``)."""

_pending: dict[asyncio.AbstractEventLoop, list[_CoalescingTransport]] = {}
"""Per loop, the transports holding bytes, in the order they were first written to this iteration."""


def _flush_loop(loop: asyncio.AbstractEventLoop) -> None:
    for transport in _pending.pop(loop, ()):
        try:
            transport.flush()
        except Exception as exc:  # this connection only: the others are still written
            loop.call_exception_handler(
                {"message": "coalesced response write failed", "exception": exc, "transport": transport}
            )
            transport.abort()


class _CoalescingTransport:
    """Wraps a transport; ``write`` keeps the bytes until ``flush`` (see the module docstring)."""

    __slots__ = ("_transport", "_loop", "_kept", "_kept_bytes")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._kept: list[bytes] = []
        self._kept_bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if type(data) is not bytes:
            if not isinstance(data, bytearray | memoryview):
                raise TypeError(f"data must be bytes-like, not {type(data).__name__}")
            data = bytes(data)  # a copy: the caller may reuse its buffer
        if not data:
            return
        if self._transport.is_closing():  # the client half-closed: answer now, before the connection is lost
            self._kept.append(data)
            self.flush()
            return
        if not self._kept:
            waiting = _pending.get(self._loop)
            if waiting is None:
                waiting = _pending[self._loop] = []
                self._loop.call_soon(_flush_loop, self._loop)
            waiting.append(self)
        self._kept.append(data)
        self._kept_bytes += len(data)
        if self._kept_bytes >= MAX_KEPT_BYTES:
            self.flush()  # a large or streaming body: the real transport's flow control takes over

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        """Hand what is kept to the real transport in one write. Once the connection is lost (uvloop raises
        RuntimeError on a closed handle; asyncio ignores the write) the bytes are dropped."""
        if not self._kept:
            return
        kept, self._kept, self._kept_bytes = self._kept, [], 0
        data = kept[0] if len(kept) == 1 else b"".join(kept)
        try:
            self._transport.write(data)
        except RuntimeError:
            if not self._transport.is_closing():
                raise

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._kept, self._kept_bytes = [], 0
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._kept_bytes

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def __getattr__(self, name: str) -> Any:  # the rest of the Transport interface, unchanged
        return getattr(self._transport, name)


class CoalescingHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP/1.1 protocol whose writes are coalesced per event-loop iteration. Use it as
    ``uvicorn.Config(http="service.coalesce:CoalescingHTTPProtocol")``."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(_CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]

    def eof_received(self) -> bool | None:
        # The client half-closed. uvicorn's answer (None) makes the transport close now, and bytes written
        # after that are not sent: write what this iteration kept first, as uvicorn wrote it at once.
        self.transport.flush()
        return super().eof_received()
