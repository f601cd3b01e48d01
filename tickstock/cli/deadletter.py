"""
C{tickstock-deadletter}: read the dead letters the daemon keeps in the Redis
list C{tickstock:deadletter}, and replay them once the configuration that
refused them is fixed: each is normalized again with the channels of the
same TOML file the daemon reads, and what is accepted now is sent again on
its original Redis name and removed from the list.

Everything in a dead letter came from the producer, so nothing of it reaches
the terminal unescaped.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn

import orjson
import txredisapi

from tickstock.config import ENV_PREFIX, ConfigError, parse_redis_url, read_toml
from tickstock.connections.address import RedisAddress
from tickstock.connections.redis import DEADLETTER_BYTES as KEPT_BYTES
from tickstock.connections.redis import DEADLETTER_KEY
from tickstock.domain.events import MalformedEvent
from tickstock.domain.topics import DEFAULT_REGISTRY, Registry, configure
from tickstock.ingest.normalize import Probe, parse_event

CONFIG_ENV = ENV_PREFIX + "CONFIG"
PREVIEW = 60

DESCRIPTION = (
    f"List, show and replay the producer messages TickStock refused, kept in the Redis list "
    f"{DEADLETTER_KEY} (newest first, index 0). After fixing the configuration that refused "
    "them, and restarting the daemon with it, replay normalizes each again with the channels "
    f"of the same TOML file (--config, default ${CONFIG_ENV}); each one accepted now is sent "
    "again on the Redis channel it came on and removed from the list."
)
"""The C{--help} text: plain sentences, since argparse shows it as it is."""

EPILOG = ("Exit status: 0 done, 1 Redis unreachable or a command failed (replay: one dead "
          "letter or more could not be sent), 2 a usage or config error.")

# Checking the record is there, sending the message again and removing the
# record in one step: two replays at once send a message once, a dead letter
# pushed meanwhile is kept, and a send that fails (a key of another type)
# removes nothing, since a script's writes before an error stay.
_RESEND = """
if not redis.call('LPOS', KEYS[1], ARGV[1]) then return 0 end
if #KEYS == 2 then redis.call('XADD', KEYS[2], '*', 'data', ARGV[3])
else redis.call('PUBLISH', ARGV[2], ARGV[3]) end
redis.call('LREM', KEYS[1], 1, ARGV[1])
return 1
"""


class Usage(Exception):
    """The command line asked for something the list does not have."""


@dataclass(frozen=True)
class DeadLetter:
    """One element of the list, as read: C{raw} is L{None} when it is no dead-letter record."""

    index: int
    element: bytes
    channel: str
    reason: str
    at: float | None
    raw: str | None

    @property
    def kind(self) -> str:
        return self.reason.split(":", 1)[0]


def read_entry(index: int, element: bytes) -> DeadLetter:
    """The record at C{index}; one of another shape is kept, to be shown as such."""
    try:
        record = orjson.loads(element)
    except orjson.JSONDecodeError:
        record = None
    if not (isinstance(record, dict) and isinstance(record.get("channel"), str)
            and isinstance(record.get("raw"), str)):
        return DeadLetter(index, element, "?", "bad_record: not a dead-letter record", None, None)
    at = record.get("at")
    return DeadLetter(index, element, record["channel"], str(record.get("reason", "")),
                      at if isinstance(at, (int, float)) and not isinstance(at, bool) else None,
                      record["raw"])


def printable(text: str) -> str:
    """C{text} with control and other unprintable characters escaped: it is the producer's."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def when(at: float | None) -> str:
    if at is None:
        return "?"
    try:
        return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return "?"


def still_refused(entry: DeadLetter, registry: Registry, now: float) -> str | None:
    """
    Why the normalizer refuses this dead letter now (C{kind: detail}), or
    L{None} when it accepts it (a liveness probe included: the daemon counts
    it). A record that cannot hold the message as it came is refused too.
    """
    if entry.raw is None:
        return entry.reason
    raw = entry.raw.encode("utf-8")
    if len(raw) >= KEPT_BYTES:
        return f"cut: only the first {KEPT_BYTES} bytes were kept"
    if entry.kind == "not_json" and "\ufffd" in entry.raw:
        return "altered: its bytes that were not UTF-8 were replaced when it was kept"
    try:
        parse_event(entry.channel, raw, "", now, registry)
    except Probe:
        return None
    except MalformedEvent as error:
        return f"{error.kind}: {error}"
    return None


