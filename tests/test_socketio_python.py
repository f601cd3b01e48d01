"""
The official python-socketio client (synchronous, threaded) against a real
daemon's C{/socket.io/}: connecting over polling-then-websocket and over
websocket only, TickStock's requests as events with acknowledgements, the
original system's events, a backtest answered by C{tickstock-sim}, a refused
token, and session recovery.

python-socketio does not implement Socket.IO connection state recovery, so
its clients recover by hand: C{auth} as a callable that returns C{{token,
pid, offset}} from C{connection_confirmed}'s C{pid} and the last event id
seen. Its handlers must take exactly the arguments an event carries, so
these clients pass C{offsets: False} unless the test is about offsets.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import socketio

from tests.servers import poll
from tests.socketio_stack import SocketIOStack

TIMEOUT = 10


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SocketIOStack]:
    stack = SocketIOStack(tmp_path_factory.mktemp("sio-python"))
    stack.start()
    yield stack
    stack.stop()


class Recorder:
    """A python-socketio client and what each event brought it, in order."""

    def __init__(self, *names: str, offsets: bool = False, **options: Any) -> None:
        self.sio = socketio.Client(**{"reconnection": False, **options})
        self.seen: dict[str, list[Any]] = {name: [] for name in names}
        for name in names:
            self.sio.on(name, self._recorder(name, offsets))

    def _recorder(self, name: str, offsets: bool) -> Callable[..., None]:
        if offsets:
            return lambda data, offset: self.seen[name].append((data, offset))
        return lambda data: self.seen[name].append(data)

    def wait(self, name: str, count: int = 1, timeout: float = TIMEOUT) -> list[Any]:
        poll(lambda: len(self.seen[name]) >= count, timeout, f"{count} {name} event(s)")
        return self.seen[name]

    def close(self) -> None:
        self.sio.disconnect()
        # Its polling requests' session keeps its keep-alive connection open.
        if self.sio.eio.http is not None:
            self.sio.eio.http.close()


@pytest.fixture
def clients() -> Iterator[Callable[..., Recorder]]:
    made: list[Recorder] = []

    def make(*names: str, **options: Any) -> Recorder:
        made.append(Recorder(*names, **options))
        return made[-1]

    yield make
    for client in made:
        client.close()


def auth(stack: SocketIOStack, user: str) -> dict[str, Any]:
    return {"token": stack.token(user), "offsets": False}


@pytest.mark.parametrize("transports", [None, ["websocket"]])
def test_connects_and_is_confirmed(stack: SocketIOStack, clients: Callable[..., Recorder],
                                   transports: list[str] | None) -> None:
    """
    With the default transports the client starts on long-polling and
    upgrades to a WebSocket; with websocket only it starts there. Either way
    CONNECT is answered and C{connection_confirmed} names the token's user,
    not recovered, with the pid a recovering client needs.
    """
    client = clients("connection_confirmed")
    client.sio.connect(stack.url(), auth=auth(stack, "py-alice"), transports=transports,
                       wait_timeout=TIMEOUT)
    [confirmed] = client.wait("connection_confirmed")
    assert confirmed["user_id"] == "py-alice"
    assert confirmed["status"] == "connected"
    assert confirmed["recovered"] is False
    assert confirmed["session_id"] == client.sio.get_sid()
    assert isinstance(confirmed["pid"], str) and confirmed["pid"]
    poll(lambda: client.sio.transport() == "websocket", TIMEOUT, "the upgrade to websocket")


def test_subscribe_gets_only_matching_alerts(stack: SocketIOStack,
                                             clients: Callable[..., Recorder]) -> None:
    """
    C{subscribe} as an event with an acknowledgement: C{sio.call} returns
    C{{op: subscribed, id}}, and only the alerts the filter (symbols and
    min_confidence) lets through then arrive, as C{event} events carrying
    the C{/ws} frame. Delivery is in order, so the refused alerts, published
    before the last wanted one, would have come by the time it did.
    """
    client = clients("event", "connection_confirmed")
    client.sio.connect(stack.url(), auth=auth(stack, "py-bob"), transports=["websocket"],
                       wait_timeout=TIMEOUT)
    answer = client.sio.call("subscribe", {"id": "mine", "topic": "patterns",
                                           "filter": {"symbols": ["PYA"], "min_confidence": 0.8}},
                             timeout=TIMEOUT)
    assert answer == {"op": "subscribed", "id": "mine"}
    wanted = [stack.alert("PYA", "Doji", 0.9)]
    stack.alert("PYA", "Doji", 0.5)
    stack.alert("PYZ", "Doji", 0.95)
    wanted.append(stack.alert("PYA", "Hammer", 0.85))
    events = client.wait("event", 2)
    assert [e["data"]["event_id"] for e in events] == wanted
    assert all(e["op"] == "event" and e["sub"] == "mine" and e["type"] == "pattern_detected"
               for e in events)


def test_subscribe_patterns_gets_pattern_alerts(stack: SocketIOStack,
                                                clients: Callable[..., Recorder]) -> None:
    """
    The original system's C{subscribe_patterns} is confirmed by a
    C{subscription_confirmed} event, and the matching alerts arrive as
    C{pattern_alert} in the original shape C{{type, id, event: {event_type,
    source, timestamp, data, channel}}}.
    """
    client = clients("subscription_confirmed", "pattern_alert", "connection_confirmed")
    client.sio.connect(stack.url(), auth=auth(stack, "py-carol"), wait_timeout=TIMEOUT)
    client.sio.emit("subscribe_patterns", {"patterns": ["PyPattern"]})
    [confirmed] = client.wait("subscription_confirmed")
    assert confirmed["patterns"] == ["PyPattern"] and confirmed["count"] == 1
    stack.alert("PYC", "OtherPattern")
    wanted = stack.alert("PYC", "PyPattern", 0.75)
    [alert] = client.wait("pattern_alert")
    assert alert["type"] == "pattern_alert"
    assert isinstance(alert["id"], str)
    body = alert["event"]
    assert body["event_type"] == "pattern_detected"
    assert body["channel"] == "tickstock.events.patterns"
    assert isinstance(body["source"], str) and isinstance(body["timestamp"], float)
    assert body["data"]["event_id"] == wanted
    assert (body["data"]["symbol"], body["data"]["pattern"]) == ("PYC", "PyPattern")
    assert body["data"]["confidence"] == 0.75


def test_backtest_progress_and_result(stack: SocketIOStack,
                                      clients: Callable[..., Recorder]) -> None:
    """
    C{submit_backtest} is acknowledged with C{job_accepted}; the simulator
    runs the job and its C{backtest_progress} and C{backtest_result} events
    reach the submitting client, which was subscribed to its own backtests
    at CONNECT.
    """
    poll(lambda: not stack.redis.command("PUBSUB", "NUMSUB", "tickstock.jobs.backtest")
         .endswith(b":0\r\n"), 30, "tickstock-sim to listen for jobs")
    client = clients("backtest_progress", "backtest_result", "connection_confirmed")
    client.sio.connect(stack.url(), auth=auth(stack, "py-dave"), transports=["websocket"],
                       wait_timeout=TIMEOUT)
    answer = client.sio.call("submit_backtest", {
        "symbols": ["PYBT"], "start_date": "2024-01-02", "end_date": "2024-03-01",
        "patterns": ["Doji"]}, timeout=TIMEOUT)
    assert answer["op"] == "job_accepted" and answer["status"] in ("queued", "running"), answer
    job_id = answer["job_id"]
    [result] = client.wait("backtest_result", timeout=30)
    assert result["event"]["data"]["job_id"] == job_id
    progress = client.seen["backtest_progress"]
    assert progress and all(p["event"]["data"]["job_id"] == job_id for p in progress)
    assert all(p["type"] == "backtest_progress" for p in progress)


def test_bad_token_is_refused_saying_why(stack: SocketIOStack,
                                         clients: Callable[..., Recorder]) -> None:
    """
    A bad token makes C{connect} raise C{socketio.exceptions.ConnectionError};
    python-socketio words that message itself, so why is in the
    C{connect_error} data the server sent.
    """
    client = clients("connect_error")
    with pytest.raises(socketio.exceptions.ConnectionError, match="failed to connect"):
        client.sio.connect(stack.url(), auth={"token": "not.a.jwt", "offsets": False},
                           transports=["websocket"], wait_timeout=TIMEOUT)
    [error] = client.wait("connect_error")
    assert error["message"].startswith("invalid token")
    assert error["data"] == {"code": "unauthorized"}
    assert not client.sio.connected


def test_recovery_by_hand_after_the_transport_drops(stack: SocketIOStack,
                                                    clients: Callable[..., Recorder]) -> None:
    """
    The WebSocket under a client is cut; it reconnects by itself with
    C{auth} from a callable giving C{{token, pid, offset}}: the server
    restores its subscription and replays what was published while it was
    away, once and in order, and C{connection_confirmed.recovered} is true.
    """
    user = "py-erin"
    witness = clients("event", "connection_confirmed")
    witness.sio.connect(stack.url(), auth=auth(stack, user), transports=["websocket"],
                        wait_timeout=TIMEOUT)
    witness.sio.call("subscribe", {"id": "w", "topic": "patterns",
                                   "filter": {"symbols": ["PYR"]}}, timeout=TIMEOUT)

    client = clients("event", "connection_confirmed", "disconnect",
                     reconnection=True, reconnection_delay=0.1, randomization_factor=0)
    back = threading.Event()

    def credentials() -> dict[str, Any]:
        confirmed, events = client.seen["connection_confirmed"], client.seen["event"]
        if not confirmed:
            return auth(stack, user)
        # Reconnecting: only once the alerts it misses are published.
        back.wait(TIMEOUT)
        return {**auth(stack, user), "pid": confirmed[-1]["pid"], "offset": events[-1]["id"]}

    client.sio.connect(stack.url(), auth=credentials, transports=["websocket"],
                       wait_timeout=TIMEOUT)
    client.wait("connection_confirmed")
    assert client.sio.call("subscribe", {"id": "r", "topic": "patterns",
                                         "filter": {"symbols": ["PYR"]}}, timeout=TIMEOUT) \
        == {"op": "subscribed", "id": "r"}
    published = [stack.alert("PYR", "Doji")]
    client.wait("event")

    client.sio.eio.ws.sock.shutdown(socket.SHUT_RDWR)
    client.wait("disconnect")
    published += [stack.alert("PYR", "Doji") for _ in range(3)]
    witness.wait("event", 4)
    back.set()

    confirmed = client.wait("connection_confirmed", 2)[-1]
    assert confirmed["recovered"] is True
    assert confirmed["pid"] == client.seen["connection_confirmed"][0]["pid"]
    published.append(stack.alert("PYR", "Doji"))
    client.wait("event", 5)
    events = client.seen["event"]
    assert [e["data"]["event_id"] for e in events] == published
    assert all(e["sub"] == "r" for e in events)
    assert [e["id"] for e in events] == [e["id"] for e in witness.wait("event", 5)]


def test_offsets_are_the_last_argument(stack: SocketIOStack,
                                       clients: Callable[..., Recorder]) -> None:
    """
    By default every event carries its id as a last argument (Socket.IO's
    offset), so a handler takes C{(data, offset)}: the offset equals the
    event's C{id}.
    """
    client = clients("event", "connection_confirmed", offsets=True)
    client.sio.connect(stack.url(), auth={"token": stack.token("py-frank")},
                       transports=["websocket"], wait_timeout=TIMEOUT)
    [(confirmed, offset)] = client.wait("connection_confirmed")
    assert offset == confirmed["offset"]
    client.sio.call("subscribe", {"topic": "patterns", "filter": {"symbols": ["PYO"]}},
                    timeout=TIMEOUT)
    wanted = stack.alert("PYO", "Doji")
    [(data, offset)] = client.wait("event")
    assert data["data"]["event_id"] == wanted
    assert offset == data["id"]
