"""Shared fixtures: real Redis and PostgreSQL (chosen like `make run` does), a fresh database per session.

The servers come from ``service.servers.choose_servers``: REDIS_URL / DATABASE_URL if set, else the local
defaults if they answer, else embedded ones. Each session migrates its own database and drops it after.
Every test uses its own event ids (``new_event_id``), so tests never see each other's keys. The Redis is
shared with `make run` (its database 0 on a developer machine): at its end the session deletes the keys of
every event id it made (``forget_events``), and nobody else's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import fakeredis
import httpx
import psycopg
import pytest
import redis.asyncio as aioredis
from redis import Redis as SyncRedis

from loadtests.local import free_port, throwaway_redis
from service import keys
from service.app import create_app
from service.inventory import Inventory
from service.migrate import migrate
from service.servers import choose_servers
from service.settings import Settings

ADMIN = {"Authorization": "Bearer test-admin-token"}


EVENT_IDS: set[str] = set()
"""Every event id ``new_event_id`` made in this session: what ``settings`` deletes from Redis at the end."""


def _swap_db(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


@pytest.fixture(scope="session")
def servers():
    s = choose_servers(Settings())
    print("\n" + s.describe())
    yield s
    s.stop()


@pytest.fixture(scope="session")
def database_url(servers) -> str:
    name = f"boxoffice_test_{os.getpid()}"
    admin = _swap_db(servers.database_url, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _swap_db(servers.database_url, name)
    migrate(url)
    yield url
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def settings(servers, database_url) -> Settings:
    """The session's settings. Torn down last of the fixtures on the shared Redis (they all depend on it):
    then the events the session made are deleted from that Redis."""
    yield Settings(redis_url=servers.redis_url, database_url=database_url, admin_token="test-admin-token")
    forget_events(servers.redis_url, EVENT_IDS)


def forget_events(redis_url: str, event_ids: set[str]) -> int:
    """Delete every key of the given events (``{evt:<id>}:*``, one SCAN over the ``{evt:*}:*`` keys) and their
    members of ``boxoffice:events``; leave every other key alone. Returns how many keys went."""
    gone = 0
    with SyncRedis.from_url(redis_url) as r:
        batch: list[bytes] = []
        head = keys.prefix("").encode()[:-2]  # b"{evt:"
        for key in r.scan_iter(match=keys.prefix("*") + "*", count=1000):
            if key[len(head) : key.find(b"}")].decode(errors="replace") in event_ids:
                batch.append(key)
            if len(batch) >= 500:
                gone += r.unlink(*batch)
                batch.clear()
        if batch:
            gone += r.unlink(*batch)
        members = [m for m in r.smembers(keys.EVENTS_KEY) if m.decode(errors="replace") in event_ids]
        if members:
            r.srem(keys.EVENTS_KEY, *members)
    return gone


@contextlib.asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[tuple]:
    """The app with its lifespan run, and an httpx client speaking to it in-process: (app, client)."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield app, c


@pytest.fixture(scope="session")
async def app_and_client(settings):
    async with running_app(settings) as pair:
        yield pair


@pytest.fixture(scope="session")
def app(app_and_client):
    return app_and_client[0]


@pytest.fixture(scope="session")
def client(app_and_client) -> httpx.AsyncClient:
    return app_and_client[1]


@pytest.fixture(scope="session")
async def redis(settings) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(settings.redis_url)
    yield r
    await r.aclose()


def new_event_id(tag: str = "evt") -> str:
    """A fresh event id, remembered in EVENT_IDS so that the session deletes its keys at the end."""
    event_id = f"{tag}-{uuid.uuid4().hex[:12]}"
    EVENT_IDS.add(event_id)
    return event_id


def event_body(event_id: str | None = None, **overrides) -> dict:
    body = {
        "event_id": event_id or new_event_id(),
        "name": "Eras Tour — Lisbon",
        "starts_at": (datetime.now(UTC) + timedelta(days=90)).isoformat(),
        "hold_ttl_seconds": 600,
        "max_tickets_per_customer": 6,
        "zones": [
            {"zone_id": "floor", "kind": "ga", "capacity": 100, "price_cents": 9900},
            {"zone_id": "sec-101", "kind": "seated", "price_cents": 15900, "rows": {"A": 10, "B": 10}},
        ],
    }
    body.update(overrides)
    return body


@pytest.fixture
async def make_event(client):
    async def make(**overrides) -> dict:
        body = event_body(**overrides)
        r = await client.post("/v1/events", json=body, headers=ADMIN)
        assert r.status_code == 201, r.text
        return body

    return make


async def gather_limited(coros, limit: int = 200):
    sem = asyncio.Semaphore(limit)

    async def run(c):
        async with sem:
            return await c

    return await asyncio.gather(*(run(c) for c in coros))


@pytest.fixture(params=["fakeredis", "redis"])
async def any_redis(request, settings) -> AsyncIterator[aioredis.Redis]:
    """The same script tests on fakeredis (Lua via lupa) and on the real server."""
    if request.param == "fakeredis":
        r = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(version=(7,)))
    else:
        r = aioredis.Redis.from_url(settings.redis_url)
    yield r
    await r.aclose()


@pytest.fixture(scope="module")
def private_redis_url():
    """A throw-away redis-server of the module's own (no persistence). For tests whose workers consume
    outboxes or that FLUSHALL: on the shared server another session's worker could take their entries."""
    with throwaway_redis() as url:
        yield url


@pytest.fixture(scope="module")
def private_settings(settings, private_redis_url) -> Settings:
    """The session's settings on the module's own Redis (a module may override this to tune settings)."""
    return settings.model_copy(update={"redis_url": private_redis_url})


@pytest.fixture(scope="module")
async def inventory(private_settings) -> AsyncIterator[Inventory]:
    from service.app import redis_client

    client = redis_client(private_settings.redis_url, private_settings)
    inventory = Inventory(client, private_settings)
    yield inventory
    inventory.close()
    await client.aclose()


@pytest.fixture(scope="module")
async def pg(private_settings):
    from service import db

    pool = await db.create_pool(private_settings.database_url)
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
def live_server(settings):
    """`boxoffice serve` with 2 uvicorn workers on a free loopback port; yields its base URL."""
    import subprocess
    import sys
    import time

    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.database_url,
        "BOXOFFICE_ADMIN_TOKEN": settings.admin_token,
        "BOXOFFICE_LOG_LEVEL": "WARNING",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--workers", "2", "--port", str(port), "--no-migrate"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("live server did not start: " + proc.stderr.read().decode()[-2000:])
        time.sleep(0.2)
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
