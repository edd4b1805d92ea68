//! The hub: the singular update queue that owns the wait table.
//!
//! One task owns `key → {waiters, job}` and is its only reader and writer;
//! sessions, evaluator threads and timers reach it through one bounded
//! channel, and it applies their messages one at a time, in order. Nobody
//! locks the wait table and nobody waits on the hub for more than a queue
//! slot: replies go straight into the sessions' outboxes.
//!
//! Invariants kept here:
//! - a key has at most one job at a time, so identical requests share it;
//! - before starting a job the hub checks the cache again (a result may
//!   have landed between a session's miss and its message arriving);
//! - on completion the result enters the cache *before* the entry leaves
//!   the table, the shared part of the frame is encoded once, and the entry
//!   is removed as its result is handed out;
//! - a session's waits leave with it, and an entry nobody waits on is
//!   dropped unless its job is already running.

use crate::cache::ResultCache;
use crate::config::Config;
use crate::error::{ErrorCode, EvalError};
use crate::key::Key;
use crate::metrics::Metrics;
use crate::outbox::{Outbox, SessionId};
use crate::pool::{EvaluatorTable, Job, Pool};
use crate::protocol::{error_frame, result_frame, unix_ms, FrameWriter, ReqId, DRAINING_MESSAGE};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::time::{delay_queue, DelayQueue};

/// Messages the hub applies one at a time.
pub enum HubMsg {
    /// A cache miss: evaluate `input` under `evaluator`, or join the evaluation under way.
    Submit {
        waiter: Waiter,
        evaluator: usize,
        input: Arc<str>,
        wait: bool,
    },
    /// Wait for a key whoever submits it.
    Subscribe { waiter: Waiter },
    /// Report a key's state.
    Get { key: Key, id: ReqId, outbox: Outbox },
    /// Stop this session's waits on a key.
    Cancel { key: Key, id: ReqId, outbox: Outbox },
    /// Push one `snapshot` frame.
    Snapshot { id: ReqId, outbox: Outbox },
    /// The session is gone; drop its waits.
    SessionClosed { session: SessionId },
    /// An evaluator thread took a job.
    Started {
        evaluator: usize,
        key: Key,
        gen: u64,
    },
    /// An evaluator thread finished a job.
    Done {
        evaluator: usize,
        key: Key,
        gen: u64,
        outcome: Result<String, EvalError>,
        eval_ms: f64,
    },
}

/// One request waiting for a key's result.
pub struct Waiter {
    pub key: Key,
    pub id: ReqId,
    pub outbox: Outbox,
    /// When a submit arrived (for the latency histogram); None for subscriptions.
    pub since: Option<Instant>,
}

struct JobState {
    evaluator: usize,
    gen: u64,
    cancelled: Arc<AtomicBool>,
    preview: Box<str>,
    queued_at: Instant,
    running_since: Option<Instant>,
    timer: Option<delay_queue::Key>,
    /// A `wait: false` submit asked for this evaluation: it runs even when
    /// every waiter cancels.
    wanted: bool,
}

#[derive(Default)]
struct Entry {
    waiters: Vec<Waiter>,
    job: Option<JobState>,
}

#[derive(Default)]
struct SessionWaits {
    total: usize,
    by_key: HashMap<Key, u32>,
}

#[derive(Serialize)]
struct Recent {
    key: String,
    #[serde(rename = "fn")]
    fn_name: Arc<str>,
    eval_ms: f64,
    shared: usize,
    ok: bool,
}

#[derive(Serialize)]
struct Inflight<'a> {
    key: String,
    #[serde(rename = "fn")]
    fn_name: &'a str,
    state: &'static str,
    waiters: usize,
    age_ms: u64,
    input_preview: &'a str,
}

/// The hub task's state.
pub struct Hub {
    table: HashMap<Key, Entry>,
    sessions: HashMap<SessionId, SessionWaits>,
    timers: DelayQueue<(Key, u64)>,
    recent: VecDeque<Recent>,
    next_gen: u64,
    jobs: usize,
    pool: Pool,
    evaluators: Arc<EvaluatorTable>,
    cache: Arc<ResultCache>,
    metrics: Arc<Metrics>,
    draining: Arc<AtomicBool>,
    idle: watch::Sender<usize>,
    max_pending: usize,
    snapshot_inflight: usize,
    snapshot_recent: usize,
    preview_chars: usize,
}

