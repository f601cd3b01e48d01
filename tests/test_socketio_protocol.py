"""
Engine.IO v4 and Socket.IO v5 on C{/socket.io/} as raw HTTP long-polling
requests and raw WebSocket frames, against a real daemon with short pings
(1 s interval, 1 s timeout), a 2,000-byte payload limit and a 3 s hello
timeout: the handshake, the errors and limits a client can run into, the
server's pings, refused binary data, CONNECT's refusals, the per-IP cap
shared with C{/ws}, and the hello timeout.
"""

from __future__ import annotations

import http.client
import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import websocket

from tests.servers import poll
from tests.socketio_stack import SocketIOStack

TIMEOUT = 10
MAX_PAYLOAD = 2000
HELLO_TIMEOUT = 3


def start(tmp: Path, *extra: str) -> SocketIOStack:
    stack = SocketIOStack(tmp, 1, *extra)
    stack.start()
    return stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SocketIOStack]:
    stack = start(tmp_path_factory.mktemp("sio-protocol"), "--ws-ping-interval", "1",
                  "--ws-ping-timeout", "1", "--max-message-size", str(MAX_PAYLOAD),
                  "--hello-timeout", str(HELLO_TIMEOUT))
    yield stack
    stack.stop()


def request(stack: SocketIOStack, method: str, query: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One HTTP request to C{/socket.io/?query}: its status and body."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.daemons[0].port, timeout=TIMEOUT)
    try:
        conn.request(method, "/socket.io/?" + query, body=body, headers=headers or {})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def health(stack: SocketIOStack) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", stack.daemons[0].port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/health")
        return dict(json.loads(conn.getresponse().read()))
    finally:
        conn.close()


def told_closed(client: Polling) -> None:
    """An ended session's next poll ends with the close packet, once; then its sid is unknown."""
    status, body = client.get()
    assert status == 200 and body.split(b"\x1e")[-1] == b"1"
    assert refusal(client.get()) == (400, 1)


def refusal(answer: tuple[int, bytes]) -> tuple[int, int]:
    """An Engine.IO error answer as (HTTP status, code)."""
    status, body = answer
    return status, json.loads(body)["code"]


def connect_packet(stack: SocketIOStack, user: str) -> bytes:
    return b"40" + json.dumps({"token": stack.token(user)}).encode()


def event(packet: bytes | str) -> list[Any]:
    """The name and arguments of a Socket.IO EVENT packet (C{42[...]})."""
    text = packet.decode() if isinstance(packet, bytes) else packet
    assert text.startswith("42["), text
    return list(json.loads(text[2:]))


def unrelated(packet: bytes | str) -> bool:
    """Events a connected session gets on its own (its backtests, system health)."""
    text = packet.decode() if isinstance(packet, bytes) else packet
    return text.startswith(('42["system_health"', '42["backtest_'))


class Polling:
    """An Engine.IO session on long-polling, made by the handshake."""

    def __init__(self, stack: SocketIOStack, headers: dict[str, str] | None = None) -> None:
        self.stack = stack
        status, body = request(stack, "GET", "EIO=4&transport=polling", headers=headers)
        assert status == 200, body
        assert body[:1] == b"0"
        self.open = json.loads(body[1:])
        self.sid = self.open["sid"]
        self.query = f"EIO=4&transport=polling&sid={self.sid}"

    def get(self) -> tuple[int, bytes]:
        return request(self.stack, "GET", self.query)

    def post(self, *packets: bytes) -> tuple[int, bytes]:
        return request(self.stack, "POST", self.query, b"\x1e".join(packets),
                       {"content-type": "text/plain;charset=UTF-8"})

    def read(self) -> list[bytes]:
        """One poll's packets, its pings answered and left out."""
        status, body = self.get()
        assert status == 200, body
        packets = body.split(b"\x1e")
        if b"2" in packets:
            assert self.post(b"3") == (200, b"ok")
        return [p for p in packets if p != b"2"]

    def until(self, done: Callable[[list[bytes]], bool]) -> list[bytes]:
        """Poll until what came so far is C{done}; all of it."""
        seen: list[bytes] = []
        while not done(seen):
            seen += self.read()
        return seen

    def connect(self, user: str) -> None:
        assert self.post(connect_packet(self.stack, user)) == (200, b"ok")
        self.until(lambda seen: any(p.startswith(b'42["connection_confirmed"') for p in seen))


