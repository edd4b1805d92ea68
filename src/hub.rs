//! The hub: the driver of the coordination core, as one task.
//!
//! The hub is the singular update queue: one task owns the [`Core`] (the
//! wait table, every key's lifecycle and, in a cluster, the cluster's
//! decisions) and the executors, and applies what arrives one message at a
//! time: sessions' requests and closes, evaluator threads' reports, worker
//! sessions' `serve` and `complete`, Redis's replies and pub/sub messages
//! (from the cluster shell), and the core's own deadlines. After each input
//! it performs every effect the core asked for: frames into sessions'
//! outboxes (never awaited), jobs offered to or withdrawn from executors,
//! results into the cache, Redis commands to the cluster shell (never
//! awaited). What the executors answer at once (a full queue) goes back
//! into the core as the next input, so nothing re-enters the core while it
//! changes.
//!
//! Before a submit or subscription reaches the core the hub checks the
//! cache again: a result may have landed between a session's miss and its
//! message arriving. Results enter the cache before their waiters are told.

use crate::cache::ResultCache;
use crate::cluster::ShellEvent;
use crate::config::Config;
use crate::core::{
    ClusterConfig, Core, CoreConfig, Delivery, Effect, FnLimits, InflightRow, Input, OpId, RedisOp,
    Reply, Source, Target,
};
use crate::error::{ErrorCode, EvalError};
use crate::exec::pool::{EvaluatorTable, Pool, PoolEvent};
use crate::exec::remote::Remote;
use crate::exec::{Executors, Report};
use crate::key::Key;
use crate::metrics::Metrics;
use crate::ns::Ns;
use crate::outbox::{Frame, Outbox, SessionId};
use crate::protocol::{error_frame, result_frame, FrameWriter, ReqId, Wants};
use bytes::Bytes;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

/// Messages the hub applies one at a time.
pub enum HubMsg {
    /// A cache miss: evaluate `input` under `evaluator`, or join the evaluation under way.
    Submit {
        waiter: Waiter,
        evaluator: usize,
        input: Arc<str>,
        wait: bool,
        /// Its priority, deadline, progress, and the oldest cached result
        /// that answers it.
        wants: Wants,
    },
    /// Wait for a key whoever submits it (and its progress reports).
    Subscribe { waiter: Waiter, progress: bool },
    /// Report a key's state.
    Get { key: Key, id: ReqId, outbox: Outbox },
    /// Stop this session's waits on a key.
    Cancel { key: Key, id: ReqId, outbox: Outbox },
    /// Hand a view of the table to the snapshot renderer.
    View { reply: oneshot::Sender<HubView> },
    /// The session is gone; drop its waits (and, for a worker, take back its tasks).
    SessionClosed { session: SessionId },
    /// A worker session offers `concurrency` slots for a remote evaluator.
    Serve {
        outbox: Outbox,
        label: Arc<str>,
        evaluator: usize,
        concurrency: usize,
        /// The only namespace whose tasks it takes (None: every namespace).
        scope: Option<Ns>,
        id: ReqId,
    },
    /// A worker session takes no new tasks of a remote evaluator.
    Unserve {
        outbox: Outbox,
        evaluator: usize,
        id: ReqId,
    },
    /// Drop a key's or a fn's cached results (`invalidate`).
    Invalidate {
        target: Target,
        id: ReqId,
        outbox: Outbox,
    },
    /// A worker's outcome of a task it was sent.
    Complete {
        outbox: Outbox,
        task: String,
        outcome: Result<String, String>,
        id: ReqId,
    },
    /// A worker's progress report on a task it holds.
    Progress {
        session: SessionId,
        task: String,
        data: Arc<str>,
    },
    /// A worker session wrote frames it was holding back: offer it more.
    Drained { session: SessionId },
}

/// One request waiting for a key's result.
pub struct Waiter {
    pub key: Key,
    pub id: ReqId,
    pub outbox: Outbox,
    /// When a submit arrived (for the latency histogram); None for subscriptions.
    pub since: Option<Instant>,
}

