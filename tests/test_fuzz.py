"""
Property-based fuzzing (hypothesis) of the three parsers that face hostile
input. Every property is seeded (C{derandomize=True}, no example database),
so each run tries the same cases, about 2,400 in all (C{max_examples} per
property below; C{--hypothesis-show-statistics} prints them). Code under
test runs with the recursion headroom it has in the daemon, not the extra
stack hypothesis grants a test (see L{production_stack}).

1. The producer event parser, L{tickstock.events.parse_event}:
   - L{test_parse_event_accepts_or_refuses_only_as_the_contract_says}
     (C{EVENT_HOSTILE_CASES} = 600): arbitrary bytes, arbitrary JSON
     documents, and valid messages of every channel mutated field by field
     (fields dropped, retyped, deeply nested, huge ints, C{NaN}/C{Infinity}
     text, unicode, duplicate keys, extra fields, padding to just under or
     over C{MAX_EVENT_BYTES}, byte-level damage), on every channel and on
     unknown ones. It returns an L{Event} or raises L{MalformedEvent}, never
     anything else; it accepts exactly what an independent reference of the
     contract accepts (refusing with the same C{kind}), and an accepted
     event meets the contract: required fields valid (symbols
     C{[A-Z0-9.-]{1,10}}, confidence in [0, 1], numbers finite), size
     within the limit, fields passed on unchanged.
   - L{test_valid_events_are_accepted_unchanged} (C{EVENT_VALID_CASES} =
     250): valid events of every channel, generated from each channel's
     C{required} checks (a new kind of check fails the test until it is
     taught here), with unknown extra fields: accepted, every field kept.
   - L{test_event_frames_round_trip} (C{EVENT_VALID_CASES} = 250): the
     C{event} frame of an accepted event, extra fields nested up to the
     1023 levels JSON parsing allows, is JSON that round-trips its data.
     (The contract does not bound nesting: up to C{PINNED_DEPTH} = 32
     levels must be accepted; deeper may be refused, but if accepted must
     be deliverable.)

2. The WebSocket request handler, L{tickstock.gateway.Gateway.receive}, over
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
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Iterator
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
from tickstock import events
from tickstock.auth import JWTAuthenticator, anonymous
from tickstock.broadcast import Broadcaster
from tickstock.bus.memory import MemoryBus
from tickstock.cache import MemoryCache
from tickstock.config import normalize_origin
from tickstock.events import CHANNELS, MAX_EVENT_BYTES, TOPICS, Event, MalformedEvent, parse_event
from tickstock.gateway import CLOSE_POLICY, Gateway
from tickstock.history.memory import MemoryHistory
from tickstock.jobs import Jobs
from tickstock.ratelimit import RateLimit
from tickstock.router import Router
from tickstock.store.memory import MemoryStore
from tickstock.universes import Universes
from tickstock.web.api import build_api
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
            stack.extend(zip(x, y))
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


CHANNEL_NAMES = sorted(CHANNELS)
OTHER_CHANNELS = ("", "tickstock.events", "tickstock.events.patterns ", "TICKSTOCK.DATA.TICKS",
                  "tickstock.jobs.backtest", "tickstock.jobs.control", "patterns")

units = st.one_of(st.sampled_from([0, 1, 0.0, 1.0, 0.5, 5e-324]), st.floats(0, 1))
positives = st.one_of(st.integers(1, 2**63 - 1), st.sampled_from([5e-324, 1e308]),
                      st.floats(min_value=0.0, exclude_min=True, allow_infinity=False))
non_negatives = st.one_of(st.integers(0, 2**63 - 1), st.sampled_from([0, 0.0, -0.0]),
                          st.floats(min_value=0.0, allow_infinity=False))
field_texts = st.one_of(texts(1, 30), st.builds(
    lambda head, c, n: (head + c * n)[:n], texts(0, 4), UTF8,
    st.integers(events.MAX_STRING - 2, events.MAX_STRING)))
results = st.fixed_dictionaries(
    {name: finite for name in ("win_rate", "roi", "sharpe_ratio", "max_drawdown")},
    optional={"trades": st.integers(0, 10**6), "notes": texts()},
)

CHECK_STRATEGIES: dict[Callable[[Any], bool], st.SearchStrategy[Any]] = {
    events._symbol: symbols,
    events._text: field_texts,
    events._unit: units,
    events._positive: positives,
    events._non_negative: non_negatives,
    events._finite: finite,
    events._results: results,
    events._time: st.one_of(positives, field_texts),
}


def strategy_for(check: Callable[[Any], bool]) -> st.SearchStrategy[Any]:
    """Valid values for one of the checks in a channel's C{required}."""
    if check in CHECK_STRATEGIES:
        return CHECK_STRATEGIES[check]
    cells = [cell.cell_contents for cell in (getattr(check, "__closure__", None) or ())]
    if cells and isinstance(cells[0], tuple) and all(isinstance(c, str) for c in cells[0]):
        return st.sampled_from(cells[0])  # events._one_of(...)
    raise AssertionError(f"test_fuzz has no strategy for the check {check!r}: add one")


