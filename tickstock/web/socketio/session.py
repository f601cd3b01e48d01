"""
Socket.IO v5 on an Engine.IO session: one more kind of client of the
L{Gateway}, so it has the same auth, filters, limits, history and resume
as a C{/ws} client (docs/socketio.md). The CONNECT packet's C{auth} is the
C{hello}; events are the C{/ws} requests, or the original system's
(C{subscribe_patterns}, C{subscribe_tickers}, C{heartbeat}) mapped onto
them; what the gateway answers goes to the event's acknowledgement, or
else is emitted as an event named by its C{op}.

Connection state recovery: every event carries its id as its last
argument, which C{socket.io-client} keeps as its offset; the CONNECT reply
carries a private session id (C{pid}) under which the session's
subscriptions are kept (L{ISessionRecords}: Redis, so any node finds them).
A client that comes back with C{{pid, offset}} gets them back, with what
it missed replayed from the history in order, and C{socket.recovered}.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import orjson
from zope.interface import implementer

from tickstock.deliver.gateway import CLOSE_POLICY, Gateway
from tickstock.domain.events import Event, id_key
from tickstock.domain.interfaces import IClient, ISessionRecords
from tickstock.web.socketio.engine import EngineServer, EngineSession
from tickstock.web.socketio.packets import (
    ACK,
    CONNECT,
    CONNECT_ERROR,
    DISCONNECT,
    EVENT,
    BadPacket,
    BinaryPacket,
    decode,
    emit,
    legacy_frame,
    message,
    native_frame,
)

RECOVERY_WINDOW = 120.0
"""Seconds a session's subscriptions are kept after it ends (Socket.IO's
default C{maxDisconnectionDuration})."""
RECORD_TTL = 86_400.0
"""Seconds a live session's record is kept from its last change: bounds
what a node that died leaves behind."""
LEGACY = "socketio:"
"""Subscription ids of the original system's events; refused from clients."""
PATTERNS, TICKERS, BACKTESTS, HEALTH = (LEGACY + name for name in
                                        ("patterns", "tickers", "backtests", "health"))
_CONNECT = LEGACY + "connect"
OFFSETS, NO_OFFSETS = "socket.io", "socket.io without offsets"
"""The dialects: every event's id as its last argument (Socket.IO's recovery
convention), or not, for clients whose handlers take exactly one argument."""
_Reply = Callable[[dict[str, Any]], None]


