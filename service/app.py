"""The ASGI application: routes, start-up and shutdown, and the mapping of every failure to the JSON error contract.

Run it with ``boxoffice serve`` (uvicorn, several workers) or ``uvicorn service.app:create_app --factory``.
Each process owns one Redis connection pool and one PostgreSQL pool, created in the lifespan.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator

import asyncpg
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AskError, MovedError, OutOfMemoryError, ReadOnlyError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.routing import Route

from service import api, db, metrics
from service.errors import DomainError
from service.http import JSON, ASGIEndpoint, error_response
from service.inventory import Inventory
from service.logs import configure_logging
from service.middleware import RequestContext
from service.openapi import openapi
from service.settings import Settings, get_settings

log = logging.getLogger("boxoffice.app")

# Starlette tries routes in order (every pattern is anchored, so order never changes which one matches):
# the flash sale's hot routes come first, so they pay for the fewest regex matches. The two hottest, hold and
# confirm, are served as plain ASGI apps (ASGIEndpoint: the same handlers, without Starlette's per-request
# wrapping). So is /healthz: it is the benchmark's no-work HTTP ceiling, which holds/s is reported against, and
# it must reach its handler the way a hold does, or the ratio would credit the hold with the dispatch work it
# skips (served through the wrapper, /healthz cost 1-3.5 us more API CPU a request: loadtests/RESULTS.md).
ROUTES = [
    Route("/v1/events/{event_id}/holds", ASGIEndpoint(api.create_hold), methods=["POST"]),
    Route("/v1/events/{event_id}/holds/{hold_id}/confirm", ASGIEndpoint(api.confirm_hold), methods=["POST"]),
    Route("/v1/events/{event_id}/availability", api.availability, methods=["GET"]),
    Route("/v1/events/{event_id}/zones/{zone_id}/seats", api.seats, methods=["GET"]),
    Route("/v1/events/{event_id}/holds/{hold_id}", api.get_hold, methods=["GET"]),
    Route("/v1/events/{event_id}/holds/{hold_id}/release", api.release_hold, methods=["POST"]),
    Route("/v1/events/{event_id}/orders/{order_id}", api.get_order, methods=["GET"]),
    Route("/v1/events", api.create_event, methods=["POST"]),
    Route("/v1/events/{event_id}", api.get_event, methods=["GET"]),
    Route("/v1/events/{event_id}/pause", api.pause_event, methods=["POST"]),
    Route("/v1/events/{event_id}/resume", api.resume_event, methods=["POST"]),
    Route("/healthz", ASGIEndpoint(api.healthz), methods=["GET"]),
    Route("/readyz", api.readyz, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
    Route("/metrics", api.metrics_endpoint, methods=["GET"]),
]


def redis_client(url: str, settings: Settings) -> aioredis.Redis:
    """One pool per process. A request waits for a free connection (BlockingConnectionPool) rather than
    opening more; a timed-out or dropped command is retried twice with backoff (safe: scripts are idempotent).
    With ``redis_cluster`` it is redis-py's RedisCluster (one pool per node), which routes each script by
    its first key's hash tag."""
    if settings.redis_cluster:
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(
            url,
            max_connections=settings.redis_max_connections,
            socket_timeout=settings.redis_socket_timeout_seconds,
            socket_connect_timeout=2,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_socket_timeout_seconds,
        socket_timeout=settings.redis_socket_timeout_seconds,
        socket_connect_timeout=2,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=30,
    )
    return aioredis.Redis(connection_pool=pool)


async def _check_wait_aof(client: aioredis.Redis, settings: Settings) -> None:
    """WAITAOF exists from Redis 7.2 (https://redis.io/commands/waitaof/); on older servers the opt-in is
    switched off with a warning rather than failing every confirm."""
    if not settings.wait_aof:
        return
    version = (await client.info("server"))["redis_version"]
    if tuple(int(p) for p in version.split(".")[:2]) < (7, 2):
        log.warning(
            "BOXOFFICE_WAIT_AOF needs Redis >= 7.2, this server is %s: confirms will not wait for fsync",
            version,
        )
        settings.wait_aof = False


async def _domain_error(request: Request, exc: Exception) -> JSON:
    assert isinstance(exc, DomainError)
    metrics.child(metrics.REJECTIONS, exc.code).inc()
    headers = None
    if exc.code == "unavailable":
        headers = {"Retry-After": str(request.app.state.settings.redis_retry_after_seconds)}
    return error_response(exc, headers=headers)


async def _http_error(request: Request, exc: Exception) -> JSON:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    if code is None:
        return JSON(
            {"error": {"code": "http_error", "message": exc.detail, "details": {}}},
            status_code=exc.status_code,
        )
    headers = dict(exc.headers) if exc.headers else None
    return error_response(DomainError(code), headers=headers)


