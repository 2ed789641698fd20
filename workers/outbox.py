"""Outbox write-through: every confirmed order in an event's outbox stream lands in PostgreSQL exactly once.

The confirm script XADDs the order to ``{evt:E}:outbox`` atomically with the sale (``lua/confirm.lua``).
``OutboxConsumer`` reads those streams through one consumer group (``writers``), writes each batch with
``write_batch`` in one PostgreSQL transaction, and only after the commit XACKs and XDELs the entries.

Delivery is at least once (Redis Streams' consumer groups: https://redis.io/docs/data-types/streams/);
the write is idempotent, so the result is exactly once:

* the worker dies after the commit, before XACK: the entry stays pending, is re-read (by this consumer
  with ``XREADGROUP ... 0`` or by another one with ``XAUTOCLAIM``) and written again, which inserts
  nothing (``ON CONFLICT (order_id) DO NOTHING``) and bumps no ``zones.sold`` (only new orders do);
* PostgreSQL does not answer: ``write_batch`` raises, the entries stay pending, the loop backs off
  exponentially (at most ``outbox_backoff_max_seconds``) and re-reads them;
* PostgreSQL refuses an order (a backstop fired: a seat sold twice, ``sold > capacity``, unknown event
  or seat, malformed data, a key too long to index), or the order is malformed (not JSON, not of the
  stream's event, an id the API could not have made, e.g. with a NUL or 12 KB long): the order goes to
  ``dead_letters`` with the reason and is acked. It is never dropped and never retried forever; the rest
  of its batch, of every event, lands.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
from redis.backoff import EqualJitterBackoff
from redis.exceptions import RedisError, ResponseError

from service import keys, metrics
from service.domain import ID_RE, SEAT_RE
from service.settings import Settings
from service.slots import SlotClients

log = logging.getLogger("boxoffice.outbox")

GROUP = "writers"
"""The consumer group every write-through worker joins (one group: each entry is written by one worker)."""

REFUSED = (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError, asyncpg.ProgramLimitExceededError)
"""PostgreSQL refusing an order's data (SQLSTATE classes 23, 22 and 54, e.g. a key too long for its index):
dead-lettered, not retried. Any other error (connection lost, shutdown, class 40, a missing table) is not
about one order: it is raised and the batch retried."""

TRANSIENT_RETRIES = 3
"""Attempts in all (the first and 2 retries, at once) at a batch aborted by a deadlock or serialization
failure (SQLSTATE class 40); the last attempt's error is raised."""

MALFORMED = "malformed"
"""The key of ``_decode``'s wrapper for an entry that is not an order of its stream's event (the reason)."""

_INT32 = 2**31 - 1
_INT64 = 2**63 - 1


@dataclass
class BatchResult:
    """What ``write_batch`` did with each entry; every entry is in exactly one list (so all can be acked)."""

    written: list[str] = field(default_factory=list)
    """Order ids inserted by this call."""
    duplicates: list[str] = field(default_factory=list)
    """Order ids that were in PostgreSQL already (a redelivery): nothing written, no counter bumped."""
    dead_lettered: list[str] = field(default_factory=list)
    """Entry ids PostgreSQL refused (or that were malformed), recorded in ``dead_letters``."""


@dataclass
class _Order:
    entry_id: str
    payload: dict[str, Any]
    order_id: str
    event_id: str
    hold_id: str
    customer_id: str
    amount_cents: int
    payment_ref: str | None
    confirmed_at_ms: int
    items: list[tuple[str, str | None, int]]
    """(zone_id, seat or None, quantity): a general-admission item is one row, a seated item one row per seat."""


def _int(value: Any, name: str, limit: int) -> int:
    # cjson encodes every number as a double ("%.14g"), so an integral float is accepted.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not -limit - 1 <= value <= limit:
        raise ValueError(f"{name} is not an integer in range: {value!r}")
    return value


def _show(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut after ``limit`` characters (a malformed id can be 12 KB)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} is not a non-empty string: {_show(value)}")
    return value