/// The message of a `busy` answer to a session at `limits.max_pending`.
const PENDING_FULL: &str = "too many pending waits on this session (limits.max_pending)";

/// Messages taken from the channel per wake-up.
const BATCH: usize = 256;

impl Hub {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &Config,
        pool: Pool,
        evaluators: Arc<EvaluatorTable>,
        cache: Arc<ResultCache>,
        metrics: Arc<Metrics>,
        draining: Arc<AtomicBool>,
        idle: watch::Sender<usize>,
    ) -> Self {
        Hub {
            table: HashMap::new(),
            sessions: HashMap::new(),
            timers: DelayQueue::new(),
            recent: VecDeque::new(),
            next_gen: 0,
            jobs: 0,
            pool,
            evaluators,
            cache,
            metrics,
            draining,
            idle,
            max_pending: config.limits.max_pending,
            snapshot_inflight: config.dashboard.snapshot_inflight,
            snapshot_recent: config.dashboard.snapshot_recent,
            preview_chars: config.dashboard.input_preview_chars,
        }
    }

    /// Applies messages until `stop` is cancelled or every sender is gone,
    /// then hands back the pool.
    pub async fn run(mut self, mut inbox: mpsc::Receiver<HubMsg>, stop: CancellationToken) -> Pool {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                n = inbox.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        break;
                    }
                    for msg in batch.drain(..) {
                        self.apply(msg);
                    }
                }
                Some(expired) = std::future::poll_fn(|cx| self.timers.poll_expired(cx)) => {
                    let (key, gen) = expired.into_inner();
                    self.on_timeout(key, gen);
                }
            }
            self.publish();
        }
        self.pool
    }

    fn apply(&mut self, msg: HubMsg) {
        match msg {
            HubMsg::Submit {
                waiter,
                evaluator,
                input,
                wait,
            } => self.submit(waiter, evaluator, input, wait),
            HubMsg::Subscribe { waiter } => self.subscribe(waiter),
            HubMsg::Get { key, id, outbox } => self.get(key, id, outbox),
            HubMsg::Cancel { key, id, outbox } => self.cancel(key, id, outbox),
            HubMsg::Snapshot { id, outbox } => outbox.push(self.snapshot(&id)),
            HubMsg::SessionClosed { session } => self.session_closed(session),
            HubMsg::Started {
                evaluator,
                key,
                gen,
            } => self.started(evaluator, key, gen),
            HubMsg::Done {
                evaluator,
                key,
                gen,
                outcome,
                eval_ms,
            } => self.done(evaluator, key, gen, outcome, eval_ms),
        }
    }

    fn publish(&self) {
        self.idle.send_if_modified(|n| {
            let changed = *n != self.jobs;
            *n = self.jobs;
            changed
        });
        self.metrics.wait_table.set(self.table.len() as i64);
    }

    /// Answers from the cache if the key landed there meanwhile.
    fn answered_from_cache(&self, waiter: &Waiter) -> bool {
        match self.cache.get(&waiter.key) {
            Some(cached) => {
                waiter
                    .outbox
                    .push(cached.result_frame(&waiter.id, &waiter.key));
                true
            }
            None => false,
        }
    }

    fn reject(waiter: &Waiter, code: ErrorCode, message: &str) {
        waiter
            .outbox
            .push(error_frame(&waiter.id, code.as_str(), message));
    }

    fn has_room(&self, session: SessionId) -> bool {
        self.sessions.get(&session).map_or(0, |s| s.total) < self.max_pending
    }

    fn submit(&mut self, waiter: Waiter, evaluator: usize, input: Arc<str>, wait: bool) {
        let metrics = &self.evaluators.get(evaluator).metrics;
        if self.answered_from_cache(&waiter) {
            metrics.cache_hits.inc();
            return;
        }
        let session = waiter.outbox.session();
        if wait && !self.has_room(session) {
            return Self::reject(&waiter, ErrorCode::Busy, PENDING_FULL);
        }
        let key = waiter.key;
        let joined = self.table.get(&key).and_then(|e| e.job.as_ref()).is_some();
        if joined {
            metrics.coalesced.inc();
        } else {
            if self.draining.load(Ordering::Acquire) {
                return Self::reject(&waiter, ErrorCode::ShuttingDown, DRAINING_MESSAGE);
            }
            let gen = self.next_gen;
            self.next_gen += 1;
            let cancelled = Arc::new(AtomicBool::new(false));
            let preview: Box<str> = input.chars().take(self.preview_chars).collect();
            let job = Job {
                key,
                gen,
                input,
                cancelled: Arc::clone(&cancelled),
            };
            if self.pool.try_dispatch(evaluator, job).is_err() {
                return Self::reject(&waiter, ErrorCode::Busy, "the evaluation queue is full");
            }
            self.jobs += 1;
            self.metrics.queued.inc();
            self.table.entry(key).or_default().job = Some(JobState {
                evaluator,
                gen,
                cancelled,
                preview,
                queued_at: Instant::now(),
                running_since: None,
                timer: None,
                wanted: false,
            });
        }
        let entry = self.table.get_mut(&key).expect("entry exists");
        let job = entry.job.as_mut().expect("job exists");
        job.wanted |= !wait;
        let state = if job.running_since.is_some() {
            "running"
        } else {
            "queued"
        };
        let waiters = entry.waiters.len() + usize::from(wait);
        waiter.outbox.push(
            FrameWriter::new("accepted")
                .id(&waiter.id)
                .key(&key)
                .str("state", state)
                .bool("first", !joined)
                .uint("waiters", waiters as u64)
                .finish(),
        );
        if wait {
            self.add_waiter(waiter);
        }
    }

    fn subscribe(&mut self, waiter: Waiter) {
        if self.answered_from_cache(&waiter) {
            return;
        }
        if !self.has_room(waiter.outbox.session()) {
            return Self::reject(&waiter, ErrorCode::Busy, PENDING_FULL);
        }
        let state = match self.table.get(&waiter.key).and_then(|e| e.job.as_ref()) {
            Some(job) if job.running_since.is_some() => "running",
            Some(_) => "queued",
            None => "unknown",
        };
        waiter.outbox.push(
            FrameWriter::new("subscribed")
                .id(&waiter.id)
                .key(&waiter.key)
                .str("state", state)
                .finish(),
        );
        self.add_waiter(waiter);
    }

    fn add_waiter(&mut self, waiter: Waiter) {
        let waits = self.sessions.entry(waiter.outbox.session()).or_default();
        waits.total += 1;
        *waits.by_key.entry(waiter.key).or_default() += 1;
        self.table
            .entry(waiter.key)
            .or_default()
            .waiters
            .push(waiter);
    }

    fn get(&mut self, key: Key, id: ReqId, outbox: Outbox) {
        if let Some(cached) = self.cache.get(&key) {
            return outbox.push(cached.status_frame(&id, &key));
        }
        let frame = FrameWriter::new("status").id(&id).key(&key);
        let frame = match self.table.get(&key) {
            Some(Entry {
                waiters,
                job: Some(job),
            }) => frame
                .str(
                    "state",
                    if job.running_since.is_some() {
                        "running"
                    } else {
                        "queued"
                    },
                )
                .uint("waiters", waiters.len() as u64)
                .uint("age_ms", job.queued_at.elapsed().as_millis() as u64),
            _ => frame.str("state", "unknown"),
        };
        outbox.push(frame.finish());
    }

    fn cancel(&mut self, key: Key, id: ReqId, outbox: Outbox) {
        self.remove_waits(outbox.session(), key);
        outbox.push(FrameWriter::new("cancelled").id(&id).key(&key).finish());
    }

    fn session_closed(&mut self, session: SessionId) {
        let Some(waits) = self.sessions.remove(&session) else {
            return;
        };
        for key in waits.by_key.into_keys() {
            self.drop_waiters_of(session, key);
        }
    }

    /// Removes every wait `session` holds on `key`.
    fn remove_waits(&mut self, session: SessionId, key: Key) {
        let Some(waits) = self.sessions.get_mut(&session) else {
            return;
        };
        let Some(n) = waits.by_key.remove(&key) else {
            return;
        };
        waits.total -= n as usize;
        if waits.total == 0 {
            self.sessions.remove(&session);
        }
        self.drop_waiters_of(session, key);
    }

    fn drop_waiters_of(&mut self, session: SessionId, key: Key) {
        let Some(entry) = self.table.get_mut(&key) else {
            return;
        };
        entry.waiters.retain(|w| w.outbox.session() != session);
        if !entry.waiters.is_empty() {
            return;
        }
        match &entry.job {
            Some(job) if job.running_since.is_some() || job.wanted => {}
            Some(job) => {
                job.cancelled.store(true, Ordering::Release);
                self.take_entry(key);
            }
            None => {
                self.table.remove(&key);
            }
        }
    }

    /// Forgets the delivered waiters' waits.
    fn release_waits(&mut self, waiters: &[Waiter]) {
        for w in waiters {
            let session = w.outbox.session();
            if let Some(waits) = self.sessions.get_mut(&session) {
                if let Some(n) = waits.by_key.get_mut(&w.key) {
                    *n -= 1;
                    if *n == 0 {
                        waits.by_key.remove(&w.key);
                    }
                    waits.total -= 1;
                    if waits.total == 0 {
                        self.sessions.remove(&session);
                    }
                }
            }
        }
    }

    /// Removes an entry, keeping gauges, timers and the job count right.
    fn take_entry(&mut self, key: Key) -> Option<Entry> {
        let mut entry = self.table.remove(&key)?;
        if let Some(job) = entry.job.as_mut() {
            self.jobs -= 1;
            if job.running_since.is_some() {
                self.metrics.running.dec();
            } else {
                self.metrics.queued.dec();
            }
            if let Some(timer) = job.timer.take() {
                self.timers.remove(&timer);
            }
        }
        Some(entry)
    }

    fn started(&mut self, evaluator: usize, key: Key, gen: u64) {
        self.evaluators.get(evaluator).metrics.evaluations.inc();
        let Some(job) = job_mut(&mut self.table, key, gen) else {
            return;
        };
        job.running_since = Some(Instant::now());
        let timeout = self.evaluators.get(job.evaluator).timeout;
        job.timer = Some(self.timers.insert((key, gen), timeout));
        self.metrics.queued.dec();
        self.metrics.running.inc();
    }

    fn done(
        &mut self,
        evaluator: usize,
        key: Key,
        gen: u64,
        outcome: Result<String, EvalError>,
        eval_ms: f64,
    ) {
        let metrics = &self.evaluators.get(evaluator).metrics;
        metrics.eval_seconds.observe(eval_ms / 1000.0);
        tracing::debug!(key = %key, evaluator = &*self.evaluators.get(evaluator).name, eval_ms, ok = outcome.is_ok(), "evaluation done");
        let current = self
            .table
            .get(&key)
            .and_then(|e| e.job.as_ref())
            .map(|j| (j.gen, j.evaluator));
        // Cache first: a miss racing this completion then finds the result.
        match &outcome {
            Ok(output) => self.cache.insert_output(key, output.as_str().into()),
            Err(error) if current.map(|c| c.0) == Some(gen) => {
                self.cache.insert_failure(key, error.clone())
            }
            Err(_) => {}
        }
        match current {
            Some((current_gen, evaluator)) if current_gen == gen => {
                match &outcome {
                    Ok(_) => {}
                    Err(EvalError::Failed(_)) => {
                        metrics.failures.inc();
                    }
                    Err(EvalError::Timeout(_)) => {
                        metrics.failures.inc();
                        metrics.timeouts.inc();
                    }
                }
                self.deliver(key, evaluator, outcome, eval_ms);
            }
            // A late result of a timed-out job answers the newer job's waiters.
            Some((_, evaluator)) if outcome.is_ok() => {
                if let Some(job) = self.table.get(&key).and_then(|e| e.job.as_ref()) {
                    job.cancelled.store(true, Ordering::Release);
                }
                self.deliver(key, evaluator, outcome, eval_ms);
            }
            _ => {}
        }
    }

    fn on_timeout(&mut self, key: Key, gen: u64) {
        let Some(job) = job_mut(&mut self.table, key, gen) else {
            return;
        };
        job.timer = None;
        let evaluator = job.evaluator;
        let spec = self.evaluators.get(evaluator);
        let error = EvalError::Timeout(format!(
            "evaluation exceeded {} ms (timeout_ms of fn {:?})",
            spec.timeout.as_millis(),
            &*spec.name
        ));
        let ms = spec.timeout.as_secs_f64() * 1000.0;
        spec.metrics.failures.inc();
        spec.metrics.timeouts.inc();
        self.deliver(key, evaluator, Err(error), ms);
    }

    /// Hands a key's result to all its waiters at once and removes the entry.
    fn deliver(
        &mut self,
        key: Key,
        evaluator: usize,
        outcome: Result<String, EvalError>,
        eval_ms: f64,
    ) {
        let Some(entry) = self.take_entry(key) else {
            return;
        };
        let shared = entry.waiters.len();
        let frame = FrameWriter::tail(64 + outcome.as_ref().map_or(64, String::len)).key(&key);
        let frame = match &outcome {
            Ok(output) => frame.raw("output", output),
            Err(error) => frame.raw("error", &crate::protocol::eval_error_json(error)),
        };
        let tail = frame
            .str("source", "eval")
            .millis("eval_ms", eval_ms)
            .uint("shared", shared as u64)
            .finish();
        let latency = &self.evaluators.get(evaluator).metrics.latency_seconds;
        // Waiters without an id all get the very same frame: one buffer, shared.
        let mut anonymous: Option<Utf8Bytes> = None;
        let now = Instant::now();
        for waiter in &entry.waiters {
            let frame = match &waiter.id {
                Some(_) => Utf8Bytes::from(result_frame(&waiter.id, &tail)),
                None => anonymous
                    .get_or_insert_with(|| result_frame(&None, &tail).into())
                    .clone(),
            };
            waiter.outbox.push(frame);
            if let Some(since) = waiter.since {
                latency.observe(now.duration_since(since).as_secs_f64());
            }
        }
        self.release_waits(&entry.waiters);
        self.recent.push_front(Recent {
            key: key.to_hex(),
            fn_name: Arc::clone(&self.evaluators.get(evaluator).name),
            eval_ms: (eval_ms * 1000.0).round() / 1000.0,
            shared,
            ok: outcome.is_ok(),
        });
        self.recent.truncate(self.snapshot_recent);
    }

    fn snapshot(&self, id: &ReqId) -> String {
        let now = Instant::now();
        let mut inflight: Vec<(&Key, &Entry, &JobState)> = self
            .table
            .iter()
            .filter_map(|(k, e)| e.job.as_ref().map(|j| (k, e, j)))
            .collect();
        inflight.sort_unstable_by_key(|(_, _, j)| j.queued_at);
        inflight.truncate(self.snapshot_inflight);
        let inflight: Vec<Inflight> = inflight
            .into_iter()
            .map(|(key, entry, job)| Inflight {
                key: key.to_hex(),
                fn_name: &self.evaluators.get(job.evaluator).name,
                state: if job.running_since.is_some() {
                    "running"
                } else {
                    "queued"
                },
                waiters: entry.waiters.len(),
                age_ms: now.duration_since(job.queued_at).as_millis() as u64,
                input_preview: &job.preview,
            })
            .collect();
        let stats = self.metrics.stats(&self.cache, &self.evaluators);
        FrameWriter::with_capacity("snapshot", 1024)
            .id(id)
            .uint("at_ms", unix_ms())
            .raw("stats", &to_json(&stats))
            .raw("inflight", &to_json(&inflight))
            .raw("recent", &to_json(&self.recent))
            .finish()
    }
}

/// The job of `key` if it is still generation `gen` (a free function, so the
/// caller can use the hub's other fields while holding it).
fn job_mut(table: &mut HashMap<Key, Entry>, key: Key, gen: u64) -> Option<&mut JobState> {
    table
        .get_mut(&key)
        .and_then(|e| e.job.as_mut())
        .filter(|j| j.gen == gen)
}

fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("snapshot parts serialize")
}
