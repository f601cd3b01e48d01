"""
TickStock's C{/socket.io/} against the official client, C{socket.io-client}
4.8.1 (pinned in tests/socketio/package.json), in Node
(tests/socketio/client.mjs, driven a command at a time) and in a real
headless Chromium: connecting with a token, filtered subscriptions, the
original system's events, backtests, refusals and connection state
recovery, on the same node and on another one. The deployment is
L{SocketIOStack}: Redis, two daemons with auth on, and the simulator.

scripts/test installs Node, npm, the client (C{npm ci}) and Chromium and sets
C{TICKSTOCK_BROWSER_REQUIRED}, so there a missing one fails the run;
elsewhere these tests are skipped.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.servers import poll
from tests.socketio_stack import NODE_MODULES, SocketIOStack
from tickstock.domain.events import id_key

NODE = shutil.which("node")
CLIENT = NODE_MODULES.parent / "client.mjs"
BUNDLE = NODE_MODULES / "socket.io-client" / "dist" / "socket.io.min.js"
CHROMIUM = os.environ.get("TICKSTOCK_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REQUIRED = bool(os.environ.get("TICKSTOCK_BROWSER_REQUIRED"))
MISSED = 5
BACKTEST = {"symbols": ["AAPL", "MSFT"], "start_date": "2024-01-02", "end_date": "2024-06-28",
            "patterns": ["Doji"]}
# The simulator trades AAPL, MSFT, NVDA and AMZN with the patterns of
# tickstock.domain.jobs.JOB_PATTERNS: these symbols and patterns are the tests' own.
SYMBOLS = (f"SIO{n}" for n in itertools.count())
PATTERN = "SioTestPattern"

if NODE is None or not BUNDLE.exists():
    if REQUIRED:
        raise RuntimeError("node or tests/socketio/node_modules is missing: scripts/test "
                           "installs nodejs and npm and runs npm ci in tests/socketio")
    pytest.skip("no node, or no socket.io-client in tests/socketio/node_modules",
                allow_module_level=True)

TRANSPORTS = pytest.mark.parametrize("transports", [None, ["websocket"]],
                                     ids=["polling-then-upgrade", "websocket"])


class Node:
    """One client.mjs process: named sockets of the official client, driven by command."""

    def __init__(self) -> None:
        assert NODE is not None
        self.process = subprocess.Popen([NODE, CLIENT.name], cwd=CLIENT.parent, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self._next() == {"ready": True}

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put("")

    def _next(self) -> dict[str, Any]:
        line = self._lines.get(timeout=30)
        if not line:
            raise RuntimeError(f"client.mjs ended ({self.process.wait()})")
        answer: dict[str, Any] = json.loads(line)
        assert "failed" not in answer, answer
        return answer

    def __call__(self, cmd: str, name: str, **fields: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"cmd": cmd, "name": name, **fields}) + "\n")
        self.process.stdin.flush()
        return self._next()

    def connect(self, name: str, url: str, auth: dict[str, Any],
                transports: list[str] | None) -> dict[str, Any]:
        return self("connect", name, url=url, auth=auth, transports=transports)

    def ack(self, name: str, event: str, payload: Any) -> Any:
        """Emit C{event} with C{payload} and an acknowledgement; the server's answer."""
        return self("emit", name, event=event, args=[payload], ack=True)["ack"]

    def received(self, name: str, event: str) -> list[list[Any]]:
        """The arguments of every C{event} socket C{name} received so far."""
        return [args for got, *args in self("events", name)["events"] if got == event]

    def wait(self, name: str, event: str, count: int, timeout: float = 10,
             where: Callable[[list[Any]], bool] = lambda args: True) -> list[list[Any]]:
        """The arguments of C{event} (those C{where} picks) once C{name} has C{count} of them."""
        found: list[list[Any]] = []

        def enough() -> bool:
            found[:] = [args for args in self.received(name, event) if where(args)]
            return len(found) >= count

        try:
            poll(enough, timeout, f"{count} {event!r} on {name}")
        except TimeoutError as error:
            raise TimeoutError(f"{error}: {self('events', name)['events']}") from None
        return found

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SocketIOStack]:
    stack = SocketIOStack(tmp_path_factory.mktemp("socketio"), 2)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def node() -> Iterator[Node]:
    client = Node()
    try:
        yield client
    finally:
        client.close()


