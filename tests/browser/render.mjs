// Renders exported models in headless Chromium with three.js (see viewer.mjs) and writes the pictures.
//
// Usage: node render.mjs SPEC.json
// SPEC: { chromium: path, out_dir: dir, files: {"/name": local path}, page: <viewer config> }
// Prints one JSON line: { images: [png paths], info: {...} } (exit 0), or the error (exit 1).
import fs from "node:fs";
import http from "node:http";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");
const threeRoot = path.dirname(path.dirname(require.resolve("three")));

const TYPES = { ".html": "text/html", ".mjs": "text/javascript", ".js": "text/javascript",
  ".json": "application/json", ".png": "image/png", ".glb": "model/gltf-binary" };

function serve(spec) {
  const routes = { "/viewer.html": path.join(here, "viewer.html"), "/viewer.mjs": path.join(here, "viewer.mjs") };
  Object.assign(routes, spec.files);
  return http.createServer((req, res) => {
    const url = decodeURIComponent(new URL(req.url, "http://x").pathname);
    if (url === "/config.json") {
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify(spec.page));
      return;
    }
    let file = routes[url];
    if (!file && url.startsWith("/three/")) {
      file = path.join(threeRoot, path.normalize(url.slice("/three/".length)));
      if (!file.startsWith(threeRoot)) file = null;
    }
    if (!file || !fs.existsSync(file)) {
      res.writeHead(404);
      res.end();
      return;
    }
    res.writeHead(200, { "content-type": TYPES[path.extname(file)] || "application/octet-stream" });
    fs.createReadStream(file).pipe(res);
  });
}

async function main() {
  const spec = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
  const server = serve(spec);
  await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
  const base = `http://127.0.0.1:${server.address().port}`;
  const browser = await chromium.launch({
    executablePath: spec.chromium,
    headless: true,
    args: ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist",
      "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update",
      "--disable-sync"],
  });
  try {
    const page = await browser.newPage();
    const logs = [];
    page.on("console", (m) => logs.push(m.text()));
    page.on("pageerror", (e) => logs.push(String(e)));
    await page.goto(`${base}/viewer.html`);
    await page.waitForFunction(() => window.__result || window.__error, null, { timeout: 60000 });
    const err = await page.evaluate(() => window.__error);
    if (err) throw new Error(`viewer failed: ${err}\n${logs.join("\n")}`);
    const result = await page.evaluate(() => window.__result);
    fs.mkdirSync(spec.out_dir, { recursive: true });
    const images = result.images.map((url, i) => {
      const p = path.join(spec.out_dir, `view_${i}.png`);
      fs.writeFileSync(p, Buffer.from(url.split(",")[1], "base64"));
      return p;
    });
    console.log(JSON.stringify({ images, info: result.info, console: logs }));
  } finally {
    await browser.close();
    server.close();
  }
}

main().catch((e) => { console.error(String(e && e.stack ? e.stack : e)); process.exit(1); });
