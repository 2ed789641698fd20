"""PostgreSQL access for the API: the catalog (events, zones, seats) and reading orders back.

Orders are written by the write-through worker (``workers/outbox.py``), never by the API.
All functions take an asyncpg pool or connection; asyncpg errors propagate unless stated.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from service.domain import EventSpec, ZoneSpec
from service.errors import DomainError


async def create_pool(database_url: str, *, min_size: int = 1, max_size: int = 5) -> asyncpg.Pool:
    return await asyncpg.create_pool(database_url, min_size=min_size, max_size=max_size, command_timeout=30)


async def insert_event(conn: asyncpg.Connection, spec: EventSpec) -> None:
    """Insert an event, its zones and seats (COPY) in the caller's transaction. Raises DomainError(event_exists)."""
    try:
        await conn.execute(
            "INSERT INTO events (event_id, name, starts_at, hold_ttl_seconds, max_tickets_per_customer)"
            " VALUES ($1, $2, $3, $4, $5)",
            spec.event_id,
            spec.name,
            spec.starts_at,
            spec.hold_ttl_seconds,
            spec.max_tickets_per_customer,
        )
    except asyncpg.UniqueViolationError:
        raise DomainError("event_exists", details={"event_id": spec.event_id}) from None
    except asyncpg.DataError as exc:  # a value PostgreSQL cannot store, that validation let through
        raise DomainError(
            "validation_failed", details={"errors": [{"field": "body", "message": str(exc)}]}
        ) from None
    await conn.executemany(
        "INSERT INTO zones (event_id, zone_id, position, kind, capacity, price_cents) VALUES ($1, $2, $3, $4, $5, $6)",
        [(spec.event_id, z.zone_id, i, z.kind, z.capacity, z.price_cents) for i, z in enumerate(spec.zones)],
    )
    rows = [(spec.event_id, z.zone_id, s, i) for z in spec.zones if z.seats for i, s in enumerate(z.seats)]
    if rows:
        await conn.copy_records_to_table(
            "seats", records=rows, columns=["event_id", "zone_id", "seat", "position"]
        )


async def set_status(pool: asyncpg.Pool, event_id: str, status: str) -> None:
    await pool.execute("UPDATE events SET status = $2 WHERE event_id = $1", event_id, status)


async def event_ids(pool: asyncpg.Pool) -> list[str]:
    return [r["event_id"] for r in await pool.fetch("SELECT event_id FROM events ORDER BY event_id")]


async def get_event(pool: asyncpg.Pool, event_id: str, *, with_seats: bool = False) -> tuple[EventSpec, str]:
    """The event as an EventSpec (seats only if asked: they can be 100,000s) and its status.

    Raises DomainError(event_not_found).
    """
    ev = await pool.fetchrow("SELECT * FROM events WHERE event_id = $1", event_id)
    if ev is None:
        raise DomainError("event_not_found")
    zones = await pool.fetch("SELECT * FROM zones WHERE event_id = $1 ORDER BY position", event_id)
    seats: dict[str, list[str]] = {}
    if with_seats:
        for r in await pool.fetch(
            "SELECT zone_id, seat FROM seats WHERE event_id = $1 ORDER BY zone_id, position", event_id
        ):
            seats.setdefault(r["zone_id"], []).append(r["seat"])
    zone_specs = [
        ZoneSpec.model_construct(
            zone_id=z["zone_id"],
            kind=z["kind"],
            capacity=z["capacity"],
            price_cents=z["price_cents"],
            seats=seats.get(z["zone_id"], []) if z["kind"] == "seated" else None,
            rows=None,
        )
        for z in zones
    ]
    spec = EventSpec.model_construct(
        event_id=ev["event_id"],
        name=ev["name"],
        starts_at=ev["starts_at"],
        hold_ttl_seconds=ev["hold_ttl_seconds"],
        max_tickets_per_customer=ev["max_tickets_per_customer"],
        zones=zone_specs,
    )
    return spec, ev["status"]


async def sold_by_zone(pool: asyncpg.Pool, event_id: str) -> dict[str, int]:
    """zone_id -> tickets sold according to the order items (not the zones.sold counter)."""
    rows = await pool.fetch(
        "SELECT zone_id, sum(quantity)::int AS sold FROM order_items WHERE event_id = $1 GROUP BY zone_id",
        event_id,
    )
    return {r["zone_id"]: r["sold"] for r in rows}


async def sold_seats(pool: asyncpg.Pool, event_id: str) -> dict[str, dict[str, str]]:
    """zone_id -> {seat: order_id} for every seat in an order."""
    out: dict[str, dict[str, str]] = {}
    for r in await pool.fetch(
        "SELECT zone_id, seat, order_id FROM order_items WHERE event_id = $1 AND seat IS NOT NULL", event_id
    ):
        out.setdefault(r["zone_id"], {})[r["seat"]] = r["order_id"]
    return out


async def tickets_by_customer(pool: asyncpg.Pool, event_id: str) -> dict[str, int]:
    """customer_id -> tickets in persisted orders (what max_tickets_per_customer counts besides active holds)."""
    rows = await pool.fetch(
        "SELECT o.customer_id, sum(i.quantity)::int AS tickets FROM orders o JOIN order_items i USING (order_id)"
        " WHERE o.event_id = $1 GROUP BY o.customer_id",
        event_id,
    )
    return {r["customer_id"]: r["tickets"] for r in rows}


def _ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


async def get_order(pool: asyncpg.Pool, event_id: str, order_id: str) -> dict[str, Any] | None:
    """The persisted order in the confirm script's shape plus ``persisted_at_ms``, or None."""
    o = await pool.fetchrow("SELECT * FROM orders WHERE order_id = $1 AND event_id = $2", order_id, event_id)
    if o is None:
        return None
    items: dict[str, dict[str, Any]] = {}
    for r in await pool.fetch(
        "SELECT zone_id, seat, quantity FROM order_items WHERE order_id = $1", order_id
    ):
        item = items.setdefault(r["zone_id"], {"zone_id": r["zone_id"]})
        if r["seat"] is None:
            item["quantity"] = item.get("quantity", 0) + r["quantity"]
        else:
            item.setdefault("seats", []).append(r["seat"])
    return {
        "order_id": o["order_id"],
        "event_id": o["event_id"],
        "hold_id": o["hold_id"],
        "customer_id": o["customer_id"],
        "items": list(items.values()),
        "amount_cents": o["amount_cents"],
        "payment_ref": o["payment_ref"],
        "confirmed_at_ms": _ms(o["confirmed_at"]),
        "persisted_at_ms": _ms(o["persisted_at"]),
    }
