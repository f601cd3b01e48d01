// TickStock's dashboard. The connection is tickstock.js; this file is the page:
// a DOM built with createElement/textContent only, so nothing from the wire is
// ever parsed as HTML, and rendering batched to one pass per animation frame.

import { TickStock, compareIds } from "/static/tickstock.js";
import { CandleChart, INTERVALS, direction } from "./chart.js";

const $ = (id) => document.getElementById(id);
const SYMBOL = /^[A-Z0-9.-]{1,10}$/;
const USER = /^[A-Za-z0-9_.@-]{1,64}$/;
const KEEP_ALERTS = 500, MAX_ROWS = 100, RECENT_PER_SYMBOL = 20, MAX_JOBS = 20, MAX_WATCH = 50, MAX_UNIVERSE = 500;
const STALE_S = 30, SERVER_POLL_MS = 5000, NOTIFY_GAP_MS = 1000;
const FINAL = new Set(["done", "failed", "cancelled"]);
const CREDENTIAL = "tickstock.credential"; // sessionStorage: gone with the tab, never in a URL
const WATCH = "tickstock.watch";           // localStorage: not a secret
const UNIVERSE = "tickstock.universe", INTERVAL = "tickstock.interval", NOTIFY = "tickstock.notify";

const ui = Object.fromEntries([
  "status", "status-text", "status-detail", "notice", "login", "credential", "credential-label", "signout",
  "watch-form", "watch", "watch-apply", "watch-msg", "universe", "notify", "notify-conf", "prices",
  "chart", "chart-symbol", "chart-last", "legend", "intervals",
  "filters", "f-symbol", "f-pattern", "f-conf", "alerts", "alerts-empty", "alert-count",
  "server", "health", "bt-form", "bt-symbols", "bt-start", "bt-end", "bt-run", "bt-msg", "jobs",
].map((id) => [id.replace(/-(\w)/g, (_, c) => c.toUpperCase()), $(id)]));

const page = {
  auth: "token",       // "none" when the server runs the demo without tokens
  credential: null,    // the token, or the demo user name
  client: null,
  watch: [],
  universe: "",        // the watched universe's key, or "" for the typed list
  feeds: [],           // this watchlist's subscriptions (patterns, ticks, universe)
  alerts: [],          // {id, data}, newest first, KEEP_ALERTS at most
  selected: null,      // the charted symbol
  barsLoaded: false,   // the charted symbol's history is in the chart
  jobs: new Map(),     // job_id -> row
  retryAt: 0,
};

// ---- small helpers -----------------------------------------------------------

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
function hms(epochSeconds) { // local time
  if (!num(epochSeconds)) return "--:--:--";
  const d = new Date(epochSeconds * 1000);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}
function parseSymbols(text) {
  const all = [...new Set(text.split(/[\s,]+/).map((s) => s.toUpperCase()).filter(Boolean))];
  return { list: all.filter((s) => SYMBOL.test(s)), bad: all.filter((s) => !SYMBOL.test(s)) };
}
const plural = (n, one) => `${n} ${one}${n === 1 ? "" : "s"}`;

// GET from the REST API as the signed-in user (the demo takes the user's name
// as its bearer token); null when it cannot answer.
async function api(path) {
  try {
    const reply = await fetch(path, { headers: { authorization: `Bearer ${page.credential}` } });
    return reply.ok ? await reply.json() : null;
  } catch { return null; }
}

// Render work is queued and done once per animation frame: at 50 events/s the
// page changes at most 60 times a second, in one layout pass each.
const dirty = new Set();
let frame = 0;
function later(job) { dirty.add(job); if (!frame) frame = requestAnimationFrame(flush); }
function flush() { frame = 0; const jobs = [...dirty]; dirty.clear(); for (const job of jobs) job(); }

// ---- connection ----------------------------------------------------------------

function setStatus(state, text, detail) {
  ui.status.dataset.state = state;
  ui.statusText.textContent = text;
  if (detail !== undefined) ui.statusDetail.textContent = detail;
}

