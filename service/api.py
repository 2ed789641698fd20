"""The JSON API's handlers. Each one parses, calls the domain, and shapes the reply; errors are DomainError."""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from service import catalog, db, metrics
from service.domain import (
    EVENT_ON_SALE,
    EVENT_PAUSED,
    ConfirmRequest,
    EventSpec,
    HoldRequest,
    check_idempotency_key,
    check_ident,
    iso_ms,
)
from service.errors import DomainError, validation_failed
from service.http import JSON, header, read_json, require_admin


def _event_id(request: Request) -> str:
    return check_ident(request.path_params["event_id"], "event")


def _hold_id(request: Request) -> str:
    return check_ident(request.path_params["hold_id"], "hold")


def hold_view(event_id: str, h: dict[str, Any]) -> dict[str, Any]:
    out = {
        "hold_id": h["hold_id"],
        "event_id": event_id,
        "customer_id": h["customer_id"],
        "status": h["status"],
        "items": h["items"],
        "tickets": h["tickets"],
        "amount_cents": h["amount_cents"],
        "created_at": iso_ms(h["created_at_ms"]),
        "expires_at": iso_ms(h["expires_at_ms"]),
    }
    if h.get("order_id"):
        out["order_id"] = h["order_id"]
    return out


def order_view(o: dict[str, Any], *, persisted: bool | None = None) -> dict[str, Any]:
    out = {
        "order_id": o["order_id"],
        "event_id": o["event_id"],
        "hold_id": o["hold_id"],
        "customer_id": o["customer_id"],
        "status": "confirmed",
        "items": o["items"],
        "amount_cents": o["amount_cents"],
        "payment_ref": o["payment_ref"],
        "confirmed_at": iso_ms(o["confirmed_at_ms"]),
    }
    if persisted is not None:
        out["persisted"] = persisted
        out["persisted_at"] = iso_ms(o.get("persisted_at_ms"))
    return out


def event_view(spec: EventSpec, status: str) -> dict[str, Any]:
    return {
        "event_id": spec.event_id,
        "name": spec.name,
        "starts_at": iso_ms(round(spec.starts_at.timestamp() * 1000)),
        "hold_ttl_seconds": spec.hold_ttl_seconds,
        "max_tickets_per_customer": spec.max_tickets_per_customer,
        "status": status,
        "zones": [
            {"zone_id": z.zone_id, "kind": z.kind, "capacity": z.capacity, "price_cents": z.price_cents}
            for z in spec.zones
        ],
    }


# Catalog (admin) ---------------------------------------------------------------------------------


async def create_event(request: Request) -> JSON:
    require_admin(request)
    spec = await read_json(request, EventSpec)
    state = request.app.state
    await catalog.create_event(state.pg, state.inventory, spec)
    return JSON(event_view(spec, EVENT_ON_SALE), status_code=201)


async def get_event(request: Request) -> JSON:
    state = request.app.state
    spec, status = await db.get_event(state.pg, _event_id(request))
    return JSON(event_view(spec, status))


async def _set_status(request: Request, status: str) -> JSON:
    require_admin(request)
    event_id = _event_id(request)
    state = request.app.state
    await catalog.set_status(state.pg, state.inventory, event_id, status)
    return JSON({"event_id": event_id, "status": status})


async def pause_event(request: Request) -> JSON:
    return await _set_status(request, EVENT_PAUSED)


async def resume_event(request: Request) -> JSON:
    return await _set_status(request, EVENT_ON_SALE)


# Buying (public) ---------------------------------------------------------------------------------


async def availability(request: Request) -> JSON:
    event_id = _event_id(request)
    data = await request.app.state.inventory.availability(event_id)
    zones = [
        {k: z[k] for k in ("zone_id", "kind", "capacity", "available", "held", "sold")} for z in data["zones"]
    ]
    return JSON({"event_id": event_id, "status": data["status"], "zones": zones})


