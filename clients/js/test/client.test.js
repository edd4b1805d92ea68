import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import * as herd from "../src/index.js";
import { BASIC, startBroker } from "./broker.js";

const vectors = JSON.parse(readFileSync(new URL("../../../tests/vectors/keys.json", import.meta.url)));

test("keys match every shared vector a JavaScript value can represent", () => {
  const representable = vectors.filter((v) => !v.js);
  assert.ok(representable.length >= 10 && representable.length < vectors.length);
  for (const v of representable) {
    assert.equal(herd.canonicalJson(v.input), v.canonical, JSON.stringify(v.input));
    assert.equal(herd.key(v.input, v.fn), v.key);
  }
});

test("a request is sent with its id first and its input last", () => {
  const client = new herd.Client("ws://127.0.0.1:9/ws");
  const sent = [];
  client._send = (request) => sent.push(JSON.stringify(request));
  client._start({ op: "submit", input: { b: [1] }, fn: "f", wait: false }, "result", null);
  client._start({ op: "get", key: "k" }, "frame", null);
  assert.deepEqual(sent, [
    '{"id":1,"op":"submit","fn":"f","wait":false,"input":{"b":[1]}}',
    '{"id":2,"op":"get","key":"k"}',
  ]);
});

test("submit, coalescing, the cache, get and subscribe", async (t) => {
  const broker = await startBroker(t);
  const a = await herd.connect(broker.url);
  const b = await herd.connect(broker.url);
  t.after(() => (a.close(), b.close()));
  const input = { js: "coalesce", sleep_ms: 300 };
  const key = herd.key(input);
  const subscribed = b.subscribe(key);
  const [x, y] = await Promise.all([a.submit(input, { full: true }), b.submit(input, { full: true })]);
  assert.equal(x.key, key);
  assert.deepEqual(x.output, y.output);
  assert.equal(x.source, "eval");
  assert.equal(x.shared, 3, "both submits and the subscription got one evaluation");
  assert.deepEqual(await subscribed, x.output);
  const again = await a.submit(input, { full: true });
  assert.equal(again.source, "cache");
  assert.equal(typeof again.age_ms, "number");
  const status = await a.get(key);
  assert.equal(status.state, "done");
  assert.equal((await a.get("0".repeat(32))).state, "unknown");
  const accepted = await a.submit({ js: "nowait", sleep_ms: 50 }, { wait: false });
  assert.equal(accepted.first, true);
  assert.ok(await a.ping() > 0);
});

test("errors are typed", async (t) => {
  const broker = await startBroker(t, "[limits]\nmax_pending = 1\n" + BASIC);
  const c = await herd.connect(broker.url);
  t.after(() => c.close());
  await assert.rejects(c.submit({ fail: "boom", sleep_ms: 1 }), (e) => e instanceof herd.EvalError && e.code === "eval_failed" && e.brokerMessage === "boom");
  await assert.rejects(c.submit(1, { fn: "nope" }), (e) => e instanceof herd.Refused && e.code === "unknown_fn");
  const held = c.submit({ sleep_ms: 300, hold: 1 });
  while ((await c.get(herd.key({ sleep_ms: 300, hold: 1 }))).state === "unknown");
  await assert.rejects(c.submit({ over: 1 }), herd.Busy);
  await held;
  await assert.rejects(c.submit({ blob: "x".repeat(2 << 20) }), (e) => e instanceof herd.TooLarge && e.limit === 1048576);
  await assert.rejects(herd.connect(broker.url.replace("/ws", "/nope")), herd.HerdError);
});

test("a namespace's rate limit is a typed error with its retry time", async (t) => {
  const toml = '[[token]]\nname = "t"\nrole = "agent"\nsecret = "team"\nnamespace = "team"\n[[namespace]]\nname = "team"\nsubmits_per_s = 1\nburst = 1\n' + BASIC;
  const broker = await startBroker(t, toml);
  await assert.rejects(herd.connect(broker.url, { token: "wrong", reconnect: false }), (e) => e instanceof herd.Refused && e.code === "unauthorized");
  const c = await herd.connect(broker.url, { token: "team" });
  t.after(() => c.close());
  assert.equal(c.hello.namespace, "team");
  assert.equal(await c.submit(1, { fn: "echo" }), 1);
  await assert.rejects(c.submit(2, { fn: "echo" }), (e) => e instanceof herd.RateLimited && e.retryAfterMs > 0 && e.retryAfterMs <= 1000);
});