function onState(s) {
  if (s.state === "connecting") setStatus("connecting", "connecting…", "");
  else if (s.state === "connected") {
    setStatus("connected", `connected as ${str(s.user)}`, s.resumed ? "recovering missed events…" : "");
    ui.notice.textContent = "";
    ui.btRun.disabled = false;
    loadJobs();
    if (!s.resumed) loadRecentAlerts();
    loadUniverses();
    if (page.universe) loadMembers();
    if (page.selected && !page.barsLoaded) loadBars(page.selected);
  } else if (s.state === "reconnecting") {
    page.retryAt = s.retryAt;
    ui.btRun.disabled = true;
    showCountdown();
    ui.statusDetail.textContent = s.reason ? `(${s.reason})` : `(connection lost${s.code ? `, ${s.code}` : ""})`;
  } else {
    ui.btRun.disabled = true;
    const refused = s.code === 1008 || s.code === 1009;
    setStatus("offline", "offline", refused ? `refused: ${s.reason || s.code}` : "");
    if (refused) { ui.notice.textContent = "Sign in again."; forget(); }
  }
}

function showCountdown() {
  if (page.client?.state !== "reconnecting") return;
  const s = Math.max(0, Math.ceil((page.retryAt - Date.now()) / 1000));
  setStatus("reconnecting", `reconnecting in ${s}s`);
}

function onRecovered(r) {
  const missed = r.missed.map((m) => `${m.topic}${num(m.count) ? ` (${m.count})` : ""}`).join(", ");
  ui.statusDetail.textContent = r.complete
    ? `recovered ${plural(r.events, "missed event")}`
    : `recovered ${plural(r.events, "event")}; could not recover older ${missed}`;
}

function start(credential) {
  page.client?.close();
  page.credential = credential;
  const client = new TickStock(page.auth === "none" ? { user: credential } : { token: credential });
  page.client = client;
  client.on("state", (s) => { if (page.client === client) onState(s); });
  client.on("recovered", (r) => { if (page.client === client) onRecovered(r); });
  client.on("job", (e) => onJob(e.type, e.data));
  // A pasted token cannot be renewed here: say when it runs out (the server closes at expiry).
  client.on("token_expiring", (e) => {
    if (page.client === client) ui.notice.textContent = `Your token expires in ${e.in} s: sign out and in with a new one.`;
  });
  client.on("error", (e) => {
    const text = `${e.code}: ${e.message}`.slice(0, 200);
    if (e.subscription) ui.watchMsg.textContent = text; else ui.notice.textContent = text;
  });
  client.subscribe("health", null, (e) => onHealth(e.data, e.snapshot));
  subscribeWatch();
  client.connect();
}

function forget() {
  sessionStorage.removeItem(CREDENTIAL);
  page.credential = null;
  ui.credential.value = page.auth === "none" ? "demo" : "";
}

function signOut() {
  page.client?.close();
  page.client = null;
  forget();
  page.jobs.clear();
  ui.jobs.replaceChildren();
  setStatus("offline", "offline", "signed out");
}

// ---- watchlist, universes, alerts, prices ----------------------------------------

function subscribeWatch() {
  const client = page.client;
  if (!client) return;
  for (const sub of page.feeds) sub.unsubscribe();
  page.feeds = [];
  if (page.universe) { // the server keeps the universe's symbols current: its new members come live
    const filter = { universe: page.universe };
    page.feeds.push(client.subscribe("patterns", filter, onAlert),
      client.subscribe("ticks", filter, (e) => onTick(e.data)),
      client.subscribe("universe", null, (e) => onUniverseEvent(e.data)));
    return;
  }
  if (!page.watch.length) return; // no filter would mean every symbol
  const filter = { symbols: page.watch };
  page.feeds.push(client.subscribe("patterns", filter, onAlert),
    client.subscribe("ticks", filter, (e) => onTick(e.data)));
}

