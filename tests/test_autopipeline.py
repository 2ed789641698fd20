"""AutoPipeline (service/autopipeline.py) against real redis-servers: order, errors, failures, handshake."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from loadtests.local import free_port, redis_server_binary, stop_process, throwaway_redis
from service.app import redis_client
from service.autopipeline import CLIENT_NAME, AutoPipeline
from service.scripts import ScriptRunner


def _ga_event(url: str) -> redis.Redis:
    """Event ``x`` with one general-admission zone of 10 tickets, written straight into the server at ``url``
    (no catalog: these tests are about the connection). Returns a plain client on it."""
    admin = redis.Redis.from_url(url)
    admin.hset(
        "{evt:x}:meta", mapping={"status": "on_sale", "hold_ttl_seconds": 60, "max_tickets_per_customer": 9}
    )
    admin.hset(
        "{evt:x}:zone:ga", mapping={"kind": "ga", "available": 10, "held": 0, "sold": 0, "price_cents": 100}
    )
    return admin


def _pipe(url: str, timeout_seconds: float = 5.0) -> AutoPipeline:
    pool = aioredis.ConnectionPool.from_url(url)
    return AutoPipeline(pool.connection_kwargs, timeout_seconds=timeout_seconds, connect_timeout_seconds=2)


@contextlib.contextmanager
def redis_with(*args: str) -> Iterator[Path]:
    """A private redis-server started with extra arguments; yields its working directory."""
    workdir = Path(tempfile.mkdtemp(prefix="boxoffice-redis-"))
    proc = subprocess.Popen(
        [redis_server_binary(), "--save", "", "--appendonly", "no", "--dir", str(workdir), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield workdir
    finally:
        stop_process(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_ping(client: redis.Redis) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return
        except redis.exceptions.AuthenticationError:
            return  # it answers
        except redis.exceptions.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


async def test_concurrent_callers_get_their_own_replies_in_order():
    with throwaway_redis() as url:
        pipe = _pipe(url)
        # one tick: 300 commands, one write; each caller must get its own reply
        replies = await asyncio.gather(*[pipe.execute("INCR", "n") for _ in range(300)])
        assert replies == list(range(1, 301))
        sets = [pipe.execute("SET", f"k{i}", f"v{i}") for i in range(50)]
        gets = [pipe.execute("GET", f"k{i}") for i in range(50)]
        results = await asyncio.gather(*sets, *gets)
        assert results[50:] == [f"v{i}".encode() for i in range(50)]
        clients = redis.Redis.from_url(url).client_list()
        assert sum(c["name"] == CLIENT_NAME for c in clients) == 1  # one connection for all of it
        pipe.close()


async def test_an_error_reply_fails_only_its_own_caller():
    with throwaway_redis() as url:
        pipe = _pipe(url)
        await pipe.execute("SET", "s", "x")
        results = await asyncio.gather(
            pipe.execute("PING"),
            pipe.execute("EVALSHA", "0" * 40, 0),
            pipe.execute("INCR", "s"),
            pipe.execute("GET", "s"),
            return_exceptions=True,
        )
        assert results[0] == b"PONG"
        assert isinstance(results[1], NoScriptError)  # redis-py's own classes, so callers catch them as usual
        assert isinstance(results[2], ResponseError) and "not an integer" in str(results[2])
        assert results[3] == b"x"
        pipe.close()


async def test_a_killed_connection_fails_pending_callers_and_the_next_call_reconnects():
    with throwaway_redis() as url:
        pipe = _pipe(url)
        assert await pipe.execute("PING") == b"PONG"
        admin = redis.Redis.from_url(url)
        blocked = asyncio.ensure_future(pipe.execute("BLPOP", "never", 0))  # pending until killed
        await asyncio.sleep(0.2)
        assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(blocked, 5)
        assert await pipe.execute("PING") == b"PONG"
        pipe.close()


async def test_no_reply_within_the_timeout_is_a_timeout_error():
    with throwaway_redis() as url:
        pipe = _pipe(url, timeout_seconds=0.5)
        assert await pipe.execute("PING") == b"PONG"
        admin = redis.Redis.from_url(url)
        admin.execute_command("CLIENT", "PAUSE", 3000, "ALL")
        started = time.monotonic()
        with pytest.raises(RedisTimeoutError):
            await pipe.execute("GET", "x")
        assert time.monotonic() - started < 2.5  # the watchdog, not the pause's end
        admin.execute_command("CLIENT", "UNPAUSE")
        assert await pipe.execute("PING") == b"PONG"  # reconnected
        pipe.close()


async def test_a_server_that_is_down_is_a_connection_error():
    pipe = _pipe(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(RedisConnectionError):
        await pipe.execute("PING")


async def test_auth_and_select_come_from_the_url():
    port = free_port()
    with redis_with("--port", str(port), "--bind", "127.0.0.1", "--requirepass", "s3cret"):
        _wait_ping(redis.Redis(port=port))
        pipe = _pipe(f"redis://:s3cret@127.0.0.1:{port}/3")
        assert await pipe.execute("SET", "where", "db3") == b"OK"
        assert redis.Redis(port=port, password="s3cret", db=3).get("where") == b"db3"
        assert redis.Redis(port=port, password="s3cret", db=0).get("where") is None
        pipe.close()
        wrong = _pipe(f"redis://:nope@127.0.0.1:{port}/0")
        with pytest.raises(AuthenticationError):
            await wrong.execute("PING")


async def test_a_unix_socket():
    with redis_with("--port", "0", "--unixsocket", "redis.sock") as workdir:
        sock = workdir / "redis.sock"
        _wait_ping(redis.Redis(unix_socket_path=str(sock)))
        pipe = _pipe(f"unix://{sock}?db=2")
        assert await pipe.execute("SET", "u", "1") == b"OK"
        assert redis.Redis(unix_socket_path=str(sock), db=2).get("u") == b"1"
        pipe.close()


def test_one_pipe_survives_a_new_event_loop():
    with throwaway_redis() as url:
        pipe = _pipe(url)
        assert asyncio.run(pipe.execute("INCR", "loops")) == 1
        assert asyncio.run(pipe.execute("INCR", "loops")) == 2  # the first loop's connection is not reused


async def test_script_runner_uses_it_only_where_it_applies(settings):
    with throwaway_redis() as url:
        client = redis_client(url, settings)
        assert ScriptRunner(client).pipe is not None
        assert ScriptRunner(client, auto_pipeline=False).pipe is None
        await client.aclose()
        tls = aioredis.Redis.from_url(url.replace("redis://", "rediss://"))
        assert ScriptRunner(tls).pipe is None  # TLS: redis-py's pipeline per tick
        await tls.aclose()


async def test_script_runner_recovers_from_script_flush_and_a_killed_connection(settings):
    with throwaway_redis() as url:
        client = redis_client(url, settings)
        runner = ScriptRunner(client)
        admin = redis.Redis.from_url(url)
        admin.hset("{evt:x}:meta", "status", "on_sale")
        assert int(await runner.run("reap", ["{evt:x}:meta"], [60, 100])) == 0
        admin.script_flush()  # NOSCRIPT: loaded again, the call sent again
        assert int(await runner.run("reap", ["{evt:x}:meta"], [60, 100])) == 0
        admin.client_kill_filter(_type="normal", skipme=True)  # the pipe's connection among them
        assert int(await runner.run("reap", ["{evt:x}:meta"], [60, 100])) == 0
        runner.close()
        await client.aclose()


async def test_a_batched_call_whose_connection_fails_is_sent_again_through_redis_py(settings):
    """The connection fails with a batch of holds queued on it: each hold still gets its own reply, once."""
    with throwaway_redis() as url:
        client = redis_client(url, settings)
        runner = ScriptRunner(client)
        admin = _ga_event(url)
        assert int(await runner.run("reap", ["{evt:x}:meta"], [60, 100])) == 0  # the pipe is connected
        item = b'[{"zone_id":"ga","quantity":1}]'
        futs = [
            runner.batched("hold", "{evt:x}:meta", [60, 100], (f"h{i}", f"c{i}", 0, item, ""))
            for i in range(3)
        ]
        await asyncio.sleep(0)  # the tick's batches were flushed: written, no reply read yet
        runner.pipe._conn.close()  # whether Redis read the batch before the reset is a race: both must work
        replies = await asyncio.gather(*futs)
        for i, reply in enumerate(replies):
            if isinstance(reply, list):  # created by the re-send
                assert reply[0] == 1
            else:  # created by the first send: the re-send finds it (a replay of the same hold)
                assert orjson.loads(reply)["hold"]["hold_id"] == f"h{i}"
        assert admin.hget("{evt:x}:zone:ga", "held") == b"3" and admin.zcard("{evt:x}:expiry") == 3
        runner.close()
        await client.aclose()


async def test_a_batch_whose_reply_is_lost_is_sent_again_and_answers_each_hold_once(settings):
    """Redis ran the batch but its reply never arrived: the re-send through redis-py finds every hold by its
    id and answers it as not a replay of a key (Inventory.hold: 201), and no stock moves twice."""
    with throwaway_redis() as url:
        client = redis_client(url, settings)
        runner = ScriptRunner(client)
        admin = _ga_event(url)
        await runner.load()  # no NOSCRIPT: the batch runs as it is sent
        assert int(await runner.run("reap", ["{evt:x}:meta"], [60, 100])) == 0  # the pipe is connected
        item = b'[{"zone_id":"ga","quantity":1}]'
        futs = [
            runner.batched("hold", "{evt:x}:meta", [60, 100], (f"h{i}", f"c{i}", 0, item, ""))
            for i in range(3)
        ]
        await asyncio.sleep(0)  # written
        deadline = time.monotonic() + 5
        while admin.zcard("{evt:x}:expiry") < 3:  # blocking: this loop cannot read the reply meanwhile
            assert time.monotonic() < deadline
            time.sleep(0.001)  # noqa: ASYNC251 (blocking on purpose, see above)
        runner.pipe._conn.close()  # the reply, sent by Redis, is never read
        replies = [orjson.loads(r) for r in await asyncio.gather(*futs)]
        assert [(r["hold"]["hold_id"], r["replay"]) for r in replies] == [(f"h{i}", False) for i in range(3)]
        assert admin.hget("{evt:x}:zone:ga", "held") == b"3" and admin.hget("{evt:x}:customers", "c0") == b"1"
        runner.close()
        await client.aclose()


async def test_a_write_that_fails_fails_over_like_a_lost_connection(settings):
    """A transport that refuses the write (closing under us): the batch's holds are sent again through
    redis-py and answered, instead of waiting forever for a reply to bytes that never left."""
    with throwaway_redis() as url:
        client = redis_client(url, settings)
        runner = ScriptRunner(client)
        admin = _ga_event(url)
        assert int(await runner.run("reap", ["{evt:x}:meta"], [60, 100])) == 0  # the pipe is connected
        conn = runner.pipe._conn
        transport = conn._transport

        class Refusing:
            def write(self, data: bytes) -> None:
                raise RuntimeError("unable to perform operation: transport is closing")

            def abort(self) -> None:
                transport.abort()

        conn._transport = Refusing()
        item = b'[{"zone_id":"ga","quantity":1}]'
        reply = await asyncio.wait_for(
            runner.batched("hold", "{evt:x}:meta", [60, 100], ("h1", "c1", 0, item, "")), 5
        )
        assert reply[0] == 1 and conn.closed  # created, through the fallback; the next call reconnects
        assert admin.hget("{evt:x}:zone:ga", "held") == b"1"
        runner.close()
        await client.aclose()


async def test_the_batches_of_a_tick_are_written_when_they_are_flushed(settings):
    """ScriptRunner flushes the tick's batches and writes them at once (AutoPipeline.flush), not one loop
    iteration later: Redis starts on them an iteration earlier (quick A/B: idle 7-8 -> 4 %, loadtests/RESULTS.md)."""
    with throwaway_redis() as url:
        client = redis_client(url, settings)
        runner = ScriptRunner(client)
        assert int(await runner.run("reap", ["{evt:x}:meta"], [60, 100])) == 0  # the pipe is connected
        fut = runner.batched("hold", "{evt:x}:meta", [60, 100], ("h1", "c1", 0, b"[]", ""))
        await asyncio.sleep(0)  # one iteration: the flush of the batches ran
        conn = runner.pipe._conn
        assert conn._out == [] and len(conn._pending) == 1  # written, waiting for its reply
        assert orjson.loads(await fut)["err"] == "event_not_found"
        runner.close()
        await client.aclose()


def test_holds_queued_on_a_loop_that_stopped_before_sending_them_do_not_block_the_next_loop(settings):
    """A loop stopped in the very tick it queued a hold (its flush never ran): holds on a later loop still go out."""
    with throwaway_redis() as url:
        admin = _ga_event(url)
        item = b'[{"zone_id":"ga","quantity":1}]'
        client = redis_client(url, settings)
        runner = ScriptRunner(client)
        first = asyncio.new_event_loop()

        def queue_and_stop() -> None:
            runner.batched("hold", "{evt:x}:meta", [60, 100], ("h1", "c1", 0, item, ""))
            first.stop()  # before the next iteration, where the flush was to run

        first.call_soon(queue_and_stop)
        first.run_forever()
        first.close()

        async def later() -> list:
            fut = runner.batched("hold", "{evt:x}:meta", [60, 100], ("h2", "c2", 0, item, ""))
            try:
                return await asyncio.wait_for(fut, 5)
            finally:
                await client.aclose()

        assert asyncio.run(later())[0] == 1  # tickets of the created hold
        runner.close()
        assert admin.zrange("{evt:x}:expiry", 0, -1) == [b"h2"]


def test_calls_queued_on_a_loop_that_stopped_before_sending_them_do_not_block_the_next_loop():
    """The per-tick redis-py pipeline (TLS, Redis Cluster, or any client the auto-pipeline cannot serve, such as
    fakeredis here): a loop stopped in the very tick it queued a call must not leave later loops' calls waiting."""
    import fakeredis

    runner = ScriptRunner(fakeredis.FakeAsyncRedis())
    assert runner.pipe is None and runner.auto_pipeline
    first = asyncio.new_event_loop()

    async def queue_and_stop() -> None:
        first.create_task(runner.run("reap", ["{evt:x}:meta"], [60, 100]))
        await asyncio.sleep(0)  # that task queues its call and schedules the flush for the next iteration
        first.stop()

    first.create_task(queue_and_stop())
    first.run_forever()
    for task in asyncio.all_tasks(first):
        task.cancel()
    first.close()

    async def later() -> object:
        return await asyncio.wait_for(runner.run("reap", ["{evt:x}:meta"], [60, 100]), 5)

    assert asyncio.run(later()) == 0  # no event, nothing reaped: the call went out and came back


