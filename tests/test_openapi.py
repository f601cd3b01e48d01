"""
Tests for C{docs/openapi.yaml}: the REST document must stay true to the
server. It must be valid OpenAPI 3.1; every route served must be documented
with exactly the methods it serves, and every documented route served; the
documented parameter and body limits must be the ones enforced; and real
answers of every documented status of every operation (from the API over
the seeded store with backtest jobs enabled, and from a real daemon for the
probes) must match the documented schemas and headers.

Fakes, said where used: L{SwitchableStore} (from test_api) makes the read
store fail; L{DownJobStore} is a job store that fails or hangs, and
L{DownLink} a producer link that cannot publish: failure modes a real store
or Redis cannot be made to show on cue. Everything else is real: the
memory or PostgreSQL store, the memory history, the router that feeds it
and persists what it stored, and L{Jobs}.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
import pytest_twisted
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.conftest import TEST_SECRET
from tests.servers import free_port
from tests.test_api import (  # noqa: F401 - fixtures
    AUTH,
    Answer,
    SwitchableStore,
    bearer,
    call,
    seed,
    serve,
    store,
    token,
)
from tests.wsclient import read_body
from tickstock.deliver.auth import JWTAuthenticator
from tickstock.domain.events import SYMBOL
from tickstock.domain.interfaces import IJobStore
from tickstock.domain.jobs import ACTIVE, FINAL, JOB_PATTERNS
from tickstock.history.memory import MemoryHistory
from tickstock.ingest.memory import MemoryBus
from tickstock.ingest.normalize import RESULT_FIELDS
from tickstock.ingest.router import Router
from tickstock.jobs.backtests import (
    MAX_SYMBOLS,
    MAX_YEARS,
    PARAMETERS,
    PARAMS,
    PROGRESS_CHANNEL,
    Jobs,
)
from tickstock.store import StoreUnavailable
from tickstock.web.api import (
    BARS_MAX,
    JOB_BODY_MAX,
    JOB_ID,
    JOBS_DEFAULT,
    JOBS_MAX,
    PATTERNS_DEFAULT,
    PATTERNS_MAX,
    ROUTES,
    ApiResource,
    build_api,
    job_view,
)

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
DOC: dict[str, Any] = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text("utf-8"))
BASE_URI = "urn:tickstock:openapi"
REGISTRY: Registry = Registry().with_resource(
    BASE_URI, Resource.from_contents(DOC, default_specification=DRAFT202012))
PROBES = ("/health", "/ready")
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
JOBS = "/api/jobs"
JOB = "/api/jobs/{job_id}"
RESULTS_CHANNEL = "tickstock.events.backtesting.results"
SOME_JOB_ID = "0b5e6f8e-2d4c-4d0e-9a57-3c1f2b7a9e10"
EXAMPLE_PATH_PARAMS = {"symbol": "AAPL", "key": "etf_growth", "job_id": SOME_JOB_ID}
VALID_QUERY = {
    "symbol": "AAPL", "pattern": "Doji", "min_confidence": "0.5", "since": "0",
    "until": "4102444800", "limit": "5", "cursor": "99999999999999-0",
}
VALID_QUERY_OF = {JOBS: {"cursor": SOME_JOB_ID}}
PARAMS_EXAMPLE = {"symbols": ["AAPL", "MSFT"], "start_date": "2023-01-01",
                  "end_date": "2023-12-31", "patterns": ["Doji"]}

CLAIMS = JWTAuthenticator(TEST_SECRET, permissions_claim="tickstock")
"""The test secret, reading the permissions claim: tokens without it are as with L{AUTH}."""


def narrow(**claim: Any) -> dict[bytes, list[bytes]]:
    """A bearer header for alice whose token's permissions claim is C{claim}."""
    return bearer(CLAIMS.mint("alice", time.time(), 3600, tickstock=claim))


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


def operations(path: str) -> dict[str, dict[str, Any]]:
    """The documented operations of C{path}, by upper-case HTTP method."""
    return {method.upper(): operation for method, operation in DOC["paths"][path].items()
            if method in HTTP_METHODS}


def documented_statuses() -> set[tuple[str, str, int]]:
    """Every C{(path, method, status)} the document promises for the API routes."""
    return {(path, method, int(status)) for path in ROUTES
            for method, operation in operations(path).items()
            for status in operation["responses"]}


def response_of(path: str, status: int, method: str = "GET") -> tuple[dict[str, Any], str]:
    """The documented response and the JSON pointer of its JSON schema."""
    pointer = f"/paths/{escape(path)}/{method.lower()}/responses/{status}"
    response, where = resolve(operations(path)[method]["responses"][str(status)])
    return response, (where or pointer) + "/content/application~1json/schema"


