"""One Redis connection per process that pipelines every concurrent caller's commands (auto-pipelining).

Every command issued during one event-loop tick is packed by hiredis and sent in one ``write``; the replies
come back in the order the commands were sent (RESP guarantees it, https://redis.io/docs/latest/develop/use/pipelining/),
so a FIFO of futures hands each caller its own reply, without waiting for a batch to finish before the next
one goes out. This is ioredis' auto-pipelining, done on an ``asyncio.Protocol`` with hiredis' packer and
reader (the C parser redis-py uses too), because redis-py's own ``Pipeline`` costs more client CPU per
command than the rest of a hold: in one process, 50 concurrent holds cost 73 µs of CPU each through a
redis-py pipeline per tick and 32 µs through this (loadtests/RESULTS.md).

Scope: plain TCP and unix-socket connections, with AUTH and SELECT from the URL. ``ScriptRunner`` keeps
redis-py's pipeline for anything else (TLS, credential providers, Redis Cluster).

Failure: if the connection drops or no reply arrives for ``timeout_seconds`` while commands are pending,
the connection is closed and every pending caller gets ``redis.exceptions.ConnectionError`` or
``TimeoutError`` (whether those commands ran is unknown, as with any client); the next call reconnects.
Error replies are raised as redis-py's own exception classes (``NoScriptError``, ``OutOfMemoryError`` ...).
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

CLIENT_NAME = "boxoffice-autopipeline"


class AutoPipeline:
    """Commands in, replies out, in order, over one connection. Create it with ``connection_kwargs`` as
    redis-py parses them (host, port or path, db, username, password); see ``supports``."""

    def __init__(
        self, connection_kwargs: dict[str, Any], *, timeout_seconds: float, connect_timeout_seconds: float
    ):
        self.kwargs = connection_kwargs
        self.timeout_seconds = timeout_seconds
        self.connect_timeout_seconds = connect_timeout_seconds
        self._conn: _Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the connection belongs to
        self._connecting: asyncio.Future | None = None

    @staticmethod
    def supports(connection_kwargs: dict[str, Any], connection_class: type) -> bool:
        """True for a plain TCP or unix-socket connection with at most a username and password."""
        from redis.asyncio.connection import Connection, UnixDomainSocketConnection

        if connection_class not in (Connection, UnixDomainSocketConnection):
            return False  # TLS (SSLConnection) or a custom class
        return not connection_kwargs.get("credential_provider") and connection_kwargs.get("protocol") in (
            None,
            2,
            "2",
        )

    async def execute(self, *args: Any) -> Any:
        """Send one command; return its reply (bytes, int, list ...). Raises redis.exceptions.RedisError."""
        loop = asyncio.get_running_loop()
        conn = self._conn
        if conn is None or conn.closed or self._loop is not loop:
            conn = await self._connect(loop)
        fut = loop.create_future()
        conn.queue(hiredis.pack_command(args), fut)
        return await fut

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        if self._loop is not loop:  # first use, or a new event loop (the old loop's connection is unusable)
            self._loop, self._conn, self._connecting = loop, None, None
        if self._connecting is not None:  # another caller is connecting: wait for it
            return await asyncio.shield(self._connecting)
        self._connecting = connecting = loop.create_future()
        try:
            conn = await self._open(loop)
            self._conn = conn
            connecting.set_result(conn)
            return conn
        except BaseException as exc:
            connecting.set_exception(exc)
            connecting.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        finally:
            self._connecting = None

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        """A new connection with AUTH, CLIENT SETNAME and SELECT done. Raises ConnectionError, AuthenticationError."""
        kw = self.kwargs
        conn = _Connection(self.timeout_seconds)
        if kw.get("path"):
            coro = loop.create_unix_connection(lambda: conn, kw["path"])
        else:
            coro = loop.create_connection(
                lambda: conn, kw.get("host", "localhost"), int(kw.get("port", 6379))
            )
        try:
            await asyncio.wait_for(coro, self.connect_timeout_seconds)
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(f"cannot connect to Redis: {exc!r}") from exc
        hello: list[tuple[Any, ...]] = [("CLIENT", "SETNAME", CLIENT_NAME)]  # to be found in CLIENT LIST
        if kw.get("password"):
            hello.insert(0, ("AUTH", *([kw["username"]] if kw.get("username") else []), kw["password"]))
        if int(kw.get("db") or 0):
            hello.append(("SELECT", int(kw["db"])))
        futs = []
        for cmd in hello:
            fut = loop.create_future()
            conn.queue(hiredis.pack_command(cmd), fut)
            futs.append(fut)
        results = await asyncio.gather(*futs, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:  # e.g. AuthenticationError
            conn.close()
            raise failed[0]
        return conn

    def close(self) -> None:
        """Close the connection; pending callers get ConnectionError."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class _Connection(asyncio.Protocol):
    """One connection: a write per tick, a FIFO of the callers waiting for replies, a stall watchdog."""

    def __init__(self, timeout_seconds: float):
        self.timeout_seconds = timeout_seconds
        self.closed = False
        self._transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self._reader = hiredis.Reader()
        self._pending: deque[asyncio.Future] = deque()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._last_reply = 0.0
        self._watchdog: asyncio.TimerHandle | None = None

    def queue(self, packed: bytes, fut: asyncio.Future) -> None:
        if self.closed:
            fut.set_exception(RedisConnectionError("Redis connection closed"))
            return
        self._pending.append(fut)
        self._out.append(packed)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        if self.closed or not out:  # lost since: connection_lost already failed these futures
            return
        self._transport.write(b"".join(out) if len(out) > 1 else out[0])
        if self._watchdog is None:
            loop = asyncio.get_running_loop()
            self._last_reply = loop.time()
            self._watchdog = loop.call_later(self.timeout_seconds, self._check_stalled)

    def _check_stalled(self) -> None:
        self._watchdog = None
        if not self._pending or self.closed:
            return
        loop = asyncio.get_running_loop()
        idle = loop.time() - self._last_reply
        if idle >= self.timeout_seconds:
            self._fail(RedisTimeoutError(f"no reply from Redis for {idle:.1f} s"))
            return
        self._watchdog = loop.call_later(self.timeout_seconds - idle, self._check_stalled)

    def close(self) -> None:
        self._fail(RedisConnectionError("Redis connection closed"))

    def _fail(self, exc: Exception) -> None:
        """Mark closed, fail every pending caller with ``exc``, drop the transport."""
        self.closed = True
        self._out = []
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        pending, self._pending = self._pending, deque()
        for fut in pending:
            if not fut.done():
                fut.set_exception(exc)
        if self._transport is not None:
            self._transport.abort()
            self._transport = None

    # asyncio.Protocol ---------------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # asyncio's default; uvloop's too

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        self._last_reply = asyncio.get_running_loop().time()
        pending = self._pending
        gets = self._reader.gets
        while (reply := gets()) is not False:
            fut = pending.popleft()
            if fut.done():  # the caller was cancelled
                continue
            if isinstance(reply, hiredis.ReplyError):
                fut.set_exception(BaseParser.parse_error(str(reply)))
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self.closed:
            self._fail(
                RedisConnectionError(
                    f"Redis connection lost: {exc!r}" if exc else "Redis closed the connection"
                )
            )
