"""The worker as a process (``python -m service.cli worker``) under faults: SIGKILL mid-batch, PostgreSQL
unreachable, Redis unreachable (a restart), two workers at once. After each, every confirmed order is in PostgreSQL exactly once and
``zones.sold`` equals what Redis sold. The last two tests run the worker in this process, to stop it at a chosen moment.

The workers use a throw-away redis-server (see tests/test_outbox.py for why) and the session's database.
Outages are made with a small TCP proxy in this process that we close and reopen.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from conftest import event_body, free_port, gather_limited

from service import catalog, keys
from service.domain import EventSpec, HoldRequest
from workers.outbox import GROUP

ROOT = Path(__file__).resolve().parent.parent


class Worker:
    """``python -m service.cli worker`` in a subprocess, its output in a temporary file."""

    def __init__(self, redis_url: str, database_url: str, **env: str):
        self.log = tempfile.NamedTemporaryFile(prefix="worker-", suffix=".log", delete=False)
        child_env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        child_env.update(
            REDIS_URL=redis_url,
            DATABASE_URL=database_url,
            BOXOFFICE_OUTBOX_CLAIM_IDLE_MS="1000",
            BOXOFFICE_OUTBOX_BACKOFF_MAX_SECONDS="0.5",
            BOXOFFICE_LOG_LEVEL="INFO",
            **env,
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker"],
            cwd=ROOT,
            env=child_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    async def wait_exit(self, timeout_seconds: float) -> int | None:
        try:
            return await asyncio.to_thread(self.proc.wait, timeout_seconds)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def workers(private_settings):
    started: list[Worker] = []

    def start(database_url: str | None = None, redis_url: str | None = None, **env: str) -> Worker:
        w = Worker(
            redis_url or private_settings.redis_url, database_url or private_settings.database_url, **env
        )
        started.append(w)
        return w

    yield start
    for w in started:
        w.kill()
        os.unlink(w.log.name)


class TcpProxy:
    """Forwards a loopback port to a server (PostgreSQL, Redis); ``stop()`` refuses new connections and cuts the
    open ones, as a server that went away does; ``pause()`` holds every byte of the connections open now until
    ``resume()`` (new ones flow), as a server stalled on a client's connections does."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.gates: set[asyncio.Event] = set()  # one per open connection: set while its bytes flow

    def pause(self) -> None:
        for gate in self.gates:
            gate.clear()

    def resume(self) -> None:
        for gate in self.gates:
            gate.set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers |= {writer, up_writer}
        gate = asyncio.Event()
        gate.set()
        self.gates.add(gate)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    await gate.wait()
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self.writers -= {writer, up_writer}
        self.gates.discard(gate)


async def new_event(pg, inventory, **overrides) -> str:
    spec = EventSpec(**event_body(**overrides))
    await catalog.create_event(pg, inventory, spec)
    return spec.event_id


async def buy_many(
    inventory, event_id: str, n: int, tag: str, seated_every: int = 0, first_seat: int = 0
) -> list[dict]:
    """n orders of one ticket each, concurrently; every ``seated_every``-th one is seat ``S<k>`` of zone
    "hall" (k = first_seat, first_seat + 1, ...) instead of a general-admission ticket."""

    async def buy(i: int) -> dict:
        seated = seated_every and i % seated_every == 0
        item = (
            {"zone_id": "hall", "seats": [f"S{first_seat + i // seated_every}"]}
            if seated
            else {"zone_id": "floor", "quantity": 1}
        )
        hold, _ = await inventory.hold(event_id, HoldRequest(customer_id=f"{tag}-{i}", items=[item]))
        order, created = await inventory.confirm(event_id, hold["hold_id"], f"pay-{tag}-{i}")
        assert created
        return order

    return await gather_limited([buy(i) for i in range(n)], 100)


def big_event(n_seats: int = 0) -> dict:
    zones = [{"zone_id": "floor", "kind": "ga", "capacity": 100_000, "price_cents": 5000}]
    if n_seats:
        zones.append(
            {
                "zone_id": "hall",
                "kind": "seated",
                "price_cents": 9000,
                "seats": [f"S{i}" for i in range(n_seats)],
            }
        )
    return {"zones": zones}


