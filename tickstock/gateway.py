"""
What a WebSocket client may ask, and the answers: C{hello}, C{subscribe},
C{unsubscribe}, C{submit_backtest}, C{ping} (CONTRACT §3). Kept apart from
Autobahn so the protocol stays thin and every request is testable with a
recording fake connection.
"""

from __future__ import annotations

import os
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import date
from typing import Any, Callable

import orjson
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from tickstock.auth import Identity
from tickstock.broadcast import (
    MAX_ID_LENGTH,
    BadRequest,
    Broadcaster,
    Filter,
    Subscription,
    parse_filter,
)
from tickstock.events import JOBS_CHANNEL, SYMBOL, TOPICS, id_key
from tickstock.catchup import deepen
from tickstock.history import Replay
from tickstock.interfaces import IClient, IHistory, IProducerLink, IStore
from tickstock.universes import Universes

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_SLOW_CONSUMER = 4001
"""Fell behind on must-deliver events: reconnect with C{resume}."""
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}\Z")
MAX_JOB_SYMBOLS = 50


@dataclass(eq=False)
class _State:
    """What the gateway keeps per connection."""

    session: str = field(default_factory=lambda: uuid.uuid4().hex)
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    resolving: set[str] = field(default_factory=set)
    resume_from: str | None = None
    hello_timer: IDelayedCall | None = None
    expiry_timer: IDelayedCall | None = None


def parse_job(params: Any) -> dict[str, Any]:
    """
    Check backtest parameters.

    @raise BadRequest: naming the first wrong field.
    """
    if not isinstance(params, dict):
        raise BadRequest("bad_params", "params must be an object")
    symbols = params.get("symbols")
    if not isinstance(symbols, list) or not 1 <= len(symbols) <= MAX_JOB_SYMBOLS:
        raise BadRequest("bad_params", f"symbols: a list of 1-{MAX_JOB_SYMBOLS} symbols")
    for symbol in symbols:
        if not isinstance(symbol, str) or not SYMBOL.match(symbol):
            raise BadRequest("bad_params", f"symbols: not a symbol: {symbol!r}")
    if len(set(symbols)) != len(symbols):
        raise BadRequest("bad_params", "symbols: duplicates")
    dates = {}
    for name in ("start_date", "end_date"):
        value = params.get(name)
        try:
            if not isinstance(value, str) or not _DATE.match(value):
                raise ValueError(value)
            dates[name] = date.fromisoformat(value)
        except ValueError:
            raise BadRequest("bad_params", f"{name}: expected YYYY-MM-DD") from None
    if dates["start_date"] > dates["end_date"]:
        raise BadRequest("bad_params", "start_date: after end_date")
    patterns = params.get("patterns", [])
    if not isinstance(patterns, list) or len(patterns) > 50 or not all(
        isinstance(p, str) and 0 < len(p) <= 64 for p in patterns
    ):
        raise BadRequest("bad_params", "patterns: a list of up to 50 pattern names")
    return {
        "symbols": symbols,
        "start_date": params["start_date"],
        "end_date": params["end_date"],
        "patterns": patterns,
    }


