// The producer for bench/trader.py --server node: patterns and ticks, each
// emitted through @socket.io/redis-emitter to the room of its topic and
// symbol ("patterns:SYM", "ticks:SYM", as server.mjs joins them), one
// PUBLISH of a ready Socket.IO packet per message, no pacing (5,000 ticks/s
// over 500 symbols is already 10 per symbol per second, TickStock's
// --tick-rate 10 for the same scenario).
//
// trader.py hands it a plan (a JSON file): the pattern events, made by the
// same code and seed as for TickStock (latency.py's make_event), in order;
// the symbols (ticks go round-robin over them, as patterns do); each tick's
// starting price; the merged schedule (due: seconds from the start, kind: 0
// a pattern, 1 a tick, sorted, as trader.py's schedule()); and how many of
// its entries are warm-up. Payloads are what TickStock's /ws sends:
//   {"op":"event","sub":"p","topic":"patterns","data":event}
//   {"op":"event","sub":"t","topic":"ticks","data":tick}
// with "timestamp" and "sent_at" (wall-clock seconds, taken just before the
// emit) in data; a tick's data is trader.py's tick_message, bench_seq included.
//
// Control, one line each, on stdout and stdin (as producer.mjs):
//   producer -> parent  READY {}                  connected to Redis
//   producer -> parent  WARMED {"due_in": s}      warm-up sent; the first measured
//                                                 message is due in s seconds
//   parent -> producer  MEASURE                   go on (on the same schedule)
//   producer -> parent  SENT {...}                every PUBLISH answered: replies,
//                                                 no_subscriber, errors, first_measured,
//                                                 last_sent, lag_p99, lag_max (s);
//                                                 then it waits for stdin to close
//
//   node bench/node/trader_producer.mjs --redis redis://127.0.0.1:6379/0 --plan plan.json

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
  console.error("usage: trader_producer.mjs --redis URL --plan FILE");
  process.exit(2);
}
const { patterns, symbols, prices, due, kind, warmup } = JSON.parse(
  readFileSync(args.plan, "utf8"));

const client = createClient({ url: args.redis });
client.on("error", (error) => {
  console.error(`redis: ${error.message}`);
  process.exit(1);
});
await client.connect();

// As producer.mjs: keep each PUBLISH's reply, so that a message nobody
// subscribed to, or an error, shows.
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
const wallClock = () => (performance.timeOrigin + performance.now()) / 1000;

const last = { ...prices };
let patternSeq = 0;
let tickSeq = 0;

function send(entry, sentAt) {
  const timestamp = Math.round(sentAt * 1000) / 1000;
  if (kind[entry] === 0) {
    const event = patterns[patternSeq];
    patternSeq += 1;
    emitter.to(`patterns:${event.symbol}`).emit("event", {
      op: "event", sub: "p", topic: "patterns", data: { ...event, timestamp, sent_at: sentAt },
    });
    return;
  }
  const symbol = symbols[tickSeq % symbols.length];
  last[symbol] *= 1 + (Math.random() * 0.002 - 0.001);
  const data = {
    event_type: "tick", symbol, price: Math.round(last[symbol] * 100) / 100,
    volume: 100 + (tickSeq % 900), bench_seq: tickSeq, timestamp, sent_at: sentAt,
  };
  tickSeq += 1;
  emitter.to(`ticks:${symbol}`).emit("event", { op: "event", sub: "t", topic: "ticks", data });
}

say("READY", {});
const lags = [];
let firstMeasured = 0;
let lastSent = 0;
let entry = 0;
const t0 = performance.now() / 1000 + 0.05;
for (const limit of [warmup, due.length]) {
  if (limit === due.length && warmup < due.length) {
    say("WARMED", { due_in: t0 + due[warmup] - performance.now() / 1000 });
    const { value } = await lines.next();
    if (value?.trim() !== "MEASURE") throw new Error(`expected MEASURE, got ${value}`);
  }
  while (entry < limit) {
    const now = performance.now() / 1000;
    while (entry < limit && t0 + due[entry] <= now) {
      if (entry >= warmup) lags.push(now - (t0 + due[entry]));
      const sentAt = wallClock();
      if (entry === warmup) firstMeasured = sentAt;
      send(entry, sentAt);
      lastSent = sentAt;
      entry += 1;
    }
    if (entry < limit) {
      // at least 1 ms, as trader.py's publisher: one wake-up per message costs more
      const delay = Math.max(0.001, t0 + due[entry] - performance.now() / 1000);
      await sleep(delay * 1000);
    }
  }
}
await Promise.all(pending);
lags.sort((a, b) => a - b);
say("SENT", {
  ...outcome, first_measured: firstMeasured, last_sent: lastSent,
  lag_p99: lags.length ? lags[Math.max(0, Math.floor(lags.length * 0.99) - 1)] : null,
  lag_max: lags.length ? lags[lags.length - 1] : null,
});
// Stay until the parent has read this process's CPU time: it ends it (or
// closes stdin) after the clients have drained.
await lines.next();
await client.quit();
process.exit(0);
