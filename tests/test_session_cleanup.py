"""The test session deletes what its events left in the shared Redis, and nothing else (conftest.forget_events).

On a developer machine that Redis is `make run`'s database 0: events left there showed up in `make run`'s
reconciliation as drift ("event_missing_in_pg"), and on CI machines they piled up run after run.
"""

from __future__ import annotations

import asyncio
import uuid

from conftest import ADMIN, EVENT_IDS, event_body, forget_events, new_event_id

from service import keys


async def _keys_of(redis, event_id: str) -> set[bytes]:
    return {k async for k in redis.scan_iter(match=keys.prefix(event_id) + "*", count=1000)}


async def _event_with_a_hold_and_an_order(client, event_id: str) -> None:
    r = await client.post("/v1/events", json=event_body(event_id), headers=ADMIN)
    assert r.status_code == 201, r.text
    for items in ([{"zone_id": "floor", "quantity": 2}], [{"zone_id": "sec-101", "seats": ["A1"]}]):
        r = await client.post(f"/v1/events/{event_id}/holds", json={"customer_id": "c1", "items": items})
        assert r.status_code == 201, r.text
    r = await client.post(
        f"/v1/events/{event_id}/holds/{r.json()['hold_id']}/confirm", json={"payment_ref": "pay-1"}
    )
    assert r.status_code == 201, r.text


async def test_forget_events_deletes_every_key_of_its_events_and_no_one_elses(settings, client, redis):
    mine = new_event_id()
    # an id new_event_id did not make: someone else's event on the same Redis, e.g. `make run`'s
    others = f"other-{uuid.uuid4().hex[:12]}"
    EVENT_IDS.add(others)  # only so that the session deletes it at its end, whatever this test does
    for event_id in (mine, others):
        await _event_with_a_hold_and_an_order(client, event_id)
    before = await _keys_of(redis, others)
    # meta, 2 zones, seats, owners, 2 holds, order, expiry, customers, outbox at least
    assert len(await _keys_of(redis, mine)) >= 11
    assert {mine.encode(), others.encode()} <= await redis.smembers(keys.EVENTS_KEY)

    gone = await asyncio.to_thread(forget_events, settings.redis_url, {mine, "evt-never-made"})

    assert await _keys_of(redis, mine) == set()
    assert not await redis.sismember(keys.EVENTS_KEY, mine)
    assert gone >= 11
    assert await _keys_of(redis, others) == before
    assert await redis.sismember(keys.EVENTS_KEY, others)
