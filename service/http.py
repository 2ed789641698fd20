"""HTTP plumbing shared by the handlers: JSON in and out, the error contract, admin auth."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.errors import DomainError

log = logging.getLogger("boxoffice.http")
M = TypeVar("M", bound=BaseModel)


class JSON(Response):
    """A JSON response rendered by orjson."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(err: DomainError, headers: dict[str, str] | None = None) -> JSON:
    return JSON(err.body(), status_code=err.status, headers=headers)


def _pydantic_errors(exc: ValidationError) -> list[dict[str, Any]]:
    out = []
    for e in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(p) for p in e["loc"]) or "body"
        msg = e["msg"].removeprefix("Value error, ")
        out.append({"field": field, "message": msg})
    return out


def validate(model: type[M], data: Any) -> M:
    """Validate JSON-decoded data against a model. Raises DomainError(validation_failed) with per-field errors."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise DomainError("validation_failed", details={"errors": _pydantic_errors(exc)}) from None


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of header ``name`` (lower-case bytes, as ASGI gives names) in an HTTP scope, or None.

    A scan of the raw ASGI list: ``request.headers.get`` builds a Headers object and raises and catches a
    KeyError when the header is absent, which a hold without an Idempotency-Key paid on every request."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes, read straight from the ASGI ``receive`` channel.

    Raises DomainError(payload_too_large, 413) as soon as the declared ``Content-Length`` or the bytes
    received so far pass ``limit``; starlette.requests.ClientDisconnect if the client went away.
    """
    declared = header(request.scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise DomainError("payload_too_large", details={"max_bytes": limit})
    body = b""
    while True:
        message = await request.receive()
        if message["type"] != "http.request":  # http.disconnect
            raise ClientDisconnect()
        body += message.get("body", b"")
        if len(body) > limit:
            raise DomainError("payload_too_large", details={"max_bytes": limit})
        if not message.get("more_body", False):
            return body


async def read_json(request: Request, model: type[M]) -> M:
    """Read at most ``max_body_bytes`` of body and validate it as JSON against ``model`` in one step
    (pydantic parses the bytes itself: no intermediate dict).

    Raises DomainError: payload_too_large (413), malformed_json (400; also for JSON that is not an object),
    validation_failed (422, per-field errors).
    """
    body = await read_body(request, request.app.state.settings.max_body_bytes)
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        first = errors[0]
        if first["type"] == "json_invalid":
            reason = first.get("ctx", {}).get("error", first["msg"])
            raise DomainError("malformed_json", details={"reason": reason}) from None
        if first["type"] == "model_type" and not first["loc"]:
            raise DomainError("malformed_json", message="The request body must be a JSON object.") from None
        raise DomainError("validation_failed", details={"errors": _pydantic_errors(exc)}) from None


class ASGIEndpoint:
    """A handler ``async def handler(request) -> Response`` served as a plain ASGI app, for the sale's hottest
    routes and the benchmark's no-work ceiling (``/healthz``): ``Route(path, ASGIEndpoint(handler))``.

    Starlette wraps a function endpoint (``request_response``) in three closures per request and in three more
    coroutine frames, which a request waiting on Redis suspends and resumes through. Here the handler is
    called straight from the router. A failure propagates unchanged to the app's exception handlers
    (ExceptionMiddleware, ServerErrorMiddleware), so the JSON error contract is the same as on every route.
    """

    def __init__(self, handler: Callable[[Request], Awaitable[Response]]):
        self.handler = handler
        self.__name__ = handler.__name__  # the route's name, as for a function endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.handler(Request(scope, receive))
        await response(scope, receive, send)


def require_admin(request: Request) -> None:
    """``Authorization: Bearer <BOXOFFICE_ADMIN_TOKEN>`` (RFC 6750), compared in constant time. Raises unauthorized."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    expected = request.app.state.settings.admin_token
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise DomainError("unauthorized")