@implementer(IClient)
class SocketIOSession(EngineSession):
    """One Socket.IO client (the default namespace) on one Engine.IO session."""

    dialect = OFFSETS

    def __init__(self, server: EngineServer, address: str | None, gateway: Gateway,
                 records: ISessionRecords) -> None:
        super().__init__(server, address)
        self.user: str | None = None
        self.pid: str | None = None
        self._gateway = gateway
        self._records = records
        self._connected = False
        self._connecting = False  # a CONNECT is being answered
        self._in_hello = False  # the gateway is answering its hello
        self._subs: dict[str, tuple[str, Any]] = {}  # live subscriptions: id -> (topic, filter)
        self._waiting: dict[str, list[_Reply]] = {}
        self._current: tuple[str, _Reply] | None = None
        self._made = 0
        gateway.opened(self)

    # IClient

    def frame(self, event: Event, sub_id: str) -> bytes:
        offset = self.dialect is OFFSETS
        if sub_id.startswith(LEGACY):
            return legacy_frame(event, offset)
        return native_frame(event, sub_id, offset)

    def reply(self, answer: dict[str, Any]) -> None:
        current = self._current
        if current is not None:  # answered while it is asked (see _ask)
            self._current = None
            current[1](answer)
            return
        request = answer.get("id")
        waiting = self._waiting.get(request) if isinstance(request, str) else None
        if waiting:
            handler = waiting.pop(0)
            if not waiting:
                del self._waiting[request]  # type: ignore[arg-type]
            handler(answer)
            return
        self._emit(str(answer.get("op")), answer)

    def close(self, code: int, reason: str) -> None:
        if self.ended_at is not None:
            return
        if self._in_hello:
            return  # refused, and told why (see _welcomed)
        if self._connected:
            if code == CLOSE_POLICY:
                # A server-side disconnect: the client does not come back by itself.
                self._emit("error", {"code": "closed", "message": reason})
                self.send_packet(message(DISCONNECT))
        else:
            self.send_packet(message(CONNECT_ERROR, {"message": reason}))
        self.end()

    # The Engine.IO session

    def binary(self) -> None:
        self._refused_packet("binary attachments are not accepted; send JSON")

    def _refused_packet(self, why: str) -> None:
        self.server.bad_packets += 1
        self._gateway.errors["bad_packet"] += 1
        self._emit("error", {"code": "bad_packet", "message": why})

    def slow(self, queued: int, why: str) -> None:
        self._gateway.slow_consumer(self, queued, why)

    def ended(self) -> None:
        self._gateway.closed(self)
        if self._connected and self.pid is not None:
            # Kept for the recovery window, unless a session that recovered
            # this one owns the record already (this one ended late).
            pid = self.pid
            self._records.find(pid).addCallback(self._keep_if_owned, pid)

    def _keep_if_owned(self, record: bytes | None, pid: str) -> None:
        kept = _parse_record(record)
        if kept is None or kept.get("owner") == self.sid:
            self._keep(RECOVERY_WINDOW)

    def received(self, text: bytes) -> None:
        try:
            packet = decode(text)
        except BadPacket as error:
            self._refused_packet(str(error))
            if not isinstance(error, BinaryPacket):
                self.end()
            return
        if packet.namespace != "/":
            self.send_packet(b"44" + packet.namespace.encode() + b","
                             + orjson.dumps({"message": "Invalid namespace"}))
        elif packet.type == CONNECT:
            self._connect(packet.data)
        elif packet.type == EVENT and self._connected:
            name, args = packet.data[0], packet.data[1:]
            handler = self._events.get(name)
            if handler is None:
                self._gateway.errors["unknown_event"] += 1
                self._answer(packet.ack, {"op": "error", "id": None, "code": "unknown_event",
                                          "message": f"unknown event {name[:64]!r}"})
                return
            handler(self, args[0] if args else None, packet.ack)
        elif packet.type == DISCONNECT:
            self.end()
        # Acknowledgements from the client (none is asked for), and events
        # before CONNECT, are dropped, as Socket.IO servers do.

    # CONNECT: the hello, and recovery

    def _connect(self, auth: Any) -> None:
        if self._connected or self._connecting:
            return
        self._connecting = True
        auth = auth if isinstance(auth, dict) else {}
        if auth.get("offsets") is False:
            self.dialect = NO_OFFSETS
        pid, offset = auth.get("pid"), auth.get("offset")
        if not (isinstance(offset, str) and _is_id(offset)):
            offset = None
        if isinstance(pid, str) and 0 < len(pid) <= 64 and offset is not None:
            self._records.find(pid).addCallback(self._hello, auth, pid, offset)
        else:
            self._hello(None, auth, None, None)

    def _hello(self, record: bytes | None, auth: dict[str, Any], pid: str | None,
               offset: str | None) -> None:
        if self.ended_at is not None:
            return
        hello: dict[str, Any] = {"op": "hello", "id": _CONNECT}
        for name in ("token", "user"):
            if name in auth:
                hello[name] = auth[name]
        kept = _parse_record(record)
        if kept is not None:
            hello["resume"] = {"last_id": offset}
        self._in_hello = True
        try:
            self._ask(hello, lambda answer: self._welcomed(answer, kept, pid, offset))
        finally:
            self._in_hello = False
        if self not in self._gateway.connections:  # refused for good (too many connections)
            self.end()

    def _welcomed(self, answer: dict[str, Any], kept: dict[str, Any] | None,
                  pid: str | None, offset: str | None) -> None:
        self._connecting = self._in_hello = False
        if answer.get("op") != "welcome":
            # The gateway closes it next, which waits for the hello timeout:
            # a client may CONNECT again with other credentials until then.
            self._in_hello = True
            self.send_packet(message(CONNECT_ERROR, {
                "message": answer.get("message"), "data": {"code": answer.get("code")}}))
            if self not in self._gateway.connections:  # refused for good
                self.end()
            return
        recovered = kept is not None and kept.get("user") == self.user
        self.pid = pid if recovered else secrets.token_urlsafe(16)
        self._connected = True
        self.send_packet(message(CONNECT, {"sid": self.sid, "pid": self.pid}))
        self._emit("connection_confirmed", {
            "user_id": self.user, "session_id": self.sid, "status": "connected",
            "server_time": self.server.clock.seconds(), "recovered": recovered,
            "pid": self.pid, "offset": offset if recovered else self._gateway.position(),
        })
        if recovered:
            assert kept is not None
            self.server.recovered += 1
            for sub_id, topic, filter in kept["subs"]:
                self._subscribe(sub_id, topic, filter, self._restored)
            self._gateway.resumed(self)
        else:
            # Not this user's session (or none): nothing is replayed.
            self._gateway.resumed(self)
            self._subscribe(BACKTESTS, "backtests", None, self._made_at_connect)
            self._subscribe(HEALTH, "health", None, self._made_at_connect)
        self._keep(RECORD_TTL)  # this session owns the record now (see ended)

    def _made_at_connect(self, answer: dict[str, Any]) -> None:
        """A subscription every session gets, unless its token's permissions forbid it."""
        if answer.get("code") != "forbidden":
            self._restored(answer)

    def _restored(self, answer: dict[str, Any]) -> None:
        """A subscription of the session is back (or was made at CONNECT): only a gap is told."""
        if answer.get("op") == "error":
            self._emit("error", answer)
        elif "missed" in answer:
            self._emit("recovery_gap", {"subscription": answer["id"], **answer["missed"]})

    # Requests to the gateway

    def _ask(self, request: dict[str, Any], handler: _Reply) -> None:
        """
        Hand C{request} to the gateway; its answer goes to C{handler}, now or
        later. What the gateway answers while it handles the request is the
        answer to it (its id may not be the request's: a bad id); an answer
        that comes later is matched by id, in the order asked.
        """
        key = request["id"]
        self._current = (key, handler)
        self._gateway.receive(self, orjson.dumps(request))
        if self._current is not None:  # not answered yet
            self._current = None
            self._waiting.setdefault(key, []).append(handler)

    def _subscribe(self, sub_id: str, topic: str, filter: Any, then: _Reply) -> None:
        # Counted at once, not when answered: the same subscribe re-sent
        # while a replay is still running is then recognized (_on_subscribe).
        new = sub_id not in self._subs
        if new:
            self._subs[sub_id] = (topic, filter)

        def answered(answer: dict[str, Any]) -> None:
            if answer.get("op") == "subscribed":
                self._keep(RECORD_TTL)
            elif new and self._subs.get(sub_id) == (topic, filter):
                del self._subs[sub_id]
            then(answer)

        self._ask({"op": "subscribe", "id": sub_id, "topic": topic, "filter": filter}, answered)

    def _unsubscribe(self, sub_id: str, then: _Reply) -> None:
        def answered(answer: dict[str, Any]) -> None:
            if answer.get("op") == "unsubscribed":
                self._subs.pop(sub_id, None)
                self._keep(RECORD_TTL)
            then(answer)

        self._ask({"op": "unsubscribe", "id": sub_id}, answered)

    def _keep(self, ttl: float) -> None:
        if self.pid is not None:
            subs = [[sub_id, topic, filter] for sub_id, (topic, filter) in self._subs.items()]
            record = {"user": self.user, "owner": self.sid, "subs": subs}
            self._records.keep(self.pid, orjson.dumps(record), ttl)

    def _next_id(self, prefix: str) -> str:
        self._made += 1
        return f"{prefix}{self._made}"

    # Sending to the client

    def _emit(self, name: str, payload: Any) -> None:
        # An offset only where it is the newest this client may resume after.
        offset = payload.get("offset") if name == "connection_confirmed" else None
        self.send_packet(emit(name, payload, offset if self.dialect is OFFSETS else None))

    def _answer(self, ack: int | None, answer: dict[str, Any], name: str | None = None) -> None:
        """To the event's acknowledgement if it asked for one, else as event C{name} (its op)."""
        if ack is not None:
            self.send_packet(message(ACK, [answer], ack))
        else:
            self._emit(name or str(answer.get("op")), answer)

    # Events from the client

    def _on_subscribe(self, arg: Any, ack: int | None) -> None:
        arg = arg if isinstance(arg, dict) else {}
        sub_id, topic, filter = arg.get("id"), arg.get("topic"), arg.get("filter")
        if isinstance(sub_id, str) and sub_id.startswith(LEGACY):
            self._refuse(ack, "bad_request", f"subscription ids starting {LEGACY!r} are reserved")
            return
        # The same subscription again (a client that subscribes on every
        # connect, after its session was recovered) is the one it has.
        for have, (have_topic, have_filter) in self._subs.items():
            if (have_topic == topic and have_filter == filter and sub_id in (None, have)
                    and not have.startswith(LEGACY)):
                self._answer(ack, {"op": "subscribed", "id": have})
                return
        if sub_id is None:
            sub_id = self._next_id("sub-")
            while sub_id in self._subs:
                sub_id = self._next_id("sub-")
        self._subscribe(sub_id, topic, filter, lambda answer: self._answer(ack, answer))

    def _on_unsubscribe(self, arg: Any, ack: int | None) -> None:
        sub_id = arg.get("id") if isinstance(arg, dict) else arg
        self._unsubscribe(sub_id if isinstance(sub_id, str) else "",
                          lambda answer: self._answer(ack, answer))

    def _on_submit_backtest(self, arg: Any, ack: int | None) -> None:
        params = arg.get("params", arg) if isinstance(arg, dict) else arg
        self._ask({"op": "submit_backtest", "id": self._next_id(LEGACY + "r"), "params": params},
                  lambda answer: self._answer(ack, _public(answer)))

    def _on_cancel_job(self, arg: Any, ack: int | None) -> None:
        job_id = arg.get("job_id") if isinstance(arg, dict) else arg
        self._ask({"op": "cancel_job", "id": self._next_id(LEGACY + "r"), "job_id": job_id},
                  lambda answer: self._answer(ack, _public(answer)))

    def _on_refresh(self, arg: Any, ack: int | None) -> None:
        token = arg.get("token") if isinstance(arg, dict) else arg
        self._ask({"op": "refresh", "id": self._next_id(LEGACY + "r"), "token": token},
                  lambda answer: self._answer(ack, _public(answer)))

    def _on_subscribe_patterns(self, arg: Any, ack: int | None) -> None:
        patterns = arg.get("patterns") if isinstance(arg, dict) else None
        filter = {"patterns": patterns} if patterns else None

        def confirmed(answer: dict[str, Any]) -> None:
            if answer.get("op") != "subscribed":
                self._answer(ack, _public(answer), "error")
                return
            self._answer(ack, {"patterns": patterns or [], "count": len(patterns or []),
                               "timestamp": self.server.clock.seconds()},
                         "subscription_confirmed")

        self._replace(PATTERNS, "patterns", filter, confirmed)

    def _on_subscribe_tickers(self, arg: Any, ack: int | None) -> None:
        tickers = arg.get("tickers") if isinstance(arg, dict) else None

        def updated(answer: dict[str, Any]) -> None:
            if answer.get("op") not in ("subscribed", "unsubscribed"):
                self._answer(ack, _public(answer), "error")
                return
            self._answer(ack, {"tickers": tickers or [], "count": len(tickers or []),
                               "timestamp": self.server.clock.seconds()},
                         "subscription_updated")

        if not tickers:  # none: no more ticks
            if TICKERS in self._subs:
                self._unsubscribe(TICKERS, updated)
            else:
                updated({"op": "unsubscribed"})
            return
        self._replace(TICKERS, "ticks", {"symbols": tickers}, updated)

    def _replace(self, sub_id: str, topic: str, filter: Any, then: _Reply) -> None:
        """Subscribe C{sub_id} anew, dropping what it was (the original events replace)."""
        if self._subs.get(sub_id) == (topic, filter):
            then({"op": "subscribed", "id": sub_id})
            return
        if sub_id in self._subs:
            self._unsubscribe(sub_id, lambda answer: None)
        self._subscribe(sub_id, topic, filter, then)

    def _on_heartbeat(self, arg: Any, ack: int | None) -> None:
        def pong(answer: dict[str, Any]) -> None:
            payload: dict[str, Any] = {"timestamp": self.server.clock.seconds()}
            if isinstance(arg, dict) and "timestamp" in arg:
                payload["client_timestamp"] = arg["timestamp"]
            self._answer(ack, payload, "heartbeat_ack")

        # Through the gateway, so heartbeats count against the message budget.
        self._ask({"op": "ping", "id": self._next_id(LEGACY + "r")}, pong)

    def _refuse(self, ack: int | None, code: str, text: str) -> None:
        self._gateway.errors[code] += 1
        self._answer(ack, {"op": "error", "id": None, "code": code, "message": text})

    _events: dict[str, Callable[[SocketIOSession, Any, int | None], None]] = {
        "subscribe": _on_subscribe,
        "unsubscribe": _on_unsubscribe,
        "submit_backtest": _on_submit_backtest,
        "cancel_job": _on_cancel_job,
        "subscribe_patterns": _on_subscribe_patterns,
        "subscribe_tickers": _on_subscribe_tickers,
        "heartbeat": _on_heartbeat,
        "refresh": _on_refresh,
    }


def _public(answer: dict[str, Any]) -> dict[str, Any]:
    """A gateway answer without the request id this layer made up for it."""
    if str(answer.get("id", "")).startswith(LEGACY):
        return {**answer, "id": None}
    return answer


def _is_id(value: str) -> bool:
    try:
        id_key(value)
    except ValueError:
        return False
    return True


def _parse_record(record: bytes | None) -> dict[str, Any] | None:
    """A kept session record, or L{None} if there is none or it is not one."""
    if record is None:
        return None
    try:
        kept = orjson.loads(record)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(kept, dict) or not isinstance(kept.get("subs"), list):
        return None
    if not all(isinstance(s, list) and len(s) == 3 and isinstance(s[0], str) and
               isinstance(s[1], str) for s in kept["subs"]):
        return None
    return kept
