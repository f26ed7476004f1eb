/* crosscoders report, main.js: the page (header, navigation, sections in order, deep
 * links) and window.__report for tests and the console. The sections and the subtitle
 * come from CC.page, which the page's sections script sets (sections.js: the diff report;
 * layers.js: the layers report). */
(function (CC) {
  "use strict";
  const { T0, D, TV, N, IDS, h, tip, browser, page } = CC;

  // ------------------------------------------------------------------ page
  function main() {
    const app = document.getElementById("app");
    const sub = [N.toLocaleString("en-US") + " latents", ...page.subtitle(),
      `built ${D.generated}`].filter(Boolean).join(" · ");
    const nav = h("nav");
    app.append(h("header", { class: "top" }, h("h1", {}, D.title), h("span", { class: "sub" },
      sub), nav), tip);
    const body = h("main");
    app.append(body);
    const sections = [...page.sections, ["features", "Features", browser.build]];
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
    window.__report = Object.assign({ ready: true, renderMs: performance.now() - T0,
      readyAt: performance.now(), browser, view,
      open: (id) => browser.open(id, true) }, page.hooks || {});
    document.body.dataset.ready = "1";
  }
  main();
})(CC);
