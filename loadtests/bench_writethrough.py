"""Benchmark of the outbox write-through (a benchmark, not a test): throughput into PostgreSQL and lag.

    .venv/bin/python -m loadtests.bench_writethrough --rates 500,1000,2000 --seconds 20 --runs 3

Everything is private and thrown away after: a redis-server on a free loopback port and a fresh
PostgreSQL database (``boxoffice_bench_<pid>``, migrated) on the local server (``DATABASE_URL`` or
127.0.0.1:5432, user postgres). Workers are real ``python -m service.cli worker`` processes.

Two measures:

* steady rate: for ``--seconds`` this process confirms orders (hold + confirm through Inventory, one
  ticket each) at a fixed rate with the workers running, then waits for the outbox to drain. Lag per
  order = ``orders.persisted_at - orders.confirmed_at`` (confirm time is Redis' clock, the commit time
  PostgreSQL's; one machine, one clock): p50 / p99 / max, and the share above 1 s.
* drain: ``--drain-orders`` orders are confirmed with no worker running, then the workers start; the
  throughput is the orders over the span of their ``persisted_at`` (worker start-up left out).

Each figure is the median over ``--runs`` runs (a fresh event each). Runs are bounded in time.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import typer

from loadtests.local import throwaway_database, throwaway_redis
from service import catalog, db
from service.app import redis_client
from service.domain import EventSpec, HoldRequest
from service.inventory import Inventory
from service.settings import Settings

REPO = Path(__file__).resolve().parent.parent
MAX_IN_FLIGHT = 2000
DRAIN_TIMEOUT_SECONDS = 120.0
RECONCILE_OFF_SECONDS = 0
"""Workers' reconcile cron period unless --reconcile-interval is given: 0, no cron job (hourly would still
land at minute 0)."""


def _with_db(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))


def _start_workers(n: int, redis_url: str, database_url: str) -> list[subprocess.Popen]:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(REDIS_URL=redis_url, DATABASE_URL=database_url, BOXOFFICE_LOG_LEVEL="WARNING")
    env.setdefault("BOXOFFICE_RECONCILE_INTERVAL_SECONDS", str(RECONCILE_OFF_SECONDS))
    return [
        subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], cwd=REPO, env=env) for _ in range(n)
    ]


def _stop_workers(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()


async def _new_event(pg: asyncpg.Pool, inventory: Inventory, tag: str) -> str:
    event_id = f"bench-{tag}-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    spec = EventSpec(
        event_id=event_id,
        name="write-through bench",
        starts_at="2030-01-01T20:00:00Z",
        max_tickets_per_customer=6,
        zones=[{"zone_id": "floor", "kind": "ga", "capacity": 10_000_000, "price_cents": 5000}],
    )
    await catalog.create_event(pg, inventory, spec)
    return event_id


async def _buy(inventory: Inventory, event_id: str, i: int) -> None:
    req = HoldRequest(customer_id=f"b{i}", items=[{"zone_id": "floor", "quantity": 1}])
    hold, _ = await inventory.hold(event_id, req)
    await inventory.confirm(event_id, hold["hold_id"], f"pay-{i}")


async def _confirm_at_rate(inventory: Inventory, event_id: str, rate: float, seconds: float) -> int:
    """Start hold+confirm pairs on a fixed schedule (rate per second) for ``seconds``; returns orders confirmed."""
    tasks: set[asyncio.Task] = set()
    started = 0
    t0 = time.monotonic()
    while (elapsed := time.monotonic() - t0) < seconds:
        due = int(elapsed * rate)
        while started < due and len(tasks) < MAX_IN_FLIGHT:
            task = asyncio.create_task(_buy(inventory, event_id, started))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            started += 1
        await asyncio.sleep(0.005)
    if tasks:
        await asyncio.gather(*tasks)
    return started


async def _drain(pg: asyncpg.Pool, inventory: Inventory, event_id: str, n: int) -> None:
    deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
    while await pg.fetchval("SELECT count(*) FROM orders WHERE event_id = $1", event_id) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"write-through did not drain {n} orders within {DRAIN_TIMEOUT_SECONDS} s")
        await asyncio.sleep(0.05)


async def _lag_ms(pg: asyncpg.Pool, event_id: str) -> dict[str, float]:
    row = await pg.fetchrow(
        """SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY lag) AS p50,
                  percentile_cont(0.99) WITHIN GROUP (ORDER BY lag) AS p99, max(lag) AS max,
                  avg((lag > 1000)::int) AS over_1s, count(*) AS n,
                  extract(epoch FROM max(persisted_at) - min(persisted_at)) AS span_s
           FROM (SELECT persisted_at, extract(epoch FROM persisted_at - confirmed_at) * 1000 AS lag
                 FROM orders WHERE event_id = $1) t""",
        event_id,
    )
    return {k: float(row[k]) for k in ("p50", "p99", "max", "over_1s", "n", "span_s")}


async def _steady(
    settings: Settings, pg: asyncpg.Pool, inventory: Inventory, rate: float, seconds: float, n_workers: int
) -> dict[str, float]:
    event_id = await _new_event(pg, inventory, f"r{int(rate)}")
    workers = _start_workers(n_workers, settings.redis_url, settings.database_url)
    try:
        await asyncio.sleep(2.0)  # worker start-up (imports, pools)
        t0 = time.monotonic()
        n = await _confirm_at_rate(inventory, event_id, rate, seconds)
        confirm_seconds = time.monotonic() - t0
        await _drain(pg, inventory, event_id, n)
    finally:
        _stop_workers(workers)
    lag = await _lag_ms(pg, event_id)
    return {
        "orders": n,
        "confirm_rate": n / confirm_seconds,
        **lag,
        "persist_rate": lag["n"] / lag["span_s"] if lag["span_s"] else 0.0,
    }


async def _drain_run(
    settings: Settings, pg: asyncpg.Pool, inventory: Inventory, orders: int, n_workers: int
) -> dict[str, float]:
    event_id = await _new_event(pg, inventory, "drain")
    sem = asyncio.Semaphore(500)

    async def buy(i: int) -> None:
        async with sem:
            await _buy(inventory, event_id, i)

    await asyncio.gather(*(buy(i) for i in range(orders)))
    workers = _start_workers(n_workers, settings.redis_url, settings.database_url)
    try:
        await _drain(pg, inventory, event_id, orders)
    finally:
        _stop_workers(workers)
    lag = await _lag_ms(pg, event_id)
    return {"orders": orders, "persist_rate": (orders - 1) / lag["span_s"] if lag["span_s"] else 0.0}


def _median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


async def _bench(rates: list[float], seconds: float, runs: int, drain_orders: int, n_workers: int) -> None:
    base = Settings()
    admin_url = _with_db(base.database_url or "postgresql://postgres@127.0.0.1:5432/postgres", "postgres")
    with throwaway_redis() as redis_url, throwaway_database(admin_url) as database_url:
        settings = base.model_copy(update={"redis_url": redis_url, "database_url": database_url})
        client = redis_client(redis_url, settings)
        inventory = Inventory(client, settings)
        pg = await db.create_pool(database_url)
        try:
            interval = int(os.environ["BOXOFFICE_RECONCILE_INTERVAL_SECONDS"])
            print(
                f"write-through bench: {n_workers} worker(s), batch {settings.outbox_batch_size}, "
                f"poll {settings.outbox_poll_interval_seconds * 1000:.0f} ms, "
                f"{f'reconcile every {interval} s' if interval else 'no reconcile cron job'}, "
                f"{runs} run(s) each, median shown"
            )
            for rate in rates:
                results = [
                    await _steady(settings, pg, inventory, rate, seconds, n_workers) for _ in range(runs)
                ]
                print(
                    f"steady {rate:>6.0f}/s for {seconds:.0f} s: confirmed {_median(results, 'confirm_rate'):7.0f}/s"
                    f"  persisted {_median(results, 'persist_rate'):7.0f}/s  lag ms p50 {_median(results, 'p50'):6.1f}"
                    f"  p99 {_median(results, 'p99'):7.1f}  max {_median(results, 'max'):7.1f}"
                    f"  >1s {_median(results, 'over_1s') * 100:.2f}%  ({int(_median(results, 'orders'))} orders)"
                )
            if drain_orders:
                results = [
                    await _drain_run(settings, pg, inventory, drain_orders, n_workers) for _ in range(runs)
                ]
                each = ", ".join(f"{r['persist_rate']:.0f}" for r in results)
                print(
                    f"drain {drain_orders} queued orders: {_median(results, 'persist_rate'):7.0f} orders/s"
                    f" into PostgreSQL (runs: {each})"
                )
        finally:
            await pg.close()
            inventory.close()
            await client.aclose()


def main(
    rates: str = typer.Option(
        "500,1000,2000", help="Confirm rates to try, orders per second, comma-separated."
    ),
    seconds: float = typer.Option(20.0, min=1, max=120, help="Seconds of confirming per steady run."),
    runs: int = typer.Option(3, min=1, max=5, help="Runs per figure (the median is shown)."),
    drain_orders: int = typer.Option(
        20000, min=0, max=200_000, help="Orders queued for the drain run (0: skip)."
    ),
    workers: int = typer.Option(1, min=1, max=4, help="Worker processes."),
    reconcile_interval: int = typer.Option(
        RECONCILE_OFF_SECONDS, min=0, help="The workers' reconcile cron period, seconds (default: 0, off)."
    ),
) -> None:
    """Measure write-through throughput and confirm -> persisted lag."""
    os.environ["BOXOFFICE_RECONCILE_INTERVAL_SECONDS"] = str(reconcile_interval)
    asyncio.run(_bench([float(r) for r in rates.split(",") if r], seconds, runs, drain_orders, workers))


if __name__ == "__main__":
    typer.run(main)
