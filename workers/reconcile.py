"""Reconciliation: compare an event's live inventory in Redis with the record in PostgreSQL; repair what is safe.

What is compared, per event (figures in tickets unless named otherwise):

* ``sold_redis_vs_pg``: zone ``sold`` in Redis == tickets of the event's orders in PostgreSQL + tickets of the
  orders "in flight" (confirmed in Redis, still in the outbox stream, not written through yet) + tickets of
  the dead-lettered orders PostgreSQL's ``orders`` lacks (acknowledged sales PostgreSQL refused: their stock
  stays sold until a person decides; but not a second order of a hold ``orders`` has one of, whose stock is
  that order's: ``db.dead_orders``). In-flight orders are not drift; one older than
  ``stuck_after_ms(settings)`` is (``outbox_stuck``).
* ``sold_counter_vs_items``: ``zones.sold`` == the sum of the zone's ``order_items`` (PostgreSQL alone).
* ``seat_sold_in_pg_not_redis`` / ``seat_sold_in_redis_not_pg``: a seat PostgreSQL (or the outbox, or a dead
  letter of an order PostgreSQL lacks) sold to order O is ``s:O`` in the zone's owner hash, and every ``s:O``
  there is such a seat. Where two of them name one seat, PostgreSQL wins, then the outbox; a dead letter keeps
  only seats of the seat map that neither has (``domain.dead_stock``: else no seat and no ticket there).
* ``orphan_expiry`` (expiry-set member without an active hold record), ``hold_missing_expiry`` (active hold
  record not in the expiry set: it would never expire), ``stale_seat_hold`` (owner ``h:H`` with H not
  active), ``held_vs_holds`` (zone ``held`` != tickets of the active holds).
* ``capacity_invariant``: ``available + held + sold == capacity`` with none negative (``lua/availability.lua``).
* ``order_missing_in_pg``: a confirmed hold (its record lives ``hold_retention_seconds``) whose order is
  neither in PostgreSQL, nor in the outbox, nor dead-lettered: an acknowledged sale missing from the record.
* ``dead_letters``: orders PostgreSQL refused (``workers/outbox.py``); never repaired automatically: a person
  decides (refund or re-seat). As long as the row is there and its order is not in ``orders``, the order's
  tickets count as sold and its seats stay its own (above): a repair neither sells them again nor pauses the
  sale for it. A payload that is not a confirm script's order (malformed) keeps nothing. Deleting the row
  while the order's hold record lives (``hold_retention_seconds``) makes it ``order_missing_in_pg``: a repair
  then re-queues it (a retry, e.g. once ``zones.sold`` is right again).
* ``hold_confirmed_in_pg_not_redis``: a hold record (any status) whose hold has an order in PostgreSQL
  (``orders.hold_id``) while the record is not ``confirmed`` with that order: a confirm Redis lost (it came
  back from a snapshot older than the confirm, which had been written through). The record is then active
  (its tickets counted held and sold; a retried confirm makes a second order PostgreSQL refuses), released
  or expired (the retry answers 409), or confirmed with a second order (a retry before the repair; that
  order is dead-lettered: one order per hold). PostgreSQL alone can know such an order: confirm.lua writes
  the record and the outbox entry in one script, so a snapshot has both or neither. Read after the
  records, so a hold confirmed meanwhile is seen confirmed by the re-check.
* ``event_missing_in_redis`` (run ``boxoffice rebuild``), ``event_missing_in_pg``, ``zone_missing_in_*``.

A live comparison of two stores is made consistent like this. One MULTI reads the zone hashes, owner
hashes, expiry set, the whole outbox and Redis ``TIME`` (T). Every order confirmed before T is then either
in that outbox snapshot or was written through before T; PostgreSQL is read after T, in one
REPEATABLE READ transaction, counting only orders with ``confirmed_at < T`` or in the outbox snapshot (an
order confirmed after T may be written through before we read; confirm times are Redis ``TIME`` in ms, the
same clock). In-flight = outbox orders PostgreSQL does not have in that transaction, so every order counts
once. Hold records are read in a second MULTI that re-reads the expiry set; the ``held`` comparison is made
only when that set did not change in between (``SNAPSHOT_ATTEMPTS`` tries, else ``held_checked`` is False).
Every hold-level finding is re-checked atomically (one MULTI) before it is reported.

Repair (``repair=True``), under the event's catalog lock (``service.catalog.event_lock``: a pause or resume
meanwhile waits for it, and is applied after), with the sale paused and resumed after only if it
was on sale and nothing that risks an oversell is left:

1. ``zones.sold`` := sum of its order items (zone rows locked ``FOR UPDATE`` like the write-through does);
2. confirmed orders missing from PostgreSQL are re-queued: their order (``Inventory.find_order``, from the
   hold record) is appended to the outbox in the confirm script's entry format (field ``order``);
3. re-drive: every outbox entry goes through ``workers.outbox.write_batch`` (idempotent), then XACK + XDEL
   in one MULTI, as the worker does;
4. holds: lost confirms (``hold_confirmed_in_pg_not_redis``) are made again with the PostgreSQL order, in
   one MULTI per hold under WATCH of its record and its seats' owner hashes: what confirm.lua writes
   (status ``confirmed``, ``order_id``, ``payment_ref``, ``confirmed_at_ms`` and ``ended_at_ms`` from the
   order; the record and the order pointer kept ``hold_retention_seconds`` from now; out of the expiry
   set; seats ``s:O``) and the tickets moved to ``sold`` from ``held`` (an active record) or ``available``
   (an ended one, whose customer's count is taken back too); a second order's pointer is deleted. Another
   active hold on one of its seats is released first; a record whose customer or items are not the
   order's is left (still reported). A retried confirm then answers the existing order. Then orphan
   expiry members are removed (ZREM, what ``end_hold`` does first), active holds missing from
   the expiry set are put back in it (then ``Inventory.reap`` gives back those already due), active holds
   on a seat PostgreSQL sold (to another hold's order) are released (``Inventory.release``: the release
   script's rules);
5. Redis counters and seat owners are set from the record, in one MULTI under WATCH of the event's
   expiry set, outbox, zone and owner keys (retried if a confirm, release or write-through lands
   meanwhile): ``sold`` = PostgreSQL items + in-flight + dead-lettered (orders PostgreSQL lacks),
   ``held`` = active holds, ``available`` = the rest, owners = PostgreSQL, in-flight and dead-lettered seats
   (``s:O``) + active holds' seats (``h:H``). A zone where that would make ``available`` negative is left
   alone and stays reported (e.g. a dead letter of a real oversell: a person refunds it).

Then the event is checked again; the returned report is that re-check, with ``repaired`` listing what was
done and ``drifts_before`` what was found first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
from redis.exceptions import ResponseError, WatchError

from service import catalog, db, keys, metrics
from service.domain import EVENT_ON_SALE, EVENT_PAUSED, HOLD_ACTIVE, ID_RE, DeadOrder, dead_stock
from service.errors import DomainError
from service.inventory import Inventory
from service.settings import Settings
from service.slots import SlotClients

log = logging.getLogger("boxoffice.reconcile")

# Drift kinds: the ``kind`` label of metrics.DRIFT.
EVENT_MISSING_IN_REDIS = "event_missing_in_redis"
EVENT_MISSING_IN_PG = "event_missing_in_pg"
ZONE_MISSING_IN_REDIS = "zone_missing_in_redis"
ZONE_MISSING_IN_PG = "zone_missing_in_pg"
SOLD = "sold_redis_vs_pg"
PG_COUNTER = "sold_counter_vs_items"
HELD = "held_vs_holds"
INVARIANT = "capacity_invariant"
SEAT_SOLD_NOT_IN_REDIS = "seat_sold_in_pg_not_redis"
SEAT_SOLD_NOT_IN_PG = "seat_sold_in_redis_not_pg"
ORPHAN_EXPIRY = "orphan_expiry"
HOLD_MISSING_EXPIRY = "hold_missing_expiry"
STALE_SEAT_HOLD = "stale_seat_hold"
ORDER_MISSING_IN_PG = "order_missing_in_pg"
HOLD_CONFIRMED_NOT_IN_REDIS = "hold_confirmed_in_pg_not_redis"
REPAIR_LOCK_WAIT_SECONDS = 60.0
"""How long a repair waits for another change of the event's catalog state (``catalog.event_lock``)."""
OUTBOX_STUCK = "outbox_stuck"
DEAD_LETTERS = "dead_letters"

