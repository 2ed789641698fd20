# ruff: noqa: F811  (the throw-away server fixtures are imported from test_rebuild, then used as arguments)
"""Reconciliation of Redis with PostgreSQL: a clean sale, planted drift found and repaired, the CLI, the cron job.

Runs on the throw-away redis-server of tests/test_rebuild.py (so ``cron_reconcile`` sees only our events in
Redis) and the session's database; the write-through is the worker's own consumer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random

import pytest
from prometheus_client import REGISTRY
from test_rebuild import (  # noqa: F401
    buy,
    create,
    hold,
    scratch,
    scratch_app_and_client,
    scratch_settings,
    seats_with,
    zones,
)

from service import db, keys
from service.domain import HoldRequest
from service.errors import DomainError
from service.rebuild import rebuild_event
from workers import reconcile
from workers.outbox import OutboxConsumer
from workers.reconcile import cron_reconcile, reconcile_event, run_cli


def kinds(report) -> set[str]:
    return {d.kind for d in report.drifts}


async def test_clean_sale_has_no_drift(scratch, capsys):
    client, inventory, pg, settings, write_through = scratch
    eid = await create(client)
    await buy(client, eid, "c-1", ga=3, seats=["A1", "A2"])
    await buy(client, eid, "c-2", ga=1)
    await write_through(eid)
    await hold(client, eid, "c-3", ga=2, seats=["B1"])
    released = (await hold(client, eid, "c-4", ga=1, seats=["B2"])).json()["hold_id"]
    await client.post(f"/v1/events/{eid}/holds/{released}/release")
    await buy(client, eid, "c-5", ga=2, seats=["A3"])  # confirmed, not written through: in flight

    report = await reconcile_event(inventory.client, pg, inventory, eid, repair=False, settings=settings)
    assert report.clean, report.drifts
    by_zone = {z.zone_id: z for z in report.zones}
    assert (by_zone["floor"].sold_redis, by_zone["floor"].sold_pg, by_zone["floor"].in_flight) == (6, 4, 2)
    assert (by_zone["sec-101"].sold_redis, by_zone["sec-101"].sold_pg, by_zone["sec-101"].in_flight) == (
        3,
        2,
        1,
    )
    assert (by_zone["floor"].held_by_holds, by_zone["sec-101"].held_by_holds) == (2, 1)
    assert (report.outbox.length, report.outbox.in_flight_orders, report.active_holds) == (1, 1, 1)
    assert report.outbox.oldest_unacked_age_ms is not None and report.outbox.group_exists
    assert await asyncio.to_thread(run_cli, settings, event_id=eid, repair=False, as_json=False) == 0
    assert "1 of 1 events clean" in capsys.readouterr().out


async def test_planted_drift_is_found_and_repaired(scratch, monkeypatch):
    client, inventory, pg, settings, write_through = scratch
    r = inventory.client
    eid = await create(client)
    lost = await buy(client, eid, "c-1", seats=["A1", "A2"])
    await buy(client, eid, "c-2", ga=3)
    await write_through(eid)
    active = (await hold(client, eid, "c-3", ga=2, seats=["B1"])).json()["hold_id"]
    unwritten = await buy(client, eid, "c-4", ga=1)  # stays in the outbox: no worker runs

    await r.hincrby(keys.zone(eid, "floor"), "sold", 2)  # sold bumped behind the scripts' back
    await pg.execute("DELETE FROM orders WHERE order_id = $1", lost["order_id"])  # an order row lost
    await r.zadd(keys.expiry(eid), {"h_ghost": 9e12})  # an expiry entry without a hold
    await r.zrem(keys.expiry(eid), active)  # an active hold that would never expire
    await r.hset(keys.owners(eid, "sec-101"), "A9", "h:h_gone")  # a seat held by no hold
    monkeypatch.setattr(reconcile, "STUCK_AFTER_MIN_MS", 0)  # the outbox entry counts as stuck at once
    settings = settings.model_copy(update={"outbox_claim_idle_ms": 1})
    await asyncio.sleep(0.01)

    report = await reconcile_event(r, pg, inventory, eid, repair=False, settings=settings)
    assert kinds(report) == {
        reconcile.SOLD,
        reconcile.INVARIANT,
        reconcile.PG_COUNTER,
        reconcile.SEAT_SOLD_NOT_IN_PG,
        reconcile.ORDER_MISSING_IN_PG,
        reconcile.ORPHAN_EXPIRY,
        reconcile.HOLD_MISSING_EXPIRY,
        reconcile.HELD,
        reconcile.STALE_SEAT_HOLD,
        reconcile.OUTBOX_STUCK,
    }
    sold = {d.zone_id: (d.redis, d.expected) for d in report.drifts if d.kind == reconcile.SOLD}
    assert sold == {"floor": (6, 4), "sec-101": (2, 0)}  # 3 + 1 sold, +2 planted; the lost order's 2 seats
    assert {d.kind: d.examples for d in report.drifts}[reconcile.ORDER_MISSING_IN_PG] == [lost["order_id"]]
    assert report.outbox.in_flight_orders == 1 and report.status == "on_sale"

    fixed = await reconcile_event(r, pg, inventory, eid, repair=True, settings=settings)
    assert fixed.clean, fixed.drifts
    assert {d.kind for d in fixed.drifts_before} == kinds(report)
    assert fixed.repaired[0] == "paused the sale" and fixed.repaired[-1] == "resumed the sale"
    assert (await client.get(f"/v1/events/{eid}")).json()["status"] == "on_sale"
    # The lost order and the stuck one are in PostgreSQL; counters and seats follow the record.
    for order in (lost, unwritten):
        assert await db.get_order(pg, eid, order["order_id"]) is not None
    assert not await r.xlen(keys.outbox(eid))
    avail = await zones(client, eid)
    assert [(avail[z]["available"], avail[z]["held"], avail[z]["sold"]) for z in ("floor", "sec-101")] == [
        (94, 2, 4),
        (17, 1, 2),
    ]
    assert await pg.fetchval("SELECT sold FROM zones WHERE event_id = $1 AND zone_id = 'sec-101'", eid) == 2
    assert await seats_with(client, eid, "sold") == {"A1", "A2"} and "A9" in await seats_with(
        client, eid, "available"
    )
    assert (
        await r.zscore(keys.expiry(eid), active) is not None
        and await r.zscore(keys.expiry(eid), "h_ghost") is None
    )
    # The hold that had lost its expiry entry is still a good hold. Its order waits in the outbox (no worker
    # runs): with the 4 ms stuck threshold above, whether it counts as stuck would depend on this machine's
    # speed, so this last check uses the real threshold.
    c = await client.post(f"/v1/events/{eid}/holds/{active}/confirm", json={"payment_ref": "p"})
    assert c.status_code == 201
    monkeypatch.setattr(reconcile, "STUCK_AFTER_MIN_MS", 60_000)
    assert (await reconcile_event(r, pg, inventory, eid, repair=False, settings=settings)).clean


async def test_cli_exit_codes_and_json(scratch, capsys):
    client, inventory, pg, settings, write_through = scratch
    eid = await create(client)
    await buy(client, eid, "c-1", ga=2)
    await write_through(eid)

    async def cli(**kw) -> tuple[int, str]:
        code = await asyncio.to_thread(run_cli, settings, event_id=eid, **kw)
        return code, capsys.readouterr().out

    code, out = await cli(repair=False, as_json=True)
    body = json.loads(out)
    assert code == 0 and body["clean"] is True and body["events"][0]["event_id"] == eid
    assert body["events"][0]["zones"][0]["sold_redis"] == 2

    await inventory.client.hincrby(keys.zone(eid, "floor"), "sold", 1)
    code, out = await cli(repair=False, as_json=False)
    assert code == 1 and "sold_redis_vs_pg" in out
    code, out = await cli(repair=True, as_json=True)
    body = json.loads(out)["events"][0]
    assert code == 0 and body["clean"] and {d["kind"] for d in body["drifts_before"]} >= {"sold_redis_vs_pg"}
    assert (await zones(client, eid))["floor"]["sold"] == 2

    # A dead letter needs a person: repair leaves it, the exit stays 1, the sale is not paused for it.
    await pg.execute(
        "INSERT INTO dead_letters (event_id, order_id, entry_id, payload, reason) VALUES ($1, 'o_x', '1-0', '{}', 't')",
        eid,
    )
    code, out = await cli(repair=True, as_json=True)
    body = json.loads(out)["events"][0]
    assert (
        code == 1 and [d["kind"] for d in body["drifts"]] == ["dead_letters"] and body["status"] == "on_sale"
    )
    assert (
        await asyncio.to_thread(run_cli, settings, event_id="no-such-event", repair=False, as_json=True) == 2
    )


async def test_cron_exports_drift_and_clears_it(scratch, caplog):
    client, inventory, pg, settings, write_through = scratch
    eid = await create(client)
    await buy(client, eid, "c-1", ga=1)  # in flight
    await hold(client, eid, "c-2", ga=1)
    await inventory.client.hincrby(keys.zone(eid, "floor"), "sold", 3)
    gone = await create(client)
    await inventory.unload_event(gone)  # in PostgreSQL only: a rebuild's job, not a repair's

    ctx = {"settings": settings, "inventory": inventory, "pg": pg}
    with caplog.at_level(logging.WARNING, logger="boxoffice.reconcile"):
        await cron_reconcile(ctx)

    def gauge(name: str, **labels) -> float | None:
        return REGISTRY.get_sample_value(name, {"event_id": eid, **labels})

    assert gauge("boxoffice_reconcile_drift", kind="sold_redis_vs_pg") == 3
    assert gauge("boxoffice_reconcile_drift", kind="orphan_expiry") == 0
    assert (
        gauge("boxoffice_active_holds"),
        gauge("boxoffice_outbox_length"),
        gauge("boxoffice_outbox_pending"),
    ) == (1, 1, 0)
    assert (
        REGISTRY.get_sample_value(
            "boxoffice_reconcile_drift", {"event_id": gone, "kind": "event_missing_in_redis"}
        )
        == 1
    )
    assert any(eid in rec.getMessage() and "sold_redis_vs_pg" in rec.getMessage() for rec in caplog.records)

    report = await reconcile_event(inventory.client, pg, inventory, gone, repair=True, settings=settings)
    assert kinds(report) == {reconcile.EVENT_MISSING_IN_REDIS} and not report.repaired
    assert (await reconcile_event(inventory.client, pg, inventory, eid, repair=True, settings=settings)).clean
    await cron_reconcile(ctx)
    assert gauge("boxoffice_reconcile_drift", kind="sold_redis_vs_pg") == 0


async def test_no_false_drift_while_selling(scratch):
    """Holds, confirms, releases, expiries and the write-through run while we reconcile: never a drift."""
    client, inventory, pg, settings, write_through = scratch
    eid = await create(client, max_tickets_per_customer=1000, hold_ttl_seconds=1)
    labels = [f"{row}{n}" for row in "AB" for n in range(1, 11)]
    consumer = OutboxConsumer(
        inventory.client,
        pg,
        settings.model_copy(update={"outbox_batch_size": 10, "outbox_poll_interval_seconds": 0.001}),
        name="w",
    )
    stop = asyncio.Event()

    async def buyer(k: int) -> None:
        rnd = random.Random(k)
        while not stop.is_set():
            items = [{"zone_id": "floor", "quantity": 1}] + (
                [{"zone_id": "sec-101", "seats": [rnd.choice(labels)]}] if rnd.random() < 0.3 else []
            )
            req = HoldRequest.model_validate({"customer_id": f"c{k}", "items": items, "ttl_seconds": 1})
            try:
                h, _ = await inventory.hold(eid, req)
                if rnd.random() < 0.5:
                    await inventory.confirm(eid, h["hold_id"], "p")
                elif rnd.random() < 0.5:
                    await inventory.release(eid, h["hold_id"])
            except DomainError:
                await asyncio.sleep(0.01)  # sold out: the floor has 100

    tasks = [asyncio.create_task(buyer(k)) for k in range(8)]
    tasks.append(asyncio.create_task(consumer.run_forever(stop)))
    reports = []
    try:
        deadline = asyncio.get_running_loop().time() + 2.0
        while asyncio.get_running_loop().time() < deadline:
            reports.append(
                await reconcile_event(inventory.client, pg, inventory, eid, repair=False, settings=settings)
            )
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert [r.drifts for r in reports if r.drifts] == []
    assert any(r.outbox.in_flight_orders for r in reports) and any(r.active_holds for r in reports)
    await write_through(eid)
    assert (
        await reconcile_event(inventory.client, pg, inventory, eid, repair=False, settings=settings)
    ).clean


async def dead_lettered_sale(client, inventory, pg, write_through, eid: str, zone: str, **bought) -> dict:
    """A valid sale PostgreSQL refuses: ``zones.sold`` of ``zone`` is set to its capacity behind the scripts'
    back (drift a repair fixes), so the write-through hits the zone_not_oversold CHECK. Returns the order."""
    await pg.execute("UPDATE zones SET sold = capacity WHERE event_id = $1 AND zone_id = $2", eid, zone)
    order = await buy(client, eid, "c-dead", **bought)  # a 201 to the customer
    await write_through(eid)
    assert await db.get_order(pg, eid, order["order_id"]) is None
    reason = await pg.fetchval("SELECT reason FROM dead_letters WHERE order_id = $1", order["order_id"])
    assert "zone_not_oversold" in reason
    return order


async def test_repair_keeps_a_dead_lettered_seat_sold(scratch):
    """A dead letter is for a person to decide (refund or re-seat): a repair keeps its seat owned by the
    order and its ticket sold, so nobody else can buy that seat meanwhile."""
    client, inventory, pg, settings, write_through = scratch
    r = inventory.client
    eid = await create(client)
    await buy(client, eid, "c-1", seats=["A2"])
    await write_through(eid)
    order = await dead_lettered_sale(client, inventory, pg, write_through, eid, "sec-101", seats=["A1"])

    report = await reconcile_event(r, pg, inventory, eid, repair=False, settings=settings)
    assert kinds(report) == {reconcile.PG_COUNTER, reconcile.DEAD_LETTERS}  # Redis is right about A1
    assert {z.zone_id: z.dead_lettered for z in report.zones} == {"floor": 0, "sec-101": 1}

    fixed = await reconcile_event(r, pg, inventory, eid, repair=True, settings=settings)
    assert [d.kind for d in fixed.drifts] == [reconcile.DEAD_LETTERS]
    assert {d.kind: d.examples for d in fixed.drifts}[reconcile.DEAD_LETTERS] == [order["order_id"]]
    assert await pg.fetchval("SELECT sold FROM zones WHERE event_id = $1 AND zone_id = 'sec-101'", eid) == 1
    assert await r.hget(keys.owners(eid, "sec-101"), "A1") == f"s:{order['order_id']}".encode()
    sec = (await zones(client, eid))["sec-101"]
    assert (sec["available"], sec["held"], sec["sold"]) == (18, 0, 2)
    assert await seats_with(client, eid, "sold") == {"A1", "A2"}
    taken = await hold(client, eid, "c-2", seats=["A1"])
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "seats_unavailable"
    # Repairing again changes nothing for it.
    again = await reconcile_event(r, pg, inventory, eid, repair=True, settings=settings)
    assert [d.kind for d in again.drifts] == [reconcile.DEAD_LETTERS] and not again.repaired


async def test_repair_keeps_dead_lettered_tickets_sold(scratch):
    """The general-admission variant: the order's tickets stay sold as long as its dead letter is there; once
    it is gone (refunded, row deleted) and so is its hold record, a repair gives them back."""
    client, inventory, pg, settings, write_through = scratch
    r = inventory.client
    body_zones = [
        {"zone_id": "floor", "kind": "ga", "capacity": 4, "price_cents": 9900},
        {"zone_id": "sec-101", "kind": "seated", "price_cents": 15900, "rows": {"A": 2}},
    ]
    eid = await create(client, zones=body_zones)
    await buy(client, eid, "c-1", ga=1)
    await write_through(eid)
    order = await dead_lettered_sale(client, inventory, pg, write_through, eid, "floor", ga=2)

    fixed = await reconcile_event(r, pg, inventory, eid, repair=True, settings=settings)
    assert [d.kind for d in fixed.drifts] == [reconcile.DEAD_LETTERS] and fixed.status == "on_sale"
    assert {d.kind for d in fixed.drifts_before} == {reconcile.PG_COUNTER, reconcile.DEAD_LETTERS}
    floor = (await zones(client, eid))["floor"]
    assert (floor["available"], floor["held"], floor["sold"]) == (1, 0, 3)
    too_many = await hold(client, eid, "c-2", ga=2)
    assert too_many.status_code == 409 and too_many.json()["error"]["code"] == "sold_out"

    # Refunded: its row deleted, its hold record gone (while that lives, a repair re-queues the order instead:
    # a confirmed hold whose order is nowhere is order_missing_in_pg).
    await pg.execute("DELETE FROM dead_letters WHERE order_id = $1", order["order_id"])
    await r.delete(keys.hold(eid, order["hold_id"]), keys.order(eid, order["order_id"]))
    assert (await reconcile_event(r, pg, inventory, eid, repair=True, settings=settings)).clean
    floor = (await zones(client, eid))["floor"]
    assert (floor["available"], floor["sold"]) == (3, 1)


async def test_a_poison_outbox_entry_does_not_break_the_check_and_a_repair_dead_letters_it(scratch):
    """An outbox entry with an order id PostgreSQL cannot hold (a NUL: only a bug or a hand-made XADD makes
    one) must not make the check's PostgreSQL read fail; a repair re-drives it into dead_letters."""
    client, inventory, pg, settings, write_through = scratch
    r = inventory.client
    eid = await create(client)
    good = await buy(client, eid, "c-1", ga=1)
    [(_, order)] = [(i, json.loads(f[b"order"])) for i, f in await r.xrange(keys.outbox(eid))]
    poison = {**order, "order_id": "o_bad\x00id", "hold_id": "h_poison"}
    await r.xadd(keys.outbox(eid), {"order": json.dumps(poison)})

    report = await reconcile_event(r, pg, inventory, eid, repair=False, settings=settings)
    assert report.outbox.length == 2

    fixed = await reconcile_event(r, pg, inventory, eid, repair=True, settings=settings)
    assert kinds(fixed) <= {reconcile.DEAD_LETTERS, reconcile.SOLD}, fixed.drifts
    assert await db.get_order(pg, eid, good["order_id"]) is not None
    assert await r.xlen(keys.outbox(eid)) == 0
    assert await pg.fetchval("SELECT count(*) FROM dead_letters WHERE event_id = $1", eid) == 1


