"""
L{RedisConnection} on a clock and a fake txredisapi factory: its states,
the rebuild of a factory that stopped reconnecting on its own (txredisapi
issue #146), failing fast while down, and stopping.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from tickstock.config import parse_redis_url
from tickstock.connections.redis import NotConnected, RedisConnection

ADDRESS = parse_redis_url("redis://127.0.0.1:1/0")


class Transport:
    """A fake transport recording how it was closed."""

    def __init__(self) -> None:
        self.closed: str | None = None

    def loseConnection(self) -> None:
        self.closed = "lost"

    def abortConnection(self) -> None:
        self.closed = "aborted"


class Conn:
    """A fake txredisapi connection: only its transport."""

    def __init__(self) -> None:
        self.transport = Transport()


class Factory:
    """
    A fake txredisapi factory: never connects by itself; a test puts a
    connection in its pool, or marks it stopped as txredisapi does when it
    gives up.
    """

    def __init__(self) -> None:
        self.pool: list[Conn] = []
        self.stopped = False
        self.endpoint: Any = None
        self.disconnected = False

    def startConnecting(self, endpoint: Any) -> None:
        self.endpoint = endpoint

    def disconnect(self) -> Deferred[None]:
        self.disconnected = True
        self.stopped = True
        self.pool.clear()
        return succeed(None)


def connection() -> tuple[Clock, RedisConnection, list[Factory]]:
    clock, made = Clock(), []

    def make() -> Factory:
        made.append(Factory())
        return made[-1]

    return clock, RedisConnection(clock, ADDRESS, make, "test"), made  # type: ignore[arg-type]


def test_states_from_stopped_to_connected_and_back():
    clock, redis, made = connection()
    assert redis.state == "stopped"
    redis.start()
    assert redis.state == "connecting"
    assert made[0].endpoint is not None
    assert (made[0].initialDelay, made[0].maxDelay) == (0.1, 1.0)  # type: ignore[attr-defined]
    conn = Conn()
    made[0].pool.append(conn)
    assert redis.state == "connected"
    assert redis.connection() is conn
    fired: list[Any] = []
    redis.stop().addCallback(fired.append)
    assert fired == [None]
    assert made[0].disconnected
    assert redis.state == "stopped"


def test_not_connected_fails_at_once():
    clock, redis, made = connection()
    with pytest.raises(NotConnected, match="not connected to"):
        redis.connection()
    redis.start()
    with pytest.raises(NotConnected):
        redis.connection()


def test_a_factory_that_stopped_is_rebuilt():
    clock, redis, made = connection()
    redis.start()
    clock.advance(1.0)
    assert len(made) == 1 and redis.rebuilds == 0
    made[0].stopped = True  # txredisapi gave up reconnecting
    clock.advance(1.0)
    assert len(made) == 2 and redis.rebuilds == 1
    assert made[0].disconnected and made[1].endpoint is not None
    assert redis.state == "connecting"
    made[1].pool.append(Conn())
    assert redis.state == "connected"


def test_stop_ends_the_supervision():
    clock, redis, made = connection()
    redis.start()
    redis.stop()
    assert not clock.getDelayedCalls()
    clock.advance(5.0)
    assert len(made) == 1 and redis.rebuilds == 0


def test_drop_and_abort_close_connections():
    clock, redis, made = connection()
    redis.start()
    first, second = Conn(), Conn()
    made[0].pool.append(first)
    redis.drop()
    assert first.transport.closed == "lost"
    redis.abort(second)
    assert second.transport.closed == "aborted"
