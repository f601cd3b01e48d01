"""
Pub/sub mode: L{RedisPubSubSource} reads the producer's channels.

txredisapi does not resubscribe after a reconnect and never notices a Redis
that stopped answering (docs/internals.md §1, §2, §5): the source
resubscribes on every connection and PINGs to detect a hung server; its
connection is a L{tickstock.connections.redis.RedisConnection}, which
rebuilds a factory that gave up.
"""

from __future__ import annotations

import fcntl
import hashlib
import struct
import termios
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import txredisapi
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tickstock.connections.address import RedisAddress
from tickstock.connections.redis import Encoding, RedisConnection
from tickstock.domain.interfaces import IEventSource
from tickstock.domain.topics import DEFAULT_REGISTRY

BEHIND_BYTES = 64 * 1024
"""Bytes waiting in the socket at a read (read and left) that mean Redis is
holding more: a reader that keeps up drains the socket, while a slow one finds
the kernel's receive buffer (about 128 KiB; it does not grow for a slow
reader) full at every read."""
LAGGING_FOR = 0.5
"""Seconds the subscriber must lag without a break before Redis is asked how
much it holds for it (a burst is read in less), and between such questions."""
BEHIND_SHARE = 0.5
"""The subscriber is behind once Redis holds this share of its pub/sub
output-buffer limit for it (the lower of the hard and the soft limit: past
them Redis drops the subscriber, and everything not yet sent)."""
BEHIND_OMEM = 4 * 1024 * 1024
"""What counts as behind when the limit is unknown (CONFIG refused) or off:
half the default soft limit (8 MB for a minute)."""
BIG_READ = 16 * 1024
"""Only a read at least this large asks the kernel what is left (one ioctl):
a smaller one means the socket was drained."""
STEER_INTERVAL = 0.05
"""Seconds between two questions to Redis about what it holds for the
subscriber while the daemon is behind (see L{RedisPubSubSource._steer}):
at 5 MB/s of messages, 250 kB between two answers; and at most this long
idle once the daemon has caught up."""


def pubsub_limit(config: list[str]) -> int | None:
    """
    The lower non-zero pub/sub output-buffer limit, in bytes, from the reply
    to C{CONFIG GET client-output-buffer-limit} (classes, then hard, soft
    and seconds each), or L{None} if there is none.
    """
    words = config[1].split() if len(config) > 1 else []
    if "pubsub" not in words:
        return None
    at = words.index("pubsub")
    limits = [int(word) for word in words[at + 1:at + 3] if word.isdigit() and int(word)]
    return min(limits) if limits else None


def output_memory(client_list: str) -> int:
    """C{omem} (bytes queued for the client) from a C{CLIENT LIST ID} reply."""
    for field in client_list.split():
        if field.startswith("omem="):
            return int(field[5:])
    raise ValueError(f"no omem in {client_list!r}")


class Occurrences:
    """
    Names each pub/sub message by its bytes and how many times this process
    saw the same bytes recently: the same message reaching several daemons
    gets the same name on each, while a producer that really sends the same
    bytes twice gets two names. A count restarts only once those bytes went
    unseen for C{window} seconds (longer than the history remembers names).

    Every message of the last C{window} seconds is remembered (a flood of
    ticks: millions), so each costs one 20-byte digest, one serial number
    and two slots: sightings are numbered, and their times are kept per
    L{MARK_STEP}, not per message.
    """

    MARK_STEP = 0.01

    def __init__(self, clock: IReactorTime, window: float) -> None:
        self._clock = clock
        self._window = window
        self._last: dict[bytes, int] = {}  # digest -> serial of its newest sighting
        self._counts: dict[bytes, int] = {}  # digests seen more than once -> how often
        self._digests: deque[bytes] = deque()  # every sighting, oldest first
        self._first = 0  # serial of _digests[0]
        # [serial of the first sighting from then on, time of the newest]
        self._marks: deque[list[Any]] = deque()
        self._marked = float("-inf")

    def key(self, channel: bytes, message: bytes, same: bytes | None = None) -> str:
        """
        The name of this sighting of C{message} on C{channel}: its digest
        under C{same} (default C{channel}) and how many times it was seen on
        C{channel} within the window.
        """
        now = self._clock.seconds()
        marks = self._marks
        serial = self._first + len(self._digests)
        if now - self._marked >= self.MARK_STEP:
            self._marked = now
            marks.append([serial, now])
            if marks[0][1] < now - self._window:
                self._forget(now - self._window)
        else:
            marks[-1][1] = now
        digest = hashlib.sha1(channel + b"\0" + message, usedforsecurity=False).digest()
        name = digest if same is None or same == channel else hashlib.sha1(
            same + b"\0" + message, usedforsecurity=False).digest()
        last = self._last
        if digest in last:
            n = self._counts.get(digest, 1) + 1
            self._counts[digest] = n
        else:
            n = 1
        last[digest] = serial
        self._digests.append(digest)
        return f"{name.hex()}:{n}"

    def _forget(self, before: float) -> None:
        """Forget the sightings of every mark whose newest is older than C{before}."""
        marks, digests, last, counts = self._marks, self._digests, self._last, self._counts
        serial = self._first
        while marks[0][1] < before:
            marks.popleft()
            end = marks[0][0]  # a newer mark always follows: key() just added one
            while serial < end:
                digest = digests.popleft()
                if last[digest] == serial:
                    del last[digest]
                    counts.pop(digest, None)
                serial += 1
        self._first = serial


