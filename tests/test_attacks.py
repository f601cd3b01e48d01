"""
The attack suite (docs/security.md): each attack against a real daemon on
the test's Redis, over real WebSocket and HTTP connections, is refused as
documented, while a normal client subscribed throughout gets every one of
its events, in order, and stays connected. Then a producer flood from
another process, and the router's shedding rule with a fake history.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock, LoopingCall
from zope.interface import implementer

from tests.conftest import TEST_SECRET
from tests.test_end_to_end import Steady, pattern, publish, ready
from tests.test_jobs import job_listener  # noqa: F401 - fixture
from tests.test_resume import PATTERNS
from tests.wsclient import connect, eventually, http_get, http_request
from tickstock.deliver.auth import JWTAuthenticator
from tickstock.domain.interfaces import IHistory, IProducerLink
from tickstock.ingest.router import Overloaded, Router


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def hostile_tokens() -> dict[str, str]:
    now = time.time()
    return {
        "forged": JWTAuthenticator(b"not-the-server-secret-but-long-enough").mint("alice", now, 60),
        "expired": JWTAuthenticator(TEST_SECRET).mint("alice", now - 7200, 60),
        "none_algorithm": f"{b64({'alg': 'none', 'typ': 'JWT'})}."
                          f"{b64({'sub': 'alice', 'exp': int(now) + 3600})}.",
        "garbage": "x" * 3000,
    }


class Tally:
    """Attacks tried and refused as documented."""

    def __init__(self) -> None:
        self.tried: list[str] = []

    def __call__(self, name: str, refused: bool) -> None:
        assert refused, f"attack not refused: {name}"
        self.tried.append(name)


async def refused_at_handshake(port: int, **kwargs: Any) -> bool:
    try:
        client = await connect(port, **kwargs)
    except ConnectionError as error:
        return "refused" in str(error)
    client.dropConnection(abort=True)
    return False


@pytest_twisted.ensureDeferred
async def test_the_attack_suite_leaves_a_normal_client_whole(redis_server: Any,
                                                             daemons: Any,
                                                             job_listener: Any) -> None:
    """
    One daemon with small limits; a normal client subscribed to ZZZ while
    events for it are published every 20 ms throughout. Every attack is
    refused as docs/security.md says; the normal client gets every event,
    in order, and was never disturbed.
    """
    daemon = daemons(redis=redis_server.url, max_message_size=4096,
                     max_subscriptions=5, client_rate=5, client_burst=30,
                     max_connections_per_user=3, max_connections_per_ip=12,
                     api_rate=1, api_burst=5)
    await ready(daemon)
    port, hello = daemon.port, daemon.hello
    normal = await connect(port, hello=hello("normal"))
    await normal.request({"op": "subscribe", "id": "p", "topic": "patterns",
                          "filter": {"symbols": ["ZZZ"]}}, "subscribed")
    steady = Steady(redis_server)
    tally = Tally()
    try:
        # Tokens: forged, expired, alg none, oversized garbage; on /ws and /api.
        for name, token in hostile_tokens().items():
            client = await connect(port)
            reply = await client.request({"op": "hello", "id": "h", "token": token}, "welcome")
            code, _ = await client.closed
            tally(f"ws token {name}", reply["code"] == "unauthorized" and code == 1008)
            status, body, headers = await http_request(port, b"GET", "/api/symbols", token)
            tally(f"api token {name}", status == 401 and body["error"]["code"] == "unauthorized")

        # A resume id Redis would refuse (other scripts' digits) is refused first.
        for last_id in ("\u0661\u0662-0", "\u00b2-1", "1700000000000-\uff10"):
            client = await connect(port)
            reply = await client.request({"op": "hello", "id": "h", **hello("mallory"),
                                          "resume": {"last_id": last_id}}, "welcome")
            tally(f"resume id {last_id!r}", reply.get("code") == "bad_request")
            client.sendClose()

        # Cross-site WebSocket hijacking: another origin, and a null one.
        for origin in ("https://evil.example", "null"):
            tally(f"origin {origin}", await refused_at_handshake(port, origin=origin))

        # An oversized message closes with 1009.
        big = await connect(port, hello=hello("mallory"))
        big.sendMessage(b'{"op":"ping","id":"' + b"x" * 5000 + b'"}')
        tally("oversized message", (await big.closed)[0] == 1009)

        # A message flood closes with 1008.
        flood = await connect(port, hello=hello("mallory"))
        for n in range(200):
            flood.send({"op": "ping", "id": f"f{n}"})
        code, reason = await flood.closed
        tally("message flood", code == 1008 and "too many messages" in reason)
        assert len(flood.of("pong")) <= 31

        # A subscription flood is refused past --max-subscriptions; the connection stays.
        subs = await connect(port, hello=hello("mallory"))
        replies = [await subs.request({"op": "subscribe", "id": f"s{n}", "topic": "ticks"},
                                      "subscribed") for n in range(6)]
        tally("subscription flood", [r["op"] for r in replies] == ["subscribed"] * 5 + ["error"]
              and replies[-1]["code"] == "too_many_subscriptions" and subs.close_code is None)

        # A connection flood: per user, then per address.
        mine = [subs] + [await connect(port, hello=hello("mallory")) for _ in range(2)]
        extra = await connect(port)
        reply = await extra.request({"op": "hello", "id": "h", **hello("mallory")}, "welcome")
        tally("connections per user", reply.get("code") == "too_many_connections"
              and (await extra.closed)[0] == 1008)
        per_ip = daemon.service.stream.per_ip
        await eventually(lambda: sum(per_ip.values()) == 4, 5, "the closed ones gone")
        others = [await connect(port) for _ in range(12 - 4)]  # normal + 3 of mallory's open
        tally("connections per address", await refused_at_handshake(port))
        for client in [*mine, *others]:
            client.sendClose()
            await client.closed
        again = await connect(port, hello=hello("mallory"))  # room again once they left
        again.sendClose()

        # REST: a per-user rate limit with Retry-After; another user is not affected.
        token = hello("eve")["token"]
        statuses = [(await http_request(port, b"GET", "/api/symbols", token))[0] for _ in range(8)]
        status, body, headers = await http_request(port, b"GET", "/api/symbols", token)
        tally("api flood", statuses[:5] == [200] * 5 and 429 in statuses and status == 429
              and int(headers.getRawHeaders(b"retry-after")[0]) >= 1)
        tally("api flood spares others",
              (await http_request(port, b"GET", "/api/symbols", hello("frank")["token"]))[0] == 200)

        # Unknown parameters, SQL injection and XSS in parameters.
        for path in ("/api/patterns?symbol=AAPL&debug=1", "/api/patterns?symbol=AAPL'%20OR%201=1--",
                     "/api/patterns?pattern=%3Cscript%3Ealert(1)%3C/script%3E&limit=-1"):
            token = hello(f"u{len(path)}")["token"]
            status, body, _ = await http_request(port, b"GET", path, token)
            tally(f"api parameter {path}", status == 400 and body["error"]["parameter"])

        # Path traversal on the static files.
        for path in ("/static/../../../../etc/passwd", "/static/%2e%2e/%2e%2e/etc/passwd",
                     "/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/static/..%2f..%2fsetup.cfg"):
            status, body = await http_get(port, path)
            tally(f"traversal {path}", status in (400, 403, 404) and b"root:" not in (
                body if isinstance(body, bytes) else orjson.dumps(body)))

        # Another user's job: 404 over REST, not_found over the WebSocket.
        status, job, _ = await http_request(port, b"POST", "/api/jobs", hello("alice")["token"], {
            "symbols": ["AAPL"], "start_date": "2024-01-02", "end_date": "2024-06-28",
            "patterns": ["Doji"]})
        assert status == 202, job
        job_id = job["job_id"]
        assert len(job_id) >= 32  # a random UUID: not guessable
        bob = hello("bob")["token"]
        for method in (b"GET", b"DELETE"):
            status, body, _ = await http_request(port, method, f"/api/jobs/{job_id}", bob)
            tally(f"another user's job {method.decode()}", status == 404)
        intruder = await connect(port, hello=hello("bob"))
        reply = await intruder.request({"op": "cancel_job", "id": "c", "job_id": job_id},
                                       "job_cancelled")
        tally("another user's job over /ws", reply["code"] == "not_found")
        intruder.sendClose()
    finally:
        steady.stop()

    total = steady.sent
    await eventually(lambda: len(normal.events("p")) == total, 10,
                     "every event of the normal client")
    assert [e["data"]["n"] for e in normal.events("p")] == list(range(total))
    assert normal.close_code is None and normal.of("error") == []
    assert len(tally.tried) == 30, tally.tried
    errors = daemon.service.gateway.errors
    assert errors["rate_limited"] == 1 and errors["too_many_connections"] == 1
    assert daemon.service.stream.refused_origins == 2  # "null" included
    assert daemon.service.stream.refused_per_ip == 1


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest_twisted.ensureDeferred
async def test_a_producer_flood_is_shed_with_counters_and_bounded_memory(
        redis_server: Any, daemons: Any) -> None:
    """
    Up to 100,000 messages a second for 3 s from another process, in pub/sub
    mode, nine ticks to one pattern event: memory stays bounded (sampled
    every 50 ms), every message is accounted for (routed, shed, or never
    handed over by Redis: a counted gap), and afterwards a normal client
    gets all of its events. Here the subscriber falls behind and sheds ticks
    unparsed, which lets it keep up with the pattern events (on this
    machine: 230,000 to 250,000 ticks shed, every message received, no gap).
    """
    daemon = daemons(redis=redis_server.url)
    await ready(daemon)
    router, source = daemon.service.router, daemon.service.source
    normal = await connect(daemon.port, hello=daemon.hello("normal"))
    await normal.request({"op": "subscribe", "id": "p", "topic": "patterns",
                          "filter": {"symbols": ["ZZZ"]}}, "subscribed")
    before, peak = rss_mb(), [0.0]
    sampler = LoopingCall(lambda: peak.__setitem__(0, max(peak[0], rss_mb())))
    sampler.start(0.05)
    flood = subprocess.Popen([sys.executable, "-m", "tests.flood", str(redis_server.port), "3",
                              "100000"], stdout=subprocess.PIPE, cwd=os.path.dirname(
                                  os.path.dirname(os.path.abspath(__file__))))
    done: Deferred[None] = Deferred()

    def check() -> None:
        if flood.poll() is None:
            reactor.callLater(0.1, check)
        else:
            done.callback(None)

    check()
    await done
    published = int(flood.communicate()[0])
    await eventually(lambda: router.in_flight == 0 and daemon.service.readiness()[0], 30,
                     "the daemon caught up")
    sampler.stop()
    # A marker is delivered after everything stored during the flood: once it
    # arrives, or the client is told to resume (4001: the live tail fell
    # behind the history's trimming, as a browser's client handles), the
    # tail is past the flood.
    publish(redis_server, PATTERNS, pattern("ZZZ", n=-1))
    await eventually(lambda: normal.events("p") or normal.close_code is not None, 30,
                     "the marker, or a resume request")
    if normal.close_code is not None:
        assert normal.close_code == 4001
        normal = await connect(daemon.port, hello=daemon.hello("normal"))
        await normal.request({"op": "subscribe", "id": "p", "topic": "patterns",
                              "filter": {"symbols": ["ZZZ"]}}, "subscribed")
    for n in range(20):
        publish(redis_server, PATTERNS, pattern("ZZZ", n=n))
    after_flood = lambda: [e["data"]["n"] for e in normal.events("p") if e["data"]["n"] >= 0]  # noqa: E731
    await eventually(lambda: len(after_flood()) == 20, 10, "the normal client's events")
    assert after_flood() == list(range(20))

    shed = sum(router.shed.values())
    accounted = (router.routed + router.duplicates + shed + router.failed
                 + sum(router.malformed.values()) + sum(router.refused.values()))
    assert published >= 100_000  # the publisher paces to 100k/s; a busy machine sends less
    assert accounted == router.received  # every received message has a fate
    assert router.received <= published + 21
    if router.received < published + 21:  # what Redis never handed over is a counted gap
        assert source.status()["gaps"] >= 1
    if source.fell_behind:  # Redis held megabytes for it: latest-only events went first
        assert router.shed["tickstock.data.ticks"] > 0
        assert source.status()["backlog_bytes"] >= 4 * 1024 * 1024
    assert peak[0] - before < 400, (before, peak[0])


@implementer(IHistory)
class FakeHistory:
    """A fake IHistory for the router's unit tests: stores at once if
    C{answer}, else holds every append's Deferred in C{pending}."""

    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.pending: list[Deferred[Any]] = []

    def append(self, event: Any, key: object = None) -> Deferred[Any]:
        if self.answer:
            return succeed("1-0")
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        return d

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)


