# ruff: noqa: F811  (the scratch fixtures are imported from test_rebuild, then used as arguments)
"""The sale's scripts, the worker and the ops tools on a real 3-master Redis Cluster (throw-away servers on
free loopback ports).

Every key of an event carries the hash tag {evt:<id>}; a script that touched a key of another slot would
fail here with a cross-slot / non-local-key error, because the slots are spread over three nodes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest
import redis
import redis.asyncio
from conftest import new_event_id
from redis.asyncio.cluster import RedisCluster
from test_rebuild import buy, create, hold, scratch, scratch_app_and_client, seats_with, zones  # noqa: F401

from loadtests.audit import audit_event
from loadtests.local import throwaway_cluster, throwaway_redis
from service import keys
from service.app import redis_client
from service.domain import EventSpec, HoldRequest
from service.inventory import Inventory
from service.rebuild import rebuild_event
from service.settings import Settings
from service.slots import SlotClients
from workers.reconcile import cron_reconcile, reconcile_event

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")


@pytest.fixture(scope="module")
def cluster_url():
    with throwaway_cluster() as url:
        yield url


@pytest.mark.parametrize("auto_pipeline", [True, False])
async def test_a_whole_sale_on_redis_cluster(cluster_url, auto_pipeline):
    settings = Settings(
        redis_url=cluster_url,
        database_url="postgresql://unused",
        redis_cluster=True,
        auto_pipeline=auto_pipeline,
    )
    client = redis_client(cluster_url, settings)
    inv = Inventory(client, settings)
    await inv.runner.load()
    events = [new_event_id("cl") for _ in range(6)]  # spread over the three nodes' slots
    for eid in events:
        await inv.load_event(
            EventSpec.model_validate(
                {
                    "event_id": eid,
                    "name": "c",
                    "starts_at": datetime.now(UTC).isoformat(),
                    "max_tickets_per_customer": 50,
                    "zones": [
                        {"zone_id": "ga", "kind": "ga", "capacity": 5, "price_cents": 1},
                        {"zone_id": "s", "kind": "seated", "price_cents": 2, "seats": ["A1", "A2"]},
                    ],
                }
            )
        )
    for eid in events:
        req = HoldRequest.model_validate(
            {
                "customer_id": "c",
                "items": [{"zone_id": "ga", "quantity": 2}, {"zone_id": "s", "seats": ["A1"]}],
            }
        )
        hold, _ = await inv.hold(eid, req, "key-1")
        _, replay = await inv.hold(eid, req, "key-1")
        assert replay
        order, created = await inv.confirm(eid, hold["hold_id"], "pi")
        assert created
        other, _ = await inv.hold(
            eid,
            HoldRequest.model_validate({"customer_id": "d", "items": [{"zone_id": "s", "seats": ["A2"]}]}),
        )
        assert await inv.release(eid, other["hold_id"]) == "released"
        assert (await inv.get_hold(eid, hold["hold_id"]))["status"] == "confirmed"
        zones = {z["zone_id"]: z for z in (await inv.availability(eid))["zones"]}
        assert (zones["ga"]["sold"], zones["s"]["sold"], zones["s"]["available"]) == (2, 1, 1)
        page = await inv.seat_page(eid, "s", "", "", 10)
        assert [s["status"] for s in page["seats"]] == ["sold", "available"]
        assert await inv.reap(eid) == 0
        assert await inv.find_order(eid, order["order_id"]) is not None
    assert set(events) <= set(await inv.event_ids())

    # Many calls in one event-loop tick, to events on every node: holds (batched per event), confirms,
    # releases, reads and reaps side by side, as a busy API process and the sweeper make them.
    async def one_sale(eid: str, n: int) -> None:
        req = HoldRequest.model_validate(
            {"customer_id": f"t{n}", "items": [{"zone_id": "ga", "quantity": 1}]}
        )
        hold, _ = await inv.hold(eid, req)
        if n % 2:
            await inv.confirm(eid, hold["hold_id"], "pi")
        else:
            await inv.release(eid, hold["hold_id"])

    await asyncio.gather(*(one_sale(eid, n) for eid in events for n in range(3)))
    reads = await asyncio.gather(
        *(inv.availability(eid) for eid in events), *(inv.reap(eid) for eid in events)
    )
    for zones in reads[: len(events)]:
        ga = next(z for z in zones["zones"] if z["zone_id"] == "ga")
        assert (ga["sold"], ga["held"], ga["available"]) == (3, 0, 2)
    for eid in events:
        await inv.unload_event(eid)
    inv.close()
    await client.aclose()


# The worker's and ops tools' paths on the cluster: write-through, reconcile (check and repair), audit,
# rebuild, and `boxoffice worker` itself. The API runs in-process on the cluster (tests/test_rebuild.py's
# helpers, with this module's settings).


@pytest.fixture(scope="module")
def scratch_settings(cluster_url, database_url) -> Settings:
    return Settings(
        redis_url=cluster_url, database_url=database_url, admin_token="test-admin-token", redis_cluster=True
    )


async def one_event_per_node(client, inventory: Inventory, **overrides) -> list[str]:
    """Create events until every primary owns one; returns their ids (one per node)."""
    cluster = inventory.client
    await cluster.initialize()
    by_node: dict[str, str] = {}
    while len(by_node) < len(cluster.get_primaries()):
        eid = new_event_id("cl")
        node = cluster.get_node_from_key(keys.meta(eid)).name
        if node not in by_node:
            by_node[node] = await create(client, event_id=eid, **overrides)
    return list(by_node.values())


async def test_slot_clients_reach_the_owner_of_the_slot(scratch):
    _, inventory, _, _, _ = scratch
    cluster = inventory.client
    slots = SlotClients(cluster)
    try:
        for eid in [new_event_id("slot") for _ in range(8)]:
            node = await slots.for_key(keys.meta(eid))
            async with node.pipeline(transaction=True) as pipe:  # MULTI over two keys of the slot
                pipe.set(keys.meta(eid), "1")
                pipe.set(keys.customers(eid), "2")
                assert await pipe.execute() == [True, True]
            assert await cluster.get(keys.customers(eid)) == b"2"
            await cluster.delete(keys.meta(eid), keys.customers(eid))
            assert await slots.for_key(keys.outbox(eid)) is node  # one client per node
        assert len(slots._nodes) <= 3
    finally:
        await slots.aclose()
    single = redis.asyncio.Redis()
    assert await SlotClients(single).for_key("k") is single  # a single server: the client itself
    await single.aclose()


async def connected_clients(cluster: RedisCluster) -> int:
    """Clients connected to the cluster's primaries (each count's own connection included)."""
    await cluster.initialize()
    return sum(len(redis.Redis(port=n.port).client_list()) for n in cluster.get_primaries())


async def test_slot_clients_close_their_connections(scratch):
    _, inventory, _, _, _ = scratch
    cluster = inventory.client

    async def connected() -> int:
        return await connected_clients(cluster)

    before = await connected()
    for _ in range(3):
        slots = SlotClients(cluster)
        eids = [new_event_id("close") for _ in range(12)]
        nodes = [await slots.for_key(keys.meta(e)) for e in eids]
        await asyncio.gather(*(n.set(keys.meta(e), "1") for n, e in zip(nodes, eids, strict=True)))
        assert await connected() > before
        for e in eids:
            await cluster.delete(keys.meta(e))
        await slots.aclose()
    await asyncio.sleep(0.2)
    assert await connected() == before


async def test_cron_reconcile_on_redis_cluster(scratch):
    """The worker's reconcile job over events on every node: clean, and its node connections closed after."""
    client, inventory, pg, settings, write_through = scratch
    events = await one_event_per_node(client, inventory)
    for eid in events:
        await buy(client, eid, "c-1", ga=1, seats=["A1"])
        await write_through(eid)
    before = await connected_clients(inventory.client)
    result = await cron_reconcile({"settings": settings, "inventory": inventory, "pg": pg})
    assert result["events"] >= len(events)
    for eid in events:
        assert (
            await reconcile_event(inventory.client, pg, inventory, eid, repair=False, settings=settings)
        ).clean
    await asyncio.sleep(0.2)
    assert await connected_clients(inventory.client) == before