def subscribe(node: Node, name: str, symbol: str) -> str:
    """Subscribe socket C{name} to C{symbol}'s pattern alerts; the subscription id."""
    answer = node.ack(name, "subscribe", {"topic": "patterns", "filter": {"symbols": [symbol]}})
    assert answer["op"] == "subscribed", answer
    return str(answer["id"])


def producer_ids(frames: list[list[Any]]) -> list[str]:
    return [frame[0]["data"]["event_id"] for frame in frames]


def assert_offsets(frames: list[list[Any]]) -> None:
    """Each event's id is its last argument, ascending, none twice."""
    ids = [args[-1] for args in frames]
    assert [args[0]["id"] for args in frames] == ids
    assert ids == sorted(ids, key=id_key) and len(set(ids)) == len(ids), ids


@TRANSPORTS
def test_connects_with_a_token_and_ends_on_a_websocket(
        stack: SocketIOStack, node: Node, transports: list[str] | None) -> None:
    """
    C{auth: {token}} connects: C{connection_confirmed} names the token's user,
    the session and its pid (what the client keeps for recovery), and a
    C{heartbeat} is answered. With default options the client opens on
    long-polling and upgrades; with C{transports: ["websocket"]} it opens on
    a WebSocket; either way it ends on a WebSocket.
    """
    answer = node.connect("s", stack.url(), {"token": stack.token("sio-alice")}, transports)
    assert answer["connected"] is True and answer["recovered"] is False, answer
    [[confirmed, offset]] = node.wait("s", "connection_confirmed", 1)
    state = node("state", "s")
    assert confirmed["user_id"] == "sio-alice" and confirmed["status"] == "connected"
    assert confirmed["session_id"] == state["id"] and confirmed["pid"] == state["pid"]
    assert confirmed["recovered"] is False and offset == confirmed["offset"]
    assert node.ack("s", "heartbeat", {"timestamp": 12.5})["client_timestamp"] == 12.5
    poll(lambda: node("state", "s")["transport"] == "websocket", 10, "a websocket")
    events = node("events", "s")["events"]
    opened = [args for got, *args in events if got == "$open"]
    upgraded = [args for got, *args in events if got == "$upgrade"]
    if transports is None:
        assert (opened, upgraded) == ([["polling"]], [["websocket"]]), events
    else:
        assert (opened, upgraded) == ([["websocket"]], []), events


@TRANSPORTS
def test_only_matching_alerts_arrive_on_both_kinds_of_subscription(
        stack: SocketIOStack, node: Node, transports: list[str] | None) -> None:
    """
    C{subscribe} with a filter (acknowledged) gets only matching alerts as
    C{event} with the C{/ws} frame; C{subscribe_patterns} gets
    C{subscription_confirmed}, then C{pattern_alert} in the original shape
    for those patterns only. Every event's id is its last argument. The last
    alert matches both, so by the time it arrives the ones before it that
    did not match would have.
    """
    node.connect("s", stack.url(), {"token": stack.token("sio-bob")}, transports)
    answer = node.ack("s", "subscribe", {"topic": "patterns",
                                         "filter": {"symbols": ["LIBX"], "min_confidence": 0.8}})
    assert answer["op"] == "subscribed", answer
    node("emit", "s", event="subscribe_patterns", args=[{"patterns": [PATTERN]}])
    [[confirmed]] = node.wait("s", "subscription_confirmed", 1)
    assert confirmed["patterns"] == [PATTERN] and confirmed["count"] == 1

    first = stack.alert("LIBX", "Doji", 0.9)
    stack.alert("LIBX", "Doji", 0.5)
    stack.alert("LIBY", "Doji", 0.95)
    by_pattern = stack.alert("LIBY", PATTERN, 0.6)
    last = stack.alert("LIBX", PATTERN, 0.95)

    native = node.wait("s", "event", 2)
    alerts = node.wait("s", "pattern_alert", 2)
    assert producer_ids(native) == [first, last]
    assert {frame[0]["sub"] for frame in native} == {answer["id"]}
    assert all(frame[0]["op"] == "event" and frame[0]["type"] == "pattern_detected"
               for frame in native)
    assert [a[0]["event"]["data"]["event_id"] for a in alerts] == [by_pattern, last]
    for body, _ in alerts:
        assert set(body) == {"type", "id", "event"} and body["type"] == "pattern_alert"
        assert set(body["event"]) == {"event_type", "source", "timestamp", "data", "channel"}
        assert body["event"]["event_type"] == "pattern_detected"
        assert body["event"]["channel"] == "tickstock.events.patterns"
        assert body["event"]["data"]["pattern"] == PATTERN
    assert_offsets(native)
    assert_offsets(alerts)
    assert node.received("s", "event") == native


