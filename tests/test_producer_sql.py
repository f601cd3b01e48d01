"""
The shared database as the producer uses it (docs/database.md, "The shared
database"), against a real PostgreSQL: the seed documents' SQL, run verbatim
on a connection of its own under a role with only a producer's rights,
works on TickStock's schema; the rows it writes show in the pattern history
like TickStock's own; and L{ProducerRowListener} hands each one on once,
live, also after a restart or a lost connection.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import orjson
import psycopg2
import psycopg2.errors
import pytest
import pytest_twisted
from psycopg2.extensions import parse_dsn
from twisted.internet import reactor, task

from tests.servers import PostgresServer
from tests.wsclient import eventually
from tickstock.domain.events import ID_STRIDE, Event, EventIds
from tickstock.domain.records import PatternQuery
from tickstock.store.listen import CHANNEL, ProducerRowListener
from tickstock.store.migrate import migrate
from tickstock.store.pool import RECONNECT_MAX
from tickstock.store.postgres import PostgresStore

# The seed's statements (its cross-system consistency and query performance
# tests), verbatim.
SEED_INSERT = """
            INSERT INTO events (symbol, pattern, timestamp, details)
            VALUES ('AAPL', 'Doji', NOW(), '{"confidence": 0.85}')
            """
SEED_SELECT = """
            SELECT symbol, pattern, details
            FROM events
            WHERE symbol = 'AAPL' AND pattern = 'Doji'
            ORDER BY timestamp DESC
            LIMIT 1
            """
SEED_QUERIES = [
    "SELECT * FROM events ORDER BY timestamp DESC LIMIT 5",
    "SELECT DISTINCT pattern FROM events",
]

# The original system's bar upsert, in its shape.
OHLCV_UPSERT = """
    INSERT INTO ohlcv_1min (symbol, timestamp, open, high, low, close, volume)
    VALUES (%s, to_timestamp(%s), %s, %s, %s, %s, %s)
    ON CONFLICT (symbol, timestamp) DO UPDATE SET
        open = EXCLUDED.open, high = EXCLUDED.high, low = EXCLUDED.low,
        close = EXCLUDED.close, volume = EXCLUDED.volume
"""

GRANTS = ("GRANT INSERT, SELECT ON events TO {role}",
          "GRANT INSERT, UPDATE, SELECT ON ohlcv_1min TO {role}")


def add_producer(server: PostgresServer, dbname: str, role: str) -> str:
    """A login with only the rights a producer has; its DSN on C{dbname}."""
    server.sql(f"CREATE ROLE {role} LOGIN")
    for grant in GRANTS:
        server.sql(grant.format(role=role), dbname)
    return server.dsn(dbname, user=role)


@pytest.fixture
def producer(postgres: str, postgres_cluster: PostgresServer) -> Iterator[str]:
    """The DSN of a producer login on this test's database."""
    dbname = parse_dsn(postgres)["dbname"]
    role = f"producer_{dbname}"
    yield add_producer(postgres_cluster, dbname, role)
    postgres_cluster.sql(f"DROP OWNED BY {role}", dbname)
    postgres_cluster.sql(f"DROP ROLE {role}")


def execute(dsn: str, statement: str, params: Any = None) -> list[Any]:
    """Run C{statement} in a transaction of its own, committed, as the producer's code does."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cursor:
            cursor.execute(statement, params)
            rows = cursor.fetchall() if cursor.description else []
        conn.commit()
        return rows
    finally:
        conn.close()


@pytest.fixture
def start() -> Iterator[Any]:
    """Starts stores and listeners; stops them after the test."""
    services: list[Any] = []

    def started(service: Any) -> Any:
        service.startService()
        services.append(service)
        return service

    yield started
    for service in services:
        service.stopService()


class Received:
    """A recording C{receive}: the messages handed on, decoded, in order."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    def __call__(self, channel: str, raw: bytes) -> None:
        assert channel == CHANNEL
        self.messages.append(orjson.loads(raw))

    def ids(self) -> list[str]:
        return [message["event_id"] for message in self.messages]


def listener(dsn: str, clock: Any = reactor) -> tuple[ProducerRowListener, Received]:
    received = Received()
    return ProducerRowListener(reactor, clock, dsn, 2.0, received), received


def tickstock_pattern(event_id: str) -> Event:
    """A pattern event as TickStock stores it after Redis delivered it."""
    data = {"event_type": "pattern_detected", "symbol": "AAPL", "pattern": "Doji",
            "confidence": 0.6, "timestamp": 1_700_000_000.5, "source": "redis"}
    return Event(id=event_id, channel="tickstock.events.patterns", topic="patterns",
                 type="pattern_detected", data=data, symbol="AAPL")


