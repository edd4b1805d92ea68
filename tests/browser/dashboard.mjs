// Drives the herd dashboard in headless Chromium; started by tests/dashboard.rs.
//
//   node dashboard.mjs '<json options>'
//
// mode "inflight": opens the page, submits a slow evaluation twice with the
//   `herd` binary, and checks that its row appears with the right key and
//   waiter count, that it shows the evaluation's progress as it goes, that
//   it leaves when done, and that the counters move.
// mode "disconnect": opens the page, prints CONNECTED, and waits until the
//   page shows that the broker went away (the Rust test stops it).
// mode "workers": opens the page of a broker with a remote fn, prints READY
//   once it shows no_workers, SEEN once the worker the Rust test connects
//   is listed, and OK once it is gone again.
// mode "history": opens the page after a burst and checks that the chart
//   shows it (the broker sends its recent history with the first snapshot).
// mode "cluster": opens a clustered broker's page, prints CONNECTED once it
//   shows Redis and pub/sub ok and both brokers in its cluster table, with
//   totals that add up, DOWN once it shows both down (the Rust test
//   pauses Redis; the broker is idle), and OK once both are ok again.
import { chromium } from "playwright-core";
import { spawn } from "node:child_process";

const opts = JSON.parse(process.argv[2]);
const TIMEOUT = 15000;

function fail(message) {
  console.error("FAIL: " + message);
  process.exit(1);
}

