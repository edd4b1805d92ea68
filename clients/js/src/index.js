// herd-client: a client and a worker for the herd result broker, for
// browsers and Node. One WebSocket session carries any number of calls at
// once; replies are matched by `id`. See README.md.

import { blake3 } from "@noble/hashes/blake3.js";

// ---------------------------------------------------------------- errors

/** Every error this package raises. */
export class HerdError extends Error {
  constructor(message) {
    super(message);
    this.name = new.target.name;
  }
}

/** The broker refused a request; `code` says why (`bad_request`, `unknown_fn`, `forbidden`, ...). */
export class Refused extends HerdError {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.code = code;
    this.brokerMessage = message;
  }
}

/** A limit was reached (`busy`); trying again later may succeed. */
export class Busy extends Refused {}

/** The namespace's `submits_per_s` was reached; try after `retryAfterMs`. */
export class RateLimited extends Refused {
  constructor(code, message, retryAfterMs) {
    super(code, message);
    this.retryAfterMs = retryAfterMs;
  }
}

/** The broker is draining (`shutting_down`). */
export class ShuttingDown extends Refused {}

/** The evaluation ran and failed (`eval_failed`) or timed out (`eval_timeout`). */
export class EvalError extends HerdError {
  constructor(code, message, key) {
    super(`evaluation of ${key} failed (${code}): ${message}`);
    this.code = code;
    this.brokerMessage = message;
    this.key = key;
  }
}

/** This request's own `deadline_ms` passed first (`deadline_exceeded`); the evaluation goes on for its other waiters. */
export class DeadlineExceeded extends EvalError {}

/** The connection was lost or closed before the answer came. */
export class Closed extends HerdError {
  constructor(message, code) {
    super(message);
    this.code = code;
  }
}

/** The caller's AbortSignal ended its wait. */
export class Cancelled extends HerdError {}

/** The request is larger than the broker's `max_frame_bytes` (from `hello`); not sent. */
export class TooLarge extends HerdError {
  constructor(size, limit) {
    super(`the request is ${size} bytes; the broker takes frames of at most ${limit} bytes (max_frame_bytes)`);
    this.size = size;
    this.limit = limit;
  }
}

function errorOf(frame) {
  const code = frame.code ?? "";
  const message = frame.message ?? "";
  if (code === "busy") return new Busy(code, message);
  if (code === "rate_limited") return new RateLimited(code, message, frame.retry_after_ms ?? 0);
  if (code === "shutting_down") return new ShuttingDown(code, message);
  return new Refused(code, message);
}

// ---------------------------------------------------------------- keys

/**
 * A number as serde_json writes it: integers within 2^53 as integers; any
 * other number as a float, with the shortest digits that read back the
 * same, in decimal notation while the leading digit's exponent is -5 to 15
 * (`0.00001`, `1e+16` otherwise).
 */
function writeNumber(x) {
  if (!Number.isFinite(x)) throw new HerdError("JSON has no NaN or infinity");
  if (Number.isSafeInteger(x) && !Object.is(x, -0)) return String(x);
  if (x === 0) return Object.is(x, -0) ? "-0.0" : "0.0";
  const sign = x < 0 ? "-" : "";
  const [mantissa, exp] = Math.abs(x).toExponential().split("e");
  const digits = mantissa.replace(".", "");
  const kk = Number(exp) + 1; // the value is 0.DIGITS * 10**kk
  let body;
  if (kk >= -4 && kk <= 16) {
    if (digits.length <= kk) body = digits + "0".repeat(kk - digits.length) + ".0";
    else if (kk > 0) body = digits.slice(0, kk) + "." + digits.slice(kk);
    else body = "0." + "0".repeat(-kk) + digits;
  } else {
    const e = kk - 1;
    const m = digits.length === 1 ? digits : digits[0] + "." + digits.slice(1);
    body = `${m}e${e >= 0 ? "+" : "-"}${Math.abs(e)}`;
  }
  return sign + body;
}

const encoder = new TextEncoder();