@implementer(IProducerLink)
class SilentLink:
    def dead_letter(self, *args: Any) -> None:
        pass


def test_the_router_sheds_latest_only_events_first_and_never_its_own() -> None:
    """With a fake history (one that never answers): the shedding rule alone."""
    history = FakeHistory(answer=False)
    router = Router(Clock(), history, SilentLink(), max_in_flight=10)
    tick = orjson.dumps({"symbol": "A", "price": 1, "volume": 1, "timestamp": 1.7e9})
    alert = orjson.dumps(pattern("A"))
    results: list[Any] = []
    for _ in range(5):
        router.receive("tickstock.data.ticks", tick).addErrback(results.append)
    router.receive("tickstock.data.ticks", tick).addErrback(lambda f: results.append(f.type))
    assert results == [Overloaded] and router.shed == {"tickstock.data.ticks": 1}
    for _ in range(5):
        router.receive(PATTERNS, alert)
    router.receive(PATTERNS, alert).addErrback(lambda f: results.append(f.type))
    assert router.in_flight == 10 and router.shed[PATTERNS] == 1
    router.receive("tickstock.events.backtesting.progress", orjson.dumps({
        "job_id": "j", "progress": 1, "status": "cancelled", "timestamp": 1.7e9}),
        sheddable=False)
    assert router.in_flight == 11  # TickStock's own job events go through
    for d in history.pending:
        d.callback("1-0")
    assert router.in_flight == 0