/// What the hub hands the snapshot renderer: the oldest in-flight entries
/// (at most `dashboard.snapshot_inflight`, unsorted) and the recent completions.
pub struct HubView {
    pub inflight: Vec<InflightRow>,
    pub recent: Vec<Recent>,
    /// Worker sessions and remote fns' queues.
    pub workers: Vec<crate::exec::remote::WorkerRow>,
    pub queues: Vec<crate::exec::remote::QueueRow>,
}

/// A completed evaluation, for the dashboard.
#[derive(Clone, Serialize)]
pub struct Recent {
    key: String,
    /// Its namespace's name.
    ns: Arc<str>,
    #[serde(skip)]
    pub scope: crate::ns::Ns,
    #[serde(rename = "fn")]
    fn_name: Arc<str>,
    eval_ms: f64,
    shared: usize,
    ok: bool,
}

/// Results of frames at least this long are sent to waiters with an id as
/// a head of their own plus the shared tail; shorter ones are copied, which
/// costs less than a second WebSocket frame.
const SPLIT_MIN_BYTES: usize = 1024;

/// Messages taken from a channel per wake-up.
const BATCH: usize = 256;

/// The channels a hub reads.
pub struct HubInputs {
    pub inbox: mpsc::Receiver<HubMsg>,
    /// Its own inbox, for the tasks it starts (weak: the hub still ends
    /// when every session and the server are gone).
    pub myself: mpsc::WeakSender<HubMsg>,
    pub events: mpsc::Receiver<PoolEvent>,
    /// What the cluster shell hears from Redis (cluster mode).
    pub cluster: Option<mpsc::Receiver<ShellEvent>>,
}

/// The hub task's state. Only the hub task touches it.
pub struct Hub {
    core: Core,
    exec: Executors,
    /// The outbox of every session that has spoken to the hub.
    outboxes: HashMap<SessionId, Outbox>,
    /// The last completions, newest first, for snapshots.
    recent: VecDeque<Recent>,
    /// Inputs that performing effects produced, applied next.
    follow_ups: Vec<Input>,
    reports: Vec<Report>,
    /// Commands for Redis, to the cluster shell (cluster mode). Unbounded:
    /// the core has at most a few in flight per job and per key it looks
    /// up, plus its write-backs, each of them bounded.
    cluster: Option<mpsc::UnboundedSender<(OpId, RedisOp)>>,
    /// The core's cluster figures last published.
    cluster_status: Option<crate::core::ClusterStatus>,
    evaluators: Arc<EvaluatorTable>,
    cache: Arc<ResultCache>,
    metrics: Arc<Metrics>,
    draining: Arc<AtomicBool>,
    idle: watch::Sender<usize>,
    snapshot_inflight: usize,
    snapshot_recent: usize,
}

/// The core's configuration from the broker's; `node` and `run` name this
/// broker and this process in a cluster's claims.
pub fn core_config(config: &Config, node: &str, run: &str) -> CoreConfig {
    let evaluators = config.effective_evaluators();
    let cluster = config.cluster.redis.as_ref().map(|_| {
        let c = &config.cluster;
        let max_output = evaluators
            .iter()
            .map(|e| e.max_output_bytes)
            .max()
            .unwrap_or(0);
        ClusterConfig {
            node: node.to_string(),
            run: run.to_string(),
            prefix: c.prefix.clone(),
            lease: Duration::from_millis(c.lease_ms),
            result_ttl_s: c.result_ttl_s,
            error_ttl_s: config.cache.error_ttl_s,
            notice_inline_bytes: c.notice_inline_bytes,
            max_stored: max_stored(max_output),
            writeback_max: c.writeback_max,
            progress_per_s: c.progress_per_s,
            versions: evaluators.iter().map(|e| e.version.clone()).collect(),
        }
    });
    CoreConfig {
        fns: config
            .effective_evaluators()
            .iter()
            .map(|e| FnLimits {
                name: e.name.as_str().into(),
                timeout: std::time::Duration::from_millis(e.timeout_ms),
                queue_capacity: e.queue_capacity,
                queue_bytes: e.queue_bytes,
                abandon_running: e.kind == crate::config::EvaluatorKind::Remote,
            })
            .collect(),
        max_pending: config.limits.max_pending,
        ns_max_pending: config
            .namespaces
            .iter()
            .filter_map(|n| {
                let ns = crate::ns::Ns::intern(&n.name, config.auth.max_namespaces).ok()?;
                Some((ns, config.quotas(Some(n)).max_pending?))
            })
            .collect(),
        ns_default_max_pending: config.namespace_defaults.max_pending,
        cluster,
        preview_chars: config.dashboard.input_preview_chars,
        progress_bytes: config.limits.progress_bytes,
    }
}

