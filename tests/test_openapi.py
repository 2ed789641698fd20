"""The OpenAPI document (service/openapi.py) stays true: routes, request schemas and real replies."""

from __future__ import annotations

import re
from typing import Any

import pytest
from conftest import ADMIN, event_body, new_event_id
from pydantic import BaseModel

from service import domain
from service.app import ROUTES
from service.errors import ERRORS
from service.openapi import DOCUMENT, ID_PATTERN

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def operations() -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (path, method): op
        for path, item in DOCUMENT["paths"].items()
        for method, op in item.items()
        if method in METHODS
    }


def resolve(node: Any) -> Any:
    """Follow a local ``$ref`` (``#/components/...``) to what it names."""
    while isinstance(node, dict) and "$ref" in node:
        target: Any = DOCUMENT
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
    return node


def documented_codes(op: dict[str, Any]) -> dict[str, list[str]]:
    """status -> the error codes an operation documents for it (from the ``error.code`` enum)."""
    out = {}
    for status, response in op["responses"].items():
        schema = response.get("content", {}).get("application/json", {}).get("schema", {})
        for part in schema.get("allOf", []):
            enum = (
                part.get("properties", {}).get("error", {}).get("properties", {}).get("code", {}).get("enum")
            )
            if enum is not None:
                out[status] = enum
    return out


def all_refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in all_refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in all_refs(v)]
    return []


# The document itself --------------------------------------------------------------------------------


async def test_served_document_is_valid_openapi_3_1(client) -> None:
    r = await client.get("/openapi.json")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    served = r.json()
    assert served == DOCUMENT
    assert served["openapi"].startswith("3.1.")
    for ref in all_refs(served):
        assert ref.startswith("#/components/"), ref
        assert resolve({"$ref": ref}) is not None
    ids = [op["operationId"] for op in operations().values()]
    assert len(ids) == len(set(ids)), "operationId must be unique"
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(served)  # raises OpenAPIValidationError with the path of the first problem


def test_every_route_and_method_is_documented_and_nothing_else() -> None:
    routed = {
        (route.path, method.lower())
        for route in ROUTES
        for method in route.methods
        if method != "HEAD"  # Starlette answers HEAD wherever GET is routed
    }
    assert routed == set(operations())


def test_path_parameters_match_the_route_templates() -> None:
    for path, item in DOCUMENT["paths"].items():
        in_template = set(re.findall(r"{(\w+)}", path))
        for method, op in item.items():
            if method not in METHODS:
                continue
            params = [resolve(p) for p in item.get("parameters", []) + op.get("parameters", [])]
            in_path = {p["name"] for p in params if p["in"] == "path"}
            assert in_path == in_template, f"{method.upper()} {path}"
            assert all(p["required"] for p in params if p["in"] == "path")
            for p in params:
                if p["in"] == "path":
                    assert p["schema"]["pattern"] == domain.ID_RE.pattern


