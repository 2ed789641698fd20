"""Rebuild: reload an event's inventory into Redis from PostgreSQL after Redis lost its data.

For a Redis that restarted empty (no AOF/RDB, or FLUSHALL) or lost an event's keys. Per event:

1. take the event's rebuild lock (a PostgreSQL advisory lock; refuse if another rebuild has it), then
   refuse if the event is live in Redis (its meta hash exists): a rebuild would drop its holds and zero its
   ``held`` counters under them; use ``boxoffice reconcile --event E --repair`` for a live event;
2. if an outbox stream of the event survived, write it through first (``workers.reconcile.redrive_outbox``:
   ``write_batch``, then XACK + XDEL), so orders Redis still has reach PostgreSQL before we read it;
3. read the catalog (``db.get_event(with_seats=True)``), tickets sold per zone (``db.sold_by_zone``), seats
   sold (``db.sold_seats``) and tickets per customer, in one REPEATABLE READ transaction; the tickets and
   seats of dead-lettered orders PostgreSQL's ``orders`` lacks count as sold too (acknowledged sales it
   refused: a person decides, and until then nobody else may buy them; ``domain.dead_stock``, as reconcile
   keeps them);
4. delete whatever keys of the event are left (``Inventory.unload_event``: old hold records, idempotency
   keys, order pointers), so a hold given before the loss is unknown: its confirm gets 404
   ``hold_not_found`` and its stock is available again;
5. ``Inventory.load_event(spec, status="paused", sold=..., sold_seats=..., customers=...)`` (one MULTI,
   pipelined in chunks of 10,000 seats), per-customer ticket counts included (the
   ``max_tickets_per_customer`` rule counts confirmed orders too);
6. status: paused (Redis and PostgreSQL, ``service.catalog.set_status_locked``) unless ``resume``; steps 1-6
   run under the event's catalog lock too (``service.catalog.event_lock``), so a pause or resume meanwhile
   waits and applies after.

What a rebuild cannot bring back: orders confirmed in Redis but not yet written through when Redis lost its
data. The outbox lived in Redis; with ``appendfsync everysec`` a crash can lose about the last second of
writes, confirms and their outbox entries included (https://redis.io/docs/management/persistence/). Those
buyers got a 201 and an order id that PostgreSQL never saw; match payment references against
``orders.payment_ref`` to find them. ``BOXOFFICE_WAIT_AOF=true`` (WAITAOF before the 201) closes that gap.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from service import catalog, db, keys
from service.domain import EVENT_ON_SALE, EVENT_PAUSED, dead_stock
from service.errors import DomainError
from service.inventory import Inventory
from service.settings import Settings

Progress = Callable[[str, int, int], None]
"""``progress(step description, steps done, steps in all)``, called before each step and once at the end."""

STEPS = 6
CATALOG_LOCK_WAIT_SECONDS = 60.0
"""How long a rebuild waits for another change of the event's catalog state (``catalog.event_lock``)."""
REBUILD_LOCK = "boxoffice.rebuild:{}"
"""The per-event PostgreSQL advisory lock (key text, hashed) one rebuild holds, so that a second one refuses."""


@dataclass
class RebuildResult:
    event_id: str
    status: str
    zones: int
    seats: int
    """Seats in the seat maps (all seated zones)."""
    sold_tickets: int
    sold_seats: int
    orders: int
    customers: int
    outbox_written: int
    """Orders a surviving outbox still held that were written through first."""
    seconds: float


async def rebuild_event(
    redis_inventory: Inventory,
    pg: asyncpg.Pool,
    event_id: str,
    *,
    resume: bool,
    progress: Progress | None = None,
) -> RebuildResult:
    """Reload one event from PostgreSQL into Redis (see the module doc). Returns what was loaded.

    Raises DomainError(event_not_found) if PostgreSQL does not know the event, DomainError(event_exists) if it
    is live in Redis or another rebuild of it is running, DomainError(event_busy) if another change of it
    (``catalog.event_lock``) holds it past ``CATALOG_LOCK_WAIT_SECONDS`` (nothing is changed). Redis or PostgreSQL errors
    propagate; running it again is safe (the event is not live until the last step wrote its meta hash).
    """
    started = time.perf_counter()
    inventory = redis_inventory

    def step(n: int, what: str) -> None:
        if progress is not None:
            progress(what, n, STEPS)

    step(0, "checking Redis")
    # One rebuild of an event at a time: a second one that checked "not live" while the first was loading
    # would unload the event after the first resumed it, and load its older reading over the sales made since.
    # A session-level advisory lock, tried once; PostgreSQL drops it if this process dies.
    busy = DomainError(
        "event_exists", message="Another rebuild of this event is running.", details={"event_id": event_id}
    )
    async with catalog.advisory_lock(pg, REBUILD_LOCK.format(event_id), wait_seconds=0, busy=lambda: busy):
        # and the catalog lock (service/catalog.py), so a pause or resume waits and applies after it
        async with catalog.event_lock(pg, event_id, wait_seconds=CATALOG_LOCK_WAIT_SECONDS) as conn:
            return await _rebuild_locked(
                inventory, pg, conn, event_id, resume=resume, step=step, started=started
            )