def check_against(response: dict[str, Any], pointer: str, answer: Answer, where: Any) -> None:
    """C{answer} has the headers and body of the documented C{response}."""
    assert answer.header("content-type") == "application/json", (where, answer)
    validator = Draft202012Validator({"$ref": BASE_URI + "#" + pointer}, registry=REGISTRY)
    errors = sorted(validator.iter_errors(answer.body), key=str)
    assert not errors, (where, [e.message for e in errors[:5]], answer.body)
    for name in response.get("headers", {}):
        header, _ = resolve(response["headers"][name])
        value = answer.header(name)
        assert value is not None, (where, name)
        schema = dict(header["schema"])
        if schema.get("type") == "integer":
            value = int(value)
        Draft202012Validator(schema).validate(value)


def check(path: str, status: int, answer: Answer, method: str = "GET") -> None:
    """C{answer} has the status, headers and body C{method path} documents for it."""
    assert answer.status == status, (method, path, answer)
    response, pointer = response_of(path, status, method)
    check_against(response, pointer, answer, (method, path, status))


def concrete(path: str) -> str:
    for name, value in EXAMPLE_PATH_PARAMS.items():
        path = path.replace("{" + name + "}", value)
    return path


def query_parameters(path: str, method: str = "GET") -> dict[str, dict[str, Any]]:
    found = {}
    for parameter in operations(path)[method].get("parameters", []):
        parameter, _ = resolve(parameter)
        if parameter["in"] == "query":
            found[parameter["name"]] = resolve(parameter["schema"])[0]
    return found


def job_body() -> tuple[dict[str, Any], dict[str, Any]]:
    """The documented request body of C{POST /api/jobs}, and its JSON schema."""
    body, _ = resolve(operations(JOBS)["POST"]["requestBody"])
    return body, resolve(body["content"]["application/json"]["schema"])[0]


def schema(name: str) -> dict[str, Any]:
    return DOC["components"]["schemas"][name]


# ---------------------------------------------------------------- requests and servers


async def request(port: int, method: str, path: str, body: bytes | None = None,
                  headers: dict[bytes, list[bytes]] | None = None,
                  content_type: str | None = "application/json") -> Answer:
    """One HTTP request with any method and an optional body: status, headers, parsed JSON."""
    headers = dict(headers or {})
    producer = None
    if body is not None:
        producer = FileBodyProducer(BytesIO(body))
        if content_type is not None:
            headers[b"content-type"] = [content_type.encode()]
    response = await Agent(reactor).request(
        method.encode(), f"http://127.0.0.1:{port}{path}".encode(), Headers(headers), producer)
    raw = await read_body(response)
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        parsed = None
    return Answer(response.code, response.headers, parsed, raw)


async def submit(port: int, params: Any, user: str | None = "alice", path: str = JOBS,
                 **kwargs: Any) -> Answer:
    """C{POST /api/jobs} with C{params} as JSON (or raw bytes), as C{user}."""
    body = params if isinstance(params, bytes) else orjson.dumps(params)
    return await request(port, "POST", path, body, bearer(token(user)) if user else None,
                         **kwargs)


@implementer(IJobStore)
class DownJobStore:
    """A job store that fails every call as unreachable, or (C{hang}) never answers."""

    def __init__(self, hang: bool = False) -> None:
        self.hang = hang

    def _answer(self) -> Deferred[Any]:
        return Deferred() if self.hang else fail(StoreUnavailable("down"))

    def create_job(self, record: Any, max_active: Any) -> Deferred[Any]:
        return self._answer()

    def job(self, job_id: Any) -> Deferred[Any]:
        return self._answer()

    def jobs(self, user: Any, before: Any, limit: Any) -> Deferred[Any]:
        return self._answer()

    def stale_jobs(self, cutoff: Any, limit: Any) -> Deferred[Any]:
        return self._answer()

    def close_job(self, job_id: Any, status: Any, error: Any, at: Any) -> Deferred[Any]:
        return self._answer()


class DownLink(MemoryBus):
    """A producer link whose publishes fail, like an unreachable Redis."""

    def publish(self, channel: str, payload: bytes) -> Deferred[int]:
        return fail(ConnectionError("down"))


@dataclass
class JobsServer:
    """The API with backtest jobs on a loopback port, and the parts behind it."""

    api: ApiResource
    port: int
    jobs: Jobs
    router: Router
    writes: list[Deferred[Any]]

    async def persisted(self) -> None:
        """Wait until every event the router stored is written to the store."""
        while self.writes:
            await self.writes.pop(0)

    async def report(self, channel: str, **data: Any) -> None:
        """A producer message on C{channel}, routed and persisted."""
        await self.router.receive(channel, orjson.dumps(data))
        await self.persisted()