// Show these symbols as the watchlist: tiles, the symbol filter, the chart.
function setWatch(list) {
  page.watch = list;
  const watched = new Set(list);
  page.alerts = page.alerts.filter((a) => watched.has(a.data.symbol));
  const chosen = ui.fSymbol.value;
  ui.fSymbol.replaceChildren(el("option", null, "all"), ...list.map((s) => el("option", null, s)));
  ui.fSymbol.options[0].value = "";
  ui.fSymbol.value = watched.has(chosen) ? chosen : "";
  renderTiles();
  select(watched.has(page.selected) ? page.selected : list[0] || null);
  later(renderAlerts);
}

function applyWatch() {
  const { list, bad } = parseSymbols(ui.watch.value);
  ui.watchMsg.textContent = bad.length ? `ignored: ${bad.join(", ").slice(0, 80)}` : list.length ? "" : "empty watchlist";
  ui.watch.value = list.slice(0, MAX_WATCH).join(",");
  localStorage.setItem(WATCH, ui.watch.value);
  if (page.universe) return;
  setWatch(list.slice(0, MAX_WATCH));
  subscribeWatch();
  if (page.client?.state === "connected") loadRecentAlerts();
}

// Watch a universe ("" for the typed list): subscribe with its key, then show its members.
function pickUniverse(key) {
  page.universe = key;
  localStorage.setItem(UNIVERSE, key);
  ui.watch.disabled = ui.watchApply.disabled = Boolean(key);
  ui.watchMsg.textContent = "";
  if (!key) { applyWatch(); return; }
  setWatch([]);
  subscribeWatch();
  if (page.client?.state === "connected") loadMembers();
}

async function loadUniverses() {
  const answer = await api("/api/universes");
  const all = (Array.isArray(answer?.universes) ? answer.universes : []).filter((u) => u && typeof u.key === "string");
  all.sort((a, b) => (a.type === "etf_universe" ? 0 : 1) - (b.type === "etf_universe" ? 0 : 1) || (a.key < b.key ? -1 : 1));
  const options = all.map((u) => {
    const option = el("option", null, `${u.key}${num(u.symbol_count) ? ` (${u.symbol_count})` : ""}`);
    option.value = u.key;
    return option;
  });
  if (page.universe && !all.some((u) => u.key === page.universe)) {
    options.unshift(el("option", null, page.universe));
    options[0].value = page.universe;
  }
  const mine = el("option", null, "my list");
  mine.value = "";
  ui.universe.replaceChildren(mine, ...options);
  ui.universe.value = page.universe;
}

// The universe's members now, from the REST API (also after the producer changed it).
async function loadMembers() {
  const key = page.universe;
  const answer = await api(`/api/universes/${encodeURIComponent(key)}`);
  if (key !== page.universe) return;
  if (!answer || !Array.isArray(answer.symbols)) { ui.watchMsg.textContent = `no universe ${key}`; return; }
  const members = answer.symbols.filter((s) => typeof s === "string" && SYMBOL.test(s)).slice(0, MAX_UNIVERSE);
  const live = page.watch.filter((s) => !members.includes(s) && page.alerts.some((a) => a.data.symbol === s));
  setWatch([...members, ...live]);
  loadRecentAlerts();
}

function onUniverseEvent(d) {
  const named = ["universe", "key", "universe_key", "cache_key", "theme"].map((k) => d[k]).filter((k) => typeof k === "string")
    .concat(...["universes", "keys"].map((k) => (Array.isArray(d[k]) ? d[k] : [])));
  if (!named.length || named.includes(page.universe)) later(loadMembers);
}

// An event for a symbol the page does not show yet: with a universe, it has a new member.
function member(symbol) {
  if (!page.universe || page.watch.includes(symbol) || !SYMBOL.test(symbol) || page.watch.length >= MAX_UNIVERSE) return;
  page.watch = [...page.watch, symbol];
  later(showWatch);
}
function showWatch() { setWatch(page.watch); }

