"""
The REST API under C{/api} (docs/contract.md §4; documented in C{docs/openapi.yaml}):
pattern history, symbols, 1-minute bars and universes, read from an
L{IStore}, with pattern and universe answers kept in an L{ICache}; and the
caller's backtest jobs, through L{tickstock.jobs.backtests.Jobs}.

Every answer is JSON, and every refusal says why in one error object.
Parameters are parsed strictly (an unknown, repeated or malformed one is a
400 naming it), so nothing a client sends reaches the store unchecked and a
front-end bug shows up at once rather than as a silently ignored filter.
The store is never waited on for long: not ready, failing or slower than
C{timeout}, the answer is a 503 the client can retry.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_to_bytes

import orjson
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from tickstock.deliver.auth import Authenticate, Identity, identify
from tickstock.deliver.ratelimit import RateLimit
from tickstock.domain.errors import BadRequest
from tickstock.domain.events import MAX_STRING, SYMBOL
from tickstock.domain.interfaces import ICache, IReporting, IStore
from tickstock.domain.records import PatternQuery
from tickstock.jobs.backtests import NOT_FOUND, JobRefused, Jobs
from tickstock.store import StoreUnavailable
from tickstock.web.origins import normalize_origin

PATTERNS_MAX = 1000
PATTERNS_DEFAULT = 100
BARS_MAX = 10_000
BARS_WINDOW = 24 * 3600
TIME_MAX = 253402300799  # 9999-12-31T23:59:59Z
UNIVERSE_KEY = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}\Z")
CURSOR = re.compile(r"^[0-9]{1,18}-[0-9]{1,18}\Z")  # both fit a bigint
EPOCH = re.compile(r"^[0-9]{1,12}(\.[0-9]{1,9})?\Z")
DECIMAL = re.compile(r"^[0-9]{1,3}(\.[0-9]{1,9})?\Z")
ISO_DATE_TIME = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9:.+\-Zz]{2,29}\Z")
INTEGER = re.compile(r"^[0-9]{1,6}\Z")

JOBS_MAX = 100
JOBS_DEFAULT = 20
JOB_BODY_MAX = 64 * 1024
JOB_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")

ROUTES = {
    "/api/patterns": ("GET",),
    "/api/symbols": ("GET",),
    "/api/ohlcv/{symbol}": ("GET",),
    "/api/universes": ("GET",),
    "/api/universes/{key}": ("GET",),
    "/api/jobs": ("GET", "POST"),
    "/api/jobs/{job_id}": ("GET", "DELETE"),
}
"""Every route served and its methods, as C{docs/openapi.yaml} names them."""


Answer = bytes | tuple[int, bytes, Mapping[bytes, bytes]]
"""A handler's answer: a 200 body, or C{(status, body, headers)}."""
Handler = Callable[[Request, Identity], Awaitable[Answer]]