@pytest.fixture
def serve_jobs() -> Iterator[Callable[..., JobsServer]]:
    """
    Start the API with backtest jobs on the real site, as the daemon wires
    it: C{serve_jobs(store, job_store=..., link=..., per_user=...,
    timeout=...)}. Jobs are recorded in C{job_store} (default: C{store}),
    the producer's events go through a real router and memory history, and
    what the history stored is written to C{store} (the persister's job).
    """
    from autobahn.twisted.resource import WebSocketResource
    from autobahn.twisted.websocket import WebSocketServerFactory

    from tickstock.store.cache import MemoryCache
    from tickstock.web.site import JSONStatus, build_site

    ports: list[Any] = []

    def start(store: Any, job_store: Any = None, link: Any = None, per_user: int = 3,
              timeout: float = 5.0) -> JobsServer:
        history = MemoryHistory(reactor, 1000, 3600, 1000)
        link = link or MemoryBus()
        writes: list[Deferred[Any]] = []
        router = Router(reactor, history, link,
                        stored=lambda event: writes.append(store.write([], [event])))
        jobs = Jobs(reactor, job_store or store, history, link, router.receive,
                    per_user=per_user, timeout=300)
        api = build_api(store, MemoryCache(reactor), CLAIMS, 5.0, clock=reactor,
                        timeout=timeout, jobs=jobs)
        site = build_site(
            WebSocketResource(WebSocketServerFactory()),
            JSONStatus(lambda: (True, {"status": "ok"})),
            JSONStatus(lambda: (True, {"ready": True})),
            timeout=5.0, api=api,
        )
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        ports.append(port)
        return JobsServer(api, port.getHost().port, jobs, router, writes)

    yield start
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


# ---------------------------------------------------------------- the document


def test_document_is_valid_openapi_3_1():
    """The document passes the OpenAPI 3.1 validator."""
    from openapi_spec_validator import validate

    assert DOC["openapi"].startswith("3.1")
    validate(DOC)


def test_every_route_served_is_documented_and_every_documented_route_served():
    """
    The documented paths are exactly the API's routes plus the probes, each
    route documented with exactly the methods it serves (the probes: GET),
    and every top-level child of the real site (but the WebSocket, in
    asyncapi.yaml, and the JS client's static files) is documented.
    """
    from autobahn.twisted.resource import WebSocketResource
    from autobahn.twisted.websocket import WebSocketServerFactory
    from twisted.internet.task import Clock

    from tickstock.deliver.auth import anonymous
    from tickstock.ops.metrics import Metrics, MetricsResource
    from tickstock.store.cache import MemoryCache
    from tickstock.store.memory import MemoryStore
    from tickstock.web.site import JSONStatus, build_site

    assert set(DOC["paths"]) == set(ROUTES) | set(PROBES) | {"/metrics"}
    assert set(operations("/metrics")) == {"GET"}
    for path, methods in ROUTES.items():
        assert set(operations(path)) == set(methods), path
    for path in PROBES:
        assert set(operations(path)) == {"GET"}, path
    operation_ids = [op["operationId"] for path in DOC["paths"]
                     for op in operations(path).values()]
    assert len(operation_ids) == len(set(operation_ids))
    clock = Clock()
    api = build_api(MemoryStore(clock), MemoryCache(clock), anonymous, 1, clock=clock)
    def report() -> tuple[bool, dict[str, object]]:
        return True, {}

    status = JSONStatus(report)
    metrics = MetricsResource(Metrics(clock, report, report, dict))
    site = build_site(WebSocketResource(WebSocketServerFactory()), status, status, 1, api=api,
                      metrics=metrics)
    children = {name.decode() for name in site.resource.children} - {"ws", "static"}
    documented_tops = {path.split("/")[1] for path in DOC["paths"]}
    assert children == documented_tops