const browser = await chromium.launch({
  executablePath: opts.chromium || "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
const pageErrors = [];
page.on("pageerror", (e) => pageErrors.push(String(e)));

// mode "token": opens a credentialed broker's page without a token and
//   checks that it asks for one (not "retrying" forever), refuses a wrong
//   one, connects with the right one given in its form, keeps it over a
//   reload, takes one from `/#token=…`, never shows it in its address,
//   never puts it in a request's URL but the WebSocket's, and is served
//   with its security headers.
async function tokenMode() {
  const urls = [];
  page.on("request", (r) => urls.push(r.url()));
  const cspErrors = [];
  page.on("console", (m) => { if (m.text().includes("Content Security Policy")) cspErrors.push(m.text()); });
  const response = await page.goto(opts.base + "/");
  const headers = response.headers();
  if (!(headers["content-security-policy"] || "").includes("default-src 'self'")) fail("CSP: " + JSON.stringify(headers));
  if (headers["referrer-policy"] !== "no-referrer") fail("Referrer-Policy: " + headers["referrer-policy"]);
  if (headers["x-content-type-options"] !== "nosniff") fail("nosniff: " + headers["x-content-type-options"]);
  const asks = async (text) => {
    await page.waitForSelector('#link[data-state="needs-token"]', { timeout: TIMEOUT });
    await page.waitForSelector("#login:not([hidden])", { timeout: TIMEOUT });
    const why = await page.textContent("#login-why");
    if (!why.includes(text)) fail("the page says: " + why);
  };
  await asks("This broker needs a token");
  if (opts.screenshot) await page.screenshot({ path: opts.screenshot, fullPage: true });
  console.log("ASKED");
  await page.fill("#login-token", "not-the-token");
  await page.click('#login button[type="submit"]');
  await asks("refused this token");
  await page.fill("#login-token", opts.pageToken);
  await page.click('#login button[type="submit"]');
  const connected = () => page.waitForSelector('#link[data-state="connected"]', { timeout: TIMEOUT });
  await connected();
  await page.reload();
  await connected();
  const other = await browser.newPage();
  other.on("request", (r) => urls.push(r.url()));
  await other.goto(opts.base + "/#token=" + encodeURIComponent(opts.pageToken));
  await other.waitForSelector('#link[data-state="connected"]', { timeout: TIMEOUT });
  for (const p of [page, other]) {
    if (p.url().includes(opts.pageToken)) fail("the address shows the token: " + p.url());
  }
  const leaked = urls.filter((u) => u.includes(opts.pageToken));
  if (leaked.length) fail("requests carry the token in their URL: " + leaked.join(" "));
  if (cspErrors.length) fail("the policy blocked: " + cspErrors.join("; "));
  console.log("OK");
}

try {
  if (opts.mode === "token") {
    await tokenMode();
    if (pageErrors.length) fail("page errors: " + pageErrors.join("; "));
    await browser.close();
    process.exit(0);
  }
  const url = opts.base + "/" + (opts.pageToken ? "#token=" + encodeURIComponent(opts.pageToken) : "");
  await page.goto(url);
  await page.waitForSelector('#link[data-state="connected"]', { timeout: TIMEOUT });
  const role = await page.textContent("#server");
  if (opts.expectRole && !role.includes("role " + opts.expectRole)) fail("role shown: " + role);
  // Snapshots arrive: the connection count is rendered.
  await page.waitForFunction(() => document.getElementById("f-connections").textContent !== "–", null, { timeout: TIMEOUT });

  if (opts.mode === "workers") {
    // The remote fn shows no_workers; a worker's row comes when it serves
    // (the Rust test connects one after READY) and goes when it leaves.
    const health = `#queues tr[data-fn="${opts.fn}"] td.health`;
    const noWorkers = () => page.waitForFunction(
      (sel) => document.querySelector(sel)?.textContent === "no_workers", health, { timeout: TIMEOUT });
    await noWorkers();
    console.log("READY");
    const row = "#workers tbody tr";
    await page.waitForSelector(row, { timeout: TIMEOUT });
    const concurrency = await page.textContent(row + " td.concurrency");
    if (concurrency !== String(opts.concurrency)) fail("concurrency shown: " + concurrency);
    if (opts.screenshot) await page.screenshot({ path: opts.screenshot, fullPage: true });
    console.log("SEEN");
    await page.waitForSelector(row, { state: "detached", timeout: TIMEOUT });
    await noWorkers();
    console.log("OK");
  } else if (opts.mode === "history") {
    // The chart shows the burst that happened before the page opened.
    await page.waitForFunction(
      (min) => parseFloat(document.getElementById("chart-max").textContent.replace(/[^0-9.]/g, "")) >= min,
      opts.minRate, { timeout: TIMEOUT });
    // A burst inside one history sample is one point; the line is drawn
    // once the next snapshot adds another.
    await page.waitForFunction(
      () => (document.querySelector("#chart polyline.s-submits")?.getAttribute("points") || "")
        .split(" ").filter(Boolean).length >= 2,
      null, { timeout: TIMEOUT }).catch(async () => {
      fail("the chart has no line: " + await page.getAttribute("#chart polyline.s-submits", "points"));
    });
    if (opts.screenshot) await page.screenshot({ path: opts.screenshot, fullPage: true });
    console.log("OK");
  } else if (opts.mode === "cluster") {
    // The cluster figure shows Redis's health and the completion channel's.
    const shows = (id, text) => page.waitForFunction(
      ([id, text]) => document.getElementById(id).textContent.includes(text), [id, text], { timeout: TIMEOUT });
    await shows("f-cluster", "ok");
    await shows("f-cluster-pubsub", "pub/sub ok");
    // Both brokers are listed, and the totals add up their counters.
    await page.waitForFunction(() => document.querySelectorAll("#cluster tbody tr").length === 2, null, { timeout: TIMEOUT });
    await shows("f-cluster-totals", "2 brokers: 1 submits, 1 evaluations");
    const evals = await page.$$eval("#cluster tbody td.evaluations", (tds) => tds.map((td) => Number(td.textContent)));
    if (evals.reduce((a, b) => a + b, 0) !== 1) fail("per-broker evaluations: " + evals);
    if (opts.clusterScreenshot) await page.screenshot({ path: opts.clusterScreenshot, fullPage: true });
    console.log("CONNECTED");
    await shows("f-cluster-pubsub", "pub/sub down");
    await shows("f-cluster", "degraded");
    if (opts.screenshot) await page.screenshot({ path: opts.screenshot, fullPage: true });
    console.log("DOWN");
    await shows("f-cluster-pubsub", "pub/sub ok");
    await shows("f-cluster", "ok");
    console.log("OK");
  } else if (opts.mode === "disconnect") {
    console.log("CONNECTED");
    await page.waitForSelector('#link[data-state="disconnected"]', { timeout: TIMEOUT });
    const text = await page.textContent("#link");
    if (!text.includes("retrying")) fail("indicator says: " + text);
    if (opts.screenshot) await page.screenshot({ path: opts.screenshot, fullPage: true });
    console.log("DISCONNECTED");
  } else {
    const submitsBefore = Number((await page.textContent("#f-submits")).replace(/[^0-9]/g, ""));
    const env = { ...process.env, HERD_URL: opts.wsUrl };
    if (opts.agentToken) env.HERD_TOKEN = opts.agentToken;
    const agents = [0, 1].map(() => spawn(opts.herd, ["submit", opts.input], { env, stdio: "ignore" }));
    const row = `#inflight tr[data-key="${opts.key}"]`;
    await page.waitForSelector(row, { timeout: TIMEOUT });
    await page.waitForFunction(
      (sel) => document.querySelector(sel + " td.waiters")?.textContent === "2",
      row, { timeout: TIMEOUT });
    const keyTitle = await page.getAttribute(row + " td.key", "title");
    if (keyTitle !== opts.key) fail("full key on hover is " + keyTitle);
    const shown = await page.textContent(row + " td.key");
    if (!opts.key.startsWith(shown.replace("…", ""))) fail("shortened key is " + shown);
    await page.click(row + " td.key");
    if ((await page.textContent(row + " td.key")) !== opts.key) fail("click does not show the full key");
    // Its progress, live: a report, then a later one.
    const step = () => page.evaluate((sel) => {
      const m = /"step":(\d+)/.exec(document.querySelector(sel + " td.progress")?.textContent || "");
      return m ? Number(m[1]) : 0;
    }, row);
    await page.waitForFunction(
      (sel) => /"step":\d+,"of":5/.test(document.querySelector(sel + " td.progress")?.textContent || ""),
      row, { timeout: TIMEOUT });
    const first = await step();
    await page.waitForFunction(
      ([sel, seen]) => {
        const m = /"step":(\d+)/.exec(document.querySelector(sel + " td.progress")?.textContent || "");
        return m && Number(m[1]) > seen;
      },
      [row, first], { timeout: TIMEOUT });
    if (opts.screenshot) await page.screenshot({ path: opts.screenshot, fullPage: true });
    // The row leaves when the evaluation ends; the completion is listed.
    await page.waitForSelector(row, { state: "detached", timeout: TIMEOUT });
    await page.waitForSelector(`#recent tr[data-key="${opts.key}"]`, { timeout: TIMEOUT });
    const shared = await page.textContent(`#recent tr[data-key="${opts.key}"] td:nth-child(4)`);
    if (shared !== "2") fail("recent shows shared by " + shared);
    await page.waitForFunction(
      (before) => Number(document.getElementById("f-submits").textContent.replace(/[^0-9]/g, "")) >= before + 2,
      submitsBefore, { timeout: TIMEOUT });
    const evals = await page.textContent("#f-evaluations");
    if (!/^[1-9]/.test(evals)) fail("evaluations counter: " + evals);
    const points = await page.getAttribute("#chart polyline.s-submits", "points");
    if (!points || points.split(" ").length < 2) fail("the chart has no line: " + points);
    for (const a of agents) a.kill();
    console.log("OK");
  }
  if (pageErrors.length) fail("page errors: " + pageErrors.join("; "));
} catch (e) {
  if (opts.screenshot) await page.screenshot({ path: opts.screenshot.replace(/\.png$/, "-failed.png"), fullPage: true }).catch(() => {});
  fail(e.message);
} finally {
  await browser.close();
}
