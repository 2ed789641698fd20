"""The OpenAPI 3.1 document served at ``/openapi.json`` (placeholder until written out in full)."""

from starlette.requests import Request

from service.http import JSON

DOCUMENT: dict = {"openapi": "3.1.0", "info": {"title": "boxoffice", "version": "0.1.0"}, "paths": {}}


async def openapi(request: Request) -> JSON:
    return JSON(DOCUMENT)
