"""The oversell audit: a clean small sale passes; each fault planted behind the service's back fails it.

Sales run through ``Inventory`` (the scripts) on a private redis-server, so no other test's worker can
consume these outboxes; orders are written through by the real ``OutboxConsumer`` into the session's
PostgreSQL database.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator

import orjson
import pytest
import redis.asyncio as aioredis
from conftest import event_body, new_event_id

from loadtests.audit import (
    CHECKS,
    NEEDS_REDIS,
    AckError,
    ack_files,
    audit_event,
    load_acks,
    outbox_backlog,
    run_cli,
)
from service import catalog, keys
from service.domain import EventSpec, HoldRequest
from service.inventory import Inventory
from service.settings import Settings
from workers.outbox import OutboxConsumer
from workers.sweeper import run_sweeper


@pytest.fixture(scope="module")
async def rclient(private_settings) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(private_settings.redis_url)
    yield r
    await r.aclose()


@pytest.fixture
def inventory(rclient, private_settings) -> Inventory:
    return Inventory(rclient, private_settings)


def confirmed_ack(event_id: str, order: dict, hold: dict) -> dict:
    """The line the Locust scenario writes for a 201."""
    return {
        "kind": "confirmed",
        "event_id": event_id,
        "order_id": order["order_id"],
        "hold_id": hold["hold_id"],
        "items": order["items"],
        "confirmed_at_ms": order["confirmed_at_ms"],
        "expires_at_ms": hold["expires_at_ms"],
    }


async def write_through(rclient, pg, settings: Settings, event_id: str) -> None:
    consumer = OutboxConsumer(rclient, pg, settings)
    while await consumer.run_once([event_id]):
        pass


async def hold(
    inventory: Inventory, event_id: str, customer: str, items: list[dict], ttl: int | None = None
) -> dict:
    req = HoldRequest.model_validate({"customer_id": customer, "items": items, "ttl_seconds": ttl})
    h, _ = await inventory.hold(event_id, req)
    return h


async def small_sale(inventory, rclient, pg, settings, *, abandon: bool = False) -> tuple[str, list[dict]]:
    """GA zone of 10 and 4 seats: 3 GA + seats A1, A2 confirmed, 2 GA released, optionally 1 GA + A3 abandoned."""
    eid = new_event_id("aud")
    spec = EventSpec.model_validate(
        event_body(
            eid,
            zones=[
                {"zone_id": "ga", "kind": "ga", "capacity": 10, "price_cents": 1000},
                {"zone_id": "s", "kind": "seated", "price_cents": 2000, "rows": {"A": 4}},
            ],
        )
    )
    await catalog.create_event(pg, inventory, spec)
    acks = []
    for customer, items in (
        ("c1", [{"zone_id": "ga", "quantity": 3}]),
        ("c2", [{"zone_id": "s", "seats": ["A1", "A2"]}]),
    ):
        h = await hold(inventory, eid, customer, items)
        order, created = await inventory.confirm(eid, h["hold_id"], f"pay-{customer}")
        assert created
        acks.append(confirmed_ack(eid, order, h))
    released = await hold(inventory, eid, "c3", [{"zone_id": "ga", "quantity": 2}])
    assert await inventory.release(eid, released["hold_id"]) == "released"
    acks.append({"kind": "released", "event_id": eid, "hold_id": released["hold_id"]})
    if abandon:
        left = await hold(
            inventory, eid, "c4", [{"zone_id": "ga", "quantity": 1}, {"zone_id": "s", "seats": ["A3"]}], ttl=1
        )
        acks.append({"kind": "abandoned", "event_id": eid, "hold_id": left["hold_id"]})
    await write_through(rclient, pg, settings, eid)
    return eid, acks


def checks_failed(report) -> set[str]:
    assert set(v.check for v in report.violations) <= set(CHECKS)
    return {v.check for v in report.violations}


@contextlib.asynccontextmanager
async def sweeper(inventory: Inventory, settings: Settings) -> AsyncIterator[None]:
    """The worker's expiry sweeper (``workers.sweeper.run_sweeper``), running while the block runs."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_sweeper(inventory, settings, stop))
    try:
        yield
    finally:
        stop.set()
        await task


