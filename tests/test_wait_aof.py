"""BOXOFFICE_WAIT_AOF on a server that has WAITAOF (Redis >= 7.2, or Valkey, which reports 7.2.4).

WAITAOF waits for the writes of its own connection only (https://redis.io/commands/waitaof/), so these tests
make the fsync impossible (``appendfsync no``: the server never fsyncs, and WAITAOF 1 times out for any
connection that wrote) and check that a confirm then answers ``unavailable`` rather than a 201 that is not
durable. A WAITAOF sent on a connection that did not carry the confirm would answer "fsynced" at once.

The server binary: ``BOXOFFICE_TEST_WAITAOF_SERVER`` (``.ci/run`` fetches Valkey from Debian's
bookworm-backports for CI), else ``valkey-server`` or a ``redis-server`` >= 7.2 on PATH; else skipped.
"""

from __future__ import annotations

import asyncio
import gc
import os
import re
import shutil
import subprocess
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis
from conftest import new_event_id
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MovedError

from loadtests.local import throwaway_cluster, throwaway_redis
from service import keys
from service.app import redis_client
from service.domain import EventSpec, HoldRequest
from service.errors import DomainError
from service.inventory import Inventory
from service.settings import Settings


def _server() -> str | None:
    candidates = [os.environ.get("BOXOFFICE_TEST_WAITAOF_SERVER"), shutil.which("valkey-server")]
    candidates.append(shutil.which("redis-server"))
    for binary in filter(None, candidates):
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
        if "Valkey" in out:
            return binary
        version = re.search(r"v=(\d+)\.(\d+)", out)
        if version and (int(version[1]), int(version[2])) >= (7, 2):
            return binary
    return None


SERVER = _server()
pytestmark = pytest.mark.skipif(
    SERVER is None,
    reason="no server with WAITAOF (set BOXOFFICE_TEST_WAITAOF_SERVER; .ci/run fetches Valkey)",
)


AOF = ("--appendonly", "yes", "--appendfsync", "no")


@pytest.fixture(scope="module")
def aof_url():
    assert SERVER is not None
    with throwaway_redis(binary=SERVER, args=AOF) as url:
        yield url


@pytest.fixture(scope="module")
def aof_cluster_url():
    assert SERVER is not None
    with throwaway_cluster(binary=SERVER, args=AOF) as url:
        yield url


class Fsync:
    """Sets ``appendfsync`` on every server of the deployment."""

    def __init__(self, urls: list[str]):
        self.clients = [aioredis.Redis.from_url(u) for u in urls]

    async def set(self, mode: str) -> None:
        for c in self.clients:
            await c.config_set("appendfsync", mode)

    async def stat(self, section: str, field: str) -> int:
        """``field`` of ``INFO section`` summed over the servers (0 where absent)."""
        total = 0
        for c in self.clients:
            value = (await c.info(section)).get(field, 0)
            total += value["calls"] if isinstance(value, dict) else int(value)
        return total

    async def aclose(self) -> None:
        for c in self.clients:
            await c.aclose()


@pytest.fixture(params=["auto-pipeline", "pooled", "cluster"])
async def inventories(request):
    """Two Inventories (two processes' worth of connections) with wait_aof on, and the fsync switch."""
    cluster = request.param == "cluster"
    url = request.getfixturevalue("aof_cluster_url" if cluster else "aof_url")
    settings = Settings(
        redis_url=url,
        database_url="postgresql://unused",
        wait_aof=True,
        wait_aof_timeout_ms=100,
        auto_pipeline=request.param != "pooled",
        redis_cluster=cluster,
    )
    clients = [redis_client(url, settings) for _ in range(2)]
    invs = [Inventory(c, settings) for c in clients]
    await invs[0].runner.load()
    if cluster:
        await clients[0].initialize()
        urls = [f"redis://{n.host}:{n.port}/0" for n in clients[0].get_primaries()]
    else:
        urls = [url]
    fsync = Fsync(urls)
    await fsync.set("no")
    # Exceptions nobody retrieved (a failing background task of the runner) fail the test.
    unhandled: list[dict] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    yield invs, fsync
    await fsync.set("no")
    await fsync.aclose()
    for inv, client in zip(invs, clients, strict=True):
        await inv.aclose()
        await client.aclose()
    gc.collect()  # "exception was never retrieved" is reported when the future is collected
    loop.set_exception_handler(None)
    assert not unhandled, unhandled


async def _event(inv: Inventory) -> str:
    eid = new_event_id("aof")
    spec = {
        "event_id": eid,
        "name": "aof",
        "starts_at": datetime.now(UTC).isoformat(),
        "max_tickets_per_customer": 1000,
        "zones": [{"zone_id": "ga", "kind": "ga", "capacity": 1000, "price_cents": 5}],
    }
    await inv.load_event(EventSpec.model_validate(spec))
    return eid


async def _hold(inv: Inventory, eid: str, customer: str = "c") -> str:
    req = HoldRequest.model_validate({"customer_id": customer, "items": [{"zone_id": "ga", "quantity": 1}]})
    return (await inv.hold(eid, req))[0]["hold_id"]


def _not_durable(exc: pytest.ExceptionInfo) -> bool:
    return exc.value.code == "unavailable" and exc.value.details.get("reason") == "aof_fsync_timeout"


