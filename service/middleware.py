"""Pure ASGI middleware (no BaseHTTPMiddleware: it costs too much on the hot path).

``RequestContext``: takes ``X-Request-Id`` from the request (or makes one), echoes it on the response,
puts it in the logging context, and observes the request's latency per route template.
"""

from __future__ import annotations

import os
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.http import header
from service.logs import request_id

_VALID_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


class RequestContext:
    def __init__(self, app: ASGIApp, templates: dict[object, str]):
        self.app = app
        self.templates = templates  # endpoint -> route path template, for bounded metric labels

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = header(scope, b"x-request-id")
        if rid is None or not _VALID_ID.fullmatch(rid):
            rid = os.urandom(16).hex()
        token = request_id.set(rid)
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = self.templates.get(scope.get("endpoint"), "unmatched")
            metrics.child(metrics.REQUEST_SECONDS, scope["method"], route, str(status)).observe(
                time.perf_counter() - started
            )
            request_id.reset(token)