def _id(value: Any, name: str, pattern=ID_RE) -> str:
    """An id as the API makes them (``service.domain``): PostgreSQL can index it and lock by it (no NUL)."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"{name} is not an id the API could have made ({pattern.pattern}): {_show(value)}")
    return value


def _parse(entry_id: str, order: dict[str, Any]) -> _Order:
    """The order's rows, or ValueError naming what is malformed. Ids are checked against the API's rules
    (a NUL or an over-long key would make PostgreSQL refuse the whole batch's locks or index rows); for the
    rest shape only: PostgreSQL judges it."""
    if not isinstance(order, dict):
        raise ValueError("order is not a JSON object")
    if MALFORMED in order:  # _decode's wrapper of an entry that is not an order of its stream's event
        raise ValueError(order[MALFORMED])
    items: list[tuple[str, str | None, int]] = []
    raw_items = order.get("items")
    if not isinstance(raw_items, list) or not raw_items:
        raise ValueError("items is not a non-empty list")
    for item in raw_items:
        if not isinstance(item, dict):
            raise ValueError("an item is not a JSON object")
        zone_id = _id(item.get("zone_id"), "zone_id")
        seats = item.get("seats")
        if seats is not None and "quantity" not in item:
            if not isinstance(seats, list) or not seats:
                raise ValueError(f"zone {zone_id}: seats is not a non-empty list")
            items.extend((zone_id, _id(s, "seat", SEAT_RE), 1) for s in seats)
        elif seats is None and "quantity" in item:
            items.append((zone_id, None, _int(item["quantity"], "quantity", _INT32)))
        else:
            raise ValueError(f"zone {zone_id}: an item has exactly one of quantity or seats")
    payment_ref = order.get("payment_ref")
    if payment_ref is not None and not isinstance(payment_ref, str):
        raise ValueError("payment_ref is not a string")
    return _Order(
        entry_id=entry_id,
        payload=order,
        order_id=_id(order.get("order_id"), "order_id"),
        event_id=_id(order.get("event_id"), "event_id"),
        hold_id=_id(order.get("hold_id"), "hold_id"),
        customer_id=_str(order.get("customer_id"), "customer_id"),
        amount_cents=_int(order.get("amount_cents"), "amount_cents", _INT64),
        payment_ref=payment_ref,
        confirmed_at_ms=_int(order.get("confirmed_at_ms"), "confirmed_at_ms", _INT64),
        items=items,
    )


# SQL -----------------------------------------------------------------------------------------------
# Zones are locked first, in key order, so two workers writing batches of one event never deadlock.
_LOCK_ZONES = """
SELECT 1 FROM zones z JOIN unnest($1::text[], $2::text[]) AS k(event_id, zone_id)
  ON z.event_id = k.event_id AND z.zone_id = k.zone_id
ORDER BY z.event_id, z.zone_id FOR UPDATE OF z
"""
_INSERT_ORDERS = """
INSERT INTO orders (order_id, event_id, hold_id, customer_id, amount_cents, payment_ref, confirmed_at)
SELECT o, e, h, c, a, p, 'epoch'::timestamptz + ms * interval '1 millisecond'
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::bigint[])
  AS t(o, e, h, c, a, p, ms)
