"""
The REST API (L{tickstock.web.api}) served by a real twisted.web site on a
loopback port in the test reactor, over a store seeded with known events,
bars and universes (the C{store} fixture: the memory store here; its
assertions are store-agnostic so it can be parametrized with others), and
the caches (L{tickstock.store.cache}), the Redis one against a real redis-server.

Fakes, said where used: L{SwitchableStore} wraps the real store to make it
fail, refuse or hang on demand (no real store can be made to do so on cue),
and L{task.Clock} drives the memory cache's and memory store's time in unit
tests.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import orjson
import pytest
import pytest_twisted
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import Agent
from twisted.web.http_headers import Headers
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.conftest import TEST_SECRET
from tests.wsclient import eventually, read_body
from tickstock.config import parse_redis_url
from tickstock.connections.redis import RedisLink
from tickstock.deliver.auth import JWTAuthenticator, anonymous
from tickstock.domain.events import Event, id_key
from tickstock.domain.interfaces import ICache, IStore
from tickstock.domain.records import Bar, PatternQuery
from tickstock.ingest.normalize import parse_event
from tickstock.store import StoreUnavailable
from tickstock.store.cache import MemoryCache, RedisCache
from tickstock.store.memory import MemoryStore
from tickstock.web.api import ApiResource, build_api
from tickstock.web.site import JSONStatus, build_site

AUTH = JWTAuthenticator(TEST_SECRET)
SYMBOLS = ["AAPL", "MSFT", "NVDA", "BRK.B"]
PATTERN_NAMES = ["Doji", "Hammer", "Bullish Engulfing"]
PATTERNS_CHANNEL = "tickstock.events.patterns"
MARKET_CHANNEL = "tickstock.events.market_state"
UNIVERSES = {
    "etf_growth": {"type": "etf_universe", "symbols": ["QQQ", "VUG", "ARKK"],
                   "category": "growth", "metadata": {"rebalance": "quarterly"}},
    "stock_tech": {"type": "stock_universe", "symbols": ["AAPL", "MSFT", "NVDA"],
                   "category": "technology", "metadata": None},
}


def token(user: str = "alice", ttl: float = 3600, auth: JWTAuthenticator = AUTH) -> str:
    return auth.mint(user, time.time(), ttl)


def bearer(value: str | None = None) -> dict[bytes, list[bytes]]:
    return {b"authorization": [b"Bearer " + (value or token()).encode()]}


# ---------------------------------------------------------------- the seeded store


@dataclass
class Seed:
    """What was written to the store, for computing expected answers."""

    now: float
    patterns: list[Event]
    market: list[Event]
    parts: list[Bar]
    old_minute: int
    batches: list[tuple[list[Bar], list[Event]]] = field(default_factory=list)

    def newest_first(self, keep: Callable[[Event], bool] = lambda e: True) -> list[str]:
        return [e.id for e in sorted(self.patterns, key=lambda e: id_key(e.id), reverse=True)
                if keep(e)]

    def bars(self, symbol: str) -> list[dict[str, Any]]:
        """The bars of C{symbol}, oldest first, combined from their parts."""
        by_minute: dict[int, list[Bar]] = {}
        for part in self.parts:
            if part.symbol == symbol:
                by_minute.setdefault(part.minute, []).append(part)
        return [combine(parts) for _, parts in sorted(by_minute.items())]


def combine(parts: list[Bar]) -> dict[str, Any]:
    """
    A bar as the store contract defines it: each part's version with the
    most ticks (a late retry of an older version does not win), combined.
    """
    versions: dict[str, Bar] = {}
    for p in parts:
        if p.part not in versions or p.ticks >= versions[p.part].ticks:
            versions[p.part] = p
    latest = versions.values()
    first = min(latest, key=lambda p: (p.open_ts, p.part))
    last = max(latest, key=lambda p: (p.close_ts, p.part))
    return {"minute": first.minute, "open": first.open, "high": max(p.high for p in latest),
            "low": min(p.low for p in latest), "close": last.close,
            "volume": sum(p.volume for p in latest)}


def pattern_event(i: int, event_id: str, now: float, base_s: int, **extra: Any) -> Event:
    data = {"event_type": "pattern_detected", "symbol": SYMBOLS[i % 4],
            "pattern": PATTERN_NAMES[i % 3], "confidence": (i * 37 % 101) / 100,
            "timestamp": base_s + i, "source": "seed", **extra}
    return parse_event(PATTERNS_CHANNEL, orjson.dumps(data), event_id, now)


def make_seed(now: float) -> Seed:
    """
    250 pattern events (two per millisecond, so cursors cross sequence
    numbers), 5 market-state events, and bars of AAPL and MSFT made of two
    parts each, one of them rewritten.
    """
    base_ms = int(now * 1000) - 3_600_000
    base_s = int(now) - 3600
    patterns = [pattern_event(i, f"{base_ms + i // 2}-{i % 2}", now, base_s) for i in range(250)]
    market = [
        parse_event(MARKET_CHANNEL, orjson.dumps({
            "event_type": "stage_change", "symbol": "AAPL", "timestamp": base_s + j}),
            f"{base_ms + j}-7", now)
        for j in range(5)
    ]
    minute0 = int(now) // 60 * 60 - 3600
    parts: list[Bar] = []
    for n in range(10):
        m = minute0 + 60 * n
        t = float(m)
        parts.append(Bar("AAPL", m, 100 + n, 105 + n, 99 + n, 102 + n, 10, t + 1, t + 40, 5,
                         "a:1"))
        parts.append(Bar("AAPL", m, 101 + n, 107 + n, 98.5 + n, 103 + n, 7, t + 2, t + 55, 3,
                         "b:1"))
    for n in range(3):
        m = minute0 + 60 * n
        parts.append(Bar("MSFT", m, 400.0, 401.0, 399.0, 400.5, 3, m + 5.0, m + 50.0, 2, "a:1"))
    # A newer version of a part (more ticks) replaces the old one; the
    # seed fixture then writes the old version again, as a late retry.
    parts.append(Bar("AAPL", minute0, 100, 110, 90, 104, 12, minute0 + 1.0, minute0 + 58.0, 9,
                     "a:1"))
    old_minute = int(now) // 60 * 60 - 23 * 3600
    parts.append(Bar("AAPL", old_minute, 50, 51, 49, 50.5, 1, old_minute + 1.0, old_minute + 2.0, 1,
                     "a:0"))
    return Seed(now, patterns, market, parts, old_minute)


def add_universes(store: Any, universes: dict[str, dict[str, Any]]) -> None:
    """Put universes where the store reads them from."""
    if isinstance(store, MemoryStore):
        for key, spec in universes.items():
            store.set_universe(key, spec["type"], spec["symbols"], spec["category"],
                               spec["metadata"])
        return
    import psycopg2

    with psycopg2.connect(store.dsn) as conn, conn.cursor() as cursor:
        for key, spec in universes.items():
            cursor.execute(
                "INSERT INTO cache_entries (type, name, key, value, universe_category, "
                "universe_metadata) VALUES (%s, %s, %s, %s, %s, %s)",
                (spec["type"], key, key, orjson.dumps({"symbols": spec["symbols"]}).decode(),
                 spec["category"], orjson.dumps(spec["metadata"]).decode()
                 if spec["metadata"] is not None else None))
    conn.close()


@pytest.fixture(params=["memory", "postgres"])
def store(request: pytest.FixtureRequest) -> Iterator[Any]:
    """An empty store of each kind: memory, and PostgreSQL (a migrated database of its own)."""
    if request.param == "memory":
        yield MemoryStore(reactor)
        return
    from tests.wsclient import eventually
    from tickstock.store.postgres import PostgresStore

    dsn = request.getfixturevalue("postgres")
    pg = PostgresStore(reactor, dsn, None, 5.0)
    pg.dsn = dsn
    pg.startService()
    pytest_twisted.blockon(Deferred.fromCoroutine(
        eventually(lambda: pg.ready, 10, "PostgreSQL store ready")))
    yield pg
    pg.stopService()


@pytest.fixture
def seed(store: Any) -> Seed:
    """The seed data, written to C{store} in shuffled batches, some twice."""
    data = make_seed(reactor.seconds())
    events = data.patterns + data.market
    random.Random(7).shuffle(events)
    data.batches = [(data.parts[:15], events[:100]), (data.parts[15:], events[100:]),
                    (data.parts[:5], events[:20])]
    for bars, batch in data.batches:
        pytest_twisted.blockon(store.write(bars, batch))
    add_universes(store, UNIVERSES)
    return data


# ---------------------------------------------------------------- serving


@pytest.fixture
def serve() -> Iterator[Callable[..., tuple[ApiResource, int]]]:
    """
    Start the API on the real site (L{build_site}) on a free loopback port:
    C{serve(store, cache=..., authenticate=..., ...)} returns the resource
    and the port. Ports are closed after the test.
    """
    ports: list[Any] = []

    def start(store: Any, cache: Any = None, authenticate: Any = AUTH,
              pattern_ttl: float = 5.0, timeout: float = 5.0) -> tuple[ApiResource, int]:
        api = build_api(store, cache or MemoryCache(reactor), authenticate, pattern_ttl,
                        clock=reactor, timeout=timeout)
        site = build_site(
            WebSocketResource(WebSocketServerFactory()),
            JSONStatus(lambda: (True, {"status": "ok"})),
            JSONStatus(lambda: (True, {"ready": True})),
            timeout=5.0, api=api,
        )
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        ports.append(port)
        return api, port.getHost().port

    yield start
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


@dataclass
class Answer:
    status: int
    headers: Headers
    body: Any
    raw: bytes = field(repr=False, default=b"")

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None


async def call(port: int, path: str, headers: dict[bytes, list[bytes]] | None = None,
               method: bytes = b"GET") -> Answer:
    """One HTTP request (non-blocking Agent): status, headers, parsed JSON."""
    response = await Agent(reactor).request(
        method, f"http://127.0.0.1:{port}{path}".encode(), Headers(headers or {}))
    raw = await read_body(response)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    return Answer(response.code, response.headers, body, raw)


async def get(port: int, path: str, **params: Any) -> Answer:
    """GET with a valid token; C{params} URL-encoded."""
    query = "?" + urlencode(params) if params else ""
    return await call(port, path + query, bearer())


def assert_json(answer: Answer) -> None:
    assert answer.header("content-type") == "application/json", answer
    assert answer.header("cache-control") == "no-store", answer
    assert answer.header("x-content-type-options") == "nosniff", answer
    assert answer.body is not None, answer.raw


def assert_error(answer: Answer, status: int, code: str, parameter: str | None = None) -> None:
    assert answer.status == status, answer
    assert_json(answer)
    assert answer.body["error"]["code"] == code, answer.body
    assert isinstance(answer.body["error"]["message"], str)
    if parameter is not None:
        assert answer.body["error"]["parameter"] == parameter, answer.body


# ---------------------------------------------------------------- routes


def test_implementations_provide_their_interfaces():
    """verifyObject on the memory store, both caches and the failing fake."""
    clock = Clock()
    verifyObject(IStore, MemoryStore(clock))
    verifyObject(ICache, MemoryCache(clock))
    link = RedisLink(clock, parse_redis_url("redis://127.0.0.1:1/0"), 0)
    verifyObject(ICache, RedisCache(link, clock))
    verifyObject(IStore, SwitchableStore(MemoryStore(clock)))


@pytest_twisted.ensureDeferred
async def test_patterns_newest_first_with_every_field(store, seed, serve):
    """
    /api/patterns gives the newest 100 pattern events by default, newest
    first by event id, each with the producer's fields; market-state events
    are not pattern events.
    """
    _, port = serve(store)
    answer = await get(port, "/api/patterns")
    assert answer.status == 200, answer
    assert_json(answer)
    rows = answer.body["patterns"]
    assert [r["id"] for r in rows] == seed.newest_first()[:100]
    by_id = {e.id: e for e in seed.patterns}
    for row in rows:
        event = by_id[row["id"]]
        assert row["symbol"] == event.data["symbol"]
        assert row["pattern"] == event.data["pattern"]
        assert row["confidence"] == event.data["confidence"]
        assert row["timestamp"] == event.data["timestamp"]
        assert row["data"] == event.data
    assert answer.body["next_cursor"] == rows[-1]["id"]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("limit", [1, 7, 100, 1000])
async def test_cursor_pages_through_everything_once(store, seed, serve, limit):
    """
    Following next_cursor from the first page to the last (next_cursor
    null) yields every one of the 250 pattern events once, newest first,
    with no gap and no duplicate, for any page size.
    """
    _, port = serve(store)
    seen: list[str] = []
    cursor = None
    for _ in range(300):
        params = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        answer = await get(port, "/api/patterns", **params)
        assert answer.status == 200, answer
        page = [r["id"] for r in answer.body["patterns"]]
        assert 0 < len(page) <= limit
        seen += page
        cursor = answer.body["next_cursor"]
        if cursor is None:
            break
    assert seen == seed.newest_first()
    assert len(set(seen)) == 250


@pytest_twisted.ensureDeferred
async def test_cursor_pages_a_filtered_query(store, seed, serve):
    """Paging with a filter pages through exactly the matching events."""
    _, port = serve(store)
    seen: list[str] = []
    cursor = None
    while True:
        params = {"symbol": "MSFT", "limit": 9, **({"cursor": cursor} if cursor else {})}
        answer = await get(port, "/api/patterns", **params)
        seen += [r["id"] for r in answer.body["patterns"]]
        cursor = answer.body["next_cursor"]
        if cursor is None:
            break
    assert seen == seed.newest_first(lambda e: e.symbol == "MSFT")


@pytest_twisted.ensureDeferred
async def test_pattern_filters(store, seed, serve):
    """symbol, pattern, min_confidence and since each filter, and combine."""
    _, port = serve(store)
    since_s = int(seed.now) - 3600 + 200
    cases: list[tuple[dict[str, Any], Callable[[Event], bool]]] = [
        ({"symbol": "BRK.B"}, lambda e: e.symbol == "BRK.B"),
        ({"pattern": "Bullish Engulfing"}, lambda e: e.data["pattern"] == "Bullish Engulfing"),
        ({"min_confidence": "0.9"}, lambda e: e.data["confidence"] >= 0.9),
        ({"min_confidence": "1"}, lambda e: e.data["confidence"] >= 1),
        ({"min_confidence": "0"}, lambda e: True),
        ({"since": str(since_s)}, lambda e: e.data["timestamp"] >= since_s),
        ({"since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since_s))},
         lambda e: e.data["timestamp"] >= since_s),
        ({"since": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(since_s))},
         lambda e: e.data["timestamp"] >= since_s),
        ({"symbol": "AAPL", "pattern": "Doji", "min_confidence": "0.5"},
         lambda e: e.symbol == "AAPL" and e.data["pattern"] == "Doji"
         and e.data["confidence"] >= 0.5),
        ({"symbol": "ZZZZ"}, lambda e: False),
        ({"pattern": "No Such Pattern"}, lambda e: False),
    ]
    for params, keep in cases:
        answer = await get(port, "/api/patterns", limit=1000, **params)
        assert answer.status == 200, (params, answer)
        expected = seed.newest_first(keep)
        assert [r["id"] for r in answer.body["patterns"]] == expected, params
        assert answer.body["next_cursor"] is None
    assert len(seed.newest_first(lambda e: e.data["confidence"] >= 0.9)) > 0


@pytest_twisted.ensureDeferred
async def test_symbols(store, seed, serve):
    """/api/symbols lists every symbol seen in events or bars, sorted, with times."""
    _, port = serve(store)
    answer = await get(port, "/api/symbols")
    assert answer.status == 200, answer
    assert_json(answer)
    rows = answer.body["symbols"]
    assert [r["symbol"] for r in rows] == sorted(SYMBOLS)
    for row in rows:
        assert row["first_seen"].endswith("Z") and row["last_seen"] >= row["first_seen"]


@pytest_twisted.ensureDeferred
async def test_ohlcv_bars_combine_their_parts(store, seed, serve):
    """
    /api/ohlcv/{symbol} gives the last 24 hours by default, oldest first;
    each bar is the combination of its latest parts; a rewritten part
    replaced its earlier version; since/until/limit select.
    """
    _, port = serve(store)
    expected = seed.bars("AAPL")
    assert expected[0]["minute"] == seed.old_minute
    answer = await get(port, "/api/ohlcv/AAPL")
    assert answer.status == 200, answer
    assert_json(answer)
    assert answer.body["symbol"] == "AAPL"
    bars = answer.body["bars"]
    assert [{k: b[k] for k in expected[0]} for b in bars] == expected
    for bar in bars:
        assert bar["time"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(bar["minute"]))
    assert bars[1]["high"] == 110 and bars[1]["low"] == 90 and bars[1]["volume"] == 19

    recent = expected[1:]
    since, until = recent[2]["minute"], recent[6]["minute"]
    answer = await get(port, "/api/ohlcv/AAPL", since=since, until=until)
    assert [b["minute"] for b in answer.body["bars"]] == [b["minute"] for b in recent[2:6]]
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
    answer = await get(port, "/api/ohlcv/AAPL", since=iso, limit=3)
    assert [b["minute"] for b in answer.body["bars"]] == [b["minute"] for b in recent[2:5]]
    answer = await get(port, "/api/ohlcv/AAPL", until=recent[0]["minute"])
    assert [b["minute"] for b in answer.body["bars"]] == [seed.old_minute]
    answer = await get(port, "/api/ohlcv/MSFT")
    assert len(answer.body["bars"]) == 3
    answer = await get(port, "/api/ohlcv/ZZZZ")
    assert answer.status == 200 and answer.body == {"symbol": "ZZZZ", "bars": []}


@pytest_twisted.ensureDeferred
async def test_universes(store, seed, serve):
    """/api/universes summarises each universe; /api/universes/{key} has its symbols."""
    _, port = serve(store)
    answer = await get(port, "/api/universes")
    assert answer.status == 200, answer
    assert_json(answer)
    summary = {u["key"]: u for u in answer.body["universes"]}
    assert set(summary) == set(UNIVERSES)
    for key, spec in UNIVERSES.items():
        assert summary[key]["type"] == spec["type"]
        assert summary[key]["category"] == spec["category"]
        assert summary[key]["symbol_count"] == len(spec["symbols"])
        one = await get(port, f"/api/universes/{key}")
        assert one.status == 200, one
        assert one.body["key"] == key
        assert one.body["symbols"] == spec["symbols"]
        assert one.body["metadata"] == (spec["metadata"] or {})
        assert one.body["type"] == spec["type"]


@pytest_twisted.ensureDeferred
async def test_writes_are_idempotent(store, seed, serve):
    """Writing every batch again (a retried write) changes no answer."""
    _, port = serve(store)
    paths = ["/api/patterns?limit=1000", "/api/symbols", "/api/ohlcv/AAPL", "/api/ohlcv/MSFT"]
    before = [(await call(port, p, bearer())).body for p in paths]
    for bars, events in seed.batches:
        await store.write(bars, events)
    api, port = serve(store, pattern_ttl=0)
    after = [(await call(port, p, bearer())).body for p in paths]
    for one, other in zip(before, after, strict=True):
        if "symbols" in one:
            for row in one["symbols"] + other["symbols"]:
                row.pop("last_seen")
        assert one == other


@pytest_twisted.ensureDeferred
async def test_events_after_oldest_first(store, seed):
    """IStore.events_after: after < id <= until, symbols, limit, oldest first, per topic."""
    ordered = sorted(seed.patterns, key=lambda e: id_key(e.id))
    page = await store.events_after("patterns", ordered[9].id, ordered[60].id, None, 1000)
    assert [e.id for e in page] == [e.id for e in ordered[10:61]]
    page = await store.events_after("patterns", "0-0", None, ["AAPL", "NVDA"], 20)
    assert [e.id for e in page] == [e.id for e in ordered if e.symbol in ("AAPL", "NVDA")][:20]
    assert all(isinstance(e, Event) and e.topic == "patterns" for e in page)
    market = await store.events_after("market_state", "0-0", None, None, 100)
    assert [e.id for e in market] == sorted((e.id for e in seed.market), key=id_key)
    assert [e.data for e in market] == [
        e.data for e in sorted(seed.market, key=lambda e: id_key(e.id))]


# ---------------------------------------------------------------- refusals


BAD_PARAMETERS: list[tuple[str, str]] = [
    # (path, the parameter the 400 must name)
    ("/api/patterns?symbol=aapl", "symbol"),
    ("/api/patterns?symbol=ABCDEFGHIJK", "symbol"),
    ("/api/patterns?symbol=", "symbol"),
    ("/api/patterns?symbol=AA%20PL", "symbol"),
    ("/api/patterns?symbol=%FF", "symbol"),
    ("/api/patterns?pattern=", "pattern"),
    ("/api/patterns?pattern=" + "x" * 257, "pattern"),
    ("/api/patterns?pattern=Doji%00", "pattern"),
    ("/api/patterns?pattern=Doji%0A", "pattern"),
    ("/api/patterns?min_confidence=abc", "min_confidence"),
    ("/api/patterns?min_confidence=1.5", "min_confidence"),
    ("/api/patterns?min_confidence=-0.1", "min_confidence"),
    ("/api/patterns?min_confidence=nan", "min_confidence"),
    ("/api/patterns?min_confidence=inf", "min_confidence"),
    ("/api/patterns?min_confidence=1e-1", "min_confidence"),
    ("/api/patterns?min_confidence=0.1" + "0" * 100, "min_confidence"),
    ("/api/patterns?since=yesterday", "since"),
    ("/api/patterns?since=-5", "since"),
    ("/api/patterns?since=1e9", "since"),
    ("/api/patterns?since=99999999999999", "since"),
    ("/api/patterns?since=2024-13-01T00:00:00Z", "since"),
    ("/api/patterns?since=2024-01-01", "since"),
    ("/api/patterns?since=10000-01-01T00:00:00Z", "since"),
    ("/api/patterns?limit=0", "limit"),
    ("/api/patterns?limit=1001", "limit"),
    ("/api/patterns?limit=-1", "limit"),
    ("/api/patterns?limit=1.5", "limit"),
    ("/api/patterns?limit=ten", "limit"),
    ("/api/patterns?limit=" + "9" * 50, "limit"),
    ("/api/patterns?cursor=abc", "cursor"),
    ("/api/patterns?cursor=1-2-3", "cursor"),
    ("/api/patterns?cursor=-1", "cursor"),
    ("/api/patterns?cursor=" + "1" * 40 + "-0", "cursor"),
    ("/api/patterns?limit=5&limit=6", "limit"),
    ("/api/patterns?limit=5;symbol=AAPL", "limit"),
    ("/api/patterns?symbol=AAPL&symbol=MSFT", "symbol"),
    ("/api/patterns?symbols=AAPL", "symbols"),
    ("/api/patterns?symbol=AAPL&foo=1", "foo"),
    ("/api/patterns?until=5", "until"),
    ("/api/ohlcv/aapl", "symbol"),
    ("/api/ohlcv/ABCDEFGHIJK", "symbol"),
    ("/api/ohlcv/AA%27PL", "symbol"),
    ("/api/ohlcv/%FF", "symbol"),
    ("/api/ohlcv/AAPL?since=now", "since"),
    ("/api/ohlcv/AAPL?until=later", "until"),
    ("/api/ohlcv/AAPL?since=200&until=100", "until"),
    ("/api/ohlcv/AAPL?since=100&until=100", "until"),
    ("/api/ohlcv/AAPL?limit=10001", "limit"),
    ("/api/ohlcv/AAPL?limit=0", "limit"),
    ("/api/ohlcv/AAPL?symbol=AAPL", "symbol"),
    ("/api/ohlcv/AAPL?cursor=1-0", "cursor"),
    ("/api/symbols?limit=5", "limit"),
    ("/api/symbols?x", "x"),
    ("/api/universes?type=etf_universe", "type"),
    ("/api/universes/etf%20growth", "key"),
    ("/api/universes/" + "k" * 65, "key"),
    ("/api/universes/etf_growth%3Cx%3E", "key"),
    ("/api/universes/etf_growth?full=1", "full"),
]


@pytest_twisted.ensureDeferred
async def test_every_bad_parameter_is_a_400_naming_it(store, seed, serve):
    """
    Unknown, repeated, empty, malformed, out-of-range, too long, not UTF-8,
    bad symbols and bad keys: each is a 400 bad_parameter naming the
    parameter, and nothing else is answered.
    """
    api, port = serve(store)
    for path, parameter in BAD_PARAMETERS:
        answer = await call(port, path, bearer())
        assert_error(answer, 400, "bad_parameter", parameter)
    assert api.status()["requests"]["patterns"] == {"400": sum(
        1 for path, _ in BAD_PARAMETERS if path.startswith("/api/patterns"))}


INJECTIONS = [
    "' OR '1'='1",
    "AAPL'; DROP TABLE events; --",
    "1; DELETE FROM symbols",
    "%' UNION SELECT password FROM pg_shadow --",
    "<script>alert(1)</script>",
    "\"><img src=x onerror=alert(1)>",
    "javascript:alert(1)",
    "{{7*7}}${7*7}",
    "../../etc/passwd",
    "AAPL\r\nSet-Cookie: x=1",
]


@pytest_twisted.ensureDeferred
async def test_injection_strings_are_refused_or_harmless(store, seed, serve):
    """
    SQL-injection and XSS strings in every parameter, path segment and
    parameter name are refused (400 naming the parameter) or answered as
    plain data that matches nothing; no answer carries markup, and the
    store's content is unchanged afterwards.
    """
    _, port = serve(store, pattern_ttl=0)
    before = (await get(port, "/api/patterns", limit=1000)).body
    query_params = {
        "/api/patterns": ["symbol", "pattern", "min_confidence", "since", "limit", "cursor"],
        "/api/ohlcv/AAPL": ["since", "until", "limit"],
        "/api/symbols": [], "/api/universes": [], "/api/universes/etf_growth": [],
    }
    answers: list[tuple[str, Answer]] = []
    for text in INJECTIONS:
        for path, names in query_params.items():
            for name in names:
                answers.append((name, await call(port, f"{path}?{urlencode({name: text})}",
                                                 bearer())))
            answers.append((text[:64], await call(port, f"{path}?{quote(text)}=1", bearer())))
        for path, name in (("/api/ohlcv/", "symbol"), ("/api/universes/", "key")):
            answers.append((name, await call(port, path + quote(text, safe=""), bearer())))
    for name, answer in answers:
        assert answer.status in (200, 400), answer
        assert b"<" not in answer.raw and b">" not in answer.raw, answer.raw
        assert answer.header("content-type") == "application/json"
        if answer.status == 400:
            assert answer.body["error"]["parameter"] == name, (name, answer.body)
        elif "patterns" in answer.body:
            assert answer.body["patterns"] == [], (name, answer.body)
    assert (await get(port, "/api/patterns", limit=1000)).body == before


@pytest_twisted.ensureDeferred
async def test_producer_markup_is_escaped(store, serve):
    """A pattern name with markup is returned intact as data, never as markup."""
    now = reactor.seconds()
    event = pattern_event(0, f"{int(now * 1000)}-0", now, int(now),
                          pattern="<img src=x onerror=alert(1)>")
    await store.write([], [event])
    _, port = serve(store)
    answer = await get(port, "/api/patterns", pattern="<img src=x onerror=alert(1)>")
    assert answer.status == 200
    assert answer.body["patterns"][0]["pattern"] == "<img src=x onerror=alert(1)>"
    assert b"<img" not in answer.raw and b"\\u003cimg" in answer.raw


@pytest_twisted.ensureDeferred
async def test_bearer_token_is_required(store, seed, serve):
    """
    Without a token, with a malformed header, a garbage token, a token
    signed with another key, or an expired one, every /api route answers
    401 unauthorized with a Bearer challenge; with a good token, 200.
    """
    _, port = serve(store)
    other = JWTAuthenticator(b"another-secret-that-is-32-bytes-long!!")
    refusals: list[tuple[dict[bytes, list[bytes]], str]] = [
        ({}, 'Bearer realm="tickstock"'),
        ({b"authorization": [b"Basic YWxpY2U6c2VjcmV0"]}, "invalid_token"),
        ({b"authorization": [b"Bearer"]}, "invalid_token"),
        (bearer("not-a-jwt"), "invalid_token"),
        (bearer(token(auth=other)), "invalid_token"),
        (bearer(AUTH.mint("alice", time.time() - 7200, 60)), "invalid_token"),
        ({b"authorization": [b"Bearer " + token().encode(), b"Bearer x"]}, "invalid_token"),
    ]
    paths = ["/api/patterns", "/api/symbols", "/api/ohlcv/AAPL", "/api/universes",
             "/api/universes/etf_growth", "/api/universes/none", "/api/nothing-here"]
    for path in paths:
        for headers, challenge in refusals:
            answer = await call(port, path, headers)
            assert_error(answer, 401, "unauthorized")
            assert challenge in answer.header("www-authenticate"), (headers, answer)
            assert answer.header("www-authenticate").startswith("Bearer ")
    for path in paths[:5]:
        assert (await call(port, path, bearer())).status == 200


@pytest_twisted.ensureDeferred
async def test_demo_mode_needs_no_token(store, seed, serve):
    """With the anonymous authenticator (auth off), no header is needed."""
    _, port = serve(store, authenticate=anonymous)
    answer = await call(port, "/api/patterns?limit=1")
    assert answer.status == 200, answer
    assert len(answer.body["patterns"]) == 1


@pytest_twisted.ensureDeferred
async def test_not_found_and_method_not_allowed(store, seed, serve):
    """
    Unknown /api paths and an unknown universe are 404 JSON; a method other
    than GET on a route is 405 JSON with Allow: GET.
    """
    _, port = serve(store)
    for path in ["/api", "/api/", "/api/nothing", "/api/patterns/", "/api/patterns/x",
                 "/api/ohlcv", "/api/ohlcv/", "/api/ohlcv/AAPL/1", "/api/universes/",
                 "/api/universes/a/b", "/api/jobs/unknown"]:
        assert_error(await call(port, path, bearer()), 404, "not_found")
    assert_error(await call(port, "/api/universes/no_such_universe", bearer()), 404, "not_found")
    for method in (b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD"):
        answer = await call(port, "/api/patterns", bearer(), method=method)
        assert answer.status == 405, answer
        assert answer.header("allow") == "GET"
        if method != b"HEAD":
            assert_error(answer, 405, "method_not_allowed")


# ---------------------------------------------------------------- a failing store


@implementer(IStore)
class SwitchableStore:
    """
    A fake around a real store that can be told to fail (StoreUnavailable),
    to say it is not ready, to hang (Deferreds that never fire until
    released) or to raise a bug: failure modes a real store cannot be made
    to show on cue.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.mode = "ok"
        self.calls = 0
        self.hanging: list[tuple[Deferred[Any], str, tuple[Any, ...]]] = []

    @property
    def ready(self) -> bool:
        return self.mode != "not_ready" and self._inner.ready

    def status(self) -> dict[str, Any]:
        return {"state": self.mode}

    def _call(self, name: str, *args: Any) -> Deferred[Any]:
        self.calls += 1
        if self.mode == "unavailable":
            return fail(StoreUnavailable("down"))
        if self.mode == "bug":
            raise RuntimeError("a bug in the store")
        if self.mode == "hang":
            d: Deferred[Any] = Deferred()
            self.hanging.append((d, name, args))
            return d
        return getattr(self._inner, name)(*args)

    def release(self) -> None:
        """Answer every hanging call from the real store."""
        hanging, self.hanging = self.hanging, []
        for d, name, args in hanging:
            getattr(self._inner, name)(*args).chainDeferred(d)

    def write(self, bars: Any, events: Any) -> Deferred[Any]:
        return self._call("write", bars, events)

    def events_after(self, topic: Any, after: Any, until: Any, symbols: Any, limit: Any) -> Any:
        return self._call("events_after", topic, after, until, symbols, limit)

    def patterns(self, query: PatternQuery) -> Deferred[Any]:
        return self._call("patterns", query)

    def symbols(self) -> Deferred[Any]:
        return self._call("symbols")

    def ohlcv(self, symbol: Any, since: Any, until: Any, limit: Any) -> Deferred[Any]:
        return self._call("ohlcv", symbol, since, until, limit)

    def universes(self) -> Deferred[Any]:
        return self._call("universes")

    def universe(self, key: Any) -> Deferred[Any]:
        return self._call("universe", key)


