"""
Backtest jobs (L{tickstock.jobs.backtests}): validation, the job gate in the history,
the records, cancel, the per-user limit and the timeout.

The unit tests run the real memory parts (bus, history, store, router) on a
L{Clock}; the end-to-end tests run the daemon on the test's own Redis and
PostgreSQL, with real WebSocket clients, real HTTP, and a producer that is
a real Redis client.
"""

from __future__ import annotations

import socket
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from tests.servers import RedisServer
from tests.test_openapi import check
from tests.test_openapi import request as api_request
from tests.wsclient import connect, eventually, http_request
from tickstock.domain.jobs import JOB_PATTERNS
from tickstock.domain.stored import Refused
from tickstock.domain.topics import CANCEL_CHANNEL, CONTROL_CHANNEL, JOBS_CHANNEL
from tickstock.history.memory import MemoryHistory
from tickstock.ingest.memory import MemoryBus
from tickstock.ingest.router import Router
from tickstock.jobs import backtests as jobs_module
from tickstock.jobs.backtests import (
    NO_PRODUCER,
    RECORD_WAIT,
    JobRefused,
    Jobs,
    parse_params,
)
from tickstock.store.memory import MemoryStore

PROGRESS = "tickstock.events.backtesting.progress"
RESULTS = "tickstock.events.backtesting.results"
PARAMS = {"symbols": ["AAPL", "MSFT"], "start_date": "2024-01-02",
          "end_date": "2024-06-28", "patterns": ["Doji"]}
RESULT = {"win_rate": 0.5, "roi": 0.1, "sharpe_ratio": 1.2, "max_drawdown": 0.05}
PARAMETERS = {"initial_capital": 100_000, "commission_rate": 0.001, "slippage_rate": 0.0005,
              "max_position_size": 0.25, "stop_loss_pct": 0.05, "take_profit_pct": 0.15}


def now(value: Any) -> Any:
    """The result of a coroutine or Deferred that finished synchronously (memory parts)."""
    d = Deferred.fromCoroutine(value) if not isinstance(value, Deferred) else value
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "did not finish synchronously"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def progress(job_id: str, value: float, status: str = "processing", **extra: Any) -> bytes:
    return orjson.dumps({"event_type": "backtest_progress", "job_id": job_id,
                         "progress": value, "status": status, "timestamp": 1_700_000_000,
                         **extra})


def result(job_id: str, **extra: Any) -> bytes:
    return orjson.dumps({"event_type": "backtest_result", "job_id": job_id,
                         "results": RESULT, "completed_at": 1_700_000_000, **extra})


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("change, field", [
    ({"symbols": []}, "symbols"),
    ({"symbols": [f"S{i}" for i in range(51)]}, "symbols"),
    ({"symbols": ["aapl"]}, "symbols"),
    ({"symbols": ["AAPL", "AAPL"]}, "symbols"),
    ({"symbols": "AAPL"}, "symbols"),
    ({"start_date": "2024-1-02"}, "start_date"),
    ({"start_date": "2024-02-30"}, "start_date"),
    ({"start_date": 20240102}, "start_date"),
    ({"end_date": None}, "end_date"),
    ({"start_date": "2024-07-01"}, "end_date"),
    ({"start_date": "2014-06-27"}, "end_date"),
    ({"patterns": ["Doji", "Doji"]}, "patterns"),
    ({"patterns": ["NoSuchPattern"]}, "patterns"),
    ({"patterns": "Doji"}, "patterns"),
    ({"extra": 1}, "extra"),
    ({"parameters": [0.001]}, "parameters"),
    ({"parameters": "fast"}, "parameters"),
    ({"parameters": {"leverage": 2}}, "parameters.leverage"),
    ({"parameters": {"initial_capital": 0}}, "parameters.initial_capital"),
    ({"parameters": {"initial_capital": 1e12 + 1}}, "parameters.initial_capital"),
    ({"parameters": {"initial_capital": "100000"}}, "parameters.initial_capital"),
    ({"parameters": {"commission_rate": -0.001}}, "parameters.commission_rate"),
    ({"parameters": {"commission_rate": True}}, "parameters.commission_rate"),
    ({"parameters": {"slippage_rate": 1.5}}, "parameters.slippage_rate"),
    ({"parameters": {"max_position_size": 0}}, "parameters.max_position_size"),
    ({"parameters": {"max_position_size": 2}}, "parameters.max_position_size"),
    ({"parameters": {"stop_loss_pct": 5}}, "parameters.stop_loss_pct"),
    ({"parameters": {"take_profit_pct": 0}}, "parameters.take_profit_pct"),
    ({"parameters": {"take_profit_pct": 10.5}}, "parameters.take_profit_pct"),
])
def test_each_invalid_field_is_named(change: dict[str, Any], field: str) -> None:
    """Every kind of bad parameter is refused with a message for its field."""
    params = {k: v for k, v in {**PARAMS, **change}.items() if v is not None}
    with pytest.raises(JobRefused) as refused:
        parse_params(params, JOB_PATTERNS)
    assert refused.value.code == "bad_params" and refused.value.status == 400
    assert set(refused.value.fields) == {field}, refused.value.fields
    assert field in str(refused.value)


