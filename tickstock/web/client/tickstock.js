// tickstock.js: the browser client for TickStock's WebSocket (docs/contract.md §3).
// A dependency-free ES module, served by the daemon at /static/tickstock.js.
//
//   import { TickStock } from "/static/tickstock.js";
//   const ts = new TickStock({ token });
//   ts.on("state", (s) => console.log(s.state));
//   ts.subscribe("patterns", { symbols: ["AAPL"] }, (e) => console.log(e.data));
//   ts.connect();
//
// It reconnects by itself (exponential backoff with full jitter, capped) and
// resumes from the last event id it saw, so a dropped connection loses nothing
// the server still keeps; it says what was recovered in a "recovered" event.
// Given a token function, it also refreshes the token in-band before it expires
// (docs/contract.md §3: token_expiring, refresh), so the connection never drops for it.

/** Close codes after which retrying cannot help: refused by policy (bad or expired token), too big. */
export const NO_RETRY = new Set([1008, 1009]);

const FINAL_PROGRESS = new Set(["failed", "cancelled"]);
const EARLY_JOBS_MAX = 100;

/**
 * The delay before reconnect attempt `attempt` (0-based): "full jitter",
 * uniform in [0, min(capMs, baseMs * 2^attempt)), so clients dropped together
 * do not come back together.
 */
export function backoffDelay(attempt, { baseMs = 500, capMs = 15000, random = Math.random } = {}) {
  return random() * Math.min(capMs, baseMs * 2 ** Math.min(attempt, 30));
}

/** Order two event ids ("<ms>-<seq>" as the server makes them); other strings compare as text. */
export function compareIds(a, b) {
  const pa = /^(\d+)-(\d+)$/.exec(a), pb = /^(\d+)-(\d+)$/.exec(b);
  if (pa && pb) {
    const ms = BigInt(pa[1]) - BigInt(pb[1]);
    if (ms) return ms < 0n ? -1 : 1;
    const seq = BigInt(pa[2]) - BigInt(pb[2]);
    return seq ? (seq < 0n ? -1 : 1) : 0;
  }
  return a < b ? -1 : a > b ? 1 : 0;
}

/**
 * A refusal from the server (`code` as in docs/contract.md §3), or "disconnected" /
 * "timeout" / "not_connected", or "no_token" (no token to refresh with, or the token
 * function failed: `cause` is what it threw).
 */
export class TickStockError extends Error {
  constructor(code, message, fields) {
    super(`${code}: ${message}`);
    this.name = "TickStockError";
    this.code = code;
    this.fields = fields;
  }
}

function report(error) { // a listener's bug must not break the connection
  if (typeof globalThis.reportError === "function") globalThis.reportError(error);
  else setTimeout(() => { throw error; });
}

function sameOriginUrl() {
  const { protocol, host } = globalThis.location;
  return `${protocol === "https:" ? "wss:" : "ws:"}//${host}/ws`;
}

/**
 * One logical connection to TickStock, kept up across drops.
 *
 * Options: `token` (a string, or a function returning one or a Promise of
 * one, asked at every connect and whenever the server says the token is
 * expiring, so the connection is refreshed in-band and never dropped for it),
 * or `user` when the server runs without auth (demo); `url` (default: same
 * origin, /ws); `lastId` to resume an earlier session; `backoff` {baseMs,
 * capMs}; `stableMs` (a connection up this long resets the backoff);
 * `requestTimeoutMs`.
 *
 * Events (`on(name, listener)`): "state" {state: "connecting" | "connected" |
 * "reconnecting" | "offline", ...details}, "recovered" {events, complete,
 * missed}, "job" (every event of the user's backtests), "token" {expiresIn}
 * (a refresh was accepted: seconds until the new token stops being accepted,
 * null when the server runs without auth), "token_expiring" {in} (seconds
 * left; only when `token` is not a function: call refresh(newToken) in time,
 * or the server closes the connection with 1008 when it expires), "error"
 * (TickStockError with `subscription` when it refused a subscription; also a
 * refused or failed automatic refresh, e.g. code "unauthorized" or "no_token").
 */
