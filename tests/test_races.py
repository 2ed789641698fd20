"""Flash-sale races over real HTTP against `boxoffice serve` with 2 uvicorn workers and the real Redis."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import httpx
import pytest
from conftest import ADMIN, event_body

pytestmark = pytest.mark.slow


@pytest.fixture
async def http(live_server):
    limits = httpx.Limits(max_connections=500, max_keepalive_connections=500)
    async with httpx.AsyncClient(base_url=live_server, limits=limits, timeout=30) as c:
        yield c


async def create(http, zones, **kw) -> str:
    body = event_body(zones=zones, max_tickets_per_customer=10, **kw)
    r = await http.post("/v1/events", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    return body["event_id"]


async def availability(http, eid) -> dict[str, dict]:
    zones = (await http.get(f"/v1/events/{eid}/availability")).json()["zones"]
    for z in zones:
        assert z["available"] + z["held"] + z["sold"] == z["capacity"]
    return {z["zone_id"]: z for z in zones}


async def test_500_buyers_race_for_100_ga_tickets(http):
    eid = await create(http, [{"zone_id": "floor", "kind": "ga", "capacity": 100, "price_cents": 5000}])
    start = asyncio.Event()

    async def buyer(i: int) -> int:
        await start.wait()
        r = await http.post(
            f"/v1/events/{eid}/holds",
            json={"customer_id": f"c{i}", "items": [{"zone_id": "floor", "quantity": 1}]},
        )
        if r.status_code == 409:
            assert r.json()["error"]["code"] == "sold_out"
        return r.status_code

    tasks = [asyncio.create_task(buyer(i)) for i in range(500)]
    await asyncio.sleep(0.1)
    start.set()
    codes = Counter(await asyncio.gather(*tasks))
    assert codes == {201: 100, 409: 400}
    z = (await availability(http, eid))["floor"]
    assert (z["available"], z["held"], z["sold"]) == (0, 100, 0)
    # /metrics merges both uvicorn workers (prometheus-client multiprocess mode): all 100 holds counted,
    # the other worker's within its tally interval (service.metrics.Tally, 1 s)
    expected = f'boxoffice_holds_total{{event_id="{eid}"}} 100.0'
    for _ in range(30):
        metrics = (await http.get("/metrics")).text
        if expected in metrics:
            break
        await asyncio.sleep(0.1)
    assert expected in metrics
    assert 'boxoffice_rejections_total{code="sold_out"}' in metrics


async def test_200_buyers_race_for_the_same_10_seats(http):
    seats = [f"A{i}" for i in range(1, 11)]
    eid = await create(http, [{"zone_id": "front", "kind": "seated", "price_cents": 20000, "seats": seats}])
    rng = random.Random(7)
    wanted = [rng.sample(seats, rng.randint(1, 3)) for _ in range(200)]

    async def buyer(i: int):
        r = await http.post(
            f"/v1/events/{eid}/holds",
            json={"customer_id": f"c{i}", "items": [{"zone_id": "front", "seats": wanted[i]}]},
        )
        assert r.status_code in (201, 409), r.text
        if r.status_code == 409:
            assert r.json()["error"]["code"] == "seats_unavailable"
            return []
        return r.json()["items"][0]["seats"]

    won = await asyncio.gather(*(buyer(i) for i in range(200)))
    held = [s for w in won for s in w]
    assert len(held) == len(set(held)), "a seat was held twice"
    page = (await http.get(f"/v1/events/{eid}/zones/front/seats")).json()["seats"]
    assert sorted(s["seat"] for s in page if s["status"] == "held") == sorted(held)
    z = (await availability(http, eid))["front"]
    assert z["held"] == len(held) and z["available"] == 10 - len(held)


async def test_confirm_racing_expiry_has_one_winner(http):
    eid = await create(http, [{"zone_id": "floor", "kind": "ga", "capacity": 60, "price_cents": 100}])
    holds = []
    for i in range(60):
        r = await http.post(
            f"/v1/events/{eid}/holds",
            json={"customer_id": f"c{i}", "items": [{"zone_id": "floor", "quantity": 1}], "ttl_seconds": 1},
        )
        assert r.status_code == 201
        holds.append(r.json()["hold_id"])
    rng = random.Random(3)

    async def confirm(hold_id: str):
        await asyncio.sleep(rng.uniform(0.6, 1.4))  # straddles expiry
        r = await http.post(f"/v1/events/{eid}/holds/{hold_id}/confirm", json={"payment_ref": "pi"})
        return hold_id, r

    async def reaper():  # availability reads reap concurrently with the confirms
        for _ in range(20):
            await availability(http, eid)
            await asyncio.sleep(0.05)

    results, _ = await asyncio.gather(asyncio.gather(*(confirm(h) for h in holds)), reaper())
    wins = 0
    for hold_id, r in results:
        status = (await http.get(f"/v1/events/{eid}/holds/{hold_id}")).json()["status"]
        if r.status_code == 201:
            wins += 1
            assert status == "confirmed"
        else:
            assert r.status_code == 409 and r.json()["error"]["code"] == "hold_expired", r.text
            assert status == "expired"
            # and it stays lost: a late retry is refused too
            again = await http.post(f"/v1/events/{eid}/holds/{hold_id}/confirm", json={"payment_ref": "pi"})
            assert again.status_code == 409
    z = (await availability(http, eid))["floor"]
    assert (z["sold"], z["held"], z["available"]) == (wins, 0, 60 - wins)
    assert 0 < wins < 60, "the timing should produce both outcomes"