async def test_rebuild_keeps_dead_lettered_stock_sold(scratch):
    """After Redis lost the event, a rebuild from PostgreSQL must not put a dead-lettered order's seat and
    tickets back on sale either: a person decides about them, as with a repair."""
    client, inventory, pg, settings, write_through = scratch
    r = inventory.client
    eid = await create(client)
    await buy(client, eid, "c-1", ga=1, seats=["A2"])
    await write_through(eid)
    seat_order = await dead_lettered_sale(client, inventory, pg, write_through, eid, "sec-101", seats=["A1"])
    ga_order = await dead_lettered_sale(client, inventory, pg, write_through, eid, "floor", ga=2)
    await pg.execute(
        "UPDATE zones SET sold = 1 WHERE event_id = $1", eid
    )  # the drift that caused them, fixed

    await r.flushall()
    await rebuild_event(inventory, pg, eid, resume=True)

    assert await r.hget(keys.owners(eid, "sec-101"), "A1") == f"s:{seat_order['order_id']}".encode()
    by_zone = await zones(client, eid)
    assert (by_zone["sec-101"]["sold"], by_zone["floor"]["sold"]) == (2, 3)
    for z in by_zone.values():
        assert z["held"] == 0 and z["available"] == z["capacity"] - z["sold"]
    taken = await hold(client, eid, "c-2", seats=["A1"])
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "seats_unavailable"
    report = await reconcile_event(r, pg, inventory, eid, repair=False, settings=settings)
    assert kinds(report) == {reconcile.DEAD_LETTERS}, report.drifts
    assert sorted({d.kind: d.examples for d in report.drifts}[reconcile.DEAD_LETTERS]) == sorted(
        [seat_order["order_id"], ga_order["order_id"]]
    )