async def bounded_audit(rclient, pg, eid, acks, settings, *, reap_grace_seconds: float, bound_seconds: float):
    """An audit that waits at most 1 s for the drain and 1 s for holds to expire, plus ``reap_grace_seconds``;
    asyncio.TimeoutError if it takes longer than ``bound_seconds`` in all."""
    return await asyncio.wait_for(
        audit_event(
            rclient,
            pg,
            eid,
            acks,
            drain_timeout_seconds=1,
            hold_expiry_timeout_seconds=1,
            reap_grace_seconds=reap_grace_seconds,
            settings=settings,
        ),
        timeout=bound_seconds,
    )


async def test_clean_sale_passes(inventory, rclient, pg, private_settings, tmp_path):
    eid, acks = await small_sale(inventory, rclient, pg, private_settings, abandon=True)
    (tmp_path / "w1.jsonl").write_bytes(b"".join(orjson.dumps(a) + b"\n" for a in acks[:2]))
    (tmp_path / "w2.jsonl").write_bytes(b"".join(orjson.dumps(a) + b"\n" for a in acks[2:]) + b"\n")
    assert load_acks(tmp_path, eid) == acks and load_acks(tmp_path, "other-event") == []

    # the service (the worker's sweeper) reaps the abandoned hold, as in a deployment
    async with sweeper(inventory, private_settings):
        report = await audit_event(rclient, pg, eid, acks, drain_timeout_seconds=5, settings=private_settings)

    assert report.violations == []
    assert report.ok
    zones = {z.zone_id: z for z in report.zones}
    assert (
        zones["ga"].redis_sold,
        zones["ga"].pg_sold,
        zones["ga"].pg_counter,
        zones["ga"].redis_available,
    ) == (3, 3, 3, 7)
    assert (zones["s"].redis_sold, zones["s"].pg_sold, zones["s"].redis_held, zones["s"].redis_available) == (
        2,
        2,
        0,
        2,
    )
    assert (report.acks, report.orders, report.unacked_orders, report.holds_reaped) == (2, 2, 0, 0)
    assert await rclient.hget(keys.hold(eid, acks[-1]["hold_id"]), "status") == b"expired"
    assert report.write_lag_ms["p99"] >= report.write_lag_ms["p50"] >= 0


async def test_a_hold_expiring_just_before_the_expiry_timeout_still_gets_its_reap_grace(
    inventory, rclient, pg, private_settings
):
    """The abandoned hold (TTL 1 s) expires just before the audit's 1-s wait for TTLs ends; a slow sweeper
    (every 1.5 s) reaps it after that wait but well within the grace: the run passes, with nothing left active
    and nothing reaped by the audit."""
    eid, acks = await small_sale(inventory, rclient, pg, private_settings, abandon=True)
    slow = private_settings.model_copy(update={"sweeper_interval_seconds": 1.5})

    async with sweeper(Inventory(rclient, slow), slow):
        report = await audit_event(
            rclient, pg, eid, acks, drain_timeout_seconds=5, hold_expiry_timeout_seconds=1, settings=slow
        )

    assert report.violations == []
    assert (report.active_holds, report.holds_reaped) == (0, 0)


async def test_an_expired_hold_the_service_never_reaped_fails_the_reaping_check(
    inventory, rclient, pg, private_settings
):
    """No sweeper runs (a deployment without `boxoffice worker`, or its sweeper failing): the abandoned hold
    is still active after its expiry and the grace. The audit fails the run for it, then reaps it, so the stock
    checks still run and pass."""
    eid, acks = await small_sale(inventory, rclient, pg, private_settings, abandon=True)

    report = await audit_event(
        rclient,
        pg,
        eid,
        acks,
        drain_timeout_seconds=5,
        hold_expiry_timeout_seconds=1,  # the hold expires within it: its grace counts, not this wait
        reap_grace_seconds=0.5,
        settings=private_settings,
    )

    assert checks_failed(report) == {"reaping"}, report.violations
    (detail,) = [v.detail for v in report.violations]
    assert detail.startswith("1 expired holds were still active 0.5 s after their expiry"), detail
    assert report.holds_reaped == 1 and report.active_holds == 0
    assert await rclient.hget(keys.hold(eid, acks[-1]["hold_id"]), "status") == b"expired"
    assert {z.zone_id: z.redis_available for z in report.zones} == {"ga": 7, "s": 2}  # its stock came back