async def test_a_command_sent_after_an_idle_spell_gets_its_full_timeout():
    """The stall clock starts when a command goes out, not at the last reply before an idle spell."""
    with throwaway_redis() as url:
        pipe = _pipe(url, timeout_seconds=1.0)
        assert await pipe.execute("PING") == b"PONG"
        await asyncio.sleep(0.9)  # the watchdog armed by the PING is about to look
        busy_300_ms = """
            local function us() local t = redis.call('TIME'); return t[1] * 1000000 + t[2] end
            local start = us()
            while us() - start < 300000 do end
            return 'done'"""
        assert await pipe.execute("EVAL", busy_300_ms, 0) == b"done"
        pipe.close()


async def test_a_cancelled_caller_does_not_cancel_the_others_connect():
    with throwaway_redis() as url:
        pipe = _pipe(url)
        callers = [asyncio.ensure_future(pipe.execute("PING")) for _ in range(4)]
        await asyncio.sleep(0)  # the first has started the connect; the others wait for it
        callers[0].cancel()
        results = await asyncio.gather(*callers, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError)
        assert results[1:] == [b"PONG"] * 3
        pipe.close()


async def test_close_during_the_handshake_leaves_no_connection_behind():
    with throwaway_redis() as url:
        admin = redis.Redis.from_url(url)
        pipe = _pipe(url)
        admin.execute_command("CLIENT", "PAUSE", 1000, "ALL")  # holds CLIENT SETNAME
        caller = asyncio.ensure_future(pipe.execute("PING"))
        await asyncio.sleep(0.3)
        pipe.close()
        admin.execute_command("CLIENT", "UNPAUSE")
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(caller, 5)
        await asyncio.sleep(0.2)
        assert not [c for c in admin.client_list() if c["name"] == CLIENT_NAME]