async def test_a_dead_letter_for_a_seat_sold_twice_keeps_nothing(scratch):
    """PostgreSQL refused a second order for a seat it had sold (the unique index): that dead order has no
    seat to keep, so neither its seat nor its ticket counts, in a repair or a rebuild. (Counting the ticket
    left more free seats than 'available', and selling them drove it below zero.)"""
    client, inventory, pg, settings, write_through = scratch
    r = inventory.client
    eid = await create(client)
    await buy(client, eid, "c-1", seats=["A1"])
    await write_through(eid)
    await buy(client, eid, "c-2", seats=["A2"])
    [(_, fields)] = await r.xrange(keys.outbox(eid))
    forged = {**json.loads(fields[b"order"]), "order_id": "o_forged", "hold_id": "h_forged"}
    forged["items"] = [{"zone_id": "sec-101", "seats": ["A1"]}]
    await r.xadd(keys.outbox(eid), {"order": json.dumps(forged)})
    await write_through(eid)
    assert await pg.fetchval("SELECT count(*) FROM dead_letters WHERE order_id = 'o_forged'") == 1

    for step in ("repair", "rebuild"):
        if step == "rebuild":
            await r.flushall()
            await rebuild_event(inventory, pg, eid, resume=True)
        report = await reconcile_event(r, pg, inventory, eid, repair=step == "repair", settings=settings)
        assert kinds(report) == {reconcile.DEAD_LETTERS}, (step, report.drifts)
        assert {z.zone_id: z.dead_lettered for z in report.zones} == {"floor": 0, "sec-101": 0}
        sec = (await zones(client, eid))["sec-101"]
        assert (sec["available"], sec["held"], sec["sold"]) == (18, 0, 2), step
        assert await r.hget(keys.owners(eid, "sec-101"), "A1") != b"s:o_forged"


