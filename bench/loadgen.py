#!/usr/bin/env python3
"""
TickStock delivery-latency load generator: many WebSocket clients in one
process, one asyncio event loop.

It is independent of the server's code (it does not import tickstock): it
speaks the public WebSocket protocol of CONTRACT.md section 3 with a minimal
RFC 6455 client written for speed. Server-to-client frames are unmasked, so
reading one is a few byte operations; only the event frames that matter are
parsed (orjson), and the receive time of a frame is taken once per socket
read, before any parsing, so the loadgen's own parsing does not inflate the
latency it measures.

Control, over stdin/stdout (one line each):

  loadgen -> parent   READY {"clients":C,"connect_s":...}   every client subscribed
  parent  -> loadgen  END {"per_symbol":{"AAPL":n,...}}      publishing is over;
                                                             n = measured events per symbol
  loadgen -> parent   DONE {"complete":bool}                 every expected delivery arrived
                                                             (or the drain timeout passed)
  loadgen -> parent   RESULT {...}                           the results (see README.md)

Latency of one delivery = wall-clock receive time - data.sent_at (the
publisher's time.time() at publish). Events whose sequence number (the
number after the last "-" of data.event_id) is below --warmup-events are
counted separately and not sampled.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import hashlib
import os
import resource
import socket
import sys
import time
from array import array
from typing import Any

import orjson

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
EVENT_PREFIX = b'{"op":"event"'


def mask_frame(opcode: int, payload: bytes) -> bytes:
    """A client-to-server frame (FIN set, masked, as RFC 6455 requires)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = os.urandom(4)
    if n:
        stream = (key * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    else:
        masked = b""
    return header + key + masked


class Stats:
    """Everything measured, shared by all clients."""

    def __init__(self, warmup_events: int) -> None:
        self.warmup_events = warmup_events
        self.latencies = array("d")      # seconds, measured deliveries only
        self.received = 0                # measured deliveries, distinct (client, event)
        self.warmup_received = 0
        self.duplicates = 0
        self.out_of_order = 0
        self.misrouted = 0               # symbol or subscription id not the client's
        self.bad_frames = 0
        self.errors: list[Any] = []      # {"op":"error"} replies, first few
        self.closes: dict[str, int] = {}  # close codes seen from the server
        self.lost_connections = 0
        self.expected_total: int | None = None
        self.done: asyncio.Future[bool] | None = None
        self.last_progress = time.monotonic()


class Client(asyncio.Protocol):
    """One WebSocket client subscribed to one symbol's patterns."""

    def __init__(self, stats: Stats, index: int, symbol: str, host: str, port: int,
                 path: str, subscribed: asyncio.Future[None]) -> None:
        self.stats = stats
        self.index = index
        self.symbol = symbol
        self.host = host
        self.port = port
        self.path = path
        self.subscribed = subscribed
        self.transport: asyncio.Transport | None = None
        self.handshaking = True
        self.key = base64.b64encode(os.urandom(16))
        self.buf = b""
        self.fragments: list[bytes] | None = None
        self.seen = bytearray()          # seen[seq] = 1 once event seq arrived
        self.last_seq = -1
        self.count = 0                   # measured deliveries to this client
        self.expected = 0
        self.open = False

    # transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(  # type: ignore[attr-defined]
            b"GET " + self.path.encode() + b" HTTP/1.1\r\n"
            b"Host: " + f"{self.host}:{self.port}".encode() + b"\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + self.key + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if self.open:
            self.stats.lost_connections += 1
        self.open = False
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(
                f"client {self.index}: connection lost before subscribing ({exc})"))

    def data_received(self, data: bytes) -> None:
        now = time.time()  # arrival time of every frame in this read
        if self.buf:
            data = self.buf + data
            self.buf = b""
        if self.handshaking:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                return
            self._handshake(data[:end])
            data = data[end + 4:]
            if not data:
                return
        n = len(data)
        pos = 0
        while n - pos >= 2:
            b0 = data[pos]
            b1 = data[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = int.from_bytes(data[pos + 2:pos + 4], "big")
                head = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2:pos + 10], "big")
                head = 10
            if b1 & 0x80 or b0 & 0x70:
                self._fail("masked or RSV bits set in a server frame")
                return
            end = pos + head + length
            if end > n:
                break
            payload = data[pos + head:end]
            pos = end
            opcode = b0 & 0x0F
            if opcode == 1 and b0 & 0x80 and self.fragments is None:
                self._text(payload, now)
            else:
                self._other(b0 & 0x80, opcode, payload, now)
        if pos < n:
            self.buf = data[pos:]

    # protocol

    def _handshake(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        if not lines[0].startswith(b"HTTP/1.1 101"):
            self._fail(f"handshake refused: {lines[0]!r}")
            return
        accept = base64.b64encode(hashlib.sha1(self.key + WS_GUID).digest())
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if headers.get(b"sec-websocket-accept") != accept:
            self._fail("bad Sec-WebSocket-Accept")
            return
        self.handshaking = False
        self.open = True
        self.send({"op": "hello", "user": f"bench-{self.index}"})

    def send(self, message: dict[str, Any]) -> None:
        assert self.transport is not None
        self.transport.write(mask_frame(1, orjson.dumps(message)))

    def _text(self, payload: bytes, now: float) -> None:
        stats = self.stats
        if payload.startswith(EVENT_PREFIX):
            try:
                message = orjson.loads(payload)
                data = message["data"]
                sent_at = data["sent_at"]
                event_id = data["event_id"]
                seq = int(event_id[event_id.rfind("-") + 1:])
            except Exception:
                stats.bad_frames += 1
                return
            if message.get("sub") != "s1" or data.get("symbol") != self.symbol:
                stats.misrouted += 1
            seen = self.seen
            if seq >= len(seen):
                seen.extend(bytes(seq + 1024 - len(seen)))
            if seen[seq]:
                stats.duplicates += 1
                return
            seen[seq] = 1
            if seq < self.last_seq:
                stats.out_of_order += 1
            else:
                self.last_seq = seq
            if seq < stats.warmup_events:
                stats.warmup_received += 1
                return
            stats.latencies.append(now - sent_at)
            self.count += 1
            stats.received += 1
            if stats.expected_total is not None and stats.received >= stats.expected_total:
                if stats.done is not None and not stats.done.done():
                    stats.done.set_result(True)
            return
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            stats.bad_frames += 1
            return
        op = message.get("op")
        if op == "welcome":
            self.send({"op": "subscribe", "id": "s1", "topic": "patterns",
                       "filter": {"symbols": [self.symbol]}})
        elif op == "subscribed" and message.get("id") == "s1":
            if not self.subscribed.done():
                self.subscribed.set_result(None)
        elif op == "error":
            if len(stats.errors) < 10:
                stats.errors.append(message)
            if not self.subscribed.done():
                self.subscribed.set_exception(RuntimeError(f"client {self.index}: {message}"))
        # anything else (pong, future ops) is ignored

    def _other(self, fin: int, opcode: int, payload: bytes, now: float) -> None:
        if opcode == 9:  # ping
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(mask_frame(10, payload))
        elif opcode == 10:  # pong
            pass
        elif opcode == 8:  # close
            code = str(int.from_bytes(payload[:2], "big")) if len(payload) >= 2 else "none"
            self.stats.closes[code] = self.stats.closes.get(code, 0) + 1
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(mask_frame(8, payload[:2]))
                self.transport.close()
        elif opcode in (0, 1, 2):  # fragmented message
            if opcode in (1, 2):
                self.fragments = [payload]
            elif self.fragments is not None:
                self.fragments.append(payload)
            else:
                self._fail("continuation frame without a start")
                return
            if fin:
                whole = b"".join(self.fragments)
                self.fragments = None
                self._text(whole, now)
        else:
            self._fail(f"unknown opcode {opcode}")

    def _fail(self, reason: str) -> None:
        self.stats.bad_frames += 1
        if len(self.stats.errors) < 10:
            self.stats.errors.append({"client": self.index, "protocol_error": reason})
        if not self.subscribed.done():
            self.subscribed.set_exception(RuntimeError(f"client {self.index}: {reason}"))
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if self.open:
                self.open = False
                self.transport.write(mask_frame(8, (1000).to_bytes(2, "big")))
            self.transport.close()


def percentiles(samples: array, points: tuple[float, ...]) -> dict[str, float | None]:
    """Nearest-rank percentiles of C{samples} (seconds), in milliseconds."""
    out: dict[str, float | None] = {}
    if not samples:
        for p in points:
            out[f"p{p:g}"] = None
        out.update(max=None, min=None, mean=None)
        return out
    ordered = sorted(samples)
    n = len(ordered)
    for p in points:
        rank = max(1, -(-n * p // 100))  # ceil(n * p / 100)
        out[f"p{p:g}"] = round(ordered[int(rank) - 1] * 1000, 3)
    out["max"] = round(ordered[-1] * 1000, 3)
    out["min"] = round(ordered[0] * 1000, 3)
    out["mean"] = round(sum(ordered) / n * 1000, 3)
    return out


def emit(tag: str, body: dict[str, Any]) -> None:
    sys.stdout.write(tag + " " + orjson.dumps(body).decode() + "\n")
    sys.stdout.flush()


async def read_line(reader: asyncio.StreamReader) -> str:
    line = await reader.readline()
    if not line:
        raise EOFError("parent closed stdin")
    return line.decode().strip()


async def run(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    symbols = [s for s in args.symbols.split(",") if s]
    stats = Stats(args.warmup_events)
    clients: list[Client] = []
    gate = asyncio.Semaphore(args.connect_concurrency)

    async def open_client(index: int) -> None:
        symbol = symbols[index % len(symbols)]
        subscribed: asyncio.Future[None] = loop.create_future()
        async with gate:
            for attempt in range(3):
                try:
                    _, client = await loop.create_connection(
                        lambda: Client(stats, index, symbol, args.host, args.port, args.path,
                                       subscribed),
                        args.host, args.port)
                    break
                except OSError:
                    if attempt == 2:
                        raise
                    await asyncio.sleep(0.2)
            clients.append(client)
            await asyncio.wait_for(subscribed, args.connect_timeout)

    started = time.monotonic()
    await asyncio.gather(*(open_client(i) for i in range(args.clients)))
    connect_s = time.monotonic() - started

    # stdin: the parent's commands
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    # No cyclic garbage is made per event; a collection pause would show up as
    # latency that is the loadgen's, not the server's.
    gc.collect()
    gc.freeze()
    gc.disable()
    emit("READY", {"clients": len(clients), "connect_s": round(connect_s, 3), "pid": os.getpid()})

    line = await read_line(reader)
    if not line.startswith("END "):
        raise RuntimeError(f"expected END, got {line!r}")
    per_symbol = orjson.loads(line[4:])["per_symbol"]
    for client in clients:
        client.expected = int(per_symbol.get(client.symbol, 0))
    stats.expected_total = sum(client.expected for client in clients)
    stats.done = loop.create_future()
    if stats.received >= stats.expected_total:
        stats.done.set_result(True)

    # Wait for every expected delivery, or until nothing has arrived for
    # --drain seconds (something was lost), or the hard cap.
    deadline = time.monotonic() + args.max_wait
    last_count, last_change = stats.received, time.monotonic()
    complete = False
    while True:
        try:
            await asyncio.wait_for(asyncio.shield(stats.done), 0.05)
            complete = True
            break
        except asyncio.TimeoutError:
            pass
        now = time.monotonic()
        if stats.received != last_count:
            last_count, last_change = stats.received, now
        if now - last_change > args.drain or now > deadline:
            break
    done_at = time.time()
    emit("DONE", {"complete": complete, "received": stats.received, "at": done_at})

    usage = resource.getrusage(resource.RUSAGE_SELF)
    counts = [client.count for client in clients]
    short = [(c.index, c.symbol, c.count, c.expected) for c in clients if c.count != c.expected]
    result = {
        "clients": len(clients),
        "connect_s": round(connect_s, 3),
        "expected": stats.expected_total,
        "received": stats.received,
        "complete": complete,
        "warmup_received": stats.warmup_received,
        "duplicates": stats.duplicates,
        "out_of_order": stats.out_of_order,
        "misrouted": stats.misrouted,
        "bad_frames": stats.bad_frames,
        "lost_connections": stats.lost_connections,
        "server_closes": stats.closes,
        "errors": stats.errors,
        "per_client": {
            "min": min(counts) if counts else 0,
            "max": max(counts) if counts else 0,
            "clients_short": len(short),
            "first_short": short[:5],
        },
        "latency_ms": percentiles(stats.latencies, (50, 90, 99, 99.9)),
        "samples": len(stats.latencies),
        "loadgen_cpu_s_total": round(usage.ru_utime + usage.ru_stime, 3),
    }
    for client in clients:
        client.close()
    await asyncio.sleep(0.05)
    emit("RESULT", result)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/ws")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--symbols", default="AAPL",
                        help="comma-separated; client k subscribes to symbols[k %% N]")
    parser.add_argument("--warmup-events", type=int, default=0,
                        help="events with a sequence number below this are warm-up")
    parser.add_argument("--connect-concurrency", type=int, default=50)
    parser.add_argument("--connect-timeout", type=float, default=30.0)
    parser.add_argument("--drain", type=float, default=3.0,
                        help="after END, give up when nothing arrived for this long (s)")
    parser.add_argument("--max-wait", type=float, default=120.0,
                        help="after END, give up after this long in any case (s)")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run(args))
    except (EOFError, KeyboardInterrupt):
        return 1
    except Exception as error:  # report, in one line, what went wrong
        emit("FAILED", {"error": f"{type(error).__name__}: {error}"})
        return 1


if __name__ == "__main__":
    sys.exit(main())
