"""
Backtest jobs: submitted by a user (WebSocket C{submit_backtest} or
C{POST /api/jobs}), recorded in the store, run by the producer, and followed
to their end through the producer's progress and result events.

A job's state has one authority per concern:
 - the history decides, atomically with storing each event, whether an
   event may still be delivered: a job's events pass only while the job is
   known and not final, and the first final event (a result, or progress
   with status C{failed} or C{cancelled}) closes it, on every node at once;
 - the store keeps the record users list and read, updated from the
   events the history stored, through the persister (batched, and kept
   through a store outage). A final event is written at once as well,
   before live delivery hands it on (L{RecordFirst}): whoever receives a
   job's result reads a final record.

TickStock's own decisions (a cancel, a timeout, an unreachable producer, no
producer listening) are progress events it appends itself, so they take the
same path as the producer's: the owner's connections get them live or on
reconnect, the record follows, and a race with the producer's result has one
winner.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from datetime import date
from typing import Any

import orjson
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tickstock.domain.errors import BadRequest
from tickstock.domain.events import SYMBOL, Event, shown
from tickstock.domain.interfaces import IHistory, IJobStore, IProducerLink, IReporting, IStore
from tickstock.domain.jobs import FINAL, JOB_PATTERNS, outcome
from tickstock.domain.stored import Refused
from tickstock.domain.topics import CANCEL_CHANNEL, CONTROL_CHANNEL, JOBS_CHANNEL

PROGRESS_CHANNEL = "tickstock.events.backtesting.progress"
MAX_SYMBOLS = 50
MAX_YEARS = 10
PARAMS = ("symbols", "start_date", "end_date", "patterns", "parameters")
PARAMETERS: Mapping[str, tuple[float, bool, float]] = {
    "initial_capital": (0, False, 1e12),
    "commission_rate": (0, True, 1),
    "slippage_rate": (0, True, 1),
    "max_position_size": (0, False, 1),
    "stop_loss_pct": (0, False, 1),
    "take_profit_pct": (0, False, 10),
}
"""The producer's backtest parameters (C{params.parameters}), each optional:
C{(lowest, whether the lowest itself is allowed, highest)}. Rates, the
position size (of the capital) and the percentages are fractions: 0.05 is
5 %. One not given is not sent: the producer applies its own default."""
SWEEP_BATCH = 100
RECORD_WAIT = 1.0
"""Seconds a job's final event waits for its record to be written before it
is delivered anyway (the store is down or slow; the persister writes the
record later)."""
NO_PRODUCER = f"no_producer: no producer was listening on {JOBS_CHANNEL}"


class JobRefused(BadRequest):
    """
    A job request that is refused: C{code} and message for the client,
    C{status} for REST, and for invalid parameters one message per field.
    """

    def __init__(self, status: int, code: str, message: str,
                 fields: Mapping[str, str] | None = None) -> None:
        super().__init__(code, message)
        self.status = status
        self.fields = dict(fields or {})


def parse_params(params: Any, known_patterns: Iterable[str]) -> dict[str, Any]:
    """
    Check backtest parameters, all of them, so that a client learns every
    problem at once.

    @raise JobRefused: C{bad_params}, with one message per wrong field.
    """
    if not isinstance(params, dict):
        raise JobRefused(400, "bad_params", "params must be an object",
                         {"params": "must be an object"})
    errors: dict[str, str] = {}
    for name in params:
        if name not in PARAMS:
            errors[str(name)[:64]] = "unknown field"
    symbols = params.get("symbols")
    if not isinstance(symbols, list) or not 1 <= len(symbols) <= MAX_SYMBOLS:
        errors["symbols"] = f"must be a list of 1-{MAX_SYMBOLS} symbols"
    else:
        bad = [s for s in symbols if not (isinstance(s, str) and SYMBOL.match(s))]
        seen: set[str] = set()
        twice = []
        for s in symbols:
            if isinstance(s, str):
                if s in seen:
                    twice.append(s)
                seen.add(s)
        if bad:
            errors["symbols"] = (f"not a symbol (1-10 characters of A-Z, 0-9, '.', '-'): "
                                 f"{shown(bad[0])}")
        elif twice:
            errors["symbols"] = f"{twice[0]!r} is given more than once"
    dates: dict[str, date] = {}
    for name in ("start_date", "end_date"):
        value = params.get(name)
        if value is None:
            errors[name] = "required (YYYY-MM-DD)"
            continue
        try:
            if not (isinstance(value, str) and len(value) == 10 and value[4] == value[7] == "-"):
                raise ValueError(value)
            dates[name] = date.fromisoformat(value)
        except ValueError:
            errors[name] = f"must be a date as YYYY-MM-DD, not {shown(value)}"
    if len(dates) == 2:
        start, end = dates["start_date"], dates["end_date"]
        if start > end:
            errors["end_date"] = "must not be before start_date"
        elif end > _years_after(start, MAX_YEARS):
            errors["end_date"] = f"the range may span at most {MAX_YEARS} years"
    patterns = params.get("patterns", [])
    known = frozenset(known_patterns)
    if not isinstance(patterns, list) or len(patterns) > len(known):
        errors["patterns"] = f"must be a list of at most {len(known)} pattern names"
    else:
        unknown = [p for p in patterns if not isinstance(p, str) or p not in known]
        if unknown:
            errors["patterns"] = (f"unknown pattern {shown(unknown[0])}; known: "
                                  + ", ".join(sorted(known)))
        elif len(set(patterns)) != len(patterns):
            errors["patterns"] = "a pattern is given more than once"
    parameters = params.get("parameters", {})
    if not isinstance(parameters, dict):
        errors["parameters"] = "must be an object"
    else:
        errors.update(_parameter_errors(parameters))
    if errors:
        raise JobRefused(400, "bad_params", "; ".join(f"{k}: {v}" for k, v in errors.items()),
                         errors)
    return {"symbols": symbols, "start_date": params["start_date"],
            "end_date": params["end_date"], "patterns": patterns, "parameters": parameters}


def _parameter_errors(parameters: Mapping[str, Any]) -> dict[str, str]:
    """One message per wrong entry of C{params.parameters}, keyed C{parameters.NAME}."""
    errors: dict[str, str] = {}
    for name, value in parameters.items():
        key = f"parameters.{str(name)[:64]}"
        if name not in PARAMETERS:
            errors[key] = "unknown field"
            continue
        low, low_allowed, high = PARAMETERS[name]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and (low <= value if low_allowed else low < value) and value <= high):
            fraction = "" if name == "initial_capital" else " (a fraction: 0.05 is 5 %)"
            errors[key] = (f"must be a number {'>=' if low_allowed else '>'} {low:g} and "
                           f"<= {high:g}{fraction}, not {shown(value)}")
    return errors


def _years_after(day: date, years: int) -> date:
    try:
        return day.replace(year=day.year + years)
    except ValueError:  # 29 February
        return day.replace(year=day.year + years, day=28)


NOT_FOUND = "no job with this id"


@implementer(IReporting)
class Jobs(Service):
    """
    Submits, reads and cancels jobs for their owners, and fails jobs whose
    producer went silent. Used by the WebSocket gateway and the REST API
    alike, so both behave the same.

    @ivar submitted: jobs accepted.
    @ivar timed_out: jobs this node failed for silence.
    @ivar control_failures: cancel messages that could not be published.
    """

    _log = Logger()

    def __init__(
        self, clock: IReactorTime, store: IJobStore, history: IHistory, link: IProducerLink,
        receive: Callable[[str, bytes], Deferred[Any]], per_user: int, timeout: float,
        patterns: Iterable[str] = JOB_PATTERNS, unheard_is_lost: bool = False,
    ) -> None:
        """
        @param receive: how TickStock's own progress events enter, as the
            producer's do (L{tickstock.ingest.router.Router.receive}).
        @param per_user: the most jobs one user may have queued or running.
        @param timeout: seconds without progress after which a job fails.
        @param unheard_is_lost: a job the link hands to no receiver is lost
            (Redis pub/sub, the embedded bus): it is failed and refused
            with C{no_producer} rather than left queued until the timeout.
            Not so where the link also keeps it for a reader to come (a
            stream, in streams mode).
        """
        self._clock = clock
        self._store = store
        self._history = history
        self._link = link
        self._receive = receive
        self.per_user = per_user
        self.timeout = timeout
        self.patterns = tuple(patterns)
        self._unheard_is_lost = unheard_is_lost
        self._loop: LoopingCall | None = None
        self._sweeping = False
        self._records: RecordFirst | None = None
        self.submitted = 0
        self.timed_out = 0
        self.control_failures = 0
        self.no_producer = 0

    def status(self) -> dict[str, Any]:
        """Counters for C{/health}; JSON-able."""
        stats = {"submitted": self.submitted, "timed_out": self.timed_out,
                 "control_failures": self.control_failures, "no_producer": self.no_producer}
        if self._records is not None:
            stats["records_late"] = self._records.late
        return stats

    def record_first(self, store: IStore, deliver: Callable[[Event], None]) -> RecordFirst:
        """C{deliver}, handed a job's final event only once its record is final (L{RecordFirst})."""
        self._records = RecordFirst(self._clock, store, deliver)
        return self._records

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._loop = LoopingCall(self.sweep)
        self._loop.clock = self._clock
        self._loop.start(max(0.05, min(self.timeout / 4, 30.0)), now=False)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    async def submit(self, user: str, params: Any) -> dict[str, Any]:
        """
        Validate, record as C{queued}, and send to the producer.

        @return: the job's record.
        @raise JobRefused: C{bad_params} (400), C{too_many_jobs} (429),
            C{unavailable} (503), C{no_producer} (503: nobody received the
            job; it is recorded as failed with that reason).
        """
        params = parse_params(params, self.patterns)
        job_id, now = str(uuid.uuid4()), self._clock.seconds()
        record = {"job_id": job_id, "user_id": user, "status": "queued", "params": params,
                  "progress": 0.0, "results": None, "error": None,
                  "created_at": now, "updated_at": now}
        try:
            created = await self._store.create_job(record, self.per_user)
        except Exception as error:
            raise _unavailable("the job store", error) from None
        if not created:
            raise JobRefused(429, "too_many_jobs",
                             f"at most {self.per_user} jobs may be queued or running at once; "
                             "wait for one to finish or cancel one")
        try:
            # The history must know the job before the producer can answer.
            await self._history.own(job_id, user)
            receivers = await self._link.publish(JOBS_CHANNEL, orjson.dumps(
                {"job_type": "backtest", "type": "backtest_job", "job_id": job_id,
                 "user_id": user, **params, "source": "tickstock", "timestamp": now}))
        except Exception as error:
            await self._fail_unsent(record, "producer unreachable")
            raise _unavailable("the producer", error) from None
        if receivers == 0 and self._unheard_is_lost:
            # PUBLISH reached nobody: the job is gone, and nobody will answer.
            self.no_producer += 1
            await self._fail_unsent(record, NO_PRODUCER)
            raise JobRefused(503, "no_producer",
                             f"no producer is listening for backtest jobs (on {JOBS_CHANNEL}); "
                             f"job {job_id} is recorded as failed; try again once it runs")
        self.submitted += 1
        return record

    async def _fail_unsent(self, record: Mapping[str, Any], reason: str) -> None:
        """Fail a job that never reached the producer, so that it is not left queued."""
        try:
            await self._close(record, "failed", reason, tell_producer=False)
        except Exception as failure:
            self._log.warn("could not mark job {job_id} failed: {e}", job_id=record["job_id"],
                           e=failure)

    async def get(self, user: str, job_id: str) -> dict[str, Any]:
        """
        The record of C{user}'s job C{job_id}.

        @raise JobRefused: C{not_found} (404) also for another user's job,
            so that ids cannot be probed.
        """
        try:
            job = await self._store.job(job_id)
        except Exception as error:
            raise _unavailable("the job store", error) from None
        if job is None or job["user_id"] != user:
            raise JobRefused(404, "not_found", NOT_FOUND)
        return job

    async def list(self, user: str, before: str | None, limit: int) -> list[dict[str, Any]]:
        """C{user}'s jobs, newest first, after the cursor job C{before}."""
        try:
            return await self._store.jobs(user, before, limit)
        except Exception as error:
            raise _unavailable("the job store", error) from None

    async def cancel(self, user: str, job_id: str) -> dict[str, Any]:
        """
        Cancel C{user}'s queued or running job: its owner is told with a
        C{cancelled} progress event, and the producer on
        C{tickstock.jobs.cancel} and C{tickstock.jobs.control}.

        @raise JobRefused: C{not_found} (404), C{job_finished} (409).
        """
        job = await self.get(user, job_id)
        if job["status"] in FINAL:
            raise JobRefused(409, "job_finished", f"the job is already {job['status']}")
        try:
            closed = await self._close(job, "cancelled", None)
        except Exception as error:
            raise _unavailable("the history", error) from None
        if closed == "finished":
            raise JobRefused(409, "job_finished", "the job has already finished")
        if closed == "duplicate":
            raise JobRefused(409, "job_finished", "the job is already cancelled")
        return {**job, "status": "cancelled", "updated_at": self._clock.seconds()}

    async def _close(self, job: Mapping[str, Any], status: str, error: str | None,
                     tell_producer: bool = True) -> str:
        """
        End C{job} with a progress event of C{status} from TickStock, and
        tell the producer to stop working on it.

        @return: C{"closed"}; C{"duplicate"} if another node just did the
            same; C{"finished"} if the job had already ended.
        """
        job_id, now = job["job_id"], self._clock.seconds()
        data: dict[str, Any] = {
            "event_type": "backtest_progress", "job_id": job_id, "user_id": job["user_id"],
            "progress": job.get("progress") or 0.0, "status": status, "timestamp": now,
            "source": "tickstock", "event_id": f"tickstock-{status}-{job_id}"}
        if error is not None:
            data["error"] = error
        result = await self._receive(PROGRESS_CHANNEL, orjson.dumps(data))
        if isinstance(result, Refused):
            if result.reason != "unknown_job":
                return "finished"
            # The history forgot the job (its record outlived Redis's
            # state): no event of it can reach anyone; close the record.
            await self._store.close_job(job_id, status, error, now)
        if result is None:
            return "duplicate"
        if not isinstance(result, Refused):
            # Read-your-writes for whoever is answered next (a cancel, a
            # refused submit): the record is final first. The persister
            # writes it as well, and does when this does not get through.
            written = await within(self._clock, maybeDeferred(
                self._store.close_job, job_id, status, error, now), RECORD_WAIT)
            if not written:
                self._log.warn("the record of job {job_id} is not {status} yet (the store "
                               "did not take it); it follows with the batched writes",
                               job_id=job_id, status=status)
        if tell_producer:
            # Upstream reads cancels on their own channel; older producers on control.
            control = orjson.dumps({"action": "cancel", "job_id": job_id,
                                    "user_id": job["user_id"], "reason": error or status,
                                    "timestamp": now})
            for channel in (CANCEL_CHANNEL, CONTROL_CHANNEL):
                try:
                    await self._link.publish(channel, control)
                except Exception as failure:
                    self.control_failures += 1
                    self._log.warn("could not tell the producer on {channel} to stop job "
                                   "{job_id}: {e}", channel=channel, job_id=job_id, e=failure)
        return "closed"

    def sweep(self) -> Deferred[None]:
        """Fail the jobs that had no progress for C{timeout} seconds."""
        if self._sweeping:
            return succeed(None)
        self._sweeping = True

        def done(result: Any) -> None:
            self._sweeping = False
            if isinstance(result, Failure):
                self._log.warn("job timeout sweep failed: {e}", e=result.getErrorMessage())

        return Deferred.fromCoroutine(self._sweep()).addBoth(done)

    async def _sweep(self) -> None:
        stale = await self._store.stale_jobs(self._clock.seconds() - self.timeout, SWEEP_BATCH)
        for job in stale:
            closed = await self._close(
                job, "failed", f"timeout: no progress for {self.timeout:g} s")
            if closed == "closed":
                self.timed_out += 1


