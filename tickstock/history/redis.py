"""
The shared history, in Redis: one stream per topic (and per user, for their
own backtests), written by every daemon on that Redis through one Lua script
so that all of them agree on each event's id, and read back by each daemon
for live delivery (L{RedisHistory} tails the streams) and for resume.

Ids: the script gives each event C{<ms>-<seq>} from one counter for all
topics, so ids order events across topics, and a client's single
C{last_id} is a valid resume point in every topic's stream.

Duplicates stop in the script, atomically with the write:
 - pub/sub: every daemon receives every message and appends it; the
   source's key (a digest of the message and how many times this daemon saw
   those bytes recently) makes the second daemon get the first one's id;
 - streams: an entry is appended only while it is still pending in the
   consumer group, and acknowledged in the same script, so an entry handled
   twice (a crash before the ack, a reclaim) is stored once;
 - a producer C{event_id} seen on its channel within the dedupe window is
   stored once (L{_WINDOWS}: bounded by time and by count).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import orjson
import txredisapi
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorCore
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tickstock.connections.address import RedisAddress
from tickstock.connections.redis import (
    LinkProtocol,
    NotConnected,
    RedisLink,
    Supervised,
    text,
)
from tickstock.domain.events import ID_STRIDE, Event, id_key, stored_event
from tickstock.domain.interfaces import IClaims, IHistory
from tickstock.domain.jobs import outcome
from tickstock.domain.stored import STORED_SUFFIX, Redelivered, Refused, StreamEntry
from tickstock.domain.topics import BACKTESTS, TOPIC_NAMES
from tickstock.history import BOOKMARK_EVERY, DEDUPE_MAX, DEDUPE_WINDOW, Replay, missed

PREFIX = "tickstock:history:"
LAST_KEY = PREFIX + "last"
SINCE_KEY = PREFIX + "since"
USER_PREFIX = "tickstock:user:"
JOB_PREFIX = "tickstock:jobstate:"
DEDUPE_KEY = "tickstock:dedupe"
"""The windows that remember producer event_ids (C{eid:<channel>}), pub/sub
messages stored (C{seen}) and claimed ticks (C{tick}): this hash holds each one's bucket start times, and
its buckets are sets named C{tickstock:dedupe:<window>:<start ms>}."""
DIGEST_BYTES = 12
"""What a window remembers of a member: this many bytes of its SHA-1, so a
member costs Redis about 60 bytes however long the producer's ids are,
while a lookup among 2 x L{DEDUPE_MAX} members matches a wrong one with odds
of about 2^-75."""
SEEN_TTL = 10.0
"""Seconds a pub/sub message's key is remembered (by the window C{seen}, see
L{_WINDOWS}), at least: far longer than the time between two daemons
receiving the same message. A live tick's claim is remembered as long (the
window C{tick})."""
TAIL_BLOCK_MS = 1000
TAIL_COUNT = 1000
TAIL_CHUNK = 64
TAIL_CHUNK_BYTES = 64 * 1024
"""At most this many events, or bytes of their messages, are delivered per
reactor turn (about what a socket reads per turn): between chunks sockets
get written and read, so a burst read in one XREAD does not make healthy
clients look slow."""
DROPS_KEPT = 1000
STORED_KEPT = 10_000
"""Events this daemon stored, kept until its tail reads them back, at most:
the tail then delivers the event it already has instead of decoding the
entry again (a third of a tick's cost). Past the bound, the oldest go, and
are decoded as any other daemon's event is."""
INGEST_BATCH = BOOKMARK_EVERY
"""Events stored per script call at most: Redis runs nothing else meanwhile,
and trimming by age keeps pace (it drops up to this many per call)."""

_IDLT = """
local function idlt(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, bms = tonumber(ams), tonumber(bms)
  return ams < bms or (ams == bms and tonumber(aseq) < tonumber(bseq))
end
"""

_TRIM = _IDLT + """
-- Trim KEY to MAXLEN entries and entries newer than MINID, in batches of
-- about %(batch)d, recording each batch (newest dropped id, total dropped) in
-- KEY:drops: XTRIM does not update max-deleted-entry-id, so Redis cannot say
-- what it dropped.
local function trim(key, maxlen, minid, late)
  local cut = nil
  local len = redis.call('XLEN', key)
  if len > maxlen + %(batch)d then
    local gone = redis.call('XRANGE', key, '-', '+', 'COUNT', len - maxlen)
    cut = gone[#gone][1]
  end
  local old = redis.call('XRANGE', key, '-', '(' .. minid, 'COUNT', %(batch)d)
  if #old == %(batch)d or (#old > 0 and idlt(old[1][1], late)) then
    if cut == nil or idlt(cut, old[#old][1]) then cut = old[#old][1] end
  end
  if cut == nil then return end
  local ms, seq = string.match(cut, '^(%%d+)-(%%d+)$')
  local dropped = redis.call('XTRIM', key, 'MINID', ms .. '-' .. string.format('%%.0f', tonumber(seq) + 1))
  local total = redis.call('INCRBY', key .. ':dropped', dropped)
  redis.call('XADD', key .. ':drops', 'MAXLEN', '~', %(kept)d, cut, 'n', total)
end
""" % {"batch": BOOKMARK_EVERY, "kept": DROPS_KEPT}

_WINDOWS = """
-- Windows remember members (digests) for a while: in two sets, the current
-- bucket, which takes members for SPAN ms or until it holds CAP, then
-- becomes the previous one as the one before it is dropped. So a member is
-- remembered for at least SPAN ms and while fewer than CAP others came
-- after it, and for at most twice both. The hash DEDUPE holds, per window,
-- its buckets' start times 'current previous' (ms; previous 0: none); the
-- bucket started at START is the set DEDUPE:NAME:START, expiring 2 SPAN
-- after START (it takes no member later than START + SPAN).
local DEDUPE, CAP = '%(dedupe)s', %(cap)s
local windows = {}
local function bucket(w, start)
  return DEDUPE .. ':' .. w.name .. ':' .. string.format('%.0f', start)
end
local function rotate(w, ms)
  if w.prev > 0 then redis.call('UNLINK', bucket(w, w.prev)) end
  if ms - w.cur < 2 * w.span then w.prev = w.cur else w.prev = 0 end
  w.cur, w.n = math.max(ms, w.cur + 1), 0
  redis.call('HSET', DEDUPE, w.name, string.format('%.0f %.0f', w.cur, w.prev))
end
-- The window NAME at MS, read once per script call.
local function window(name, span, ms)
  local w = windows[name]
  if w == nil then
    w = {name = name, span = span, cur = 0, prev = 0}
    local state = redis.call('HGET', DEDUPE, name)
    if state then
      local cur, prev = string.match(state, '^(%d+) (%d+)$')
      w.cur, w.prev = tonumber(cur), tonumber(prev)
    end
    windows[name] = w
  end
  if ms - w.cur >= span then rotate(w, ms) end
  return w
end
-- Per member, 1 if the window remembers it, else 0.
local function held(w, members)
  local found = redis.call('SMISMEMBER', bucket(w, w.cur), unpack(members))
  if w.prev > 0 then
    local before = redis.call('SMISMEMBER', bucket(w, w.prev), unpack(members))
    for i, v in ipairs(before) do
      if v == 1 then found[i] = 1 end
    end
  end
  return found
end
local function remember(w, members, ms)
  if w.n == nil then w.n = redis.call('SCARD', bucket(w, w.cur)) end
  if w.n >= CAP then rotate(w, ms) end
  local key = bucket(w, w.cur)
  local added = redis.call('SADD', key, unpack(members))
  if w.n == 0 and added > 0 then
    redis.call('PEXPIREAT', key, string.format('%.0f', w.cur + 2 * w.span))
  end
  w.n = w.n + added
end
""".replace("%(dedupe)s", DEDUPE_KEY).replace("%(cap)s", str(DEDUPE_MAX))

INGEST = _TRIM + _WINDOWS + """
-- Stores a batch of events, in order, atomically; returns {stored, id} per
-- event (stored 0: a duplicate, with the first copy's id, or '' (a
-- producer event_id the window 'eid:<channel>' remembers); or an
-- event of an unknown or closed job: '!unknown_job', '!finished_job').
-- A stream entry is not acknowledged here: the source does that once what
-- it became is durable. Until then the entry's id is kept in the stream's
-- stored hash, so a redelivery of it is known as the event already stored.
-- A job is a hash {u: owner, f: final status once closed}.
-- KEYS: last id, since key, then per event: topic stream, job key | '',
--       producer stream | ''
-- ARGV: maxlen, max age ms, seen window ms, event_id window ms, user maxlen,
--       user ttl s, user prefix, then per event: channel, type, data,
--       group | '', entry id | '', final status it gives its job | '',
--       producer event_id digest | '', pub/sub message key digest | ''
-- A pub/sub message's key is remembered by the window 'seen', so of the
-- daemons that all receive it, the first one stores it.
-- Sequence numbers step by STRIDE: live ticks take the ids in between.
local STRIDE = %(stride)d
local STORED = '%(stored)s'
local maxlen, max_age = tonumber(ARGV[1]), tonumber(ARGV[2])
local seen_span, eid_span = tonumber(ARGV[3]), tonumber(ARGV[4])
local user_max, user_ttl, user_prefix = tonumber(ARGV[5]), ARGV[6], ARGV[7]
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local seq = 0
local last = redis.call('GET', KEYS[1])
local first = not last
if last then
  local lms, lseq = string.match(last, '^(%d+)-(%d+)$')
  if ms <= tonumber(lms) then ms = tonumber(lms); seq = tonumber(lseq) + STRIDE end
end
local touched, users, out, stored = {}, {}, {}, false
for i = 0, (#KEYS - 2) / 3 - 1 do
  local k, a = 2 + i * 3, 7 + i * 8
  local stream, job_key, source = KEYS[k+1], KEYS[k+2], KEYS[k+3]
  local group, entry, mark = ARGV[a+4], ARGV[a+5], ARGV[a+8]
  local done = nil
  if source ~= '' then
    if #redis.call('XPENDING', source, group, entry, entry, 1) == 0 then
      done = ''
    else
      done = redis.call('HGET', source .. STORED, entry) or nil
    end
  end
  local seen = nil
  if done == nil and mark ~= '' then
    seen = window('seen', seen_span, ms)
    if held(seen, {mark})[1] == 1 then done = '' end
  end
  local eid, eids = ARGV[a+7], nil
  if done == nil and eid ~= '' then
    eids = window('eid:' .. ARGV[a+1], eid_span, ms)
    if held(eids, {eid})[1] == 1 then
      done = ''
      if seen then remember(seen, {mark}, ms) end
    end
  end
  local owner = false
  if done == nil and job_key ~= '' then
    local job = redis.call('HMGET', job_key, 'u', 'f')
    if not job[1] then done = '!unknown_job'
    elseif job[2] then done = '!finished_job'
    else owner = job[1] end
  end
  if done == nil then
    local id = string.format('%.0f-%.0f', ms, seq)
    seq = seq + STRIDE
    local fields = {'c', ARGV[a+1], 't', ARGV[a+2], 'd', ARGV[a+3]}
    if owner then
      fields[7] = 'u'; fields[8] = owner
      if ARGV[a+6] ~= '' then redis.call('HSET', job_key, 'f', ARGV[a+6]) end
      redis.call('EXPIRE', job_key, user_ttl)
    end
    redis.call('XADD', stream, id, unpack(fields))
    touched[stream] = maxlen
    if owner then
      redis.call('XADD', user_prefix .. owner, id, unpack(fields))
      users[user_prefix .. owner] = user_max
    end
    if seen then remember(seen, {mark}, ms) end
    if source ~= '' then redis.call('HSET', source .. STORED, entry, id) end
    if eids then remember(eids, {eid}, ms) end
    last, stored = id, true
    out[#out + 1] = 1
    out[#out + 1] = id
  else
    out[#out + 1] = 0
    out[#out + 1] = done
  end
end
local minid = string.format('%.0f-0', ms - max_age)
local late = string.format('%.0f-0', ms - max_age - 60000)
for stream, n in pairs(touched) do trim(stream, n, minid, late) end
for user, n in pairs(users) do
  trim(user, n, minid, late)
  for _, key in ipairs({user, user .. ':drops', user .. ':dropped'}) do
    redis.call('EXPIRE', key, user_ttl)
  end
end
if stored then
  if first then redis.call('SET', KEYS[2], last) end
  redis.call('SET', KEYS[1], last)
end
return out
""".replace("%(stride)d", str(ID_STRIDE)).replace("%(stored)s", STORED_SUFFIX)

REPLAY = """
-- KEYS: stream, since key, delivered pointer | ''   ARGV: after | ''
local after = ARGV[1]
if after == '' then after = redis.call('GET', KEYS[3]) or '0-0' end
local since = redis.call('GET', KEYS[2]) or ''
local entries = redis.call('XRANGE', KEYS[1], '(' .. after, '+')
local newest = redis.call('XREVRANGE', KEYS[1] .. ':drops', '+', '-', 'COUNT', 1)
local last_dropped, dropped = '0-0', 0
if #newest > 0 then last_dropped, dropped = newest[1][1], tonumber(newest[1][2][2]) end
local mark = redis.call('XREVRANGE', KEYS[1] .. ':drops', after, '-', 'COUNT', 1)
local through = 0
if #mark > 0 then through = tonumber(mark[1][2][2]) end
return {after, entries, last_dropped, dropped, through, since}
"""


CLAIM = _WINDOWS + """
-- ARGV: the window's span ms, then the ticks' keys (digests). Per key, 1
-- if this call claimed it first, else 0: the window 'tick' remembers claims.
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local keys = {unpack(ARGV, 2)}
if #keys == 0 then return {} end
local ticks = window('tick', tonumber(ARGV[1]), ms)
local found, out, new, mine = held(ticks, keys), {}, {}, {}
for i, key in ipairs(keys) do
  if found[i] == 1 or mine[key] then
    out[i] = 0
  else
    out[i], mine[key] = 1, true
    new[#new + 1] = key
  end
end
if #new > 0 then remember(ticks, new, ms) end
return out
"""

MARKS = """
-- KEYS: drop-mark streams   ARGV: per key, the id a tail read starts after.
-- Per key, the newest drop mark after that id, or ''.
local out = {}
for i, key in ipairs(KEYS) do
  local mark = redis.call('XREVRANGE', key, '+', '(' .. ARGV[i], 'COUNT', 1)
  out[i] = mark[1] and mark[1][1] or ''
end
return out
"""

MARKS_SHA = hashlib.sha1(MARKS.encode(), usedforsecurity=False).hexdigest()

ADVANCE = _IDLT + """
-- KEYS: a user's delivered pointer   ARGV: event id, ttl s. Only moves forward.
local now = redis.call('GET', KEYS[1])
if not now or idlt(now, ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) end
return 1
"""


def digest(member: object) -> bytes:
    """What a dedupe window remembers of C{member} (L{DIGEST_BYTES})."""
    return hashlib.sha1(str(member).encode(), usedforsecurity=False).digest()[:DIGEST_BYTES]


def _entry_event(entry: list[Any], topic: str) -> Event:
    event_id, flat = entry
    fields = {text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
    user = fields.get("u")
    return stored_event(text(event_id), text(fields["c"]), text(fields["t"]), fields["d"],
                        None if user is None else text(user), topic)


class _Script:
    """
    A Lua script run by SHA; the link loads it first on every connection.
    Should Redis answer NOSCRIPT anyway (its script cache was flushed), the
    call fails and the link reconnects, which loads it again: an EVAL
    fallback would let later calls already in flight overtake this one.
    """

    def __init__(self, link: RedisLink, source: str) -> None:
        self._link = link
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
        link.preload(source)

    def run(self, keys: list[str], args: list[Any]) -> Deferred[Any]:
        def reload(failure: Any) -> Any:
            if "NOSCRIPT" in failure.getErrorMessage():
                self._link.drop()
            return failure

        return self._link.execute("EVALSHA", self.sha, len(keys), *keys, *args).addErrback(reload)


@implementer(IHistory, IClaims)
class RedisHistory(Supervised):
    """
    The history in Redis: writes and replays through the daemon's command
    link (C{execute}); live delivery from a blocking C{XREAD} of every
    topic's stream on a connection of its own (docs/internals.md §5: a blocking read
    must not share a connection), resumed from the last id it delivered
    after any reconnect, so a Redis blip delays live events but loses none.
    """

    _log = Logger()
    name_for_logs = "redis history"

    def __init__(
        self, reactor: IReactorCore, address: RedisAddress, link: RedisLink,
        max_events: int, max_age: float, user_max: int, read_timeout: float = 5.0,
        store_window: float = 0.0, dedupe_window: float = DEDUPE_WINDOW,
    ) -> None:
        """
        @param dedupe_window: seconds a producer event_id is remembered on
            its channel, at least (see L{_WINDOWS}).
        """
        super().__init__(reactor, address, self._new_factory)
        self._store_window = store_window
        self._dedupe_window_ms = int(dedupe_window * 1000)
        self._flushed_at = float("-inf")
        self._execute = link.execute
        self._max_events = max_events
        self._max_age_ms = int(max_age * 1000)
        self._user_max = user_max
        self._user_ttl = int(max_age)
        self._read_timeout = read_timeout
        self._ingest = _Script(link, INGEST)
        self._replay = _Script(link, REPLAY)
        self._advance = _Script(link, ADVANCE)
        self._claim = _Script(link, CLAIM)
        self._pending: list[tuple[Event, object, Deferred[str | None]]] = []
        self._flushing: IDelayedCall | None = None
        self._receivers: list[Callable[[Event], object]] = []
        self._keys = [PREFIX + topic for topic in TOPIC_NAMES]
        self._positions: dict[str, str] | None = None
        self._positioned: list[Deferred[None]] = []
        self._gap_listeners: list[Callable[[str], object]] = []
        self.tail_gaps = 0
        self._held: list[Event] = []
        self._ready: deque[Event] = deque()
        # Ordered: dropping the oldest of a dict that many were popped from
        # scans their leftover slots (O(n) each time it is full).
        self._stored: OrderedDict[str, Event] = OrderedDict()
        self._stores_sent = 0
        self._stores_open: set[int] = set()
        self._unread: tuple[int, list[Any] | None] | None = None
        self._reading: IDelayedCall | None = None
        self.tail_reads = 0
        self.tail_errors = 0
        self.position = "0-0"

    def _new_factory(self) -> txredisapi.RedisFactory:
        a = self._address
        factory = txredisapi.RedisFactory(
            None, a.db, poolsize=1, isLazy=True, password=a.password, username=a.username,
            replyTimeout=self._read_timeout, convertNumbers=False, charset=None,
        )
        factory.protocol = LinkProtocol
        factory.scripts = [MARKS]
        return factory

    # IHistory

    def append(self, event: Event, key: object = None) -> Deferred[str | None]:
        """
        Events are stored by one script call per C{store_window} (at most
        L{INGEST_BATCH} events per call), in the order they were appended: a
        round-trip per event would cost more than everything else an event
        needs. The first event after a quiet window goes out in the same
        reactor turn; under load, those after it wait at most the window,
        and so do the tail reads their call wakes.

        One call at a time: a call sent while an earlier one may still fail
        (an error reply, such as BUSY or OOM, spares the calls behind it)
        would store its stream entries before the earlier ones, which are
        read again and stored after them. So under load a call also waits
        for the one before it to answer, and goes at once if it is full.
        """
        d: Deferred[str | None] = Deferred()
        self._pending.append((event, key, d))
        self._schedule_store()
        return d

    def _schedule_store(self) -> None:
        if self._flushing is not None or self._stores_open or not self._pending:
            return
        wait = 0.0 if len(self._pending) >= INGEST_BATCH else \
            self._flushed_at + self._store_window - self._reactor.seconds()
        self._flushing = self._reactor.callLater(max(wait, 0), self._flush)

    def _flush(self) -> None:
        self._flushing = None
        self._flushed_at = self._reactor.seconds()
        batch, self._pending = self._pending[:INGEST_BATCH], self._pending[INGEST_BATCH:]
        self._store(batch)

    def _store(self, batch: list[tuple[Event, object, Deferred[str | None]]]) -> None:
        keys = [LAST_KEY, SINCE_KEY]
        args: list[Any] = [
            self._max_events, self._max_age_ms, int(SEEN_TTL * 1000), self._dedupe_window_ms,
            self._user_max, self._user_ttl, USER_PREFIX,
        ]
        for event, key, _ in batch:
            producer_id = event.data.get("event_id")
            entry = key if isinstance(key, StreamEntry) else None
            keys += (
                PREFIX + event.topic,
                JOB_PREFIX + event.job_id if event.job_id else "",
                entry.stream if entry else "",
            )
            args += (
                event.channel, event.type, orjson.dumps(event.data),
                entry.group if entry else "", entry.entry_id if entry else "",
                (outcome(event) or "") if event.job_id else "",
                digest(producer_id) if producer_id else "",
                digest(key) if isinstance(key, str) else "",
            )

        call = self._stores_sent
        self._stores_sent += 1
        self._stores_open.add(call)

        def stored(reply: list[Any]) -> None:
            self._stores_open.discard(call)
            if len(self._pending) >= INGEST_BATCH:
                self._flush()  # Redis runs the next call while these are handed on
            kept = self._stored
            for i, (event, key, d) in enumerate(batch):
                value = text(reply[2 * i + 1])
                if int(reply[2 * i]) == 1:
                    event.id = value
                    if event.job_id is None:  # a job's event gets its owner in Redis
                        if len(kept) >= STORED_KEPT:
                            kept.popitem(last=False)
                        kept[value] = event
                    d.callback(value)
                elif value.startswith("!"):
                    d.callback(Refused(value[1:]))
                elif value and isinstance(key, StreamEntry):
                    event.id = value
                    d.callback(Redelivered(value))
                else:
                    d.callback(None)
            self._take_unread()
            self._schedule_store()

        def failed(failure: Any) -> None:
            self._stores_open.discard(call)
            # Stream entries waiting behind it fail too: they are read again
            # after this call's own, and stored now they would come first.
            behind = [item for item in self._pending if isinstance(item[1], StreamEntry)]
            if behind:
                self._pending = [item for item in self._pending
                                 if not isinstance(item[1], StreamEntry)]
            for _, _, d in batch + behind:
                d.errback(failure)
            self._take_unread()
            self._schedule_store()

        self._ingest.run(keys, args).addCallbacks(stored, failed)

    def listen(self, receiver: Callable[[Event], object]) -> None:
        self._receivers.append(receiver)

    # IClaims

    def claim(self, keys: list[object]) -> Deferred[list[Any]]:
        """
        Live ticks: the first daemon to claim a message's key counts it. A
        claim is remembered for C{SEEN_TTL} seconds at least (see
        L{_WINDOWS}), as long as L{DEDUPE_MAX} claims at least.
        """
        return self._claim.run([], [int(SEEN_TTL * 1000), *map(digest, keys)])

    def replay(self, topic: str, after: str | None, user: str | None) -> Deferred[Replay]:
        """
        Waits until live delivery knows where it reads from: a replay taken
        earlier could miss what happens between it and that point.
        """
        if self._positions is None:
            waiter: Deferred[None] = Deferred()
            self._positioned.append(waiter)
            return waiter.addCallback(lambda _: self.replay(topic, after, user))
        if topic == BACKTESTS:
            assert user is not None
            stream, pointer = USER_PREFIX + user, f"{USER_PREFIX}{user}:delivered"
        else:
            assert after is not None
            stream, pointer = PREFIX + topic, ""
        d = self._replay.run([stream, SINCE_KEY, pointer], [after or ""])

        def done(reply: list[Any]) -> Replay:
            start, entries, last_dropped, dropped, through, since = reply
            start, last_dropped, since = text(start), text(last_dropped), text(since)
            events = [_entry_event(entry, topic) for entry in entries]
            gap = missed(start, None if last_dropped == "0-0" else last_dropped,
                         int(dropped), int(through))
            if gap is None and after is not None and since and id_key(after) < id_key(since):
                # Redis lost the history this id came from (a restart
                # without persistence): what happened in between is unknown.
                gap = {"from": after, "to": None, "count": None, "reason": "history was reset"}
            return Replay(events, gap)

        return d.addCallback(done)

    def own(self, job_id: str, user: str) -> Deferred[Any]:
        key = JOB_PREFIX + job_id
        return self._execute("HSET", key, "u", user).addCallback(
            lambda _: self._execute("EXPIRE", key, self._user_ttl))

    def delivered(self, user: str, event_id: str) -> None:
        # Only forward: another node, or a tail that is behind, may report
        # an older event later.
        self._advance.run([f"{USER_PREFIX}{user}:delivered"],
                          [event_id, self._user_ttl]).addErrback(lambda _: None)

    # Live delivery: tail every topic's stream.

    @property
    def ready(self) -> bool:
        """True once the tail knows where it reads from and is connected."""
        return self._positions is not None and bool(self._factory and self._factory.pool)

    def status(self) -> dict[str, Any]:
        return {"state": "tailing" if self.ready else "connecting",
                "reads": self.tail_reads, "errors": self.tail_errors, "gaps": self.tail_gaps,
                "held": len(self._held)}

    def startService(self) -> None:
        super().startService()
        self._schedule(0)

    def stopService(self) -> Deferred[Any]:
        if self._reading is not None and self._reading.active():
            self._reading.cancel()
        self._reading = None
        self._unread = None
        return super().stopService()

    def _schedule(self, delay: float) -> None:
        if self.running:
            self._reading = self._reactor.callLater(delay, self._read)

    def _connection(self) -> Any:
        factory = self._factory
        if factory is None or not factory.pool:
            raise NotConnected(f"not connected to {self._address}")
        return factory.pool[0]

    def _read(self) -> None:
        self._reading = None
        try:
            conn = self._connection()
        except NotConnected:
            self._schedule(0.05)
            return
        if self._positions is None:
            d = conn.execute_command("GET", LAST_KEY)
            d.addCallback(self._start_at)
        else:
            block = () if self._held else ("BLOCK", TAIL_BLOCK_MS)
            ids = [self._positions[key] for key in self._keys]
            read = conn.execute_command("XREAD", "COUNT", TAIL_COUNT, *block, "STREAMS",
                                        *self._keys, *ids, apply_timeout=False)
            # Pipelined behind the read, so it runs as soon as the read
            # returns: the newest id trimming dropped from each stream after ours.
            marks = conn.execute_command("EVALSHA", MARKS_SHA, len(self._keys),
                                         *(key + ":drops" for key in self._keys), *ids,
                                         apply_timeout=False)
            d = gatherResults([read, marks], consumeErrors=True)
            watchdog = self._reactor.callLater(
                TAIL_BLOCK_MS / 1000 + self._read_timeout, self._hung, conn)
            d.addBoth(self._cancel, watchdog)
            d.addCallback(self._check_gaps)
            d.addCallbacks(self._take_after_stores, self._read_failed)
            return
        d.addCallbacks(lambda _: self._drain(), self._read_failed)

    def _take_after_stores(self, reply: list[Any] | None) -> None:
        """
        Take the read once every store call sent before it came back has
        answered. The script that woke the read answers on another
        connection, and Redis writes the read's reply first: taken at once,
        this daemon's own events would be decoded again rather than handed
        on as they are (a third of a tick's cost).
        """
        if self._stores_open:
            self._unread = (self._stores_sent, reply)
        else:
            self._take(reply)

    def _take_unread(self) -> None:
        unread = self._unread
        if unread is not None and self.running and (
                not self._stores_open or min(self._stores_open) >= unread[0]):
            self._unread = None
            self._take(unread[1])

    def _take(self, reply: list[Any] | None) -> None:
        try:
            self._batch(reply)
        except Exception:
            self._read_failed(Failure())
            return
        self._drain()

    def on_gap(self, listener: Callable[[str], object]) -> None:
        """Call C{listener(topic)} when live delivery of C{topic} skipped events."""
        self._gap_listeners.append(listener)

    def _check_gaps(self, replies: list[Any]) -> list[Any] | None:
        """
        Notice entries trimmed before this tail read them (it fell further
        behind than the history keeps, e.g. while its connection was down):
        a drop mark newer than where the read started and older than the
        first entry it returned means live subscribers missed events.
        """
        reply, marks = replies
        first = {text(key): text(entries[0][0]) for key, entries in reply or () if entries}
        for key, mark in zip(self._keys, marks):
            if not mark:
                continue
            dropped = id_key(text(mark))
            if key not in first or dropped < id_key(first[key]):
                self.tail_gaps += 1
                self._log.warn("redis history: live delivery of {key} fell behind its "
                               "trimming; its subscribers are told to resume", key=key)
                for listener in self._gap_listeners:
                    listener(key[len(PREFIX):])
        return reply

    def _start_at(self, last: bytes | None) -> None:
        start = "0-0" if last is None else text(last)
        self._positions = {key: start for key in self._keys}
        self.position = start
        waiters, self._positioned = self._positioned, []
        for waiter in waiters:
            waiter.callback(None)

    @staticmethod
    def _cancel(result: Any, watchdog: IDelayedCall) -> Any:
        if watchdog.active():
            watchdog.cancel()
        return result

    def _hung(self, conn: Any) -> None:
        self._log.warn("redis history: no reply to XREAD in time; reconnecting")
        if conn.transport is not None:
            conn.transport.abortConnection()

    def _read_failed(self, failure: Any) -> None:
        self.tail_errors += 1
        message = failure.getErrorMessage()
        if self.running:
            self._log.warn("redis history: reading failed ({e}); retrying", e=message)
        factory = self._factory
        if "NOSCRIPT" in message and factory is not None:
            # Redis's script cache was flushed: a new connection loads it.
            for conn in list(factory.pool):
                conn.transport.loseConnection()
        self._schedule(0.1)

    def _batch(self, reply: list[Any] | None) -> None:
        """
        Deliver what XREAD returned, in id order across topics. A stream cut
        short by COUNT may hold older entries than other streams' newest, so
        events past the oldest cut are held for the next read.
        """
        self.tail_reads += 1
        assert self._positions is not None
        events, self._held = self._held, []
        kept = self._stored
        merge = bool(events)
        cut: tuple[int, int] | None = None
        for key, entries in reply or ():
            key = text(key)
            if not entries:
                continue
            if events:
                merge = True
            self._positions[key] = text(entries[-1][0])
            topic = key[len(PREFIX):]
            for entry in entries:
                event = kept.pop(text(entry[0]), None)
                events.append(_entry_event(entry, topic) if event is None else event)
            if len(entries) >= TAIL_COUNT:
                last = id_key(self._positions[key])
                cut = last if cut is None else min(cut, last)
        if merge:  # one stream's entries are in order already
            events.sort(key=lambda e: id_key(e.id))
        if cut is None:
            self._ready.extend(events)
            return
        for event in events:
            if id_key(event.id) > cut:
                self._held.append(event)
            else:
                self._ready.append(event)

    def _drain(self) -> None:
        """Deliver the events read, L{TAIL_CHUNK} per reactor turn, then read on."""
        self._reading = None
        ready = self._ready
        budget = TAIL_CHUNK_BYTES
        for _ in range(min(TAIL_CHUNK, len(ready))):
            if budget <= 0:
                break
            event = ready.popleft()
            budget -= event.size
            self.position = event.id
            for receiver in self._receivers:
                try:
                    receiver(event)
                except Exception:
                    self._log.failure("delivering event {id} failed", id=event.id)
        if ready:
            if self.running:
                self._reading = self._reactor.callLater(0, self._drain)
        else:
            self._schedule(0)
