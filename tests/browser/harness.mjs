// What every report check shares: a headless chromium with a fresh profile, and a page
// whose console errors, page errors and non-local requests are recorded into `result`.
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export function newResult() {
  return { console: [], pageErrors: [], network: [], screenshots: [] };
}

// Runs `body(browser)` in a fresh chromium profile (playwright passes it as
// --user-data-dir) and removes the profile afterwards.
export async function withBrowser(prefix, body) {
  const profile = mkdtempSync(join(tmpdir(), prefix));
  const browser = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    viewport: { width: 1440, height: 900 },
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  try {
    await body(browser);
  } finally {
    await browser.close();
    rmSync(profile, { recursive: true, force: true });
  }
}

// A new page that records what went wrong on it; any request that is not file:// or
// data: is recorded as "network".
export async function watchedPage(browser, result) {
  const page = await browser.newPage();
  page.on("console", (msg) => {
    if (msg.type() === "error" || msg.type() === "warning") {
      result.console.push(`${msg.type()}: ${msg.text()}`);
    }
  });
  page.on("pageerror", (err) => result.pageErrors.push(String(err)));
  page.on("request", (req) => {
    const url = req.url();
    if (!url.startsWith("file:") && !url.startsWith("data:")) result.network.push(url);
  });
  return page;
}