def test_admin_routes_need_the_bearer_token() -> None:
    admin = {(p, m) for (p, m), op in operations().items() if op.get("security")}
    assert admin == {
        ("/v1/events", "post"),
        ("/v1/events/{event_id}/pause", "post"),
        ("/v1/events/{event_id}/resume", "post"),
    }
    for key in admin:
        assert "unauthorized" in documented_codes(operations()[key])["401"]
    scheme = DOCUMENT["components"]["securitySchemes"]["adminToken"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")


def test_documented_error_codes_exist_with_their_status() -> None:
    enum = resolve({"$ref": "#/components/schemas/ErrorCode"})["enum"]
    assert enum == list(ERRORS)
    for (path, method), op in operations().items():
        codes = documented_codes(op)
        assert "method_not_allowed" in codes.get("405", []), f"{method.upper()} {path}"
        for status, group in codes.items():
            for code in group:
                assert code in enum, f"{method.upper()} {path}: {code}"
                assert ERRORS[code][0] == int(status), f"{method.upper()} {path}: {code} under {status}"


def test_every_script_error_code_is_documented_somewhere() -> None:
    """Codes the Lua scripts return (their ``fail('...')`` calls) are either API codes or mapped to 422."""
    from service.inventory import _VALIDATION
    from service.scripts import LUA_DIR

    script_codes = {
        code for path in LUA_DIR.rglob("*.lua") for code in re.findall(r"fail\('(\w+)'", path.read_text())
    }
    assert script_codes, "no fail('...') found: has the scripts' error convention changed?"
    documented = {
        code for op in operations().values() for group in documented_codes(op).values() for code in group
    }
    for code in script_codes:
        assert code in documented or code in _VALIDATION, code


# Request schemas agree with the pydantic models -------------------------------------------------------

CONSTRAINTS = (
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "enum",
    "default",
)


def _flatten(prop: dict[str, Any]) -> dict[str, Any]:
    """Pydantic writes ``X | None`` as ``anyOf: [X, {type: null}]``; merge it into one dict."""
    if "anyOf" not in prop:
        return prop
    out = {k: v for k, v in prop.items() if k != "anyOf"}
    for part in prop["anyOf"]:
        if part.get("type") != "null":
            out.update(part)
    return out


@pytest.mark.parametrize(
    "model", [domain.EventSpec, domain.ZoneSpec, domain.HoldRequest, domain.HoldItem, domain.ConfirmRequest]
)
def test_request_schema_agrees_with_the_model(model: type[BaseModel]) -> None:
    ours = DOCUMENT["components"]["schemas"][model.__name__]
    theirs = model.model_json_schema(ref_template="#/components/schemas/{model}")
    assert set(ours["properties"]) == set(theirs["properties"])
    assert set(ours["required"]) == set(theirs.get("required", []))
    assert ours["additionalProperties"] is False and theirs["additionalProperties"] is False
    for name, prop in theirs["properties"].items():
        prop, documented = _flatten(prop), ours["properties"][name]
        for key in CONSTRAINTS:
            if key in prop and not (key == "default" and prop[key] is None):
                assert documented.get(key) == prop[key], f"{model.__name__}.{name}: {key}"
        if "items" in prop and "$ref" in prop["items"]:
            assert documented["items"] == prop["items"], f"{model.__name__}.{name}: items"
    assert ID_PATTERN == domain.ID_RE.pattern


# Real replies match the document ----------------------------------------------------------------------


def _validator():
    """A JSON Schema 2020-12 check of a value against a pointer into the document (None without jsonschema)."""
    try:
        import jsonschema
        import referencing
        from referencing.jsonschema import DRAFT202012
    except ImportError:  # comes with openapi-spec-validator (test extra)
        return None
    registry = referencing.Registry().with_resource("urn:boxoffice", DRAFT202012.create_resource(DOCUMENT))

    def validate(instance: Any, pointer: str) -> None:
        schema = {"$ref": f"urn:boxoffice#{pointer}"}
        v = jsonschema.Draft202012Validator(
            schema, registry=registry, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
        )
        v.validate(instance)

    return validate


VALIDATE = _validator()


def check_reply(r, method: str, path: str, status: int, code: str | None = None) -> None:
    """``r`` has ``status``, that status is documented for ``method path``, and the body fits its schema."""
    assert r.status_code == status, r.text
    op = operations()[(path, method)]
    response = op["responses"].get(str(status))
    assert response is not None, f"{method.upper()} {path} does not document {status}"
    if code is not None:
        assert r.json()["error"]["code"] == code
        assert code in documented_codes(op)[str(status)]
    content_type = r.headers["content-type"].split(";")[0]
    assert content_type in response["content"], f"{method.upper()} {path} {status}: {content_type}"
    assert "x-request-id" in {h.lower() for h in response["headers"]}
    assert r.headers.get("x-request-id")
    if content_type == "application/json" and VALIDATE is not None:
        escaped = path.replace("~", "~0").replace("/", "~1")
        _validator()(
            r.json(), f"/paths/{escaped}/{method}/responses/{status}/content/application~1json/schema"
        )


async def test_error_replies_are_documented_for_their_route(client, make_event) -> None:
    missing = new_event_id("missing")
    check_reply(
        await client.get(f"/v1/events/{missing}"), "get", "/v1/events/{event_id}", 404, "event_not_found"
    )
    check_reply(
        await client.get(f"/v1/events/{missing}/availability"),
        "get",
        "/v1/events/{event_id}/availability",
        404,
        "event_not_found",
    )
    check_reply(
        await client.get(f"/v1/events/{missing}/orders/o_{'0' * 32}"),
        "get",
        "/v1/events/{event_id}/orders/{order_id}",
        404,
        "event_not_found",
    )
    body = event_body()
    del body["zones"]
    check_reply(
        await client.post("/v1/events", json=body, headers=ADMIN),
        "post",
        "/v1/events",
        422,
        "validation_failed",
    )
    check_reply(await client.post("/v1/events", json=event_body()), "post", "/v1/events", 401, "unauthorized")
    wrong = {"Authorization": "Bearer not-the-token"}
    check_reply(
        await client.post(f"/v1/events/{missing}/pause", headers=wrong),
        "post",
        "/v1/events/{event_id}/pause",
        401,
        "unauthorized",
    )
    r = await client.delete(f"/v1/events/{missing}")
    check_reply(r, "get", "/v1/events/{event_id}", 405, "method_not_allowed")
    assert r.headers["allow"]

    event = await make_event()
    eid = event["event_id"]
    holds = f"/v1/events/{eid}/holds"
    big = {"customer_id": "c", "items": [{"zone_id": "floor", "quantity": 1}], "pad": "x" * 70_000}
    check_reply(
        await client.post(holds, json=big), "post", "/v1/events/{event_id}/holds", 413, "payload_too_large"
    )
    check_reply(
        await client.post(holds, content=b'{"customer_id": ', headers={"content-type": "application/json"}),
        "post",
        "/v1/events/{event_id}/holds",
        400,
        "malformed_json",
    )
    check_reply(
        await client.post(holds, json={"customer_id": "c", "items": [{"zone_id": "floor", "quantity": 101}]}),
        "post",
        "/v1/events/{event_id}/holds",
        409,
        "sold_out",
    )
    check_reply(
        await client.post(holds, json={"customer_id": "c", "items": [{"zone_id": "nope", "quantity": 1}]}),
        "post",
        "/v1/events/{event_id}/holds",
        404,
        "zone_not_found",
    )
    check_reply(
        await client.post(holds, json={"customer_id": "c", "items": [{"zone_id": "floor", "quantity": 7}]}),
        "post",
        "/v1/events/{event_id}/holds",
        409,
        "limit_exceeded",
    )
    seats = "/v1/events/{event_id}/zones/{zone_id}/seats"
    check_reply(
        await client.get(f"/v1/events/{eid}/zones/floor/seats"), "get", seats, 422, "validation_failed"
    )
    check_reply(
        await client.get(f"/v1/events/{eid}/zones/sec-101/seats?limit=0"),
        "get",
        seats,
        422,
        "validation_failed",
    )
    check_reply(await client.get(f"/v1/events/{eid}/zones/nope/seats"), "get", seats, 404, "zone_not_found")

    hold = await client.post(
        holds, json={"customer_id": "c", "items": [{"zone_id": "sec-101", "seats": ["a1"]}]}
    )
    hold_id = hold.json()["hold_id"]
    check_reply(
        await client.post(
            holds, json={"customer_id": "d", "items": [{"zone_id": "sec-101", "seats": ["A1"]}]}
        ),
        "post",
        "/v1/events/{event_id}/holds",
        409,
        "seats_unavailable",
    )
    one = f"/v1/events/{eid}/holds/{hold_id}"
    check_reply(
        await client.post(one + "/confirm", json={}),
        "post",
        "/v1/events/{event_id}/holds/{hold_id}/confirm",
        422,
        "validation_failed",
    )
    await client.post(one + "/confirm", json={"payment_ref": "pay-1"})
    check_reply(
        await client.post(one + "/release"),
        "post",
        "/v1/events/{event_id}/holds/{hold_id}/release",
        409,
        "hold_confirmed",
    )
    check_reply(
        await client.get(f"/v1/events/{eid}/holds/h_{'0' * 32}"),
        "get",
        "/v1/events/{event_id}/holds/{hold_id}",
        404,
        "hold_not_found",
    )
    check_reply(
        await client.get(f"/v1/events/{eid}/orders/o_{'0' * 32}"),
        "get",
        "/v1/events/{event_id}/orders/{order_id}",
        404,
        "order_not_found",
    )
    check_reply(
        await client.post("/v1/events", json=event, headers=ADMIN), "post", "/v1/events", 409, "event_exists"
    )

    key = {"Idempotency-Key": f"k-{eid}"}
    await client.post(
        holds, json={"customer_id": "e", "items": [{"zone_id": "floor", "quantity": 1}]}, headers=key
    )
    check_reply(
        await client.post(
            holds, json={"customer_id": "e", "items": [{"zone_id": "floor", "quantity": 2}]}, headers=key
        ),
        "post",
        "/v1/events/{event_id}/holds",
        409,
        "idempotency_conflict",
    )
    r = await client.post(f"/v1/events/{eid}/pause", headers=ADMIN)
    check_reply(r, "post", "/v1/events/{event_id}/pause", 200)
    check_reply(
        await client.post(holds, json={"customer_id": "f", "items": [{"zone_id": "floor", "quantity": 1}]}),
        "post",
        "/v1/events/{event_id}/holds",
        409,
        "sale_paused",
    )


async def test_success_replies_fit_their_schemas(client, make_event) -> None:
    eid = (await make_event())["event_id"]
    check_reply(await client.get(f"/v1/events/{eid}"), "get", "/v1/events/{event_id}", 200)
    check_reply(
        await client.get(f"/v1/events/{eid}/availability"), "get", "/v1/events/{event_id}/availability", 200
    )
    seats = "/v1/events/{event_id}/zones/{zone_id}/seats"
    page = await client.get(f"/v1/events/{eid}/zones/sec-101/seats?limit=3&status=available")
    check_reply(page, "get", seats, 200)
    assert page.json()["next"] == "A3"
    check_reply(await client.get(f"/v1/events/{eid}/zones/sec-101/seats?after=B9"), "get", seats, 200)

    holds = "/v1/events/{event_id}/holds"
    body = {
        "customer_id": "c",
        "items": [{"zone_id": "floor", "quantity": 2}, {"zone_id": "sec-101", "seats": ["b1"]}],
    }
    key = {"Idempotency-Key": f"k-{eid}"}
    first = await client.post(f"/v1/events/{eid}/holds", json=body, headers=key)
    check_reply(first, "post", holds, 201)
    check_reply(await client.post(f"/v1/events/{eid}/holds", json=body, headers=key), "post", holds, 200)
    hold_id = first.json()["hold_id"]
    one = f"/v1/events/{eid}/holds/{hold_id}"
    check_reply(await client.get(one), "get", "/v1/events/{event_id}/holds/{hold_id}", 200)
    confirm = "/v1/events/{event_id}/holds/{hold_id}/confirm"
    order = await client.post(one + "/confirm", json={"payment_ref": "pay-1"})
    check_reply(order, "post", confirm, 201)
    check_reply(await client.post(one + "/confirm", json={"payment_ref": "pay-1"}), "post", confirm, 200)
    check_reply(await client.get(one), "get", "/v1/events/{event_id}/holds/{hold_id}", 200)
    order_id = order.json()["order_id"]
    check_reply(
        await client.get(f"/v1/events/{eid}/orders/{order_id}"),
        "get",
        "/v1/events/{event_id}/orders/{order_id}",
        200,
    )

    other = await client.post(
        f"/v1/events/{eid}/holds", json={**body, "customer_id": "d", "items": body["items"][:1]}
    )
    release = f"/v1/events/{eid}/holds/{other.json()['hold_id']}/release"
    check_reply(await client.post(release), "post", "/v1/events/{event_id}/holds/{hold_id}/release", 200)
    check_reply(
        await client.post(f"/v1/events/{eid}/pause", headers=ADMIN),
        "post",
        "/v1/events/{event_id}/pause",
        200,
    )
    check_reply(
        await client.post(f"/v1/events/{eid}/resume", headers=ADMIN),
        "post",
        "/v1/events/{event_id}/resume",
        200,
    )
    check_reply(await client.get("/healthz"), "get", "/healthz", 200)
    check_reply(await client.get("/readyz"), "get", "/readyz", 200)
    check_reply(await client.get("/openapi.json"), "get", "/openapi.json", 200)
    check_reply(await client.get("/metrics"), "get", "/metrics", 200)


async def test_a_pause_while_another_change_holds_the_event_is_a_documented_409(
    app, client, make_event, monkeypatch
) -> None:
    from service import catalog

    eid = (await make_event())["event_id"]
    monkeypatch.setattr(catalog, "API_LOCK_WAIT_SECONDS", 0.3)
    key = catalog.CATALOG_LOCK.format(eid)
    async with app.state.pg.acquire() as other:  # e.g. a rebuild or a repair of this event
        await other.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", key)
        try:
            r = await client.post(f"/v1/events/{eid}/pause", headers=ADMIN)
        finally:
            await other.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", key)
    check_reply(r, "post", "/v1/events/{event_id}/pause", 409, "event_busy")
    assert r.json()["error"]["details"] == {"event_id": eid}
    assert (await client.post(f"/v1/events/{eid}/pause", headers=ADMIN)).status_code == 200
