// The candlestick chart: TradingView's lightweight-charts (vendored, loaded as a
// classic script before this module), 1-minute bars aggregated here into the
// chosen interval, a volume pane, pattern markers, and a legend that says the
// hovered candle's OHLCV and alerts. Live ticks update the forming candle, at
// most once per animation frame.

const LWC = globalThis.LightweightCharts;
export const INTERVALS = { "1m": 60, "5m": 300, "15m": 900, "1h": 3600 };
const MAX_MINUTES = 24 * 60 * 3;

const pad2 = (n) => String(n).padStart(2, "0");
const hm = (d) => `${pad2(d.getHours())}:${pad2(d.getMinutes())}`;
const day = (d) => d.toLocaleDateString([], { month: "short", day: "numeric" });
const local = (t) => new Date(t * 1000); // lightweight-charts' times are UTC seconds: shown in the browser's zone
const DIRECTION = { bullish: "up", up: "up", buy: "up", long: "up", bearish: "down", down: "down", sell: "down", short: "down" };

/** "up", "down" or null: the producer's word for which way a pattern points, if it gave one. */
export function direction(data) {
  const word = typeof data.direction === "string" ? data.direction.toLowerCase() : "";
  return DIRECTION[word] || null;
}

export class CandleChart {
  constructor(box, legend) {
    this.box = box;
    this.legend = legend;
    this.interval = 60;
    this.minutes = new Map(); // minute (epoch s) -> {open, high, low, close, volume}
    this.candles = [];        // aggregated, oldest first
    this.at = new Map();      // candle time -> candle
    this.alerts = [];         // {id, data} of the charted symbol
    this.hovered = null;
    this.pinned = null;       // the candle focus() showed
    this.frame = 0;
    this.full = false;
    const css = getComputedStyle(document.documentElement), v = (name, fallback) => css.getPropertyValue(name).trim() || fallback;
    this.colors = { up: v("--up", "#0f8a4b"), down: v("--down", "#c8322d"), muted: v("--muted", "#6b7685"),
      line: v("--line", "#e2e6eb"), ink: v("--ink", "#1c2430") };
    this.chart = LWC.createChart(box, {
      autoSize: true,
      layout: { attributionLogo: false, textColor: this.colors.muted, fontSize: 11,
        panes: { separatorColor: this.colors.line } }, // the logo would need an inline <style>: the page links instead
      grid: { vertLines: { color: this.colors.line }, horzLines: { color: this.colors.line } },
      rightPriceScale: { borderColor: this.colors.line },
      timeScale: { borderColor: this.colors.line, timeVisible: true, secondsVisible: false,
        tickMarkFormatter: (t, type) => (type < 3 ? day(local(t)) : hm(local(t))) },
      localization: { timeFormatter: (t) => `${day(local(t))} ${hm(local(t))}` },
    });
    this.series = this.chart.addSeries(LWC.CandlestickSeries, { upColor: this.colors.up, downColor: this.colors.down,
      borderVisible: false, wickUpColor: this.colors.up, wickDownColor: this.colors.down });
    this.volume = this.chart.addSeries(LWC.HistogramSeries, { priceFormat: { type: "volume" },
      lastValueVisible: false, priceLineVisible: false }, 1);
    this.chart.panes()[1]?.setStretchFactor(0.25);
    this.markers = LWC.createSeriesMarkers(this.series, []);
    this.chart.subscribeCrosshairMove((p) => { // the mouse over a candle; a focused one stays till it moves there
      this.hovered = p.time ?? null;
      if (p.sourceEvent) this.pinned = null;
      this.showLegend();
    });
  }

  /** Chart another symbol (or none): forget the bars, markers and live candle. */
  reset() {
    this.minutes.clear();
    this.alerts = [];
    this.hovered = this.pinned = null;
    this.redraw(true);
  }

  setInterval(seconds) {
    this.interval = seconds;
    this.redraw(true);
    this.chart.timeScale().scrollToRealTime();
  }

  /** 1-minute bars from /api/ohlcv; a minute also seen live keeps its newer close. */
  addBars(bars) {
    for (const b of bars) {
      const live = this.minutes.get(b.minute);
      const bar = { open: b.open, high: b.high, low: b.low, close: b.close, volume: num(b.volume) ? b.volume : 0 };
      if (live) Object.assign(bar, { high: Math.max(bar.high, live.high), low: Math.min(bar.low, live.low),
        close: live.close, volume: Math.max(bar.volume, live.volume) });
      this.minutes.set(b.minute, bar);
    }
    this.redraw(true);
  }

  /** One tick of the charted symbol: it updates (or opens) its minute, and so the forming candle. */
  addTick(price, volume, seconds) {
    const minute = Math.floor(seconds / 60) * 60, bar = this.minutes.get(minute);
    const size = num(volume) && volume > 0 ? volume : 0;
    if (bar) Object.assign(bar, { high: Math.max(bar.high, price), low: Math.min(bar.low, price), close: price, volume: bar.volume + size });
    else this.minutes.set(minute, { open: price, high: price, low: price, close: price, volume: size });
    const last = this.candles[this.candles.length - 1];
    this.redraw(last !== undefined && this.bucket(minute) < last.time);
  }

  /** The charted symbol's alerts, each a marker at its candle. */
  setAlerts(alerts) {
    this.alerts = alerts;
    this.redraw(false);
  }

