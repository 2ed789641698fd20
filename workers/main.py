"""The arq worker: outbox write-through and the expiry sweeper as background tasks, reconciliation as a cron job.

Run it with ``boxoffice worker`` (``run_worker``). arq (https://arq-docs.helpmanual.io/) gives the process
its life cycle: ``on_startup`` / ``on_shutdown``, SIGINT / SIGTERM handling (the main task is cancelled,
then ``on_shutdown`` runs; ``Worker`` makes sure it does), the ``drain_outbox`` job and the cron schedule (a
cron job runs once per tick across all workers: arq's ``unique`` lock).

The outbox loop is the guarantee that every order is written through; ``drain_outbox`` only wakes it early.
A SIGKILL loses nothing: entries read but not acked are re-read by the next worker (``workers/outbox.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from typing import Any

from arq import cron
from arq.connections import RedisSettings
from arq.cron import CronJob
from arq.worker import Worker as ArqWorker
from arq.worker import get_kwargs
from pydantic import ValidationError
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service import db
from service.app import redis_client
from service.inventory import Inventory
from service.logs import configure_logging
from service.settings import Settings, get_settings
from workers.outbox import OutboxConsumer
from workers.sweeper import run_sweeper

log = logging.getLogger("boxoffice.worker")

SHUTDOWN_GRACE_SECONDS = 10.0
"""How long on_shutdown waits for the current write-through batch before cancelling it (safe either way)."""


async def startup(ctx: dict[str, Any]) -> None:
    """Open our Redis client, Inventory and PostgreSQL pool; start the outbox consumer and the sweeper.

    The pool starts empty (``min_size=0``): the worker starts while PostgreSQL is down and the outbox
    loop backs off until it answers.
    """
    settings: Settings = ctx.get("settings") or get_settings()
    if not settings.redis_url or not settings.database_url:
        raise RuntimeError("REDIS_URL and DATABASE_URL must be set (boxoffice worker chooses them for you)")
    client = redis_client(settings.redis_url, settings)
    inventory = Inventory(client, settings)
    pg = await db.create_pool(settings.database_url, min_size=0, max_size=settings.pg_pool_max)
    outbox = OutboxConsumer(client, pg, settings)
    stop = asyncio.Event()
    ctx.update(settings=settings, inventory=inventory, pg=pg, outbox=outbox, stop=stop, redis_client=client)
    ctx["tasks"] = [
        asyncio.create_task(outbox.run_forever(stop), name="outbox"),
        asyncio.create_task(run_sweeper(inventory, settings, stop), name="sweeper"),
    ]
    log.info("worker started: outbox consumer %s", outbox.name)
    if settings.reconcile_interval_seconds == 0:
        log.info("no reconciliation cron job (reconcile_interval_seconds=0): run `boxoffice reconcile`")


async def shutdown(ctx: dict[str, Any]) -> None:
    """Stop the background tasks (the current batch may finish), then close the pools."""
    if "stop" not in ctx:
        return
    ctx["stop"].set()
    ctx["outbox"].wake()
    tasks: list[asyncio.Task] = ctx["tasks"]
    _, pending = await asyncio.wait(tasks, timeout=SHUTDOWN_GRACE_SECONDS)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    try:
        await asyncio.wait_for(ctx["pg"].close(), 5)
    except TimeoutError:
        ctx["pg"].terminate()
    await ctx["outbox"].aclose()
    await ctx["inventory"].aclose()
    await ctx["redis_client"].aclose()
    log.info("worker stopped")


async def drain_outbox(ctx: dict[str, Any], event_id: str | None = None) -> None:
    """Job: wake the outbox loop now (for ops: ``arq`` can enqueue it; nothing in boxoffice does). The loop
    writes every event."""
    ctx["outbox"].wake()


async def reconcile(ctx: dict[str, Any]) -> Any:
    """Cron job: ``workers.reconcile.cron_reconcile`` (check every event, no repair).

    It runs on its own event loop in a daemon thread, with its own Redis client and PostgreSQL pool: a
    check reads every hold and order of every event, and on the worker's loop that CPU work stalls the
    write-through (loadtests/bench_writethrough.py, 1,000 orders/s, reconcile every 30 s: p99 confirm ->
    persisted 220 ms and max 510 ms on the loop, 57 ms and 87 ms in a thread, 56 ms and 65 ms without). A daemon thread left running at exit loses nothing: the check is
    read-only. A tick that finds the previous check still running skips. Logs and returns None while
    ``workers/reconcile.py`` is absent.
    """
    try:
        from workers.reconcile import cron_reconcile
    except ModuleNotFoundError as exc:
        if exc.name != "workers.reconcile":
            raise
        log.warning("workers.reconcile is not installed; skipping reconciliation")
        return None
    previous: threading.Thread | None = ctx.get("reconcile_thread")
    if previous is not None and previous.is_alive():
        log.warning("the previous reconciliation is still running; skipping this one")
        return None
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if done.done():  # the job was cancelled (timeout, shutdown)
            return
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)

    def thread_main() -> None:
        try:
            result, exc = asyncio.run(_reconcile_alone(cron_reconcile, ctx["settings"])), None
        except BaseException as error:  # handed to the awaiting job
            result, exc = None, error
        with contextlib.suppress(RuntimeError):  # the worker's loop is closed: nobody is waiting
            loop.call_soon_threadsafe(settle, result, exc)

    ctx["reconcile_thread"] = threading.Thread(target=thread_main, name="reconcile", daemon=True)
    ctx["reconcile_thread"].start()
    return await done


async def _reconcile_alone(cron_reconcile, settings: Settings) -> Any:
    client = redis_client(settings.redis_url, settings)
    pg = await db.create_pool(settings.database_url, min_size=0, max_size=2)
    inventory = Inventory(client, settings)
    try:
        ctx = {"settings": settings, "inventory": inventory, "pg": pg, "redis_client": client}
        return await cron_reconcile(ctx)
    finally:
        await pg.close()
        await inventory.aclose()
        await client.aclose()


def every(seconds: int) -> dict[str, set[int]]:
    """arq cron fields for "every ``seconds``" (>= 1), aligned on the clock: 30 -> second {0, 30}; 120 ->
    minute {0, 2, ...} at second 0. Past a minute the period is whole minutes, rounded down: 90 -> every
    minute, 150 -> every 2. A period that does not divide a minute (or an hour) restarts at each minute
    (hour): 45 -> second {0, 45}. Periods of an hour or more run hourly."""
    if seconds < 60:
        return {"second": set(range(0, 60, max(1, seconds)))}
    minutes = min(seconds // 60, 60)
    return {"minute": set(range(0, 60, minutes)), "second": {0}}


def schedule(settings: Settings) -> list[CronJob]:
    """The cron jobs: reconciliation every ``reconcile_interval_seconds``; none when that is 0."""
    if settings.reconcile_interval_seconds == 0:
        return []
    return [cron(reconcile, name="reconcile", **every(settings.reconcile_interval_seconds))]


def _environment_schedule() -> list[CronJob]:
    """The schedule of the environment's settings, for ``arq workers.main.WorkerSettings``. If the environment's
    settings do not validate, the default schedule: ``startup`` then fails with the validation error, which
    says more than a failed import would."""
    try:
        return schedule(get_settings())
    except ValidationError:
        return schedule(Settings.model_construct())


class Worker(ArqWorker):
    """arq's Worker, with a shutdown that reaches ``on_shutdown`` whatever step of a job the signal interrupts.

    On SIGINT / SIGTERM arq cancels every job task, then ``close()`` gathers them (without ``return_exceptions``)
    before it runs ``on_shutdown``. arq turns a cancel inside the job's own function into "cancelled, will be
    run again", but a cancel that lands while arq itself awaits around the job (reading it from Redis, or
    ``finish_job`` writing its result: seconds during a Redis outage, while its retries back off) or before the
    task's first step ends the task cancelled. arq's ``close()`` then raised: ``on_shutdown`` never ran (the
    write-through and the sweeper were not stopped, the pools not closed; nothing is lost, as after a SIGKILL)
    and the process exited with 1 and a traceback.

    Here ``close()`` waits for the job tasks and lets go of those the shutdown cancelled (one that failed
    otherwise still raises, as in arq), then waits for arq's result writes still running: they run shielded from
    the cancel, and without the wait the pool closed under them, so a finished job ran again once arq's
    in-progress key expired. During a Redis outage that wait lasts as long as arq's retries (``QUEUE_RETRIES``);
    if Redis is still down after them, arq's ``close()`` fails on its own Redis call and the process exits 1.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.finishing: set[asyncio.Future] = set()

    # arq awaits both through asyncio.shield: a task it gets from us is one close() can wait for.
    def finish_job(self, *args: Any, **kwargs: Any) -> asyncio.Future:  # type: ignore[override]
        return self._tracked(super().finish_job(*args, **kwargs))

    def finish_failed_job(self, *args: Any, **kwargs: Any) -> asyncio.Future:  # type: ignore[override]
        return self._tracked(super().finish_failed_job(*args, **kwargs))

    def _tracked(self, coro: Any) -> asyncio.Future:
        task = asyncio.ensure_future(coro)
        self.finishing.add(task)
        task.add_done_callback(self.finishing.discard)
        return task

    async def close(self) -> None:
        """arq's ``close()``, once the job tasks have ended (a cancelled one is let go) and their result writes too."""
        if not self._handle_signals:  # arq's close() stops the jobs itself then: before the wait, here
            self.handle_sig(signal.SIGUSR1)
        if self.tasks:
            await asyncio.wait(self.tasks.values())
        self.tasks = {job_id: task for job_id, task in self.tasks.items() if not task.cancelled()}
        if self.finishing:
            await asyncio.wait(self.finishing)
        await super().close()