async def test_an_acl_user_without_a_password_is_authenticated_as_that_user():
    with throwaway_redis() as url:
        admin = redis.Redis.from_url(url)
        admin.acl_setuser("alice", enabled=True, nopass=True, keys=["app:*"], commands=["+@all"])
        pipe = _pipe(url.replace("redis://", "redis://alice@"))
        assert await pipe.execute("ACL", "WHOAMI") == b"alice"
        with pytest.raises(ResponseError):  # NOPERM: alice's keys only, not the default user's
            await pipe.execute("SET", "other:key", "x")
        pipe.close()


async def test_a_server_at_maxclients_is_a_connection_error_not_a_protocol_crash():
    port = free_port()
    with redis_with("--port", str(port), "--bind", "127.0.0.1", "--maxclients", "1"):
        holder = redis.Redis(port=port)
        _wait_ping(holder)  # holds the only slot
        loop_errors: list[dict] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: loop_errors.append(ctx))
        try:
            with pytest.raises(RedisConnectionError, match="max number of clients"):
                await _pipe(f"redis://127.0.0.1:{port}/0").execute("PING")
            await asyncio.sleep(0.1)
        finally:
            asyncio.get_running_loop().set_exception_handler(None)
        assert loop_errors == []
        holder.close()


def test_supports_refuses_options_it_would_ignore():
    from redis.asyncio.connection import Connection, SSLConnection

    assert AutoPipeline.supports({"host": "h"}, Connection)
    assert not AutoPipeline.supports({"host": "h"}, SSLConnection)
    assert not AutoPipeline.supports({"host": "h", "decode_responses": True}, Connection)
    assert not AutoPipeline.supports({"host": "h", "protocol": 3}, Connection)
