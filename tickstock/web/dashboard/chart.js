// A small live line chart on a canvas: prices over time for one symbol, with a
// price scale, the time span and the last price. Redraws at most once a frame.

const pad2 = (n) => String(n).padStart(2, "0");
const clock = (ms) => { const d = new Date(ms); return `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`; };

export class PriceChart {
  constructor(canvas) {
    this.canvas = canvas;
    this.points = [];     // [epoch ms, price], oldest first
    this.frame = 0;
    const css = getComputedStyle(document.documentElement);
    this.colors = { ink: css.getPropertyValue("--ink").trim() || "#1c2430",
      muted: css.getPropertyValue("--muted").trim() || "#6b7685",
      line: css.getPropertyValue("--line").trim() || "#e2e6eb",
      accent: css.getPropertyValue("--accent").trim() || "#2457c5" };
    new ResizeObserver(() => this.redraw()).observe(canvas);
  }

  /** Show these points (the chart keeps the array; call redraw() after appending to it). */
  show(points) { this.points = points; this.redraw(); }

  redraw() {
    if (!this.frame) this.frame = requestAnimationFrame(() => { this.frame = 0; this.draw(); });
  }

  draw() {
    const { canvas, colors } = this;
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth, height = canvas.clientHeight;
    if (!width || !height) return;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    ctx.font = "12px system-ui, sans-serif";
    const points = this.points;
    if (points.length < 2) {
      ctx.fillStyle = colors.muted;
      ctx.textBaseline = "middle";
      ctx.fillText(points.length ? "waiting for more ticks…" : "waiting for ticks…", 8, height / 2);
      return;
    }
    let low = Infinity, high = -Infinity;
    for (const [, price] of points) { if (price < low) low = price; if (price > high) high = price; }
    const spread = Math.max(high - low, Math.abs(high) * 0.001, 0.01);
    low -= spread * 0.08; high += spread * 0.08;
    const t0 = points[0][0], t1 = points[points.length - 1][0];
    const left = 4, right = width - 64, top = 6, bottom = height - 20;
    const x = (t) => left + ((t - t0) / Math.max(t1 - t0, 1)) * (right - left);
    const y = (p) => bottom - ((p - low) / (high - low)) * (bottom - top);

    ctx.strokeStyle = colors.line; ctx.fillStyle = colors.muted; ctx.lineWidth = 1;
    ctx.textBaseline = "middle"; ctx.textAlign = "left";
    for (let i = 0; i <= 4; i++) {
      const price = low + ((high - low) * i) / 4, py = Math.round(y(price)) + 0.5;
      ctx.beginPath(); ctx.moveTo(left, py); ctx.lineTo(right, py); ctx.stroke();
      ctx.fillText(price.toFixed(2), right + 6, py);
    }
    ctx.textBaseline = "bottom";
    ctx.fillText(clock(t0), left, height);
    ctx.textAlign = "right";
    ctx.fillText(clock(t1), right, height);

    ctx.strokeStyle = colors.accent; ctx.lineWidth = 1.5; ctx.lineJoin = "round";
    ctx.beginPath();
    points.forEach(([t, price], i) => (i ? ctx.lineTo(x(t), y(price)) : ctx.moveTo(x(t), y(price))));
    ctx.stroke();
    const [tl, pl] = points[points.length - 1];
    ctx.fillStyle = colors.accent;
    ctx.beginPath(); ctx.arc(x(tl), y(pl), 3, 0, 2 * Math.PI); ctx.fill();
  }
}
