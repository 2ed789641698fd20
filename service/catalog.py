"""Catalog operations that span PostgreSQL (the record) and Redis (the live inventory)."""

from __future__ import annotations

import asyncpg

from service import db
from service.domain import EVENT_ON_SALE, EventSpec
from service.errors import DomainError
from service.inventory import Inventory


async def create_event(pool: asyncpg.Pool, inventory: Inventory, spec: EventSpec) -> None:
    """Store the event in PostgreSQL and load it into Redis; both or neither.

    The PostgreSQL transaction stays open while Redis is loaded, so a failed load rolls the rows back and a
    failed commit unloads Redis again; nothing is left to do after the commit, so a create is never half
    applied. An order confirmed in the instant before the commit waits in the outbox: the write-through
    worker only takes outboxes of events its PostgreSQL already has. Raises DomainError(event_exists).
    """
    loaded = False
    try:
        async with pool.acquire() as conn, conn.transaction():
            await db.insert_event(conn, spec)
            if await inventory.event_exists(spec.event_id):
                raise DomainError("event_exists", details={"event_id": spec.event_id})
            await inventory.load_event(spec, status=EVENT_ON_SALE)
            loaded = True
    except BaseException:
        if loaded:  # the commit failed after Redis was loaded
            await inventory.unload_event(spec.event_id)
        raise


async def set_status(pool: asyncpg.Pool, inventory: Inventory, event_id: str, status: str) -> None:
    """Pause or resume new holds: Redis first (takes effect at once), then the record. Raises event_not_found."""
    await inventory.set_status(event_id, status)
    await db.set_status(pool, event_id, status)
