"""
Property-based fuzzing (hypothesis) of the three parsers that face hostile
input. Every property is seeded (C{derandomize=True}, no example database),
so each run tries the same cases, about 2,400 in all (C{max_examples} per
property below; C{--hypothesis-show-statistics} prints them). Code under
test runs with the recursion headroom it has in the daemon, not the extra
stack hypothesis grants a test (see L{production_stack}).

1. The producer message normalizer, L{tickstock.ingest.normalize.parse_event},
   held to an independent reference of docs/producers.md (the rule book:
   the reference reads only the channel registry's data from
   L{tickstock.domain.topics}, never the normalizer's code):
   - L{test_parse_event_accepts_or_refuses_only_as_the_document_says}
     (C{EVENT_HOSTILE_CASES} = 600, plus C{NEAR_MISSES}: one message per
     rule): arbitrary bytes, arbitrary JSON documents, probes and near
     probes, and valid messages of every channel in every accepted shape
     (flat, or wrapped under each of its C{unwrap} paths with fields at
     the wrappers' levels, aliases, defaults, timestamps in every form)
     mutated field by field at any level (near misses of each rule,
     fields dropped, nulled, renamed, duplicated, deeply nested, padded to
     just under or over 64 KiB) and damaged byte by byte, on every Redis
     name of the registry (a C{tickstock.ticks.*} pattern made concrete)
     and on names no channel has. It returns an L{Event}, raises L{Probe}
     or a L{MalformedEvent}, never anything else; it accepts exactly what
     the reference accepts, with the same C{data}, type, symbol, job and
     delivery key, and refuses with the same C{kind}.
   - L{test_valid_events_are_accepted_with_every_field}
     (C{EVENT_VALID_CASES} = 250): valid messages of every channel, in
     every shape, on every Redis name: accepted, every field the producer
     sent (unwrapped) kept, as sent unless the document normalizes it,
     and the canonical fields as it says (symbol upper-cased, C{timestamp}
     in epoch seconds with C{timestamp_original}, health C{status} mapped
     with C{status_original}, percentages, numeric strings, ...).
   - L{test_event_frames_round_trip} (C{EVENT_VALID_CASES} = 250): the
     C{event} frame of an accepted event is JSON that round-trips its
     data; a message nested deeper than C{PINNED_DEPTH} = 32 levels (extra
     fields up to the 1023 levels JSON parsing allows) is C{too_deep}.
   Where the document leaves a choice open (the outer type word or the
   payload's; which state a health word not in its lists maps to; the text
   a numeric C{job_id} becomes), the reference accepts each reading.

2. The WebSocket request handler, L{tickstock.deliver.gateway.Gateway.receive}, over
   a real L{Broadcaster}, L{MemoryHistory}, L{Router}, L{Jobs},
   L{Universes} and L{MemoryStore}, driven by a L{Clock}, with auth off
   (L{anonymous}) or a L{JWTAuthenticator}. The connections are fakes
   behind the L{IClient} interface: C{RecordingClient} from
   C{tests/test_units.py}, which records replies, frames and closes.
   - L{test_gateway_answers_any_single_payload} (C{GATEWAY_PAYLOAD_CASES}
     = 400): one arbitrary payload (bytes, JSON values, messages with real
     and random ops, ids of any type and length, topics, filters, backtest
     params, tokens valid, expired, forged or garbage) before or after
     hello.
   - L{test_gateway_survives_any_message_sequence}
     (C{GATEWAY_SEQUENCE_CASES} = 100, 5-42 steps each): three connections
     greet and subscribe, then random requests interleave with producer
     events, clock advances (hello timeouts, token expiry) and
     disconnects, with or without a rate limit and a per-user connection
     cap.
   Both check: C{receive} never raises; every request on an open
   connection gets exactly one reply, echoing its id when that is a valid
   string id (or the connection is closed with 1008); error replies have
   C{op:error} and string C{code} and C{message}; no request causes an
   internal error or a logged traceback; subscriptions never exceed
   C{max_subscriptions}, and the broadcaster's index agrees with the
   gateway; every frame sent is a JSON event of a subscription the client
   was confirmed; and afterwards a well-formed client on the same gateway
   still subscribes and receives an event delivered through the router,
   history and broadcaster.

3. The REST API's parameter parsing (L{tickstock.web.api}), through the real
   site (L{build_site}) and L{build_api} over a seeded L{MemoryStore}, the
   L{MemoryCache} and real L{Jobs} on a L{Clock}; each request is a real
   L{twisted.web.server.Request} on a C{DummyChannel}:
   - L{test_rest_hostile_queries_are_refused_by_name} (C{REST_HOSTILE_CASES}
     = 400): every route and method, arbitrary path segments and query
     strings (unknown names, repeats, empty values, unicode, percent- and
     plus-encoding, invalid UTF-8, SQL injection and XSS, negative, NaN,
     inf and overlong numbers). The answer is exactly what an independent
     reference of the parameter rules predicts: 200, or a 4xx with a JSON
     C{{"error": {"code", "message", "parameter"}}}, a 400 naming the
     offending parameter; never a 500, no markup, no logged failure.
   - L{test_rest_valid_queries_are_accepted} (C{REST_VALID_CASES} = 150):
     valid generated queries of every route are answered 200.
   - L{test_rest_job_bodies_are_refused_cleanly} (C{REST_BODY_CASES} =
     150): C{POST /api/jobs} with arbitrary bodies and content types: 202,
     or 400/413/415 with a JSON error (a message per bad field); never 500.
   - L{test_rest_auth_and_origin_headers_are_refused_cleanly}
     (C{REST_HEADER_CASES} = 100): arbitrary C{Authorization} and
     C{Origin} headers with JWT auth and CORS on: 200 or 401 with a
     C{WWW-Authenticate} challenge, CORS headers only for the allowed
     origin; never 500.

Known bugs are pinned as explicit C{@example}s next to the property they
break, so they fail until fixed.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import math
import re
import string
import sys
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote_from_bytes

import jwt
import orjson
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from tests.conftest import TEST_SECRET
from tests.test_units import RecordingClient
from tickstock.deliver.auth import JWTAuthenticator, anonymous
from tickstock.deliver.broadcast import Broadcaster
from tickstock.deliver.gateway import CLOSE_POLICY, Gateway
from tickstock.deliver.ratelimit import RateLimit
from tickstock.deliver.universes import Universes
from tickstock.domain.events import Event, MalformedEvent, shown
from tickstock.domain.topics import (
    CANCEL_CHANNEL,
    CONTROL_CHANNEL,
    DEFAULT_CHANNELS,
    JOBS_CHANNEL,
    TOPIC_NAMES,
    TOPICS,
    Channel,
)
from tickstock.history.memory import MemoryHistory
from tickstock.ingest.memory import MemoryBus
from tickstock.ingest.normalize import Probe, parse_event
from tickstock.ingest.router import Router
from tickstock.jobs.backtests import Jobs
from tickstock.store.cache import MemoryCache
from tickstock.store.memory import MemoryStore
from tickstock.web.api import build_api
from tickstock.web.origins import normalize_origin
from tickstock.web.site import JSONStatus, build_site

EVENT_HOSTILE_CASES = 600
EVENT_VALID_CASES = 250
GATEWAY_PAYLOAD_CASES = 400
GATEWAY_SEQUENCE_CASES = 100
REST_HOSTILE_CASES = 400
REST_VALID_CASES = 150
REST_BODY_CASES = 150
REST_HEADER_CASES = 100

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much, HealthCheck.large_base_example],
)

NOW = 1_700_000_000.0
"""The Clock's start (the REST and event worlds); JWT worlds start at real time."""


# ================================================================ shared helpers


def same(a: Any, b: Any) -> bool:
    """
    Deep equality of JSON values without recursion (nesting here reaches a
    thousand levels, past what C{==} on nested lists survives), and with
    C{True} never equal to C{1}.
    """
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if isinstance(x, bool) or isinstance(y, bool) or x is None or y is None:
            if x is not y:
                return False
        elif isinstance(x, (int, float)) and isinstance(y, (int, float)):
            if x != y:
                return False
        elif isinstance(x, str) and isinstance(y, str):
            if x != y:
                return False
        elif isinstance(x, list) and isinstance(y, list):
            if len(x) != len(y):
                return False
            stack.extend(zip(x, y, strict=True))
        elif isinstance(x, dict) and isinstance(y, dict):
            if x.keys() != y.keys():
                return False
            stack.extend((x[k], y[k]) for k in x)
        else:
            return False
    return True


def walk(value: Any) -> Iterator[Any]:
    """Every value nested in a JSON value, itself included, without recursion."""
    stack = [value]
    while stack:
        v = stack.pop()
        yield v
        if isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())


def depth_of(value: Any) -> int:
    """How many containers deep a JSON value nests (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, dict)):
            deepest = max(deepest, d + 1)
            stack.extend((child, d + 1) for child in (v if isinstance(v, list) else v.values()))
    return deepest


def nested(depth: int, kind: str, leaf: Any = 1) -> Any:
    """A JSON value C{depth} containers deep (lists, objects or both), built without recursion."""
    value = leaf
    for level in range(depth):
        as_list = kind == "list" or (kind == "mixed" and level % 2 == 0)
        value = [value] if as_list else {"k": value}
    return value


def nested_text(depth: int, kind: str, leaf: bytes = b"1") -> bytes:
    """The JSON text of L{nested}, written directly (no encoder recursion)."""
    opens, closes = [], []
    for level in range(depth):
        as_list = kind == "list" or (kind == "mixed" and level % 2 == 0)
        opens.append(b"[" if as_list else b'{"k":')
        closes.append(b"]" if as_list else b"}")
    return b"".join(reversed(opens)) + leaf + b"".join(closes)


@dataclass(frozen=True)
class Raw:
    """JSON text put verbatim into a message built by L{encode}."""

    text: bytes


def encode(value: Any, resolve: Callable[[Any], Any] = lambda v: v) -> bytes:
    """
    JSON text of a message: like C{json.dumps} (so C{NaN}, C{Infinity} and
    huge ints come out as text a producer or client might send), plus
    L{Raw} parts inserted as they are, and placeholders C{resolve}d first.
    """
    value = resolve(value)
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return b"{" + b",".join(
            json.dumps(str(k)).encode() + b":" + encode(v, resolve) for k, v in value.items()
        ) + b"}"
    if isinstance(value, (list, tuple)):
        return b"[" + b",".join(encode(v, resolve) for v in value) + b"]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return json.dumps(value).encode()


PRODUCTION_STACK = 30
"""Frames already on the stack when the daemon's reactor calls a handler (an underestimate)."""


@contextmanager
def production_stack() -> Iterator[None]:
    """
    Run code under test with the recursion headroom it has in the daemon:
    Python's default limit of 1000 frames less what the reactor's own stack
    takes, not the extra 2000 frames hypothesis gives a test. Recursion
    that blows up in production (C{repr} of a deeply nested value) must
    blow up here too.
    """
    frame, depth = sys._getframe(), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + 1000 - PRODUCTION_STACK)
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


@contextmanager
def logged_failures() -> Iterator[list[dict[str, Any]]]:
    """Collect the failures (tracebacks) logged meanwhile: there must be none."""
    failures: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield failures
    finally:
        globalLogPublisher.removeObserver(observe)


def describe(failures: list[dict[str, Any]]) -> str:
    return "; ".join(f"{e.get('log_format')}: {e['log_failure'].getTraceback()[-600:]}"
                     for e in failures)


# ---------------------------------------------------------------- shared strategies

UTF8 = st.characters(codec="utf-8")  # every code point but the lone surrogates
PRINTABLE = st.characters(codec="utf-8", exclude_categories=("C", "Z"))
SYMBOL_ALPHABET = string.ascii_uppercase + string.digits + ".-"
symbols = st.text(SYMBOL_ALPHABET, min_size=1, max_size=10)


def texts(min_size: int = 0, max_size: int = 20) -> st.SearchStrategy[str]:
    return st.text(UTF8, min_size=min_size, max_size=max_size)


INT64 = st.integers(-(2**63), 2**63 - 1)
finite = st.one_of(INT64, st.floats(allow_nan=False, allow_infinity=False))
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                         st.floats(allow_nan=False, allow_infinity=False), texts())
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts(0, 8), inner, max_size=4),
    max_leaves=6,
)
"""JSON values that survive a round trip through orjson (64-bit ints, finite floats)."""

python_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(),
              st.integers(2**63 - 2, 2**64 + 2), st.integers(-(2**63) - 2, -(2**63) + 2),
              st.integers(10**19, 10**400)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=6,
)
"""Anything C{json.dumps} writes: NaN, Infinity, huge ints, lone surrogates."""

DEPTHS = st.one_of(st.integers(1, 1100),
                   st.sampled_from((64, 253, 254, 255, 256, 500, 900, 1000, 1022, 1023, 1024,
                                    1025, 1100)))
deep_texts = st.builds(nested_text, DEPTHS, st.sampled_from(("list", "dict", "mixed")),
                       st.sampled_from((b"1", b'"x"', b"null", b"[]", b"{}")))
"""JSON text nested up to past the 1024 levels orjson parses."""

SPECIAL_TOKENS = [
    b"NaN", b"-NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"1e-400", b"-0",
    b"-0.0", b"0e0", b"1E+2", b"00", b"01", b"1.", b".5", b"+1", b"0x1F", b"true", b"false",
    b"null", b"True", b"None", b"undefined", b'"\\ud800"', b'"\\u0000"', b'"\\udc00\\ud800"',
    b"18446744073709551615", b"18446744073709551616", b"-9223372036854775809",
    b"9" * 400, b"[]", b"{}", b'""', b'"', b"[", b"{", b"'AAPL'", b"1.7976931348623157e308",
    b"5e-324", b"2.2250738585072014e-308", b'"AAPL\\n"', b'"aapl"', b'"\\u0041APL"',
    b'"AAPL "', b'"\xef\xbc\xa1APL"', b'"\xff"', b"\xef\xbb\xbf{}",
]
json_texts = st.builds(lambda v, ascii: json.dumps(v, ensure_ascii=ascii).encode(
    "utf-8", "surrogatepass"), python_values, st.booleans())
value_texts = st.one_of(json_texts, st.sampled_from(SPECIAL_TOKENS), deep_texts,
                        st.builds(orjson.dumps, json_values))
"""JSON-ish text for one value: valid, invalid, huge, deep or odd."""

INJECTIONS = [
    "' OR '1'='1", "AAPL'; DROP TABLE events; --", "1; DELETE FROM symbols",
    "%' UNION SELECT password FROM pg_shadow --", "<script>alert(1)</script>",
    "\"><img src=x onerror=alert(1)>", "javascript:alert(1)", "{{7*7}}${7*7}",
    "../../etc/passwd", "AAPL\r\nSet-Cookie: x=1", "\x00", "%00", "\u202eLPAA", "ＡＡＰＬ",
]


# ================================================================ 1. producer events

CHANNELS: dict[str, Channel] = {channel.name: channel for channel in DEFAULT_CHANNELS
                                if channel.redis}