def test_load_acks_finds_a_locust_runs_files_skips_a_cut_last_line_and_names_a_bad_line(tmp_path):
    """Locust writes <acks-dir>/<event_id>/*.jsonl: the acks dir as given to Locust works. A writer killed
    mid-line leaves a cut last line (skipped); any other line that is not an ack is refused by file:line."""
    eid = "e1"
    ack = {
        "kind": "confirmed",
        "event_id": eid,
        "order_id": "o1",
        "hold_id": "h1",
        "items": [{"zone_id": "ga", "quantity": 2}],
    }
    ended = {"kind": "abandoned", "event_id": eid, "hold_id": "h2"}
    (tmp_path / eid).mkdir()
    f = tmp_path / eid / "host-1.jsonl"
    f.write_bytes(orjson.dumps(ack) + b"\n" + orjson.dumps(ended) + b"\n" + b'{"kind": "confi')
    assert load_acks(tmp_path, eid) == [ack, ended]
    assert load_acks(tmp_path / eid, eid) == [ack, ended]

    bad_lines = {
        b'{"kind": "confi': "not JSON",
        b"[1]": "not a JSON object",
        orjson.dumps({**ack, "items": None}): "no items",
        orjson.dumps({**ack, "items": [{"zone_id": "ga"}]}): "neither seats nor an integer quantity",
        orjson.dumps({**ack, "expires_at_ms": "soon"}): "expires_at_ms",
        orjson.dumps({"kind": "lost", "hold_id": "h3"}): "unknown kind",
    }
    for line, why in bad_lines.items():
        f.write_bytes(orjson.dumps(ack) + b"\n" + line + b"\n" + orjson.dumps(ended) + b"\n")
        with pytest.raises(AckError, match=f"host-1.jsonl:2: .*{why}"):
            load_acks(tmp_path, eid)


def test_an_acks_path_without_an_ack_file_of_the_event_is_refused(tmp_path, private_settings):
    """Acks read from the wrong place must not pass as "every 201 is in PostgreSQL": nothing would vouch.
    A Locust run writes its file as it starts, so a run that recorded nothing still has one."""
    (tmp_path / "other-event").mkdir()
    (tmp_path / "other-event" / "host-1.jsonl").write_bytes(b"")
    for path in (tmp_path, tmp_path / "missing"):
        assert run_cli(private_settings, event_id="e1", acks_file=path, drain_timeout_seconds=0) == 2
    other = {"kind": "abandoned", "event_id": "other-event", "hold_id": "h1"}
    (tmp_path / "other-event" / "host-1.jsonl").write_bytes(orjson.dumps(other) + b"\n")
    acks_of_another = tmp_path / "other-event"  # has *.jsonl, but of another event
    assert run_cli(private_settings, event_id="e1", acks_file=acks_of_another, drain_timeout_seconds=0) == 2
    (tmp_path / "e1").mkdir()
    (tmp_path / "e1" / "host-1.jsonl").write_bytes(b"")
    assert ack_files(tmp_path, "e1") == [tmp_path / "e1" / "host-1.jsonl"]
    assert load_acks(tmp_path, "e1") == []


async def test_a_run_that_recorded_no_ack_passes_when_redis_knows_the_orders(
    inventory, rclient, pg, private_settings
):
    """A re-run on an event whose every hold was refused: the first run's orders are unacked, not unknown."""
    eid, _ = await small_sale(inventory, rclient, pg, private_settings)
    report = await audit_event(rclient, pg, eid, [], drain_timeout_seconds=1, settings=private_settings)
    assert report.ok, report.violations
    assert report.unacked_orders == report.orders == 2


