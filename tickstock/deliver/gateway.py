"""
What a WebSocket client may ask, and the answers: C{hello}, C{subscribe},
C{unsubscribe}, C{submit_backtest}, C{cancel_job}, C{refresh}, C{ping}
(docs/contract.md §3). Kept apart from Autobahn so the protocol stays thin
and every request is testable with a recording fake connection.
"""

from __future__ import annotations

import os
import random
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from tickstock.deliver.auth import Authenticate, Identity, identify
from tickstock.deliver.broadcast import (
    MAX_ID_LENGTH,
    Broadcaster,
    Filter,
    Subscription,
    parse_filter,
)
from tickstock.deliver.catchup import deepen
from tickstock.deliver.latest import Latest
from tickstock.deliver.ratelimit import RateLimit
from tickstock.deliver.ticks import LiveTicks
from tickstock.deliver.universes import Universes
from tickstock.domain.errors import BadRequest
from tickstock.domain.events import id_key, shown
from tickstock.domain.interfaces import IClient, IHistory, IMetered, IStore
from tickstock.domain.stored import Replay
from tickstock.domain.topics import TOPIC_NAMES
from tickstock.jobs.backtests import JobRefused, Jobs

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_SLOW_CONSUMER = 4001
"""Fell behind on must-deliver events: reconnect with C{resume}."""
GAP_CLOSES_PER_SECOND = 200
GAP_SPREAD = 5.0
"""Clients whose live events were missed are closed at random moments over
the next C{clients / GAP_CLOSES_PER_SECOND} seconds, at most this many:
each comes back to resume, and its replay with it, and all at once they
would hit a daemon that has just fallen behind."""


WARN_BEFORE = 30.0
"""Seconds before its token expires that a client is told to refresh it
(C{token_expiring}); at once if it has less left."""

HISTORY_UNAVAILABLE = "history unavailable"
"""Why a resuming subscription could not be replayed: then it is closed with
4001 rather than told that events were missed, since none is known to be."""


@dataclass(eq=False)
class _State:
    """What the gateway keeps per connection."""

    session: str = field(default_factory=lambda: uuid.uuid4().hex)
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    resolving: set[str] = field(default_factory=set)
    resume_from: str | None = None
    hello_timer: IDelayedCall | None = None
    expiry_timer: IDelayedCall | None = None
    warn_timer: IDelayedCall | None = None
    identity: Identity | None = None
    authenticating: bool = False  # a hello or refresh waits for the keys
    counted_user: str | None = None  # counted against the per-user cap


