// herd dashboard: one `watch` subscription, rendered one snapshot at a time.
//
// The page never updates the DOM per request: it redraws from each snapshot
// (every INTERVAL_MS) and ticks the ages of in-flight rows in between.
"use strict";

const INTERVAL_MS = 500;
const HISTORY_S = 300;            // chart span
const BACKOFF_FIRST_MS = 500;     // reconnect delay, doubling
const BACKOFF_MAX_MS = 10000;

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "herd-token";   // sessionStorage: this tab only

// The token comes from the fragment (`/#token=…`: never sent to the
// server), from the form, or from `?token=`; it is kept for this tab and
// taken out of the address bar at once, so it stays out of the history.
function takeToken() {
  const given = new URLSearchParams(location.hash.slice(1)).get("token")
    || new URLSearchParams(location.search).get("token");
  if (given) {
    sessionStorage.setItem(TOKEN_KEY, given);
    window.history.replaceState(null, "", location.pathname);
  }
  return sessionStorage.getItem(TOKEN_KEY);
}
let token = takeToken();
let greeted = false;              // the current connection got its hello

let socket = null;
let backoff = BACKOFF_FIRST_MS;
let previous = null;              // last snapshot's {at, stats}
let received = 0;                 // performance.now() of the last snapshot
let history = [];                 // [{t, submits, hits, evals}] per second
const expanded = new Set();       // keys shown in full

function wsUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const query = token ? "?token=" + encodeURIComponent(token) : "";
  return scheme + "//" + location.host + "/ws" + query;
}

function setLink(state, text) {
  const el = $("link");
  el.dataset.state = state;
  el.textContent = text;
  el.className = "link " + (state === "connected" ? "up" : "down");
}

// Why a connection that never got its hello was refused, if the broker
// refuses this page's credentials (a WebSocket cannot tell the page).
async function refusal() {
  try {
    const headers = token ? { Authorization: "Bearer " + token } : {};
    const r = await fetch("/v1/keys/" + "0".repeat(32), { headers, cache: "no-store" });
    if (r.status === 401) {
      return token ? "The broker refused this token." : "This broker needs a token.";
    }
    if (r.status === 429 && r.headers.get("Retry-After")) {
      return "Too many wrong tokens from this address: try again in "
        + r.headers.get("Retry-After") + " s.";
    }
  } catch (_) {
    // The broker is away: retried like any lost connection.
  }
  return null;
}

// Asks for a token instead of retrying a connection that cannot succeed.
function askForToken(why) {
  setLink("needs-token", "needs a token");
  $("login-why").textContent = why;
  $("login").hidden = false;
  $("login-token").focus();
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  const given = $("login-token").value.trim();
  if (!given) return;
  token = given;
  sessionStorage.setItem(TOKEN_KEY, given);
  $("login-token").value = "";
  $("login").hidden = true;
  connect();
});

function connect() {
  setLink("connecting", "connecting…");
  greeted = false;
  socket = new WebSocket(wsUrl());
  socket.onopen = () => {
    backoff = BACKOFF_FIRST_MS;
    socket.send(JSON.stringify({ op: "watch", interval_ms: INTERVAL_MS }));
  };
  socket.onmessage = (event) => {
    const frame = JSON.parse(event.data);
    if (frame.type === "hello") {
      greeted = true;
      $("server").textContent = frame.server + " · role " + frame.role;
      setLink("connected", "connected");
    } else if (frame.type === "snapshot") {
      render(frame);
    } else if (frame.type === "error") {
      $("server").textContent = "error: " + frame.message;
    }
  };
  socket.onclose = async (event) => {
    if (event.code === 1008) {
      sessionStorage.removeItem(TOKEN_KEY);
      askForToken("The broker closed the session: " + (event.reason || "policy") + ".");
      return;
    }
    if (!greeted) {
      const why = await refusal();
      if (why) {
        askForToken(why);
        return;
      }
    }
    const wait = backoff;
    backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
    setLink("disconnected", "disconnected · retrying in " + Math.round(wait / 1000) + " s");
    setTimeout(connect, wait);
  };
}

function fmtInt(n) { return Number(n).toLocaleString("en-US"); }
function fmtRate(n) { return n >= 100 ? fmtInt(Math.round(n)) : n.toFixed(1); }
function fmtBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}
function fmtMs(ms) { return ms >= 10000 ? (ms / 1000).toFixed(1) + " s" : Math.round(ms) + " ms"; }
function pct(part, whole) { return whole > 0 ? (100 * part / whole).toFixed(1) + "%" : "–"; }

// A watch's first snapshot carries the broker's recent history:
// [at_ms, submits, cache_hits, evaluations] once a second.
function loadHistory(samples) {
  history = [];
  for (let i = 1; i < samples.length; i++) {
    const [t0, s0, h0, e0] = samples[i - 1];
    const [t1, s1, h1, e1] = samples[i];
    const dt = (t1 - t0) / 1000;
    if (dt <= 0) continue;
    pushHistory(t1, {
      submits: Math.max(0, s1 - s0) / dt,
      hits: Math.max(0, h1 - h0) / dt,
      evals: Math.max(0, e1 - e0) / dt,
    });
  }
}

