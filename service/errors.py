"""Domain errors: one class, one code per failure, and the HTTP status each code maps to.

Every error reaches a client as ``{"error": {"code": ..., "message": ..., "details": {...}}}``.
"""

from __future__ import annotations

from typing import Any

# code -> (HTTP status, default message)
ERRORS: dict[str, tuple[int, str]] = {
    "malformed_json": (400, "The request body is not valid JSON."),
    "unauthorized": (401, "A valid admin bearer token is required."),
    "not_found": (404, "No such route."),
    "event_not_found": (404, "No such event."),
    "zone_not_found": (404, "No such zone in this event."),
    "hold_not_found": (404, "No such hold (or it ended long ago and was forgotten)."),
    "order_not_found": (404, "No such order."),
    "method_not_allowed": (405, "Method not allowed on this route."),
    "event_exists": (409, "An event with this id exists already."),
    "event_busy": (
        409,
        "Another change of this event (a create, pause, resume, rebuild or repair) is in progress; retry.",
    ),
    "sold_out": (409, "Not enough tickets left in this zone."),
    "seats_unavailable": (409, "Some of these seats are held or sold."),
    "limit_exceeded": (409, "This would pass the event's limit of tickets per customer."),
    "sale_paused": (409, "The sale of this event is paused."),
    "idempotency_conflict": (409, "This Idempotency-Key was used with a different request body."),
    "hold_expired": (409, "The hold expired before it was confirmed."),
    "hold_released": (409, "The hold was released."),
    "hold_confirmed": (409, "The hold is confirmed; it cannot be released."),
    "payload_too_large": (413, "The request body is larger than allowed."),
    "validation_failed": (422, "The request is not valid."),
    "internal_error": (500, "Something went wrong on our side; nothing you sent was half-applied."),
    "unavailable": (503, "A backing store does not answer; try again shortly."),
}


class DomainError(Exception):
    """A failure with a stable code (a key of ``ERRORS``) and JSON-able details."""

    def __init__(self, code: str, message: str | None = None, details: dict[str, Any] | None = None):
        if code not in ERRORS:
            raise ValueError(f"unknown error code {code!r}")
        self.code = code
        self.status = ERRORS[code][0]
        self.message = message or ERRORS[code][1]
        self.details = details or {}
        super().__init__(f"{code}: {self.message}")

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


def validation_failed(field: str, problem: str, **extra: Any) -> DomainError:
    """A 422 naming one field, in the same shape as pydantic's per-field errors."""
    return DomainError(
        "validation_failed", details={"errors": [{"field": field, "message": problem, **extra}]}
    )
