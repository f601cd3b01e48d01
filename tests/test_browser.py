"""
The dashboard and tickstock.js in a real headless Chromium (Debian's
C{chromium}, driven by Playwright), against a real daemon (C{twistd
tickstock} in its own process, streams mode), the test's own Redis and
C{tickstock-sim}. Screenshots of the dashboard, one per width tried, are
saved to C{test-artifacts/} (or C{$TICKSTOCK_ARTIFACTS}).

scripts/test installs Chromium and sets C{TICKSTOCK_BROWSER_REQUIRED}, so
there a missing browser fails the run; elsewhere these tests are skipped.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websocket

from tests.conftest import TEST_SECRET
from tests.servers import RedisServer, poll
from tests.test_streams import TwistdDaemon
from tickstock.deliver.auth import JWTAuthenticator

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("TICKSTOCK_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("TICKSTOCK_ARTIFACTS", ROOT / "test-artifacts"))
# The flags this sandbox needs: no background calls out of a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WATCH = ("AAPL", "MSFT")   # the simulator also trades NVDA and AMZN
XSS = "<img src=x onerror=alert(1)>"

if not os.path.exists(CHROMIUM):
    if os.environ.get("TICKSTOCK_BROWSER_REQUIRED"):
        raise RuntimeError(f"{CHROMIUM} is missing: scripts/test installs Debian's chromium")
    pytest.skip(f"no Chromium at {CHROMIUM}", allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api")


def seed_history(stack: Stack, symbol: str, minutes: int) -> int:
    """Ticks of a random walk in each of the past C{minutes} minutes; returns how many minutes."""
    rng = random.Random(symbol)
    now = int(time.time()) // 60 * 60
    price = 175.0
    for minute in range(now - minutes * 60, now, 60):
        for second in (3, 18, 33, 48):
            price = round(price * (1 + rng.gauss(0, 0.0015)), 2)
            stack.tick(symbol, price, minute + second, volume=rng.randint(100, 3000))
    return minutes


class Stack:
    """Redis, the daemon on it and the simulator feeding it, for one module."""

    def __init__(self, tmp: Path) -> None:
        self.redis = RedisServer()
        secret = tmp / "jwt"
        secret.write_bytes(TEST_SECRET)
        self.daemon = TwistdDaemon("--redis", self.redis_url, "--mode", "streams",
                                   "--jwt-secret-file", str(secret), "--node-id", "browser",
                                   "--flush-interval", "0.2")
        self.sim: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.daemon.port}/"
        self._auth = JWTAuthenticator(TEST_SECRET)

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def start(self) -> None:
        self.redis.start()
        self.start_daemon()
        sim = os.path.join(os.path.dirname(sys.executable), "tickstock-sim")
        self.sim = subprocess.Popen([sim, "--redis", self.redis_url, "--mode", "streams",
                                     "--rate", "40", "--symbols", "4", "--seed", "7",
                                     "--step-interval", "0.5"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start_daemon(self) -> None:
        self.daemon.start()
        poll(self.ready, 30, "the daemon ready")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "ready", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.sim is not None:
            self.sim.kill()
            self.sim.wait()
        self.daemon.kill()
        self.redis.stop()

    def token(self, user: str) -> str:
        return self._auth.mint(user, time.time(), 3600)

    def alert(self, symbol: str, pattern: str, confidence: float = 0.9,
              price: float = 123.456, **extra: Any) -> None:
        """XADD one pattern event as the producer would (C{extra}: more or other fields)."""
        self.redis.command("XADD", "tickstock.events.patterns", "*", "data", json.dumps({
            "event_type": "pattern_detected", "symbol": symbol, "pattern": pattern,
            "confidence": confidence, "price": price, "timestamp": time.time(),
            "event_id": f"browser-{uuid.uuid4()}", **extra}))

    def tick(self, symbol: str, price: float, timestamp: float | None = None,
             volume: float = 100) -> None:
        """XADD one tick as the producer would."""
        self.redis.command("XADD", "tickstock.data.ticks", "*", "data", json.dumps({
            "event_type": "tick", "symbol": symbol, "price": price, "volume": volume,
            "timestamp": time.time() if timestamp is None else timestamp}))

    def universe(self, key: str, symbols: list[str]) -> None:
        """XADD the producer's word that universe C{key} now has these symbols."""
        self.redis.command("XADD", "tickstock.universe.updated", "*", "data", json.dumps({
            "event_type": "universe_updated", "universe": key, "symbols": symbols,
            "timestamp": time.time()}))

    def get(self, path: str) -> Any:
        """GET an API path as some signed-in user: the answer's JSON, or None if it failed."""
        request = urllib.request.Request(self.url + path.lstrip("/"), headers={
            "authorization": f"Bearer {self.token('tester')}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                return json.loads(answer.read())
        except OSError:
            return None


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("browser"))
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Page:
    """A page with every console error, uncaught error and dialog it produced."""

    def __init__(self, browser: Any, width: int = 1280, height: int = 800) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.page.set_default_timeout(20_000)
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", self._dialog)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def sign_in(self, stack: Stack, user: str, watch: tuple[str, ...] = WATCH) -> None:
        page = self.page
        page.goto(stack.url)
        page.wait_for_selector("#credential-label:text('Token')")
        page.fill("#watch", ",".join(watch))
        page.click("#watch-form button[type=submit]")
        page.fill("#credential", stack.token(user))
        page.click("#connect")
        page.wait_for_selector("#status[data-state=connected]")

    def pattern_cells(self) -> list[str]:
        return self.page.eval_on_selector_all("#alerts td.pattern",
                                              "tds => tds.map(td => td.textContent)")

    def wait_for_pattern(self, name: str) -> None:
        self.page.wait_for_function(
            "name => [...document.querySelectorAll('#alerts td.pattern')]"
            ".some(td => td.textContent === name)",
            arg=name)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Page]:
    page = Page(browser)
    try:
        yield page
    finally:
        page.close()