def test_the_router_sheds_latest_only_events_unparsed_while_the_source_is_behind() -> None:
    """With a fake history (one that stores at once): the behind rule alone."""
    behind = [False]
    router = Router(Clock(), FakeHistory(answer=True), SilentLink(),
                    behind=lambda: behind[0])
    tick = orjson.dumps({"symbol": "A", "price": 1, "volume": 1, "timestamp": 1.7e9})
    progress = orjson.dumps({"job_id": "j", "progress": 0.5, "status": "running",
                             "timestamp": 1.7e9})
    failures: list[Any] = []
    router.receive("tickstock.data.ticks", tick)
    behind[0] = True
    router.receive("tickstock.data.ticks", tick).addErrback(lambda f: failures.append(f.type))
    router.receive("tickstock.data.ticks", b"not even JSON").addErrback(failures.append)
    router.receive(PATTERNS, orjson.dumps(pattern("A")))
    router.receive("tickstock.events.backtesting.progress", progress, sheddable=False)
    behind[0] = False
    router.receive("tickstock.data.ticks", tick)
    assert failures[0] == Overloaded and len(failures) == 2
    assert router.shed == {"tickstock.data.ticks": 2} and router.malformed == {}
    assert router.routed == 4  # two ticks, the pattern event, TickStock's own progress


