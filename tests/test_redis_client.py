"""The API's Redis client against real failures: a dropped connection is retried, a refusal is a 503."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import redis.asyncio as aioredis
from conftest import event_body

from loadtests.local import throwaway_redis
from service.app import create_app, redis_client


async def _proxy(target_port: int, drop_first: int):
    """A loopback TCP proxy that cuts its first ``drop_first`` connections as soon as they send a command."""
    dropped = 0

    async def handle(reader, writer):
        nonlocal dropped
        if dropped < drop_first:
            dropped += 1
            await reader.read(1)
            writer.close()
            return
        up_r, up_w = await asyncio.open_connection("127.0.0.1", target_port)

        async def pipe(r, w):
            with contextlib.suppress(Exception):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_a_dropped_connection_is_retried(settings):
    with throwaway_redis() as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        server, proxy_port = await _proxy(port, drop_first=1)
        client = redis_client(f"redis://127.0.0.1:{proxy_port}/0", settings)
        try:
            assert await client.ping()  # the first connection is cut; the retry opens another
        finally:
            await client.aclose()
            server.close()


async def test_redis_out_of_memory_is_503_and_nothing_half_applied(settings):
    with throwaway_redis() as url:
        app = create_app(settings.model_copy(update={"redis_url": url}))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                body = event_body()
                assert (
                    await c.post(
                        "/v1/events", json=body, headers={"Authorization": "Bearer test-admin-token"}
                    )
                ).status_code == 201
                r = aioredis.Redis.from_url(url)
                await r.config_set("maxmemory-policy", "noeviction")
                await r.config_set("maxmemory", "1")
                hold = await c.post(
                    f"/v1/events/{body['event_id']}/holds",
                    json={"customer_id": "c", "items": [{"zone_id": "floor", "quantity": 1}]},
                )
                assert hold.status_code == 503, hold.text
                assert hold.json()["error"]["code"] == "unavailable" and hold.headers["retry-after"]
                await r.config_set("maxmemory", "0")
                zones = (await c.get(f"/v1/events/{body['event_id']}/availability")).json()["zones"]
                assert zones[0]["held"] == 0 and zones[0]["available"] == 100
                await r.aclose()