"""The default channels Redis feeds, by name (C{tickstock.db.events} is fed by PostgreSQL)."""
CHANNEL_NAMES = tuple(CHANNELS)
assert any("*" in name for channel in CHANNELS.values() for name in channel.redis), \
    "the registry has no Redis name pattern left to fuzz"
OTHER_NAMES = ("", "tickstock.events", "tickstock.events.patterns ", "TICKSTOCK.DATA.TICKS",
               JOBS_CHANNEL, CANCEL_CHANNEL, CONTROL_CHANNEL, "patterns", "tickstock.db.events",
               "tickstock.ticks", "tickstock.ticksAAPL", "tickstock:ticks:AAPL",
               "xtickstock.ticks.AAPL")
"""Redis names no channel has (C{tickstock.db.events} is a channel, but not a Redis name)."""

# What docs/producers.md says, in its own numbers and words.
DOC_MAX_BYTES = 64 * 1024
DOC_MAX_DEPTH = 32
DOC_MAX_TEXT = 256
DOC_MAX_EVENT_ID = 64
DOC_MS_ABOVE = 10**11
PROBE_KEYS = frozenset({"test", "timestamp", "source", "type", "event_type"})
TYPE_KEYS = ("event_type", "type", "event")
HEALTH_STATES = ("healthy", "degraded", "down")
HEALTH_WORDS = {**dict.fromkeys(("ok", "up", "running", "online", "active", "started", "ready"),
                                "healthy"),
                **dict.fromkeys(("error", "critical", "failed", "stopped", "offline"), "down")}
"""The words the document maps; its lists end in "…", so others map to any state."""
RESULT_FIGURES = ("win_rate", "roi", "sharpe_ratio", "max_drawdown")
PINNED_DEPTH = DOC_MAX_DEPTH
"""Messages nested this deep are accepted when valid; one level more is C{too_deep}."""

STRICT_SYMBOL = re.compile(r"[A-Z0-9.\-]{1,10}")
NUMERIC_TEXT = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
"""A numeric string, once trimmed: an ASCII decimal number."""
ISO_8601 = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})(?:T([0-9]{2}):([0-9]{2})"
                      r"(?::([0-9]{2})(?:\.([0-9]+))?)?(Z|[+-][0-9]{2}(?::?[0-9]{2})?)?)?")
"""The ISO 8601 the reference knows: calendar dates in the extended format, with or
without a time, in UTC, with C{Z} or with an offset. (Other ISO 8601 forms, and
the liberties C{datetime.fromisoformat} takes, are neither generated nor judged.)"""


# ---------------------------------------------------------------- valid messages

def spell(symbol: str, case: str, pad: str) -> str:
    """A symbol as a producer may write it: any case, with blanks around."""
    return pad + {"upper": symbol, "lower": symbol.lower(), "title": symbol.title()}[case] + pad