def test_every_problem_is_reported_at_once_and_good_params_pass() -> None:
    """All wrong fields in one answer; the limits themselves are accepted."""
    with pytest.raises(JobRefused) as refused:
        parse_params({"symbols": ["x"], "start_date": "soon", "patterns": ["?"]}, JOB_PATTERNS)
    assert set(refused.value.fields) == {"symbols", "start_date", "end_date", "patterns"}
    with pytest.raises(JobRefused):
        parse_params(["AAPL"], JOB_PATTERNS)
    ten_years = {**PARAMS, "start_date": "2014-06-28", "symbols": [f"S{i}" for i in range(50)]}
    assert parse_params(ten_years, JOB_PATTERNS)["symbols"] == ten_years["symbols"]
    assert parse_params({**PARAMS, "start_date": "2024-02-29", "end_date": "2034-02-28"},
                        JOB_PATTERNS)
    assert parse_params({k: v for k, v in PARAMS.items() if k != "patterns"},
                        JOB_PATTERNS)["patterns"] == []


def test_the_producers_parameters_pass_at_their_bounds_and_are_kept() -> None:
    """
    Each of upstream's parameters is optional and kept as given; the
    bounds themselves pass; none given is an empty object; every wrong one
    is named in the same answer.
    """
    assert parse_params(PARAMS, JOB_PATTERNS)["parameters"] == {}
    assert parse_params({**PARAMS, "parameters": PARAMETERS}, JOB_PATTERNS)["parameters"] == \
        PARAMETERS
    bounds = {"initial_capital": 1e12, "commission_rate": 0, "slippage_rate": 1,
              "max_position_size": 1, "stop_loss_pct": 1, "take_profit_pct": 10}
    assert parse_params({**PARAMS, "parameters": bounds}, JOB_PATTERNS)["parameters"] == bounds
    with pytest.raises(JobRefused) as refused:
        parse_params({**PARAMS, "symbols": [], "parameters": {
            "initial_capital": -1, "slippage_rate": 2, "stop_loss_pct": 0.05}}, JOB_PATTERNS)
    assert refused.value.fields == {
        "symbols": "must be a list of 1-50 symbols",
        "parameters.initial_capital": "must be a number > 0 and <= 1e+12, not -1",
        "parameters.slippage_rate": "must be a number >= 0 and <= 1 (a fraction: 0.05 is 5 %), "
                                    "not 2"}


# ---------------------------------------------------------------- one process, a Clock


class Rig:
    """The real memory parts wired as the daemon wires them, on a Clock."""

    def __init__(self, per_user: int = 3, timeout: float = 60.0, producer: bool = True,
                 unheard_is_lost: bool = False) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.bus = MemoryBus()
        self.history = MemoryHistory(self.clock, 1000, 3600, 1000)
        self.store = MemoryStore(self.clock)
        self.router = Router(self.clock, self.history, self.bus,
                             stored=lambda event: self.store.write([], [event]))
        self.bus.listen(self.router.receive)
        self.jobs = Jobs(self.clock, self.store, self.history, self.bus, self.router.receive,
                         per_user, timeout, unheard_is_lost=unheard_is_lost)
        self.to_producer: list[tuple[str, dict[str, Any]]] = []
        for channel in (JOBS_CHANNEL, CANCEL_CHANNEL, CONTROL_CHANNEL) if producer else ():
            self.bus.on(channel, lambda raw, c=channel: self.to_producer.append(
                (c, orjson.loads(raw))))
        self.delivered: list[Any] = []
        self.history.listen(self.delivered.append)

    def submit(self, user: str = "alice", params: Any = PARAMS) -> dict[str, Any]:
        return now(self.jobs.submit(user, params))

    def record(self, job_id: str) -> dict[str, Any]:
        return now(self.store.job(job_id))

    def produce(self, channel: str, raw: bytes) -> Any:
        return now(self.router.receive(channel, raw))


def test_a_job_is_recorded_sent_and_followed_to_its_result() -> None:
    """
    queued, sent as docs/contract.md §2 with what upstream reads (type, parameters,
    source); running with progress; completed with the results.
    """
    rig = Rig()
    job = rig.submit(params={**PARAMS, "parameters": PARAMETERS})
    assert job["status"] == "queued" and rig.record(job["job_id"])["status"] == "queued"
    assert rig.record(job["job_id"])["params"] == {**PARAMS, "parameters": PARAMETERS}
    ((channel, sent),) = rig.to_producer
    assert channel == JOBS_CHANNEL
    assert sent == {"job_type": "backtest", "type": "backtest_job", "job_id": job["job_id"],
                    "user_id": "alice", **PARAMS, "parameters": PARAMETERS,
                    "source": "tickstock", "timestamp": rig.clock.seconds()}
    rig.submit()
    assert rig.to_producer[-1][1]["parameters"] == {}
    rig.produce(PROGRESS, progress(job["job_id"], 0.5))
    assert rig.record(job["job_id"])["status"] == "running"
    assert rig.record(job["job_id"])["progress"] == 0.5
    rig.produce(PROGRESS, progress(job["job_id"], 1.0, "completed"))
    assert rig.record(job["job_id"])["status"] == "running"
    rig.produce(RESULTS, result(job["job_id"]))
    done = rig.record(job["job_id"])
    assert (done["status"], done["results"], done["progress"]) == ("completed", RESULT, 1.0)
    assert [e.user for e in rig.delivered] == ["alice"] * 3


def test_events_of_unknown_or_finished_jobs_are_counted_and_dropped() -> None:
    """Nothing is stored or delivered for them; the record stays as it was."""
    rig = Rig()
    job = rig.submit()
    assert rig.produce(PROGRESS, progress("no-such-job", 0.5)) == Refused("unknown_job")
    rig.produce(RESULTS, result(job["job_id"]))
    assert rig.produce(PROGRESS, progress(job["job_id"], 0.9)) == Refused("finished_job")
    assert rig.produce(PROGRESS, progress(job["job_id"], 0.9, "failed")) == \
        Refused("finished_job")
    assert rig.router.refused == {"unknown_job": 1, "finished_job": 2}
    assert len(rig.delivered) == 1 and rig.record(job["job_id"])["status"] == "completed"


