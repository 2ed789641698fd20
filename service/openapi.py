"""The OpenAPI 3.1 document of the HTTP API, served at ``GET /openapi.json``.

Written out by hand as one dict (no framework generates it). Schemas are JSON Schema 2020-12, which
OpenAPI 3.1 uses as is (https://spec.openapis.org/oas/v3.1.0#schema-object).

Errors: every error reply is ``{"error": {"code", "message", "details"}}`` (``service.errors``). Each
operation lists, per HTTP status, the codes it can return as an ``enum`` on ``error.code``; they were
read off ``service/api.py``, ``service/http.py``, ``service/inventory.py`` (script codes ``invalid_item``,
``unknown_seats`` and ``ttl_too_long`` become ``validation_failed``) and the ``lua/*.lua`` headers.
Every route answers ``405 method_not_allowed`` to a method it does not list, so each operation lists it.

``tests/test_openapi.py`` keeps the document true: every route of ``service.app.ROUTES`` and nothing
else, request schemas agreeing with the pydantic models of ``service.domain``, and real replies (bodies,
statuses, error codes) matching what is documented here.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request

from service.domain import (
    HOLD_STATES,
    MAX_HOLD_TTL_SECONDS,
    MAX_SEATS_PER_EVENT,
    MAX_SEATS_PER_ZONE,
)
from service.errors import ERRORS
from service.http import JSON

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SEAT_PATTERN = r"^[A-Z0-9][A-Z0-9._-]{0,31}$"

ERROR_DETAILS: dict[str, str] = {
    "malformed_json": "`{reason}` when the body does not parse",
    "payload_too_large": "`{max_bytes}`",
    "event_exists": "`{event_id}`",
    "event_busy": "`{event_id}`",
    "zone_not_found": "`{zone_id}` when the script names it",
    "sold_out": "`{zone_id, requested, available}`",
    "seats_unavailable": "`{seats: [{zone_id, seat}]}`, every seat already held or sold",
    "limit_exceeded": "`{limit, current, requested}` in tickets",
    "hold_expired": "`{expires_at_ms}`",
    "validation_failed": "`{errors: [{field, message, ...}]}`, one entry per bad field",
    "unavailable": "`{store: redis | postgres}`; the reply carries `Retry-After` (seconds)",
}
"""What ``error.details`` holds for the codes that carry details (``{}`` for the others)."""

# Error sets shared by many operations.
ALWAYS = ("method_not_allowed", "internal_error")
STORES = (*ALWAYS, "unavailable")
BODY = ("malformed_json", "payload_too_large", "validation_failed")


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


_REQUEST_ID = {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}}


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "headers": _REQUEST_ID, "content": _json(schema)}


def _errors(*codes: str) -> dict[str, dict[str, Any]]:
    """Error responses for ``codes``, one per HTTP status, with ``error.code`` restricted to those codes."""
    by_status: dict[int, list[str]] = {}
    for code in dict.fromkeys(codes):
        by_status.setdefault(ERRORS[code][0], []).append(code)
    out = {}
    for status, group in sorted(by_status.items()):
        lines = []
        for code in group:
            detail = f" details: {ERROR_DETAILS[code]}." if code in ERROR_DETAILS else ""
            lines.append(f"- `{code}`: {ERRORS[code][1]}{detail}")
        headers = dict(_REQUEST_ID)
        if status == 503:
            headers["Retry-After"] = {"$ref": "#/components/headers/Retry-After"}
        if status == 405:
            headers["Allow"] = {"$ref": "#/components/headers/Allow"}
        schema = {
            "allOf": [
                _ref("Error"),
                {"properties": {"error": {"properties": {"code": {"enum": group}}}}},
            ]
        }
        out[str(status)] = {"description": "\n".join(lines), "headers": headers, "content": _json(schema)}
    return out


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", "pattern": ID_PATTERN},
    }


EVENT_ID = _path_param("event_id", "The event. A malformed id answers 404 `event_not_found`.")
ZONE_ID = _path_param("zone_id", "A zone of the event. A malformed id answers 404 `zone_not_found`.")
HOLD_ID = _path_param("hold_id", "The hold id given by `POST .../holds` (`h_` + 32 hex digits).")
ORDER_ID = _path_param("order_id", "The order id given by confirm (`o_` + 32 hex digits).")
ADMIN = [{"adminToken": []}]


def _operation(
    operation_id: str,
    summary: str,
    tag: str,
    responses: dict[str, Any],
    errors: tuple[str, ...],
    *,
    description: str = "",
    parameters: list[dict[str, Any]] | None = None,
    body: str | None = None,
    admin: bool = False,
) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": operation_id, "summary": summary, "tags": [tag]}
    if description:
        op["description"] = description
    if parameters:
        op["parameters"] = parameters
    if body:
        op["requestBody"] = {"required": True, "content": _json(_ref(body))}
    if admin:
        op["security"] = ADMIN
    op["responses"] = {**responses, **_errors(*errors)}
    return op


# Schemas ------------------------------------------------------------------------------------------

_INT = {"type": "integer"}
_STR = {"type": "string"}
_TIME = {"type": "string", "format": "date-time", "description": "RFC 3339, UTC, millisecond precision."}
_SEAT_LABELS = {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1000}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "additionalProperties": False,
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message", "details"],
                "additionalProperties": False,
                "properties": {
                    "code": _ref("ErrorCode"),
                    "message": {"type": "string", "description": "For people; may change. Match on `code`."},
                    "details": {"type": "object", "description": "Code-specific fields, `{}` when none."},
                },
            }
        },
    },
    "ErrorCode": {
        "type": "string",
        "enum": list(ERRORS),
        "description": "\n".join(f"- `{c}` ({s}): {m}" for c, (s, m) in ERRORS.items())
        + "\n- `not_found` is also the reply to any path that is not a route.",
    },
    # Requests (service/domain.py models; cross-field rules are stated in the descriptions and checked
    # by the server, which answers 422 validation_failed).
    "EventSpec": {
        "type": "object",
        "description": "A new event and its zones, in catalog order.",
        "required": ["event_id", "name", "starts_at", "zones"],
        "additionalProperties": False,
        "properties": {
            "event_id": {"type": "string", "pattern": ID_PATTERN},
            "name": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": r"^[^\x00-\x1f\x7f]+$"},
            "starts_at": {
                "type": "string",
                "format": "date-time",
                "description": "In the years 1970-2199; without a time zone, UTC is assumed. Answered in UTC, "
                "to the millisecond.",
            },
            "hold_ttl_seconds": {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_HOLD_TTL_SECONDS,
                "default": 600,
                "description": "How long a hold lasts unless the hold request asks for less.",
            },
            "max_tickets_per_customer": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 10},
            "zones": {
                "type": "array",
                "minItems": 1,
                "maxItems": 1000,
                "items": _ref("ZoneSpec"),
                "description": f"Zone ids must be distinct; at most {MAX_SEATS_PER_EVENT} seats in all zones.",
            },
        },
    },
    "ZoneSpec": {
        "type": "object",
        "description": (
            "A `ga` zone (general admission) has `capacity` and no seats. A `seated` zone has exactly one "
            'of `seats` (labels) or `rows` (row label -> seat count, `{"A": 3}` = A1, A2, A3), 1 to '
            f"{MAX_SEATS_PER_ZONE} seats in all; its capacity is its number of seats. Seat labels are "
            "trimmed and upper-cased and must be distinct after that."
        ),
        "required": ["zone_id", "kind", "price_cents"],
        "additionalProperties": False,
        "properties": {
            "zone_id": {"type": "string", "pattern": ID_PATTERN},
            "kind": {"type": "string", "enum": ["ga", "seated"]},
            "price_cents": {"type": "integer", "minimum": 0, "maximum": 1_000_000_000},
            "capacity": {"type": ["integer", "null"], "minimum": 1, "maximum": 10_000_000},
            "seats": {"type": ["array", "null"], "items": {"type": "string"}},
            "rows": {
                "type": ["object", "null"],
                "additionalProperties": {"type": "integer", "minimum": 1, "maximum": 10_000},
            },
        },
        "oneOf": [
            {
                "required": ["capacity"],
                "properties": {
                    "kind": {"const": "ga"},
                    "capacity": {"type": "integer"},
                    "seats": {"type": "null"},
                    "rows": {"type": "null"},
                },
            },
            {
                "properties": {"kind": {"const": "seated"}},
                "oneOf": [
                    {"required": ["seats"], "properties": {"seats": {"type": "array"}}},
                    {"required": ["rows"], "properties": {"rows": {"type": "object"}}},
                ],
            },
        ],
    },
    "HoldRequest": {
        "type": "object",
        "description": "Hold every item or none. Each zone appears once in `items`.",
        "required": ["customer_id", "items"],
        "additionalProperties": False,
        "properties": {
            "customer_id": {
                "type": "string",
                "minLength": 1,
                "maxLength": 128,
                "pattern": r"^[^\s\x00-\x1f\x7f]+$",
                "description": "No white space or control characters.",
            },
            "items": {"type": "array", "minItems": 1, "maxItems": 100, "items": _ref("HoldItem")},
            "ttl_seconds": {
                "type": ["integer", "null"],
                "minimum": 1,
                "maximum": MAX_HOLD_TTL_SECONDS,
                "description": "Defaults to the event's `hold_ttl_seconds`, and may not exceed it.",
            },
        },
    },
    "HoldItem": {
        "type": "object",
        "description": "`quantity` for a `ga` zone, or `seats` (labels) for a `seated` zone: exactly one.",
        "required": ["zone_id"],
        "additionalProperties": False,
        "properties": {
            "zone_id": {"type": "string", "pattern": ID_PATTERN},
            "quantity": {"type": ["integer", "null"], "minimum": 1, "maximum": 1000},
            "seats": {**_SEAT_LABELS, "type": ["array", "null"]},
        },
        "oneOf": [
            {"required": ["quantity"], "properties": {"quantity": {"type": "integer"}}},
            {"required": ["seats"], "properties": {"seats": {"type": "array"}}},
        ],
    },
    "ConfirmRequest": {
        "type": "object",
        "description": "Payment was taken elsewhere; `payment_ref` records it on the order.",
        "required": ["payment_ref"],
        "additionalProperties": False,
        "properties": {
            "payment_ref": {
                "type": "string",
                "minLength": 1,
                "maxLength": 200,
                "pattern": r"^[^\x00-\x1f\x7f]+$",
            }
        },
    },
    # Replies (the *_view functions of service/api.py).
    "Event": {
        "type": "object",
        "required": [
            "event_id",
            "name",
            "starts_at",
            "hold_ttl_seconds",
            "max_tickets_per_customer",
            "status",
            "zones",
        ],
        "properties": {
            "event_id": _STR,
            "name": _STR,
            "starts_at": {"type": "string", "format": "date-time"},
            "hold_ttl_seconds": _INT,
            "max_tickets_per_customer": _INT,
            "status": _ref("EventStatusName"),
            "zones": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["zone_id", "kind", "capacity", "price_cents"],
                    "properties": {
                        "zone_id": _STR,
                        "kind": {"type": "string", "enum": ["ga", "seated"]},
                        "capacity": _INT,
                        "price_cents": _INT,
                    },
                },
            },
        },
    },
    "EventStatusName": {
        "type": "string",
        "enum": ["on_sale", "paused"],
        "description": "A paused event refuses new holds; holds already given can still be confirmed.",
    },
    "EventStatus": {
        "type": "object",
        "required": ["event_id", "status"],
        "properties": {"event_id": _STR, "status": _ref("EventStatusName")},
    },
    "Availability": {
        "type": "object",
        "description": "Live counters from Redis, expired holds already given back. "
        "Per zone: available + held + sold == capacity.",
        "required": ["event_id", "status", "zones"],
        "properties": {
            "event_id": _STR,
            "status": _ref("EventStatusName"),
            "zones": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["zone_id", "kind", "capacity", "available", "held", "sold"],
                    "properties": {
                        "zone_id": _STR,
                        "kind": {"type": "string", "enum": ["ga", "seated"]},
                        "capacity": _INT,
                        "available": {"type": "integer", "minimum": 0},
                        "held": {"type": "integer", "minimum": 0},
                        "sold": {"type": "integer", "minimum": 0},
                    },
                },
            },
        },
    },
    "SeatPage": {
        "type": "object",
        "required": ["event_id", "zone_id", "seats", "next"],
        "properties": {
            "event_id": _STR,
            "zone_id": _STR,
            "seats": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["seat", "status"],
                    "properties": {
                        "seat": _STR,
                        "status": {"type": "string", "enum": ["available", "held", "sold"]},
                    },
                },
            },
            "next": {
                "type": ["string", "null"],
                "description": "Pass as `after` for the next page; null at the end of the seat map.",
            },
        },
    },
    "Item": {
        "type": "object",
        "description": "`quantity` (general admission) or `seats` (normalised labels).",
        "required": ["zone_id"],
        "properties": {
            "zone_id": _STR,
            "quantity": {"type": "integer", "minimum": 1},
            "seats": {"type": "array", "items": {"type": "string", "pattern": SEAT_PATTERN}},
        },
        "oneOf": [{"required": ["quantity"]}, {"required": ["seats"]}],
    },
    "Hold": {
        "type": "object",
        "description": "State machine: active -> confirmed | released | expired; terminal states never change.",
        "required": [
            "hold_id",
            "event_id",
            "customer_id",
            "status",
            "items",
            "tickets",
            "amount_cents",
            "created_at",
            "expires_at",
        ],
        "properties": {
            "hold_id": _STR,
            "event_id": _STR,
            "customer_id": _STR,
            "status": {"type": "string", "enum": list(HOLD_STATES)},
            "items": {"type": "array", "items": _ref("Item")},
            "tickets": {"type": "integer", "minimum": 1},
            "amount_cents": {"type": "integer", "minimum": 0},
            "created_at": _TIME,
            "expires_at": _TIME,
            "order_id": {"type": "string", "description": "Present once confirmed."},
        },
    },
    "Order": {
        "type": "object",
        "required": [
            "order_id",
            "event_id",
            "hold_id",
            "customer_id",
            "status",
            "items",
            "amount_cents",
            "payment_ref",
            "confirmed_at",
        ],
        "properties": {
            "order_id": _STR,
            "event_id": _STR,
            "hold_id": _STR,
            "customer_id": _STR,
            "status": {"type": "string", "const": "confirmed"},
            "items": {"type": "array", "items": _ref("Item")},
            "amount_cents": {"type": "integer", "minimum": 0},
            "payment_ref": {"type": ["string", "null"]},
            "confirmed_at": _TIME,
            "persisted": {
                "type": "boolean",
                "description": "GET only: true once the write-through worker stored the order in PostgreSQL.",
            },
            "persisted_at": {**_TIME, "type": ["string", "null"]},
        },
    },
    "Released": {
        "type": "object",
        "required": ["hold_id", "status"],
        "properties": {
            "hold_id": _STR,
            "status": {
                "type": "string",
                "enum": ["released", "expired"],
                "description": "`expired` if the hold had expired first; its stock is back either way.",
            },
        },
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "const": "ok"}},
    },
    "Readiness": {
        "type": "object",
        "required": ["status", "checks"],
        "properties": {
            "status": {"type": "string", "enum": ["ready", "not_ready"]},
            "checks": {
                "type": "object",
                "required": ["redis", "postgres"],
                "properties": {
                    "redis": {
                        "type": "string",
                        "description": "`ok`, `scripts not loaded`, or `error: <type>`.",
                    },
                    "postgres": {"type": "string", "description": "`ok` or `error: <type>`."},
                },
            },
        },
    },
}

# Paths --------------------------------------------------------------------------------------------

_HOLD_ERRORS_DOC = (
    "Atomic in one Lua script (`lua/hold.lua`): every item is checked before anything is written. "
    "With an `Idempotency-Key`, a repeat with the same body answers 200 with the first hold; with a "
    "different body, 409 `idempotency_conflict`. Expired holds never cause a refusal: before answering "
    "`sold_out`, `seats_unavailable` or `limit_exceeded` the script reaps the event's expired holds and "
    "checks again (a hold that fits leaves them to the sweeper)."
)

PATHS: dict[str, Any] = {
    "/v1/events": {
        "post": _operation(
            "createEvent",
            "Create an event (PostgreSQL and Redis, both or neither) and put it on sale.",
            "catalog",
            {"201": _ok("Created; on sale.", _ref("Event"))},
            (*STORES, *BODY, "unauthorized", "event_exists", "event_busy"),
            body="EventSpec",
            admin=True,
        ),
    },
    "/v1/events/{event_id}": {
        "parameters": [EVENT_ID],
        "get": _operation(
            "getEvent",
            "The event's catalog record (from PostgreSQL).",
            "catalog",
            {"200": _ok("The event.", _ref("Event"))},
            (*STORES, "event_not_found"),
        ),
    },
    "/v1/events/{event_id}/pause": {
        "parameters": [EVENT_ID],
        "post": _operation(
            "pauseEvent",
            "Refuse new holds (holds already given can still be confirmed or released).",
            "catalog",
            {"200": _ok("Paused (also if it was paused already).", _ref("EventStatus"))},
            (*STORES, "unauthorized", "event_not_found", "event_busy"),
            admin=True,
        ),
    },
    "/v1/events/{event_id}/resume": {
        "parameters": [EVENT_ID],
        "post": _operation(
            "resumeEvent",
            "Put the event back on sale.",
            "catalog",
            {"200": _ok("On sale (also if it was on sale already).", _ref("EventStatus"))},
            (*STORES, "unauthorized", "event_not_found", "event_busy"),
            admin=True,
        ),
    },
    "/v1/events/{event_id}/availability": {
        "parameters": [EVENT_ID],
        "get": _operation(
            "getAvailability",
            "Live per-zone counters (Redis).",
            "buying",
            {"200": _ok("Counters.", _ref("Availability"))},
            (*STORES, "event_not_found"),
        ),
    },
    "/v1/events/{event_id}/zones/{zone_id}/seats": {
        "parameters": [EVENT_ID, ZONE_ID],
        "get": _operation(
            "getSeats",
            "One page of a seated zone's seat map, in catalog order.",
            "buying",
            {"200": _ok("A page of seats.", _ref("SeatPage"))},
            (*STORES, "event_not_found", "zone_not_found", "validation_failed"),
            description=(
                "422 `validation_failed` for a bad `status` or `limit`, an `after` label that is not a seat "
                "of the zone, or a general-admission zone (it has no seat map). A page may hold fewer than "
                "`limit` seats when filtering by `status`; keep following `next` until it is null."
            ),
            parameters=[
                {
                    "name": "status",
                    "in": "query",
                    "required": False,
                    "description": "Only seats in this state (default: all).",
                    "schema": {"type": "string", "enum": ["available", "held", "sold"]},
                },
                {
                    "name": "after",
                    "in": "query",
                    "required": False,
                    "description": "Start after this seat label (the `next` of the previous page).",
                    "schema": {"type": "string"},
                },
                {
                    "name": "limit",
                    "in": "query",
                    "required": False,
                    "description": "Most seats in the page.",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 500},
                },
            ],
        ),
    },
    "/v1/events/{event_id}/holds": {
        "parameters": [EVENT_ID],
        "post": _operation(
            "createHold",
            "Hold tickets (general admission) and/or seats for a while.",
            "buying",
            {
                "201": _ok("Held. Confirm before `expires_at` or the stock goes back.", _ref("Hold")),
                "200": _ok("Idempotent replay: the hold first made with this Idempotency-Key.", _ref("Hold")),
            },
            (
                *STORES,
                *BODY,
                "event_not_found",
                "zone_not_found",
                "sale_paused",
                "sold_out",
                "seats_unavailable",
                "limit_exceeded",
                "idempotency_conflict",
            ),
            description=_HOLD_ERRORS_DOC,
            body="HoldRequest",
            parameters=[
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "description": "1-255 visible ASCII characters. Remembered per event for "
                    "BOXOFFICE_IDEMPOTENCY_TTL_SECONDS (default one day).",
                    "schema": {"type": "string", "pattern": r"^[\x21-\x7e]{1,255}$"},
                }
            ],
        ),
    },
    "/v1/events/{event_id}/holds/{hold_id}": {
        "parameters": [EVENT_ID, HOLD_ID],
        "get": _operation(
            "getHold",
            "A hold and its current status (never stale: expired holds are reaped first).",
            "buying",
            {"200": _ok("The hold.", _ref("Hold"))},
            (*STORES, "event_not_found", "hold_not_found"),
        ),
    },
    "/v1/events/{event_id}/holds/{hold_id}/confirm": {
        "parameters": [EVENT_ID, HOLD_ID],
        "post": _operation(
            "confirmHold",
            "Turn an active hold into an order.",
            "buying",
            {
                "201": _ok(
                    "Confirmed now. The order is in Redis and its outbox; the worker writes it "
                    "through to PostgreSQL.",
                    _ref("Order"),
                ),
                "200": _ok("Confirmed before: the same order (safe to retry).", _ref("Order")),
            },
            (*STORES, *BODY, "event_not_found", "hold_not_found", "hold_expired", "hold_released"),
            description="Atomic in `lua/confirm.lua`: the hold's stock moves from held to sold and the "
            "order is appended to the event's outbox stream in the same script. Works while the sale is "
            "paused. With BOXOFFICE_WAIT_AOF the reply waits until Redis fsynced its AOF.",
            body="ConfirmRequest",
        ),
    },
    "/v1/events/{event_id}/holds/{hold_id}/release": {
        "parameters": [EVENT_ID, HOLD_ID],
        "post": _operation(
            "releaseHold",
            "Give an active hold's stock back (idempotent). No body.",
            "buying",
            {"200": _ok("Released, or it had expired already.", _ref("Released"))},
            (*STORES, "event_not_found", "hold_not_found", "hold_confirmed"),
        ),
    },
    "/v1/events/{event_id}/orders/{order_id}": {
        "parameters": [EVENT_ID, ORDER_ID],
        "get": _operation(
            "getOrder",
            "An order: from PostgreSQL once persisted, from Redis until then.",
            "buying",
            {"200": _ok("The order; `persisted` says which store answered.", _ref("Order"))},
            (*STORES, "event_not_found", "order_not_found", "hold_not_found"),
            description="`hold_not_found` only in the moment an unpersisted order's records leave Redis "
            "(BOXOFFICE_HOLD_RETENTION_SECONDS after the confirm).",
        ),
    },
    "/healthz": {
        "get": _operation(
            "healthz",
            "Liveness: the process answers (touches no store).",
            "ops",
            {"200": _ok("Alive.", _ref("Health"))},
            ALWAYS,
        ),
    },
    "/readyz": {
        "get": _operation(
            "readyz",
            "Readiness: Redis answers with every script loaded, and PostgreSQL answers.",
            "ops",
            {
                "200": _ok("Ready.", _ref("Readiness")),
                "503": _ok("Not ready; `checks` says what failed.", _ref("Readiness")),
            },
            ALWAYS,
        ),
    },
    "/metrics": {
        "get": _operation(
            "metrics",
            "Prometheus metrics, merged across every process in multiprocess mode.",
            "ops",
            {
                "200": {
                    "description": f"Prometheus text exposition format, Content-Type `{CONTENT_TYPE_LATEST}`.",
                    "headers": _REQUEST_ID,
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
            ALWAYS,
        ),
    },
    "/openapi.json": {
        "get": _operation(
            "openapi",
            "This document.",
            "ops",
            {"200": _ok("OpenAPI 3.1.", {"type": "object"})},
            ALWAYS,
        ),
    },
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "boxoffice",
        "version": "0.1.0",
        "summary": "Flash-sale ticketing: atomic holds in Redis, orders written through to PostgreSQL.",
        "description": (
            "Hold tickets or seats, then confirm the hold into an order before it expires. The sale never "
            "oversells, never sells a seat twice, and an expired hold's stock always comes back.\n\n"
            'Every error is `{"error": {"code", "message", "details"}}`; match on `code` (see the '
            "ErrorCode schema). Any path that is not a route answers 404 `not_found`. Every reply carries "
            "`X-Request-Id` (the request's own if it sent a valid one)."
        ),
        "license": {"name": "MIT", "identifier": "MIT"},
    },
    "servers": [{"url": "http://127.0.0.1:8000", "description": "`make run`"}],
    "tags": [
        {"name": "catalog", "description": "Events and zones (admin routes need the bearer token)."},
        {"name": "buying", "description": "Availability, seat maps, holds, confirms and orders."},
        {"name": "ops", "description": "Health, readiness, metrics, this document."},
    ],
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {
            "adminToken": {
                "type": "http",
                "scheme": "bearer",
                "description": "`Authorization: Bearer <BOXOFFICE_ADMIN_TOKEN>` (RFC 6750).",
            }
        },
        "headers": {
            "X-Request-Id": {
                "description": "The request's id: the one it sent (1-128 visible ASCII) or a new one.",
                "schema": {"type": "string"},
            },
            "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}},
            "Allow": {"description": "The methods the path accepts.", "schema": {"type": "string"}},
        },
        "responses": {
            "NotFound": {
                "description": "Any path that is not a route: 404 `not_found`.",
                "content": _json(
                    {
                        "allOf": [
                            _ref("Error"),
                            {"properties": {"error": {"properties": {"code": {"const": "not_found"}}}}},
                        ]
                    }
                ),
            }
        },
    },
}


async def openapi(request: Request) -> JSON:
    """``GET /openapi.json``: the document above."""
    return JSON(DOCUMENT)