class Gateway:
    """
    Handles client requests for every connection of this process.

    @ivar errors: error replies sent, by code.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        broadcaster: Broadcaster,
        history: IHistory,
        link: IProducerLink,
        authenticate: Callable[[dict[str, Any]], Identity],
        max_subscriptions: int,
        hello_timeout: float,
        universes: Universes | None = None,
        store: IStore | None = None,
        catchup_max: int = 0,
    ) -> None:
        """
        @param universes: resolves universe filters; L{None}: they are refused.
        @param store: where a resume older than the history is caught up
            from (at most C{catchup_max} events); L{None}: nowhere.
        """
        self._clock = clock
        self._broadcaster = broadcaster
        self._history = history
        self._link = link
        self._authenticate = authenticate
        self._max_subscriptions = max_subscriptions
        self._hello_timeout = hello_timeout
        self._universes = universes
        self._store = store
        self._catchup_max = catchup_max
        self.connections: dict[IClient, _State] = {}
        self.errors: Counter[str] = Counter()
        self.slow_consumers_closed = 0
        self.live_gaps_closed = 0
        self.heartbeat_timeouts = 0

    def opened(self, conn: IClient) -> None:
        """A client finished its WebSocket handshake; it must say hello soon."""
        self.connections[conn] = _State(
            hello_timer=self._clock.callLater(self._hello_timeout, self._no_hello, conn)
        )

    def closed(self, conn: IClient) -> None:
        """Forget a connection and its subscriptions."""
        state = self.connections.pop(conn, None)
        if state is None:
            return
        for timer in (state.hello_timer, state.expiry_timer):
            if timer is not None and timer.active():
                timer.cancel()
        for sub in state.subscriptions.values():
            self._drop(sub)

    def _drop(self, sub: Subscription) -> None:
        self._broadcaster.unsubscribe(sub)
        if self._universes is not None and sub.filter.universe is not None:
            self._universes.untrack(sub)

    def close_all(self, code: int, reason: str) -> None:
        """Close every connection, e.g. with 1001 at shutdown so clients reconnect elsewhere."""
        for conn in list(self.connections):
            conn.close(code, reason)

    def slow_consumer(self, conn: IClient, queued: int) -> None:
        """A client stopped reading and its queue is full: close it."""
        self.slow_consumers_closed += 1
        conn.close(CLOSE_SLOW_CONSUMER, f"too slow: {queued} messages queued; resume")

    def missed_live(self, conn: IClient) -> None:
        """Live events this client should have had are gone: make it resume."""
        self.live_gaps_closed += 1
        conn.close(CLOSE_SLOW_CONSUMER, "live events were missed; resume")

    def receive(self, conn: IClient, payload: bytes) -> None:
        """Handle one text message from C{conn}; every failure is answered."""
        state = self.connections.get(conn)
        if state is None:
            return
        request_id = None
        try:
            try:
                message = orjson.loads(payload)
            except orjson.JSONDecodeError:
                raise BadRequest("bad_json", "message is not JSON") from None
            if not isinstance(message, dict):
                raise BadRequest("bad_request", "message must be a JSON object")
            request_id = message.get("id")
            if not (request_id is None or (
                isinstance(request_id, str) and 0 < len(request_id) <= MAX_ID_LENGTH
            )):
                request_id = None
                raise BadRequest("bad_request", f"id must be a string of 1-{MAX_ID_LENGTH} chars")
            op = message.get("op")
            handler = self._ops.get(op) if isinstance(op, str) else None
            if handler is None:
                raise BadRequest("unknown_op", f"unknown op {op!r}")
            if conn.user is None and op != "hello":
                raise BadRequest("hello_required", "say hello first")
            handler(self, conn, state, message)
        except BadRequest as error:
            self.errors[error.code] += 1
            conn.reply({"op": "error", "id": request_id, "code": error.code,
                        "message": str(error)})
            if error.code == "unauthorized":
                conn.close(CLOSE_POLICY, str(error))

    def _no_hello(self, conn: IClient) -> None:
        state = self.connections.get(conn)
        if state is not None:
            state.hello_timer = None
        if conn.user is None:
            self.errors["hello_timeout"] += 1
            conn.close(CLOSE_POLICY, "no hello in time")

    def _expired(self, conn: IClient) -> None:
        state = self.connections.get(conn)
        if state is not None:
            state.expiry_timer = None
            self.errors["token_expired"] += 1
            conn.close(CLOSE_POLICY, "token expired")

    def _hello(self, conn: IClient, state: _State, message: dict[str, Any]) -> None:
        if conn.user is not None:
            raise BadRequest("bad_request", "hello was already said")
        resume = message.get("resume")
        if resume is not None:
            last_id = resume.get("last_id") if isinstance(resume, dict) else None
            try:
                id_key(last_id if isinstance(last_id, str) else "")
            except ValueError:
                raise BadRequest("bad_request", "resume.last_id must be an event id") from None
        identity = self._authenticate(message)
        conn.user = identity.user
        if identity.expires_at is not None:
            state.expiry_timer = self._clock.callLater(
                max(0.0, identity.expires_at - self._clock.seconds()), self._expired, conn
            )
        if state.hello_timer is not None and state.hello_timer.active():
            state.hello_timer.cancel()
        state.hello_timer = None
        if resume is not None:
            state.resume_from = resume["last_id"]
        conn.reply({"op": "welcome", "id": message.get("id"), "user": conn.user,
                    "session": state.session, "pid": os.getpid()})

    def _subscribe(self, conn: IClient, state: _State, message: dict[str, Any]) -> None:
        sub_id, topic = message.get("id"), message.get("topic")
        if sub_id is None:
            raise BadRequest("bad_request", "subscribe needs an id")
        if topic not in TOPICS:
            raise BadRequest("bad_topic", f"topic must be one of {', '.join(TOPICS)}")
        if sub_id in state.subscriptions or sub_id in state.resolving:
            raise BadRequest("duplicate_id", f"subscription {sub_id!r} exists")
        if len(state.subscriptions) + len(state.resolving) >= self._max_subscriptions:
            raise BadRequest("too_many_subscriptions",
                             f"at most {self._max_subscriptions} per connection")
        filter = parse_filter(topic, message.get("filter"))
        if filter.universe is None:
            self._subscribe_to(conn, state, sub_id, topic, filter)
            return
        if self._universes is None:
            raise BadRequest("unknown_universe", "this server has no universes")
        explicit = filter.symbols
        state.resolving.add(sub_id)

        def resolved(symbols: frozenset[str]) -> None:
            state.resolving.discard(sub_id)
            if self.connections.get(conn) is not state:
                return
            sub = self._subscribe_to(conn, state, sub_id, topic,
                                     replace(filter, symbols=symbols | (explicit or frozenset())))
            assert self._universes is not None
            self._universes.track(sub, explicit)

        def refused(failure: Any) -> None:
            state.resolving.discard(sub_id)
            error = failure.trap(BadRequest) and failure.value
            self.errors[error.code] += 1
            conn.reply({"op": "error", "id": sub_id, "code": error.code, "message": str(error)})

        self._universes.resolve(filter.universe).addCallbacks(resolved, refused)

    def _subscribe_to(self, conn: IClient, state: _State, sub_id: str, topic: str,
                      filter: Filter) -> Subscription:
        after = state.resume_from
        if after is None and topic != "backtests":
            sub = state.subscriptions[sub_id] = self._broadcaster.subscribe(
                conn, sub_id, topic, filter)
            conn.reply({"op": "subscribed", "id": sub_id})
            return sub
        # Replay first (after the resume point; for backtests, the user's
        # offline queue too), holding live events back until it is sent.
        sub = self._broadcaster.subscribe(conn, sub_id, topic, filter, hold=True)
        state.subscriptions[sub_id] = sub
        d = self._history.replay(topic, after, conn.user)
        d.addErrback(self._replay_failed, after)
        d.addCallback(deepen, self._store, topic, after, filter.symbols, self._catchup_max)
        d.addCallback(self._replayed, conn, state, sub, after)
        return sub

    def _replay_failed(self, failure: Any, after: str | None) -> Replay:
        self.errors["history_unavailable"] += 1
        self._log.warn("replay failed: {e}", e=failure.getErrorMessage())
        return Replay([], None if after is None else {
            "from": after, "to": None, "count": None, "reason": "history unavailable"})

    def _replayed(self, replay: Replay, conn: IClient, state: _State, sub: Subscription,
                  after: str | None) -> None:
        if state.subscriptions.get(sub.id) is not sub:
            return  # unsubscribed or gone meanwhile
        reply: dict[str, Any] = {"op": "subscribed", "id": sub.id}
        if after is not None:
            reply["recovered"] = replay.missed is None
            if replay.missed is not None:
                reply["missed"] = replay.missed
        conn.reply(reply)
        last = self._broadcaster.release(sub, replay.events, after or "0-0")
        if sub.topic == "backtests" and last is not None and conn.user is not None:
            self._history.delivered(conn.user, last)

    def _unsubscribe(self, conn: IClient, state: _State, message: dict[str, Any]) -> None:
        sub = state.subscriptions.pop(message.get("id"), None)
        if sub is None:
            raise BadRequest("unknown_subscription", f"no subscription {message.get('id')!r}")
        self._drop(sub)
        conn.reply({"op": "unsubscribed", "id": sub.id})

    def _submit_backtest(self, conn: IClient, state: _State, message: dict[str, Any]) -> None:
        assert conn.user is not None
        job = parse_job(message.get("params"))
        job_id = str(uuid.uuid4())
        job.update(job_type="backtest", job_id=job_id, user_id=conn.user,
                   timestamp=self._clock.seconds())
        request_id = message.get("id")

        def accepted(_: Any) -> None:
            conn.reply({"op": "job_accepted", "id": request_id, "job_id": job_id})

        def failed(failure: Any) -> None:
            self.errors["unavailable"] += 1
            conn.reply({"op": "error", "id": request_id, "code": "unavailable",
                        "message": "the producer cannot be reached; try again"})

        # The owner is recorded before the producer can answer.
        d = self._history.own(job_id, conn.user)
        d.addCallback(lambda _: self._link.publish(JOBS_CHANNEL, orjson.dumps(job)))
        d.addCallbacks(accepted, failed)

    def _ping(self, conn: IClient, state: _State, message: dict[str, Any]) -> None:
        conn.reply({"op": "pong", "id": message.get("id")})

    _ops = {
        "hello": _hello,
        "subscribe": _subscribe,
        "unsubscribe": _unsubscribe,
        "submit_backtest": _submit_backtest,
        "ping": _ping,
    }