# A partial Redis loss: Redis comes back from a snapshot older than some confirms PostgreSQL already has.


async def snapshot(r, eid: str) -> list[tuple[bytes, int, bytes]]:
    """The event's keys as an RDB taken now would bring them back: (key, TTL in ms or 0, DUMP)."""
    return [
        (k, max(await r.pttl(k), 0), await r.dump(k)) async for k in r.scan_iter(match=keys.prefix(eid) + "*")
    ]


async def restart_from(r, eid: str, snap: list[tuple[bytes, int, bytes]]) -> None:
    """Redis restarts from ``snap``: the event's keys are what they were then, whatever was written since is gone."""
    await r.delete(*[k async for k in r.scan_iter(match=keys.prefix(eid) + "*")])
    for k, ttl, dump in snap:
        await r.restore(k, ttl, dump)


async def hold_of(client, eid: str, hold_id: str) -> dict:
    r = await client.get(f"/v1/events/{eid}/holds/{hold_id}")
    assert r.status_code == 200, r.text
    return r.json()


async def confirm_again(client, eid: str, order: dict) -> None:
    """The buyer's client retries its confirm (repeat-safe): 200 with the order it had, nothing new to write."""
    r = await client.post(f"/v1/events/{eid}/holds/{order['hold_id']}/confirm", json={"payment_ref": "pay"})
    assert (r.status_code, r.json()["order_id"]) == (200, order["order_id"]), r.text