def test_documented_limits_are_the_enforced_ones():
    """The limits in the document are the code's constants."""
    patterns = query_parameters("/api/patterns")
    assert patterns["limit"]["maximum"] == PATTERNS_MAX
    assert patterns["limit"]["default"] == PATTERNS_DEFAULT
    assert query_parameters("/api/ohlcv/{symbol}")["limit"]["maximum"] == BARS_MAX
    symbol = schema("Symbol")["pattern"]
    assert symbol.rstrip("$") == SYMBOL.pattern.removesuffix(r"\Z")
    assert schema("PatternPage")["properties"]["patterns"]["maxItems"] == PATTERNS_MAX

    jobs = query_parameters(JOBS)
    assert jobs["limit"]["maximum"] == JOBS_MAX
    assert jobs["limit"]["default"] == JOBS_DEFAULT
    assert jobs["cursor"]["pattern"].rstrip("$") == JOB_ID.pattern.removesuffix(r"\Z")
    assert schema("JobId")["pattern"].rstrip("$") == JOB_ID.pattern.removesuffix(r"\Z")
    location = DOC["components"]["headers"]["JobLocation"]["schema"]["pattern"]
    assert location == "^/api/jobs/" + schema("JobId")["pattern"].lstrip("^")
    assert schema("JobPage")["properties"]["jobs"]["maxItems"] == JOBS_MAX

    body, params = job_body()
    assert body["required"] is True
    assert body["x-tickstock-max-bytes"] == JOB_BODY_MAX
    assert f"{JOB_BODY_MAX} bytes" in body["description"]
    assert f"{JOB_BODY_MAX} bytes" in resolve(
        operations(JOBS)["POST"]["responses"]["413"])[0]["description"]
    assert list(params["properties"]) == list(PARAMS)
    assert set(params["required"]) == set(PARAMS) - {"patterns", "parameters"}
    assert params["additionalProperties"] is False
    symbols = params["properties"]["symbols"]
    assert (symbols["minItems"], symbols["maxItems"]) == (1, MAX_SYMBOLS)
    assert symbols["uniqueItems"] is True
    assert resolve(symbols["items"])[1] == "/components/schemas/Symbol"
    job_patterns = params["properties"]["patterns"]
    assert job_patterns["items"]["enum"] == list(JOB_PATTERNS)
    assert job_patterns["maxItems"] == len(JOB_PATTERNS)
    assert job_patterns["uniqueItems"] is True and job_patterns["default"] == []
    assert f"{MAX_YEARS} years" in params["description"]
    assert f"{MAX_YEARS} years" in params["properties"]["end_date"]["description"]
    parameters = resolve(params["properties"]["parameters"])[0]
    assert parameters["additionalProperties"] is False and parameters["default"] == {}
    assert list(parameters["properties"]) == list(PARAMETERS)
    for name, (low, low_allowed, high) in PARAMETERS.items():
        bounds = parameters["properties"][name]
        assert bounds["type"] == "number" and bounds["maximum"] == high
        assert bounds["minimum" if low_allowed else "exclusiveMinimum"] == low, name
    messages = yaml.safe_load((ROOT / "docs" / "asyncapi.yaml").read_text("utf-8"))
    sent = messages["components"]["schemas"]["BacktestParameters"]

    def bounds_of(schema: dict[str, Any]) -> dict[str, Any]:
        return {name: {k: v for k, v in prop.items() if k != "description"}
                for name, prop in schema["properties"].items()}

    assert bounds_of(sent) == bounds_of(parameters), "asyncapi.yaml says the same"

    assert schema("JobStatus")["enum"] == list(ACTIVE + FINAL)
    record = {"job_id": SOME_JOB_ID, "status": "queued", "params": PARAMS_EXAMPLE,
              "progress": 0.0, "results": None, "error": None,
              "created_at": 1.0, "updated_at": 2.0}
    assert list(schema("Job")["properties"]) == list(job_view(record))
    assert set(schema("Job")["required"]) == set(job_view(record))
    Draft202012Validator({"$ref": BASE_URI + "#/components/schemas/Job"},
                         registry=REGISTRY).validate(job_view(record))
    assert set(schema("JobResults")["required"]) == set(RESULT_FIELDS)


# ---------------------------------------------------------------- real answers