def spellings(pool: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.builds(spell, pool, st.sampled_from(("upper",) * 3 + ("lower", "title")),
                     st.sampled_from(("",) * 4 + (" ", "\t", "\n ")))


def either(*choices: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """
    One of C{choices}, each about as often: in a short seeded run C{st.one_of}
    draws its first choices far more often than its last. (Hypothesis draws
    the first and the last of a C{sampled_from} more often than the others.)
    """
    return st.sampled_from(range(len(choices))).flatmap(choices.__getitem__)


def numeric(numbers: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Numbers, and sometimes their text (a numeric string), blanks around or not."""
    return either(numbers, st.builds(lambda n, pad: f"{pad}{n!r}{pad}", numbers,
                                     st.sampled_from(("", "", " "))), numbers)


units = st.one_of(st.sampled_from([0, 1, 0.0, 1.0, 0.5, 5e-324]), st.floats(0, 1))
percentages = st.one_of(st.integers(2, 100), st.floats(1, 100, exclude_min=True),
                        st.sampled_from([100, 100.0, 1.0000001]))
positives = st.one_of(st.integers(1, 2**63 - 1), st.sampled_from([5e-324, 1e308]),
                      st.floats(min_value=0.0, exclude_min=True, allow_infinity=False))
non_negatives = st.one_of(st.integers(0, 2**63 - 1), st.sampled_from([0, 0.0, -0.0]),
                          st.floats(min_value=0.0, allow_infinity=False))
field_texts = st.one_of(texts(1, 30), st.builds(
    lambda head, c, n: (head + c * n)[:n], texts(0, 4), UTF8,
    st.integers(DOC_MAX_TEXT - 2, DOC_MAX_TEXT)))
job_ids = st.one_of(field_texts, field_texts, INT64,
                    st.floats(allow_nan=False, allow_infinity=False))
health_words = either(
    st.sampled_from(HEALTH_STATES + tuple(HEALTH_WORDS)),
    st.sampled_from(("OK", " Running ", "Healthy", "DOWN", "unknown", "maintenance")),
    field_texts)
results = st.fixed_dictionaries(
    {name: numeric(finite) for name in RESULT_FIGURES},
    optional={"trades": st.integers(0, 10**6), "notes": texts()})
indicator_values = st.one_of(finite, texts(1, 10), st.lists(finite, min_size=1, max_size=3))

FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "symbol": spellings(symbols),
    "confidence": numeric(units),
    "progress": numeric(units | percentages),
    "price": numeric(positives),
    "volume": numeric(non_negatives),
    "job_id": job_ids,
    "status": field_texts,
    "service": field_texts,
    "pattern": field_texts,
    "indicator": field_texts,
    "alert_type": field_texts,
}
"""Valid values of each field the document has a rule for."""
TOPIC_VALUES = {("health", "status"): health_words}
for _channel in DEFAULT_CHANNELS:
    for _name in _channel.required:
        assert _name in FIELD_VALUES, \
            f"test_fuzz has no rule for {_name} ({_channel.name}): read docs/producers.md, add one"


def _iso_text(moment: datetime, timespec: str, zone: str) -> str:
    if timespec == "date":
        return moment.date().isoformat()
    return moment.isoformat(timespec=timespec) + zone


def _zone(hours: int, minutes: int, form: str) -> str:
    sign = "-" if hours < 0 else "+"
    if form == "hours":
        return f"{sign}{abs(hours):02}"
    return f"{sign}{abs(hours):02}{':' if form == 'colon' else ''}{minutes:02}"


iso_texts = st.builds(
    _iso_text, st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(9999, 12, 30)),
    st.sampled_from(("date", "minutes", "seconds", "milliseconds", "microseconds")),
    st.one_of(st.sampled_from(("", "Z")), st.builds(_zone, st.integers(-23, 23),
                                                    st.integers(0, 59),
                                                    st.sampled_from(("colon", "basic", "hours")))))
MISSING = Raw(b"")
"""A field left out."""
timestamps = either(
    iso_texts, st.just(MISSING), st.none(),
    numeric(st.one_of(st.integers(1, DOC_MS_ABOVE),
                      st.floats(0, DOC_MS_ABOVE, exclude_min=True))),
    numeric(st.one_of(st.integers(DOC_MS_ABOVE + 1, 2**63 - 1),
                      st.floats(DOC_MS_ABOVE, exclude_min=True, allow_infinity=False))),
    st.sampled_from((DOC_MS_ABOVE, DOC_MS_ABOVE + 1, 1, 5e-324, NOW)), iso_texts)
"""Valid timestamps: absent, null, epoch seconds or milliseconds, numeric strings, ISO 8601."""

type_words = st.one_of(
    st.sampled_from(("ranking_change", "stage_change", "universe_updated", "x")),
    st.text(PRINTABLE | st.just(" "), min_size=1, max_size=30),
    st.builds(lambda head, n: (head + "t" * n)[:n], st.text(PRINTABLE, max_size=4),
              st.integers(DOC_MAX_TEXT - 2, DOC_MAX_TEXT)))
"""Type words an open channel takes as the event's type."""

WRAPPERS = frozenset(part for channel in DEFAULT_CHANNELS for path in channel.unwrap
                     for part in path.split("."))
RESERVED = frozenset(
    {*FIELD_VALUES, *TYPE_KEYS, *PROBE_KEYS, *WRAPPERS, "event_id", "timestamp_original",
     "status_original", "results", "completed_at", "value", "values"}
    | {name for channel in DEFAULT_CHANNELS for names in channel.aliases.values()
       for name in names})
"""Field names the document gives a meaning to: never an unknown extra field's name."""
EXTRA_NAMES = ("", "note", "Symbol", "SYMBOL", "symbol ", "__proto__", "constructor", "\u0000",
               "🙂", "flow_id", "tier")
assert not RESERVED & {*EXTRA_NAMES, "version"} and not any(n.startswith("_") for n in RESERVED)
EXTRAS = st.dictionaries(st.one_of(texts(0, 10).map("_".__add__), st.sampled_from(EXTRA_NAMES)),
                         json_values, max_size=3)
"""Unknown fields: passed on as sent."""
WRAPPER_FIELDS = st.fixed_dictionaries({}, optional={
    "flow_id": texts(1, 12), "tier": st.sampled_from(("daily", "intraday")),
    "version": st.integers(1, 3), "_meta": json_values})
"""Fields of the wrappers themselves, kept beside the payload's."""


@dataclass(frozen=True)
class Sent:
    """
    A producer message: the Redis name it is published on, its channel, the
    message (with L{Raw} parts and placeholders) and the fields the producer
    meant, once unwrapped (what C{event.data} must keep).
    """

    redis_name: str
    channel: Channel
    message: dict[str, Any]
    fields: dict[str, Any]
    path: str = ""

    @property
    def raw(self) -> bytes:
        return encode(self.message)


def _depths(max_depth: int) -> st.SearchStrategy[int]:
    edges = tuple(d for d in (PINNED_DEPTH - 1, PINNED_DEPTH, 1022) if d < max_depth)
    return st.integers(1, max_depth - 1) | st.sampled_from(edges) if edges \
        else st.integers(1, max_depth - 1)


def redis_names(channel: Channel) -> st.SearchStrategy[str]:
    """The Redis names that feed C{channel}, a pattern's made concrete."""
    exact = tuple(name for name in channel.redis if "*" not in name)
    fills = st.one_of(symbols, st.sampled_from(("", "AAPL", "brk.b", "*", "a.b")), texts(0, 8))
    patterns = [st.builds(lambda pattern, fill: pattern.replace("*", fill), st.just(pattern),
                          fills) for pattern in channel.redis if "*" in pattern]
    return st.one_of(*([st.sampled_from(exact)] if exact else []), *patterns)


@st.composite
def valid_fields(draw: st.DrawFn, channel: Channel, symbol_pool: tuple[str, ...] = (),
                 job_id: st.SearchStrategy[Any] | None = None) -> dict[str, Any]:
    """
    The fields of a valid message of C{channel}, flat: its required fields
    (or their aliases, or left to their defaults), what its topic needs, a
    timestamp in any accepted form, a type word, an C{event_id}, and unknown
    extra fields.
    """
    topic = TOPICS[channel.topic]
    fields: dict[str, Any] = {}
    chosen = {"symbol": spellings(st.sampled_from(symbol_pool))} if symbol_pool else {}
    if job_id is not None:
        chosen["job_id"] = job_id
    names = list(channel.required)
    if topic.by_symbol and "symbol" not in names and draw(st.integers(0, 2)):
        names.append("symbol")
    for name in names:
        if name in channel.defaults and draw(st.integers(0, 2)) == 0:
            continue  # the default fills it
        strategy = chosen.get(name, TOPIC_VALUES.get((channel.topic, name), FIELD_VALUES[name]))
        fields[name] = draw(strategy) if name in channel.required or draw(st.integers(0, 5)) \
            else None
    if channel.event_type == "backtest_result":
        if fields.get("status", channel.defaults.get("status")) != "completed" \
                and draw(st.integers(0, 3)) == 0:
            fields["status"] = "completed"
        if fields.get("status", channel.defaults.get("status")) == "completed":
            fields["results"] = draw(results)
        elif draw(st.booleans()):  # a job that did not complete may say why, in any shape
            fields["results"] = draw(st.one_of(st.none(), json_values))
    if channel.topic == "indicators":
        which = draw(st.sampled_from(("value", "values", "both")))
        if which != "values":
            fields["value"] = draw(indicator_values)
        if which != "value":
            fields["values"] = draw(st.dictionaries(texts(1, 8), finite, max_size=3))
    for canonical, aliases in channel.aliases.items():
        if canonical in fields and aliases and draw(st.integers(0, 3)) == 0:
            at = draw(st.integers(0, len(aliases) - 1))
            if draw(st.booleans()):
                fields[aliases[at]] = fields.pop(canonical)
            else:  # the canonical name wins over an alias, whatever it holds
                fields[aliases[at]] = draw(json_values)
            for later in aliases[at + 1:]:  # and the first alias over the later ones
                if draw(st.booleans()):
                    fields[later] = draw(json_values)
    timestamp = draw(timestamps)
    if timestamp is not MISSING:
        fields["timestamp"] = timestamp
    if draw(st.booleans()):
        fields[draw(st.sampled_from(TYPE_KEYS))] = draw(
            type_words if channel.open_type else field_texts)
    if draw(st.booleans()):
        fields["event_id"] = draw(texts(1, DOC_MAX_EVENT_ID))
    extras = draw(EXTRAS)
    return {**extras, **fields} if draw(st.booleans()) else {**fields, **extras}


@st.composite
def valid_events(draw: st.DrawFn, max_depth: int = PINNED_DEPTH,
                 symbol_pool: tuple[str, ...] = (), channels: tuple[str, ...] = CHANNEL_NAMES,
                 job_id: st.SearchStrategy[Any] | None = None) -> Sent:
    """
    A valid message of a random channel, on one of its Redis names: flat or
    wrapped under one of its C{unwrap} paths (fields at the wrappers'
    levels too, the send's C{timestamp} outside the detection's), and
    sometimes an extra field nested up to C{max_depth} levels in all.
    """
    channel = CHANNELS[draw(st.sampled_from(channels))]
    redis_name = draw(redis_names(channel))
    flat = draw(valid_fields(channel, symbol_pool, job_id))
    path = draw(st.sampled_from(("", "") + channel.unwrap))
    parts = path.split(".") if path else []
    levels: list[dict[str, Any]] = [{} for _ in range(len(parts) + 1)]
    for name, value in flat.items():
        at = len(parts) if draw(st.integers(0, 3)) else draw(st.integers(0, len(parts)))
        levels[at][name] = value
    if parts and draw(st.booleans()):
        levels[draw(st.integers(0, len(parts) - 1))].update(draw(WRAPPER_FIELDS))
    if parts and "timestamp" in levels[-1] and draw(st.booleans()):
        sent_at = draw(st.one_of(timestamps, json_values))  # the inner one wins, whatever this is
        if sent_at is not MISSING:
            levels[draw(st.integers(0, len(parts) - 1))]["timestamp"] = sent_at
    deep: Any = None
    if max_depth > 1 and draw(st.integers(0, 3)) == 0:
        at = draw(st.integers(0, len(parts)))
        if max_depth - at > 1:
            depth, kind = draw(_depths(max_depth - at)), draw(st.sampled_from(
                ("list", "dict", "mixed")))
            levels[at]["_deep"] = Raw(nested_text(depth, kind))
            deep = nested(depth, kind)
    fields: dict[str, Any] = {}
    for level in levels:
        fields.update(level)
    if deep is not None:
        fields["_deep"] = deep
    for at in reversed(range(len(parts))):
        levels[at] = {parts[at]: levels[at + 1], **levels[at]} if draw(st.booleans()) \
            else {**levels[at], parts[at]: levels[at + 1]}
    return Sent(redis_name, channel, levels[0], fields, path)


# ---------------------------------------------------------------- hostile messages

PRODUCER_NAMES = st.sampled_from(("known",) * 5 + ("other", "text") + ("known",) * 5).flatmap(
    lambda kind: {"known": st.sampled_from(CHANNEL_NAMES).flatmap(
        lambda name: redis_names(CHANNELS[name])),
        "other": st.sampled_from(OTHER_NAMES), "text": texts(0, 30)}[kind])
"""Mostly a Redis name of a random channel (a pattern's made concrete), sometimes one no
channel has."""
# (Hypothesis draws the first and the last choice more often than the others.)
SHAPES = st.sampled_from(("fields",) * 3 + ("value", "bytes", "pad", "probe") + ("fields",) * 3)
MUTATIONS = st.sampled_from(("field", "drop", "replace", "replace", "field", "null", "extra",
                             "duplicate", "rename", "probe", "field"))
DAMAGE = st.sampled_from(("none",) * 4 + ("truncate", "flip", "insert", "wrap") + ("none",) * 4)
KEY_TEXTS = st.builds(lambda k: json.dumps(k).encode("utf-8", "surrogatepass"),
                      st.text(max_size=12))


def _texts_of(values: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return values.map(lambda v: encode(v))


def _quoted(*words: str) -> tuple[bytes, ...]:
    return tuple(json.dumps(w, ensure_ascii=False).encode() for w in words)


EVENT_TYPE_TEXTS = either(
    _texts_of(type_words), value_texts, _texts_of(texts(1, 8)),
    st.sampled_from(_quoted("", "t" * 257, "a\nb", "\u0000", "\u200b", "health_check",
                            "ranking_change", "a\u2028b", " ", "\t") + (b"5", b"null", b"[]")))
EVENT_ID_TEXTS = st.one_of(texts(1, 64).map(orjson.dumps),
                           st.sampled_from((b'""', b'"' + b"x" * 65 + b'"', b"5", b"null")),
                           value_texts)
NUMBER_TEXTS = either(
    _texts_of(numeric(st.one_of(finite, units, percentages))),
    st.sampled_from((b"0", b"1", b"-0.0", b"1.0000000001", b"100", b"100.0", b"100.00001",
                     b"101", b"-1", b"5e-324", b"1e308", b"true", b"null", b"[]")
                    + _quoted("0.5", " 0.5 ", "50", "1e-1", "+.5", "5.", "abc", "", "NaN",
                              "inf", "-Infinity", "1e400", "0x1", "0.5.1", "- 1")))
BAD_TIMESTAMPS = st.sampled_from(
    (b"0", b"-1", b"-0.0", b"true", b"[]", b"{}")
    + _quoted("2024-02-30T00:00:00Z", "2024-13-01", "2024-01-01T25:00:00",
              "2024-01-01T00:00:00+24:00", "2024-01-01T00:60", "0000-01-01", "yesterday", "",
              "-5", "0", "10:00", "NaN", "1e400"))
TIMESTAMP_TEXTS = either(BAD_TIMESTAMPS, value_texts,
                         _texts_of(timestamps.filter(lambda t: t is not MISSING)), BAD_TIMESTAMPS)
SYMBOL_TEXTS = either(
    _texts_of(spellings(symbols)),
    st.sampled_from((b"123", b'["AAPL"]', b"null", b"true")
                    + _quoted("A", "ABCDEFGHIJK", " brk.b ", "ß", "ＡＡＰＬ", "AAPL\n", "AA PL",
                              "$AAPL", "", " ", "\u0000", "a" * 300)))
SHORT_TEXTS = either(
    _texts_of(field_texts),
    st.sampled_from((b'""', b"1", b"1.5", b"true", b"null", b"{}",
                     b'"' + b"s" * 256 + b'"', b'"' + b"s" * 257 + b'"')))
RESULTS_TEXTS = either(
    _texts_of(results),
    st.builds(lambda figures, drop: encode({k: v for k, v in figures.items() if k != drop}),
              results, st.sampled_from(RESULT_FIGURES)),
    st.builds(lambda figures, name, bad: encode({**figures, name: Raw(bad)}),
              results, st.sampled_from(RESULT_FIGURES), NUMBER_TEXTS),
    st.sampled_from((b"[]", b'"ok"', b"{}", b"null", b"1")))
KEY_VALUES: dict[str, st.SearchStrategy[bytes]] = {
    **dict.fromkeys(("symbol", "ticker", "sym"), SYMBOL_TEXTS),
    **dict.fromkeys(("confidence", "progress", "price", "volume"), NUMBER_TEXTS),
    **dict.fromkeys(("pattern", "service", "indicator", "alert_type", "pattern_name", "name",
                     "source", "component", "indicator_type", "type_of_alert"), SHORT_TEXTS),
    "status": either(_texts_of(health_words), SHORT_TEXTS),
    "job_id": either(_texts_of(job_ids), SHORT_TEXTS),
    "timestamp": TIMESTAMP_TEXTS,
    "results": RESULTS_TEXTS,
    **dict.fromkeys(TYPE_KEYS, EVENT_TYPE_TEXTS),
    "event_id": EVENT_ID_TEXTS,
}
"""What to put in place of a known field: its near misses as well as anything at all."""

probe_texts = st.builds(
    lambda test, others, extra: encode({"test": test, **others, **extra}),
    st.one_of(texts(0, 10), json_scalars),
    st.dictionaries(st.sampled_from(tuple(PROBE_KEYS - {"test"})), json_values, max_size=3),
    st.one_of(st.just({}), st.just({}), EXTRAS, st.just({"event_type": "health_check"})))
"""Probes, and messages that look like one."""

Node = list[tuple[bytes, Any]]
"""An object as its (key text, value) pairs; a value is JSON text or a Node."""


def to_node(message: dict[str, Any]) -> Node:
    return [(encode(str(k)), to_node(v) if isinstance(v, dict) else encode(v))
            for k, v in message.items()]


def nodes(node: Node) -> Iterator[Node]:
    yield node
    for _, value in node:
        if isinstance(value, list):
            yield from nodes(value)


def node_text(node: Node, separator: bytes) -> bytes:
    return b"{" + separator.join(
        k + b":" + (node_text(v, separator) if isinstance(v, list) else v) for k, v in node
    ) + b"}"


def key_of(text: bytes) -> str | None:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:  # a lone surrogate
        return None


def mutate(draw: st.DrawFn, node: Node, channel: Channel) -> None:
    """One change to one object of a message."""
    mutation = draw(MUTATIONS)
    known = [i for i, (k, _) in enumerate(node) if key_of(k) in KEY_VALUES]
    if mutation in ("replace", "null", "duplicate") and known and draw(st.integers(0, 3)):
        at = draw(st.sampled_from(known))  # mostly the fields the document has rules for
    else:
        at = draw(st.integers(0, max(0, len(node) - 1)))
    key_text = node[at][0] if node else b'""'
    key = key_of(key_text)
    if mutation == "drop" and node:
        del node[at]
    elif mutation == "replace" and node:
        near = KEY_VALUES.get(key) if isinstance(key, str) else None
        node[at] = (key_text, draw(near if near is not None and draw(st.integers(0, 3))
                                   else value_texts))
    elif mutation == "null" and node:
        node[at] = (key_text, b"null")
    elif mutation == "extra":
        node.insert(at, (draw(KEY_TEXTS), draw(value_texts)))
    elif mutation == "field":  # a field the document has rules for, set to a near miss
        name = draw(either(
            st.just("timestamp"), st.sampled_from(channel.required or ("symbol",)),
            st.sampled_from(sorted({*(a for aliases in channel.aliases.values() for a in aliases),
                                    *TYPE_KEYS, "event_id", "results", "value", "values"}))))
        pair = (encode(name), draw(KEY_VALUES.get(name, value_texts)))
        where = [i for i, (k, _) in enumerate(node) if key_of(k) == name]
        if where:
            node[where[-1]] = pair
        else:
            node.insert(at, pair)
    elif mutation == "duplicate" and node:
        node.insert(draw(st.integers(0, len(node))), (key_text, draw(
            KEY_VALUES.get(key, value_texts) if isinstance(key, str) else value_texts)))
    elif mutation == "rename" and node and isinstance(key, str):
        variant = draw(st.sampled_from(("upper", "capitalize", "space", "nul", "other",
                                        "wrapper")))
        if variant in ("other", "wrapper"):  # another name the document knows
            key = draw(st.sampled_from(sorted(WRAPPERS) if variant == "wrapper" else [
                a for c, aliases in channel.aliases.items() for a in (c, *aliases)] or ["symbol"]))
        else:
            key = {"upper": key.upper(), "capitalize": key.capitalize(), "space": key + " ",
                   "nul": key + "\u0000"}[variant]
        node[at] = (encode(key), node[at][1])
    elif mutation == "probe":
        node.insert(at, draw(st.sampled_from(((b'"test"', b'"ping"'),
                                              (b'"event_type"', b'"health_check"')))))


@st.composite
def hostile_producer_messages(draw: st.DrawFn) -> tuple[str, bytes]:
    """C{(Redis name, raw)}: anything a broken or hostile producer might publish."""
    name = draw(PRODUCER_NAMES)
    shape = draw(SHAPES)
    if shape == "value":
        return name, draw(value_texts)
    if shape == "bytes":
        return name, draw(st.binary(max_size=300))
    if shape == "probe":
        return name, draw(probe_texts)

    # A valid message of this name's channel (or, sometimes, another one's),
    # in any shape, mutated one field at a time at any level.
    channel = reference_channel(name)
    if channel is None or draw(st.integers(0, 4)) == 0:
        channel = CHANNELS[draw(st.sampled_from(CHANNEL_NAMES))]
    sent = draw(valid_events(channels=(channel.name,)))
    top = payload = to_node(sent.message)
    for part in sent.path.split(".") if sent.path else ():
        payload = next(v for k, v in payload if key_of(k) == part)
    for _ in range(draw(st.integers(0, 4))):
        node = payload if draw(st.integers(0, 2)) else draw(st.sampled_from(list(nodes(top))))
        mutate(draw, node, channel)
    raw = node_text(top, draw(st.sampled_from((b",", b", ", b" ,\n\t"))))
    if shape == "pad":
        # Grow the message to about DOC_MAX_BYTES, just under or just over.
        target = draw(st.integers(DOC_MAX_BYTES - 64, DOC_MAX_BYTES + 64))
        filler = max(0, target - len(raw) - len(b',"pad":""'))
        raw = raw[:-1] + (b"," if len(raw) > 2 else b"") + b'"pad":"' + b"x" * filler + b'"}'
    damage = draw(DAMAGE)
    if damage == "truncate" and raw:
        raw = raw[:draw(st.integers(0, len(raw) - 1))]
    elif damage == "flip" and raw:
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1:]
    elif damage == "insert":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at:]
    elif damage == "wrap":
        raw = draw(st.sampled_from((b" ", b"\n", b"\xef\xbb\xbf", b"\x00"))) + raw + draw(
            st.sampled_from((b"", b" ", b"\n", b"x", b"}", b"\x00")))
    return name, raw


# ---------------------------------------------------------------- the reference


def printable(text: str) -> bool:
    """No control, format, unassigned or separator character but the space."""
    return all(c == " " or unicodedata.category(c)[0] not in "CZ" for c in text)


def reference_channel(redis_name: str) -> Channel | None:
    """The channel of a Redis name: one of its names, or matching a pattern's C{*} (anything)."""
    for channel in CHANNELS.values():
        if redis_name in channel.redis:
            return channel
    for channel in CHANNELS.values():
        for pattern in channel.redis:
            if "*" in pattern and re.fullmatch(".*".join(map(re.escape, pattern.split("*"))),
                                               redis_name, re.DOTALL):
                return channel
    return None


def ref_number(value: Any) -> int | float | None:
    """A finite number, from a number or a numeric string."""
    if isinstance(value, str) and NUMERIC_TEXT.fullmatch(value.strip()):
        value = float(value.strip())
    if type(value) in (int, float) and math.isfinite(value):
        return value
    return None


Check = Callable[[Any], bool]
Rule = Callable[[Any], tuple[bool, Any, Check | None]]
"""A field rule: valid?, the value it becomes, and a check when the document fixes no value."""


def _symbol_rule(value: Any) -> tuple[bool, Any, Check | None]:
    # Upper-cased as ASCII: "ß" is no symbol, though Unicode would make it "SS".
    symbol = value.strip() if isinstance(value, str) else ""
    ok = symbol.isascii() and STRICT_SYMBOL.fullmatch(symbol.upper()) is not None
    return ok, symbol.upper(), None


def _number_rule(low: float, high: float = math.inf, above_low: bool = False,
                 percent: bool = False) -> Rule:
    def rule(value: Any) -> tuple[bool, Any, Check | None]:
        number = ref_number(value)
        if number is not None and percent and 1 < number <= 100:
            number = number / 100
        ok = number is not None and (low < number if above_low else low <= number) \
            and number <= high
        return ok, number, None
    return rule


def _text_rule(value: Any) -> tuple[bool, Any, Check | None]:
    return isinstance(value, str) and 1 <= len(value) <= DOC_MAX_TEXT, value, None


def _job_id_rule(value: Any) -> tuple[bool, Any, Check | None]:
    number = ref_number(value) if not isinstance(value, str) else None
    if number is None:
        return _text_rule(value)
    # "A number becomes a string": which string, the document does not say.
    if isinstance(number, int):
        return True, str(number), lambda v: isinstance(v, str) and re.fullmatch(
            r"-?[0-9]+", v) is not None and int(v) == number
    return True, str(number), lambda v: isinstance(v, str) and ref_number(v) == number


FIELD_RULES: dict[str, Rule] = {
    "symbol": _symbol_rule,
    "confidence": _number_rule(0, 1),
    "progress": _number_rule(0, 1, percent=True),
    "price": _number_rule(0, above_low=True),
    "volume": _number_rule(0),
    "job_id": _job_id_rule,
    **dict.fromkeys(("status", "service", "pattern", "indicator", "alert_type"), _text_rule),
}
"""docs/producers.md, step 8. (C{price} and C{volume} take numeric strings too, as
C{confidence} does: the document does not say, and TickStock is liberal.)"""
assert set(FIELD_RULES) == set(FIELD_VALUES)


def iso_seconds(text: str) -> float | None:
    """Epoch seconds of an ISO 8601 date-time (to the microsecond), or None."""
    match = ISO_8601.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    offset = timedelta(0)
    if zone and zone != "Z":
        digits = zone[1:].replace(":", "")
        hours, minutes = int(digits[:2]), int(digits[2:] or 0)
        if hours > 23 or minutes > 59:
            return None
        offset = timedelta(hours=hours, minutes=minutes) * (-1 if zone[0] == "-" else 1)
    try:
        moment = datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0),
                          int(second or 0), int((fraction or "0")[:6].ljust(6, "0")),
                          tzinfo=timezone(offset))
    except ValueError:
        return None
    return moment.timestamp()


