"""
A producer flood, in its own process: PUBLISHes C{rate} messages a second
for C{seconds} over one pipelined connection (replies off), nine ticks on
500 symbols for each pattern event; prints how many it sent.

    python -m tests.flood PORT SECONDS RATE
"""

from __future__ import annotations

import json
import socket
import sys
import time


def resp(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def main(port: int, seconds: float, rate: float) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(resp(b"CLIENT", b"REPLY", b"OFF"))
    step, sent, start = 0.01, 0, time.monotonic()
    while (now := time.monotonic()) - start < seconds:
        due = int((now - start + step) * rate)
        chunk = []
        for n in range(sent, due):
            if n % 10:
                channel, data = b"tickstock.data.ticks", {
                    "symbol": f"S{n % 500}", "price": 100 + n % 7, "volume": n, "timestamp": 1.7e9}
            else:
                channel, data = b"tickstock.events.patterns", {
                    "symbol": "AAPL", "pattern": "Flood", "confidence": 0.5, "timestamp": 1.7e9}
            chunk.append(resp(b"PUBLISH", channel, json.dumps(data).encode()))
        sock.sendall(b"".join(chunk))
        sent = due
        time.sleep(max(0.0, start + (sent / rate) - time.monotonic()))
    sock.close()
    print(sent)


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]))