async def orders_in_pg(pg, event_id: str) -> int:
    return await pg.fetchval("SELECT count(*) FROM orders WHERE event_id = $1", event_id)


async def wait_until(predicate, timeout_seconds: float, what: str, worker_list=()) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not await predicate():
        if time.monotonic() > deadline:
            logs = "\n".join(w.output()[-3000:] for w in worker_list)
            raise AssertionError(f"timed out waiting for {what}\n{logs}")
        await asyncio.sleep(0.02)


async def assert_exactly_once(pg, inventory, event_id: str, orders: list[dict]) -> None:
    """Every order in PostgreSQL once with its items; zones.sold = the items = what Redis sold; no dead letter."""
    rows = await pg.fetch("SELECT order_id FROM orders WHERE event_id = $1", event_id)
    assert sorted(r["order_id"] for r in rows) == sorted(o["order_id"] for o in orders)
    items = {
        r["zone_id"]: r["n"]
        for r in await pg.fetch(
            "SELECT zone_id, sum(quantity)::int AS n FROM order_items WHERE event_id = $1 GROUP BY zone_id",
            event_id,
        )
    }
    sold = {
        r["zone_id"]: r["sold"]
        for r in await pg.fetch("SELECT zone_id, sold FROM zones WHERE event_id = $1 AND sold > 0", event_id)
    }
    redis_sold = {
        z["zone_id"]: z["sold"] for z in (await inventory.availability(event_id))["zones"] if z["sold"]
    }
    assert items == sold == redis_sold
    assert sum(sold.values()) == len(orders)
    assert await pg.fetchval("SELECT count(*) FROM dead_letters WHERE event_id = $1", event_id) == 0
    stream = keys.outbox(event_id)
    assert await inventory.client.xlen(stream) == 0
    assert (await inventory.client.xpending(stream, GROUP))["pending"] == 0


async def drained(pg, inventory, event_id: str, n: int) -> bool:
    stream = keys.outbox(event_id)
    return (
        await orders_in_pg(pg, event_id) == n
        and await inventory.client.xlen(stream) == 0
        and (await inventory.client.xpending(stream, GROUP))["pending"] == 0
    )


async def test_sigkill_mid_batch_then_restart_writes_every_order_once(pg, inventory, workers):
    eid = await new_event(pg, inventory, **big_event(n_seats=500))
    orders = await buy_many(inventory, eid, 4000, "k", seated_every=8)
    stream = keys.outbox(eid)
    # A worker that died long ago holding 100 entries read but never acked.
    await inventory.client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    await inventory.client.xreadgroup(GROUP, "long-gone", {stream: ">"}, count=100)

    first = workers(BOXOFFICE_OUTBOX_BATCH_SIZE="50")
    await wait_until(lambda: _at_least(pg, eid, 400), 30, "the first worker to write some orders", [first])
    first.kill()  # SIGKILL: no shutdown hook runs
    written_before_kill = await orders_in_pg(pg, eid)
    assert written_before_kill < len(orders), "the worker finished before it was killed"
    print(
        f"killed after {written_before_kill} orders; pending then: "
        f"{(await inventory.client.xpending(stream, GROUP))}"
    )

    second = workers(BOXOFFICE_OUTBOX_BATCH_SIZE="50")
    await wait_until(
        lambda: drained(pg, inventory, eid, len(orders)), 30, "the restarted worker to drain", [second]
    )
    await assert_exactly_once(pg, inventory, eid, orders)
    assert "claimed" in second.output()


async def _at_least(pg, event_id: str, n: int) -> bool:
    return await orders_in_pg(pg, event_id) >= n