def ref_timestamp(value: Any, now: float) -> tuple[bool, float, bool]:
    """Step 9: valid?, epoch seconds, whether the producer's value is kept as the original."""
    if value is None:
        return True, now, False
    number = ref_number(value)
    if number is not None:
        return number > 0, number / 1000 if number > DOC_MS_ABOVE else number, \
            isinstance(value, str) or number > DOC_MS_ABOVE
    seconds = iso_seconds(value) if isinstance(value, str) else None
    return seconds is not None, seconds or 0.0, True


@dataclass
class Accepted:
    """The event the document makes of a message; C{loose}: checks for values it leaves open."""

    channel: Channel
    type: str
    data: dict[str, Any]
    loose: dict[str, Check] = field(default_factory=dict)


Outcome = Accepted | str
"""An L{Accepted}, a refusal's kind, or C{"probe"}."""


def _type_word(source: dict[str, Any]) -> str | None:
    for name in TYPE_KEYS:
        value = source.get(name)
        if isinstance(value, str) and value:
            return value
    return None


def _unwrap(channel: Channel, message: dict[str, Any]) -> dict[str, Any]:
    for path in channel.unwrap:
        chain, node = [message], message
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
            chain.append(node)
        if isinstance(chain[-1], dict):
            merged: dict[str, Any] = {}
            for level, part in zip(chain, path.split("."), strict=False):
                merged.update({k: v for k, v in level.items() if k != part})
            merged.update(chain[-1])
            return merged
    return dict(message)


def reference_outcomes(redis_name: str, raw: bytes, now: float) -> list[Outcome]:
    """
    What docs/producers.md says becomes of C{raw} on C{redis_name}, step by
    step: usually one outcome. Where the document leaves a choice open (does
    the outer message's type word come before the payload's?), each reading.
    """
    channel = reference_channel(redis_name)
    if channel is None:
        return ["unknown_channel"]
    if len(raw) > DOC_MAX_BYTES:
        return ["oversized"]
    try:
        message = orjson.loads(raw)  # the JSON grammar itself is orjson's (RFC 8259)
    except orjson.JSONDecodeError:
        return ["not_json"]
    if not isinstance(message, dict):
        return ["not_object"]
    if depth_of(message) > DOC_MAX_DEPTH:
        return ["too_deep"]
    if message.get("event_type") == "health_check" or (
            isinstance(message.get("test"), str) and message.keys() <= PROBE_KEYS):
        return ["probe"]
    data = _unwrap(channel, message)
    if not channel.open_type:
        return [_normalized(channel, channel.event_type, dict(data), now)]
    outcomes: list[Outcome] = []
    for word in dict.fromkeys((_type_word(data), _type_word(message) or _type_word(data))):
        if word is None:
            outcomes.append(_normalized(channel, channel.event_type, dict(data), now))
        elif len(word) > DOC_MAX_TEXT or not printable(word) or (
                channel.event_types and word not in channel.event_types):
            outcomes.append("bad_event_type")
        else:
            outcomes.append(_normalized(channel, word, dict(data), now))
    return outcomes


def _normalized(channel: Channel, event_type: str, data: dict[str, Any], now: float) -> Outcome:
    """Steps 6 to 10, on the unwrapped fields."""
    for canonical, aliases in channel.aliases.items():
        present = [alias for alias in aliases if alias in data]
        if canonical not in data and present:
            data[canonical] = data[present[0]]
    for name, value in channel.defaults.items():
        data.setdefault(name, value)
    if any(data.get(name) is None for name in channel.required):
        return "missing_field"
    loose: dict[str, Check] = {}
    ruled = list(channel.required)
    if TOPICS[channel.topic].by_symbol and "symbol" not in ruled \
            and data.get("symbol") is not None:
        ruled.append("symbol")
    for name in ruled:
        ok, value, check = FIELD_RULES[name](data[name])
        if not ok:
            return "bad_field"
        data[name] = value
        if check is not None:
            loose[name] = check
    event_id = data.get("event_id")
    if event_id is not None and not (isinstance(event_id, str)
                                     and 1 <= len(event_id) <= DOC_MAX_EVENT_ID):
        return "bad_field"
    ok, seconds, keep = ref_timestamp(data.get("timestamp"), now)
    if not ok:
        return "bad_timestamp"
    if keep:
        data["timestamp_original"] = data["timestamp"]
        iso = ISO_8601.fullmatch(data["timestamp"]) if isinstance(data["timestamp"], str) else None
        if iso is not None and len(iso.group(7) or "") > 6:  # below a microsecond: either way
            loose["timestamp"] = lambda v: abs(v - seconds) < 1e-6
    data["timestamp"] = seconds
    if channel.topic == "health":
        word = data["status"]
        if word not in HEALTH_STATES:
            data["status_original"] = word
            data["status"] = HEALTH_WORDS.get(word)
            if data["status"] is None:
                loose["status"] = lambda v: v in HEALTH_STATES
    if channel.event_type == "backtest_result":
        if "completed_at" not in data:
            data["completed_at"] = seconds
            if "timestamp" in loose:
                loose["completed_at"] = loose["timestamp"]
        if data["status"] == "completed":
            figures = data.get("results")
            if not isinstance(figures, dict) or any(n not in figures for n in RESULT_FIGURES):
                return "missing_field"
            numbers = {n: ref_number(figures[n]) for n in RESULT_FIGURES}
            if None in numbers.values():
                return "bad_field"
            data["results"] = {**figures, **numbers}
    if channel.topic == "indicators" and data.get("value") is None \
            and not isinstance(data.get("values"), dict):
        return "missing_field"
    return Accepted(channel, event_type, data, loose)


def differences(event: Event, expected: Accepted, event_id: str, now: float) -> list[str]:
    """How C{event} differs from the one the document makes (nothing: the same)."""
    channel, topic = expected.channel, TOPICS[expected.channel.topic]
    problems = []
    described = (event.id, event.channel, event.topic, event.type, event.received_at, event.user)
    if described != (event_id, channel.name, channel.topic, expected.type, now, None):
        problems.append(f"described as {described}, not as {channel.name} {expected.type!r}")
    if event.data.keys() != expected.data.keys():
        problems.append(f"fields {sorted(event.data.keys() ^ expected.data.keys())} differ")
    for name, value in expected.data.items():
        check = expected.loose.get(name)
        if name in event.data and not (check(event.data[name]) if check is not None
                                       else same(event.data[name], value)):
            problems.append(f"{name} is {shown(event.data[name])}, not {shown(value)}")
    if event.symbol != (event.data.get("symbol") if topic.by_symbol else None):
        problems.append(f"symbol {event.symbol!r}")
    if event.job_id != (event.data.get("job_id") if topic.targeted else None):
        problems.append(f"job_id {event.job_id!r}")
    latest = (channel.topic, *(event.data.get(f) for f in channel.latest_by)) \
        if channel.latest_by else None
    if event.latest != latest:
        problems.append(f"latest {event.latest!r}, not {latest!r}")
    return problems


def assert_canonical(event: Event) -> None:
    """What every event TickStock makes has, whatever it came from ("strict in what it emits")."""
    timestamp = event.data.get("timestamp")
    assert type(timestamp) in (int, float) and math.isfinite(timestamp), timestamp
    if TOPICS[event.topic].by_symbol and event.data.get("symbol") is not None:
        assert STRICT_SYMBOL.fullmatch(event.data["symbol"]), event.data["symbol"]
    if event.topic == "health":
        assert event.data["status"] in HEALTH_STATES, event.data["status"]
    assert isinstance(event.type, str) and event.type, event.type
    for value in walk(event.data):
        if isinstance(value, float):
            assert math.isfinite(value), value


def check_against_reference(redis_name: str, raw: bytes, event_id: str) -> Event | None:
    """
    Parse C{raw} as the daemon does and hold the outcome to the reference's:
    the event it describes, or a refusal of the kind it names (never any
    other exception). The event, if accepted.
    """
    outcomes = reference_outcomes(redis_name, raw, NOW)
    try:
        with production_stack():
            event = parse_event(redis_name, raw, event_id, NOW)
    except Probe:
        assert "probe" in outcomes, f"taken for a probe; the document says {outcomes}"
        return None
    except MalformedEvent as error:
        assert isinstance(error.kind, str) and re.fullmatch(r"[a-z_]+", error.kind), error.kind
        assert str(error), "a refusal says what was wrong"
        assert error.kind in outcomes, (error.kind, str(error)[:200], outcomes)
        return None
    accepted = [outcome for outcome in outcomes if isinstance(outcome, Accepted)]
    assert accepted, f"accepted, but the document refuses it: {outcomes}"
    problems = [differences(event, expected, event_id, NOW) for expected in accepted]
    assert not all(problems), problems
    assert_canonical(event)
    return event


# ---------------------------------------------------------------- the properties


DEEP_REQUIRED = b'{"symbol":' + nested_text(1000, "list") + b"}"
NORMALIZED = frozenset(FIELD_RULES) | {"timestamp", "results"}
"""The fields whose value the document may change; every other one is passed on as sent."""


PATTERN = {"symbol": "AAPL", "pattern": "Doji", "confidence": 0.5}
TICK = {"symbol": "AAPL", "price": 1.5, "volume": 10}
RESULT = {"win_rate": 0.5, "roi": 0.1, "sharpe_ratio": 1.2, "max_drawdown": 0.2}
NEAR_MISSES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("tickstock.events.patterns", {**PATTERN, "confidence": 1.5}),
    ("tickstock.events.patterns", {**PATTERN, "confidence": " 0.25 "}),
    ("tickstock.events.patterns", {**PATTERN, "confidence": True}),
    ("tickstock.events.patterns", {**PATTERN, "pattern": ""}),
    ("tickstock:patterns:detected", {"ticker": " brk.b ", "name": "Doji", "confidence": "1"}),
    ("tickstock:patterns:streaming", {"sym": 5, "ticker": "aapl", "name": 5, "pattern_type": "Doji",
                                      "confidence": 0}),
    ("tickstock.events.patterns", {**PATTERN, "symbol": "AAPL$"}),
    ("tickstock.events.patterns", {**PATTERN, "symbol": "ß"}),
    ("tickstock.events.patterns", {"timestamp": "x", "data": {"data": {
        **PATTERN, "timestamp": "2024-05-01T09:30:00-04:00"}, "flow_id": "f"}}),
    ("tickstock.events.patterns", {**PATTERN, "event_id": "e" * 65}),
    ("tickstock.events.patterns", {**PATTERN, "timestamp": "2024-01-01T00:00:00.1234567Z"}),
    ("tickstock.events.market_state", {"symbol": "bad symbol"}),
    ("tickstock.events.market_state", {"event_type": "\u0000", "symbol": "AAPL"}),
    ("tickstock.events.market_state", {"event_type": "t" * 257}),
    ("tickstock.events.market_state", {"event_type": 5, "type": "stage_change"}),
    ("tickstock.events.market_state", {"type": "outer", "data": {"event_type": "inner"}}),
    ("tickstock.events.backtesting.progress", {"job_id": 7, "progress": 50}),
    ("tickstock.events.backtesting.progress", {"job_id": "j", "progress": 100.5}),
    ("tickstock.events.backtesting.progress", {"job_id": "j", "progress": 100, "status": "x"}),
    ("tickstock.events.backtesting.progress", {"job_id": "", "progress": 0.5}),
    ("tickstock.events.backtesting.results", {"job_id": "j"}),
    ("tickstock.events.backtesting.results", {"job_id": "j", "results": {**RESULT, "roi": "x"}}),
    ("tickstock.events.backtesting.results", {"job_id": "j", "results": {**RESULT, "roi": "1e-2"},
                                              "completed_at": None}),
    ("tickstock.health.status", {"component": "db", "status": " OK "}),
    ("tickstock:streaming:health", {"service": "db", "status": 5}),
    ("tickstock:streaming:session_started", {}),
    ("tickstock:streaming:session_stopped", {"payload": {"source": "ws", "status": "stopped"}}),
    ("tickstock.ticks.AAPL", {**TICK, "price": 0}),
    ("tickstock.all_ticks", {**TICK, "volume": -1}),
    ("tickstock:market:ticks", {**TICK, "price": "abc", "volume": "12"}),
    ("tickstock.ticks.", {"data": {"sym": "msft", "price": "2.5", "volume": 0,
                                   "timestamp": 1_700_000_000_000}}),
    ("tickstock:indicators:streaming", {"symbol": "AAPL", "indicator": "RSI", "values": []}),
    ("tickstock:indicators:streaming", {"calculation": {"symbol": "AAPL", "indicator_type": "RSI",
                                                        "value": 55.5}}),
    ("tickstock:alerts:critical", {"alert": {"symbol": "AAPL", "type_of_alert": "rsi_high"}}),
    ("tickstock:alerts:indicators", {"symbol": "AAPL", "alert_type": ""}),
    ("tickstock:universe:updated", {"event_type": "universe_updated", "payload": {"n": 1}}),
    ("tickstock.cache.sync_complete", {"timestamp": "2024-02-30"}),
    ("tickstock.cache.ipo_assignment", {"timestamp": -5}),
    ("tickstock.etf.correlation_update", {"test": "ping", "source": "x"}),
    ("tickstock.events.patterns", {"test": "ping", "symbol": "AAPL"}),
    ("tickstock.data.ticks", {"event_type": "health_check", "data": {}}),
    ("tickstock.db.events", PATTERN),
)
"""One message per rule of docs/producers.md, so every rule is compared on every run."""


def near_misses(test: Callable[..., None]) -> Callable[..., None]:
    for redis_name, message in NEAR_MISSES:
        test = example(message=(redis_name, orjson.dumps(message)), event_id="1-0")(test)
    return test


def flat(redis_name: str, message: dict[str, Any]) -> Sent:
    """A flat message as a pinned example."""
    channel = reference_channel(redis_name)
    assert channel is not None, redis_name
    return Sent(redis_name, channel, message, orjson.loads(encode(message)))


@settings(FUZZ, max_examples=EVENT_HOSTILE_CASES)
@given(message=hostile_producer_messages(), event_id=texts(1, 24))
@near_misses
@example(message=("tickstock.events.patterns", DEEP_REQUIRED), event_id="1-0")
@example(message=("tickstock.events.patterns", b'{"event_type":' + nested_text(1000, "list")
                  + b"}"), event_id="1-0")