def test_a_producer_failure_ends_the_job_with_its_reason() -> None:
    rig = Rig()
    job = rig.submit()
    rig.produce(PROGRESS, progress(job["job_id"], 0.25, "failed", error="no data for MSFT"))
    record = rig.record(job["job_id"])
    assert (record["status"], record["error"]) == ("failed", "no data for MSFT")
    assert rig.produce(RESULTS, result(job["job_id"])) == Refused("finished_job")


def test_cancel_tells_the_owner_and_the_producer_once() -> None:
    """
    The owner gets a cancelled progress event, the producer the same cancel
    on tickstock.jobs.cancel and on tickstock.jobs.control; a second cancel
    is a 409, another user's a 404.
    """
    rig = Rig()
    job = rig.submit()
    rig.produce(PROGRESS, progress(job["job_id"], 0.25))
    with pytest.raises(JobRefused) as refused:
        now(rig.jobs.cancel("mallory", job["job_id"]))
    assert (refused.value.status, refused.value.code) == (404, "not_found")
    cancelled = now(rig.jobs.cancel("alice", job["job_id"]))
    assert cancelled["status"] == "cancelled"
    assert rig.record(job["job_id"])["status"] == "cancelled"
    last = rig.delivered[-1]
    assert (last.user, last.data["status"], last.data["progress"]) == ("alice", "cancelled", 0.25)
    control = {"action": "cancel", "job_id": job["job_id"], "user_id": "alice",
               "reason": "cancelled", "timestamp": rig.clock.seconds()}
    assert rig.to_producer[1:] == [(CANCEL_CHANNEL, control), (CONTROL_CHANNEL, control)]
    assert rig.produce(PROGRESS, progress(job["job_id"], 0.5)) == Refused("finished_job")
    with pytest.raises(JobRefused) as refused:
        now(rig.jobs.cancel("alice", job["job_id"]))
    assert (refused.value.status, refused.value.code) == (409, "job_finished")


def test_a_result_that_wins_the_race_with_a_cancel_is_kept() -> None:
    """
    The result is stored but not yet in the record (the persister lags):
    the cancel loses, with a 409, and nobody is told the job was cancelled.
    """
    rig = Rig()
    job = rig.submit()
    rig.router._on_stored = None  # the record lags: nothing is written yet
    rig.produce(RESULTS, result(job["job_id"]))
    with pytest.raises(JobRefused) as refused:
        now(rig.jobs.cancel("alice", job["job_id"]))
    assert refused.value.code == "job_finished"
    assert [e.type for e in rig.delivered] == ["backtest_result"]
    assert [c for c, _ in rig.to_producer] == [JOBS_CHANNEL]


def test_the_per_user_limit_refuses_the_next_job_until_one_ends() -> None:
    rig = Rig(per_user=2)
    first, _ = rig.submit(), rig.submit()
    with pytest.raises(JobRefused) as refused:
        rig.submit()
    assert (refused.value.status, refused.value.code) == (429, "too_many_jobs")
    assert "2" in str(refused.value)
    assert len(rig.to_producer) == 2 and len(now(rig.store.jobs("alice", None, 10))) == 2
    rig.submit("bob")
    rig.produce(RESULTS, result(first["job_id"]))
    rig.submit()


def test_a_silent_job_fails_with_timeout_and_the_owner_is_told() -> None:
    """No progress for `timeout` seconds: failed, timeout; progress resets the wait."""
    rig = Rig(timeout=60)
    rig.jobs.startService()
    try:
        quiet, busy = rig.submit(), rig.submit()
        for _ in range(4):
            rig.clock.advance(20)
            rig.produce(PROGRESS, progress(busy["job_id"], 0.1))
        record = rig.record(quiet["job_id"])
        assert (record["status"], record["error"]) == ("failed", "timeout: no progress for 60 s")
        assert rig.record(busy["job_id"])["status"] == "running"
        told = [e for e in rig.delivered if e.data.get("status") == "failed"]
        assert [(e.user, e.job_id, e.data["error"]) for e in told] == [
            ("alice", quiet["job_id"], "timeout: no progress for 60 s")]
        assert [(c, m["action"]) for c, m in rig.to_producer[-2:]] == [
            (CANCEL_CHANNEL, "cancel"), (CONTROL_CHANNEL, "cancel")]
        assert rig.jobs.timed_out == 1
        rig.clock.advance(120)
        assert rig.record(busy["job_id"])["status"] == "failed" and rig.jobs.timed_out == 2
    finally:
        rig.jobs.stopService()


def test_listing_is_newest_first_paged_and_private() -> None:
    rig = Rig(per_user=10)
    ids = []
    for _ in range(5):
        ids.append(rig.submit()["job_id"])
        rig.clock.advance(1)
    rig.submit("bob")
    page = now(rig.jobs.list("alice", None, 3))
    assert [j["job_id"] for j in page] == ids[::-1][:3]
    rest = now(rig.jobs.list("alice", page[-1]["job_id"], 3))
    assert [j["job_id"] for j in rest] == ids[::-1][3:]
    with pytest.raises(JobRefused) as refused:
        now(rig.jobs.get("bob", ids[0]))
    assert refused.value.status == 404