def test_the_pubsub_source_is_behind_only_while_its_socket_stays_full() -> None:
    """
    RedisPubSubSource._read on a real socket pair, with a Clock and no way
    to ask Redis: a socket that holds 64 KiB or more at every large read for
    half a second is behind; one small read (the socket drained) ends it.
    """
    import socket

    from tickstock.config import parse_redis_url
    from tickstock.ingest.pubsub import BEHIND_BYTES, LAGGING_FOR, RedisPubSubSource

    clock = Clock()
    source = RedisPubSubSource(clock, parse_redis_url("redis://127.0.0.1:1/0"))
    reader, writer = socket.socketpair()
    try:
        writer.setblocking(False)
        writer.send(b"x" * BEHIND_BYTES)
        source._read(BEHIND_BYTES, reader)  # a burst, read once
        source._read(100, reader)  # and drained: never behind
        clock.advance(LAGGING_FOR)
        source._read(BEHIND_BYTES, reader)
        assert not source.behind
        for _ in range(5):
            clock.advance(LAGGING_FOR / 4)
            source._read(16 * 1024, reader)  # 16 KiB read, 64 KiB still waiting
        assert source.behind and source.fell_behind == 1 and source.status()["behind"]
        source._read(100, reader)
        assert not source.behind
    finally:
        reader.close()
        writer.close()