def load_registry(path: str | None) -> Registry:
    """
    The channels of the TOML file at C{path} (the defaults without one),
    built as the daemon builds them.

    @raise ConfigError: one line per problem.
    """
    if not path:
        return DEFAULT_REGISTRY
    tables = read_toml(path).get("channels", {})
    try:
        if not isinstance(tables, dict):
            raise ValueError("[channels] must be a table of channel tables")
        return configure(tables)
    except ValueError as error:
        raise ConfigError(*(f"--config: {line}" for line in str(error).splitlines())) from None


def matches(entry: DeadLetter, args: argparse.Namespace) -> bool:
    return ((args.channel is None or fnmatch.fnmatchcase(entry.channel, args.channel))
            and (args.reason is None or entry.kind == args.reason))


def chosen(entries: list[DeadLetter], indexes: list[int]) -> list[DeadLetter]:
    """The entries at C{indexes}, in the list's order; all of them when none is given."""
    wrong = [i for i in indexes if not 0 <= i < len(entries)]
    if wrong:
        raise Usage(f"no dead letter {wrong[0]}: {DEADLETTER_KEY} holds "
                    + (f"0-{len(entries) - 1}" if entries else "none"))
    wanted = set(indexes)
    return [e for e in entries if e.index in wanted] if wanted else entries


Outcome = tuple[list[str], int]
"""What a command prints, and its exit status."""


async def run_list(entries: list[DeadLetter], args: argparse.Namespace, _: Any) -> Outcome:
    found = [entry for entry in entries if matches(entry, args)]
    shown = found[:args.limit] if args.limit else found
    lines = []
    for entry in shown:
        raw = entry.raw if entry.raw is not None else entry.element.decode("utf-8", "replace")
        preview = printable(raw[:PREVIEW]) + ("..." if len(raw) > PREVIEW else "")
        lines.append(f"{entry.index:>4}  {when(entry.at)}  {printable(entry.channel)}  "
                     f"{printable(entry.reason)}  {preview}")
    if not entries:
        lines.append(f"{DEADLETTER_KEY} is empty")
    elif not found:
        lines.append(f"none of the {len(entries)} dead letters match")
    elif len(shown) < len(found):
        lines.append(f"({len(found) - len(shown)} more match; --limit 0 shows all)")
    return lines, 0


async def run_show(entries: list[DeadLetter], args: argparse.Namespace, _: Any) -> Outcome:
    entry = chosen(entries, [args.index])[0]
    try:
        record = orjson.loads(entry.element)
    except orjson.JSONDecodeError:
        record = entry.element.decode("utf-8", "replace")
    # ensure_ascii: every character past ASCII escaped, so none can drive the terminal.
    return [json.dumps(record, indent=2, ensure_ascii=True)], 0


async def run_replay(entries: list[DeadLetter], args: argparse.Namespace,
                     redis: Any) -> Outcome:
    selected = [entry for entry in chosen(entries, args.indexes) if matches(entry, args)]
    now = time.time()
    lines: list[str] = []
    refused: Counter[str] = Counter()
    sent = gone = failed = 0
    for entry in selected:
        why = still_refused(entry, args.registry, now)
        channel = printable(entry.channel)
        if why is not None or entry.raw is None:
            refused[str(why).split(":", 1)[0]] += 1
            lines.append(f"{entry.index:>4}  refused   {channel}  {printable(str(why))}")
            continue
        if args.dry_run:
            lines.append(f"{entry.index:>4}  accepted  {channel}")
            continue
        keys = [DEADLETTER_KEY] + ([entry.channel] if args.mode == "streams" else [])
        try:
            done = await redis.execute_command("EVAL", _RESEND, len(keys), *keys, entry.element,
                                               entry.channel, entry.raw.encode("utf-8"))
        except Exception as error:
            failed += 1
            lines.append(f"{entry.index:>4}  failed    {channel}  "
                         f"{printable(' '.join(str(error).split()))}")
            continue
        if done:
            sent += 1
            lines.append(f"{entry.index:>4}  re-sent   {channel}")
        else:
            gone += 1
            lines.append(f"{entry.index:>4}  gone      {channel}  (no longer in the list)")
    accepted = len(selected) - sum(refused.values())
    if args.dry_run:
        lines.append(f"accepted {accepted} of {len(selected)} (dry run: nothing re-sent or "
                     "removed)")
    else:
        lines.append(f"accepted {accepted} of {len(selected)}: {sent} re-sent and removed"
                     + (f", {gone} no longer in the list" if gone else "")
                     + (f", {failed} could not be sent (kept)" if failed else ""))
    lines.append(f"still refused {sum(refused.values())}"
                 + (": " + ", ".join(f"{kind} {n}" for kind, n in sorted(refused.items()))
                    if refused else ""))
    return lines, 1 if failed else 0


