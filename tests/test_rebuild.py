"""Rebuilding Redis from PostgreSQL after Redis lost its data (FLUSHALL on a throw-away redis-server).

The throw-away server fixtures here are imported by tests/test_reconcile.py too.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from conftest import ADMIN, event_body, running_app

from service import db, keys
from service.errors import DomainError
from service.inventory import Inventory
from service.rebuild import REBUILD_LOCK, STEPS, rebuild_event, run_cli
from service.settings import Settings
from workers.outbox import OutboxConsumer
from workers.reconcile import reconcile_event


@pytest.fixture(scope="module")
def scratch_settings(private_redis_url, database_url) -> Settings:
    return Settings(redis_url=private_redis_url, database_url=database_url, admin_token="test-admin-token")


@pytest.fixture(scope="module")
async def scratch_app_and_client(scratch_settings):
    async with running_app(scratch_settings) as pair:
        yield pair


@pytest.fixture(scope="module")
def scratch(scratch_app_and_client, scratch_settings):
    """(http client, Inventory, asyncpg pool, settings, write_through(event_id)) on the throw-away Redis."""
    scratch_app, scratch_client = scratch_app_and_client
    inventory: Inventory = scratch_app.state.inventory
    consumer = OutboxConsumer(inventory.client, scratch_app.state.pg, scratch_settings, name="test-writer")

    async def write_through(event_id: str) -> None:
        """Run the worker's consumer until the event's outbox is empty (the write-through, for real)."""
        for _ in range(20):
            await consumer.run_once([event_id])
            if not await inventory.client.xlen(keys.outbox(event_id)):
                return
        raise AssertionError("outbox did not drain")

    return scratch_client, inventory, scratch_app.state.pg, scratch_settings, write_through


async def create(client, **overrides) -> str:
    body = event_body(**overrides)
    r = await client.post("/v1/events", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    return body["event_id"]


async def hold(
    client,
    event_id: str,
    customer: str,
    ga: int = 0,
    seats: list[str] | None = None,
    zone_ga: str = "floor",
    zone_seats: str = "sec-101",
) -> httpx.Response:
    items = ([{"zone_id": zone_ga, "quantity": ga}] if ga else []) + (
        [{"zone_id": zone_seats, "seats": seats}] if seats else []
    )
    return await client.post(f"/v1/events/{event_id}/holds", json={"customer_id": customer, "items": items})


async def buy(client, event_id: str, customer: str, ga: int = 0, seats: list[str] | None = None) -> dict:
    r = await hold(client, event_id, customer, ga, seats)
    assert r.status_code == 201, r.text
    r = await client.post(
        f"/v1/events/{event_id}/holds/{r.json()['hold_id']}/confirm", json={"payment_ref": "pay"}
    )
    assert r.status_code == 201, r.text
    return r.json()


async def zones(client, event_id: str) -> dict[str, dict]:
    r = await client.get(f"/v1/events/{event_id}/availability")
    assert r.status_code == 200, r.text
    return {z["zone_id"]: z for z in r.json()["zones"]}


async def seats_with(client, event_id: str, status: str, zone: str = "sec-101") -> set[str]:
    r = await client.get(
        f"/v1/events/{event_id}/zones/{zone}/seats", params={"status": status, "limit": 1000}
    )
    assert r.status_code == 200, r.text
    return {s["seat"] for s in r.json()["seats"]}


# Tests -------------------------------------------------------------------------------------------


async def test_rebuild_after_flushall(scratch):
    client, inventory, pg, settings, write_through = scratch
    eid = await create(client, max_tickets_per_customer=8)  # floor: ga 100; sec-101: A1..A10, B1..B10
    first = await buy(client, eid, "c-1", ga=3, seats=["A1", "A2"])
    second = await buy(client, eid, "c-2", ga=2)
    await write_through(eid)
    r = await hold(client, eid, "c-3", ga=4, seats=["B1"])  # a hold only Redis knows
    assert r.status_code == 201
    old_hold = r.json()["hold_id"]
    released = (await hold(client, eid, "c-4", ga=1)).json()["hold_id"]
    assert (await client.post(f"/v1/events/{eid}/holds/{released}/release")).status_code == 200
    unwritten = await buy(client, eid, "c-5", seats=["B2"])  # confirmed, still in the outbox

    await inventory.client.flushall()
    r = await client.get(f"/v1/events/{eid}/availability")
    assert r.status_code == 404 and r.json()["error"]["code"] == "event_not_found"

    steps: list[tuple[str, int, int]] = []
    result = await rebuild_event(inventory, pg, eid, resume=False, progress=lambda *a: steps.append(a))
    assert steps[-1][1:] == (STEPS, STEPS) and [s[1] for s in steps] == sorted(s[1] for s in steps)
    assert (result.orders, result.sold_tickets, result.sold_seats, result.status) == (2, 7, 2, "paused")

    # Nothing sold twice, every persisted order counts: Redis now says what PostgreSQL says.
    pg_sold = await db.sold_by_zone(pg, eid)
    avail = await zones(client, eid)
    assert {z: avail[z]["sold"] for z in avail} == {"floor": 5, "sec-101": 2} == {**{"sec-101": 0}, **pg_sold}
    for z in avail.values():
        assert z["held"] == 0 and z["available"] == z["capacity"] - z["sold"]
    assert (
        await seats_with(client, eid, "sold")
        == set((await db.sold_seats(pg, eid))["sec-101"])
        == {"A1", "A2"}
    )
    for order in (first, second):
        r = await client.get(f"/v1/events/{eid}/orders/{order['order_id']}")
        assert r.status_code == 200 and r.json()["persisted"] is True

    # The Redis-only hold is gone: 404 on confirm, its stock (4 GA + B1) is available again.
    r = await client.post(f"/v1/events/{eid}/holds/{old_hold}/confirm", json={"payment_ref": "late"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "hold_not_found"
    assert avail["floor"]["available"] == 95 and "B1" in await seats_with(client, eid, "available")
    # The order that was only in the outbox is lost with it (what AOF everysec risks; see service/rebuild.py).
    r = await client.get(f"/v1/events/{eid}/orders/{unwritten['order_id']}")
    assert r.status_code == 404 and "B2" in await seats_with(client, eid, "available")

    # Paused until resumed; then sold seats stay sold and per-customer counts survived.
    assert (await client.get(f"/v1/events/{eid}")).json()["status"] == "paused"
    assert (await hold(client, eid, "c-9", ga=1)).json()["error"]["code"] == "sale_paused"
    assert (await client.post(f"/v1/events/{eid}/resume", headers=ADMIN)).status_code == 200
    assert (await hold(client, eid, "c-9", seats=["A1"])).json()["error"]["code"] == "seats_unavailable"
    assert (await hold(client, eid, "c-1", ga=4)).json()["error"]["code"] == "limit_exceeded"  # 5 + 4 > 8
    assert (await hold(client, eid, "c-9", ga=4, seats=["B1", "B2"])).status_code == 201
    report = await reconcile_event(inventory.client, pg, inventory, eid, repair=False, settings=settings)
    assert report.clean, report.drifts

    # A live event is never rebuilt over.
    with pytest.raises(DomainError) as exc:
        await rebuild_event(inventory, pg, eid, resume=False)
    assert exc.value.code == "event_exists"


async def test_rebuild_writes_a_surviving_outbox_through_first(scratch):
    """Only the catalog keys were lost (not a FLUSHALL): the outbox's order is persisted, then counted."""
    client, inventory, pg, settings, write_through = scratch
    eid = await create(client)
    order = await buy(client, eid, "c-1", ga=2, seats=["A5"])
    lost = [
        k async for k in inventory.client.scan_iter(match=keys.prefix(eid) + "*") if not k.endswith(b"outbox")
    ]
    await inventory.client.delete(*lost)
    result = await rebuild_event(inventory, pg, eid, resume=True)
    assert (result.outbox_written, result.status) == (1, "on_sale")
    assert await db.get_order(pg, eid, order["order_id"]) is not None
    avail = await zones(client, eid)
    assert (avail["floor"]["sold"], avail["sec-101"]["sold"]) == (2, 1)
    assert await seats_with(client, eid, "sold") == {"A5"}
    assert not await inventory.client.xlen(keys.outbox(eid))