export class TickStock {
  constructor(options = {}) {
    this.options = { url: null, token: null, user: null, lastId: null, backoff: {}, stableMs: 10000,
      requestTimeoutMs: 15000, WebSocket: globalThis.WebSocket, ...options };
    this.lastId = this.options.lastId;
    this.state = "offline";
    this.user = null;
    this._ws = null;
    this._want = false;
    this._attempt = 0;
    this._retry = null;
    this._connectedAt = 0;
    this._seq = 0;
    this._listeners = new Map();
    this._subs = new Map();      // id -> Subscription
    this._requests = new Map();  // request id -> {resolve, reject, timer}
    this._jobs = new Map();      // job id -> callbacks
    this._early = new Map();     // job id -> events that came before its job_accepted
    this._jobsSub = null;
    this._resuming = null;       // {waiting: Set of sub ids, events, missed}
    this._renewing = false;      // an automatic refresh is under way
    this._online = () => { if (this._retry) this._open(); };
    globalThis.addEventListener?.("online", this._online);
  }

  /**
   * Listen to "state", "recovered", "job", "token", "token_expiring" or "error";
   * returns a function that stops listening. Listening to "job" subscribes to
   * the user's backtests.
   */
  on(name, listener) {
    if (name === "job") this._followJobs();
    if (!this._listeners.has(name)) this._listeners.set(name, new Set());
    this._listeners.get(name).add(listener);
    return () => this._listeners.get(name)?.delete(listener);
  }

  _emit(name, detail) {
    for (const listener of [...(this._listeners.get(name) || [])]) {
      try { listener(detail); } catch (error) { report(error); }
    }
  }

  /** Connect now, and keep reconnecting until close(). */
  connect() {
    this._want = true;
    this._attempt = 0;
    if (!this._ws) this._open();
    return this;
  }

  /** Disconnect for good (until connect()); subscriptions are kept for the next connect. */
  close() {
    this._want = false;
    clearTimeout(this._retry);
    this._retry = null;
    const ws = this._ws;
    if (ws) {
      this._dropped(ws, { code: 1000, reason: "closed by the client" });
      ws.close(1000, "bye");
    } else this._setState("offline", { reason: "closed by the client" });
  }

  /**
   * Subscribe to `topic` with `filter` (docs/contract.md §3; null for none) and call
   * `onEvent({id, type, topic, data})` for each event. For ticks and health the first
   * events are the current value of each symbol or service, with `snapshot: true`. The
   * subscription is re-sent on every reconnect. Returns {id, topic, filter, unsubscribe()}.
   */
  subscribe(topic, filter, onEvent) {
    const sub = { id: `s${++this._seq}`, topic, filter: filter || null, onEvent, active: false,
      unsubscribe: () => this.unsubscribe(sub) };
    this._subs.set(sub.id, sub);
    if (this.state === "connected") this._sendSubscribe(sub);
    return sub;
  }

  /** Stop a subscription (the object subscribe() returned, or its id). */
  unsubscribe(sub) {
    const id = typeof sub === "string" ? sub : sub?.id;
    const found = this._subs.get(id);
    if (!found) return;
    this._subs.delete(id);
    if (found === this._jobsSub) this._jobsSub = null;
    this._settle(found, null);
    if (this.state === "connected") this._send({ op: "unsubscribe", id });
  }

  /**
   * Ask for a backtest; resolves with the job id once TickStock accepted it,
   * or rejects with a TickStockError (`fields` says which parameter was wrong).
   * `callbacks.onProgress(data, event)` and `callbacks.onResult(data, event)`
   * follow the job, across reconnects, until it ends.
   */
  submitBacktest(params, callbacks = {}) {
    this._followJobs();
    return this._request({ op: "submit_backtest", params }).then((reply) => {
      this.onJob(reply.job_id, callbacks);
      return reply.job_id;
    });
  }

  /** Follow a job submitted elsewhere (another tab, the REST API) with the same callbacks. */
  onJob(jobId, callbacks) {
    this._followJobs();
    this._jobs.set(jobId, callbacks || {});
    const early = this._early.get(jobId) || [];
    this._early.delete(jobId);
    for (const event of early) this._jobEvent(event);
  }

  /** Cancel one of the user's jobs; resolves once TickStock has cancelled it. */
  cancelJob(jobId) {
    return this._request({ op: "cancel_job", job_id: jobId }).then(() => jobId);
  }