async def test_a_confirm_is_not_acknowledged_before_its_fsync(inventories):
    (first, second), fsync = inventories
    eid = await _event(first)
    hold_id = await _hold(first, eid)

    with pytest.raises(DomainError) as exc:  # no fsync ever: the confirm's own WAITAOF times out
        await first.confirm(eid, hold_id, "pay")
    assert _not_durable(exc)
    assert (await first.get_hold(eid, hold_id))[
        "status"
    ] == "confirmed"  # confirmed in Redis, not yet durable

    # The client retries, through another process: its repeat writes too, so its WAITAOF covers the first
    # confirm's writes and still times out.
    with pytest.raises(DomainError) as exc:
        await second.confirm(eid, hold_id, "pay")
    assert _not_durable(exc)

    await fsync.set("always")  # every write fsynced before its reply
    order, created = await second.confirm(eid, hold_id, "pay")
    assert (created, order["hold_id"]) == (False, hold_id)
    order, created = await first.confirm(eid, await _hold(first, eid, "d"), "pay")
    assert created


async def test_many_confirms_of_one_tick_share_one_fsync(inventories):
    (inv, _), fsync = inventories
    await fsync.set("everysec")
    eid = await _event(inv)
    holds = await asyncio.gather(*(_hold(inv, eid, f"c{n}") for n in range(100)))
    inv.settings.wait_aof_timeout_ms = 3000  # an everysec fsync comes within about a second
    waitaofs = await fsync.stat("commandstats", "cmdstat_waitaof")
    results = await asyncio.gather(*(inv.confirm(eid, h, "pay") for h in holds))
    assert [created for _, created in results] == [True] * 100
    assert len({order["order_id"] for order, _ in results}) == 100
    assert await fsync.stat("commandstats", "cmdstat_waitaof") - waitaofs < 10  # not one per confirm


async def test_while_the_disk_stalls_ticks_wait_side_by_side(inventories):
    """A blocked WAITAOF blocks its connection: the next ticks' confirms must not queue behind it."""
    (inv, _), fsync = inventories
    eid = await _event(inv)
    holds = [await _hold(inv, eid, f"s{n}") for n in range(4)]
    inv.settings.wait_aof_timeout_ms = 1500
    confirms = []
    for hold_id in holds:  # one confirm per event-loop tick (and more)
        confirms.append(asyncio.ensure_future(inv.confirm(eid, hold_id, "pay")))
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    assert await fsync.stat("clients", "blocked_clients") >= 2  # WAITAOFs blocked at once, not queued
    for result in await asyncio.gather(*confirms, return_exceptions=True):
        assert isinstance(result, DomainError) and result.details.get("reason") == "aof_fsync_timeout"


async def test_closing_mid_confirm_never_acknowledges(inventories):
    """A shutdown that closes the runner while a confirm is on its way: an error, never a durable 201."""
    (inv, _), _ = inventories
    eid = await _event(inv)
    holds = [await _hold(inv, eid, f"x{n}") for n in range(3)]
    for hold_id in holds:
        task = asyncio.ensure_future(inv.confirm(eid, hold_id, "pay"))
        for _ in range(holds.index(hold_id)):  # close at different points of the call's way
            await asyncio.sleep(0)
        inv.runner.close()
        [result] = await asyncio.gather(task, return_exceptions=True)
        assert isinstance(result, Exception), result
        if isinstance(result, DomainError):
            assert result.details.get("reason") == "aof_fsync_timeout"
    with pytest.raises(RedisConnectionError):  # closed stays closed
        await inv.confirm(eid, holds[0], "pay")


async def test_a_durable_confirm_follows_a_slot_that_moved(aof_cluster_url):
    """Durable calls go to a node's own client and never follow MOVED; the answer is an error (503), and the
    next call, the client's retry, goes to the slot's new owner."""
    settings = Settings(
        redis_url=aof_cluster_url,
        database_url="postgresql://unused",
        wait_aof=True,
        wait_aof_timeout_ms=100,
        redis_cluster=True,
    )
    client = redis_client(aof_cluster_url, settings)
    inv = Inventory(client, settings)
    await inv.runner.load()
    eid = await _event(inv)
    first, second = [await _hold(inv, eid, f"m{n}") for n in range(2)]
    await client.initialize()
    nodes = {n.name: aioredis.Redis(host=n.host, port=n.port) for n in client.get_primaries()}
    fsync = Fsync([f"redis://{n.host}:{n.port}/0" for n in client.get_primaries()])
    try:
        await fsync.set("always")
        order, _ = await inv.confirm(eid, first, "pay")  # the node's client is open now
        # Move the event's slot, with its keys, to another node (what a resharding does).
        slot = client.keyslot(keys.meta(eid))
        src_node = client.get_node_from_key(keys.meta(eid))
        dst_node = next(n for n in client.get_primaries() if n.name != src_node.name)
        src, dst = nodes[src_node.name], nodes[dst_node.name]
        src_id, dst_id = [await c.execute_command("CLUSTER", "MYID") for c in (src, dst)]
        await dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        await src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        while moving := await src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            await src.execute_command("MIGRATE", dst_node.host, dst_node.port, "", 0, 5000, "KEYS", *moving)
        for node in nodes.values():
            await node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)

        with pytest.raises(MovedError):  # answered 503 by the API (service/app.py)
            await inv.confirm(eid, second, "pay")
        order2, created = await inv.confirm(eid, second, "pay")  # the retry reaches the new owner
        assert created and order2["order_id"] != order["order_id"]
        assert (await inv.confirm(eid, first, "pay"))[0] == order  # the moved order is still there
    finally:
        await fsync.set("no")
        await fsync.aclose()
        for node in nodes.values():
            await node.aclose()
        await inv.aclose()
        await client.aclose()