function onAlert(e) {
  if (typeof e.data.symbol !== "string") return;
  member(e.data.symbol);
  const alert = { id: e.id, data: e.data };
  page.alerts.unshift(alert);
  if (page.alerts.length > KEEP_ALERTS * 2) page.alerts.length = KEEP_ALERTS;
  pendingAlerts.push(alert);
  later(addAlerts);
  if (alert.data.symbol === page.selected) later(chartAlerts);
  notify(alert);
}

// The watchlist's latest alerts from the history (/api/patterns), merged by id
// with the live ones, so a fresh page does not start empty.
async function loadRecentAlerts() {
  const pages = await Promise.all(page.watch.slice(0, MAX_WATCH).map(async (symbol) =>
    (await api(`/api/patterns?symbol=${encodeURIComponent(symbol)}&limit=${RECENT_PER_SYMBOL}`))?.patterns));
  const watched = new Set(page.watch), known = new Set(page.alerts.map((a) => a.id));
  const older = pages.filter(Array.isArray).flat().filter((r) => r && typeof r.id === "string" && !known.has(r.id)
    && r.data && typeof r.data === "object" && watched.has(r.data.symbol));
  if (!older.length) return;
  page.alerts = [...page.alerts, ...older.map((r) => ({ id: r.id, data: r.data }))]
    .sort((a, b) => compareIds(b.id, a.id)).slice(0, KEEP_ALERTS);
  later(renderAlerts);
  later(chartAlerts);
}

function shown({ data: d }) {
  const symbol = ui.fSymbol.value, text = ui.fPattern.value.trim().toLowerCase(), least = Number(ui.fConf.value);
  return (!symbol || d.symbol === symbol)
    && (!text || (typeof d.pattern === "string" && d.pattern.toLowerCase().includes(text)))
    && (!least || (num(d.confidence) && d.confidence >= least));
}

function alertRow({ data: d }) {
  const tr = el("tr");
  const conf = el("td", "num", pct(d.confidence));
  if (num(d.confidence) && d.confidence >= 0.85) conf.classList.add("hi");
  const way = direction(d);
  const pattern = el("td", "pattern", str(d.pattern));
  pattern.title = pattern.textContent;
  if (way) pattern.dataset.dir = way;
  tr.append(el("td", "time", hms(d.timestamp)), el("td", "sym", str(d.symbol)), pattern, conf,
    el("td", "num", fixed(d.price, 2)));
  tr.tabIndex = 0;
  tr.title = `Chart ${str(d.symbol)} at this alert`;
  const show = () => { if (typeof d.symbol === "string") showAlert(d.symbol, d.timestamp); };
  tr.addEventListener("click", show);
  tr.addEventListener("keydown", (e) => { if (e.key === "Enter") show(); });
  return tr;
}

// Chart the alert's symbol and scroll to its candle, once its bars are in.
let focusAt = null;
function showAlert(symbol, seconds) {
  if (!num(seconds)) { select(symbol); return; }
  focusAt = seconds;
  if (symbol !== page.selected) select(symbol);
  else focusAlert();
  ui.chart.scrollIntoView({ block: "nearest" });
}
function focusAlert() {
  if (focusAt === null || !page.barsLoaded) return;
  chart.focus(focusAt);
  focusAt = null;
}

let pendingAlerts = [];
function addAlerts() { // new alerts only: prepend their rows, drop the oldest past MAX_ROWS
  const fresh = pendingAlerts.filter(shown).slice(-MAX_ROWS).reverse(); // newest first
  pendingAlerts = [];
  if (!fresh.length) return;
  const rows = document.createDocumentFragment();
  for (const d of fresh) rows.append(alertRow(d));
  ui.alerts.prepend(rows);
  while (ui.alerts.rows.length > MAX_ROWS) ui.alerts.lastElementChild.remove();
  alertsShown();
}