class WorkerSettings:
    """arq settings (``arq workers.main.WorkerSettings`` works too, with the settings read from the environment,
    but runs arq's own Worker: a shutdown during a Redis outage can then exit 1, see ``Worker``)."""

    functions = [drain_outbox]
    cron_jobs = _environment_schedule()  # run_worker passes the schedule of the settings it was given
    on_startup = startup
    on_shutdown = shutdown
    max_jobs = 4
    job_timeout = 300
    keep_result = 60


QUEUE_RETRIES = 300
"""How often arq's Redis commands are tried again (0.05 s backoff doubling up to 1 s: ~5 minutes in all) when
the queue's Redis refuses connections or times out. arq's poll loop has no retry of its own, so without this
the worker process exited on the first poll after any Redis restart or failover, leaving the write-through
and the sweeper (which ride out outages themselves) stopped with it. Past that, the worker exits with the
error. A SIGTERM during an outage also waits for the last retries of arq's shutdown (SIGKILL loses nothing)."""


def queue_redis_settings(settings: Settings) -> RedisSettings:
    """arq's RedisSettings for ``queue_redis_url``, with ``QUEUE_RETRIES`` on connection errors and timeouts
    (OSError too: redis-py retries a refused connect only when its error class is listed)."""
    redis_settings = RedisSettings.from_dsn(queue_redis_url(settings))
    redis_settings.retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), QUEUE_RETRIES)
    redis_settings.retry_on_error = [RedisConnectionError, RedisTimeoutError, OSError]
    return redis_settings


