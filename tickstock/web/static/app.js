// TickStock live page: one WebSocket (CONTRACT §3), a few subscriptions, and a DOM
// built with createElement/textContent only: nothing from the wire is ever parsed as HTML.

const $ = (id) => document.getElementById(id);
const SYMBOL = /^[A-Z0-9.-]{1,10}$/;
const USER = /^[A-Za-z0-9_.@-]{1,64}$/;
const MAX_ROWS = 100, MAX_JOBS = 20;
const BACKOFF_BASE_MS = 500, BACKOFF_CAP_MS = 10000, STABLE_MS = 10000;
const NO_RETRY = new Set([1008, 1009]); // refused by policy or too big: retrying will not help

const ui = {
  status: $("status"), statusText: $("status-text"), notice: $("notice"),
  name: $("name"), login: $("login"), disconnect: $("disconnect"),
  watchForm: $("watch-form"), watch: $("watch"), watchMsg: $("watch-msg"), prices: $("prices"),
  alerts: $("alerts"), alertsEmpty: $("alerts-empty"), alertCount: $("alert-count"),
  health: $("health"), btForm: $("bt-form"), btSymbols: $("bt-symbols"), btStart: $("bt-start"),
  btEnd: $("bt-end"), btRun: $("bt-run"), btMsg: $("bt-msg"), jobs: $("jobs"),
};

const state = {
  ws: null, want: false, attempt: 0, retryTimer: null, retryAt: 0, welcomeAt: 0,
  name: "demo", lastId: null, seq: 0, watch: [],
  subs: new Map(),     // subscription id -> topic, for the current connection
  requests: new Map(), // submit_backtest request id -> job row, until accepted
  cancels: new Map(),  // cancel_job request id -> job row, until answered
  jobs: new Map(),     // job_id -> job row
};
const FINAL = new Set(["done", "failed", "cancelled"]);

// ---- small helpers -------------------------------------------------------

function el(tag, cls, text) { // the only way this page makes DOM: text stays text
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}
const num = (x) => typeof x === "number" && Number.isFinite(x);
const str = (x) => (typeof x === "string" && x ? x : "—");
const fixed = (x, dp) => (num(x) ? x.toFixed(dp) : "—");
const pct = (x, dp = 0) => (num(x) ? `${(x * 100).toFixed(dp)}%` : "—");
const pad = (n) => String(n).padStart(2, "0");
function hms(epochSeconds) {
  if (!num(epochSeconds)) return "--:--:--";
  const d = new Date(epochSeconds * 1000);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}
function parseSymbols(text) {
  const all = [...new Set(text.split(/[\s,]+/).map((s) => s.toUpperCase()).filter(Boolean))];
  return { list: all.filter((s) => SYMBOL.test(s)), bad: all.filter((s) => !SYMBOL.test(s)) };
}

// ---- connection ----------------------------------------------------------

// Same origin, path /ws; nothing secret ever goes in the URL.
const wsUrl = () => `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws`;
function setStatus(kind, text) { ui.status.dataset.state = kind; ui.statusText.textContent = text; }
function send(message) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(message));
}

function connect() {
  clearTimeout(state.retryTimer); state.retryTimer = null; state.want = true;
  setStatus("connecting", "connecting…");
  const ws = new WebSocket(wsUrl());
  state.ws = ws;
  ws.addEventListener("open", () => {
    if (state.ws !== ws) return;
    const hello = { op: "hello", user: state.name };
    if (state.lastId) hello.resume = { last_id: state.lastId };
    send(hello);
  });
  ws.addEventListener("message", (e) => { if (state.ws === ws) handle(e.data); });
  ws.addEventListener("close", (e) => { if (state.ws === ws) dropped(e); });
}

function dropped(event) {
  state.ws = null;
  state.subs.clear();
  for (const job of state.requests.values()) jobStatus(job, "failed", "not sent: connection lost");
  state.requests.clear();
  ui.btRun.disabled = true;
  if (state.welcomeAt && Date.now() - state.welcomeAt > STABLE_MS) state.attempt = 0;
  state.welcomeAt = 0;
  if (!state.want) return setStatus("offline", "offline");
  if (NO_RETRY.has(event.code)) {
    state.want = false;
    return setStatus("offline", `offline: ${event.reason || "refused"} (${event.code})`);
  }
  // Exponential backoff with full jitter: uniform in [0, min(cap, base * 2^attempt)).
  const delay = Math.random() * Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** state.attempt);
  state.attempt = Math.min(state.attempt + 1, 16);
  state.retryAt = Date.now() + delay;
  state.retryTimer = setTimeout(connect, delay);
  showCountdown();
}