function renderAlerts() { // everything again, after the filters or the watchlist changed
  pendingAlerts = [];
  ui.alerts.replaceChildren(...page.alerts.slice(0, KEEP_ALERTS).filter(shown).slice(0, MAX_ROWS).map(alertRow));
  alertsShown();
}

function alertsShown() {
  const n = ui.alerts.rows.length;
  ui.alertsEmpty.hidden = n > 0;
  ui.alertsEmpty.textContent = page.alerts.length ? "No alert matches the filters" : "Waiting for alerts…";
  ui.alertCount.textContent = n ? `(latest ${n})` : "";
}

function chartAlerts() { chart.setAlerts(page.alerts.filter((a) => a.data.symbol === page.selected)); }

// ---- notifications (opt-in) ----------------------------------------------------------

let lastNotified = 0;
function notify({ id, data: d }) {
  if (!ui.notify.checked || globalThis.Notification?.permission !== "granted") return;
  if (!num(d.confidence) || d.confidence < Number(ui.notifyConf.value) || !page.watch.includes(d.symbol)) return;
  if (Date.now() - lastNotified < NOTIFY_GAP_MS) return; // a burst makes one notification, not fifty
  lastNotified = Date.now();
  const way = direction(d);
  new Notification(`${d.symbol} ${str(d.pattern)}${way ? ` (${way})` : ""}`, {
    body: `${pct(d.confidence)} at ${fixed(d.price, 2)}, ${hms(d.timestamp)}`, tag: `tickstock-${d.symbol}`, data: id });
}

async function toggleNotify() {
  if (ui.notify.checked && globalThis.Notification && Notification.permission !== "granted") {
    const answer = await Notification.requestPermission().catch(() => "denied");
    if (answer !== "granted") {
      ui.notify.checked = false;
      ui.watchMsg.textContent = "notifications are blocked for this site";
    }
  } else if (ui.notify.checked && !globalThis.Notification) {
    ui.notify.checked = false;
    ui.watchMsg.textContent = "this browser has no notifications";
  }
  localStorage.setItem(NOTIFY, ui.notify.checked ? ui.notifyConf.value : "");
}

// ---- prices and the chart ------------------------------------------------------------

let tiles = new Map(); // symbol -> { box, value, arrow, last }

function renderTiles() {
  const next = new Map();
  for (const symbol of page.watch) {
    let tile = tiles.get(symbol);
    if (!tile) {
      tile = { box: el("button", "tile"), value: el("span", "price", "—"), arrow: el("span", "arrow"), last: null };
      tile.box.type = "button";
      tile.box.title = `Chart ${symbol}`;
      tile.box.append(el("span", "sym", symbol), tile.value, tile.arrow);
      tile.box.addEventListener("click", () => select(symbol));
    }
    next.set(symbol, tile);
  }
  tiles = next;
  ui.prices.replaceChildren(...[...next.values()].map((t) => t.box));
}

const changedPrices = new Map();
function onTick(d) {
  if (typeof d.symbol !== "string" || !num(d.price)) return;
  member(d.symbol);
  if (d.symbol === page.selected) chart.addTick(d.price, d.volume, num(d.timestamp) ? d.timestamp : Date.now() / 1000);
  changedPrices.set(d.symbol, d.price);
  later(renderPrices);
}

function renderPrices() {
  for (const [symbol, price] of changedPrices) {
    const tile = tiles.get(symbol);
    if (!tile) continue;
    if (tile.last !== null && price !== tile.last) {
      const up = price > tile.last;
      tile.box.dataset.dir = up ? "up" : "down";
      tile.arrow.textContent = up ? "▲" : "▼";
    }
    tile.last = price;
    tile.value.textContent = price.toFixed(2);
  }
  if (changedPrices.has(page.selected)) ui.chartLast.textContent = changedPrices.get(page.selected).toFixed(2);
  changedPrices.clear();
}