@TRANSPORTS
def test_a_backtest_reports_to_every_tab_of_its_user(
        stack: SocketIOStack, node: Node, transports: list[str] | None) -> None:
    """
    C{submit_backtest} is acknowledged with C{job_accepted}; the simulator's
    C{backtest_progress} then C{backtest_result} for that job reach both
    connections of the user (the one that asked and another tab), and not
    another user's.
    """
    for name, user in (("tab1", "sio-carol"), ("tab2", "sio-carol"), ("other", "sio-dave")):
        node.connect(name, stack.url(), {"token": stack.token(user)}, transports)
    accepted = node.ack("tab1", "submit_backtest", BACKTEST)
    assert accepted["op"] == "job_accepted" and accepted["job_id"], accepted
    job = accepted["job_id"]
    for tab in ("tab1", "tab2"):
        node.wait(tab, "backtest_result", 1, timeout=30,
                  where=lambda args: bool(args[0]["event"]["data"]["job_id"] == job))
        events = [(got, args) for got, *args in node("events", tab)["events"]
                  if got.startswith("backtest_") and args[0]["event"]["data"]["job_id"] == job]
        names = [got for got, _ in events]
        assert names[-1] == "backtest_result" and set(names[:-1]) == {"backtest_progress"}
        progress = [args[0]["event"]["data"]["progress"] for _, args in events[:-1]]
        assert progress == sorted(progress) and progress[-1] == 1, progress
        assert events[-1][1][0]["event"]["data"]["status"] == "completed"
        assert_offsets([args for _, args in events])
    assert node.received("other", "backtest_result") == []


@TRANSPORTS
@pytest.mark.parametrize(("token", "why"), [("not-a-jwt", "invalid token"),
                                            ("expired", "token expired")])
def test_a_bad_token_is_refused_saying_why(stack: SocketIOStack, node: Node,
                                           transports: list[str] | None, token: str,
                                           why: str) -> None:
    """A bad or expired token gets C{connect_error} whose message says why, and no event."""
    if token == "expired":
        token = stack.token("sio-erin", ttl=-60)
    answer = node.connect("s", stack.url(), {"token": token}, transports)
    assert why in answer["error"] and answer["data"] == {"code": "unauthorized"}, answer
    events = [event for event in node("events", "s")["events"]
              if event[0] not in ("$open", "$upgrade")]
    assert events == [["$connect_error", answer["error"]]]
    assert node("state", "s")["connected"] is False


