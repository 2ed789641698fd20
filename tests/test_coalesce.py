"""Coalesced response writes (service/coalesce.py): one write per connection per event-loop iteration, bytes in
order, nothing lost on close, and ``boxoffice serve`` uses it unless told not to (its pipelined requests
through a real server: tests/test_serving.py).

What it is worth in throughput is measured in loadtests/RESULTS.md, not asserted here.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.responses import JSONResponse
from uvicorn import Config
from uvicorn.protocols.http.auto import AutoHTTPProtocol
from uvicorn.server import ServerState

from service.coalesce import MAX_KEPT_BYTES, CoalescingHTTPProtocol, _CoalescingTransport
from service.serving import COALESCING_PROTOCOL, uvicorn_options
from service.settings import Settings


class RecordingTransport(asyncio.Transport):
    """Records what reaches the kernel side: ("write", bytes), ("close",), ("abort",)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, ...]] = []
        self.closing = False
        self.lost = False  # as uvloop after connection_lost: writes raise RuntimeError

    def write(self, data: bytes) -> None:
        if self.lost:
            raise RuntimeError("unable to perform operation; the handler is closed")
        assert not self.closing, "written after close"
        self.calls.append(("write", bytes(data)))

    def close(self) -> None:
        self.closing = True
        self.calls.append(("close",))

    def abort(self) -> None:
        self.closing = True
        self.calls.append(("abort",))

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def writes(self) -> list[bytes]:
        return [c[1] for c in self.calls if c[0] == "write"]


async def next_iteration() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_the_writes_of_one_iteration_leave_in_one_write_per_connection_in_order():
    loop = asyncio.get_running_loop()
    a, b = RecordingTransport(), RecordingTransport()
    ta, tb = _CoalescingTransport(a, loop), _CoalescingTransport(b, loop)
    ta.write(b"HTTP/1.1 201 Created\r\n\r\n")
    tb.write(b"one")
    ta.write(b'{"hold_id":"h_1"}')
    tb.writelines([b"two", b"", b"three"])
    assert a.calls == [] and b.calls == []  # nothing before the iteration ends
    assert ta.get_write_buffer_size() == len(b"HTTP/1.1 201 Created\r\n\r\n") + len(b'{"hold_id":"h_1"}')
    await next_iteration()
    assert a.writes() == [b'HTTP/1.1 201 Created\r\n\r\n{"hold_id":"h_1"}']
    assert b.writes() == [b"onetwothree"]
    ta.write(b"later")  # a new iteration: a new flush is scheduled
    await next_iteration()
    assert a.writes()[-1] == b"later" and len(a.writes()) == 2


async def test_close_writes_what_is_kept_first_and_abort_drops_it():
    loop = asyncio.get_running_loop()
    a, b = RecordingTransport(), RecordingTransport()
    ta, tb = _CoalescingTransport(a, loop), _CoalescingTransport(b, loop)
    ta.write(b"last response")
    ta.close()  # Connection: close, keep-alive timeout, shutdown
    tb.write(b"never sent")
    tb.abort()
    await next_iteration()  # the scheduled flush finds nothing more to write
    assert a.calls == [("write", b"last response"), ("close",)]
    assert b.calls == [("abort",)]


async def test_a_lost_connection_drops_its_bytes_and_a_failed_write_aborts_only_its_own():
    loop = asyncio.get_running_loop()
    failures: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: failures.append(context))
    lost, broken, fine = RecordingTransport(), RecordingTransport(), RecordingTransport()
    t_lost, t_broken, t_fine = (_CoalescingTransport(t, loop) for t in (lost, broken, fine))
    t_lost.write(b"to a client that went away")
    t_broken.write(b"to a connection whose write fails")
    t_fine.write(b"to a client still there")
    lost.lost = lost.closing = True  # the peer went away before the flush
    broken.write = lambda data: (_ for _ in ()).throw(OSError("EPIPE"))  # type: ignore[method-assign]
    try:
        await next_iteration()
    finally:
        loop.set_exception_handler(None)
    assert lost.calls == []  # dropped quietly: nobody is there to read it
    assert broken.calls == [("abort",)] and isinstance(failures[0]["exception"], OSError)
    assert len(failures) == 1
    assert fine.writes() == [b"to a client still there"]