@example(message=("tickstock.events.patterns", b'{"symbol":"AAPL","pattern":"Doji",'
                  b'"confidence":0.5,"event_id":5,"timestamp":"soon"}'), event_id="1-0")
@example(message=("tickstock.events.patterns", '{"symbol":"\u00a0aapl","pattern":"Doji",'
                  '"confidence":0.5}'.encode()), event_id="1-0")
def test_parse_event_accepts_or_refuses_only_as_the_document_says(
        message: tuple[str, bytes], event_id: str) -> None:
    """
    Any message on any Redis name: the event docs/producers.md makes of it,
    a probe, or a MalformedEvent of the kind it names; never any other
    exception. (Pinned: an C{event_id} is checked at step 8, before the
    timestamp: it is refused as C{bad_field}; a symbol is trimmed of any
    blank, a no-break space too, before it is upper-cased.)
    """
    check_against_reference(*message, event_id)


@settings(FUZZ, max_examples=EVENT_VALID_CASES)
@given(sent=valid_events())
@example(sent=flat("tickstock.events.backtesting.results",
                   {"job_id": "j1", "status": "failed", "results": {"error": "no bars"}}))
def test_valid_events_are_accepted_with_every_field(sent: Sent) -> None:
    """
    A valid message of any channel, in any shape, is accepted: every field
    the producer sent (unwrapped) is in the event, as sent unless the
    document normalizes it, and the canonical fields are as it says.
    (Pinned: a result whose job did not complete needs no figures.)
    """
    raw = sent.raw
    assert len(raw) <= DOC_MAX_BYTES
    outcomes = reference_outcomes(sent.redis_name, raw, NOW)
    assert all(isinstance(o, Accepted) for o in outcomes), f"not a valid message: {outcomes}"
    event = check_against_reference(sent.redis_name, raw, "1700000000000-0")
    assert event is not None
    for name, value in sent.fields.items():
        assert name in event.data, f"{name} was dropped"
        if name not in NORMALIZED:
            assert same(event.data[name], value), (name, shown(event.data[name]), shown(value))


@settings(FUZZ, max_examples=EVENT_VALID_CASES)
@given(sent=valid_events(max_depth=1023), sub_id=texts(1, 64))
@example(sent=flat("tickstock.events.patterns",
                   {"symbol": "AAPL", "pattern": "Doji", "confidence": 0.5, "timestamp": 1,
                    "x": Raw(nested_text(PINNED_DEPTH - 1, "list"))}), sub_id="s")
@example(sent=flat("tickstock.events.patterns",
                   {"symbol": "AAPL", "pattern": "Doji", "confidence": 0.5, "timestamp": 1,
                    "x": Raw(nested_text(300, "list"))}), sub_id="s")
def test_event_frames_round_trip(sent: Sent, sub_id: str) -> None:
    """
    The wire frame of an accepted event is JSON carrying the event exactly.
    (A message nested deeper than L{PINNED_DEPTH} is refused instead.)
    """
    raw = sent.raw
    with production_stack():
        try:
            event = parse_event(sent.redis_name, raw, "1700000000000-7", NOW)
        except MalformedEvent as error:
            assert error.kind == "too_deep" and depth_of(orjson.loads(raw)) > PINNED_DEPTH, (
                f"a valid message was refused: {error.kind}: {error}")
            return
        frame = orjson.loads(event.frame(sub_id))
    assert depth_of(orjson.loads(raw)) <= PINNED_DEPTH, "a message too deep was accepted"
    assert list(frame) == ["op", "sub", "id", "type", "data"]
    assert (frame["op"], frame["sub"], frame["id"], frame["type"]) == (
        "event", sub_id, "1700000000000-7", event.type)
    assert same(frame["data"], event.data)
    assert all(same(frame["data"][name], value) for name, value in sent.fields.items()
               if name not in NORMALIZED)
    # The encoded tail is shared by every subscription: another one's frame differs only in sub.
    other = orjson.loads(event.frame(sub_id + "2"))
    assert other["sub"] == sub_id + "2" and same(other["data"], event.data)


# ================================================================ 2. the gateway

OPS = ["hello", "subscribe", "unsubscribe", "submit_backtest", "cancel_job", "ping"]
SUCCESS = {"hello": {"welcome"}, "subscribe": {"subscribed"}, "unsubscribe": {"unsubscribed"},
           "submit_backtest": {"job_accepted"}, "cancel_job": {"job_cancelled"},
           "ping": {"pong"}}
MAX_SUBSCRIPTIONS = 3
SLOTS = 3
SYMBOL_POOL = ["AAPL", "MSFT", "QQQ", "BRK.B"]
PATTERN_NAMES = ["Doji", "Hammer", "Engulfing"]
UNIVERSES = {"tech": {"type": "stock_universe", "symbols": ["AAPL", "MSFT"]},
             "etf": {"type": "etf_universe", "symbols": ["QQQ"]}}
USERS = ["alice", "bob", "carol"]
SUB_IDS = ["a", "b", "c", "d", "e"]
USER_NAME = re.compile(r"[A-Za-z0-9_.@\-]{1,64}")
FILTER_FIELDS = ["symbols", "universe", "patterns", "min_confidence"]


@dataclass(frozen=True)
class Token:
    """A placeholder for a JWT, made when the message is sent (tokens depend on real time)."""

    kind: str
    user: str = "alice"
    ttl: int = 3600
    claims: tuple[tuple[str, Any], ...] = ()
    text: str = ""


@dataclass(frozen=True)
class Ref:
    """A placeholder for something known only while running: a job id, an event id."""

    what: str


class GatewayWorld:
    """
    A gateway over real parts (broadcaster, memory history, router, jobs,
    universes, memory store) on a Clock; connections are C{RecordingClient}
    fakes behind L{IClient}.
    """

    def __init__(self, auth: str = "anonymous", rate: bool = False, per_user: int = 0) -> None:
        self.clock = Clock()
        # JWT expiry is checked against real time by PyJWT, and against the
        # clock by the gateway's expiry timer: let them agree.
        self.clock.advance(time.time() if auth == "jwt" else NOW)
        self.authenticator = JWTAuthenticator(TEST_SECRET) if auth == "jwt" else None
        self.broadcaster = Broadcaster(lambda frame: frame)
        self.history = MemoryHistory(self.clock, 5, 3600, 5)  # tiny: resumes fall into gaps
        self.history.listen(self.broadcaster.deliver)
        self.bus = MemoryBus()
        self.router = Router(self.clock, self.history, self.bus)
        self.store = MemoryStore(self.clock, universes=UNIVERSES)
        self.jobs = Jobs(self.clock, self.store, self.history, self.bus, self.router.receive,
                         per_user=2, timeout=300.0, patterns=PATTERN_NAMES)
        self.gateway = Gateway(
            self.clock, self.broadcaster, self.history, self.authenticator or anonymous,
            MAX_SUBSCRIPTIONS, hello_timeout=10.0,
            universes=Universes(self.store, self.broadcaster), store=self.store, catchup_max=20,
            jobs=self.jobs, rate=RateLimit(self.clock, 2, 5) if rate else None,
            max_per_user=per_user,
        )
        self.slots: list[RecordingClient] = [self.connect() for _ in range(SLOTS)]
        self.every_client: list[RecordingClient] = list(self.slots)
        self.confirmed: dict[RecordingClient, set[str]] = {}
        self.job_ids: list[str] = []
        self.event_ids: list[str] = []

    def connect(self) -> RecordingClient:
        client = RecordingClient()
        self.gateway.opened(client)
        return client

    # -- placeholders

    def resolve(self, value: Any) -> Any:
        if isinstance(value, Ref):
            pool = self.job_ids if value.what == "job" else self.event_ids
            return pool[-1] if pool else ("0-0" if value.what == "event" else str(uuid.UUID(int=0)))
        if isinstance(value, Token):
            return self.token(value)
        return value

    def token(self, spec: Token) -> Any:
        now = int(time.time())
        if spec.kind == "text":
            return spec.text
        if spec.kind == "valid":
            if self.authenticator is None:  # auth off: a token is taken as a user name
                return spec.user
            return self.authenticator.mint(spec.user, now, spec.ttl)
        if spec.kind == "expired":
            return jwt.encode({"sub": spec.user, "exp": now - 10}, TEST_SECRET, algorithm="HS256")
        if spec.kind == "wrong_secret":
            return jwt.encode({"sub": spec.user, "exp": now + 60}, b"x" * 40, algorithm="HS256")
        if spec.kind == "hs512":
            return jwt.encode({"sub": spec.user, "exp": now + 60}, TEST_SECRET, algorithm="HS512")
        if spec.kind == "claims":  # forged with the real secret: any claims at all
            claims = {k: (now + v[1] if isinstance(v, tuple) else v) for k, v in spec.claims}
            return signed(b'{"alg":"HS256","typ":"JWT"}', json.dumps(claims).encode())
        if spec.kind == "segments":
            return spec.text
        raise AssertionError(spec.kind)

    # -- steps

    def send(self, slot: int, message: Any) -> None:
        """One request from slot C{slot}'s client, and what must follow."""
        client = self.slots[slot]
        payload = message if isinstance(message, bytes) else encode(message, self.resolve)
        expected_id, op = request_id_and_op(payload)
        before = len(client.replies)
        was_open = client in self.gateway.connections and client.closed is None
        self.gateway.receive(client, payload)
        new = client.replies[before:]
        if not was_open:
            assert new == [], "a closed connection is not answered"
            return
        if not new:
            assert client.closed is not None and client.closed[0] == CLOSE_POLICY, (
                "every request is answered, unless the connection is closed with 1008")
            assert client not in self.gateway.connections
            return
        assert len(new) == 1, f"one request, one reply: {new}"
        reply = new[0]
        orjson.dumps(reply)  # the real connection sends it as JSON
        assert reply.get("id") == expected_id, (reply, expected_id)
        if reply.get("op") == "error":
            assert isinstance(reply.get("code"), str) and reply["code"], reply
            assert isinstance(reply.get("message"), str), reply
            assert reply["code"] != "internal", \
                f"a client request caused an internal error: {reply}"
            if client.closed is not None:
                assert reply["code"] in ("unauthorized", "too_many_connections"), reply
        else:
            assert op in SUCCESS and reply["op"] in SUCCESS[op], (op, reply)
            assert client.closed is None
        state = self.gateway.connections.get(client)
        if reply.get("op") == "welcome":
            assert isinstance(client.user, str) and USER_NAME.fullmatch(client.user), client.user
        elif reply.get("op") == "subscribed":
            assert state is not None and reply["id"] in state.subscriptions
            self.confirmed.setdefault(client, set()).add(reply["id"])
        elif reply.get("op") == "unsubscribed":
            assert state is not None and reply["id"] not in state.subscriptions
        elif reply.get("op") == "job_accepted":
            self.job_ids.append(reply["job_id"])

    def publish(self, channel: str, message: dict[str, Any]) -> None:
        """A producer message, through the router and history to live delivery."""
        d = self.router.receive(channel, encode(message, self.resolve))
        d.addCallback(lambda event_id: self.event_ids.append(event_id)
                      if isinstance(event_id, str) else None)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def disconnect(self, slot: int) -> None:
        self.gateway.closed(self.slots[slot])
        self.slots[slot] = self.connect()
        self.every_client.append(self.slots[slot])

    def settle(self) -> None:
        """What the transport does on a close: tell the gateway, and reconnect that slot."""
        for slot, client in enumerate(self.slots):
            if client.closed is not None:
                assert client.closed[0] == CLOSE_POLICY, client.closed
                self.gateway.closed(client)
                self.slots[slot] = self.connect()
                self.every_client.append(self.slots[slot])

    def check(self) -> None:
        """What holds after every step."""
        total = 0
        for conn, state in self.gateway.connections.items():
            assert len(state.subscriptions) + len(state.resolving) <= MAX_SUBSCRIPTIONS
            assert all(sub.client is conn for sub in state.subscriptions.values())
            total += len(state.subscriptions)
        assert self.broadcaster.subscriptions == total, "the index agrees with the gateway"
        assert all(n >= 0 for n in self.broadcaster.by_topic.values())

    def check_frames(self) -> None:
        """Every frame sent is a JSON event of a subscription the client was confirmed."""
        for client in self.every_client:
            for frame in client.sent:
                message = orjson.loads(frame)
                assert message["op"] == "event" and isinstance(message["data"], dict), message
                assert message["sub"] in self.confirmed.get(client, set()), message

    def probe(self) -> None:
        """A well-formed client still subscribes and receives a delivered event."""
        client = self.connect()
        hello: dict[str, Any] = {"op": "hello", "id": "hi"}
        if self.authenticator is not None:
            hello["token"] = self.authenticator.mint("prober", time.time(), 3600)
        else:
            hello["user"] = "prober"
        self.gateway.receive(client, orjson.dumps(hello))
        assert client.replies[-1]["op"] == "welcome", client.replies
        self.gateway.receive(client, orjson.dumps(
            {"op": "subscribe", "id": "probe", "topic": "patterns",
             "filter": {"symbols": ["PRB"], "min_confidence": 0.5}}))
        assert client.replies[-1] == {"op": "subscribed", "id": "probe"}, client.replies
        data = {"symbol": "PRB", "pattern": "Doji", "confidence": 0.75, "timestamp": 1.5,
                "note": "probe"}
        d = self.router.receive("tickstock.events.patterns", orjson.dumps(data))
        stored: list[Any] = []
        d.addCallback(stored.append)
        assert isinstance(stored[0], str), f"the probe event was not stored: {stored}"
        assert len(client.sent) == 1, client.sent
        assert orjson.loads(client.sent[0]) == {"op": "event", "sub": "probe", "id": stored[0],
                                                "type": "pattern_detected", "data": data}


def request_id_and_op(payload: bytes) -> tuple[str | None, Any]:
    """The id a reply must echo (a valid string id, else None), and the op asked for."""
    try:
        message = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(message, dict):
        return None, None
    rid = message.get("id")
    valid = isinstance(rid, str) and 1 <= len(rid) <= 64
    return (rid if valid else None), message.get("op")


# ---------------------------------------------------------------- message strategies

hostile_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                            texts(0, 70), st.sampled_from(INJECTIONS))
hostile_values = st.one_of(
    hostile_scalars, st.lists(hostile_scalars, max_size=3),
    st.dictionaries(texts(0, 8), hostile_scalars, max_size=3),
    st.builds(Raw, st.one_of(deep_texts, st.sampled_from(SPECIAL_TOKENS))),
)
ids = st.one_of(st.sampled_from(SUB_IDS), st.sampled_from(SUB_IDS), st.none(), texts(0, 70),
                st.sampled_from(["", "x" * 64, "x" * 65, "\u0000", "🙂" * 64]), hostile_values)
ops = st.one_of(st.sampled_from(OPS), st.sampled_from(OPS), st.sampled_from(OPS),
                st.sampled_from(["HELLO", "Subscribe", " ping", "ping\u0000", "event", "error",
                                 "__class__", "_hello", "get"]),
                hostile_values)