@pytest_twisted.ensureDeferred
async def test_documented_parameters_are_accepted_and_their_bounds_enforced(
        store, seed, serve_jobs):
    """
    Each documented query parameter of each operation is accepted with a
    valid value; at its documented minimum and maximum (or maxLength) it is
    accepted, one past it is a 400 naming it; an undocumented parameter is a
    400 for every operation. The body of POST /api/jobs: each documented
    bound (items, uniqueness, the pattern catalogue, required and unknown
    fields, dates and their span, the size) is accepted at the bound and
    refused past it, with C{fields} naming exactly the wrong fields.
    """
    server = serve_jobs(store, per_user=1000)
    port = server.port

    async def expect(method: str, url: str, name: str, value: Any, ok: bool) -> None:
        answer = await request(port, method, f"{url}?{urlencode({name: value})}",
                               headers=bearer())
        assert answer.status == (200 if ok else 400), (url, name, value, answer)
        if not ok:
            assert answer.body["error"]["parameter"] == name

    for path, methods in ROUTES.items():
        url = concrete(path)
        for method in methods:
            for name, param in query_parameters(path, method).items():
                valid = VALID_QUERY_OF.get(path, {}).get(name, VALID_QUERY[name])
                await expect(method, url, name, valid, True)
                if param.get("type") == "integer":
                    await expect(method, url, name, param["minimum"], True)
                    await expect(method, url, name, param["maximum"], True)
                    await expect(method, url, name, param["minimum"] - 1, False)
                    await expect(method, url, name, param["maximum"] + 1, False)
                elif param.get("type") == "number":
                    await expect(method, url, name, param["minimum"], True)
                    await expect(method, url, name, param["maximum"], True)
                    await expect(method, url, name, param["maximum"] + 0.5, False)
                elif "maxLength" in param and "pattern" not in param:
                    await expect(method, url, name, "x" * param["maxLength"], True)
                    await expect(method, url, name, "x" * (param["maxLength"] + 1), False)
            body = orjson.dumps(PARAMS_EXAMPLE) if method == "POST" else None
            answer = await request(port, method, f"{url}?undocumented=1", body, bearer())
            check(path, 400, answer, method)
            assert answer.body["error"]["parameter"] == "undocumented", (method, path)

    body, params = job_body()
    props = params["properties"]
    base = {"symbols": ["AAPL"], "start_date": "2023-01-01", "end_date": "2023-12-31"}

    async def expect_body(value: Any, wrong: set[str] | None) -> None:
        answer = await submit(port, value)
        if wrong is None:
            check(JOBS, 202, answer, "POST")
            assert answer.body["params"] == {"patterns": [], "parameters": {}, **value}
        else:
            check(JOBS, 400, answer, "POST")
            assert answer.body["error"]["code"] == "bad_params", (value, answer.body)
            assert set(answer.body["error"]["fields"]) == wrong, (value, answer.body)

    symbols = props["symbols"]
    names = [f"S{n}" for n in range(symbols["maxItems"] + 1)]
    await expect_body({**base, "symbols": names[:symbols["maxItems"]]}, None)
    await expect_body({**base, "symbols": names}, {"symbols"})
    await expect_body({**base, "symbols": names[:symbols["minItems"]]}, None)
    await expect_body({**base, "symbols": names[:symbols["minItems"] - 1]}, {"symbols"})
    await expect_body({**base, "symbols": ["AAPL", "AAPL"]}, {"symbols"})
    await expect_body({**base, "symbols": ["aapl"]}, {"symbols"})
    await expect_body({**base, "symbols": "AAPL"}, {"symbols"})
    catalogue = props["patterns"]["items"]["enum"]
    assert len(catalogue) == props["patterns"]["maxItems"]
    await expect_body({**base, "patterns": catalogue}, None)
    await expect_body({**base, "patterns": catalogue + catalogue[:1]}, {"patterns"})
    await expect_body({**base, "patterns": catalogue[:1] * 2}, {"patterns"})
    await expect_body({**base, "patterns": ["NoSuchPattern"]}, {"patterns"})
    await expect_body({**base, "patterns": props["patterns"]["default"]}, None)
    parameters = resolve(props["parameters"])[0]
    for name, bounds in parameters["properties"].items():
        wrong = {f"parameters.{name}"}
        high = bounds["maximum"]
        await expect_body({**base, "parameters": {name: high}}, None)
        await expect_body({**base, "parameters": {name: high * 1.5}}, wrong)
        if "minimum" in bounds:
            await expect_body({**base, "parameters": {name: bounds["minimum"]}}, None)
            await expect_body({**base, "parameters": {name: bounds["minimum"] - 1e-6}}, wrong)
        else:
            await expect_body({**base, "parameters": {name: bounds["exclusiveMinimum"]}}, wrong)
            await expect_body({**base, "parameters": {name: bounds["exclusiveMinimum"] + 1e-6}},
                              None)
        await expect_body({**base, "parameters": {name: str(high)}}, wrong)
    await expect_body({**base, "parameters": parameters["default"]}, None)
    await expect_body({**base, "parameters": {"leverage": 2}}, {"parameters.leverage"})
    await expect_body({**base, "parameters": [1]}, {"parameters"})
    for name in props:
        without = {k: v for k, v in {**base, "patterns": ["Doji"]}.items() if k != name}
        await expect_body(without, {name} if name in params["required"] else None)
    await expect_body({**base, "undocumented": 1}, {"undocumented"})
    await expect_body({**base, "start_date": "2023-02-30"}, {"start_date"})
    await expect_body({**base, "start_date": "2023-1-01"}, {"start_date"})
    await expect_body({**base, "start_date": 20230101}, {"start_date"})
    await expect_body({**base, "end_date": "2022-12-31"}, {"end_date"})
    await expect_body({**base, "end_date": "2023-01-01"}, None)
    await expect_body({**base, "end_date": f"{2023 + MAX_YEARS}-01-01"}, None)
    await expect_body({**base, "end_date": f"{2023 + MAX_YEARS}-01-02"}, {"end_date"})
    await expect_body({"symbols": [], "start_date": "x", "end_date": None, "patterns": "Doji",
                       "colour": "red"}, {"symbols", "start_date", "end_date", "patterns",
                                          "colour"})

    most = body["x-tickstock-max-bytes"]
    exact = orjson.dumps(base)
    exact += b" " * (most - len(exact))
    answer = await submit(port, exact)
    check(JOBS, 202, answer, "POST")
    check(JOBS, 413, await submit(port, exact + b" "), "POST")