def valid_fields(channel: events.Channel,
                 symbol_pool: tuple[str, ...] = ()) -> st.SearchStrategy[dict[str, Any]]:
    """The required fields of C{channel}, each valid."""
    fields = {}
    for name, check in channel.required:
        strategy = strategy_for(check)
        if name == "symbol" and symbol_pool:
            strategy = st.sampled_from(symbol_pool)
        fields[name] = strategy
    return st.fixed_dictionaries(fields)


VALID_FIELDS = {name: valid_fields(channel) for name, channel in CHANNELS.items()}
EVENT_TYPES = {name: field_texts if channel.topic == "universe"
               else st.sampled_from(channel.event_types) for name, channel in CHANNELS.items()}
EXTRA_KEYS = st.one_of(texts(0, 10).map("_".__add__),
                       st.sampled_from(("", "note", "source", "Symbol", "SYMBOL", "symbol ",
                                        "__proto__", "constructor", "\u0000", "🙂")))
"""Names of unknown fields: never a required field's name, C{event_type} or C{event_id}."""
EXTRAS = st.dictionaries(EXTRA_KEYS, json_values, max_size=3)

PINNED_DEPTH = 32
"""
The contract keeps unknown fields but does not say how deep they may nest:
messages up to this depth must be accepted when valid; deeper ones may be
refused (with any kind) or accepted, and if accepted must still be framed.
"""


def _depths(max_depth: int) -> st.SearchStrategy[int]:
    edges = tuple(d for d in (PINNED_DEPTH - 1, 253, 254, 255, 1000, 1022) if d < max_depth)
    return st.integers(1, max_depth - 1) | st.sampled_from(edges) if edges \
        else st.integers(1, max_depth - 1)


@st.composite
def valid_events(draw: st.DrawFn, max_depth: int = PINNED_DEPTH,
                 symbol_pool: tuple[str, ...] = (),
                 channels: tuple[str, ...] = tuple(CHANNEL_NAMES)
                 ) -> tuple[str, dict[str, Any], bytes]:
    """
    C{(channel, data, raw)}: a valid event of a random channel, with an
    optional C{event_type} and C{event_id}, unknown extra fields, and
    sometimes an extra field nested up to C{max_depth} levels in all.
    """
    name = draw(st.sampled_from(channels))
    channel = CHANNELS[name]
    data = draw(valid_fields(channel, symbol_pool) if symbol_pool else VALID_FIELDS[name])
    if draw(st.booleans()):
        data["event_type"] = draw(EVENT_TYPES[name])
    if draw(st.booleans()):
        data["event_id"] = draw(texts(1, events.MAX_EVENT_ID))
    extras = draw(EXTRAS)
    data = {**extras, **data} if draw(st.booleans()) else {**data, **extras}
    raw = orjson.dumps(data)
    if max_depth > 1 and draw(st.integers(0, 3)) == 0:
        depth = draw(_depths(max_depth))
        kind = draw(st.sampled_from(("list", "dict", "mixed")))
        data["_deep"] = nested(depth, kind)
        raw = raw[:-1] + (b"," if len(raw) > 2 else b"") + b'"_deep":' \
            + nested_text(depth, kind) + b"}"
    return name, data, raw


PRODUCER_CHANNELS = st.one_of(st.sampled_from(CHANNEL_NAMES), st.sampled_from(CHANNEL_NAMES),
                              st.sampled_from(CHANNEL_NAMES), st.sampled_from(OTHER_CHANNELS),
                              texts(0, 30))