async def test_unacked_but_confirmed_order_is_not_a_violation(inventory, rclient, pg, private_settings):
    """A client that lost its 201 to a timeout: Redis knows the order, so it is counted, not flagged."""
    eid, acks = await small_sale(inventory, rclient, pg, private_settings)
    report = await audit_event(rclient, pg, eid, acks[1:], drain_timeout_seconds=1, settings=private_settings)
    assert report.ok, report.violations
    assert report.unacked_orders == 1


async def _plant_redis_sold(ctx):
    await ctx.rclient.hincrby(keys.zone(ctx.eid, "ga"), "sold", 1)
    await ctx.rclient.hincrby(keys.zone(ctx.eid, "ga"), "available", -1)


async def _plant_pg_order(ctx):
    async with ctx.pg.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO orders (order_id, event_id, hold_id, customer_id, amount_cents, payment_ref, confirmed_at)"
            " VALUES ('o_ghost_' || $1, $1, 'h_ghost_' || $1, 'ghost', 1000, 'cash', now())",
            ctx.eid,
        )
        await conn.execute(
            "INSERT INTO order_items (order_id, event_id, zone_id, seat, quantity)"
            " VALUES ('o_ghost_' || $1, $1, 'ga', NULL, 1)",
            ctx.eid,
        )
        await conn.execute("UPDATE zones SET sold = sold + 1 WHERE event_id = $1 AND zone_id = 'ga'", ctx.eid)


async def _plant_seat_sold_twice(ctx):
    """What a broken confirm would do: sell A1 again (Redis counters and outbox) and answer 201."""
    first = next(a for a in ctx.acks if a.get("items", [{}])[0].get("seats"))
    order = {
        "order_id": "o_twice",
        "event_id": ctx.eid,
        "hold_id": "h_twice",
        "customer_id": "c9",
        "items": [{"zone_id": "s", "seats": ["A1"]}],
        "amount_cents": 2000,
        "payment_ref": "p",
        "confirmed_at_ms": first["confirmed_at_ms"] + 1,
    }
    await ctx.rclient.hincrby(keys.zone(ctx.eid, "s"), "sold", 1)
    await ctx.rclient.hincrby(keys.zone(ctx.eid, "s"), "available", -1)
    await ctx.rclient.xadd(keys.outbox(ctx.eid), {"order": orjson.dumps(order)})
    ctx.acks.append(
        {"kind": "confirmed", **{k: order[k] for k in ("event_id", "order_id", "hold_id", "items")}}
    )
    await write_through(
        ctx.rclient, ctx.pg, ctx.settings, ctx.eid
    )  # PostgreSQL's unique seat index refuses it


async def _plant_stock_not_returned(ctx):
    await ctx.rclient.hincrby(keys.zone(ctx.eid, "ga"), "held", 1)
    await ctx.rclient.hincrby(keys.zone(ctx.eid, "ga"), "available", -1)


async def _plant_lost_write(ctx):
    ga = next(a for a in ctx.acks if a.get("kind") == "confirmed" and "quantity" in a["items"][0])
    async with ctx.pg.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM orders WHERE order_id = $1", ga["order_id"])
        await conn.execute("UPDATE zones SET sold = sold - 3 WHERE event_id = $1 AND zone_id = 'ga'", ctx.eid)


async def _plant_late_confirm(ctx):
    ctx.acks[0]["expires_at_ms"] = ctx.acks[0]["confirmed_at_ms"] - 1


async def _plant_unacked_late_confirm(ctx):
    """Its 201 was lost (no ack): the hold record in Redis still tells when the hold expired."""
    lost = ctx.acks.pop(0)
    await ctx.rclient.hset(keys.hold(ctx.eid, lost["hold_id"]), "expires_at_ms", lost["confirmed_at_ms"] - 1)


async def _plant_hold_confirmed_twice(ctx):
    ctx.acks.append({**ctx.acks[0], "order_id": "o_second"})


async def _plant_not_drained(ctx):
    h = await hold(ctx.inventory, ctx.eid, "c5", [{"zone_id": "ga", "quantity": 1}])
    order, _ = await ctx.inventory.confirm(ctx.eid, h["hold_id"], "pay")
    ctx.acks.append(confirmed_ack(ctx.eid, order, h))
    assert await outbox_backlog(ctx.rclient, ctx.eid) == 1


