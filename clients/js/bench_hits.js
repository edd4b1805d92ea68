#!/usr/bin/env node
// Cache-hit submits per second from Node: the herd-client package beside the
// raw protocol over the same `ws` WebSocket, same broker, same requests,
// same number in flight.
//
//   node clients/js/bench_hits.js ws://127.0.0.1:7878/ws [seconds] [in_flight]
//
// Prints one JSON line per client and the ratio (package / raw).

import WebSocket from "ws";
import * as herd from "./src/index.js";

const [url = "ws://127.0.0.1:7878/ws", seconds = "4", depth = "64"] = process.argv.slice(2);
const SECONDS = Number(seconds);
const DEPTH = Number(depth);
const INPUTS = Array.from({ length: 100 }, (_, n) => ({ bench: "js-hits", n, sleep_ms: 0 }));

async function packageRate() {
  const c = await herd.connect(url);
  await Promise.all(INPUTS.map((x) => c.submit(x)));
  let done = 0;
  const start = performance.now();
  const until = start + SECONDS * 1000;
  async function loop(i) {
    while (performance.now() < until) {
      await c.submit(INPUTS[(i + done) % INPUTS.length]);
      done += 1;
    }
  }
  await Promise.all(Array.from({ length: DEPTH }, (_, i) => loop(i)));
  const rate = done / ((performance.now() - start) / 1000);
  c.close();
  return rate;
}

async function rawRate() {
  const ws = new WebSocket(url);
  const waiting = new Map();
  let nextId = 1;
  await new Promise((resolve) => ws.once("message", resolve)); // hello
  ws.on("message", (data) => {
    const frame = JSON.parse(data);
    if (frame.type === "result") {
      waiting.get(frame.id)?.(frame.output);
      waiting.delete(frame.id);
    }
  });
  const submit = (input) =>
    new Promise((resolve) => {
      const id = nextId++;
      waiting.set(id, resolve);
      ws.send(JSON.stringify({ op: "submit", id, input }));
    });
  await Promise.all(INPUTS.map(submit));
  let done = 0;
  const start = performance.now();
  const until = start + SECONDS * 1000;
  async function loop(i) {
    while (performance.now() < until) {
      await submit(INPUTS[(i + done) % INPUTS.length]);
      done += 1;
    }
  }
  await Promise.all(Array.from({ length: DEPTH }, (_, i) => loop(i)));
  const rate = done / ((performance.now() - start) / 1000);
  ws.close();
  return rate;
}

const raw = await rawRate();
console.log(JSON.stringify({ client: "raw ws", submits_per_s: Math.round(raw) }));
const pkg = await packageRate();
console.log(JSON.stringify({ client: "herd-client", submits_per_s: Math.round(pkg) }));
console.log(JSON.stringify({ ratio: Math.round((pkg / raw) * 1000) / 1000 }));
