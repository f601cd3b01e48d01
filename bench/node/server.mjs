// The Node peer for bench/latency.py and bench/trader.py --server node:
// Socket.IO 4.8 with the Redis adapter, the stack a Node shop would deploy
// for this job, doing the same work as bench/peer_socketio.py (one room per
// symbol) with auth on.
//
// Events come in the way such a deployment ingests them: a producer
// (producer.mjs, @socket.io/redis-emitter) publishes each one, already a
// Socket.IO packet, to the adapter's channel of the symbol's room; the
// adapter broadcasts it to the room's sockets. Nothing else is in the path.
//
// Clients CONNECT with auth {token} (an HS256 JWT, checked in an io.use
// middleware), join rooms with 42["subscribe",{"id":"s1","symbols":[...]}]
// and get 42["subscribed",{"id":"s1"}]; events arrive as
// 42["event",{"op":"event","sub":"s1","topic":"patterns","data":{...}}].
// bench/trader.py's clients subscribe twice, {"id":"p","topic":"patterns",
// "symbols":[...]} and {"id":"t","topic":"ticks",...}, and join the rooms
// "patterns:SYM" and "ticks:SYM" (trader_producer.mjs emits to those).
//
// /health and /ready give the harness the counters it checks on the other
// servers: clients, subscriptions, and events received (broadcasts taken
// from Redis) and delivered (the room's size when each arrived).
//
//   node bench/node/server.mjs --port 8080 --redis redis://127.0.0.1:6379/0 \
//       --jwt-secret-file jwt.secret

import { readFileSync } from "node:fs";
import { createServer } from "node:http";
import { parseArgs } from "node:util";

import { createAdapter } from "@socket.io/redis-adapter";
import jwt from "jsonwebtoken";
import { createClient } from "redis";
import { Server } from "socket.io";

const { values: args } = parseArgs({
  options: {
    port: { type: "string" },
    redis: { type: "string" },
    "jwt-secret-file": { type: "string" },
  },
});
if (!args.port || !args.redis || !args["jwt-secret-file"]) {
  console.error("usage: server.mjs --port N --redis URL --jwt-secret-file PATH");
  process.exit(2);
}
const secret = readFileSync(args["jwt-secret-file"], "utf8").trim();
const counters = { clients: 0, subscriptions: 0, received: 0, delivered: 0 };

const http = createServer((request, response) => {
  if (request.url === "/health" || request.url === "/ready") {
    response.writeHead(200, { "content-type": "application/json" });
    response.end(JSON.stringify({
      clients: counters.clients,
      subscriptions: counters.subscriptions,
      events: { received: counters.received, delivered: counters.delivered },
    }));
    return;
  }
  response.writeHead(404).end();
});

const pubClient = createClient({ url: args.redis });
const subClient = pubClient.duplicate();
for (const client of [pubClient, subClient]) {
  client.on("error", (error) => {
    console.error(`redis: ${error.message}`);
    process.exit(1);
  });
}
await Promise.all([pubClient.connect(), subClient.connect()]);

const io = new Server(http, { adapter: createAdapter(pubClient, subClient) });

// Count what the adapter takes from Redis before it broadcasts it: the
// adapter's own listener calls this.onmessage, so wrapping it on the instance
// sees every message (a cost of one call and a Map lookup per event).
const adapter = io.of("/").adapter;
const onmessage = adapter.onmessage.bind(adapter);
const prefix = adapter.channel;
adapter.onmessage = (pattern, channel, message) => {
  const name = channel.toString();
  if (name.startsWith(prefix)) {
    counters.received += 1;
    counters.delivered += adapter.rooms.get(name.slice(prefix.length, -1))?.size ?? 0;
  }
  onmessage(pattern, channel, message);
};

io.use((socket, next) => {
  const token = socket.handshake.auth?.token;
  if (typeof token !== "string") {
    next(new Error("missing token"));
    return;
  }
  jwt.verify(token, secret, { algorithms: ["HS256"] }, (error, claims) => {
    if (error) {
      next(new Error(`invalid token: ${error.message}`));
      return;
    }
    socket.data.user = claims.sub;
    next();
  });
});

io.on("connection", (socket) => {
  counters.clients += 1;
  socket.on("disconnect", () => {
    counters.clients -= 1;
  });
  socket.on("subscribe", (message) => {
    // With a topic (bench/trader.py: "patterns", "ticks"), one room per topic
    // and symbol; without one, the bare symbols (bench/latency.py).
    const topic = message.topic;
    socket.join(typeof topic === "string"
      ? message.symbols.map((symbol) => `${topic}:${symbol}`)
      : message.symbols);
    counters.subscriptions += 1;
    socket.emit("subscribed", { id: message.id });
  });
});

http.listen(Number(args.port), "127.0.0.1");
for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => process.exit(0));
}
