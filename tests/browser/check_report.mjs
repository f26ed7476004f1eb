// Drives headless chromium over a report and prints what it observed as one JSON line.
// Usage: node check_report.mjs REPORT.html OUT_DIR [--interact]
// The Python test (tests/test_report_browser.py) makes the assertions; this script only
// acts and measures. Any request that is not file:// or data: is recorded as "network".
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";

import { newResult, watchedPage, withBrowser } from "./harness.mjs";

const [reportPath, outDir, ...flags] = process.argv.slice(2);
const interact = flags.includes("--interact");
const result = newResult();

await withBrowser("cc-report-chromium-", async (browser) => {
  let page = await watchedPage(browser, result);

  const url = pathToFileURL(resolve(reportPath)).href;
  const t0 = Date.now();
  await page.goto(url, { waitUntil: "load" });
  await page.waitForFunction(() => window.__report && window.__report.ready, null,
    { timeout: 60000 });
  result.wallLoadMs = Date.now() - t0;
  result.timing = await page.evaluate(() => {
    const nav = performance.getEntriesByType("navigation")[0];
    return {
      readyMs: window.__report.readyAt, // since navigation start: parse + script + render
      renderMs: window.__report.renderMs, // the report's scripts alone
      domContentLoadedMs: nav ? nav.domContentLoadedEventEnd : null,
      loadEventMs: nav ? nav.loadEventEnd : null,
      htmlBytes: nav ? nav.transferSize || nav.encodedBodySize : null,
    };
  });
  result.nav = await page.$$eval("header nav a", (as) => as.map((a) => a.textContent));
  result.svgs = await page.$$eval("svg.chart", (svgs) => svgs.map((svg) => {
    const r = svg.getBoundingClientRect();
    const sec = svg.closest("section");
    return { section: sec ? sec.id : null, label: svg.getAttribute("aria-label"),
      width: r.width, height: r.height, marks: svg.querySelectorAll("rect,path,circle").length };
  }));
  result.rowCount = await page.$$eval(".vt-row", (rows) => rows.length);
  result.status = await page.textContent(".status");
  await page.screenshot({ path: join(outDir, "report-top.png") });
  result.screenshots.push(join(outDir, "report-top.png"));

  // The graded view: the browser's initial sort, the null band, dead/rare left out.
  result.initialSort = await page.$eval(".vt-head div.sorted", (el) => el.textContent)
    .catch(() => null);
  result.initialScores = await page.evaluate(() => {
    const cols = [...document.querySelectorAll(".vt-head div")].map((d) => d.dataset.col);
    if (!cols.includes("diff_score")) return null;
    return window.__report.view(["diff_score"]).values.diff_score.slice(0, 200);
  });
  result.band = await page.$$eval(
    'section#diffing svg[aria-label="relative norm"] rect.band', (r) => r.length);
  // The summary's thresholds: guides on the relative-norm plot, the score in the note.
  result.guides = await page.$$eval(
    'section#diffing svg[aria-label="relative norm"] line.guide', (l) => l.length);
  result.countsNote = await page.$$eval("section#diffing .panel", (ps) => {
    const p = ps.find((x) => x.querySelector("h3").textContent.startsWith("Category counts"));
    return p && p.querySelector(".note") ? p.querySelector(".note").textContent : null;
  });
  const legendNames = () => page.$$eval("section#diffing .panel:first-child .legend span",
    (spans) => spans.map((x) => x.textContent));
  result.legend = await legendNames();
  result.untrainedNote = await page.$eval("section#diffing > .toolbar .note",
    (el) => el.textContent).catch(() => null);

  if (interact) {
    if (result.untrainedNote) {
      await page.click("#untrained-toggle");
      result.legendWithUntrained = await legendNames();
      await page.click("#untrained-toggle");
    }
    // Filter by category.
    await page.click('.chip[data-cat="chat_only"]');
    result.chatOnly = {
      status: await page.textContent(".status"),
      view: await page.evaluate(() => window.__report.view(["category"])),
      visibleCategories: await page.$$eval(".vt-row .badge", (b) => [...new Set(
        b.map((x) => x.textContent))]),
    };
    // Sort by a column (descending first), read the first rows' values.
    await page.click('.vt-head div[data-col="rel_norm"]');
    result.sorted = await page.evaluate(() =>
      window.__report.view(["rel_norm"]).values.rel_norm);
    result.sortedHeader = await page.textContent(".vt-head div.sorted");
    // Open the first row's card.
    const firstId = await page.getAttribute(".vt-row", "data-id");
    await page.click(".vt-row");
    await page.waitForSelector("#card .card-head h3");
    result.card = await page.evaluate(() => {
      const card = document.getElementById("card");
      const toks = card.querySelectorAll(".ex span.tok");
      const lit = [...toks].filter((t) => t.style.background);
      const svg = card.querySelector("svg.chart");
      const r = svg ? svg.getBoundingClientRect() : null;
      return {
        title: card.querySelector(".card-head h3").textContent,
        examples: card.querySelectorAll(".ex").length,
        tokens: toks.length, highlighted: lit.length,
        peaks: card.querySelectorAll(".ex span.tok.peak").length,
        topTokens: card.querySelectorAll(".tt-cols .pill").length,
        stats: [...card.querySelectorAll(".stat .k")].map((k) => k.textContent),
        histogram: r ? { width: r.width, height: r.height } : null,
        hash: location.hash,
      };
    });
    result.card.firstId = firstId;
    await page.screenshot({ path: join(outDir, "report-card.png") });
    result.screenshots.push(join(outDir, "report-card.png"));
    await page.locator("#features").screenshot({ path: join(outDir, "report-browser.png") });
    result.screenshots.push(join(outDir, "report-browser.png"));

    // Search: back to all categories, then a latent id, then a token, then a filter.
    await page.click('.chip[data-cat="all"]');
    const search = async (q) => {
      await page.fill("#search", q);
      await page.waitForTimeout(350);
      return {
        status: await page.textContent(".status"),
        ids: await page.$$eval(".vt-row", (rows) => rows.map((r) => Number(r.dataset.id))),
      };
    };
    const target = Number(process.env.SEARCH_ID || "123");
    result.searchId = await search(String(target));
    result.searchFilter = await search("rel_norm>0.95 freq<0.001");
    result.searchFilterCheck = await page.evaluate(() => window.__report.view(
      ["rel_norm", "freq"]));
    result.searchNone = await search("zzzz-no-such-token");
    // Histogram click filters the browser by a range.
    await page.fill("#search", "");
    await page.waitForTimeout(300);
    const bars = page.locator('section#diffing svg[aria-label="relative norm"] g.bar');
    const nBars = await bars.count();
    if (nBars) {
      await bars.nth(nBars - 1).click();
      result.rangeFilter = await page.textContent(".chip.filter");
      result.rangeStatus = await page.textContent(".status");
    }
    // Opening a latent from the URL hash (deep link).
    const fresh = await browser.newPage();
    fresh.on("pageerror", (err) => result.pageErrors.push(String(err)));
    await page.close();
    page = fresh;
    await page.goto(`${url}#latent=${target}`, { waitUntil: "load" });
    await page.waitForFunction(() => window.__report && window.__report.ready);
    await page.waitForSelector("#card .card-head h3");
    result.deepLink = await page.textContent("#card .card-head h3");
    await page.screenshot({ path: join(outDir, "report-full.png"), fullPage: true });
    result.screenshots.push(join(outDir, "report-full.png"));
  }
});
console.log(JSON.stringify(result));
