"""Catalog operations that span PostgreSQL (the record) and Redis (the live inventory)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import asyncpg

from service import db
from service.domain import EVENT_ON_SALE, EVENT_PAUSED, EventSpec
from service.errors import DomainError
from service.inventory import Inventory

CATALOG_LOCK = "boxoffice.catalog:{}"
"""The per-event PostgreSQL advisory lock (key text, hashed) held by whatever changes an event's catalog state:
create_event, set_status, a rebuild and a reconcile repair, each from start to end."""
LOCK_POLL_SECONDS = 0.05
API_LOCK_WAIT_SECONDS = 10.0
"""How long a create, pause or resume waits for another change of the same event before event_busy (409)."""


@contextlib.asynccontextmanager
async def advisory_lock(
    pool: asyncpg.Pool, key: str, *, wait_seconds: float, busy: Callable[[], DomainError]
) -> AsyncIterator[asyncpg.Connection]:
    """A connection holding the PostgreSQL session advisory lock ``key`` (text, hashed). Taken with
    ``pg_try_advisory_lock``, tried every ``LOCK_POLL_SECONDS`` for ``wait_seconds`` (0: once) without keeping a
    pooled connection while it waits (waiters must not starve the pool other routes use); then raises
    ``busy()``. The unlock is best effort: if it fails, asyncpg's connection reset (``pg_advisory_unlock_all``)
    or the end of the session drops the lock."""
    deadline = time.monotonic() + wait_seconds
    while True:
        conn = await pool.acquire()
        try:
            if await conn.fetchval("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", key):
                break
        except BaseException:
            await pool.release(conn)
            raise
        await pool.release(conn)
        if time.monotonic() >= deadline:
            raise busy()
        await asyncio.sleep(LOCK_POLL_SECONDS)
    try:
        yield conn
    finally:
        try:
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", key)
        finally:
            await pool.release(conn)


def event_lock(
    pool: asyncpg.Pool, event_id: str, *, wait_seconds: float | None = None
) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]:
    """The event's catalog lock (``CATALOG_LOCK``, ``advisory_lock``): changes of one event's catalog state run
    one at a time, their Redis writes and clean-ups included. Raises DomainError(event_busy) after
    ``wait_seconds`` (default ``API_LOCK_WAIT_SECONDS``)."""
    return advisory_lock(
        pool,
        CATALOG_LOCK.format(event_id),
        wait_seconds=API_LOCK_WAIT_SECONDS if wait_seconds is None else wait_seconds,
        busy=lambda: DomainError("event_busy", details={"event_id": event_id}),
    )


async def create_event(pool: asyncpg.Pool, inventory: Inventory, spec: EventSpec) -> None:
    """Store the event in PostgreSQL and load it into Redis; both or neither. Raises DomainError(event_exists,
    event_busy).

    Under the event's catalog lock (``event_lock``), so a concurrent create of the same id (a client's
    retry), pause, resume, rebuild or repair waits until this one is done, clean-up included (or gets
    event_busy, 409, after ``API_LOCK_WAIT_SECONDS``):
    1. In one PostgreSQL transaction: insert the rows, then load Redis with the event **paused**, so nobody
       can hold a ticket of an event that might still be rolled back. From the moment the load is sent, any
       failure (an error, a reply lost after Redis applied the load, a failed commit) unloads Redis again.
    2. After the commit: status on_sale in Redis. If that last write fails, the event exists, paused in both
       stores (``boxoffice event resume`` puts it on sale), and the error propagates.

    Redis keys of the event that PostgreSQL does not know (an earlier create's load whose unload failed too)
    are replaced when they carry no sale (paused, nothing held or sold, no customer counts, an empty outbox:
    ``Inventory.unsold``); otherwise the create is refused with event_exists and nothing is changed.
    """
    eid = spec.event_id
    async with event_lock(pool, eid) as conn:
        loaded = False
        try:
            async with conn.transaction():
                await db.insert_event(conn, spec)
                if await inventory.event_exists(eid):
                    if not await inventory.unsold(eid):
                        raise DomainError("event_exists", details={"event_id": eid})
                    await inventory.unload_event(eid)  # left by a failed create: nothing was sold there
                loaded = True
                await inventory.load_event(spec, status=EVENT_PAUSED)
        except BaseException:
            if loaded:
                await inventory.unload_event(eid)
            raise
        try:
            await inventory.set_status(eid, EVENT_ON_SALE)
        except BaseException:
            with contextlib.suppress(Exception):  # best effort: the record then says paused too
                await db.set_status(conn, eid, EVENT_PAUSED)
            raise


async def set_status(pool: asyncpg.Pool, inventory: Inventory, event_id: str, status: str) -> None:
    """Pause or resume new holds, under the event's catalog lock (``set_status_locked``). Raises event_busy
    (409) if another change of the event holds the lock past ``API_LOCK_WAIT_SECONDS``, and what
    ``set_status_locked`` raises."""
    async with event_lock(pool, event_id) as conn:
        await set_status_locked(conn, inventory, event_id, status)


async def set_status_locked(
    conn: asyncpg.Connection, inventory: Inventory, event_id: str, status: str
) -> None:
    """Pause or resume new holds: Redis first (takes effect at once), then the record, on ``conn``, which holds
    the event's catalog lock (``event_lock``). Raises event_not_found when PostgreSQL's catalog has no such
    event (also when Redis has keys of it that a failed create left), or when Redis lost it (the message says
    to run ``boxoffice rebuild``)."""
    if not await db.event_exists(conn, event_id):
        raise DomainError("event_not_found")
    try:
        await inventory.set_status(event_id, status)  # raises event_not_found when Redis lacks the event
    except DomainError as err:
        if err.code != "event_not_found":
            raise
        raise DomainError(
            "event_not_found",
            message=f"The event is in the catalog but not in Redis (Redis lost it): run "
            f"`boxoffice rebuild --event {event_id}`.",
        ) from None
    await db.set_status(conn, event_id, status)