def test_the_dashboard_shows_alerts_and_prices_for_the_watchlist_only(stack: Stack,
                                                                     page: Page) -> None:
    """
    Signed in with a token and watching AAPL and MSFT: the simulator's alerts
    and prices for those appear, an alert for NVDA published before a marker
    for AAPL never does, AAPL's chart starts with the 1-minute bars stored
    before the page opened, and the page logged no console error.
    """
    history = seed_history(stack, "AAPL", 45)
    poll(lambda: len((stack.get("api/ohlcv/AAPL") or {}).get("bars", [])) >= history, 10,
         "the history stored")
    page.sign_in(stack, "alice")
    page.page.wait_for_function("n => document.getElementById('chart').dataset.candles >= n",
                                arg=history)
    stack.alert("NVDA", "OffTheList")
    stack.alert("AAPL", "OnTheList")
    page.wait_for_pattern("OnTheList")
    page.page.wait_for_function("() => document.querySelectorAll('#alerts tr').length >= 4")
    symbols = page.page.eval_on_selector_all("#alerts td.sym",
                                             "tds => tds.map(td => td.textContent)")
    assert set(symbols) <= set(WATCH), symbols
    assert "OffTheList" not in page.pattern_cells()
    confidences = page.page.eval_on_selector_all("#alerts td.num:nth-child(4)",
                                                 "tds => tds.map(td => td.textContent)")
    assert all(re.fullmatch(r"\d{1,3}%", c) for c in confidences), confidences
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d", t) for t in page.page.eval_on_selector_all(
        "#alerts td.time", "tds => tds.map(td => td.textContent)"))

    page.page.wait_for_function(
        "() => [...document.querySelectorAll('#prices .price')]"
        ".every(p => /^\\d+\\.\\d\\d$/.test(p.textContent))")
    tiles = page.page.eval_on_selector_all("#prices .sym", "s => s.map(x => x.textContent)")
    assert tiles == list(WATCH)
    assert page.page.text_content("#chart-symbol") == "AAPL"
    assert re.fullmatch(r"\d+\.\d\d", page.page.text_content("#chart-last"))
    page.page.wait_for_selector("#health .health[data-status=healthy]")
    page.page.wait_for_selector("#server .health[data-status=healthy]")

    page.page.select_option("#f-symbol", "MSFT")
    page.page.wait_for_function(
        "() => [...document.querySelectorAll('#alerts td.sym')]"
        ".every(td => td.textContent === 'MSFT')")
    page.page.select_option("#f-symbol", "")

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.page.screenshot(path=str(ARTIFACTS / "dashboard.png"))
    assert page.errors == []