@pytest_twisted.ensureDeferred
async def test_api_answers_match_the_documented_schemas(store, seed, serve, serve_jobs):
    """
    A real answer of every documented status of every operation of every
    API route validates against the documented schema and carries the
    documented headers: the read routes (200, 400, 401, 403 from a token's
    permissions claim, 404, 503; the 503s from a store fake that fails) and
    the backtest jobs (202 with Location, 400 bad_params with fields,
    bad_json and bad_parameter, 401, 403 with C{backtests: false}, 404, 409,
    413, 415, 429, 503 from a failing job store, a hanging one and a
    producer link that fails). Any other method on a route is a 405 with
    the Allow header the document describes.
    """
    answers: dict[tuple[str, str, int], list[Answer]] = defaultdict(list)

    def add(path: str, method: str, status: int, answer: Answer) -> Answer:
        answers[(path, method, status)].append(answer)
        return answer

    await read_route_answers(store, serve, add)
    await job_route_answers(store, serve_jobs, add)
    assert set(answers) == documented_statuses()
    for (path, method, status), got in answers.items():
        for answer in got:
            check(path, status, answer, method)

    port = serve_jobs(store).port
    response, where = resolve({"$ref": "#/components/responses/MethodNotAllowed"})
    pointer = where + "/content/application~1json/schema"
    for path, methods in ROUTES.items():
        for method in ("GET", "POST", "DELETE", "PUT", "PATCH"):
            if method in methods:
                continue
            body = b"{}" if method in ("POST", "PUT", "PATCH") else None
            answer = await request(port, method, concrete(path), body, bearer())
            assert answer.status == 405, (method, path, answer)
            check_against(response, pointer, answer, (method, path, 405))
            assert answer.header("allow") == ", ".join(methods), (method, path)


BAD_REQUESTS = {
    "/api/patterns": "/api/patterns?limit=0",
    "/api/symbols": "/api/symbols?symbol=AAPL",
    "/api/ohlcv/{symbol}": "/api/ohlcv/aapl",
    "/api/universes": "/api/universes?limit=1",
    "/api/universes/{key}": "/api/universes/bad%20key",
}


async def read_route_answers(store: Any, serve: Any,
                             add: Callable[[str, str, int, Answer], Answer]) -> None:
    """Real answers of every status of the read routes (GET, without jobs)."""
    _, port = serve(store)
    _, claims = serve(store, authenticate=CLAIMS)
    fake = SwitchableStore(store)
    fake.mode = "unavailable"
    _, down = serve(fake)
    nothing = narrow(topics=[], universes=[])
    for path in BAD_REQUESTS:
        url = concrete(path)
        add(path, "GET", 200, await call(
            port, url + ("?limit=3" if path == "/api/patterns" else ""), bearer()))
        add(path, "GET", 400, await call(port, BAD_REQUESTS[path], bearer()))
        add(path, "GET", 401, await call(port, url))
        add(path, "GET", 503, await call(down, url, bearer()))
        if "403" in operations(path)["GET"]["responses"]:
            add(path, "GET", 403, await call(claims, url, nothing))
        else:  # not filtered by the claim
            assert (await call(claims, url, nothing)).status == 200, path
        if "404" in operations(path)["GET"]["responses"]:
            add(path, "GET", 404, await call(
                port, url.replace("etf_growth", "no_such_key"), bearer()))
    paged = add("/api/patterns", "GET", 200, await call(port, "/api/patterns?limit=1000",
                                                         bearer()))
    assert paged.body["next_cursor"] is None and len(paged.body["patterns"]) == 250
    bars = add("/api/ohlcv/{symbol}", "GET", 200, await call(port, "/api/ohlcv/AAPL", bearer()))
    assert len(bars.body["bars"]) > 1


