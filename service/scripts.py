"""Load the Lua scripts in ``lua/`` once and call them through one thin wrapper.

A script may say ``--- @include NAME`` on a line of its own; the loader splices in
``lua/includes/NAME.lua`` there (as BullMQ does), so shared logic such as reaping is written once.

``ScriptRunner.run`` sends EVALSHA. With ``auto_pipeline`` on, every call made in the same event-loop
tick is sent in one write on one connection, the way ioredis' auto-pipelining works, and results come back
to each caller in order: over ``AutoPipeline`` (service/autopipeline.py) for plain TCP and unix sockets, else
(TLS, Redis Cluster) as one redis-py pipeline per tick (on a cluster: one per node). A NOSCRIPT reply (Redis
restarted or SCRIPT FLUSH) makes the runner load the script and send that call again, and a call whose
connection failed is sent again through redis-py's pool, with its retry and backoff. Both are safe because
every script is idempotent (see each script's header).

``ScriptRunner.batched`` goes one step further for a script that takes many items in one call (``hold``):
the calls for the same key made during one tick become one EVALSHA, so Redis sets up the script, reads
the clock and the event once for all of them (callgrind: 182k -> 131k instructions per hold in Redis at 16
holds per call; see loadtests/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from pathlib import Path
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis._parsers.base import BaseParser
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import AskError, MovedError, NoScriptError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.autopipeline import AutoPipeline
from service.slots import SlotClients

LUA_DIR = Path(__file__).resolve().parent.parent / "lua"
SCRIPT_NAMES = ("hold", "confirm", "release", "get_hold", "availability", "seat_page", "reap")
_INCLUDE = re.compile(r"^--- @include (\w+)\s*$", re.M)
DURABLE_CONNECTIONS = 8
"""Most auto-pipelined connections a process opens for durable calls (``ScriptRunner.run_durable``)."""
MAX_BATCH = 64
"""Most items ``ScriptRunner.batched`` puts in one call: past this a call goes out at once and the next
items start another, so one script run stays short (Redis serves nobody else while it runs)."""


def script_source(name: str) -> str:
    """The full text of ``lua/<name>.lua`` with its includes spliced in. Raises FileNotFoundError."""
    text = (LUA_DIR / f"{name}.lua").read_text()
    return _INCLUDE.sub(lambda m: (LUA_DIR / "includes" / f"{m.group(1)}.lua").read_text(), text)


class ScriptRunner:
    """Runs the project's scripts on one client (one connection pool per process)."""

    def __init__(self, client: aioredis.Redis, *, auto_pipeline: bool = True):
        self.client = client
        self.auto_pipeline = auto_pipeline
        self.scripts: dict[str, AsyncScript] = {
            n: client.register_script(script_source(n)) for n in SCRIPT_NAMES
        }
        self._queue: list[tuple[AsyncScript, list[str], list[Any], asyncio.Future]] = []
        self._queue_loop: asyncio.AbstractEventLoop | None = None  # the loop the queued calls belong to
        self._batches: dict[tuple[str, str], _Batch] = {}  # (script, key) -> the items of this tick
        self._batches_loop: asyncio.AbstractEventLoop | None = None  # the loop those items belong to
        self._flushing: set[asyncio.Task] = set()
        self.pipe: AutoPipeline | None = None
        self._pipe_kwargs: dict[str, Any] | None = None
        pool = getattr(client, "connection_pool", None)  # RedisCluster has none: per-tick redis-py pipelines
        if (
            auto_pipeline
            and pool is not None
            and AutoPipeline.supports(pool.connection_kwargs, pool.connection_class)
        ):
            self._pipe_kwargs = pool.connection_kwargs
            self.pipe = self._new_pipe()
        # Calls that must wait for their own fsync (``run_durable``) go on connections of their own, opened on
        # first use: a WAITAOF blocks its connection, which must not hold up the other calls.
        self._durable_pipes: dict[AutoPipeline, int] = {}  # -> WAITAOFs outstanding on it
        # This tick's durable connection and the future of the WAITAOF that will follow its calls there.
        self._durable_tick: tuple[AutoPipeline, asyncio.Future] | None = None
        self._durable_queue: list[tuple[AsyncScript, list[str], list[Any], asyncio.Future]] = []  # no pipe
        self._durable_queue_loop: asyncio.AbstractEventLoop | None = None
        self._slots: SlotClients | None = None  # Redis Cluster: per-node clients for durable calls
        self._closed = False  # close() ran: durable calls fail rather than open clients nobody closes

    def _new_pipe(self) -> AutoPipeline:
        kw = self._pipe_kwargs
        assert kw is not None
        return AutoPipeline(
            kw,
            timeout_seconds=kw.get("socket_timeout") or 5.0,
            connect_timeout_seconds=kw.get("socket_connect_timeout") or 2.0,
        )

    def close(self) -> None:
        """Close the auto-pipeline connections (the client's pool is the caller's to close). Per-node clients
        of durable calls on a Redis Cluster are closed by ``aclose`` (here only if a loop runs)."""
        self._closed = True
        if self.pipe is not None:
            self.pipe.close()
        for pipe in self._durable_pipes:
            pipe.close()
        self._durable_pipes, self._durable_tick = {}, None
        slots, self._slots = self._slots, None
        if slots is not None:
            with contextlib.suppress(RuntimeError):  # no running loop: they close with the process
                self._spawn(asyncio.get_running_loop(), slots.aclose())

    async def aclose(self) -> None:
        """``close``, waiting for the per-node clients of durable calls to close."""
        slots, self._slots = self._slots, None
        self.close()
        if slots is not None:
            await slots.aclose()

    async def load(self) -> None:
        """SCRIPT LOAD every script (at start-up, so the first requests don't pay for it)."""
        for script in self.scripts.values():
            await self.client.script_load(script.script)

    async def loaded(self) -> bool:
        """True if the server holds every script (readiness)."""
        shas = [s.sha for s in self.scripts.values()]
        return all(await self.client.script_exists(*shas))

    async def run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA ``name`` and return its reply. Raises redis.exceptions.RedisError on failure."""
        script = self.scripts[name]
        if self.pipe is not None:
            cmd = ("EVALSHA", script.sha, len(keys), *keys, *args)
            try:
                fut = self.pipe.submit(cmd)
                return await (fut if fut is not None else self.pipe.execute(*cmd))
            except (NoScriptError, RedisConnectionError, RedisTimeoutError):
                return await script(keys=keys, args=args)  # loads it if need be; retries with backoff
        if not self.auto_pipeline:
            return await script(keys=keys, args=args)
        loop = asyncio.get_running_loop()
        if self._queue_loop is not loop:
            # what an earlier loop queued died with it (that loop stopped before its flush ran)
            self._queue, self._queue_loop = [], loop
        fut = loop.create_future()
        self._queue.append((script, keys, args, fut))
        if len(self._queue) == 1:
            loop.call_soon(self._flush)
        return await fut

    async def run_durable(
        self, name: str, keys: list[str], args: list[Any], wait: tuple[int, int, int]
    ) -> tuple[Any, int]:
        """EVALSHA ``name``, then ``WAITAOF numlocal numreplicas timeout_ms`` (``wait``) on the same connection.
        Returns (the script's reply, how many local AOFs fsynced it: WAITAOF's first reply).

        WAITAOF waits for the writes of the connection it is sent on, and only those
        (https://redis.io/commands/waitaof/): sent on any other connection it would answer at once, fsync or
        not. With auto-pipelining, the calls of one tick share a connection and one WAITAOF after them (a
        group commit); a tick takes a connection with no WAITAOF outstanding, opening one if need be (at most
        ``DURABLE_CONNECTIONS``), so that while the disk is slow the ticks wait side by side, not one behind
        the other. Otherwise the tick's calls go out as one redis-py pipeline with one WAITAOF after them
        per server: on a Redis Cluster, one plain pipeline per node (``SlotClients``), where a connection
        error fails that node's calls (no retry). A NOSCRIPT reply loads the script and sends the call and a
        WAITAOF again, once. After ``close``, durable calls fail with ConnectionError.

        Raises redis.exceptions.RedisError (e.g. ConnectionError: whether the script ran is unknown; scripts
        are idempotent, so the caller may send it again; MovedError: the slot moved, nothing ran).
        """
        script = self.scripts[name]
        for attempt in (1, 2):
            if self._closed:  # checked again after a NOSCRIPT reload: close() may have come meanwhile
                raise RedisConnectionError("the script runner is closed")
            try:
                if self._pipe_kwargs is not None:
                    reply, waited = await self._run_durable_pipelined(script, keys, args, wait)
                else:
                    reply, waited = await self._run_durable_pooled(script, keys, args, wait)
                return reply, int(waited[0])
            except NoScriptError:
                if attempt == 2:
                    raise
                await self.client.script_load(script.script)
        raise AssertionError("unreachable")

    def _durable_pipe(self, loop: asyncio.AbstractEventLoop) -> AutoPipeline:
        """The connection of this tick's durable calls: the open tick's, else an idle one, else a new one
        (up to ``DURABLE_CONNECTIONS``), else the least busy."""
        tick = self._durable_tick
        if tick is not None and tick[1].get_loop() is loop:
            return tick[0]
        pipes = self._durable_pipes
        idle = next((p for p, busy in pipes.items() if busy == 0), None)
        if idle is not None:
            return idle
        if len(pipes) < DURABLE_CONNECTIONS:
            pipe = self._new_pipe()
            pipes[pipe] = 0
            return pipe
        return min(pipes, key=pipes.__getitem__)

    async def _run_durable_pipelined(
        self, script: AsyncScript, keys: list[str], args: list[Any], wait: tuple[int, int, int]
    ) -> tuple[Any, Any]:
        loop = asyncio.get_running_loop()
        pipe = self._durable_pipe(loop)
        cmd = ("EVALSHA", script.sha, len(keys), *keys, *args)
        fut = pipe.submit(cmd)
        if fut is None:  # not connected yet (or reconnecting): execute connects
            await pipe.execute("PING")
            fut = pipe.submit(cmd)
            if fut is None:
                raise RedisConnectionError("Redis connection for durable calls not open")
        # Only now, with the call queued: the tick's WAITAOF on this connection, sent after every call queued
        # during the tick (a callback of the next loop iteration), or a new one if that went out already.
        tick = self._durable_tick
        if tick is None or tick[0] is not pipe or tick[1].get_loop() is not loop:
            waited = loop.create_future()
            waited.add_done_callback(_retrieve)
            tick = self._durable_tick = (pipe, waited)
            loop.call_soon(self._seal_durable, tick, wait)
        reply = await fut
        return reply, await asyncio.shield(tick[1])

    def _seal_durable(self, tick: tuple[AutoPipeline, asyncio.Future], wait: tuple[int, int, int]) -> None:
        if self._durable_tick is tick:
            self._durable_tick = None
        pipe, waited = tick
        fut = pipe.submit(("WAITAOF", *wait))
        if fut is None:
            waited.set_exception(RedisConnectionError("Redis connection for durable calls lost"))
            return
        if pipe in self._durable_pipes:
            self._durable_pipes[pipe] += 1

        def settle(done: Any) -> None:
            if pipe in self._durable_pipes:
                self._durable_pipes[pipe] -= 1
            if waited.done():
                return
            if done.cancelled():
                waited.cancel()
            elif done.exception() is not None:
                waited.set_exception(done.exception())
            else:
                waited.set_result(done.result())

        fut.add_done_callback(settle)  # type: ignore[union-attr]

    async def _run_durable_pooled(
        self, script: AsyncScript, keys: list[str], args: list[Any], wait: tuple[int, int, int]
    ) -> tuple[Any, Any]:
        loop = asyncio.get_running_loop()
        if self._durable_queue_loop is not loop:
            self._durable_queue, self._durable_queue_loop = [], loop
        fut = loop.create_future()
        self._durable_queue.append((script, keys, args, fut))
        if len(self._durable_queue) == 1:
            loop.call_soon(self._flush_durable, wait)
        return await fut

    def _flush_durable(self, wait: tuple[int, int, int]) -> None:
        batch, self._durable_queue = self._durable_queue, []
        send = self._send_durable_by_node if isinstance(self.client, RedisCluster) else self._send_durable
        self._spawn(asyncio.get_running_loop(), send(batch, wait))

    async def _send_durable_by_node(
        self,
        batch: list[tuple[AsyncScript, list[str], list[Any], asyncio.Future]],
        wait: tuple[int, int, int],
    ) -> None:
        """Redis Cluster: the tick's durable calls grouped by the node that owns their first key, each group
        on a plain client of that node (``SlotClients``), never through redis-py's cluster pipeline (which,
        sending the whole pipeline again after a connection error, routes the WAITAOF to another node)."""
        assert isinstance(self.client, RedisCluster)
        try:
            if self._closed:
                raise RedisConnectionError("the script runner is closed")
            if self._slots is None:
                self._slots = SlotClients(self.client)
            slots = self._slots
            await self.client.initialize()  # the slot map (a no-op once read)
            by_node: dict[str, list[tuple[AsyncScript, list[str], list[Any], asyncio.Future]]] = {}
            for call in batch:
                by_node.setdefault(self.client.get_node_from_key(call[1][0]).name, []).append(call)
            clients = [await slots.for_key(calls[0][1][0]) for calls in by_node.values()]
        except Exception as exc:
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        await asyncio.gather(
            *(self._send_durable(calls, wait, c) for calls, c in zip(by_node.values(), clients, strict=True))
        )

    async def _send_durable(
        self,
        batch: list[tuple[AsyncScript, list[str], list[Any], asyncio.Future]],
        wait: tuple[int, int, int],
        client: aioredis.Redis | None = None,
    ) -> None:
        """One redis-py pipeline for durable calls to one server (``client``, else the runner's single-server
        client): their EVALSHAs, then one WAITAOF. On a Redis Cluster, ``batch`` holds the calls of one node
        and ``client`` is that node's; a call whose slot moved meanwhile is answered MOVED (503), never
        followed. Each caller's future gets (reply, the WAITAOF reply)."""
        try:
            if client is None:
                if isinstance(self.client, RedisCluster):  # never: by node only (_send_durable_by_node)
                    raise RedisConnectionError("durable calls on a Redis Cluster go through a node's client")
                client = self.client
            async with client.pipeline(transaction=False) as pipe:
                for script, keys, args, _ in batch:
                    pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                pipe.execute_command("WAITAOF", *wait)
                results = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # the pipeline itself failed: nobody has a result
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        if isinstance(self.client, RedisCluster) and any(
            isinstance(r, MovedError | AskError) for r in results
        ):
            # A slot that moved is answered MOVED here and never followed. Read the slot map again before
            # answering, so that the caller's retry goes to the new owner (redis-py does this by itself only
            # for the commands it redirects).
            with contextlib.suppress(Exception):  # if it fails, the next MOVED tries again
                await self.client.nodes_manager.initialize()
        waited = results[-1]
        for (_, _, _, fut), reply in zip(batch, results[:-1], strict=True):
            if fut.done():
                continue
            if isinstance(reply, Exception):
                fut.set_exception(reply)
            elif isinstance(waited, Exception):
                fut.set_exception(waited)
            else:
                fut.set_result((reply, waited))

    def batched(self, name: str, key: str, common: list[Any], item: tuple[Any, ...]) -> asyncio.Future:
        """Queue one item for script ``name`` on ``key`` and return the future of its own reply.

        Every item queued for the same ``name`` and ``key`` during this event-loop tick (at most
        ``MAX_BATCH``) goes out as one EVALSHA with KEYS ``[key]`` and ARGV ``common`` followed by each item's
        arguments; the script answers an array with one reply per item, in order. ``common`` must be the same
        for every item of a key. The future raises the call's redis.exceptions.RedisError if the whole call
        failed (after the same fallbacks as ``run``), or that item's own error reply. With auto-pipelining
        off each item is a call of its own.
        """
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self.auto_pipeline:
            self._send_batch(_Batch(self, name, key, [*common, *item], [fut]))
            return fut
        if self._batches_loop is not loop:
            # what an earlier loop queued died with it (that loop stopped before its flush ran)
            self._batches, self._batches_loop = {}, loop
        batch = self._batches.get((name, key))
        if batch is None:
            if not self._batches:
                loop.call_soon(self._flush_batches)
            batch = self._batches[(name, key)] = _Batch(self, name, key, list(common), [])
        batch.args.extend(item)
        batch.futures.append(fut)
        if len(batch.futures) >= MAX_BATCH:
            del self._batches[(name, key)]
            self._send_batch(batch)
        return fut

    def _flush_batches(self) -> None:
        batches, self._batches = self._batches, {}
        for batch in batches.values():
            self._send_batch(batch)
        if self.pipe is not None:
            self.pipe.flush()  # every batch of the tick is queued: write them now, not one iteration later

    def _send_batch(self, batch: _Batch) -> None:
        """Send one batch. Never raises: a failure to send (an argument hiredis cannot pack, say) fails that
        batch's items, not the other batches of the tick nor the caller that filled it."""
        try:
            if self.pipe is not None:
                cmd = ("EVALSHA", self.scripts[batch.name].sha, 1, batch.key, *batch.args)
                if self.pipe.submit(cmd, batch) is not None:
                    return  # the connection hands the reply to batch.set_result / set_exception
            # not connected yet, or no auto-pipeline: through run() and its fallbacks
            self._spawn(batch.loop, batch.run())
        except Exception as exc:
            batch.fail(exc)

    def _spawn(self, loop: asyncio.AbstractEventLoop, coro: Any) -> None:
        task = loop.create_task(coro)
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        task = asyncio.ensure_future(self._send(batch))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _send(self, batch: list[tuple[AsyncScript, list[str], list[Any], asyncio.Future]]) -> None:
        try:
            if len(batch) == 1:
                script, keys, args, fut = batch[0]
                result: Any = await script(keys=keys, args=args)
                if not fut.done():
                    fut.set_result(result)
                return
            async with self.client.pipeline(transaction=False) as pipe:
                for script, keys, args, _ in batch:
                    # execute_command, not pipe.evalsha: redis-py's cluster pipeline blocks the evalsha method
                    # (PIPELINE_BLOCKED_COMMANDS), yet routes a raw EVALSHA by its first key like any command:
                    # one pipeline per node, redirections (MOVED, ASK) followed one call at a time.
                    pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                results = await pipe.execute(raise_on_error=False)
            for (script, keys, args, fut), result in zip(batch, results, strict=True):
                if isinstance(result, NoScriptError):
                    try:
                        result = await script(keys=keys, args=args)  # loads it, then EVALSHA again
                    except Exception as exc:  # this call's failure only: the others' results stand
                        result = exc
                if fut.done():
                    continue
                if isinstance(result, Exception):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)
        except (
            Exception
        ) as exc:  # the pipeline itself failed (connection lost, pool exhausted): nobody has a result
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)


