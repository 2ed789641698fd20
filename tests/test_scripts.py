"""The Lua scripts' rules, run through ``Inventory`` on fakeredis and on the real Redis."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from conftest import new_event_id

from service import keys
from service.domain import EventSpec, HoldRequest
from service.errors import DomainError
from service.inventory import Inventory
from service.settings import Settings


def spec(event_id: str, ga: int = 10, seats: int = 4, per_customer: int = 100, ttl: int = 600) -> EventSpec:
    return EventSpec.model_validate(
        {
            "event_id": event_id,
            "name": "Test",
            "starts_at": datetime.now(UTC).isoformat(),
            "hold_ttl_seconds": ttl,
            "max_tickets_per_customer": per_customer,
            "zones": [
                {"zone_id": "ga", "kind": "ga", "capacity": ga, "price_cents": 1000},
                {"zone_id": "s", "kind": "seated", "price_cents": 5000, "rows": {"A": seats}},
            ],
        }
    )


def req(customer="c1", ttl=None, **items) -> HoldRequest:
    lst = []
    if "ga" in items:
        lst.append({"zone_id": "ga", "quantity": items["ga"]})
    if "seats" in items:
        lst.append({"zone_id": "s", "seats": items["seats"]})
    return HoldRequest.model_validate({"customer_id": customer, "items": lst, "ttl_seconds": ttl})


@pytest.fixture
async def inv(any_redis):
    inv = Inventory(any_redis, Settings(redis_url="redis://unused", database_url="postgresql://unused"))
    eid = new_event_id("scr")
    await inv.load_event(spec(eid))
    yield inv, eid
    await inv.unload_event(eid)


@contextlib.asynccontextmanager
async def private_inventory(**settings: Any) -> AsyncIterator[tuple[aioredis.Redis, Inventory]]:
    """An Inventory on a throw-away redis-server of the test's own (so nothing else's calls are counted), its
    scripts loaded; ``settings`` override Settings fields. Client and Inventory are closed afterwards."""
    from loadtests.local import throwaway_redis

    with throwaway_redis() as url:
        client = aioredis.Redis.from_url(url)
        inv = Inventory(client, Settings(redis_url=url, database_url="postgresql://unused", **settings))
        try:
            await inv.runner.load()
            yield client, inv
        finally:
            inv.close()
            await client.aclose()


async def zones(inv: Inventory, eid: str) -> dict[str, dict]:
    data = await inv.availability(eid)
    for z in data["zones"]:
        assert z["available"] + z["held"] + z["sold"] == z["capacity"], z
        assert min(z["available"], z["held"], z["sold"]) >= 0, z
    return {z["zone_id"]: z for z in data["zones"]}


async def code_of(coro) -> str:
    with pytest.raises(DomainError) as exc:
        await coro
    return exc.value.code


async def test_hold_confirm_moves_stock_and_writes_outbox(inv):
    inv, eid = inv
    hold, replay = await inv.hold(eid, req(ga=3, seats=["A1", "A2"]))
    assert not replay and hold["status"] == "active" and hold["tickets"] == 5
    assert hold["amount_cents"] == 3 * 1000 + 2 * 5000
    assert hold == await inv.get_hold(eid, hold["hold_id"])  # the reply is the stored hold, field for field
    z = await zones(inv, eid)
    assert (z["ga"]["available"], z["ga"]["held"]) == (7, 3)
    assert (z["s"]["available"], z["s"]["held"]) == (2, 2)
    order, created = await inv.confirm(eid, hold["hold_id"], "pi_1")
    assert created and order["hold_id"] == hold["hold_id"]
    z = await zones(inv, eid)
    assert (z["ga"]["held"], z["ga"]["sold"], z["s"]["sold"]) == (0, 3, 2)
    entries = await inv.client.xrange(keys.outbox(eid))
    assert len(entries) == 1
    assert orjson.loads(entries[0][1][b"order"])["order_id"] == order["order_id"]
    # a repeat confirm returns the same order and appends nothing
    again, created = await inv.confirm(eid, hold["hold_id"], "pi_other")
    assert not created and again["order_id"] == order["order_id"]
    assert len(await inv.client.xrange(keys.outbox(eid))) == 1
    assert await code_of(inv.release(eid, hold["hold_id"])) == "hold_confirmed"


async def test_all_or_nothing(inv):
    inv, eid = inv
    await inv.hold(eid, req(customer="a", seats=["A3"]))
    # GA part would fit, seat A3 is taken: nothing is held
    assert await code_of(inv.hold(eid, req(customer="b", ga=2, seats=["A3", "A4"]))) == "seats_unavailable"
    z = await zones(inv, eid)
    assert z["ga"]["available"] == 10 and z["s"]["held"] == 1
    assert await code_of(inv.hold(eid, req(customer="b", ga=11))) == "sold_out"
    assert await code_of(inv.hold(eid, req(customer="b", seats=["Z9"]))) == "validation_failed"


async def test_release_is_idempotent_and_gives_stock_back(inv):
    inv, eid = inv
    hold, _ = await inv.hold(eid, req(ga=4, seats=["A1"]))
    assert await inv.release(eid, hold["hold_id"]) == "released"
    assert await inv.release(eid, hold["hold_id"]) == "released"
    z = await zones(inv, eid)
    assert z["ga"]["available"] == 10 and z["s"]["available"] == 4
    assert await code_of(inv.confirm(eid, hold["hold_id"], "pi")) == "hold_released"
    # the seat can be held again
    await inv.hold(eid, req(customer="c2", seats=["A1"]))


async def test_expiry_reaps_and_reopens_sold_out_zone(inv):
    inv, eid = inv
    hold, _ = await inv.hold(eid, req(ga=10, seats=["A1"], ttl=1))
    assert await code_of(inv.hold(eid, req(customer="c2", ga=1))) == "sold_out"
    await asyncio.sleep(1.1)
    again, _ = await inv.hold(eid, req(customer="c2", ga=10))  # the very next request sees the stock
    assert again["tickets"] == 10
    assert (await inv.get_hold(eid, hold["hold_id"]))["status"] == "expired"
    assert await code_of(inv.confirm(eid, hold["hold_id"], "pi")) == "hold_expired"
    assert await inv.client.zscore(keys.expiry(eid), hold["hold_id"]) is None


async def test_confirm_after_expiry_before_reap_is_refused(inv):
    inv, eid = inv
    hold, _ = await inv.hold(eid, req(seats=["A2"], ttl=1))
    await asyncio.sleep(1.05)
    assert await code_of(inv.confirm(eid, hold["hold_id"], "pi")) == "hold_expired"
    z = await zones(inv, eid)
    assert z["s"]["available"] == 4 and z["s"]["sold"] == 0


async def test_a_run_out_hold_still_waiting_to_be_reaped_acts_expired_everywhere(any_redis):
    """Reaping one hold per call leaves the others queued: get_hold, release and confirm each settle theirs."""
    settings = Settings(redis_url="redis://unused", database_url="postgresql://unused", reap_batch=1)
    inv = Inventory(any_redis, settings)
    eid = new_event_id("settle")
    await inv.load_event(spec(eid, ga=6))
    try:
        holds = []
        for i in range(6):
            holds.append((await inv.hold(eid, req(customer=f"c{i}", ga=1, ttl=1)))[0]["hold_id"])
            # Distinct expiry times, in order: holds made in the same millisecond tie in the expiry set, where
            # Redis orders them by their (random) ids, so "the oldest" could be a later call's own hold.
            await asyncio.sleep(0.002)
        await asyncio.sleep(1.1)
        # each call reaps the oldest queued hold, then meets its own hold expired but not yet reaped
        assert (await inv.get_hold(eid, holds[1]))["status"] == "expired"
        assert await inv.release(eid, holds[3]) == "expired"
        assert await code_of(inv.confirm(eid, holds[5], "pi")) == "hold_expired"
        z = (await zones(inv, eid))["ga"]
        assert z["held"] == 6 - 6 and z["available"] == 6  # 3 reaped + 3 settled: all stock is back
        assert [(await inv.get_hold(eid, h))["status"] for h in holds] == ["expired"] * 6
    finally:
        await inv.unload_event(eid)


async def test_same_hold_id_twice_is_one_hold(inv, monkeypatch):
    """redis-py may resend a script after a timeout: the second run must change nothing."""
    inv, eid = inv
    monkeypatch.setattr("service.inventory.new_id", lambda kind: f"{kind}_fixed")
    first, _ = await inv.hold(eid, req(ga=2))
    second, replay = await inv.hold(eid, req(ga=2))
    assert second["hold_id"] == first["hold_id"] and not replay
    assert (await zones(inv, eid))["ga"]["held"] == 2


async def test_idempotency_key(inv):
    inv, eid = inv
    first, replay = await inv.hold(eid, req(ga=1), "key-1")
    again, replay = await inv.hold(eid, req(ga=1), "key-1")
    assert replay and again["hold_id"] == first["hold_id"]
    assert await code_of(inv.hold(eid, req(ga=2), "key-1")) == "idempotency_conflict"
    assert (await zones(inv, eid))["ga"]["held"] == 1


async def test_hold_that_fits_leaves_reaping_to_the_sweeper_and_replays_settle(any_redis):
    """hold.lua reaps only when a refusal could come from expired holds; what it reads back is settled."""
    settings = Settings(redis_url="redis://unused", database_url="postgresql://unused")
    inv = Inventory(any_redis, settings)
    eid = new_event_id("lazy")
    await inv.load_event(spec(eid, ga=3))
    try:
        first, _ = await inv.hold(eid, req(customer="a", ga=1, ttl=1), "key-a")
        await asyncio.sleep(1.1)
        fresh, _ = await inv.hold(eid, req(customer="b", ga=1))  # fits: the run-out hold stays queued
        assert await inv.client.zscore(keys.prefix(eid) + "expiry", first["hold_id"]) is not None
        again, replay = await inv.hold(eid, req(customer="a", ga=1, ttl=1), "key-a")
        assert replay and again["hold_id"] == first["hold_id"] and again["status"] == "expired"
        assert (await zones(inv, eid))["ga"]["held"] == 1  # settling the replay gave its ticket back
        assert fresh["created_at_ms"] <= fresh["expires_at_ms"] - 600_000
        assert isinstance(fresh["amount_cents"], int) and fresh["amount_cents"] == 1000
        assert await inv.reap(eid) == 0  # nothing left: the replay's settle took it out of the queue
    finally:
        await inv.unload_event(eid)


async def test_customer_limit_counts_holds_and_orders(any_redis):
    inv = Inventory(any_redis, Settings(redis_url="redis://unused", database_url="postgresql://unused"))
    eid = new_event_id("lim")
    await inv.load_event(spec(eid, per_customer=4))
    h1, _ = await inv.hold(eid, req(ga=2))
    await inv.confirm(eid, h1["hold_id"], "pi")
    h2, _ = await inv.hold(eid, req(seats=["A1"]))
    assert await code_of(inv.hold(eid, req(ga=2))) == "limit_exceeded"
    await inv.release(eid, h2["hold_id"])
    await inv.hold(eid, req(ga=2))  # released tickets no longer count
    assert await code_of(inv.hold(eid, req(ga=1))) == "limit_exceeded"
    await inv.hold(eid, req(customer="other", ga=1))
    await inv.unload_event(eid)


async def test_limit_is_counted_in_then_taken_back_and_reaps_before_refusing(any_redis):
    """hold.lua adds a hold's tickets to the customer's count first and takes them back on refusal: a refusal
    leaves the count as it was (no 0 left behind), and expired holds waiting to be reaped never count."""
    inv = Inventory(any_redis, Settings(redis_url="redis://unused", database_url="postgresql://unused"))
    eid = new_event_id("lim2")
    await inv.load_event(spec(eid, ga=10, per_customer=2))
    ckey = keys.prefix(eid) + "customers"
    try:
        assert await code_of(inv.hold(eid, req(customer="big", ga=3))) == "limit_exceeded"
        assert await inv.client.hget(ckey, "big") is None
        await inv.hold(eid, req(customer="c", ga=2, ttl=1))
        await asyncio.sleep(1.1)  # expired, still queued: the stock check passes, only the limit refuses
        await inv.hold(eid, req(customer="c", ga=1))
        assert await inv.client.hget(ckey, "c") == b"1"
        assert await code_of(inv.hold(eid, req(customer="c", ga=2))) == "limit_exceeded"
        assert await inv.client.hget(ckey, "c") == b"1"
        assert (await zones(inv, eid))["ga"]["held"] == 1
    finally:
        await inv.unload_event(eid)


async def test_paused_refuses_holds_but_confirms(inv):
    inv, eid = inv
    hold, _ = await inv.hold(eid, req(ga=1))
    await inv.set_status(eid, "paused")
    assert await code_of(inv.hold(eid, req(customer="x", ga=1))) == "sale_paused"
    _, created = await inv.confirm(eid, hold["hold_id"], "pi")
    assert created
    await inv.set_status(eid, "on_sale")
    await inv.hold(eid, req(customer="x", ga=1))


async def test_ttl_limits_and_unknown_event(inv):
    inv, eid = inv
    # event hold_ttl is 600 s
    assert await code_of(inv.hold(eid, req(ga=1, ttl=601))) == "validation_failed"
    assert await code_of(inv.hold("no-such-event", req(ga=1))) == "event_not_found"
    assert await code_of(inv.confirm(eid, "h_nope", "pi")) == "hold_not_found"
    assert await code_of(inv.release(eid, "h_nope")) == "hold_not_found"


async def test_seat_page(inv):
    inv, eid = inv
    await inv.hold(eid, req(seats=["A2"]))
    h, _ = await inv.hold(eid, req(customer="c2", seats=["A3"]))
    await inv.confirm(eid, h["hold_id"], "pi")
    page = await inv.seat_page(eid, "s", "", "", 2)
    assert page == {
        "seats": [{"seat": "A1", "status": "available"}, {"seat": "A2", "status": "held"}],
        "next": "A2",
    }
    page = await inv.seat_page(eid, "s", "", "A2", 10)
    assert page == {
        "seats": [{"seat": "A3", "status": "sold"}, {"seat": "A4", "status": "available"}],
        "next": None,
    }
    page = await inv.seat_page(eid, "s", "available", "", 10)
    assert [s["seat"] for s in page["seats"]] == ["A1", "A4"]
    assert (await inv.seat_page(eid, "s", "held", "A2", 10))["seats"] == []


async def test_seat_pages_walk_a_large_zone_in_catalog_order_for_every_filter(any_redis):
    """Pages chained by ``next`` give every seat once, in catalog order, with its status, for each filter;
    across the script's 500-seat reads, at its scan bound of max(20 x limit, 2,000) seats, and ending exactly on
    the last seat."""
    inv = Inventory(any_redis, Settings(redis_url="redis://unused", database_url="postgresql://unused"))
    eid = new_event_id("scr")
    await inv.load_event(spec(eid, seats=2600))  # A1 .. A2600: labels sort differently from catalog order
    try:
        catalog = [f"A{i}" for i in range(1, 2601)]
        status = dict.fromkeys(catalog, "available")
        held = [f"A{i}" for i in range(7, 2601, 13)]
        sold = [f"A{i}" for i in range(2101, 2601, 3) if f"A{i}" not in held]  # none in the first 2,000
        for n, seat in enumerate(held):
            await inv.hold(eid, req(customer=f"h{n}", seats=[seat]))
            status[seat] = "held"
        for n, seat in enumerate(sold):
            h, _ = await inv.hold(eid, req(customer=f"s{n}", seats=[seat]))
            await inv.confirm(eid, h["hold_id"], "pi")
            status[seat] = "sold"
        cases = [("", 100), ("", 2600), ("", 2599), ("available", 7), ("held", 2), ("sold", 1), ("sold", 101)]
        for want, limit in cases:
            got, after, calls = [], "", 0
            while True:
                page = await inv.seat_page(eid, "s", want, after, limit)
                calls += 1
                assert len(page["seats"]) <= limit
                got += page["seats"]
                if page["next"] is None:
                    break
                after = page["next"]
            expected = [{"seat": s, "status": status[s]} for s in catalog if want in ("", status[s])]
            assert got == expected, (want, limit)
            if want == "":
                assert calls == -(-len(catalog) // limit)  # no empty page at the end
        # A call examines at most max(20 x limit, 2,000) seats; one that found nothing says where it stopped.
        assert await inv.seat_page(eid, "s", "sold", "", 1) == {"seats": [], "next": "A2000"}
        assert await inv.seat_page(eid, "s", "sold", "", 101) == {"seats": [], "next": "A2020"}  # mid-read
        page = await inv.seat_page(eid, "s", "held", "A2550", 5)
        assert page == {
            "seats": [{"seat": s, "status": "held"} for s in held if int(s[1:]) > 2550],
            "next": None,
        }
        assert await code_of(inv.seat_page(eid, "s", "", "A2601", 5)) == "validation_failed"  # unknown after
    finally:
        await inv.unload_event(eid)


async def test_sweeper_reap(inv):
    inv, eid = inv
    for i in range(5):
        await inv.hold(eid, req(customer=f"c{i}", ga=1, ttl=1))
    await asyncio.sleep(1.05)
    assert await inv.reap(eid) == 5
    raw = await inv.client.hgetall(keys.zone(eid, "ga"))
    assert int(raw[b"available"]) == 10 and int(raw[b"held"]) == 0


async def test_scripts_survive_redis_forgetting_them(settings):
    """After SCRIPT FLUSH (or a Redis restart) EVALSHA answers NOSCRIPT: the runner loads the script and the
    call goes through, both for a lone call and inside an auto-pipelined batch. On a private server."""
    from loadtests.local import throwaway_redis
    from service.app import redis_client

    with throwaway_redis() as url:
        s = settings.model_copy(update={"redis_url": url})
        client = redis_client(url, s)
        inv = Inventory(client, s)
        eid = new_event_id("noscript")
        await inv.load_event(spec(eid, ga=100))
        await inv.runner.load()
        await client.script_flush()
        assert not await inv.runner.loaded()
        hold, _ = await inv.hold(eid, req(ga=1))  # a lone call
        await client.script_flush()
        results = await asyncio.gather(*(inv.hold(eid, req(customer=f"c{i}", ga=1)) for i in range(20)))
        assert len({h["hold_id"] for h, _ in results}) == 20  # a batch in one pipeline
        assert (await zones(inv, eid))["ga"]["held"] == 21
        await client.aclose()


async def test_expired_holds_beyond_one_reap_batch_never_refuse_a_buyer(any_redis):
    """Holds of a flash sale expire in the same millisecond; more of them than one reap batch must not
    make the next buyer see sold_out / seats_unavailable / limit_exceeded."""
    s = Settings(redis_url="redis://unused", database_url="postgresql://unused", reap_batch=1)
    inv = Inventory(any_redis, s)
    eid = new_event_id("batch")
    await inv.load_event(spec(eid, ga=3, seats=3, per_customer=4))
    for i, seat in enumerate(["A1", "A2", "A3"]):
        await inv.hold(
            eid,
            req(customer="same", ttl=1, ga=1, seats=[seat]) if i == 0 else req(customer="same", ttl=1, ga=1),
        )
    await asyncio.sleep(1.05)
    hold, _ = await inv.hold(eid, req(customer="other", ga=3, seats=["A1"]))  # all 3 GA back, seat free
    assert hold["tickets"] == 4
    await inv.hold(eid, req(customer="same", seats=["A2", "A3"]))  # the limit counts no expired holds
    await zones(inv, eid)
    await inv.unload_event(eid)


async def test_an_active_hold_outlives_any_reaping_delay(any_redis):
    """An active hold's record has no TTL: with nothing reaping for longer than hold_retention_seconds past
    its expiry, it must still be there to give its stock, seat and customer count back. (With a TTL of
    ttl + retention the record vanished first and its stock stayed held for good.)"""
    s = Settings(redis_url="redis://unused", database_url="postgresql://unused", hold_retention_seconds=1)
    inv = Inventory(any_redis, s)
    eid = new_event_id("outlive")
    await inv.load_event(spec(eid, ga=2, seats=2, per_customer=2))
    try:
        hold, _ = await inv.hold(eid, req(customer="alice", ttl=1, ga=1, seats=["A1"]))
        assert await any_redis.ttl(keys.hold(eid, hold["hold_id"])) == -1  # no TTL while active
        await asyncio.sleep(2.2)  # past expiry + retention, and nothing reaped
        assert await inv.reap(eid) == 1
        z = await zones(inv, eid)
        assert (z["ga"]["available"], z["s"]["available"]) == (2, 2)
        assert await any_redis.hget(keys.customers(eid), "alice") is None
        assert 0 < await any_redis.ttl(keys.hold(eid, hold["hold_id"])) <= 1  # ended: kept for retention
        await inv.hold(eid, req(customer="alice", ga=1, seats=["A1"]))  # her limit and the seat are free
    finally:
        await inv.unload_event(eid)


async def test_a_refused_hold_reaps_a_bounded_number_of_batches_and_none_that_cannot_help(any_redis):
    """A refusal reaps expired holds only if they could change it (held stock or seats; not sold ones, not
    a request over the customer limit on its own) and at most 10 reap batches a call, so one hopeless hold
    never blocks Redis to reap a whole backlog (the sweeper does that, a batch per call). A seat's own
    expired hold is settled directly, wherever it waits in the queue."""
    s = Settings(redis_url="redis://unused", database_url="postgresql://unused", reap_batch=1)
    inv = Inventory(any_redis, s)
    eid = new_event_id("budget")
    await inv.load_event(spec(eid, ga=2, seats=32, per_customer=2))
    expiry = keys.expiry(eid)
    try:
        for i in range(1, 31):  # 30 seat holds that will expire, waiting to be reaped, oldest first
            await inv.hold(eid, req(customer=f"c{i}", ttl=1, seats=[f"A{i}"]))
            await asyncio.sleep(0.002)  # distinct expiry times: the queue's order is the holds' order
        bought, _ = await inv.hold(eid, req(customer="buyer", ga=1, seats=["A31"]))
        await inv.confirm(eid, bought["hold_id"], "pay")  # ga: 1 sold; A31 sold
        await inv.hold(eid, req(customer="holder", ga=1, seats=["A32"]))  # ga: 1 held, A32 held, both active
        await asyncio.sleep(1.05)
        assert await any_redis.zcard(expiry) == 31

        # Sold stock, a sold seat, a seat of an active hold, a request over the limit on its own: no reaping.
        assert await code_of(inv.hold(eid, req(customer="x", ga=2))) == "sold_out"  # > available + held
        assert await code_of(inv.hold(eid, req(customer="x", seats=["A31"]))) == "seats_unavailable"
        assert await code_of(inv.hold(eid, req(customer="x", seats=["A32"]))) == "seats_unavailable"
        assert await code_of(inv.hold(eid, req(customer="x", seats=["A1", "A2", "A3"]))) == "limit_exceeded"
        assert await any_redis.zcard(expiry) == 31

        # The newest expired hold's seat: settled directly, nothing else reaped.
        await inv.hold(eid, req(customer="y", seats=["A30"]))
        assert await any_redis.zcard(expiry) == 31 - 1 + 1  # A30's hold out, y's hold in

        # Held stock could come back (the active GA hold's, in fact): 10 batches of 1 reaped, then it gives up.
        assert await code_of(inv.hold(eid, req(customer="x", ga=1))) == "sold_out"
        assert await any_redis.zcard(expiry) == 31 - 10
        await zones(inv, eid)
    finally:
        await inv.unload_event(eid)


async def test_a_seat_refusal_lists_only_seats_really_taken(any_redis):
    """Refused for a sold seat, a hold still settles the run-out hold of another seat it asked for, so the
    reply does not name that free seat as taken. (Found by a model-based test on Redis 6.2.)"""
    inv = Inventory(any_redis, Settings(redis_url="redis://unused", database_url="postgresql://unused"))
    eid = new_event_id("taken")
    await inv.load_event(spec(eid, seats=3))
    try:
        sold, _ = await inv.hold(eid, req(customer="a", seats=["A1"]))
        await inv.confirm(eid, sold["hold_id"], "pay")
        await inv.hold(eid, req(customer="b", ttl=1, seats=["A2"]))
        await asyncio.sleep(1.05)
        with pytest.raises(DomainError) as refused:
            await inv.hold(eid, req(customer="c", seats=["A1", "A2"]))
        assert refused.value.details["seats"] == [{"zone_id": "s", "seat": "A1"}]
        await inv.hold(eid, req(customer="c", seats=["A2"]))
    finally:
        await inv.unload_event(eid)


@pytest.mark.parametrize("seat_first", [False, True])
async def test_a_seats_run_out_hold_is_settled_when_a_general_admission_item_is_short_too(
    any_redis, seat_first
):
    """The general-admission item is short (its stock in a run-out hold at the head of the reaping queue), the
    seat's run-out hold waits at the tail, past the 10 batches: the seat is settled directly all the same, the
    head reaped, and the hold granted, whichever item comes first. (Found by review: the seat's holders were
    only looked at when no general-admission item was short.)"""
    inv = Inventory(
        any_redis, Settings(redis_url="redis://unused", database_url="postgresql://unused", reap_batch=1)
    )
    eid = new_event_id("short")
    await inv.load_event(spec(eid, ga=1, seats=30))
    try:
        await inv.hold(eid, req(customer="g", ttl=1, ga=1))
        for i in range(2, 22):
            await asyncio.sleep(0.002)  # distinct expiry times: the queue's order is the holds' order
            await inv.hold(eid, req(customer=f"o{i}", ttl=1, seats=[f"A{i}"]))
        await asyncio.sleep(0.002)
        await inv.hold(eid, req(customer="h", ttl=1, seats=["A1"]))
        await asyncio.sleep(1.05)
        items = [{"zone_id": "ga", "quantity": 1}, {"zone_id": "s", "seats": ["A1"]}]
        body = {"customer_id": "x", "items": items[::-1] if seat_first else items}
        hold, _ = await inv.hold(eid, HoldRequest.model_validate(body))
        assert hold["tickets"] == 2
        await zones(inv, eid)
    finally:
        await inv.unload_event(eid)


def test_ids_are_unique_and_a_forked_child_never_reuses_its_parents():
    """new_id hands out os.urandom bytes read ahead in 4 KiB; a fork must not copy what is left of them."""
    import os

    from service.inventory import new_id

    first = new_id("h")  # the parent now holds unused random bytes
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.write(w, new_id("h").encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    child = os.read(r, 100).decode()
    os.close(r)
    ours = new_id("h")
    assert child != ours and child != first
    ids = {new_id("o") for _ in range(2000)}
    assert len(ids) == 2000 and all(len(i) == 34 and i.startswith("o_") for i in ids)


# Holds batched per event and event-loop tick (ScriptRunner.batched, lua/hold.lua) ----------------------


async def evalsha_calls(client) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_holds_of_one_tick_go_to_redis_as_one_call_per_event(settings):
    """The holds an event gets in one tick are one EVALSHA (at most MAX_BATCH each); each gets its own answer,
    as if they had run one by one: stock runs out part-way, a reused idempotency key replays the first hold."""
    from loadtests.local import throwaway_redis
    from service.scripts import MAX_BATCH

    with throwaway_redis() as url:  # a private server: nothing else's EVALSHA is counted
        await _one_call_per_event(url, MAX_BATCH)


async def _one_call_per_event(url: str, max_batch: int) -> None:
    client = aioredis.Redis.from_url(url)
    inv = Inventory(client, Settings(redis_url=url, database_url="postgresql://unused"))
    eid = new_event_id("batch")
    await inv.load_event(spec(eid, ga=5, seats=2, per_customer=1000))
    await inv.runner.load()
    await inv.availability(eid)  # the auto-pipeline is connected
    try:
        before = await evalsha_calls(client)
        outcomes = await asyncio.gather(
            *(inv.hold(eid, req(customer=f"c{i}", ga=1)) for i in range(8)),
            inv.hold(eid, req(customer="k", seats=["A1"]), "same-key"),
            inv.hold(eid, req(customer="k", seats=["A1"]), "same-key"),
            inv.hold(eid, req(customer="other", seats=["A1", "A2"])),
            return_exceptions=True,
        )
        assert await evalsha_calls(client) - before == 1
        created = [o for o in outcomes[:8] if isinstance(o, tuple)]
        refused = [o for o in outcomes[:8] if isinstance(o, DomainError)]
        assert len(created) == 5 and [e.code for e in refused] == ["sold_out"] * 3
        (first, replay1), (again, replay2) = outcomes[8], outcomes[9]
        assert (replay1, replay2) == (False, True) and again["hold_id"] == first["hold_id"]
        assert isinstance(outcomes[10], DomainError) and outcomes[10].code == "seats_unavailable"
        z = await zones(inv, eid)
        assert (z["ga"]["held"], z["s"]["held"]) == (5, 1)

        before = await evalsha_calls(client)
        many = await asyncio.gather(
            *(inv.hold(eid, req(customer=f"m{i}", ga=1)) for i in range(2 * max_batch + 1)),
            return_exceptions=True,
        )
        assert await evalsha_calls(client) - before == 3
        assert all(isinstance(o, DomainError) and o.code == "sold_out" for o in many)
    finally:
        await inv.unload_event(eid)
        inv.close()
        await client.aclose()


async def test_holds_of_one_call_with_different_numbers_each_get_their_own(inv):
    """lua/includes/common.lua int() converts each distinct number once per script call and reuses the string:
    holds of one call with different quantities, prices and TTLs (and a release giving them back) must each
    be counted with their own numbers."""
    inv, eid = inv
    reqs = [
        req(customer="a", ga=1, ttl=60),
        req(customer="b", ga=3, ttl=120),
        req(customer="a", ga=2, ttl=60),
        req(customer="c", ttl=120, ga=1, seats=["A1", "A2"]),
    ]
    holds = [h for h, _ in await asyncio.gather(*(inv.hold(eid, r) for r in reqs))]
    assert [h["tickets"] for h in holds] == [1, 3, 2, 3]
    assert [h["amount_cents"] for h in holds] == [1000, 3000, 2000, 11000]
    assert [h["expires_at_ms"] - h["created_at_ms"] for h in holds] == [60_000, 120_000, 60_000, 120_000]
    stored = [await inv.get_hold(eid, h["hold_id"]) for h in holds]
    fields = ("tickets", "amount_cents", "created_at_ms", "expires_at_ms")
    assert [[s[k] for k in fields] for s in stored] == [[h[k] for k in fields] for h in holds]
    z = await zones(inv, eid)
    assert (z["ga"]["available"], z["ga"]["held"], z["s"]["held"]) == (3, 7, 2)
    customers = await inv.client.hgetall(keys.customers(eid))
    assert {k.decode(): int(v) for k, v in customers.items()} == {"a": 3, "b": 3, "c": 3}
    await asyncio.gather(inv.release(eid, holds[1]["hold_id"]), inv.release(eid, holds[3]["hold_id"]))
    z = await zones(inv, eid)
    assert (z["ga"]["available"], z["ga"]["held"], z["s"]["held"]) == (7, 3, 0)
    customers = await inv.client.hgetall(keys.customers(eid))
    assert {k.decode(): int(v) for k, v in customers.items()} == {"a": 3}


async def test_a_hold_that_fails_inside_redis_does_not_fail_its_batch(any_redis):
    """One item the script cannot run (here: items that are not JSON) answers its own error; the rest stand."""
    from redis.exceptions import ResponseError

    inv = Inventory(any_redis, Settings(redis_url="redis://unused", database_url="postgresql://unused"))
    eid = new_event_id("batchfail")
    await inv.load_event(spec(eid))
    try:
        meta, common = keys.meta(eid), inv._common()
        good = inv.runner.batched(
            "hold", meta, common, ("h_good", "c1", 0, b'[{"zone_id":"ga","quantity":2}]', "")
        )
        bad = inv.runner.batched("hold", meta, common, ("h_bad", "c2", 0, b"not json", ""))
        # fails at its last write (SET ... EX with a TTL that is not a number), after its stock moved: what it
        # wrote stays, as with any script error, and the next hold still runs
        late = inv.runner.batched(
            "hold", meta, common, ("h_late", "c3", 0, b'[{"zone_id":"ga","quantity":1}]', "sha x key-1")
        )
        after = inv.runner.batched(
            "hold", meta, common, ("h_after", "c4", 0, b'[{"zone_id":"ga","quantity":3}]', "")
        )
        results = await asyncio.gather(good, bad, late, after, return_exceptions=True)
        assert results[0][0] == 2 and results[3][0] == 3  # tickets of the created holds
        assert isinstance(results[1], ResponseError) and isinstance(results[2], ResponseError)
        assert (await inv.get_hold(eid, "h_good"))["status"] == "active"
        assert (await inv.get_hold(eid, "h_after"))["status"] == "active"
        assert (await zones(inv, eid))["ga"]["held"] == 2 + 1 + 3
    finally:
        await inv.unload_event(eid)
        inv.close()


async def test_a_batch_that_cannot_be_sent_fails_only_its_own_holds(settings):
    """An argument hiredis cannot pack fails that batch's holds; another event's batch of the tick still runs."""
    async with private_inventory() as (_, inv):
        a, b = new_event_id("sendfail"), new_event_id("sendok")
        for eid in (a, b):
            await inv.load_event(spec(eid))
        await inv.availability(a)  # the auto-pipeline is connected
        item = b'[{"zone_id":"ga","quantity":1}]'
        broken = inv.runner.batched("hold", keys.meta(a), inv._common(), ("h_a", None, 0, item, ""))
        fine = inv.runner.batched("hold", keys.meta(b), inv._common(), ("h_b", "c", 0, item, ""))
        results = await asyncio.wait_for(asyncio.gather(broken, fine, return_exceptions=True), 5)
        assert isinstance(results[0], TypeError) and results[1][0] == 1


async def test_without_auto_pipelining_each_hold_is_its_own_call(settings):
    from loadtests.local import throwaway_redis

    with throwaway_redis() as url:
        await _one_call_per_hold(url)


async def _one_call_per_hold(url: str) -> None:
    client = aioredis.Redis.from_url(url)
    s = Settings(redis_url=url, database_url="postgresql://unused", auto_pipeline=False)
    inv = Inventory(client, s)
    eid = new_event_id("nobatch")
    await inv.load_event(spec(eid))
    await inv.runner.load()
    try:
        before = await evalsha_calls(client)
        held = await asyncio.gather(*(inv.hold(eid, req(customer=f"c{i}", ga=1)) for i in range(3)))
        assert await evalsha_calls(client) - before == 3
        assert all(not replay for _, replay in held)
    finally:
        await inv.unload_event(eid)
        await client.aclose()


async def test_holds_of_one_call_see_each_others_stock_through_reaping_and_replays(any_redis):
    """lua/hold.lua reads a zone once per call and writes its counters once, at the end: each hold must
    still see what the call's earlier holds took, a refusal that reaps must see the stock it got back, and
    so must a hold after a replay that settled an expired hold."""
    inv = Inventory(any_redis, Settings(redis_url="redis://unused", database_url="postgresql://unused"))
    eid = new_event_id("zonecache")
    await inv.load_event(spec(eid, ga=6))
    meta, common = keys.meta(eid), inv._common()

    def hold(hold_id: str, items: bytes) -> asyncio.Future:
        return inv.runner.batched("hold", meta, common, (hold_id, f"c-{hold_id}", 0, items, ""))

    def ga(n: int) -> bytes:
        return orjson.dumps([{"zone_id": "ga", "quantity": n}])

    try:
        await inv.runner.run("hold", [meta], [*common, "h_x", "c-x", 1, ga(1), ""])  # runs out, not reaped
        await asyncio.sleep(1.05)
        # one call: 2 + 3 of the 5 left; the next finds none until it reaps h_x; the last finds none at all
        results = await asyncio.gather(
            hold("h1", ga(2)), hold("h2", ga(3)), hold("h3", ga(1)), hold("h4", ga(1)), return_exceptions=True
        )
        assert [r[0] for r in results[:3]] == [2, 3, 1]
        refused = orjson.loads(results[3])
        assert refused["err"] == "sold_out" and refused["details"]["available"] == 0
        assert (await inv.get_hold(eid, "h_x"))["status"] == "expired"
        z = (await zones(inv, eid))["ga"]
        assert (z["available"], z["held"]) == (0, 6)

        await inv.release(eid, "h3")  # 1 available again, then held by h_y, which runs out
        await inv.runner.run("hold", [meta], [*common, "h_y", "c-y", 1, ga(1), ""])
        await asyncio.sleep(1.05)
        seats_on_ga = orjson.dumps([{"zone_id": "ga", "seats": ["A1"]}])
        # one call: a refusal that reads the zone (none available), then h_y sent again (a replay that
        # ends it as expired and gives its ticket back), then a hold that needs that ticket
        results = await asyncio.gather(
            hold("h5", seats_on_ga), hold("h_y", ga(1)), hold("h6", ga(1)), return_exceptions=True
        )
        assert orjson.loads(results[0])["err"] == "invalid_item"
        replay = orjson.loads(results[1])
        assert replay["replay"] is False and replay["hold"]["status"] == "expired"
        assert results[2][0] == 1
        z = (await zones(inv, eid))["ga"]
        assert (z["available"], z["held"]) == (0, 6)
    finally:
        await inv.unload_event(eid)
        inv.close()


async def test_a_zone_whose_counters_cannot_be_written_fails_neither_the_call_nor_other_zones(any_redis):
    """lua/hold.lua writes a call's zone counters after its holds have been answered: a zone whose counters
    were corrupted (not integers; seated holds never read 'available') is skipped, the call's holds keep
    their replies and the other zones' counters are still written (found by review: the whole call used to
    fail after its holds were written, and a GA zone could be left without its moves)."""
    inv = Inventory(any_redis, Settings(redis_url="redis://unused", database_url="postgresql://unused"))
    eid = new_event_id("corrupt")
    await inv.load_event(spec(eid, ga=5))
    try:
        await any_redis.hset(keys.zone(eid, "s"), "available", "x")
        meta, common = keys.meta(eid), inv._common()
        seat = orjson.dumps([{"zone_id": "s", "seats": ["A1"]}])
        results = await asyncio.gather(
            # the seated zone first: its write fails before the GA zone's is reached
            inv.runner.batched("hold", meta, common, ("h_s", "c1", 0, seat, "")),
            inv.runner.batched(
                "hold", meta, common, ("h_ga", "c2", 0, orjson.dumps([{"zone_id": "ga", "quantity": 2}]), "")
            ),
        )
        assert [r[0] for r in results] == [1, 2]
        ga = await any_redis.hmget(keys.zone(eid, "ga"), "available", "held")
        assert [int(v) for v in ga] == [3, 2]
        assert (await inv.get_hold(eid, "h_s"))["status"] == "active"
    finally:
        await inv.unload_event(eid)
        inv.close()


# Confirms batched per event and event-loop tick (ScriptRunner.batched, lua/confirm.lua) -----------------


async def test_confirms_of_one_tick_go_to_redis_as_one_call_per_event(settings):
    """The confirms an event gets in one tick are one EVALSHA; each gets its own answer, as if they had run
    one by one: a double click confirms once, and released, expired and unknown holds are refused."""
    async with private_inventory() as (client, inv):
        eid = new_event_id("cbatch")
        await inv.load_event(spec(eid, ga=10, seats=4))
        try:
            ga, _ = await inv.hold(eid, req(customer="a", ga=3))
            seated, _ = await inv.hold(eid, req(customer="b", ga=1, seats=["A1", "A2"]))
            released, _ = await inv.hold(eid, req(customer="c", ga=2))
            await inv.release(eid, released["hold_id"])
            expired, _ = await inv.hold(eid, req(customer="d", ttl=1, seats=["A3"]))
            await asyncio.sleep(1.05)  # runs out; not reaped yet
            before = await evalsha_calls(client)
            outcomes = await asyncio.gather(
                inv.confirm(eid, ga["hold_id"], "pay-1"),
                inv.confirm(eid, ga["hold_id"], "pay-2"),  # a double click in the same tick
                inv.confirm(eid, seated["hold_id"], "pay-3"),
                inv.confirm(eid, released["hold_id"], "pay-4"),
                inv.confirm(eid, expired["hold_id"], "pay-5"),
                inv.confirm(eid, "h_nope", "pay-6"),
                return_exceptions=True,
            )
            assert await evalsha_calls(client) - before == 1
            (first, created1), (again, created2), (order, created3) = outcomes[:3]
            assert (created1, created2, created3) == (True, False, True)
            assert again == first and first["payment_ref"] == "pay-1" and first["hold_id"] == ga["hold_id"]
            assert order["items"] == seated["items"] and order["amount_cents"] == seated["amount_cents"]
            assert [o.code for o in outcomes[3:]] == ["hold_released", "hold_expired", "hold_not_found"]
            z = await zones(inv, eid)
            assert (z["ga"]["held"], z["ga"]["sold"], z["ga"]["available"]) == (0, 4, 6)
            assert (z["s"]["held"], z["s"]["sold"], z["s"]["available"]) == (0, 2, 2)  # A3 came back
            entries = await client.xrange(keys.outbox(eid))
            assert [orjson.loads(f[b"order"]) for _, f in entries] == [first, order]  # the replies' orders
            owners = await client.hgetall(keys.owners(eid, "s"))
            assert owners == {
                b"A1": f"s:{order['order_id']}".encode(),
                b"A2": f"s:{order['order_id']}".encode(),
            }
            assert await inv.find_order(eid, first["order_id"]) == first
        finally:
            await inv.unload_event(eid)


async def test_a_confirm_that_fails_inside_redis_does_not_fail_its_batch(any_redis):
    """One confirm the script cannot run (here: a hold record whose items are not JSON) answers its own
    error; the confirms before and after it in the same call stand, and their stock is counted as sold."""
    from redis.exceptions import ResponseError

    inv = Inventory(any_redis, Settings(redis_url="redis://unused", database_url="postgresql://unused"))
    eid = new_event_id("cbatchfail")
    await inv.load_event(spec(eid))
    try:
        holds = [
            h
            for h, _ in await asyncio.gather(*(inv.hold(eid, req(customer=f"c{i}", ga=2)) for i in range(3)))
        ]
        await any_redis.hset(keys.hold(eid, holds[1]["hold_id"]), "items", "not json")
        meta, common = keys.meta(eid), [*inv._common(), ""]
        results = await asyncio.gather(
            *(
                inv.runner.batched("confirm", meta, common, (h["hold_id"], f"o_{i}", "pay"))
                for i, h in enumerate(holds)
            ),
            return_exceptions=True,
        )
        assert isinstance(results[1], ResponseError)
        assert [orjson.loads(results[i])["order"]["order_id"] for i in (0, 2)] == ["o_0", "o_2"]
        raw = await any_redis.hgetall(keys.zone(eid, "ga"))
        assert (int(raw[b"held"]), int(raw[b"sold"])) == (2, 4)
        assert len(await any_redis.xrange(keys.outbox(eid))) == 2
    finally:
        await inv.unload_event(eid)
        inv.close()


async def test_without_auto_pipelining_each_confirm_is_its_own_call(settings):
    async with private_inventory(auto_pipeline=False) as (client, inv):
        eid = new_event_id("cnobatch")
        await inv.load_event(spec(eid))
        try:
            holds = [
                h
                for h, _ in await asyncio.gather(
                    *(inv.hold(eid, req(customer=f"c{i}", ga=1)) for i in range(3))
                )
            ]
            before = await evalsha_calls(client)
            confirmed = await asyncio.gather(*(inv.confirm(eid, h["hold_id"], "pay") for h in holds))
            assert await evalsha_calls(client) - before == 3
            assert all(created for _, created in confirmed)
            assert (await zones(inv, eid))["ga"]["sold"] == 3
        finally:
            await inv.unload_event(eid)


async def test_a_confirm_refused_for_memory_moves_no_stock_even_when_its_call_writes_later(settings):
    """Out of memory, Redis refuses a script's writes until one succeeds. A confirm whose first write is
    refused must leave no ticket counted as sold, even when a later confirm of the same call does write
    (here: it settles an expired hold that the call's reaping did not see, whose ZREM Redis allows)."""
    from redis.exceptions import OutOfMemoryError

    async with private_inventory() as (client, inv):
        eid = new_event_id("oom")
        await inv.load_event(spec(eid, ga=10))
        try:
            paid, _ = await inv.hold(eid, req(customer="a", ga=2))
            lapsed, _ = await inv.hold(eid, req(customer="x", ttl=1, ga=1))
            await client.zrem(keys.expiry(eid), lapsed["hold_id"])  # not in the reaping queue
            await asyncio.sleep(1.05)
            await client.config_set("maxmemory-policy", "noeviction")
            await client.config_set("maxmemory", int((await client.info("memory"))["used_memory"]) - 100_000)
            try:
                outcomes = await asyncio.gather(
                    inv.confirm(eid, paid["hold_id"], "pay"),
                    inv.confirm(eid, lapsed["hold_id"], "pay"),
                    return_exceptions=True,
                )
            finally:
                await client.config_set("maxmemory", 0)
            assert isinstance(outcomes[0], OutOfMemoryError)
            assert isinstance(outcomes[1], DomainError) and outcomes[1].code == "hold_expired"
            assert (await inv.get_hold(eid, paid["hold_id"]))["status"] == "active"
            z = (await zones(inv, eid))["ga"]
            assert (z["available"], z["held"], z["sold"]) == (8, 2, 0)
            assert await client.xlen(keys.outbox(eid)) == 0
            assert await inv.release(eid, paid["hold_id"]) == "released"
            z = (await zones(inv, eid))["ga"]
            assert (z["available"], z["held"], z["sold"]) == (10, 0, 0)
        finally:
            await inv.unload_event(eid)