  /**
   * Hand the server a new token for the same user without reconnecting:
   * `token`, or if omitted what options.token gives. Subscriptions carry on.
   * Resolves with the server's {op: "refreshed", expires_in} (and says "token");
   * rejects with a TickStockError ("unauthorized": bad, expired or another
   * user's token; the current one holds until it expires). A token passed here
   * replaces a string options.token, so a reconnect uses it too.
   */
  async refresh(token) {
    if (this.state !== "connected") {
      throw new TickStockError("not_connected", `not connected (${this.state})`);
    }
    const source = token === undefined ? this.options.token : token;
    let value;
    try {
      value = typeof source === "function" ? await source() : source;
    } catch (error) {
      throw Object.assign(new TickStockError("no_token", String(error?.message || error)),
        { cause: error });
    }
    if (!value || typeof value !== "string") throw new TickStockError("no_token", "no token to refresh with");
    const reply = await this._request({ op: "refresh", token: value });
    if (token !== undefined && typeof this.options.token !== "function") this.options.token = value;
    this._emit("token", { expiresIn: Number.isFinite(reply.expires_in) ? reply.expires_in : null });
    return reply;
  }

  // ---- internals -----------------------------------------------------------

  _followJobs() {
    if (!this._jobsSub) this._jobsSub = this.subscribe("backtests", null, (event) => this._jobEvent(event));
  }

  _jobEvent(event) {
    const jobId = event.data?.job_id;
    if (typeof jobId !== "string") return;
    const callbacks = this._jobs.get(jobId);
    if (!callbacks) {
      if (!this._early.has(jobId)) {
        if (this._early.size >= EARLY_JOBS_MAX) this._early.delete(this._early.keys().next().value);
        this._early.set(jobId, []);
      }
      this._early.get(jobId).push(event);
      return;
    }
    const result = event.type === "backtest_result";
    try {
      if (result) callbacks.onResult?.(event.data, event);
      else callbacks.onProgress?.(event.data, event);
    } catch (error) { report(error); }
    if (result || FINAL_PROGRESS.has(event.data.status)) this._jobs.delete(jobId);
  }

  _setState(state, detail = {}) {
    this.state = state;
    this._emit("state", { state, ...detail });
  }

  _send(message) {
    if (this._ws && this._ws.readyState === 1) this._ws.send(JSON.stringify(message));
  }