class ApiError(Exception):
    """A request answered with an error object instead of data."""

    def __init__(self, status: int, code: str, message: str, parameter: str | None = None,
                 headers: Mapping[bytes, bytes] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.parameter = parameter
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": str(self)}
        if self.parameter is not None:
            error["parameter"] = self.parameter
        return {"error": error}


class _Bad(ValueError):
    """A parameter value that does not parse; becomes a 400 naming it."""


# ---------------------------------------------------------------- parameters


def _symbol(text: str) -> str:
    if not SYMBOL.match(text):
        raise _Bad("must be 1-10 characters of A-Z, 0-9, '.' and '-'")
    return text


def _pattern(text: str) -> str:
    if not 0 < len(text) <= MAX_STRING or not text.isprintable():
        raise _Bad(f"must be 1-{MAX_STRING} printable characters")
    return text


def _confidence(text: str) -> float:
    if not DECIMAL.match(text):
        raise _Bad("must be a decimal number from 0 to 1")
    value = float(text)
    if not 0 <= value <= 1:
        raise _Bad("must be from 0 to 1")
    return value


def _time(text: str) -> float:
    """Epoch seconds, or an ISO-8601 date-time (no offset: UTC)."""
    if EPOCH.match(text):
        value = float(text)
    elif ISO_DATE_TIME.match(text):
        try:
            parsed = datetime.fromisoformat(text.upper())
        except ValueError:
            raise _Bad("not a valid ISO-8601 date-time") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        value = parsed.timestamp()
    else:
        raise _Bad("must be epoch seconds or an ISO-8601 date-time")
    if not 0 <= value <= TIME_MAX:
        raise _Bad("out of range")
    return value


def _limit(most: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not INTEGER.match(text):
            raise _Bad(f"must be an integer from 1 to {most}")
        value = int(text)
        if not 1 <= value <= most:
            raise _Bad(f"must be from 1 to {most}")
        return value
    return parse


def _cursor(text: str) -> str:
    if not CURSOR.match(text):
        raise _Bad("must be a next_cursor from a previous page")
    return text


def _job_id(text: str) -> str:
    if not JOB_ID.match(text):
        raise _Bad("must be a job id (a lowercase UUID)")
    return text


def _query(request: Request) -> list[tuple[bytes, bytes]]:
    """
    The query string's C{(name, value)} pairs, in order. Not
    C{request.args}: that also splits on C{;} and silently drops a name
    given without C{=}, and strict parsing must see everything sent.
    """
    _, _, query = request.uri.partition(b"?")
    pairs = []
    for item in query.split(b"&"):
        if item:
            name, _, value = item.replace(b"+", b" ").partition(b"=")
            pairs.append((unquote_to_bytes(name), unquote_to_bytes(value)))
    return pairs


def _parse_query(request: Request,
                 allowed: Mapping[str, Callable[[str], Any]]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for raw_name, raw_value in _query(request):
        name = raw_name.decode("utf-8", "replace")[:64]
        parse = allowed.get(name)
        if parse is None:
            raise _bad(name, "unknown parameter")
        if name in parsed:
            raise _bad(name, "given more than once")
        try:
            text = raw_value.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(name, "not UTF-8") from None
        if not text:
            raise _bad(name, "empty")
        try:
            parsed[name] = parse(text)
        except (_Bad, ValueError) as error:
            raise _bad(name, str(error)) from None
    return parsed


def _path_param(raw: bytes, name: str, parse: Callable[[str], Any]) -> Any:
    try:
        return parse(raw.decode("utf-8"))
    except (UnicodeDecodeError, _Bad) as error:
        raise _bad(name, str(error) if isinstance(error, _Bad) else "not UTF-8") from None


def _universe_key(text: str) -> str:
    if not UNIVERSE_KEY.match(text):
        raise _Bad("must be 1-64 characters of A-Z, a-z, 0-9, '_', '.', ':' and '-'")
    return text


def _bad(name: str, message: str) -> ApiError:
    return ApiError(400, "bad_parameter", f"{name}: {message}", parameter=name)


# ---------------------------------------------------------------- answers


def dumps(value: Any) -> bytes:
    """
    JSON for a browser: C{<}, C{>} and C{&} only ever occur inside strings,
    and are escaped there, so no answer can be read as markup whatever a
    producer or client put in it.
    """
    return (orjson.dumps(value).replace(b"<", b"\\u003c").replace(b">", b"\\u003e")
            .replace(b"&", b"\\u0026"))


def iso(seconds: float | None) -> str | None:
    """Epoch seconds as an ISO-8601 UTC date-time (C{Z}), or L{None}."""
    if seconds is None:
        return None
    text = datetime.fromtimestamp(seconds, UTC).isoformat()
    return text.replace("+00:00", "Z")


class _Reply:
    """
    The one answer to one request: whichever comes first of the handler's
    result and the timeout is sent, and nothing is written to a client that
    went away.
    """

    def __init__(self, request: Request, resource: ApiResource) -> None:
        self.request = request
        self.route = "other"
        self._resource = resource
        self._started = resource.clock.seconds()
        self.done = False
        request.notifyFinish().addErrback(self._gone)

    def _gone(self, failure: Failure) -> None:
        if not self.done:
            self.done = True
            self._resource.clients_gone += 1

    def send(self, status: int, body: bytes,
             headers: Mapping[bytes, bytes] | None = None) -> None:
        if self.done:
            return
        self.done = True
        self._resource.count(self.route, status, self._resource.clock.seconds() - self._started)
        request = self.request
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        for name, value in (headers or {}).items():
            request.setHeader(name, value)
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()

    def error(self, error: ApiError) -> None:
        self.send(error.status, dumps(error.body()), error.headers)


def _unavailable(message: str) -> ApiError:
    return ApiError(503, "store_unavailable", message, headers={b"retry-after": b"1"})


@implementer(IReporting)
class ApiResource(Resource):
    """
    C{/api}: routes on the path below it. Built by L{build_api}.
    """

    isLeaf = True
    _log = Logger()

    def __init__(
        self, store: IStore, cache: ICache, authenticate: Authenticate,
        pattern_ttl: float, universe_ttl: float, clock: IReactorTime, timeout: float,
        jobs: Jobs | None = None, observe: Callable[[str, int, float], None] | None = None,
        rate: RateLimit | None = None, cors_origins: tuple[str, ...] = (),
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._observe = observe
        self._rate = rate
        self._cors = frozenset(cors_origins)
        self._store = store
        self._jobs = jobs
        self._cache = cache
        self._authenticate = authenticate
        self._pattern_ttl = pattern_ttl
        self._universe_ttl = universe_ttl
        self._clock = self.clock = clock
        self._timeout = timeout
        self._requests: dict[str, Counter[int]] = {}
        self.clients_gone = 0
        self.timeouts = 0
        self.internal_errors = 0

    def count(self, route: str, status: int, seconds: float) -> None:
        self._requests.setdefault(route, Counter())[status] += 1
        if self._observe is not None:
            self._observe(route, status, seconds)

    def status(self) -> dict[str, Any]:
        """Counters for C{/health} and metrics; JSON-able."""
        hits, misses = self._cache.hits, self._cache.misses
        return {
            "requests": {route: {str(status): n for status, n in sorted(counts.items())}
                         for route, counts in sorted(self._requests.items())},
            "clients_gone": self.clients_gone,
            "store_timeouts": self.timeouts,
            "internal_errors": self.internal_errors,
            "cache": {"hits": hits, "misses": misses,
                      "ratio": round(hits / (hits + misses), 4) if hits + misses else 0.0},
        }

    def render(self, request: Request) -> Any:
        if self._cors and self._cors_allowed(request):
            if request.method == b"OPTIONS" and request.getHeader(b"access-control-request-method"):
                return self._preflight(request)
        reply = _Reply(request, self)
        timer = self._clock.callLater(self._timeout, self._too_slow, reply)
        d = Deferred.fromCoroutine(self._answer(request, reply))
        d.addCallbacks(lambda answer: reply.send(*answer) if isinstance(answer, tuple)
                       else reply.send(200, answer), lambda f: self._failed(f, reply))

        def settle(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        d.addBoth(settle).addErrback(
            lambda f: self._log.failure("answering {path} failed", f, path=request.path))
        return NOT_DONE_YET

    def _cors_allowed(self, request: Request) -> bool:
        """Mark the answer readable by the request's origin if it is allowed (CORS)."""
        origin = request.getHeader(b"origin")
        if not origin:
            return False
        try:
            allowed = "*" in self._cors or normalize_origin(origin.decode("ascii")) in self._cors
        except (UnicodeDecodeError, ValueError):
            return False
        if allowed:
            request.setHeader(b"access-control-allow-origin", origin)
            request.setHeader(b"access-control-expose-headers", b"retry-after")
            request.setHeader(b"vary", b"origin")
        return allowed

    def _preflight(self, request: Request) -> bytes:
        request.setResponseCode(204)
        request.setHeader(b"access-control-allow-methods", b"GET, POST, DELETE")
        request.setHeader(b"access-control-allow-headers", b"authorization, content-type")
        request.setHeader(b"access-control-max-age", b"600")
        return b""

    def _too_slow(self, reply: _Reply) -> None:
        if not reply.done:
            self.timeouts += 1
            reply.error(_unavailable(f"the store did not answer within {self._timeout:g}s"))

    def _failed(self, failure: Failure, reply: _Reply) -> None:
        error = failure.value
        if isinstance(error, ApiError):
            reply.error(error)
        elif isinstance(error, JobRefused):
            api_error = ApiError(error.status, error.code, str(error), headers={
                b"retry-after": b"1"} if error.status == 503 else None)
            body = api_error.body()
            if error.fields:
                body["error"]["fields"] = error.fields
            reply.send(error.status, dumps(body), api_error.headers)
        elif failure.check(StoreUnavailable, CancelledError, TimeoutError):
            reply.error(_unavailable("the store is unavailable; retry shortly"))
        else:
            self.internal_errors += 1
            self._log.failure("API request {path} failed", failure, path=reply.request.path)
            reply.error(ApiError(500, "internal", "internal error"))

    async def _answer(self, request: Request, reply: _Reply) -> Answer:
        route, handlers = self._route(request.postpath or [])
        reply.route = route
        identity = await self._identify(request)
        wait = self._rate.take(identity.user) if self._rate is not None else 0.0
        if wait:
            raise ApiError(429, "rate_limited", "too many requests; slow down",
                           headers={b"retry-after": b"%d" % max(1, math.ceil(wait))})
        if not handlers:
            raise ApiError(404, "not_found", "no such API route")
        handler = handlers.get(request.method.decode("ascii", "replace"))
        if handler is None:
            allowed = ", ".join(handlers)
            raise ApiError(405, "method_not_allowed", f"only {allowed} allowed here",
                           headers={b"allow": allowed.encode()})
        _permitted(route, request.method, request.postpath or [], identity)
        return await handler(request, identity)

    def _route(self, path: list[bytes]) -> tuple[str, dict[str, Handler]]:
        match path:
            case [b"patterns"]:
                return "patterns", {"GET": self._patterns}
            case [b"symbols"]:
                return "symbols", {"GET": self._symbols}
            case [b"ohlcv", symbol] if symbol:
                return "ohlcv", {"GET": lambda r, i: self._ohlcv(r, i, symbol)}
            case [b"universes"]:
                return "universes", {"GET": self._universes}
            case [b"universes", key] if key:
                return "universe", {"GET": lambda r, i: self._universe(r, i, key)}
            case [b"jobs"]:
                return "jobs", {"GET": self._list_jobs, "POST": self._submit_job}
            case [b"jobs", job_id] if job_id:
                return "job", {"GET": lambda r, i: self._get_job(r, i, job_id),
                               "DELETE": lambda r, i: self._cancel_job(r, i, job_id)}
        return "other", {}

    async def _identify(self, request: Request) -> Identity:
        values = request.requestHeaders.getRawHeaders(b"authorization") or []
        token: str | None = None
        if len(values) == 1:
            scheme, _, credentials = values[0].strip().partition(b" ")
            if scheme.lower() == b"bearer" and credentials.strip():
                token = credentials.strip().decode("ascii", "replace")
        if values and token is None:
            raise _unauthorized("the Authorization header must be 'Bearer <token>'", True)
        try:
            return await identify(self._authenticate, {} if token is None else {"token": token})
        except BadRequest as error:
            if token is None:
                raise _unauthorized("an 'Authorization: Bearer <token>' header is required",
                                    False) from None
            raise _unauthorized(str(error), True) from None

    def _from_store(self, call: Callable[[], Deferred[Any]]) -> Deferred[Any]:
        if not self._store.ready:
            return fail(StoreUnavailable("the store is not ready"))
        return maybeDeferred(call)

    def _cached(self, key: str, compute: Callable[[], Deferred[bytes]],
                ttl: float) -> Deferred[bytes]:
        if ttl <= 0:
            return compute()
        return self._cache.fetch(key, compute, ttl)

    async def _patterns(self, request: Request, identity: Identity) -> bytes:
        p = _parse_query(request, {
            "symbol": _symbol, "pattern": _pattern, "min_confidence": _confidence,
            "since": _time, "limit": _limit(PATTERNS_MAX), "cursor": _cursor,
        })
        limit = p.get("limit", PATTERNS_DEFAULT)
        query = PatternQuery(symbol=p.get("symbol"), pattern=p.get("pattern"),
                             min_confidence=p.get("min_confidence"), since=p.get("since"),
                             before=p.get("cursor"), limit=limit + 1)

        def page(rows: list[dict[str, Any]]) -> bytes:
            more = len(rows) > limit
            rows = rows[:limit]
            return dumps({"patterns": rows,
                          "next_cursor": rows[-1]["id"] if more and rows else None})

        key = "patterns:" + orjson.dumps([query.symbol, query.pattern, query.min_confidence,
                                           query.since, query.before, limit]).decode()
        return await self._cached(
            key, lambda: self._from_store(lambda: self._store.patterns(query)).addCallback(page),
            self._pattern_ttl)

    async def _symbols(self, request: Request, identity: Identity) -> bytes:
        _parse_query(request, {})
        rows = await self._from_store(self._store.symbols)
        return dumps({"symbols": [
            {"symbol": row["symbol"], "first_seen": iso(row.get("first_seen")),
             "last_seen": iso(row.get("last_seen"))}
            for row in rows
        ]})

    async def _ohlcv(self, request: Request, identity: Identity, raw_symbol: bytes) -> bytes:
        symbol = _path_param(raw_symbol, "symbol", _symbol)
        p = _parse_query(request, {"since": _time, "until": _time,
                                        "limit": _limit(BARS_MAX)})
        until = p.get("until")
        since = p.get("since")
        if since is None:
            since = (self._clock.seconds() if until is None else until) - BARS_WINDOW
        if until is not None and until <= since:
            raise _bad("until", "must be after since")
        bars = await self._from_store(
            lambda: self._store.ohlcv(symbol, since, until, p.get("limit", BARS_MAX)))
        return dumps({"symbol": symbol, "bars": [
            {"minute": int(bar["minute"]), "time": iso(bar["minute"]), "open": bar["open"],
             "high": bar["high"], "low": bar["low"], "close": bar["close"],
             "volume": bar["volume"]}
            for bar in bars
        ]})

    async def _universes(self, request: Request, identity: Identity) -> bytes:
        _parse_query(request, {})

        def listing(rows: list[dict[str, Any]]) -> bytes:
            return dumps({"universes": [
                {"key": row["key"], "type": row["type"], "category": row.get("category"),
                 "symbol_count": row["symbol_count"], "updated": iso(row.get("updated"))}
                for row in rows
            ]})

        return await self._cached(
            "universes", lambda: self._from_store(self._store.universes).addCallback(listing),
            self._universe_ttl)

    async def _universe(self, request: Request, identity: Identity, raw_key: bytes) -> bytes:
        key = _path_param(raw_key, "key", _universe_key)
        _parse_query(request, {})

        def found(row: dict[str, Any] | None) -> bytes:
            if row is None:
                raise ApiError(404, "not_found", "no universe with this key")
            return dumps({"key": row["key"], "type": row["type"],
                          "category": row.get("category"), "symbols": row["symbols"],
                          "metadata": row.get("metadata"), "updated": iso(row.get("updated"))})

        return await self._cached(
            "universe:" + key,
            lambda: self._from_store(lambda: self._store.universe(key)).addCallback(found),
            self._universe_ttl)


    # Backtest jobs: a user's own only; another user's job is "not found".

    def _jobs_service(self) -> Jobs:
        if self._jobs is None:
            raise ApiError(404, "not_found", "this server takes no backtest jobs")
        return self._jobs

    async def _submit_job(self, request: Request, identity: Identity) -> Answer:
        jobs = self._jobs_service()
        _parse_query(request, {})
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip()
        if content_type.lower() != b"application/json":
            raise ApiError(415, "unsupported_media_type",
                           "send the parameters as Content-Type: application/json")
        raw = request.content.read(JOB_BODY_MAX + 1) if request.content is not None else b""
        if len(raw) > JOB_BODY_MAX:
            raise ApiError(413, "too_large", f"the body may be at most {JOB_BODY_MAX} bytes")
        try:
            params = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise ApiError(400, "bad_json", "the body is not JSON") from None
        job = await jobs.submit(identity.user, params)
        return 202, dumps(job_view(job)), {b"location": b"/api/jobs/" + job["job_id"].encode()}

    async def _list_jobs(self, request: Request, identity: Identity) -> bytes:
        jobs = self._jobs_service()
        p = _parse_query(request, {"limit": _limit(JOBS_MAX), "cursor": _job_id})
        limit = p.get("limit", JOBS_DEFAULT)
        rows = await jobs.list(identity.user, p.get("cursor"), limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        return dumps({"jobs": [job_view(row) for row in rows],
                      "next_cursor": rows[-1]["job_id"] if more and rows else None})

    async def _get_job(self, request: Request, identity: Identity, raw_id: bytes) -> bytes:
        jobs = self._jobs_service()
        job_id = _job_path(raw_id)
        _parse_query(request, {})
        return dumps(job_view(await jobs.get(identity.user, job_id)))

    async def _cancel_job(self, request: Request, identity: Identity, raw_id: bytes) -> bytes:
        jobs = self._jobs_service()
        job_id = _job_path(raw_id)
        _parse_query(request, {})
        return dumps(job_view(await jobs.cancel(identity.user, job_id)))


def _job_path(raw: bytes) -> str:
    # A malformed id is as unknown as another user's: 404, never 400.
    try:
        return _job_id(raw.decode("utf-8"))
    except (UnicodeDecodeError, _Bad):
        raise JobRefused(404, "not_found", NOT_FOUND) from None


def job_view(job: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON shape of one job in the REST API."""
    return {"job_id": job["job_id"], "status": job["status"], "params": job["params"],
            "progress": job["progress"], "results": job["results"], "error": job["error"],
            "created_at": iso(job["created_at"]), "updated_at": iso(job["updated_at"])}


_ROUTE_TOPICS = {"patterns": "patterns", "ohlcv": "ticks"}
"""The topic whose permission a REST route's data needs (docs/security.md)."""


def _permitted(route: str, method: bytes, path: list[bytes], identity: Identity) -> None:
    """403 where the token's permissions claim does not allow the route."""
    permissions = identity.permissions
    if permissions is None:
        return
    topic = _ROUTE_TOPICS.get(route)
    if topic is not None and permissions.topics is not None and topic not in permissions.topics:
        raise ApiError(403, "forbidden", f"your token does not allow the topic {topic!r}")
    if route in ("jobs", "job") and method in (b"POST", b"DELETE") \
            and not permissions.backtests:
        raise ApiError(403, "forbidden", "your token does not allow backtests")
    if route == "universe" and permissions.universes is not None \
            and path[-1].decode("utf-8", "replace") not in permissions.universes:
        raise ApiError(403, "forbidden", "your token does not allow this universe")


def _unauthorized(message: str, token_given: bool) -> ApiError:
    challenge = b'Bearer realm="tickstock"'
    if token_given:
        challenge += b', error="invalid_token"'
    return ApiError(401, "unauthorized", message, headers={b"www-authenticate": challenge})


def build_api(
    store: IStore, cache: ICache, authenticate: Authenticate,
    pattern_ttl: float, universe_ttl: float = 3600, *, clock: IReactorTime,
    timeout: float = 5.0, jobs: Jobs | None = None,
    observe: Callable[[str, int, float], None] | None = None,
    rate: RateLimit | None = None, cors_origins: tuple[str, ...] = (),
) -> ApiResource:
    """
    The C{/api} resource.

    @param authenticate: the WebSocket C{hello} authenticator, called with
        C{{"token": <bearer token>}} (or C{{}} without one):
        L{tickstock.deliver.auth.anonymous} in demo mode accepts anyone.
    @param pattern_ttl: seconds a C{/api/patterns} answer is cached; 0: not.
    @param universe_ttl: the same for universe answers (invalidate the
        cache when the producer says universes changed).
    @param clock: for the default C{/api/ohlcv} window and the timeout.
    @param timeout: seconds after which a request the store has not
        answered gets a 503.
    @param jobs: serves C{/api/jobs}; L{None}: those routes are 404s.
    @param observe: told each answer's route, status and seconds taken.
    @param rate: each user's request budget; past it, 429 with Retry-After.
    @param cors_origins: origins (or C{*}) whose pages may call the API
        from another site; none: no CORS headers at all.
    """
    return ApiResource(IStore(store), ICache(cache), authenticate, pattern_ttl, universe_ttl,
                       clock, timeout, jobs, observe, rate, cors_origins)