def row_ids(dsn: str, where: str = "TRUE") -> list[str]:
    rows = execute(dsn, f"SELECT id_ms || '-' || id_seq FROM events WHERE {where} "
                        "ORDER BY id_ms, id_seq")
    return [row[0] for row in rows]


# ---------------------------------------------------------------- the seed's SQL


def test_the_seed_statements_work_under_the_producer_role(producer: str) -> None:
    """
    The seed's insert and reads, verbatim, as a role with INSERT and SELECT
    on events only: the row reads back as written (details is jsonb, so
    psycopg2 returns a dict where the seed's SQLAlchemy code json.loads a
    string), and TickStock filled in the rest.
    """
    execute(producer, SEED_INSERT)
    [row] = execute(producer, SEED_SELECT)
    assert row[0] == "AAPL" and row[1] == "Doji" and row[2] == {"confidence": 0.85}
    newest, distinct = (execute(producer, query) for query in SEED_QUERIES)
    assert distinct == [("Doji",)]
    [full] = execute(producer, """
        SELECT topic, channel, event_type, confidence, created_at = "timestamp",
               id_seq %% %s <> 0 FROM events""", (ID_STRIDE,))
    assert full == ("patterns", "tickstock.db.events", "pattern_detected", 0.85, True, True)
    assert len(newest) == 1 and len(newest[0]) == 11


def test_producer_rows_get_unique_ids_in_time_order(producer: str, postgres: str) -> None:
    """
    Ids of rows a producer inserts never take a TickStock id's sequence
    number (a multiple of 2^40) and grow with the insert time, and the
    original columns confidence and created_at may be written too.
    """
    execute(producer, SEED_INSERT)
    execute(producer, """INSERT INTO events (symbol, pattern, confidence, created_at, details)
                         VALUES ('msft', 'Hammer', 0.7, now(), '{"note": "x"}')""")
    execute(producer, """INSERT INTO events (symbol, pattern, details) VALUES
                         ('AAPL', 'Doji', '{"confidence": 0.1}'),
                         ('AAPL', 'Doji', '{"confidence": 0.2}')""")
    rows = execute(postgres, "SELECT id_ms, id_seq, symbol, confidence FROM events "
                             "ORDER BY created_at, id_seq")
    assert [(symbol, confidence) for _, _, symbol, confidence in rows] == [
        ("AAPL", 0.85), ("MSFT", 0.7), ("AAPL", 0.1), ("AAPL", 0.2)]
    keys = [(ms, seq) for ms, seq, _, _ in rows]
    assert keys == sorted(keys) and len(set(keys)) == 4
    assert all(0 < seq < ID_STRIDE for _, seq in keys)
    assert abs(keys[0][0] / 1000 - time.time()) < 60
    assert execute(postgres, "SELECT symbol FROM symbols ORDER BY 1") == [("AAPL",), ("MSFT",)]


BAD_ROWS = [
    ("('AAPL', 'Doji', '{}')", "confidence must be a number from 0 to 1 .*not NULL"),
    ("('AAPL', 'Doji', '{\"confidence\": 85}')", "confidence must be a number .*not 85"),
    ("('AAPL', 'Doji', '{\"confidence\": \"high\"}')", "details.confidence must be a number"),
    ("('TOO-LONG-SYM', 'Doji', '{\"confidence\": 0.5}')", "symbol 'TOO-LONG-SYM' is not a ticker"),
    ("(NULL, 'Doji', '{\"confidence\": 0.5}')", "symbol NULL is not a ticker"),
    ("('AAPL', ' ', '{\"confidence\": 0.5}')", "pattern must be a name of 1-256 characters"),
    ("('AAPL', 'Doji', '[0.5]')", "details must be a JSON object, not array"),
]


@pytest.mark.parametrize(("statement", "message"), [
    *((f"INSERT INTO events (symbol, pattern, details) VALUES {values}", message)
      for values, message in BAD_ROWS),
    ("INSERT INTO events (symbol, pattern, confidence, topic) "
     "VALUES ('AAPL', 'Doji', 0.5, 'market_state')", "pattern event .*not 'market_state'"),
])
def test_a_bad_producer_row_is_refused_with_a_clear_error(producer: str, statement: str,
                                                          message: str) -> None:
    """Each bad row fails its INSERT (invalid_parameter_value), saying what is wrong."""
    with pytest.raises(psycopg2.errors.InvalidParameterValue, match=message):
        execute(producer, statement)
    assert row_ids(producer) == []