ROUTE_PATHS = ["/api/patterns", "/api/symbols", "/api/ohlcv/AAPL", "/api/universes",
               "/api/universes/etf_growth"]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("mode", ["unavailable", "not_ready", "hang"])
async def test_store_trouble_is_an_immediate_503(store, seed, serve, mode):
    """
    A store that fails, is not ready, or does not answer: every route
    answers 503 store_unavailable with Retry-After: 1, within the API's
    timeout (0.3 s here), never hanging; a not-ready store is not even
    asked.
    """
    fake = SwitchableStore(store)
    fake.mode = mode
    api, port = serve(fake, timeout=0.3)
    for path in ROUTE_PATHS:
        started = time.monotonic()
        answer = await call(port, path, bearer())
        assert time.monotonic() - started < 2.0
        assert_error(answer, 503, "store_unavailable")
        assert answer.header("retry-after") == "1"
    if mode == "not_ready":
        assert fake.calls == 0
    if mode == "hang":
        assert api.status()["store_timeouts"] == len(ROUTE_PATHS)
        fake.release()  # late answers go nowhere, without errors
    fake.mode = "ok"
    assert (await call(port, "/api/patterns", bearer())).status == 200


@pytest_twisted.ensureDeferred
async def test_a_store_bug_is_a_500_and_logged(store, seed, serve):
    """An unexpected exception from the store is a 500 internal, logged, counted."""
    fake = SwitchableStore(store)
    fake.mode = "bug"
    api, port = serve(fake)
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        assert_error(await call(port, "/api/symbols", bearer()), 500, "internal")
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert api.status()["internal_errors"] == 1
    assert any("log_failure" in e and e["log_failure"].check(RuntimeError) for e in logged)


