// The package inside headless Chromium (Debian's /usr/bin/chromium, driven
// by playwright-core from tests/browser): a page imports src/index.js as an
// ES module, with the browser's own WebSocket, and submits, computes a
// key, and gets a typed error. Skipped when Chromium or playwright-core is
// missing, unless HERD_REQUIRE_BROWSER is set.

import { test } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { existsSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, normalize } from "node:path";
import { fileURLToPath } from "node:url";
import { BASIC, startBroker } from "./broker.js";

const here = dirname(fileURLToPath(import.meta.url));
const packageRoot = join(here, "..");
const driver = join(here, "../../../tests/browser/package.json");
const ready = existsSync("/usr/bin/chromium") && existsSync(join(here, "../../../tests/browser/node_modules/playwright-core"));

const PAGE = `<!doctype html>
<script type="importmap">
{"imports": {"@noble/hashes/": "/node_modules/@noble/hashes/"}}
</script>
<script type="module">
import * as herd from "/src/index.js";
const url = new URLSearchParams(location.search).get("broker");
try {
  const c = await herd.connect(url);
  const out = await c.submit({ browser: true }, { fn: "echo", full: true });
  let typed = "";
  try { await c.submit(1, { fn: "nope" }); } catch (e) { typed = e.constructor.name + ":" + e.code; }
  window.done = { key: out.key, own: herd.key({ browser: true }, "echo"), output: out.output, typed, ws: typeof WebSocket };
  c.close();
} catch (e) {
  window.done = { error: String(e) };
}
</script>`;

/** Serves the page and the package's files (src, node_modules). */
function serveFiles() {
  const server = createServer((req, res) => {
    const path = normalize(decodeURIComponent(new URL(req.url, "http://x").pathname));
    if (path === "/" || path === "/index.html") {
      res.writeHead(200, { "content-type": "text/html" });
      return res.end(PAGE);
    }
    const file = join(packageRoot, path);
    if (!file.startsWith(packageRoot) || !existsSync(file) || !(path.startsWith("/src/") || path.startsWith("/node_modules/"))) {
      res.writeHead(404);
      return res.end();
    }
    res.writeHead(200, { "content-type": file.endsWith(".js") ? "text/javascript" : "application/octet-stream" });
    res.end(readFileSync(file));
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}

test("the package works in a browser", { skip: !ready && !process.env.HERD_REQUIRE_BROWSER }, async (t) => {
  const { chromium } = createRequire(driver)("playwright-core");
  const files = await serveFiles();
  t.after(() => files.close());
  const origin = `http://127.0.0.1:${files.address().port}`;
  const broker = await startBroker(t, `allowed_origins = ["${origin}"]\n` + BASIC);
  const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: ["--no-sandbox"] });
  t.after(() => browser.close());
  const page = await browser.newPage();
  await page.goto(`${origin}/?broker=${encodeURIComponent(broker.url)}`);
  await page.waitForFunction(() => window.done !== undefined, null, { timeout: 15000 });
  const done = await page.evaluate(() => window.done);
  assert.equal(done.error, undefined, done.error);
  assert.equal(done.ws, "function");
  assert.equal(done.key, done.own, "the key computed in the browser is the broker's");
  assert.deepEqual(done.output, { browser: true });
  assert.equal(done.typed, "Refused:unknown_fn");
});