@TRANSPORTS
def test_the_client_recovers_what_it_missed(stack: SocketIOStack, node: Node,
                                            transports: list[str] | None) -> None:
    """
    Cut from the client side (the engine closed, no automatic reconnection)
    after two alerts, the client misses five (a witness connection sees
    them); reconnecting the same socket, C{socket.recovered} is true and
    exactly the five arrive, in order, then the live ones, none twice.
    """
    symbol = next(SYMBOLS)
    token = {"token": stack.token("sio-frank")}
    node.connect("s", stack.url(), token, transports)
    node.connect("witness", stack.url(), token, ["websocket"])
    sub = subscribe(node, "s", symbol)
    subscribe(node, "witness", symbol)
    before = [stack.alert(symbol, "BeforeCut") for _ in range(2)]
    node.wait("s", "event", 2)
    poll(lambda: node("state", "s")["transport"] == "websocket", 10, "a websocket")

    node("cut", "s")
    assert node("state", "s")["connected"] is False
    missed = [stack.alert(symbol, "WhileCut") for _ in range(MISSED)]
    node.wait("witness", "event", 2 + MISSED)
    assert len(node.received("s", "event")) == 2

    answer = node("reconnect", "s")
    assert answer["connected"] is True and answer["recovered"] is True, answer
    after = stack.alert(symbol, "AfterRecovery")
    frames = node.wait("s", "event", 2 + MISSED + 1)
    assert producer_ids(frames) == before + missed + [after]
    assert {frame[0]["sub"] for frame in frames} == {sub}
    assert_offsets(frames)
    confirmed = node.received("s", "connection_confirmed")
    assert [c[0]["recovered"] for c in confirmed] == [False, True]


@TRANSPORTS
def test_another_node_recovers_the_session(stack: SocketIOStack, node: Node,
                                           transports: list[str] | None) -> None:
    """
    Cut from daemon A, the session is recovered on daemon B: a new Manager
    (io()) there with C{auth: {token, pid, offset}}, pid and offset taken
    from the first socket as socket.io-client itself would send them (that
    hand-over is this test's code: the client only recovers on its own
    Manager's URL). B confirms C{recovered} with the same pid and the same
    subscription, and replays exactly what was missed, then live alerts.
    """
    symbol = next(SYMBOLS)
    token = stack.token("sio-grace")
    node.connect("a", stack.url(0), {"token": token}, transports)
    node.connect("witness", stack.url(1), {"token": token}, ["websocket"])
    sub = subscribe(node, "a", symbol)
    subscribe(node, "witness", symbol)
    stack.alert(symbol, "BeforeCut")
    node.wait("a", "event", 1)
    node("cut", "a")
    missed = [stack.alert(symbol, "WhileCut") for _ in range(MISSED)]
    node.wait("witness", "event", 1 + MISSED)

    state = node("state", "a")
    answer = node.connect("b", stack.url(1),
                          {"token": token, "pid": state["pid"], "offset": state["offset"]},
                          transports)
    assert answer["connected"] is True, answer
    [[confirmed, _]] = node.wait("b", "connection_confirmed", 1)
    assert confirmed["recovered"] is True and confirmed["pid"] == state["pid"], confirmed
    after = stack.alert(symbol, "AfterRecovery")
    frames = node.wait("b", "event", MISSED + 1)
    assert producer_ids(frames) == missed + [after]
    assert {frame[0]["sub"] for frame in frames} == {sub}
    assert_offsets(frames)
    assert id_key(frames[0][-1]) > id_key(state["offset"])