async def test_repair_confirms_again_the_holds_whose_confirm_redis_lost(scratch):
    """Holds active in the snapshot, confirmed and written through after it: the repair confirms them again
    with their PostgreSQL orders (neither held nor released), and the buyers' retries get those orders."""
    client, inventory, pg, settings, write_through = scratch
    r = inventory.client
    eid = await create(client)
    kept = await buy(client, eid, "c-1", ga=3, seats=["A1"])
    await write_through(eid)
    ga = (await hold(client, eid, "c-2", ga=2)).json()["hold_id"]
    seat = (await hold(client, eid, "c-3", seats=["A2", "A3"])).json()["hold_id"]
    active = (await hold(client, eid, "c-4", ga=1, seats=["B1"])).json()["hold_id"]
    snap = await snapshot(r, eid)
    orders = []
    for h in (ga, seat):
        c = await client.post(f"/v1/events/{eid}/holds/{h}/confirm", json={"payment_ref": "pay"})
        assert c.status_code == 201
        orders.append(c.json())
    await write_through(eid)
    await restart_from(r, eid, snap)

    report = await reconcile_event(r, pg, inventory, eid, repair=False, settings=settings)
    lost = next(d for d in report.drifts if d.kind == reconcile.HOLD_CONFIRMED_NOT_IN_REDIS)
    assert lost.count == 2 and sorted(lost.examples) == sorted(
        f"{o['hold_id']}: active in Redis, order {o['order_id']} in PostgreSQL" for o in orders
    )

    fixed = await reconcile_event(r, pg, inventory, eid, repair=True, settings=settings)
    assert fixed.clean, fixed.drifts
    assert reconcile.HOLD_CONFIRMED_NOT_IN_REDIS in {d.kind for d in fixed.drifts_before}
    assert fixed.repaired[-1] == "resumed the sale" and fixed.status == "on_sale"
    for o in orders:
        h = await hold_of(client, eid, o["hold_id"])
        assert (h["status"], h["order_id"]) == ("confirmed", o["order_id"])
        assert await r.get(keys.order(eid, o["order_id"])) == o["hold_id"].encode()
    assert (await hold_of(client, eid, active))["status"] == "active"
    # Sold = PostgreSQL's orders; held = the one truly active hold; nothing counted twice.
    avail = await zones(client, eid)
    assert [(avail[z]["available"], avail[z]["held"], avail[z]["sold"]) for z in ("floor", "sec-101")] == [
        (94, 1, 5),
        (16, 1, 3),
    ]
    assert await seats_with(client, eid, "sold") == {"A1", "A2", "A3"}
    assert await r.hget(keys.owners(eid, "sec-101"), "A2") == f"s:{orders[1]['order_id']}".encode()
    assert await r.hgetall(keys.customers(eid)) == {b"c-1": b"4", b"c-2": b"2", b"c-3": b"2", b"c-4": b"2"}

    for o in orders:
        await confirm_again(client, eid, o)
    assert await r.xlen(keys.outbox(eid)) == 0
    await write_through(eid)
    assert await pg.fetchval("SELECT count(*) FROM dead_letters WHERE event_id = $1", eid) == 0
    assert await db.get_order(pg, eid, kept["order_id"]) is not None
    assert (await reconcile_event(r, pg, inventory, eid, repair=False, settings=settings)).clean