async def _plant_abandoned_hold_confirmed(ctx):
    h = await hold(ctx.inventory, ctx.eid, "c6", [{"zone_id": "ga", "quantity": 1}])
    await ctx.inventory.confirm(ctx.eid, h["hold_id"], "pay")
    ctx.acks.append({"kind": "abandoned", "event_id": ctx.eid, "hold_id": h["hold_id"]})
    await write_through(ctx.rclient, ctx.pg, ctx.settings, ctx.eid)


PLANTS = {
    "redis sold bumped": (_plant_redis_sold, {"redis_pg"}),
    "order inserted in PostgreSQL only": (_plant_pg_order, {"redis_pg", "unknown_orders"}),
    "seat sold twice": (_plant_seat_sold_twice, {"seats", "acks", "dead_letters", "redis_pg"}),
    "held stock not returned": (_plant_stock_not_returned, {"holds"}),
    "acked order lost": (_plant_lost_write, {"acks", "redis_pg"}),
    "confirmed after expiry": (_plant_late_confirm, {"late_confirms"}),
    "unacked order confirmed after expiry": (_plant_unacked_late_confirm, {"late_confirms"}),
    "hold confirmed into two orders": (_plant_hold_confirmed_twice, {"acks"}),
    "write-through not drained": (_plant_not_drained, {"drain", "acks", "redis_pg"}),
    "abandoned hold was confirmed": (_plant_abandoned_hold_confirmed, {"holds"}),
}


class _Ctx:
    def __init__(self, **kw):
        self.__dict__.update(kw)


@pytest.mark.parametrize("fault", list(PLANTS))
async def test_planted_fault_fails_the_audit(fault, inventory, rclient, pg, private_settings):
    eid, acks = await small_sale(inventory, rclient, pg, private_settings)
    plant, expected = PLANTS[fault]
    await plant(
        _Ctx(eid=eid, acks=acks, rclient=rclient, pg=pg, settings=private_settings, inventory=inventory)
    )

    report = await audit_event(rclient, pg, eid, acks, drain_timeout_seconds=0.3, settings=private_settings)

    assert not report.ok
    assert checks_failed(report) == expected, report.violations


async def test_unknown_event_fails(rclient, pg, private_settings):
    """Neither store knows the event (the audit pointed at the wrong servers, say): the run's acks still
    tell what is missing."""
    eid = new_event_id("nope")
    ack = {"kind": "confirmed", "event_id": eid, "order_id": "o_1", "hold_id": "h_1", "items": []}
    report = await audit_event(rclient, pg, eid, [ack], drain_timeout_seconds=0.1, settings=private_settings)
    assert checks_failed(report) == {"counters", "redis_pg", "acks"}, report.violations
    assert [v.detail for v in report.violations if v.check == "acks"] == [
        "acked order o_1 is not in PostgreSQL"
    ]


async def forget_in_redis(rclient, event_id: str) -> None:
    """What a Redis that lost the event (or a REDIS_URL that is not the service's) shows the audit."""
    gone = [k async for k in rclient.scan_iter(match=keys.prefix(event_id) + "*")]
    assert gone
    await rclient.unlink(*gone)
    await rclient.srem(keys.EVENTS_KEY, event_id)


