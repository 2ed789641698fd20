"""HTTP plumbing shared by the handlers: JSON in and out, the error contract, admin auth."""

from __future__ import annotations

import hmac
import logging
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

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


async def read_json(request: Request, model: type[M]) -> M:
    """Read at most ``max_body_bytes`` of body, decode it and validate it.

    Raises DomainError: payload_too_large (413), malformed_json (400), validation_failed (422).
    """
    limit = request.app.state.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise DomainError("payload_too_large", details={"max_bytes": limit})
    if declared is not None and declared.isdigit():
        body = await request.body()  # bounded by the declared length checked above
    else:  # chunked: count while reading
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise DomainError("payload_too_large", details={"max_bytes": limit})
            chunks.append(chunk)
        body = b"".join(chunks)
    try:
        data = orjson.loads(body) if body else None
    except orjson.JSONDecodeError as exc:
        raise DomainError("malformed_json", details={"reason": str(exc)}) from None
    if not isinstance(data, dict):
        raise DomainError("malformed_json", message="The request body must be a JSON object.")
    return validate(model, data)


def require_admin(request: Request) -> None:
    """``Authorization: Bearer <BOXOFFICE_ADMIN_TOKEN>`` (RFC 6750), compared in constant time. Raises unauthorized."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    expected = request.app.state.settings.admin_token
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise DomainError("unauthorized")
