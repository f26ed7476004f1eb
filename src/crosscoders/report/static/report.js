/* crosscoders report: renders the embedded JSON into plots (inline SVG) and a feature
 * browser. No dependencies, no network. Entry: the IIFE at the bottom. */
(function () {
  "use strict";
  const T0 = performance.now();
  const D = JSON.parse(document.getElementById("report-data").textContent);
  const TV = D.table.values;
  const COLS = D.table.columns;
  const COL = Object.fromEntries(COLS.map((c) => [c.name, c]));
  const N = D.n_latents;
  const IDS = TV.latent;
  // Columns by role (the table may call them e.g. norm_base / dec_cos): role -> values.
  const ROLE = D.roles || {};
  const R = Object.fromEntries(Object.entries(ROLE).map(([k, v]) => [k, TV[v]]));
  const ROW_OF = new Map(IDS.map((id, row) => [id, row]));
  const CAT_NAMES = { base_only: "base-only", base_leaning: "base-leaning", shared: "shared",
    chat_leaning: "chat-leaning", chat_only: "chat-only", other: "other", rare: "rare",
    dead: "dead" };
  const css = getComputedStyle(document.documentElement);
  const cvar = (name) => css.getPropertyValue(name).trim();
  const CAT_COLOR = { base_only: cvar("--base"), base_leaning: cvar("--base-lean"),
    shared: cvar("--shared"), chat_leaning: cvar("--chat-lean"), chat_only: cvar("--chat"),
    other: cvar("--other"), rare: cvar("--rare"), dead: cvar("--dead") };
  // Latents that (nearly) never fired keep their random initial decoders: they are counted
  // apart and left out of the category plots unless the reader asks for them.
  const UNTRAINED = new Set(["rare", "dead"]);
  const GRADED = (D.summary || {}).graded || null;
  const PALETTE = ["#3b82f6", "#f2762e", "#14a38b", "#a855f7", "#e11d48", "#64748b"];
  const catColor = (c, i) => CAT_COLOR[c] || PALETTE[(i || 0) % PALETTE.length];
  const SVGNS = "http://www.w3.org/2000/svg";

  // ------------------------------------------------------------------ small helpers
  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v == null || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "html") el.innerHTML = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v);
    }
    for (const kid of kids.flat()) {
      if (kid == null || kid === false) continue;
      el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    }
    return el;
  }
  function s(tag, attrs, parent) {
    const el = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v != null) el.setAttribute(k, v);
    if (parent) parent.appendChild(el);
    return el;
  }
  const esc = (t) => String(t).replace(/[&<>"]/g, (c) =>
    ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
  function fmt(v, kind) {
    if (v == null || (typeof v === "number" && !isFinite(v))) return "–";
    if (kind === "bool") return v ? "yes" : "no";
    if (typeof v !== "number") return String(v);
    if (kind === "int" || Number.isInteger(v)) {
      return Math.abs(v) >= 1e4 ? v.toLocaleString("en-US") : String(v);
    }
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2);
    return Number(v.toPrecision(3)).toString();
  }
  const fmtTick = (v) => {
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(0).replace("e+", "e");
    return String(Number(v.toPrecision(3)));
  };
  const isNum = (v) => typeof v === "number" && isFinite(v);
  const label = (name) => name.replace(/_/g, " ");
  const tip = h("div", { class: "tip" });
  function showTip(ev, text) {
    tip.textContent = text;
    tip.style.display = "block";
    const x = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
    tip.style.left = x + "px";
    tip.style.top = (ev.clientY + 14) + "px";
  }
  const hideTip = () => { tip.style.display = "none"; };

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
      showTip(ev, `step ${fmt(at, "int")}\n${lines.join("\n")}`);
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

  function panel(title, note, ...body) {
    return h("div", { class: "panel" }, h("h3", {}, title), note ? h("p", { class: "note" },
      note) : null, ...body);
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
  function kvList(obj, limit) {
    const dl = h("dl", { class: "kv" });
    let n = 0;
    for (const [k, v] of Object.entries(obj || {})) {
      if (v !== null && typeof v === "object" && !Array.isArray(v)) continue;
      if (limit && n++ >= limit) break;
      const text = Array.isArray(v) ? v.map((x) => (typeof x === "object" ? JSON.stringify(x)
        : x)).join(", ") : fmt(v);
      dl.append(h("dt", {}, label(k)), h("dd", {}, text));
    }
    return dl;
  }
  const rawJson = (title, obj) => h("details", { class: "raw" }, h("summary", {}, title),
    h("pre", {}, JSON.stringify(obj, null, 2)));

  // ------------------------------------------------------------------ sections
  function metricSeries(split, key) {
    const m = D.metrics[split];
    return m && m[key] ? { xs: m.step, ys: m[key] } : null;
  }
  function lastMetrics() {
    for (const split of ["eval", "train"]) {
      const m = D.metrics[split];
      if (m && m.step && m.step.length) {
        const i = m.step.length - 1;
        const out = { split };
        for (const k of Object.keys(m)) if (k !== "step") out[k] = m[k][i];
        out.step = m.step[i];
        return out;
      }
    }
    return null;
  }
  function ccConfig() {
    const c = D.config || {};
    return { cc: c.crosscoder || (c.dict_size != null ? c : {}), train: c.train || {},
      data: c.data || {} };
  }

  function renderOverview(root) {
    const sec = h("section", { id: "overview" }, h("h2", {}, "Run overview"));
    const grid = h("div", { class: "grid" });
    const { cc, train, data } = ccConfig();
    const cats = categoryCounts();
    const head = h("div", { class: "panel" }, h("h3", {}, "Latents"),
      h("div", { class: "big" }, N.toLocaleString("en-US")),
      h("div", { class: "counts" }, D.categories.map((c, i) => h("div", {},
        h("div", { class: "lbl" }, h("span", { class: "dot",
          style: `background:${catColor(c, i)}` }), CAT_NAMES[c] || c),
        h("div", { style: "font-weight:600" }, (cats[c] || 0).toLocaleString("en-US"))))),
      h("div", { class: "stack" }, D.categories.map((c, i) => h("span", {
        style: `width:${(100 * (cats[c] || 0)) / Math.max(1, N)}%;` +
          `background:${catColor(c, i)}`, title: `${CAT_NAMES[c] || c}: ${cats[c] || 0}` }))));
    grid.append(head);
    if (Object.keys(cc).length) grid.append(panel("Crosscoder", null, kvList(cc, 16)));
    if (Object.keys(train).length) grid.append(panel("Training", null, kvList(train, 16)));
    if (Object.keys(data).length) grid.append(panel("Data", null, kvList(data, 16)));
    const last = lastMetrics();
    if (last) {
      const shown = Object.fromEntries(Object.entries(last).filter(([k]) =>
        k === "step" || k.startsWith("fvu/") || ["l0", "dead_frac", "loss", "n_tokens"]
          .includes(k)));
      grid.append(panel(`Final metrics (${last.split})`, null, kvList(shown)));
    }
    if (Object.keys(D.summary || {}).length) {
      grid.append(panel("Diffing summary", null, kvList(D.summary, 16),
        rawJson("full summary", D.summary)));
    }
    if (GRADED) {
      const g = GRADED;
      const shown = { "FDR": g.fdr, "latents tested": g.n_tested,
        "chat-leaning": g.n_chat_leaning, "base-leaning": g.n_base_leaning,
        "null band (rel norm)": Array.isArray(g.band) ? g.band.map((v) => fmt(v)).join(" – ")
          : null,
        "dead": g.n_dead, "rare": g.n_rare, "note": g.note };
      grid.append(panel("Graded view", "relative norm against an empirical null fitted to " +
        "the tested latents; leaning = beyond it at the FDR", kvList(Object.fromEntries(
        Object.entries(shown).filter(([, v]) => v != null)))));
    }
    sec.append(grid);
    if (Object.keys(D.config || {}).length) sec.append(rawJson("full run configuration", D.config));
    root.append(sec);
  }

  function renderTraining(root) {
    const m = D.metrics || {};
    if (!Object.keys(m).length) return false;
    const sec = h("section", { id: "training" }, h("h2", {}, "Training curves"));
    const grid = h("div", { class: "grid wide" });
    const mk = (name, split, key, color, extra) => {
      const se = metricSeries(split, key);
      return se ? Object.assign({ name, color }, se, extra || {}) : null;
    };
    const keys = new Set([...Object.keys(m.train || {}), ...Object.keys(m.eval || {})]);
    const charts = [];
    charts.push(["Loss", "training loss and its reconstruction term", [
      mk("loss", "train", "loss", PALETTE[0]), mk("recon", "train", "recon", PALETTE[1],
        { dash: "4 3" }), mk("eval loss", "eval", "loss", PALETTE[2], { dots: true })], true]);
    const fvuKeys = [...keys].filter((k) => k.startsWith("fvu/")).sort();
    charts.push(["FVU per source", "fraction of variance unexplained (pooled); dots: held-out",
      fvuKeys.flatMap((k, i) => [mk(`${k.slice(4)} train`, "train", k, PALETTE[i % 6],
        { width: 1.2 }), mk(`${k.slice(4)} eval`, "eval", k, PALETTE[i % 6],
        { dots: true, width: 2.2 })]), true]);
    charts.push(["L0", "active latents per token", [mk("train", "train", "l0", PALETTE[0]),
      mk("eval", "eval", "l0", PALETTE[1], { dots: true })], false]);
    charts.push(["Dead fraction", "share of latents that have not fired recently", [
      mk("train", "train", "dead_frac", PALETTE[4]), mk("eval", "eval", "dead_frac", PALETTE[5],
        { dots: true })], false]);
    for (const [title, note, series, logY] of charts) {
      const chart = lineChart({ series: series.filter(Boolean), logY, yLabel: title,
        aria: title });
      if (chart) grid.append(panel(title, note, chart));
    }
    if (!grid.children.length) return false;
    sec.append(grid);
    root.append(sec);
    return true;
  }

  function categoryCounts() {
    const out = {};
    for (const c of TV.category) out[c] = (out[c] || 0) + 1;
    return out;
  }

  function renderDiffing(root) {
    const sec = h("section", { id: "diffing" }, h("h2", {}, "Diffing"));
    const grid = h("div", { class: "grid wide" });
    const counts = categoryCounts();
    const nUntrained = [...UNTRAINED].reduce((n, c) => n + (counts[c] || 0), 0);
    let showUntrained = false;
    if (nUntrained) {
      const text = h("span", { class: "note" });
      const btn = h("button", { type: "button", class: "chip", id: "untrained-toggle" });
      const label2 = () => {
        text.textContent = `${(counts.dead || 0).toLocaleString("en-US")} dead and ` +
          `${(counts.rare || 0).toLocaleString("en-US")} rare latents (fired fewer than ` +
          `${(GRADED && GRADED.min_fires) || "a few"} times) keep random decoders: ` +
          (showUntrained ? "shown in the plots." : "left out of the plots below.");
        btn.textContent = showUntrained ? "hide them" : "show them";
      };
      btn.addEventListener("click", () => {
        showUntrained = !showUntrained; label2(); grid.replaceChildren(); drawDiffing(grid,
          showUntrained);
      });
      label2();
      sec.append(h("div", { class: "toolbar" }, text, btn));
    }
    drawDiffing(grid, showUntrained);
    sec.append(grid);
    root.append(sec);
  }
  function drawDiffing(grid, showUntrained) {
    const cats = D.categories.filter((c) => showUntrained || !UNTRAINED.has(c));
    const colors = cats.map((c) => catColor(c, D.categories.indexOf(c)));
    const cat = TV.category;
    const scoreCol = R.rel_norm ? ROLE.rel_norm : (R.dnorm ? ROLE.dnorm : null);
    if (scoreCol) {
      const band = scoreCol === ROLE.rel_norm && GRADED && Array.isArray(GRADED.band) &&
        GRADED.band.every(isNum) ? GRADED.band : null;
      const margin = isNum(GRADED && GRADED.min_change) && GRADED.min_change > 0 ?
        ` and a norm ratio ${fmt(100 * GRADED.min_change)}% or more from the null centre` : "";
      const bandText = band ? `null band [${fmt(band[0])}, ${fmt(band[1])}]: a latent with ` +
        "the median firing count is called leaning only beyond it (it needs |z| ≥ " +
        `${fmt(GRADED.z_threshold)} null SDs at FDR ${fmt(GRADED.fdr)}${margin})` : null;
      const note = (scoreCol === "rel_norm" ? "r = n_chat / (n_base + n_chat): 0 base-only, " +
        "0.5 shared, 1 chat-only." : "Minder's dnorm: 0 base-only, 0.5 shared, 1 chat-only.") +
        " Bars stacked by category; click a bar to list its latents." +
        (band ? ` Shaded: the ${bandText}.` : "");
      const items = cats.map((c, i) => ({ name: CAT_NAMES[c] || c, color: colors[i] }));
      if (band) items.push({ name: "null band", color: cvar("--band-solid") });
      grid.append(withLogToggle("Relative decoder norm", note, (logY) => h("div", {},
        histogram({ values: TV[scoreCol], domain: [0, 1], bins: 60, groups: cat,
          groupOrder: cats, colors, logY, xLabel: label(scoreCol), aria: "relative norm",
          guides: thresholdGuides(scoreCol), band, bandTip: bandText,
          onBin: (lo, hi) => browser.setRange(scoreCol, lo, hi) }),
        legend(items)), true));
    }
    if (R.cos) {
      const shared = [];
      for (let i = 0; i < N; i++) if (cat[i] === "shared") shared.push(R.cos[i]);
      const vals = shared.length ? shared : R.cos;
      grid.append(withLogToggle("Decoder cosine" + (shared.length ? " (shared latents)" : ""),
        `cos(d_base, d_chat) of ${vals.length.toLocaleString("en-US")} latents; click a bar to ` +
        "list them.", (logY) => histogram({ values: vals, domain: [-1, 1], bins: 50,
          color: colors[cats.indexOf("shared")] || PALETTE[2], logY, xLabel: "cosine",
          aria: "decoder cosine", onBin: (lo, hi) => browser.setRange(ROLE.cos, lo, hi,
            shared.length ? "shared" : null) }), true));
    }
    if (R.nu_r && R.nu_eps) {
      const groups = {};
      const truly = R.truly_chat_only;
      for (let i = 0; i < N; i++) {
        if (!isNum(R.nu_r[i]) || !isNum(R.nu_eps[i])) continue;
        if (!showUntrained && UNTRAINED.has(cat[i])) continue;
        const key = truly && truly[i] ? "truly chat-only" : (CAT_NAMES[cat[i]] || cat[i]);
        const g = groups[key] || (groups[key] = { name: key, xs: [], ys: [], ids: [] });
        g.xs.push(R.nu_r[i]); g.ys.push(R.nu_eps[i]); g.ids.push(IDS[i]);
      }
      const order = Object.keys(groups).sort((a, b) => (a === "truly chat-only") -
        (b === "truly chat-only"));
      const gs = order.map((k) => {
        const c = Object.keys(CAT_NAMES).find((kk) => CAT_NAMES[kk] === k);
        return Object.assign(groups[k], { color: k === "truly chat-only" ? cvar("--chat") :
          (k === "chat-only" ? "#c9a27e" : catColor(c, 5)), opacity: k === "truly chat-only" ?
          0.9 : 0.55 });
      });
      const ls = lsThresholds();
      const chart = scatter({ groups: gs, xLabel: "ν_r", yLabel: "ν_ε", gx: [ls.nu_r],
        gy: [ls.nu_eps], aria: "latent scaling", onPoint: (id) => browser.open(id, true) });
      if (chart) {
        grid.append(panel("Latent Scaling", `ν_r (latent decoupling) vs ν_ε (complete ` +
          `shrinkage); truly chat-only: ν_r < ${ls.nu_r} and ν_ε < ${ls.nu_eps} (lower-left ` +
          "box). Axes clipped to the 0.5–99.5th percentiles; click a point to open it.",
        chart));
      }
    }
    const cc = categoryCounts();
    const items = cats.map((c, i) => ({ name: CAT_NAMES[c] || c, value: cc[c] || 0,
      color: colors[i] }));
    if (R.truly_chat_only) {
      items.push({ name: "truly chat-only", value: R.truly_chat_only.filter((v) => v).length,
        color: cvar("--chat") });
    }
    grid.append(panel("Category counts", categoryNote(), barChart(items)));
  }
  function thresholdGuides(scoreCol) {
    const t = (D.summary && (D.summary.thresholds || D.summary)) || {};
    const conv = t.convention || (D.summary || {}).convention || "rel_norm";
    if ((conv === "minder") !== (scoreCol === ROLE.dnorm)) return [];
    return ["base_only_below", "chat_only_above", "shared_low", "shared_high"]
      .map((k) => t[k]).filter(isNum);
  }
  function lsThresholds() {
    const sm = D.summary || {};
    const ls = sm.latent_scaling || sm.ls || {};
    const pick = (...vals) => vals.find(isNum);
    const rule = ls.rule || {};
    return { nu_r: pick(rule.nu_r_max, ls.nu_r_max, ls.nu_r_threshold, ls.nu_r, sm.nu_r_threshold, 0.5),
      nu_eps: pick(rule.nu_eps_max, ls.nu_eps_max, ls.nu_eps_threshold, ls.nu_eps, sm.nu_eps_threshold, 0.2) };
  }
  function categoryNote() {
    const sm = D.summary || {};
    const parts = [];
    if (sm.preset) parts.push(`preset: ${sm.preset}`);
    if (sm.convention) parts.push(`score: ${sm.convention}`);
    if (GRADED) {
      parts.push(`leaning: relative norm beyond the null at FDR ${fmt(GRADED.fdr)} ` +
        `(${fmt(GRADED.n_tested, "int")} latents tested)`);
    }
    return parts.length ? parts.join(", ") : "labels from the latent table";
  }

  function renderBaselines(root) {
    const sim = D.similarity || {};
    const lens = Array.isArray(D.lens) ? D.lens : (D.lens && D.lens.positions) || [];
    if (!Object.keys(sim).length && !lens.length) return false;
    const sec = h("section", { id: "baselines" }, h("h2", {}, "Holistic baselines"));
    const grid = h("div", { class: "grid wide" });
    if (Object.keys(sim).length) {
      const scalars = Object.entries(sim).filter(([, v]) => typeof v !== "object" || v == null);
      const nested = Object.entries(sim).filter(([, v]) => v && typeof v === "object" &&
        !Array.isArray(v));
      const cols = [...new Set(nested.flatMap(([, v]) => Object.keys(v)))];
      const table = h("table", { class: "simple" });
      if (nested.length) {
        table.append(h("tr", {}, h("th", {}, "metric"), cols.map((c) => h("th", {}, c))));
        for (const [k, v] of nested) {
          table.append(h("tr", {}, h("td", {}, k.toUpperCase()), cols.map((c) =>
            h("td", { class: "num" }, typeof v[c] === "object" && v[c] ? JSON.stringify(v[c])
              : fmt(v[c])))));
        }
      }
      for (const [k, v] of scalars) {
        table.append(h("tr", {}, h("td", {}, k.toUpperCase()), h("td", { class: "num" },
          fmt(v))));
      }
      grid.append(panel("Representation similarity (base vs chat)",
        "linear CKA and SVCCA (mean canonical correlation) between the two models' " +
        "activations; 1 = identical up to rotation/scale.", table));
    }
    if (lens.length) {
      const body = h("div");
      for (const pos of lens) {
        const row = h("div", { class: "lens-pos" }, h("div", { class: "tt-name" },
          (typeof pos.position === "number" ? `position ${pos.position}` :
            String(pos.position ?? "")) +
          (isNum(pos.norm) ? `  ·  ‖Δ‖ = ${fmt(pos.norm)}` : "")));
        const pills = (pairs, cls) => h("div", { class: "pills" }, (pairs || []).map((p) =>
          h("span", { class: `pill ${cls}` }, showToken(p[0]), h("b", {}, fmt(p[1])))));
        if (pos.promoted) row.append(pills(pos.promoted, "pos"));
        if (pos.suppressed) row.append(h("div", { style: "height:4px" }),
          pills(pos.suppressed, "neg"));
        body.append(row);
      }
      grid.append(panel("Activation-difference lens",
        "mean (chat − base) activation on the first tokens, read through the unembedding: " +
        "tokens promoted (orange) and suppressed (blue).", body));
    }
    sec.append(grid);
    root.append(sec);
    return true;
  }
  function showToken(t) {
    return String(t).replace(/\n/g, "↵").replace(/\t/g, "⇥");
  }

  // ------------------------------------------------------------------ feature browser
  const chunkCache = new Map();
  function cardData(id) {
    const row = ROW_OF.get(id);
    if (row == null) return null;
    const k = Math.floor(row / D.chunk_size);
    if (!chunkCache.has(k)) {
      const el = document.getElementById(`chunk-${k}`);
      chunkCache.set(k, el ? JSON.parse(el.textContent) : {});
    }
    return chunkCache.get(k)[String(id)] || {};
  }

  const browser = (function () {
    const ROW_H = 28;
    // Opens sorted by the diffing score (most changed first) when the table has one.
    const state = { cat: null, query: "", range: null,
      sortCol: COL.diff_score ? "diff_score" : null, sortDir: -1, view: null, selected: null };
    const tableCols = COLS;
    const px = tableCols.map((c) => c.name === "latent" ? 68 : c.kind === "cat" ? 108 :
      c.kind === "bool" ? 62 : c.kind === "text" ? 150 : c.kind === "str" ? 90 : 78);
    const template = px.map((w, i) => tableCols[i].kind === "text" ? `minmax(${w}px, 1fr)` :
      `${w}px`).join(" ");
    const minWidth = px.reduce((a, b) => a + b, 0);
    const lower = {};
    const textCols = tableCols.filter((c) => c.kind === "text" || c.kind === "str" ||
      c.kind === "cat").map((c) => c.name);
    let head; let scroller; let rowsEl; let spacer; let statusEl; let chipsEl; let rangeEl;
    let card; let searchEl;

    function build(root) {
      const sec = h("section", { id: "features" }, h("h2", {}, "Feature browser"));
      chipsEl = h("div", { class: "toolbar" });
      searchEl = h("input", { class: "search", type: "search", id: "search",
        placeholder: "search: latent id, token, category — or a filter like freq>0.01 " +
          "nu_r<0.5", "aria-label": "search latents" });
      let timer = null;
      searchEl.addEventListener("input", () => {
        clearTimeout(timer);
        timer = setTimeout(() => { state.query = searchEl.value.trim(); refresh(); }, 120);
      });
      rangeEl = h("span");
      statusEl = h("span", { class: "status" });
      const toolbar = h("div", { class: "toolbar" }, searchEl, rangeEl, statusEl);
      head = h("div", { class: "vt-head", style: `grid-template-columns:${template}` },
        tableCols.map((c) => h("div", { class: numeric(c) ? "n" : "", "data-col": c.name,
          title: `sort by ${c.name}`, onclick: () => sortBy(c.name) }, label(c.name))));
      markSorted();
      spacer = h("div");
      rowsEl = h("div", { class: "vt-rows" });
      scroller = h("div", { class: "vt-scroll" }, spacer, rowsEl);
      scroller.addEventListener("scroll", () => requestAnimationFrame(drawRows));
      rowsEl.addEventListener("click", (ev) => {
        const r = ev.target.closest(".vt-row");
        if (r) open(Number(r.dataset.id), false);
      });
      card = h("div", { class: "panel card", id: "card" }, h("div", { class: "empty" },
        "Click a latent to see its card: decoder norms, activations, examples and the " +
        "tokens its decoder promotes."));
      const table = h("div", { class: "vtable" }, h("div", { class: "vt-inner",
        style: `min-width:${minWidth}px` }, head, scroller));
      sec.append(chipsEl, toolbar, h("div", { class: "browser" }, h("div", {}, table), card));
      root.append(sec);
      drawChips();
      refresh();
    }
    const numeric = (c) => c.kind === "num" || c.kind === "int";

    function drawChips() {
      const cc = categoryCounts();
      const chip = (cat, text, count) => h("button", { type: "button", class: "chip" +
        (state.cat === cat ? " on" : ""), "data-cat": cat || "all", onclick: () => {
        state.cat = cat; drawChips(); refresh();
      } }, cat ? h("span", { class: "dot", style: `background:${catColor(cat,
        D.categories.indexOf(cat))}` }) : null, text, h("small", {},
        count.toLocaleString("en-US")));
      const chips = [chip(null, "all", N)];
      D.categories.forEach((c) => chips.push(chip(c, CAT_NAMES[c] || c, cc[c] || 0)));
      if (R.truly_chat_only) {
        chips.push(chip("__truly", "truly chat-only", R.truly_chat_only.filter((v) => v)
          .length));
      }
      chipsEl.replaceChildren(...chips);
    }

    function parseQuery(q) {
      const filters = []; const words = [];
      for (const part of q.split(/\s+/).filter(Boolean)) {
        const m = part.match(/^([A-Za-z_][\w/]*)(<=|>=|!=|=|<|>)(-?[\d.]+(?:e-?\d+)?)$/);
        if (m && TV[m[1]]) filters.push([m[1], m[2], Number(m[3])]);
        else words.push(part.toLowerCase());
      }
      return { filters, words };
    }
    const OPS = { "<": (a, b) => a < b, ">": (a, b) => a > b, "<=": (a, b) => a <= b,
      ">=": (a, b) => a >= b, "=": (a, b) => a === b, "!=": (a, b) => a !== b };

    function refresh() {
      const t0 = performance.now();
      const { filters, words } = parseQuery(state.query);
      for (const w of textCols) {
        if (words.length && !lower[w]) lower[w] = TV[w].map((v) => (v || "").toLowerCase());
      }
      const out = [];
      const cat = TV.category;
      const truly = R.truly_chat_only;
      const r = state.range;
      for (let i = 0; i < N; i++) {
        if (state.cat === "__truly") { if (!truly[i]) continue; } else if (state.cat &&
          cat[i] !== state.cat) continue;
        if (r) {
          if (r.cat && cat[i] !== r.cat) continue;
          const v = TV[r.col][i];
          if (!(v >= r.lo && (v < r.hi || (r.hi >= r.max && v <= r.hi)))) continue;
        }
        let ok = true;
        for (const [col, op, val] of filters) {
          const v = TV[col][i];
          if (v == null || !OPS[op](v, val)) { ok = false; break; }
        }
        if (!ok) continue;
        for (const w of words) {
          if (/^\d+$/.test(w) && String(IDS[i]) === w) continue;
          if (!textCols.some((c) => lower[c][i].includes(w))) { ok = false; break; }
        }
        if (ok) out.push(i);
      }
      state.view = Int32Array.from(out);
      sortView();
      spacer.style.height = `${state.view.length * ROW_H}px`;
      scroller.scrollTop = 0;
      drawRows();
      statusEl.textContent = `${state.view.length.toLocaleString("en-US")} of ` +
        `${N.toLocaleString("en-US")} latents`;
      rangeEl.replaceChildren(r ? h("button", { type: "button", class: "chip filter",
        title: "remove this filter", onclick: () => { state.range = null; refresh(); } },
      `${r.cat ? (CAT_NAMES[r.cat] || r.cat) + ", " : ""}${label(r.col)} in [${fmt(r.lo)}, ` +
        `${fmt(r.hi)})  ✕`) : "");
      state.lastRefreshMs = performance.now() - t0;
    }

    function sortView() {
      const col = state.sortCol;
      if (!col) return;
      const vals = TV[col];
      const dir = state.sortDir;
      const arr = Array.from(state.view);
      const isStr = !numeric(COL[col]) && COL[col].kind !== "bool";
      arr.sort((a, b) => {
        const va = vals[a]; const vb = vals[b];
        const na = va == null || va === ""; const nb = vb == null || vb === "";
        if (na || nb) return na === nb ? a - b : (na ? 1 : -1);
        if (va === vb) return a - b;
        if (isStr) return dir * String(va).localeCompare(String(vb));
        return dir * (va < vb ? -1 : 1);
      });
      state.view = Int32Array.from(arr);
    }

    function sortBy(col) {
      if (state.sortCol === col) state.sortDir = -state.sortDir;
      else { state.sortCol = col; state.sortDir = numeric(COL[col]) || COL[col].kind ===
        "bool" ? -1 : 1; }
      markSorted();
      sortView();
      scroller.scrollTop = 0;
      drawRows();
    }

    function markSorted() {
      for (const el of head.children) {
        const on = el.dataset.col === state.sortCol;
        el.classList.toggle("sorted", on);
        el.textContent = label(el.dataset.col) + (on ? (state.sortDir < 0 ? " ↓" : " ↑") : "");
      }
    }

    function cell(c, row) {
      const v = TV[c.name][row];
      if (c.kind === "cat") {
        return `<div><span class="badge" style="background:${catColor(v,
          D.categories.indexOf(v))}">${esc(CAT_NAMES[v] || v)}</span></div>`;
      }
      if (numeric(c)) return `<div class="n">${fmt(v, c.kind)}</div>`;
      if (c.kind === "bool") return `<div>${v ? "✓" : ""}</div>`;
      if (c.kind === "text") return `<div class="t" title="${esc(v || "")}">${esc(v || "")}</div>`;
      return `<div>${esc(v == null ? "–" : v)}</div>`;
    }

    function drawRows() {
      const view = state.view;
      if (!view.length) {
        rowsEl.style.transform = "translateY(0)";
        rowsEl.innerHTML = '<div class="vt-empty">No latent matches these filters.</div>';
        return;
      }
      const first = Math.max(0, Math.floor(scroller.scrollTop / ROW_H) - 6);
      const count = Math.ceil((scroller.clientHeight || 600) / ROW_H) + 12;
      const last = Math.min(view.length, first + count);
      let html = "";
      for (let k = first; k < last; k++) {
        const row = view[k];
        const id = IDS[row];
        html += `<div class="vt-row${id === state.selected ? " sel" : ""}" data-id="${id}" ` +
          `style="grid-template-columns:${template}">` +
          tableCols.map((c) => cell(c, row)).join("") + "</div>";
      }
      rowsEl.style.transform = `translateY(${first * ROW_H}px)`;
      rowsEl.innerHTML = html;
    }

    function setRange(col, lo, hi, cat) {
      const d = extent([TV[col]], false);
      state.range = { col, lo, hi, cat: cat || null, max: d ? d[1] : hi };
      state.cat = null;
      drawChips();
      refresh();
      document.getElementById("features").scrollIntoView();
    }

    function open(id, scroll) {
      if (!ROW_OF.has(id)) return;
      state.selected = id;
      drawRows();
      card.replaceChildren(...renderCard(id));
      card.scrollTop = 0;
      history.replaceState(null, "", `#latent=${id}`);
      if (scroll) document.getElementById("features").scrollIntoView();
    }
    function close() {
      state.selected = null;
      drawRows();
      card.replaceChildren(h("div", { class: "empty" }, "No latent selected."));
      history.replaceState(null, "", "#features");
    }
    return { build, open, close, setRange, state, refresh };
  })();

  function renderCard(id) {
    const row = ROW_OF.get(id);
    const c = TV.category[row];
    const cd = cardData(id) || {};
    const out = [];
    out.push(h("div", { class: "card-head" }, h("h3", {}, `Latent ${id}`),
      h("span", { class: "badge", style: `background:${catColor(c, D.categories.indexOf(c))}` },
        CAT_NAMES[c] || c),
      R.truly_chat_only && R.truly_chat_only[row] ? h("span", { class: "badge outline" },
        "truly chat-only") : null,
      h("button", { class: "close", type: "button", title: "close",
        onclick: () => browser.close() }, "×")));
    if (TV.explanation && TV.explanation[row]) {
      out.push(h("p", { class: "explanation" }, h("b", {}, "Explanation: "),
        TV.explanation[row]));
    }
    const stats = h("div", { class: "stats" });
    for (const col of COLS) {
      if (col.name === "latent" || col.kind === "cat" || col.kind === "text" ||
        col.name === "explanation") continue;
      stats.append(h("div", { class: "stat" }, h("div", { class: "k" }, label(col.name)),
        h("div", { class: "v" }, fmt(TV[col.name][row], col.kind))));
    }
    out.push(h("h4", {}, "Statistics"), stats);
    if (R.n_base && R.n_chat) {
      const nb = R.n_base[row]; const nc = R.n_chat[row];
      const mx = Math.max(nb || 0, nc || 0) || 1;
      out.push(h("h4", {}, "Decoder norms"), h("div", { class: "normbar" },
        [["base", nb, "--base"], ["chat", nc, "--chat"]].flatMap(([name, v, col]) => [
          h("span", {}, name), h("div", { class: "track" }, h("div", { class: "fill",
            style: `width:${(100 * (v || 0)) / mx}%;background:${cvar(col)}` })),
          h("span", { class: "v" }, fmt(v))])));
    }
    const ex = cd.ex || [];
    if (ex.length) {
      let maxAct = 0;
      for (const e of ex) for (const a of exampleActs(e)) if (a > maxAct) maxAct = a;
      const list = h("div", { class: "exs" });
      const SHOW = 8;
      const add = (from, to) => {
        for (let j = from; j < to; j++) list.append(exampleEl(ex[j], maxAct, j));
      };
      add(0, Math.min(SHOW, ex.length));
      out.push(h("h4", {}, `Max-activating contexts (${ex.length})`), list);
      if (ex.length > SHOW) {
        const more = h("button", { class: "more", type: "button", onclick: () => {
          add(SHOW, ex.length); more.remove();
        } }, `show all ${ex.length}`);
        out.push(more);
      }
    } else if (D.has_examples) {
      out.push(h("h4", {}, "Max-activating contexts"), h("p", { class: "note" },
        "No examples were stored for this latent."));
    }
    if (cd.tt) {
      const cols = h("div", { class: "tt-cols" });
      for (const [model, pairs] of Object.entries(cd.tt)) {
        cols.append(h("div", {}, h("div", { class: "tt-name" }, `${model} decoder`),
          h("div", { class: "pills" }, pairs.map(([t, v]) => h("span", { class: "pill" },
            showToken(D.vocab[t]), h("b", {}, fmt(v)))))));
      }
      out.push(h("h4", {}, "Top tokens promoted (decoder · unembedding)"), cols);
    }
    const hist = cd.hist || histFromExamples(ex);
    if (hist) {
      const [edges, counts] = hist;
      const svg = barsFromHist(edges, counts);
      out.push(h("h4", {}, cd.hist ? "Activation histogram (non-zero activations)" :
        "Activations in the shown contexts (non-zero)"), svg);
    }
    return out;
  }
  /* An example is [token indices, flat [position, activation, ...] of the non-zero
   * activations, cut on the left (0/1), cut on the right (0/1), label?]. */
  function exampleActs(e) {
    if (!e.acts) {
      e.acts = new Float64Array(e[0].length);
      for (let k = 0; k + 1 < e[1].length; k += 2) e.acts[e[1][k]] = e[1][k + 1];
    }
    return e.acts;
  }
  function exampleEl(e, maxAct, j) {
    const [toks, , cutLeft, cutRight, lab] = e;
    const acts = exampleActs(e);
    let peak = 0;
    for (let i = 1; i < acts.length; i++) if (acts[i] > acts[peak]) peak = i;
    let html = `<span class="meta">${j + 1}${lab ? " · " + esc(lab) : ""}</span>`;
    if (cutLeft) html += '<span class="ell">… </span>';
    for (let i = 0; i < toks.length; i++) {
      const a = acts[i] || 0;
      const t = D.vocab[toks[i]];
      const shown = esc(t).replace(/\n/g, '<span class="nl">↵</span>').replace(/\t/g, "⇥");
      const alpha = maxAct > 0 ? Math.max(0, a) / maxAct : 0;
      const style = alpha > 0.02 ? ` style="background:rgba(var(--hl),${(0.12 + 0.78 * alpha)
        .toFixed(2)})"` : "";
      html += `<span class="tok${i === peak && a > 0 ? " peak" : ""}"${style}` +
        `${a ? ` title="${fmt(a)}"` : ""}>${shown}</span>`;
    }
    if (cutRight) html += '<span class="ell"> …</span>';
    return h("div", { class: "ex", html });
  }
  function histFromExamples(ex) {
    const vals = [];
    for (const e of ex) for (const a of exampleActs(e)) if (a > 0) vals.push(a);
    if (vals.length < 2) return null;
    const hi = Math.max(...vals); const bins = 24; const counts = new Array(bins).fill(0);
    for (const v of vals) counts[Math.min(bins - 1, Math.floor((v / hi) * bins))] += 1;
    return [Array.from({ length: bins + 1 }, (_, i) => (hi * i) / bins), counts];
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

  // ------------------------------------------------------------------ page
  function main() {
    const app = document.getElementById("app");
    const { cc } = ccConfig();
    const src = (D.summary || {}).sources || {};
    const names = src.base && src.chat ? [src.base, src.chat] : (cc.source_names || []);
    const sub = [N.toLocaleString("en-US") + " latents", cc.activation,
      names.length ? names.join(" vs ") : null, `built ${D.generated}`].filter(Boolean)
      .join(" · ");
    const nav = h("nav");
    app.append(h("header", { class: "top" }, h("h1", {}, D.title), h("span", { class: "sub" },
      sub), nav), tip);
    const body = h("main");
    app.append(body);
    const sections = [["overview", "Overview", renderOverview],
      ["training", "Training", renderTraining], ["diffing", "Diffing", renderDiffing],
      ["baselines", "Baselines", renderBaselines], ["features", "Features", browser.build]];
    for (const [id, name, fn] of sections) {
      try {
        if (fn(body) !== false) nav.append(h("a", { href: `#${id}` }, name));
      } catch (err) {
        console.error(`report: the ${name} section failed`, err);
        body.append(h("div", { class: "panel" }, `The ${name} section could not be drawn: ` +
          err));
      }
    }
    body.append(h("footer", {}, "crosscoders report · self-contained: works offline, no " +
      "network requests"));
    const fromHash = () => {
      const m = location.hash.match(/^#latent=(\d+)$/);
      if (m && Number(m[1]) !== browser.state.selected) browser.open(Number(m[1]), true);
    };
    window.addEventListener("hashchange", fromHash);
    fromHash();
    // For tests and the console: the ids and chosen column values of the current view.
    const view = (names) => {
      const rows = Array.from(browser.state.view);
      return { ids: rows.map((r) => IDS[r]),
        values: Object.fromEntries(names.map((n) => [n, rows.map((r) => TV[n][r])])) };
    };
    // readyAt: ms since navigation start (HTML parsed, plots and first rows drawn)
    window.__report = { ready: true, renderMs: performance.now() - T0,
      readyAt: performance.now(), browser, view,
      open: (id) => browser.open(id, true) };
    document.body.dataset.ready = "1";
  }
  main();
})();