def test_an_unreachable_producer_fails_the_submission_and_the_job() -> None:
    """The caller gets `unavailable`; the job is recorded failed, not left queued."""

    class DownBus(MemoryBus):
        def publish(self, channel: str, payload: bytes) -> Any:
            if channel == JOBS_CHANNEL:
                from twisted.internet.defer import fail
                return fail(ConnectionError("redis is down"))
            return super().publish(channel, payload)

    rig = Rig()
    rig.bus = DownBus()
    rig.jobs._link = rig.bus
    with pytest.raises(JobRefused) as refused:
        rig.submit()
    assert (refused.value.status, refused.value.code) == (503, "unavailable")
    (job,) = now(rig.store.jobs("alice", None, 10))
    assert (job["status"], job["error"]) == ("failed", "producer unreachable")


def test_a_job_nobody_hears_fails_at_once_with_no_producer() -> None:
    """
    Where an unheard job is lost (pub/sub), a publish that reached nobody
    refuses the submission with C{no_producer} (503), and the job is
    recorded failed with that reason, the owner told, the per-user limit
    not taken; where the bus keeps it (streams), it stays queued.
    """
    rig = Rig(per_user=1, producer=False, unheard_is_lost=True)
    for _ in range(2):  # a failed job does not count against the limit
        with pytest.raises(JobRefused) as refused:
            rig.submit()
        assert (refused.value.status, refused.value.code) == (503, "no_producer")
    assert JOBS_CHANNEL in str(refused.value)
    jobs = now(rig.store.jobs("alice", None, 10))
    assert [(j["status"], j["error"]) for j in jobs] == [("failed", NO_PRODUCER)] * 2
    assert str(refused.value).count(jobs[0]["job_id"]) == 1
    assert [(e.user, e.data["status"], e.data["error"]) for e in rig.delivered] == [
        ("alice", "failed", NO_PRODUCER)] * 2
    assert (rig.jobs.no_producer, rig.jobs.submitted) == (2, 0)
    assert rig.jobs.status()["no_producer"] == 2

    kept = Rig(producer=False, unheard_is_lost=False)
    assert kept.record(kept.submit()["job_id"])["status"] == "queued"
    heard = Rig(unheard_is_lost=True)
    assert heard.record(heard.submit()["job_id"])["status"] == "queued"