class Socket:
    """A raw WebSocket on C{/socket.io/}; C{close_code} once the server closed it."""

    def __init__(self, stack: SocketIOStack, query: str = "", **options: Any) -> None:
        self.ws = websocket.WebSocket()
        self.ws.settimeout(TIMEOUT)
        try:
            self.ws.connect(f"ws://127.0.0.1:{stack.daemons[0].port}/socket.io/"
                            "?EIO=4&transport=websocket" + query, **options)
        except Exception:
            self.ws.close()  # a refused handshake leaves websocket-client's socket open
            raise
        self.close_code: int | None = None

    def packet(self) -> str | None:
        """The next text frame; None once the server closed the socket."""
        opcode, data = self.ws.recv_data()
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            self.close_code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
            return None
        assert opcode == websocket.ABNF.OPCODE_TEXT, (opcode, data)
        return str(data.decode())

    def next(self, answer_pings: bool = True) -> str | None:
        """The next packet that is not a ping (answered) or an unrelated event."""
        while True:
            packet = self.packet()
            if packet == "2" and answer_pings:
                self.ws.send("3")
            elif packet is None or not (packet == "2" or unrelated(packet)):
                return packet

    def send(self, packet: str) -> None:
        self.ws.send(packet)

    def close(self) -> None:
        self.ws.close(timeout=1)
        self.ws.shutdown()  # close() leaves the socket open once the server has closed it


@pytest.fixture
def sockets(stack: SocketIOStack) -> Iterator[Callable[..., Socket]]:
    made: list[Socket] = []

    def make(query: str = "", **options: Any) -> Socket:
        made.append(Socket(stack, query, **options))
        return made[-1]

    yield make
    for socket in made:
        socket.close()


def test_polling_handshake_and_connect(stack: SocketIOStack) -> None:
    """
    The handshake answers the open packet (sid, the websocket upgrade, the
    ping settings in milliseconds, maxPayload); a POSTed CONNECT with a token
    is taken ("ok") and the next poll brings the CONNECT reply with the sid
    and a pid, then C{connection_confirmed}, separated by U+001E.
    """
    client = Polling(stack)
    assert set(client.open) == {"sid", "upgrades", "pingInterval", "pingTimeout", "maxPayload"}
    assert client.open["upgrades"] == ["websocket"]
    assert (client.open["pingInterval"], client.open["pingTimeout"]) == (1000, 1000)
    assert client.open["maxPayload"] == MAX_PAYLOAD
    assert client.post(connect_packet(stack, "raw-alice")) == (200, b"ok")
    status, body = client.get()
    assert status == 200
    packets = [p for p in body.split(b"\x1e") if p != b"2"]
    assert packets[0].startswith(b"40")
    reply = json.loads(packets[0][2:])
    assert reply["sid"] == client.sid and isinstance(reply["pid"], str)
    name, confirmed, offset = event(packets[1])
    assert name == "connection_confirmed"
    assert confirmed["user_id"] == "raw-alice" and confirmed["pid"] == reply["pid"]
    assert offset == confirmed["offset"]


def test_polling_refusals(stack: SocketIOStack) -> None:
    """
    Engine.IO's error answers: an old protocol version (code 5), an unknown
    transport (0) and an unknown sid (1) with 400; a POST over maxPayload
    with 413, and its session is closed.
    """
    assert refusal(request(stack, "GET", "EIO=3&transport=polling")) == (400, 5)
    assert refusal(request(stack, "GET", "EIO=4&transport=flashsocket")) == (400, 0)
    assert refusal(request(stack, "GET", "EIO=4&transport=polling&sid=nosuchsid")) == (400, 1)
    assert refusal(request(stack, "POST", "EIO=4&transport=polling&sid=nosuchsid",
                           b"40")) == (400, 1)

    client = Polling(stack)
    assert refusal(client.post(b"4" + b"x" * MAX_PAYLOAD)) == (413, 3)
    told_closed(client)