ON CONFLICT (order_id) DO NOTHING
RETURNING order_id
"""
_INSERT_ITEMS = """
INSERT INTO order_items (order_id, event_id, zone_id, seat, quantity)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[])
"""
_BUMP_SOLD = """
UPDATE zones z SET sold = z.sold + d.n
FROM unnest($1::text[], $2::text[], $3::int[]) AS d(event_id, zone_id, n)
WHERE z.event_id = d.event_id AND z.zone_id = d.zone_id
"""
_DEAD_LETTER = """
INSERT INTO dead_letters (event_id, order_id, entry_id, payload, reason)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::text[])
ON CONFLICT (event_id, entry_id) DO NOTHING
RETURNING event_id, entry_id
"""


async def _lock_zones(conn: asyncpg.Connection, orders: list[_Order]) -> None:
    zone_keys = sorted({(o.event_id, z) for o in orders for z, _, _ in o.items})
    await conn.execute(_LOCK_ZONES, [e for e, _ in zone_keys], [z for _, z in zone_keys])


async def _insert(conn: asyncpg.Connection, orders: list[_Order]) -> set[str]:
    """Insert the orders that are new, their items, and bump zones.sold by the new ones. Returns new order ids."""
    rows = await conn.fetch(
        _INSERT_ORDERS,
        [o.order_id for o in orders],
        [o.event_id for o in orders],
        [o.hold_id for o in orders],
        [o.customer_id for o in orders],
        [o.amount_cents for o in orders],
        [o.payment_ref for o in orders],
        [o.confirmed_at_ms for o in orders],
    )
    new = {r["order_id"] for r in rows}
    if not new:
        return new
    items: list[tuple[str, str, str, str | None, int]] = []
    sold: dict[tuple[str, str], int] = {}
    seen: set[str] = set()
    for o in orders:
        if o.order_id not in new or o.order_id in seen:
            continue
        seen.add(o.order_id)
        for zone_id, seat, quantity in o.items:
            items.append((o.order_id, o.event_id, zone_id, seat, quantity))
            sold[(o.event_id, zone_id)] = sold.get((o.event_id, zone_id), 0) + quantity
    await conn.execute(_INSERT_ITEMS, *(list(col) for col in zip(*items, strict=True)))
    zone_keys = sorted(sold)
    await conn.execute(
        _BUMP_SOLD, [e for e, _ in zone_keys], [z for _, z in zone_keys], [sold[k] for k in zone_keys]
    )
    return new


def _no_nul(value: Any) -> Any:
    """PostgreSQL text and jsonb cannot hold U+0000; a dead letter must still be storable."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_no_nul(k): _no_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nul(v) for v in value]
    return value


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncpg.PostgresError):
        parts = [f"{type(exc).__name__} ({exc.sqlstate})"]
        if getattr(exc, "constraint_name", None):
            parts.append(f"constraint {exc.constraint_name}")
        parts.append(str(exc).replace("\n", " "))  # the message, then DETAIL when PostgreSQL gave one
        return ": ".join(parts)
    return f"malformed order: {exc}"


async def _dead_letter(
    conn: asyncpg.Connection, refused: list[tuple[str, str, dict[str, Any], str]]
) -> list[str]:
    """Record (entry_id, event_id, payload, reason) rows in the caller's transaction; logs each new one at
    ERROR. Returns the event id of each new row (counted in the metric once committed)."""
    if not refused:
        return []
    rows = [
        (
            _no_nul(event_id),
            _no_nul(payload.get("order_id")) if isinstance(payload.get("order_id"), str) else None,
            entry_id,
            orjson.dumps(_no_nul(payload)).decode(),
            _no_nul(reason),
        )
        for entry_id, event_id, payload, reason in refused
    ]
    recorded = {
        (r["event_id"], r["entry_id"])
        for r in await conn.fetch(_DEAD_LETTER, *(list(col) for col in zip(*rows, strict=True)))
    }
    for event_id, order_id, entry_id, _, reason in rows:
        if (event_id, entry_id) in recorded:
            log.error(  # ids cut short: a malformed one can be 12 KB
                "dead letter: event %s entry %s order %s refused: %s",
                _show(event_id),
                entry_id,
                _show(order_id),
                _show(reason, 500),
            )
        else:
            log.warning(
                "dead letter again (recorded before): event %s entry %s: %s",
                _show(event_id),
                entry_id,
                _show(reason, 500),
            )
    return [event_id for event_id, _ in recorded]


