/* crosscoders report, layers.js: the layers report's page, in place of the diffing
 * sections of sections.js (whose training curves it reuses): the overview, FVU per layer,
 * the decoder-norm heat map (latents x layers, sortable by peak layer and span),
 * persistence histograms, the comparison with per-layer SAEs, and each card's layer
 * profile. The table's category is the latent's peak layer (rare / dead: not counted). */
(function (CC) {
  "use strict";
  const { D, TV, N, IDS, UNTRAINED, PALETTE, catColor, categoryCounts, ccConfig, cvar, h, s,
    fmt, fmtTick, isNum, label, panel, kvList, rawJson, showTip, hideTip, niceTicks, legend,
    histogram, lineChart, renderTraining } = CC;
  const browser = {
    setRange: (...args) => CC.browser.setRange(...args),
    open: (...args) => CC.browser.open(...args),
  };
  const L = D.layers;
  const NAMES = L.sources;
  const S = NAMES.length;
  const NORMS = L.norms; // [S][N]: decoder norm per layer, in table row order
  const PEAK = TV.peak;
  const SPAN = TV.span;
  const EFF = TV.effective_layers;
  const PEAK_NORM = new Float64Array(N);
  for (let r = 0; r < N; r++) {
    for (let l = 0; l < S; l++) if (NORMS[l][r] > PEAK_NORM[r]) PEAK_NORM[r] = NORMS[l][r];
  }
  const counted = (row) => !UNTRAINED.has(TV.category[row]);
  const layerColor = (l) => catColor(NAMES[l], l);

  // ------------------------------------------------------------------ colour scale
  const RGB = L.colormap.map((c) => [1, 3, 5].map((i) => parseInt(c.slice(i, i + 2), 16)));
  /* viridis at t in [0, 1], as [r, g, b] */
  function viridis(t) {
    const x = Math.min(1, Math.max(0, t || 0)) * (RGB.length - 1);
    const lo = Math.floor(x); const hi = Math.min(lo + 1, RGB.length - 1); const f = x - lo;
    return RGB[lo].map((v, i) => Math.round(v + f * (RGB[hi][i] - v)));
  }
  const colourBar = () => h("div", { class: "cbar" }, h("span", {}, "0"),
    h("i", { style: `background:linear-gradient(to right, ${L.colormap.join(", ")})` }),
    h("span", {}, "1 × peak norm"));

  // ------------------------------------------------------------------ bars per layer
  /* Vertical bars, one per layer: values[l], colours by layer; `dim[l]` fades a bar;
   * `guide` draws a dashed level; onBar(l) on click. */
  function layerBars(opts) {
    const W = 560; const H = opts.height || 220;
    const M = { l: 56, r: 10, t: 12, b: S > 8 ? 64 : 40 };
    const vals = opts.values;
    const top = Math.max(1e-12, ...vals.filter(isNum), opts.guide || 0) * 1.06;
    const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img",
      "aria-label": opts.aria });
    const y = (v) => H - M.b - (v / top) * (H - M.b - M.t);
    const grid = s("g", { class: "grid" }, svg);
    const axis = s("g", { class: "axis" }, svg);
    for (const v of niceTicks(0, top, 4)) {
      s("line", { x1: M.l, x2: W - M.r, y1: y(v), y2: y(v) }, grid);
      s("text", { x: M.l - 6, y: y(v) + 4, "text-anchor": "end" }, axis).textContent =
        fmtTick(v);
    }
    s("line", { x1: M.l, x2: W - M.r, y1: H - M.b, y2: H - M.b }, axis);
    if (opts.yLabel) {
      s("text", { transform: `translate(12 ${(H - M.b + M.t) / 2}) rotate(-90)`,
        "text-anchor": "middle" }, axis).textContent = opts.yLabel;
    }
    const bw = (W - M.l - M.r) / S;
    const every = Math.ceil(S / 24);
    vals.forEach((v, l) => {
      const x = M.l + l * bw;
      const g = s("g", { class: "bar" }, svg);
      if (isNum(v)) {
        s("rect", { x: x + bw * 0.12, width: Math.max(1, bw * 0.76), y: y(v),
          height: Math.max(0.5, H - M.b - y(v)), fill: layerColor(l),
          "fill-opacity": opts.dim && opts.dim[l] ? 0.3 : 1 }, g);
      }
      // an invisible full-height target, so short bars are easy to hover and click
      s("rect", { x, width: bw, y: M.t, height: H - M.b - M.t, fill: "transparent" }, g);
      if (l % every === 0) {
        const tx = x + bw / 2; const ty = H - M.b + 14;
        s("text", S > 8 ? { x: tx, y: ty, "text-anchor": "end",
          transform: `rotate(-40 ${tx} ${ty})` } : { x: tx, y: ty, "text-anchor": "middle" },
        axis).textContent = NAMES[l];
      }
      g.addEventListener("mousemove", (ev) => showTip(ev, opts.tip(l)));
      g.addEventListener("mouseleave", hideTip);
      if (opts.onBar) g.addEventListener("click", () => opts.onBar(l));
    });
    if (isNum(opts.guide)) {
      s("line", { class: "guide", x1: M.l, x2: W - M.r, y1: y(opts.guide),
        y2: y(opts.guide) }, svg);
    }
    return svg;
  }

  // ------------------------------------------------------------------ overview
  function renderOverview(root) {
    const sec = h("section", { id: "overview" }, h("h2", {}, "Layer study"));
    const grid = h("div", { class: "grid" });
    const cats = categoryCounts();
    const nCounted = NAMES.reduce((n, name) => n + (cats[name] || 0), 0);
    grid.append(h("div", { class: "panel" }, h("h3", {}, "Latents"),
      h("div", { class: "big" }, N.toLocaleString("en-US")),
      h("p", { class: "note" }, `${nCounted.toLocaleString("en-US")} counted (` +
        `${L.counted || "firing latents"}), by the layer each writes to most:`),
      h("div", { class: "counts" }, D.categories.map((c, i) => h("div", {},
        h("div", { class: "lbl" }, h("span", { class: "dot",
          style: `background:${catColor(c, i)}` }), c),
        h("div", { style: "font-weight:600" }, (cats[c] || 0).toLocaleString("en-US"))))),
      h("div", { class: "stack" }, D.categories.map((c, i) => h("span", {
        style: `width:${(100 * (cats[c] || 0)) / Math.max(1, N)}%;` +
          `background:${catColor(c, i)}`, title: `${c}: ${cats[c] || 0}` })))));
    const sm = D.summary || {};
    grid.append(panel("Persistence", `over the counted latents; span: layers written with ` +
      `≥ ${fmt(L.threshold)} × the latent's peak decoder norm`, kvList({
      layers: S, "multi-layer share": isNum(sm.multi_layer_fraction) ?
        `${fmt(100 * sm.multi_layer_fraction)}%` : null,
      "contiguous share of multi-layer": isNum(sm.contiguous_fraction_of_multi_layer) ?
        `${fmt(100 * sm.contiguous_fraction_of_multi_layer)}%` : null,
      "mean effective layers": sm.mean_effective_layers })));
    if (L.fvu) {
      const vals = Object.values(L.fvu).filter(isNum);
      const ev = L.evaluated || {};
      grid.append(panel("Reconstruction", `on ${fmt(ev.n_tokens, "int")} ${ev.split || ""} ` +
        "tokens", kvList({ "mean FVU over layers": vals.length ? vals.reduce((a, b) => a + b) /
          vals.length : null, "worst layer FVU": vals.length ? Math.max(...vals) : null,
        L0: L.l0 })));
    }
    const { cc, train, data } = ccConfig();
    if (Object.keys(cc).length) grid.append(panel("Crosscoder", null, kvList(cc, 16)));
    if (Object.keys(train).length) grid.append(panel("Training", null, kvList(train, 16)));
    if (Object.keys(data).length) grid.append(panel("Data", null, kvList(data, 16)));
    sec.append(grid);
    if (Object.keys(sm).length) sec.append(rawJson("full layers summary", sm));
    if (Object.keys(D.config || {}).length) sec.append(rawJson("full run configuration", D.config));
    root.append(sec);
  }

  // ------------------------------------------------------------------ layers
  function renderLayers(root) {
    const sec = h("section", { id: "layers" }, h("h2", {}, "Layers"));
    const grid = h("div", { class: "grid wide" });
    const map = heatmap();
    grid.append(map.panel);
    if (L.fvu) {
      const vals = NAMES.map((n) => L.fvu[n]);
      const ev = L.evaluated || {};
      grid.append(panel("FVU per layer", "fraction of variance unexplained, pooled over " +
        `${fmt(ev.n_tokens, "int")} ${ev.split || ""} tokens: Σ‖x − x̂‖² / Σ‖x − mean‖²`,
      layerBars({ values: vals, aria: "fvu per layer", yLabel: "FVU",
        tip: (l) => `${NAMES[l]}\nFVU ${fmt(vals[l])}` })));
    }
    const spans = TV.span.map((v, r) => (counted(r) ? v : null));
    const cats = NAMES.filter((n) => D.categories.includes(n));
    const colors = cats.map((c) => catColor(c));
    const items = cats.map((c, i) => ({ name: c, color: colors[i] }));
    grid.append(panel("Persistence: span", `layers each counted latent writes with ≥ ` +
      `${fmt(L.threshold)} × its peak norm, stacked by peak layer; click a bar to list them.`,
    histogram({ values: spans, domain: [0.5, S + 0.5], bins: S, groups: TV.category,
      groupOrder: cats, colors, xLabel: "span (layers)", aria: "persistence",
      onBin: (lo, hi) => browser.setRange("span", lo, hi) }), legend(items)));
    const eff = EFF.map((v, r) => (counted(r) ? v : null));
    grid.append(panel("Persistence: effective layers", "participation ratio " +
      "(Σ n²)² / Σ n⁴ of the decoder norms, no threshold: 1 = one layer, " +
      `${S} = even over all; click a bar to list them.`,
    histogram({ values: eff, domain: [1, Math.max(2, S)], bins: Math.min(60, 10 * S),
      groups: TV.category, groupOrder: cats, colors, xLabel: "effective layers",
      aria: "effective layers", onBin: (lo, hi) => browser.setRange("effective_layers",
        lo, hi) })));
    const counts = categoryCounts();
    const per = NAMES.map((n) => counts[n] || 0);
    grid.append(panel("Peak layer", "counted latents by the layer they write to most; " +
      "click a bar to list them.", layerBars({ values: per, aria: "peak layer",
      yLabel: "latents", tip: (l) => `${NAMES[l]}\n${per[l]} latents peak here`,
      onBar: (l) => {
        const chip = document.querySelector(`#features .chip[data-cat="${NAMES[l]}"]`);
        if (chip) { chip.click(); document.getElementById("features").scrollIntoView(); }
      } })));
    sec.append(grid);
    root.append(sec);
    map.draw(); // needs its width, known once in the page
    let timer = null;
    window.addEventListener("resize", () => {
      clearTimeout(timer); timer = setTimeout(map.draw, 150);
    });
  }

  /* The decoder-norm heat map: a column per latent, a row per layer, colour = the norm at
   * that layer / the latent's peak norm. One canvas pixel per cell, scaled to the width. */
  const SORTS = {
    peak: ["peak layer, then span", (a, b) => PEAK[a] - PEAK[b] || SPAN[b] - SPAN[a] ||
      EFF[b] - EFF[a] || a - b],
    span: ["span, then peak layer", (a, b) => SPAN[b] - SPAN[a] || PEAK[a] - PEAK[b] ||
      EFF[b] - EFF[a] || a - b],
    effective: ["effective layers", (a, b) => EFF[b] - EFF[a] || PEAK[a] - PEAK[b] || a - b],
    latent: ["latent id", (a, b) => IDS[a] - IDS[b]],
  };
  const heatState = { sort: "peak", all: false, order: [], left: 0 };
  function heatmap() {
    const rowH = Math.max(8, Math.min(22, Math.floor(240 / S)));
    const canvas = h("canvas", { id: "heatmap", role: "img",
      "aria-label": "decoder-norm heat map" });
    const wrap = h("div", { class: "heatmap" }, canvas);
    const note = h("p", { class: "note" });
    const chips = h("div", { class: "toolbar" });
    let left = 0; // label column, css px
    const uncounted = N - IDS.filter((_, r) => counted(r)).length;
    function drawChips() {
      chips.replaceChildren(h("span", { class: "note" }, "sort by"),
        ...Object.entries(SORTS).map(([key, [text]]) => h("button", { type: "button",
          class: "chip" + (heatState.sort === key ? " on" : ""), "data-sort": key,
          onclick: () => sortBy(key) }, text)),
        uncounted ? h("button", { type: "button", class: "chip" + (heatState.all ? " on" : ""),
          id: "heatmap-all", onclick: () => { heatState.all = !heatState.all; draw(); } },
        `with the ${uncounted.toLocaleString("en-US")} uncounted`) : null);
    }
    function sortBy(key) { heatState.sort = key; draw(); }
    function draw() {
      const rows = [];
      for (let r = 0; r < N; r++) if (heatState.all || counted(r)) rows.push(r);
      heatState.order = rows.sort(SORTS[heatState.sort][1]);
      drawChips();
      const n = rows.length;
      note.textContent = n ? `${n.toLocaleString("en-US")} latents (columns) × ${S} layers ` +
        `(rows), sorted by ${SORTS[heatState.sort][0]}; colour: the decoder norm at a layer ` +
        "over the latent's peak norm. Hover for values, click a column to open the latent." :
        "No latent is counted: none fired (see the overview).";
      const ctx0 = document.createElement("canvas").getContext("2d");
      ctx0.font = "11px system-ui, sans-serif";
      left = Math.min(160, 12 + Math.max(...NAMES.map((t) => ctx0.measureText(t).width)));
      heatState.left = left;
      const cssW = wrap.clientWidth || 1000;
      const dpr = window.devicePixelRatio || 1;
      canvas.width = Math.round(cssW * dpr);
      canvas.height = Math.round(rowH * S * dpr);
      canvas.style.height = `${rowH * S}px`;
      const g = canvas.getContext("2d");
      g.clearRect(0, 0, canvas.width, canvas.height);
      g.fillStyle = cvar("--muted");
      g.font = `${11 * dpr}px system-ui, sans-serif`;
      g.textAlign = "right"; g.textBaseline = "middle";
      const labelEvery = Math.ceil(11 / rowH);
      NAMES.forEach((t, l) => {
        if (l % labelEvery === 0) g.fillText(t, (left - 6) * dpr, (l + 0.5) * rowH * dpr);
      });
      if (!n) return;
      const img = document.createElement("canvas");
      img.width = n; img.height = S;
      const ictx = img.getContext("2d");
      const pix = ictx.createImageData(n, S);
      for (let k = 0; k < n; k++) {
        const r = heatState.order[k];
        const pk = PEAK_NORM[r];
        for (let l = 0; l < S; l++) {
          const c = viridis(pk > 0 ? NORMS[l][r] / pk : 0);
          const o = 4 * (l * n + k);
          pix.data[o] = c[0]; pix.data[o + 1] = c[1]; pix.data[o + 2] = c[2];
          pix.data[o + 3] = 255;
        }
      }
      ictx.putImageData(pix, 0, 0);
      const plotW = canvas.width - left * dpr;
      g.imageSmoothingEnabled = n > plotW; // more latents than pixels: average them
      g.drawImage(img, left * dpr, 0, plotW, canvas.height);
    }
    const at = (ev) => {
      const box = canvas.getBoundingClientRect();
      const x = ev.clientX - box.left; const y = ev.clientY - box.top;
      const n = heatState.order.length;
      if (x < left || !n) return null;
      const k = Math.min(n - 1, Math.floor(((x - left) / (box.width - left)) * n));
      const l = Math.min(S - 1, Math.max(0, Math.floor((y / box.height) * S)));
      return { row: heatState.order[k], l };
    };
    canvas.addEventListener("mousemove", (ev) => {
      const p = at(ev);
      if (!p) { hideTip(); return; }
      const r = p.row; const pk = PEAK_NORM[r];
      showTip(ev, `latent ${IDS[r]}\npeak ${NAMES[PEAK[r]]} · span ${SPAN[r]}` +
        (TV.freq ? ` · freq ${fmt(TV.freq[r])}` : "") + `\n${NAMES[p.l]}: ` +
        `${fmt(pk > 0 ? NORMS[p.l][r] / pk : 0)} × peak\nclick to open`);
    });
    canvas.addEventListener("mouseleave", hideTip);
    canvas.addEventListener("click", (ev) => {
      const p = at(ev);
      if (p) browser.open(IDS[p.row], true);
    });
    const p = panel("Decoder-norm profiles", null, chips, wrap, colourBar(), note);
    p.classList.add("full");
    return { panel: p, draw };
  }

  // ------------------------------------------------------------------ comparison
  function renderComparison(root) {
    const c = L.comparison;
    if (!c) return false;
    const sec = h("section", { id: "comparison" },
      h("h2", {}, "Crosscoder vs per-layer SAEs"));
    const grid = h("div", { class: "grid wide" });
    const pts = (arr) => (arr || []).slice().sort((a, b) => a.l0 - b.l0);
    const cc = pts(c.crosscoder); const sae = pts(c.per_layer_saes);
    const series = [
      { name: "crosscoder", xs: cc.map((p) => p.l0), ys: cc.map((p) => p.fvu),
        color: PALETTE[0], dots: true },
      { name: `per-layer SAEs (${c.n_layers || S}, L0 summed)`, xs: sae.map((p) => p.l0),
        ys: sae.map((p) => p.fvu), color: PALETTE[1], dots: true }];
    const setup = [c.n_layers ? `${c.n_layers} layers` : null, c.d_model ?
      `d_model ${c.d_model}` : null, c.dict_size ? `${c.dict_size} latents per model` : null,
    c.steps ? `${c.steps} steps` : null].filter(Boolean).join(", ");
    const chart = lineChart({ series, logY: true, xLabel: "total L0 (active latents per token)",
      yLabel: "FVU", xName: "L0", aria: "comparison" });
    if (chart) {
      grid.append(panel("FVU against total L0", "from `crosscoders bench layers` on " +
        `planted features${setup ? ` (${setup})` : ""}, not this crosscoder: held-out FVU ` +
        "pooled over the layers, one point per k. Lower and further left is better.",
      chart));
    }
    const table = h("table", { class: "simple", id: "comparison-table" }, h("tr", {},
      ["FVU", "crosscoder L0", "per-layer SAEs L0", "ratio"].map((t) => h("th", {}, t))));
    for (const m of c.matched || []) {
      table.append(h("tr", {}, [m.fvu, m.crosscoder_l0, m.per_layer_l0].map((v) =>
        h("td", { class: "num" }, fmt(v))), h("td", { class: "num" }, `${fmt(m.ratio)}×`)));
    }
    grid.append(panel("At matched FVU", (c.matched || []).length ? "total L0 each needs " +
      "for the same FVU (log-linear interpolation between measured points); ratio = " +
      "per-layer SAEs / crosscoder." : "The two FVU ranges do not overlap: no matched " +
      "levels (widen the k ranges).", table));
    sec.append(grid);
    root.append(sec);
    return true;
  }

  // ------------------------------------------------------------------ card
  function profileCard(id, row) {
    const norms = NAMES.map((_, l) => NORMS[l][row]);
    const pk = PEAK_NORM[row];
    const first = TV.first[row]; const last = TV.last[row];
    const text = counted(row) ? `peak ${NAMES[PEAK[row]]} · span ${SPAN[row]} (` +
      `${NAMES[first]} – ${NAMES[last]}${TV.contiguous && !TV.contiguous[row] ?
        ", not contiguous" : ""}) · ${fmt(EFF[row])} effective layers` :
      "not counted (it fired on too few tokens): its decoder may still be the random " +
      "initial one";
    const svg = layerBars({ values: norms, aria: "layer profile", yLabel: "decoder norm",
      height: 190, guide: pk > 0 ? L.threshold * pk : null,
      dim: norms.map((v) => !(pk > 0 && v >= L.threshold * pk)),
      tip: (l) => `${NAMES[l]}\nnorm ${fmt(norms[l])} (${fmt(pk > 0 ? norms[l] / pk : 0)}` +
        " × peak)" });
    return [h("h4", {}, "Layer profile"), h("p", { class: "note" }, `${text}. Dashed: ` +
      `${fmt(L.threshold)} × peak.`), svg];
  }

  function subtitle() {
    const { cc } = ccConfig();
    return [cc.activation, `${S} layers`, cc.causality && cc.causality !== "acausal" ?
      label(cc.causality) : null];
  }
  CC.cardSections = [profileCard];
  CC.page = { subtitle, sections: [["overview", "Overview", renderOverview],
    ["training", "Training", renderTraining], ["layers", "Layers", renderLayers],
    ["comparison", "Comparison", renderComparison]],
  hooks: { heatmap: {
    state: () => ({ sort: heatState.sort, left: heatState.left,
      ids: heatState.order.map((r) => IDS[r]),
      peaks: heatState.order.map((r) => PEAK[r]), spans: heatState.order.map((r) => SPAN[r])
    }),
  } } };
})(CC);