async def test_an_event_missing_from_redis_still_has_postgresql_and_the_acks_checked(
    inventory, rclient, pg, private_settings
):
    """The durable record still answers for every acked order and seat; the checks that need Redis say
    they did not run instead of passing."""
    import io

    from rich.console import Console

    eid, acks = await small_sale(inventory, rclient, pg, private_settings)
    await forget_in_redis(rclient, eid)
    lost = acks.pop(0)  # a 201 the run never saw: without Redis, nothing tells a lost 201 from a ghost order

    report = await audit_event(rclient, pg, eid, acks, drain_timeout_seconds=5, settings=private_settings)
    assert not report.in_redis
    assert checks_failed(report) == {"counters"}, report.violations
    assert report.unacked_orders == 1
    assert [(z.zone_id, z.capacity, z.redis_sold, z.pg_sold, z.pg_counter) for z in report.zones] == [
        ("ga", 10, None, 3, 3),
        ("s", 4, None, 2, 2),
    ]
    rows = {name: (result, detail) for name, result, detail in report.check_rows()}
    assert [n for n, (r, _) in rows.items() if r == "not run"] == [
        "unknown_orders",
        "drain",
        "holds",
        "reaping",
    ]
    assert rows["counters"][0] == "1 violation(s)"
    assert all(r == "ok" for n, (r, _) in rows.items() if n not in ("counters", *NEEDS_REDIS)), rows
    assert rows["seats"][1].startswith("without Redis, only: ")
    out = io.StringIO()
    report.render(Console(file=out, width=200, color_system=None))
    ga_row = next(ln for ln in out.getvalue().splitlines() if ln.startswith("│ ga "))
    assert [c.strip() for c in ga_row.split("│")[4:7]] == ["-", "-", "-"], (
        ga_row
    )  # Redis sold, held, available

    # what PostgreSQL and the acks alone still catch: a lost write, a seat acked into two orders, and an
    # order that takes a zone past its capacity (in its items; zones.sold was not bumped)
    acks.insert(0, lost)
    await _plant_lost_write(_Ctx(eid=eid, acks=acks, pg=pg))
    seat_ack = next(a for a in acks if a.get("items", [{}])[0].get("seats"))
    acks.append({**seat_ack, "order_id": "o_again", "hold_id": "h_again"})
    async with pg.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO orders (order_id, event_id, hold_id, customer_id, amount_cents, payment_ref, confirmed_at)"
            " VALUES ('o_big', $1, 'h_big', 'big', 11000, 'cash', now())",
            eid,
        )
        await conn.execute(
            "INSERT INTO order_items (order_id, event_id, zone_id, seat, quantity)"
            " VALUES ('o_big', $1, 'ga', NULL, 11)",
            eid,
        )
    report = await audit_event(rclient, pg, eid, acks, drain_timeout_seconds=5, settings=private_settings)
    assert checks_failed(report) == {"counters", "acks", "seats", "capacity", "redis_pg"}, report.violations


async def test_holds_past_the_expiry_timeout_are_named_first_with_the_real_wait(
    inventory, rclient, pg, private_settings
):
    """A run whose holds live longer than the audit may wait (--hold-ttl above the timeout): the first
    ``holds`` violation says so, with the wait it really did and when the next hold expires, rather than
    reading as leaked stock behind zone counters."""
    eid, acks = await small_sale(inventory, rclient, pg, private_settings)
    await hold(inventory, eid, "late", [{"zone_id": "ga", "quantity": 1}], ttl=60)
    report = await audit_event(
        rclient,
        pg,
        eid,
        acks,
        drain_timeout_seconds=5,
        hold_expiry_timeout_seconds=1,
        settings=private_settings,
    )
    holds = [v.detail for v in report.violations if v.check == "holds"]
    assert holds and holds[0].startswith("1 holds still active: the next expires in "), holds
    waited = float(re.search(r"waited ([0-9.]+) s", holds[0]).group(1))
    assert waited < 1 and "past the 1 s" in holds[0]  # it did not wait: the next expiry is a minute away
    assert any("held 1" in d for d in holds[1:])


async def test_an_audit_without_acks_says_the_acks_check_was_skipped(
    inventory, rclient, pg, private_settings, capsys
):
    from rich.console import Console

    eid, _ = await small_sale(inventory, rclient, pg, private_settings)
    report = await audit_event(rclient, pg, eid, None, drain_timeout_seconds=5, settings=private_settings)
    assert report.ok and not report.acks_checked
    report.render(Console(width=200))
    acks_row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.lstrip("│ ").startswith("acks "))
    assert "skipped" in acks_row and "ok" not in acks_row


def test_an_unreachable_store_is_no_verdict(private_settings, capsys):
    from conftest import free_port

    settings = private_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    assert run_cli(settings, event_id="any", acks_file=None, drain_timeout_seconds=1) == 2
    assert "no verdict" in capsys.readouterr().out