async def job_route_answers(store: Any, serve_jobs: Any,
                            add: Callable[[str, str, int, Answer], Answer]) -> None:
    """
    Real answers of every status of the job operations, from jobs that go
    through every status: queued, running (progress from the producer),
    completed (its result, with a field beyond the documented four),
    cancelled, and failed (the producer could not be reached).
    """
    server = serve_jobs(store, per_user=3)
    port = server.port
    alice, bob = bearer(token("alice")), bearer(token("bob"))

    async def on(method: str, path: str, headers: Any = None) -> Answer:
        return await request(port, method, path, headers=headers)

    # POST: accepted (with and without the optional patterns), then refused.
    done = add(JOBS, "POST", 202, await submit(port, PARAMS_EXAMPLE))
    assert done.header("location") == f"/api/jobs/{done.body['job_id']}"
    assert done.body["status"] == "queued" and done.body["progress"] == 0
    assert done.body["params"] == {"parameters": {}, **PARAMS_EXAMPLE}
    assert done.body["results"] is None
    without = {k: v for k, v in PARAMS_EXAMPLE.items() if k != "patterns"}
    running = add(JOBS, "POST", 202, await submit(
        port, without, content_type="application/json; charset=utf-8"))
    assert running.body["params"] == {**without, "patterns": [], "parameters": {}}
    cancel = add(JOBS, "POST", 202, await submit(port, PARAMS_EXAMPLE))
    too_many = add(JOBS, "POST", 429, await submit(port, PARAMS_EXAMPLE))
    assert too_many.body["error"]["code"] == "too_many_jobs"
    bobs = add(JOBS, "POST", 202, await submit(port, PARAMS_EXAMPLE, "bob"))
    done_id, running_id, cancel_id, bobs_id = (
        a.body["job_id"] for a in (done, running, cancel, bobs))

    wrong = add(JOBS, "POST", 400, await submit(
        port, {"symbols": [], "start_date": "2023-02-30", "end_date": "someday",
               "patterns": ["NoSuchPattern"], "colour": "red"}, "dave"))
    assert wrong.body["error"]["code"] == "bad_params"
    assert set(wrong.body["error"]["fields"]) == {
        "symbols", "start_date", "end_date", "patterns", "colour"}
    assert wrong.body["error"]["fields"]["colour"] == "unknown field"
    backwards = add(JOBS, "POST", 400, await submit(
        port, {**PARAMS_EXAMPLE, "end_date": "2022-01-01"}, "dave"))
    assert set(backwards.body["error"]["fields"]) == {"end_date"}
    not_object = add(JOBS, "POST", 400, await submit(port, ["AAPL"], "dave"))
    assert set(not_object.body["error"]["fields"]) == {"params"}
    not_json = add(JOBS, "POST", 400, await submit(port, b"{symbols: AAPL", "dave"))
    assert not_json.body["error"]["code"] == "bad_json"
    query = add(JOBS, "POST", 400, await submit(port, PARAMS_EXAMPLE, "dave",
                                                path=JOBS + "?dry_run=1"))
    assert query.body["error"] == {**query.body["error"], "code": "bad_parameter",
                                   "parameter": "dry_run"}
    add(JOBS, "POST", 401, await submit(port, PARAMS_EXAMPLE, None))
    no_jobs = narrow(backtests=False)
    add(JOBS, "POST", 403, await request(port, "POST", JOBS, orjson.dumps(PARAMS_EXAMPLE),
                                         no_jobs))
    assert (await request(port, "GET", JOBS, headers=no_jobs)).status == 200
    add(JOBS, "POST", 401, await request(port, "POST", JOBS, orjson.dumps(PARAMS_EXAMPLE),
                                         {b"authorization": [b"Bearer not-a-jwt"]}))
    padded = orjson.dumps(PARAMS_EXAMPLE) + b" " * JOB_BODY_MAX
    add(JOBS, "POST", 413, await submit(port, padded, "dave"))
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        add(JOBS, "POST", 415, await submit(port, PARAMS_EXAMPLE, "dave",
                                            content_type=content_type))
    dave = await on("GET", JOBS, bearer(token("dave")))
    assert dave.status == 200 and dave.body == {"jobs": [], "next_cursor": None}

    # The producer reports progress of one job and the result of another.
    now = reactor.seconds()
    await server.report(PROGRESS_CHANNEL, event_type="backtest_progress", job_id=running_id,
                        progress=0.5, status="running", timestamp=now)
    results = {"win_rate": 0.56, "roi": 0.12, "sharpe_ratio": 1.3, "max_drawdown": -0.08,
               "trades": 42}
    await server.report(RESULTS_CHANNEL, event_type="backtest_result", job_id=done_id,
                        results=results, completed_at=now)

    # GET one: each status; unknown, malformed and another user's ids are 404s.
    got = add(JOB, "GET", 200, await on("GET", f"/api/jobs/{done_id}", alice))
    assert got.body["status"] == "completed" and got.body["results"] == results
    assert got.body["progress"] == 1 and got.body["error"] is None
    got = add(JOB, "GET", 200, await on("GET", f"/api/jobs/{running_id}", alice))
    assert (got.body["status"], got.body["progress"]) == ("running", 0.5)
    got = add(JOB, "GET", 200, await on("GET", f"/api/jobs/{bobs_id}", bob))
    assert got.body["status"] == "queued"
    unknown = [f"/api/jobs/{uuid.uuid4()}", "/api/jobs/not-a-job-id",
               f"/api/jobs/{done_id.upper()}", f"/api/jobs/{done_id}x",
               f"/api/jobs/{bobs_id}"]
    for url in unknown:
        add(JOB, "GET", 404, await on("GET", url, alice))
    add(JOB, "GET", 400, await on("GET", f"/api/jobs/{done_id}?verbose=1", alice))
    add(JOB, "GET", 401, await on("GET", f"/api/jobs/{done_id}"))

    # DELETE: a queued job is cancelled; an ended one is a 409.
    cancelled = add(JOB, "DELETE", 200, await on("DELETE", f"/api/jobs/{cancel_id}", alice))
    assert cancelled.body["status"] == "cancelled" and cancelled.body["job_id"] == cancel_id
    await server.persisted()
    got = add(JOB, "GET", 200, await on("GET", f"/api/jobs/{cancel_id}", alice))
    assert got.body["status"] == "cancelled"
    for job_id in (cancel_id, done_id):
        finished = add(JOB, "DELETE", 409, await on("DELETE", f"/api/jobs/{job_id}", alice))
        assert finished.body["error"]["code"] == "job_finished"
    for url in unknown:
        add(JOB, "DELETE", 404, await on("DELETE", url, alice))
    add(JOB, "DELETE", 400, await on("DELETE", f"/api/jobs/{running_id}?now=1", alice))
    add(JOB, "DELETE", 401, await on("DELETE", f"/api/jobs/{running_id}"))
    add(JOB, "DELETE", 403, await on("DELETE", f"/api/jobs/{running_id}",
                                     narrow(backtests=False)))
    got = await on("GET", f"/api/jobs/{bobs_id}", bob)
    assert got.body["status"] == "queued"
    stopped = add(JOB, "DELETE", 200, await on("DELETE", f"/api/jobs/{running_id}", alice))
    assert stopped.body["status"] == "cancelled" and stopped.body["progress"] == 0.5
    await server.persisted()

    # GET the list: newest first, paged by cursor.
    mine = [cancel_id, running_id, done_id]
    page = add(JOBS, "GET", 200, await on("GET", JOBS, alice))
    assert [j["job_id"] for j in page.body["jobs"]] == mine
    assert page.body["next_cursor"] is None
    seen, cursor = [], None
    while True:
        url = JOBS + "?limit=1" + (f"&cursor={cursor}" if cursor else "")
        page = add(JOBS, "GET", 200, await on("GET", url, alice))
        seen += [j["job_id"] for j in page.body["jobs"]]
        cursor = page.body["next_cursor"]
        if cursor is None:
            break
    assert seen == mine
    page = add(JOBS, "GET", 200, await on("GET", f"{JOBS}?cursor={bobs_id}", alice))
    assert page.body == {"jobs": [], "next_cursor": None}
    for url in (f"{JOBS}?limit=0", f"{JOBS}?limit={JOBS_MAX + 1}", f"{JOBS}?cursor=nope",
                f"{JOBS}?page=2", f"{JOBS}?limit=1&limit=2"):
        add(JOBS, "GET", 400, await on("GET", url, alice))
    add(JOBS, "GET", 401, await on("GET", JOBS))

    # 503s: the producer cannot be reached (the job is then recorded as
    # failed), the job store cannot be reached, or does not answer in time.
    unlinked = serve_jobs(store, link=DownLink())
    refused = add(JOBS, "POST", 503, await submit(unlinked.port, PARAMS_EXAMPLE, "carol"))
    assert refused.body["error"]["code"] == "unavailable"
    await unlinked.persisted()
    failed = add(JOBS, "GET", 200, await on("GET", JOBS, bearer(token("carol"))))
    [job] = failed.body["jobs"]
    assert (job["status"], job["error"]) == ("failed", "producer unreachable")
    add(JOB, "GET", 200, await on("GET", f"/api/jobs/{job['job_id']}", bearer(token("carol"))))

    down_store = DownJobStore()
    verifyObject(IJobStore, down_store)
    down = serve_jobs(store, job_store=down_store).port
    add(JOBS, "POST", 503, await submit(down, PARAMS_EXAMPLE))
    add(JOBS, "GET", 503, await request(down, "GET", JOBS, headers=alice))
    add(JOB, "GET", 503, await request(down, "GET", f"/api/jobs/{done_id}", headers=alice))
    add(JOB, "DELETE", 503, await request(down, "DELETE", f"/api/jobs/{done_id}",
                                          headers=alice))
    slow = serve_jobs(store, job_store=DownJobStore(hang=True), timeout=0.2).port
    late = add(JOBS, "GET", 503, await request(slow, "GET", JOBS, headers=alice))
    assert late.body["error"]["code"] == "store_unavailable"


@pytest_twisted.ensureDeferred
async def test_api_stats_match_the_documented_schema(store, seed, serve):
    """status() (which /health carries as "api") matches the ApiStats schema."""
    api, port = serve(store)
    await call(port, "/api/patterns", bearer())
    await call(port, "/api/patterns", bearer())
    await call(port, "/api/nope")
    validator = Draft202012Validator({"$ref": BASE_URI + "#/components/schemas/ApiStats"},
                                     registry=REGISTRY)
    validator.validate(api.status())
    assert api.status()["cache"]["hits"] == 1


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
