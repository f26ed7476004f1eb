/* crosscoders report, data.js: the embedded JSON, lookups over the latent table and the
 * category names and colours. The report's scripts are concatenated, in the order
 * render.py gives (data, dom, charts, sections, card, table, main), into one script element;
 * they share the namespace CC: each reads what earlier ones put there and adds its own. */
const CC = {};
(function (CC) {
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
  // A page may colour its own categories (the layers report: one colour per layer).
  const OWN_COLOR = D.colors || {};
  const catColor = (c, i) => OWN_COLOR[c] || CAT_COLOR[c] || PALETTE[(i || 0) % PALETTE.length];

  function categoryCounts() {
    const out = {};
    for (const c of TV.category) out[c] = (out[c] || 0) + 1;
    return out;
  }
  function ccConfig() {
    const c = D.config || {};
    return { cc: c.crosscoder || (c.dict_size != null ? c : {}), train: c.train || {},
      data: c.data || {} };
  }


  Object.assign(CC, { T0, D, TV, COLS, COL, N, IDS, ROLE, R, ROW_OF, CAT_NAMES, cvar,
    UNTRAINED, GRADED, PALETTE, catColor, categoryCounts, ccConfig });
})(CC);