async def _write_once(
    conn: asyncpg.Connection, orders: list[_Order], malformed: list[tuple[str, str, dict[str, Any], str]]
) -> tuple[set[str], list[tuple[str, str]], list[str]]:
    """One attempt: the whole batch in one transaction; if PostgreSQL refuses, entry by entry (savepoints).

    Entry by entry, each order locks its zones and inserts inside its own savepoint, so an order refused
    even as a lock key is dead-lettered alone. Returns (new order ids, dead-lettered ``(event id, entry
    id)``s: entry ids are unique only within one event's stream, event id of each dead letter recorded now).
    Raises any error that is not ``REFUSED``, whole (nothing committed).
    """
    try:
        async with conn.transaction():
            new: set[str] = set()
            if orders:
                await _lock_zones(conn, orders)
                new = await _insert(conn, orders)
            recorded = await _dead_letter(conn, malformed)
            return new, [(m[1], m[0]) for m in malformed], recorded
    except REFUSED as exc:
        log.warning("batch of %d orders refused (%s); writing entry by entry", len(orders), _reason(exc))
    async with conn.transaction():
        try:
            async with conn.transaction():  # every zone at once, in key order (no deadlock), when it can
                await _lock_zones(conn, orders)
        except REFUSED:
            pass  # an order's keys are refused: each order locks its own zones below
        new = set()
        refused = list(malformed)
        for o in orders:
            try:
                async with conn.transaction():  # a savepoint: a refusal undoes this order only
                    await _lock_zones(conn, [o])
                    new |= await _insert(conn, [o])
            except REFUSED as exc:
                refused.append((o.entry_id, o.event_id, o.payload, _reason(exc)))
        recorded = await _dead_letter(conn, refused)
        return new, [(r[1], r[0]) for r in refused], recorded


async def write_batch(pg: asyncpg.Pool, entries: list[tuple[str, dict[str, Any]]]) -> BatchResult:
    """Write outbox entries ``(entry id, order)`` through to PostgreSQL; safe to call again with the same entries.

    ``order`` is the confirm script's order: ``{order_id, event_id, hold_id, customer_id, amount_cents,
    payment_ref, confirmed_at_ms, items: [{zone_id, quantity} | {zone_id, seats: [...]}]}``. In one
    transaction: insert the orders that are new (``ON CONFLICT (order_id) DO NOTHING``), their items (a
    general-admission item is one row with ``seat`` NULL, a seated item one row per seat), and add the new
    tickets to ``zones.sold``. If PostgreSQL refuses (``REFUSED``: a constraint or data error, a key too
    long to index), the batch is redone entry by entry so the good ones land and each refused one is
    recorded in ``dead_letters`` (logged at ERROR, counted in ``boxoffice_dead_letters_total``). A
    malformed order (``_parse``: e.g. an id with a NUL, or too long) goes to ``dead_letters`` without a
    try, under its event id, or under ``''`` if that id is itself unusable as a key.

    Raises asyncpg.PostgresConnectionError / InterfaceError / OSError / TimeoutError when PostgreSQL is
    unreachable, or shut down (e.g. AdminShutdownError), and any other PostgresError that is not about one
    order (e.g. a missing table): nothing is half-written or dead-lettered, the caller retries later. A
    deadlock or serialization failure is attempted ``TRANSIENT_RETRIES`` (3) times in all, then raised.
    """
    result = BatchResult()
    orders: list[_Order] = []
    malformed: list[tuple[str, str, dict[str, Any], str]] = []
    for entry_id, order in entries:
        try:
            orders.append(_parse(entry_id, order))
        except ValueError as exc:
            event_id = order.get("event_id") if isinstance(order, dict) else None
            if not isinstance(event_id, str) or not ID_RE.fullmatch(event_id):
                event_id = ""  # not storable in dead_letters' (event_id, entry_id) key, or not an event
            payload = order if isinstance(order, dict) else {"order": order}
            malformed.append((entry_id, event_id, payload, _reason(exc)))
    if not orders and not malformed:
        return result
    for attempt in range(1, TRANSIENT_RETRIES + 1):
        try:
            async with pg.acquire() as conn:
                new, refused, recorded = await _write_once(conn, orders, malformed)
            break
        except asyncpg.TransactionRollbackError as exc:
            if attempt == TRANSIENT_RETRIES:
                raise
            log.warning("write-through batch rolled back (%s); retrying", exc)
    now_ms = time.time() * 1000
    for event_id in recorded:
        metrics.child(metrics.DEAD_LETTERS, event_id).inc()
    refused_ids = set(refused)
    counted: set[str] = set()
    persisted: dict[str, int] = {}
    for o in orders:
        if (o.event_id, o.entry_id) in refused_ids:
            continue
        if o.order_id in new and o.order_id not in counted:
            counted.add(o.order_id)
            result.written.append(o.order_id)
            persisted[o.event_id] = persisted.get(o.event_id, 0) + 1
            metrics.WRITE_LAG_SECONDS.observe(max(0.0, (now_ms - o.confirmed_at_ms) / 1000))
        else:
            result.duplicates.append(o.order_id)
    # one counter write per event and batch (each is an mmap write in multiprocess mode)
    for event_id, n in persisted.items():
        metrics.child(metrics.PERSISTED, event_id).inc(n)
    result.dead_lettered = [entry_id for _, entry_id in refused]
    return result