# In the page: the client from the bundle, its events recorded in window.events.
PAGE_CONNECT = """async ({url, token, symbol}) => {
  window.events = [];
  window.sockets = {};
  const open = async (name) => {
    const socket = io(url, {auth: {token}, forceNew: true});
    socket.on("event", (...args) => name === "page" && window.events.push(args));
    await new Promise((resolve, reject) => {
      socket.once("connect", resolve);
      socket.once("connect_error", reject);
    });
    window.sockets[name] = socket;
    return socket.timeout(10000).emitWithAck("subscribe", {
      topic: "patterns", filter: {symbols: [symbol], min_confidence: 0.8}});
  };
  return [await open("page"), await open("witness")];
}"""
PAGE_CUT = """async () => {
  const socket = window.sockets.page;
  window.witnessed = 0;
  window.sockets.witness.on("event", () => window.witnessed++);
  const gone = new Promise((resolve) => socket.once("disconnect", resolve));
  socket.io.reconnection(false);
  socket.io.engine.close();
  return await gone;
}"""
PAGE_RECONNECT = """async () => {
  const socket = window.sockets.page;
  await new Promise((resolve) => { socket.once("connect", resolve); socket.connect(); });
  return socket.recovered;
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        if REQUIRED:
            raise RuntimeError(f"{CHROMIUM} is missing: scripts/test installs Debian's chromium")
        pytest.skip(f"no Chromium at {CHROMIUM}")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_chromium_filters_and_recovers(stack: SocketIOStack, browser: Any) -> None:
    """
    The client's browser bundle in a page of the daemon's origin (CSP
    bypassed to inject it): it connects with a token, gets only the alerts
    its filter matches, and cut (engine closed) then reconnected it has
    C{socket.recovered} and exactly the alerts it missed, in order.
    """
    symbol = next(SYMBOLS)
    context = browser.new_context(bypass_csp=True)
    try:
        page = context.new_page()
        page.set_default_timeout(20_000)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(stack.url() + "/")
        page.add_script_tag(path=str(BUNDLE))
        answers = page.evaluate(PAGE_CONNECT, {"url": stack.url(), "symbol": symbol,
                                               "token": stack.token("sio-heidi")})
        assert [answer["op"] for answer in answers] == ["subscribed", "subscribed"], answers

        wanted = [stack.alert(symbol, "Doji", 0.9)]
        stack.alert(symbol, "Doji", 0.5)
        stack.alert(next(SYMBOLS), "Doji", 0.99)
        wanted.append(stack.alert(symbol, "Doji", 0.85))
        page.wait_for_function("() => window.events.length >= 2")
        page.wait_for_function("() => window.sockets.page.io.engine.transport.name"
                               " === 'websocket'")

        assert page.evaluate(PAGE_CUT) == "forced close"
        missed = [stack.alert(symbol, "WhileCut", 0.9) for _ in range(MISSED)]
        page.wait_for_function(f"() => window.witnessed >= {MISSED}")
        assert page.evaluate(PAGE_RECONNECT) is True
        wanted += missed
        wanted.append(stack.alert(symbol, "AfterRecovery", 0.9))
        page.wait_for_function(f"() => window.events.length >= {len(wanted)}")
        frames = page.evaluate("() => window.events")
        assert producer_ids(frames) == wanted
        assert_offsets(frames)
        assert errors == []
    finally:
        context.close()


@TRANSPORTS
def test_a_token_is_refreshed_in_band_and_another_users_is_refused(
        stack: SocketIOStack, node: Node, transports: list[str] | None) -> None:
    """
    Connected with a token that has less than 30 s left (ttl 0, accepted for
    the daemon's 10 s leeway), the client gets C{token_expiring} at once.
    C{refresh} with a new token for the same user is acknowledged
    C{refreshed} with the new token's lifetime; one for another user is
    acknowledged with C{unauthorized}, and the socket stays connected, its
    subscription still delivering.
    """
    symbol = next(SYMBOLS)
    node.connect("s", stack.url(), {"token": stack.token("sio-ivan", ttl=0)}, transports)
    subscribe(node, "s", symbol)
    [[expiring]] = node.wait("s", "token_expiring", 1)
    assert expiring["op"] == "token_expiring" and 0 <= expiring["in"] <= 10, expiring

    refreshed = node.ack("s", "refresh", {"token": stack.token("sio-ivan")})
    assert refreshed["op"] == "refreshed" and refreshed["id"] is None, refreshed
    assert 3600 <= refreshed["expires_in"] <= 3610, refreshed

    refused = node.ack("s", "refresh", {"token": stack.token("sio-judy")})
    assert refused["op"] == "error" and refused["code"] == "unauthorized", refused
    assert refused["message"] == "a refreshed token must be for the same user", refused
    assert node("state", "s")["connected"] is True
    alert = stack.alert(symbol, "AfterRefresh")
    assert producer_ids(node.wait("s", "event", 1)) == [alert]
    assert [got for got, *_ in node("events", "s")["events"]
            if got in ("$disconnect", "$connect_error", "error")] == []
    assert len(node.received("s", "token_expiring")) == 1