async def test_many_calls_per_tick_on_few_connections_per_node(cluster_url):
    """More calls in one tick than a node has connections: the tick's calls share one pipeline per node."""
    settings = Settings(
        redis_url=cluster_url, database_url="postgresql://unused", redis_cluster=True, redis_max_connections=4
    )
    client = redis_client(cluster_url, settings)
    inv = Inventory(client, settings)
    await inv.runner.load()
    events = [new_event_id("tick") for _ in range(6)]
    spec = {
        "name": "t",
        "starts_at": datetime.now(UTC).isoformat(),
        "zones": [{"zone_id": "ga", "kind": "ga", "capacity": 1000, "price_cents": 1}],
    }
    for eid in events:
        await inv.load_event(EventSpec.model_validate({**spec, "event_id": eid}))
    req = HoldRequest.model_validate({"customer_id": "c", "items": [{"zone_id": "ga", "quantity": 1}]})
    try:
        replies = await asyncio.gather(
            *(inv.availability(eid) for eid in events for _ in range(40)),
            *(inv.reap(eid) for eid in events for _ in range(10)),
            *(
                inv.hold(eid, req.model_copy(update={"customer_id": f"c{n}"}))
                for eid in events
                for n in range(5)
            ),
        )
        assert len(replies) == 6 * 55
        for eid in events:
            ga = (await inv.availability(eid))["zones"][0]
            assert (ga["held"], ga["available"]) == (5, 995)
    finally:
        for eid in events:
            await inv.unload_event(eid)
        inv.close()
        await client.aclose()