function compareUtf8(a, b) {
  const x = encoder.encode(a);
  const y = encoder.encode(b);
  const n = Math.min(x.length, y.length);
  for (let i = 0; i < n; i++) if (x[i] !== y[i]) return x[i] - y[i];
  return x.length - y.length;
}

function writeCanonical(value, out) {
  if (value === null) out.push("null");
  else if (value === true) out.push("true");
  else if (value === false) out.push("false");
  else if (typeof value === "number") out.push(writeNumber(value));
  else if (typeof value === "bigint") out.push(value.toString());
  else if (typeof value === "string") out.push(JSON.stringify(value));
  else if (Array.isArray(value)) {
    out.push("[");
    value.forEach((item, i) => {
      if (i > 0) out.push(",");
      writeCanonical(item, out);
    });
    out.push("]");
  } else if (typeof value === "object") {
    const names = Object.keys(value).filter((k) => value[k] !== undefined).sort(compareUtf8);
    out.push("{");
    names.forEach((name, i) => {
      if (i > 0) out.push(",");
      out.push(JSON.stringify(name), ":");
      writeCanonical(value[name], out);
    });
    out.push("}");
  } else {
    throw new HerdError(`a ${typeof value} is not JSON`);
  }
}

/**
 * Canonical JSON, as the broker writes it: no whitespace, object members
 * sorted by their UTF-8 bytes, numbers as serde_json writes them.
 */
export function canonicalJson(value) {
  const out = [];
  writeCanonical(value, out);
  return out.join("");
}

/**
 * The key the broker derives for `input` under `fn`: lowercase hex of the
 * first 16 bytes of BLAKE3(fn, 0x00, canonical JSON of input). A JavaScript
 * number cannot say that it was written `1.0` rather than `1`, nor hold an
 * integer past 2^53 exactly: for such inputs use the key the broker sends
 * (`accepted`, `result`).
 */
