"""
A real deployment for the Socket.IO tests: the test's own Redis, a
C{twistd tickstock} daemon on it with auth on (pub/sub mode), and
C{tickstock-sim} answering backtest jobs (at a trickle of its own events,
on symbols the tests do not use). Events are published as the producer
does, with C{PUBLISH}.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tests.conftest import TEST_SECRET
from tests.servers import RedisServer, poll
from tests.test_streams import TwistdDaemon
from tickstock.deliver.auth import JWTAuthenticator

ROOT = Path(__file__).resolve().parent.parent
NODE_MODULES = ROOT / "tests" / "socketio" / "node_modules"


class SocketIOStack:
    """Redis, one or more daemons on it, and the simulator; stopped by L{stop}."""

    def __init__(self, tmp: Path, daemons: int = 1, *extra: str) -> None:
        self.redis = RedisServer()
        self._secret = tmp / "jwt"
        self._secret.write_bytes(TEST_SECRET)
        self._extra = extra
        self.daemons = [self._daemon(n) for n in range(daemons)]
        self.sim: subprocess.Popen[bytes] | None = None
        self._auth = JWTAuthenticator(TEST_SECRET)

    def url(self, n: int = 0) -> str:
        return f"http://127.0.0.1:{self.daemons[n].port}"

    def start(self) -> None:
        self.redis.start()
        for n, daemon in enumerate(self.daemons):
            daemon.start()
            poll(lambda n=n: self.ready(n), 30, "the daemon ready")
        sim = os.path.join(os.path.dirname(sys.executable), "tickstock-sim")
        self.sim = subprocess.Popen([sim, "--redis", self.redis.url, "--rate", "2",
                                     "--symbols", "4", "--seed", "7", "--step-interval", "0.2"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # A job submitted before the simulator listens would be refused (no_producer).
        poll(lambda: not self.redis.command("PUBSUB", "NUMSUB", "tickstock.jobs.backtest")
             .endswith(b":0\r\n"), 30, "the simulator taking backtest jobs")

    def _daemon(self, n: int) -> TwistdDaemon:
        return TwistdDaemon("--redis", self.redis.url, "--jwt-secret-file", str(self._secret),
                            "--node-id", f"sio{n}", "--flush-interval", "0.2", *self._extra)

    def add_daemon(self) -> int:
        """Start one more daemon on the same Redis (a node joining later); its number."""
        n = len(self.daemons)
        self.daemons.append(self._daemon(n))
        self.daemons[n].start()
        poll(lambda: self.ready(n), 30, "the new daemon ready")
        return n

    def ready(self, n: int = 0) -> bool:
        # http.client, closed whatever happens: urllib leaves a socket open on some failures.
        conn = http.client.HTTPConnection("127.0.0.1", self.daemons[n].port, timeout=2)
        try:
            conn.request("GET", "/ready")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def stop(self) -> None:
        if self.sim is not None:
            self.sim.kill()
            self.sim.wait()
        for daemon in self.daemons:
            daemon.kill()
        self.redis.stop()

    def token(self, user: str, ttl: float = 3600) -> str:
        return self._auth.mint(user, time.time(), ttl)

    def alert(self, symbol: str, pattern: str, confidence: float = 0.9) -> str:
        """PUBLISH one pattern event as the producer would; its producer event_id."""
        event_id = f"sio-{uuid.uuid4()}"
        self.redis.command("PUBLISH", "tickstock.events.patterns", json.dumps({
            "event_type": "pattern_detected", "symbol": symbol, "pattern": pattern,
            "confidence": confidence, "price": 101.5, "timestamp": time.time(),
            "event_id": event_id}))
        return event_id

    def tick(self, symbol: str, price: float) -> None:
        """PUBLISH one tick as the producer would."""
        self.redis.command("PUBLISH", "tickstock.data.ticks", json.dumps({
            "event_type": "tick", "symbol": symbol, "price": price, "volume": 100,
            "timestamp": time.time()}))
