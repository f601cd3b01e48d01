"""
A real WebSocket client for the tests (Autobahn over TCP), recording what
the server sends, plus async polling helpers with deadlines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IResponse


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Let the reactor run until C{predicate()} holds; fail after C{timeout}."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await deferLater(reactor, 0.01, lambda: None)


class _Body(Protocol):
    """Collects a response body for L{read_body}."""

    def __init__(self, done: Deferred[bytes]) -> None:
        self.done = done
        self.parts: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


def read_body(response: IResponse) -> Deferred[bytes]:
    """
    The whole body of an Agent response, or the failure that cut it short.
    Twisted's readBody does the same but warns (DeprecationWarning) on every
    Agent response, whose body transport has no abortConnection.
    """
    done: Deferred[bytes] = Deferred()
    response.deliverBody(_Body(done))
    return done


class RecordingClient(WebSocketClientProtocol):
    """Keeps every message; C{closed} fires with (code, reason)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[dict[str, Any]] = []
        self.opened: Deferred[RecordingClient] = Deferred()
        self.closed: Deferred[tuple[int | None, str | None]] = Deferred()
        self.close_code: int | None = None

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append(orjson.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.close_code = code
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"handshake refused: {code} {reason}"))
        if not self.closed.called:
            self.closed.callback((code, reason))

    def send(self, message: dict[str, Any] | bytes) -> None:
        payload = message if isinstance(message, bytes) else orjson.dumps(message)
        self.sendMessage(payload)

    def of(self, op: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("op") == op]

    def events(self, sub: str | None = None) -> list[dict[str, Any]]:
        return [m for m in self.of("event") if sub is None or m["sub"] == sub]

    async def request(self, message: dict[str, Any], reply_op: str,
                      timeout: float = 5.0) -> dict[str, Any]:
        """Send C{message} and wait for the reply carrying its id (or an error)."""
        start = len(self.messages)
        self.send(message)

        def found() -> bool:
            return any(
                m.get("op") in (reply_op, "error") and m.get("id") == message.get("id")
                for m in self.messages[start:]
            )

        await eventually(found, timeout, f"reply {reply_op} to {message}")
        return next(
            m for m in self.messages[start:]
            if m.get("op") in (reply_op, "error") and m.get("id") == message.get("id")
        )


async def connect(port: int, origin: str | None = None,
                  hello: dict[str, Any] | None = None) -> RecordingClient:
    """Open a WebSocket to the daemon on C{port}; say C{hello} when given."""
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}/ws", origin=origin)
    factory.protocol = RecordingClient
    factory.setProtocolOptions(autoPingInterval=0)
    proto = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    await proto.opened
    if hello is not None:
        reply = await proto.request({"op": "hello", "id": "h", **hello}, "welcome")
        assert reply["op"] == "welcome", reply
    return proto


async def http_get(port: int, path: str,
                   headers: dict[bytes, list[bytes]] | None = None) -> tuple[int, Any]:
    """GET from the daemon in this reactor; (status, parsed JSON or raw body)."""
    from twisted.web.client import Agent
    from twisted.web.http_headers import Headers

    response = await Agent(reactor).request(
        b"GET", f"http://127.0.0.1:{port}{path}".encode(), Headers(headers or {})
    )
    body = await read_body(response)
    try:
        return response.code, orjson.loads(body)
    except orjson.JSONDecodeError:
        return response.code, body


async def http_request(port: int, method: bytes, path: str, token: str | None = None,
                       body: Any = None, content_type: bytes = b"application/json",
                       ) -> tuple[int, Any, Any]:
    """
    Any request to the daemon in this reactor, with a bearer token and a
    JSON (or raw bytes) body; (status, parsed JSON or raw body, headers).
    """
    from io import BytesIO

    from twisted.web.client import Agent, FileBodyProducer
    from twisted.web.http_headers import Headers

    headers = Headers()
    if token is not None:
        headers.addRawHeader(b"authorization", b"Bearer " + token.encode())
    producer = None
    if body is not None:
        headers.addRawHeader(b"content-type", content_type)
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        producer = FileBodyProducer(BytesIO(raw))
    response = await Agent(reactor).request(
        method, f"http://127.0.0.1:{port}{path}".encode(), headers, producer)
    data = await read_body(response)
    try:
        return response.code, orjson.loads(data), response.headers
    except orjson.JSONDecodeError:
        return response.code, data, response.headers
