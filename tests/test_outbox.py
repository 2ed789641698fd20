"""Outbox write-through (workers/outbox.py) and the expiry sweeper, in-process, on real Redis and PostgreSQL.

These tests run against a throw-away redis-server of their own: the ``writers`` consumer group of the
shared Redis may have other sessions' workers in it, which would take (and write elsewhere) our entries.
PostgreSQL is the session's fresh database. Orders are bought through Inventory (hold, confirm), so every
outbox entry is the confirm script's own.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

import asyncpg
import httpx
import orjson
import pytest
from conftest import ADMIN, event_body, free_port

from service import catalog, db, keys, metrics
from service.app import create_app
from service.domain import EventSpec, HoldRequest
from service.inventory import new_id
from workers.outbox import GROUP, OutboxConsumer, write_batch
from workers.sweeper import sweep_once


@pytest.fixture(scope="module")
def private_settings(settings, private_redis_url):
    return settings.model_copy(update={"redis_url": private_redis_url, "outbox_claim_idle_ms": 60_000})


async def new_event(pg, inventory, **overrides) -> str:
    spec = EventSpec(**event_body(**overrides))
    await catalog.create_event(pg, inventory, spec)
    return spec.event_id


async def buy(inventory, event_id: str, customer: str, items: list[dict]) -> dict:
    hold, _ = await inventory.hold(event_id, HoldRequest(customer_id=customer, items=items))
    order, created = await inventory.confirm(event_id, hold["hold_id"], f"pay-{customer}")
    assert created
    return order


async def outbox_entries(redis, event_id: str) -> list[tuple[str, dict]]:
    return [(i.decode(), orjson.loads(f[b"order"])) for i, f in await redis.xrange(keys.outbox(event_id))]


async def pg_state(pg, event_id: str) -> dict:
    return {
        "orders": await pg.fetchval("SELECT count(*) FROM orders WHERE event_id = $1", event_id),
        "items": await pg.fetchval(
            "SELECT coalesce(sum(quantity), 0) FROM order_items WHERE event_id = $1", event_id
        ),
        "sold": {
            r["zone_id"]: r["sold"]
            for r in await pg.fetch("SELECT zone_id, sold FROM zones WHERE event_id = $1", event_id)
        },
        "dead": await pg.fetchval("SELECT count(*) FROM dead_letters WHERE event_id = $1", event_id),
    }


def counter(metric, event_id: str) -> float:
    return metric.labels(event_id)._value.get()


async def test_batch_lands_exactly_once(pg, inventory):
    eid = await new_event(pg, inventory)
    orders = [await buy(inventory, eid, f"c{i}", [{"zone_id": "floor", "quantity": i + 1}]) for i in range(3)]
    orders.append(
        await buy(
            inventory,
            eid,
            "s1",
            [{"zone_id": "sec-101", "seats": ["A1", "A2"]}, {"zone_id": "floor", "quantity": 1}],
        )
    )
    entries = await outbox_entries(inventory.client, eid)
    assert len(entries) == 4

    result = await write_batch(pg, entries)
    assert sorted(result.written) == sorted(o["order_id"] for o in orders)
    assert result.duplicates == [] and result.dead_lettered == []
    assert await pg_state(pg, eid) == {"orders": 4, "items": 9, "sold": {"floor": 7, "sec-101": 2}, "dead": 0}
    for o in orders:  # what PostgreSQL holds reads back as the order Redis confirmed
        stored = await db.get_order(pg, eid, o["order_id"])
        stored.pop("persisted_at_ms")
        assert stored == o

    again = await write_batch(pg, entries)  # redelivery: the whole batch once more
    assert again.written == [] and sorted(again.duplicates) == sorted(o["order_id"] for o in orders)
    assert await pg_state(pg, eid) == {"orders": 4, "items": 9, "sold": {"floor": 7, "sec-101": 2}, "dead": 0}


async def test_redelivery_mixed_with_new_orders_bumps_only_new(pg, inventory):
    eid = await new_event(pg, inventory)
    await buy(inventory, eid, "a", [{"zone_id": "floor", "quantity": 2}])
    first = await outbox_entries(inventory.client, eid)
    await write_batch(pg, first)
    await buy(inventory, eid, "b", [{"zone_id": "floor", "quantity": 3}])
    both = await outbox_entries(inventory.client, eid)
    result = await write_batch(pg, both)
    assert len(result.written) == 1 and len(result.duplicates) == 1
    assert (await pg_state(pg, eid))["sold"]["floor"] == 5


async def test_consumer_acks_only_after_commit(pg, inventory, private_settings):
    eid = await new_event(pg, inventory)
    for i in range(5):
        await buy(inventory, eid, f"c{i}", [{"zone_id": "floor", "quantity": 1}])
    stream = keys.outbox(eid)

    # PostgreSQL unreachable: the pass raises, nothing is acked or deleted, the entries stay pending.
    down = await asyncpg.create_pool(f"postgresql://postgres@127.0.0.1:{free_port()}/x", min_size=0)
    with pytest.raises(OSError):
        await OutboxConsumer(inventory.client, down, private_settings, "w-1").run_once([eid])
    await down.close()
    assert await inventory.client.xlen(stream) == 5
    assert (await inventory.client.xpending(stream, GROUP))["pending"] == 5
    assert (await pg_state(pg, eid))["orders"] == 0

    # The same consumer, restarted, re-reads its pending entries, writes them, then acks and trims.
    consumer = OutboxConsumer(inventory.client, pg, private_settings, "w-1")
    assert await consumer.run_once([eid]) == 5
    assert await inventory.client.xlen(stream) == 0
    assert (await inventory.client.xpending(stream, GROUP))["pending"] == 0
    assert await pg_state(pg, eid) == {"orders": 5, "items": 5, "sold": {"floor": 5, "sec-101": 0}, "dead": 0}
    assert await consumer.run_once([eid]) == 0


async def test_commit_then_crash_before_ack_is_written_once(pg, inventory, private_settings):
    """A worker read the entries and committed them, then died before XACK: another worker claims them."""
    eid = await new_event(pg, inventory)
    for i in range(4):
        await buy(inventory, eid, f"c{i}", [{"zone_id": "sec-101", "seats": [f"B{i + 1}"]}])
    stream = keys.outbox(eid)
    await inventory.client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    read = await inventory.client.xreadgroup(GROUP, "dead-worker", {stream: ">"})
    # Committed, never acked:
    await write_batch(pg, [(i.decode(), orjson.loads(f[b"order"])) for i, f in read[0][1]])
    assert (await inventory.client.xpending(stream, GROUP))["pending"] == 4

    survivor = OutboxConsumer(
        inventory.client, pg, private_settings.model_copy(update={"outbox_claim_idle_ms": 0}), "w-2"
    )
    persisted = counter(metrics.PERSISTED, eid)
    assert await survivor.run_once([eid]) == 4
    assert counter(metrics.PERSISTED, eid) == persisted  # nothing new was written
    assert await pg_state(pg, eid) == {"orders": 4, "items": 4, "sold": {"floor": 0, "sec-101": 4}, "dead": 0}
    assert await inventory.client.xlen(stream) == 0
    assert (await inventory.client.xpending(stream, GROUP))["pending"] == 0


async def test_backstop_refusals_are_dead_lettered_and_the_rest_lands(pg, inventory, private_settings):
    eid = await new_event(
        pg,
        inventory,
        zones=[
            {"zone_id": "floor", "kind": "ga", "capacity": 10, "price_cents": 100},
            {"zone_id": "sec-101", "kind": "seated", "price_cents": 200, "seats": ["A1", "A2", "A3"]},
        ],
    )
    stream = keys.outbox(eid)
    first = await buy(inventory, eid, "real-1", [{"zone_id": "sec-101", "seats": ["A1"]}])
    consumer = OutboxConsumer(inventory.client, pg, private_settings, "w-3")
    assert await consumer.run_once([eid]) == 1

    now_ms = int(time.time() * 1000)

    def forged(**over) -> bytes:
        order = {
            "order_id": new_id("o"),
            "event_id": eid,
            "hold_id": new_id("h"),
            "customer_id": "mallory",
            "items": [],
            "amount_cents": 200,
            "payment_ref": "p",
            "confirmed_at_ms": now_ms,
            **over,
        }
        return orjson.dumps(order)

    # Entries Redis should never have produced: PostgreSQL's backstops must refuse them.
    seat_twice = await inventory.client.xadd(
        stream, {"order": forged(items=[{"zone_id": "sec-101", "seats": ["A1"]}])}
    )
    oversold = await inventory.client.xadd(
        stream, {"order": forged(items=[{"zone_id": "floor", "quantity": 11}])}
    )
    no_such_seat = await inventory.client.xadd(
        stream, {"order": forged(items=[{"zone_id": "sec-101", "seats": ["Z9"]}])}
    )
    same_hold = await inventory.client.xadd(
        stream, {"order": forged(hold_id=first["hold_id"], items=[{"zone_id": "floor", "quantity": 1}])}
    )
    nul_text = await inventory.client.xadd(
        stream, {"order": forged(customer_id="a\x00b", items=[{"zone_id": "floor", "quantity": 1}])}
    )
    not_json = await inventory.client.xadd(stream, {"order": b"{nope"})
    good = [await buy(inventory, eid, f"real-{i}", [{"zone_id": "floor", "quantity": 2}]) for i in (2, 3)]
    dead_before = counter(metrics.DEAD_LETTERS, eid)

    assert await consumer.run_once([eid]) == 8
    state = await pg_state(pg, eid)
    assert state == {"orders": 3, "items": 5, "sold": {"floor": 4, "sec-101": 1}, "dead": 6}
    for o in good:
        assert await db.get_order(pg, eid, o["order_id"]) is not None
    reasons = {
        r["entry_id"]: r["reason"]
        for r in await pg.fetch("SELECT entry_id, reason FROM dead_letters WHERE event_id = $1", eid)
    }
    assert "order_items_one_sale_per_seat" in reasons[seat_twice.decode()]
    assert "zone_not_oversold" in reasons[oversold.decode()]
    assert "ForeignKeyViolation" in reasons[no_such_seat.decode()]
    assert "UniqueViolation" in reasons[same_hold.decode()]
    assert "CharacterNotInRepertoire" in reasons[nul_text.decode()]
    assert reasons[not_json.decode()].startswith("malformed order")
    payload = await pg.fetchval("SELECT payload FROM dead_letters WHERE entry_id = $1", oversold.decode())
    assert orjson.loads(payload)["items"] == [{"zone_id": "floor", "quantity": 11}]
    assert counter(metrics.DEAD_LETTERS, eid) == dead_before + 6
    assert await inventory.client.xlen(stream) == 0  # refused entries are acked: never retried forever
    assert (await inventory.client.xpending(stream, GROUP))["pending"] == 0

    # Redelivered refusals are recorded once.
    entries = [(seat_twice.decode(), orjson.loads(forged(items=[{"zone_id": "sec-101", "seats": ["A1"]}])))]
    assert (await write_batch(pg, entries)).dead_lettered == [seat_twice.decode()]
    assert (await pg_state(pg, eid))["dead"] == 6


async def test_consumer_covers_every_event_and_reclaims_idle_entries(pg, inventory, private_settings):
    a = await new_event(pg, inventory)
    b = await new_event(pg, inventory)
    await buy(inventory, a, "x", [{"zone_id": "floor", "quantity": 1}])
    await buy(inventory, b, "y", [{"zone_id": "floor", "quantity": 1}])
    stream = keys.outbox(b)
    await inventory.client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    await inventory.client.xreadgroup(GROUP, "gone", {stream: ">"})  # read by a worker that died
    await buy(inventory, b, "z", [{"zone_id": "floor", "quantity": 1}])

    consumer = OutboxConsumer(
        inventory.client, pg, private_settings.model_copy(update={"outbox_claim_idle_ms": 50}), "w-4"
    )
    await asyncio.sleep(0.1)
    while await consumer.run_once():  # every event in keys.EVENTS_KEY, as the worker does
        pass
    assert (await pg_state(pg, a))["orders"] == 1
    assert (await pg_state(pg, b))["orders"] == 2
    assert (await inventory.client.xpending(stream, GROUP))["pending"] == 0


async def test_consumer_leaves_other_deployments_events_alone(pg, inventory, private_settings):
    """An event in this Redis that this worker's PostgreSQL does not know belongs to someone else: its
    entries must stay in the stream, unread, rather than be dead-lettered here and acked away."""
    ours = await new_event(pg, inventory)
    foreign = EventSpec(**event_body())
    await inventory.load_event(foreign)  # Redis only, as another deployment sharing this Redis would
    await buy(inventory, ours, "x", [{"zone_id": "floor", "quantity": 1}])
    await buy(inventory, foreign.event_id, "y", [{"zone_id": "floor", "quantity": 1}])
    consumer = OutboxConsumer(inventory.client, pg, private_settings, "w-iso")
    while await consumer.run_once():
        pass
    assert (await pg_state(pg, ours))["orders"] == 1
    assert len(await outbox_entries(inventory.client, foreign.event_id)) == 1
    assert await pg.fetchval("SELECT count(*) FROM dead_letters WHERE event_id = $1", foreign.event_id) == 0
    await inventory.unload_event(foreign.event_id)


async def test_get_order_is_persisted_after_the_worker_ran(pg, inventory, private_settings):
    app = create_app(private_settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            body = event_body()
            eid = body["event_id"]
            assert (await client.post("/v1/events", json=body, headers=ADMIN)).status_code == 201
            r = await client.post(
                f"/v1/events/{eid}/holds",
                json={"customer_id": "c-1", "items": [{"zone_id": "sec-101", "seats": ["a3"]}]},
            )
            assert r.status_code == 201, r.text
            r = await client.post(
                f"/v1/events/{eid}/holds/{r.json()['hold_id']}/confirm", json={"payment_ref": "pay-1"}
            )
            assert r.status_code == 201, r.text
            confirmed = r.json()
            url = f"/v1/events/{eid}/orders/{confirmed['order_id']}"
            before = (await client.get(url)).json()
            assert before["persisted"] is False and before["persisted_at"] is None

            await OutboxConsumer(inventory.client, pg, private_settings, "w-5").run_once([eid])
            after = (await client.get(url)).json()
            assert after["persisted"] is True
            persisted_at = datetime.fromisoformat(after.pop("persisted_at"))
            assert persisted_at >= datetime.fromisoformat(confirmed["confirmed_at"])
            after.pop("persisted")
            assert after == confirmed


async def test_sweeper_expires_holds_of_idle_events(pg, inventory):
    eid = await new_event(pg, inventory, hold_ttl_seconds=1)
    await inventory.hold(eid, HoldRequest(customer_id="c", items=[{"zone_id": "floor", "quantity": 4}]))
    zone = keys.zone(eid, "floor")
    assert int(await inventory.client.hget(zone, "held")) == 4
    expired = counter(metrics.EXPIRIES, eid)
    await asyncio.sleep(1.05)
    for _ in range(40):  # the hold's expiry is Redis' clock: allow it a little slack
        if await sweep_once(inventory):
            break
        await asyncio.sleep(0.05)
    assert int(await inventory.client.hget(zone, "held")) == 0
    assert int(await inventory.client.hget(zone, "available")) == 100
    assert counter(metrics.EXPIRIES, eid) == expired + 1


async def test_reconcile_cron_job_runs_off_the_worker_loop(pg, inventory, private_settings):
    from workers import main

    eid = await new_event(pg, inventory)
    await buy(inventory, eid, "r", [{"zone_id": "floor", "quantity": 1}])
    result = await main.reconcile(
        {"settings": private_settings}
    )  # its own thread, loop, Redis client and pool
    assert result["events"] >= 1
    assert main.every(30) == {"second": {0, 30}}
    assert main.every(120) == {"minute": set(range(0, 60, 2)), "second": {0}}