async def seats(request: Request) -> JSON:
    event_id = _event_id(request)
    zone_id = check_ident(request.path_params["zone_id"], "zone")
    q = request.query_params
    status = q.get("status", "")
    if status not in ("", "available", "held", "sold"):
        raise validation_failed("status", "one of available, held, sold")
    raw_limit = q.get("limit", "500")
    if not re.fullmatch(r"[0-9]{1,4}", raw_limit) or not 1 <= int(raw_limit) <= 1000:
        raise validation_failed("limit", "an integer from 1 to 1000")
    after = q.get("after", "").strip().upper()
    page = await request.app.state.inventory.seat_page(event_id, zone_id, status, after, int(raw_limit))
    return JSON({"event_id": event_id, "zone_id": zone_id, "seats": page["seats"], "next": page["next"]})


async def create_hold(request: Request) -> JSON:
    event_id = _event_id(request)
    key = check_idempotency_key(header(request.scope, b"idempotency-key"))
    req = await read_json(request, HoldRequest)
    hold, replay = await request.app.state.inventory.hold(event_id, req, key)
    if not replay:
        metrics.TALLY.inc(metrics.HOLDS, event_id)
    return JSON(hold_view(event_id, hold), status_code=200 if replay else 201)


async def get_hold(request: Request) -> JSON:
    event_id = _event_id(request)
    hold = await request.app.state.inventory.get_hold(event_id, _hold_id(request))
    return JSON(hold_view(event_id, hold))


async def confirm_hold(request: Request) -> JSON:
    event_id = _event_id(request)
    hold_id = _hold_id(request)
    req = await read_json(request, ConfirmRequest)
    order, created = await request.app.state.inventory.confirm(event_id, hold_id, req.payment_ref)
    if created:
        metrics.TALLY.inc(metrics.CONFIRMS, event_id)
    return JSON(order_view(order), status_code=201 if created else 200)


async def release_hold(request: Request) -> JSON:
    event_id = _event_id(request)
    status = await request.app.state.inventory.release(event_id, _hold_id(request))
    metrics.TALLY.inc(metrics.RELEASES, event_id)
    return JSON({"hold_id": request.path_params["hold_id"], "status": status})


async def get_order(request: Request) -> JSON:
    """The order from PostgreSQL (persisted: true) or, until the worker wrote it, from Redis (persisted: false).
    Neither has it: event_not_found if the catalog has no such event, else order_not_found."""
    event_id = _event_id(request)
    order_id = check_ident(request.path_params["order_id"], "order")
    state = request.app.state
    order = await db.get_order(state.pg, event_id, order_id)
    if order is not None:
        return JSON(order_view(order, persisted=True))
    order = await state.inventory.find_order(event_id, order_id)
    if order is None:
        raise DomainError(
            "order_not_found" if await db.event_exists(state.pg, event_id) else "event_not_found"
        )
    return JSON(order_view(order, persisted=False))


async def metrics_endpoint(request: Request) -> Response:
    """Prometheus text exposition, merged across processes in multiprocess mode."""
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


# Health ------------------------------------------------------------------------------------------


async def healthz(request: Request) -> JSON:
    return JSON({"status": "ok"})


async def readyz(request: Request) -> JSON:
    """200 when Redis answers with every script loaded and PostgreSQL answers; 503 with what failed otherwise."""
    state = request.app.state
    checks: dict[str, str] = {}
    try:
        checks["redis"] = "ok" if await state.inventory.runner.loaded() else "scripts not loaded"
        if checks["redis"] != "ok":
            await state.inventory.runner.load()
    except Exception as exc:
        checks["redis"] = f"error: {type(exc).__name__}"
    try:
        await state.pg.fetchval("SELECT 1")
        checks["postgres"] = "ok"
    except Exception as exc:
        checks["postgres"] = f"error: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return JSON({"status": "ready" if ok else "not_ready", "checks": checks}, status_code=200 if ok else 503)
