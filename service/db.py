"""PostgreSQL access for the API: the catalog (events, zones, seats) and reading orders back.

Orders are written by the write-through worker (``workers/outbox.py``), never by the API.
All functions take an asyncpg pool or connection; asyncpg errors propagate unless stated.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from service.domain import DeadOrder, EventSpec, ZoneSpec
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


async def set_status(pool: asyncpg.Pool | asyncpg.Connection, event_id: str, status: str) -> None:
    await pool.execute("UPDATE events SET status = $2 WHERE event_id = $1", event_id, status)


async def event_exists(pool: asyncpg.Pool | asyncpg.Connection, event_id: str) -> bool:
    """Whether the catalog has the event (PostgreSQL is its durable record)."""
    return await pool.fetchval("SELECT EXISTS (SELECT 1 FROM events WHERE event_id = $1)", event_id)


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


_DEAD_UNWRITTEN_SQL = """
SELECT DISTINCT ON (d.order_id) d.order_id, d.payload FROM dead_letters d
WHERE d.event_id = $1 AND d.order_id IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.order_id = d.order_id)
  AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.hold_id = d.payload->>'hold_id' AND o.event_id = d.event_id)
ORDER BY d.order_id, d.id
"""
_KNOWN_SEATS_SQL = """
SELECT s.zone_id, s.seat FROM seats s JOIN unnest($2::text[], $3::text[]) AS u (zone_id, seat)
  ON s.zone_id = u.zone_id AND s.seat = u.seat
WHERE s.event_id = $1
"""


async def dead_orders(conn: asyncpg.Connection | asyncpg.Pool, event_id: str) -> list[DeadOrder]:
    """The event's dead-lettered orders that ``orders`` lacks, parsed from their payloads (the confirm script's
    order, ``lua/confirm.lua``); a payload that is not one (malformed) is left out: it holds no stock. So is a
    second order of a hold that has one in ``orders`` (one order per hold: e.g. a retried confirm after Redis
    lost the first, which a repair gives back to the hold): its tickets are that order's, sold once."""
    out: list[DeadOrder] = []
    for r in await conn.fetch(_DEAD_UNWRITTEN_SQL, event_id):
        order = _dead_order(r["payload"], r["order_id"])
        if order is not None:
            out.append(order)
    wanted = {seat for o in out for seat in o.seats}
    if wanted:
        zones, labels = zip(*wanted, strict=True)
        rows = await conn.fetch(_KNOWN_SEATS_SQL, event_id, list(zones), list(labels))
        known = {(row["zone_id"], row["seat"]) for row in rows}
        for o in out:
            o.seats = [s for s in o.seats if s in known]
    return out


def _dead_order(raw: str | bytes | dict, order_id: str) -> DeadOrder | None:
    try:
        order = orjson.loads(raw) if isinstance(raw, str | bytes) else raw
    except orjson.JSONDecodeError:
        return None
    if not isinstance(order, dict) or order.get("order_id") != order_id:
        return None
    confirmed_at_ms, items = order.get("confirmed_at_ms"), order.get("items")
    if not isinstance(confirmed_at_ms, int | float) or not isinstance(items, list):
        return None
    ga: dict[str, int] = defaultdict(int)
    seats: list[tuple[str, str]] = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("zone_id"), str):
            return None
        item_seats, quantity = item.get("seats"), item.get("quantity")
        if item_seats and isinstance(item_seats, list) and all(isinstance(x, str) for x in item_seats):
            seats.extend((item["zone_id"], seat) for seat in item_seats)
        elif not item_seats and isinstance(quantity, int) and quantity > 0:
            ga[item["zone_id"]] += quantity
        else:
            return None
    return DeadOrder(order_id, confirmed_at_ms, dict(ga), seats)


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
