"""
Tests for C{docs/asyncapi.yaml}: the message document must stay true to the
code. The producer channels (by Redis name, against the registry of
L{tickstock.domain.topics}), the WebSocket ops, the error codes and the limits are
compared with the modules that implement them, and concrete messages (the
documented examples, accepted and refused, and edge values) are run both
through the documented JSON Schemas and through the real code
(L{tickstock.ingest.normalize.parse_event}, L{tickstock.deliver.gateway.Gateway} with a real
L{tickstock.jobs.backtests.Jobs}), which must agree.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from twisted.internet import defer, task
from zope.interface import implementer

from tickstock.deliver import broadcast, gateway
from tickstock.deliver.auth import Authenticate, Identity, Permissions, anonymous
from tickstock.deliver.broadcast import Broadcaster
from tickstock.deliver.gateway import Gateway
from tickstock.domain import events
from tickstock.domain.events import MalformedEvent
from tickstock.domain.interfaces import IClient, IProducerLink
from tickstock.domain.jobs import JOB_PATTERNS
from tickstock.domain.topics import (
    CONTROL_CHANNEL,
    DEFAULT_CHANNELS,
    DEFAULT_REGISTRY,
    JOBS_CHANNEL,
    TOPICS,
    Channel,
)
from tickstock.history.memory import MemoryHistory
from tickstock.ingest.normalize import Probe, parse_event
from tickstock.ingest.router import Router
from tickstock.jobs import backtests as jobs_module
from tickstock.jobs.backtests import PROGRESS_CHANNEL, Jobs
from tickstock.store.memory import MemoryStore
from tickstock.web import websocket as stream

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
DOC_PATH = ROOT / "docs" / "asyncapi.yaml"
DOC: dict[str, Any] = yaml.safe_load(DOC_PATH.read_text(encoding="utf-8"))
BASE_URI = "urn:tickstock:asyncapi"

CLIENT_OPS = ("hello", "subscribe", "unsubscribe", "submit_backtest", "cancel_job", "refresh",
              "ping")
SERVER_OPS = ("welcome", "subscribed", "unsubscribed", "job_accepted", "job_cancelled", "event",
              "refreshed", "token_expiring", "pong", "error")
RESULTS_CHANNEL = "tickstock.events.backtesting.results"


# ---------------------------------------------------------------- reading the document


def pointer(ref: str) -> Any:
    """The node a local C{$ref} (C{#/a/b}) points at."""
    assert ref.startswith("#/"), f"only local references are used: {ref}"
    node: Any = DOC
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def resolve(node: Any) -> Any:
    """Follow C{$ref}s until a node that is not a reference."""
    while isinstance(node, dict) and "$ref" in node:
        node = pointer(node["$ref"])
    return node


def required_of(schema: Any) -> set[str]:
    """The required property names of a schema, through C{allOf}."""
    schema = resolve(schema)
    required = set(schema.get("required", ()))
    for part in schema.get("allOf", ()):
        required |= required_of(part)
    return required


def properties_of(schema: Any) -> dict[str, dict[str, Any]]:
    """The property schemas of a schema, merged through C{allOf} and C{$ref}."""
    schema = resolve(schema)
    merged: dict[str, dict[str, Any]] = {}
    for part in schema.get("allOf", ()):
        for name, prop in properties_of(part).items():
            merged[name] = {**merged.get(name, {}), **prop}
    for name, prop in schema.get("properties", {}).items():
        merged[name] = {**merged.get(name, {}), **resolve(prop), **{
            k: v for k, v in prop.items() if k != "$ref"}}
    return merged


def messages(channel: str, operation: str) -> list[dict[str, Any]]:
    """The message objects of one operation of a channel (C{oneOf} unrolled)."""
    message = resolve(DOC["channels"][channel][operation]["message"])
    return [resolve(m) for m in message.get("oneOf", [message])]


def payload_ref(message: dict[str, Any]) -> str:
    ref = message["payload"]["$ref"]
    assert ref.startswith("#/components/schemas/")
    return ref


def op_of(message: dict[str, Any]) -> str:
    """The C{op} constant a WebSocket message's payload schema fixes."""
    return properties_of(message["payload"])["op"]["const"]


# ---------------------------------------------------------------- JSON Schema validation


@pytest.fixture(scope="module")
def schema_for() -> Callable[..., Any]:
    """
    Make a JSON Schema validator for documented schemas, given as local
    references (C{#/components/schemas/X}); several mean "exactly one of".
    """
    jsonschema = pytest.importorskip("jsonschema")
    referencing = pytest.importorskip("referencing")
    from referencing.jsonschema import DRAFT7

    registry = referencing.Registry().with_resource(
        BASE_URI, referencing.Resource.from_contents(DOC, default_specification=DRAFT7)
    )

    def make(*refs: str) -> Any:
        targets = [{"$ref": BASE_URI + ref} for ref in refs]
        schema = targets[0] if len(targets) == 1 else {"oneOf": targets}
        return jsonschema.Draft7Validator(
            schema, registry=registry,
            format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER,
        )

    return make


def channel_validator(schema_for: Callable[..., Any], channel: str) -> Any:
    """A validator for the events the producer sends on C{channel}."""
    return schema_for(payload_ref(event_message(channel)))


def channel_validator_subscribe(schema_for: Callable[..., Any], channel: str) -> Any:
    """A validator for what TickStock sends on C{channel}."""
    (message,) = messages(channel, "subscribe")
    return schema_for(payload_ref(message))


def client_validator(schema_for: Callable[..., Any]) -> Any:
    return schema_for(*(payload_ref(m) for m in messages("/ws", "publish")))


def server_validator(schema_for: Callable[..., Any]) -> Any:
    return schema_for(*(payload_ref(m) for m in messages("/ws", "subscribe")))


# ---------------------------------------------------------------- a gateway with fakes


@implementer(IClient)
class FakeClient:
    """A connection that keeps what it is sent, decoded as a client would."""

    def __init__(self) -> None:
        self.user: str | None = None
        self.replies: list[dict[str, Any]] = []
        self.frames: list[dict[str, Any]] = []
        self.closed: list[tuple[int, str]] = []

    dialect = None

    def frame(self, event: Any, sub_id: str) -> bytes:
        return bytes(event.frame(sub_id))

    def send(self, prepared: Any, key: Any = None) -> None:
        self.frames.append(orjson.loads(prepared))

    def reply(self, message: dict[str, Any]) -> None:
        self.replies.append(orjson.loads(orjson.dumps(message)))

    def close(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))


@implementer(IProducerLink)
class FakeLink:
    """A producer link that records jobs, or fails like an unreachable Redis."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.dead: list[tuple[str, bytes, str]] = []

    def publish(self, channel: str, payload: bytes) -> defer.Deferred[Any]:
        if self.fail:
            return defer.fail(ConnectionError("redis is down"))
        self.published.append((channel, orjson.loads(payload)))
        return defer.succeed(1)

    def dead_letter(self, channel: str, raw: bytes, reason: str) -> None:
        self.dead.append((channel, raw, reason))


class Session:
    """
    One client connection to a gateway built from fakes: the real L{Jobs}
    over a memory store and history, publishing to a L{FakeLink}, with
    TickStock's own job events entering through the real L{Router}.
    """

    def __init__(self, *, fail_publish: bool = False, max_subscriptions: int = 100,
                 per_user: int = 3, timeout: float = 300.0,
                 authenticate: Authenticate = anonymous) -> None:
        self.clock = task.Clock()
        self.clock.advance(1700000000.0)
        self.link = FakeLink(fail=fail_publish)
        self.history = MemoryHistory(self.clock, 100, 3600, 100)
        self.broadcaster = Broadcaster(lambda frame: frame)
        self.history.listen(self.broadcaster.deliver)
        self.router = Router(self.clock, self.history, self.link)
        self.jobs = Jobs(self.clock, MemoryStore(self.clock), self.history, self.link,
                         self.router.receive, per_user=per_user, timeout=timeout)
        self.gateway = Gateway(self.clock, self.broadcaster, self.history, authenticate,
                               max_subscriptions, hello_timeout=10.0, jobs=self.jobs)
        self.client = FakeClient()
        self.gateway.opened(self.client)

    def send(self, message: Any) -> dict[str, Any]:
        """Send one message (a dict, or raw bytes); return the reply."""
        raw = message if isinstance(message, bytes) else orjson.dumps(message)
        before = len(self.client.replies)
        self.gateway.receive(self.client, raw)
        assert len(self.client.replies) == before + 1, "every request gets one reply"
        return self.client.replies[-1]


    def published(self, channel: str) -> list[dict[str, Any]]:
        """What the gateway's jobs published on C{channel}, in order."""
        return [message for name, message in self.link.published if name == channel]


def greeted(**kwargs: Any) -> Session:
    session = Session(**kwargs)
    assert session.send({"op": "hello", "user": "alice"})["op"] == "welcome"
    return session


# ---------------------------------------------------------------- the document itself


def test_document_is_asyncapi_2_6() -> None:
    """The file is an AsyncAPI 2.6 document with the Redis and WebSocket servers."""
    assert DOC["asyncapi"] == "2.6.0"
    assert {"title", "version"} <= set(DOC["info"])
    assert DOC["servers"]["redis"]["protocol"] == "redis"
    assert DOC["servers"]["websocket"]["protocol"] == "ws"
    for name, channel in DOC["channels"].items():
        assert set(channel) & {"publish", "subscribe"}, f"{name} has no operation"
        assert set(channel["servers"]) <= set(DOC["servers"])


def test_every_reference_resolves() -> None:
    """Every C{$ref} in the document points at something that exists."""
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                pointer(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(DOC)


# ---------------------------------------------------------------- docs/contract.md §1 and §2: Redis


NAMED_CHANNELS = [channel for channel in DEFAULT_CHANNELS if channel.redis]
PRODUCER_CHANNELS: dict[str, dict[str, Any]] = {
    name: channel for name, channel in DOC["channels"].items() if "x-tickstock-topic" in channel}
"""The documented producer channels, by Redis name (a pattern's C{*} written C{{symbol}})."""
NOW = 1_700_000_000.0


def documented_name(redis_name: str) -> str:
    return redis_name.replace("*", "{symbol}")


def concrete(name: str) -> str:
    """A Redis name a message may come on, for a documented one (a parameter filled in)."""
    return re.sub(r"\{[a-z_]+\}", "MSFT", name)


def event_message(name: str) -> dict[str, Any]:
    """The message of documented producer channel C{name} that makes events (not the probe)."""
    (message,) = [m for m in messages(name, "publish") if m["name"] != "probe"]
    return message


def examples_of(message: dict[str, Any]) -> list[dict[str, Any]]:
    assert message.get("examples"), f"{message['name']} has no example"
    return [example["payload"] for example in message["examples"]]


def unwrapped(channel: Channel, message: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """
    The path the payload of C{message} is unwrapped from (C{flat}: none), and
    the objects from the message down to the payload, as docs/producers.md
    says: the first of the channel's paths that leads to an object.
    """
    for path in channel.unwrap:
        chain = [message]
        for part in path.split("."):
            inner = chain[-1].get(part)
            if not isinstance(inner, dict):
                break
            chain.append(inner)
        else:
            return path, chain
    return "flat", [message]


def code_verdict(redis_name: str, message: Any) -> str:
    """What the normalizer makes of C{message}: C{event}, C{probe} or C{refused}."""
    try:
        parse_event(redis_name, orjson.dumps(message), "1-0", NOW)
    except Probe:
        return "probe"
    except MalformedEvent:
        return "refused"
    return "event"


def schema_verdict(schema_for: Callable[..., Any], name: str) -> Callable[[Any], str]:
    """What the documented schemas of producer channel C{name} make of a message."""
    probe = schema_for("#/components/schemas/ProbeMessage")
    event = schema_for(payload_ref(event_message(name)))
    return lambda message: ("probe" if probe.is_valid(message)
                            else "event" if event.is_valid(message) else "refused")


def test_producer_channels_are_exactly_the_registrys() -> None:
    """
    The producer channels in the document are exactly the Redis names of
    L{tickstock.domain.topics.DEFAULT_CHANNELS} (a pattern as a parameterized
    channel): none missing, none stale. Each says which channel of the
    registry and which topic it feeds; a channel's own entry names its other
    Redis names, and theirs name it. The channel fed from PostgreSQL, which
    has no Redis name, is named in the document's description.
    """
    redis_names = {name for channel in NAMED_CHANNELS for name in channel.redis}
    assert redis_names == set(DEFAULT_REGISTRY.names) | set(DEFAULT_REGISTRY.patterns)
    assert set(PRODUCER_CHANNELS) == {documented_name(name) for name in redis_names}
    for name, documented in PRODUCER_CHANNELS.items():
        channel = DEFAULT_REGISTRY.by_redis_name(concrete(name))
        assert channel is not None, name
        assert "subscribe" not in documented, "TickStock only consumes producer channels"
        assert documented["x-tickstock-channel"] == channel.name
        assert documented["x-tickstock-topic"] == channel.topic
        assert f"**{channel.topic}**" in documented["description"]
        others = {documented_name(n) for n in channel.redis} - {name}
        if name == channel.name:
            for other in others:
                assert f"`{other}`" in documented["description"], (name, other)
        else:
            assert f"`{channel.name}`" in documented["description"], name
        if "{" in name:
            assert documented["x-redis-pattern"] == re.sub(r"\{[a-z_]+\}", "*", name)
            assert set(documented["parameters"]) == set(re.findall(r"\{([a-z_]+)\}", name))
            assert "PSUBSCRIBE" in documented["description"]
    unnamed = [channel.name for channel in DEFAULT_CHANNELS if not channel.redis]
    assert unnamed == ["tickstock.db.events"]
    for name in unnamed:
        assert f"`{name}`" in DOC["info"]["description"]


@pytest.mark.parametrize("channel", NAMED_CHANNELS, ids=lambda channel: channel.name)
def test_each_channel_documents_its_shapes_and_delivery(channel: Channel) -> None:
    """
    Every Redis name of a channel takes the same two messages: the
    channel's events (named by their type) and the probe. The event
    message's payload is a oneOf with one shape per place the payload may
    sit, titled by its unwrap path, and a flat one. The channel's own entry
    says its delivery class.
    """
    names = [documented_name(name) for name in channel.redis]
    for name in names:
        assert sorted(m["name"] for m in messages(name, "publish")) == sorted(
            [channel.event_type, "probe"]), name
        assert event_message(name) is event_message(names[0])
    shapes = resolve(event_message(names[0])["payload"])["oneOf"]
    assert sorted(shape["title"] for shape in shapes) == sorted(["flat", *channel.unwrap])
    description = PRODUCER_CHANNELS[channel.name]["description"]
    assert ("latest-only" in description) is channel.latest_only
    assert ("must-deliver" in description) is not channel.latest_only


def test_every_example_normalizes_to_an_event_of_its_topic(
    schema_for: Callable[..., Any],
) -> None:
    """
    Every example of every producer channel, on each of its Redis names,
    is normalized to an event of the channel and topic documented there
    (of the message's type, on a channel whose types are not the
    producer's), matching the shape of the path it was unwrapped from; as
    an C{event} frame it is a valid server message with the canonical
    fields of its type.
    """
    server = server_validator(schema_for)
    count = 0
    for name, documented in PRODUCER_CHANNELS.items():
        channel = DEFAULT_REGISTRY.by_redis_name(concrete(name))
        assert channel is not None
        message = event_message(name)
        ref = payload_ref(message)
        titles = [shape["title"] for shape in resolve(message["payload"])["oneOf"]]
        for example in examples_of(message):
            event = parse_event(concrete(name), orjson.dumps(example), "1-0", NOW)
            assert (event.channel, event.topic) == (
                documented["x-tickstock-channel"], documented["x-tickstock-topic"])
            if not channel.open_type:
                assert event.type == message["name"]
            path, _ = unwrapped(channel, example)
            schema_for(f"{ref}/oneOf/{titles.index(path)}").validate(example)
            frame = orjson.loads(event.frame("s1"))
            errors = [e.message for e in server.iter_errors(frame)]
            assert not errors, (name, example, errors)
            assert isinstance(frame["data"]["timestamp"], float)
            count += 1
    assert count >= 60


def test_every_refused_example_is_refused_with_its_reason(
    schema_for: Callable[..., Any],
) -> None:
    """
    Every C{x-refused} example of a producer message is refused by the
    normalizer on each Redis name that takes it, with exactly the documented
    reason (C{<kind>: <detail>}, as in the dead letter), and by the
    documented schema; so is the dead-letter record's example.
    """
    kinds: set[str] = set()
    for name in PRODUCER_CHANNELS:
        message = event_message(name)
        verdict = schema_verdict(schema_for, name)
        for refused in message.get("x-refused", ()):
            raw = refused["raw"].encode() if "raw" in refused else orjson.dumps(
                refused["payload"])
            with pytest.raises(MalformedEvent) as caught:
                parse_event(concrete(name), raw, "1-0", NOW)
            assert f"{caught.value.kind}: {caught.value}" == refused["reason"], name
            assert verdict(orjson.loads(raw)) == "refused", (name, refused["name"])
            kinds.add(caught.value.kind)
    assert kinds == {"missing_field", "bad_field", "bad_timestamp", "bad_event_type",
                     "not_object"}
    for example in DOC["components"]["messages"]["DeadLetter"]["examples"]:
        letter = example["payload"]
        with pytest.raises(MalformedEvent) as caught:
            parse_event(letter["channel"], letter["raw"].encode(), "1-0", NOW)
        assert f"{caught.value.kind}: {caught.value}" == letter["reason"]


def test_probes_are_documented_on_every_channel(schema_for: Callable[..., Any]) -> None:
    """
    The documented probes are probes on every producer channel (counted,
    not delivered), and valid as the documented C{ProbeMessage}.
    """
    probe = schema_for("#/components/schemas/ProbeMessage")
    examples = examples_of(DOC["components"]["messages"]["Probe"])
    assert {"test", "event_type"} <= {key for example in examples for key in example}
    for name in PRODUCER_CHANNELS:
        assert "probe" in [m["name"] for m in messages(name, "publish")]
        for example in examples:
            assert code_verdict(concrete(name), example) == "probe", (name, example)
            probe.validate(example)


def test_documented_canonical_events_are_what_the_normalizer_makes() -> None:
    """
    The C{event} examples that say which producer example they are
    normalized from have exactly the C{data} the normalizer makes of it;
    the C{type}s whose C{data} the C{event} schema details are exactly the
    types of the channels whose types are not the producer's.
    """
    documented = DOC["components"]["messages"]
    compared = 0
    for example in documented["Event"]["examples"]:
        origin = example.get("x-normalized-from")
        if origin is None:
            continue
        (source,) = [e["payload"] for e in documented[origin["message"]]["examples"]
                     if e.get("name") == origin["example"]]
        name = next(name for name in PRODUCER_CHANNELS
                    if event_message(name) is documented[origin["message"]])
        event = parse_event(concrete(name), orjson.dumps(source), "1-0", NOW)
        assert example["payload"]["data"] == event.data
        assert example["payload"]["type"] == event.type
        compared += 1
    assert compared >= 3
    server_event = resolve({"$ref": "#/components/schemas/ServerEvent"})
    detailed: set[str] = set()
    for rule in server_event["allOf"]:
        condition = rule["if"]["properties"]["type"]
        detailed |= {condition["const"]} if "const" in condition else set(condition["enum"])
    assert detailed == {c.event_type for c in DEFAULT_CHANNELS if not c.open_type}


FIGURES = {"win_rate": 0.5, "roi": 0.1, "sharpe_ratio": 1.2, "max_drawdown": -0.2}
REMOVED = object()
EDGES: dict[str, list[Any]] = {
    "symbol": [" msft ", "brk.b", "NOT/A/SYMBOL", "", "ABCDEFGHIJK", 5, None],
    "ticker": ["qqq", "S&P 500", None],
    "sym": ["dia", "A B"],
    "pattern": ["Doji", "", "x" * 257, 5, None],
    "pattern_name": ["", "Hammer"],
    "pattern_type": [5],
    "name": ["", "RSI"],
    "confidence": [0, 1, "0.5", " .5 ", "1.0", 1.5, "1.5", -0.1, True, "high", None],
    "progress": [0, 1, 40, "50", 100, 100.5, "150", -1, None],
    "price": [0.01, "189.5", 0, "0", -1, False, None],
    "volume": [0, "10", -1, "-1", None],
    "job_id": [7, 1.5, "", "x" * 257, True, None],
    "status": ["whatever", "completed", "failed", "", 5, None],
    "service": ["svc", "", 5, None],
    "source": ["svc", "", 5, None],
    "component": ["", "worker"],
    "indicator": ["RSI", "", None],
    "indicator_type": [""],
    "value": [0, "x", None],
    "values": [{}, [1], None],
    "alert_type": ["x", "", None],
    "type_of_alert": ["", "cross"],
    "results": [None, "x", FIGURES, {**FIGURES, "roi": "0.1"}, {**FIGURES, "roi": None},
                {**FIGURES, "roi": True}, {k: v for k, v in FIGURES.items() if k != "roi"}],
    "timestamp": [1697400000, 1697400000250, "1697400000.5", "2025-10-15T20:39:28Z",
                  "2025-10-15T22:39:28+02:00", "2025-10-15T20:39:28.236000", "2025-10-15",
                  " 2025-10-15 20:39 ", None, "yesterday", "10:00", "", "0", 0, -5, True, [1]],
    "event_id": ["x" * 64, "x" * 65, "", 5, None],
    "event_type": ["anything_new", "", "x" * 256, "x" * 257, "a\nb", 5, "health_check"],
    "test": ["health_check"],
}
"""Values each field of a payload is set to (and removed): the normalizer decides."""
OUTER = {"event_type", "test"}
"""Fields set on the message itself rather than the payload: the type word and the
probe are read from the outer level first."""
EVERY_LEVEL = {"timestamp", "event_id", *OUTER}
"""Fields the schemas check on every level; the others are the payload's."""


@pytest.mark.parametrize("channel", NAMED_CHANNELS, ids=lambda channel: channel.name)
def test_producer_schemas_agree_with_the_normalizer_on_edge_values(
    schema_for: Callable[..., Any], channel: Channel,
) -> None:
    """
    Each documented example of a channel, with one field set to an edge
    value of L{EDGES} (in the payload; the type word and C{test} on the
    message) or removed from every level, is a probe, an event or refused
    for the documented schemas exactly as for the normalizer: a field the
    channel requires, its aliases, its defaults, its number and timestamp
    forms, and the fields it leaves unchecked (a tick's C{confidence}).
    Payload fields sit in the payload, as the schemas say (the normalizer
    would also take one from beside it).
    """
    verdict = schema_verdict(schema_for, channel.name)
    seen: Counter[str] = Counter()
    for example in examples_of(event_message(channel.name)):
        for field, values in EDGES.items():
            for value in (*values, REMOVED):
                message = orjson.loads(orjson.dumps(example))
                _, chain = unwrapped(channel, message)
                for level in chain[:-1]:
                    for name in EDGES.keys() - EVERY_LEVEL:
                        level.pop(name, None)
                if value is REMOVED:
                    for level in chain:
                        level.pop(field, None)
                else:
                    chain[0 if field in OUTER else -1][field] = value
                expected = code_verdict(channel.redis[0], message)
                assert verdict(message) == expected, (field, value, message)
                seen[expected] += 1
    assert set(seen) == {"event", "probe", "refused"}


PRODUCER_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("tickstock.events.patterns", {"event_type": "pattern_detected", "symbol": "AAPL",
     "pattern": "Doji", "confidence": 0.87, "timestamp": 1700000000.5}, "event"),
    ("tickstock.events.patterns", {"symbol": "BRK.B", "pattern": "Hammer", "confidence": 1,
     "timestamp": 1700000000, "event_id": "x" * 64, "extra": {"kept": True}}, "event"),
    ("tickstock.events.patterns", {"symbol": "AAPL", "pattern": "Doji", "confidence": 1.5,
     "timestamp": 1700000000}, "refused"),
    ("tickstock.events.patterns", {"symbol": "AAPL", "pattern": "Doji", "confidence": -0.1,
     "timestamp": 1700000000}, "refused"),
    ("tickstock.events.patterns", {"symbol": "AAPL", "pattern": "Doji", "confidence": True,
     "timestamp": 1700000000}, "refused"),
    ("tickstock.events.patterns", {"symbol": "aapl", "pattern": "Doji", "confidence": 0.5,
     "timestamp": 1700000000}, "event"),
    ("tickstock.events.patterns", {"symbol": "ABCDEFGHIJK", "pattern": "Doji",
     "confidence": 0.5, "timestamp": 1700000000}, "refused"),
    ("tickstock.events.patterns", {"pattern": "Doji", "confidence": 0.5,
     "timestamp": 1700000000}, "refused"),
    ("tickstock.events.patterns", {"symbol": "AAPL", "pattern": "", "confidence": 0.5,
     "timestamp": 1700000000}, "refused"),
    ("tickstock.events.patterns", {"symbol": "AAPL", "pattern": "Doji", "confidence": 0.5,
     "timestamp": 1700000000, "event_id": "x" * 65}, "refused"),
    ("tickstock.events.patterns", {"event_type": "tick", "symbol": "AAPL", "pattern": "Doji",
     "confidence": 0.5, "timestamp": 1700000000}, "event"),
    ("tickstock.events.patterns", {"symbol": "AAPL", "pattern": "Doji", "confidence": 0.5,
     "timestamp": 0}, "refused"),
    ("tickstock.events.patterns", {"data": "text", "symbol": "AAPL", "pattern": "Doji",
     "confidence": 0.5}, "event"),
    ("tickstock.events.patterns", {"data": {"data": [1], "symbol": "AAPL", "pattern": "Doji",
     "confidence": 0.5}}, "event"),
    ("tickstock.events.patterns", {"data": {"symbol": "AAPL", "pattern": "Doji"},
     "detection": {"symbol": "AAPL", "pattern": "Doji", "confidence": 0.5}}, "refused"),
    ("tickstock:patterns:detected", {"detection": {"symbol": "AAPL", "pattern_type": "Doji",
     "confidence": "0.5"}}, "event"),
    ("tickstock:patterns:streaming", {"sym": "aapl", "name": "Doji", "confidence": 0},
     "event"),
    ("tickstock:patterns:streaming", {"sym": "A B", "name": "Doji", "confidence": 0},
     "refused"),
    ("tickstock.events.market_state", {"event_type": "stage_change", "symbol": "MSFT",
     "timestamp": 1700000000, "metric": "stage", "from_stage": 1, "to_stage": 2}, "event"),
    ("tickstock.events.market_state", {"event_type": "price_change", "symbol": "MSFT",
     "timestamp": 1700000000}, "event"),
    ("tickstock.events.market_state", {"event_type": "x" * 257}, "refused"),
    ("tickstock.events.market_state", {"timestamp": 1760560768236}, "event"),
    ("tickstock.events.market_state", {"timestamp": "2025-10-15T20:39:28Z"}, "event"),
    ("tickstock.events.market_state", {"timestamp": "yesterday"}, "refused"),
    ("tickstock.events.market_state", {"event_type": "health_check", "symbol": "AAPL"},
     "probe"),
    ("tickstock.events.market_state", {"test": "health_check", "timestamp": 1}, "probe"),
    ("tickstock.events.market_state", {"test": "x", "symbol": "AAPL"}, "event"),
    ("tickstock.events.market_state", {"test": 5}, "event"),
    ("tickstock.events.market_state", {"sym": "bad/"}, "refused"),
    ("tickstock.events.backtesting.progress", {"job_id": "j1", "progress": 0.5,
     "status": "running", "timestamp": 1700000000}, "event"),
    ("tickstock.events.backtesting.progress", {"job_id": "j1", "progress": 2,
     "status": "running", "timestamp": 1700000000}, "event"),
    ("tickstock.events.backtesting.progress", {"job_id": "j1", "progress": 0.5,
     "timestamp": 1700000000}, "event"),
    ("tickstock.events.backtesting.results", {"job_id": "j1", "results": FIGURES,
     "completed_at": "2023-12-31T00:00:00Z"}, "event"),
    ("tickstock.events.backtesting.results", {"job_id": "j1", "results": {
        "win_rate": 0.5, "roi": 0.1, "max_drawdown": -0.2}, "completed_at": 1700000000},
     "refused"),
    ("tickstock.events.backtesting.results", {"job_id": "j1", "status": "failed"}, "event"),
    ("tickstock.events.backtesting.results", {"job_id": "j1", "status": "failed",
     "results": {"roi": 0}}, "event"),
    ("tickstock.health.status", {"service": "tickstockpl", "status": "degraded",
     "timestamp": 1700000000}, "event"),
    ("tickstock.health.status", {"service": "tickstockpl", "status": "ok",
     "timestamp": 1700000000}, "event"),
    ("tickstock.health.status", {"component": "db", "status": "down"}, "event"),
    ("tickstock:processing:status", {"payload": {"service": "x", "status": "up"}}, "event"),
    ("tickstock:processing:status", {"payload": {"status": "up"}}, "refused"),
    ("tickstock:streaming:session_started", {}, "event"),
    ("tickstock:streaming:session_stopped", {"source": ""}, "refused"),
    ("tickstock.data.ticks", {"symbol": "AAPL", "price": 189.5, "volume": 0,
     "timestamp": 1700000000}, "event"),
    ("tickstock.data.ticks", {"symbol": "AAPL", "price": 0, "volume": 10,
     "timestamp": 1700000000}, "refused"),
    ("tickstock.data.ticks", {"symbol": "AAPL", "price": 1, "volume": -1,
     "timestamp": 1700000000}, "refused"),
    ("tickstock.ticks.MSFT", {"ticker": "msft", "price": "1.5", "volume": "0",
     "confidence": 7}, "event"),
    ("tickstock:indicators:streaming", {"calculation": {"symbol": "A", "name": "RSI",
     "values": {}}}, "event"),
    ("tickstock:indicators:streaming", {"symbol": "A", "indicator": "RSI", "value": None},
     "refused"),
    ("tickstock:alerts:critical", {"symbol": "AAPL", "type_of_alert": "cross"}, "event"),
    ("tickstock:alerts:indicators", {"alert": {"symbol": "AAPL", "alert_type": ""}},
     "refused"),
    ("tickstock.universe.updated", {"event_type": "anything_new", "timestamp": 1700000000,
     "universe": "dow30", "symbols": ["AAPL"], "symbol": "not a symbol"}, "event"),
    ("tickstock:cache:sync_complete", {"event": "a\tb", "payload": {}}, "refused"),
    ("tickstock.cache.delisting_cleanup", {"symbols": ["XYZ"]}, "event"),
]


@pytest.mark.parametrize("redis_name,payload,outcome", PRODUCER_CASES)
def test_producer_schema_agrees_with_parse_event(
    schema_for: Callable[..., Any], redis_name: str, payload: dict[str, Any], outcome: str,
) -> None:
    """
    A producer message is an event, a probe or refused for the documented
    schemas exactly as for L{parse_event}: e.g. a pattern with confidence
    1.5 is refused by both, one with an unknown extra field is an event
    for both.
    """
    assert code_verdict(redis_name, payload) == outcome, \
        "the case's expectation is wrong about the code"
    (documented,) = [name for name in PRODUCER_CHANNELS if concrete(name) == redis_name]
    assert schema_verdict(schema_for, documented)(payload) == outcome


def test_jobs_channel_is_documented() -> None:
    """
    C{tickstock.jobs.backtest} is documented as sent by TickStock, with every
    field of docs/contract.md §2 required.
    """
    channel = DOC["channels"][JOBS_CHANNEL]
    assert "publish" not in channel
    (message,) = messages(JOBS_CHANNEL, "subscribe")
    assert required_of(message["payload"]) == {
        "job_type", "type", "job_id", "user_id", "symbols", "start_date", "end_date", "patterns",
        "parameters", "source", "timestamp"}
    assert properties_of(message["payload"])["job_type"]["const"] == "backtest"


def test_control_channel_is_documented() -> None:
    """
    C{tickstock.jobs.control} is documented as sent by TickStock (never
    consumed), with exactly the fields of the cancel message required and
    no others allowed.
    """
    channel = DOC["channels"][CONTROL_CHANNEL]
    assert "publish" not in channel and "x-tickstock-topic" not in channel
    (message,) = messages(CONTROL_CHANNEL, "subscribe")
    assert required_of(message["payload"]) == {
        "action", "job_id", "user_id", "reason", "timestamp"}
    assert resolve(message["payload"])["additionalProperties"] is False
    assert properties_of(message["payload"])["action"]["const"] == "cancel"


def test_deadletter_list_is_documented() -> None:
    """The dead-letter list is documented under its Redis key with its record's fields."""
    from tickstock.connections.redis import DEADLETTER_KEY

    channel = DOC["channels"][DEADLETTER_KEY]
    assert channel["x-redis-type"] == "list"
    (message,) = messages(DEADLETTER_KEY, "subscribe")
    assert required_of(message["payload"]) == {"channel", "reason", "at", "raw"}


def test_symbol_pattern_and_limits_match_the_code() -> None:
    """The documented symbol pattern and size limits are the ones the code enforces."""
    schemas = DOC["components"]["schemas"]
    assert schemas["Symbol"]["pattern"] == "^[A-Z0-9.-]{1,10}$"
    for symbol in ("A", "BRK.B", "BF-B", "0123456789", "", "aapl", "TOOLONGNAME", "A B", "A_B"):
        assert bool(re.search(schemas["Symbol"]["pattern"], symbol)) == bool(
            events.SYMBOL.match(symbol)), symbol
    assert schemas["ShortText"]["maxLength"] == events.MAX_STRING
    assert schemas["ProducerEventId"]["maxLength"] == events.MAX_EVENT_ID
    assert str(events.MAX_EVENT_BYTES) in DOC["channels"]["tickstock:deadletter"]["description"]


def test_deadletter_record_matches_schema(schema_for: Callable[..., Any]) -> None:
    """
    What the Redis link pushes to C{tickstock:deadletter} for a refused message
    (here: confidence 1.5) is a record as documented.
    """
    from tickstock.connections.redis import DEADLETTER_KEY, RedisLink
    from tickstock.ingest.router import Router

    link = RedisLink.__new__(RedisLink)  # no connection: only the record is wanted
    link._deadletter_max = 10
    link._reactor = task.Clock()
    link.dead_letters_lost = 0
    commands: list[tuple[Any, ...]] = []
    link.execute = lambda *args: (commands.append(args), defer.succeed(1))[1]

    router = Router(task.Clock(), MemoryHistory(task.Clock(), 10, 60, 10), link)
    raw = b'{"symbol":"AAPL","pattern":"Doji","confidence":1.5,"timestamp":1700000000}'
    router.receive("tickstock.events.patterns", raw)
    router.receive("tickstock.events.patterns", b"\xffnot json")

    pushes = [c for c in commands if c[0] == "LPUSH"]
    assert len(pushes) == 2
    validator = schema_for("#/components/schemas/DeadLetter")
    for _, key, record in pushes:
        assert key == DEADLETTER_KEY
        validator.validate(orjson.loads(record))


def test_job_message_matches_schema(schema_for: Callable[..., Any]) -> None:
    """The job TickStock publishes for a C{submit_backtest} is a valid documented job."""
    session = greeted()
    reply = session.send({"op": "submit_backtest", "id": "r1", "params": {
        "symbols": ["AAPL", "MSFT"], "start_date": "2023-01-01", "end_date": "2023-12-31"}})
    assert reply["op"] == "job_accepted"
    ((channel, job),) = session.link.published
    assert channel == JOBS_CHANNEL
    schema_for("#/components/schemas/BacktestJob").validate(job)
    assert job["job_id"] == reply["job_id"] and job["patterns"] == []
    assert reply["status"] == "queued"


def test_control_messages_match_schema(schema_for: Callable[..., Any]) -> None:
    """
    The cancel TickStock publishes on C{tickstock.jobs.control} after a
    C{cancel_job} (reason C{cancelled}) and after a job timed out (reason
    C{timeout: ...}) is a valid documented C{JobControl}; the final progress
    events TickStock adds for both reach the owner's C{backtests}
    subscription and are valid as the progress channel's schema (which
    L{parse_event} accepts too) and as C{TickStockBacktestProgress}.
    """
    control = channel_validator_subscribe(schema_for, CONTROL_CHANNEL)
    progress = channel_validator(schema_for, PROGRESS_CHANNEL)
    own = schema_for("#/components/schemas/TickStockBacktestProgress")
    session = greeted(timeout=300.0)
    assert session.send({"op": "subscribe", "id": "b", "topic": "backtests"})["op"] == \
        "subscribed"
    first = session.send({"op": "submit_backtest", "id": "r1", "params": SUBMIT})["job_id"]
    second = session.send({"op": "submit_backtest", "id": "r2", "params": SUBMIT})["job_id"]
    reply = session.send({"op": "cancel_job", "id": "c1", "job_id": first})
    assert reply == {"op": "job_cancelled", "id": "c1", "job_id": first}
    session.clock.advance(301)
    session.jobs.sweep()

    sent = session.published(CONTROL_CHANNEL)
    assert [(m["job_id"], m["reason"]) for m in sent] == [
        (first, "cancelled"), (second, "timeout: no progress for 300 s")]
    for message in sent:
        control.validate(message)
        assert message["user_id"] == "alice"

    frames = [f for f in session.client.frames if f["sub"] == "b"]
    assert [(f["data"]["job_id"], f["data"]["status"]) for f in frames] == [
        (first, "cancelled"), (second, "failed")]
    assert frames[1]["data"]["error"] == "timeout: no progress for 300 s"
    for frame in frames:
        data = frame["data"]
        assert frame["type"] == "backtest_progress" and data["source"] == "tickstock"
        progress.validate(data)
        own.validate(data)
        parse_event(PROGRESS_CHANNEL, orjson.dumps(data), "1-0", 1.0)
    assert session.jobs.timed_out == 1


def test_documented_tickstock_progress_examples_are_tickstock_progress(
    schema_for: Callable[..., Any],
) -> None:
    """The documented examples of TickStock's own progress events pass its stricter schema."""
    own = schema_for("#/components/schemas/TickStockBacktestProgress")
    examples = [e["payload"] for e in DOC["components"]["messages"]["BacktestProgress"]["examples"]
                if e["payload"].get("source") == "tickstock"]
    assert {e["status"] for e in examples} == {"cancelled", "failed"}
    for example in examples:
        own.validate(example)


def test_job_lifecycle_is_as_documented() -> None:
    """
    As the progress channel says: progress with status C{completed} leaves
    the job open, the result closes it, and later events of it, or events
    of a job TickStock does not know, are dropped (counted by reason);
    progress with status C{failed} closes a job too.
    """
    description = DOC["channels"][PROGRESS_CHANNEL]["description"]
    for word in ("`completed`", "`failed`", "`cancelled`", "unknown_job", "finished_job",
                 "job_events_dropped", "--job-timeout"):
        assert word in description, word
    session = greeted()
    session.send({"op": "subscribe", "id": "b", "topic": "backtests"})
    first = session.send({"op": "submit_backtest", "id": "r1", "params": SUBMIT})["job_id"]
    second = session.send({"op": "submit_backtest", "id": "r2", "params": SUBMIT})["job_id"]

    def progress(job_id: str, status: str) -> None:
        session.router.receive(PROGRESS_CHANNEL, orjson.dumps(
            {"job_id": job_id, "progress": 1, "status": status, "timestamp": 1700000001}))

    def result(job_id: str) -> None:
        session.router.receive(RESULTS_CHANNEL, orjson.dumps(
            {"job_id": job_id, "results": {"win_rate": 0.5, "roi": 0.1, "sharpe_ratio": 1,
             "max_drawdown": -0.1}, "completed_at": 1700000002}))

    progress(first, "completed")
    progress(first, "running")
    result(first)
    progress(first, "running")
    result(first)
    progress(second, "failed")
    result(second)
    progress("no-such-job", "running")
    delivered = [(f["data"]["job_id"], f["type"], f["data"].get("status"))
                 for f in session.client.frames if f["sub"] == "b"]
    assert delivered == [
        (first, "backtest_progress", "completed"), (first, "backtest_progress", "running"),
        (first, "backtest_result", "completed"), (second, "backtest_progress", "failed")]
    assert dict(session.router.refused) == {"finished_job": 3, "unknown_job": 1}
    assert session.link.dead == []
    reply = session.send({"op": "cancel_job", "id": "c", "job_id": second})
    assert (reply["op"], reply["code"]) == ("error", "job_finished")


# ---------------------------------------------------------------- docs/contract.md §3: WebSocket


def test_every_gateway_op_is_a_documented_client_message() -> None:
    """Every op in L{Gateway._ops} is documented as a client→server message, and no other."""
    documented = {op_of(m) for m in messages("/ws", "publish")}
    assert documented == set(Gateway._ops) == set(CLIENT_OPS)


def test_every_server_message_is_documented() -> None:
    """Each server→client message of docs/contract.md §3 (and C{pong}) is documented."""
    assert {op_of(m) for m in messages("/ws", "subscribe")} == set(SERVER_OPS)


def test_error_codes_match_the_code() -> None:
    """
    The documented error codes are exactly the codes the gateway, the filter
    parser and the jobs service can send (read from their source),
    C{unauthorized} and C{internal} included.
    """
    sources = "".join(
        Path(module.__file__).read_text(encoding="utf-8")
        for module in (gateway, broadcast, stream, jobs_module)
    )
    found = set(re.findall(r'BadRequest\(\s*"([a-z_]+)"', sources))
    found |= set(re.findall(r'JobRefused\(\s*\d+,\s*"([a-z_]+)"', sources))
    found |= set(re.findall(r'"code":\s*"([a-z_]+)"', sources))
    found |= set(re.findall(r'error\.code == "([a-z_]+)"', sources))
    documented = properties_of({"$ref": "#/components/schemas/ServerError"})["code"]["enum"]
    assert set(documented) == found
    assert len(documented) == len(set(documented))


def test_close_codes_are_documented() -> None:
    """The close codes the server uses (1008, 1009, 4001) are documented on C{/ws}."""
    channel = DOC["channels"]["/ws"]
    codes = {entry["code"] for entry in channel["x-close-codes"]}
    assert codes == {gateway.CLOSE_POLICY, 1009, gateway.CLOSE_SLOW_CONSUMER}
    for code in codes:
        assert f"`{code}`" in channel["description"]
    assert "reconnect" in channel["description"]


def test_topics_filters_and_limits_match_the_code() -> None:
    """
    The subscribe topics, the filter fields each topic takes and the list and
    id limits in the document are those of the code.
    """
    subscribe = resolve({"$ref": "#/components/schemas/ClientSubscribe"})
    assert subscribe["properties"]["topic"]["enum"] == list(TOPICS)
    assert {topic: set(fields) for topic, fields in subscribe["x-filter-fields"].items()} == \
        {name: set(topic.filters) for name, topic in TOPICS.items()}
    filter_props = properties_of({"$ref": "#/components/schemas/Filter"})
    assert filter_props["symbols"]["maxItems"] == broadcast.MAX_FILTER_SYMBOLS
    assert filter_props["patterns"]["maxItems"] == broadcast.MAX_FILTER_PATTERNS
    assert DOC["components"]["schemas"]["RequestId"]["maxLength"] == broadcast.MAX_ID_LENGTH
    cancel = properties_of({"$ref": "#/components/schemas/ClientCancelJob"})
    assert cancel["job_id"]["maxLength"] == broadcast.MAX_ID_LENGTH


def test_backtest_params_match_the_code() -> None:
    """
    C{submit_backtest} params: exactly L{tickstock.jobs.backtests.PARAMS}, no others
    (C{additionalProperties: false}), at most L{tickstock.jobs.backtests.MAX_SYMBOLS}
    symbols, none twice; patterns none twice and, as the enum, exactly the
    default known names L{tickstock.config.JOB_PATTERNS}; the year limit,
    which a schema cannot say, in the descriptions.
    """
    submit = resolve({"$ref": "#/components/schemas/ClientSubmitBacktest"})
    params = properties_of(submit)["params"]
    assert params["additionalProperties"] is False
    assert set(params["properties"]) == set(jobs_module.PARAMS)
    assert set(params["required"]) == set(jobs_module.PARAMS) - {"patterns", "parameters"}
    symbols, patterns = params["properties"]["symbols"], params["properties"]["patterns"]
    assert symbols["maxItems"] == jobs_module.MAX_SYMBOLS and symbols["minItems"] == 1
    assert symbols["uniqueItems"] is True and patterns["uniqueItems"] is True
    assert patterns["items"]["enum"] == list(JOB_PATTERNS)
    assert "--job-patterns" in patterns["description"]
    limit = f"{jobs_module.MAX_YEARS} years"
    assert limit in submit["description"]
    assert limit in params["properties"]["end_date"]["description"]
    job = properties_of({"$ref": "#/components/schemas/BacktestJob"})
    assert job["symbols"]["maxItems"] == jobs_module.MAX_SYMBOLS
    assert job["patterns"]["uniqueItems"] is True


@pytest.mark.parametrize("start,end,refused", [
    ("2023-01-01", "2023-01-01", None),
    ("2013-01-01", "2023-01-01", None),
    ("2013-01-01", "2023-01-02", "end_date"),
    ("2012-02-29", "2022-02-28", None),
    ("2012-02-29", "2022-03-01", "end_date"),
    ("2023-12-31", "2023-01-01", "end_date"),
])
def test_date_rules_a_schema_cannot_say(
    schema_for: Callable[..., Any], start: str, end: str, refused: str | None,
) -> None:
    """
    The date rules only the description states (start not after end, at
    most 10 years) are the gateway's: such params pass the schema and are
    refused with C{bad_params} naming C{end_date}.
    """
    message = {"op": "submit_backtest", "id": "r1",
               "params": {**SUBMIT, "start_date": start, "end_date": end}}
    assert client_validator(schema_for).is_valid(message)
    reply = greeted().send(message)
    if refused is None:
        assert reply["op"] == "job_accepted", reply
    else:
        assert (reply["op"], reply["code"], list(reply["fields"])) == (
            "error", "bad_params", [refused]), reply


def test_bad_params_names_every_field(schema_for: Callable[..., Any]) -> None:
    """
    A C{submit_backtest} with several wrong params is answered with one
    C{bad_params} error whose C{fields} names each of them (an unknown field
    too, and C{params} itself when it is not an object), as documented.
    """
    validator = server_validator(schema_for)
    message = {"op": "submit_backtest", "id": "r1", "params": {
        "symbols": [], "start_date": "2023-1-01", "patterns": ["Nope"], "interval": "1d"}}
    assert not client_validator(schema_for).is_valid(message)
    reply = greeted().send(message)
    assert reply["code"] == "bad_params"
    assert set(reply["fields"]) == {"symbols", "start_date", "end_date", "patterns", "interval"}
    validator.validate(reply)
    reply = greeted().send({"op": "submit_backtest", "id": "r1", "params": "AAPL"})
    assert (reply["code"], set(reply["fields"])) == ("bad_params", {"params"})
    validator.validate(reply)
    assert not validator.is_valid({**reply, "code": "bad_request"})
    assert not validator.is_valid({k: v for k, v in reply.items() if k != "fields"})


def test_universe_filters_are_documented() -> None:
    """
    Universe filters are described with the code a client gets for a key
    that names no universe (this session's gateway knows none).
    """
    schemas = DOC["components"]["schemas"]
    assert "unknown_universe" in schemas["Filter"]["properties"]["universe"]["description"]
    session = greeted()
    reply = session.send({"op": "subscribe", "id": "s2", "topic": "ticks",
                          "filter": {"universe": "dow30"}})
    assert reply["code"] == "unknown_universe"


def test_resume_replies_match_the_schema(schema_for: Callable[..., Any]) -> None:
    """
    A resume inside the history answers C{recovered: true} and replays; one
    from before what was kept answers C{recovered: false} with C{missed}
    (from, to, count); both are valid documented messages.
    """
    validator = server_validator(schema_for)
    for kept, recovered in ((1000, True), (3, False)):
        session = Session()
        session.history = MemoryHistory(session.clock, kept, 3600, 10)
        session.history.listen(session.broadcaster.deliver)
        session.gateway._history = session.history
        first = parse_event("tickstock.events.patterns", orjson.dumps(
            {"symbol": "AAPL", "pattern": "Doji", "confidence": 0.9, "timestamp": 1}), "",
            session.clock.seconds())
        session.history.append(first)
        for n in range(5):
            session.history.append(parse_event("tickstock.events.patterns", orjson.dumps(
                {"symbol": "AAPL", "pattern": "Doji", "confidence": 0.9, "timestamp": 1,
                 "n": n}), "", session.clock.seconds()))
        session.send({"op": "hello", "token": "alice", "resume": {"last_id": first.id}})
        reply = session.send({"op": "subscribe", "id": "s", "topic": "patterns"})
        assert reply["recovered"] is recovered
        assert not list(validator.iter_errors(reply)), reply
        replayed = [f["data"]["n"] for f in session.client.frames]
        assert replayed == ([0, 1, 2, 3, 4] if recovered else [2, 3, 4])
        if not recovered:
            assert reply["missed"]["from"] == first.id and reply["missed"]["count"] >= 2


SUBMIT = {"symbols": ["AAPL", "MSFT"], "start_date": "2023-01-01", "end_date": "2023-12-31"}

CLIENT_CASES: list[tuple[dict[str, Any], str | None]] = [
    ({"op": "ping"}, None),
    ({"op": "ping", "id": "p1", "extra": 1}, None),
    ({"op": "subscribe", "id": "s1", "topic": "patterns",
      "filter": {"symbols": ["AAPL"], "patterns": ["Doji"], "min_confidence": 0.8}}, None),
    ({"op": "subscribe", "id": "s1", "topic": "ticks", "filter": {"symbols": ["BRK.B"]}}, None),
    ({"op": "subscribe", "id": "s1", "topic": "health"}, None),
    ({"op": "subscribe", "id": "s1", "topic": "backtests", "filter": None}, None),
    ({"op": "subscribe", "id": "s1", "topic": "universe", "filter": {}}, None),
    ({"op": "subscribe", "id": "s1", "topic": "indicators", "filter": {"symbols": ["AAPL"]}},
     None),
    ({"op": "subscribe", "id": "s1", "topic": "alerts", "filter": {"symbols": ["AAPL"]}}, None),
    ({"op": "subscribe", "id": "s1", "topic": "alerts", "filter": {"patterns": ["Doji"]}},
     "bad_filter"),
    ({"op": "submit_backtest", "id": "r1", "params": SUBMIT}, None),
    ({"op": "submit_backtest", "params": {**SUBMIT, "patterns": ["Doji", "Hammer"]}}, None),
    ({"op": "submit_backtest", "params": {**SUBMIT, "patterns": list(JOB_PATTERNS)}}, None),
    ({"op": "submit_backtest", "params": {**SUBMIT, "patterns": []}}, None),
    ({"op": "submit_backtest", "params": {**SUBMIT, "symbols": [f"S{i}" for i in range(50)]}},
     None),
    ({"op": "submit_backtest", "params": {**SUBMIT, "start_date": "2014-01-01"}}, None),
    ({"op": "nope"}, "unknown_op"),
    ({"id": "x"}, "unknown_op"),
    ({"op": "ping", "id": ""}, "bad_request"),
    ({"op": "ping", "id": "x" * 65}, "bad_request"),
    ({"op": "ping", "id": 5}, "bad_request"),
    ({"op": "subscribe", "topic": "ticks"}, "bad_request"),
    ({"op": "subscribe", "id": "s1", "topic": "news"}, "bad_topic"),
    ({"op": "subscribe", "id": "s1", "topic": "patterns",
      "filter": {"min_confidence": 1.5}}, "bad_filter"),
    ({"op": "subscribe", "id": "s1", "topic": "patterns",
      "filter": {"min_confidence": True}}, "bad_filter"),
    ({"op": "subscribe", "id": "s1", "topic": "market_state",
      "filter": {"patterns": ["Doji"]}}, "bad_filter"),
    ({"op": "subscribe", "id": "s1", "topic": "health", "filter": {"symbols": ["AAPL"]}},
     "bad_filter"),
    ({"op": "subscribe", "id": "s1", "topic": "patterns", "filter": {"universe": "a b"}},
     "bad_filter"),
    ({"op": "subscribe", "id": "s1", "topic": "ticks", "filter": {"symbols": ["aapl"]}},
     "bad_filter"),
    ({"op": "subscribe", "id": "s1", "topic": "ticks", "filter": {"symbols": []}},
     "bad_filter"),
    ({"op": "subscribe", "id": "s1", "topic": "ticks", "filter": ["AAPL"]}, "bad_filter"),
    ({"op": "unsubscribe"}, "unknown_subscription"),
    ({"op": "submit_backtest", "id": "r1"}, "bad_params"),
    ({"op": "submit_backtest", "params": {**SUBMIT, "symbols": [f"S{i}" for i in range(51)]}},
     "bad_params"),
    ({"op": "submit_backtest", "params": {**SUBMIT, "symbols": ["AAPL", "AAPL"]}},
     "bad_params"),
    ({"op": "submit_backtest", "params": {**SUBMIT, "start_date": "2023-13-01"}},
     "bad_params"),
    ({"op": "submit_backtest", "params": {**SUBMIT, "patterns": [""]}}, "bad_params"),
    ({"op": "submit_backtest", "params": {**SUBMIT, "patterns": ["Nope"]}}, "bad_params"),
    ({"op": "submit_backtest", "params": {**SUBMIT, "patterns": ["Doji", "Doji"]}},
     "bad_params"),
    ({"op": "submit_backtest", "params": {**SUBMIT, "patterns": "Doji"}}, "bad_params"),
    ({"op": "submit_backtest", "params": {**SUBMIT, "interval": "1d"}}, "bad_params"),
    ({"op": "submit_backtest", "params": {**SUBMIT, "symbols": []}}, "bad_params"),
    ({"op": "submit_backtest", "params": {**SUBMIT, "end_date": None}}, "bad_params"),
    ({"op": "submit_backtest", "params": {**SUBMIT, "end_date": "2023-02-30"}}, "bad_params"),
    ({"op": "submit_backtest", "params": ["AAPL"]}, "bad_params"),
    ({"op": "cancel_job", "id": "c1"}, "bad_request"),
    ({"op": "cancel_job", "id": "c1", "job_id": ""}, "bad_request"),
    ({"op": "cancel_job", "id": "c1", "job_id": "x" * 65}, "bad_request"),
    ({"op": "cancel_job", "id": "c1", "job_id": 5}, "bad_request"),
]


@pytest.mark.parametrize("message,code", CLIENT_CASES)
def test_client_schema_agrees_with_gateway(
    schema_for: Callable[..., Any], message: dict[str, Any], code: str | None,
) -> None:
    """
    A client message (sent after hello) passes the documented client schemas
    exactly when the gateway accepts it; when refused, the error code is the
    one expected and documented.
    """
    reply = greeted().send(message)
    if code is None:
        assert reply["op"] != "error", reply
    else:
        assert (reply["op"], reply["code"]) == ("error", code), reply
    assert client_validator(schema_for).is_valid(message) is (code is None)


def test_every_reply_matches_server_schemas(schema_for: Callable[..., Any]) -> None:
    """
    Every reply and event frame the gateway sends in a session touching each
    op and each kind of error is a valid documented server message: jobs
    accepted up to the per-user limit (3) and C{too_many_jobs} past it,
    C{bad_params} with C{fields}, a cancel, a second cancel of the same job
    (C{job_finished}), a cancel of an unknown job (C{not_found}), a publish
    failure (C{unavailable}), an unexpected failure (C{internal}), the
    progress events TickStock adds (a cancel, a timeout), and the token ops:
    a C{refresh} accepted, one for another user (C{unauthorized}, the
    connection stays), one to a narrower token that ends a subscription and
    a C{subscribe} it does not allow (C{forbidden}), and C{token_expiring}.
    """
    validator = server_validator(schema_for)
    session = Session(max_subscriptions=2, per_user=3)
    sent = [
        b"{not json", b"[1]", {"op": "ping"},  # bad_json, bad_request, hello_required
        {"op": "hello", "user": "alice", "resume": {"last_id": "1699999999999-0"}},
        {"op": "hello"},
        {"op": "subscribe", "id": "s1", "topic": "patterns", "filter": {"symbols": ["AAPL"]}},
        {"op": "subscribe", "id": "s1", "topic": "ticks"},
        {"op": "subscribe", "id": "s2", "topic": "ticks"},
        {"op": "subscribe", "id": "s3", "topic": "health"},
        {"op": "unsubscribe", "id": "s2"}, {"op": "unsubscribe", "id": "s2"},
        {"op": "subscribe", "id": "b", "topic": "backtests"},
        {"op": "submit_backtest", "id": "r1", "params": SUBMIT},
        {"op": "submit_backtest", "id": "r2", "params": SUBMIT},
        {"op": "submit_backtest", "id": "r3", "params": SUBMIT},
        {"op": "submit_backtest", "id": "r4", "params": SUBMIT},  # too_many_jobs
        {"op": "submit_backtest", "id": "r5", "params": {**SUBMIT, "patterns": ["Nope"]}},
        {"op": "cancel_job", "id": "c0"},  # bad_request
        {"op": "cancel_job", "id": "c1", "job_id": "5b0c6f7e-3c1d-4c4e-9d1e-0f7f4b3a2c11"},
        {"op": "ping", "id": "p1"},
    ]
    for message in sent:
        session.send(message)
    first = next(r["job_id"] for r in session.client.replies if r["op"] == "job_accepted")
    assert session.send({"op": "cancel_job", "id": "c2", "job_id": first})["op"] == \
        "job_cancelled"
    assert session.send({"op": "cancel_job", "id": "c3", "job_id": first})["code"] == \
        "job_finished"
    session.clock.advance(301)
    session.jobs.sweep()  # the other two time out

    async def broken(user: str, params: Any) -> Any:
        raise RuntimeError("a bug")

    session.jobs.submit = broken  # type: ignore[method-assign]
    assert session.send({"op": "submit_backtest", "id": "r6", "params": SUBMIT})["code"] == \
        "internal"
    failing = greeted(fail_publish=True)
    failing.send({"op": "subscribe", "id": "b", "topic": "backtests"})
    failing.send({"op": "submit_backtest", "id": "r2", "params": SUBMIT})
    no_jobs = greeted()
    no_jobs.gateway._jobs = None
    no_jobs.send({"op": "cancel_job", "id": "c1", "job_id": first})
    no_jobs.send({"op": "refresh", "id": "f1", "token": "alice"})  # refreshed (demo: no expiry)
    no_jobs.send({"op": "refresh", "id": "f2", "token": "bob"})  # unauthorized: another user

    def narrow(hello: dict[str, Any]) -> Identity:
        """Tokens named C{narrow} allow the topic patterns only, and no backtests."""
        narrowed = Permissions(frozenset({"patterns"}), None, False) \
            if hello.get("token") == "narrow" else None
        return Identity("alice", limited.clock.seconds() + 60, narrowed)

    limited = Session(authenticate=narrow)
    limited.send({"op": "hello", "token": "wide"})
    limited.send({"op": "subscribe", "id": "t", "topic": "ticks"})
    limited.gateway.receive(limited.client, orjson.dumps(  # two replies: refreshed, forbidden
        {"op": "refresh", "id": "f3", "token": "narrow"}))
    limited.send({"op": "subscribe", "id": "t2", "topic": "ticks"})  # forbidden
    limited.clock.advance(31)  # token_expiring

    event = parse_event("tickstock.events.patterns", orjson.dumps(
        {"symbol": "AAPL", "pattern": "Doji", "confidence": 0.9, "timestamp": 1700000000,
         "extra": [1, 2]}), "1700000000000-3", 1700000000.0)
    session.broadcaster.deliver(event)

    replies = session.client.replies + failing.client.replies + no_jobs.client.replies \
        + limited.client.replies
    frames = session.client.frames + failing.client.frames
    seen = {r["op"] for r in replies} | {f["op"] for f in frames}
    assert seen == set(SERVER_OPS)
    codes = {r["code"] for r in replies if r["op"] == "error"}
    assert codes == {"bad_json", "bad_request", "hello_required", "duplicate_id",
                     "too_many_subscriptions", "unknown_subscription", "bad_params",
                     "too_many_jobs", "not_found", "job_finished", "internal", "unavailable",
                     "unauthorized", "forbidden"}
    assert [r["op"] for r in limited.client.replies] == [
        "welcome", "subscribed", "refreshed", "error", "error", "token_expiring"]
    documented = properties_of({"$ref": "#/components/schemas/ServerError"})["code"]["enum"]
    assert set(documented) - codes == {"bad_topic", "bad_filter", "unknown_op",
                                       "unknown_universe", "too_many_connections",
                                       "no_producer"}  # tested elsewhere
    statuses = [(f["data"]["status"], f["data"].get("error")) for f in frames
                if f.get("type") == "backtest_progress"]
    assert statuses == [("cancelled", None), ("failed", "timeout: no progress for 300 s"),
                        ("failed", "timeout: no progress for 300 s"),
                        ("failed", "producer unreachable")]
    for message in replies + frames:
        errors = [e.message for e in validator.iter_errors(message)]
        assert not errors, (message, errors)


def test_documented_examples_are_valid(schema_for: Callable[..., Any]) -> None:
    """Every example message in the document passes its own payload schema."""
    count = 0
    for name, message in DOC["components"]["messages"].items():
        validator = schema_for(payload_ref(message))
        assert message.get("examples"), f"{name} has no example"
        for example in message["examples"]:
            errors = [e.message for e in validator.iter_errors(example["payload"])]
            assert not errors, (name, errors)
            count += 1
    assert count >= 25


# ---------------------------------------------------------------- edges the schemas rely on


def test_symbol_with_trailing_newline(schema_for: Callable[..., Any]) -> None:
    """
    A producer's symbol is trimmed and upper-cased, as documented
    (C{SymbolIn}): C{"aapl\\n"} is C{AAPL}. A filter's symbols are exactly 1-10
    characters of [A-Z0-9.-]: there C{"AAPL\\n"} is refused.
    """
    assert events.SYMBOL.match("AAPL\n") is None
    payload = {"symbol": "aapl\n", "pattern": "Doji", "confidence": 0.5,
               "timestamp": 1700000000}
    event = parse_event("tickstock.events.patterns", orjson.dumps(payload), "1-0", 1.0)
    assert event.symbol == event.data["symbol"] == "AAPL"
    assert channel_validator(schema_for, "tickstock.events.patterns").is_valid(payload)
    reply = greeted().send({"op": "subscribe", "id": "s1", "topic": "ticks",
                            "filter": {"symbols": ["AAPL\n"]}})
    assert reply["code"] == "bad_filter"


@pytest.mark.parametrize("text", ["20230101", "2023-W01-1", "2023-1-01", " 2023-01-01"])
def test_backtest_dates_are_yyyy_mm_dd_only(
    schema_for: Callable[..., Any], text: str,
) -> None:
    """
    C{submit_backtest} dates are YYYY-MM-DD only, as documented: other ISO 8601
    forms that Python's C{date.fromisoformat} would take are refused by the
    gateway and by the schema alike.
    """
    message = {"op": "submit_backtest", "id": "r1", "params": {**SUBMIT, "start_date": text}}
    reply = greeted().send(message)
    assert (reply["op"], reply["code"]) == ("error", "bad_params")
    assert not client_validator(schema_for).is_valid(message)
