"""Outbox write-through (workers/outbox.py) and the expiry sweeper, in-process, on real Redis and PostgreSQL.

These tests run against a throw-away redis-server of their own: the ``writers`` consumer group of the
shared Redis may have other sessions' workers in it, which would take (and write elsewhere) our entries.
PostgreSQL is the session's fresh database. Orders are bought through Inventory (hold, confirm), so every
outbox entry is the confirm script's own.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
from datetime import datetime

import asyncpg
import httpx
import orjson
import pytest
from conftest import ADMIN, event_body, free_port
from pydantic import ValidationError

from service import catalog, db, keys, metrics
from service.app import create_app
from service.domain import EventSpec, HoldRequest
from service.inventory import new_id
from service.settings import Settings
from workers import outbox
from workers.outbox import GROUP, PG_UNAVAILABLE, OutboxConsumer, write_batch
from workers.reconcile import redrive_outbox
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


def forged_order(event_id: str, **over) -> dict:
    """An order in the confirm script's format that Redis never sold (for entries only a bug could write)."""
    return {
        "order_id": new_id("o"),
        "event_id": event_id,
        "hold_id": new_id("h"),
        "customer_id": "mallory",
        "items": [{"zone_id": "floor", "quantity": 1}],
        "amount_cents": 9900,
        "payment_ref": "p",
        "confirmed_at_ms": int(time.time() * 1000),
        **over,
    }


POISON = {
    # kind: (what the forged order gets, the name its dead letter's reason gives)
    "nul_zone": (lambda e: {"items": [{"zone_id": "fl\x00oor", "quantity": 1}]}, "zone_id"),
    "nul_seat": (lambda e: {"items": [{"zone_id": "sec-101", "seats": ["A\x001"]}]}, "seat"),
    "nul_event": (lambda e: {"event_id": e + "\x00"}, "event"),
    # ~12 KB of random hex: no btree index row can hold it (at most ~2.7 KB, and hex barely compresses)
    "long_order_id": (lambda e: {"order_id": "o_" + secrets.token_hex(6000)}, "order_id"),
    "long_hold_id": (lambda e: {"hold_id": "h_" + secrets.token_hex(6000)}, "hold_id"),
    "long_event_id": (lambda e: {"event_id": e + secrets.token_hex(6000)}, "event"),
}
"""Outbox entries PostgreSQL cannot take even as keys: a NUL (text cannot hold U+0000) or an id too long to
index. Before the fix one of them blocked the write-through of every event: nothing was acked, forever."""


def poisoned(kind: str, event_id: str) -> dict:
    return {**forged_order(event_id), **POISON[kind][0](event_id)}


@pytest.mark.parametrize("kind", list(POISON))
async def test_a_poison_entry_is_dead_lettered_and_every_event_lands(pg, inventory, private_settings, kind):
    a = await new_event(pg, inventory)
    b = await new_event(pg, inventory)
    good = [
        await buy(inventory, a, "g-1", [{"zone_id": "floor", "quantity": 1}]),
        await buy(inventory, b, "g-2", [{"zone_id": "sec-101", "seats": ["A1"]}]),
    ]
    bad = poisoned(kind, a)
    poison_id = (await inventory.client.xadd(keys.outbox(a), {"order": orjson.dumps(bad)})).decode()
    good.append(await buy(inventory, a, "g-3", [{"zone_id": "sec-101", "seats": ["A2"]}]))
    dead_before = counter(metrics.DEAD_LETTERS, a)

    # One pass: the poison is dead-lettered, the rest of the batch (of both events) lands, all is acked.
    consumer = OutboxConsumer(inventory.client, pg, private_settings, f"w-{kind}")
    assert await consumer.run_once([a, b]) == 4
    for o in good:
        assert await db.get_order(pg, o["event_id"], o["order_id"]) is not None
    assert await pg_state(pg, a) == {"orders": 2, "items": 2, "sold": {"floor": 1, "sec-101": 1}, "dead": 1}
    assert await pg_state(pg, b) == {"orders": 1, "items": 1, "sold": {"floor": 0, "sec-101": 1}, "dead": 0}
    for e in (a, b):
        assert await inventory.client.xlen(keys.outbox(e)) == 0
        assert (await inventory.client.xpending(keys.outbox(e), GROUP))["pending"] == 0
    row = await pg.fetchrow("SELECT entry_id, payload::text, reason FROM dead_letters WHERE event_id = $1", a)
    assert row["entry_id"] == poison_id
    assert row["reason"].startswith("malformed order") and POISON[kind][1] in row["reason"]
    assert len(row["reason"]) < 300  # a 12 KB id is shown cut short
    assert bad["hold_id"] in row["payload"]  # the entry is kept (NUL replaced by U+FFFD)
    assert counter(metrics.DEAD_LETTERS, a) == dead_before + 1


