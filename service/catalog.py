"""Catalog operations that span PostgreSQL (the record) and Redis (the live inventory)."""

from __future__ import annotations

import contextlib

import asyncpg

from service import db
from service.domain import EVENT_ON_SALE, EVENT_PAUSED, EventSpec
from service.errors import DomainError
from service.inventory import Inventory


async def create_event(pool: asyncpg.Pool, inventory: Inventory, spec: EventSpec) -> None:
    """Store the event in PostgreSQL and load it into Redis; both or neither. Raises DomainError(event_exists).

    1. In one PostgreSQL transaction: insert the rows (a concurrent create of the same id waits on the primary
       key until this transaction ends), then load Redis with the event **paused**, so nobody can hold a
       ticket of an event that might still be rolled back. From the moment the load is sent, any failure
       (an error, a reply lost after Redis applied the load, a failed commit) unloads Redis again.
    2. After the commit: status on_sale in Redis. If that last write fails, the event exists, paused in both
       stores (``boxoffice event resume`` puts it on sale), and the error propagates.

    Redis keys of the event that PostgreSQL does not know (an earlier create's load whose unload failed too)
    are replaced when they carry no sale (paused, nothing held or sold, no customer counts, an empty outbox:
    ``Inventory.unsold``); otherwise the create is refused with event_exists and nothing is changed.
    """
    eid = spec.event_id
    loaded = False
    try:
        async with pool.acquire() as conn, conn.transaction():
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
            await db.set_status(pool, eid, EVENT_PAUSED)
        raise


async def set_status(pool: asyncpg.Pool, inventory: Inventory, event_id: str, status: str) -> None:
    """Pause or resume new holds: Redis first (takes effect at once), then the record. Raises event_not_found
    when PostgreSQL's catalog has no such event (also when Redis has keys of it that a failed create left)."""
    if not await db.event_exists(pool, event_id):
        raise DomainError("event_not_found")
    await inventory.set_status(event_id, status)
    await db.set_status(pool, event_id, status)
