"""
Tests for C{docs/openapi.yaml}: the REST document must stay true to the
server. It must be valid OpenAPI 3.1; every route served must be documented
and every documented route served; the documented parameter limits must be
the ones enforced; and real answers of every documented status of every
route (from the API over the seeded store, and from a real daemon for the
probes) must match the documented schemas and headers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import pytest_twisted
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.servers import free_port
from tests.test_api import (  # noqa: F401 - fixtures
    Answer, SwitchableStore, bearer, call, seed, serve, store,
)
from tickstock.events import SYMBOL
from tickstock.web.api import BARS_MAX, PATTERNS_DEFAULT, PATTERNS_MAX, ROUTES

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
DOC: dict[str, Any] = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text("utf-8"))
BASE_URI = "urn:tickstock:openapi"
REGISTRY: Registry = Registry().with_resource(
    BASE_URI, Resource.from_contents(DOC, default_specification=DRAFT202012))
PROBES = ("/health", "/ready")
EXAMPLE_PATH_PARAMS = {"symbol": "AAPL", "key": "etf_growth"}
VALID_QUERY = {
    "symbol": "AAPL", "pattern": "Doji", "min_confidence": "0.5", "since": "0",
    "until": "4102444800", "limit": "5", "cursor": "99999999999999-0",
}


def escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def resolve(node: Any) -> tuple[Any, str | None]:
    """A node behind its C{$ref}s, and the JSON pointer of the last one."""
    where = None
    while isinstance(node, dict) and "$ref" in node:
        where = node["$ref"][1:]
        node = DOC
        for part in where.strip("/").split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
    return node, where


def response_of(path: str, status: int) -> tuple[dict[str, Any], str]:
    """The documented response and the JSON pointer of its JSON schema."""
    pointer = f"/paths/{escape(path)}/get/responses/{status}"
    response, where = resolve(DOC["paths"][path]["get"]["responses"][str(status)])
    return response, (where or pointer) + "/content/application~1json/schema"


def check(path: str, status: int, answer: Answer) -> None:
    """C{answer} has the status, headers and body C{path} documents for it."""
    assert answer.status == status, (path, answer)
    response, pointer = response_of(path, status)
    assert answer.header("content-type") == "application/json"
    validator = Draft202012Validator({"$ref": BASE_URI + "#" + pointer}, registry=REGISTRY)
    errors = sorted(validator.iter_errors(answer.body), key=str)
    assert not errors, (path, status, [e.message for e in errors[:5]], answer.body)
    for name in response.get("headers", {}):
        header, _ = resolve(response["headers"][name])
        value = answer.header(name)
        assert value is not None, (path, status, name)
        schema = dict(header["schema"])
        if schema.get("type") == "integer":
            value = int(value)
        Draft202012Validator(schema).validate(value)


def concrete(path: str) -> str:
    for name, value in EXAMPLE_PATH_PARAMS.items():
        path = path.replace("{" + name + "}", value)
    return path


def query_parameters(path: str) -> dict[str, dict[str, Any]]:
    found = {}
    for parameter in DOC["paths"][path]["get"].get("parameters", []):
        parameter, _ = resolve(parameter)
        if parameter["in"] == "query":
            found[parameter["name"]] = resolve(parameter["schema"])[0]
    return found


# ---------------------------------------------------------------- the document


def test_document_is_valid_openapi_3_1():
    """The document passes the OpenAPI 3.1 validator."""
    from openapi_spec_validator import validate

    assert DOC["openapi"].startswith("3.1")
    validate(DOC)


def test_every_route_served_is_documented_and_every_documented_route_served():
    """
    The documented paths are exactly the API's routes plus the probes, and
    every top-level child of the real site (but the WebSocket, in
    asyncapi.yaml) is documented; every route is GET only.
    """
    from autobahn.twisted.resource import WebSocketResource
    from autobahn.twisted.websocket import WebSocketServerFactory
    from twisted.internet.task import Clock

    from tickstock.cache import MemoryCache
    from tickstock.store.memory import MemoryStore
    from tickstock.auth import anonymous
    from tickstock.web.api import build_api
    from tickstock.web.site import JSONStatus, build_site

    assert set(DOC["paths"]) == set(ROUTES) | set(PROBES)
    for path, item in DOC["paths"].items():
        assert set(item) == {"get"}, path
    clock = Clock()
    api = build_api(MemoryStore(clock), MemoryCache(clock), anonymous, 1, clock=clock)
    status = JSONStatus(lambda: (True, {}))
    site = build_site(WebSocketResource(WebSocketServerFactory()), status, status, 1, api=api)
    children = {name.decode() for name in site.resource.children} - {"ws"}
    documented_tops = {path.split("/")[1] for path in DOC["paths"]}
    assert children == documented_tops


def test_documented_limits_are_the_enforced_ones():
    """The limits in the document are the code's constants."""
    patterns = query_parameters("/api/patterns")
    assert patterns["limit"]["maximum"] == PATTERNS_MAX
    assert patterns["limit"]["default"] == PATTERNS_DEFAULT
    assert query_parameters("/api/ohlcv/{symbol}")["limit"]["maximum"] == BARS_MAX
    symbol = DOC["components"]["schemas"]["Symbol"]["pattern"]
    assert symbol.rstrip("$") == SYMBOL.pattern.removesuffix(r"\Z")
    assert DOC["components"]["schemas"]["PatternPage"]["properties"]["patterns"]["maxItems"] == PATTERNS_MAX