SHAPES = st.sampled_from(("fields",) * 6 + ("value", "bytes", "pad"))
MUTATIONS = st.sampled_from(("drop", "replace", "replace", "extra", "event_type", "event_id",
                             "duplicate", "rename"))
DAMAGE = st.sampled_from(("none",) * 6 + ("truncate", "flip", "insert", "wrap"))
KEY_TEXTS = st.builds(lambda k: json.dumps(k).encode("utf-8", "surrogatepass"),
                      st.text(max_size=12))
EVENT_TYPE_TEXTS = st.one_of(
    st.sampled_from(tuple(sorted({t for c in CHANNELS.values() for t in c.event_types}))).map(
        orjson.dumps), value_texts)
EVENT_ID_TEXTS = st.one_of(texts(1, 64).map(orjson.dumps),
                           st.sampled_from((b'""', b'"' + b"x" * 65 + b'"')), value_texts)


@st.composite
def hostile_producer_messages(draw: st.DrawFn) -> tuple[str, bytes]:
    """C{(channel name, raw)}: anything a broken or hostile producer might publish."""
    name = draw(PRODUCER_CHANNELS)
    shape = draw(SHAPES)
    if shape == "value":
        return name, draw(value_texts)
    if shape == "bytes":
        return name, draw(st.binary(max_size=300))

    # A valid message of this channel (or, sometimes, another one), as
    # (key text, value text) pairs, mutated one field at a time.
    base = CHANNELS.get(name) or CHANNELS[draw(st.sampled_from(CHANNEL_NAMES))]
    if draw(st.integers(0, 4)) == 0:
        base = CHANNELS[draw(st.sampled_from(CHANNEL_NAMES))]
    valid = draw(VALID_FIELDS[base.name])
    items = [(orjson.dumps(k), orjson.dumps(v)) for k, v in valid.items()]
    for _ in range(draw(st.integers(0, 4))):
        mutation = draw(MUTATIONS)
        at = draw(st.integers(0, max(0, len(items) - 1)))
        if mutation == "drop" and items:
            del items[at]
        elif mutation == "replace" and items:
            items[at] = (items[at][0], draw(value_texts))
        elif mutation == "extra":
            items.insert(at, (draw(KEY_TEXTS), draw(value_texts)))
        elif mutation == "event_type":
            items.insert(at, (b'"event_type"', draw(EVENT_TYPE_TEXTS)))
        elif mutation == "event_id":
            items.insert(at, (b'"event_id"', draw(EVENT_ID_TEXTS)))
        elif mutation == "duplicate" and items:
            items.insert(draw(st.integers(0, len(items))), (items[at][0], draw(value_texts)))
        elif mutation == "rename" and items:
            key = orjson.loads(items[at][0])
            variant = draw(st.sampled_from(("upper", "capitalize", "space", "nul")))
            key = {"upper": key.upper(), "capitalize": key.capitalize(), "space": key + " ",
                   "nul": key + "\u0000"}[variant]
            items[at] = (orjson.dumps(key), items[at][1])
    separator = draw(st.sampled_from((b",", b", ", b" ,\n\t")))
    raw = b"{" + separator.join(k + b":" + v for k, v in items) + b"}"
    if shape == "pad":
        # Grow the message to about MAX_EVENT_BYTES, just under or just over.
        target = draw(st.integers(MAX_EVENT_BYTES - 64, MAX_EVENT_BYTES + 64))
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


# ---------------------------------------------------------------- the reference validator

STRICT_SYMBOL = re.compile(r"[A-Z0-9.\-]{1,10}")


def _number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _short_text(value: Any) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= 256


FIELD_RULES: dict[str, Callable[[Any], bool]] = {
    "symbol": lambda v: isinstance(v, str) and STRICT_SYMBOL.fullmatch(v) is not None,
    "pattern": _short_text,
    "job_id": _short_text,
    "service": _short_text,
    "confidence": lambda v: _number(v) and 0 <= v <= 1,
    "progress": lambda v: _number(v) and 0 <= v <= 1,
    "timestamp": lambda v: _number(v) and v > 0,
    "price": lambda v: _number(v) and v > 0,
    "volume": lambda v: _number(v) and v >= 0,
    "results": lambda v: isinstance(v, dict) and all(
        _number(v.get(k)) for k in ("win_rate", "roi", "sharpe_ratio", "max_drawdown")),
    "completed_at": lambda v: (_number(v) and v > 0) or _short_text(v),
    "health.status": lambda v: v in ("healthy", "degraded", "down"),
    "backtests.status": _short_text,
}
"""The contract's rule for each required field, written independently of events.py."""


