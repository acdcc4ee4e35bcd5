// Drives one page in headless Chromium through a list of steps and reports what it saw (tests and docs).
//
// Usage: node page.mjs SPEC.json
// SPEC: { chromium: path, url: "file:///..." | "http://...", out_dir: dir, viewport: [w, h], timeout_ms,
//         steps: [ { wait: "js expression" }            wait until it is truthy
//                  { eval: "js expression", as: name }   store its (JSON-able) value under results[name]
//                  { click: "css selector" }
//                  { screenshot: "file.png", selector?: "css selector", full_page?: bool } ] }
// Prints one JSON line { results: {...}, console: [...], errors: [...] } (exit 0), or the error (exit 1).
// Launch flags as in render.mjs (software WebGL, no network services).
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");

async function main() {
  const spec = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
  const timeout = spec.timeout_ms || 60000;
  const browser = await chromium.launch({
    executablePath: spec.chromium,
    headless: true,
    args: ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist",
      "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update",
      "--disable-sync"],
  });
  const logs = [];
  const errors = [];
  try {
    const [w, h] = spec.viewport || [1280, 900];
    const page = await browser.newPage({ viewport: { width: w, height: h } });
    page.setDefaultTimeout(timeout);
    page.on("console", (m) => logs.push(`${m.type()}: ${m.text()}`));
    page.on("pageerror", (e) => errors.push(String(e)));
    page.on("requestfailed", (r) => logs.push(`request failed: ${r.url().slice(0, 200)} ${r.failure()?.errorText}`));
    await page.goto(spec.url, { waitUntil: "load", timeout });
    const results = {};
    fs.mkdirSync(spec.out_dir, { recursive: true });
    for (const step of spec.steps) {
      if (step.wait) await page.waitForFunction(step.wait, null, { timeout });
      else if (step.eval) results[step.as] = await page.evaluate(step.eval);
      else if (step.click) await page.click(step.click);
      else if (step.screenshot) {
        const file = path.join(spec.out_dir, step.screenshot);
        if (step.selector) await page.locator(step.selector).screenshot({ path: file });
        else await page.screenshot({ path: file, fullPage: !!step.full_page });
        results[step.screenshot] = file;
      } else throw new Error(`unknown step ${JSON.stringify(step)}`);
    }
    console.log(JSON.stringify({ results, console: logs, errors }));
  } catch (e) {
    console.error(String(e && e.stack ? e.stack : e));
    console.error(logs.concat(errors).join("\n"));
    process.exitCode = 1;
  } finally {
    await browser.close();
  }
}

main();