async def test_write_through_reconcile_audit_and_rebuild_on_redis_cluster(scratch):
    client, inventory, pg, settings, write_through = scratch
    assert isinstance(inventory.client, RedisCluster)
    for eid in await one_event_per_node(client, inventory, max_tickets_per_customer=8):
        first = await buy(client, eid, "c-1", ga=3, seats=["A1", "A2"])
        await buy(client, eid, "c-2", ga=2)
        await write_through(eid)  # XREADGROUP through the cluster pipeline, XACK + XDEL in one MULTI
        for order in (first,):
            r = await client.get(f"/v1/events/{eid}/orders/{order['order_id']}")
            assert r.json()["persisted"] is True
        held = (await hold(client, eid, "c-3", ga=1, seats=["B1"])).json()["hold_id"]
        await buy(client, eid, "c-4", seats=["B2"])  # confirmed, left in the outbox: in flight

        report = await reconcile_event(inventory.client, pg, inventory, eid, repair=False, settings=settings)
        assert report.clean, report.drifts
        assert (report.outbox.in_flight_orders, report.active_holds) == (1, 1)

        # Drift behind the service's back, then a repair (WATCH / MULTI on the event's node).
        await inventory.client.hincrby(keys.zone(eid, "floor"), "sold", 2)
        await inventory.client.zadd(keys.expiry(eid), {"h_ghost": 9e12})
        await pg.execute("DELETE FROM orders WHERE order_id = $1", first["order_id"])
        found = await reconcile_event(inventory.client, pg, inventory, eid, repair=False, settings=settings)
        assert {"sold_redis_vs_pg", "orphan_expiry", "order_missing_in_pg"} <= {d.kind for d in found.drifts}
        fixed = await reconcile_event(inventory.client, pg, inventory, eid, repair=True, settings=settings)
        assert fixed.clean, fixed.drifts
        assert "resumed the sale" in fixed.repaired
        r = await client.get(f"/v1/events/{eid}/orders/{first['order_id']}")
        assert r.json()["persisted"] is True  # re-queued from its hold record and written through

        # The audit's consistent snapshot is a MULTI too.
        assert (await client.post(f"/v1/events/{eid}/holds/{held}/release")).status_code == 200
        audit = await audit_event(inventory.client, pg, eid, None, drain_timeout_seconds=0, settings=settings)
        assert audit.ok, audit.violations

        # Redis loses the event: rebuild it from PostgreSQL (SCAN + MULTI on the event's node).
        await inventory.unload_event(eid)
        assert not await inventory.event_exists(eid)
        result = await rebuild_event(inventory, pg, eid, resume=True)
        assert (result.orders, result.sold_tickets, result.sold_seats) == (3, 8, 3)
        avail = await zones(client, eid)
        assert (avail["floor"]["sold"], avail["sec-101"]["sold"]) == (5, 3)
        assert await seats_with(client, eid, "sold") == {"A1", "A2", "B2"}
        report = await reconcile_event(inventory.client, pg, inventory, eid, repair=False, settings=settings)
        assert report.clean, report.drifts


