/* crosscoders report, table.js: the feature browser, a virtual table of every latent with
 * category chips, search and sorting; a row opens its card (card.js). */
(function (CC) {
  "use strict";
  const { D, TV, COLS, COL, N, IDS, ROW_OF, R, CAT_NAMES, catColor, categoryCounts, h, esc,
    fmt, label, extent, renderCard } = CC;

  const browser = (function () {
    const ROW_H = 28;
    // Opens sorted as the page asks (D.sort: [column, direction]), else by the diffing
    // score (most changed first) when the table has one.
    const [sortCol, sortDir] = D.sort && COL[D.sort[0]] ? D.sort :
      [COL.diff_score ? "diff_score" : null, -1];
    const state = { cat: null, query: "", range: null, sortCol, sortDir, view: null,
      selected: null };
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

  CC.browser = browser;
})(CC);