export function key(input, fn = "default") {
  const fnBytes = encoder.encode(fn);
  const body = encoder.encode(canonicalJson(input));
  const message = new Uint8Array(fnBytes.length + 1 + body.length);
  message.set(fnBytes, 0);
  message.set(body, fnBytes.length + 1);
  const digest = blake3(message, { dkLen: 16 });
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

// ---------------------------------------------------------------- transport

async function webSocketClass() {
  if (typeof globalThis.WebSocket === "function") return globalThis.WebSocket;
  const ws = await import("ws");
  return ws.WebSocket ?? ws.default;
}

function withToken(url, token, inBrowser) {
  if (!token || !inBrowser) return url;
  const u = new URL(url);
  u.searchParams.set("token", token);
  return u.toString();
}

/** Opens one socket; resolves with it and its `hello` frame. */
async function openSocket(url, token) {
  const WS = await webSocketClass();
  const browser = WS === globalThis.WebSocket && typeof window !== "undefined";
  // Browsers cannot set headers: the token rides in the URL.
  const socket = browser
    ? new WS(withToken(url, token, true))
    : new WS(url, token ? { headers: { Authorization: `Bearer ${token}` } } : undefined);
  return await new Promise((resolve, reject) => {
    let settled = false;
    const fail = (error) => {
      if (settled) return;
      settled = true;
      try {
        socket.close();
      } catch {}
      reject(error);
    };
    socket.onmessage = (event) => {
      if (settled) return;
      let hello;
      try {
        hello = JSON.parse(event.data);
      } catch {
        return fail(new HerdError("the broker's first frame is not JSON"));
      }
      if (hello.type !== "hello") return fail(new HerdError(`expected hello, got ${hello.type}`));
      settled = true;
      resolve({ socket, hello });
    };
    socket.onerror = (event) => {
      const status = event?.message?.match(/Unexpected server response: (\d+)/)?.[1];
      if (status === "401" || status === "403" || status === "429") {
        fail(new Refused(status === "429" ? "busy" : "unauthorized", `the broker refused the connection (HTTP ${status})`));
      } else {
        fail(new Closed(`cannot connect to ${url}`));
      }
    };
    socket.onclose = (event) => fail(new Closed(`cannot connect to ${url}`, event.code));
  });
}

// ---------------------------------------------------------------- client

/**
 * Connects to a broker (`ws://host:7878/ws`) and resolves once its `hello`
 * came. Options: `token`; `reconnect` (default true): a lost connection is
 * opened again with backoff and jitter for later calls (calls waiting when
 * it was lost are rejected with `Closed`); `backoffMs` (100) and
 * `maxBackoffMs` (5000).
 */
function submitRequest(input, options) {
  const request = { op: "submit", input };
  if (options.fn !== undefined && options.fn !== "default") request.fn = options.fn;
  if (options.maxAgeMs !== undefined) request.max_age_ms = options.maxAgeMs;
  if (options.priority !== undefined) request.priority = options.priority;
  if (options.deadlineMs !== undefined) request.deadline_ms = options.deadlineMs;
  return request;
}

/**
 * `request` with `id` first and its `input` (if any) last: a broker that
 * has read that input before does not read the frame past its start.
 */
function withId(request, id) {
  const { input, ...members } = request;
  return "input" in request ? { id, ...members, input } : { id, ...members };
}

export async function connect(url, options = {}) {
  const client = new Client(url, options);
  await client._open();
  return client;
}

export class Client {
  constructor(url, options = {}) {
    this.url = url;
    this.token = options.token;
    this.reconnect = options.reconnect ?? true;
    this.backoffMs = options.backoffMs ?? 100;
    this.maxBackoffMs = options.maxBackoffMs ?? 5000;
    this.hello = null;
    this._socket = null;
    this._nextId = 1;
    this._pending = new Map(); // id -> {resolve, reject, kind, key}
    this._serving = new Map(); // fn -> {handler, concurrency}
    this._tasks = new Map(); // task -> AbortController
    this._closed = false;
    this._opening = null;
  }

  async _open() {
    const { socket, hello } = await openSocket(this.url, this.token);
    this._socket = socket;
    this.hello = hello;
    socket.onmessage = (event) => this._frame(event.data);
    socket.onclose = (event) => this._lost(event.code, event.reason);
    socket.onerror = () => {};
    for (const [fn, s] of this._serving) this._send({ op: "serve", fn, concurrency: s.concurrency });
  }

  _lost(code, reason) {
    this._socket = null;
    const detail = code ? ` (code ${code}${reason ? `: ${reason}` : ""})` : "";
    const error = new Closed(`the connection to the broker was lost${detail}`, code);
    for (const [, p] of this._pending) p.reject(error);
    this._pending.clear();
    for (const [, controller] of this._tasks) controller.abort(error);
    this._tasks.clear();
    // A policy close (1008: token expired) is not retried.
    if (this._closed || !this.reconnect || code === 1008) return;
    this._opening = this._reopen();
  }

  async _reopen() {
    let delay = this.backoffMs;
    while (!this._closed) {
      await new Promise((r) => setTimeout(r, delay * (0.5 + Math.random())));
      if (this._closed) return;
      try {
        await this._open();
        return;
      } catch {
        delay = Math.min(delay * 2, this.maxBackoffMs);
      }
    }
  }

  /** Waits until the connection is open again (after a loss). */
  async _ready() {
    if (this._socket) return;
    if (this._closed) throw new Closed("the client was closed");
    if (this._opening) await this._opening;
    if (!this._socket) throw new Closed("the connection to the broker was lost");
  }

  _send(request) {
    const text = JSON.stringify(request);
    const limit = this.hello?.limits?.max_frame_bytes;
    // A UTF-16 unit is at most 3 bytes of UTF-8: count only when it may matter.
    if (limit && text.length * 3 > limit) {
      const size = encoder.encode(text).length;
      if (size > limit) throw new TooLarge(size, limit);
    }
    this._socket.send(text);
  }

  /**
   * Sends `request` with a fresh id (the connection is open); the promise
   * settles with its answer: the output, the whole frame, or what
   * `accepted` said, as `kind` asks.
   */
  _start(request, kind, keyOf) {
    const id = this._nextId++;
    const framed = withId(request, id);
    const promise = new Promise((resolve, reject) => {
      this._pending.set(id, { resolve, reject, kind, key: keyOf });
      try {
        this._send(framed);
      } catch (error) {
        this._pending.delete(id);
        reject(error);
      }
    });
    return { id, promise };
  }

  async _call(request, kind, keyOf) {
    await this._ready();
    return await this._start(request, kind, keyOf).promise;
  }

  _frame(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    if (frame.type === "task") return this._task(frame);
    if (frame.type === "revoke") {
      this._tasks.get(frame.task)?.abort(new Cancelled("the broker revoked the task"));
      this._tasks.delete(frame.task);
      return;
    }
    const p = this._pending.get(frame.id);
    if (!p) return;
    if (frame.type === "progress") return p.onProgress?.(frame);
    if (frame.type === "accepted" || frame.type === "subscribed") {
      p.key = frame.key;
      if (p.kind === "nowait") {
        this._pending.delete(frame.id);
        p.resolve({ key: frame.key, state: frame.state, first: frame.first, waiters: frame.waiters });
      }
      return;
    }
    this._pending.delete(frame.id);
    if (frame.type === "error") return p.reject(errorOf(frame));
    if (frame.type === "result") {
      if (frame.error) {
        const Kind = frame.error.code === "deadline_exceeded" ? DeadlineExceeded : EvalError;
        return p.reject(new Kind(frame.error.code, frame.error.message, frame.key));
      }
      return p.resolve(p.kind === "result" ? frame : frame.output);
    }
    p.resolve(frame);
  }

  /** Ends a waiting call on abort: cancels on the broker unless another call waits on the key. */
  _abortable(promise, id, signal) {
    if (!signal) return promise;
    if (signal.aborted) return Promise.reject(new Cancelled("aborted"));
    return new Promise((resolve, reject) => {
      const onAbort = () => {
        const p = this._pending.get(id);
        this._pending.delete(id);
        if (p?.key && ![...this._pending.values()].some((o) => o.key === p.key) && this._socket) {
          this._send({ op: "cancel", key: p.key, id: this._nextId++ });
        }
        reject(new Cancelled("aborted"));
      };
      signal.addEventListener("abort", onAbort, { once: true });
      promise.then(
        (v) => {
          signal.removeEventListener("abort", onAbort);
          resolve(v);
        },
        (e) => {
          signal.removeEventListener("abort", onAbort);
          reject(e);
        },
      );
    });
  }

  /**
   * Evaluates `input` with fn `fn` (default "default"), at most once per key
   * across every client; resolves with the output. Options: `wait: false`
   * resolves with what `accepted` said instead; `signal` (an AbortSignal)
   * ends this call's wait only; `maxAgeMs`: a cached result older than this
   * is not good enough; `full: true` resolves with the whole `result` frame;
   * `priority` (0-9, default 5) orders the queued job by the highest among
   * its submits; `deadlineMs` rejects this call alone with
   * `DeadlineExceeded` once it passes (at most the fn's `timeout_ms`).
   */
  submit(input, options = {}) {
    const request = submitRequest(input, options);
    if (options.wait === false) request.wait = false;
    const kind = options.wait === false ? "nowait" : options.full ? "result" : "output";
    const start = () => {
      const { id, promise } = this._start(request, kind, null);
      return this._abortable(promise, id, options.signal);
    };
    // The common case, an open connection, adds no await of its own.
    return this._socket ? start() : this._ready().then(start);
  }

  /**
   * Submits and yields the evaluation's progress reports as they come
   * (first those made before this submit joined it), each
   * `{type: "progress", key, seq, data}`, then its `{type: "result", key,
   * output, source, ...}`, last; a cached result comes alone. Throws
   * `EvalError` (or `DeadlineExceeded`) instead of the result. Options as
   * `submit`'s (`fn`, `priority`, `deadlineMs`, `maxAgeMs`).
   *
   *     for await (const p of client.submitStream(x)) console.log(p);
   */
  async *submitStream(input, options = {}) {
    await this._ready();
    const request = submitRequest(input, options);
    request.progress = true;
    const items = [];
    let wake = null;
    const push = (item) => {
      items.push(item);
      if (wake) wake();
    };
    const { id, promise } = this._start(request, "result", null);
    const pending = this._pending.get(id);
    if (pending) pending.onProgress = (frame) => push({ frame });
    promise.then((frame) => push({ frame, last: true }), (error) => push({ error }));
    try {
      for (;;) {
        while (items.length === 0) await new Promise((resolve) => (wake = resolve));
        wake = null;
        const item = items.shift();
        if (item.error) throw item.error;
        const { id: _, ...frame } = item.frame;
        yield frame;
        if (item.last) return;
      }
    } finally {
      this._pending.delete(id);
    }
  }

  /** Waits for `key`'s result, whoever submits it; resolves with the output. */
  subscribe(key, options = {}) {
    const start = () => {
      const { id, promise } = this._start({ op: "subscribe", key }, "output", key);
      return this._abortable(promise, id, options.signal);
    };
    return this._socket ? start() : this._ready().then(start);
  }

  /** A key's state without waiting: `{state, output?, waiters?, age_ms?}`. */
  async get(key) {
    const frame = await this._call({ op: "get", key }, "frame", null);
    const { type, id, ...status } = frame;
    return status;
  }

  /** Stops this session's waits on `key`. */
  async cancel(key) {
    await this._call({ op: "cancel", key }, "frame", null);
  }

  /** Drops a key's result (`{key}`) or every result of a fn (`{fn}`): an admin's op. */
  async invalidate(target) {
    await this._call({ op: "invalidate", ...target }, "frame", null);
  }

  /** The broker's clock (ms). */
  async ping() {
    return (await this._call({ op: "ping" }, "frame", null)).server_time_ms;
  }

  /** The key of `input` under `fn` (see the module function `key`). */
  key(input, fn = "default") {
    return key(input, fn);
  }

  /**
   * Serves remote fn `fn` (Node or browser): `handler(input, {signal, task})`
   * returns the output or a Promise of it; a thrown error fails the task
   * with its message. `signal` is aborted when the broker revokes the task.
   * At most `concurrency` (default 1) tasks run at once.
   */
  async serve(fn, handler, options = {}) {
    const concurrency = options.concurrency ?? 1;
    this._serving.set(fn, { handler, concurrency });
    const answer = await this._call({ op: "serve", fn, concurrency }, "frame", null);
    return answer;
  }

  /** Takes no new tasks of `fn`. */
  async unserve(fn) {
    this._serving.delete(fn);
    await this._call({ op: "unserve", fn }, "frame", null);
  }

  async _task(frame) {
    const serving = this._serving.get(frame.fn);
    if (!serving) return;
    const controller = new AbortController();
    this._tasks.set(frame.task, controller);
    let complete;
    try {
      // A report for the waiters that asked for progress (any JSON value).
      const progress = (data) => {
        if (this._socket && !controller.signal.aborted) this._send({ op: "progress", task: frame.task, data });
      };
      const output = await serving.handler(frame.input, { signal: controller.signal, task: frame, progress });
      complete = { op: "complete", task: frame.task, output: output === undefined ? null : output };
    } catch (error) {
      complete = { op: "complete", task: frame.task, error: String(error?.message ?? error) };
    }
    if (!this._tasks.has(frame.task)) return; // revoked, or the connection was lost
    this._tasks.delete(frame.task);
    // A `stale_task` answer (the task was taken back meanwhile) has no id
    // waiting for it and is dropped.
    if (this._socket) this._send(complete);
  }

  /** Closes the connection (code 1000); waiting calls are rejected with `Closed`. */
  close() {
    this._closed = true;
    const socket = this._socket;
    this._socket = null;
    for (const [, p] of this._pending) p.reject(new Closed("the client was closed"));
    this._pending.clear();
    if (socket) socket.close(1000);
  }
}