async def test_repair_confirms_again_a_hold_that_expired_after_the_loss(scratch):
    """The lost confirm's hold came back active with little time left, expired (its stock and customer count
    given back), and another customer held its seat: the repair takes all of that back for the order."""
    client, inventory, pg, settings, write_through = scratch
    r = inventory.client
    eid = await create(client)
    await buy(client, eid, "c-1", ga=1)
    await write_through(eid)
    body = {"customer_id": "c-2", "ttl_seconds": 1, "items": [{"zone_id": "floor", "quantity": 2}]}
    body["items"].append({"zone_id": "sec-101", "seats": ["A5"]})
    short = (await client.post(f"/v1/events/{eid}/holds", json=body)).json()["hold_id"]
    snap = await snapshot(r, eid)
    c = await client.post(f"/v1/events/{eid}/holds/{short}/confirm", json={"payment_ref": "pay"})
    assert c.status_code == 201
    order = c.json()
    await write_through(eid)
    await restart_from(r, eid, snap)
    await asyncio.sleep(1.1)
    assert (await hold_of(client, eid, short))["status"] == "expired"
    taker = await hold(client, eid, "c-5", seats=["A5"])  # A5 looks free in Redis
    assert taker.status_code == 201

    report = await reconcile_event(r, pg, inventory, eid, repair=False, settings=settings)
    assert {d.kind: d.examples for d in report.drifts}[reconcile.HOLD_CONFIRMED_NOT_IN_REDIS] == [
        f"{short}: expired in Redis, order {order['order_id']} in PostgreSQL"
    ]
    fixed = await reconcile_event(r, pg, inventory, eid, repair=True, settings=settings)
    assert fixed.clean, fixed.drifts
    h = await hold_of(client, eid, short)
    assert (h["status"], h["order_id"]) == ("confirmed", order["order_id"])
    assert (await hold_of(client, eid, taker.json()["hold_id"]))["status"] == "released"
    avail = await zones(client, eid)
    assert [(avail[z]["available"], avail[z]["held"], avail[z]["sold"]) for z in ("floor", "sec-101")] == [
        (97, 0, 3),
        (19, 0, 1),
    ]
    assert await r.hget(keys.owners(eid, "sec-101"), "A5") == f"s:{order['order_id']}".encode()
    assert await r.hgetall(keys.customers(eid)) == {b"c-1": b"1", b"c-2": b"3"}
    await confirm_again(client, eid, order)
    await write_through(eid)
    assert await pg.fetchval("SELECT count(*) FROM dead_letters WHERE event_id = $1", eid) == 0
    assert (await reconcile_event(r, pg, inventory, eid, repair=False, settings=settings)).clean