def test_a_page_shows_every_current_price_and_heartbeat_as_soon_as_it_is_ready(
        stack: Stack, page: Page) -> None:
    """
    Two symbols that traded once, long before the page opened (nobody
    watching them), and a producer that sent one heartbeat: within a second
    of the page being connected every tile shows its price and the
    producer's status is shown, from the subscriptions' snapshots, with no
    tick or heartbeat arriving meanwhile; a heartbeat from a minute ago
    shows as stale.
    """
    stack.tick("QUIETA", 12.5)
    stack.tick("QUIETB", 98.25)
    stack.redis.command("XADD", "tickstock.health.status", "*", "data", json.dumps({
        "service": "quiet-producer", "status": "healthy", "timestamp": time.time() - 60}))
    ws = websocket.create_connection(f"ws://127.0.0.1:{stack.daemon.port}/ws", timeout=10)
    try:
        ws.send(json.dumps({"op": "hello", "id": "h", "token": stack.token("probe")}))
        ws.recv()
        attempt = 0

        def has_both() -> bool:
            nonlocal attempt
            attempt += 1
            ws.send(json.dumps({"op": "subscribe", "id": f"t{attempt}", "topic": "ticks",
                                "filter": {"symbols": ["QUIETA", "QUIETB"]}}))
            reply = json.loads(ws.recv())
            for _ in range(reply.get("snapshot", 0)):
                ws.recv()
            ws.send(json.dumps({"op": "unsubscribe", "id": f"t{attempt}"}))
            while json.loads(ws.recv())["op"] != "unsubscribed":
                pass
            return reply.get("snapshot") == 2

        poll(has_both, 10, "the daemon holding both symbols' prices")
    finally:
        ws.close()
    page.sign_in(stack, "carol", watch=("QUIETA", "QUIETB"))
    page.page.wait_for_function(
        "() => [...document.querySelectorAll('#prices .price')].map(p => p.textContent)"
        ".join() === '12.50,98.25'", timeout=1000)
    page.page.wait_for_selector("#health .health[data-status=stale]:has-text('quiet-producer')",
                                timeout=1000)
    assert page.errors == []


def test_a_new_page_starts_with_the_watchlists_recent_alerts(stack: Stack, browser: Any) -> None:
    """
    Alerts published before the page opened are in its table, from
    /api/patterns. The watchlist holds symbols the simulator does not trade,
    so its live alerts cannot push these out of the newest few per symbol.
    """
    stack.alert("ORCL", "BeforeThePage")
    stack.alert("NVDA", "NotWatched")
    stack.alert("IBM", "AlsoBefore")
    poll(lambda: b"AlsoBefore" in urllib.request.urlopen(urllib.request.Request(
        stack.url + "api/patterns?symbol=IBM",
        headers={"authorization": f"Bearer {stack.token('x')}"}),
        timeout=5).read(), 10, "the alert stored")
    late = Page(browser)
    try:
        late.sign_in(stack, "heidi", watch=("IBM", "ORCL"))
        late.wait_for_pattern("AlsoBefore")
        late.wait_for_pattern("BeforeThePage")
        cells = late.pattern_cells()
        assert "NotWatched" not in cells
        assert cells.index("AlsoBefore") < cells.index("BeforeThePage")  # newest first
        assert late.errors == []
    finally:
        late.close()


def test_a_backtest_from_the_form_shows_progress_then_results(stack: Stack, page: Page) -> None:
    """The form submits a job; its row shows it running with a progress bar, then the results."""
    page.sign_in(stack, "bob")
    page.page.fill("#bt-symbols", "AAPL, MSFT")
    page.page.click("#bt-run")
    job = page.page.locator("#jobs .job").first
    running = page.page.wait_for_selector("#jobs .job[data-status=running]")
    assert 0 < float(running.eval_on_selector("progress", "p => p.value")) < 1
    assert re.search(r"\d+%", running.eval_on_selector(".job-status", "s => s.textContent"))
    page.page.wait_for_selector("#jobs .job[data-status=done]")
    assert job.locator(".job-title").text_content() == "AAPL, MSFT · 2024-01-02 → 2024-06-28"
    assert job.locator("progress").evaluate("p => p.value") == 1
    results = dict(zip(job.locator("dt").all_text_contents(),
                       job.locator("dd").all_text_contents(), strict=True))
    assert set(results) == {"Win rate", "ROI", "Sharpe", "Max drawdown", "Trades"}
    assert re.fullmatch(r"-?\d+\.\d%", results["Win rate"]), results
    assert page.errors == []


def test_a_wrong_token_is_refused_and_not_retried(stack: Stack, page: Page) -> None:
    """
    A token signed with another secret: the page goes offline saying why,
    asks to sign in again, forgets the token, and does not retry.
    """
    p = page.page
    p.goto(stack.url)
    p.wait_for_selector("#credential-label:text('Token')")
    p.fill("#credential", JWTAuthenticator(b"another-secret-of-at-least-32-bytes!!").mint(
        "mallory", time.time(), 3600))
    p.click("#connect")
    p.wait_for_selector("#status[data-state=offline]:has-text('refused')")
    assert p.text_content("#notice") == "Sign in again."
    assert p.evaluate("() => sessionStorage.length") == 0
    with pytest.raises(sync_api.TimeoutError):
        p.wait_for_selector("#status[data-state=connecting], #status[data-state=reconnecting]",
                            timeout=2000)
    assert page.errors == []