topics = st.one_of(st.sampled_from(TOPIC_NAMES), st.sampled_from(TOPIC_NAMES),
                   st.sampled_from(["Patterns", "patterns ", "all", "*", ""]), hostile_values)


VALID_FILTERS = st.fixed_dictionaries({}, optional={
    "symbols": st.lists(st.one_of(st.sampled_from(tuple(SYMBOL_POOL)), symbols),
                        min_size=1, max_size=5),
    "patterns": st.lists(st.sampled_from(tuple(PATTERN_NAMES)), min_size=1, max_size=3),
    "min_confidence": units,
    "universe": st.sampled_from(("tech", "etf", "nope", "a" * 64)),
})
WRONG_FILTERS = st.dictionaries(
    st.one_of(st.sampled_from(tuple(FILTER_FIELDS)), texts(0, 10)),
    st.one_of(hostile_values, st.just(["AAPL"] * 1000), st.just(["AAPL"] * 1001),
              st.just(["Doji"] * 101), st.sampled_from((-0.1, 1.5, 1e308, -0.0, 2**64)),
              st.lists(hostile_values, min_size=1, max_size=3)),
    max_size=4)
filters = st.one_of(st.none(), VALID_FILTERS, VALID_FILTERS, VALID_FILTERS, WRONG_FILTERS,
                    hostile_values)
"""Valid filters of every topic, filters with wrong fields and values, and non-filters."""

valid_params = st.fixed_dictionaries(
    {"symbols": st.lists(symbols, min_size=1, max_size=5, unique=True),
     "start_date": st.sampled_from(("2024-01-01", "2023-02-28")),
     "end_date": st.sampled_from(("2024-06-30", "2024-02-29"))},
    optional={"patterns": st.lists(st.sampled_from(tuple(PATTERN_NAMES)), max_size=3,
                                   unique=True)},
)
PARAM_FIELDS = st.sampled_from(("symbols", "start_date", "end_date", "patterns", "extra",
                                "SYMBOLS"))
BROKEN_PARAM_VALUES = st.one_of(
    hostile_values, st.lists(hostile_values, min_size=1, max_size=3),
    st.sampled_from(("2024-02-30", "2024-1-01", "0000-01-01", "9999-12-31", "2024-01-01T00:00",
                     "２０２４-01-01", "1990-01-01")),
    st.just(["AAPL"] * 51), st.just(["AAPL", "AAPL"]), st.just(["Doji", "Doji"]))


def _broken(params: dict[str, Any], changes: list[tuple[str, Any]]) -> dict[str, Any]:
    return {**params, **dict(changes)}


job_params = st.one_of(
    valid_params, hostile_values,
    st.builds(_broken, valid_params, st.lists(st.tuples(PARAM_FIELDS, BROKEN_PARAM_VALUES),
                                              min_size=1, max_size=3)),
    st.builds(_broken, valid_params, st.lists(st.tuples(PARAM_FIELDS, BROKEN_PARAM_VALUES),
                                              min_size=1, max_size=3)),
)
"""Backtest params: valid, valid with fields broken, or anything at all."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(header: bytes, payload: bytes) -> str:
    """A JWT of these exact header and payload bytes, with a valid HS256 signature."""
    head = f"{_b64(header)}.{_b64(payload)}"
    return f"{head}.{_b64(hmac.new(TEST_SECRET, head.encode(), hashlib.sha256).digest())}"


def _segments(header: bytes, payload: bytes, signature: bytes | None) -> Token:
    """A token of arbitrary segments: signed with the real secret, or not."""
    if signature is None:
        return Token("segments", text=signed(header, payload))
    return Token("segments", text=".".join(_b64(p) for p in (header, payload, signature)))


def _claims(claims: dict[str, Any]) -> Token:
    return Token("claims", claims=tuple(claims.items()))


tokens = st.one_of(
    st.builds(Token, st.sampled_from(("valid", "valid", "valid", "expired", "wrong_secret",
                                      "hs512")),
              st.sampled_from(tuple(USERS)), st.integers(1, 7200)),
    hostile_values,
    st.builds(lambda text: Token("text", text=text),
              st.one_of(texts(0, 40), st.just("x" * 4097), st.sampled_from(tuple(INJECTIONS)))),
    st.builds(
        _segments,
        st.one_of(st.builds(orjson.dumps, json_values), st.just(b'{"alg":"none"}'),
                  st.builds(lambda v: orjson.dumps({"alg": "HS256", "typ": "JWT", **v}),
                            st.dictionaries(st.sampled_from(("alg", "kid", "crit", "b64", "typ",
                                                             "jku")),
                                            json_values, max_size=2))),
        st.one_of(st.builds(orjson.dumps, json_values),
                  st.builds(lambda claims: json.dumps(claims).encode(), st.fixed_dictionaries(
                      {"sub": st.sampled_from(tuple(USERS)), "exp": st.integers()}))),
        st.one_of(st.none(), st.binary(max_size=40))),
    st.builds(_claims, st.fixed_dictionaries({}, optional={
        "sub": st.one_of(st.sampled_from(tuple(USERS)), hostile_scalars),
        "exp": st.one_of(st.tuples(st.just("in"), st.integers(-100, 100_000)),
                         st.integers(), st.integers(10**18, 10**400), st.floats(),
                         texts(0, 12), st.none(), st.booleans()),
        "iat": st.one_of(st.tuples(st.just("in"), st.integers(-100, 100)), hostile_scalars),
        "nbf": st.one_of(st.tuples(st.just("in"), st.integers(-100, 100)), hostile_scalars),
        "aud": hostile_scalars, "iss": hostile_scalars,
    })),
)
"""What a hello may carry as C{token}: valid JWTs, bad ones, forged ones, and non-tokens."""


resume_ids = st.one_of(
    st.builds(Ref, st.just("event")), st.just("0-0"), st.just("1700000000000-0"),
    st.sampled_from(("1-", "-1", "1-0 ", " 1-0", "١-٢", "²-1", "9" * 5000 + "-0",
                     "99999999999999999999999-0", "1-99999999999", "1700000000000")),
    hostile_values,
)
HELLO_USERS = st.one_of(st.sampled_from(tuple(USERS)), hostile_values, st.just("u" * 65))
RESUMES = st.one_of(st.fixed_dictionaries({"last_id": resume_ids}), hostile_values)
JOB_REFS = st.one_of(st.builds(Ref, st.just("job")), st.builds(Ref, st.just("job")),
                     hostile_values, st.just("j" * 65))
EXTRA_FIELDS = st.dictionaries(texts(0, 10), hostile_values, max_size=2)
RAW_PAYLOADS = st.one_of(st.binary(max_size=60), value_texts)
OP_NAMES = st.sampled_from(tuple(OPS))


DANGER_DEPTHS = st.one_of(st.integers(940, 1023), st.sampled_from((254, 255, 1000, 1023)))
poisons = st.one_of(
    st.builds(Raw, st.builds(nested_text, DANGER_DEPTHS,
                             st.sampled_from(("list", "dict", "mixed")), st.just(b'"x"'))),
    st.lists(st.lists(st.integers(0, 9), max_size=2), min_size=1, max_size=2),
    st.lists(st.dictionaries(texts(0, 3), st.integers(0, 9), max_size=2), min_size=1, max_size=2),
    st.builds(Raw, st.sampled_from((b"1" + b"0" * 400, b"-1" + b"0" * 30, b"1e308", b"5e-324",
                                    b"18446744073709551616", b'"\\u0000"'))),
)
"""Values that have broken parsers: nesting near the limits, unhashable members, huge numbers."""

forged_tokens = st.builds(_claims, st.fixed_dictionaries({
    "sub": st.sampled_from(tuple(USERS)),
    "exp": st.one_of(st.integers(10**300, 10**400), st.tuples(st.just("in"), st.integers(1, 99)),
                     st.sampled_from((2**63, 2**64, 10**18, -1, 0)), st.floats())}))
"""Tokens signed with the real secret (a leaked key, or a buggy issuer) and odd expiries."""

POISON_BASES: dict[str, tuple[dict[str, Any], tuple[tuple[Any, ...], ...]]] = {
    "hello": ({"op": "hello", "id": "p", "user": "alice", "token": Token("valid")},
              (("user",), ("token",), ("resume",), ("resume", "last_id"))),
    "subscribe": ({"op": "subscribe", "id": "p", "topic": "patterns",
                   "filter": {"symbols": ["AAPL"], "patterns": ["Doji"]}},
                  (("topic",), ("filter",), ("filter", "symbols"), ("filter", "symbols", 0),
                   ("filter", "patterns"), ("filter", "patterns", 0), ("filter", "min_confidence"),
                   ("filter", "universe"), ("filter", "zzz"))),
    "submit_backtest": ({"op": "submit_backtest", "id": "p", "params": {
        "symbols": ["AAPL"], "start_date": "2024-01-01", "end_date": "2024-02-01",
        "patterns": ["Doji"]}},
        (("params",), ("params", "symbols"), ("params", "symbols", 0), ("params", "start_date"),
         ("params", "end_date"), ("params", "patterns"), ("params", "patterns", 0),
         ("params", "zzz"))),
    "cancel_job": ({"op": "cancel_job", "id": "p", "job_id": Ref("job")}, (("job_id",),)),
    "ping": ({"op": "ping", "id": "p"}, (("op",), ("id",), ("zzz",))),
}


def poisoned(base: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """
    A copy of C{base} with the value at C{path} (keys, or 0 for a list's
    first item; missing objects are made) replaced by C{value}.
    """
    message = copy.deepcopy(base)
    node: Any = message
    for key in path[:-1]:
        if isinstance(node, dict) and key not in node:
            node[key] = {}
        node = node[key]
    node[path[-1]] = value
    return message


@st.composite
def poisoned_messages(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed request with one field replaced by a poison (or a forged token)."""
    op = draw(st.sampled_from(tuple(POISON_BASES)))
    base, paths = POISON_BASES[op]
    path = draw(st.sampled_from(paths))
    value = draw(st.one_of(poisons, forged_tokens) if path == ("token",) else poisons)
    return poisoned(base, path, value)


@st.composite
def client_messages(draw: st.DrawFn) -> Any:
    """One request: well formed or not, of a real op or not, with any fields."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(RAW_PAYLOADS)
    if kind == 1:
        return draw(poisoned_messages())
    op = draw(ops)
    message: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        message["op"] = op
    if draw(st.integers(0, 5)):
        message["id"] = draw(ids)
    relevant = op if isinstance(op, str) and op in OPS else draw(OP_NAMES)
    if relevant == "hello":
        if draw(st.booleans()):
            message["user"] = draw(HELLO_USERS)
        if draw(st.booleans()):
            message["token"] = draw(tokens)
        if draw(st.integers(0, 3)) == 0:
            message["resume"] = draw(RESUMES)
    elif relevant == "subscribe":
        if draw(st.integers(0, 7)):
            message["topic"] = draw(topics)
        if draw(st.booleans()):
            message["filter"] = draw(filters)
    elif relevant == "submit_backtest":
        if draw(st.integers(0, 7)):
            message["params"] = draw(job_params)
    elif relevant == "cancel_job":
        if draw(st.integers(0, 7)):
            message["job_id"] = draw(JOB_REFS)
    if draw(st.integers(0, 4)) == 0:
        message.update(draw(EXTRA_FIELDS))
    return message


@st.composite
def hellos(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed hello (a valid token or user name), sometimes resuming."""
    message: dict[str, Any] = {"op": "hello", "id": draw(st.sampled_from(SUB_IDS)),
                               "user": draw(st.sampled_from(USERS)),
                               "token": Token("valid", user=draw(st.sampled_from(USERS)),
                                              ttl=draw(st.sampled_from([5, 60, 3600])))}
    if draw(st.integers(0, 3)) == 0:
        message["resume"] = {"last_id": draw(st.sampled_from([Ref("event"), "0-0"]))}
    return message


SUBSCRIBED_TOPICS = st.sampled_from(("patterns",) * 3 + ("market_state", "ticks") * 2
                                    + TOPIC_NAMES)