# ---------------------------------------------------------------- real answers


@pytest_twisted.ensureDeferred
async def test_documented_parameters_are_accepted_and_their_bounds_enforced(store, seed, serve):
    """
    Each documented query parameter is accepted with a valid value; at its
    documented maximum or maxLength it is accepted, one past it is a 400
    naming it; an undocumented parameter is a 400.
    """
    _, port = serve(store)

    async def expect(url: str, name: str, value: Any, ok: bool) -> None:
        answer = await call(port, f"{url}?{urlencode({name: value})}", bearer())
        assert answer.status == (200 if ok else 400), (url, name, value, answer)
        if not ok:
            assert answer.body["error"]["parameter"] == name

    for path in ROUTES:
        url = concrete(path)
        for name, schema in query_parameters(path).items():
            await expect(url, name, VALID_QUERY[name], True)
            if schema.get("type") == "integer":
                await expect(url, name, schema["minimum"], True)
                await expect(url, name, schema["maximum"], True)
                await expect(url, name, schema["minimum"] - 1, False)
                await expect(url, name, schema["maximum"] + 1, False)
            elif schema.get("type") == "number":
                await expect(url, name, schema["minimum"], True)
                await expect(url, name, schema["maximum"], True)
                await expect(url, name, schema["maximum"] + 0.5, False)
            elif "maxLength" in schema and "pattern" not in schema:
                await expect(url, name, "x" * schema["maxLength"], True)
                await expect(url, name, "x" * (schema["maxLength"] + 1), False)
        check(path, 400, await call(port, f"{url}?undocumented=1", bearer()))


BAD_REQUESTS = {
    "/api/patterns": "/api/patterns?limit=0",
    "/api/symbols": "/api/symbols?symbol=AAPL",
    "/api/ohlcv/{symbol}": "/api/ohlcv/aapl",
    "/api/universes": "/api/universes?limit=1",
    "/api/universes/{key}": "/api/universes/bad%20key",
}


@pytest_twisted.ensureDeferred
async def test_api_answers_match_the_documented_schemas(store, seed, serve):
    """
    A real answer of every documented status of every API route (200, 400,
    401, 404, 503; the 503s from a store fake that fails) validates against
    the documented schema and carries the documented headers.
    """
    _, port = serve(store)
    fake = SwitchableStore(store)
    fake.mode = "unavailable"
    _, down = serve(fake)
    checked: set[tuple[str, int]] = set()
    for path in ROUTES:
        url = concrete(path)
        statuses = {int(s) for s in DOC["paths"][path]["get"]["responses"]}
        answers = {
            200: await call(port, url + ("?limit=3" if path == "/api/patterns" else ""), bearer()),
            400: await call(port, BAD_REQUESTS[path], bearer()),
            401: await call(port, url),
            503: await call(down, url, bearer()),
        }
        if 404 in statuses:
            answers[404] = await call(port, url.replace("etf_growth", "no_such_key"), bearer())
        assert set(answers) == statuses, path
        for status, answer in answers.items():
            check(path, status, answer)
            checked.add((path, status))
    paged = await call(port, "/api/patterns?limit=1000", bearer())
    check("/api/patterns", 200, paged)
    assert paged.body["next_cursor"] is None and len(paged.body["patterns"]) == 250
    bars = await call(port, "/api/ohlcv/AAPL", bearer())
    check("/api/ohlcv/{symbol}", 200, bars)
    assert len(bars.body["bars"]) > 1
    assert checked == {(p, int(s)) for p in ROUTES for s in DOC["paths"][p]["get"]["responses"]}


@pytest_twisted.ensureDeferred
async def test_api_stats_match_the_documented_schema(store, seed, serve):
    """stats() (which /health carries as "api") matches the ApiStats schema."""
    api, port = serve(store)
    await call(port, "/api/patterns", bearer())
    await call(port, "/api/patterns", bearer())
    await call(port, "/api/nope")
    validator = Draft202012Validator({"$ref": BASE_URI + "#/components/schemas/ApiStats"},
                                     registry=REGISTRY)
    validator.validate(api.stats())
    assert api.stats()["cache"]["hits"] == 1


@pytest_twisted.ensureDeferred
async def test_probe_answers_match_the_documented_schemas(daemons):
    """
    /health and /ready of a real daemon match their documented schemas:
    the embedded demo (ready, 200) and a daemon whose Redis is not there
    (not ready, 503).
    """
    demo = daemons()
    for path in PROBES:
        answer = await call(demo.port, path)
        check(path, 200, answer)
    alone = daemons(redis=f"redis://127.0.0.1:{free_port()}/0")
    check("/health", 200, await call(alone.port, "/health"))
    answer = await call(alone.port, "/ready")
    check("/ready", 503, answer)
    assert answer.body["ready"] is False