@pytest_twisted.ensureDeferred
async def test_cached_answers_survive_a_store_outage(store, seed, serve):
    """While the store is down, a cached answer is still served; others are 503."""
    fake = SwitchableStore(store)
    _, port = serve(fake, pattern_ttl=60)
    first = await call(port, "/api/patterns?symbol=AAPL", bearer())
    fake.mode = "unavailable"
    again = await call(port, "/api/patterns?symbol=AAPL", bearer())
    assert again.status == 200 and again.body == first.body
    assert (await call(port, "/api/patterns?symbol=MSFT", bearer())).status == 503


class _Abandon(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(
            b"GET /api/symbols HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + token().encode() + b"\r\n\r\n")


@pytest_twisted.ensureDeferred
async def test_a_client_that_goes_away_is_no_error(store, seed, serve):
    """
    A client that disconnects while its answer is being computed is
    counted; the late answer is dropped without any error logged.
    """
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.internet.protocol import Factory

    fake = SwitchableStore(store)
    fake.mode = "hang"
    api, port = serve(fake, timeout=30)
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
            Factory.forProtocol(_Abandon))
        await eventually(lambda: len(fake.hanging) == 1, what="the request to reach the store")
        client.transport.loseConnection()
        await eventually(lambda: api.status()["clients_gone"] == 1, what="the server to notice")
        fake.release()
        fake.mode = "ok"
        assert (await call(port, "/api/symbols", bearer())).status == 200
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert not [e for e in logged if "log_failure" in e], logged
    assert api.status()["requests"]["symbols"] == {"200": 1}


# ---------------------------------------------------------------- caching


@pytest_twisted.ensureDeferred
async def test_pattern_and_universe_answers_are_cached(store, seed, serve):
    """
    Repeated pattern and universe queries are cache hits (counted in
    stats()); a different query is a miss; other routes do not use the cache;
    the same query written differently (ISO since) shares the entry.
    """
    fake = SwitchableStore(store)
    api, port = serve(fake, pattern_ttl=60)
    since = int(seed.now) - 1800
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
    for path in ["/api/patterns?symbol=AAPL", "/api/patterns?symbol=AAPL",
                 f"/api/patterns?since={since}", f"/api/patterns?since={iso}",
                 "/api/universes", "/api/universes", "/api/universes/etf_growth",
                 "/api/universes/etf_growth", "/api/symbols", "/api/symbols"]:
        assert (await call(port, path, bearer())).status == 200
    assert api.status()["cache"] == {"hits": 4, "misses": 4, "ratio": 0.5}
    assert fake.calls == 6
    assert api.status()["requests"]["patterns"] == {"200": 4}


@pytest_twisted.ensureDeferred
async def test_zero_pattern_ttl_means_no_cache(store, seed, serve):
    """pattern_ttl=0: every pattern query reaches the store; no lookups counted."""
    fake = SwitchableStore(store)
    api, port = serve(fake, pattern_ttl=0)
    for _ in range(3):
        assert (await call(port, "/api/patterns", bearer())).status == 200
    assert fake.calls == 3
    assert api.status()["cache"]["hits"] == 0 and api.status()["cache"]["misses"] == 0


def result(d: Deferred[Any]) -> Any:
    """The result of a Deferred that has already fired successfully."""
    assert d.called, d
    outcome = d.result
    assert not isinstance(outcome, Failure), outcome
    return outcome


def _computer(value: bytes = b"v") -> tuple[list[Deferred[bytes]], Callable[[], Deferred[bytes]]]:
    pending: list[Deferred[bytes]] = []

    def compute() -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        pending.append(d)
        return d

    return pending, compute


def test_memory_cache_hits_expiry_and_invalidation():
    """
    MemoryCache: a miss then hits until the ttl passes; invalidate() forgets;
    an answer computed across an invalidation is not stored; concurrent
    misses share one computation; failures pass through uncached.
    """
    clock = Clock()
    cache = MemoryCache(clock)
    calls: list[int] = []

    def compute() -> Deferred[bytes]:
        calls.append(1)
        return succeed(b"answer")

    assert result(cache.fetch("k", compute, 10)) == b"answer"
    assert result(cache.fetch("k", compute, 10)) == b"answer"
    assert (cache.hits, cache.misses, len(calls)) == (1, 1, 1)
    clock.advance(10)
    cache.fetch("k", compute, 10)
    assert (cache.misses, len(calls)) == (2, 2)
    cache.invalidate()
    cache.fetch("k", compute, 10)
    assert len(calls) == 3

    pending, slow = _computer()
    first = cache.fetch("slow", slow, 10)
    second = cache.fetch("slow", slow, 10)
    assert len(pending) == 1
    cache.invalidate()
    pending[0].callback(b"stale")
    assert (first.result, second.result) == (b"stale", b"stale")
    cache.fetch("slow", slow, 10)
    assert len(pending) == 2

    failing = cache.fetch("bad", lambda: fail(StoreUnavailable("down")), 10)
    failing.addErrback(lambda f: f.trap(StoreUnavailable))
    cache.fetch("bad", compute, 10)
    assert len(calls) == 4
    assert cache.ratio == cache.hits / (cache.hits + cache.misses)


def test_memory_store_bounds():
    """The memory store keeps at most max_events events and bar_minutes of bars."""
    clock = Clock()
    clock.advance(1_700_000_000)
    store = MemoryStore(clock, max_events=10, bar_minutes=5)
    now = clock.seconds()
    events = [pattern_event(i, f"{1_700_000_000_000 + i}-0", now, 1_699_999_000) for i in range(15)]
    store.write([], events[5:])
    store.write([], events[:5])
    kept = result(store.patterns(PatternQuery(limit=100)))
    assert [r["id"] for r in kept] == [e.id for e in reversed(events[5:])]
    minute = int(now) // 60 * 60
    store.write([Bar("AAPL", minute - 60 * n, 1, 1, 1, 1, 1, 0, 0, 1, "p") for n in range(8)], [])
    bars = result(store.ohlcv("AAPL", None, None, 100))
    assert [b["minute"] for b in bars] == [minute - 60 * n for n in range(4, -1, -1)]
    clock.advance(120)
    store.write([], [])
    bars = result(store.ohlcv("AAPL", None, None, 100))
    assert [b["minute"] for b in bars] == [minute - 60 * n for n in range(2, -1, -1)]
    with pytest.raises(ValueError):
        store.set_universe("u", "bond_universe", ["AAPL"])
    with pytest.raises(ValueError):
        store.set_universe("u", "etf_universe", ["aapl"])


# ---------------------------------------------------------------- the Redis cache


@pytest.fixture
def links() -> Iterator[Callable[[str], RedisLink]]:
    """Started RedisLinks (each a node's connection), stopped after the test."""
    started: list[RedisLink] = []

    def start(url: str) -> RedisLink:
        link = RedisLink(reactor, parse_redis_url(url), 0, reply_timeout=2.0)
        link.startService()
        started.append(link)
        return link

    yield start
    for link in started:
        pytest_twisted.blockon(link.stopService())


async def connected(link: RedisLink) -> None:
    await eventually(lambda: link.connected, 10, "the link to connect")


class Counting:
    """A compute function that counts its calls and answers a fixed value."""

    def __init__(self, value: bytes = b'{"x":1}') -> None:
        self.value = value
        self.calls = 0

    def __call__(self) -> Deferred[bytes]:
        self.calls += 1
        return succeed(self.value)


@pytest_twisted.ensureDeferred
async def test_redis_cache_miss_hit_and_invalidation_across_nodes(redis_server, links):
    """
    A miss computes and stores; the next fetch, on this node or another,
    is a hit; invalidate() on another node makes both miss.
    """
    one, two = links(redis_server.url), links(redis_server.url)
    await connected(one)
    await connected(two)
    first, second = RedisCache(one, reactor), RedisCache(two, reactor)
    compute = Counting(b"\x00binary<&>\xff")
    assert await first.fetch("q", compute, 30) == compute.value
    assert await first.fetch("q", compute, 30) == compute.value
    assert await second.fetch("q", compute, 30) == compute.value
    assert compute.calls == 1
    assert (first.hits, first.misses, second.hits) == (1, 1, 1)
    assert first.ratio == 0.5

    await second.invalidate()
    assert await first.fetch("q", compute, 30) == compute.value
    assert compute.calls == 2 and first.misses == 2
    assert await second.fetch("q", compute, 30) == compute.value
    assert compute.calls == 2


@pytest_twisted.ensureDeferred
async def test_redis_cache_entries_expire(redis_server, links):
    """An entry stored with a 150 ms ttl is a miss again once it expires."""
    link = links(redis_server.url)
    await connected(link)
    cache = RedisCache(link, reactor)
    compute = Counting()
    await cache.fetch("short", compute, 0.15)
    assert await cache.fetch("short", compute, 0.15) == compute.value
    assert compute.calls == 1
    deadline = reactor.seconds() + 5
    while compute.calls == 1:
        assert reactor.seconds() < deadline, "the entry never expired"
        await cache.fetch("short", compute, 60)
    assert compute.calls == 2
    assert await cache.fetch("short", compute, 60) == compute.value
    assert compute.calls == 2


@pytest_twisted.ensureDeferred
async def test_an_answer_computed_across_an_invalidation_is_not_fresh(redis_server, links):
    """
    A miss whose computation is still running when another node
    invalidates is answered, but the next fetch misses: the answer was
    stored under the old generation.
    """
    one, two = links(redis_server.url), links(redis_server.url)
    await connected(one)
    await connected(two)
    cache, other = RedisCache(one, reactor), RedisCache(two, reactor)
    pending, slow = _computer(b"old")
    answer = cache.fetch("k", slow, 30)
    await eventually(lambda: len(pending) == 1, what="the lookup to miss")
    await other.invalidate()
    pending[0].callback(b"old")
    assert await answer == b"old"
    compute = Counting(b"new")
    await eventually(lambda: redis_server.command("EXISTS", "tickstock:cache:0:k") == b":1\r\n",
                     what="the stale answer to be stored under the old generation")
    assert await cache.fetch("k", compute, 30) == b"new"
    assert compute.calls == 1


@pytest_twisted.ensureDeferred
async def test_redis_cache_down_or_hung_is_a_miss(redis_server, links):
    """
    With Redis killed, or paused (SIGSTOP), fetch still answers by
    computing, promptly; errors are counted and nothing fails.
    """
    link = links(redis_server.url)
    await connected(link)
    cache = RedisCache(link, reactor, timeout=0.3)
    compute = Counting()
    await cache.fetch("k", compute, 30)

    redis_server.pause()
    try:
        started = reactor.seconds()
        assert await cache.fetch("k", compute, 30) == compute.value
        assert reactor.seconds() - started < 1.5
        assert compute.calls == 2
    finally:
        redis_server.resume()

    redis_server.kill()
    for _ in range(3):
        assert await cache.fetch("k", compute, 30) == compute.value
    assert compute.calls == 5
    assert cache.errors >= 4
    assert cache.hits == 0 and cache.misses == 5


@pytest_twisted.ensureDeferred
async def test_api_over_redis_cache_answers_while_redis_is_down(store, seed, serve, redis_server,
                                                                links):
    """The API on a RedisCache: hits while Redis is up, still 200 once it is killed."""
    link = links(redis_server.url)
    await connected(link)
    api, port = serve(store, cache=RedisCache(link, reactor), pattern_ttl=30)
    for _ in range(2):
        assert (await call(port, "/api/patterns?symbol=NVDA", bearer())).status == 200
        assert (await call(port, "/api/universes", bearer())).status == 200
    assert api.status()["cache"]["hits"] == 2
    redis_server.kill()
    answer = await call(port, "/api/patterns?symbol=NVDA", bearer())
    assert answer.status == 200
    assert [r["id"] for r in answer.body["patterns"]] == seed.newest_first(
        lambda e: e.symbol == "NVDA")[:100]
    assert (await call(port, "/api/universes", bearer())).status == 200