class _SubscriberProtocol(Encoding, txredisapi.SubscriberProtocol):  # type: ignore[misc]
    """Hands each connection and message to the L{RedisPubSubSource}."""

    def connectionMade(self) -> Any:
        # The base method must run first: it fires the ready signal.
        result = super().connectionMade()
        self.whenConnected().addCallback(self.factory.source._connected)
        return result

    def dataReceived(self, data: bytes) -> None:
        """
        Messages go straight to the source: txredisapi's generic handling
        of a reply (decoding, transactions, then telling a message from a
        command's reply) costs more than the rest of receiving one. Other
        replies take its path.
        """
        source = self.factory.source
        source._read(len(data), getattr(self.transport, "socket", None))
        reader = self._reader
        reader.feed(data)
        message = source._message
        reply = reader.gets()
        while reply is not False:
            if type(reply) is list and len(reply) == 3 and reply[0] == b"message":
                message(reply[1], reply[2])
            elif type(reply) is list and len(reply) == 4 and reply[0] == b"pmessage":
                message(reply[2], reply[3])
            else:
                self.replyReceived(reply)
            reply = reader.gets()

    def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:
        self.factory.source._message(channel, message)

    def connectionLost(self, why: Any) -> None:
        self.factory.source._disconnected(self, why)
        super().connectionLost(why)