test("an AbortSignal ends one caller's wait and leaves the other's", async (t) => {
  const broker = await startBroker(t);
  const c = await herd.connect(broker.url);
  t.after(() => c.close());
  const input = { js: "abort", sleep_ms: 400 };
  const controller = new AbortController();
  const aborted = c.submit(input, { signal: controller.signal });
  const kept = c.submit(input, { full: true });
  while ((await c.get(herd.key(input))).waiters !== 2);
  controller.abort();
  await assert.rejects(aborted, herd.Cancelled);
  // The other call still gets the result (one session's waits on a key
  // are cancelled together on the broker, so the client cancels there
  // only when no other call waits on the key).
  const result = await kept;
  assert.equal(result.key, herd.key(input));
  assert.equal((await c.get(herd.key(input))).state, "done");
});

test("waiting calls are rejected when the connection is lost, and the client reconnects", async (t) => {
  const first = await startBroker(t);
  const c = await herd.connect(first.url, { backoffMs: 50 });
  t.after(() => c.close());
  const waiting = c.submit({ js: "lost", sleep_ms: 4000 });
  while ((await c.get(herd.key({ js: "lost", sleep_ms: 4000 }))).state === "unknown");
  first.kill();
  await assert.rejects(waiting, (e) => e instanceof herd.Closed && /lost/.test(e.message));
  await first.exited;
  const second = await startBroker(t, BASIC, first.addr);
  assert.equal(second.addr, first.addr);
  let answer;
  for (;;) {
    try {
      answer = await c.submit(7, { fn: "echo" });
      break;
    } catch (e) {
      assert.ok(e instanceof herd.Closed, String(e));
      await new Promise((r) => setTimeout(r, 20));
    }
  }
  assert.equal(answer, 7);
});

test("serve: a worker in Node runs tasks, sees their namespace, and a revoke aborts its signal", async (t) => {
  const broker = await startBroker(t);
  const worker = await herd.connect(broker.url);
  const agent = await herd.connect(broker.url);
  t.after(() => (worker.close(), agent.close()));
  let revoked;
  const revokedSeen = new Promise((r) => (revoked = r));
  await worker.serve(
    "embed",
    async (input, { signal, task, progress }) => {
      assert.equal(task.ns, "");
      if (input.steps) {
        for (let step = 1; step <= input.steps; step++) progress({ step });
        return "done";
      }
      if (input.hang) {
        await new Promise((r) => signal.addEventListener("abort", r, { once: true }));
        revoked(task.task);
        return null;
      }
      if (input.fail) throw new Error("no vector for that");
      return { vector: [input.text.length, 1] };
    },
    { concurrency: 2 },
  );
  assert.deepEqual(await agent.submit({ text: "hello" }, { fn: "embed" }), { vector: [5, 1] });
  // The handler's progress reports reach a streamed submit, in order.
  const streamed = [];
  for await (const item of agent.submitStream({ steps: 2 }, { fn: "embed" })) streamed.push(item);
  assert.deepEqual(streamed.map((i) => (i.type === "progress" ? [i.seq, i.data] : i.output)), [[1, { step: 1 }], [2, { step: 2 }], "done"]);
  await assert.rejects(agent.submit({ text: "x", fail: true }, { fn: "embed" }), (e) => e instanceof herd.EvalError && e.brokerMessage === "no vector for that");
  const controller = new AbortController();
  const hung = agent.submit({ hang: true }, { fn: "embed", signal: controller.signal });
  while ((await agent.get(herd.key({ hang: true }, "embed"))).state !== "running");
  controller.abort();
  await assert.rejects(hung, herd.Cancelled);
  assert.ok(await revokedSeen, "the handler's signal was aborted by the revoke");
});

test("a streamed submit yields progress then its result, and a deadline ends one wait", async (t) => {
  const broker = await startBroker(t);
  const c = await herd.connect(broker.url);
  t.after(() => c.close());
  const input = { js: "stream", sleep_ms: 300, progress: 3 };
  const items = [];
  for await (const item of c.submitStream(input)) items.push(item);
  assert.deepEqual(items.map((i) => i.type), ["progress", "progress", "progress", "result"]);
  assert.deepEqual(items.slice(0, 3).map((p) => [p.seq, p.data]), [1, 2, 3].map((n) => [n, { step: n, of: 3 }]));
  assert.equal(items[3].key, herd.key(input));
  assert.equal(items[3].source, "eval");
  const cached = [];
  for await (const item of c.submitStream(input)) cached.push(item);
  assert.deepEqual(cached.map((i) => [i.type, i.source]), [["result", "cache"]]);
  await assert.rejects(
    c.submit({ js: "late", sleep_ms: 1500 }, { priority: 9, deadlineMs: 50 }),
    (e) => e instanceof herd.DeadlineExceeded && e instanceof herd.EvalError && e.code === "deadline_exceeded",
  );
});