async def test_write_batch_dead_letters_poison_and_writes_the_rest(pg, inventory):
    """write_batch itself (the path reconcile's repair and rebuild's redrive take too), every poison in one
    batch with good orders of two events. A poison event id is unusable as dead_letters' key: recorded
    under the event id ''."""
    a = await new_event(pg, inventory)
    b = await new_event(pg, inventory)
    await buy(inventory, a, "g-1", [{"zone_id": "floor", "quantity": 1}])
    await buy(inventory, b, "g-2", [{"zone_id": "sec-101", "seats": ["A1"]}])
    good = await outbox_entries(inventory.client, a) + await outbox_entries(inventory.client, b)
    stamp = time.time_ns()  # ids "1-...": unique, and never a real entry's (write_batch keys entries by id)
    bad = [(f"1-{stamp + i}", poisoned(kind, a)) for i, kind in enumerate(POISON)]

    result = await write_batch(pg, [good[0], *bad, good[1]])
    assert sorted(result.written) == sorted(o["order_id"] for _, o in good)
    assert sorted(result.dead_lettered) == sorted(i for i, _ in bad)
    assert (await pg_state(pg, a))["orders"] == 1 and (await pg_state(pg, b))["orders"] == 1
    ids = [i for i, _ in bad]
    rows = await pg.fetch("SELECT event_id, reason FROM dead_letters WHERE entry_id = ANY($1)", ids)
    assert sorted(r["event_id"] for r in rows) == sorted([a] * 4 + ["", ""])
    assert all(r["reason"].startswith("malformed order") for r in rows)

    again = await write_batch(pg, [good[0], *bad, good[1]])  # redelivered: recorded once
    assert again.written == [] and sorted(again.dead_lettered) == sorted(ids)
    assert await pg.fetchval("SELECT count(*) FROM dead_letters WHERE entry_id = ANY($1)", ids) == 6


async def test_redrive_dead_letters_poison_and_writes_the_rest(pg, inventory, private_settings):
    """Reconcile's repair and rebuild re-drive the outbox with write_batch: a poison entry must not stop them."""
    eid = await new_event(pg, inventory)
    good = await buy(inventory, eid, "g-1", [{"zone_id": "floor", "quantity": 1}])
    await inventory.client.xadd(keys.outbox(eid), {"order": orjson.dumps(poisoned("nul_zone", eid))})
    assert await redrive_outbox(inventory.client, pg, eid, private_settings) == (1, 1)
    assert await db.get_order(pg, eid, good["order_id"]) is not None
    assert (await pg_state(pg, eid))["dead"] == 1
    assert await inventory.client.xlen(keys.outbox(eid)) == 0


