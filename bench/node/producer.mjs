// The producer for bench/latency.py --server node: emits each pattern event
// to the room of its symbol through @socket.io/redis-emitter, the Node peer's
// native ingestion path (one PUBLISH of a ready Socket.IO packet per event).
//
// latency.py hands it a plan (a JSON file): the events, made by the same code
// and seed as for the other servers, the time each is due (seconds from the
// start) and how many of them are warm-up. The payload is the one the other
// peers send: {"op":"event","sub":"s1","topic":"patterns","data":event}, where
// event gets "timestamp" and "sent_at" (wall-clock seconds, taken just before
// the emit, to the microsecond) as latency.py's own publisher adds them.
//
// Control, one line each, on stdout and stdin:
//   producer -> parent  READY {}                  connected to Redis
//   producer -> parent  WARMED {"due_in": s}      warm-up sent; the first measured
//                                                 event is due in s seconds
//   parent -> producer  MEASURE                   go on (on the same schedule)
//   producer -> parent  SENT {...}                every PUBLISH answered: replies,
//                                                 no_subscriber, errors, first_measured,
//                                                 last_sent, lags (s, measured events);
//                                                 then it waits for stdin to close
//
//   node bench/node/producer.mjs --redis redis://127.0.0.1:6379/0 --plan plan.json

import { readFileSync } from "node:fs";
import { performance } from "node:perf_hooks";
import { createInterface } from "node:readline";
import { setTimeout as sleep } from "node:timers/promises";
import { parseArgs } from "node:util";

import { Emitter } from "@socket.io/redis-emitter";
import { createClient } from "redis";

const { values: args } = parseArgs({
  options: { redis: { type: "string" }, plan: { type: "string" } },
});
if (!args.redis || !args.plan) {
  console.error("usage: producer.mjs --redis URL --plan FILE");
  process.exit(2);
}
const { events, due, warmup } = JSON.parse(readFileSync(args.plan, "utf8"));

const client = createClient({ url: args.redis });
client.on("error", (error) => {
  console.error(`redis: ${error.message}`);
  process.exit(1);
});
await client.connect();

// The emitter calls publish and drops the reply; this wrapper keeps it, so
// that (as for latency.py's publisher) an event nobody subscribed to shows.
const outcome = { replies: 0, no_subscriber: 0, errors: [] };
const pending = [];
const emitter = new Emitter({
  publish(channel, message) {
    const reply = client.publish(channel, message).then((receivers) => {
      outcome.replies += 1;
      if (receivers === 0) outcome.no_subscriber += 1;
    }, (error) => {
      outcome.replies += 1;
      if (outcome.errors.length < 5) outcome.errors.push(String(error));
    });
    pending.push(reply);
    return reply;
  },
});

const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const say = (tag, body) => process.stdout.write(`${tag} ${JSON.stringify(body)}\n`);
// Wall-clock seconds with sub-millisecond digits (Date.now() has whole ms).
const wallClock = () => (performance.timeOrigin + performance.now()) / 1000;

say("READY", {});
const lags = [];
let firstMeasured = 0;
let lastSent = 0;
let seq = 0;
const t0 = performance.now() / 1000 + 0.05;
for (const limit of [warmup, events.length]) {
  if (limit === events.length && warmup < events.length) {
    say("WARMED", { due_in: t0 + due[warmup] - performance.now() / 1000 });
    const { value } = await lines.next();
    if (value?.trim() !== "MEASURE") throw new Error(`expected MEASURE, got ${value}`);
  }
  while (seq < limit) {
    const now = performance.now() / 1000;
    while (seq < limit && t0 + due[seq] <= now) {
      if (seq >= warmup) lags.push(now - (t0 + due[seq]));
      const event = events[seq];
      const sentAt = wallClock();
      if (seq === warmup) firstMeasured = sentAt;
      const data = { ...event, timestamp: Math.round(sentAt * 1000) / 1000, sent_at: sentAt };
      emitter.to(event.symbol).emit("event", { op: "event", sub: "s1", topic: "patterns", data });
      lastSent = sentAt;
      seq += 1;
    }
    if (seq < limit) {
      const delay = t0 + due[seq] - performance.now() / 1000;
      if (delay > 0) await sleep(delay * 1000);
    }
  }
}
await Promise.all(pending);
say("SENT", { ...outcome, first_measured: firstMeasured, last_sent: lastSent, lags });
// Stay until the parent has read this process's CPU time: it ends it (or
// closes stdin) after the load generator has drained.
await lines.next();
await client.quit();
process.exit(0);