function select(symbol) {
  if (symbol === page.selected && symbol) return;
  page.selected = symbol;
  page.barsLoaded = false;
  for (const [s, tile] of tiles) tile.box.setAttribute("aria-pressed", String(s === symbol));
  ui.chartSymbol.textContent = symbol || "";
  const last = symbol && tiles.get(symbol)?.last;
  ui.chartLast.textContent = num(last) ? last.toFixed(2) : "";
  chart.reset();
  chartAlerts();
  if (symbol) loadBars(symbol);
}

// The last day's 1-minute bars, so a chart starts with a history; live ticks follow on.
async function loadBars(symbol) {
  if (!page.credential) return;
  const answer = await api(`/api/ohlcv/${encodeURIComponent(symbol)}`);
  if (!answer || page.selected !== symbol) return;
  chart.addBars((Array.isArray(answer.bars) ? answer.bars : []).filter((b) => b && num(b.minute)
    && [b.open, b.high, b.low, b.close].every(num)));
  page.barsLoaded = true;
  later(focusAlert);
}

function chooseInterval(name) {
  const seconds = INTERVALS[name] ? name : "1m";
  for (const b of ui.intervals.querySelectorAll("button")) b.setAttribute("aria-pressed", String(b.dataset.interval === seconds));
  localStorage.setItem(INTERVAL, seconds);
  chart.setInterval(INTERVALS[seconds]);
}

// ---- health ----------------------------------------------------------------------

const producers = new Map(); // service -> { status, ts, seen }

function onHealth(d, snapshot) {
  const name = typeof d.service === "string" ? d.service.slice(0, 64) : "producer";
  const ts = num(d.timestamp) ? d.timestamp : Date.now() / 1000;
  // A snapshot (the last heartbeat, sent on subscribe) was seen when it was sent, not now.
  producers.set(name, { status: str(d.status), ts, seen: snapshot ? Math.min(ts * 1000, Date.now()) : Date.now() });
  later(renderHealth);
}

function renderHealth() {
  if (!producers.size) return;
  const lines = [];
  for (const [name, h] of producers) {
    const ago = Math.round((Date.now() - h.seen) / 1000);
    const line = el("p", "health");
    line.dataset.status = ago > STALE_S ? "stale" : h.status;
    line.append(el("span", "dot"), el("strong", null, `${name}: ${h.status}`),
      el("span", "muted", `last heartbeat ${hms(h.ts)} (${ago}s ago)`));
    lines.push(line);
  }
  ui.health.replaceChildren(...lines);
}

async function pollServer() {
  let ready = null;
  try {
    const answer = await fetch("/ready", { cache: "no-store" });
    ready = await answer.json();
  } catch { /* shown as unreachable */ }
  const line = el("p", "health");
  if (!ready || typeof ready !== "object") {
    line.dataset.status = "down";
    line.append(el("span", "dot"), el("strong", null, "TickStock: unreachable"));
  } else {
    line.dataset.status = ready.ready ? "healthy" : "degraded";
    const parts = Object.entries(ready.components || {}).map(([name, c]) =>
      `${name} ${c && typeof c === "object" && typeof c.state === "string" ? c.state : c && c.ready === false ? "down" : "ok"}`);
    line.append(el("span", "dot"), el("strong", null, `TickStock: ${ready.ready ? "ready" : "not ready"} (${str(ready.mode)})`),
      el("span", "muted", parts.join(" · ")));
  }
  ui.server.replaceChildren(line);
}

// ---- backtests ---------------------------------------------------------------------

function jobStatus(job, status, text) {
  job.box.dataset.status = status;
  job.status.textContent = text;
  job.cancel.hidden = !job.id || FINAL.has(status);
}