def test_overlapping_polls_close_the_session(stack: SocketIOStack) -> None:
    """
    A second GET while one is pending breaks the protocol: both are answered
    with 400 and the session is closed. (Whichever the server reads first is
    the pending one, so the outcome does not depend on their order.)
    """
    client = Polling(stack)
    port = stack.daemons[0].port
    first = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    second = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        first.request("GET", "/socket.io/?" + client.query)
        second.request("GET", "/socket.io/?" + client.query)
        answers = [conn.getresponse() for conn in (first, second)]
        assert [refusal((a.status, a.read())) for a in answers] == [(400, 3), (400, 3)]
    finally:
        first.close()
        second.close()
    told_closed(client)


def test_foreign_origin_is_refused(stack: SocketIOStack,
                                   sockets: Callable[..., Socket]) -> None:
    """
    An C{Origin} of another site is refused with 403 on the polling
    handshake, on the WebSocket upgrade of a session and on a WebSocket-only
    session; the same origin (the page the daemon serves) is let in.
    """
    evil = "http://evil.example"
    assert refusal(request(stack, "GET", "EIO=4&transport=polling",
                           headers={"Origin": evil})) == (403, 4)
    client = Polling(stack, {"Origin": stack.url()})
    for query in (f"&sid={client.sid}", ""):
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            sockets(query, origin=evil)
        assert refused.value.status_code == 403
    assert sockets(origin=stack.url()).packet() is not None


def test_a_session_that_stops_polling_is_closed_and_forgotten(stack: SocketIOStack) -> None:
    """
    A connected polling session whose client stops polling misses the
    server's ping and is closed after pingInterval + pingTimeout: its sid is
    then unknown (400, code 1) and nothing of it is left: no session, no
    gateway client, no subscription.
    """
    client = Polling(stack)
    client.connect("raw-bob")
    before = health(stack)
    assert before["clients"] >= 1 and before["subscriptions"] >= 2

    poll(lambda: request(stack, "GET", client.query)[0] == 400, TIMEOUT,
         "the abandoned session to close")
    assert refusal(client.get()) == (400, 1)
    poll(lambda: health(stack)["clients"] == 0 and health(stack)["subscriptions"] == 0,
         TIMEOUT, "the session's client and subscriptions to go")
    after = health(stack)["socketio"]
    assert after["sessions"] == 0
    assert after["pongs_missed"] > before["socketio"]["pongs_missed"]


def test_websocket_only_session(stack: SocketIOStack, sockets: Callable[..., Socket]) -> None:
    """
    A WebSocket-only client's first frame is the open packet, with no
    upgrades; the server pings ("2") and a client that answers ("3") keeps
    its session past pingInterval + pingTimeout; one that
    stops answering is closed.
    """
    client = sockets()
    first = client.packet()
    assert first is not None and first.startswith("0")
    opened = json.loads(first[1:])
    assert opened["upgrades"] == [] and opened["pingInterval"] == 1000
    client.send(connect_packet(stack, "raw-carol").decode())
    assert (client.next() or "").startswith("40")
    assert event(client.next() or "")[0] == "connection_confirmed"

    pings = 0
    while pings < 3:
        packet = client.packet()
        assert packet is not None, "the session was closed though it answered pings"
        if packet == "2":
            pings += 1
            client.send("3")
    client.send('421["heartbeat",{"timestamp":7}]')
    answer = client.next()
    assert answer is not None and answer.startswith("431[")
    assert json.loads(answer[3:])[0]["client_timestamp"] == 7

    while client.next(answer_pings=False) is not None:
        pass
    assert client.close_code == 1000