@pytest.mark.parametrize("stop", ["pg_terminate_backend", "pg_cancel_backend"])
async def test_postgres_failing_mid_batch_dead_letters_nothing(
    pg, inventory, private_settings, monkeypatch, stop
):
    """PostgreSQL ends the session (terminate: connection lost) or cancels the statement (as a shutdown or a
    statement timeout would) while a refused batch is redone entry by entry: not a refusal. The pass raises;
    nothing is written, dead-lettered or acked; the next pass writes it all."""
    eid = await new_event(pg, inventory)
    await buy(inventory, eid, "g-1", [{"zone_id": "floor", "quantity": 1}])
    oversold = forged_order(eid, items=[{"zone_id": "floor", "quantity": 101}])  # refused: entry by entry
    await inventory.client.xadd(keys.outbox(eid), {"order": orjson.dumps(oversold)})
    await buy(inventory, eid, "g-2", [{"zone_id": "floor", "quantity": 1}])
    insert = outbox._insert

    async def stop_session(pid: int) -> None:
        busy = (
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active' AND query ~ 'pg_sleep'"
        )
        for _ in range(500):  # once the slow statement runs (within 5 s)
            if await pg.fetchval(busy, pid):
                break
            await asyncio.sleep(0.01)
        await pg.execute(f"SELECT {stop}($1)", pid)

    async def fail_then_insert(conn, orders):
        if len(orders) == 1:  # the first entry redone alone: a slow statement, stopped by PostgreSQL
            stopper = asyncio.create_task(stop_session(conn.get_server_pid()))
            try:
                await conn.execute("SELECT pg_sleep(10)")
            finally:
                await stopper
        return await insert(conn, orders)

    monkeypatch.setattr(outbox, "_insert", fail_then_insert)
    consumer = OutboxConsumer(inventory.client, pg, private_settings, f"w-{stop}")
    with pytest.raises((*PG_UNAVAILABLE, asyncpg.PostgresError)) as failed:
        await consumer.run_once([eid])
    assert not isinstance(failed.value, outbox.REFUSED)
    assert await pg_state(pg, eid) == {"orders": 0, "items": 0, "sold": {"floor": 0, "sec-101": 0}, "dead": 0}
    assert (await inventory.client.xpending(keys.outbox(eid), GROUP))["pending"] == 3

    monkeypatch.undo()
    assert await consumer.run_once([eid]) == 3
    assert await pg_state(pg, eid) == {"orders": 2, "items": 2, "sold": {"floor": 2, "sec-101": 0}, "dead": 1}
    assert await inventory.client.xlen(keys.outbox(eid)) == 0


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


def test_a_reconcile_interval_of_0_schedules_no_cron_job():
    from workers import main

    [job] = main.schedule(Settings(redis_url=None, database_url=None, reconcile_interval_seconds=30))
    assert job.name == "reconcile" and job.second == {0, 30}
    off = Settings(redis_url=None, database_url=None, reconcile_interval_seconds=0)  # validated: 0 is allowed
    assert main.schedule(off) == []
    with pytest.raises(ValidationError):
        Settings(redis_url=None, database_url=None, reconcile_interval_seconds=-1)


@pytest.mark.parametrize(("interval", "jobs"), [("0", []), ("20", [{0, 20, 40}]), ("-1", [{0, 30}])])
def test_arqs_own_cli_gets_the_schedule_of_the_environment(interval, jobs):
    """``arq workers.main.WorkerSettings`` reads the class's ``cron_jobs``, built at import from the environment
    (settings that do not validate give the default schedule: the worker's start-up then reports the error)."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BOXOFFICE_")}
    env["BOXOFFICE_RECONCILE_INTERVAL_SECONDS"] = interval
    code = "from workers.main import WorkerSettings as W; print([sorted(j.second) for j in W.cron_jobs])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str([sorted(s) for s in jobs])


async def test_a_refused_entry_does_not_hide_another_events_entry_of_the_same_id(pg, inventory):
    """Entry ids are unique only within one stream: two events' outboxes often hold the same id (same
    millisecond, sequence 0). Event A's entry refused must not take event B's order of that id out of
    ``written`` (and so out of the persisted count and the write-lag metric)."""
    a = await new_event(pg, inventory)
    b = await new_event(pg, inventory)
    await buy(inventory, b, "g-1", [{"zone_id": "floor", "quantity": 1}])
    [(entry_id, good)] = await outbox_entries(inventory.client, b)
    oversold = forged_order(a, items=[{"zone_id": "floor", "quantity": 1_000}])  # a backstop refuses it

    result = await write_batch(pg, [(entry_id, oversold), (entry_id, good)])
    assert result.written == [good["order_id"]]
    assert result.dead_lettered == [entry_id]
    assert await db.get_order(pg, b, good["order_id"]) is not None