async def test_postgres_unreachable_for_a_while_then_everything_lands_once(
    pg, inventory, private_settings, workers
):
    target = urlsplit(private_settings.database_url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432)
    await proxy.start()
    netloc = f"{target.username or 'postgres'}@127.0.0.1:{proxy.port}"
    via_proxy = urlunsplit((target.scheme, netloc, target.path, target.query, ""))
    try:
        eid = await new_event(pg, inventory, **big_event(n_seats=100))
        worker = workers(via_proxy)
        orders = await buy_many(inventory, eid, 100, "up", seated_every=4)
        await wait_until(lambda: drained(pg, inventory, eid, 100), 30, "the first orders", [worker])

        await proxy.stop()  # PostgreSQL is now unreachable for the worker
        orders += await buy_many(inventory, f"{eid}", 300, "down")
        await asyncio.sleep(1.5)
        assert await orders_in_pg(pg, eid) == 100
        # The outbox holds what is not written yet.
        assert await inventory.client.xlen(keys.outbox(eid)) == 300

        await proxy.start()
        await wait_until(
            lambda: drained(pg, inventory, eid, 400), 30, "the backlog after PostgreSQL returned", [worker]
        )
        await assert_exactly_once(pg, inventory, eid, orders)
        assert "write-through pass failed" in worker.output()
        worker.proc.send_signal(signal.SIGTERM)
        assert await worker.wait_exit(15) == 0, worker.output()[-3000:]
    finally:
        await proxy.stop()


async def test_two_workers_write_no_order_twice(pg, inventory, workers):
    eid = await new_event(pg, inventory, **big_event(n_seats=1000))
    pair = [workers(BOXOFFICE_OUTBOX_BATCH_SIZE="50"), workers(BOXOFFICE_OUTBOX_BATCH_SIZE="50")]
    await asyncio.sleep(0.5)
    orders = []
    for round_ in range(4):  # confirms keep arriving while both workers write
        orders += await buy_many(inventory, eid, 750, f"r{round_}", seated_every=3, first_seat=250 * round_)
    await wait_until(lambda: drained(pg, inventory, eid, len(orders)), 30, "both workers to drain", pair)
    await assert_exactly_once(pg, inventory, eid, orders)
    for w in pair:  # SIGTERM stops a worker cleanly
        w.proc.send_signal(signal.SIGTERM)
    for w in pair:
        assert await w.wait_exit(15) == 0, w.output()[-3000:]
        assert "worker stopped" in w.output()