function showCountdown() {
  if (!state.retryTimer) return;
  const s = Math.max(0, Math.ceil((state.retryAt - Date.now()) / 1000));
  setStatus("reconnecting", `reconnecting in ${s}s`);
}

function disconnect() {
  state.want = false; clearTimeout(state.retryTimer); state.retryTimer = null;
  const ws = state.ws;
  if (ws) { dropped({ code: 1000 }); ws.close(1000, "bye"); } else setStatus("offline", "offline");
}

function handle(raw) {
  let m;
  try { m = JSON.parse(raw); } catch { return; }
  if (!m || typeof m !== "object") return;
  if (m.op === "welcome") {
    state.welcomeAt = Date.now();
    setStatus("connected", `connected as ${str(m.user)}`);
    ui.notice.textContent = "";
    ui.btRun.disabled = false;
    state.subs.clear();
    subscribe("health"); subscribe("backtests"); subscribeWatch();
    loadJobs(m.user);
  } else if (m.op === "event") onEvent(m);
  else if (m.op === "job_accepted") accepted(m);
  else if (m.op === "job_cancelled") cancelled(m);
  else if (m.op === "error") onError(m);
}

function subscribe(topic, filter) {
  const id = `s${++state.seq}`;
  state.subs.set(id, topic);
  send(filter ? { op: "subscribe", id, topic, filter } : { op: "subscribe", id, topic });
}

function subscribeWatch() {
  for (const [id, topic] of state.subs) {
    if (topic === "patterns" || topic === "ticks") { state.subs.delete(id); send({ op: "unsubscribe", id }); }
  }
  if (!state.watch.length) return; // no filter would mean every symbol
  subscribe("patterns", { symbols: state.watch });
  subscribe("ticks", { symbols: state.watch });
}

function onError(m) {
  const text = `${str(m.code)}: ${str(m.message)}`;
  const job = state.requests.get(m.id);
  const cancelling = state.cancels.get(m.id);
  if (job) { state.requests.delete(m.id); jobStatus(job, "failed", text); }
  else if (cancelling) { state.cancels.delete(m.id); cancelling.cancel.disabled = false; ui.btMsg.textContent = text; }
  else if (state.subs.has(m.id)) ui.watchMsg.textContent = text;
  else ui.notice.textContent = text;
}

// ---- events, rendered at most once per frame -----------------------------

const pending = { alerts: [], ticks: new Map() };
let frame = 0;
const schedule = () => { if (!frame) frame = requestAnimationFrame(flush); };

function onEvent(m) {
  if (typeof m.id === "string") state.lastId = m.id;
  const d = m.data && typeof m.data === "object" ? m.data : {};
  const topic = state.subs.get(m.sub);
  if (topic === "patterns") {
    pending.alerts.push(d);
    if (pending.alerts.length > MAX_ROWS) pending.alerts.shift();
    schedule();
  } else if (topic === "ticks") {
    if (typeof d.symbol === "string" && num(d.price)) { pending.ticks.set(d.symbol, d.price); schedule(); }
  } else if (topic === "health") onHealth(d);
  else if (topic === "backtests") onBacktest(m.type, d);
}

function alertRow(d) {
  const tr = el("tr");
  const conf = el("td", "num", pct(d.confidence));
  if (num(d.confidence) && d.confidence >= 0.85) conf.classList.add("hi");
  const pattern = el("td", null, str(d.pattern));
  pattern.title = pattern.textContent;
  tr.append(el("td", "time", hms(d.timestamp)), el("td", "sym", str(d.symbol)), pattern, conf,
    el("td", "num", fixed(d.price, 2)));
  return tr;
}

function flush() {
  frame = 0;
  if (pending.alerts.length) {
    const rows = document.createDocumentFragment();
    for (let i = pending.alerts.length - 1; i >= 0; i--) rows.append(alertRow(pending.alerts[i]));
    pending.alerts = [];
    ui.alerts.prepend(rows);
    while (ui.alerts.rows.length > MAX_ROWS) ui.alerts.lastElementChild.remove();
    ui.alertsEmpty.hidden = true;
    ui.alertCount.textContent = `(latest ${ui.alerts.rows.length})`;
  }
  for (const [symbol, price] of pending.ticks) updatePrice(symbol, price);
  pending.ticks.clear();
}

