/* crosscoders report, charts.js: inline SVG charts (scales and axes, histogram, line
 * chart, scatter, bar chart, a log/linear toggle). */
(function (CC) {
  "use strict";
  const { cvar, CAT_NAMES, N, s, h, fmt, fmtTick, isNum, label, showTip, hideTip,
    panel } = CC;

  // ------------------------------------------------------------------ scales and axes
  function niceTicks(a, b, n) {
    if (!(b > a)) return [a];
    let step = Math.pow(10, Math.floor(Math.log10((b - a) / n)));
    const err = (n / (b - a)) * step;
    if (err <= 0.15) step *= 10; else if (err <= 0.35) step *= 5; else if (err <= 0.75) step *= 2;
    const out = [];
    for (let t = Math.ceil(a / step) * step; t <= b + step * 1e-9; t += step) {
      out.push(Math.abs(t) < step * 1e-9 ? 0 : t);
    }
    return out;
  }
  function scale(domain, range, log) {
    const tf = log ? Math.log10 : (v) => v;
    const d0 = tf(domain[0]); const d1 = tf(domain[1]);
    const span = d1 - d0 || 1;
    const f = (v) => range[0] + ((tf(v) - d0) / span) * (range[1] - range[0]);
    f.invert = (px) => {
      const t = d0 + ((px - range[0]) / (range[1] - range[0])) * span;
      return log ? Math.pow(10, t) : t;
    };
    f.ticks = (n) => {
      if (!log) return niceTicks(domain[0], domain[1], n);
      const lo = Math.floor(d0); const hi = Math.ceil(d1); const out = [];
      const every = Math.max(1, Math.ceil((hi - lo) / n));
      for (let e = lo; e <= hi; e += every) {
        const v = Math.pow(10, e);
        if (v >= domain[0] * 0.999 && v <= domain[1] * 1.001) out.push(v);
      }
      if (out.length < 2) {
        for (let e = lo; e <= hi; e++) {
          for (const m of [2, 5]) {
            const v = m * Math.pow(10, e);
            if (v >= domain[0] && v <= domain[1]) out.push(v);
          }
        }
        out.sort((p, q) => p - q);
      }
      return out;
    };
    f.domain = domain; f.range = range; f.log = log;
    return f;
  }
  const W = 560; const H = 240; const M = { l: 54, r: 14, t: 12, b: 40 };
  function frame(xDomain, yDomain, opts) {
    const height = opts.height || H;
    const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${height}`, role: "img",
      "aria-label": opts.aria || "" });
    const x = scale(xDomain, [M.l, W - M.r], opts.logX);
    const y = scale(yDomain, [height - M.b, M.t], opts.logY);
    const grid = s("g", { class: "grid" }, svg);
    const axis = s("g", { class: "axis" }, svg);
    for (const t of y.ticks(5)) {
      s("line", { x1: M.l, x2: W - M.r, y1: y(t), y2: y(t) }, grid);
      s("text", { x: M.l - 6, y: y(t) + 4, "text-anchor": "end" }, axis).textContent = fmtTick(t);
    }
    for (const t of x.ticks(6)) {
      s("line", { x1: x(t), x2: x(t), y1: height - M.b, y2: height - M.b + 4 }, axis);
      s("text", { x: x(t), y: height - M.b + 16, "text-anchor": "middle" }, axis)
        .textContent = fmtTick(t);
    }
    s("line", { x1: M.l, x2: W - M.r, y1: height - M.b, y2: height - M.b }, axis);
    if (opts.xLabel) {
      s("text", { x: (M.l + W - M.r) / 2, y: height - 6, "text-anchor": "middle" }, axis)
        .textContent = opts.xLabel;
    }
    if (opts.yLabel) {
      s("text", { transform: `translate(12 ${(height - M.b + M.t) / 2}) rotate(-90)`,
        "text-anchor": "middle" }, axis).textContent = opts.yLabel;
    }
    return { svg, x, y, height };
  }
  function guides(fr, xs, ys) {
    for (const v of xs || []) {
      if (v >= fr.x.domain[0] && v <= fr.x.domain[1]) {
        s("line", { class: "guide", x1: fr.x(v), x2: fr.x(v), y1: M.t, y2: fr.height - M.b },
          fr.svg);
      }
    }
    for (const v of ys || []) {
      if (v >= fr.y.domain[0] && v <= fr.y.domain[1]) {
        s("line", { class: "guide", x1: M.l, x2: W - M.r, y1: fr.y(v), y2: fr.y(v) }, fr.svg);
      }
    }
  }
  function extent(arrs, positive) {
    let lo = Infinity; let hi = -Infinity;
    for (const a of arrs) {
      for (const v of a) {
        if (!isNum(v) || (positive && v <= 0)) continue;
        if (v < lo) lo = v;
        if (v > hi) hi = v;
      }
    }
    if (lo === Infinity) return null;
    if (lo === hi) { lo = positive ? lo / 2 : lo - 1; hi = positive ? hi * 2 : hi + 1; }
    return [lo, hi];
  }
  function legend(items) {
    return h("div", { class: "legend" }, items.map((it) =>
      h("span", {}, h("i", { style: `background:${it.color}` }), it.name)));
  }

  // ------------------------------------------------------------------ charts
  /* Histogram of `values` in `bins` equal bins over `domain`, optionally stacked by
   * `groups` (same length as values, one colour per group). */
  function histogram(opts) {
    const { values, domain, bins } = opts;
    const keys = opts.groupOrder || ["all"];
    const counts = keys.map(() => new Float64Array(bins));
    const width = (domain[1] - domain[0]) / bins;
    const gi = new Map(keys.map((k, i) => [k, i]));
    for (let i = 0; i < values.length; i++) {
      const v = values[i];
      if (!isNum(v)) continue;
      let b = Math.floor((v - domain[0]) / width);
      if (b < 0 || b > bins) continue;
      if (b === bins) b = bins - 1;
      const g = opts.groups ? gi.get(opts.groups[i]) : 0;
      if (g != null) counts[g][b] += 1;
    }
    const totals = new Float64Array(bins);
    counts.forEach((c) => c.forEach((v, b) => { totals[b] += v; }));
    const maxC = Math.max(1, ...totals);
    const logY = !!opts.logY;
    const fr = frame(domain, logY ? [0.8, maxC * 1.3] : [0, maxC * 1.05],
      { logY, xLabel: opts.xLabel, yLabel: opts.yLabel || "latents", aria: opts.aria });
    if (opts.band) { // the null band, behind the bars
      const lo = Math.max(domain[0], opts.band[0]); const hi = Math.min(domain[1], opts.band[1]);
      if (hi > lo) {
        const r = s("rect", { class: "band", x: fr.x(lo), y: M.t, width: fr.x(hi) - fr.x(lo),
          height: fr.height - M.b - M.t }, fr.svg);
        r.addEventListener("mousemove", (ev) => showTip(ev, opts.bandTip || "null band"));
        r.addEventListener("mouseleave", hideTip);
      }
    }
    const base = fr.y.range[0];
    for (let b = 0; b < bins; b++) {
      if (!totals[b]) continue;
      const x0 = fr.x(domain[0] + b * width) + 0.5;
      const x1 = fr.x(domain[0] + (b + 1) * width) - 0.5;
      const g = s("g", { class: "bar" }, fr.svg);
      let cum = 0;
      const lines = [];
      keys.forEach((k, gidx) => {
        const c = counts[gidx][b];
        if (!c) return;
        const yTop = logY ? fr.y(Math.max(0.8, cum + c)) : fr.y(cum + c);
        const yBot = cum === 0 ? base : (logY ? fr.y(Math.max(0.8, cum)) : fr.y(cum));
        s("rect", { x: x0, width: Math.max(0.5, x1 - x0), y: yTop,
          height: Math.max(0.5, yBot - yTop), fill: opts.colors ? opts.colors[gidx] :
            (opts.color || cvar("--accent")) }, g);
        cum += c;
        lines.push(`${opts.groups ? label(CAT_NAMES[k] || k) + ": " : ""}${c}`);
      });
      const lo = domain[0] + b * width; const hi = lo + width;
      g.addEventListener("mousemove", (ev) => showTip(ev,
        `${opts.xLabel || "x"} ${fmt(lo)} – ${fmt(hi)}\n${lines.join("\n")}` +
        (opts.onBin ? "\nclick: show in the feature browser" : "")));
      g.addEventListener("mouseleave", hideTip);
      if (opts.onBin) g.addEventListener("click", () => opts.onBin(lo, hi));
    }
    guides(fr, opts.guides);
    return fr.svg;
  }

  function lineChart(opts) {
    const series = opts.series.filter((se) => se.ys.some(isNum));
    if (!series.length) return null;
    const xd = extent(series.map((se) => se.xs), false);
    let logY = !!opts.logY;
    let yd = extent(series.map((se) => se.ys), logY);
    if (!yd) { logY = false; yd = extent(series.map((se) => se.ys), false); }
    if (logY && yd[1] / yd[0] < 4) logY = false;
    if (!logY) {
      yd = extent(series.map((se) => se.ys), false);
      const pad = (yd[1] - yd[0]) * 0.06;
      yd = [yd[0] >= 0 && yd[0] - pad < 0 ? 0 : yd[0] - pad, yd[1] + pad];
    } else {
      yd = [yd[0] / 1.15, yd[1] * 1.15];
    }
    const fr = frame(xd, yd, { logY, xLabel: opts.xLabel || "step", yLabel: opts.yLabel,
      aria: opts.aria });
    for (const se of series) {
      let d = "";
      let pen = false;
      for (let i = 0; i < se.xs.length; i++) {
        const v = se.ys[i];
        if (!isNum(v) || (logY && v <= 0)) { pen = false; continue; }
        d += `${pen ? "L" : "M"}${fr.x(se.xs[i]).toFixed(1)},${fr.y(v).toFixed(1)}`;
        pen = true;
      }
      s("path", { d, fill: "none", stroke: se.color, "stroke-width": se.width || 1.6,
        "stroke-dasharray": se.dash, "stroke-linejoin": "round" }, fr.svg);
      if (se.dots) {
        for (let i = 0; i < se.xs.length; i++) {
          if (isNum(se.ys[i]) && !(logY && se.ys[i] <= 0)) {
            s("circle", { cx: fr.x(se.xs[i]), cy: fr.y(se.ys[i]), r: 2.6, fill: se.color },
              fr.svg);
          }
        }
      }
    }
    const cursor = s("line", { class: "guide", y1: M.t, y2: fr.height - M.b,
      visibility: "hidden" }, fr.svg);
    const hit = s("rect", { x: M.l, y: M.t, width: W - M.l - M.r,
      height: fr.height - M.t - M.b, fill: "transparent" }, fr.svg);
    hit.addEventListener("mousemove", (ev) => {
      const box = fr.svg.getBoundingClientRect();
      const step = fr.x.invert(((ev.clientX - box.left) / box.width) * W);
      const lines = [];
      let at = null;
      for (const se of series) {
        let best = -1; let bd = Infinity;
        for (let i = 0; i < se.xs.length; i++) {
          const dd = Math.abs(se.xs[i] - step);
          if (dd < bd && isNum(se.ys[i])) { bd = dd; best = i; }
        }
        if (best >= 0) {
          if (at == null) at = se.xs[best];
          lines.push(`${se.name}: ${fmt(se.ys[best])}`);
        }
      }
      if (at == null) return;
      cursor.setAttribute("x1", fr.x(at)); cursor.setAttribute("x2", fr.x(at));
      cursor.setAttribute("visibility", "visible");
      showTip(ev, `${opts.xName || "step"} ${fmt(at)}\n${lines.join("\n")}`);
    });
    hit.addEventListener("mouseleave", () => { hideTip(); cursor.setAttribute("visibility",
      "hidden"); });
    return h("div", {}, fr.svg, series.length > 1 ? legend(series) : null);
  }

  /* Scatter: one <path> per group (round caps on zero-length segments draw the points),
   * so tens of thousands of points stay one DOM node each group. */
  function scatter(opts) {
    const all = opts.groups;
    const pick = (arr) => arr.filter(isNum).sort((a, b) => a - b);
    const q = (arr, p) => arr.length ? arr[Math.min(arr.length - 1, Math.floor(p * arr.length))]
      : 0;
    const xsAll = pick(all.flatMap((g) => g.xs)); const ysAll = pick(all.flatMap((g) => g.ys));
    if (!xsAll.length) return null;
    const xd = [Math.min(0, q(xsAll, 0.005)), Math.max(q(xsAll, 0.995), ...(opts.gx || [])) * 1.08];
    const yd = [Math.min(0, q(ysAll, 0.005)), Math.max(q(ysAll, 0.995), ...(opts.gy || [])) * 1.08];
    const fr = frame(xd, yd, { xLabel: opts.xLabel, yLabel: opts.yLabel, aria: opts.aria,
      height: 280 });
    guides(fr, opts.gx, opts.gy);
    const clampX = (v) => Math.min(Math.max(v, xd[0]), xd[1]);
    const clampY = (v) => Math.min(Math.max(v, yd[0]), yd[1]);
    const pts = [];
    for (const g of all) {
      let d = "";
      for (let i = 0; i < g.xs.length; i++) {
        if (!isNum(g.xs[i]) || !isNum(g.ys[i])) continue;
        const px = fr.x(clampX(g.xs[i])); const py = fr.y(clampY(g.ys[i]));
        d += `M${px.toFixed(1)},${py.toFixed(1)}h0`;
        pts.push([px, py, g.ids[i], g.xs[i], g.ys[i]]);
      }
      s("path", { d, stroke: g.color, "stroke-width": g.size || 5, "stroke-linecap": "round",
        "stroke-opacity": g.opacity || 0.75, fill: "none" }, fr.svg);
    }
    const nearest = (ev) => {
      const box = fr.svg.getBoundingClientRect();
      const mx = ((ev.clientX - box.left) / box.width) * W;
      const my = ((ev.clientY - box.top) / box.height) * (box.height / box.width * W);
      let best = null; let bd = 64;
      for (const p of pts) {
        const dd = (p[0] - mx) ** 2 + (p[1] - my) ** 2;
        if (dd < bd) { bd = dd; best = p; }
      }
      return best;
    };
    fr.svg.addEventListener("mousemove", (ev) => {
      const p = nearest(ev);
      if (p) showTip(ev, `latent ${p[2]}\n${opts.xLabel} ${fmt(p[3])}\n${opts.yLabel} ` +
        `${fmt(p[4])}\nclick to open`);
      else hideTip();
    });
    fr.svg.addEventListener("mouseleave", hideTip);
    fr.svg.addEventListener("click", (ev) => {
      const p = nearest(ev);
      if (p && opts.onPoint) opts.onPoint(p[2]);
    });
    return h("div", {}, fr.svg, legend(all));
  }

  function barChart(items) {
    const height = 34 + items.length * 30;
    const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${height}`, role: "img",
      "aria-label": "category counts" });
    const maxV = Math.max(1, ...items.map((it) => it.value));
    const x = scale([0, maxV], [110, W - 90], false);
    items.forEach((it, i) => {
      const y = 10 + i * 30;
      s("text", { x: 100, y: y + 15, "text-anchor": "end" }, svg).textContent = it.name;
      s("rect", { x: 110, y, width: Math.max(1, x(it.value) - 110), height: 20, rx: 3,
        fill: it.color }, svg);
      s("text", { x: x(it.value) + 6, y: y + 15 }, svg).textContent =
        `${it.value.toLocaleString("en-US")}  (${(100 * it.value / N).toFixed(1)}%)`;
    });
    return svg;
  }

  function withLogToggle(title, note, draw, logDefault) {
    let logY = logDefault;
    const holder = h("div");
    const btn = h("button", { type: "button" }, "");
    const redraw = () => {
      holder.replaceChildren(draw(logY));
      btn.textContent = logY ? "log y" : "linear y";
    };
    btn.addEventListener("click", () => { logY = !logY; redraw(); });
    redraw();
    const p = panel(title, note, holder);
    p.querySelector("h3").append(h("span", { class: "toggle" }, btn));
    return p;
  }
  function barsFromHist(edges, counts) {
    const maxC = Math.max(1, ...counts);
    const fr = frame([edges[0], edges[edges.length - 1]], [0, maxC * 1.05],
      { xLabel: "activation", yLabel: "count", height: 170, aria: "activation histogram" });
    counts.forEach((cnt, i) => {
      if (!cnt) return;
      const x0 = fr.x(edges[i]) + 0.5; const x1 = fr.x(edges[i + 1]) - 0.5;
      const r = s("rect", { class: "bar", x: x0, width: Math.max(0.5, x1 - x0), y: fr.y(cnt),
        height: fr.y.range[0] - fr.y(cnt), fill: cvar("--accent") }, fr.svg);
      r.addEventListener("mousemove", (ev) => showTip(ev,
        `${fmt(edges[i])} – ${fmt(edges[i + 1])}: ${cnt}`));
      r.addEventListener("mouseleave", hideTip);
    });
    return fr.svg;
  }

  Object.assign(CC, { niceTicks, extent, legend, histogram, lineChart, scatter, barChart, withLogToggle,
    barsFromHist });
})(CC);
