"""Creating an event across PostgreSQL and Redis (service/catalog.py): both stores or neither, on the module's
own throw-away redis-server and the session's database. Faults are injected into the Redis side only."""

from __future__ import annotations

import asyncio

import pytest
from conftest import event_body
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service import catalog, db, keys
from service.domain import EVENT_ON_SALE, EVENT_PAUSED, EventSpec, HoldRequest
from service.errors import DomainError

GA = [{"zone_id": "floor", "quantity": 1}]


def new_spec() -> EventSpec:
    return EventSpec(**event_body())


async def redis_status(inventory, event_id: str) -> str | None:
    raw = await inventory.client.hget(keys.meta(event_id), "status")
    return raw.decode() if raw is not None else None


async def pg_status(pg, event_id: str) -> str | None:
    return await pg.fetchval("SELECT status FROM events WHERE event_id = $1", event_id)


async def test_a_load_whose_reply_is_lost_is_undone(pg, inventory, monkeypatch):
    """Redis applied the load but the reply never came (a timeout): nothing of the event may stay behind, and
    creating it again works. Before, the event stayed on sale in Redis only: it sold, and nothing was saved."""
    spec = new_spec()
    real_load = inventory.load_event

    async def load_then_lose_reply(*args, **kwargs):
        await real_load(*args, **kwargs)
        raise RedisTimeoutError("Timeout reading from socket")

    monkeypatch.setattr(inventory, "load_event", load_then_lose_reply)
    with pytest.raises(RedisTimeoutError):
        await catalog.create_event(pg, inventory, spec)
    assert await pg_status(pg, spec.event_id) is None
    assert not await inventory.event_exists(spec.event_id)
    assert not await inventory.client.sismember(keys.EVENTS_KEY, spec.event_id)

    monkeypatch.undo()
    await catalog.create_event(pg, inventory, spec)
    assert await redis_status(inventory, spec.event_id) == EVENT_ON_SALE
    assert await pg_status(pg, spec.event_id) == EVENT_ON_SALE


async def test_nobody_can_hold_before_the_record_is_committed(pg, inventory, monkeypatch):
    spec = new_spec()
    real_load = inventory.load_event
    seen: list[str] = []

    async def load_then_try_a_hold(*args, **kwargs):
        await real_load(*args, **kwargs)
        try:
            await inventory.hold(spec.event_id, HoldRequest(customer_id="early", items=GA))
            seen.append("held")
        except DomainError as err:
            seen.append(err.code)

    monkeypatch.setattr(inventory, "load_event", load_then_try_a_hold)
    await catalog.create_event(pg, inventory, spec)
    assert seen == ["sale_paused"]
    assert await redis_status(inventory, spec.event_id) == EVENT_ON_SALE
    hold, _ = await inventory.hold(spec.event_id, HoldRequest(customer_id="on-time", items=GA))
    assert hold["status"] == "active"


async def test_keys_a_failed_create_left_are_replaced(pg, inventory):
    """A paused event in Redis that PostgreSQL does not know and that sold nothing (a create whose load and
    unload both failed) does not block creating it for good."""
    spec = new_spec()
    await inventory.load_event(spec, status=EVENT_PAUSED)
    with pytest.raises(DomainError) as exc:  # the record has no such event: no resume either
        await catalog.set_status(pg, inventory, spec.event_id, EVENT_ON_SALE)
    assert exc.value.code == "event_not_found"
    assert await redis_status(inventory, spec.event_id) == EVENT_PAUSED

    await catalog.create_event(pg, inventory, spec)
    assert await redis_status(inventory, spec.event_id) == EVENT_ON_SALE
    spec_pg, status = await db.get_event(pg, spec.event_id)
    assert status == EVENT_ON_SALE and spec_pg.event_id == spec.event_id


@pytest.mark.parametrize("case", ["on_sale", "holds", "sold"])
async def test_keys_with_sales_are_never_replaced(pg, inventory, case):
    spec = new_spec()
    eid = spec.event_id
    if case == "sold":
        await inventory.load_event(spec, status=EVENT_PAUSED, sold={"floor": 3})
    else:
        await inventory.load_event(spec, status=EVENT_ON_SALE)
    hold = None
    if case == "holds":
        hold, _ = await inventory.hold(eid, HoldRequest(customer_id="c1", items=GA))
        await inventory.set_status(eid, EVENT_PAUSED)
    with pytest.raises(DomainError) as exc:
        await catalog.create_event(pg, inventory, spec)
    assert exc.value.code == "event_exists"
    assert await pg_status(pg, eid) is None
    assert await inventory.event_exists(eid)
    if hold is not None:
        assert (await inventory.get_hold(eid, hold["hold_id"]))["status"] == "active"
    await inventory.unload_event(eid)


async def test_a_failed_switch_to_on_sale_leaves_the_event_paused_in_both_stores(pg, inventory, monkeypatch):
    spec = new_spec()

    async def refuse(*args, **kwargs):
        raise RedisConnectionError("Redis went away")

    monkeypatch.setattr(inventory, "set_status", refuse)
    with pytest.raises(RedisConnectionError):
        await catalog.create_event(pg, inventory, spec)
    monkeypatch.undo()
    assert await redis_status(inventory, spec.event_id) == EVENT_PAUSED
    assert await pg_status(pg, spec.event_id) == EVENT_PAUSED
    await catalog.set_status(pg, inventory, spec.event_id, EVENT_ON_SALE)
    assert await redis_status(inventory, spec.event_id) == EVENT_ON_SALE


