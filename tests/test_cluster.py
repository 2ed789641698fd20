"""The sale's scripts on a real 3-master Redis Cluster (throw-away servers on free loopback ports).

Every key of an event carries the hash tag {evt:<id>}; a script that touched a key of another slot would
fail here with a cross-slot / non-local-key error, because the slots are spread over three nodes.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from datetime import UTC, datetime

import pytest
import redis
from conftest import new_event_id

from service.app import redis_client
from service.domain import EventSpec, HoldRequest
from service.inventory import Inventory
from service.settings import Settings

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")


def _cluster_ports(n: int) -> list[int]:
    """Free ports whose cluster-bus port (port + 10000) is free too."""
    import random
    import socket

    ports: list[int] = []
    while len(ports) < n:
        p = random.randint(20000, 30000)
        try:
            for q in (p, p + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", q))
        except OSError:
            continue
        if p not in ports:
            ports.append(p)
    return ports


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    ports = _cluster_ports(3)
    procs = [
        subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(p),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{p}.conf",
                "--dir",
                str(tmp),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for p in ports
    ]
    try:
        for p in ports:
            for _ in range(50):
                try:
                    redis.Redis(port=p).ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.1)
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        for _ in range(100):
            if all(redis.Redis(port=p).cluster("info")["cluster_state"] == "ok" for p in ports):
                break
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)


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