KINDS = (
    EVENT_MISSING_IN_REDIS,
    EVENT_MISSING_IN_PG,
    ZONE_MISSING_IN_REDIS,
    ZONE_MISSING_IN_PG,
    SOLD,
    PG_COUNTER,
    HELD,
    INVARIANT,
    SEAT_SOLD_NOT_IN_REDIS,
    SEAT_SOLD_NOT_IN_PG,
    ORPHAN_EXPIRY,
    HOLD_MISSING_EXPIRY,
    STALE_SEAT_HOLD,
    ORDER_MISSING_IN_PG,
    HOLD_CONFIRMED_NOT_IN_REDIS,
    OUTBOX_STUCK,
    DEAD_LETTERS,
)
NOT_REPAIRABLE = {
    EVENT_MISSING_IN_REDIS,
    EVENT_MISSING_IN_PG,
    ZONE_MISSING_IN_REDIS,
    ZONE_MISSING_IN_PG,
    DEAD_LETTERS,
}
"""Kinds a repair leaves to a person (rebuild, or a refund decision for a dead letter)."""
OVERSELL_RISK = {
    SOLD,
    HELD,
    INVARIANT,
    SEAT_SOLD_NOT_IN_REDIS,
    SEAT_SOLD_NOT_IN_PG,
    STALE_SEAT_HOLD,
    ORDER_MISSING_IN_PG,
    HOLD_CONFIRMED_NOT_IN_REDIS,
    ZONE_MISSING_IN_REDIS,
    EVENT_MISSING_IN_REDIS,
}
"""Kinds that keep a repaired event paused: selling on wrong counters could oversell or strand stock."""

EXAMPLES = 10
"""Ids listed per drift (the count says how many there are)."""
SNAPSHOT_ATTEMPTS = 5
REPAIR_ATTEMPTS = 20
SCAN_COUNT = 1000
READ_CHUNK = 5000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


STUCK_AFTER_MIN_MS = 60_000


def stuck_after_ms(settings: Settings) -> int:
    """An in-flight outbox entry older than this is ``outbox_stuck``: 4 x the claim idle time, at least
    ``STUCK_AFTER_MIN_MS`` (a live worker claims a dead one's entries after ``outbox_claim_idle_ms``)."""
    return max(STUCK_AFTER_MIN_MS, 4 * settings.outbox_claim_idle_ms)


# Report ------------------------------------------------------------------------------------------


@dataclass
class Drift:
    kind: str
    count: int
    """How many tickets, seats, holds, orders or rows are off (>= 1)."""
    zone_id: str | None = None
    detail: str = ""
    examples: list[str] = field(default_factory=list)
    redis: int | None = None
    """For counter drifts: Redis' figure."""
    expected: int | None = None
    """For counter drifts: what the record (PostgreSQL + in flight) says."""
    repairable: bool = True


@dataclass
class ZoneReport:
    zone_id: str
    kind: str
    capacity: int
    available: int | None
    held: int | None
    sold_redis: int | None
    in_flight: int
    """Tickets of outbox orders not yet in PostgreSQL."""
    sold_pg: int
    """Tickets in the zone's order items (orders confirmed before the snapshot)."""
    sold_pg_counter: int
    """``zones.sold``."""
    held_by_holds: int | None
    """Tickets of active holds; None when the sale was too busy to compare (see ``held_checked``)."""
    dead_lettered: int = 0
    """Tickets of dead-lettered orders PostgreSQL's ``orders`` lacks (not in flight): kept sold in Redis."""


@dataclass
class OutboxReport:
    length: int
    pending: int
    """Delivered to a worker, not acked (XPENDING summary of the ``writers`` group)."""
    in_flight_orders: int
    persisted_unacked: int
    """Entries already in PostgreSQL, not acked/deleted yet."""
    oldest_unacked_age_ms: int | None
    group_exists: bool


@dataclass
class EventReport:
    event_id: str
    status: str | None
    """Sale status in Redis (None if the event is not in Redis)."""
    checked_at_ms: int
    zones: list[ZoneReport] = field(default_factory=list)
    outbox: OutboxReport | None = None
    active_holds: int = 0
    dead_letters: int = 0
    held_checked: bool = True
    drifts: list[Drift] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    drifts_before: list[Drift] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.drifts

    def drift_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(KINDS, 0)
        for d in self.drifts:
            counts[d.kind] = counts.get(d.kind, 0) + d.count
        return counts

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "clean": self.clean}


@dataclass
class _Findings:
    """Ids a repair acts on (each re-verified when acted on)."""

    orphan_expiry: list[str] = field(default_factory=list)
    missing_expiry: list[str] = field(default_factory=list)
    conflicting_holds: set[str] = field(default_factory=set)
    lost_orders: list[str] = field(default_factory=list)
    lost_confirms: dict[str, str] = field(default_factory=dict)
    """hold id -> the order id PostgreSQL has for it (``HOLD_CONFIRMED_NOT_IN_REDIS``)."""


# Redis reads -------------------------------------------------------------------------------------