@implementer(IEventSource)
class RedisPubSubSource(Service):
    """
    Subscribes to the producer's channels (or the given ones) and hands each
    message to the receiver.

    Pub/sub is fire-and-forget: what the producer publishes while this is
    disconnected is gone. Each such gap is counted and timed for C{/ready}
    and the logs. A PING every C{ping_interval} seconds, unanswered for
    C{ping_timeout}, drops the connection so a hung Redis (SIGSTOP, a
    half-open TCP connection) is noticed and reconnected.

    @ivar daemon_behind: whether the daemon is behind its clients
        (L{tickstock.deliver.overload}): then the subscriber reads only what Redis
        should not hold (L{_steer}).
    """

    _log = Logger()

    def __init__(
        self, reactor: IReactorTime, address: RedisAddress,
        ping_interval: float = 1.0, ping_timeout: float = 3.0,
        channels: Iterable[str] = DEFAULT_REGISTRY.names, dedupe_window: float = 30.0,
        ask: Callable[..., Deferred[Any]] | None = None, patterns: Iterable[str] = (),
        same: Callable[[str], str] = lambda name: name,
    ) -> None:
        """
        @param patterns: channel-name patterns to subscribe to as well
            (PSUBSCRIBE); a message matching one is handed on under its own
            channel name.
        @param same: the name under which messages of a channel count as the
            same (its registry channel): a producer that publishes one tick
            on C{tickstock.ticks.AAPL} and on C{tickstock.all_ticks} gives
            one event, not two.
        @param ask: runs a command on another connection to the same Redis
            (L{RedisLink.execute}), to learn how much Redis holds for this
            subscriber while it lags; without it, lagging for L{LAGGING_FOR}
            counts as behind.
        """
        self._address = address
        self._redis = RedisConnection(reactor, address, self._new_factory, "redis subscriber")
        self._clock: IReactorTime = reactor
        self._receiver: Callable[[str, bytes, str], Any] | None = None
        self._occurrences = Occurrences(reactor, dedupe_window)
        self._channels = {name.encode(): name for name in channels}
        self._patterns = tuple(patterns)
        self._same = same
        self._ping_timeout = ping_timeout
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = reactor
        self._ping_interval = ping_interval
        self._protocol: _SubscriberProtocol | None = None
        self._waiting_since: float | None = None
        self.state = "connecting"
        self.ready = False
        self._down_since: float | None = self._clock.seconds()
        self.gaps = 0
        self.gap_seconds = 0.0
        self.last_gap_seconds: float | None = None
        self.connections = 0
        self.heartbeat_timeouts = 0
        self.last_error: str | None = None
        self.ping_rtt: float | None = None
        self.behind = False
        self._reads = self._reads_seen = 0
        self._lagging_since: float | None = None
        self._ask = ask
        self._asked_at: float | None = None
        self._client_id: int | None = None
        self._behind_bytes: int | None = None
        self.backlog: int | None = None
        """The most bytes Redis held for this subscriber when asked since its
        socket last drained."""
        self._drained = True
        self.fell_behind = 0
        self.daemon_behind: Callable[[], bool] = lambda: False
        self.paused = False
        self.pauses = 0
        self._steering = False
        self._next_steer: IDelayedCall | None = None

    def listen(self, receiver: Callable[[str, bytes, str], Any]) -> None:
        self._receiver = receiver

    def _read(self, size: int, sock: Any) -> None:
        """
        After each large socket read, ask the kernel how much is still
        waiting. A socket that held at least L{BEHIND_BYTES} at every read
        for L{LAGGING_FOR} seconds means Redis is queueing for us; past its
        output-buffer limit Redis drops the subscriber, and everything not
        yet sent, so once it holds L{BEHIND_SHARE} of that the subscriber
        is L{behind} (until the socket drains), and the router sheds
        latest-only events unparsed (see L{tickstock.ingest.router.Router}).
        """
        self._reads += 1
        if not self._steering and self._ask is not None and self.daemon_behind():
            self._steer()
        unread = 0
        if size >= BIG_READ:  # a smaller read drained the socket
            try:
                unread = struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0]
            except (OSError, TypeError, ValueError):
                pass
        if size + unread < BEHIND_BYTES:
            self._lagging_since = None
            self.behind = False
            self._drained = True
            return
        now = self._clock.seconds()
        if self._lagging_since is None:
            self._lagging_since = now
        elif (not self.behind and now - self._lagging_since >= LAGGING_FOR
              and (self._asked_at is None or now - self._asked_at >= LAGGING_FOR)):
            self._asked_at = now
            self._check_backlog()

    def _check_backlog(self) -> None:
        if self._ask is None or self._client_id is None:
            self._fall_behind(f"lagging for {LAGGING_FOR:g}s")
            return

        def backlog(held: int) -> None:
            assert self._behind_bytes is not None
            if held >= self._behind_bytes and self._lagging_since is not None:
                self._fall_behind(f"Redis holds {held:,} bytes for it")

        def unknown(failure: Any) -> None:
            if self._lagging_since is not None:
                self._fall_behind(f"lagging; its backlog unknown: {failure.getErrorMessage()}")
        self._held().addCallbacks(backlog, unknown)

    def _held(self) -> Deferred[int]:
        """How many bytes Redis holds for this subscriber; its limit is learnt first."""
        assert self._ask is not None
        ask = self._ask
        d: Deferred[Any]
        if self._behind_bytes is None:
            d = ask("CONFIG", "GET", "client-output-buffer-limit").addCallback(pubsub_limit)
            d.addErrback(lambda _: None)  # CONFIG is often refused on managed Redis

            def limit(found: int | None) -> None:
                self._behind_bytes = int(found * BEHIND_SHARE) if found else BEHIND_OMEM
            d.addCallback(limit)
        else:
            d = succeed(None)
        d.addCallback(lambda _: ask("CLIENT", "LIST", "ID", self._client_id))
        d.addCallback(output_memory)

        def noted(held: int) -> int:
            if self._drained or self.backlog is None:
                self.backlog = held
            else:
                self.backlog = max(self.backlog, held)
            self._drained = False
            return held
        return d.addCallback(noted)

    def _steer(self) -> None:
        """
        While the daemon is behind, read only what Redis should not hold.
        The subscriber stops reading, so that events wait in Redis instead
        of being stored in the history faster than the live tail delivers
        them (once the history trims what the tail has not read, every
        client of that topic must resume). Once Redis holds L{BEHIND_SHARE}
        of its limit it reads again, shedding latest-only events unparsed:
        at its limit Redis drops the subscriber and all it held. Asked
        again every L{STEER_INTERVAL} until the daemon has caught up; a
        backlog Redis does not tell is never held.
        """
        self._next_steer = None
        protocol = self._protocol
        if protocol is None or self._client_id is None or not self.daemon_behind():
            self._steering = False
            self._hold(False)
            return
        self._steering = True

        def steer(held: int) -> None:
            assert self._behind_bytes is not None
            if protocol is not self._protocol:
                return
            if held >= self._behind_bytes:
                self._fall_behind(f"Redis holds {held:,} bytes for it while the daemon is behind")
            self._hold(held < self._behind_bytes)

        def again(result: Any) -> None:
            if protocol is self._protocol and self._steering:
                if isinstance(result, Failure):
                    self._hold(False)
                self._next_steer = self._clock.callLater(STEER_INTERVAL, self._steer)
        self._held().addCallback(steer).addBoth(again)

    def _hold(self, pause: bool) -> None:
        """Stop or start reading the subscriber's socket."""
        transport = getattr(self._protocol, "transport", None)
        if pause == self.paused or transport is None:
            return
        self.paused = pause
        if pause:
            self.pauses += 1
            transport.pauseProducing()
        else:
            transport.resumeProducing()

    def _stop_steering(self) -> None:
        self._steering = self.paused = False
        if self._next_steer is not None and self._next_steer.active():
            self._next_steer.cancel()
        self._next_steer = None

    def _fall_behind(self, why: str) -> None:
        if self.behind:
            return
        self.behind = True
        self.fell_behind += 1
        if str(self.fell_behind).strip("0") == "1":  # the 1st, 10th, 100th...
            self._log.warn("redis subscriber: behind its input ({why}); shedding latest-only "
                           "events until caught up ({n} times so far)", why=why, n=self.fell_behind)

    def _new_factory(self) -> txredisapi.RedisFactory:
        factory = txredisapi.SubscriberFactory(isLazy=True)
        factory.protocol = _SubscriberProtocol
        factory.source = self
        factory.convertNumbers = False
        factory.charset = None
        factory.password = self._address.password
        factory.username = self._address.username
        factory.replyTimeout = self._ping_timeout
        return factory

    @property
    def rebuilds(self) -> int:
        return self._redis.rebuilds

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._redis.start()
        self._heartbeat.start(self._ping_interval, now=False)

    def stopService(self) -> Deferred[Any]:
        if self._heartbeat.running:
            self._heartbeat.stop()
        self._stop_steering()
        super().stopService()  # type: ignore[no-untyped-call]
        return self._redis.stop()

    def status(self) -> dict[str, object]:
        return {
            "state": self.state,
            "address": str(self._address),
            "connections": self.connections,
            "gaps": self.gaps,
            "behind": self.behind,
            "fell_behind": self.fell_behind,
            "backlog_bytes": self.backlog,
            "paused": self.paused,
            "pauses": self.pauses,
            "gap_seconds_total": round(self.gap_seconds, 3),
            "last_gap_seconds": self.last_gap_seconds,
            "heartbeat_timeouts": self.heartbeat_timeouts,
            "rebuilds": self.rebuilds,
            "ping_rtt_ms": None if self.ping_rtt is None else round(self.ping_rtt * 1000, 3),
            "last_error": self.last_error,
        }

    def _connected(self, protocol: _SubscriberProtocol) -> None:
        self._protocol = protocol
        self._waiting_since = self._clock.seconds()
        self._client_id = self._behind_bytes = None  # perhaps another Redis (a failover)

        def named(client_id: Any) -> None:
            if protocol is self._protocol:
                self._client_id = int(client_id)
        # Before subscribing (then only pub/sub commands are allowed): which
        # client this is, to ask Redis how much it holds for it.
        protocol.execute_command("CLIENT", "ID").addCallbacks(named, lambda _: None)
        # One SUBSCRIBE per channel: each gets exactly one confirmation, so
        # later replies (PONGs) match the commands that asked for them.
        d = gatherResults(
            [protocol.subscribe(name) for name in self._channels.values()]
            + [protocol.psubscribe(pattern) for pattern in self._patterns], consumeErrors=True
        )
        d.addCallbacks(lambda _: self._subscribed(protocol),
                       lambda f: self._subscribe_failed(protocol, f))

    def _subscribed(self, protocol: _SubscriberProtocol) -> None:
        if protocol is not self._protocol:
            return
        self._waiting_since = None
        self.state, self.ready = "subscribed", True
        self.connections += 1
        if self._down_since is not None and self.connections > 1:
            gap = self._clock.seconds() - self._down_since
            self.gaps += 1
            self.gap_seconds += gap
            self.last_gap_seconds = round(gap, 3)
            self._log.warn(
                "redis subscriber: resubscribed to {address} after {gap:.3f}s; producer "
                "messages published in that gap were not received (gap #{n})",
                address=str(self._address), gap=gap, n=self.gaps,
            )
        else:
            self._log.info("redis subscriber: subscribed to {n} channels on {address}",
                           n=len(self._channels), address=str(self._address))
        self._down_since = None

    def _subscribe_failed(self, protocol: _SubscriberProtocol, failure: Any) -> None:
        self.last_error = failure.getErrorMessage()
        self._log.error("redis subscriber: SUBSCRIBE failed: {e}", e=self.last_error)
        self._redis.abort(protocol)

    def _disconnected(self, protocol: _SubscriberProtocol, why: Any) -> None:
        if protocol is not self._protocol:
            return
        self._protocol = None
        self._waiting_since = None
        self._stop_steering()  # a new connection reads from the start
        if not self.running:
            self.state, self.ready = "stopped", False
            return
        if self.ready:
            self._down_since = self._clock.seconds()
            self.last_error = why.getErrorMessage()
            self._log.warn("redis subscriber: lost {address}: {why}; reconnecting",
                           address=str(self._address), why=self.last_error)
        self.state, self.ready = "connecting", False

    def _message(self, channel: bytes, message: bytes) -> None:
        name = self._channels.get(channel)
        if name is None and self._patterns:
            name = channel.decode("utf-8", "replace")
        if name is not None and self._receiver is not None:
            d = self._receiver(name, message, self._occurrences.key(
                channel, message, self._same(name).encode()))
            if isinstance(d, Deferred):
                d.addErrback(lambda _: None)  # counted by the receiver; pub/sub cannot retry

    def _beat(self) -> None:
        protocol = self._protocol
        if protocol is None:
            return
        now = self._clock.seconds()
        if self._waiting_since is not None:
            if self._reads != self._reads_seen or self.paused:
                # Still receiving, or not reading (Redis answers our steering):
                # a reply stuck behind a backlog, not a hung Redis.
                self._reads_seen = self._reads
                self._waiting_since = now
            elif now - self._waiting_since > self._ping_timeout:
                self.heartbeat_timeouts += 1
                self.last_error = f"no reply from Redis in {self._ping_timeout:g}s"
                self._log.warn("redis subscriber: {e}; dropping the connection", e=self.last_error)
                self._redis.abort(protocol)
            return
        self._waiting_since = now
        self._reads_seen = self._reads

        def pong(_: Any) -> None:
            if protocol is self._protocol:
                self.ping_rtt = self._clock.seconds() - now
                self._waiting_since = None

        protocol.execute_command("PING", apply_timeout=False).addCallbacks(pong, lambda _: None)