def test_the_pubsub_source_is_behind_only_once_redis_holds_half_its_limit() -> None:
    """
    With a fake C{ask} standing in for a second Redis connection (it answers
    CONFIG GET and CLIENT LIST as Redis 7 does): lagging alone is not
    behind, a backlog of half the lower pub/sub limit is; it is asked again
    at most every half second while the lag lasts; CONFIG refused means
    the 4 MB default.
    """
    from tickstock.config import parse_redis_url
    from tickstock.ingest.pubsub import (
        BEHIND_BYTES,
        BEHIND_OMEM,
        LAGGING_FOR,
        RedisPubSubSource,
    )

    asked, omem, config = [], [0], ["client-output-buffer-limit",
                                    "normal 0 0 0 slave 268435456 67108864 60 "
                                    "pubsub 33554432 8388608 60"]

    def ask(*command: Any) -> Deferred[Any]:
        asked.append(command[:2])
        if command[0] == "CONFIG":
            return succeed(config) if config else fail(RuntimeError("NOPERM"))
        return succeed(f"id=7 addr=127.0.0.1:5 qbuf=0 obl=0 oll=9 omem={omem[0]} tot-mem=1")

    def lag(seconds: float) -> None:
        for _ in range(int(seconds / (LAGGING_FOR / 4))):
            clock.advance(LAGGING_FOR / 4)
            source._read(BEHIND_BYTES, None)

    clock = Clock()
    source = RedisPubSubSource(clock, parse_redis_url("redis://127.0.0.1:1/0"), ask=ask)
    source._client_id = 7
    source._read(BEHIND_BYTES, None)
    omem[0] = 4_194_303  # just under half the soft limit (8 MB)
    lag(1.0)
    assert not source.behind and source.backlog == 4_194_303
    assert asked == [("CONFIG", "GET"), ("CLIENT", "LIST"), ("CLIENT", "LIST")]
    omem[0] = 4_194_304
    lag(LAGGING_FOR)
    assert source.behind and source.status()["backlog_bytes"] == 4_194_304
    source._read(100, None)
    assert not source.behind

    config.clear()
    source = RedisPubSubSource(clock, parse_redis_url("redis://127.0.0.1:1/0"), ask=ask)
    source._client_id = 7
    omem[0] = BEHIND_OMEM - 1
    source._read(BEHIND_BYTES, None)
    lag(1.0)
    assert not source.behind
    omem[0] = BEHIND_OMEM
    lag(LAGGING_FOR)
    assert source.behind