def parse_args(argv: list[str] | None, environ: Mapping[str, str]) -> argparse.Namespace:
    """The command line, with the channels of the config file loaded."""
    parser = argparse.ArgumentParser(prog="tickstock-deadletter", description=DESCRIPTION,
                                     epilog=EPILOG)
    parser.add_argument("--redis", required=True, help="redis://[:password@]host[:port][/db]")
    parser.add_argument("--config", default=environ.get(CONFIG_ENV),
                        help=f"the daemon's TOML file, for its [channels] (default: ${CONFIG_ENV})")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for Redis to connect or answer (default 10)")
    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--channel",
                         help="only dead letters of this Redis channel (* matches any)")
    filters.add_argument("--reason",
                         help="only dead letters refused for this kind (missing_field, ...)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = commands.add_parser(
        "list", parents=[filters], help="one line per dead letter, newest first",
        description="Print one line per dead letter, newest first: its index, when it was "
                    "refused, its channel, the reason and the start of the message.")
    listing.add_argument("--limit", type=int, default=100,
                         help="print at most this many (default 100; 0: all)")
    listing.set_defaults(run=run_list)
    show = commands.add_parser(
        "show", help="one dead letter whole, as JSON",
        description="Print the dead letter at this index (as list shows it) whole, as JSON.")
    show.add_argument("index", type=int, help="its index (0: the newest)")
    show.set_defaults(run=run_show)
    replay = commands.add_parser(
        "replay", parents=[filters], help="normalize again and re-send what is accepted now",
        description="Normalize the dead letters at these indexes (default: all) again with "
                    "the config file's channels. Each one accepted now is published again on "
                    "the channel it came on (added to that stream with --mode streams) and "
                    "removed from the list, in one step. It prints a line per dead letter and "
                    "a summary.")
    replay.add_argument("indexes", type=int, nargs="*", metavar="N",
                        help="indexes, as list shows them")
    replay.add_argument("--dry-run", action="store_true",
                        help="only say what would be accepted; send and remove nothing")
    replay.add_argument("--mode", choices=("pubsub", "streams"), default="pubsub",
                        help="PUBLISH (pubsub, default) or XADD with a data field (streams), as "
                             "the producer does")
    replay.set_defaults(run=run_replay)
    args = parser.parse_args(argv)
    try:
        args.address = parse_redis_url(args.redis)
    except ValueError as error:
        parser.error(f"--redis: {error}")
    if args.address.sentinels:
        parser.error("--redis: give the master's address")
    if not 0 < args.timeout <= 3600:
        parser.error("--timeout: must be more than 0 and at most 3600")
    if getattr(args, "limit", 0) < 0:
        parser.error("--limit: must be 0 or more")
    try:
        args.registry = load_registry(args.config)
    except ConfigError as error:
        parser.error("; ".join(error.problems))
    return args


async def run(reactor: Any, args: argparse.Namespace) -> None:
    address: RedisAddress = args.address
    try:
        redis = await txredisapi.Connection(
            address.host, address.port, dbid=address.db, reconnect=False, charset=None,
            password=address.password, username=address.username,
            connectTimeout=args.timeout, replyTimeout=args.timeout, convertNumbers=False,
        ).addTimeout(args.timeout, reactor)
    except Exception as error:
        _fail(1, f"cannot connect to {address}: {str(error) or type(error).__name__}")
    try:
        elements = await redis.execute_command("LRANGE", DEADLETTER_KEY, 0, -1)
        entries = [read_entry(i, element) for i, element in enumerate(elements)]
        lines, code = await args.run(entries, args, redis)
    except Usage as error:
        _fail(2, str(error))
    except Exception as error:
        _fail(1, f"{address}: {str(error) or type(error).__name__}")
    finally:
        await redis.disconnect()
    sys.stdout.write("".join(line + "\n" for line in lines))
    if code:
        raise SystemExit(code)


def _fail(code: int, message: str) -> NoReturn:
    sys.stderr.write(f"tickstock-deadletter: {' '.join(message.split())}\n")
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    from twisted.internet.task import react

    args = parse_args(argv, os.environ)
    react(run, [args])