/// The longest stored result or notice taken from Redis: the largest
/// output of any fn, plus room for the envelope. Anything longer is
/// ignored (a result is then evaluated here).
pub fn max_stored(max_output: usize) -> usize {
    max_output.saturating_add(64 * 1024)
}

/// The hub's clock: tokio's, so tests that pause time move it too.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl Hub {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &Config,
        core: CoreConfig,
        pool: Pool,
        evaluators: Arc<EvaluatorTable>,
        cache: Arc<ResultCache>,
        metrics: Arc<Metrics>,
        draining: Arc<AtomicBool>,
        idle: watch::Sender<usize>,
        cluster: Option<mpsc::UnboundedSender<(OpId, RedisOp)>>,
    ) -> Self {
        let remote = Remote::new(&config.effective_evaluators());
        for spec in evaluators.iter().filter(|e| remote.is_remote(e.index)) {
            spec.health.set_workers(0);
        }
        Hub {
            core: Core::new(core, now(), crate::protocol::unix_ms()),
            exec: Executors::new(pool, remote),
            outboxes: HashMap::new(),
            recent: VecDeque::new(),
            follow_ups: Vec::new(),
            reports: Vec::new(),
            cluster,
            cluster_status: None,
            evaluators,
            cache,
            metrics,
            draining,
            idle,
            snapshot_inflight: config.dashboard.snapshot_inflight,
            snapshot_recent: config.dashboard.snapshot_recent,
        }
    }

    /// Applies messages, reports and deadlines until `stop` is cancelled or
    /// every sender is gone, then hands back the pool.
    pub async fn run(mut self, inputs: HubInputs, stop: CancellationToken) -> Pool {
        let HubInputs {
            mut inbox,
            myself,
            mut events,
            cluster,
        } = inputs;
        let mut cluster = cluster;
        let mut batch = Vec::with_capacity(BATCH);
        let mut event_batch = Vec::with_capacity(BATCH);
        let mut cluster_batch = Vec::with_capacity(BATCH);
        // With only remote evaluators there are no threads, and no events.
        let mut threads = true;
        let sleep = tokio::time::sleep_until(tokio::time::Instant::now());
        tokio::pin!(sleep);
        let mut armed: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                n = events.recv_many(&mut event_batch, BATCH), if threads => {
                    if n == 0 {
                        threads = false;
                        continue;
                    }
                    for event in event_batch.drain(..) {
                        self.exec.pool_event(event);
                    }
                    self.settle();
                }
                n = inbox.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        break;
                    }
                    for msg in batch.drain(..) {
                        self.message(msg);
                    }
                }
                n = async { cluster.as_mut().expect("guarded").recv_many(&mut cluster_batch, BATCH).await }, if cluster.is_some() => {
                    if n == 0 {
                        cluster = None;
                        continue;
                    }
                    for event in cluster_batch.drain(..) {
                        self.input(match event {
                            ShellEvent::Reply { op, reply } => Input::Redis { op, reply },
                            ShellEvent::Pubsub(event) => Input::Pubsub(event),
                        });
                    }
                }
                _ = &mut sleep, if armed.is_some() => {
                    armed = None;
                    self.core.handle_timeout(now());
                    self.settle();
                }
            }
            self.watch_blocked(&myself);
            let next = self.core.poll_timeout();
            if next != armed {
                if let Some(at) = next {
                    sleep.as_mut().reset(tokio::time::Instant::from_std(at));
                }
                armed = next;
            }
            self.publish();
        }
        self.exec.into_pool()
    }

    /// Applies one input to the core and performs what follows from it.
    fn input(&mut self, input: Input) {
        self.core.apply(input, now());
        self.settle();
    }

    /// Performs the core's effects, and applies what they bring back, until
    /// nothing is left.
    fn settle(&mut self) {
        loop {
            while let Some(effect) = self.core.poll() {
                self.perform(effect);
            }
            self.exec.take_reports(&mut self.reports);
            if self.reports.is_empty() && self.follow_ups.is_empty() {
                return;
            }
            let now = now();
            for report in std::mem::take(&mut self.reports) {
                let input = self.report(report);
                self.core.apply(input, now);
            }
            for input in std::mem::take(&mut self.follow_ups) {
                self.core.apply(input, now);
            }
        }
    }

    /// An executor's report as an input, counted in the metrics.
    fn report(&mut self, report: Report) -> Input {
        match report {
            Report::Started {
                evaluator,
                gen,
                worker,
            } => {
                self.evaluators.get(evaluator).metrics.evaluations.inc();
                Input::Started { gen, worker }
            }
            Report::Requeued { gen } => Input::Requeued { gen },
            Report::Finished {
                evaluator,
                key,
                gen,
                outcome,
                eval_ms,
            } => {
                let spec = self.evaluators.get(evaluator);
                spec.metrics.eval_seconds.observe(eval_ms / 1000.0);
                tracing::debug!(key = %key, evaluator = &*spec.name, eval_ms, ok = outcome.is_ok(), "evaluation done");
                Input::Finished {
                    key,
                    gen,
                    evaluator,
                    outcome,
                    eval_ms,
                }
            }
            Report::Refused { gen, reason } => Input::Refused { gen, reason },
            Report::Progress { gen, data } => Input::Progress { gen, data },
        }
    }

    fn remember(&mut self, outbox: &Outbox) {
        self.outboxes
            .entry(outbox.session())
            .or_insert_with(|| outbox.clone());
    }

    fn message(&mut self, msg: HubMsg) {
        match msg {
            HubMsg::Submit {
                waiter,
                evaluator,
                input,
                wait,
                wants,
            } => {
                let max_age = wants.max_age_ms.map(Duration::from_millis);
                if self.answered_from_cache(&waiter, max_age) {
                    self.evaluators.get(evaluator).metrics.cache_hits.inc();
                    return;
                }
                self.remember(&waiter.outbox);
                self.input(Input::Submit {
                    session: waiter.outbox.session(),
                    id: waiter.id,
                    key: waiter.key,
                    evaluator,
                    input,
                    wait,
                    draining: self.draining.load(Ordering::Acquire),
                    max_age,
                    priority: wants.priority,
                    deadline: wants.deadline_ms.map(Duration::from_millis),
                    progress: wants.progress,
                });
            }
            HubMsg::Subscribe { waiter, progress } => {
                if self.answered_from_cache(&waiter, None) {
                    return;
                }
                self.remember(&waiter.outbox);
                self.input(Input::Subscribe {
                    session: waiter.outbox.session(),
                    id: waiter.id,
                    key: waiter.key,
                    progress,
                });
            }
            HubMsg::Invalidate { target, id, outbox } => {
                self.remember(&outbox);
                self.input(Input::Invalidate {
                    session: outbox.session(),
                    id,
                    target,
                });
            }
            HubMsg::Get { key, id, outbox } => {
                if let Some(hit) = self.cache.get(&key) {
                    return outbox.push(hit.cached.status_frame(&id, &key));
                }
                self.remember(&outbox);
                self.input(Input::Get {
                    session: outbox.session(),
                    id,
                    key,
                });
            }
            HubMsg::Cancel { key, id, outbox } => {
                self.remember(&outbox);
                self.input(Input::Cancel {
                    session: outbox.session(),
                    id,
                    key,
                });
            }
            HubMsg::View { reply } => {
                let (workers, queues) = self.exec.remote().view(self.snapshot_inflight);
                let _ = reply.send(HubView {
                    inflight: self.core.view(now(), self.snapshot_inflight),
                    recent: self.recent.iter().cloned().collect(),
                    workers,
                    queues,
                });
            }
            HubMsg::SessionClosed { session } => {
                let served = self
                    .exec
                    .session_closed(session, |e| self.evaluators.get(e).max_attempts);
                for evaluator in served {
                    self.workers_changed(evaluator);
                }
                self.settle();
                self.outboxes.remove(&session);
                self.input(Input::SessionClosed { session });
            }
            HubMsg::Serve {
                outbox,
                label,
                evaluator,
                concurrency,
                scope,
                id,
            } => {
                outbox.push(
                    FrameWriter::new("serving")
                        .id(&id)
                        .str("fn", &self.evaluators.get(evaluator).name)
                        .uint("concurrency", concurrency as u64)
                        .finish(),
                );
                self.exec
                    .serve(&outbox, &label, evaluator, concurrency, scope);
                self.workers_changed(evaluator);
                self.settle();
            }
            HubMsg::Unserve {
                outbox,
                evaluator,
                id,
            } => {
                self.exec.unserve(outbox.session(), evaluator);
                self.workers_changed(evaluator);
                outbox.push(
                    FrameWriter::new("serving")
                        .id(&id)
                        .str("fn", &self.evaluators.get(evaluator).name)
                        .uint("concurrency", 0)
                        .finish(),
                );
            }
            HubMsg::Complete {
                outbox,
                task,
                outcome,
                id,
            } => {
                let evaluators = &self.evaluators;
                let known = self.exec.complete(outbox.session(), &task, outcome, |e| {
                    let spec = evaluators.get(e);
                    (spec.max_output_bytes, Arc::clone(&spec.name))
                });
                if known.is_none() {
                    outbox.push(error_frame(
                        &id,
                        ErrorCode::StaleTask.as_str(),
                        "this session holds no such task (unknown, past its deadline, or revoked)",
                    ));
                }
                self.settle();
            }
            HubMsg::Progress {
                session,
                task,
                data,
            } => {
                if let Some(gen) = self.exec.remote().task_gen(session, &task) {
                    self.input(Input::Progress { gen, data });
                }
            }
            HubMsg::Drained { session } => {
                self.exec.drained(session);
                self.settle();
            }
        }
    }

    /// For each worker session that had no room for a task, waits (in a
    /// task of its own) until its writer makes some, then tells the hub.
    fn watch_blocked(&mut self, myself: &mpsc::WeakSender<HubMsg>) {
        for ctl in self.exec.take_blocked() {
            if !ctl.want_room() {
                continue;
            }
            let Some(hub) = myself.upgrade() else {
                continue;
            };
            tokio::spawn(async move {
                ctl.room_made().await;
                let _ = hub.send(HubMsg::Drained { session: ctl.id }).await;
            });
        }
    }

    fn perform(&mut self, effect: Effect) {
        match effect {
            Effect::Reply { session, id, reply } => self.reply(session, &id, reply),
            Effect::Deliver(delivery) => self.deliver(delivery),
            Effect::Busy { waiters, message } => {
                for waiter in waiters {
                    self.metrics.record_busy(Metrics::busy_reason(message));
                    if let Some(outbox) = self.outboxes.get(&waiter.session) {
                        outbox.push(error_frame(&waiter.id, ErrorCode::Busy.as_str(), message));
                    }
                }
            }
            Effect::Offer {
                evaluator,
                key,
                gen,
                input,
                priority,
            } => self.exec.offer(evaluator, key, gen, input, priority),
            Effect::Raise {
                evaluator,
                gen,
                priority,
            } => self.exec.raise(evaluator, gen, priority),
            Effect::Progress { key, seq, data, to } => {
                let tail = FrameWriter::tail(48 + data.len())
                    .key(&key)
                    .uint("seq", seq)
                    .raw("data", &data)
                    .finish();
                for (session, id) in to {
                    if let Some(outbox) = self.outboxes.get(&session) {
                        outbox.push(Frame::Text(crate::protocol::progress_frame(&id, &tail)));
                    }
                }
            }
            Effect::DeadlineExceeded {
                session,
                id,
                key,
                deadline_ms,
            } => {
                if let Some(outbox) = self.outboxes.get(&session) {
                    let message = format!(
                        "no result within this request's deadline_ms ({deadline_ms}); the evaluation goes on for its other waiters"
                    );
                    let error = crate::protocol::eval_error_json(&EvalError::Deadline(message));
                    let tail = FrameWriter::tail(64 + error.len())
                        .key(&key)
                        .raw("error", &error)
                        .finish();
                    outbox.push(Frame::Text(result_frame(&id, &tail)));
                }
            }
            Effect::Withdraw {
                evaluator,
                gen,
                overran,
            } => self.exec.withdraw(evaluator, gen, overran),
            Effect::Cache {
                key,
                evaluator,
                outcome,
                at_ms,
            } => match outcome {
                Ok(output) => {
                    let now = Instant::now();
                    let age = at_ms.map_or(0, |at| crate::protocol::unix_ms().saturating_sub(at));
                    let at = now.checked_sub(Duration::from_millis(age)).unwrap_or(now);
                    self.cache
                        .insert_output(key, evaluator, (*output).into(), at)
                }
                Err(error) => self.cache.insert_failure(key, evaluator, error),
            },
            Effect::Drop(Target::Key(key)) => self.cache.remove(&key),
            Effect::Drop(Target::Fn(ns, evaluator)) => self.cache.drop_fn(ns, evaluator),
            Effect::Redis { op, cmd } => {
                if let Some(shell) = &self.cluster {
                    // Gone only once the broker stops.
                    let _ = shell.send((op, cmd));
                }
            }
            Effect::ConfirmCache(until) => self.cache.confirm_until(until),
            Effect::ForgetCache => self.cache.drop_all(),
        }
    }

    fn reply(&mut self, session: SessionId, id: &ReqId, reply: Reply) {
        let Some(outbox) = self.outboxes.get(&session) else {
            return;
        };
        let frame = match reply {
            Reply::Accepted {
                key,
                evaluator,
                state,
                first,
                waiters,
                priority,
            } => {
                if !first {
                    self.evaluators.get(evaluator).metrics.coalesced.inc();
                }
                FrameWriter::new("accepted")
                    .id(id)
                    .key(&key)
                    .str("state", state.as_str())
                    .bool("first", first)
                    .uint("waiters", waiters as u64)
                    .uint("priority", u64::from(priority))
                    .finish()
            }
            Reply::Subscribed { key, state } => FrameWriter::new("subscribed")
                .id(id)
                .key(&key)
                .str("state", state.as_str())
                .finish(),
            Reply::Status {
                key,
                state,
                waiters,
                age_ms,
                progress,
            } => {
                let frame = FrameWriter::new("status")
                    .id(id)
                    .key(&key)
                    .str("state", state.as_str());
                match (state, progress) {
                    (crate::core::KeyState::Unknown, _) => frame.finish(),
                    (_, None) => frame
                        .uint("waiters", waiters as u64)
                        .uint("age_ms", age_ms)
                        .finish(),
                    (_, Some((seq, data))) => frame
                        .uint("waiters", waiters as u64)
                        .uint("age_ms", age_ms)
                        .raw("progress", &crate::protocol::progress_json(seq, &data))
                        .finish(),
                }
            }
            Reply::Cancelled { key } => FrameWriter::new("cancelled").id(id).key(&key).finish(),
            Reply::Invalidated { target } => {
                let frame = FrameWriter::new("invalidated").id(id);
                match target {
                    Target::Key(key) => frame.key(&key),
                    Target::Fn(_, evaluator) => {
                        frame.str("fn", &self.evaluators.get(evaluator).name)
                    }
                }
                .finish()
            }
            Reply::Rejected { code, message } => {
                if code == ErrorCode::Busy {
                    self.metrics.record_busy(Metrics::busy_reason(message));
                }
                error_frame(id, code.as_str(), message)
            }
        };
        outbox.push(frame);
    }

    /// Hands a key's outcome to all its waiters at once: the shared part of
    /// the frame is encoded once.
    fn deliver(&mut self, delivery: Delivery) {
        let Delivery {
            key,
            evaluator,
            outcome,
            source,
            waiters,
            ..
        } = delivery;
        let shared = waiters.len();
        let frame = FrameWriter::tail(64 + outcome.as_ref().map_or(64, |o| o.len())).key(&key);
        let frame = match &outcome {
            Ok(output) => frame.raw("output", output),
            Err(error) => frame.raw("error", &crate::protocol::eval_error_json(error)),
        };
        let frame = match source {
            Source::Eval { eval_ms } => frame.str("source", "eval").millis("eval_ms", eval_ms),
            Source::Cluster { at_ms: None } => frame.str("source", "cluster"),
            Source::Cluster { at_ms: Some(at) } => frame
                .str("source", "cluster")
                .uint("age_ms", crate::protocol::unix_ms().saturating_sub(at)),
        };
        let tail = frame.uint("shared", shared as u64).finish();
        let metrics = evaluator.map(|e| &self.evaluators.get(e).metrics);
        if let (Some(metrics), Source::Eval { .. }, Err(error)) = (metrics, source, &outcome) {
            metrics.failures.inc();
            if matches!(error, EvalError::Timeout(_)) {
                metrics.timeouts.inc();
            }
        }
        // Waiters without an id all get the very same frame; waiters with
        // one get a head of their own and share the tail when it is large.
        let mut anonymous: Option<Frame> = None;
        let split = (tail.len() >= SPLIT_MIN_BYTES).then(|| Bytes::from(tail.clone()));
        let now = Instant::now();
        for waiter in &waiters {
            let Some(outbox) = self.outboxes.get(&waiter.session) else {
                continue;
            };
            let frame = match (&waiter.id, &split) {
                (Some(_), Some(shared_tail)) => Frame::split(
                    FrameWriter::new("result").id(&waiter.id).open(),
                    shared_tail.clone(),
                ),
                (Some(_), None) => Frame::Text(result_frame(&waiter.id, &tail)),
                (None, _) => anonymous
                    .get_or_insert_with(|| Frame::shared(result_frame(&None, &tail)))
                    .clone(),
            };
            outbox.push(frame);
            if let (Some(since), Some(metrics)) = (waiter.since, metrics) {
                metrics
                    .latency_seconds
                    .observe(now.saturating_duration_since(since).as_secs_f64());
            }
        }
        let (Some(evaluator), Source::Eval { eval_ms }) = (evaluator, source) else {
            return;
        };
        self.recent.push_front(Recent {
            key: key.to_hex(),
            ns: key.ns().name(),
            scope: key.ns(),
            fn_name: Arc::clone(&self.evaluators.get(evaluator).name),
            eval_ms: (eval_ms * 1000.0).round() / 1000.0,
            shared,
            ok: outcome.is_ok(),
        });
        self.recent.truncate(self.snapshot_recent);
    }

    /// Reports whether a remote evaluator has any worker serving it.
    fn workers_changed(&self, evaluator: usize) {
        let spec = self.evaluators.get(evaluator);
        spec.health
            .set_workers(self.exec.remote().servers(evaluator));
    }

    fn publish(&mut self) {
        self.publish_cluster();
        let counts = self.core.counts();
        self.idle.send_if_modified(|n| {
            let changed = *n != counts.jobs;
            *n = counts.jobs;
            changed
        });
        self.metrics.wait_table.set(counts.entries as i64);
        self.metrics.queued.set(counts.queued as i64);
        self.metrics.running.set(counts.running as i64);
    }

    /// The core's cluster figures into the metrics, when they changed.
    fn publish_cluster(&mut self) {
        let Some(status) = self.core.cluster_status() else {
            return;
        };
        if self.cluster_status == Some(status) {
            return;
        }
        let m = &self.metrics;
        m.cluster_up.set(i64::from(status.up()));
        m.cluster_pubsub_up.set(i64::from(status.pubsub));
        let before = self.cluster_status.unwrap_or(crate::core::ClusterStatus {
            takeovers: 0,
            degraded: 0,
            redis_resets: 0,
            ..status
        });
        m.cluster_takeovers
            .inc_by(status.takeovers.saturating_sub(before.takeovers));
        m.cluster_degraded
            .inc_by(status.degraded.saturating_sub(before.degraded));
        m.cluster_redis_resets
            .inc_by(status.redis_resets.saturating_sub(before.redis_resets));
        *m.cluster_status.lock().expect("not poisoned") = Some(status);
        self.cluster_status = Some(status);
    }

    /// Answers from the cache if the key landed there meanwhile.
    fn answered_from_cache(&self, waiter: &Waiter, max_age: Option<Duration>) -> bool {
        match self.cache.get_fresh(&waiter.key, max_age) {
            Some(cached) => {
                waiter
                    .outbox
                    .push(cached.result_frame(&waiter.id, &waiter.key));
                true
            }
            None => false,
        }
    }
}