@st.composite
def subscribes(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed subscribe, mostly to the topics most events go to."""
    topic = draw(SUBSCRIBED_TOPICS)
    message: dict[str, Any] = {"op": "subscribe", "id": draw(st.sampled_from(SUB_IDS)),
                               "topic": topic}
    if topic in ("patterns", "market_state", "ticks") and draw(st.booleans()):
        message["filter"] = draw(st.one_of(
            st.fixed_dictionaries({"symbols": st.lists(st.sampled_from(SYMBOL_POOL), min_size=1,
                                                       max_size=3)}),
            st.just({"universe": "tech"})))
    return message


def event_actions() -> st.SearchStrategy[tuple[Any, ...]]:
    # Mostly the channels clients subscribe to with symbol filters; jobs are the world's own.
    weighted = tuple(name for name, channel in CHANNELS.items()
                     for _ in range(3 if TOPICS[channel.topic].by_symbol else 1))
    return valid_events(max_depth=4, symbol_pool=tuple(SYMBOL_POOL), channels=weighted,
                        job_id=st.just(Ref("job"))).map(
        lambda sent: ("event", sent.redis_name, sent.message))


slots = st.integers(0, SLOTS - 1)
STEP_STRATEGIES: dict[str, st.SearchStrategy[tuple[Any, ...]]] = {
    "hostile": st.tuples(st.just("send"), slots, client_messages()),
    "subscribe": st.tuples(st.just("send"), slots, subscribes()),
    "event": event_actions(),
    "hello": st.tuples(st.just("send"), slots, hellos()),
    "submit": st.tuples(st.just("send"), slots, st.builds(
        lambda i, params: {"op": "submit_backtest", "id": i, "params": params},
        st.sampled_from(tuple(SUB_IDS)), valid_params)),
    "cancel": st.tuples(st.just("send"), slots, st.builds(
        lambda i: {"op": "cancel_job", "id": i, "job_id": Ref("job")},
        st.sampled_from(tuple(SUB_IDS)))),
    "unsubscribe": st.tuples(st.just("send"), slots, st.builds(
        lambda i: {"op": "unsubscribe", "id": i}, st.sampled_from(tuple(SUB_IDS)))),
    "advance": st.tuples(st.just("advance"),
                         st.sampled_from((0.1, 1.0, 6.0, 11.0, 61.0, 301.0, 3601.0))),
    "disconnect": st.tuples(st.just("disconnect"), slots),
}
STEP_KINDS = st.sampled_from(("hostile",) * 4 + ("subscribe",) * 3 + ("event",) * 5 + (
    "hello", "submit", "cancel", "unsubscribe", "advance", "disconnect"))
actions = st.deferred(lambda: STEP_KINDS.flatmap(STEP_STRATEGIES.__getitem__))
"""One step: a request (hostile or well formed), a producer event, time passing, a disconnect."""


@st.composite
def sessions(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    """
    Steps that first greet most connections and subscribe some, so that the
    random steps after them reach subscribed, resumed and job-owning states.
    """
    steps: list[tuple[Any, ...]] = []
    for slot in range(SLOTS):
        if draw(st.integers(0, 4)):
            steps.append(("send", slot, draw(hellos())))
            for message in draw(st.lists(subscribes(), min_size=1, max_size=3)):
                steps.append(("send", slot, message))
    return steps + draw(st.lists(actions, min_size=5, max_size=30))


def run(world: GatewayWorld, steps: list[tuple[Any, ...]]) -> None:
    with logged_failures() as failures:
        for step in steps:
            with production_stack():
                if step[0] == "send":
                    world.send(step[1], step[2])
                elif step[0] == "event":
                    world.publish(step[1], step[2])
                elif step[0] == "advance":
                    world.advance(step[1])
                elif step[0] == "disconnect":
                    world.disconnect(step[1])
            world.settle()
            world.check()
        world.check_frames()
        world.probe()
        world.check()
    assert not failures, describe(failures)


# ---------------------------------------------------------------- the properties


@settings(FUZZ, max_examples=GATEWAY_PAYLOAD_CASES)
@given(message=client_messages(), greeted=st.booleans(),
       auth=st.sampled_from(["anonymous", "jwt"]))
@example(message={"op": Raw(nested_text(1000, "list"))}, greeted=True, auth="anonymous")
@example(message={"op": "subscribe", "id": "a", "topic": "patterns",
                  "filter": {"symbols": [Raw(nested_text(1000, "list"))]}},
         greeted=True, auth="anonymous")
@example(message={"op": "submit_backtest", "id": "a",
                  "params": {"symbols": ["AAPL"], "start_date": "2024-01-01",
                             "end_date": "2024-02-01", "patterns": [["Doji"]]}},
         greeted=True, auth="anonymous")
@example(message={"op": "hello", "id": "h", "token": Token("claims", claims=(
    ("sub", "alice"), ("exp", 10**400)))}, greeted=False, auth="jwt")
def test_gateway_answers_any_single_payload(message: Any, greeted: bool, auth: str) -> None:
    """
    Any one payload, before or after hello, is answered once (or closes
    the connection with 1008) and raises nothing; a well-formed client is
    served afterwards.
    """
    world = GatewayWorld(auth)
    steps: list[tuple[Any, ...]] = []
    if greeted:
        steps.append(("send", 0, {"op": "hello", "id": "h0", "user": "alice",
                                  "token": Token("valid")}))
    steps.append(("send", 0, message))
    run(world, steps)


@settings(FUZZ, max_examples=GATEWAY_SEQUENCE_CASES)
@given(steps=sessions(), auth=st.sampled_from(["anonymous", "jwt"]), rate=st.booleans(),
       per_user=st.sampled_from([0, 0, 1, 2]))
def test_gateway_survives_any_message_sequence(steps: list[tuple[Any, ...]], auth: str,
                                               rate: bool, per_user: int) -> None:
    """
    Any sequence of requests from three connections, with producer events,
    time passing and disconnects: the gateway's answers and bookkeeping
    stay right, and a well-formed client is served afterwards.
    """
    run(GatewayWorld(auth, rate, per_user), steps)


# ================================================================ 3. REST parameters

REST_USER = "fuzzer"
PATTERNS_CHANNEL = "tickstock.events.patterns"
TIME_MAX = 253402300799
ROUTE_PARAMS = {
    "patterns": ("symbol", "pattern", "min_confidence", "since", "limit", "cursor"),
    "symbols": (), "universes": (), "universe": (), "ohlcv": ("since", "until", "limit"),
    "jobs": ("limit", "cursor"), "job": (),
}
ROUTE_METHODS = {"patterns": ("GET",), "symbols": ("GET",), "ohlcv": ("GET",),
                 "universes": ("GET",), "universe": ("GET",), "jobs": ("GET", "POST"),
                 "job": ("GET", "DELETE")}
LIMIT_MAX = {"patterns": 1000, "ohlcv": 10_000, "jobs": 100}
ALL_PARAMS = sorted({p for names in ROUTE_PARAMS.values() for p in names} | {"until", "job_id",
                                                                               "key"})


@dataclass
class Answer:
    """One HTTP answer: status, headers (lower-case names), body as sent and as JSON."""

    status: int
    headers: dict[bytes, bytes]
    raw: bytes
    body: Any = field(init=False)

    def __post_init__(self) -> None:
        try:
            self.body = orjson.loads(self.raw)
        except orjson.JSONDecodeError:
            self.body = None


class RestWorld:
    """
    The real site (dashboard, probes and C{/api}) over a seeded memory store,
    memory cache and real jobs, on a Clock; requests are real
    L{twisted.web.server.Request}s on a C{DummyChannel}.
    """

    def __init__(self, auth: str = "anonymous", cors: tuple[str, ...] = ()) -> None:
        self.clock = Clock()
        self.clock.advance(time.time() if auth == "jwt" else NOW)
        now = self.clock.seconds()
        self.store = MemoryStore(self.clock, universes=UNIVERSES)
        seeded = [parse_event(PATTERNS_CHANNEL, orjson.dumps(
            {"symbol": SYMBOL_POOL[i % 4], "pattern": PATTERN_NAMES[i % 3],
             "confidence": i / 10, "timestamp": now - 100 + i}),
            f"{int(now * 1000) - 1000 + i}-{i % 2}", now) for i in range(8)]
        self.store.write([], seeded)
        self.history = MemoryHistory(self.clock, 100, 3600, 100)
        self.bus = MemoryBus()
        self.router = Router(self.clock, self.history, self.bus)
        self.jobs = Jobs(self.clock, self.store, self.history, self.bus, self.router.receive,
                         per_user=1000, timeout=300.0, patterns=PATTERN_NAMES)
        self.job_ids = [
            Deferred.fromCoroutine(self.jobs.submit(REST_USER, {
                "symbols": ["AAPL"], "start_date": "2024-01-01",
                "end_date": "2024-02-01"})).result["job_id"]
            for _ in range(2)]
        self.authenticator = JWTAuthenticator(TEST_SECRET) if auth == "jwt" else None
        api = build_api(self.store, MemoryCache(self.clock), self.authenticator or anonymous,
                        5.0, clock=self.clock, jobs=self.jobs, cors_origins=cors)
        self.site = build_site(
            WebSocketResource(WebSocketServerFactory()),
            JSONStatus(lambda: (True, {"status": "ok"})),
            JSONStatus(lambda: (True, {"ready": True})),
            timeout=5.0, api=api,
        )

    def request(self, method: bytes, uri: bytes, body: bytes = b"",
                headers: dict[bytes, list[bytes]] | None = None) -> Answer:
        channel = DummyChannel()
        channel.site = self.site
        request = Request(channel, False)
        if headers is None:
            headers = {b"authorization": [b"Bearer " + REST_USER.encode()]}
        for name, values in headers.items():
            request.requestHeaders.setRawHeaders(name, values)
        request.gotLength(len(body))
        request.handleContentChunk(body)
        with logged_failures() as failures, production_stack():
            request.requestReceived(method, uri, b"HTTP/1.1")
        assert not failures, describe(failures)
        assert request.finished, f"{method!r} {uri[:200]!r} was not answered"
        assert not self.clock.getDelayedCalls(), "no timer is left behind"
        head, _, raw = channel.transport.written.getvalue().partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        fields: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip()
        return Answer(request.code, fields, raw)


def assert_json_answer(answer: Answer, context: Any) -> None:
    """200 or a 4xx, as JSON; a 4xx carries one well-formed error object."""
    assert answer.status < 500, (answer.status, answer.raw[:300], context)
    assert answer.headers.get(b"content-type") == b"application/json", (answer, context)
    assert answer.body is not None, (answer.raw[:300], context)
    assert b"<" not in answer.raw and b">" not in answer.raw, "no answer can be read as markup"
    if answer.status >= 400:
        assert list(answer.body) == ["error"], answer.body
        error = answer.body["error"]
        assert isinstance(error.get("code"), str) and error["code"], error
        assert isinstance(error.get("message"), str), error
        if answer.status == 400 and error["code"] == "bad_parameter":
            assert isinstance(error.get("parameter"), str), error


# ---------------------------------------------------------------- the reference rules


def _ref_time(text: str) -> float | None:
    if re.fullmatch(r"[0-9]{1,12}(\.[0-9]{1,9})?", text):
        value = float(Decimal(text))
    elif re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9:.+\-Zz]{2,29}", text):
        try:
            parsed = datetime.fromisoformat(text.upper())
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        value = parsed.timestamp()
    else:
        return None
    return value if 0 <= value <= TIME_MAX else None


def _ref_confidence(text: str) -> float | None:
    if not re.fullmatch(r"[0-9]{1,3}(\.[0-9]{1,9})?", text):
        return None
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    return float(value) if 0 <= value <= 1 else None


def reference_param(route: str, name: str, text: str) -> tuple[bool, Any]:
    """Whether C{text} is a valid value of parameter C{name} on C{route}, and its value."""
    if name == "symbol":
        return STRICT_SYMBOL.fullmatch(text) is not None, text
    if name == "pattern":
        return 1 <= len(text) <= 256 and printable(text), text
    if name == "min_confidence":
        value = _ref_confidence(text)
        return value is not None, value
    if name in ("since", "until"):
        value = _ref_time(text)
        return value is not None, value
    if name == "limit":
        ok = re.fullmatch(r"[0-9]{1,6}", text) is not None and 1 <= int(text) <= LIMIT_MAX[route]
        return ok, int(text) if ok else None
    if name == "cursor" and route == "jobs":
        return re.fullmatch(r"[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}", text) is not None, text
    if name == "cursor":
        return re.fullmatch(r"[0-9]{1,18}-[0-9]{1,18}", text) is not None, text
    raise AssertionError(name)


def reference_answer(route: str | None, method: str, segment: bytes | None,
                     pairs: list[tuple[bytes, bytes]], known_jobs: list[str],
                     universes: dict[str, Any]) -> tuple[int, str | None]:
    """
    The status the API must answer with, and the parameter a 400 names:
    routes, then methods, then the path parameter, then each query pair in
    order (unknown, repeated, not UTF-8, empty, malformed), then the rule
    that C{until} is after C{since}.
    """
    if route is None:
        return 404, None
    if method not in ROUTE_METHODS[route]:
        return 405, None
    if route in ("ohlcv", "universe"):
        name = "symbol" if route == "ohlcv" else "key"
        try:
            text = (segment or b"").decode("utf-8")
        except UnicodeDecodeError:
            return 400, name
        pattern = r"[A-Z0-9.\-]{1,10}" if route == "ohlcv" else r"[A-Za-z0-9_.:\-]{1,64}"
        if not re.fullmatch(pattern, text):
            return 400, name
    job_id = None
    if route == "job":  # a malformed job id is as unknown as another user's: 404
        try:
            job_id = (segment or b"").decode("utf-8")
        except UnicodeDecodeError:
            return 404, None
        if not re.fullmatch(r"[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}", job_id):
            return 404, None
    allowed = ROUTE_PARAMS[route] if not (route == "jobs" and method == "POST") else ()
    values: dict[str, Any] = {}
    for raw_name, raw_value in pairs:
        name = raw_name.decode("utf-8", "replace")[:64]
        if name not in allowed or name in values:
            return 400, name
        try:
            text = raw_value.decode("utf-8")
        except UnicodeDecodeError:
            return 400, name
        ok, value = reference_param(route, name, text) if text else (False, None)
        if not ok:
            return 400, name
        values[name] = value
    if route == "ohlcv" and "until" in values:
        since = values.get("since", values["until"] - 24 * 3600)
        if values["until"] <= since:
            return 400, "until"
    if route == "universe":
        return (200 if segment.decode() in universes else 404), None  # type: ignore[union-attr]
    if route == "job" and job_id not in known_jobs:
        return 404, None
    if route == "jobs" and method == "POST":
        return 415, None  # no content type is sent with these
    return 200, None


# ---------------------------------------------------------------- request strategies

SAFE_RAW = re.compile(rb"[A-Za-z0-9._~\-:@!$'()*,;/?]*")
URL_FORMS = st.sampled_from(("quote", "quote", "plus", "raw", "lower"))


def url_encode(value: bytes, how: str) -> bytes:
    """C{value} as it may appear in a URL: percent-encoded, with C{+} for spaces, or raw."""
    if how == "raw" and SAFE_RAW.fullmatch(value):
        return value
    if how == "plus":
        return b"+".join(quote_from_bytes(part, safe="").encode() for part in value.split(b" "))
    encoded = quote_from_bytes(value, safe="").encode()
    if how == "lower":
        return re.sub(rb"%[0-9A-F]{2}", lambda m: m.group().lower(), encoded)
    return encoded


def _iso(moment: datetime, timespec: str, zone: str, lower_t: bool) -> str:
    text = moment.isoformat(timespec=timespec) + zone
    return text.replace("T", "t") if lower_t else text


def _offset(minutes: int) -> str:
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02}:{abs(minutes) % 60:02}"


DIGITS = "0123456789"
times = st.one_of(
    st.integers(0, TIME_MAX).map(str),
    st.builds(lambda whole, fraction: f"{whole}.{fraction}", st.integers(0, TIME_MAX - 1),
              st.text(DIGITS, min_size=1, max_size=9)),
    st.builds(_iso, st.datetimes(min_value=datetime(1970, 1, 2),
                                 max_value=datetime(9999, 12, 30)),
              st.sampled_from(("minutes", "seconds", "milliseconds", "microseconds")),
              st.one_of(st.sampled_from(("", "Z", "z")),
                        st.integers(-23 * 60 - 59, 23 * 60 + 59).map(_offset)),
              st.booleans()),
)
"""Valid C{since}/C{until}: epoch seconds (up to 9 decimals) or ISO-8601 date-times."""


def _limits(most: int) -> st.SearchStrategy[str]:
    return st.builds(lambda n, pad: str(n).zfill(6) if pad else str(n),
                     st.integers(1, most), st.booleans())


VALID_VALUES: dict[tuple[str, str], st.SearchStrategy[str]] = {
    ("patterns", "symbol"): st.one_of(st.sampled_from(tuple(SYMBOL_POOL)), symbols),
    ("patterns", "pattern"): st.one_of(
        st.sampled_from((*PATTERN_NAMES, "Bullish Engulfing")),
        st.text(PRINTABLE, min_size=1, max_size=30),
        st.builds(lambda head, n: (head + "x" * n)[:n], st.text(PRINTABLE | st.just(" "),
                                                                max_size=8),
                  st.integers(250, 256))),
    ("patterns", "min_confidence"): st.one_of(
        st.builds(lambda whole, fraction: f"{whole}.{fraction}" if fraction else whole,
                  st.sampled_from(("0", "00", "000")), st.text(DIGITS, max_size=9)),
        st.builds(lambda whole, zeros: f"{whole}.{'0' * zeros}" if zeros else whole,
                  st.sampled_from(("1", "01", "001")), st.integers(0, 9))),
    ("patterns", "since"): times,
    ("patterns", "limit"): _limits(1000),
    ("patterns", "cursor"): st.builds(lambda ms, seq: f"{ms}-{seq}", st.integers(0, 10**20 - 1),
                                      st.integers(0, 10**10 - 1)),
    ("ohlcv", "since"): times,
    ("ohlcv", "until"): times,
    ("ohlcv", "limit"): _limits(10_000),
    ("jobs", "limit"): _limits(100),
    ("jobs", "cursor"): st.uuids().map(str),
}
"""Valid text of each parameter of each route."""
assert set(VALID_VALUES) == {(r, n) for r, names in ROUTE_PARAMS.items() for n in names}

HOSTILE_TEXT = (
    "-1", "0", "NaN", "nan", "inf", "-inf", "Infinity", "1e309", "1e3", "0x10", "1_000", "１",
    "٣", "²", "+1", " 1", "1 ", "1.", ".5", "-0", "0.0000000001", "1e-5", "9" * 30,
    "1000001", "10001", "101", "1001", "0000001", "253402300800", "999999999999",
    "1.0000000001", "1.000000001", "2024-02-30T00:00:00", "2024-01-01T25:00:00",
    "2024-01-01", "2024-01-01T00:00:00+24:00", "1969-12-31T23:59:59Z",
    "9999-12-31T23:59:59-01:00", "0000-01-01T00:00:00", "2024-01-01T00:00:00.1234567890",
    "2024-01-01 00:00:00", "1-2-3", "12345678901234567890-12345678901", "-", "aapl", "AAPL ",
    "A" * 11, "", " ", "\t", "null", "undefined", "[]", "{}", "%", "%%", "%zz", "%E2%82",
    *INJECTIONS,
)
hostile_value_bytes = st.one_of(
    st.sampled_from(tuple(t.encode() for t in HOSTILE_TEXT)),
    texts(0, 40).map(str.encode),
    st.binary(max_size=20),
    st.sampled_from((b"x" * 300, b"9" * 5000, "é".encode() * 300, b"\xff\xfe", b"\xc3")),
)
"""Query values and path segments nothing should accept."""

NAME_TRICKS = ("Limit", "LIMIT", "limit ", " limit", "limit[]", "symbol\x00", "x" * 70, "é" * 70,
               "", *INJECTIONS)
PARAM_NAMES = {
    route: st.one_of(st.sampled_from(names or ("limit",)), st.sampled_from(names or ("limit",)),
                     st.sampled_from(tuple(ALL_PARAMS)), texts(0, 12), st.sampled_from(NAME_TRICKS))
    for route, names in ROUTE_PARAMS.items()
}


@st.composite
def query_pairs(draw: st.DrawFn, route: str, valid_only: bool) -> list[tuple[bytes, bytes]]:
    """Decoded C{(name, value)} pairs for C{route}: valid, or anything at all."""
    names = ROUTE_PARAMS[route]
    if valid_only:
        chosen = draw(st.lists(st.sampled_from(names), unique=True)) if names else []
        return [(name.encode(), draw(VALID_VALUES[route, name]).encode()) for name in chosen]
    pairs: list[tuple[bytes, bytes]] = []
    for _ in range(draw(st.integers(0, 5))):
        name = draw(PARAM_NAMES[route])
        encoded = name.encode()
        if draw(st.integers(0, 9)) == 0:
            encoded = draw(st.binary(min_size=1, max_size=6))
        if name in names and draw(st.booleans()):
            value = draw(VALID_VALUES[route, name]).encode()
        else:
            value = draw(hostile_value_bytes)
        pairs.append((encoded, value))
    return pairs


QUERY_FORMS = st.sampled_from(("pair",) * 8 + ("bare",))


@st.composite
def query_strings(draw: st.DrawFn, pairs: list[tuple[bytes, bytes]], bare: bool = True
                  ) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """A query string for C{pairs}, and the pairs the server will see in it."""
    items, seen = [], []
    for name, value in pairs:
        name_text = url_encode(name, draw(URL_FORMS))
        if bare and draw(QUERY_FORMS) == "bare":
            items.append(name_text)  # "name": an empty value
            if name_text:
                seen.append((name, b""))
        else:
            items.append(name_text + b"=" + url_encode(value, draw(URL_FORMS)))
            seen.append((name, value))
    query = b"&".join(items)
    if bare and draw(st.integers(0, 5)) == 0:
        query = draw(st.sampled_from((b"&", b"&&"))) + query + draw(st.sampled_from((b"", b"&")))
    return query, seen


OTHER_PATHS = st.sampled_from((
    (b"/api/", None), (b"/api/nope", None), (b"/api/patterns/x", None), (b"/api/ohlcv/", None),
    (b"/api/ohlcv/AAPL/x", None), (b"/api/jobs/", None), (b"/api//patterns", None),
    (b"/api/%70atterns", "patterns"), (b"/api/PATTERNS", None), (b"/api/patterns%2F", None)))
ODD_METHODS = st.sampled_from(("GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS", "TRACE", "get"))
JOB_SEGMENTS = st.one_of(
    st.integers(0, 1),  # one of the world's own jobs, by index
    st.uuids().map(lambda u: str(u).encode()), hostile_value_bytes,
    st.uuids().map(lambda u: str(u).upper().encode()))
SEGMENTS = {
    "ohlcv": st.one_of(st.sampled_from(tuple(s.encode() for s in SYMBOL_POOL)),
                       hostile_value_bytes),
    "universe": st.one_of(st.sampled_from((b"tech", b"etf", b"nope", b"a" * 65)),
                          hostile_value_bytes),
    "job": JOB_SEGMENTS,
}
VALID_SEGMENTS = {
    "ohlcv": st.one_of(st.sampled_from(tuple(SYMBOL_POOL)), symbols).map(str.encode),
    "universe": st.sampled_from(tuple(k.encode() for k in sorted(UNIVERSES))),
    "job": st.integers(0, 1),
}
ROUTES = st.sampled_from(tuple(sorted(ROUTE_PARAMS)))


@dataclass
class Call:
    """One generated API request: route, method, path segment, decoded pairs, query string."""

    route: str | None
    method: str
    segment: bytes | int | None
    path: bytes
    pairs: list[tuple[bytes, bytes]]
    query: bytes | None

    def uri(self, job_ids: list[str]) -> tuple[bytes | None, bytes]:
        """The path segment (a job index made an id) and the request's URI."""
        segment = self.segment
        if isinstance(segment, int):
            segment = job_ids[segment].encode()
        path = self.path
        if segment is not None:
            path += b"/" + quote_from_bytes(segment, safe="").encode()
        return segment, path + (b"" if self.query is None else b"?" + self.query)


@st.composite
def requests(draw: st.DrawFn, valid_only: bool = False) -> Call:
    """A request to the API: valid, or anything at all."""
    route = draw(ROUTES)
    method = draw(st.sampled_from(ROUTE_METHODS[route]))
    if valid_only and route == "jobs":
        method = "GET"
    if not valid_only and draw(st.integers(0, 7)) == 0:
        method = draw(ODD_METHODS)
    segment: bytes | int | None = None
    if route in SEGMENTS:
        segment = draw((VALID_SEGMENTS if valid_only else SEGMENTS)[route])
        if segment == b"":
            segment = b"x"  # an empty segment is another route
    path = b"/api/" + {"ohlcv": b"ohlcv", "universe": b"universes", "job": b"jobs"}.get(
        route, route.encode())
    real_route: str | None = route
    if not valid_only and draw(st.integers(0, 9)) == 0:
        (path, real_route), segment = draw(OTHER_PATHS), None
        if real_route == "patterns":
            method = draw(st.sampled_from(("GET", "POST")))
    pairs = draw(query_pairs(real_route or "patterns", valid_only))
    query, seen = draw(query_strings(pairs, bare=not valid_only))
    keep = bool(query) or draw(st.booleans())
    return Call(real_route, method, segment, path, seen, query if keep else None)


# ---------------------------------------------------------------- the properties


@settings(FUZZ, max_examples=REST_HOSTILE_CASES)
@given(call=requests())
def test_rest_hostile_queries_are_refused_by_name(call: Call) -> None:
    """
    Any route, method, path segment and query string: exactly the answer
    the reference rules predict, as JSON, a 400 naming the offending
    parameter; never a 500, never a logged failure.
    """
    world = RestWorld()
    segment, uri = call.uri(world.job_ids)
    answer = world.request(call.method.encode(), uri)
    context = (call.method, uri[:300])
    assert_json_answer(answer, context)
    status, parameter = reference_answer(call.route, call.method, segment, call.pairs,
                                         world.job_ids, UNIVERSES)
    assert answer.status == status, (answer.status, status, answer.body, context)
    if status == 400:
        assert answer.body["error"]["code"] == "bad_parameter", answer.body
        assert answer.body["error"]["parameter"] == parameter, (answer.body, parameter, context)
    if status == 405:
        assert answer.headers.get(b"allow"), answer.headers


@settings(FUZZ, max_examples=REST_VALID_CASES)
@given(call=requests(valid_only=True))
def test_rest_valid_queries_are_accepted(call: Call) -> None:
    """Valid parameters on every route are accepted: a 200 with the route's JSON."""
    world = RestWorld()
    segment, uri = call.uri(world.job_ids)
    answer = world.request(call.method.encode(), uri)
    assert_json_answer(answer, uri)
    expected, _ = reference_answer(call.route, call.method, segment, call.pairs, world.job_ids,
                                   UNIVERSES)
    if expected == 400:  # only "until" not after "since", which valid values may be
        assert answer.body["error"]["parameter"] == "until", answer.body
        return
    assert answer.status == expected == 200, (answer.status, answer.body, uri)
    keys = {"patterns": {"patterns", "next_cursor"}, "symbols": {"symbols"},
            "ohlcv": {"symbol", "bars"}, "universes": {"universes"},
            "jobs": {"jobs", "next_cursor"},
            "universe": {"key", "type", "category", "symbols", "metadata", "updated"},
            "job": {"job_id", "status", "params", "progress", "results", "error", "created_at",
                    "updated_at"}}
    assert set(answer.body) == keys[call.route], answer.body  # type: ignore[index]


@settings(FUZZ, max_examples=REST_BODY_CASES)
@given(body=st.one_of(
    st.builds(orjson.dumps, valid_params), st.builds(orjson.dumps, valid_params),
    st.builds(encode, job_params),
    st.builds(lambda path, value: encode(poisoned(POISON_BASES["submit_backtest"][0], path,
                                                  value)["params"]),
              st.sampled_from(POISON_BASES["submit_backtest"][1][1:]), poisons),
    st.binary(max_size=100), value_texts, st.just(b"{" + b" " * (64 * 1024) + b"}")),
    content_type=st.sampled_from([b"application/json", b"application/json", b"application/json",
                                  b"Application/JSON; charset=utf-8", b"text/plain", None,
                                  b"application/json-patch+json",
                                  b"application/x-www-form-urlencoded"]))
@example(body=b'{"symbols":["AAPL"],"start_date":"2024-01-01","end_date":"2024-02-01",'
              b'"patterns":[["Doji"]]}', content_type=b"application/json")
def test_rest_job_bodies_are_refused_cleanly(body: bytes, content_type: bytes | None) -> None:
    """
    C{POST /api/jobs} with any body: 202 with the job, or a 4xx JSON error
    (400 bad_json / bad_params with a message per field, 413, 415); never a 500.
    """
    world = RestWorld()
    headers = {b"authorization": [b"Bearer " + REST_USER.encode()]}
    if content_type is not None:
        headers[b"content-type"] = [content_type]
    answer = world.request(b"POST", b"/api/jobs", body, headers)
    if answer.status == 202:
        assert answer.body["status"] == "queued" and answer.headers.get(b"location")
        return
    assert_json_answer(answer, body[:300])
    code = answer.body["error"]["code"]
    json_type = content_type is not None and content_type.split(b";")[0].strip().lower() == \
        b"application/json"
    if not json_type:
        assert (answer.status, code) == (415, "unsupported_media_type"), answer.body
    elif len(body) > 64 * 1024:
        assert (answer.status, code) == (413, "too_large"), answer.body
    else:
        assert answer.status == 400 and code in ("bad_json", "bad_params"), answer.body
        if code == "bad_params":
            fields = answer.body["error"].get("fields")
            assert fields and all(isinstance(k, str) and isinstance(v, str)
                                  for k, v in fields.items()), answer.body


ALLOWED_ORIGIN = b"https://app.example"


@settings(FUZZ, max_examples=REST_HEADER_CASES)
@given(authorization=st.one_of(
    st.none(), st.sampled_from(["valid", "valid", "expired", "garbage"]),
    st.binary(max_size=40), st.sampled_from([b"Bearer", b"Bearer ", b"bearer x", b"Basic eDp5",
                                             b"Bearer a b", b"Bearer \xff\xfe"])),
    twice=st.booleans(),
    origin=st.one_of(st.none(), st.sampled_from([ALLOWED_ORIGIN, b"https://app.example:443",
                                                 b"https://evil.example", b"null", b"*",
                                                 b"HTTPS://APP.EXAMPLE", b"\xff"]),
                     st.binary(max_size=20)),
    path=st.sampled_from([b"/api/symbols", b"/api/patterns?limit=1", b"/api/universes/tech",
                          b"/api/nope"]))
@example(authorization="valid", twice=False, origin=ALLOWED_ORIGIN, path=b"/api/symbols")
def test_rest_auth_and_origin_headers_are_refused_cleanly(
        authorization: Any, twice: bool, origin: bytes | None, path: bytes) -> None:
    """
    With JWT auth and CORS on, any Authorization and Origin header: 200
    (a valid token) or 401 with a challenge (404 for no route), as JSON;
    CORS headers only for the allowed origin; never a 500.
    """
    world = RestWorld("jwt", cors=("https://app.example:443",))
    assert world.authenticator is not None
    headers: dict[bytes, list[bytes]] = {}
    valid = False
    if authorization is not None:
        if authorization == "valid":
            value = b"Bearer " + world.authenticator.mint("alice", time.time(), 600).encode()
            valid = not twice
        elif authorization == "expired":
            value = b"Bearer " + world.authenticator.mint("alice", time.time() - 900, 600).encode()
        elif authorization == "garbage":
            value = b"Bearer eyJhbGciOiJIUzI1NiJ9.e30.AAAA"
        else:
            value = authorization
        headers[b"authorization"] = [value, value] if twice else [value]
    if origin is not None:
        headers[b"origin"] = [origin]
    answer = world.request(b"GET", path, headers=headers)
    assert_json_answer(answer, (headers, path))
    if valid:
        assert answer.status == (404 if path == b"/api/nope" else 200), answer.body
    else:
        assert answer.status == 401, answer.body
        assert answer.headers.get(b"www-authenticate", b"").startswith(b"Bearer"), answer.headers
    try:
        allowed = origin is not None and normalize_origin(origin.decode("ascii")) == \
            "https://app.example:443"
    except (UnicodeDecodeError, ValueError):
        allowed = False
    assert (b"access-control-allow-origin" in answer.headers) == allowed, answer.headers
