"""
A stand-alone producer for the streams fault test: XADDs C{count} pattern
events to Redis over a plain socket, each with C{event_id} "e<n>", and on
any error reconnects and re-sends the same one (the contract's retry: the
same event_id, so a retry whose first try was applied is delivered once).

    python -m tests.stream_producer PORT COUNT RATE
"""

from __future__ import annotations

import json
import socket
import sys
import time

SYMBOLS = ("AAPL", "MSFT", "NVDA", "TSLA", "AMZN")


def command(sock: socket.socket, *args: bytes) -> bytes:
    sock.sendall(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args))
    reply = sock.recv(4096)
    if not reply:
        raise ConnectionError("closed")
    if reply.startswith(b"-"):
        raise ConnectionError(reply.decode().strip())
    return reply


def main(port: int, count: int, rate: float) -> None:
    sock = None
    start = time.monotonic()
    retries = 0
    for n in range(count):
        payload = json.dumps({
            "event_type": "pattern_detected", "symbol": SYMBOLS[n % len(SYMBOLS)],
            "pattern": "Doji", "confidence": 0.9, "timestamp": 1_700_000_000 + n,
            "event_id": f"e{n}", "n": n,
        }).encode()
        while True:
            try:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=2)
                command(sock, b"XADD", b"tickstock.events.patterns", b"*", b"data", payload)
                break
            except OSError:
                retries += 1
                if sock is not None:
                    sock.close()
                sock = None
                time.sleep(0.05)
        delay = start + (n + 1) / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    print(json.dumps({"sent": count, "retries": retries}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