def test_the_dashboard_says_when_a_pasted_token_runs_out(stack: Stack, page: Page) -> None:
    """
    A pasted token cannot be renewed by the page: when the server warns it
    is expiring, the page says so (rather than being closed unannounced).
    """
    p = page.page
    p.goto(stack.url)
    p.wait_for_selector("#credential-label:text('Token')")
    p.fill("#credential", JWTAuthenticator(TEST_SECRET).mint("erin", time.time(), 0))
    p.click("#connect")
    p.wait_for_selector("#notice:has-text('Your token expires in')")
    assert re.fullmatch(r"Your token expires in \d+ s: sign out and in with a new one\.",
                        p.text_content("#notice") or "")
    assert page.errors == []


def test_a_pattern_name_made_of_html_is_shown_as_text(stack: Stack, page: Page) -> None:
    """An alert whose pattern is an <img onerror> is a text cell: no element, no script run."""
    page.sign_in(stack, "carol")
    stack.alert("MSFT", XSS)
    page.wait_for_pattern(XSS)
    assert page.page.locator("#alerts img").count() == 0
    assert page.page.locator("img").count() == 0
    assert page.dialogs == []
    assert page.errors == []


def test_after_the_daemon_is_killed_the_page_reconnects_and_recovers_what_it_missed(
        stack: Stack, page: Page) -> None:
    """
    Kill -9 the daemon: the page says it is reconnecting. Alerts published
    meanwhile (to the Redis stream) are in the table once it is back, and the
    indicator says how many missed events it recovered. (The count depends
    on how much of its backlog the restarted daemon had read when the page
    came back, the rest arriving live; test_resume asserts exact counts.)
    """
    page.sign_in(stack, "dave")
    stack.alert("AAPL", "BeforeTheKill")
    page.wait_for_pattern("BeforeTheKill")
    stack.daemon.kill()
    page.page.wait_for_selector("#status[data-state=reconnecting]")
    assert "reconnecting" in page.page.text_content("#status-text")
    missed = [f"Missed{n}" for n in range(3)]
    for name in missed:
        stack.alert("AAPL", name)
    stack.start_daemon()
    for name in missed:
        page.wait_for_pattern(name)
    page.page.wait_for_selector("#status[data-state=connected]")
    page.page.wait_for_function(
        "() => /recovered \\d+ missed events?/"
        ".test(document.getElementById('status-detail').textContent)")
    cells = page.pattern_cells()
    assert [c for c in cells if c.startswith("Missed")] == missed[::-1]  # newest first, once each
    # Chromium logs the refused reconnects; nothing else.
    assert [e for e in page.errors if "WebSocket connection" not in e] == []


def legend(page: Page) -> str:
    """The chart legend's text, its spaces collapsed."""
    return " ".join((page.page.text_content("#legend") or "").split())


def wait_for_legend(page: Page, pattern: str) -> None:
    """Until the legend's text (its spaces collapsed) matches this regular expression."""
    page.page.wait_for_function(
        "re => new RegExp(re).test(document.getElementById('legend').textContent"
        ".replace(/\\s+/g, ' '))", arg=pattern)