function newJob(title, id) {
  const job = { id, box: el("li", "job"), title: el("span", "job-title"), status: el("span", "job-status"),
    cancel: el("button", "job-cancel", "Cancel"), bar: el("progress"), results: el("dl", "results") };
  job.title.append(...[title].flat());
  job.bar.max = 1; job.bar.value = 0; job.cancel.type = "button"; job.cancel.hidden = true;
  job.cancel.addEventListener("click", () => cancelJob(job));
  job.box.append(job.title, job.status, job.cancel, job.bar, job.results);
  ui.jobs.prepend(job.box);
  while (ui.jobs.children.length > MAX_JOBS) ui.jobs.lastElementChild.remove();
  for (const [jobId, j] of page.jobs) if (!j.box.isConnected) page.jobs.delete(jobId);
  if (id) page.jobs.set(id, job);
  return job;
}

// The title's nodes; its dates are one span that CSS never breaks across lines.
const jobTitle = (p) => [`${(Array.isArray(p.symbols) ? p.symbols : []).join(", ")} · `,
  el("span", "dates", `${str(p.start_date)} → ${str(p.end_date)}`)];

function submitBacktest() {
  const { list, bad } = parseSymbols(ui.btSymbols.value);
  const start = ui.btStart.value, end = ui.btEnd.value;
  ui.btMsg.textContent = bad.length ? `not a symbol: ${bad.join(", ").slice(0, 80)}`
    : !list.length ? "give at least one symbol" : !start || !end || start > end ? "check the dates" : "";
  if (ui.btMsg.textContent) return;
  const params = { symbols: list, start_date: start, end_date: end, patterns: [] };
  const job = newJob(jobTitle(params));
  jobStatus(job, "pending", "submitting…");
  page.client.submitBacktest(params).then((jobId) => {
    const early = page.jobs.get(jobId); // its events beat the acceptance: keep that row
    if (early) { early.title.replaceChildren(...job.title.childNodes); job.box.remove(); return; }
    job.id = jobId;
    page.jobs.set(jobId, job);
    jobStatus(job, "queued", "queued");
  }, (error) => {
    const fields = error.fields ? ` (${Object.entries(error.fields).map(([k, v]) => `${k}: ${v}`).join("; ")})` : "";
    jobStatus(job, "failed", `${error.message}${fields}`.slice(0, 300));
  });
}

function cancelJob(job) {
  job.cancel.disabled = true;
  page.client.cancelJob(job.id).then(() => {
    if (!FINAL.has(job.box.dataset.status)) jobStatus(job, "cancelled", "cancelled");
  }, (error) => { job.cancel.disabled = false; ui.btMsg.textContent = error.message; });
}

function showResults(job, r) {
  const items = [["Win rate", pct(r.win_rate, 1)], ["ROI", pct(r.roi, 2)], ["Sharpe", fixed(r.sharpe_ratio, 2)],
    ["Max drawdown", pct(r.max_drawdown, 1)], ["Trades", num(r.trades) ? String(r.trades) : "—"]];
  job.results.replaceChildren(...items.map(([k, v]) => {
    const pair = el("div"); // one label over its value, wrapping as a unit
    pair.append(el("dt", null, k), el("dd", null, v));
    return pair;
  }));
}

function onJob(type, d) {
  if (typeof d.job_id !== "string") return;
  const job = page.jobs.get(d.job_id) || newJob(`job ${d.job_id.slice(0, 8)}`, d.job_id);
  if (FINAL.has(job.box.dataset.status)) return;
  if (type === "backtest_progress") {
    if (num(d.progress)) job.bar.value = Math.min(1, Math.max(0, d.progress));
    const status = d.status === "failed" || d.status === "cancelled" ? d.status : "running";
    const why = typeof d.error === "string" ? `: ${d.error}` : "";
    jobStatus(job, status, status === "running" ? `${str(d.status)} ${pct(d.progress)}` : `${status}${why}`);
  } else if (type === "backtest_result") {
    job.bar.value = 1;
    jobStatus(job, "done", "completed");
    showResults(job, d.results && typeof d.results === "object" ? d.results : {});
  }
}