async def test_worker_rides_out_a_redis_restart(pg, inventory, private_settings, workers):
    """Redis goes away for 2 s (a restart or failover): the worker process stays up, and once Redis is back
    its write-through lands every order once. Before, arq's poll loop raised ConnectionError and the process
    exited with 1, write-through and sweeper with it."""
    target = urlsplit(private_settings.redis_url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
    await proxy.start()
    via_proxy = urlunsplit((target.scheme, f"127.0.0.1:{proxy.port}", target.path, "", ""))
    try:
        eid = await new_event(pg, inventory, **big_event())
        worker = workers(redis_url=via_proxy)
        orders = await buy_many(inventory, eid, 50, "before")
        await wait_until(lambda: drained(pg, inventory, eid, 50), 30, "the first orders", [worker])

        await proxy.stop()  # the worker's Redis is gone; the API (this process) still sells
        orders += await buy_many(inventory, eid, 150, "during")
        await asyncio.sleep(2)
        assert worker.proc.poll() is None, worker.output()[-3000:]
        await proxy.start()
        await wait_until(
            lambda: drained(pg, inventory, eid, 200), 30, "the backlog after Redis returned", [worker]
        )
        await assert_exactly_once(pg, inventory, eid, orders)
        assert worker.proc.poll() is None, worker.output()[-3000:]
        worker.proc.send_signal(signal.SIGTERM)
        assert await worker.wait_exit(15) == 0, worker.output()[-3000:]
    finally:
        await proxy.stop()


# arq's own close of its Redis pool (redis-py 5 deprecates close for aclose)
ignore_arqs_close_warning = pytest.mark.filterwarnings("ignore:Call to deprecated close:DeprecationWarning")


def arq_worker(settings, queue: str, **hooks):
    """``boxoffice worker``'s arq Worker (``workers.main.create_worker``) on its own queue with one job,
    ``noop``, no cron job, no start-up, and ``hooks`` (on_shutdown, on_job_end ...); run in this process, not
    stopped by signals: a test calls ``handle_sig`` as a SIGTERM does."""
    from arq.worker import func

    from workers.main import create_worker

    async def noop(ctx):
        return None

    return create_worker(
        settings,
        functions=[func(noop, name="noop")],
        cron_jobs=[],
        on_startup=None,
        handle_signals=False,
        poll_delay=0.05,
        queue_name=queue,
        **hooks,
    )


@ignore_arqs_close_warning
async def test_a_shutdown_while_arq_awaits_around_a_job_still_runs_on_shutdown(private_settings):
    """SIGTERM lands while arq awaits outside its own handling of the job (here its ``on_job_end`` hook): the
    job's task ends cancelled. The worker still runs ``on_shutdown`` and ``close()`` returns. With arq's own
    Worker, ``close()`` raised CancelledError: ``on_shutdown`` was skipped and ``boxoffice worker`` exited 1
    with a traceback (a CI run, while Redis came back from a restart)."""
    from arq import create_pool

    from workers.main import queue_redis_settings

    queue = f"test-shutdown-{os.getpid()}-{time.monotonic_ns()}"
    in_hook = asyncio.Event()
    shut_down: list[str] = []

    async def on_job_end(ctx):
        in_hook.set()
        await asyncio.sleep(60)

    async def on_shutdown(ctx):
        shut_down.append("on_shutdown")

    worker = arq_worker(private_settings, queue, on_job_end=on_job_end, on_shutdown=on_shutdown)
    pool = await create_pool(queue_redis_settings(private_settings), default_queue_name=queue)
    run = asyncio.create_task(worker.async_run())
    try:
        await pool.enqueue_job("noop")
        await asyncio.wait_for(in_hook.wait(), 10)
        worker.handle_sig(signal.SIGTERM)
        await asyncio.wait_for(worker.close(), 10)
        assert shut_down == ["on_shutdown"]
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        await pool.delete(queue)
        await pool.aclose()


@ignore_arqs_close_warning
async def test_a_shutdown_while_arq_writes_a_jobs_result_waits_for_the_write(private_settings):
    """SIGTERM lands while arq writes a finished job's result and Redis stalls on that connection (the CI run's
    case): ``close()`` waits for the write, then runs ``on_shutdown``; the result is in Redis and the job is no
    longer in progress, so it does not run again. Before, ``close()`` went on over another connection and closed
    the pool under the write (or, with arq's own Worker, raised CancelledError)."""
    from arq import create_pool

    from workers.main import queue_redis_settings

    queue = f"test-shutdown-{os.getpid()}-{time.monotonic_ns()}"
    target = urlsplit(private_settings.redis_url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
    await proxy.start()
    via_proxy = urlunsplit((target.scheme, f"127.0.0.1:{proxy.port}", target.path, "", ""))
    job_done = asyncio.Event()
    shut_down: list[str] = []

    async def on_job_end(ctx):  # arq's next step is finish_job: its write waits on a stalled connection
        proxy.pause()
        job_done.set()

    async def on_shutdown(ctx):
        shut_down.append("on_shutdown")

    settings = private_settings.model_copy(update={"redis_url": via_proxy})
    worker = arq_worker(settings, queue, on_job_end=on_job_end, on_shutdown=on_shutdown)
    pool = await create_pool(queue_redis_settings(private_settings), default_queue_name=queue)
    run = asyncio.create_task(worker.async_run())
    job = None
    try:
        job = await pool.enqueue_job("noop")
        await asyncio.wait_for(job_done.wait(), 10)
        await asyncio.sleep(0.2)
        worker.handle_sig(signal.SIGTERM)
        closing = asyncio.create_task(worker.close())
        await asyncio.sleep(0.5)
        assert not closing.done(), "close() did not wait for the result write"
        assert shut_down == []
        proxy.resume()
        await asyncio.wait_for(closing, 10)
        assert shut_down == ["on_shutdown"]
        assert await pool.exists(f"arq:result:{job.job_id}") == 1
        assert await pool.exists(f"arq:in-progress:{job.job_id}") == 0
    finally:
        proxy.resume()
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        await proxy.stop()
        await pool.delete(queue, *(await pool.keys(f"arq:*:{job.job_id}") if job else []))
        await pool.aclose()