@pytest.mark.parametrize("kind", ["seat", "ga"])
async def test_repair_puts_back_the_order_postgresql_has_over_a_second_confirm(scratch, kind):
    """The buyer retried before the repair: Redis confirmed the hold again with a second order, which
    PostgreSQL refused (one order per hold). The repair confirms the hold with the order PostgreSQL has; the
    dead letter stays for a person, and keeps no stock: its seat or its general-admission tickets are the first
    order's, sold once (before, the GA ones were counted sold twice)."""
    client, inventory, pg, settings, write_through = scratch
    r = inventory.client
    eid = await create(client)
    if kind == "seat":
        h = (await hold(client, eid, "c-6", seats=["A7"])).json()["hold_id"]
    else:
        h = (await hold(client, eid, "c-6", ga=3)).json()["hold_id"]
    snap = await snapshot(r, eid)
    first = (await client.post(f"/v1/events/{eid}/holds/{h}/confirm", json={"payment_ref": "pay"})).json()
    await write_through(eid)
    await restart_from(r, eid, snap)
    c = await client.post(f"/v1/events/{eid}/holds/{h}/confirm", json={"payment_ref": "pay"})
    assert c.status_code == 201 and (second := c.json()["order_id"]) != first["order_id"]
    await write_through(eid)
    assert "orders_hold_id_key" in await pg.fetchval(
        "SELECT reason FROM dead_letters WHERE order_id = $1", second
    )

    report = await reconcile_event(r, pg, inventory, eid, repair=False, settings=settings)
    assert {d.kind: d.examples for d in report.drifts}[reconcile.HOLD_CONFIRMED_NOT_IN_REDIS] == [
        f"{h}: confirmed with order {second} in Redis, order {first['order_id']} in PostgreSQL"
    ]
    fixed = await reconcile_event(r, pg, inventory, eid, repair=True, settings=settings)
    assert kinds(fixed) == {reconcile.DEAD_LETTERS} and fixed.status == "on_sale", fixed.drifts
    assert (await hold_of(client, eid, h))["order_id"] == first["order_id"]
    assert await r.get(keys.order(eid, second)) is None
    if kind == "seat":
        assert await r.hget(keys.owners(eid, "sec-101"), "A7") == f"s:{first['order_id']}".encode()
        sec = (await zones(client, eid))["sec-101"]
        assert (sec["available"], sec["held"], sec["sold"]) == (19, 0, 1)
    else:
        floor = (await zones(client, eid))["floor"]
        assert (floor["available"], floor["held"], floor["sold"]) == (97, 0, 3)
        assert await pg.fetchval("SELECT sold FROM zones WHERE event_id = $1 AND zone_id = 'floor'", eid) == 3
    await confirm_again(client, eid, first)
    await write_through(eid)
    assert await pg.fetchval("SELECT count(*) FROM dead_letters WHERE event_id = $1", eid) == 1
    again = await reconcile_event(r, pg, inventory, eid, repair=False, settings=settings)
    assert kinds(again) == {reconcile.DEAD_LETTERS}, again.drifts


async def test_restoring_a_lost_confirm_takes_its_seats_from_holds_made_after_the_check(scratch):
    """Between the check and the repair, a customer holds a seat of the lost confirm's order (free in Redis:
    its hold had expired) and another seat carries a stale mark: the restore releases that hold and
    overwrites the mark, so the seats are the order's and nobody can confirm a second sale of them."""
    client, inventory, pg, settings, write_through = scratch
    r = inventory.client
    eid = await create(client)
    body = {"customer_id": "c-2", "ttl_seconds": 1, "items": [{"zone_id": "sec-101", "seats": ["A5", "A6"]}]}
    short = (await client.post(f"/v1/events/{eid}/holds", json=body)).json()["hold_id"]
    snap = await snapshot(r, eid)
    order = (await client.post(f"/v1/events/{eid}/holds/{short}/confirm", json={"payment_ref": "pay"})).json()
    await write_through(eid)
    await restart_from(r, eid, snap)
    await asyncio.sleep(1.1)
    await inventory.reap(eid)

    report, findings = await reconcile._check(r, pg, eid, settings)
    assert findings.lost_confirms == {short: order["order_id"]} and not findings.conflicting_holds
    taker = (await hold(client, eid, "c-5", seats=["A5"])).json()["hold_id"]
    await r.hset(keys.owners(eid, "sec-101"), "A6", "h:h_stale")
    await reconcile._repair(r, pg, inventory, eid, settings, report, findings)

    assert (await hold_of(client, eid, short))["status"] == "confirmed"
    assert (await hold_of(client, eid, taker))["status"] == "released"
    owners = await r.hgetall(keys.owners(eid, "sec-101"))
    assert owners == {b"A5": f"s:{order['order_id']}".encode(), b"A6": f"s:{order['order_id']}".encode()}
    sec = (await zones(client, eid))["sec-101"]
    assert (sec["available"], sec["held"], sec["sold"]) == (18, 0, 2)
    assert await r.hgetall(keys.customers(eid)) == {b"c-2": b"2"}
    assert (await reconcile_event(r, pg, inventory, eid, repair=False, settings=settings)).clean