// Past jobs, from the REST API.
async function loadJobs() {
  const answer = await api(`/api/jobs?limit=${MAX_JOBS}`);
  if (!answer) return;
  for (const j of (Array.isArray(answer.jobs) ? answer.jobs : []).slice().reverse()) {
    if (typeof j.job_id !== "string") continue;
    const seen = page.jobs.get(j.job_id); // its events came first: give it its title
    if (seen) { if (j.params) seen.title.replaceChildren(...jobTitle(j.params)); continue; }
    const job = newJob(jobTitle(j.params || {}), j.job_id);
    job.bar.value = num(j.progress) ? j.progress : 0;
    const status = j.status === "completed" ? "done" : str(j.status);
    jobStatus(job, status, j.error ? `${j.status}: ${j.error}` : status === "running" ? `running ${pct(j.progress)}` : str(j.status));
    if (j.results && typeof j.results === "object") showResults(job, j.results);
  }
}

// ---- wiring --------------------------------------------------------------------------

const chart = new CandleChart(ui.chart, ui.legend);

async function main() {
  try {
    const health = await (await fetch("/health", { cache: "no-store" })).json();
    if (health.auth === "none") page.auth = "none";
  } catch { /* assume tokens */ }
  if (page.auth === "none") {
    ui.credentialLabel.textContent = "User name";
    ui.credential.type = "text";
    ui.credential.maxLength = 64;
    ui.credential.autocomplete = "username";
  }
  ui.watch.value = localStorage.getItem(WATCH) || ui.watch.value;
  chooseInterval(localStorage.getItem(INTERVAL));
  const threshold = localStorage.getItem(NOTIFY);
  ui.notify.checked = Boolean(threshold) && globalThis.Notification?.permission === "granted";
  if (threshold) ui.notifyConf.value = threshold;
  const universe = localStorage.getItem(UNIVERSE) || "";
  if (universe) {
    ui.universe.append(el("option", null, universe));
    ui.universe.lastElementChild.value = universe;
    ui.universe.value = universe;
  }
  pickUniverse(universe);
  const saved = sessionStorage.getItem(CREDENTIAL) || (page.auth === "none" ? "demo" : null);
  ui.credential.value = page.auth === "none" ? saved : "";
  if (saved) start(saved);
  else setStatus("offline", "offline", "give a token to connect");
  pollServer();
  setInterval(pollServer, SERVER_POLL_MS);
  setInterval(() => { showCountdown(); later(renderHealth); }, 1000);
}

ui.login.addEventListener("submit", (e) => {
  e.preventDefault();
  const value = ui.credential.value.trim();
  const ok = page.auth === "none" ? USER.test(value) : /^[\w-]+\.[\w-]+\.[\w-]+$/.test(value);
  if (!ok) {
    ui.notice.textContent = page.auth === "none" ? "name: 1-64 of A-Z a-z 0-9 _ . @ -" : "that is not a token (header.payload.signature)";
    return;
  }
  sessionStorage.setItem(CREDENTIAL, value);
  if (page.auth !== "none") ui.credential.value = "";
  page.jobs.clear();
  ui.jobs.replaceChildren();
  start(value);
});
ui.signout.addEventListener("click", signOut);
ui.watchForm.addEventListener("submit", (e) => { e.preventDefault(); applyWatch(); });
ui.universe.addEventListener("change", () => pickUniverse(ui.universe.value));
ui.notify.addEventListener("change", toggleNotify);
ui.notifyConf.addEventListener("change", () => { if (ui.notify.checked) localStorage.setItem(NOTIFY, ui.notifyConf.value); });
ui.intervals.addEventListener("click", (e) => { if (e.target.dataset?.interval) chooseInterval(e.target.dataset.interval); });
ui.filters.addEventListener("submit", (e) => e.preventDefault());
ui.filters.addEventListener("input", () => later(renderAlerts));
ui.btForm.addEventListener("submit", (e) => { e.preventDefault(); submitBacktest(); });

main();
