"""Inventory in Redis: the one place Python talks to the sale's Lua scripts.

Each method builds an event's keys, runs one script through ``ScriptRunner`` and turns the script's
JSON reply into a dict or a ``DomainError``. Times are epoch milliseconds of Redis' own clock (``TIME``).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import orjson
import redis.asyncio as aioredis

from service import keys
from service.domain import EVENT_ON_SALE, EVENT_PAUSED, HOLD_ACTIVE, EventSpec, HoldRequest
from service.errors import DomainError
from service.scripts import ScriptRunner, only_reply
from service.settings import Settings
from service.slots import SlotClients

SEAT_LOAD_CHUNK = 10_000

# Script error codes that are request-validation problems (422) rather than sale outcomes, and the request
# field each one is about: a hold's body, or a seat-map request's path (zone_id) and query (after).
_VALIDATION = {
    "invalid_item": "items",
    "unknown_seats": "items",
    "ttl_too_long": "ttl_seconds",
}
_SEAT_PAGE_FIELDS = {"invalid_item": "zone_id", "unknown_seats": "after"}


_ID_BYTES = 16
_random = bytearray()
"""os.urandom bytes not used yet: read 4 KiB at a time, one getrandom() system call per 256 ids."""
_random_lock = threading.Lock()
"""Taking bytes is two steps (read, delete). CPython 3.11 never switches threads between them, but nothing
promises that (free-threaded builds): two threads must never take the same bytes."""
os.register_at_fork(after_in_child=_random.clear)  # a forked child must never hand out its parent's ids


def new_id(kind: str) -> str:
    """``h_``/``o_`` + 32 hex digits of os.urandom: unguessable, so a hold id is a bearer capability."""
    with _random_lock:
        if len(_random) < _ID_BYTES:
            _random.extend(os.urandom(256 * _ID_BYTES))
        raw = _random[-_ID_BYTES:]
        del _random[-_ID_BYTES:]
    return f"{kind}_{raw.hex()}"


def _reply(raw: bytes | str, fields: dict[str, str] = _VALIDATION) -> dict[str, Any]:
    """A script's JSON reply as a dict, or its ``{"err": code, "details": {...}}`` raised as DomainError: the codes
    in ``fields`` as validation_failed (422) naming that request field, the others under their own code."""
    data = orjson.loads(raw)
    err = data.get("err")
    if err is None:
        return data
    details = data.get("details") or {}
    if err in fields:
        messages = {
            "invalid_item": lambda d: f"zone {d['zone_id']}: {d['reason']}",
            "unknown_seats": lambda d: f"zone {d['zone_id']} has no seats {', '.join(d['seats'])}",
            "ttl_too_long": lambda d: f"at most the event's hold_ttl_seconds ({d['max_ttl_seconds']})",
        }
        raise DomainError(
            "validation_failed",
            details={"errors": [{"field": fields[err], "message": messages[err](details), **details}]},
        )
    raise DomainError(err, details=details or None)


def _name_the_item(exc: DomainError, req: HoldRequest) -> None:
    """A script's error about one item of a hold (``zone_id`` in its details) names that item's field as
    pydantic names its own errors: ``items.<index>.seats`` or ``items.<index>.quantity``."""
    for error in exc.details.get("errors", ()):
        if error.get("field") != "items":
            continue
        for i, item in enumerate(req.items):
            if item.zone_id == error.get("zone_id"):
                error["field"] = f"items.{i}.{'seats' if item.seats is not None else 'quantity'}"


class Inventory:
    """Atomic inventory operations for one process. Raises DomainError; Redis failures propagate."""

    def __init__(self, client: aioredis.Redis, settings: Settings):
        self.client = client
        self.settings = settings
        self.runner = ScriptRunner(client, auto_pipeline=settings.auto_pipeline)

    def close(self) -> None:
        """Close the scripts' auto-pipeline connections; the Redis client stays the caller's to close."""
        self.runner.close()

    async def aclose(self) -> None:
        """``close``, and the per-node connections of durable confirms on a Redis Cluster, if any."""
        await self.runner.aclose()

    def _common(self) -> list[int]:
        """retention_seconds and reap_limit, which every script takes (the hold script first, the others last)."""
        return [self.settings.hold_retention_seconds, self.settings.reap_batch]

    async def hold(self, event_id: str, req: HoldRequest, idempotency_key: str = "") -> tuple[dict, bool]:
        """Hold all items or none. Returns (hold, replay) with replay True for an idempotent repeat.

        Raises DomainError: event_not_found, zone_not_found, sale_paused, sold_out, seats_unavailable,
        limit_exceeded, idempotency_conflict, validation_failed.
        """
        items = [i.as_script_item() for i in req.items]
        hold_id = new_id("h")
        idempotency = ""
        if idempotency_key:
            idempotency = f"{req.body_sha256()} {self.settings.idempotency_ttl_seconds} {idempotency_key}"
        raw = await self.runner.batched(
            "hold",
            keys.meta(event_id),
            self._common(),
            (hold_id, req.customer_id, req.ttl_seconds or 0, orjson.dumps(items), idempotency),
        )
        if isinstance(raw, list):  # created now: the script sends only what it computed (see lua/hold.lua)
            tickets, amount_cents, created_at_ms, expires_at_ms = raw
            hold = {
                "hold_id": hold_id,
                "customer_id": req.customer_id,
                "status": HOLD_ACTIVE,
                "items": items,
                "tickets": tickets,
                "amount_cents": amount_cents,
                "created_at_ms": created_at_ms,
                "expires_at_ms": expires_at_ms,
            }
            return hold, False
        try:
            data = _reply(raw)
        except DomainError as exc:
            _name_the_item(exc, req)
            raise
        return data["hold"], data["replay"]

    async def confirm(self, event_id: str, hold_id: str, payment_ref: str) -> tuple[dict, bool]:
        """Confirm a hold. Returns (order, created); created is False for a repeat.

        The confirms of one event and event-loop tick are one script call (``ScriptRunner.batched``,
        ``lua/confirm.lua``), each with its own reply, as separate calls would be.

        With ``wait_aof``, the confirm is followed by ``WAITAOF 1 0 wait_aof_timeout_ms`` on the connection that
        sent it (Redis >= 7.2, https://redis.io/commands/waitaof/; ``ScriptRunner.run_durable``), so the order
        is in the fsynced AOF before this returns. A repeat waits too (the script writes on a repeat as well,
        so its WAITAOF covers the first confirm's write, which came earlier in the same AOF): the first reply
        may have been lost before its fsync.

        Raises DomainError: event_not_found, hold_not_found, hold_expired, hold_released; unavailable
        (``aof_fsync_timeout``) if the fsync did not happen within ``wait_aof_timeout_ms``: the order is
        confirmed in Redis, and the client's retry (confirm is idempotent) waits for the fsync again.
        """
        item = (hold_id, new_id("o"), payment_ref)
        if not self.settings.wait_aof:
            raw = await self.runner.batched("confirm", keys.meta(event_id), [*self._common(), ""], item)
            data = _reply(raw)
            return data["order"], data["created"]
        raw, fsynced = await self.runner.run_durable(
            "confirm",
            [keys.meta(event_id)],
            [*self._common(), "1", *item],
            (1, 0, self.settings.wait_aof_timeout_ms),
        )
        data = _reply(only_reply(raw))
        if fsynced < 1:
            raise DomainError(
                "unavailable",
                message="The order is not yet durable; retry the confirm.",
                details={"store": "redis", "reason": "aof_fsync_timeout"},
            )
        return data["order"], data["created"]

    async def release(self, event_id: str, hold_id: str) -> str:
        """Release a hold; returns "released" (or "expired" if it had expired). Raises hold_confirmed, hold_not_found."""
        data = _reply(await self.runner.run("release", [keys.meta(event_id)], [hold_id, *self._common()]))
        return data["status"]

    async def get_hold(self, event_id: str, hold_id: str) -> dict:
        """The hold with its current status. Raises event_not_found, hold_not_found."""
        data = _reply(await self.runner.run("get_hold", [keys.meta(event_id)], [hold_id, *self._common()]))
        return data["hold"]

    async def availability(self, event_id: str) -> dict:
        """``{"status", "zones": [{zone_id, kind, capacity, available, held, sold, price_cents}]}``."""
        return _reply(await self.runner.run("availability", [keys.meta(event_id)], self._common()))

    async def seat_page(self, event_id: str, zone_id: str, status: str, after: str, limit: int) -> dict:
        """``{"seats": [{seat, status}], "next": label | None}``; examines at most max(20 x limit, 2,000) seats per
        call, so a page may hold fewer than ``limit`` seats and still have a ``next``.

        Raises DomainError: event_not_found, zone_not_found, validation_failed (field ``zone_id``: a
        general-admission zone; field ``after``: not a seat of the zone)."""
        args = [zone_id, status, after, limit, max(limit * 20, 2000), *self._common()]
        data = _reply(await self.runner.run("seat_page", [keys.meta(event_id)], args), _SEAT_PAGE_FIELDS)
        if data["seats"] == {}:  # cjson encodes an empty Lua table as an object
            data["seats"] = []
        return data

    async def reap(self, event_id: str) -> int:
        """Reap expired holds of one event (all of them, in batches). Returns how many."""
        total = 0
        while True:
            n = int(await self.runner.run("reap", [keys.meta(event_id)], self._common()))
            total += n
            if n < self.settings.reap_batch:
                return total

    async def find_order(self, event_id: str, order_id: str) -> dict | None:
        """An order confirmed in Redis (not necessarily persisted yet), from its hold record; None if unknown."""
        hold_id = await self.client.get(keys.order(event_id, order_id))
        if hold_id is None:
            return None
        try:
            h = await self.get_hold(event_id, hold_id.decode() if isinstance(hold_id, bytes) else hold_id)
        except DomainError as err:
            if err.code == "hold_not_found":  # expired from Redis between the two reads
                return None
            raise
        return {
            "order_id": order_id,
            "event_id": event_id,
            "hold_id": h["hold_id"],
            "customer_id": h["customer_id"],
            "items": h["items"],
            "amount_cents": h["amount_cents"],
            "payment_ref": h.get("payment_ref"),
            "confirmed_at_ms": h.get("confirmed_at_ms"),
        }

    # Catalog -------------------------------------------------------------------------------------

    async def event_exists(self, event_id: str) -> bool:
        return bool(await self.client.exists(keys.meta(event_id)))

    async def unsold(self, event_id: str) -> bool:
        """True if the event's Redis keys carry no sale: status paused, no zone with tickets held or sold, no
        per-customer counts and an empty outbox (what a create that failed after its load leaves)."""
        status, raw_zones = await self.client.hmget(keys.meta(event_id), "status", "zones")
        if status not in (EVENT_PAUSED, EVENT_PAUSED.encode()):
            return False
        for zone_id in orjson.loads(raw_zones or b"[]"):
            held, sold = await self.client.hmget(keys.zone(event_id, zone_id), "held", "sold")
            if int(held or 0) or int(sold or 0):
                return False
        customers = await self.client.hlen(keys.customers(event_id))
        return not customers and not await self.client.xlen(keys.outbox(event_id))

    async def load_event(
        self,
        spec: EventSpec,
        *,
        status: str = EVENT_ON_SALE,
        sold: dict[str, int] | None = None,
        sold_seats: dict[str, dict[str, str]] | None = None,
        customers: dict[str, int] | None = None,
    ) -> None:
        """Write an event's catalog into Redis: zones, seat maps, then meta, in one MULTI (all keys share a slot;
        on a Redis Cluster it goes to the node that owns it, ``service/slots.py``). Every script checks meta
        first, so an event is invisible until its last write lands.

        ``sold`` (zone -> tickets), ``sold_seats`` (zone -> {seat: order_id}) and ``customers`` (customer ->
        tickets bought) restore what PostgreSQL says was sold (rebuild). Pipelined in chunks of 10,000 seats: a 100,000-seat event is a few round trips.
        """
        sold = sold or {}
        sold_seats = sold_seats or {}
        eid = spec.event_id
        slots = SlotClients(self.client)
        try:
            node = await slots.for_key(keys.meta(eid))
            await self._load(node, spec, status, sold, sold_seats, customers)
        finally:
            await slots.aclose()
        await self.client.sadd(keys.EVENTS_KEY, eid)

    @staticmethod
    async def _load(
        node: aioredis.Redis,
        spec: EventSpec,
        status: str,
        sold: dict[str, int],
        sold_seats: dict[str, dict[str, str]],
        customers: dict[str, int] | None,
    ) -> None:
        eid = spec.event_id
        async with node.pipeline(transaction=True) as pipe:
            pipe.delete(keys.meta(eid))
            for z in spec.zones:
                n_sold = sold.get(z.zone_id, 0)
                pipe.delete(
                    keys.zone(eid, z.zone_id), keys.seats(eid, z.zone_id), keys.owners(eid, z.zone_id)
                )
                pipe.hset(
                    keys.zone(eid, z.zone_id),
                    mapping={
                        "kind": z.kind,
                        "capacity": z.capacity,
                        "available": z.capacity - n_sold,
                        "held": 0,
                        "sold": n_sold,
                        "price_cents": z.price_cents,
                    },
                )
                if z.kind == "seated":
                    for start in range(0, len(z.seats), SEAT_LOAD_CHUNK):
                        chunk = z.seats[start : start + SEAT_LOAD_CHUNK]
                        pipe.zadd(keys.seats(eid, z.zone_id), {s: start + i for i, s in enumerate(chunk)})
                    owners = {s: f"s:{o}" for s, o in sold_seats.get(z.zone_id, {}).items()}
                    if owners:
                        pipe.hset(keys.owners(eid, z.zone_id), mapping=owners)
            pipe.delete(keys.customers(eid))
            if customers:
                pipe.hset(keys.customers(eid), mapping=customers)
            pipe.hset(
                keys.meta(eid),
                mapping={
                    "event_id": eid,
                    "name": spec.name,
                    "starts_at": spec.starts_at.isoformat(),
                    "hold_ttl_seconds": spec.hold_ttl_seconds,
                    "max_tickets_per_customer": spec.max_tickets_per_customer,
                    "status": status,
                    "zones": orjson.dumps([z.zone_id for z in spec.zones]),
                },
            )
            await pipe.execute()

    async def unload_event(self, event_id: str) -> None:
        """Delete every key of an event (SCAN over its hash tag, on the node that owns it on a Redis Cluster)."""
        slots = SlotClients(self.client)
        try:
            node = await slots.for_key(keys.meta(event_id))
            async for key in node.scan_iter(
                match=keys.prefix(event_id).replace("{", "\\{").replace("}", "\\}") + "*", count=1000
            ):
                await node.delete(key)
        finally:
            await slots.aclose()
        await self.client.srem(keys.EVENTS_KEY, event_id)

    async def set_status(self, event_id: str, status: str) -> None:
        """Pause or resume new holds. Raises event_not_found."""
        if not await self.event_exists(event_id):
            raise DomainError("event_not_found")
        await self.client.hset(keys.meta(event_id), "status", status)

    async def event_ids(self) -> list[str]:
        return sorted(
            m.decode() if isinstance(m, bytes) else m for m in await self.client.smembers(keys.EVENTS_KEY)
        )