async def test_an_operators_pause_during_a_repair_is_applied_after_it(scratch, monkeypatch):
    """A repair pauses the sale, repairs, and resumes it: an operator's pause sent meanwhile waits for the
    repair and stays. Before, the repair's resume undid it (both stores on sale, report 'resumed the sale')."""
    from service import catalog

    client, inventory, pg, settings, write_through = scratch
    r = inventory.client
    eid = await create(client)
    await buy(client, eid, "c-1", ga=2)
    await write_through(eid)
    await r.hincrby(keys.zone(eid, "floor"), "sold", 2)  # drift a repair fixes
    real_repair = reconcile._repair

    async def slow_repair(*args, **kwargs):
        await asyncio.sleep(0.4)
        return await real_repair(*args, **kwargs)

    monkeypatch.setattr(reconcile, "_repair", slow_repair)
    repairing = asyncio.create_task(reconcile_event(r, pg, inventory, eid, repair=True, settings=settings))
    await asyncio.sleep(0.2)
    await catalog.set_status(pg, inventory, eid, "paused")  # waits for the repair
    report = await repairing
    assert "resumed the sale" in report.repaired and not report.drifts
    assert (await r.hget(keys.meta(eid), "status")) == b"paused"
    assert await pg.fetchval("SELECT status FROM events WHERE event_id = $1", eid) == "paused"


async def test_an_operators_pause_during_a_rebuild_with_resume_is_applied_after_it(scratch, monkeypatch):
    from service import catalog

    client, inventory, pg, settings, write_through = scratch
    eid = await create(client)
    await inventory.unload_event(eid)  # Redis lost it
    real_load = inventory.load_event

    async def slow_load(*args, **kwargs):
        await real_load(*args, **kwargs)
        await asyncio.sleep(0.4)

    monkeypatch.setattr(inventory, "load_event", slow_load)
    rebuilding = asyncio.create_task(rebuild_event(inventory, pg, eid, resume=True))
    await asyncio.sleep(0.2)
    await catalog.set_status(pg, inventory, eid, "paused")  # waits for the rebuild
    assert (await rebuilding).status == "on_sale"
    assert (await inventory.client.hget(keys.meta(eid), "status")) == b"paused"
    assert await pg.fetchval("SELECT status FROM events WHERE event_id = $1", eid) == "paused"


async def test_a_dead_letter_keeps_its_stock_unless_its_own_event_has_an_order_of_its_hold(scratch):
    """The rule of 5683ec9 (a second order of a hold that has one in PostgreSQL keeps nothing) looks only in
    the dead letter's own event: a payload naming another event's hold still keeps its tickets sold."""
    client, inventory, pg, settings, write_through = scratch
    other = await create(client)
    order = await buy(client, other, "c-1", ga=1)
    await write_through(other)
    eid = await create(client)
    payload = {
        "order_id": "o_forged",
        "hold_id": order["hold_id"],
        "event_id": eid,
        "confirmed_at_ms": 1,
        "items": [{"zone_id": "floor", "quantity": 4}],
    }
    await pg.execute(
        "INSERT INTO dead_letters (event_id, order_id, entry_id, payload, reason) VALUES ($1, $2, $3, $4, $5)",
        eid,
        "o_forged",
        "1-1",
        json.dumps(payload),
        "test",
    )
    assert [(o.order_id, o.ga) for o in await db.dead_orders(pg, eid)] == [("o_forged", {"floor": 4})]


async def test_cli_repair_of_an_event_busy_elsewhere_says_so_and_repairs_the_others(
    scratch, capsys, monkeypatch
):
    """An event another change holds (a create, pause, rebuild, repair) is reported busy, exit 1, and the run
    goes on with the other events. Before, event_busy came out as 'no such event' (exit 2) and stopped the run."""
    from service import catalog

    client, inventory, pg, settings, write_through = scratch
    held, free = await create(client), await create(client)
    for eid in (held, free):
        await inventory.client.hincrby(keys.zone(eid, "floor"), "sold", 1)
    monkeypatch.setattr(reconcile, "REPAIR_LOCK_WAIT_SECONDS", 0.3)
    ids = [held, free]
    monkeypatch.setattr(reconcile, "all_event_ids", lambda *a: asyncio.sleep(0, result=ids))
    key = catalog.CATALOG_LOCK.format(held)
    async with pg.acquire() as other:
        await other.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", key)
        try:
            code = await asyncio.to_thread(run_cli, settings, event_id=None, repair=True, as_json=True)
        finally:
            await other.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", key)
    body = json.loads(capsys.readouterr().out)
    assert code == 1 and body["busy"] == [held] and not body["clean"]
    assert [e["event_id"] for e in body["events"]] == [free] and body["events"][0]["clean"]
    assert (await zones(client, free))["floor"]["sold"] == 0
    assert (await zones(client, held))["floor"]["sold"] == 1  # not repaired: run again