@implementer(IMetered)
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
        authenticate: Authenticate,
        max_subscriptions: int,
        hello_timeout: float,
        universes: Universes | None = None,
        store: IStore | None = None,
        catchup_max: int = 0,
        jobs: Jobs | None = None,
        rate: RateLimit | None = None,
        max_per_user: int = 0,
        ticks: LiveTicks | None = None,
        latest: Latest | None = None,
    ) -> None:
        """
        @param rate: the message budget of each connection; past it the
            client is closed with 1008. L{None}: no limit.
        @param max_per_user: connections one user may hold (0: no limit).
        @param universes: resolves universe filters; L{None}: they are refused.
        @param jobs: takes backtest submissions and cancels; L{None}: refused.
        @param store: where a resume older than the history is caught up
            from (at most C{catchup_max} events); L{None}: nowhere.
        @param ticks: where resumed C{ticks} subscriptions are replayed
            from when ticks do not pass through the history.
        @param latest: the current values a new subscription to a
            latest-only topic gets first; L{None}: none.
        """
        self._clock = clock
        self._broadcaster = broadcaster
        self._history = history
        self._jobs = jobs
        self._authenticate = authenticate
        self._max_subscriptions = max_subscriptions
        self._hello_timeout = hello_timeout
        self._universes = universes
        self._store = store
        self._catchup_max = catchup_max
        self._rate = rate
        self._max_per_user = max_per_user
        self._ticks = ticks
        self._latest = latest
        self._per_user: Counter[str] = Counter()
        self.connections: dict[IClient, _State] = {}
        self.errors: Counter[str] = Counter()
        self.slow_consumers_closed = 0
        self.slow_consumers: Counter[str] = Counter()
        """Slow consumers closed, by why."""
        self.live_gaps_closed = 0
        self.heartbeat_timeouts = 0
        self.catchups = 0

    def status(self) -> dict[str, Any]:
        return {"clients": len(self.connections),
                "slow_consumers_closed": self.slow_consumers_closed,
                "slow_consumers_by_why": dict(self.slow_consumers),
                "live_gaps_closed": self.live_gaps_closed,
                "heartbeat_timeouts": self.heartbeat_timeouts}

    def breakdown(self) -> dict[str, Any]:
        return {"client_errors": self.errors, "catchups": self.catchups}

    def position(self) -> str:
        """The id a client that has seen no event yet would resume after: the newest delivered."""
        return str(self._history.position)

    def resumed(self, conn: IClient) -> None:
        """
        C{conn} has re-made the subscriptions it resumed: later ones start
        live, with no replay (a Socket.IO session restores its own at once).
        """
        state = self.connections.get(conn)
        if state is not None:
            state.resume_from = None

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
        if self._rate is not None:
            self._rate.forget(conn)
        if state.counted_user is not None:
            self._per_user[state.counted_user] -= 1
            if self._per_user[state.counted_user] <= 0:
                del self._per_user[state.counted_user]
        for timer in (state.hello_timer, state.expiry_timer, state.warn_timer):
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

    def slow_consumer(self, conn: IClient, queued: int, why: str = "stopped reading") -> None:
        """
        A client is past its queue bound and is itself the reason (C{why}:
        it stopped reading, or reads slower than its events come): close it.
        """
        self.slow_consumers_closed += 1
        self.slow_consumers[why] += 1
        conn.close(CLOSE_SLOW_CONSUMER, f"too slow ({why}): {queued} messages queued; resume")

    def missed_live(self, conn: IClient) -> None:
        """
        Live events this client should have had are gone: make it resume
        (L{GAP_SPREAD}). Until it is closed it gets nothing more, so the
        last id it saw stays before the gap and its resume replays the gap.
        """
        if conn not in self.connections:
            return
        spread = min(GAP_SPREAD, len(self.connections) / GAP_CLOSES_PER_SECOND)
        self.closed(conn)  # nothing more is delivered to it, or read from it
        self.live_gaps_closed += 1
        self._clock.callLater(random.uniform(0, spread), conn.close, CLOSE_SLOW_CONSUMER,
                              "live events were missed; resume")

    def receive(self, conn: IClient, payload: bytes) -> None:
        """Handle one text message from C{conn}; every failure is answered."""
        state = self.connections.get(conn)
        if state is None:
            return
        if self._rate is not None and self._rate.take(conn):
            self.errors["rate_limited"] += 1
            conn.close(CLOSE_POLICY, "too many messages")
            self.closed(conn)  # nothing more from it is read
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
                raise BadRequest("unknown_op", f"unknown op {shown(op)}")
            if conn.user is None and op != "hello":
                raise BadRequest("hello_required", "say hello first")
            handler(self, conn, state, message)
        except BadRequest as error:
            self._refuse(conn, request_id, error)

    def _refuse(self, conn: IClient, request_id: str | None, error: BadRequest) -> None:
        self.errors[error.code] += 1
        conn.reply({"op": "error", "id": request_id, "code": error.code, "message": str(error)})
        if error.code == "unauthorized" and conn.user is None:
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

    def _expiring(self, conn: IClient) -> None:
        state = self.connections.get(conn)
        if state is None or state.identity is None or state.identity.expires_at is None:
            return
        state.warn_timer = None
        left = max(0, int(state.identity.expires_at - self._clock.seconds()))
        conn.reply({"op": "token_expiring", "in": left})

    def _arm(self, conn: IClient, state: _State, identity: Identity) -> None:
        """Take C{identity} as the connection's: warn before its token expires, close then."""
        state.identity = identity
        for timer in (state.expiry_timer, state.warn_timer):
            if timer is not None and timer.active():
                timer.cancel()
        state.expiry_timer = state.warn_timer = None
        if identity.expires_at is not None:
            left = max(0.0, identity.expires_at - self._clock.seconds())
            state.expiry_timer = self._clock.callLater(left, self._expired, conn)
            state.warn_timer = self._clock.callLater(
                max(0.0, left - WARN_BEFORE), self._expiring, conn)

    def _authenticated(self, conn: IClient, state: _State, message: dict[str, Any],
                       then: Callable[[Identity], None]) -> None:
        """
        Check the credentials of C{message}, then call C{then} with who it
        is, unless the connection is gone by then; a refusal is answered.
        """
        if state.authenticating:
            raise BadRequest("bad_request", "the previous token is still being checked")
        state.authenticating = True
        request_id = message.get("id")

        def checked(identity: Identity) -> None:
            state.authenticating = False
            if self.connections.get(conn) is state:
                then(identity)

        def refused(failure: Any) -> None:
            state.authenticating = False
            if self.connections.get(conn) is not state:
                return
            error = failure.value
            if not isinstance(error, BadRequest):
                self._log.failure("checking a token failed", failure)
                error = BadRequest("unauthorized", "the token could not be checked")
            self._refuse(conn, request_id, error)

        identify(self._authenticate, message).addCallbacks(checked, refused)

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
        self._authenticated(conn, state, message,
                            lambda identity: self._welcome(conn, state, message, identity))

    def _welcome(self, conn: IClient, state: _State, message: dict[str, Any],
                 identity: Identity) -> None:
        resume = message.get("resume")
        if self._max_per_user and self._per_user[identity.user] >= self._max_per_user:
            self.errors["too_many_connections"] += 1
            conn.reply({"op": "error", "id": message.get("id"), "code": "too_many_connections",
                        "message": f"at most {self._max_per_user} connections per user"})
            conn.close(CLOSE_POLICY, "too many connections for this user")
            self.closed(conn)
            return
        self._per_user[identity.user] += 1
        state.counted_user = identity.user
        conn.user = identity.user
        self._arm(conn, state, identity)
        if state.hello_timer is not None and state.hello_timer.active():
            state.hello_timer.cancel()
        state.hello_timer = None
        if resume is not None:
            state.resume_from = resume["last_id"]
        conn.reply({"op": "welcome", "id": message.get("id"), "user": conn.user,
                    "session": state.session, "pid": os.getpid()})

    def _refresh(self, conn: IClient, state: _State, message: dict[str, Any]) -> None:
        """
        A new token for the same user: the connection and its subscriptions
        stay, under the new token's expiry and permissions. A refused one
        changes nothing (the current token holds until it expires).
        """
        request_id, token = message.get("id"), message.get("token")
        if not isinstance(token, str) or not token:
            raise BadRequest("unauthorized", "refresh needs a token")

        def refreshed(identity: Identity) -> None:
            if identity.user != conn.user:
                self._refuse(conn, request_id, BadRequest(
                    "unauthorized", "a refreshed token must be for the same user"))
                return
            self._arm(conn, state, identity)
            reply: dict[str, Any] = {"op": "refreshed", "id": request_id}
            if identity.expires_at is not None:
                reply["expires_in"] = max(0, int(identity.expires_at - self._clock.seconds()))
            conn.reply(reply)
            self._enforce(conn, state, identity)

        self._authenticated(conn, state, {"id": request_id, "token": token}, refreshed)

    def _enforce(self, conn: IClient, state: _State, identity: Identity) -> None:
        """End the subscriptions a refreshed token no longer allows, each with C{forbidden}."""
        if identity.permissions is None:
            return
        for sub in list(state.subscriptions.values()):
            # A universe subscription's symbols are its members (and any it named besides).
            symbols = None if sub.filter.universe is not None else sub.filter.symbols
            why = identity.permissions.refuses(sub.topic, sub.filter.universe, symbols)
            if why is not None:
                del state.subscriptions[sub.id]
                self._drop(sub)
                self.errors["forbidden"] += 1
                conn.reply({"op": "error", "id": sub.id, "code": "forbidden", "message": why})

    @staticmethod
    def _permitted(state: _State, topic: str, filter: Filter) -> None:
        permissions = state.identity.permissions if state.identity is not None else None
        if permissions is not None:
            why = permissions.refuses(topic, filter.universe, filter.symbols)
            if why is not None:
                raise BadRequest("forbidden", why)

    def _subscribe(self, conn: IClient, state: _State, message: dict[str, Any]) -> None:
        sub_id, topic = message.get("id"), message.get("topic")
        if sub_id is None:
            raise BadRequest("bad_request", "subscribe needs an id")
        if topic not in TOPIC_NAMES:
            raise BadRequest("bad_topic", f"topic must be one of {', '.join(TOPIC_NAMES)}")
        if sub_id in state.subscriptions or sub_id in state.resolving:
            raise BadRequest("duplicate_id", f"subscription {shown(sub_id)} exists")
        if len(state.subscriptions) + len(state.resolving) >= self._max_subscriptions:
            raise BadRequest("too_many_subscriptions",
                             f"at most {self._max_subscriptions} per connection")
        filter = parse_filter(topic, message.get("filter"))
        self._permitted(state, topic, filter)
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
            current = [] if self._latest is None else [
                event for event in self._latest.of(topic, filter.symbols)
                if sub.wants(event)]
            reply: dict[str, Any] = {"op": "subscribed", "id": sub_id}
            if current:
                reply["snapshot"] = len(current)
            conn.reply(reply)
            if current:
                self._broadcaster.snapshot(sub, current)
            return sub
        # Replay first (after the resume point; for backtests, the user's
        # offline queue too), holding live events back until it is sent.
        sub = self._broadcaster.subscribe(conn, sub_id, topic, filter, hold=True)
        state.subscriptions[sub_id] = sub
        if topic == "ticks" and self._ticks is not None:
            assert after is not None
            self._replayed(Replay(self._ticks.replay(after, filter.symbols)),
                           conn, state, sub, after)
            # Live ticks come from where this replay did: none can be older.
            sub.floor = None
            return sub
        d = self._history.replay(topic, after, conn.user)
        d.addErrback(self._replay_failed, after)
        d.addCallback(deepen, self._store, topic, after, filter.symbols, self._catchup_max)
        d.addCallback(self._replayed, conn, state, sub, after)
        return sub

    def _replay_failed(self, failure: Any, after: str | None) -> Replay:
        self.errors["history_unavailable"] += 1
        self._log.warn("replay failed: {e}", e=failure.getErrorMessage())
        return Replay([], None if after is None else {
            "from": after, "to": None, "count": None, "reason": HISTORY_UNAVAILABLE})

    def _replayed(self, replay: Replay, conn: IClient, state: _State, sub: Subscription,
                  after: str | None) -> None:
        if state.subscriptions.get(sub.id) is not sub:
            return  # unsubscribed or gone meanwhile
        if replay.missed is not None and replay.missed.get("reason") == HISTORY_UNAVAILABLE:
            # Nothing is known to be lost: the client resumes from the same
            # point once the history answers again (Redis restarting).
            conn.close(CLOSE_SLOW_CONSUMER, "the history cannot be read now; resume")
            return
        if after is not None:
            self.catchups += 1

        def announce(replayed: int) -> None:
            reply: dict[str, Any] = {"op": "subscribed", "id": sub.id}
            if after is not None:
                reply["recovered"] = replay.missed is None
                reply["replayed"] = replayed
                if replay.missed is not None:
                    reply["missed"] = replay.missed
            conn.reply(reply)

        events = replay.events
        if after is None and sub.topic == "backtests" and self._latest is not None:
            # The current progress of jobs another connection of the user
            # already had (so they left the offline queue), in id order.
            queued = {event.id for event in events}
            current = [event.as_snapshot() for event in self._latest.of("backtests")
                       if sub.wants(event) and event.id not in queued]
            if current:
                events = sorted([*events, *current], key=lambda event: id_key(event.id))
        last = self._broadcaster.release(sub, events, after or "0-0", announce)
        if sub.topic == "backtests" and last is not None and conn.user is not None:
            self._history.delivered(conn.user, last)

    def _unsubscribe(self, conn: IClient, state: _State, message: dict[str, Any]) -> None:
        sub_id: str | None = message.get("id")  # checked by receive
        sub = None if sub_id is None else state.subscriptions.pop(sub_id, None)
        if sub is None:
            raise BadRequest("unknown_subscription", f"no subscription {shown(sub_id)}")
        self._drop(sub)
        conn.reply({"op": "unsubscribed", "id": sub.id})

    def _submit_backtest(self, conn: IClient, state: _State, message: dict[str, Any]) -> None:
        jobs, user, request_id = self._jobs_for(conn), conn.user, message.get("id")
        Deferred.fromCoroutine(jobs.submit(user, message.get("params"))).addCallbacks(
            lambda job: conn.reply({"op": "job_accepted", "id": request_id,
                                    "job_id": job["job_id"], "status": job["status"]}),
            self._job_refused, errbackArgs=(conn, request_id))

    def _cancel_job(self, conn: IClient, state: _State, message: dict[str, Any]) -> None:
        jobs, request_id, job_id = self._jobs_for(conn), message.get("id"), message.get("job_id")
        if not isinstance(job_id, str) or not 0 < len(job_id) <= MAX_ID_LENGTH:
            raise BadRequest("bad_request", "job_id must be the id of one of your jobs")
        Deferred.fromCoroutine(jobs.cancel(conn.user, job_id)).addCallbacks(
            lambda job: conn.reply({"op": "job_cancelled", "id": request_id,
                                    "job_id": job["job_id"]}),
            self._job_refused, errbackArgs=(conn, request_id))

    def _jobs_for(self, conn: IClient) -> Jobs:
        if self._jobs is None:
            raise BadRequest("unavailable", "this server takes no backtest jobs")
        state = self.connections.get(conn)
        identity = state.identity if state is not None else None
        if identity is not None and identity.permissions is not None \
                and not identity.permissions.backtests:
            raise BadRequest("forbidden", "your token does not allow backtests")
        return self._jobs

    def _job_refused(self, failure: Any, conn: IClient, request_id: str | None) -> None:
        if failure.check(JobRefused):
            error = failure.value
        else:
            self._log.failure("a job request failed", failure)
            error = JobRefused(500, "internal", "internal error")
        self.errors[error.code] += 1
        reply = {"op": "error", "id": request_id, "code": error.code, "message": str(error)}
        if error.fields:
            reply["fields"] = error.fields
        conn.reply(reply)

    def _ping(self, conn: IClient, state: _State, message: dict[str, Any]) -> None:
        conn.reply({"op": "pong", "id": message.get("id")})

    _ops = {
        "hello": _hello,
        "subscribe": _subscribe,
        "unsubscribe": _unsubscribe,
        "submit_backtest": _submit_backtest,
        "cancel_job": _cancel_job,
        "refresh": _refresh,
        "ping": _ping,
    }