def test_worker_needs_a_queue_redis_on_a_cluster(cluster_url, database_url):
    env = {
        **os.environ,
        "REDIS_URL": cluster_url,
        "DATABASE_URL": database_url,
        "BOXOFFICE_REDIS_CLUSTER": "true",
    }
    env.pop("BOXOFFICE_QUEUE_REDIS_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "worker"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert "BOXOFFICE_QUEUE_REDIS_URL" in done.stderr


async def test_boxoffice_worker_on_redis_cluster(scratch, cluster_url, database_url, tmp_path):
    """The real worker process: write-through and sweeping on the cluster, arq's queue on its own Redis."""
    client, inventory, _, _, _ = scratch
    events = await one_event_per_node(client, inventory, hold_ttl_seconds=1)
    with throwaway_redis() as queue_url:
        env = {
            **os.environ,
            "REDIS_URL": cluster_url,
            "DATABASE_URL": database_url,
            "BOXOFFICE_REDIS_CLUSTER": "true",
            "BOXOFFICE_QUEUE_REDIS_URL": queue_url,
            "BOXOFFICE_LOG_LEVEL": "WARNING",
        }
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        log = tmp_path / "worker.log"
        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service.cli",
            "worker",
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log.open("w"),
        )
        try:
            orders, holds = {}, {}
            for eid in events:
                orders[eid] = await buy(client, eid, "c-1", ga=2, seats=["A1"])
                holds[eid] = (await hold(client, eid, "c-2", ga=1, seats=["A2"])).json()["hold_id"]
            deadline = time.monotonic() + 30
            pending = dict(orders)
            while pending and time.monotonic() < deadline:
                for eid, order in list(pending.items()):
                    r = await client.get(f"/v1/events/{eid}/orders/{order['order_id']}")
                    if r.json()["persisted"]:
                        del pending[eid]
                await asyncio.sleep(0.2)
            assert not pending, f"not written through: {pending}"
            # Acked and deleted after the commit (XACK + XDEL in a MULTI on the event's node).
            backlog = [1]
            while any(backlog) and time.monotonic() < deadline:
                backlog = [await inventory.client.xlen(keys.outbox(e)) for e in events]
                await asyncio.sleep(0.2)
            assert backlog == [0] * len(events)
            # The sweeper ended the 1-second holds: read the records directly (reads through the API reap
            # by themselves, which would hide a sweeper that does nothing).
            expired = set()
            while len(expired) < len(events) and time.monotonic() < deadline:
                for eid, hold_id in holds.items():
                    if await inventory.client.hget(keys.hold(eid, hold_id), "status") == b"expired":
                        expired.add(eid)
                await asyncio.sleep(0.2)
            alive = worker.returncode is None
            queue = redis.asyncio.Redis.from_url(queue_url)
            arq_keys = await queue.keys("arq:*")  # arq's health check, written on the queue's own Redis
            await queue.aclose()
        finally:
            worker.terminate()
            await asyncio.wait_for(worker.wait(), 30)
        assert alive and expired == set(events), log.read_text()[-3000:]
        assert "Traceback" not in log.read_text() and "failed" not in log.read_text(), log.read_text()[-3000:]
        assert b"arq:queue:health-check" in arq_keys, arq_keys
