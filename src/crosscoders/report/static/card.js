/* crosscoders report, card.js: a latent's card (statistics, decoder norms, examples, top
 * tokens, activation histogram), from the chunk of card data that holds it. A page adds
 * its own parts after the statistics through CC.cardSections (functions (id, row, card
 * data) -> elements), and grouped examples (card data "exg") show one group at a time. */
(function (CC) {
  "use strict";
  const { D, TV, COLS, ROW_OF, R, CAT_NAMES, cvar, catColor, h, esc, fmt, label,
    showToken, barsFromHist } = CC;
  const browser = { close: () => CC.browser.close() };  // table.js, loaded after

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
    for (const section of CC.cardSections || []) out.push(...section(id, row, cd));
    const ex = cd.ex || [];
    if (ex.length) {
      out.push(h("h4", {}, `Max-activating contexts (${ex.length})`), ...exampleList(ex));
    } else if (D.has_examples) {
      out.push(h("h4", {}, "Max-activating contexts"), h("p", { class: "note" },
        "No examples were stored for this latent."));
    }
    if (cd.exg) out.push(...exampleGroups(cd.exg, TV.category[row]));
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
  /* The list of examples `ex` (the first few; a button shows the rest). */
  function exampleList(ex) {
    let maxAct = 0;
    for (const e of ex) for (const a of exampleActs(e)) if (a > maxAct) maxAct = a;
    const list = h("div", { class: "exs" });
    const SHOW = 8;
    const add = (from, to) => {
      for (let j = from; j < to; j++) list.append(exampleEl(ex[j], maxAct, j));
    };
    add(0, Math.min(SHOW, ex.length));
    if (ex.length <= SHOW) return [list];
    const more = h("button", { class: "more", type: "button", onclick: () => {
      add(SHOW, ex.length); more.remove();
    } }, `show all ${ex.length}`);
    return [list, more];
  }
  /* Grouped examples {group: [example, ...]}: a chip per group, one group shown; first the
   * group named like the latent's category (the layers report: its peak layer). */
  function exampleGroups(groups, category) {
    const names = Object.keys(groups).filter((g) => groups[g].length);
    if (!names.length) return [];
    const body = h("div", { class: "ex-group" });
    const chips = h("div", { class: "toolbar ex-groups" });
    const show = (g) => {
      for (const c of chips.children) c.classList.toggle("on", c.dataset.group === g);
      body.replaceChildren(...exampleList(groups[g]));
    };
    for (const g of names) {
      chips.append(h("button", { type: "button", class: "chip", "data-group": g,
        onclick: () => show(g) }, g, h("small", {}, groups[g].length)));
    }
    show(names.includes(category) ? category : names[0]);
    return [h("h4", {}, D.group_title || "Contexts by group"), D.group_note ?
      h("p", { class: "note" }, D.group_note) : null, chips, body].filter(Boolean);
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
  Object.assign(CC, { renderCard });
})(CC);
