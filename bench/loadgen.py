#!/usr/bin/env python3
"""
TickStock delivery-latency load generator: many WebSocket clients in one
process, one epoll loop, no framework.

It is independent of the server's code (it does not import tickstock): it
speaks the public WebSocket protocol of docs/contract.md §3 with a minimal
RFC 6455 client written for speed. --endpoint picks what its clients speak
over that WebSocket: the native protocol on /ws (ws), Socket.IO v5 over
Engine.IO v4's websocket-only transport on /socket.io/ (socketio: the same
JWT in the CONNECT auth, the same subscription as an event with an ack, each
event's /ws frame as the payload of an "event" event), or the reference
peers' rooms (peer: bench/peer_socketio.py, and bench/node/server.mjs with
--peer-token, its CONNECT carrying the same JWT). Server-to-client frames are
unmasked, so reading one is a few byte operations; only event frames are
decoded (orjson).

Receive time: each socket read asks the kernel for the time the data arrived
on the socket (SO_TIMESTAMPNS), so latency does not include the time this
process took to get round to the socket. The time of the read itself
(time.time() when this loop read it) is kept too, as a check on the
generator: the two differ only when the generator falls behind.

Control, over stdin/stdout (one line each):

  loadgen -> parent   READY {"clients":C,...}            every client subscribed
  parent  -> loadgen  END {"per_symbol":{"AAPL":n,...}}  publishing is over;
                                                         n = measured events per symbol
  loadgen -> parent   DONE {"complete":bool,...}         every expected delivery arrived
                                                         (or the drain timeout passed)
  loadgen -> parent   RESULT {...}                       the results
  loadgen -> parent   FAILED {"error":"..."}             it could not go on

Latency of one delivery = receive time - data.sent_at (the publisher's
time.time() just before it sent the PUBLISH). Events whose sequence number
(the number after the last "-" of data.event_id) is below --warmup-events
are warm-up: counted apart and not sampled.
"""

from __future__ import annotations

import argparse
import base64
import errno
import gc
import hashlib
import hmac
import json
import os
import resource
import select
import socket
import struct
import sys
import time
from array import array
from typing import Any

import orjson

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
EVENT_PREFIX = b'{"op":"event"'
SIO_EVENT_PREFIX = b'42["event",'
SIO_SUBSCRIBED_ACK = b"431"  # the ack of the subscribe event sent with ack id 1
SIO_PATH = "/socket.io/?EIO=4&transport=websocket"
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; Python has no constant
SCM_TIMESTAMPNS = SO_TIMESTAMPNS
ANC_SIZE = socket.CMSG_SPACE(16)
READ_SIZE = 256 * 1024

CONNECTING, HANDSHAKE, HELLO, SUBSCRIBING, LIVE, CLOSED = range(6)



def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def mint_token(user: str, ttl: float = 3600.0) -> str:
    """An HS256 JWT for C{user}, signed with $TICKSTOCK_JWT_SECRET (no server code used)."""
    secret = os.environ["TICKSTOCK_JWT_SECRET"].strip().encode()
    header = _b64(b'{"alg":"HS256","typ":"JWT"}')
    claims = _b64(json.dumps({"sub": user, "exp": int(time.time() + ttl)}).encode())
    signature = _b64(hmac.new(secret, header + b"." + claims, hashlib.sha256).digest())
    return (header + b"." + claims + b"." + signature).decode()


