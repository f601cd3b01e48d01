"""
The reference peer for the benchmark: the engine under the original
Flask-SocketIO system, python-socketio on aiohttp with its Redis manager,
doing the same job as TickStock's fan-out path with none of its features
(no auth, no history, no filters beyond one room per symbol).

It subscribes to the producer's pattern channel, and emits each event to the
room of its symbol through C{AsyncRedisManager}, so that, as in a
multi-server socket.io deployment, every emit goes through Redis once more
before it reaches the sockets. Clients join a room with
C{42["subscribe",{"id":"s1","symbols":["AAPL"]}]} and get
C{42["subscribed",{"id":"s1"}]}; events arrive as
C{42["event",{"op":"event","sub":"s1","topic":"patterns","data":{...}}]},
the same JSON TickStock sends inside its frame.

/health gives the harness the counters it checks on TickStock.

    python bench/peer_socketio.py --port 8080 --redis redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import json

import redis.asyncio as aioredis
import socketio
from aiohttp import web

CHANNEL = "tickstock.events.patterns"


def build(redis_url: str) -> tuple[web.Application, dict[str, int]]:
    counters = {"clients": 0, "subscriptions": 0, "received": 0, "delivered": 0}
    sio = socketio.AsyncServer(
        async_mode="aiohttp", client_manager=socketio.AsyncRedisManager(redis_url),
        cors_allowed_origins="*", logger=False, engineio_logger=False,
    )
    app = web.Application()
    sio.attach(app)
    rooms: dict[str, int] = {}

    @sio.event
    async def connect(sid: str, environ: dict, auth: object = None) -> None:
        counters["clients"] += 1

    @sio.event
    async def disconnect(sid: str, *args: object) -> None:
        counters["clients"] -= 1

    @sio.on("subscribe")
    async def subscribe(sid: str, message: dict) -> None:
        for symbol in message["symbols"]:
            await sio.enter_room(sid, symbol)
            rooms[symbol] = rooms.get(symbol, 0) + 1
        counters["subscriptions"] += 1
        await sio.emit("subscribed", {"id": message["id"]}, to=sid)

    async def consume(app: web.Application) -> None:
        client = aioredis.from_url(redis_url)
        pubsub = client.pubsub()
        await pubsub.subscribe(CHANNEL)
        async for message in pubsub.listen():
            if message["type"] != "message":
                continue
            data = json.loads(message["data"])
            counters["received"] += 1
            counters["delivered"] += rooms.get(data["symbol"], 0)
            await sio.emit("event", {"op": "event", "sub": "s1", "topic": "patterns",
                                     "data": data}, room=data["symbol"])

    async def start(app: web.Application) -> None:
        app["consumer"] = asyncio.create_task(consume(app))

    async def health(request: web.Request) -> web.Response:
        return web.json_response({
            "clients": counters["clients"], "subscriptions": counters["subscriptions"],
            "events": {"received": counters["received"], "delivered": counters["delivered"]},
        })

    app.on_startup.append(start)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", health)
    return app, counters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    args = parser.parse_args()
    app, _ = build(args.redis)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