async def test_a_retried_create_waits_for_the_failed_ones_clean_up(pg, inventory, monkeypatch):
    """A create whose load reply was lost, and the client's retry of it at the same moment: the retry must not
    run while the first one's clean-up (unload: a SCAN and a DEL per key) deletes keys. Before, the retry
    waited only on PostgreSQL's primary key, went ahead at the rollback, and answered 'created' with some or
    all of the event's keys deleted under it."""
    from service.inventory import Inventory

    first = Inventory(inventory.client, inventory.settings)
    real_load, real_unload = first.load_event, first.unload_event

    async def load_then_lose_reply(*args, **kwargs):
        await real_load(*args, **kwargs)
        await asyncio.sleep(0.2)  # the retry arrives meanwhile
        raise RedisConnectionError("reply lost")

    async def slow_unload(event_id):
        await asyncio.sleep(0.1)  # the clean-up's round trips
        await real_unload(event_id)

    monkeypatch.setattr(first, "load_event", load_then_lose_reply)
    monkeypatch.setattr(first, "unload_event", slow_unload)
    for _ in range(3):
        spec = new_spec()
        failed = asyncio.create_task(catalog.create_event(pg, first, spec))
        await asyncio.sleep(0.05)
        await catalog.create_event(pg, inventory, spec)  # the retry
        with pytest.raises(RedisConnectionError):
            await failed
        assert await redis_status(inventory, spec.event_id) == EVENT_ON_SALE
        assert await pg_status(pg, spec.event_id) == EVENT_ON_SALE
        for zone in spec.zones:
            assert await inventory.client.exists(keys.zone(spec.event_id, zone.zone_id))
        hold, _ = await inventory.hold(spec.event_id, HoldRequest(customer_id="retry", items=GA))
        assert hold["status"] == "active"


async def test_a_pause_during_a_create_is_not_undone_by_it(pg, inventory, monkeypatch):
    """An operator's pause that arrives while a create is finishing (before its switch to on_sale) applies
    after it: both stores end paused. Before, the create's late switch reopened the sale in Redis only."""
    from service.inventory import Inventory

    creating = Inventory(inventory.client, inventory.settings)
    real_set_status = creating.set_status

    async def slow_switch(*args, **kwargs):
        await asyncio.sleep(0.2)
        await real_set_status(*args, **kwargs)

    monkeypatch.setattr(creating, "set_status", slow_switch)
    spec = new_spec()
    create = asyncio.create_task(catalog.create_event(pg, creating, spec))
    await asyncio.sleep(0.1)
    await catalog.set_status(pg, inventory, spec.event_id, EVENT_PAUSED)
    await create
    assert await redis_status(inventory, spec.event_id) == EVENT_PAUSED
    assert await pg_status(pg, spec.event_id) == EVENT_PAUSED


async def test_pausing_an_event_redis_lost_says_to_rebuild(pg, inventory):
    spec = new_spec()
    await catalog.create_event(pg, inventory, spec)
    await inventory.unload_event(spec.event_id)
    with pytest.raises(DomainError) as exc:
        await catalog.set_status(pg, inventory, spec.event_id, EVENT_PAUSED)
    assert exc.value.code == "event_not_found" and "boxoffice rebuild" in exc.value.message


async def test_a_change_of_an_event_busy_elsewhere_waits_without_a_connection_then_answers_event_busy(
    pg, inventory, monkeypatch
):
    """While another change holds the event's catalog lock (a rebuild or repair can take minutes), pauses of
    it wait without keeping a pooled connection, so other routes still get one, and answer event_busy (409)
    after API_LOCK_WAIT_SECONDS. Before, each waiter held a connection for as long as the lock was held."""
    import asyncpg

    from service.catalog import CATALOG_LOCK

    spec = new_spec()
    await catalog.create_event(pg, inventory, spec)
    monkeypatch.setattr(catalog, "API_LOCK_WAIT_SECONDS", 1.0)
    small = await asyncpg.create_pool(inventory.settings.database_url, min_size=1, max_size=2)
    key = CATALOG_LOCK.format(spec.event_id)
    try:
        async with pg.acquire() as other:  # another change of the event, e.g. a repair
            await other.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", key)
            waiters = [
                asyncio.create_task(catalog.set_status(small, inventory, spec.event_id, EVENT_PAUSED))
                for _ in range(3)
            ]
            await asyncio.sleep(0.3)
            started = asyncio.get_running_loop().time()
            assert await asyncio.wait_for(small.fetchval("SELECT 1"), 0.5) == 1  # the pool is not held
            assert asyncio.get_running_loop().time() - started < 0.5
            for result in await asyncio.gather(*waiters, return_exceptions=True):
                assert isinstance(result, DomainError) and result.code == "event_busy", result
            await other.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", key)
        assert await redis_status(inventory, spec.event_id) == EVENT_ON_SALE  # nothing was changed
        await catalog.set_status(small, inventory, spec.event_id, EVENT_PAUSED)
        assert await redis_status(inventory, spec.event_id) == EVENT_PAUSED
    finally:
        await small.close()