class Failure(RuntimeError):
    """The load generator cannot go on."""


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A client-to-server frame: FIN set, masked, as RFC 6455 requires."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = os.urandom(4)
    if not n:
        return header + key
    stream = (key * (n // 4 + 1))[:n]
    return header + key + (
        int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


class Stats:
    """What every client measures, in one place."""

    def __init__(self, warmup_events: int) -> None:
        self.warmup_events = warmup_events
        self.kernel_lat = array("d")    # seconds: kernel receive time - sent_at
        self.app_lat = array("d")       # seconds: time this loop read it - sent_at
        self.received = 0               # measured deliveries, distinct (client, event)
        self.warmup_received = 0
        self.duplicates = 0
        self.out_of_order = 0
        self.misrouted = 0              # not the client's symbol or subscription id
        self.bad_frames = 0
        self.untimed_reads = 0          # reads without a kernel timestamp
        self.errors: list[Any] = []     # first few {"op":"error"} replies / protocol errors
        self.closes: dict[str, int] = {}
        self.lost_connections = 0
        # By the second of sent_at: [deliveries, max latency in seconds]
        self.timeline: dict[int, list[float]] = {}


class Client:
    """One WebSocket client subscribed to the patterns of its symbols."""

    __slots__ = ("loop", "stats", "index", "symbols", "sock", "fd", "state", "key", "buf",
                 "out", "fragments", "seen", "last_seq", "count", "expected")

    def __init__(self, loop: Loop, index: int, symbols: list[str]) -> None:
        self.loop = loop
        self.stats = loop.stats
        self.index = index
        self.symbols = symbols
        self.state = CONNECTING
        self.key = base64.b64encode(os.urandom(16))
        self.buf = b""
        self.out = b""
        self.fragments: list[bytes] | None = None
        self.seen = bytearray()
        self.last_seq = -1
        self.count = 0
        self.expected = 0
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock = sock
        self.fd = sock.fileno()
        err = sock.connect_ex((loop.host, loop.port))
        if err not in (0, errno.EINPROGRESS):
            raise Failure(f"client {index}: connect: {os.strerror(err)}")

    # writing

    def write(self, data: bytes) -> None:
        if self.state == CLOSED:
            return
        if self.out:
            self.out += data
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as error:
            self.lost(f"send: {error}")
            return
        if sent < len(data):
            self.out = data[sent:]
            self.loop.want_write(self, True)

    def writable(self) -> None:
        if self.state == CONNECTING:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.loop.connect_failed(self, os.strerror(err))
                return
            self.state = HANDSHAKE
            self.loop.want_write(self, False)
            self.write(
                b"GET " + self.loop.path + b" HTTP/1.1\r\n"
                b"Host: " + self.loop.host_header + b"\r\n"
                b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: " + self.key + b"\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n")
            return
        data, self.out = self.out, b""
        self.loop.want_write(self, False)
        if data:
            self.write(data)

    def send_json(self, message: dict[str, Any]) -> None:
        self.write(client_frame(1, orjson.dumps(message)))

    # reading

    def readable(self, view: memoryview) -> None:
        try:
            n, anc, _, _ = self.sock.recvmsg_into((view,), ANC_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self.lost(f"recv: {error}")
            return
        now = time.time()
        if n == 0:
            self.lost("the server closed the connection")
            return
        stamp = now
        if anc:
            sec, nsec = struct.unpack_from("qq", anc[0][2])
            stamp = sec + nsec * 1e-9
        else:
            self.stats.untimed_reads += 1
        data = self.buf + view[:n] if self.buf else view[:n].tobytes()
        self.buf = b""
        if self.state == HANDSHAKE:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                return
            self.handshake(data[:end])
            data = data[end + 4:]
        self.frames(data, stamp, now)

    def frames(self, data: bytes, stamp: float, now: float) -> None:
        n = len(data)
        pos = 0
        while n - pos >= 2 and self.state != CLOSED:
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
                self.fail("masked frame or RSV bits set in a server frame")
                return
            end = pos + head + length
            if end > n:
                break
            payload = data[pos + head:end]
            pos = end
            if b0 == 0x81 and self.fragments is None:
                self.text(payload, stamp, now)
            else:
                self.other(b0 & 0x80, b0 & 0x0F, payload, stamp, now)
        if pos < n:
            self.buf = data[pos:]

    def handshake(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        if not lines[0].startswith(b"HTTP/1.1 101"):
            self.fail(f"handshake refused: {lines[0].decode('latin-1')}")
            return
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        accept = base64.b64encode(hashlib.sha1(self.key + WS_GUID).digest())
        if headers.get(b"sec-websocket-accept") != accept:
            self.fail("bad Sec-WebSocket-Accept")
            return
        self.state = HELLO
        if self.loop.endpoint == "ws":
            self.send_json({"op": "hello", "token": mint_token(f"bench-{self.index}")})

    def text(self, payload: bytes, stamp: float, now: float) -> None:
        endpoint = self.loop.endpoint
        if endpoint == "socketio":
            self.socketio_text(payload, stamp, now)
            return
        if endpoint == "peer":
            self.peer_text(payload, stamp, now)
            return
        stats = self.stats
        if payload.startswith(EVENT_PREFIX):
            try:
                message = orjson.loads(payload)
            except orjson.JSONDecodeError:
                stats.bad_frames += 1
                return
            self.event(message, stamp, now)
            return
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            stats.bad_frames += 1
            return
        op = message.get("op") if isinstance(message, dict) else None
        if op == "welcome" and self.state == HELLO:
            self.state = SUBSCRIBING
            self.send_json({"op": "subscribe", "id": "s1", "topic": "patterns",
                            "filter": {"symbols": self.symbols}})
        elif op == "subscribed" and message.get("id") == "s1" and self.state == SUBSCRIBING:
            self.went_live()
        elif op == "error":
            if len(stats.errors) < 10:
                stats.errors.append({"client": self.index, **message})
            if self.state != LIVE:
                raise Failure(f"client {self.index}: {message}")
        # anything else (pong, later additions to the protocol) is ignored

    def socketio_text(self, payload: bytes, stamp: float, now: float) -> None:
        """
        TickStock's Socket.IO: an event's payload (element 1, whether an
        offset follows or not) is the /ws frame, so the accounting is the same.
        """
        stats = self.stats
        if payload.startswith(SIO_EVENT_PREFIX):
            try:
                message = orjson.loads(payload[2:])[1]
            except (orjson.JSONDecodeError, IndexError):
                stats.bad_frames += 1
                return
            self.event(message, stamp, now)
        elif payload == b"2":  # Engine.IO ping: no pong within pingTimeout ends the session
            self.write(client_frame(1, b"3"))
        elif payload.startswith(b"0{") and self.state == HELLO:  # Engine.IO open
            auth: dict[str, Any] = {"token": mint_token(f"bench-{self.index}")}
            if not self.loop.offsets:
                auth["offsets"] = False
            self.write(client_frame(1, b"40" + orjson.dumps(auth)))
        elif payload.startswith(b"40") and self.state == HELLO:  # CONNECT accepted
            self.state = SUBSCRIBING
            self.write(client_frame(1, b"421" + orjson.dumps(
                ["subscribe", {"id": "s1", "topic": "patterns",
                               "filter": {"symbols": self.symbols}}])))
        elif payload.startswith(SIO_SUBSCRIBED_ACK) and self.state == SUBSCRIBING:
            try:
                answer = orjson.loads(payload[3:])[0]
            except (orjson.JSONDecodeError, IndexError):
                answer = None
            if isinstance(answer, dict) and answer.get("op") == "subscribed" \
                    and answer.get("id") == "s1":
                self.went_live()
            else:
                raise Failure(f"client {self.index}: subscribe answered {payload[:200]!r}")
        elif payload.startswith(b"44"):  # CONNECT_ERROR
            raise Failure(f"client {self.index}: {payload[:200]!r}")
        elif payload.startswith(b'42["error"'):
            if len(stats.errors) < 10:
                stats.errors.append({"client": self.index,
                                     "socketio": payload[:200].decode("utf-8", "replace")})
            if self.state != LIVE:
                raise Failure(f"client {self.index}: {payload[:200]!r}")
        elif payload == b"41":  # DISCONNECT: the server ended the session
            self.lost("the server disconnected the Socket.IO session")
        elif payload == b"1":  # Engine.IO close
            self.lost("the server closed the Engine.IO session")
        # anything else (connection_confirmed, system_health, ...) is ignored

    def peer_text(self, payload: bytes, stamp: float, now: float) -> None:
        """Engine.IO v4 / Socket.IO v5 packets, for the reference peers."""
        stats = self.stats
        if payload.startswith(SIO_EVENT_PREFIX):
            try:
                message = orjson.loads(payload[2:])[1]
            except (orjson.JSONDecodeError, IndexError):
                stats.bad_frames += 1
                return
            self.event(message, stamp, now)
        elif payload == b"2":  # Engine.IO ping
            self.write(client_frame(1, b"3"))
        elif payload.startswith(b"0") and self.state == HELLO:  # Engine.IO open
            auth = (orjson.dumps({"token": mint_token(f"bench-{self.index}")})
                    if self.loop.peer_token else b"")
            self.write(client_frame(1, b"40" + auth))
        elif payload.startswith(b"40") and self.state == HELLO:  # namespace connected
            self.state = SUBSCRIBING
            self.write(client_frame(1, b"42" + orjson.dumps(
                ["subscribe", {"id": "s1", "symbols": self.symbols}])))
        elif payload.startswith(b'42["subscribed"') and self.state == SUBSCRIBING:
            self.went_live()
        elif payload.startswith(b"44") and self.state != LIVE:
            raise Failure(f"client {self.index}: {payload[:200]!r}")

    def went_live(self) -> None:
        self.state = LIVE
        self.loop.subscribed(self)

    def event(self, message: dict[str, Any], stamp: float, now: float) -> None:
        stats = self.stats
        try:
            data = message["data"]
            sent_at = data["sent_at"]
            event_id = data["event_id"]
            seq = int(event_id[event_id.rfind("-") + 1:])
        except (KeyError, TypeError, ValueError):
            stats.bad_frames += 1
            return
        if message["sub"] != "s1" or data.get("symbol") not in self.symbols:
            stats.misrouted += 1
        seen = self.seen
        if seq >= len(seen):
            seen.extend(bytes(seq + 4096 - len(seen)))
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
        latency = stamp - sent_at
        stats.kernel_lat.append(latency)
        stats.app_lat.append(now - sent_at)
        slot = stats.timeline.get(int(sent_at))
        if slot is None:
            stats.timeline[int(sent_at)] = [1, latency]
        else:
            slot[0] += 1
            if latency > slot[1]:
                slot[1] = latency
        self.count += 1
        stats.received += 1

    def other(self, fin: int, opcode: int, payload: bytes, stamp: float, now: float) -> None:
        if opcode == 9:  # ping
            self.write(client_frame(10, payload))
        elif opcode == 10:  # pong
            pass
        elif opcode == 8:  # close
            code = str(int.from_bytes(payload[:2], "big")) if len(payload) >= 2 else "none"
            self.stats.closes[code] = self.stats.closes.get(code, 0) + 1
            self.write(client_frame(8, payload[:2]))
            self.lost(f"closed by the server, code {code}")
        elif opcode in (0, 1, 2):  # a fragmented message
            if opcode:
                self.fragments = [payload]
            elif self.fragments is not None:
                self.fragments.append(payload)
            else:
                self.fail("continuation frame without a start")
                return
            if fin:
                whole = b"".join(self.fragments)
                self.fragments = None
                if opcode != 2:
                    self.text(whole, stamp, now)
        else:
            self.fail(f"unknown opcode {opcode}")

    # ending

    def fail(self, reason: str) -> None:
        self.stats.bad_frames += 1
        if len(self.stats.errors) < 10:
            self.stats.errors.append({"client": self.index, "protocol_error": reason})
        self.lost(reason)

    def lost(self, reason: str) -> None:
        if self.state == CLOSED:
            return
        was = self.state
        self.state = CLOSED
        self.loop.forget(self)
        if was == LIVE:
            self.stats.lost_connections += 1
        else:
            raise Failure(f"client {self.index}: {reason} (before subscribing)")

    def close(self) -> None:
        if self.state == LIVE:
            try:
                self.sock.send(client_frame(8, (1000).to_bytes(2, "big")))
            except OSError:
                pass
        self.state = CLOSED
        self.sock.close()


class Loop:
    """The epoll loop: all clients and the parent's commands on stdin."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.host = args.host
        self.port = args.port
        self.endpoint = args.endpoint
        self.offsets = args.offsets
        self.peer_token = args.peer_token
        self.path = (args.path or ("/ws" if args.endpoint == "ws" else SIO_PATH)).encode()
        self.host_header = f"{args.host}:{args.port}".encode()
        self.stats = Stats(args.warmup_events)
        self.symbols = [s for s in args.symbols.split(",") if s]
        self.epoll = select.epoll()
        self.clients: dict[int, Client] = {}
        self.all: list[Client] = []
        self.live = 0
        self.stdin = b""
        self.commands: list[str] = []

    def register(self, client: Client) -> None:
        self.clients[client.fd] = client
        self.all.append(client)
        self.epoll.register(client.fd, select.EPOLLIN | select.EPOLLOUT)

    def want_write(self, client: Client, on: bool) -> None:
        if client.fd in self.clients:
            mask = select.EPOLLIN | (select.EPOLLOUT if on else 0)
            self.epoll.modify(client.fd, mask)

    def forget(self, client: Client) -> None:
        if self.clients.pop(client.fd, None) is not None:
            self.epoll.unregister(client.fd)
        client.sock.close()

    def connect_failed(self, client: Client, reason: str) -> None:
        raise Failure(f"client {client.index}: connect: {reason}")

    def subscribed(self, client: Client) -> None:
        self.live += 1

    def read_stdin(self) -> None:
        chunk = os.read(0, 65536)
        if not chunk:
            raise EOFError("the parent closed stdin")
        self.stdin += chunk
        *lines, self.stdin = self.stdin.split(b"\n")
        self.commands.extend(line.decode().strip() for line in lines if line.strip())

    def poll(self, timeout: float, view: memoryview) -> None:
        clients = self.clients
        for fd, events in self.epoll.poll(timeout):
            if fd == 0:
                self.read_stdin()
                continue
            client = clients.get(fd)
            if client is None:
                continue
            if events & select.EPOLLIN:
                client.readable(view)
            elif events & (select.EPOLLERR | select.EPOLLHUP) and client.state != CONNECTING:
                client.readable(view)  # reads the error or the end of the stream
            if events & select.EPOLLOUT and client.fd in clients:
                client.writable()
            elif events & (select.EPOLLERR | select.EPOLLHUP) and client.state == CONNECTING:
                client.writable()  # reports the connect error


def percentiles(samples: array, points: tuple[float, ...]) -> dict[str, float | None]:
    """Nearest-rank percentiles of C{samples} (seconds), in milliseconds."""
    out: dict[str, float | None] = {}
    if not samples:
        out.update({f"p{p:g}": None for p in points})
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


def run(args: argparse.Namespace) -> None:
    loop = Loop(args)
    stats = loop.stats
    buffer = bytearray(READ_SIZE)
    view = memoryview(buffer)

    # 1. connect, a bounded number of handshakes at a time
    started = time.monotonic()
    deadline = started + args.connect_timeout
    next_index = 0
    while loop.live < args.clients:
        while next_index < args.clients and (
            len(loop.all) - loop.live < args.connect_concurrency
        ):
            n = len(loop.symbols)
            loop.register(Client(loop, next_index, [
                loop.symbols[(next_index + j) % n] for j in range(min(args.watch, n))]))
            next_index += 1
        loop.poll(0.05, view)
        if time.monotonic() > deadline:
            raise Failure(f"only {loop.live} of {args.clients} clients subscribed "
                          f"within {args.connect_timeout:g}s")
    connect_s = time.monotonic() - started

    # No cyclic garbage is made per event; a collection pause would show up
    # as latency that is the generator's, not the server's.
    gc.collect()
    gc.freeze()
    gc.disable()
    loop.epoll.register(0, select.EPOLLIN)
    emit("READY", {"clients": loop.live, "connect_s": round(connect_s, 3), "pid": os.getpid()})

    # 2. receive until the parent says publishing is over
    while not loop.commands:
        loop.poll(1.0, view)
    command = loop.commands.pop(0)
    if not command.startswith("END "):
        raise Failure(f"expected END, got {command!r}")
    per_symbol = orjson.loads(command[4:])["per_symbol"]
    for client in loop.all:
        client.expected = sum(int(per_symbol.get(symbol, 0)) for symbol in client.symbols)
    expected = sum(client.expected for client in loop.all)

    # 3. drain: every expected delivery, or nothing new for --drain seconds
    hard_stop = time.monotonic() + args.max_wait
    last_count, last_change = stats.received, time.monotonic()
    while stats.received < expected:
        loop.poll(0.01, view)
        now = time.monotonic()
        if stats.received != last_count:
            last_count, last_change = stats.received, now
        elif now - last_change > args.drain or now > hard_stop:
            break
    complete = stats.received >= expected
    emit("DONE", {"complete": complete, "received": stats.received, "at": time.time()})

    # a moment more, so that late duplicates are seen too
    end = time.monotonic() + 0.1
    while time.monotonic() < end:
        loop.poll(0.02, view)

    usage = resource.getrusage(resource.RUSAGE_SELF)
    short = [(c.index, c.symbols, c.count, c.expected) for c in loop.all if c.count != c.expected]
    counts = [c.count for c in loop.all]
    result = {
        "clients": len(loop.all),
        "connect_s": round(connect_s, 3),
        "expected": expected,
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
        "untimed_reads": stats.untimed_reads,
        "per_client": {
            "min": min(counts) if counts else 0,
            "max": max(counts) if counts else 0,
            "clients_short": len(short),
            "first_short": short[:5],
        },
        "latency_ms": percentiles(stats.kernel_lat, (50, 90, 99, 99.9)),
        "app_latency_ms": percentiles(stats.app_lat, (50, 90, 99, 99.9)),
        "samples": len(stats.kernel_lat),
        "timeline": {str(second): [int(n), round(worst * 1000, 1)]
                     for second, (n, worst) in sorted(stats.timeline.items())},
        "loadgen_cpu_s_total": round(usage.ru_utime + usage.ru_stime, 3),
    }
    for client in loop.all:
        client.close()
    emit("RESULT", result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TickStock WebSocket load generator.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default=None,
                        help="the request path (default: /ws, or " + SIO_PATH.replace("%", "%%")
                        + " for socketio and peer)")
    parser.add_argument("--endpoint", choices=("ws", "socketio", "peer"), default="ws",
                        help="ws: TickStock's /ws; socketio: TickStock's Socket.IO (Engine.IO "
                             "v4 websocket-only); peer: the reference peers' rooms (ws)")
    parser.add_argument("--offsets", action="store_true",
                        help="socketio: ask for each event's id as its last argument (the "
                             "Socket.IO offset); by default CONNECT sends offsets: false")
    parser.add_argument("--peer-token", action="store_true",
                        help="peer: CONNECT with auth {token} (a JWT, as the Node peer "
                             "bench/node/server.mjs requires); by default no auth")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--symbols", default="AAPL",
                        help="comma-separated; client k subscribes to symbols[k %% N]")
    parser.add_argument("--watch", type=int, default=1,
                        help="symbols per client: client k watches symbols[k .. k+W-1 mod N]")
    parser.add_argument("--warmup-events", type=int, default=0,
                        help="events with a sequence number below this are warm-up")
    parser.add_argument("--connect-concurrency", type=int, default=50,
                        help="handshakes in flight at once")
    parser.add_argument("--connect-timeout", type=float, default=120.0)
    parser.add_argument("--drain", type=float, default=3.0,
                        help="after END, give up once nothing arrived for this long (s)")
    parser.add_argument("--max-wait", type=float, default=120.0,
                        help="after END, give up after this long in any case (s)")
    args = parser.parse_args(argv)
    try:
        run(args)
        return 0
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        return 1
    except Failure as error:
        emit("FAILED", {"error": str(error)})
        return 1
    except Exception as error:
        emit("FAILED", {"error": f"{type(error).__name__}: {error}"})
        return 1


if __name__ == "__main__":
    sys.exit(main())