async def test_write_takes_only_bytes_like_data_and_copies_it():
    loop = asyncio.get_running_loop()
    a = RecordingTransport()
    ta = _CoalescingTransport(a, loop)
    with pytest.raises(TypeError):
        ta.write("a str body")  # type: ignore[arg-type]  # raised in the caller, as by the transport
    buffer = bytearray(b"AAAA")
    ta.write(buffer)
    buffer[:] = b"BBBB"  # a caller reusing its buffer
    ta.write(memoryview(buffer))
    await next_iteration()
    assert a.writes() == [b"AAAABBBB"]


async def test_a_large_body_goes_to_the_transport_at_once_so_flow_control_still_works():
    loop = asyncio.get_running_loop()
    a = RecordingTransport()
    ta = _CoalescingTransport(a, loop)
    chunk = b"x" * (MAX_KEPT_BYTES // 2)
    ta.write(chunk)
    assert a.writes() == []
    ta.write(chunk)  # MAX_KEPT_BYTES kept: written now, within the iteration, where the transport can pause
    assert a.writes() == [chunk + chunk]
    ta.write(b"tail")
    await next_iteration()
    assert a.writes() == [chunk + chunk, b"tail"]


def _protocol(cls: type, app) -> tuple[asyncio.Protocol, RecordingTransport]:
    config = Config(app=app, log_level="warning", lifespan="off")
    config.load()
    protocol = cls(config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop())
    transport = RecordingTransport()
    protocol.connection_made(transport)
    return protocol, transport


async def _hold_like(scope, receive, send) -> None:
    await JSONResponse({"hold_id": "h_1", "status": "active"}, status_code=201)(scope, receive, send)


@pytest.mark.parametrize(("cls", "writes_per_response"), [(CoalescingHTTPProtocol, 1), (AutoHTTPProtocol, 2)])
async def test_a_response_is_one_write_with_coalescing_and_two_without(cls, writes_per_response):
    """The second case is uvicorn's own protocol: it shows what coalescing changes (head and body apart)."""
    protocol, transport = _protocol(cls, _hold_like)
    protocol.data_received(b"POST /v1/events/e/holds HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}")
    for _ in range(10):
        await asyncio.sleep(0)
    writes = transport.writes()
    assert len(writes) == writes_per_response, writes
    response = b"".join(writes)
    assert response.startswith(b"HTTP/1.1 201 ") and response.endswith(b'{"hold_id":"h_1","status":"active"}')
    protocol.connection_lost(None)


async def test_a_client_that_half_closes_still_gets_its_answer():
    """A client may send its request and then shut down its side (EOF). uvicorn answers None to
    ``eof_received``, and uvloop then closes the transport: bytes kept past that would be lost."""

    async def ok(scope, receive, send) -> None:
        await JSONResponse({"status": "ok"})(scope, receive, send)

    protocol, transport = _protocol(CoalescingHTTPProtocol, ok)
    protocol.data_received(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    for _ in range(3):  # the app runs and writes; the flush is due at the start of the next iteration
        await asyncio.sleep(0)
        if transport.calls or protocol.transport._kept:
            break
    assert protocol.eof_received() is None
    transport.lost = transport.closing = True  # what uvloop does on that None
    await next_iteration()
    assert b"".join(transport.writes()).endswith(b'{"status":"ok"}')
    protocol.connection_lost(None)


def test_serve_uses_the_coalescing_protocol_unless_switched_off():
    options = uvicorn_options(Settings(), host="127.0.0.1", port=8000, workers=2)
    assert options["http"] == COALESCING_PROTOCOL
    options = uvicorn_options(Settings(coalesce_writes=False), host="127.0.0.1", port=8000, workers=2)
    assert options["http"] == "auto"