def _unavailable(what: str, error: BaseException) -> JobRefused:
    return JobRefused(503, "unavailable", f"{what} cannot be reached ({error}); try again")


def within(clock: IReactorTime, d: Deferred[Any], seconds: float) -> Deferred[bool]:
    """
    Whether C{d} succeeds within C{seconds}. C{d} is not cancelled when it
    takes longer (a store write may still land); its failure is consumed.
    """
    answer: Deferred[bool] = Deferred()

    def settle(ok: bool) -> None:
        if not answer.called:
            if timer.active():
                timer.cancel()
            answer.callback(ok)

    timer = clock.callLater(seconds, settle, False)
    d.addCallbacks(lambda _: settle(True), lambda _: settle(False))
    return answer


class RecordFirst:
    """
    Live delivery with read-your-writes for job records: a job's final event
    (its result, or progress C{failed} or C{cancelled}) is written to the
    store before it is handed on, so that a client that reads
    C{GET /api/jobs/{id}} on receiving it finds the record final. The
    persister writes the same event again with its batch: a final record
    does not change any more, so that is a no-op.

    Only the owner's events wait: later events of that user queue behind
    the final one, in order, and every other event passes at once. A store
    that does not take the write within L{RECORD_WAIT} seconds (down, or
    slow) holds it no longer: the event is delivered, counted in C{late},
    and the record follows with the batched writes.

    @ivar late: final events delivered before their record was written.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, store: IStore, deliver: Callable[[Event], None],
                 wait: float | None = None) -> None:
        """@param wait: seconds to wait for a write (default L{RECORD_WAIT})."""
        self._clock = clock
        self._store = store
        self._deliver = deliver
        self._wait = RECORD_WAIT if wait is None else wait
        self._queues: dict[str, deque[Event]] = {}
        self.late = 0

    def __call__(self, event: Event) -> None:
        user = event.user
        if user is None:
            self._deliver(event)
            return
        queue = self._queues.get(user)
        if queue is not None:
            queue.append(event)
        else:
            self._queues[user] = queue = deque([event])
            self._drain(user, queue)

    def _drain(self, user: str, queue: deque[Event]) -> None:
        """Deliver the user's queued events up to the next final one, which waits."""
        while queue:
            event = queue.popleft()
            if outcome(event) is not None:
                written = within(self._clock, maybeDeferred(self._store.write, [], [event]),
                                 self._wait)
                written.addCallback(self._written, user, queue, event)
                return
            self._hand_on(event)
        del self._queues[user]

    def _written(self, written: bool, user: str, queue: deque[Event], event: Event) -> None:
        if not written:
            self.late += 1
            self._log.warn("delivering the end of job {job_id} before its record is written "
                           "(the store did not take it within {wait:g}s)",
                           job_id=event.job_id, wait=self._wait)
        self._hand_on(event)
        self._drain(user, queue)

    def _hand_on(self, event: Event) -> None:
        # A failure here must not leave the user's queue waiting for ever.
        try:
            self._deliver(event)
        except Exception:
            self._log.failure("delivering {event_id} failed", event_id=event.id)