@pytest_twisted.ensureDeferred
async def test_producer_rows_show_in_the_pattern_history(producer: str, postgres: str,
                                                         start: Any) -> None:
    """
    /api/patterns (the store's query) and catch-up return a producer's row
    like one TickStock stored, its data the producer-style message; those
    TickStock stored read exactly as before.
    """
    store = start(PostgresStore(reactor, postgres, None, 2.0))
    await eventually(lambda: store.ready, 10, "store ready")
    ours = tickstock_pattern(EventIds().next(reactor.seconds()))
    await store.write([], [ours])
    execute(producer, SEED_INSERT)
    [key] = row_ids(postgres, "channel = 'tickstock.db.events'")
    [(when,)] = execute(postgres, 'SELECT extract(epoch FROM "timestamp")::float8 FROM events '
                                  "WHERE channel = 'tickstock.db.events'")

    theirs, stored = await store.patterns(PatternQuery(symbol="AAPL", pattern="Doji"))
    assert theirs == {
        "id": key, "symbol": "AAPL", "pattern": "Doji", "confidence": 0.85, "timestamp": when,
        "data": {"event_type": "pattern_detected", "event_id": f"pg:{key}", "symbol": "AAPL",
                 "pattern": "Doji", "confidence": 0.85, "timestamp": when,
                 "source": "postgres"}}
    assert stored == {"id": ours.id, "symbol": "AAPL", "pattern": "Doji", "confidence": 0.6,
                      "timestamp": 1_700_000_000.5, "data": ours.data}
    assert [row["id"] for row in await store.patterns(PatternQuery(min_confidence=0.8))] == [key]
    assert [row["id"] for row in await store.patterns(PatternQuery(since=when))] == [key]
    assert await store.patterns(PatternQuery(since=when + 0.001)) == []

    caught_up = await store.events_after("patterns", "0-0", None, None, 10)
    assert [(event.id, event.channel, event.symbol) for event in caught_up] == [
        (ours.id, "tickstock.events.patterns", "AAPL"), (key, CHANNEL, "AAPL")]
    assert caught_up[1].data == theirs["data"]


@pytest_twisted.ensureDeferred
async def test_ohlcv_upsert_in_the_original_shape(producer: str, postgres: str,
                                                  start: Any) -> None:
    """
    The producer's upsert on (symbol, timestamp) inserts, then replaces, a
    bar that /api/ohlcv (the store's query) returns as it returns TickStock's.
    """
    store = start(PostgresStore(reactor, postgres, None, 2.0))
    await eventually(lambda: store.ready, 10, "store ready")
    minute = 1_700_000_040
    execute(producer, OHLCV_UPSERT, ("SPY", minute, 400.0, 401.0, 399.5, 400.5, 1000.0))
    execute(producer, OHLCV_UPSERT, ("SPY", minute, 400.0, 402.0, 399.0, 401.5, 2500.0))
    assert await store.ohlcv("SPY", minute, minute + 60, 10) == [
        {"minute": minute, "open": 400.0, "high": 402.0, "low": 399.0, "close": 401.5,
         "volume": 2500.0}]


@pytest_twisted.ensureDeferred
async def test_tickstock_does_not_write_a_producer_row_again(producer: str, postgres: str,
                                                             start: Any) -> None:
    """
    An event that came from a producer's row (channel tickstock.db.events)
    is not written to events by TickStock: the row is already there.
    """
    store = start(PostgresStore(reactor, postgres, None, 2.0))
    await eventually(lambda: store.ready, 10, "store ready")
    execute(producer, SEED_INSERT)
    [key] = row_ids(postgres)
    echo = Event(id=EventIds().next(reactor.seconds()), channel=CHANNEL, topic="patterns",
                 type="pattern_detected", symbol="AAPL",
                 data={"symbol": "AAPL", "pattern": "Doji", "confidence": 0.85,
                       "timestamp": 1_700_000_000.0, "event_id": f"pg:{key}"})
    await store.write([], [echo])
    assert row_ids(postgres) == [key]


# ---------------------------------------------------------------- live delivery