async def _rebuild_locked(
    inventory: Inventory,
    pg: asyncpg.Pool,
    catalog_conn: asyncpg.Connection,
    event_id: str,
    *,
    resume: bool,
    step: Callable[[int, str], None],
    started: float,
) -> RebuildResult:
    client = inventory.client
    if await inventory.event_exists(event_id):
        raise DomainError(
            "event_exists",
            message="The event is live in Redis; use `boxoffice reconcile --repair`.",
            details={"event_id": event_id},
        )
    if not await db.event_exists(pg, event_id):
        raise DomainError("event_not_found", details={"event_id": event_id})
    outbox_written = 0
    if await client.xlen(keys.outbox(event_id)):
        step(1, "writing the surviving outbox through")
        from workers.reconcile import redrive_outbox  # the worker's write path, called once here

        outbox_written, _ = await redrive_outbox(client, pg, event_id, inventory.settings)

    step(2, "reading the catalog and sales from PostgreSQL")
    async with pg.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        # db's readers take anything with fetch/fetchrow: a connection keeps them in one snapshot.
        spec, _ = await db.get_event(conn, event_id, with_seats=True)
        sold = await db.sold_by_zone(conn, event_id)
        sold_seats = await db.sold_seats(conn, event_id)
        customers = await db.tickets_by_customer(conn, event_id)
        orders = await conn.fetchval("SELECT count(*) FROM orders WHERE event_id = $1", event_id)
        dead_orders = await db.dead_orders(conn, event_id)
    taken = {(zone_id, seat) for zone_id, seats in sold_seats.items() for seat in seats}
    dead_tickets, dead_seats = dead_stock(dead_orders, taken)
    capacity = {z.zone_id: z.capacity for z in spec.zones}
    for zone_id, tickets in dead_tickets.items():  # never past capacity (a dead letter of a real oversell)
        if zone_id in capacity:
            sold[zone_id] = min(capacity[zone_id], sold.get(zone_id, 0) + tickets)
    for (zone_id, seat), order_id in dead_seats.items():
        sold_seats.setdefault(zone_id, {})[seat] = order_id

    step(3, "clearing what is left of the event in Redis")
    await inventory.unload_event(event_id)

    step(4, f"loading {sum(len(z.seats or []) for z in spec.zones):,} seats into Redis")
    await inventory.load_event(
        spec, status=EVENT_PAUSED, sold=sold, sold_seats=sold_seats, customers=customers
    )

    status = EVENT_ON_SALE if resume else EVENT_PAUSED
    step(5, f"setting the status to {status}")
    await catalog.set_status_locked(catalog_conn, inventory, event_id, status)
    step(STEPS, "done")
    return RebuildResult(
        event_id=event_id,
        status=status,
        zones=len(spec.zones),
        seats=sum(len(z.seats or []) for z in spec.zones),
        sold_tickets=sum(sold.values()),
        sold_seats=sum(len(s) for s in sold_seats.values()),
        orders=orders,
        customers=len(customers),
        outbox_written=outbox_written,
        seconds=time.perf_counter() - started,
    )


def run_cli(settings: Settings, *, event_id: str | None, resume: bool) -> int:
    """``boxoffice rebuild [--event ID] [--resume]``. Without ``--event``: every event in PostgreSQL that is not
    live in Redis (live ones are listed as skipped). Exit 0 when done, 1 if ``--event`` names a live event or a
    rebuild failed, 2 if PostgreSQL does not know the event."""
    return asyncio.run(_cli(settings, event_id=event_id, resume=resume))


async def _cli(settings: Settings, *, event_id: str | None, resume: bool) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from service.app import redis_client

    # Piped output (a file, CI logs) gets 160 columns rather than rich's 80, unless COLUMNS says otherwise.
    out = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160)
    err = Console(stderr=True)
    client = redis_client(settings.redis_url, settings)
    pool = await db.create_pool(settings.database_url)
    inventory = Inventory(client, settings)
    results: list[RebuildResult] = []
    skipped: list[str] = []
    code = 0
    try:
        ids = [event_id] if event_id else await db.event_ids(pool)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=err, transient=True) as bar:
            events = bar.add_task("events", total=len(ids), visible=len(ids) > 1)
            steps = bar.add_task("", total=STEPS)
            for eid in ids:
                bar.reset(steps, total=STEPS)

                def show(what: str, done: int, total: int, eid: str = eid) -> None:
                    bar.update(steps, description=f"{eid}: {what}", completed=done, total=total)

                try:
                    results.append(await rebuild_event(inventory, pool, eid, resume=resume, progress=show))
                except DomainError as exc:
                    if exc.code == "event_exists" and event_id is None:
                        skipped.append(eid)
                    else:
                        err.print(f"{eid}: {exc.message}")
                        code = max(code, 2 if exc.code == "event_not_found" else 1)
                bar.advance(events)
    finally:
        await pool.close()
        inventory.close()
        await client.aclose()
    if results:
        table = Table(title="Rebuilt from PostgreSQL")
        table.add_column("event", no_wrap=True)
        for col in ("zones", "seats", "sold", "sold seats", "orders", "customers", "outbox written"):
            table.add_column(col, justify="right")
        table.add_column("status", no_wrap=True)
        table.add_column("seconds", justify="right")
        for r in results:
            table.add_row(
                r.event_id,
                str(r.zones),
                f"{r.seats:,}",
                f"{r.sold_tickets:,}",
                f"{r.sold_seats:,}",
                f"{r.orders:,}",
                f"{r.customers:,}",
                str(r.outbox_written),
                r.status,
                f"{r.seconds:.2f}",
            )
        out.print(table)
        if not resume:
            out.print(
                "Events are paused. Check them (boxoffice reconcile), then: boxoffice event resume <id>"
            )
    if skipped:
        out.print(f"skipped (live in Redis; use boxoffice reconcile --repair): {', '.join(skipped)}")
    return code