  _request(message) {
    if (this.state !== "connected") {
      return Promise.reject(new TickStockError("not_connected", `not connected (${this.state})`));
    }
    const id = `r${++this._seq}`;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._requests.delete(id);
        reject(new TickStockError("timeout", "no answer from the server"));
      }, this.options.requestTimeoutMs);
      this._requests.set(id, { resolve, reject, timer });
      this._send({ ...message, id });
    });
  }

  _open() {
    clearTimeout(this._retry);
    this._retry = null;
    if (this.state !== "reconnecting") this._setState("connecting");
    let ws;
    try {
      ws = new this.options.WebSocket(this.options.url || sameOriginUrl());
    } catch (error) {
      this._want = false;
      this._setState("offline", { reason: String(error.message || error) });
      return;
    }
    this._ws = ws;
    ws.onopen = () => this._hello(ws);
    ws.onmessage = (e) => { if (this._ws === ws) this._handle(e.data); };
    ws.onclose = (e) => this._dropped(ws, e);
  }

  async _hello(ws) {
    const { token, user } = this.options;
    const hello = { op: "hello" };
    try {
      const value = typeof token === "function" ? await token() : token;
      if (value) hello.token = value; else if (user) hello.user = user;
    } catch (error) {
      report(error);
    }
    if (this.lastId) hello.resume = { last_id: this.lastId };
    if (this._ws === ws) this._send(hello);
  }

  _dropped(ws, event) {
    if (this._ws !== ws) return;
    this._ws = null;
    ws.onopen = ws.onmessage = ws.onclose = null;
    const stable = this._connectedAt && Date.now() - this._connectedAt >= this.options.stableMs;
    if (stable) this._attempt = 0;
    this._connectedAt = 0;
    this._resuming = null;
    for (const sub of this._subs.values()) sub.active = false;
    for (const { reject, timer } of this._requests.values()) {
      clearTimeout(timer);
      reject(new TickStockError("disconnected", "the connection dropped before the answer"));
    }
    this._requests.clear();
    const detail = { code: event.code, reason: event.reason || "" };
    if (!this._want) return this._setState("offline", detail);
    if (NO_RETRY.has(event.code)) {
      this._want = false;
      return this._setState("offline", detail);
    }
    const delayMs = backoffDelay(this._attempt, this.options.backoff);
    this._attempt += 1;
    this._retry = setTimeout(() => this._open(), delayMs);
    this._setState("reconnecting", { ...detail, attempt: this._attempt, delayMs, retryAt: Date.now() + delayMs });
  }

  _handle(raw) {
    let m;
    try { m = JSON.parse(raw); } catch { return; }
    if (!m || typeof m !== "object") return;
    switch (m.op) {
      case "event": return this._event(m);
      case "welcome": return this._welcome(m);
      case "subscribed": return this._subscribed(m);
      case "job_accepted": case "job_cancelled": case "refreshed": return this._answer(m.id, null, m);
      case "token_expiring": return this._expiring(m);
      case "error": return this._error(m);
      default: return undefined;
    }
  }

  _welcome(m) {
    this.user = m.user;
    this._connectedAt = Date.now();
    const resumed = Boolean(this.lastId);
    this._resuming = resumed && this._subs.size
      ? { waiting: new Set(this._subs.keys()), events: 0, missed: [] } : null;
    this._setState("connected", { user: m.user, session: m.session, resumed });
    for (const sub of this._subs.values()) this._sendSubscribe(sub);
  }

  /** The server warns that the token is about to expire: refresh it, or tell the app to. */
  _expiring(m) {
    if (typeof this.options.token !== "function") {
      this._emit("token_expiring", { in: Number.isFinite(m.in) ? m.in : 0 });
      return;
    }
    if (this._renewing) return;
    this._renewing = true;
    this.refresh().catch((error) => {
      // A dropped connection needs no report: the reconnect asks options.token() anew.
      if (error.code !== "disconnected" && error.code !== "not_connected") this._emit("error", error);
    }).finally(() => { this._renewing = false; });
  }

  _sendSubscribe(sub) {
    const message = { op: "subscribe", id: sub.id, topic: sub.topic };
    if (sub.filter) message.filter = sub.filter;
    this._send(message);
  }

  _subscribed(m) {
    const sub = this._subs.get(m.id);
    if (!sub) return;
    sub.active = true;
    this._settle(sub, m);
  }

  /** Count a resumed subscription's answer; once all are in, say what was recovered. */
  _settle(sub, reply) {
    const resuming = this._resuming;
    if (!resuming || !resuming.waiting.delete(sub.id)) return;
    if (reply) {
      resuming.events += Number.isInteger(reply.replayed) ? reply.replayed : 0;
      if (reply.recovered === false) resuming.missed.push({ topic: sub.topic, ...(reply.missed || {}) });
    }
    if (resuming.waiting.size) return;
    this._resuming = null;
    this._emit("recovered", { events: resuming.events, complete: !resuming.missed.length,
      missed: resuming.missed });
  }

  _event(m) {
    // A snapshot (a key's current value, sent first on subscribe) may be older than events this
    // client never had: its id is no point to resume from.
    if (!m.snapshot && typeof m.id === "string" && (!this.lastId || compareIds(m.id, this.lastId) > 0)) this.lastId = m.id;
    const sub = this._subs.get(m.sub);
    if (!sub) return;
    const event = { id: m.id, type: m.type, topic: sub.topic, data: m.data && typeof m.data === "object" ? m.data : {} };
    if (m.snapshot === true) event.snapshot = true;
    if (sub === this._jobsSub) this._emit("job", event);
    try { sub.onEvent?.(event); } catch (error) { report(error); }
  }

  _answer(id, error, reply) {
    const request = this._requests.get(id);
    if (!request) return false;
    this._requests.delete(id);
    clearTimeout(request.timer);
    if (error) request.reject(error); else request.resolve(reply);
    return true;
  }

  _error(m) {
    const error = new TickStockError(String(m.code || "error"), String(m.message || ""), m.fields);
    if (this._answer(m.id, error)) return;
    const sub = this._subs.get(m.id);
    if (sub) {
      this._subs.delete(m.id); // refused: it would be refused again on reconnect
      this._settle(sub, null);
      error.subscription = sub;
    }
    this._emit("error", error);
  }
}
