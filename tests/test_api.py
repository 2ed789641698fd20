"""The JSON API over HTTP (in-process ASGI): the catalog, buying, and every error of the contract."""

from __future__ import annotations

import asyncio

import pytest
from conftest import ADMIN, event_body, new_event_id

from service.app import ROUTES
from service.http import ASGIEndpoint


def err(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["code"] == code, body
    assert set(body["error"]) == {"code", "message", "details"}
    return body["error"]


async def hold(client, eid, customer="c-1", headers=None, **body):
    body = {"customer_id": customer, **body}
    return await client.post(f"/v1/events/{eid}/holds", json=body, headers=headers or {})


# Catalog -----------------------------------------------------------------------------------------


async def test_create_and_get_event(client, make_event):
    body = await make_event(
        zones=[
            {"zone_id": "floor", "kind": "ga", "capacity": 20000, "price_cents": 9900},
            {"zone_id": "sec-101", "kind": "seated", "price_cents": 15900, "seats": [" a1", "A2 ", "a3"]},
        ]
    )
    r = await client.get(f"/v1/events/{body['event_id']}")
    assert r.status_code == 200
    ev = r.json()
    assert ev["status"] == "on_sale"
    assert [(z["zone_id"], z["capacity"]) for z in ev["zones"]] == [("floor", 20000), ("sec-101", 3)]
    r = await client.get(f"/v1/events/{body['event_id']}/zones/sec-101/seats")
    assert [s["seat"] for s in r.json()["seats"]] == ["A1", "A2", "A3"]


async def test_ambiguous_rows_are_refused(client):
    """Row R1 seat 11 and row R11 seat 1 would both be "R111"."""
    body = event_body(
        zones=[{"zone_id": "s", "kind": "seated", "price_cents": 1, "rows": {"R1": 11, "R11": 1}}]
    )
    e = err(await client.post("/v1/events", json=body, headers=ADMIN), 422, "validation_failed")
    assert "R111" in e["details"]["errors"][0]["message"]


async def test_create_event_errors(client):
    body = event_body()
    err(await client.post("/v1/events", json=body), 401, "unauthorized")
    err(
        await client.post("/v1/events", json=body, headers={"Authorization": "Bearer wrong"}),
        401,
        "unauthorized",
    )
    assert (await client.post("/v1/events", json=body, headers=ADMIN)).status_code == 201
    err(await client.post("/v1/events", json=body, headers=ADMIN), 409, "event_exists")
    dup = event_body(zones=[{"zone_id": "s", "kind": "seated", "price_cents": 1, "seats": ["a1", " A1"]}])
    e = err(await client.post("/v1/events", json=dup, headers=ADMIN), 422, "validation_failed")
    assert "duplicate" in e["details"]["errors"][0]["message"]
    e = err(await client.post("/v1/events", json={"event_id": "x"}, headers=ADMIN), 422, "validation_failed")
    assert {x["field"] for x in e["details"]["errors"]} >= {"name", "starts_at", "zones"}
    err(await client.post("/v1/events", content=b"{nope", headers=ADMIN), 400, "malformed_json")
    err(await client.post("/v1/events", content=b"[1]", headers=ADMIN), 400, "malformed_json")
    big = b'{"x": "' + b"a" * 70000 + b'"}'
    err(await client.post("/v1/events", content=big, headers=ADMIN), 413, "payload_too_large")


async def test_starts_at_is_answered_in_utc_to_the_millisecond_and_bounded(client):
    """The 201 and a later GET show the same instant the same way; a date PostgreSQL would store as
    +-infinity (or refuse, past year 9999 in UTC) is a 422 on starts_at, not a database message."""
    body = event_body(starts_at="2027-05-24T19:00:00.123456+02:00")
    r = await client.post("/v1/events", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    assert r.json()["starts_at"] == "2027-05-24T17:00:00.123Z"
    assert (await client.get(f"/v1/events/{body['event_id']}")).json()[
        "starts_at"
    ] == "2027-05-24T17:00:00.123Z"
    for starts_at in (
        "9999-12-31T23:59:59-01:00",
        "9999-12-31T23:59:59.999999Z",
        "0001-01-01T00:00:00Z",
        "2199-12-31T23:00:00-05:00",  # 2200 in UTC
        1700000000,
        "1700000000",  # a string of digits: lax parsing reads Unix time too
        "+1700000000",
    ):
        r = await client.post("/v1/events", json=event_body(starts_at=starts_at), headers=ADMIN)
        e = err(r, 422, "validation_failed")
        assert [x["field"] for x in e["details"]["errors"]] == ["starts_at"], (starts_at, e)


async def test_numbers_must_be_json_integers(client, make_event):
    """No coercion: "100", 3.0 or true where the API description says integer is a 422 on that field."""
    for zone, field in (
        ({"zone_id": "g", "kind": "ga", "capacity": 10, "price_cents": "100"}, "zones.0.price_cents"),
        ({"zone_id": "g", "kind": "ga", "capacity": True, "price_cents": 1}, "zones.0.capacity"),
        ({"zone_id": "s", "kind": "seated", "price_cents": 1, "rows": {"A": 3.0}}, "zones.0.rows.A"),
    ):
        e = err(
            await client.post("/v1/events", json=event_body(zones=[zone]), headers=ADMIN),
            422,
            "validation_failed",
        )
        assert field in [x["field"] for x in e["details"]["errors"]], e
    eid = (await make_event())["event_id"]
    for ttl in ("5", 5.0, True):
        e = err(
            await hold(client, eid, items=[{"zone_id": "floor", "quantity": 1}], ttl_seconds=ttl),
            422,
            "validation_failed",
        )
        assert [x["field"] for x in e["details"]["errors"]] == ["ttl_seconds"], e


async def test_an_event_has_at_most_max_seats_per_event(client):
    rows = {f"R{i:02d}": 10_000 for i in range(20)}  # 200,000 seats, a zone's most; three zones pass 500,000
    zones = [{"zone_id": f"s{z}", "kind": "seated", "price_cents": 1, "rows": rows} for z in range(3)]
    e = err(
        await client.post("/v1/events", json=event_body(zones=zones), headers=ADMIN), 422, "validation_failed"
    )
    assert "at most 500000 seats" in e["details"]["errors"][0]["message"], e


async def test_a_trailing_slash_is_not_a_route(client, make_event):
    eid = (await make_event())["event_id"]
    err(await client.get(f"/v1/events/{eid}/"), 404, "not_found")
    r = await client.post(
        f"/v1/events/{eid}/holds/", json={"customer_id": "c", "items": [{"zone_id": "floor", "quantity": 1}]}
    )
    err(r, 404, "not_found")


async def test_big_seated_event_is_created_pipelined(client, redis):
    """100,000 seats in one request: COPY into PostgreSQL, chunked pipeline into Redis."""
    body = event_body(
        zones=[
            {
                "zone_id": "arena",
                "kind": "seated",
                "price_cents": 5000,
                "rows": {a + b: 1000 for a in "ABCDEFGHIJ" for b in "ABCDEFGHIJ"},
            }
        ]
    )
    r = await client.post("/v1/events", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    r = await client.get(f"/v1/events/{body['event_id']}/availability")
    assert r.json()["zones"][0]["available"] == 100_000


async def test_pause_and_resume(client, make_event):
    body = await make_event()
    eid = body["event_id"]
    h = (await hold(client, eid, items=[{"zone_id": "floor", "quantity": 1}])).json()
    err(await client.post(f"/v1/events/{eid}/pause"), 401, "unauthorized")
    r = await client.post(f"/v1/events/{eid}/pause", headers=ADMIN)
    assert r.json() == {"event_id": eid, "status": "paused"}
    assert (await client.get(f"/v1/events/{eid}")).json()["status"] == "paused"
    err(await hold(client, eid, "c-2", items=[{"zone_id": "floor", "quantity": 1}]), 409, "sale_paused")
    r = await client.post(f"/v1/events/{eid}/holds/{h['hold_id']}/confirm", json={"payment_ref": "pi_1"})
    assert r.status_code == 201
    await client.post(f"/v1/events/{eid}/resume", headers=ADMIN)
    assert (await hold(client, eid, "c-2", items=[{"zone_id": "floor", "quantity": 1}])).status_code == 201
    err(await client.post("/v1/events/nope/pause", headers=ADMIN), 404, "event_not_found")


# Buying ------------------------------------------------------------------------------------------


async def test_hold_confirm_flow(client, make_event):
    eid = (await make_event())["event_id"]
    r = await hold(
        client,
        eid,
        items=[{"zone_id": "floor", "quantity": 2}, {"zone_id": "sec-101", "seats": ["a1", "A2"]}],
        ttl_seconds=120,
    )
    assert r.status_code == 201, r.text
    h = r.json()
    assert h["status"] == "active" and h["event_id"] == eid and h["amount_cents"] == 2 * 9900 + 2 * 15900
    assert h["items"][1]["seats"] == ["A1", "A2"] and h["expires_at"].endswith("Z")
    av = {z["zone_id"]: z for z in (await client.get(f"/v1/events/{eid}/availability")).json()["zones"]}
    assert (av["floor"]["available"], av["floor"]["held"]) == (98, 2)
    assert (av["sec-101"]["available"], av["sec-101"]["held"], av["sec-101"]["capacity"]) == (18, 2, 20)
    seats = (await client.get(f"/v1/events/{eid}/zones/sec-101/seats", params={"status": "held"})).json()
    assert [s["seat"] for s in seats["seats"]] == ["A1", "A2"]

    url = f"/v1/events/{eid}/holds/{h['hold_id']}"
    r = await client.post(url + "/confirm", json={"payment_ref": "pi_3Nx"})
    assert r.status_code == 201
    order = r.json()
    assert order["status"] == "confirmed" and order["hold_id"] == h["hold_id"] and order["confirmed_at"]
    again = await client.post(url + "/confirm", json={"payment_ref": "pi_3Nx"})
    assert again.status_code == 200 and again.json()["order_id"] == order["order_id"]
    assert (await client.get(url)).json()["status"] == "confirmed"
    err(await client.post(url + "/release"), 409, "hold_confirmed")
    r = await client.get(f"/v1/events/{eid}/orders/{order['order_id']}")
    assert r.status_code == 200 and r.json()["order_id"] == order["order_id"]
    assert r.json()["persisted"] in (True, False)
    err(await client.get(f"/v1/events/{eid}/orders/o_nope"), 404, "order_not_found")
    err(await client.get("/v1/events/no-such-event/orders/o_nope"), 404, "event_not_found")


async def test_release_idempotent(client, make_event):
    eid = (await make_event())["event_id"]
    h = (await hold(client, eid, items=[{"zone_id": "sec-101", "seats": ["B3"]}])).json()
    url = f"/v1/events/{eid}/holds/{h['hold_id']}"
    for _ in range(2):
        r = await client.post(url + "/release")
        assert r.status_code == 200 and r.json()["status"] == "released"
    err(await client.post(url + "/confirm", json={"payment_ref": "p"}), 409, "hold_released")
    assert (
        await hold(client, eid, "c-2", items=[{"zone_id": "sec-101", "seats": ["b3"]}])
    ).status_code == 201


async def test_hold_errors(client, make_event):
    eid = (await make_event())["event_id"]
    ga = [{"zone_id": "floor", "quantity": 1}]
    e = err(await hold(client, eid, items=[{"zone_id": "floor", "quantity": 101}]), 409, "sold_out")
    assert e["details"] == {"zone_id": "floor", "requested": 101, "available": 100}
    first = (await hold(client, eid, items=[{"zone_id": "sec-101", "seats": ["A1"]}])).json()
    e = err(
        await hold(client, eid, "c-2", items=[{"zone_id": "sec-101", "seats": ["A1", "A2"]}]),
        409,
        "seats_unavailable",
    )
    assert e["details"]["seats"] == [{"zone_id": "sec-101", "seat": "A1"}]
    e = err(await hold(client, eid, items=[{"zone_id": "floor", "quantity": 6}]), 409, "limit_exceeded")
    assert e["details"] == {"limit": 6, "current": 1, "requested": 6}
    err(await hold(client, "no-such-event", items=ga), 404, "event_not_found")
    err(await hold(client, eid, items=[{"zone_id": "balcony", "quantity": 1}]), 404, "zone_not_found")
    # The scripts' refusals of one item name it as pydantic's do: items.<index>.<field>.
    for items, field in (
        ([{"zone_id": "floor", "quantity": 1}, {"zone_id": "sec-101", "seats": ["Z99"]}], "items.1.seats"),
        ([{"zone_id": "floor", "seats": ["A1"]}], "items.0.seats"),
        ([{"zone_id": "sec-101", "quantity": 1}], "items.0.quantity"),
    ):
        e = err(await hold(client, eid, items=items), 422, "validation_failed")
        assert [x["field"] for x in e["details"]["errors"]] == [field], e
    e = err(await hold(client, eid, items=[{"zone_id": "floor", "quantity": 0}]), 422, "validation_failed")
    assert [x["field"] for x in e["details"]["errors"]] == ["items.0.quantity"]
    err(await hold(client, eid, items=[]), 422, "validation_failed")
    err(await hold(client, eid, items=ga, ttl_seconds=0), 422, "validation_failed")
    err(await hold(client, eid, items=ga, ttl_seconds=3601), 422, "validation_failed")
    e = err(await hold(client, eid, items=ga, ttl_seconds=601), 422, "validation_failed")  # event allows 600
    assert e["details"]["errors"][0]["field"] == "ttl_seconds"
    err(await client.post(f"/v1/events/{eid}/holds", content=b"nope"), 400, "malformed_json")
    err(
        await client.post(f"/v1/events/{eid}/holds", json={"customer_id": "c", "items": ga, "extra": 1}),
        422,
        "validation_failed",
    )
    # nothing was half-applied by the refusals
    av = {z["zone_id"]: z for z in (await client.get(f"/v1/events/{eid}/availability")).json()["zones"]}
    assert av["floor"]["held"] == 0 and av["sec-101"]["held"] == 1
    assert first["status"] == "active"


async def test_hold_lookups_and_routing_errors(client, make_event):
    eid = (await make_event())["event_id"]
    err(await client.get(f"/v1/events/{eid}/holds/h_nope"), 404, "hold_not_found")
    err(
        await client.post(f"/v1/events/{eid}/holds/h_nope/confirm", json={"payment_ref": "p"}),
        404,
        "hold_not_found",
    )
    err(await client.post(f"/v1/events/{eid}/holds/h_nope/release"), 404, "hold_not_found")
    err(await client.get("/v1/events/nope"), 404, "event_not_found")
    err(await client.get("/v1/events/nope/availability"), 404, "event_not_found")
    e = err(await client.get(f"/v1/events/{eid}/zones/floor/seats"), 422, "validation_failed")
    assert [x["field"] for x in e["details"]["errors"]] == ["zone_id"]  # a seat-map query has no items
    e = err(await client.get(f"/v1/events/{eid}/zones/sec-101/seats?after=ZZ9"), 422, "validation_failed")
    assert [(x["field"], x["seats"]) for x in e["details"]["errors"]] == [("after", ["ZZ9"])]
    err(await client.get(f"/v1/events/{eid}/zones/nope/seats"), 404, "zone_not_found")
    err(
        await client.get(f"/v1/events/{eid}/zones/sec-101/seats", params={"limit": "0"}),
        422,
        "validation_failed",
    )
    err(
        await client.get(f"/v1/events/{eid}/zones/sec-101/seats", params={"status": "x"}),
        422,
        "validation_failed",
    )
    err(await client.get("/v1/nothing"), 404, "not_found")
    err(await client.delete(f"/v1/events/{eid}"), 405, "method_not_allowed")
    err(await client.post(f"/v1/events/{eid}/holds/h_x/confirm", json={}), 422, "validation_failed")


async def test_idempotency_key_over_http(client, make_event):
    eid = (await make_event())["event_id"]
    items = [{"zone_id": "floor", "quantity": 2}]
    key = {"Idempotency-Key": "k-" + new_event_id()}
    first = await hold(client, eid, headers=key, items=items)
    assert first.status_code == 201
    replay = await hold(client, eid, headers=key, items=items)
    assert replay.status_code == 200 and replay.json()["hold_id"] == first.json()["hold_id"]
    err(
        await hold(client, eid, headers=key, items=[{"zone_id": "floor", "quantity": 3}]),
        409,
        "idempotency_conflict",
    )
    # double click: many concurrent requests with one key make one hold
    key2 = {"Idempotency-Key": "k2-" + new_event_id()}
    rs = await asyncio.gather(*(hold(client, eid, "c-9", headers=key2, items=items) for _ in range(10)))
    assert sorted(r.status_code for r in rs) == [200] * 9 + [201]
    assert len({r.json()["hold_id"] for r in rs}) == 1
    # keys are scoped to the event
    other = (await make_event())["event_id"]
    assert (await hold(client, other, headers=key, items=items)).status_code == 201


async def test_expiry_gives_stock_back(client, make_event):
    eid = (await make_event(zones=[{"zone_id": "floor", "kind": "ga", "capacity": 2, "price_cents": 1}]))[
        "event_id"
    ]
    h = (await hold(client, eid, items=[{"zone_id": "floor", "quantity": 2}], ttl_seconds=1)).json()
    err(await hold(client, eid, "c-2", items=[{"zone_id": "floor", "quantity": 1}]), 409, "sold_out")
    await asyncio.sleep(1.1)
    av = (await client.get(f"/v1/events/{eid}/availability")).json()["zones"][0]
    assert (av["available"], av["held"]) == (2, 0)
    assert (await client.get(f"/v1/events/{eid}/holds/{h['hold_id']}")).json()["status"] == "expired"
    err(
        await client.post(f"/v1/events/{eid}/holds/{h['hold_id']}/confirm", json={"payment_ref": "p"}),
        409,
        "hold_expired",
    )
    r = await client.post(f"/v1/events/{eid}/holds/{h['hold_id']}/release")
    assert r.status_code == 200 and r.json()["status"] == "expired"


async def test_health_request_id_and_metrics(client):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    r = await client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {"redis": "ok", "postgres": "ok"}
    assert r.headers["x-request-id"]
    r = await client.get("/healthz", headers={"X-Request-Id": "req-123"})
    assert r.headers["x-request-id"] == "req-123"
    text = (await client.get("/metrics")).text
    assert 'boxoffice_request_seconds_count{method="GET",route="/healthz",status="200"}' in text


def test_the_no_work_ceiling_reaches_its_handler_as_a_hold_does():
    """The bench reports holds/s as a fraction of /healthz's req/s. Served through Starlette's function wrapper
    (request_response) while holds skip it, /healthz cost 1-3.5 us more API CPU a request (loadtests/RESULTS.md)
    and the ratio credited holds with that."""
    by_path = {route.path: route for route in ROUTES}
    hold, healthz = by_path["/v1/events/{event_id}/holds"], by_path["/healthz"]
    assert isinstance(hold.endpoint, ASGIEndpoint) and hold.app is hold.endpoint
    assert isinstance(healthz.endpoint, ASGIEndpoint) and healthz.app is healthz.endpoint


@pytest.fixture
async def dead_redis_app(settings):
    """The app pointed at a Redis port nobody listens on."""
    from service.app import create_app

    app = create_app(
        settings.model_copy(
            update={"redis_url": "redis://127.0.0.1:1/0", "redis_socket_timeout_seconds": 0.5}
        )
    )
    async with app.router.lifespan_context(app):
        yield app


async def test_redis_down_is_503_with_retry_after(dead_redis_app, make_event):
    import httpx

    transport = httpx.ASGITransport(app=dead_redis_app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.post(
            "/v1/events/x/holds", json={"customer_id": "c", "items": [{"zone_id": "z", "quantity": 1}]}
        )
        e = err(r, 503, "unavailable")
        assert e["details"] == {"store": "redis"} and r.headers["retry-after"] == "1"
        r = await c.get("/readyz")
        assert r.status_code == 503


async def test_wait_aof_is_switched_off_on_servers_without_it(settings, redis):
    """The opt-in must not break confirms where WAITAOF does not exist (Redis < 7.2, e.g. the embedded 6.2)."""
    from service.app import create_app

    version = (await redis.info("server"))["redis_version"]
    app = create_app(settings.model_copy(update={"wait_aof": True}))
    async with app.router.lifespan_context(app):
        expect = tuple(int(p) for p in version.split(".")[:2]) >= (7, 2)
        assert app.state.settings.wait_aof is expect


def test_the_wait_aof_timeout_must_be_below_the_socket_timeout():
    """A WAITAOF that blocks longer than the socket timeout would get its connection dropped as stalled."""
    import pydantic

    from service.settings import Settings

    assert Settings(redis_socket_timeout_seconds=1).wait_aof_timeout_ms == 1000  # WAIT_AOF off: no limit
    with pytest.raises(pydantic.ValidationError, match="wait_aof_timeout_ms"):
        Settings(wait_aof=True, redis_socket_timeout_seconds=1)
    assert Settings(wait_aof=True, redis_socket_timeout_seconds=1, wait_aof_timeout_ms=500).wait_aof


async def test_control_characters_are_refused_before_they_reach_an_order(client, make_event):
    """PostgreSQL text cannot hold NUL: such an order would be confirmed in Redis and refused later."""
    eid = (await make_event())["event_id"]
    err(
        await hold(client, eid, "c\x00x", items=[{"zone_id": "floor", "quantity": 1}]),
        422,
        "validation_failed",
    )
    h = (await hold(client, eid, items=[{"zone_id": "floor", "quantity": 1}])).json()
    r = await client.post(f"/v1/events/{eid}/holds/{h['hold_id']}/confirm", json={"payment_ref": "pi\x00"})
    err(r, 422, "validation_failed")


async def test_chunked_body_over_the_limit_is_413(client):
    """Without Content-Length the body is counted while it streams in."""

    async def chunks():
        yield b'{"x": "'
        for _ in range(20):
            yield b"a" * 4096
        yield b'"}'

    r = await client.post("/v1/events", content=chunks(), headers=ADMIN)
    err(r, 413, "payload_too_large")


async def test_values_the_stores_cannot_hold_exactly_are_422(client, make_event):
    """Found by review: these were rounded (cjson prints 14 digits) or reached PostgreSQL as a 500."""
    big = event_body(zones=[{"zone_id": "z", "kind": "ga", "capacity": 1, "price_cents": 123456789012345}])
    err(await client.post("/v1/events", json=big, headers=ADMIN), 422, "validation_failed")
    err(
        await client.post("/v1/events", json=event_body(name="Eras\x00Tour"), headers=ADMIN),
        422,
        "validation_failed",
    )
    eid = (await make_event())["event_id"]
    err(await hold(client, eid, items=[{"zone_id": "floor", "quantity": True}]), 422, "validation_failed")
    r = await client.get(f"/v1/events/{eid}/zones/sec-101/seats", params={"limit": "²"})
    err(r, 422, "validation_failed")


async def test_tally_adds_its_counts_to_the_counter_within_its_interval():
    from prometheus_client import Counter

    from service.metrics import Tally

    counter = Counter("boxoffice_test_tally_total", "test", ["event_id"], registry=None)
    tally = Tally(interval_seconds=0.05)
    for _ in range(3):
        tally.inc(counter, "e1")
    tally.inc(counter, "e2")
    assert counter.labels("e1")._value.get() == 0  # not yet: counted in the dict only
    await asyncio.sleep(0.15)
    assert (counter.labels("e1")._value.get(), counter.labels("e2")._value.get()) == (3, 1)
    tally.inc(counter, "e1")
    tally.flush()  # what /metrics and shutdown do
    assert counter.labels("e1")._value.get() == 4


def test_tally_counted_after_its_loop_closed_is_flushed_on_the_next_loop():
    """A loop that ends before its scheduled flush (no shutdown flush) must not stop later flushes."""
    from prometheus_client import Counter

    from service.metrics import Tally

    counter = Counter("boxoffice_test_tally_loops_total", "test", ["event_id"], registry=None)
    tally = Tally(interval_seconds=0.05)

    async def count(wait_seconds: float) -> None:
        tally.inc(counter, "e1")
        await asyncio.sleep(wait_seconds)

    asyncio.run(count(0))  # ends before the flush it scheduled
    asyncio.run(count(0.15))
    assert counter.labels("e1")._value.get() == 2


async def test_api_start_up_raises_the_young_gc_threshold(client):
    """service/app.py: holds keep requests alive across the Redis round trip; young collections run less often."""
    import gc

    from service.settings import Settings

    assert gc.get_threshold()[0] == Settings().gc_young_threshold


async def test_app_state_reads_never_fall_back_to_getattr(app, client, make_event, monkeypatch):
    """service/app.py AppState: a hold reads app.state twice; Starlette's State would build an AttributeError
    each time before its __getattr__ answers. With that fallback broken, the API must still serve."""
    from starlette.datastructures import State

    def broken(self, key):
        raise AssertionError(f"app.state.{key} went through State.__getattr__")

    monkeypatch.setattr(State, "__getattr__", broken)
    eid = (await make_event())["event_id"]
    r = await hold(client, eid, items=[{"zone_id": "floor", "quantity": 1}])
    assert r.status_code == 201, r.text
    confirm = f"/v1/events/{eid}/holds/{r.json()['hold_id']}/confirm"
    assert (await client.post(confirm, json={"payment_ref": "p"})).status_code == 201
    app.state["probe"] = 1  # by key and by attribute stay in step
    assert app.state.probe == 1
    del app.state.probe
    assert "probe" not in list(app.state)
    monkeypatch.undo()
    with pytest.raises(AttributeError):
        _ = app.state.probe


def test_ids_may_not_end_in_a_newline():
    """``$`` also matches before a final newline: ids are checked whole (``fullmatch``)."""
    from service.domain import check_idempotency_key, check_ident
    from service.errors import DomainError

    assert check_ident("e1", "event") == "e1"
    with pytest.raises(DomainError, match="event_not_found"):
        check_ident("e1\n", "event")
    with pytest.raises(DomainError, match="validation_failed"):
        check_idempotency_key("k1\n")