def test_acks_of_an_earlier_sale_of_a_created_event_id_are_moved_aside(tmp_path):
    from loadtests.audit import set_aside_stale_acks

    assert set_aside_stale_acks(tmp_path, "rehearsal") is None  # nothing there
    (tmp_path / "rehearsal").mkdir()
    (tmp_path / "rehearsal" / "host-1.jsonl").write_text('{"kind": "confirmed"}\n')
    moved = set_aside_stale_acks(tmp_path, "rehearsal")
    assert moved is not None and moved.name.startswith("rehearsal.stale-")
    assert (moved / "host-1.jsonl").exists() and not (tmp_path / "rehearsal").exists()
    assert ack_files(tmp_path, "rehearsal") == []


def test_the_cli_reap_grace_defaults_to_the_audits_own():
    import inspect

    from loadtests.audit import REAP_GRACE_SECONDS
    from service.cli import audit

    assert inspect.signature(audit).parameters["reap_grace"].default.default == REAP_GRACE_SECONDS


async def test_a_clock_ahead_of_the_scripts_one_does_not_spin_nor_blame_the_service(
    inventory, rclient, pg, private_settings, monkeypatch
):
    """The audit reads the event's own Redis clock, the one its scripts use; were it to read a clock 4.5 s
    ahead of theirs, a 5-s hold would look overdue while a reap, on the scripts' clock, finds nothing to do.
    The audit then polls and gives up at its wait + grace + 0.5 s (~2 s here), instead of calling reap in a tight
    loop until the hold really expires, and does not count the hold as left unreaped by the service."""
    from loadtests import audit as audit_module

    real_now_ms = audit_module._redis_now_ms

    async def ahead(redis, event_id):
        return await real_now_ms(redis, event_id) + 4500

    monkeypatch.setattr(audit_module, "_redis_now_ms", ahead)
    eid, acks = await small_sale(inventory, rclient, pg, private_settings)
    await hold(inventory, eid, "skewed", [{"zone_id": "ga", "quantity": 1}], ttl=5)

    # the hold expires 5 s after it was made: a loop that waits for that fails the 3.5-s bound
    report = await bounded_audit(
        rclient, pg, eid, acks, private_settings, reap_grace_seconds=0.5, bound_seconds=3.5
    )
    assert report.active_holds == 1 and report.holds_reaped == 0
    assert "holds" in checks_failed(report) and "reaping" not in checks_failed(report)


async def test_the_wait_for_holds_ends_while_a_sale_keeps_making_holds(
    inventory, rclient, pg, private_settings
):
    """A sale still running during the audit: short holds keep expiring and the real sweeper keeps reaping
    them, so there is nearly always one that has just expired. The wait still ends by its timeout + grace, no
    hold reaped on time counts against the service, and the holds made meanwhile are reported active."""
    eid, acks = await small_sale(inventory, rclient, pg, private_settings)
    await inventory.client.hset(keys.zone(eid, "ga"), "available", 1_000_000)  # stock for a long trickle
    await inventory.client.hset(keys.zone(eid, "ga"), "capacity", 1_000_000 + 10)
    stop = asyncio.Event()

    async def trickle():
        n = 0
        while not stop.is_set():
            n += 1
            await hold(inventory, eid, f"t{n % 50}", [{"zone_id": "ga", "quantity": 1}], ttl=1)
            await asyncio.sleep(0.005)

    maker = asyncio.create_task(trickle())
    try:
        async with sweeper(inventory, private_settings):
            await asyncio.sleep(1.2)  # the first trickled holds have expired: the sweeper is at work
            started = asyncio.get_running_loop().time()
            report = await bounded_audit(
                rclient, pg, eid, acks, private_settings, reap_grace_seconds=1, bound_seconds=10
            )
            waited = asyncio.get_running_loop().time() - started
    finally:
        stop.set()
        await maker
    assert waited < 6, waited  # 1 s + 1 s grace + 0.5 s, and the snapshot's reads
    assert "reaping" not in checks_failed(report), report.violations
    assert report.active_holds > 0 and report.holds_reaped == 0