def test_the_chart_has_candles_for_the_bars_and_a_marker_at_an_alerts_candle(
        stack: Stack, page: Page) -> None:
    """
    Ticks in three past minutes make three 1-minute bars (/api/ohlcv): the
    chart has one candle each, the legend the latest one's OHLCV, and a live
    tick opens a fourth. A bullish alert in the second minute is a marker
    there; clicking its row shows that candle with the pattern and its
    confidence, up arrow and all. 5-minute candles are the same minutes
    aggregated. A screenshot at phone width goes to the artifacts.
    """
    now = time.time()
    first = (int(now) // 60 - 4) * 60
    minutes = [first, first + 60, first + 120]
    for n, minute in enumerate(minutes):
        for offset, price in ((5, 100 + n), (20, 104 + n), (35, 98 + n), (50, 101 + n)):
            stack.tick("CNDL", price, minute + offset, volume=250)
    poll(lambda: len((stack.get("api/ohlcv/CNDL") or {}).get("bars", [])) == 3, 10,
         "the three bars stored")
    page.sign_in(stack, "judy", watch=("CNDL",))
    p = page.page
    p.wait_for_selector("#chart[data-candles='3']")
    assert p.locator("#chart canvas").count() > 0
    wait_for_legend(page, r"O 102\.00 H 106\.00 L 100\.00 C 103\.00 V 1\.0K")

    stack.alert("CNDL", "ChartMarker", 0.77, 105.0, timestamp=minutes[1] + 30,
                direction="bullish")
    page.wait_for_pattern("ChartMarker")
    p.wait_for_selector("#chart[data-markers='1']")
    stack.tick("CNDL", 120.5)
    p.wait_for_selector("#chart[data-candles='4']")
    wait_for_legend(page, r"C 120\.50")

    p.click("#alerts tr:has(td.pattern:text-is('ChartMarker'))")
    wait_for_legend(page, "▲ ChartMarker 77%")
    assert "O 101.00 H 105.00 L 99.00 C 102.00" in legend(page)

    p.click("#intervals button[data-interval='5m']")
    buckets = {m // 300 for m in minutes} | {int(time.time()) // 300}
    p.wait_for_selector(f"#chart[data-candles='{len(buckets)}']")
    p.wait_for_selector("#chart[data-markers='1']")
    p.click("#intervals button[data-interval='1m']")
    p.wait_for_selector("#chart[data-candles='4']")

    p.set_viewport_size({"width": 390, "height": 844})
    p.evaluate("() => new Promise(requestAnimationFrame)")
    assert p.evaluate("() => document.documentElement.scrollWidth") <= 390
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    p.screenshot(path=str(ARTIFACTS / "dashboard-phone.png"))
    assert page.errors == []


def test_a_picked_universe_is_the_watchlist_and_follows_the_producers_changes(
        stack: Stack, page: Page) -> None:
    """
    Picking a universe from /api/universes subscribes with the C{universe}
    filter (seen on the wire) and shows its members; when the producer adds a
    symbol to it, the symbol gets its tile and its alerts come in, without a
    reload. Back on the typed list, its symbols are watched again.
    """
    stack.universe("etf_browser", ["UNIA"])
    poll(lambda: stack.get("api/universes/etf_browser") is not None, 10, "the universe known")
    sent: list[dict[str, Any]] = []
    page.page.on("websocket", lambda ws: ws.on(
        "framesent", lambda frame: sent.append(json.loads(frame))))
    page.sign_in(stack, "kim")
    p = page.page
    p.wait_for_selector("#universe option[value='etf_browser']", state="attached")
    p.select_option("#universe", "etf_browser")
    p.wait_for_function("() => [...document.querySelectorAll('#prices .sym')]"
                        ".map(s => s.textContent).join() === 'UNIA'")
    filters = {m["topic"]: m.get("filter") for m in sent if m.get("op") == "subscribe"}
    assert filters["patterns"] == filters["ticks"] == {"universe": "etf_browser"}, sent
    assert p.is_disabled("#watch")
    stack.alert("UNIA", "InTheUniverse")
    page.wait_for_pattern("InTheUniverse")

    stack.universe("etf_browser", ["UNIA", "UNIB"])
    p.wait_for_selector("#prices .tile:has-text('UNIB')")
    stack.alert("UNIB", "NewMember")
    page.wait_for_pattern("NewMember")
    assert p.evaluate("() => location.href") == stack.url  # never reloaded

    p.select_option("#universe", "")
    p.wait_for_function("() => [...document.querySelectorAll('#prices .sym')]"
                        ".map(s => s.textContent).join() === 'AAPL,MSFT'")
    stack.alert("AAPL", "BackOnMyList")
    page.wait_for_pattern("BackOnMyList")
    last = {m["topic"]: m.get("filter") for m in sent if m.get("op") == "subscribe"}
    assert last["patterns"] == last["ticks"] == {"symbols": list(WATCH)}, sent
    assert page.errors == []


NOTIFICATIONS = """
window.shown = [];
window.Notification = class { static permission = "granted";
    static requestPermission() { return Promise.resolve("granted"); }
    constructor(title, options) { window.shown.push([title, options.body]); } };
"""


def test_notifications_are_opt_in_and_above_the_chosen_confidence(
        stack: Stack, page: Page) -> None:
    """
    (The Notification API is stubbed to record.) Nothing is notified until
    the box is ticked; then an alert for a watched symbol at 90 % is, one at
    60 % below the chosen 85 % is not.
    """
    page.context.add_init_script(NOTIFICATIONS)
    page.sign_in(stack, "leo", watch=("NTFA", "NTFB"))
    p = page.page
    stack.alert("NTFA", "BeforeOptIn", 0.99)
    page.wait_for_pattern("BeforeOptIn")
    p.check("#notify")
    p.select_option("#notify-conf", "0.85")
    stack.alert("NTFB", "TooUnsure", 0.6)
    stack.alert("NTFA", "SureEnough", 0.9, 10.0, direction="bearish")
    page.wait_for_pattern("SureEnough")
    p.wait_for_function("() => window.shown.length > 0")
    shown = p.evaluate("() => window.shown")
    assert [title for title, _ in shown] == ["NTFA SureEnough (down)"], shown
    assert re.fullmatch(r"90% at 10\.00, \d\d:\d\d:\d\d", shown[0][1]), shown
    assert page.errors == []


FRAME = ["header h1", "#connect", "#watch-form", "#prices", ".chart-card", "#filters",
         ".alerts thead", ".scroll", ".side .card:first-child", "#bt-form"]


def test_the_page_frame_does_not_move_while_alerts_stream_in(stack: Stack, page: Page) -> None:
    """
    50 alerts/s for the watchlist for three seconds (on top of the
    simulator): the table fills and scrolls inside its card, and no part of
    the page's frame moves or changes size.
    """
    page.sign_in(stack, "grace")
    page.page.wait_for_selector("#alerts tr")
    page.page.wait_for_selector("#server .health[data-status=healthy]")
    page.page.wait_for_selector("#health .health")
    boxes = "sels => sels.map(s => { " \
            "const r = document.querySelector(s).getBoundingClientRect(); " \
            "return [s, r.x, r.y, r.width, r.height]; })"
    before = page.page.evaluate(boxes, FRAME)
    started = time.monotonic()
    for n in range(150):
        stack.alert(WATCH[n % 2], f"Burst{n}", 0.5 + (n % 50) / 100)
        time.sleep(max(0.0, started + (n + 1) / 50 - time.monotonic()))
    page.wait_for_pattern("Burst149")
    assert page.page.locator("#alerts tr").count() == 100  # capped
    assert page.page.evaluate(boxes, FRAME) == before
    assert page.errors == []


# What must show in full at every width: numbers, symbols, pattern names.
UNCUT = ["#alerts td", ".alerts th", "#prices .sym", "#prices .price", ".chart-card h2",
         "#intervals", "#chart", "#universe", "#notify-conf",
         "#server .health", "#health .health", "#jobs .job-title", "#jobs .job-status",
         "#jobs .results dt", "#jobs .results dd"]
# What must not be broken across lines: an alert's every cell, a job's dates.
ONE_LINE = ["#alerts td", "#jobs .job-title .dates"]
# Each UNCUT element has a box (an inline one has clientWidth 0: the check
# could not fail) that holds its content and lies inside its card and the
# window; each ONE_LINE element's text is one line.
CUT_OFF = """([uncut, oneLine, width]) => {
    const lines = (e) => {
        const range = document.createRange();
        range.selectNodeContents(e);
        return new Set([...range.getClientRects()].map(r => Math.round(r.top))).size;
    };
    const outside = (e) => {
        const box = e.getBoundingClientRect(), card = e.closest(".card")?.getBoundingClientRect();
        return box.left < Math.max(0, card?.left ?? 0)
            || box.right > Math.min(width, card?.right ?? width);
    };
    const cut = (e) => e.clientWidth === 0 || e.scrollWidth > e.clientWidth || outside(e);
    return [...uncut.map(s => [s, cut]),
            ...oneLine.map(s => [s, e => lines(e) !== 1])].flatMap(([s, bad]) => {
        const all = [...document.querySelectorAll(s)];
        if (!all.length) return [[s, "nothing matched"]];
        return all.filter(bad).map(e => [s, e.textContent, e.scrollWidth, e.clientWidth, lines(e)]);
    });
}"""


def test_nothing_is_cut_off_from_phone_to_desktop_width(stack: Stack, page: Page) -> None:
    """
    With the widest values a user meets on the page (confidences of 100 %,
    the simulator's longest pattern name, six-digit prices, a ten-character
    symbol), a finished backtest and producer health: at 360, 390, 768 and
    1280 px no number, symbol or pattern name is shortened, broken across
    lines or pushed out of its card or the window, and the page does not
    scroll sideways. A screenshot per width goes to the artifacts.
    """
    page.sign_in(stack, "ivan", watch=("BRK.A", "ABCDEFGHIJ", "AAPL"))  # the simulator trades AAPL
    p = page.page
    p.click("#bt-run")
    for symbol, price in (("BRK.A", 712345.678), ("ABCDEFGHIJ", 98765.4321)):
        stack.tick(symbol, price)
        stack.alert(symbol, "HeadAndShoulders", 1.0, price)
    stack.alert("ABCDEFGHIJ", "Doji", 0.999, 0.01)
    p.wait_for_function(
        "() => [...document.querySelectorAll('#alerts td.sym')]"
        ".filter(td => td.textContent !== 'AAPL').length === 3")
    p.wait_for_function("() => [...document.querySelectorAll('#prices .price')]"
                        ".every(e => e.textContent !== '—')")
    p.click("#prices .tile:has-text('BRK.A')")
    p.wait_for_selector("#jobs .job[data-status=done]")
    p.wait_for_selector("#server .health")
    p.wait_for_selector("#health .health")
    confidences = p.eval_on_selector_all("#alerts td.num", "tds => tds.map(td => td.textContent)")
    assert confidences.count("100%") >= 3
    assert p.text_content("#chart-last") == "712345.68"

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    cut: dict[int, list[Any]] = {}
    for width in (360, 390, 768, 1280):
        p.set_viewport_size({"width": width, "height": 900})
        p.evaluate("() => new Promise(requestAnimationFrame)")
        p.screenshot(path=str(ARTIFACTS / f"dashboard-{width}.png"), full_page=True)
        found = p.evaluate(CUT_OFF, [UNCUT, ONE_LINE, width])
        page_width = p.evaluate("() => document.documentElement.scrollWidth")
        if page_width > width:
            found.append(["the page", page_width])
        if found:
            cut[width] = found
    assert cut == {}, "\n".join(f"{width} px: {found}" for width, found in cut.items())
    assert page.errors == []


def test_the_client_library_on_its_own(stack: Stack, page: Page) -> None:
    """
    tickstock.js imported by a page: subscribe with a filter, unsubscribe,
    submitBacktest resolving to the job id with progress and result
    callbacks, a refused job with its fields, state events, the last event
    id kept for resume, and the backoff's bounds.
    """
    p = page.page
    p.goto(stack.url)  # the dashboard, not signed in: it stays offline
    p.evaluate("""async (token) => {
        const lib = await import('/static/tickstock.js');
        const t = window.t = { lib, states: [], got: [], other: [], progress: [], result: null };
        t.ts = new lib.TickStock({ token });
        t.ts.on('state', (s) => t.states.push(s.state));
        t.sub = t.ts.subscribe('patterns', { symbols: ['LIBX'] }, (e) => t.got.push(e));
        t.ts.connect();
    }""", stack.token("frank"))
    p.wait_for_function("() => window.t.ts.state === 'connected' && window.t.sub.active")
    stack.alert("LIBY", "NotMine")
    stack.alert("LIBX", "Mine")
    p.wait_for_function("() => window.t.got.length === 1")
    got = p.evaluate("() => window.t.got[0]")
    assert (got["topic"], got["type"], got["data"]["pattern"]) \
        == ("patterns", "pattern_detected", "Mine")
    assert p.evaluate("() => window.t.ts.lastId") == got["id"]

    p.evaluate("""() => {
        window.t.sub.unsubscribe();
        window.t.marker = window.t.ts.subscribe('patterns', { symbols: ['LIBZ'] },
                                                (e) => window.t.other.push(e));
    }""")
    p.wait_for_function("() => window.t.marker.active")
    stack.alert("LIBX", "AfterUnsubscribe")
    stack.alert("LIBZ", "Marker")
    p.wait_for_function("() => window.t.other.length === 1")
    assert p.evaluate("() => window.t.got.length") == 1

    job_id = p.evaluate("""() => window.t.ts.submitBacktest(
        { symbols: ['AAPL'], start_date: '2024-01-02', end_date: '2024-03-28', patterns: ['Doji'] },
        { onProgress: (d) => window.t.progress.push(d.progress),
          onResult: (d) => { window.t.result = d; } })""")
    assert uuid.UUID(job_id)
    p.wait_for_function("() => window.t.result !== null")
    result = p.evaluate("() => window.t.result")
    progress = p.evaluate("() => window.t.progress")
    assert result["job_id"] == job_id and "win_rate" in result["results"]
    assert progress and progress == sorted(progress), progress

    refused = p.evaluate("""() => window.t.ts.submitBacktest(
        { symbols: ['aapl!'], start_date: '2024-05-01', end_date: '2024-01-01' }).then(
        () => null, (e) => ({ name: e.name, code: e.code, fields: e.fields }))""")
    assert refused["name"] == "TickStockError" and refused["code"] == "bad_params"
    assert set(refused["fields"]) == {"symbols", "end_date"}, refused

    bounds = p.evaluate("""() => {
        const { backoffDelay } = window.t.lib, o = { baseMs: 500, capMs: 15000 };
        return [0, 1, 5, 40].map((n) => [backoffDelay(n, { ...o, random: () => 0 }),
                                         backoffDelay(n, { ...o, random: () => 0.999999 })]);
    }""")
    assert [low for low, _ in bounds] == [0, 0, 0, 0]
    assert [round(high) for _, high in bounds] == [500, 1000, 15000, 15000]

    p.evaluate("() => window.t.ts.close()")
    assert p.evaluate("() => window.t.states") == ["connecting", "connected", "offline"]
    assert page.errors == []


def test_the_client_library_refreshes_its_token_before_it_expires(stack: Stack,
                                                                   page: Page) -> None:
    """
    Three tickstock.js connections of one user start on the same token with
    less than WARN_BEFORE (30 s) left, so the server warns each at once. The
    one whose C{token} is a function asks it again, sends C{refresh} and gets
    C{refreshed}; the one given a string only says C{token_expiring}, and the
    server closes it (1008) when the old token expires; the one whose
    function throws when asked again says C{error} C{no_token} and is closed
    likewise. Once both are closed, the refreshed connection, never closed or
    reconnected, still delivers a new alert: the refresh, not luck, kept it
    up. An explicit refresh() with another user's token is refused
    (C{unauthorized}) and changes nothing; refresh() with no token asks the
    function again.
    """
    short = stack._auth.mint("rita", time.time(), 0)  # accepted for the daemon's leeway (10 s) only
    frames: list[tuple[str, dict[str, Any]]] = []

    def watch(ws: Any) -> None:
        ws.on("framesent", lambda frame: frames.append(("sent", json.loads(frame))))
        ws.on("framereceived", lambda frame: frames.append(("got", json.loads(frame))))

    p = page.page
    p.on("websocket", watch)
    p.goto(stack.url)
    p.evaluate("""async ([short, long]) => {
        const lib = await import('/static/tickstock.js');
        const t = window.t = { asked: 0, states: [], fixedStates: [], got: [], tokens: [],
                               warned: [], errors: [], fixedErrors: [], failed: [] };
        t.ts = new lib.TickStock({ token: async () => (++t.asked === 1 ? short : long) });
        t.ts.on('state', (s) => t.states.push(s.state));
        t.ts.on('token', (e) => t.tokens.push(e));
        t.ts.on('error', (e) => t.errors.push(e.code));
        t.sub = t.ts.subscribe('patterns', { symbols: ['RFSH'] }, (e) => t.got.push(e));
        t.ts.connect();
        t.fixed = new lib.TickStock({ token: short });
        t.fixed.on('state', (s) => t.fixedStates.push([s.state, s.code]));
        t.fixed.on('token_expiring', (e) => t.warned.push(e));
        t.fixed.on('error', (e) => t.fixedErrors.push(e.code));
        t.fixed.connect();
        t.failing = new lib.TickStock({ token: () => {
            if (t.failing.asked++) throw new Error('signed out');
            return short; } });
        t.failing.asked = 0;
        t.failing.on('error', (e) => t.failed.push([e.code, e.cause?.message]));
        t.failing.connect();
    }""", [short, stack.token("rita")])
    p.wait_for_function("() => window.t.tokens.length === 1 && window.t.sub.active")
    assert p.evaluate("() => window.t.asked") == 2
    [refresh] = [m for way, m in frames if way == "sent" and m["op"] == "refresh"]
    [refreshed] = [m for way, m in frames if way == "got" and m["op"] == "refreshed"]
    assert refresh["token"] != short and refreshed["id"] == refresh["id"]
    assert refreshed["expires_in"] > 3000
    assert p.evaluate("() => window.t.tokens") == [{"expiresIn": refreshed["expires_in"]}]

    p.wait_for_function("() => window.t.fixedStates.at(-1)[0] === 'offline'"
                        " && window.t.failing.state === 'offline'", timeout=30_000)
    assert p.evaluate("() => window.t.fixedStates") == [["connecting", None], ["connected", None],
                                                         ["offline", 1008]]
    warned = p.evaluate("() => window.t.warned")
    assert len(warned) == 1 and 0 <= warned[0]["in"] < 30, warned
    stack.alert("RFSH", "AfterTheOldExpiry")
    p.wait_for_function("() => window.t.got.length === 1")
    assert p.evaluate("() => window.t.got[0].data.pattern") == "AfterTheOldExpiry"

    refused = p.evaluate("""(token) => window.t.ts.refresh(token).then(
        () => null, (e) => ({ name: e.name, code: e.code }))""", stack.token("mallory"))
    assert refused == {"name": "TickStockError", "code": "unauthorized"}
    again = p.evaluate("() => window.t.ts.refresh()")
    assert again["op"] == "refreshed" and again["expires_in"] > 3000
    assert p.evaluate("() => window.t.asked") == 3
    assert p.evaluate("() => [window.t.ts.state, window.t.states, window.t.errors]") \
        == ["connected", ["connecting", "connected"], []]
    assert p.evaluate("() => [window.t.fixedErrors, window.t.failed]") \
        == [[], [["no_token", "signed out"]]]
    assert page.errors == []