def queue_redis_url(settings: Settings) -> str:
    """Where arq keeps its job queue and cron lock: ``queue_redis_url``, else ``redis_url``. Raises
    RuntimeError for a Redis Cluster without ``queue_redis_url`` (arq needs a single server)."""
    if settings.queue_redis_url:
        return settings.queue_redis_url
    if settings.redis_cluster:
        raise RuntimeError(
            "BOXOFFICE_REDIS_CLUSTER is set: set BOXOFFICE_QUEUE_REDIS_URL to a single Redis server for arq's "
            "job queue (arq has no Redis Cluster support: https://github.com/python-arq/arq/issues/385)"
        )
    assert settings.redis_url
    return settings.redis_url


def serve_metrics(host: str, port: int) -> None:
    """Serve this process's Prometheus metrics on ``http://host:port/`` from a daemon thread (prometheus_client's
    own server; merged with the folder's other processes when ``PROMETHEUS_MULTIPROC_DIR`` is set). Raises
    OSError if the port cannot be bound."""
    from prometheus_client import REGISTRY, CollectorRegistry, multiprocess, start_http_server

    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    start_http_server(port, addr=host, registry=registry)
    log.info("metrics on http://%s:%d/metrics", host, port)


def create_worker(settings: Settings, **overrides: Any) -> Worker:
    """The worker ``run_worker`` runs: ``WorkerSettings`` with the queue's Redis, the schedule and the context of
    ``settings``; ``overrides`` are more arq Worker arguments (tests). Raises RuntimeError as ``queue_redis_url``."""
    kwargs = {
        **get_kwargs(WorkerSettings),
        "redis_settings": queue_redis_settings(settings),
        "ctx": {"settings": settings},
        "cron_jobs": schedule(settings),
    }
    return Worker(**{**kwargs, **overrides})


def run_worker(settings: Settings) -> None:
    """Run the worker until SIGINT / SIGTERM (blocking). Both URLs must be set in ``settings``; on a Redis
    Cluster, ``queue_redis_url`` too (``queue_redis_url``). Raises RuntimeError when one is missing."""
    configure_logging(settings.log_level)
    if not settings.redis_url or not settings.database_url:
        raise RuntimeError("REDIS_URL and DATABASE_URL must be set")
    if settings.worker_metrics_port:
        serve_metrics(settings.host, settings.worker_metrics_port)
    create_worker(settings).run()