# The consumer ----------------------------------------------------------------------------------------

PG_UNAVAILABLE = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    OSError,
    TimeoutError,
)


def consumer_name() -> str:
    """A name unique to this process: ``host:pid:random`` (a restarted worker is a new consumer)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _decode(event_id: str, fields: dict) -> dict[str, Any] | None:
    """The order of an entry of ``event_id``'s outbox; None for an entry deleted while pending (nothing to
    write but the ack). An entry that is not an order of that event (not JSON, no or another event id: a
    NUL or 12 KB one too) becomes ``{event_id, malformed: reason, fields: raw fields as text}``, which
    write_batch dead-letters under the stream's event."""
    if not fields:
        return None
    raw = fields.get(b"order", fields.get("order"))
    try:
        order = orjson.loads(raw) if raw is not None else None
    except orjson.JSONDecodeError:
        order = None
    if isinstance(order, dict) and order.get("event_id") == event_id:
        return order
    if isinstance(order, dict):
        why = f"event_id is not the outbox's event {event_id}: {_show(order.get('event_id'))}"
    else:
        why = "the entry's order field is not a JSON object"
    return {"event_id": event_id, MALFORMED: why, "fields": {_text(k): _text(v) for k, v in fields.items()}}


class OutboxConsumer:
    """Reads every event's outbox through the ``writers`` group and writes it through with ``write_batch``.

    ``redis`` is a client with bytes replies (``service.app.redis_client``), ``pg`` an asyncpg pool.
    One pass (``run_once``) reads, for each event in ``keys.EVENTS_KEY`` that its own PostgreSQL catalog
    knows (never another deployment's, on a shared Redis): this consumer's own pending
    entries (after start-up or a failure), entries idle longer than ``outbox_claim_idle_ms`` in other
    consumers (XAUTOCLAIM, Redis >= 6.2; every ``outbox_claim_idle_ms / 2``, but at least every 5 s and
    at most every 0.1 s; at once again after a claim found entries), then new entries (up to
    ``outbox_batch_size`` per event). All of them are written in one PostgreSQL transaction; only after
    the commit are they XACKed and XDELed (one MULTI per event: its keys share a slot).
    """

    def __init__(self, redis: aioredis.Redis, pg: asyncpg.Pool, settings: Settings, name: str | None = None):
        self.redis = redis
        self.slots = SlotClients(redis)
        self.pg = pg
        self.settings = settings
        self.name = name or consumer_name()
        self.backoff = EqualJitterBackoff(cap=settings.outbox_backoff_max_seconds, base=0.05)
        self.claim_every_seconds = min(max(settings.outbox_claim_idle_ms / 2000, 0.1), 5.0)
        self._grouped: set[str] = set()
        self._recover = True  # read our own pending entries first (start-up, or after a failed write)
        self._next_claim_at = 0.0
        self._wake = asyncio.Event()
        self._pg_events: set[str] = set()
        self._pg_events_at = -1e9

    async def _event_ids(self) -> list[str]:
        """Events loaded in Redis that this worker's PostgreSQL knows (its catalog).

        A worker never takes another deployment's outbox entries from a shared Redis: it could only
        dead-letter them into the wrong database and ack them away. The catalog is re-read at most once
        a second, and only when Redis names an event it has not seen. Raises asyncpg errors (PostgreSQL
        down): the caller backs off as for a failed write.
        """
        in_redis = {_s(m) for m in await self.redis.smembers(keys.EVENTS_KEY)}
        loop = asyncio.get_running_loop()
        if not in_redis <= self._pg_events and loop.time() - self._pg_events_at >= 1.0:
            self._pg_events = {r["event_id"] for r in await self.pg.fetch("SELECT event_id FROM events")}
            self._pg_events_at = loop.time()
        return sorted(in_redis & self._pg_events)

    def wake(self) -> None:
        """Cut the idle sleep short (e.g. right after a confirm)."""
        self._wake.set()

    async def aclose(self) -> None:
        """Close the per-node clients of a Redis Cluster (not ``redis`` nor ``pg``, which the caller owns)."""
        await self.slots.aclose()

    async def _ensure_groups(self, event_ids: list[str]) -> None:
        todo = [e for e in event_ids if e not in self._grouped]
        if not todo:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for e in todo:
                pipe.xgroup_create(keys.outbox(e), GROUP, id="0", mkstream=True)
            replies = await pipe.execute(raise_on_error=False)
        for e, reply in zip(todo, replies, strict=True):
            if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
                raise reply
            self._grouped.add(e)

    async def _read(self, event_ids: list[str], build) -> dict[str, list[tuple[str, dict]]]:
        """Run ``build(pipe, event_id)`` for each event in one pipeline; returns event -> [(entry id, fields)]."""
        if not event_ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for e in event_ids:
                build(pipe, e)
            replies = await pipe.execute(raise_on_error=False)
        out: dict[str, list[tuple[str, dict]]] = {}
        for e, reply in zip(event_ids, replies, strict=True):
            if isinstance(reply, ResponseError) and "NOGROUP" in str(reply):
                self._grouped.discard(e)  # the stream was deleted (event unloaded); recreated next pass
                continue
            if isinstance(reply, Exception):
                raise reply
            if isinstance(reply, list) and reply and isinstance(reply[0], bytes | str):  # XAUTOCLAIM
                entries = reply[1]
            else:  # XREADGROUP: [[stream, [(id, fields), ...]]] or []
                entries = reply[0][1] if reply else []
            out[e] = [(_s(i), f) for i, f in entries if i is not None]
        return out

    async def run_once(self, event_ids: Iterable[str] | None = None) -> int:
        """One pass over every event (or only ``event_ids``). Returns how many entries were handled (acked).

        Raises what ``write_batch`` raises (PostgreSQL unreachable) and redis.exceptions.RedisError; the
        entries read stay pending, and the next pass reads this consumer's pending entries first.
        """
        if event_ids is None:
            event_ids = await self._event_ids()
        event_ids = list(event_ids)
        if not event_ids:
            return 0
        recovering = self._recover
        try:
            batch, backlog_full = await self._read_batch(event_ids, recovering)
            entries: list[tuple[str, dict[str, Any]]] = []
            for e, by_id in batch.items():
                for entry_id, fields in by_id.items():
                    order = _decode(e, fields)
                    if order is not None:  # None: deleted while pending, nothing to write but the ack
                        entries.append((entry_id, order))
            if entries:
                await write_batch(self.pg, entries)
            await self._ack({e: list(by_id) for e, by_id in batch.items() if by_id})
        except BaseException:
            self._recover = True
            raise
        if recovering and not backlog_full:
            self._recover = False
        return sum(len(by_id) for by_id in batch.values())

    async def _read_batch(
        self, event_ids: list[str], recovering: bool
    ) -> tuple[dict[str, dict[str, dict]], bool]:
        """event -> {entry id: fields} to write now, and whether our own pending entries filled a batch."""
        await self._ensure_groups(event_ids)
        size = self.settings.outbox_batch_size
        batch: dict[str, dict[str, dict]] = {e: {} for e in event_ids}
        backlog_full = False
        if recovering:
            own = await self._read(
                event_ids, lambda p, e: p.xreadgroup(GROUP, self.name, {keys.outbox(e): "0"}, count=size)
            )
            for e, entries in own.items():
                batch[e].update(entries)
                backlog_full |= len(entries) >= size
        if time.monotonic() >= self._next_claim_at:
            self._next_claim_at = time.monotonic() + self.claim_every_seconds
            idle = self.settings.outbox_claim_idle_ms
            claimed = await self._read(
                event_ids,
                lambda p, e: p.xautoclaim(keys.outbox(e), GROUP, self.name, idle, "0-0", count=size),
            )
            for e, entries in claimed.items():
                if entries:
                    log.info("claimed %d outbox entries of event %s idle > %d ms", len(entries), e, idle)
                    self._next_claim_at = 0.0  # there may be more
                batch[e].update(entries)
            await self._observe_backlog(event_ids)
        fresh = [e for e in event_ids if e in self._grouped and len(batch[e]) < size]
        new = await self._read(
            fresh, lambda p, e: p.xreadgroup(GROUP, self.name, {keys.outbox(e): ">"}, count=size)
        )
        for e, entries in new.items():
            batch[e].update(entries)
        return batch, backlog_full

    async def _ack(self, ids_by_event: dict[str, list[str]]) -> None:
        """XACK then XDEL, in one MULTI per event (on a Redis Cluster, sent to the node that owns the
        event's slot: ``service/slots.py``). Called only after the PostgreSQL commit."""

        async def ack(event_id: str, ids: list[str]) -> None:
            client = await self.slots.for_key(keys.outbox(event_id))
            async with client.pipeline(transaction=True) as pipe:
                pipe.xack(keys.outbox(event_id), GROUP, *ids)
                pipe.xdel(keys.outbox(event_id), *ids)
                await pipe.execute()

        await asyncio.gather(*(ack(e, ids) for e, ids in ids_by_event.items()))

    async def _observe_backlog(self, event_ids: list[str]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for e in event_ids:
                pipe.xlen(keys.outbox(e))
                pipe.xpending(keys.outbox(e), GROUP)
            replies = await pipe.execute(raise_on_error=False)
        for i, e in enumerate(event_ids):
            length, pending = replies[2 * i], replies[2 * i + 1]
            if not isinstance(length, Exception):
                metrics.child(metrics.OUTBOX_LENGTH, e).set(length)
            if isinstance(pending, dict):
                metrics.child(metrics.OUTBOX_PENDING, e).set(pending.get("pending", 0))

    async def run_forever(self, stop_event: asyncio.Event) -> None:
        """Pass after pass until ``stop_event`` is set; a pass that found nothing sleeps
        ``outbox_poll_interval_seconds`` (or until ``wake()``). A failed pass (PostgreSQL or Redis
        unreachable, or anything unexpected) is logged and retried after an exponential backoff with
        jitter (redis-py's EqualJitterBackoff, capped at ``outbox_backoff_max_seconds``)."""
        failures = 0
        while not stop_event.is_set():
            try:
                handled = await self.run_once()
            except (*PG_UNAVAILABLE, RedisError) as exc:
                failures += 1
                delay = self.backoff.compute(failures)
                log.warning("write-through pass failed (%r); retrying in %.2f s", exc, delay)
                await _wait(stop_event, delay)
                continue
            except Exception:
                failures += 1
                delay = self.backoff.compute(failures)
                log.exception("write-through pass failed unexpectedly; retrying in %.2f s", delay)
                await _wait(stop_event, delay)
                continue
            if failures:
                log.info("write-through recovered after %d failed passes", failures)
            failures = 0
            if handled == 0:
                await _wait(self._wake, self.settings.outbox_poll_interval_seconds)
                self._wake.clear()


async def _wait(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        pass
