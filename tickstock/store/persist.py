"""
Writing tick bars and stored events to the L{IStore}, in batches, without
losing any while the store is down.

Ticks are folded into bar parts in memory (L{tickstock.store.bars}); every flush
interval, one C{store.write} takes everything changed or received since the
last successful one. A write that fails spills all it would have written to
files in the spool folder (fsynced), so what the store has not taken within
a flush interval and a statement timeout is on disk; past C{pending_max}
unwritten bars and events the oldest are spilled too. Spool files are
written back, one per flush, once the store works again, and picked up by
the next run if this one stops first. Parts make all of this safe to
repeat: a part is written whole and replaces its earlier version, and a
spilled aggregate leaves memory, so a later tick of its minute starts a new
part rather than a second version of a spooled one.

What is added belongs to a I{generation}, the take that will write it; once
it is in the store or the spool, L{Persister.when_durable} fires. A stream
source acknowledges an entry only then (see L{tickstock.ingest.streams}).

A stream source also reads again, after a crash, entries that were durable
but not yet acknowledged. So with sealing (streams) each write carries this
node's I{tick marks} (L{ITickMarks}): per symbol, the newest tick id its
parts hold, raised in the same transaction; and a spill puts everything
unwritten in one spool file headed by its marks, whole or not at all. At
start the persister holds ticks back until it has the marks of the store
and the spool. A tick at or below its symbol's mark is in a part already
and is not folded again, and one above it is in none (each symbol's ticks
come in id order, as the history gives ids), so it is counted once however
the ticks read again are batched.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any

import orjson
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tickstock.domain.events import Event, id_key, stored_event
from tickstock.domain.interfaces import IReporting, IStore, ITickMarks
from tickstock.domain.records import Bar
from tickstock.store.bars import BarAggregator

GRACE_MINUTES = 2
"""Clean aggregates this many minutes older than the newest are forgotten."""
SPOOL_FILE_ITEMS = 20_000
"""The most bars and events one spool file holds (and one write-back writes)."""
STOP_TIMEOUT = 5.0
_SPOOL_NAME = re.compile(r"^(\d{12})-[A-Za-z0-9_.-]+\.jsonl\Z")


@implementer(IReporting)
class Persister(Service):
    """
    Batches ticks (as bar parts) and stored events into C{store.write}
    calls, at most one in flight.

    @ivar ticks: ticks accepted.
    @ivar bars_written: bar part versions the store confirmed.
    @ivar events_written: events the store confirmed.
    @ivar write_failures: failed writes (each is retried).
    @ivar spilled: bars and events moved to spool files.
    @ivar last_error: the last write or spool error, or L{None}.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, store: IStore, bars: BarAggregator | str,
                 flush_interval: float, pending_max: int, spool_dir: str,
                 stop_timeout: float = STOP_TIMEOUT, sealing: bool = False) -> None:
        """
        @param bars: the aggregator to use, or the part prefix for a new one
            (unique to this node and run).
        @param pending_max: the most unwritten bars and events kept in memory;
            past it, the oldest are spilled down to half of it.
        @param spool_dir: the folder of spool files, created if missing.
        @param stop_timeout: the longest L{stopService} waits for its last
            write before spilling what it holds.
        @param sealing: seal bar parts at each take (L{BarAggregator}), for
            ticks that may be read again after a crash (streams). The store
            must then keep tick marks (L{ITickMarks}); they are kept under
            the part prefix's node, C{<node>} of C{<node>:<run>}: the stream
            consumer that reads its own unacknowledged entries again.
        """
        self._clock = clock
        self._bars = bars if isinstance(bars, BarAggregator) else BarAggregator(bars, sealing)
        self._store = IStore(store)
        # The same store, when sealing: its marks are read and written too.
        self._marks = ITickMarks(store) if self._bars.sealing else None
        self._node = self._bars.part_prefix.rpartition(":")[0] or self._bars.part_prefix
        # Ticks added before the marks were read (sealing), else None.
        self._held: list[Event] | None = [] if self._bars.sealing else None
        self._backed = 0  # items of the oldest spool file already written back
        self._retry: list[Bar] = []  # sealed parts whose write failed
        self._add = self._bars.add
        self._interval = flush_interval
        self._max = pending_max
        self._dir = spool_dir
        self._stop_timeout = stop_timeout
        self._tag = re.sub(r"[^A-Za-z0-9_.-]", "_", self._bars.part_prefix) or "spool"
        self._events: list[Event] = []
        self._spool: list[str] = []
        self._seq = 0
        self._loop: LoopingCall | None = None
        self._flushing: Deferred[None] | None = None
        self._writing: Deferred[Any] | None = None
        self._in_flight = 0
        self._failing = False
        self._outage_failures = 0
        self._spill_blocked = False
        self._spill_logged = False
        self._stop_expired = False
        self.ticks = 0
        self.bars_written = 0
        self.events_written = 0
        self.write_failures = 0
        self.spilled = 0
        self.last_error: str | None = None
        self.added = 0
        """Ticks and events added, ever."""
        # Per symbol, the newest tick id made durable, and added since (sealing).
        self._durable_ticks: dict[str, tuple[int, int]] = {}
        self._new_ticks: dict[str, tuple[int, int]] = {}
        self._generation = 1
        self._durable = 0
        self._waiters: list[tuple[int, Deferred[None]]] = []

    @property
    def pending(self) -> int:
        """Bars with unwritten ticks and events waiting, not counting a write in flight."""
        return self._bars.dirty_count + len(self._events) + len(self._retry)

    @property
    def generation(self) -> int:
        """The generation of what is added now."""
        return self._generation

    def when_durable(self, generation: int) -> Deferred[None]:
        """Fires once everything of C{generation} and before is in the store or the spool."""
        if generation <= self._durable:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append((generation, d))
        return d

    def _made_durable(self, generation: int) -> None:
        if generation <= self._durable:
            return
        self._durable = generation
        ready = [d for g, d in self._waiters if g <= generation]
        self._waiters = [(g, d) for g, d in self._waiters if g > generation]
        for d in ready:
            d.callback(None)

    @property
    def spool_files(self) -> int:
        """Spool files waiting to be written back."""
        return len(self._spool)

    def add_tick(self, event: Event) -> None:
        """
        Fold one tick event into its bar. Never raises, never blocks. With
        sealing (a stream source), a tick at or below its symbol's mark is
        in a durable part already and is not folded again; until the marks
        are read, ticks are held.
        """
        if self._bars.sealing:
            if self._held is not None:
                self._held.append(event)
                self.added += 1
                return
            symbol: str = event.symbol  # type: ignore[assignment]
            key = id_key(event.id)
            if key <= self._durable_ticks.get(symbol, (0, 0)):
                return
            if key > self._new_ticks.get(symbol, (0, 0)):
                self._new_ticks[symbol] = key
        self.ticks += 1
        self.added += 1
        data = event.data
        if (self._add(event.symbol, data["price"],  # type: ignore[arg-type]
                      data["volume"], data["timestamp"], event.id)
                and self._bars.dirty_count + len(self._events) > self._max):
            self._relieve()

    def add_event(self, event: Event) -> None:
        """Queue one event of a stored topic (it has its id) for the next write."""
        self.added += 1
        self._events.append(event)
        if len(self._events) + self._bars.dirty_count > self._max:
            self._relieve()

    def status(self) -> dict[str, Any]:
        """
        For C{/ready} and operators: C{"failing"} while writes fail,
        C{"backlog"} while spool files wait, memory is past its bound or
        ticks wait for the tick marks, else C{"ok"}.
        """
        if self._failing:
            state = "failing"
        elif self._spool or self.pending > self._max or self._held:
            state = "backlog"
        else:
            state = "ok"
        return {
            "state": state,
            "ticks": self.ticks,
            "bars_written": self.bars_written,
            "events_written": self.events_written,
            "write_failures": self.write_failures,
            "spilled": self.spilled,
            "spool_files": self.spool_files,
            "pending": self.pending,
            "in_flight": self._in_flight,
            "last_error": self.last_error,
        }

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._stop_expired = False
        try:
            os.makedirs(self._dir, exist_ok=True)
            names = sorted(n for n in os.listdir(self._dir) if _SPOOL_NAME.match(n))
        except OSError as error:
            self._log.error("cannot read the spool folder {dir}: {e}", dir=self._dir, e=error)
            names = []
        self._spool = [os.path.join(self._dir, n) for n in names]
        self._backed = 0
        if names:
            self._seq = max(self._seq, int(names[-1][:12]))
            self._log.info("{n} spool files in {dir} from an earlier run will be written back",
                           n=len(names), dir=self._dir)
        if self._bars.sealing:
            for path in self._spool:
                self._ticks_durable(_spool_marks(path, self._node))
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        # Sealing: the marks are read at once, as ticks may come any moment.
        self._loop.start(self._interval, now=self._bars.sealing)

    def stopService(self) -> Deferred[None]:
        """
        One last write of what memory holds, waited for at most
        C{stop_timeout} seconds; whatever is still unwritten then is spilled.
        """
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        timer: IDelayedCall = self._clock.callLater(self._stop_timeout, self._expire)
        try:
            if self._flushing is not None:
                await _after(self._flushing)
            if not self._stop_expired and await self._load_marks():
                await self._write_memory()
        finally:
            if timer.active():
                timer.cancel()
        before = self.spilled
        self._spill_blocked = False
        self._spill_all()
        if self.spilled > before:
            self._log.info("stopped; {n} unwritten bars and events spilled to {dir}",
                           n=self.spilled - before, dir=self._dir)

    def _expire(self) -> None:
        self._stop_expired = True
        if self._writing is not None:
            self._writing.cancel()

    def flush_now(self) -> Deferred[None]:
        """
        Write what is waiting now rather than at the next interval (after a
        write in flight, if any): a stream source stopping makes what it
        read durable, to acknowledge it.
        """
        async def flush() -> None:
            if self._flushing is not None:
                await _after(self._flushing)
            self._tick()
            if self._flushing is not None:
                await _after(self._flushing)

        return Deferred.fromCoroutine(flush())

    def _tick(self) -> None:
        self._spill_blocked = False
        if self._flushing is not None:
            return
        try:
            self._bars.evict(self._bars.newest_minute - GRACE_MINUTES * 60)
        except Exception:
            self._log.failure("evicting bars failed")
        flushing = self._flushing = Deferred.fromCoroutine(self._flush())
        flushing.addBoth(self._flushed)

    def _flushed(self, result: Any) -> None:
        self._flushing = None
        if isinstance(result, Failure):
            self._log.failure("flush failed unexpectedly", result)

    async def _flush(self) -> None:
        if await self._load_marks() and await self._write_memory() and self._spool \
                and self.running:
            await self._write_back()

    async def _load_marks(self) -> bool:
        """
        Sealing: read this node's marks from the store (once), then fold the
        ticks held meanwhile; whether the marks are known.
        """
        if self._held is None:
            return True
        assert self._marks is not None
        self._writing = self._marks.tick_marks(self._node)
        try:
            marks = await self._writing
        except Exception as error:
            # As at start-up, before the store is connected: tried again
            # each interval, and the store reports its own outage.
            self.last_error = f"cannot read the tick marks: {type(error).__name__}: {error}"
            return False
        finally:
            self._writing = None
        self._ticks_durable(marks)
        held, self._held = self._held, None
        added = self.added
        for event in held:
            self.add_tick(event)
        self.added = added  # counted when held
        return True

    async def _write_memory(self) -> bool:
        """
        Write every dirty bar and waiting event; whether that worked. If it
        did not, spill them all: what the store did not take is on disk.
        """
        generation = self._generation
        self._generation += 1
        ticks, self._new_ticks = self._new_ticks, {}
        bars, taken = self._bars.take_dirty()
        if self._bars.sealing:
            self._bars.seal(taken)
            bars, self._retry = self._retry + bars, []
        events, self._events = self._events, []
        if not bars and not events:
            self._ticks_durable(ticks)
            self._made_durable(generation)
            return True
        self._in_flight = len(bars) + len(events)
        try:
            await self._write(bars, events, (self._node, ticks) if ticks else None)
        except Exception as error:
            if self._bars.sealing:
                self._retry = bars + self._retry
            else:
                self._bars.failed(taken)
            self._events[:0] = events
            self._new_ticks = _newest(ticks, self._new_ticks)
            self._failed(error)
            self._spill_all()
            return False
        finally:
            self._in_flight = 0
        self._bars.written(taken)
        self._ticks_durable(ticks)
        self._made_durable(generation)
        return True

    def _ticks_durable(self, ticks: dict[str, tuple[int, int]]) -> None:
        self._durable_ticks = _newest(self._durable_ticks, ticks)

    def _spill_all(self) -> None:
        """Spill everything unwritten; once it all is on disk, it is durable."""
        if self._bars.sealing:
            self._spill_sealed()
            return
        generation = self._generation
        if not self._spill_blocked:
            self._spill(self.pending)
        if not self.pending:
            self._generation += 1
            self._made_durable(generation)

    def _spill_sealed(self) -> None:
        """
        Sealing: everything unwritten into one spool file headed by the marks
        of its ticks, so that no part is on disk without them, nor they
        without their parts. Durable then, once the marks are known.
        """
        generation = self._generation
        bars, taken = self._bars.take_dirty()
        self._bars.seal(taken)
        bars, self._retry = self._retry + bars, []
        events, self._events = self._events, []
        if bars or events:
            try:
                self._write_spool([orjson.dumps({"bar": bar}) for bar in bars]
                                  + [_event_line(event) for event in events],
                                  (self._node, self._new_ticks) if self._new_ticks else None)
            except OSError as error:
                self._retry = bars
                self._events[:0] = events
                self._spill_blocked = True
                self.last_error = f"cannot spill to {self._dir}: {error}"
                self._log.error("cannot spill to {dir} ({e}); keeping it all in memory",
                                dir=self._dir, e=error)
                return
        if self._held is None:
            self._generation += 1
            ticks, self._new_ticks = self._new_ticks, {}
            self._ticks_durable(ticks)
            self._made_durable(generation)

    async def _write_back(self) -> None:
        """
        Write the oldest spool file, L{SPOOL_FILE_ITEMS} at a time (its
        marks with the last), and delete it once all of it is written.
        """
        path = self._spool[0]
        try:
            bars, events, marks = _read_spool(path)
        except FileNotFoundError:
            self._spool.pop(0)
            self._backed = 0
            return
        except (OSError, ValueError, TypeError, KeyError) as error:
            self._spool.pop(0)
            self._backed = 0
            self.last_error = f"unreadable spool file {path}: {error}"
            self._log.error("cannot read spool file {path} ({e}); moved aside as .bad",
                            path=path, e=error)
            try:
                os.replace(path, path + ".bad")
            except OSError:
                pass
            return
        start = self._backed
        end = min(start + SPOOL_FILE_ITEMS, len(bars) + len(events))
        last = end == len(bars) + len(events)
        try:
            await self._write(bars[start:end],
                              events[max(0, start - len(bars)):max(0, end - len(bars))],
                              marks if last else None)
        except Exception as error:
            self._failed(error)
            return
        if not last:
            self._backed = end
            return
        self._backed = 0
        self._spool.pop(0)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        if not self._spool:
            self._spill_logged = False
            self._log.info("spool written back; {dir} is empty", dir=self._dir)

    async def _write(self, bars: list[Bar], events: list[Event],
                     marks: tuple[str, dict[str, tuple[int, int]]] | None = None) -> None:
        if marks is None:
            self._writing = self._store.write(bars, events)
        else:
            assert self._marks is not None
            self._writing = self._marks.write(bars, events, marks)
        try:
            await self._writing
        finally:
            self._writing = None
        self.bars_written += len(bars)
        self.events_written += len(events)
        if self._failing:
            self._failing = False
            self._log.info("store writes work again after {n} failed",
                           n=self._outage_failures)
            self._outage_failures = 0

    def _failed(self, error: Exception) -> None:
        self.write_failures += 1
        self._outage_failures += 1
        self.last_error = f"{type(error).__name__}: {error}"
        if not self._failing:
            self._failing = True
            self._log.warn("store writes failing ({e}); keeping bars and events to retry",
                           e=self.last_error)

    def _relieve(self) -> None:
        """
        Past the bound: spill the oldest down to half of it; with sealing,
        all of it, unless a write is in flight (its ticks are not durable
        yet, so the marks of what is spilled could not be written).
        """
        if self._spill_blocked:
            return
        if not self._bars.sealing:
            self._spill(self.pending - self._max // 2)
        elif not self._in_flight and self._held is None:
            self._spill_sealed()

    def _spill(self, count: int) -> None:
        """
        Move C{count} unwritten items to spool files: bars of minutes past
        the grace period first (they will not change), then the oldest
        events, then the oldest remaining bars.
        """
        closed = self._bars.newest_minute - GRACE_MINUTES * 60
        try:
            count = self._spill_bars(count, closed)
            count = self._spill_events(count)
            self._spill_bars(count, None)
        except OSError as error:
            self._spill_blocked = True
            self.last_error = f"cannot spill to {self._dir}: {error}"
            self._log.error("cannot spill to {dir} ({e}); keeping it all in memory",
                            dir=self._dir, e=error)

    def _spill_bars(self, count: int, before_minute: int | None) -> int:
        while count > 0:
            bars, taken = self._bars.oldest(min(count, SPOOL_FILE_ITEMS), before_minute)
            if not bars:
                break
            self._write_spool([orjson.dumps({"bar": bar}) for bar in bars])
            self._bars.forget(taken)
            count -= len(bars)
        return count

    def _spill_events(self, count: int) -> int:
        while count > 0 and self._events:
            events = self._events[:min(count, SPOOL_FILE_ITEMS)]
            self._write_spool([_event_line(event) for event in events])
            del self._events[:len(events)]
            count -= len(events)
        return count

    def _write_spool(self, lines: list[bytes],
                     marks: tuple[str, dict[str, tuple[int, int]]] | None = None) -> None:
        """
        One spool file, whole or not at all: a temp file, fsynced, renamed.
        C{marks}, if any, head it.
        """
        os.makedirs(self._dir, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=self._dir, prefix=".", suffix=".tmp")
        head = [] if marks is None else [_marks_line(*marks)]
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(b"\n".join(head + lines) + b"\n")
                out.flush()
                os.fsync(out.fileno())
            self._seq += 1
            path = os.path.join(self._dir, f"{self._seq:012d}-{self._tag}.jsonl")
            os.replace(temp, path)
        except BaseException:
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise
        _sync_dir(self._dir)
        self._spool.append(path)
        self.spilled += len(lines)
        if not self._spill_logged:
            self._spill_logged = True
            self._log.warn("spilling unwritten bars and events to {dir} (a write failed, "
                           "or more than {max} waited)", max=self._max, dir=self._dir)


def _event_line(event: Event) -> bytes:
    return orjson.dumps({"event": {"id": event.id, "channel": event.channel,
                                   "topic": event.topic, "type": event.type,
                                   "user": event.user, "data": event.data}})


def _marks_line(node: str, ticks: dict[str, tuple[int, int]]) -> bytes:
    return orjson.dumps({"marks": {"node": node, "ticks": ticks}})


def _marks(item: dict[str, Any]) -> tuple[str, dict[str, tuple[int, int]]]:
    marks = item["marks"]
    return marks["node"], {symbol: (ms, seq) for symbol, (ms, seq) in marks["ticks"].items()}


def _spool_marks(path: str, node: str) -> dict[str, tuple[int, int]]:
    """The marks heading a spool file, if it has C{node}'s (its first line)."""
    try:
        with open(path, "rb") as spool:
            first = spool.readline()
        if first.startswith(b'{"marks"'):
            owner, ticks = _marks(orjson.loads(first))
            if owner == node:
                return ticks
    except (OSError, ValueError, TypeError, KeyError):
        pass  # set aside when written back
    return {}


def _read_spool(path: str) -> tuple[list[Bar], list[Event],
                                    tuple[str, dict[str, tuple[int, int]]] | None]:
    bars: list[Bar] = []
    events: list[Event] = []
    marks = None
    with open(path, "rb") as spool:
        for line in spool:
            item = orjson.loads(line)
            if "bar" in item:
                bars.append(Bar(**item["bar"]))
            elif "marks" in item:
                marks = _marks(item)
            else:
                e = item["event"]
                events.append(stored_event(e["id"], e["channel"], e["type"],
                                           orjson.dumps(e["data"]), e["user"],
                                           e.get("topic")))
    return bars, events, marks


def _newest(a: dict[str, tuple[int, int]], b: dict[str, tuple[int, int]]
            ) -> dict[str, tuple[int, int]]:
    """Per symbol, the greater of two tick id keys."""
    merged = dict(a)
    for symbol, key in b.items():
        if key > merged.get(symbol, (0, 0)):
            merged[symbol] = key
    return merged


def _sync_dir(path: str) -> None:
    # The rename is durable only once the folder's entry is on disk too.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _after(d: Deferred[Any]) -> Deferred[None]:
    """A Deferred that fires when C{d} does, leaving C{d}'s result to its owner."""
    done: Deferred[None] = Deferred()

    def fire(result: Any) -> Any:
        done.callback(None)
        return result

    d.addBoth(fire)
    return done