async def _unavailable(request: Request, exc: Exception) -> JSON:
    settings: Settings = request.app.state.settings
    log.warning("backing store unavailable on %s %s: %r", request.method, request.url.path, exc)
    store = "redis" if isinstance(exc, RedisConnectionError | RedisTimeoutError) else "postgres"
    return error_response(
        DomainError("unavailable", details={"store": store}),
        headers={"Retry-After": str(settings.redis_retry_after_seconds)},
    )


async def _redis_refused(request: Request, exc: Exception) -> JSON:
    """Redis answered but refused for now: BUSY running a script, OOM, a read-only replica after failover, a
    cluster slot that moved (MOVED / ASK where the call may not follow it: a durable confirm).
    Nothing was written (https://redis.io/docs/latest/develop/reference/protocol-spec/#simple-errors): 503."""
    text = str(exc)
    if isinstance(exc, OutOfMemoryError | ReadOnlyError | MovedError | AskError) or text.startswith(
        ("BUSY", "LOADING", "TRYAGAIN")
    ):
        return await _unavailable(request, RedisConnectionError(text))
    return await _internal(request, exc)


async def _internal(request: Request, exc: Exception) -> JSON:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(DomainError("internal_error"))


class AppState(State):
    """``app.state`` whose values are also plain instance attributes, so reading one is an ordinary lookup.

    Starlette's ``State`` keeps them in a dict reached through ``__getattr__``, which Python calls only after
    the normal lookup failed and built an ``AttributeError`` with a formatted message: ~0.65 us a read, and
    a hold reads two (callgrind: the only exceptions on its path). Setting or deleting by attribute or by key
    keeps both in step; everything else is Starlette's.
    """

    def __setattr__(self, key: str, value: object) -> None:
        self._state[key] = value
        object.__setattr__(self, key, value)

    def __delattr__(self, key: str) -> None:
        del self._state[key]
        object.__delattr__(self, key)

    __setitem__ = __setattr__
    __delitem__ = __delattr__


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the app. ``REDIS_URL`` and ``DATABASE_URL`` must be set by then (``boxoffice serve`` chooses them)."""
    settings = settings or get_settings()
    configure_logging(settings.log_level)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if not settings.redis_url or not settings.database_url:
            raise RuntimeError(
                "REDIS_URL and DATABASE_URL must be set (boxoffice serve chooses them for you)"
            )
        client = redis_client(settings.redis_url, settings)
        app.state.inventory = Inventory(client, settings)
        app.state.pg = await db.create_pool(
            settings.database_url, min_size=settings.pg_pool_min, max_size=settings.pg_pool_max
        )
        try:
            await app.state.inventory.runner.load()
            await _check_wait_aof(client, settings)
        except (RedisConnectionError, RedisTimeoutError):
            log.warning("Redis does not answer at start-up; scripts load on first use")
        # Everything alive now (modules, pydantic schemas, the app) lives as long as the process: move it out
        # of the cyclic collector's way (https://docs.python.org/3/library/gc.html#gc.freeze), so a full
        # collection no longer walks it in the middle of a request. It was the source of the hold p99 spikes.
        gc.collect()
        gc.freeze()
        # A hold keeps its request's frames and objects alive across the Redis round trip, so every
        # collection of the youngest generation (by default after 700 net allocations) walks all requests in
        # flight. At 5,000 it runs a seventh as often: in-process (callgrind, 5,000 holds, 50 in flight)
        # a hold costs 310k -> 277k instructions and /healthz, which keeps nothing alive, 211k either way.
        gc.set_threshold(settings.gc_young_threshold, *gc.get_threshold()[1:])
        try:
            yield
        finally:
            metrics.TALLY.flush()
            await app.state.pg.close()
            await app.state.inventory.aclose()
            await client.aclose()

    unavailable = (
        RedisConnectionError,
        RedisTimeoutError,
        OSError,
        asyncpg.PostgresConnectionError,
        asyncpg.InterfaceError,
        asyncpg.CannotConnectNowError,
        asyncpg.TooManyConnectionsError,
        asyncpg.exceptions.OperatorInterventionError,
        TimeoutError,
    )
    handlers = {
        DomainError: _domain_error,
        HTTPException: _http_error,
        ResponseError: _redis_refused,
        Exception: _internal,
    }
    handlers.update({cls: _unavailable for cls in unavailable})
    templates = {route.endpoint: route.path for route in ROUTES}
    app = Starlette(
        routes=ROUTES,
        lifespan=lifespan,
        exception_handlers=handlers,
        middleware=[Middleware(RequestContext, templates=templates)],
    )
    app.router.redirect_slashes = False  # "/v1/events/e1/" is not a route: 404 not_found, not a 307
    app.state = AppState()
    app.state.settings = settings
    return app
