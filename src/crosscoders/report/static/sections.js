/* crosscoders report, sections.js: the run overview, training curves, diffing plots and
 * holistic baselines. The feature browser (CC.browser, table.js) is looked up when a plot
 * is clicked. */
(function (CC) {
  "use strict";
  const { D, TV, N, IDS, ROLE, R, CAT_NAMES, cvar, UNTRAINED, GRADED, PALETTE, catColor,
    categoryCounts, ccConfig, h, fmt, isNum, label, panel, kvList, rawJson, showToken,
    legend, histogram, lineChart, scatter, barChart, withLogToggle } = CC;
  const browser = {
    setRange: (...args) => CC.browser.setRange(...args),
    open: (...args) => CC.browser.open(...args),
  };

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
  // The summary's keys as `crosscoders diff` writes them (crosscoders.diff.schema.Summary).
  const thresholds = () => (D.summary || {}).thresholds || {};
  function thresholdGuides(scoreCol) {
    const t = thresholds();
    const conv = t.convention || "rel_norm";
    if ((conv === "minder") !== (scoreCol === ROLE.dnorm)) return [];
    return ["base_only_below", "chat_only_above", "shared_low", "shared_high"]
      .map((k) => t[k]).filter(isNum);
  }
  function lsThresholds() {
    const rule = ((D.summary || {}).latent_scaling || {}).rule || {};
    return { nu_r: isNum(rule.nu_r_max) ? rule.nu_r_max : 0.5,
      nu_eps: isNum(rule.nu_eps_max) ? rule.nu_eps_max : 0.2 };
  }
  function categoryNote() {
    const sm = D.summary || {};
    const parts = [];
    if (sm.preset) parts.push(`preset: ${sm.preset}`);
    if (thresholds().convention) parts.push(`score: ${thresholds().convention}`);
    if (GRADED) {
      parts.push(`leaning: relative norm beyond the null at FDR ${fmt(GRADED.fdr)} ` +
        `(${fmt(GRADED.n_tested, "int")} latents tested)`);
    }
    return parts.length ? parts.join(", ") : "labels from the latent table";
  }

  function renderBaselines(root) {
    const sim = D.similarity || {};
    const lens = D.lens || [];
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
  // The diff report's page: its sections before the feature browser, and the subtitle's
  // middle (the crosscoder's activation, the models compared).
  function subtitle() {
    const { cc } = ccConfig();
    const src = (D.summary || {}).sources || {};
    const names = src.base && src.chat ? [src.base, src.chat] : (cc.source_names || []);
    return [cc.activation, names.length ? names.join(" vs ") : null];
  }
  const page = { subtitle, sections: [["overview", "Overview", renderOverview],
    ["training", "Training", renderTraining], ["diffing", "Diffing", renderDiffing],
    ["baselines", "Baselines", renderBaselines]] };
  Object.assign(CC, { renderOverview, renderTraining, renderDiffing, renderBaselines, page });
})(CC);
