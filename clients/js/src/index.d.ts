/** Every error this package raises. */
export class HerdError extends Error {}
/** The broker refused a request; `code` says why. */
export class Refused extends HerdError {
  code: string;
  brokerMessage: string;
}
/** A limit was reached (`busy`). */
export class Busy extends Refused {}
/** The namespace's `submits_per_s` was reached; try after `retryAfterMs`. */
export class RateLimited extends Refused {
  retryAfterMs: number;
}
/** The broker is draining (`shutting_down`). */
export class ShuttingDown extends Refused {}
/** The evaluation failed (`eval_failed`) or timed out (`eval_timeout`). */
export class EvalError extends HerdError {
  code: "eval_failed" | "eval_timeout" | string;
  brokerMessage: string;
  key: string;
}
/** This request's own `deadline_ms` passed first; the evaluation goes on for its other waiters. */
export class DeadlineExceeded extends EvalError {}
/** The connection was lost or closed before the answer came. */
export class Closed extends HerdError {
  code?: number;
}
/** The caller's AbortSignal ended its wait. */
export class Cancelled extends HerdError {}
/** The request is larger than the broker's `max_frame_bytes`; not sent. */
export class TooLarge extends HerdError {
  size: number;
  limit: number;
}

export type Json = null | boolean | number | string | Json[] | { [name: string]: Json };

/** Canonical JSON, as the broker writes it. */
export function canonicalJson(value: Json): string;
/**
 * The key the broker derives for `input` under `fn`. Inputs with integers
 * past 2^53, or floats written with a zero fraction (`1.0`), cannot be
 * represented by JavaScript numbers: use the broker's key for them.
 */
export function key(input: Json, fn?: string): string;

export interface ConnectOptions {
  token?: string;
  /** Reopen a lost connection, with backoff and jitter (default true). */
  reconnect?: boolean;
  backoffMs?: number;
  maxBackoffMs?: number;
}

export interface SubmitOptions {
  fn?: string;
  /** false: resolve with what `accepted` said; the work still runs. */
  wait?: boolean;
  /** Ends this call's wait only. */
  signal?: AbortSignal;
  /** A cached result older than this is not good enough. */
  maxAgeMs?: number;
  /** Resolve with the whole `result` frame rather than the output. */
  full?: boolean;
  /** 0-9 (default 5): the queued job starts by the highest among its submits. */
  priority?: number;
  /** This call alone rejects with `DeadlineExceeded` after this long. */
  deadlineMs?: number;
}

/** A progress report of the evaluation a streamed submit waits on. */
export interface ProgressFrame {
  type: "progress";
  key: string;
  seq: number;
  data: Json;
}

/** The `result` frame a streamed submit ends with. */
export interface ResultFrame {
  type: "result";
  key: string;
  output: Json;
  source: "eval" | "cache" | "cluster";
  eval_ms?: number;
  shared?: number;
  age_ms?: number;
}

export interface Accepted {
  key: string;
  state: "queued" | "running";
  first: boolean;
  waiters: number;
}

export interface Status {
  key: string;
  state: "done" | "queued" | "running" | "unknown";
  output?: Json;
  waiters?: number;
  age_ms?: number;
}

export interface Task {
  task: string;
  key: string;
  ns: string;
  fn: string;
  input: Json;
  deadline_ms: number;
  attempt?: number;
}

export type Handler = (
  input: Json,
  context: { signal: AbortSignal; task: Task; progress: (data: Json) => void },
) => Json | Promise<Json>;

export class Client {
  /** The broker's `hello` frame. */
  hello: { session: string; role: string; namespace: string; limits: { max_frame_bytes: number; max_pending: number } };
  submit(input: Json, options: SubmitOptions & { wait: false }): Promise<Accepted>;
  submit(input: Json, options?: SubmitOptions): Promise<Json>;
  submitStream(input: Json, options?: Omit<SubmitOptions, "wait" | "full" | "signal">): AsyncGenerator<ProgressFrame | ResultFrame>;
  subscribe(key: string, options?: { signal?: AbortSignal }): Promise<Json>;
  get(key: string): Promise<Status>;
  cancel(key: string): Promise<void>;
  invalidate(target: { key: string } | { fn: string }): Promise<void>;
  ping(): Promise<number>;
  key(input: Json, fn?: string): string;
  serve(fn: string, handler: Handler, options?: { concurrency?: number }): Promise<unknown>;
  unserve(fn: string): Promise<void>;
  close(): void;
}

/** Connects to a broker (`ws://host:7878/ws`); resolves once its `hello` came. */
export function connect(url: string, options?: ConnectOptions): Promise<Client>;