async def test_rebuild_cli(scratch, capsys):
    client, inventory, pg, settings, write_through = scratch
    eid = await create(client)
    await buy(client, eid, "c-1", ga=1)
    await write_through(eid)
    await inventory.client.flushall()
    assert await asyncio.to_thread(run_cli, settings, event_id=eid, resume=True) == 0
    assert eid in capsys.readouterr().out
    assert (await client.get(f"/v1/events/{eid}")).json()["status"] == "on_sale"
    assert (await zones(client, eid))["floor"]["sold"] == 1
    # Again: the event is live now, so a rebuild of it is refused (exit 1); an unknown event exits 2.
    assert await asyncio.to_thread(run_cli, settings, event_id=eid, resume=False) == 1
    assert await asyncio.to_thread(run_cli, settings, event_id="no-such-event", resume=False) == 2


async def test_two_rebuilds_of_one_event_at_once(scratch):
    """The second of two overlapping rebuilds must not unload the event the first one loaded (and resumed),
    nor load its own older reading over the sales made since: one of them refuses."""
    client, inventory, pg, settings, write_through = scratch
    eid = await create(client)
    await buy(client, eid, "c-1", ga=2, seats=["A1"])
    await write_through(eid)
    await inventory.unload_event(eid)  # Redis lost the event

    results = await asyncio.gather(
        *(rebuild_event(inventory, pg, eid, resume=True) for _ in range(2)), return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, DomainError)]
    assert len(refused) == 1 and refused[0].code == "event_exists", results
    assert sum(1 for r in results if not isinstance(r, BaseException)) == 1

    # The sale goes on where PostgreSQL left it, and a third rebuild still refuses the live event.
    assert (await hold(client, eid, "c-2", seats=["A1"])).json()["error"]["code"] == "seats_unavailable"
    assert (await zones(client, eid))["floor"]["sold"] == 2
    with pytest.raises(DomainError) as exc:
        await rebuild_event(inventory, pg, eid, resume=False)
    assert exc.value.code == "event_exists"


async def test_a_rebuild_refuses_while_another_holds_the_event(scratch):
    client, inventory, pg, settings, write_through = scratch
    eid = await create(client)
    await inventory.unload_event(eid)
    key = REBUILD_LOCK.format(eid)
    async with pg.acquire() as other:  # another rebuild's lock, taken by another session
        await other.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", key)
        with pytest.raises(DomainError) as exc:
            await rebuild_event(inventory, pg, eid, resume=False)
        assert exc.value.code == "event_exists" and "Another rebuild" in exc.value.message
        assert not await inventory.event_exists(eid)
        await other.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", key)
    assert (await rebuild_event(inventory, pg, eid, resume=False)).status == "paused"