def field_rule(channel: events.Channel, name: str) -> Callable[[Any], bool]:
    rule = FIELD_RULES.get(f"{channel.topic}.{name}") or FIELD_RULES.get(name)
    assert rule is not None, f"test_fuzz has no reference rule for {channel.topic}.{name}: add one"
    return rule


def reference_verdict(channel_name: str, raw: bytes) -> str | None:
    """The C{kind} the contract refuses C{raw} with, or L{None} if it must be accepted."""
    channel = CHANNELS.get(channel_name)
    if channel is None:
        return "unknown_channel"
    if len(raw) > MAX_EVENT_BYTES:
        return "oversized"
    try:
        data = orjson.loads(raw)  # the JSON grammar itself is orjson's (RFC 8259)
    except orjson.JSONDecodeError:
        return "not_json"
    if not isinstance(data, dict):
        return "not_object"
    event_type = data.get("event_type", channel.event_types[0])
    if not _short_text(event_type) or (
            channel.topic != "universe" and event_type not in channel.event_types):
        return "bad_event_type"
    for name, _ in channel.required:
        if name not in data:
            return "missing_field"
        if not field_rule(channel, name)(data[name]):
            return "bad_field"
    producer_id = data.get("event_id")
    if producer_id is not None and not (isinstance(producer_id, str)
                                        and 1 <= len(producer_id) <= 64):
        return "bad_field"
    return None


def unpinned(verdict: str | None, raw: bytes) -> bool:
    """Whether C{raw} is a JSON object nested deeper than L{PINNED_DEPTH}: any refusal will do."""
    return verdict not in ("unknown_channel", "oversized", "not_json", "not_object") and \
        depth_of(orjson.loads(raw)) > PINNED_DEPTH


def assert_event_contract(channel_name: str, raw: bytes, event: Event, event_id: str,
                          now: float) -> None:
    """An accepted event is what the producer sent, valid, and described right."""
    channel = CHANNELS[channel_name]
    assert len(raw) <= MAX_EVENT_BYTES
    sent = orjson.loads(raw)
    assert isinstance(event.data, dict) and same(event.data, sent), "fields must pass unchanged"
    for name, _ in channel.required:
        assert name in event.data and field_rule(channel, name)(event.data[name]), name
    for value in walk(event.data):
        if isinstance(value, float):
            assert math.isfinite(value), value
    assert (event.id, event.channel, event.topic, event.received_at) == (
        event_id, channel.name, channel.topic, now)
    assert event.type == sent.get("event_type", channel.event_types[0])
    assert event.symbol == (sent["symbol"] if channel.keyed_by_symbol else None)
    assert event.job_id == (sent.get("job_id") if channel.topic == "backtests" else None)
    assert event.user is None


# ---------------------------------------------------------------- the properties


DEEP_REQUIRED = b'{"symbol":' + nested_text(1000, "list") + b"}"


@settings(FUZZ, max_examples=EVENT_HOSTILE_CASES)
@given(message=hostile_producer_messages(), event_id=texts(1, 24))
@example(message=("tickstock.events.patterns", DEEP_REQUIRED), event_id="1-0")
@example(message=("tickstock.events.patterns", b'{"event_type":' + nested_text(1000, "list")
                  + b"}"), event_id="1-0")
def test_parse_event_accepts_or_refuses_only_as_the_contract_says(
        message: tuple[str, bytes], event_id: str) -> None:
    """
    Any message on any channel: an Event that meets the contract, or a
    MalformedEvent of the kind the reference validator predicts; never any
    other exception.
    """
    channel_name, raw = message
    expected = reference_verdict(channel_name, raw)
    try:
        with production_stack():
            event = parse_event(channel_name, raw, event_id, NOW)
    except MalformedEvent as error:
        assert isinstance(error.kind, str) and re.fullmatch(r"[a-z_]+", error.kind), error.kind
        assert isinstance(str(error), str)
        assert error.kind == expected or unpinned(expected, raw), (
            error.kind, expected, str(error)[:200])
        return
    assert expected is None, f"accepted, but the contract refuses it: {expected}"
    assert_event_contract(channel_name, raw, event, event_id, NOW)