// ---- prices ----------------------------------------------------------------

let tiles = new Map(); // symbol -> { box, value, arrow, last }

function renderTiles() {
  const next = new Map();
  for (const symbol of state.watch) {
    let tile = tiles.get(symbol);
    if (!tile) {
      tile = { box: el("div", "tile"), value: el("span", "price", "—"), arrow: el("span", "arrow"), last: null };
      tile.box.append(el("span", "sym", symbol), tile.value, tile.arrow);
    }
    next.set(symbol, tile);
  }
  tiles = next;
  ui.prices.replaceChildren(...[...next.values()].map((t) => t.box));
}

function updatePrice(symbol, price) {
  const tile = tiles.get(symbol);
  if (!tile) return;
  if (tile.last !== null && price !== tile.last) {
    const up = price > tile.last;
    tile.box.dataset.dir = up ? "up" : "down";
    tile.arrow.textContent = up ? "▲" : "▼";
  }
  tile.last = price;
  tile.value.textContent = price.toFixed(2);
}

function applyWatch() {
  const { list, bad } = parseSymbols(ui.watch.value);
  ui.watchMsg.textContent = bad.length ? `ignored: ${bad.join(", ").slice(0, 80)}` : list.length ? "" : "empty watchlist";
  state.watch = list.slice(0, 50);
  ui.watch.value = state.watch.join(",");
  renderTiles();
  if (state.welcomeAt) subscribeWatch(); // else the welcome will
}

// ---- health ----------------------------------------------------------------

const services = new Map(); // service -> { status, ts, seen }

function onHealth(d) {
  const name = typeof d.service === "string" ? d.service : "producer";
  services.set(name, { status: str(d.status), ts: num(d.timestamp) ? d.timestamp : Date.now() / 1000, seen: Date.now() });
  renderHealth();
}

function renderHealth() {
  if (!services.size) return;
  const lines = [];
  for (const [name, h] of services) {
    const ago = Math.round((Date.now() - h.seen) / 1000);
    const line = el("p", "health");
    line.dataset.status = ago > 30 ? "stale" : h.status;
    line.append(el("span", "dot"), el("strong", null, `${name}: ${h.status}`),
      el("span", "muted", `last heartbeat ${hms(h.ts)} (${ago}s ago)`));
    lines.push(line);
  }
  ui.health.replaceChildren(...lines);
}

// ---- backtests -------------------------------------------------------------

function jobStatus(job, status, text) {
  job.box.dataset.status = status; job.status.textContent = text;
  job.cancel.hidden = !job.id || FINAL.has(status);
}

function newJob(title, id) {
  const job = { id, box: el("li", "job"), title: el("span", "job-title", title), status: el("span", "job-status"),
    cancel: el("button", "job-cancel", "Cancel"), bar: el("progress"), results: el("dl", "results") };
  job.bar.max = 1; job.bar.value = 0; job.cancel.type = "button"; job.cancel.hidden = true;
  job.cancel.addEventListener("click", () => cancelJob(job));
  job.box.append(job.title, job.status, job.cancel, job.bar, job.results);
  ui.jobs.prepend(job.box);
  while (ui.jobs.children.length > MAX_JOBS) ui.jobs.lastElementChild.remove();
  for (const [jobId, j] of state.jobs) if (!j.box.isConnected) state.jobs.delete(jobId);
  if (id) state.jobs.set(id, job);
  return job;
}

const jobTitle = (p) => `${(p.symbols || []).join(", ")} · ${str(p.start_date)} → ${str(p.end_date)}`;

function submitBacktest() {
  const { list, bad } = parseSymbols(ui.btSymbols.value);
  const start = ui.btStart.value, end = ui.btEnd.value;
  ui.btMsg.textContent = bad.length ? `not a symbol: ${bad.join(", ").slice(0, 80)}`
    : !list.length ? "give at least one symbol" : !start || !end || start > end ? "check the dates" : "";
  if (!ui.btMsg.textContent && !state.welcomeAt) ui.btMsg.textContent = "not connected";
  if (ui.btMsg.textContent) return;
  const id = `r${++state.seq}`;
  const job = newJob(jobTitle({ symbols: list, start_date: start, end_date: end }));
  jobStatus(job, "pending", "submitting…");
  state.requests.set(id, job);
  send({ op: "submit_backtest", id, params: { symbols: list, start_date: start, end_date: end, patterns: [] } });
}