def _s(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _smap(raw: dict) -> dict[str, str]:
    return {_s(k): _s(v) for k, v in raw.items()}


def _entry_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def _entry_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _tickets(item: dict) -> int:
    return len(item["seats"]) if item.get("seats") else int(item.get("quantity") or 0)


@dataclass
class _Live:
    zones: dict[str, dict[str, str]]
    owners: dict[str, dict[str, str]]
    expiry: dict[str, int]
    outbox: list[tuple[str, dict]]
    """(entry id, order); an entry whose order does not parse is kept with ``{}``."""
    now_ms: int


async def _read_live(client: aioredis.Redis, event_id: str, zone_ids: list[str]) -> _Live:
    """One MULTI: zone hashes, owner hashes, expiry set, the whole outbox and TIME (a consistent snapshot)."""
    async with client.pipeline(transaction=True) as pipe:
        for z in zone_ids:
            pipe.hgetall(keys.zone(event_id, z))
            pipe.hgetall(keys.owners(event_id, z))
        pipe.zrange(keys.expiry(event_id), 0, -1, withscores=True)
        pipe.xrange(keys.outbox(event_id))
        pipe.time()
        res = await pipe.execute()
    n = len(zone_ids)
    zones = {z: _smap(res[2 * i]) for i, z in enumerate(zone_ids)}
    owners = {z: _smap(res[2 * i + 1]) for i, z in enumerate(zone_ids)}
    expiry = {_s(m): int(score) for m, score in res[2 * n]}
    outbox = []
    for entry_id, fields in res[2 * n + 1]:
        raw = fields.get(b"order", fields.get("order"))
        try:
            order = orjson.loads(raw) if raw is not None else {}
        except orjson.JSONDecodeError:
            order = {}
        outbox.append((_s(entry_id), order if isinstance(order, dict) else {}))
    sec, usec = res[2 * n + 2]
    return _Live(zones, owners, expiry, outbox, int(sec) * 1000 + int(usec) // 1000)


_HOLD_FIELDS = ("status", "items", "expires_at_ms", "order_id", "confirmed_at_ms")


def _hold_record(values: list) -> dict[str, Any] | None:
    status, items, expires_at_ms, order_id, confirmed_at_ms = (_s(v) for v in values)
    if status is None:
        return None
    return {
        "status": status,
        "items": orjson.loads(items) if items else [],
        "expires_at_ms": int(expires_at_ms) if expires_at_ms else None,
        "order_id": order_id,
        "confirmed_at_ms": int(confirmed_at_ms) if confirmed_at_ms else None,
    }


async def _read_holds(client: aioredis.Redis, event_id: str, hold_ids: list[str]) -> dict[str, dict | None]:
    """Hold records (None where the record is gone), pipelined in chunks (not atomic)."""
    out: dict[str, dict | None] = {}
    for start in range(0, len(hold_ids), READ_CHUNK):
        chunk = hold_ids[start : start + READ_CHUNK]
        async with client.pipeline(transaction=False) as pipe:
            for h in chunk:
                pipe.hmget(keys.hold(event_id, h), *_HOLD_FIELDS)
            res = await pipe.execute()
        out.update((h, _hold_record(v)) for h, v in zip(chunk, res, strict=True))
    return out


async def _read_active_holds(
    client: aioredis.Redis, event_id: str, zone_ids: list[str], guess: list[str]
) -> tuple[dict[str, dict | None], dict[str, int], bool]:
    """(records of the expiry set's members, zone -> ``held`` counter, consistent).

    One MULTI re-reads the expiry set with the counters and the records of ``guess``; consistent when the
    set equals the guess (the records then belong to the same instant as the counters).
    """
    members, records, held = guess, {}, {}
    for _ in range(SNAPSHOT_ATTEMPTS):
        async with client.pipeline(transaction=True) as pipe:
            pipe.zrange(keys.expiry(event_id), 0, -1)
            for z in zone_ids:
                pipe.hget(keys.zone(event_id, z), "held")
            for h in members:
                pipe.hmget(keys.hold(event_id, h), *_HOLD_FIELDS)
            res = await pipe.execute()
        now = [_s(m) for m in res[0]]
        held = {z: int(_s(v) or 0) for z, v in zip(zone_ids, res[1 : 1 + len(zone_ids)], strict=True)}
        records = {h: _hold_record(v) for h, v in zip(members, res[1 + len(zone_ids) :], strict=True)}
        if set(now) == set(members):
            return records, held, True
        members = now
    return records, held, False


async def _scan_hold_ids(client: aioredis.Redis, event_id: str) -> list[str]:
    """Every hold record of the event (SCAN over ``{evt:E}:hold:*``; records of ended holds included)."""
    head = keys.hold(event_id, "")
    pattern = head.replace("[", "\\[").replace("]", "\\]") + "*"
    return [_s(k)[len(head) :] async for k in client.scan_iter(match=pattern, count=SCAN_COUNT)]


async def _outbox_backlog(
    client: aioredis.Redis, event_id: str, outbox: list[tuple[str, dict]], now_ms: int
) -> tuple[int, int | None, bool]:
    """(pending, age of the oldest un-acked entry in ms, group exists) for the ``writers`` group.

    Un-acked = pending (delivered, not acked) or not delivered yet (after the group's last-delivered-id).
    """
    from workers.outbox import GROUP

    okey = keys.outbox(event_id)
    try:
        summary = await client.xpending(okey, GROUP)
        groups = await client.xinfo_groups(okey)
    except ResponseError:  # no stream or no group yet: every entry is undelivered
        oldest = min((_entry_ms(e) for e, _ in outbox), default=None)
        return 0, None if oldest is None else max(0, now_ms - oldest), False
    pending = int(summary.get("pending") or 0)
    candidates: list[int] = []
    if pending and summary.get("min"):
        candidates.append(_entry_ms(_s(summary["min"])))
    last = next((_s(g["last-delivered-id"]) for g in groups if _s(g["name"]) == GROUP), None)
    if last is None:
        return pending, None, False
    undelivered = [e for e, _ in outbox if _entry_key(e) > _entry_key(last)]
    if undelivered:
        candidates.append(_entry_ms(undelivered[0]))
    oldest = min(candidates, default=None)
    return pending, None if oldest is None else max(0, now_ms - oldest), True


# PostgreSQL reads --------------------------------------------------------------------------------

_ZONES_SQL = """
SELECT z.zone_id, z.kind, z.capacity, z.sold AS counter,
       coalesce(sum(i.quantity), 0)::int AS items_all,
       coalesce(sum(i.quantity) FILTER (WHERE $2::timestamptz IS NULL OR o.confirmed_at < $2
                                       OR o.order_id = ANY($3::text[])), 0)::int
         AS items_snapshot
FROM zones z
LEFT JOIN order_items i ON i.event_id = z.event_id AND i.zone_id = z.zone_id
LEFT JOIN orders o ON o.order_id = i.order_id
WHERE z.event_id = $1
GROUP BY z.zone_id, z.kind, z.capacity, z.sold, z.position
ORDER BY z.position
"""
_SEATS_SQL = """
SELECT i.zone_id, i.seat, i.order_id FROM order_items i JOIN orders o ON o.order_id = i.order_id
WHERE i.event_id = $1 AND i.seat IS NOT NULL
  AND ($2::timestamptz IS NULL OR o.confirmed_at < $2 OR o.order_id = ANY($3::text[]))
"""
_PERSISTED_SQL = "SELECT order_id FROM orders WHERE order_id = ANY($1::text[])"
_HOLD_ORDERS_SQL = "SELECT hold_id, order_id FROM orders WHERE event_id = $1 AND hold_id = ANY($2::text[])"
_DEAD_LETTERS_SQL = "SELECT order_id FROM dead_letters WHERE event_id = $1"
_FIX_COUNTERS_SQL = """
UPDATE zones z SET sold = s.items
FROM (SELECT z2.zone_id, coalesce(sum(i.quantity), 0)::int AS items
      FROM zones z2 LEFT JOIN order_items i ON i.event_id = z2.event_id AND i.zone_id = z2.zone_id
      WHERE z2.event_id = $1 GROUP BY z2.zone_id) s
WHERE z.event_id = $1 AND z.zone_id = s.zone_id AND z.sold <> s.items
RETURNING z.zone_id
"""


@dataclass
class _Record:
    zones: list[asyncpg.Record]
    seats: dict[tuple[str, str], str]
    persisted: set[str]
    dead_letter_orders: set[str]
    dead_letters: int
    dead_orders: list[DeadOrder]
    """Dead-lettered orders ``orders`` lacks, but those in flight or confirmed after the Redis snapshot."""

    def dead_stock(self, flight_seats: dict[tuple[str, str], str]):
        """What the dead orders keep sold (``domain.dead_stock``): seats that no order in PostgreSQL or in flight has."""
        return dead_stock(self.dead_orders, {**flight_seats, **self.seats})


async def _orders_of_holds(pg: asyncpg.Pool, event_id: str, hold_ids: list[str]) -> dict[str, str]:
    """hold id -> order id, for the holds of ``hold_ids`` that have an order in PostgreSQL (``READ_CHUNK`` ids
    a query). Ids the API could not have made are skipped (as in ``_order_ids``: they could fail the read)."""
    ids = [h for h in hold_ids if ID_RE.fullmatch(h)]
    out: dict[str, str] = {}
    for start in range(0, len(ids), READ_CHUNK):
        rows = await pg.fetch(_HOLD_ORDERS_SQL, event_id, ids[start : start + READ_CHUNK])
        out.update((r["hold_id"], r["order_id"]) for r in rows)
    return out


def _order_ids(outbox: list[tuple[str, dict]]) -> list[str]:
    """The outbox's order ids that PostgreSQL could hold: ids as the API makes them. A poison entry's (a NUL
    or 12 KB id, which the worker dead-letters) would make PostgreSQL refuse the whole read."""
    return [
        o["order_id"]
        for _, o in outbox
        if isinstance(o.get("order_id"), str) and ID_RE.fullmatch(o["order_id"])
    ]


async def _read_record(
    pg: asyncpg.Pool, event_id: str, before_ms: int | None, outbox_ids: list[str]
) -> _Record:
    """PostgreSQL in one REPEATABLE READ transaction. ``before_ms``: count only orders confirmed before it
    or in ``outbox_ids`` (None: every order); dead orders (``db.dead_orders``) but those in ``outbox_ids``
    (in flight: counted as such) or confirmed at or after ``before_ms``."""
    before = None if before_ms is None else EPOCH + timedelta(milliseconds=before_ms)
    async with pg.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        zones = await conn.fetch(_ZONES_SQL, event_id, before, outbox_ids)
        seats = {
            (r["zone_id"], r["seat"]): r["order_id"]
            for r in await conn.fetch(_SEATS_SQL, event_id, before, outbox_ids)
        }
        persisted = {r["order_id"] for r in await conn.fetch(_PERSISTED_SQL, outbox_ids)}
        dead = await conn.fetch(_DEAD_LETTERS_SQL, event_id)
        in_outbox = set(outbox_ids)
        dead_orders = [
            o
            for o in await db.dead_orders(conn, event_id)
            if o.order_id not in in_outbox and (before_ms is None or o.confirmed_at_ms < before_ms)
        ]
    return _Record(
        zones,
        seats,
        persisted,
        {r["order_id"] for r in dead if r["order_id"]},
        len(dead),
        dead_orders,
    )


# The check ---------------------------------------------------------------------------------------


def _in_flight(outbox: list[tuple[str, dict]], persisted: set[str]):
    """Outbox orders PostgreSQL does not have: (entries, zone -> tickets, (zone, seat) -> order id)."""
    entries, tickets, seats = [], defaultdict(int), {}
    for entry_id, order in outbox:
        if order.get("order_id") in persisted:
            continue
        entries.append((entry_id, order))
        for item in order.get("items") or []:
            tickets[item.get("zone_id")] += _tickets(item)
            for seat in item.get("seats") or []:
                seats.setdefault((item["zone_id"], seat), order.get("order_id"))
    return entries, tickets, seats


def _drift(
    report: EventReport,
    kind: str,
    count: int,
    zone_id: str | None = None,
    detail: str = "",
    examples: list[str] | None = None,
    **extra: Any,
) -> None:
    report.drifts.append(
        Drift(
            kind=kind,
            count=count,
            zone_id=zone_id,
            detail=detail,
            examples=(examples or [])[:EXAMPLES],
            repairable=kind not in NOT_REPAIRABLE,
            **extra,
        )
    )


async def _check(
    client: aioredis.Redis, pg: asyncpg.Pool, event_id: str, settings: Settings
) -> tuple[EventReport, _Findings]:
    findings = _Findings()
    pg_event = await pg.fetchrow("SELECT status FROM events WHERE event_id = $1", event_id)
    meta = _smap(await client.hgetall(keys.meta(event_id)))
    if not meta and pg_event is None:
        raise DomainError("event_not_found")
    sec, usec = await client.time()
    report = EventReport(
        event_id=event_id, status=meta.get("status"), checked_at_ms=sec * 1000 + usec // 1000
    )
    if not meta:
        record = await _read_record(pg, event_id, None, [])
        dead_tickets, _ = record.dead_stock({})
        report.zones = [
            ZoneReport(
                r["zone_id"],
                r["kind"],
                r["capacity"],
                None,
                None,
                None,
                0,
                r["items_all"],
                r["counter"],
                None,
                dead_tickets.get(r["zone_id"], 0),
            )
            for r in record.zones
        ]
        report.dead_letters = record.dead_letters
        _drift(report, EVENT_MISSING_IN_REDIS, 1, detail=f"run: boxoffice rebuild --event {event_id}")
        if record.dead_letters:
            _drift(report, DEAD_LETTERS, record.dead_letters, detail="orders PostgreSQL refused")
        return report, findings
    if pg_event is None:
        _drift(report, EVENT_MISSING_IN_PG, 1, detail="in Redis only: not created through the catalog")
        return report, findings

    zone_ids = orjson.loads(meta["zones"])
    live = await _read_live(client, event_id, zone_ids)
    report.checked_at_ms = live.now_ms
    holds, held_counters, report.held_checked = await _read_active_holds(
        client, event_id, zone_ids, list(live.expiry)
    )
    outbox_ids = _order_ids(live.outbox)
    record = await _read_record(pg, event_id, live.now_ms, outbox_ids)
    in_flight, flight_tickets, flight_seats = _in_flight(live.outbox, record.persisted)
    dead_tickets, dead_seats = record.dead_stock(flight_seats)
    report.active_holds = len(live.expiry)
    report.dead_letters = record.dead_letters

    # Outbox.
    pending, oldest_age_ms, group_exists = await _outbox_backlog(client, event_id, live.outbox, live.now_ms)
    report.outbox = OutboxReport(
        length=len(live.outbox),
        pending=pending,
        in_flight_orders=len(in_flight),
        persisted_unacked=len(live.outbox) - len(in_flight),
        oldest_unacked_age_ms=oldest_age_ms,
        group_exists=group_exists,
    )
    stuck = [
        o.get("order_id") or e for e, o in in_flight if live.now_ms - _entry_ms(e) > stuck_after_ms(settings)
    ]
    if stuck:
        _drift(
            report,
            OUTBOX_STUCK,
            len(stuck),
            examples=stuck,
            detail=f"in the outbox, not in PostgreSQL, for more than {stuck_after_ms(settings) // 1000} s",
        )

    # Zones: counters against the record.
    active_tickets: dict[str, int] = defaultdict(int)
    for rec in holds.values():
        if rec and rec["status"] == HOLD_ACTIVE:
            for item in rec["items"]:
                active_tickets[item["zone_id"]] += _tickets(item)
    pg_zones = {r["zone_id"]: r for r in record.zones}
    for z in [*zone_ids, *(z for z in pg_zones if z not in zone_ids)]:
        r, zh = pg_zones.get(z), live.zones.get(z) or {}
        if r is None:
            _drift(report, ZONE_MISSING_IN_PG, 1, z, "zone in Redis only")
            continue
        if not zh:
            _drift(report, ZONE_MISSING_IN_REDIS, 1, z, f"run: boxoffice rebuild --event {event_id}")
            continue
        available, held, sold, capacity = (
            int(zh.get(f, 0)) for f in ("available", "held", "sold", "capacity")
        )
        zr = ZoneReport(
            z,
            r["kind"],
            r["capacity"],
            available,
            held,
            sold,
            flight_tickets.get(z, 0),
            r["items_snapshot"],
            r["counter"],
            active_tickets.get(z, 0) if report.held_checked else None,
            dead_tickets.get(z, 0),
        )
        report.zones.append(zr)
        expected = zr.sold_pg + zr.in_flight + zr.dead_lettered
        if sold != expected:
            _drift(
                report,
                SOLD,
                abs(sold - expected),
                z,
                redis=sold,
                expected=expected,
                detail=f"Redis sold {sold}; PostgreSQL {zr.sold_pg} + in flight {zr.in_flight}"
                f" + dead-lettered {zr.dead_lettered}",
            )
        if r["counter"] != r["items_all"]:
            _drift(
                report,
                PG_COUNTER,
                abs(r["counter"] - r["items_all"]),
                z,
                redis=None,
                expected=r["items_all"],
                detail=f"zones.sold {r['counter']}; order items {r['items_all']}",
            )
        if available + held + sold != capacity or min(available, held, sold) < 0 or capacity != r["capacity"]:
            _drift(
                report,
                INVARIANT,
                abs(capacity - available - held - sold) or 1,
                z,
                detail=f"available {available} + held {held} + sold {sold} vs capacity {capacity}"
                f" (PostgreSQL {r['capacity']})",
            )
        if report.held_checked and held_counters.get(z, 0) != active_tickets.get(z, 0):
            h_counter = held_counters.get(z, 0)
            _drift(
                report,
                HELD,
                abs(h_counter - active_tickets.get(z, 0)),
                z,
                redis=h_counter,
                expected=active_tickets.get(z, 0),
                detail=f"held {h_counter}; active holds hold {active_tickets.get(z, 0)}",
            )

    # Seats: owners against the record, the in-flight orders and the dead letters (record first).
    expected_seats = dict(dead_seats)
    expected_seats.update(flight_seats)
    expected_seats.update(record.seats)
    not_in_redis, not_in_pg, hold_owned = [], [], []
    for (z, seat), order_id in expected_seats.items():
        owner = live.owners.get(z, {}).get(seat)
        if owner != f"s:{order_id}":
            not_in_redis.append(f"{z}/{seat}: {owner or 'free'}, sold to {order_id}")
            if owner and owner.startswith("h:"):
                findings.conflicting_holds.add(owner[2:])
    for z, owners in live.owners.items():
        for seat, owner in owners.items():
            if owner.startswith("s:") and (z, seat) not in expected_seats:
                not_in_pg.append(f"{z}/{seat}: {owner}")
            elif owner.startswith("h:"):
                hold_owned.append((z, seat, owner[2:]))
    if not_in_redis:
        _drift(
            report,
            SEAT_SOLD_NOT_IN_REDIS,
            len(not_in_redis),
            examples=not_in_redis,
            detail="seats PostgreSQL (or the outbox, or a dead letter) sold that Redis does not mark sold to that"
            " order",
        )
    if not_in_pg:
        _drift(
            report,
            SEAT_SOLD_NOT_IN_PG,
            len(not_in_pg),
            examples=not_in_pg,
            detail="seats Redis marks sold that no order in PostgreSQL, the outbox or the dead letters has",
        )

    # Holds: candidates from the snapshots, confirmed by one MULTI.
    orphan_candidates = [h for h in live.expiry if (holds.get(h) or {}).get("status") != HOLD_ACTIVE]
    stale_candidates = [
        (z, s, h)
        for z, s, h in hold_owned
        if h not in live.expiry or (holds.get(h) or {}).get("status") != HOLD_ACTIVE
    ]
    hold_ids = await _scan_hold_ids(client, event_id)
    scanned = [h for h in hold_ids if h not in live.expiry]
    scanned_records = await _read_holds(client, event_id, scanned)
    missing_candidates = [h for h, rec in scanned_records.items() if rec and rec["status"] == HOLD_ACTIVE]
    orphans, missing, stale = await _confirm_hold_findings(
        client, event_id, orphan_candidates, missing_candidates, stale_candidates
    )
    findings.orphan_expiry, findings.missing_expiry = orphans, missing
    if orphans:
        _drift(
            report,
            ORPHAN_EXPIRY,
            len(orphans),
            examples=orphans,
            detail="expiry-set members without an active hold record",
        )
    if missing:
        _drift(
            report,
            HOLD_MISSING_EXPIRY,
            len(missing),
            examples=missing,
            detail="active holds missing from the expiry set (they would never expire)",
        )
    if stale:
        _drift(
            report,
            STALE_SEAT_HOLD,
            len(stale),
            examples=[f"{z}/{s}: h:{h}" for z, s, h in stale],
            detail="seats owned by holds that are not active",
        )

    # Holds PostgreSQL has an order of, whose record is not confirmed with it: a confirm Redis lost (it came
    # back from a snapshot older than the confirm, which was written through). Read after the records, so a
    # hold confirmed meanwhile is found confirmed by the re-check; a confirm's record and outbox entry are
    # written by one script, so only PostgreSQL can know an order its record lacks.
    hold_orders = await _orders_of_holds(pg, event_id, sorted({*hold_ids, *holds}))
    known = {**scanned_records, **holds}
    lost_confirms = await _confirm_lost_confirms(
        client,
        event_id,
        {h: o for h, o in hold_orders.items() if not _confirmed_with(known.get(h), o)},
    )
    # Repair restores these holds' confirms: their seats are their own order's, not a conflict to release.
    findings.lost_confirms = {h: o for h, (o, _) in lost_confirms.items()}
    findings.conflicting_holds -= set(lost_confirms)
    if lost_confirms:
        _drift(
            report,
            HOLD_CONFIRMED_NOT_IN_REDIS,
            len(lost_confirms),
            examples=[f"{h}: {st} in Redis, order {o} in PostgreSQL" for h, (o, st) in lost_confirms.items()],
            detail="holds whose order PostgreSQL has that Redis does not have confirmed with it (a lost confirm)",
        )

    # Confirmed holds whose order the record lacks (acknowledged sales lost from PostgreSQL). A hold with
    # another order in PostgreSQL is not one: its record's order is a second one (above).
    in_outbox = set(outbox_ids)
    candidates = [
        rec["order_id"]
        for h, rec in scanned_records.items()
        if rec
        and rec["status"] == "confirmed"
        and rec["order_id"]
        and rec["order_id"] not in in_outbox
        and h not in hold_orders
        and (rec["confirmed_at_ms"] or 0) < live.now_ms
    ]
    if candidates:
        present = {r["order_id"] for r in await pg.fetch(_PERSISTED_SQL, candidates)}
        lost = [o for o in candidates if o not in present and o not in record.dead_letter_orders]
        findings.lost_orders = lost
        if lost:
            _drift(
                report,
                ORDER_MISSING_IN_PG,
                len(lost),
                examples=lost,
                detail="confirmed in Redis (hold record), in neither PostgreSQL nor the outbox",
            )
    if record.dead_letters:
        _drift(
            report,
            DEAD_LETTERS,
            record.dead_letters,
            examples=sorted(record.dead_letter_orders),
            detail="orders PostgreSQL refused: a person decides (refund or re-seat)",
        )
    return report, findings


async def _confirm_hold_findings(
    client: aioredis.Redis,
    event_id: str,
    orphans: list[str],
    missing: list[str],
    stale: list[tuple[str, str, str]],
):
    """Re-check hold candidates in one MULTI so a hold that moved on meanwhile is not reported."""
    if not (orphans or missing or stale):
        return [], [], []
    expiry = keys.expiry(event_id)
    async with client.pipeline(transaction=True) as pipe:
        for h in orphans:
            pipe.zscore(expiry, h)
            pipe.hget(keys.hold(event_id, h), "status")
        for h in missing:
            pipe.zscore(expiry, h)
            pipe.hget(keys.hold(event_id, h), "status")
        for z, seat, h in stale:
            pipe.hget(keys.owners(event_id, z), seat)
            pipe.hget(keys.hold(event_id, h), "status")
        res = iter(await pipe.execute())
    pairs = [(a, _s(b)) for a, b in zip(res, res, strict=True)]
    o_pairs, m_pairs, s_pairs = (
        pairs[: len(orphans)],
        pairs[len(orphans) : len(orphans) + len(missing)],
        pairs[len(orphans) + len(missing) :],
    )
    return (
        [
            h
            for h, (score, st) in zip(orphans, o_pairs, strict=True)
            if score is not None and st != HOLD_ACTIVE
        ],
        [h for h, (score, st) in zip(missing, m_pairs, strict=True) if score is None and st == HOLD_ACTIVE],
        [
            c
            for c, (owner, st) in zip(stale, s_pairs, strict=True)
            if _s(owner) == f"h:{c[2]}" and st != HOLD_ACTIVE
        ],
    )


def _confirmed_with(record: dict | None, order_id: str) -> bool:
    return record is not None and record["status"] == "confirmed" and record["order_id"] == order_id


async def _confirm_lost_confirms(
    client: aioredis.Redis, event_id: str, candidates: dict[str, str]
) -> dict[str, tuple[str, str]]:
    """Re-check, in one MULTI, holds whose record is not confirmed with the order PostgreSQL has of them
    (hold id -> order id). Returns hold id -> (order id, what the record says: its status, and the other
    order it is confirmed with if any) for those still so; a record gone meanwhile is not reported."""
    if not candidates:
        return {}
    async with client.pipeline(transaction=True) as pipe:
        for h in candidates:
            pipe.hmget(keys.hold(event_id, h), "status", "order_id")
        res = await pipe.execute()
    out = {}
    for (h, order_id), (status, other) in zip(candidates.items(), res, strict=True):
        status, other = _s(status), _s(other)
        if status is not None and not _confirmed_with({"status": status, "order_id": other}, order_id):
            out[h] = (order_id, f"{status} with order {other}" if other else status)
    return out


# Repair ------------------------------------------------------------------------------------------


async def _fix_pg_counters(pg: asyncpg.Pool, event_id: str) -> list[str]:
    """``zones.sold`` := the zone's order items, with the zone rows locked as the write-through locks them."""
    async with pg.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM zones WHERE event_id = $1 ORDER BY zone_id FOR UPDATE", event_id)
        rows = await conn.fetch(_FIX_COUNTERS_SQL, event_id)
    return [f"zones.sold of {r['zone_id']} set to its order items" for r in rows]


async def _requeue_lost_orders(
    inventory: Inventory, pg: asyncpg.Pool, event_id: str, order_ids: list[str]
) -> int:
    """Append confirmed orders PostgreSQL lacks to the outbox (confirm.lua's entry: field ``order``)."""
    present = {r["order_id"] for r in await pg.fetch(_PERSISTED_SQL, order_ids)}
    n = 0
    for order_id in order_ids:
        if order_id in present:
            continue
        order = await inventory.find_order(event_id, order_id)
        if order is None:
            continue
        await inventory.client.xadd(keys.outbox(event_id), {"order": orjson.dumps(order)})
        n += 1
    return n


async def redrive_outbox(
    client: aioredis.Redis, pg: asyncpg.Pool, event_id: str, settings: Settings
) -> tuple[int, int]:
    """Write every outbox entry through (``write_batch``, idempotent), then XACK + XDEL in one MULTI.

    Returns (orders written now, dead-lettered). Raises what write_batch raises; unacked entries stay.
    """
    from workers.outbox import GROUP, _decode, write_batch

    okey = keys.outbox(event_id)
    slots = SlotClients(client)
    try:
        node = await slots.for_key(okey)  # the MULTI below, on a Redis Cluster: service/slots.py
        written = dead = 0
        while True:
            entries = await node.xrange(okey, count=settings.outbox_batch_size)
            if not entries:
                return written, dead
            batch = [(_s(i), _decode(event_id, f)) for i, f in entries]
            batch = [(i, o) for i, o in batch if o is not None]
            result = await write_batch(pg, batch)
            written, dead = written + len(result.written), dead + len(result.dead_lettered)
            ids = [_s(i) for i, _ in entries]
            async with node.pipeline(transaction=True) as pipe:
                pipe.xack(okey, GROUP, *ids)
                pipe.xdel(okey, *ids)
                replies = await pipe.execute(raise_on_error=False)
            if isinstance(replies[1], Exception):
                raise replies[1]  # a NOGROUP from XACK (no worker ever ran) is fine; XDEL must work
    finally:
        await slots.aclose()


def _stock(items: list[dict]) -> dict[str, tuple[int, tuple[str, ...]]]:
    """zone -> (tickets, sorted seats) of a hold's or an order's items: what the hold held, what the order sold."""
    tickets: dict[str, int] = defaultdict(int)
    seats: dict[str, list[str]] = defaultdict(list)
    for item in items:
        tickets[item["zone_id"]] += _tickets(item)
        seats[item["zone_id"]] += item.get("seats") or []
    return {z: (n, tuple(sorted(seats[z]))) for z, n in tickets.items()}


_RESTORE_FIELDS = ("status", "items", "customer_id", "order_id")
_STOCK_SOURCE = {HOLD_ACTIVE: "held", "released": "available", "expired": "available"}
"""Where a hold's tickets are counted, by status, before its lost confirm moves them to ``sold``."""


async def _restore_lost_confirms(
    client: aioredis.Redis,
    pg: asyncpg.Pool,
    inventory: Inventory,
    event_id: str,
    findings: _Findings,
) -> list[str]:
    """Confirm again, with their PostgreSQL order, the holds whose confirm Redis lost (module doc, 4)."""
    outcomes: dict[str, list[str]] = defaultdict(list)
    for hold_id, order_id in sorted(findings.lost_confirms.items()):
        order = await db.get_order(pg, event_id, order_id)
        if order is None or order["hold_id"] != hold_id:
            continue  # orders are never deleted; a person did: the re-check says what is left
        outcome, released = await _restore_confirm(client, inventory, event_id, hold_id, order)
        outcomes[outcome].append(hold_id)
        # Released here, so not again by _fix_holds (a release is idempotent; the count would not be).
        findings.conflicting_holds -= released
        outcomes["released"] += sorted(released)
    actions = []
    if outcomes["restored"]:
        actions.append(f"confirmed {len(outcomes['restored'])} holds again with their PostgreSQL orders")
    if outcomes["released"]:
        actions.append(f"released {len(outcomes['released'])} active holds on seats of those orders")
    if outcomes["mismatch"]:
        actions.append(
            "left holds whose customer, items or zones are not their PostgreSQL order's: "
            + ", ".join(outcomes["mismatch"][:EXAMPLES])
        )
    if outcomes["busy"]:
        actions.append(f"gave up confirming {len(outcomes['busy'])} holds again: they kept changing")
    return actions


async def _restore_confirm(
    client: aioredis.Redis, inventory: Inventory, event_id: str, hold_id: str, order: dict
) -> tuple[str, set[str]]:
    """Make the hold's record what confirm.lua makes of it with ``order`` (``db.get_order``'s shape), in one
    MULTI under WATCH of the record and the owner hashes of the order's seats.

    The record: ``confirmed`` with the order's id, payment_ref and confirmed_at_ms (ended then too), kept
    ``hold_retention_seconds`` from now (a client retrying the confirm after the outage gets the order), out
    of the expiry set; the order pointer (the one of a second order the record named is deleted: that order
    is not the hold's); the seats sold to the order; the tickets moved to ``sold`` from where the record's
    status counts them (an ended hold gave its tickets back to ``available`` and its customer's count: both
    are taken again). Another active hold on one of the seats is released first (the release script).

    Returns (outcome, holds released): outcome ``restored``, ``gone`` (no record, or confirmed with the
    order meanwhile), ``mismatch`` (the record's customer or items are not the order's, or a zone is missing
    from Redis: left for a person, the re-check reports it) or ``busy`` (``REPAIR_ATTEMPTS`` WatchErrors).
    """
    hkey, order_id = keys.hold(event_id, hold_id), order["order_id"]
    stock = _stock(order["items"])
    seats = [(z, seat) for z, (_, labels) in stock.items() for seat in labels]
    retention = inventory.settings.hold_retention_seconds
    released: set[str] = set()
    for attempt in range(REPAIR_ATTEMPTS):
        async with client.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(hkey, *sorted({keys.owners(event_id, z) for z, _ in seats}))
                status, items, customer_id, other = (_s(v) for v in await pipe.hmget(hkey, *_RESTORE_FIELDS))
                if status is None or _confirmed_with({"status": status, "order_id": other}, order_id):
                    return "gone", released
                zones_there = [await pipe.exists(keys.zone(event_id, z)) for z in stock]
                if (
                    customer_id != order["customer_id"]
                    or _stock(orjson.loads(items)) != stock
                    or not all(zones_there)
                ):
                    return "mismatch", released
                owners = [_s(await pipe.hget(keys.owners(event_id, z), seat)) for z, seat in seats]
                others = {
                    o[2:] for o in owners if o and o.startswith("h:") and o != f"h:{hold_id}"
                } - released
                if others:
                    # A hold on a seat the order bought (taken after this hold ended in Redis): it must not
                    # keep it, nor confirm it into a second sale of the seat. Released once: a hold that is
                    # not active keeps its mark (a stale one), which the MULTI below overwrites.
                    await pipe.unwatch()
                    for other_hold in sorted(others):
                        await _release_quietly(inventory, event_id, other_hold)
                    released |= others
                    continue
                pipe.multi()
                _queue_confirm(pipe, event_id, hold_id, order, retention, seats)
                if other and other != order_id:
                    pipe.delete(keys.order(event_id, other))
                source = _STOCK_SOURCE.get(status)  # None when confirmed with another order: already sold
                if source:
                    for z, (n, _) in stock.items():
                        pipe.hincrby(keys.zone(event_id, z), source, -n)
                        pipe.hincrby(keys.zone(event_id, z), "sold", n)
                if source == "available":
                    pipe.hincrby(keys.customers(event_id), customer_id, sum(n for n, _ in stock.values()))
                await pipe.execute()
                return "restored", released
            except WatchError:
                await asyncio.sleep(0.01 * attempt)
    return "busy", released


def _queue_confirm(pipe, event_id: str, hold_id: str, order: dict, retention: int, seats) -> None:
    """Queue confirm.lua's writes of a confirm with ``order`` (but the counters and the outbox entry)."""
    hkey, order_id, at_ms = keys.hold(event_id, hold_id), order["order_id"], order["confirmed_at_ms"]
    fields = {"status": "confirmed", "order_id": order_id, "confirmed_at_ms": at_ms, "ended_at_ms": at_ms}
    if order["payment_ref"] is None:
        pipe.hdel(hkey, "payment_ref")
    else:
        fields["payment_ref"] = order["payment_ref"]
    pipe.hset(hkey, mapping=fields)
    pipe.expire(hkey, retention)
    pipe.zrem(keys.expiry(event_id), hold_id)
    pipe.set(keys.order(event_id, order_id), hold_id, ex=retention)
    for z, seat in seats:
        pipe.hset(keys.owners(event_id, z), seat, f"s:{order_id}")


async def _release_quietly(inventory: Inventory, event_id: str, hold_id: str) -> None:
    try:
        await inventory.release(event_id, hold_id)
    except DomainError as err:  # confirmed or gone meanwhile: the counter step sorts the seat out
        log.warning("repair of %s: hold %s could not be released: %s", event_id, hold_id, err.code)


async def _fix_holds(
    client: aioredis.Redis, inventory: Inventory, event_id: str, findings: _Findings
) -> list[str]:
    actions = []
    expiry = keys.expiry(event_id)
    removed = added = released = 0
    for hold_id in findings.orphan_expiry:
        if await _watched(
            client,
            [keys.hold(event_id, hold_id)],
            lambda st, _h: st != HOLD_ACTIVE,
            lambda pipe, h=hold_id: pipe.zrem(expiry, h),
            event_id,
            hold_id,
        ):
            removed += 1
    for hold_id in findings.missing_expiry:

        async def zadd(pipe, h=hold_id):
            expires_at_ms = int(_s(await client.hget(keys.hold(event_id, h), "expires_at_ms")))
            pipe.zadd(expiry, {h: expires_at_ms})

        if await _watched(
            client,
            [keys.hold(event_id, hold_id), expiry],
            lambda st, _h: st == HOLD_ACTIVE,
            zadd,
            event_id,
            hold_id,
        ):
            added += 1
    for hold_id in sorted(findings.conflicting_holds):
        try:
            await inventory.release(event_id, hold_id)
            released += 1
        except DomainError as err:  # confirmed or gone meanwhile: the counter step sorts the seat out
            log.warning(
                "repair of %s: hold %s on a sold seat could not be released: %s", event_id, hold_id, err.code
            )
    if removed:
        actions.append(f"removed {removed} orphan expiry entries")
    if added:
        actions.append(f"put {added} active holds back in the expiry set")
    if released:
        actions.append(f"released {released} active holds on seats PostgreSQL sold")
    reaped = await inventory.reap(event_id)
    if reaped:
        actions.append(f"reaped {reaped} expired holds")
    return actions


async def _watched(client: aioredis.Redis, watch: list[str], ok, queue, event_id: str, hold_id: str) -> bool:
    """WATCH ``watch``; read the hold's status; if ``ok(status, hold_id)``, MULTI what ``queue(pipe)`` queues.
    Retries on WatchError; returns whether it was applied."""
    for _ in range(REPAIR_ATTEMPTS):
        async with client.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(*watch)
                status = _s(await pipe.hget(keys.hold(event_id, hold_id), "status"))
                if not ok(status, hold_id):
                    return False
                pipe.multi()
                queued = queue(pipe)
                if asyncio.iscoroutine(queued):
                    await queued
                await pipe.execute()
                return True
            except WatchError:
                continue
    return False


async def _restore_counters(
    client: aioredis.Redis, pg: asyncpg.Pool, event_id: str, zone_ids: list[str]
) -> list[str]:
    """Set zone counters and seat owners from PostgreSQL + in-flight orders + dead-lettered orders PostgreSQL
    lacks + active holds (see module doc, 5)."""
    watch = [keys.expiry(event_id), keys.outbox(event_id)]
    watch += [keys.zone(event_id, z) for z in zone_ids] + [keys.owners(event_id, z) for z in zone_ids]
    for attempt in range(REPAIR_ATTEMPTS):
        async with client.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(*watch)
                # Reads on other connections: any change to a watched key from now on aborts the EXEC.
                live = await _read_live(client, event_id, zone_ids)
                holds = await _read_holds(client, event_id, list(live.expiry))
                record = await _read_record(pg, event_id, None, _order_ids(live.outbox))
                _, flight_tickets, flight_seats = _in_flight(live.outbox, record.persisted)
                actions, zone_fields, owner_set, owner_del = _plan_counters(
                    event_id, zone_ids, live, holds, record, flight_tickets, flight_seats
                )
                if not (zone_fields or owner_set or owner_del):
                    await pipe.unwatch()
                    return actions
                pipe.multi()
                for z, fields in zone_fields.items():
                    pipe.hset(keys.zone(event_id, z), mapping=fields)
                for z, mapping in owner_set.items():
                    pipe.hset(keys.owners(event_id, z), mapping=mapping)
                for z, seats in owner_del.items():
                    pipe.hdel(keys.owners(event_id, z), *seats)
                await pipe.execute()
                return actions
            except WatchError:
                await asyncio.sleep(0.01 * attempt)
    return [f"gave up setting counters after {REPAIR_ATTEMPTS} attempts: the event kept changing"]


def _plan_counters(event_id, zone_ids, live: _Live, holds, record: _Record, flight_tickets, flight_seats):
    actions: list[str] = []
    zone_fields: dict[str, dict[str, int]] = {}
    owner_set: dict[str, dict[str, str]] = defaultdict(dict)
    owner_del: dict[str, list[str]] = defaultdict(list)
    held: dict[str, int] = defaultdict(int)
    # Dead-lettered orders' seats stay theirs (a person decides), where no order in PostgreSQL or in flight
    # has the seat (then the dead order keeps nothing there, ticket included: domain.dead_stock).
    dead_tickets, dead_seats = record.dead_stock(flight_seats)
    want_owner: dict[tuple[str, str], str] = {k: f"s:{o}" for k, o in dead_seats.items()}
    want_owner.update({k: f"s:{o}" for k, o in flight_seats.items()})
    want_owner.update({k: f"s:{o}" for k, o in record.seats.items()})
    for hold_id, rec in holds.items():
        if not rec or rec["status"] != HOLD_ACTIVE:
            continue
        for item in rec["items"]:
            held[item["zone_id"]] += _tickets(item)
            for seat in item.get("seats") or []:
                if want_owner.setdefault((item["zone_id"], seat), f"h:{hold_id}") != f"h:{hold_id}":
                    actions.append(f"{item['zone_id']}/{seat}: sold, yet active hold {hold_id} holds it")
    pg_zones = {r["zone_id"]: r for r in record.zones}
    for z in zone_ids:
        r, zh = pg_zones.get(z), live.zones.get(z)
        if r is None or not zh:
            continue
        sold = r["items_all"] + flight_tickets.get(z, 0) + dead_tickets.get(z, 0)
        available = r["capacity"] - sold - held[z]
        if available < 0:
            actions.append(
                f"zone {z}: sold {sold} + held {held[z]} exceed capacity {r['capacity']}; left as is"
            )
            continue
        want = {"capacity": r["capacity"], "available": available, "held": held[z], "sold": sold}
        have = {f: int(zh.get(f, -1)) for f in want}
        if want != have:
            zone_fields[z] = want
            actions.append(
                f"zone {z}: " + ", ".join(f"{f} {have[f]} -> {want[f]}" for f in want if want[f] != have[f])
            )
        owners = live.owners.get(z, {})
        for (wz, seat), owner in want_owner.items():
            if wz == z and owners.get(seat) != owner:
                owner_set[z][seat] = owner
        owner_del[z] = [s for s in owners if (z, s) not in want_owner]
        if owner_set[z] or owner_del[z]:
            actions.append(f"zone {z}: {len(owner_set[z])} seat owners set, {len(owner_del[z])} freed")
    return (
        actions,
        zone_fields,
        {z: m for z, m in owner_set.items() if m},
        {z: s for z, s in owner_del.items() if s},
    )


async def _repair(
    client: aioredis.Redis,
    pg: asyncpg.Pool,
    inventory: Inventory,
    event_id: str,
    settings: Settings,
    report: EventReport,
    findings: _Findings,
) -> list[str]:
    kinds = {d.kind for d in report.drifts}
    actions: list[str] = []
    if PG_COUNTER in kinds:
        actions += await _fix_pg_counters(pg, event_id)
    if findings.lost_orders:
        n = await _requeue_lost_orders(inventory, pg, event_id, findings.lost_orders)
        if n:
            actions.append(
                f"re-queued {n} confirmed orders missing from PostgreSQL (from their hold records)"
            )
    if report.outbox and (report.outbox.length or findings.lost_orders):
        written, dead = await redrive_outbox(client, pg, event_id, settings)
        actions.append(f"re-drove the outbox: {written} orders written, {dead} dead-lettered")
    if findings.lost_confirms:
        actions += await _restore_lost_confirms(client, pg, inventory, event_id, findings)
    actions += await _fix_holds(client, inventory, event_id, findings)
    meta_zones = _s(await client.hget(keys.meta(event_id), "zones"))
    actions += await _restore_counters(client, pg, event_id, orjson.loads(meta_zones) if meta_zones else [])
    return actions


# Entry points ------------------------------------------------------------------------------------


async def reconcile_event(
    redis: aioredis.Redis,
    pg: asyncpg.Pool,
    inventory: Inventory,
    event_id: str,
    *,
    repair: bool,
    settings: Settings,
    slots: SlotClients | None = None,
) -> EventReport:
    """Compare one event's Redis inventory with PostgreSQL; with ``repair``, fix what is safe and check again.

    ``redis`` is our client (``service.app.redis_client``, bytes replies), ``pg`` an asyncpg pool; ``slots``
    the caller's ``SlotClients(redis)`` when it checks many events (on a Redis Cluster, one connection per
    node for the whole run rather than per event), else one is made and closed here. Returns the
    report (after a repair: the re-check, with ``repaired`` and ``drifts_before``). Raises
    DomainError(event_not_found) if neither store knows the event, DomainError(event_busy) if a repair waited
    ``REPAIR_LOCK_WAIT_SECONDS`` for another change of the event (``catalog.event_lock``; nothing repaired);
    Redis and PostgreSQL errors propagate (a repair that fails half-way leaves the event paused: run it again,
    every step is idempotent).
    """
    own_slots = slots is None
    slots = slots or SlotClients(redis)
    try:
        # On a Redis Cluster: a plain client on the node that owns the event's slot, for the MULTI / WATCH
        # snapshots and repairs below (every key they touch is the event's). The scripts go through
        # ``inventory``'s client as usual.
        node = await slots.for_key(keys.meta(event_id))
        report, findings = await _check(node, pg, event_id, settings)
        if not repair or not any(d.repairable for d in report.drifts):
            return report
        # The whole pause -> repair -> resume under the event's catalog lock: an operator's pause (or resume)
        # meanwhile waits, and is applied after, instead of being undone by the resume at the end.
        async with catalog.event_lock(pg, event_id, wait_seconds=REPAIR_LOCK_WAIT_SECONDS) as lock_conn:
            was_on_sale = _s(await node.hget(keys.meta(event_id), "status")) == EVENT_ON_SALE
            actions = []
            if was_on_sale:
                await catalog.set_status_locked(lock_conn, inventory, event_id, EVENT_PAUSED)
                actions.append("paused the sale")
            actions += await _repair(node, pg, inventory, event_id, settings, report, findings)
            after, _ = await _check(node, pg, event_id, settings)
            if was_on_sale:
                if any(d.kind in OVERSELL_RISK for d in after.drifts):
                    actions.append("left the sale paused: drift that risks an oversell remains")
                else:
                    await catalog.set_status_locked(lock_conn, inventory, event_id, EVENT_ON_SALE)
                    after.status = EVENT_ON_SALE
                    actions.append("resumed the sale")
    finally:
        if own_slots:
            await slots.aclose()
    after.repaired, after.drifts_before = actions, report.drifts
    return after


async def all_event_ids(inventory: Inventory, pg: asyncpg.Pool) -> list[str]:
    """Every event PostgreSQL or Redis knows."""
    return sorted(set(await db.event_ids(pg)) | set(await inventory.event_ids()))


def export_metrics(report: EventReport) -> None:
    """metrics.DRIFT per kind (0 for kinds not found, so a fixed drift clears), ACTIVE_HOLDS, OUTBOX_*."""
    for kind, count in report.drift_counts().items():
        metrics.DRIFT.labels(report.event_id, kind).set(count)
    metrics.ACTIVE_HOLDS.labels(report.event_id).set(report.active_holds)
    if report.outbox is not None:
        metrics.OUTBOX_LENGTH.labels(report.event_id).set(report.outbox.length)
        metrics.OUTBOX_PENDING.labels(report.event_id).set(report.outbox.pending)


async def cron_reconcile(ctx: dict[str, Any]) -> dict[str, int]:
    """arq cron job (every ``reconcile_interval_seconds``): check every event, no repair; export metrics and
    log a warning per drift. An event whose check fails is logged and skipped. Returns counts for arq's log."""
    settings: Settings = ctx["settings"]
    inventory: Inventory = ctx["inventory"]
    pg: asyncpg.Pool = ctx["pg"]
    checked = drifting = 0
    slots = SlotClients(inventory.client)
    try:
        reports = []
        for event_id in await all_event_ids(inventory, pg):
            try:
                reports.append(
                    await reconcile_event(
                        inventory.client,
                        pg,
                        inventory,
                        event_id,
                        repair=False,
                        settings=settings,
                        slots=slots,
                    )
                )
            except Exception:
                log.exception("reconciliation of event %s failed", event_id)
    finally:
        await slots.aclose()
    for report in reports:
        event_id = report.event_id
        checked += 1
        export_metrics(report)
        if report.drifts:
            drifting += 1
        for d in report.drifts:
            log.warning(
                "drift event=%s kind=%s zone=%s count=%d: %s %s",
                event_id,
                d.kind,
                d.zone_id or "-",
                d.count,
                d.detail,
                ", ".join(d.examples),
            )
    return {"events": checked, "drifting": drifting}


# CLI ---------------------------------------------------------------------------------------------


def run_cli(settings: Settings, *, event_id: str | None, repair: bool, as_json: bool) -> int:
    """``boxoffice reconcile [--event ID] [--repair] [--json]``: 0 clean, 1 drift (after a repair: drift the
    repair did not fix) or an event another change held too long to repair (``event_busy``: said, and the
    other events are still reconciled), 2 no such event."""
    return asyncio.run(_cli(settings, event_id=event_id, repair=repair, as_json=as_json))


async def _cli(settings: Settings, *, event_id: str | None, repair: bool, as_json: bool) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from service.app import redis_client

    # Piped output (a file, CI logs) gets 160 columns rather than rich's 80, unless COLUMNS says otherwise.
    out = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160)
    err = Console(stderr=True)
    client = redis_client(settings.redis_url, settings)
    pool = await db.create_pool(settings.database_url)
    inventory = Inventory(client, settings)
    slots = SlotClients(client)
    reports: list[EventReport] = []
    busy: list[str] = []
    try:
        ids = [event_id] if event_id else await all_event_ids(inventory, pool)
        with Progress(console=err, transient=True, disable=len(ids) < 2) as progress:
            task = progress.add_task("reconciling", total=len(ids))
            for eid in ids:
                progress.update(task, description=f"reconciling {eid}")
                try:
                    reports.append(
                        await reconcile_event(
                            client, pool, inventory, eid, repair=repair, settings=settings, slots=slots
                        )
                    )
                except DomainError as exc:
                    err.print(f"{eid}: {exc.message}")
                    if exc.code != "event_busy":
                        return 2
                    busy.append(eid)  # another change of it (a create, pause, rebuild, repair): next event
                progress.advance(task)
    finally:
        await slots.aclose()
        await pool.close()
        inventory.close()
        await client.aclose()
    if as_json:
        body = {
            "clean": all(r.clean for r in reports) and not busy,
            "events": [r.as_dict() for r in reports],
            "busy": busy,
        }
        sys.stdout.write(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _print_tables(out, reports)
        if busy:
            out.print(f"not repaired, busy with another change (run again): {', '.join(busy)}")
    return 0 if all(r.clean for r in reports) and not busy else 1


def _table(title: str, columns: str, rows: list[list[str]]):
    """A rich table. ``columns`` is "name:kind,..." with kind ``id`` (never wrapped), ``n`` (a number: right
    aligned, never cut, min width = widest value) or ``text`` (wraps)."""
    from rich.table import Table

    t = Table(title=title)
    for i, spec in enumerate(columns.split(",")):
        name, kind = spec.rsplit(":", 1)
        if kind == "n":
            t.add_column(name, justify="right", min_width=max((len(r[i]) for r in rows), default=1))
        else:
            t.add_column(name, no_wrap=kind == "id")
    for r in rows:
        t.add_row(*r)
    return t


def _print_tables(console, reports: list[EventReport]) -> None:
    def num(v: int | None) -> str:
        return "-" if v is None else str(v)

    zone_rows, backlog_rows = [], []
    for r in reports:
        for z in r.zones:
            counts = (
                z.capacity,
                z.available,
                z.held,
                z.sold_redis,
                z.in_flight,
                z.dead_lettered,
                z.sold_pg,
                z.sold_pg_counter,
                z.held_by_holds,
            )
            zone_rows.append([r.event_id, r.status or "-", z.zone_id, *map(num, counts)])
        if r.outbox:
            o, age_ms = r.outbox, r.outbox.oldest_unacked_age_ms
            backlog_rows.append(
                [
                    r.event_id,
                    *map(num, (o.length, o.pending, o.in_flight_orders, o.persisted_unacked)),
                    "-" if age_ms is None else f"{age_ms / 1000:.1f} s",
                    num(r.active_holds),
                    num(r.dead_letters),
                ]
            )
    console.print(
        _table(
            "Zones (tickets; sold in Redis = PostgreSQL items + in flight + dead-lettered)",
            "event:id,status:id,zone:id,capacity:n,available:n,held:n,sold:n,in flight:n,dead-lettered:n,"
            "PG items:n,zones.sold:n,in holds:n",
            zone_rows,
        )
    )
    console.print(
        _table(
            "Outbox and holds",
            "event:id,outbox:n,pending:n,in flight:n,persisted unacked:n,oldest unacked:n,active holds:n,dead letters:n",
            backlog_rows,
        )
    )
    for r in reports:
        if r.repaired:
            console.print(f"[bold]{r.event_id}[/bold] repaired: " + "; ".join(r.repaired))
    drift_rows = [
        [r.event_id, d.kind, d.zone_id or "", str(d.count), d.detail, ", ".join(d.examples)]
        for r in reports
        for d in r.drifts
    ]
    if drift_rows:
        console.print(
            _table("Drift", "event:id,kind:id,zone:id,count:n,detail:text,examples:text", drift_rows)
        )
    console.print(f"{sum(r.clean for r in reports)} of {len(reports)} events clean")