@settings(FUZZ, max_examples=EVENT_VALID_CASES)
@given(generated=valid_events())
def test_valid_events_are_accepted_unchanged(generated: tuple[str, dict[str, Any], bytes]) -> None:
    """A valid event of any channel is accepted with every field, unknown ones too, as sent."""
    channel_name, data, raw = generated
    assert len(raw) <= MAX_EVENT_BYTES
    with production_stack():
        event = parse_event(channel_name, raw, "1700000000000-0", NOW)
    assert same(event.data, data)
    assert list(event.data) == list(data), "field order is kept"
    channel = CHANNELS[channel_name]
    assert event.type == data.get("event_type", channel.event_types[0])
    assert_event_contract(channel_name, raw, event, "1700000000000-0", NOW)


@settings(FUZZ, max_examples=EVENT_VALID_CASES)
@given(generated=valid_events(max_depth=1023), sub_id=texts(1, 64))
@example(generated=("tickstock.events.patterns",
                    {"symbol": "AAPL", "pattern": "Doji", "confidence": 0.5, "timestamp": 1,
                     "x": nested(300, "list")},
                    b'{"symbol":"AAPL","pattern":"Doji","confidence":0.5,"timestamp":1,"x":'
                    + nested_text(300, "list") + b"}"),
         sub_id="s")
def test_event_frames_round_trip(generated: tuple[str, dict[str, Any], bytes], sub_id: str) -> None:
    """
    The wire frame of an accepted event is JSON carrying the event exactly.
    (Events nested deeper than L{PINNED_DEPTH} may instead be refused.)
    """
    channel_name, data, raw = generated
    with production_stack():
        try:
            event = parse_event(channel_name, raw, "1700000000000-7", NOW)
        except MalformedEvent:
            assert depth_of(data) > PINNED_DEPTH, "a valid event was refused"
            return
        frame = orjson.loads(event.frame(sub_id))
    assert list(frame) == ["op", "sub", "id", "type", "data"]
    assert (frame["op"], frame["sub"], frame["id"], frame["type"]) == (
        "event", sub_id, "1700000000000-7", event.type)
    assert same(frame["data"], data)
    # The encoded tail is shared by every subscription: another one's frame differs only in sub.
    other = orjson.loads(event.frame(sub_id + "2"))
    assert other["sub"] == sub_id + "2" and same(other["data"], data)


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
            assert reply["code"] != "internal", f"a client request caused an internal error: {reply}"
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

    def publish(self, channel: str, data: dict[str, Any]) -> None:
        """A producer event, through the router and history to live delivery."""
        data = {k: self.resolve(v) for k, v in data.items()}
        d = self.router.receive(channel, orjson.dumps(data))
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
topics = st.one_of(st.sampled_from(TOPICS), st.sampled_from(TOPICS),
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


SUBSCRIBED_TOPICS = st.sampled_from(("patterns",) * 3 + ("market_state", "ticks") * 2 + TOPICS)


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
    def to_action(generated: tuple[str, dict[str, Any], bytes]) -> tuple[Any, ...]:
        channel, data, _ = generated
        if CHANNELS[channel].topic == "backtests":
            data = {**data, "job_id": Ref("job")}
        return ("event", channel, data)

    # Mostly the channels clients subscribe to with symbol filters.
    weighted = tuple(name for name, channel in CHANNELS.items()
                     for _ in range(3 if channel.keyed_by_symbol else 1))
    return valid_events(max_depth=4, symbol_pool=tuple(SYMBOL_POOL), channels=weighted).map(
        to_action)


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
            parsed = parsed.replace(tzinfo=timezone.utc)
        value = parsed.timestamp()
    else:
        return None
    return value if 0 <= value <= TIME_MAX else None


def _ref_printable(text: str) -> bool:
    return all(c == " " or unicodedata.category(c)[0] not in "CZ" for c in text)


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
        return 1 <= len(text) <= 256 and _ref_printable(text), text
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

PRINTABLE = st.characters(codec="utf-8", exclude_categories=("C", "Z"))


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
            "ohlcv": {"symbol", "bars"}, "universes": {"universes"}, "jobs": {"jobs", "next_cursor"},
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
                                  b"application/json-patch+json", b"application/x-www-form-urlencoded"]))
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