function accepted(m) {
  const job = state.requests.get(m.id);
  if (!job || typeof m.job_id !== "string") return;
  state.requests.delete(m.id);
  const early = state.jobs.get(m.job_id); // its events beat the acceptance: keep that row
  if (early) { early.title.textContent = job.title.textContent; job.box.remove(); return; }
  job.id = m.job_id; state.jobs.set(m.job_id, job);
  jobStatus(job, "queued", "queued");
}

function cancelJob(job) {
  const id = `c${++state.seq}`;
  state.cancels.set(id, job); job.cancel.disabled = true;
  send({ op: "cancel_job", id, job_id: job.id });
}

function cancelled(m) {
  const job = state.cancels.get(m.id);
  state.cancels.delete(m.id);
  if (job && !FINAL.has(job.box.dataset.status)) jobStatus(job, "cancelled", "cancelled");
}

function showResults(job, r) {
  const items = [["Win rate", pct(r.win_rate, 1)], ["ROI", pct(r.roi, 2)], ["Sharpe", fixed(r.sharpe_ratio, 2)],
    ["Max drawdown", pct(r.max_drawdown, 1)], ["Trades", num(r.trades) ? String(r.trades) : "—"]];
  job.results.replaceChildren(...items.flatMap(([k, v]) => [el("dt", null, k), el("dd", null, v)]));
}

function onBacktest(type, d) {
  if (typeof d.job_id !== "string") return;
  const job = state.jobs.get(d.job_id) || newJob(`job ${d.job_id.slice(0, 8)}`, d.job_id);
  if (FINAL.has(job.box.dataset.status)) return;
  if (type === "backtest_progress") {
    if (num(d.progress)) job.bar.value = Math.min(1, Math.max(0, d.progress));
    const status = d.status === "failed" || d.status === "cancelled" ? d.status : "running";
    const why = typeof d.error === "string" ? `: ${d.error}` : "";
    jobStatus(job, status, status === "running" ? `${str(d.status)} ${pct(d.progress)}` : `${status}${why}`);
  } else if (type === "backtest_result") {
    job.bar.value = 1; jobStatus(job, "done", "completed");
    showResults(job, d.results && typeof d.results === "object" ? d.results : {});
  }
}

// Past jobs, from the REST API: in the demo the bearer token is the user's name.
async function loadJobs(user) {
  let page;
  try {
    const answer = await fetch(`/api/jobs?limit=${MAX_JOBS}`, { headers: { authorization: `Bearer ${user}` } });
    if (!answer.ok) return;
    page = await answer.json();
  } catch { return; }
  for (const j of (page.jobs || []).slice().reverse()) {
    if (typeof j.job_id !== "string" || state.jobs.has(j.job_id)) continue;
    const job = newJob(jobTitle(j.params || {}), j.job_id);
    job.bar.value = num(j.progress) ? j.progress : 0;
    const status = j.status === "completed" ? "done" : str(j.status);
    jobStatus(job, status, j.error ? `${j.status}: ${j.error}` : status === "running" ? `running ${pct(j.progress)}` : str(j.status));
    if (j.results && typeof j.results === "object") showResults(job, j.results);
  }
}

// ---- wiring ----------------------------------------------------------------

ui.login.addEventListener("submit", (e) => {
  e.preventDefault();
  state.name = ui.name.value.trim();
  if (!USER.test(state.name)) { ui.notice.textContent = "name: 1-64 of A-Z a-z 0-9 _ . @ -"; return; }
  disconnect();
  state.attempt = 0;
  state.lastId = null; // a new session, perhaps another user: no resume
  connect();
});
ui.disconnect.addEventListener("click", disconnect);
ui.watchForm.addEventListener("submit", (e) => { e.preventDefault(); applyWatch(); });
ui.btForm.addEventListener("submit", (e) => { e.preventDefault(); submitBacktest(); });
window.addEventListener("online", () => { if (state.retryTimer) connect(); });
setInterval(() => { showCountdown(); renderHealth(); }, 1000);

state.name = USER.test(ui.name.value.trim()) ? ui.name.value.trim() : "demo";
applyWatch();
connect();