@pytest_twisted.ensureDeferred
async def test_each_producer_row_is_handed_on_once_and_only_those(producer: str, postgres: str,
                                                                   start: Any) -> None:
    """
    Two listeners (two daemons) each hand on every producer row once, in
    commit order, with the same event_id; TickStock's own writes do not
    notify, and forged notifications hand on nothing.
    """
    (first, got), (second, also) = listener(postgres), listener(postgres)
    start(first), start(second)
    store = start(PostgresStore(reactor, postgres, None, 2.0))
    await eventually(lambda: first.listening and second.listening and store.ready, 10,
                     "listening")
    watch = psycopg2.connect(postgres)
    watch.autocommit = True
    try:
        watch.cursor().execute("LISTEN tickstock_events")
        ours = tickstock_pattern(EventIds().next(reactor.seconds()))
        await store.write([], [ours])
        execute(postgres, "NOTIFY tickstock_events, 'not an id'")
        execute(postgres, f"NOTIFY tickstock_events, '{ours.id}'")
        execute(producer, SEED_INSERT)
        execute(producer, """INSERT INTO events (symbol, pattern, details) VALUES
            ('NVDA', 'Hammer',
             '{"confidence": 0.9, "indicators": {"rsi": 71.5}, "source": "x"}')""")
        keys = row_ids(postgres, "channel = 'tickstock.db.events'")

        await eventually(lambda: len(got.messages) >= 2 and len(also.messages) >= 2, 10,
                         "both rows handed on by both")

        def notified() -> list[str]:
            watch.poll()
            return [n.payload for n in watch.notifies]

        await eventually(lambda: len(notified()) == 4, 10, "the notifications")
        assert notified() == ["not an id", ours.id, *keys]
    finally:
        watch.close()
    times = dict(execute(postgres, "SELECT id_ms || '-' || id_seq, "
                                   'extract(epoch FROM "timestamp")::float8 FROM events'))
    assert got.messages == also.messages
    assert got.messages == [
        {"event_type": "pattern_detected", "event_id": f"pg:{keys[0]}", "symbol": "AAPL",
         "pattern": "Doji", "confidence": 0.85, "timestamp": times[keys[0]],
         "source": "postgres"},
        {"event_type": "pattern_detected", "event_id": f"pg:{keys[1]}", "symbol": "NVDA",
         "pattern": "Hammer", "confidence": 0.9, "timestamp": times[keys[1]],
         "source": "postgres", "indicators": {"rsi": 71.5}},
    ]
    assert first.ignored == second.ignored == 1


@pytest_twisted.ensureDeferred
async def test_the_listener_listens_again_after_a_restart(postgres_server: PostgresServer,
                                                          start: Any) -> None:
    """After PostgreSQL restarts, the listener reconnects, LISTENs again and gets later rows."""
    migrate(postgres_server.dsn())
    producer = add_producer(postgres_server, "postgres", "producer")
    rows, received = listener(postgres_server.dsn())
    start(rows)
    await eventually(lambda: rows.listening, 10, "listening")
    execute(producer, SEED_INSERT)
    await eventually(lambda: len(received.messages) == 1, 10, "the first row")

    postgres_server.restart()
    await eventually(lambda: rows.pool.reconnects >= 1 and rows.listening, 20,
                     "listening again")
    execute(producer, SEED_INSERT)
    await eventually(lambda: len(received.messages) == 2, 10, "the row after the restart")
    assert received.ids() == [f"pg:{key}" for key in row_ids(postgres_server.dsn())]


@pytest_twisted.ensureDeferred
async def test_rows_committed_while_the_listener_was_away_are_caught_up(
        producer: str, postgres: str, postgres_cluster: PostgresServer, start: Any) -> None:
    """
    Its connection killed, the listener is not listening until it
    reconnects (held back here by a test clock); a row committed meanwhile
    is handed on once it does, once, and later rows as they come.
    """
    clock = task.Clock()
    rows, received = listener(postgres, clock)
    start(rows)
    await eventually(lambda: rows.listening, 10, "listening")
    execute(producer, SEED_INSERT)
    await eventually(lambda: len(received.messages) == 1, 10, "the first row")

    postgres_cluster.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE application_name = 'tickstock-listen' "
                         "AND datname = current_database()", parse_dsn(postgres)["dbname"])
    await eventually(lambda: not rows.listening, 10, "the connection lost")
    execute(producer, SEED_INSERT)
    clock.advance(RECONNECT_MAX)
    await eventually(lambda: len(received.messages) == 2, 10, "the row from the gap")
    execute(producer, SEED_INSERT)
    await eventually(lambda: len(received.messages) == 3, 10, "a live row")
    assert received.ids() == [f"pg:{key}" for key in row_ids(postgres)]