def test_the_pubsub_limit_is_read_from_config_get() -> None:
    from tickstock.ingest.pubsub import output_memory, pubsub_limit

    def limit(value: str) -> int | None:
        return pubsub_limit(["client-output-buffer-limit", value])

    assert limit("normal 0 0 0 slave 268435456 67108864 60 pubsub 33554432 8388608 60") == 8388608
    assert limit("normal 0 0 0 pubsub 33554432 0 0") == 33554432
    assert limit("normal 0 0 0 pubsub 0 0 0") is None
    assert limit("normal 0 0 0") is None
    assert pubsub_limit([]) is None
    assert output_memory("id=3 addr=x omem=20504 tot-mem=42") == 20504
    with pytest.raises(ValueError):
        output_memory("id=3 addr=x")


@pytest_twisted.ensureDeferred
async def test_identity_attacks_are_refused_and_cannot_make_it_hammer_the_provider(
        redis_server: Any, daemons: Any) -> None:
    """
    A daemon verifying tokens with an identity provider's JWKS (a real HTTP
    endpoint of the test), and a normal client subscribed to ZZZ while its
    events are published every 20 ms. A token signed by an unknown key, an
    HS256 token naming the RSA key's kid signed with its public PEM, an
    C{alg: none} token naming a valid kid and a token with a malformed
    permissions claim are each refused C{unauthorized} and closed 1008.
    Then 100 hellos with made-up kids: all refused, and the provider is
    fetched from at most once every REFETCH_MIN (10 s), however many come.
    The normal client gets every event, in order, and stays connected.
    """
    from tests.test_identity import Key, Provider, handmade, refused, welcomed

    rsa_key = Key.rsa()
    provider = Provider(rsa_key, Key.ec())
    try:
        daemon = daemons(redis=redis_server.url, jwt_jwks_url=provider.url)
        await ready(daemon)
        normal = await welcomed(daemon.port, rsa_key.token("normal"))
        await normal.request({"op": "subscribe", "id": "p", "topic": "patterns",
                              "filter": {"symbols": ["ZZZ"]}}, "subscribed")
        steady = Steady(redis_server)
        tally = Tally()
        try:
            claims = {"sub": "alice", "exp": int(time.time()) + 3600}
            attacks = {
                "unknown key": Key.rsa().token("alice"),
                "alg confusion": handmade({"alg": "HS256", "typ": "JWT", "kid": rsa_key.kid},
                                          claims, rsa_key.public_pem()),
                "alg none with a kid": handmade({"alg": "none", "typ": "JWT",
                                                 "kid": rsa_key.kid}, claims, None),
                "malformed permissions": rsa_key.token("alice", tickstock="all"),
            }
            for name, token in attacks.items():
                reply, code = await refused(daemon.port, token)
                tally(f"identity {name}", reply["code"] == "unauthorized" and code == 1008)
            assert "tickstock claim must be an object" in reply["message"], reply

            flood = [await refused(daemon.port, Key.ec(f"made-up-{uuid.uuid4().hex}").token(
                "alice")) for _ in range(100)]
            tally("unknown kid flood", all(
                (reply["code"], code) == ("unauthorized", 1008) for reply, code in flood))
        finally:
            steady.stop()

        total = steady.sent
        await eventually(lambda: len(normal.events("p")) == total, 10,
                         "every event of the normal client")
        assert [e["data"]["n"] for e in normal.events("p")] == list(range(total))
        assert normal.close_code is None and normal.of("error") == []
        assert len(tally.tried) == 5, tally.tried
        refetches = provider.requests[1:]  # after the one at startup
        assert refetches, "no unknown kid made the daemon fetch again"
        assert all(later - earlier >= 9.5  # REFETCH_MIN, less the two clocks' skew
                   for earlier, later in zip(refetches, refetches[1:], strict=False))
        assert daemon.service.jwks.status()["refetches"] == len(refetches)
    finally:
        await provider.stop()
