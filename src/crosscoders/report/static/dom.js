/* crosscoders report, dom.js: building elements, formatting numbers, the tooltip and the
 * small layout pieces (panels, key-value lists). */
(function (CC) {
  "use strict";
  const SVGNS = "http://www.w3.org/2000/svg";

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
  // Column names as shown; a page may rename some (the layers report: category -> peak layer).
  const LABELS = CC.D.labels || {};
  const label = (name) => LABELS[name] || name.replace(/_/g, " ");
  const tip = h("div", { class: "tip" });
  function showTip(ev, text) {
    tip.textContent = text;
    tip.style.display = "block";
    const x = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
    tip.style.left = x + "px";
    tip.style.top = (ev.clientY + 14) + "px";
  }
  const hideTip = () => { tip.style.display = "none"; };

  function panel(title, note, ...body) {
    return h("div", { class: "panel" }, h("h3", {}, title), note ? h("p", { class: "note" },
      note) : null, ...body);
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

  function showToken(t) {
    return String(t).replace(/\n/g, "↵").replace(/\t/g, "⇥");
  }

  Object.assign(CC, { h, s, esc, fmt, fmtTick, isNum, label, tip, showTip, hideTip, panel,
    kvList, rawJson, showToken });
})(CC);
