"""One Redis connection per process that pipelines every concurrent caller's commands (auto-pipelining).

Every command issued during one event-loop tick is packed by hiredis and sent in one ``write`` at the next
iteration, or at once when the caller knows the tick's commands are all queued (``flush``); the replies
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
import contextlib
import socket
from collections import deque
from typing import Any, Protocol

import hiredis
from redis._parsers.base import BaseParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

CLIENT_NAME = "boxoffice-autopipeline"


class Receiver(Protocol):
    """What gets a reply: an asyncio.Future, or anything with the three methods the connection calls."""

    def done(self) -> bool: ...
    def set_result(self, result: Any) -> None: ...
    def set_exception(self, exception: BaseException) -> None: ...


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
        self._connecting: asyncio.Task | None = None

    @staticmethod
    def supports(connection_kwargs: dict[str, Any], connection_class: type) -> bool:
        """True for a plain TCP or unix-socket RESP2 connection with bytes replies, authenticated (if at all) by
        a username and/or password. Not applied from redis-py's options: ``health_check_interval`` (the stall
        watchdog fails a connection that has not answered for ``timeout_seconds`` instead) and socket options
        other than TCP_NODELAY and SO_KEEPALIVE."""
        from redis.asyncio.connection import Connection, UnixDomainSocketConnection

        if connection_class not in (Connection, UnixDomainSocketConnection):
            return False  # TLS (SSLConnection) or a custom class
        if connection_kwargs.get("credential_provider") or connection_kwargs.get("decode_responses"):
            return False  # replies here are always bytes, as the fallback's are
        return connection_kwargs.get("protocol") in (None, 2, "2")

    async def execute(self, *args: Any) -> Any:
        """Send one command; return its reply (bytes, int, list ...). Raises redis.exceptions.RedisError."""
        fut = self.submit(args)
        if fut is None:
            loop = asyncio.get_running_loop()
            conn = await self._connect(loop)
            fut = loop.create_future()
            conn.queue(hiredis.pack_command(args), fut)
        return await fut

    def submit(self, args: tuple[Any, ...], receiver: Receiver | None = None) -> Receiver | None:
        """Queue one command on the open connection and return the future of its reply, or None when there
        is no open connection on this loop (then ``execute`` connects). The hot path: a plain call, so an
        awaiting caller has one coroutine frame fewer to suspend and resume.

        ``receiver``, instead of a new future: any object with a future's ``done``, ``set_result`` and
        ``set_exception``, called from the connection's callbacks as soon as the reply is parsed (ScriptRunner
        hands each item of a batched call its own reply there, without waiting for another loop iteration).
        """
        conn = self._conn
        if conn is None or conn.closed:
            return None
        loop = asyncio.get_running_loop()
        if conn.loop is not loop:  # an Inventory reused across asyncio.run: that connection is unusable
            return None
        fut = receiver if receiver is not None else loop.create_future()
        conn.queue(hiredis.pack_command(args), fut)
        return fut

    def flush(self) -> None:
        """Write the commands queued so far now, not at the next loop iteration (the default, so that every
        command of the tick shares one write). For a caller that knows the tick's commands are all queued:
        ``ScriptRunner`` after sending its batches. The round trip starts one iteration earlier, during which
        Redis would otherwise wait (quick A/B, 2 workers, 100 clients: CPU idle 7-8 -> 4 %, holds/s +11 % and
        +20 % in two runs of 5 pairs; loadtests/RESULTS.md)."""
        conn = self._conn
        if conn is not None and conn.loop is asyncio.get_running_loop():
            conn.flush()

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        """Connect once for every caller that needs it. The connect runs in its own task, so a caller that is
        cancelled while waiting stops waiting without cancelling the connect the others wait for."""
        if self._loop is not loop:  # first use, or a new event loop (the old loop's connection is unusable)
            self.close()
            self._loop = loop
        if self._connecting is None:
            self._connecting = loop.create_task(self._open(loop))
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, task: asyncio.Task) -> None:
        if self._connecting is task:
            self._connecting = None
            if not task.cancelled() and task.exception() is None:
                self._conn = task.result()
        elif not task.cancelled() and task.exception() is None:  # close() came first: nobody may use it
            task.result().close()
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" warning when nobody waits any more

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
        name = kw.get("client_name") or CLIENT_NAME  # to be found in CLIENT LIST
        hello: list[tuple[Any, ...]] = [("CLIENT", "SETNAME", name)]
        if kw.get("username"):  # ACL user (https://redis.io/docs/latest/commands/auth/)
            hello.insert(0, ("AUTH", kw["username"], kw.get("password") or ""))
        elif kw.get("password"):
            hello.insert(0, ("AUTH", kw["password"]))
        if int(kw.get("db") or 0):
            hello.append(("SELECT", int(kw["db"])))
        futs = []
        for cmd in hello:
            fut = loop.create_future()
            conn.queue(hiredis.pack_command(cmd), fut)
            futs.append(fut)
        try:
            results = await asyncio.gather(*futs, return_exceptions=True)
        except BaseException:  # cancelled mid-handshake: nobody will ever use this connection
            conn.close()
            raise
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:  # e.g. AuthenticationError
            conn.close()
            raise failed[0]
        return conn

    def close(self) -> None:
        """Close the connection (and drop a connect in progress); pending callers get ConnectionError."""
        if self._connecting is not None:
            self._connecting = None  # _connected closes what it brings
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class _Connection(asyncio.Protocol):
    """One connection: a write per tick, a FIFO of the callers waiting for replies, a stall watchdog."""

    def __init__(self, timeout_seconds: float):
        self.timeout_seconds = timeout_seconds
        self.loop = asyncio.get_running_loop()
        self.closed = False
        self._error: Exception | None = None  # why it closed, for callers that come after
        self._transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self._reader = hiredis.Reader()
        self._pending: deque[Receiver] = deque()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._last_reply = 0.0
        self._watchdog: asyncio.TimerHandle | None = None

    def queue(self, packed: bytes, fut: Receiver) -> None:
        if self.closed:
            fut.set_exception(self._error or RedisConnectionError("Redis connection closed"))
            return
        if not self._pending:  # idle until now: the stall clock starts here, not at the last old reply
            self._last_reply = self.loop.time()
        self._pending.append(fut)
        self._out.append(packed)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def flush(self) -> None:
        """Write what is queued now. The flush already scheduled stays so, for what is queued after this."""
        if self._out:
            self._write()

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._write()

    def _write(self) -> None:
        out, self._out = self._out, []
        if self.closed or not out:  # lost since: connection_lost already failed these futures
            return
        try:
            self._transport.write(b"".join(out) if len(out) > 1 else out[0])
        except Exception as exc:  # e.g. the transport is closing under us: as if the connection were lost
            self._fail(RedisConnectionError(f"Redis connection write failed: {exc!r}"))
            return
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
        """Mark closed, fail every pending caller with ``exc``, drop the transport. Safe after the loop closed."""
        self.closed = True
        self._error = exc
        self._out = []
        pending, self._pending = self._pending, deque()
        watchdog, self._watchdog = self._watchdog, None
        transport, self._transport = self._transport, None
        with contextlib.suppress(RuntimeError):  # "Event loop is closed": its callers and socket are gone too
            if watchdog is not None:
                watchdog.cancel()
            for fut in pending:
                if not fut.done():
                    fut.set_exception(exc)
            if transport is not None:
                transport.abort()

    # asyncio.Protocol ---------------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # asyncio's default; uvloop's too
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # a peer gone silently is noticed

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        self._last_reply = self.loop.time()
        pending = self._pending
        gets = self._reader.gets
        while (reply := gets()) is not False:
            if not pending:  # a reply nobody asked for, e.g. "-ERR max number of clients reached" on connect
                self._fail(RedisConnectionError(f"unexpected reply from Redis: {reply!r}"))
                return
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