  /** Scroll to the candle of this time (epoch s) and say what it holds. */
  focus(seconds) {
    const time = this.bucket(seconds), candle = this.at.get(time);
    if (!candle) return;
    const index = this.candles.indexOf(candle), range = this.chart.timeScale().getVisibleLogicalRange();
    const span = range ? Math.max(20, range.to - range.from) : 60;
    this.chart.timeScale().setVisibleLogicalRange({ from: index - span * 0.7, to: index + span * 0.3 });
    this.chart.setCrosshairPosition(candle.close, time, this.series);
    this.pinned = time;
    this.showLegend();
  }

  bucket(seconds) { return Math.floor(seconds / this.interval) * this.interval; }

  redraw(full) {
    this.full ||= full;
    if (!this.frame) this.frame = requestAnimationFrame(() => { this.frame = 0; this.draw(); });
  }

  draw() {
    if (this.full) this.aggregate(); else this.updateLast();
    this.full = false;
    const markers = this.alerts.filter((a) => num(a.data.timestamp) && this.at.has(this.bucket(a.data.timestamp)))
      .map((a) => this.marker(a)).sort((a, b) => a.time - b.time);
    this.markers.setMarkers(markers);
    this.box.dataset.candles = String(this.candles.length);
    this.box.dataset.markers = String(markers.length);
    this.showLegend();
  }

  aggregate() {
    const minutes = [...this.minutes.keys()].sort((a, b) => a - b);
    for (const m of minutes.slice(0, Math.max(0, minutes.length - MAX_MINUTES))) this.minutes.delete(m);
    this.candles = [];
    this.at.clear();
    for (const m of minutes.slice(-MAX_MINUTES)) this.fold(m, this.minutes.get(m));
    this.series.setData(this.candles.map((c) => ({ time: c.time, open: c.open, high: c.high, low: c.low, close: c.close })));
    this.volume.setData(this.candles.map((c) => this.volumeBar(c)));
  }

  updateLast() { // only the newest minute changed: refold its candle and update that one point
    const minutes = [...this.minutes.keys()];
    const newest = Math.max(...minutes);
    if (!Number.isFinite(newest)) return;
    const time = this.bucket(newest);
    const candle = this.at.get(time);
    if (candle) { this.candles.pop(); this.at.delete(time); }
    for (const m of minutes.filter((m) => this.bucket(m) === time).sort((a, b) => a - b)) this.fold(m, this.minutes.get(m));
    const c = this.at.get(time);
    this.series.update({ time, open: c.open, high: c.high, low: c.low, close: c.close });
    this.volume.update(this.volumeBar(c));
  }

  fold(minute, bar) {
    const time = this.bucket(minute), c = this.at.get(time);
    if (!c) {
      const candle = { time, ...bar };
      this.candles.push(candle);
      this.at.set(time, candle);
    } else Object.assign(c, { high: Math.max(c.high, bar.high), low: Math.min(c.low, bar.low), close: bar.close, volume: c.volume + bar.volume });
  }

  volumeBar(c) {
    return { time: c.time, value: c.volume, color: `${c.close >= c.open ? this.colors.up : this.colors.down}66` };
  }

  marker({ id, data }) {
    const way = direction(data);
    return { id, time: this.bucket(data.timestamp), position: way === "up" ? "belowBar" : way === "down" ? "aboveBar" : "inBar",
      shape: way === "up" ? "arrowUp" : way === "down" ? "arrowDown" : "circle",
      color: way === "up" ? this.colors.up : way === "down" ? this.colors.down : this.colors.ink };
  }

  /** The hovered or focused candle's OHLCV and alerts, else the latest candle's. */
  showLegend() {
    const c = this.at.get(this.hovered ?? this.pinned) || this.candles[this.candles.length - 1];
    if (!c) { this.legend.replaceChildren(span("muted", "no bars yet")); return; }
    const values = [["O", c.open], ["H", c.high], ["L", c.low], ["C", c.close]].map(([k, x]) => span("v", `${k} ${x.toFixed(2)}`));
    const line = document.createElement("div");
    spaced(line, [span("muted", `${day(local(c.time))} ${hm(local(c.time))}`), ...values, span("v", `V ${volumeText(c.volume)}`)]);
    const here = this.alerts.filter((a) => num(a.data.timestamp) && this.bucket(a.data.timestamp) === c.time);
    const marks = document.createElement("div");
    marks.className = "marks";
    spaced(marks, here.slice(0, 5).map(({ data }) => {
      const way = direction(data), pattern = typeof data.pattern === "string" ? data.pattern : "—";
      const conf = num(data.confidence) ? ` ${Math.round(data.confidence * 100)}%` : "";
      return span(`mark ${way || ""}`, `${way === "up" ? "▲" : way === "down" ? "▼" : "●"} ${pattern}${conf}`);
    }));
    this.legend.replaceChildren(line, marks);
  }
}

function num(x) { return typeof x === "number" && Number.isFinite(x); }
function spaced(parent, nodes) { nodes.forEach((node, i) => parent.append(...(i ? ["  ", node] : [node]))); }
function span(cls, text) { const s = document.createElement("span"); s.className = cls; s.textContent = text; return s; }
function volumeText(v) {
  return v >= 1e6 ? `${(v / 1e6).toFixed(2)}M` : v >= 1e3 ? `${(v / 1e3).toFixed(1)}K` : String(Math.round(v));
}
