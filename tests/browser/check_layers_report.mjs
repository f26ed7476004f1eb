// Drives headless chromium over a layers report and prints what it observed as one JSON line.
// Usage: node check_layers_report.mjs REPORT.html OUT_DIR
// The Python test (tests/test_report_browser.py) makes the assertions; this script only
// acts and measures. Any request that is not file:// or data: is recorded as "network".
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";

import { newResult, watchedPage, withBrowser } from "./harness.mjs";

const [reportPath, outDir] = process.argv.slice(2);
const result = newResult();

await withBrowser("cc-layers-chromium-", async (browser) => {
  const page = await watchedPage(browser, result);
  await page.goto(pathToFileURL(resolve(reportPath)).href, { waitUntil: "load" });
  await page.waitForFunction(() => window.__report && window.__report.ready, null,
    { timeout: 60000 });
  result.nav = await page.$$eval("header nav a", (as) => as.map((a) => a.textContent));
  result.svgs = await page.$$eval("svg.chart", (svgs) => svgs.map((svg) => {
    const r = svg.getBoundingClientRect();
    const sec = svg.closest("section");
    return { section: sec ? sec.id : null, label: svg.getAttribute("aria-label"),
      width: r.width, height: r.height, marks: svg.querySelectorAll("rect,path,circle").length };
  }));
  result.comparisonRows = await page.$$eval("#comparison-table tr", (rows) => rows.length);

  // The heat map: drawn, sorted by peak layer at first; sort by span, then by peak again.
  const heat = () => page.evaluate(() => window.__report.heatmap.state());
  result.canvas = await page.$eval("#heatmap", (c) => {
    const r = c.getBoundingClientRect();
    const ctx = c.getContext("2d");
    const mid = ctx.getImageData(Math.floor(c.width * 0.6), Math.floor(c.height / 2), 1, 1).data;
    return { width: r.width, height: r.height, midPixel: Array.from(mid) };
  });
  result.heatInitial = await heat();
  await page.click('.chip[data-sort="span"]');
  result.heatSpan = await heat();
  result.spanChipOn = await page.$eval('.chip[data-sort="span"]', (b) => b.classList.contains("on"));
  await page.click('.chip[data-sort="peak"]');
  result.heatPeak = await heat();
  await page.locator("#layers").screenshot({ path: join(outDir, "layers-heatmap.png") });
  result.screenshots.push(join(outDir, "layers-heatmap.png"));

  // Clicking a column of the heat map opens that latent's card.
  const map = page.locator("#heatmap");
  const box = await map.boundingBox();
  const clickK = Math.floor(result.heatPeak.ids.length * 0.7);
  const left = result.heatPeak.left; // the plot starts after the layer labels
  const position = { x: left + ((clickK + 0.5) / result.heatPeak.ids.length) *
    (box.width - left), y: box.height / 2 };
  await map.hover({ position });
  result.heatTip = await page.textContent(".tip");
  await map.click({ position });
  await page.waitForSelector("#card .card-head h3");
  result.heatClick = { k: clickK, plotWidth: box.width - left,
    title: await page.textContent("#card .card-head h3") };

  // Open the first row of the feature browser: its layer profile and contexts per layer.
  const firstId = Number(await page.getAttribute(".vt-row", "data-id"));
  await page.click(".vt-row");
  await page.waitForSelector("#card .card-head h3");
  const readCard = () => page.evaluate(() => {
    const card = document.getElementById("card");
    const svg = card.querySelector('svg[aria-label="layer profile"]');
    const bars = svg ? [...svg.querySelectorAll("g.bar rect:first-child")]
      .filter((r) => r.getAttribute("fill") !== "transparent") : [];
    const r = svg ? svg.getBoundingClientRect() : null;
    return {
      title: card.querySelector(".card-head h3").textContent,
      profile: r ? { width: r.width, height: r.height } : null,
      barHeights: bars.map((b) => Number(b.getAttribute("height"))),
      dimmed: bars.map((b) => b.getAttribute("fill-opacity") !== "1"),
      note: card.querySelector("h4 + p.note") ? card.querySelector("h4 + p.note").textContent
        : null,
      examples: card.querySelectorAll(".exs")[0] ?
        card.querySelectorAll(".exs")[0].querySelectorAll(".ex").length : 0,
      groups: [...card.querySelectorAll(".ex-groups .chip")].map((c) => c.dataset.group),
      groupOn: (card.querySelector(".ex-groups .chip.on") || {}).dataset?.group || null,
      groupExamples: card.querySelector(".ex-group") ?
        card.querySelector(".ex-group").querySelectorAll(".ex").length : 0,
    };
  });
  result.card = Object.assign({ firstId }, await readCard());
  const chips = await page.$$(".ex-groups .chip");
  if (chips.length > 1) {
    await chips[chips.length - 1].click();
    result.card.groupAfterClick = await page.$eval(".ex-groups .chip.on",
      (c) => c.dataset.group);
  }
  await page.screenshot({ path: join(outDir, "layers-card.png") });
  result.screenshots.push(join(outDir, "layers-card.png"));
  await page.screenshot({ path: join(outDir, "layers-full.png"), fullPage: true });
  result.screenshots.push(join(outDir, "layers-full.png"));
});
console.log(JSON.stringify(result));