class _Batch:
    """The items of one batched call (see ``ScriptRunner.batched``): its ARGV so far, one future per item.

    It receives the call's reply like a future (``AutoPipeline.submit``) and hands each item its own.
    A NOSCRIPT or connection failure of the auto-pipelined call is sent again as ``ScriptRunner.run`` does:
    through redis-py's pool, which loads the script and retries with backoff (safe: the script is idempotent).
    """

    __slots__ = ("runner", "name", "key", "args", "futures", "_done")

    def __init__(
        self, runner: ScriptRunner, name: str, key: str, args: list[Any], futures: list[asyncio.Future]
    ):
        self.runner = runner
        self.name = name
        self.key = key
        self.args = args
        self.futures = futures
        self._done = False

    # The receiver side, called by the auto-pipeline connection: exactly once, the first call wins.

    def done(self) -> bool:
        return self._done

    def set_result(self, replies: Any) -> None:
        self._done = True
        self.deliver(replies)

    def set_exception(self, exc: BaseException) -> None:
        self._done = True
        if self.loop.is_closed():  # the connection of a loop that has ended: its callers are gone too
            return
        if isinstance(exc, NoScriptError | RedisConnectionError | RedisTimeoutError):
            self.runner._spawn(self.loop, self.run(self.runner.scripts[self.name]))
        else:
            self.fail(exc)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop of the callers waiting for this batch."""
        return self.futures[0].get_loop()

    async def run(self, script: AsyncScript | None = None) -> None:
        """Send the call through ``ScriptRunner.run`` (or straight through redis-py with ``script``)."""
        try:
            if script is None:
                replies = await self.runner.run(self.name, [self.key], self.args)
            else:
                replies = await script(keys=[self.key], args=self.args)
        except asyncio.CancelledError:
            for fut in self.futures:
                fut.cancel()
            raise
        except Exception as exc:  # the whole call failed: every item gets that error
            self.fail(exc)
            return
        self.deliver(replies)

    def deliver(self, replies: Any) -> None:
        if not isinstance(replies, list) or len(replies) != len(self.futures):
            self.fail(RedisError(f"script {self.name}: {len(self.futures)} items, reply {replies!r:.200}"))
            return
        for fut, reply in zip(self.futures, replies, strict=True):
            if fut.done():  # its caller was cancelled
                continue
            error = _item_error(reply)
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(reply)

    def fail(self, exc: BaseException) -> None:
        for fut in self.futures:
            if not fut.done():
                fut.set_exception(exc)


def _item_error(reply: Any) -> BaseException | None:
    """The error of one item's reply in a batched call's array reply, as redis.exceptions.RedisError; or None."""
    if isinstance(reply, hiredis.ReplyError):
        return BaseParser.parse_error(str(reply))
    if isinstance(reply, Exception):  # redis-py's parsers hand nested errors over as exceptions
        return reply
    return None


def only_reply(replies: Any) -> Any:
    """The reply of a batched script's call that carried one item (``[reply]``), such as
    ``ScriptRunner.run_durable`` sends. Raises that item's error reply as redis.exceptions.RedisError, and
    RedisError if the call did not answer exactly one reply."""
    if not isinstance(replies, list) or len(replies) != 1:
        raise RedisError(f"one item sent, reply {replies!r:.200}")
    error = _item_error(replies[0])
    if error is not None:
        raise error
    return replies[0]


def _retrieve(fut: asyncio.Future) -> None:
    """Mark a shared future's exception as retrieved: every caller may have stopped waiting for it."""
    if not fut.cancelled():
        fut.exception()
