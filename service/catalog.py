"""Catalog operations that span PostgreSQL (the record) and Redis (the live inventory)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg

from service import db
from service.domain import EVENT_ON_SALE, EVENT_PAUSED, EventSpec
from service.errors import DomainError
from service.inventory import Inventory

CATALOG_LOCK = "boxoffice.catalog:{}"
"""The per-event PostgreSQL advisory lock (key text, hashed) that create_event and set_status hold throughout."""


@contextlib.asynccontextmanager
async def _event_lock(pool: asyncpg.Pool, event_id: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection holding the event's catalog lock (a session advisory lock, waited for): creates, pauses and
    resumes of one event run one at a time, their Redis writes and clean-ups included. asyncpg's connection
    reset drops the lock if the unlock itself fails."""
    key = CATALOG_LOCK.format(event_id)
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", key)
        try:
            yield conn
        finally:
            await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", key)


async def create_event(pool: asyncpg.Pool, inventory: Inventory, spec: EventSpec) -> None:
    """Store the event in PostgreSQL and load it into Redis; both or neither. Raises DomainError(event_exists).

    Under the event's catalog lock (``_event_lock``), so a concurrent create of the same id (a client's
    retry), pause or resume waits until this one is done, clean-up included:
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
    async with _event_lock(pool, eid) as conn:
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
    """Pause or resume new holds, under the event's catalog lock: Redis first (takes effect at once), then the
    record. Raises event_not_found when PostgreSQL's catalog has no such event (also when Redis has keys of it
    that a failed create left), or when Redis lost it (the message says to run ``boxoffice rebuild``)."""
    async with _event_lock(pool, event_id) as conn:
        if not await db.event_exists(conn, event_id):
            raise DomainError("event_not_found")
        if not await inventory.event_exists(event_id):
            raise DomainError(
                "event_not_found",
                message=f"The event is in the catalog but not in Redis (Redis lost it): run "
                f"`boxoffice rebuild --event {event_id}`.",
            )
        await inventory.set_status(event_id, status)
        await db.set_status(conn, event_id, status)