function render(snap) {
  const s = snap.stats;
  received = performance.now();
  if (snap.history) loadHistory(snap.history);
  let rates = { submits: 0, hits: 0, evals: 0 };
  if (previous && snap.at_ms > previous.at) {
    const dt = (snap.at_ms - previous.at) / 1000;
    rates = {
      submits: Math.max(0, s.submits - previous.stats.submits) / dt,
      hits: Math.max(0, s.cache_hits - previous.stats.cache_hits) / dt,
      evals: Math.max(0, s.evaluations - previous.stats.evaluations) / dt,
    };
    pushHistory(snap.at_ms, rates);
  }
  previous = { at: snap.at_ms, stats: s };

  $("f-connections").textContent = fmtInt(s.connections);
  $("f-submit-rate").textContent = fmtRate(rates.submits);
  $("f-submits").textContent = fmtInt(s.submits) + " in all";
  $("f-hit-rate").textContent = pct(s.cache_hits, s.submits);
  $("f-hits").textContent = fmtInt(s.cache_hits) + " hits";
  $("f-eval-rate").textContent = fmtRate(rates.evals);
  $("f-evaluations").textContent = fmtInt(s.evaluations) + " in all";
  $("f-saved").textContent = pct(s.coalesced + s.cache_hits, s.submits);
  $("f-coalesced").textContent = fmtInt(s.coalesced) + " coalesced";
  $("f-failures").textContent = fmtInt(s.failures);
  $("f-timeouts").textContent = fmtInt(s.timeouts || 0) + " timeouts";
  $("f-queued").textContent = fmtInt(s.queued);
  $("f-running").textContent = fmtInt(s.running) + " running";
  $("f-cache").textContent = fmtBytes(s.cache_bytes);
  $("f-cache-entries").textContent = fmtInt(s.cache_entries) + " entries of " + fmtBytes(s.cache_max_bytes || 0);
  $("f-cache-fill").style.width = s.cache_max_bytes ? (100 * s.cache_bytes / s.cache_max_bytes).toFixed(2) + "%" : "0";

  // Cluster mode only: Redis's health, the completion channel's, takeovers.
  $("f-cluster-box").hidden = !s.cluster;
  if (s.cluster) {
    $("f-cluster").textContent = s.cluster;
    $("f-cluster").dataset.state = s.cluster;
    $("f-cluster-pubsub").textContent = "pub/sub " + s.cluster_pubsub + " · " + fmtInt(s.takeovers || 0) + " takeovers";
    // Every broker's counters summed, from Redis.
    const t = s.cluster_totals;
    $("f-cluster-totals").textContent = t
      ? fmtInt(t.brokers) + (t.brokers === 1 ? " broker: " : " brokers: ") + fmtInt(t.submits) + " submits, " + fmtInt(t.evaluations) + " evaluations"
      : "";
    $("f-cluster-pubsub").dataset.state = s.cluster_pubsub;
  }

  renderCluster(s.cluster_brokers);
  renderWorkers(snap.workers || [], snap.queues || []);
  renderInflight(snap.inflight);
  renderRecent(snap.recent);
  drawChart();
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function keyCell(tr, key) {
  const full = expanded.has(key);
  const td = cell(tr, full ? key : key.slice(0, 12) + "…", "key" + (full ? " full" : ""));
  td.title = key;
  td.onclick = () => {
    if (expanded.has(key)) expanded.delete(key); else expanded.add(key);
    td.textContent = expanded.has(key) ? key : key.slice(0, 12) + "…";
    td.classList.toggle("full");
  };
}

// Replaces a table's rows in one DOM operation; `fill(tr, row)` makes the cells.
function renderRows(tableId, rows, fill) {
  const fresh = document.createDocumentFragment();
  for (const r of rows) {
    const tr = document.createElement("tr");
    tr.dataset.key = r.key;
    keyCell(tr, r.key);
    // A row of a namespace other than the shared one names it: "ns / fn".
    const fn = cell(tr, r.ns ? r.ns + " / " + r.fn : r.fn);
    if (r.ns) fn.title = "namespace " + r.ns;
    fill(tr, r);
    fresh.appendChild(tr);
  }
  document.querySelector("#" + tableId + " tbody").replaceChildren(fresh);
  $(tableId + "-empty").hidden = rows.length > 0;
}

function renderInflight(rows) {
  renderRows("inflight", rows, (tr, r) => {
    const state = cell(tr, r.broker ? r.state + " on " + r.broker : r.state, "state-" + r.state);
    if (r.worker) state.title = "worker " + r.worker;
    cell(tr, fmtInt(r.waiters), "num waiters");
    const age = cell(tr, fmtMs(r.age_ms), "num age");
    age.dataset.age = r.age_ms;
    // The latest report, as its evaluator wrote it.
    const report = r.progress ? JSON.stringify(r.progress.data) : "";
    const progress = cell(tr, report.length > 60 ? report.slice(0, 59) + "…" : report, "progress");
    if (r.progress) progress.title = "report " + r.progress.seq + ": " + report;
    if (r.priority !== undefined && r.priority !== 5) state.title = (state.title ? state.title + ", " : "") + "priority " + r.priority;
    const preview = cell(tr, r.input_preview, "preview");
    preview.title = r.input_preview;
  });
  $("inflight-count").textContent = rows.length ? "(" + rows.length + ")" : "";
}

// Remote fns only: each one's queue, and the worker sessions serving.
function renderWorkers(workers, queues) {
  $("workers-box").hidden = queues.length === 0;
  const qs = document.createDocumentFragment();
  for (const q of queues) {
    const tr = document.createElement("tr");
    tr.dataset.fn = q.fn;
    cell(tr, q.fn);
    cell(tr, fmtInt(q.queued), "num");
    cell(tr, fmtInt(q.workers), "num");
    cell(tr, q.workers ? "ok" : "no_workers", q.workers ? "ok" : "failed health");
    qs.appendChild(tr);
  }
  document.querySelector("#queues tbody").replaceChildren(qs);
  const ws = document.createDocumentFragment();
  for (const w of workers) {
    const tr = document.createElement("tr");
    tr.dataset.worker = w.name;
    cell(tr, w.name, "worker");
    cell(tr, w.fns.join(", "));
    cell(tr, fmtInt(w.concurrency), "num concurrency");
    cell(tr, fmtInt(w.in_flight), "num");
    cell(tr, fmtInt(w.done), "num");
    cell(tr, fmtInt(w.revoked), "num");
    cell(tr, new Date(w.since_ms).toLocaleString());
    ws.appendChild(tr);
  }
  document.querySelector("#workers tbody").replaceChildren(ws);
  $("workers-empty").hidden = workers.length > 0;
  $("workers-count").textContent = workers.length ? "(" + workers.length + ")" : "";
}

// Cluster mode only: every live broker, as each last published itself.
function renderCluster(brokers) {
  $("cluster-box").hidden = !brokers;
  if (!brokers) return;
  const fresh = document.createDocumentFragment();
  for (const b of brokers) {
    const tr = document.createElement("tr");
    tr.dataset.node = b.node;
    cell(tr, b.node, "node");
    cell(tr, new Date(b.up_since_ms).toLocaleString());
    cell(tr, b.pubsub ? "ok" : "down", b.pubsub ? "ok" : "failed");
    cell(tr, fmtInt(b.claims), "num");
    cell(tr, fmtInt(b.takeovers), "num");
    cell(tr, fmtInt(b.l2_hits), "num");
    cell(tr, fmtInt(b.submits), "num submits");
    cell(tr, fmtInt(b.evaluations), "num evaluations");
    fresh.appendChild(tr);
  }
  document.querySelector("#cluster tbody").replaceChildren(fresh);
  $("cluster-count").textContent = "(" + brokers.length + ")";
}

function renderRecent(rows) {
  renderRows("recent", rows, (tr, r) => {
    cell(tr, fmtMs(r.eval_ms), "num");
    cell(tr, fmtInt(r.shared), "num");
    cell(tr, r.ok ? "ok" : "failed", r.ok ? "ok" : "failed");
  });
}

function pushHistory(atMs, rates) {
  const t = Math.floor(atMs / 1000);
  const last = history[history.length - 1];
  if (last && last.t === t) {
    Object.assign(last, rates);
  } else {
    history.push({ t, ...rates });
  }
  while (history.length && history[0].t < t - HISTORY_S) history.shift();
}

function drawChart() {
  const W = 600, H = 160;
  const max = Math.max(1, ...history.map((p) => Math.max(p.submits, p.hits, p.evals)));
  const now = history.length ? history[history.length - 1].t : 0;
  const x = (t) => W - ((now - t) / HISTORY_S) * W;
  const y = (v) => H - (v / max) * (H - 6) - 3;
  for (const [series, cls] of [["submits", "s-submits"], ["hits", "s-hits"], ["evals", "s-evals"]]) {
    const points = history.map((p) => x(p.t).toFixed(1) + "," + y(p[series]).toFixed(1)).join(" ");
    document.querySelector("#chart polyline." + cls).setAttribute("points", points);
  }
  $("chart-max").textContent = "max " + fmtRate(max) + "/s";
  $("chart-span").textContent = "last " + HISTORY_S / 60 + " min";
}

// Ages tick between snapshots without touching anything else.
setInterval(() => {
  const since = performance.now() - received;
  for (const td of document.querySelectorAll("#inflight td.age")) {
    td.textContent = fmtMs(Number(td.dataset.age) + since);
  }
}, 100);

connect();