def test_binary_data_is_refused(stack: SocketIOStack, sockets: Callable[..., Socket]) -> None:
    """
    TickStock speaks JSON: a Socket.IO packet with binary attachments, and
    a binary WebSocket frame, are each answered with an C{error} event
    naming binary, counted, and the session stays up.
    """
    client = sockets()
    client.packet()
    client.send(connect_packet(stack, "raw-dave").decode())
    assert (client.next() or "").startswith("40")
    assert event(client.next() or "")[0] == "connection_confirmed"

    client.send('451-["x",{"_placeholder":true,"num":0}]')
    name, error = event(client.next() or "")
    assert name == "error"
    assert error == {"code": "bad_packet",
                     "message": "binary attachments are not accepted; send JSON"}
    client.send('421["heartbeat",{}]')
    assert (client.next() or "").startswith("431[")

    bad = health(stack)["socketio"]["bad_packets"]
    client.ws.send_binary(b"\x04binary")
    assert event(client.next() or "") == ["error", {
        "code": "bad_packet", "message": "binary attachments are not accepted; send JSON"}]
    client.send('422["heartbeat",{}]')
    assert (client.next() or "").startswith("432[")
    assert health(stack)["socketio"]["bad_packets"] == bad + 1


def test_connect_refusals(stack: SocketIOStack, sockets: Callable[..., Socket]) -> None:
    """
    CONNECT is refused with CONNECT_ERROR (C{44}) saying why: a bad token,
    no auth on a daemon that needs a token; another namespace gets
    "Invalid namespace". An event sent before CONNECT is dropped unanswered.
    A refused client may still CONNECT with a good token.
    """
    client = sockets()
    client.packet()
    client.send('40{"token":"not.a.jwt"}')
    refused = client.next() or ""
    assert refused.startswith("44")
    assert json.loads(refused[2:])["message"].startswith("invalid token")
    client.send("40")
    assert json.loads((client.next() or "")[2:])["message"] == "hello needs a token"
    client.send("40/admin,")
    assert client.next() == '44/admin,{"message":"Invalid namespace"}'

    client.send('421["subscribe",{"topic":"patterns"}]')
    client.send('42["heartbeat",{}]')
    client.send(connect_packet(stack, "raw-erin").decode())
    assert (client.next() or "").startswith("40{")
    assert event(client.next() or "")[0] == "connection_confirmed"


def test_no_connect_within_the_hello_timeout(stack: SocketIOStack) -> None:
    """
    An Engine.IO session that answers pings but never sends CONNECT is told
    "no hello in time" (CONNECT_ERROR) after --hello-timeout and closed: its
    sid is then unknown.
    """
    client = Polling(stack)
    packets = client.until(lambda seen: any(p.startswith(b"44") for p in seen))
    assert packets[-1] == b'44{"message":"no hello in time"}'
    assert packets[:-1] == []
    told_closed(client)


def test_per_ip_cap_counts_polling_and_ws(tmp_path: Path) -> None:
    """
    Polling sessions, Engine.IO WebSockets and C{/ws} connections count
    against one per-address cap: with two allowed, a third of any kind is
    refused with 429, and a closed one frees its place.
    """
    stack = start(tmp_path, "--max-connections-per-ip", "2")
    plain: list[websocket.WebSocket] = []
    try:
        first, second = Polling(stack), Polling(stack)
        assert refusal(request(stack, "GET", "EIO=4&transport=polling"))[0] == 429
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            Socket(stack)
        assert refused.value.status_code == 429

        assert first.post(b"1") == (200, b"ok")
        plain.append(websocket.create_connection(
            f"ws://127.0.0.1:{stack.daemons[0].port}/ws", timeout=TIMEOUT))
        assert refusal(request(stack, "GET", "EIO=4&transport=polling"))[0] == 429

        plain.pop().close()
        poll(lambda: request(stack, "GET", "EIO=4&transport=polling")[0] == 200, TIMEOUT,
             "a place freed by the closed /ws connection")
        assert second.post(b"1") == (200, b"ok")
    finally:
        for ws in plain:
            ws.close()
        stack.stop()