class SlowStore(MemoryStore):
    """The memory store, with writes that land only when the test says (a slow PostgreSQL)."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.writes: list[tuple[Deferred[None], list[Any]]] = []

    def write(self, bars: Any, events: Any) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.writes.append((d, list(events)))
        return d

    def land(self) -> None:
        """Apply the oldest pending write and report it done."""
        d, events = self.writes.pop(0)
        super().write([], events)
        d.callback(None)


def test_a_final_event_is_delivered_once_its_record_is_final() -> None:
    """
    The result waits for its record; the owner's later events queue behind
    it, in order; other users' events and progress pass at once; the
    record is final when the result is handed on.
    """
    rig = Rig()
    store = SlowStore(rig.clock)
    rig.jobs._store = store
    rig.router._on_stored = None  # nothing else writes records: only the hold does
    seen: list[tuple[str, str | None, str]] = []

    def deliver(event: Any) -> None:
        record = now(store.job(event.job_id))
        seen.append((event.type, event.data.get("status"), record["status"]))

    hold = rig.jobs.record_first(store, deliver)
    rig.history.listen(hold)
    first, second, bobs = rig.submit(), rig.submit(), rig.submit("bob")
    rig.produce(PROGRESS, progress(first["job_id"], 0.5))
    rig.produce(RESULTS, result(first["job_id"]))
    rig.produce(PROGRESS, progress(second["job_id"], 0.5))
    rig.produce(PROGRESS, progress(bobs["job_id"], 0.5))
    assert seen == [("backtest_progress", "processing", "queued"),
                    ("backtest_progress", "processing", "queued")]  # alice's, then bob's
    assert len(store.writes) == 1
    store.land()
    assert seen[2:] == [("backtest_result", "completed", "completed"),
                        ("backtest_progress", "processing", "queued")]
    assert hold.late == 0 and hold._queues == {}


def test_a_store_that_does_not_answer_delays_a_result_by_at_most_the_wait() -> None:
    """
    The write does not land within RECORD_WAIT: the result is delivered
    then anyway, counted late; the write landing later changes nothing.
    A store that fails at once holds nothing.
    """
    rig = Rig()
    store = SlowStore(rig.clock)
    rig.jobs._store = store
    delivered: list[Any] = []
    hold = rig.jobs.record_first(store, delivered.append)
    rig.history.listen(hold)
    job = rig.submit()
    rig.produce(RESULTS, result(job["job_id"]))
    rig.clock.advance(RECORD_WAIT - 0.01)
    assert delivered == []
    rig.clock.advance(0.01)
    assert [e.type for e in delivered] == ["backtest_result"]
    assert hold.late == 1 and rig.jobs.status()["records_late"] == 1
    store.land()
    assert len(delivered) == 1 and hold._queues == {}

    class DownStore(MemoryStore):
        def write(self, bars: Any, events: Any) -> Deferred[None]:
            from twisted.internet.defer import fail
            return fail(ConnectionError("PostgreSQL is down"))

    down = Rig()
    told: list[Any] = []
    down.history.listen(down.jobs.record_first(DownStore(down.clock), told.append))
    down.produce(RESULTS, result(down.submit()["job_id"]))
    assert [e.type for e in told] == ["backtest_result"]


# ---------------------------------------------------------------- end to end


class Producer:
    """The producer's side, over the test's Redis: receives jobs and cancels, publishes events."""

    def __init__(self, redis: RedisServer) -> None:
        from tickstock.config import parse_redis_url
        from tickstock.ingest.pubsub import RedisPubSubSource

        self.redis = redis
        self.jobs: list[dict[str, Any]] = []
        self.controls: list[dict[str, Any]] = []
        self.cancels: list[dict[str, Any]] = []
        received = {JOBS_CHANNEL: self.jobs, CONTROL_CHANNEL: self.controls,
                    CANCEL_CHANNEL: self.cancels}
        self.source = RedisPubSubSource(reactor, parse_redis_url(redis.url),
                                        channels=list(received))
        self.source.listen(lambda channel, raw, key: received[channel].append(orjson.loads(raw)))

    async def start(self) -> None:
        self.source.startService()
        await eventually(lambda: self.source.ready, 5, "producer subscribed")

    def publish(self, channel: str, raw: bytes) -> None:
        self.redis.command("PUBLISH", channel, raw)


@pytest.fixture
def producer(redis_server: RedisServer) -> Any:
    p = Producer(redis_server)
    yield p
    pytest_twisted.blockon(p.source.stopService())


@pytest.fixture
def job_listener(redis_server: RedisServer) -> Any:
    """
    A producer that listens for jobs and does nothing else, for tests that
    play the producer's events by hand: in pub/sub mode a job nobody hears
    is refused (C{no_producer}). Subscribed before the test starts.
    """
    with socket.create_connection(("127.0.0.1", redis_server.port), timeout=10) as sock:
        sock.sendall(b"*2\r\n$9\r\nSUBSCRIBE\r\n$%d\r\n%s\r\n"
                     % (len(JOBS_CHANNEL), JOBS_CHANNEL.encode()))
        confirmed = b""
        while not confirmed.endswith(b":1\r\n"):
            chunk = sock.recv(4096)
            assert chunk, "redis closed the connection"
            confirmed += chunk
        yield sock


def token(daemon: Any, user: str) -> str:
    return daemon.hello(user)["token"]


async def started(daemons: Any, redis: RedisServer, postgres: str, producer: Producer,
                  **options: Any) -> Any:
    daemon = daemons(redis=redis.url, postgres=postgres, **options)
    await eventually(lambda: daemon.service.readiness()[0], 15, "ready")
    await producer.start()
    return daemon


async def watcher(daemon: Any, user: str) -> Any:
    client = await connect(daemon.port, hello=daemon.hello(user))
    await client.request({"op": "subscribe", "id": "bt", "topic": "backtests"}, "subscribed")
    return client


def steps(client: Any) -> list[Any]:
    return [e["data"].get("progress") if e["type"] == "backtest_progress" else "result"
            for e in client.events("bt")]


@pytest_twisted.ensureDeferred
async def test_backtest_workflow_reaches_the_owner_only(redis_server, postgres, daemons,
                                                        producer):
    """
    The seeds' workflow: submit, progress 0.25, 0.5, 1.0, result; received
    in order by both of the owner's connections and by nobody else; the
    record (REST) follows to completed; late and stray events are dropped.
    """
    daemon = await started(daemons, redis_server, postgres, producer)
    tab1, tab2, other = (await watcher(daemon, "alice"), await watcher(daemon, "alice"),
                         await watcher(daemon, "bob"))
    accepted = await tab1.request({"op": "submit_backtest", "id": "r1", "params": {
        **PARAMS, "parameters": PARAMETERS}}, "job_accepted")
    assert accepted["op"] == "job_accepted" and accepted["status"] == "queued", accepted
    job_id = accepted["job_id"]
    await eventually(lambda: producer.jobs, 5, "the job reached the producer")
    assert producer.jobs[0]["job_id"] == job_id and producer.jobs[0]["user_id"] == "alice"
    assert (producer.jobs[0]["type"], producer.jobs[0]["source"]) == ("backtest_job", "tickstock")
    assert producer.jobs[0]["parameters"] == PARAMETERS

    for value, status in ((0.25, "processing"), (0.5, "processing"), (1.0, "completed")):
        producer.publish(PROGRESS, progress(job_id, value, status))
    producer.publish(RESULTS, result(job_id))
    for tab in (tab1, tab2):
        await eventually(lambda tab=tab: len(tab.events("bt")) == 4, 5, "all four steps")
        assert steps(tab) == [0.25, 0.5, 1.0, "result"]
    assert tab1.events("bt")[-1]["data"]["results"] == RESULT

    producer.publish(PROGRESS, progress(job_id, 0.3))
    producer.publish(PROGRESS, progress("not-a-job", 0.3))
    refused = daemon.service.router.refused
    await eventually(lambda: refused == {"finished_job": 1, "unknown_job": 1}, 5, "dropped")
    alice, bob = token(daemon, "alice"), token(daemon, "bob")

    async def record() -> Any:
        return (await http_request(daemon.port, b"GET", f"/api/jobs/{job_id}", alice))[1]

    status, body, _ = await http_request(daemon.port, b"GET", f"/api/jobs/{job_id}", alice)
    assert status == 200
    deadline = reactor.seconds() + 10
    while body["status"] != "completed" and reactor.seconds() < deadline:
        body = await record()
    assert (body["status"], body["results"], body["progress"]) == ("completed", RESULT, 1.0)
    assert body["params"] == {**PARAMS, "parameters": PARAMETERS}
    assert (await http_request(daemon.port, b"GET", f"/api/jobs/{job_id}", bob))[0] == 404
    listed = (await http_request(daemon.port, b"GET", "/api/jobs", alice))[1]
    assert [j["job_id"] for j in listed["jobs"]] == [job_id]
    assert (await http_request(daemon.port, b"GET", "/api/jobs", bob))[1]["jobs"] == []
    assert other.events("bt") == [] and steps(tab1) == [0.25, 0.5, 1.0, "result"]


@pytest_twisted.ensureDeferred
async def test_an_owner_back_after_a_disconnect_gets_what_was_missed(
        redis_server, postgres, daemons, producer):
    """Closed mid-job, back on a new connection: the newest progress, then the result."""
    daemon = await started(daemons, redis_server, postgres, producer)
    tab = await watcher(daemon, "alice")
    job_id = (await tab.request({"op": "submit_backtest", "id": "r", "params": PARAMS},
                                "job_accepted"))["job_id"]
    producer.publish(PROGRESS, progress(job_id, 0.25))
    await eventually(lambda: steps(tab) == [0.25], 5, "first step")
    tab.sendClose()
    await tab.closed
    producer.publish(PROGRESS, progress(job_id, 0.5))
    producer.publish(PROGRESS, progress(job_id, 1.0, "completed"))
    producer.publish(RESULTS, result(job_id))
    await eventually(lambda: daemon.service.router.routed >= 4, 5, "stored while away")
    back = await watcher(daemon, "alice")
    await eventually(lambda: steps(back)[-1:] == ["result"], 5, "the result on return")
    assert steps(back) == [1.0, "result"]


@pytest_twisted.ensureDeferred
async def test_cancel_over_rest_and_websocket(redis_server, postgres, daemons, producer):
    """
    DELETE /api/jobs/{id} and cancel_job: the owner is told, the producer
    gets the cancel on tickstock.jobs.cancel and tickstock.jobs.control, the
    record says cancelled, later progress is dropped, and a second cancel is
    a 409.
    """
    daemon = await started(daemons, redis_server, postgres, producer)
    alice = token(daemon, "alice")
    tab = await watcher(daemon, "alice")
    status, job, headers = await http_request(daemon.port, b"POST", "/api/jobs", alice, PARAMS)
    assert status == 202 and job["status"] == "queued", job
    assert headers.getRawHeaders(b"location") == [f"/api/jobs/{job['job_id']}".encode()]
    producer.publish(PROGRESS, progress(job["job_id"], 0.25))
    await eventually(lambda: steps(tab) == [0.25], 5, "first step")
    bob = token(daemon, "bob")
    assert (await http_request(daemon.port, b"DELETE", f"/api/jobs/{job['job_id']}", bob)
            )[0] == 404
    status, body, _ = await http_request(daemon.port, b"DELETE", f"/api/jobs/{job['job_id']}",
                                         alice)
    assert status == 200 and body["status"] == "cancelled", body
    await eventually(lambda: producer.controls and producer.cancels, 5,
                     "the cancel reached the producer")
    assert producer.controls[0]["action"] == "cancel"
    assert producer.controls[0]["job_id"] == job["job_id"]
    assert producer.cancels == producer.controls
    await eventually(lambda: len(tab.events("bt")) == 2, 5, "the owner told")
    assert tab.events("bt")[-1]["data"]["status"] == "cancelled"
    producer.publish(PROGRESS, progress(job["job_id"], 0.5))
    await eventually(lambda: daemon.service.router.refused["finished_job"] == 1, 5, "dropped")
    assert (await http_request(daemon.port, b"DELETE", f"/api/jobs/{job['job_id']}", alice)
            )[0] == 409

    second = await tab.request({"op": "submit_backtest", "id": "r2", "params": PARAMS},
                               "job_accepted")
    reply = await tab.request({"op": "cancel_job", "id": "c", "job_id": second["job_id"]},
                              "job_cancelled")
    assert reply == {"op": "job_cancelled", "id": "c", "job_id": second["job_id"]}
    again = await tab.request({"op": "cancel_job", "id": "c2", "job_id": second["job_id"]},
                              "job_cancelled")
    assert again["op"] == "error" and again["code"] == "job_finished"
    deadline = reactor.seconds() + 10
    while reactor.seconds() < deadline:
        listed = (await http_request(daemon.port, b"GET", "/api/jobs", alice))[1]["jobs"]
        if [j["status"] for j in listed] == ["cancelled", "cancelled"]:
            break
    assert [j["job_id"] for j in listed] == [second["job_id"], job["job_id"]]
    assert [j["status"] for j in listed] == ["cancelled", "cancelled"]


@pytest_twisted.ensureDeferred
async def test_invalid_submissions_and_the_per_user_limit(redis_server, postgres, daemons,
                                                          producer):
    """
    Every kind of bad submission gets its field-by-field error over both
    paths and sends nothing; the N+1th running job is refused; others are not.
    """
    daemon = await started(daemons, redis_server, postgres, producer, jobs_per_user=2)
    alice = token(daemon, "alice")
    tab = await connect(daemon.port, hello=daemon.hello("alice"))
    bad = {"symbols": ["AAPL", "AAPL"], "start_date": "2010-01-01", "end_date": "2024-01-01",
           "patterns": ["Nope"], "speed": "fast",
           "parameters": {"commission_rate": 1.5, "initial_capital": 1000, "leverage": 3}}
    reply = await tab.request({"op": "submit_backtest", "id": "b", "params": bad}, "job_accepted")
    assert reply["code"] == "bad_params"
    assert set(reply["fields"]) == {"symbols", "end_date", "patterns", "speed",
                                    "parameters.commission_rate", "parameters.leverage"}
    status, body, _ = await http_request(daemon.port, b"POST", "/api/jobs", alice, bad)
    assert status == 400 and body["error"]["fields"] == reply["fields"]
    assert (await http_request(daemon.port, b"POST", "/api/jobs", alice, b"{oops"))[0] == 400
    assert (await http_request(daemon.port, b"POST", "/api/jobs", alice, PARAMS,
                               content_type=b"text/plain"))[0] == 415
    assert (await http_request(daemon.port, b"POST", "/api/jobs", None, PARAMS))[0] == 401

    for n in range(2):
        ok = await tab.request({"op": "submit_backtest", "id": f"ok{n}", "params": PARAMS},
                               "job_accepted")
        assert ok["op"] == "job_accepted"
    refused = await tab.request({"op": "submit_backtest", "id": "x", "params": PARAMS},
                                "job_accepted")
    assert refused["code"] == "too_many_jobs"
    status, body, _ = await http_request(daemon.port, b"POST", "/api/jobs", alice, PARAMS)
    assert status == 429 and body["error"]["code"] == "too_many_jobs"
    bob = token(daemon, "bob")
    assert (await http_request(daemon.port, b"POST", "/api/jobs", bob, PARAMS))[0] == 202
    await eventually(lambda: len(producer.jobs) == 3, 5, "the accepted jobs only")
    assert int(postgres_count(postgres)) == 3


def postgres_count(dsn: str) -> Any:
    from tests.servers import run_sql

    return run_sql(dsn, "SELECT count(*) FROM jobs")[0][0]


@pytest_twisted.ensureDeferred
async def test_a_silent_producer_fails_the_job(redis_server, postgres, daemons, producer):
    """With --job-timeout 1 and no progress, the owner hears failed: timeout within seconds."""
    daemon = await started(daemons, redis_server, postgres, producer, job_timeout=1)
    tab = await watcher(daemon, "alice")
    job_id = (await tab.request({"op": "submit_backtest", "id": "r", "params": PARAMS},
                                "job_accepted"))["job_id"]
    await eventually(lambda: tab.events("bt"), 10, "the timeout")
    (event,) = tab.events("bt")
    assert event["data"]["job_id"] == job_id and event["data"]["status"] == "failed"
    assert event["data"]["error"].startswith("timeout")
    await eventually(lambda: producer.controls, 5, "the producer told to stop")


@pytest_twisted.ensureDeferred
async def test_streams_mode_acknowledges_dropped_job_events(redis_server, daemons):
    """
    In streams mode an event of an unknown or finished job is acknowledged
    as handled: dropped once, never read again. A job's events before its
    result are stored and acknowledged as usual.
    """
    daemon = daemons(redis=redis_server.url, mode="streams")
    await eventually(lambda: daemon.service.readiness()[0], 10, "ready")
    tab = await watcher(daemon, "alice")
    job_id = (await tab.request({"op": "submit_backtest", "id": "r", "params": PARAMS},
                                "job_accepted"))["job_id"]
    for channel, raw in ((PROGRESS, progress("stray", 0.5)), (PROGRESS, progress(job_id, 0.5))):
        redis_server.command("XADD", channel, "*", "data", raw)
    await eventually(lambda: steps(tab) == [0.5], 5, "the job's progress")
    # Separate streams have no order between them: the result goes in once
    # the progress is through, and the late progress once the result is.
    redis_server.command("XADD", RESULTS, "*", "data", result(job_id))
    await eventually(lambda: steps(tab) == [0.5, "result"], 5, "the job's result")
    redis_server.command("XADD", PROGRESS, "*", "data", progress(job_id, 0.7))
    await eventually(lambda: daemon.service.router.refused == {
        "unknown_job": 1, "finished_job": 1}, 10, "both dropped")
    # Acknowledged once what they became is durable (the job records).
    for channel in (PROGRESS, RESULTS):
        await eventually(lambda channel=channel: redis_server.command(
            "XPENDING", channel, "tickstock").startswith(b"*4\r\n:0\r\n"), 5,
            f"{channel} acknowledged")


@pytest_twisted.ensureDeferred
async def test_the_embedded_demo_runs_jobs_on_its_simulator(daemons):
    """
    With no outside service, the built-in producer answers a job submitted
    over REST with its progress steps and a real backtest of its synthetic
    bars, and honours a cancel.
    """
    from tickstock.sim.producer import Backtester

    daemon = daemons()
    tab = await watcher(daemon, "alice")
    status, job, _ = await http_request(daemon.port, b"POST", "/api/jobs", "alice", PARAMS)
    assert status == 202, job
    await eventually(lambda: steps(tab)[-1:] == ["result"], 10, "the simulator's result")
    assert steps(tab) == [0.25, 0.5, 0.75, 1.0, "result"]
    expected = Backtester().run(PARAMS)
    assert tab.events("bt")[-1]["data"]["results"] == expected
    deadline = reactor.seconds() + 10
    while reactor.seconds() < deadline:
        body = (await http_request(daemon.port, b"GET", f"/api/jobs/{job['job_id']}", "alice"))[1]
        if body["status"] == "completed":
            break
    assert body["status"] == "completed" and body["results"] == expected
    assert (await http_request(daemon.port, b"GET", f"/api/jobs/{job['job_id']}", "bob"))[0] == 404

    status, second, _ = await http_request(daemon.port, b"POST", "/api/jobs", "alice", PARAMS)
    status, body, _ = await http_request(daemon.port, b"DELETE",
                                         f"/api/jobs/{second['job_id']}", "alice")
    assert status == 200 and body["status"] == "cancelled"
    # The simulator stops and reports its own cancel, which comes too late to count.
    await eventually(lambda: daemon.service.router.refused["finished_job"] == 1, 5,
                     "the simulator's cancel dropped")
    mine = [e for e in tab.events("bt") if e["data"]["job_id"] == second["job_id"]]
    assert [e["data"]["status"] for e in mine][-1] == "cancelled"
    assert mine[-1]["data"]["source"] == "tickstock"
    assert all(e["data"]["status"] == "running" for e in mine[:-1])


@pytest_twisted.ensureDeferred
async def test_a_job_submitted_while_no_producer_listens_is_refused(
        redis_server, postgres, daemons, producer, monkeypatch):
    """
    Pub/sub, before the producer subscribes: C{submit_backtest} and
    C{POST /api/jobs} get C{no_producer} at once, and the jobs read back
    failed with that reason (the owner told too); once the producer
    listens, a job is accepted and reaches it.
    """
    # Batched writes that never come during the test: only the refusal writes the
    # record, and is given all the time it takes (no timing here).
    monkeypatch.setattr(jobs_module, "RECORD_WAIT", 30.0)
    daemon = daemons(redis=redis_server.url, postgres=postgres, flush_interval=30)
    await eventually(lambda: daemon.service.readiness()[0], 15, "ready")
    tab = await watcher(daemon, "alice")
    alice = token(daemon, "alice")
    reply = await tab.request({"op": "submit_backtest", "id": "r", "params": PARAMS},
                              "job_accepted")
    assert (reply["op"], reply["code"]) == ("error", "no_producer"), reply
    answer = await api_request(daemon.port, "POST", "/api/jobs", orjson.dumps(PARAMS),
                               {b"authorization": [f"Bearer {alice}".encode()]})
    check("/api/jobs", 503, answer, "POST")  # as documented, Retry-After included
    body = answer.body
    assert body["error"]["code"] == "no_producer", body
    listed = (await http_request(daemon.port, b"GET", "/api/jobs", alice))[1]["jobs"]
    assert [(j["status"], j["error"]) for j in listed] == [("failed", NO_PRODUCER)] * 2
    assert listed[1]["job_id"] in reply["message"] and listed[0]["job_id"] in \
        body["error"]["message"]
    await eventually(lambda: len(tab.events("bt")) == 2, 5, "the owner told")
    assert {e["data"]["error"] for e in tab.events("bt")} == {NO_PRODUCER}
    assert daemon.service.jobs.status()["no_producer"] == 2

    await producer.start()
    accepted = await tab.request({"op": "submit_backtest", "id": "r2", "params": PARAMS},
                                 "job_accepted")
    assert accepted["op"] == "job_accepted", accepted
    await eventually(lambda: [j["job_id"] for j in producer.jobs] == [accepted["job_id"]], 5,
                     "the job at the producer")


@pytest_twisted.ensureDeferred
async def test_streams_mode_keeps_a_job_nobody_listens_for_yet(redis_server, daemons):
    """In streams mode the job waits in its stream for the producer: accepted, queued."""
    daemon = daemons(redis=redis_server.url, mode="streams")
    await eventually(lambda: daemon.service.readiness()[0], 15, "ready")
    tab = await watcher(daemon, "alice")
    accepted = await tab.request({"op": "submit_backtest", "id": "r", "params": PARAMS},
                                 "job_accepted")
    assert (accepted["op"], accepted["status"]) == ("job_accepted", "queued"), accepted
    kept = redis_server.command("XRANGE", JOBS_CHANNEL, "-", "+")
    assert accepted["job_id"].encode() in kept


@pytest.mark.parametrize("kind", ["postgres", "embedded"])
@pytest_twisted.ensureDeferred
async def test_the_record_is_final_when_the_owner_hears_the_end(
        kind, request, redis_server, daemons, producer, monkeypatch):
    """
    Read-your-writes: a client that receives C{backtest_result} and at once
    GETs the job reads it completed, with its results; one that is answered
    a cancel reads it cancelled. With PostgreSQL and with the embedded
    store; batched writes are held off for the whole test, so only the
    writes made before answering can make the records final (given all the
    time they take: no timing here).
    """
    monkeypatch.setattr(jobs_module, "RECORD_WAIT", 30.0)
    dsn = request.getfixturevalue("postgres") if kind == "postgres" else None
    daemon = await started(daemons, redis_server, dsn, producer, flush_interval=30)
    tab = await watcher(daemon, "alice")
    alice = token(daemon, "alice")

    async def record(job_id: str) -> Any:
        return (await http_request(daemon.port, b"GET", f"/api/jobs/{job_id}", alice))[1]

    job_id = (await tab.request({"op": "submit_backtest", "id": "r", "params": PARAMS},
                                "job_accepted"))["job_id"]
    producer.publish(PROGRESS, progress(job_id, 0.5))
    producer.publish(RESULTS, result(job_id))
    await eventually(lambda: steps(tab)[-1:] == ["result"], 5, "the result")
    body = await record(job_id)
    assert (body["status"], body["results"], body["progress"]) == ("completed", RESULT, 1.0)

    second = (await tab.request({"op": "submit_backtest", "id": "r2", "params": PARAMS},
                                "job_accepted"))["job_id"]
    status, _, _ = await http_request(daemon.port, b"DELETE", f"/api/jobs/{second}", alice)
    assert status == 200
    assert (await record(second))["status"] == "cancelled"
    third = (await tab.request({"op": "submit_backtest", "id": "r3", "params": PARAMS},
                               "job_accepted"))["job_id"]
    reply = await tab.request({"op": "cancel_job", "id": "c", "job_id": third}, "job_cancelled")
    assert reply["op"] == "job_cancelled"
    assert (await record(third))["status"] == "cancelled"
    assert daemon.service.jobs.status()["records_late"] == 0
