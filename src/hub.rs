//! The hub: the singular update queue that owns the wait table.
//!
//! One task owns `key → {waiters, job}` and is its only reader and writer;
//! sessions and timers reach it through one bounded channel, evaluator
//! threads through the pool's event channel, and it applies their messages
//! one at a time, in order. Nobody locks the wait table and nobody waits on
//! the hub for more than a queue slot: replies go straight into the
//! sessions' outboxes.
//!
//! Invariants kept here:
//! - a key has at most one job at a time, so identical requests share it;
//! - before starting a job the hub checks the cache again (a result may
//!   have landed between a session's miss and its message arriving);
//! - whenever an outcome lands for a key, everyone in that key's wait list
//!   gets it, whether or not the entry still has a job (a late result
//!   after a timeout reaches those who subscribed since);
//! - on completion the result enters the cache *before* the entry leaves
//!   the table, the shared part of the frame is encoded once, and the entry
//!   is removed as its result is handed out;
//! - a session's waits leave with it, and an entry nobody waits on is
//!   dropped unless its job is already running or was asked for with
//!   `wait: false`;
//! - a session holds at most `limits.max_pending` waits and `wait: false`
//!   evaluations at once, and at most one subscription per key.

use crate::cache::ResultCache;
use crate::cluster::{ClusterCmd, ClusterEvent};
use crate::config::Config;
use crate::error::{ErrorCode, EvalError};
use crate::key::Key;
use crate::metrics::Metrics;
use crate::outbox::{Frame, Outbox, SessionId};
use crate::pool::{EvaluatorTable, Job, JobCtl, Pool, PoolEvent, QueueFull};
use crate::protocol::{error_frame, result_frame, FrameWriter, ReqId, DRAINING_MESSAGE};
use crate::remote::{Orphan, Remote};
use bytes::Bytes;
use serde::Serialize;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot, watch};
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
        id: ReqId,
    },
    /// A worker session takes no new tasks of a remote evaluator.
    Unserve {
        outbox: Outbox,
        evaluator: usize,
        id: ReqId,
    },
    /// News from the cluster task (cluster mode).
    Cluster(ClusterEvent),
    /// A worker's outcome of a task it was sent.
    Complete {
        outbox: Outbox,
        task: String,
        outcome: Result<String, String>,
        id: ReqId,
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

impl Waiter {
    fn is_subscription(&self) -> bool {
        self.since.is_none()
    }
}

/// One in-flight evaluation, as the snapshot renderer sees it.
pub struct InflightRow {
    pub key: Key,
    pub evaluator: usize,
    pub running: bool,
    pub waiters: usize,
    /// The worker session running it (remote evaluators).
    pub worker: Option<Arc<str>>,
    /// When the evaluation was queued (orders the rows, oldest first).
    pub queued_at: Instant,
    pub age_ms: u64,
    pub preview: Arc<str>,
}

/// What the hub hands the snapshot renderer: the oldest in-flight entries
/// (at most `dashboard.snapshot_inflight`, unsorted) and the recent completions.
pub struct HubView {
    pub inflight: Vec<InflightRow>,
    pub recent: Vec<Recent>,
}

/// A completed evaluation, for the dashboard.
#[derive(Clone, Serialize)]
pub struct Recent {
    key: String,
    #[serde(rename = "fn")]
    fn_name: Arc<str>,
    eval_ms: f64,
    shared: usize,
    ok: bool,
}

/// Where a job stands with the cluster (always `Settled` for a lone broker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coord {
    /// Evaluated here (claimed, or Redis away), or no cluster.
    Settled,
    /// Asking Redis for the result or a claim.
    Pending,
    /// Another broker evaluates it; its completion notice will come.
    Waiting,
}

struct JobState {
    evaluator: usize,
    /// Where the job stands with the cluster.
    coord: Coord,
    /// The input, kept while the cluster decides where the job runs.
    input: Option<Arc<str>>,
    gen: u64,
    ctl: Arc<JobCtl>,
    preview: Arc<str>,
    queued_at: Instant,
    running_since: Option<Instant>,
    timer: Option<delay_queue::Key>,
    /// The worker session running it (remote evaluators).
    worker: Option<Arc<str>>,
    /// Sessions whose `wait: false` submit asked for this evaluation: it
    /// runs even when every waiter cancels, and counts against their
    /// `max_pending` until it ends.
    wanted: Vec<SessionId>,
}

#[derive(Default)]
struct Entry {
    waiters: Vec<Waiter>,
    job: Option<JobState>,
}

/// What one session holds in the table.
#[derive(Default)]
struct SessionWaits {
    /// Waits plus `wait: false` evaluations under way: at most `max_pending`.
    total: usize,
    by_key: HashMap<Key, u32>,
    /// Keys this session subscribes to (one subscription per key).
    subscribed: HashSet<Key>,
}

/// Results of frames at least this long are sent to waiters with an id as
/// a head of their own plus the shared tail; shorter ones are copied, which
/// costs less than a second WebSocket frame.
const SPLIT_MIN_BYTES: usize = 1024;

/// The hub task's state. Only the hub task touches it.
pub struct Hub {
    /// The wait table: every key someone waits on or that is being evaluated.
    table: HashMap<Key, Entry>,
    /// What each session holds in the table, for its bounds and its close.
    sessions: HashMap<SessionId, SessionWaits>,
    /// Deadlines of running jobs, as (key, generation).
    timers: DelayQueue<(Key, u64)>,
    /// The last completions, newest first, for snapshots.
    recent: VecDeque<Recent>,
    /// Generation of the next job: tells a job from a later one of the same key.
    next_gen: u64,
    /// Jobs queued or running, published to `idle` for the drain.
    jobs: usize,
    /// Threads of the local evaluators.
    pool: Pool,
    /// Queues and worker sessions of the remote evaluators.
    remote: Remote,
    /// The cluster task's inbox (cluster mode).
    cluster: Option<mpsc::Sender<ClusterCmd>>,
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

/// Messages taken from a channel per wake-up.
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
        cluster: Option<mpsc::Sender<ClusterCmd>>,
    ) -> Self {
        let remote = Remote::new(&config.effective_evaluators());
        for spec in evaluators.iter().filter(|e| remote.is_remote(e.index)) {
            spec.health.set_workers(0);
        }
        Hub {
            remote,
            cluster,
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

    /// Applies messages and pool events until `stop` is cancelled or every
    /// sender is gone, then hands back the pool.
    pub async fn run(
        mut self,
        mut inbox: mpsc::Receiver<HubMsg>,
        mut events: mpsc::Receiver<PoolEvent>,
        stop: CancellationToken,
    ) -> Pool {
        let mut batch = Vec::with_capacity(BATCH);
        let mut event_batch = Vec::with_capacity(BATCH);
        // With only remote evaluators there are no threads, and no events.
        let mut threads = true;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                n = events.recv_many(&mut event_batch, BATCH), if threads => {
                    if n == 0 {
                        threads = false;
                        continue;
                    }
                    for event in event_batch.drain(..) {
                        self.event(event);
                    }
                }
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
            HubMsg::View { reply } => {
                let _ = reply.send(self.view());
            }
            HubMsg::SessionClosed { session } => self.session_closed(session),
            HubMsg::Serve {
                outbox,
                label,
                evaluator,
                concurrency,
                id,
            } => {
                self.remote.serve(&outbox, &label, evaluator, concurrency);
                self.workers_changed(evaluator);
                outbox.push(
                    FrameWriter::new("serving")
                        .id(&id)
                        .str("fn", &self.evaluators.get(evaluator).name)
                        .uint("concurrency", concurrency as u64)
                        .finish(),
                );
                self.pump(evaluator);
            }
            HubMsg::Unserve {
                outbox,
                evaluator,
                id,
            } => {
                self.remote.unserve(outbox.session(), evaluator);
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
            } => self.complete(outbox, &task, outcome, id),
            HubMsg::Cluster(event) => self.cluster_event(event),
        }
    }

    /// Queues a job on its evaluator's threads or remote queue.
    fn dispatch(
        &mut self,
        evaluator: usize,
        key: Key,
        gen: u64,
        input: Arc<str>,
        ctl: &Arc<JobCtl>,
    ) -> Result<(), QueueFull> {
        let job = Job {
            key,
            gen,
            input,
            ctl: Arc::clone(ctl),
        };
        if self.remote.is_remote(evaluator) {
            self.remote.enqueue(evaluator, job)
        } else {
            self.pool
                .try_dispatch(evaluator, job)
                .map_err(|(_, full)| full)
        }
    }

    /// Sends the cluster task a command without waiting; if its queue is
    /// full, a job waiting on it is evaluated here instead.
    fn ask_cluster(&mut self, cmd: ClusterCmd, key: Key) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        if cluster.try_send(cmd).is_err() {
            self.settle(key, None);
        }
    }

    /// The job of `key` (of generation `gen`, if given) runs here: it leaves
    /// the cluster's hands and is queued for its evaluator. Without such a
    /// job, a claim taken for it is given back.
    fn settle(&mut self, key: Key, gen: Option<u64>) {
        let Some(job) = self
            .table
            .get_mut(&key)
            .and_then(|e| e.job.as_mut())
            .filter(|j| gen.is_none_or(|g| g == j.gen) && j.coord != Coord::Settled)
        else {
            if let Some(cluster) = &self.cluster {
                let _ = cluster.try_send(ClusterCmd::Release { key });
            }
            return;
        };
        job.coord = Coord::Settled;
        let (evaluator, gen, ctl) = (job.evaluator, job.gen, Arc::clone(&job.ctl));
        let Some(input) = job.input.take() else {
            return;
        };
        match self.dispatch(evaluator, key, gen, input, &ctl) {
            Ok(()) if self.remote.is_remote(evaluator) => self.pump(evaluator),
            Ok(()) => {}
            Err(full) => {
                let error = EvalError::Failed(full_message(full).into());
                self.finished_here(key, Err(error.clone()));
                self.deliver(key, Some(evaluator), Err(error), 0.0, "eval")
            }
        }
    }

    fn cluster_event(&mut self, event: ClusterEvent) {
        match event {
            ClusterEvent::Claimed { key, gen } | ClusterEvent::Local { key, gen } => {
                self.settle(key, Some(gen))
            }
            ClusterEvent::Takeover { key } => self.settle(key, None),
            ClusterEvent::Waiting { key, gen } => {
                if let Some(job) = job_mut(&mut self.table, key, gen) {
                    if job.coord == Coord::Pending {
                        job.coord = Coord::Waiting;
                    }
                }
            }
            ClusterEvent::Found { key, output } => {
                self.cache.insert_output(key, output.as_str().into());
                self.deliver_from_cluster(key, Ok(output));
            }
            ClusterEvent::Done { key, outcome } => {
                match &outcome {
                    Ok(output) => self.cache.insert_output(key, output.as_str().into()),
                    Err(error) => self.cache.insert_failure(key, error.clone()),
                }
                self.deliver_from_cluster(key, outcome);
            }
        }
    }

    /// Delivers an outcome that came from the cluster to whoever waits here.
    fn deliver_from_cluster(&mut self, key: Key, outcome: Result<String, EvalError>) {
        let Some(entry) = self.table.get(&key) else {
            return;
        };
        let evaluator = entry.job.as_ref().map(|j| j.evaluator);
        if let Some(job) = entry.job.as_ref() {
            // A job still queued here is not needed any more.
            job.ctl.cancel();
            if self.remote.is_remote(job.evaluator) && job.coord == Coord::Settled {
                let (evaluator, gen) = (job.evaluator, job.gen);
                self.remote.withdraw(evaluator, gen);
            }
        }
        if let Some(cluster) = &self.cluster {
            let _ = cluster.try_send(ClusterCmd::Forget { key });
        }
        self.deliver(key, evaluator, outcome, 0.0, "cluster");
    }

    /// Hands queued tasks of a remote evaluator to its workers, marking them running.
    fn pump(&mut self, evaluator: usize) {
        for sent in self.remote.dispatch(evaluator) {
            self.started(evaluator, sent.key, sent.gen);
            if let Some(job) = job_mut(&mut self.table, sent.key, sent.gen) {
                job.worker = Some(sent.worker);
            }
        }
    }

    /// Reports whether a remote evaluator has any worker serving it.
    fn workers_changed(&self, evaluator: usize) {
        let spec = self.evaluators.get(evaluator);
        spec.health.set_workers(self.remote.servers(evaluator));
    }

    fn complete(&mut self, outbox: Outbox, task: &str, outcome: Result<String, String>, id: ReqId) {
        let Some(sent) = self.remote.complete(outbox.session(), task) else {
            return outbox.push(error_frame(
                &id,
                ErrorCode::StaleTask.as_str(),
                "this session holds no such task (unknown, past its deadline, or revoked)",
            ));
        };
        let evaluator = sent.evaluator;
        let max = self.remote.max_output_bytes(evaluator);
        let outcome = match outcome {
            Ok(output) if output.len() > max => Err(EvalError::Failed(format!(
                "the worker's output is {} bytes; fn {:?} takes at most {max} (max_output_bytes)",
                output.len(),
                &*self.evaluators.get(evaluator).name
            ))),
            Ok(output) => Ok(output),
            Err(message) => Err(EvalError::Failed(message)),
        };
        let eval_ms = sent.sent_at.elapsed().as_secs_f64() * 1000.0;
        let (key, gen) = (sent.queued.job.key, sent.queued.job.gen);
        self.done(evaluator, key, gen, outcome, eval_ms);
        self.pump(evaluator);
    }

    fn event(&mut self, event: PoolEvent) {
        match event {
            PoolEvent::Started {
                evaluator,
                key,
                gen,
            } => self.started(evaluator, key, gen),
            PoolEvent::Done {
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
        let key = waiter.key;
        let job = self.table.get(&key).and_then(|e| e.job.as_ref());
        let joined = job.is_some();
        // A wait:false submit of an evaluation this session already asked for holds nothing new.
        let holds_new = wait || !job.is_some_and(|j| j.wanted.contains(&session));
        if holds_new && !self.has_room(session) {
            return Self::reject(&waiter, ErrorCode::Busy, PENDING_FULL);
        }
        if joined {
            metrics.coalesced.inc();
        } else {
            if self.draining.load(Ordering::Acquire) {
                return Self::reject(&waiter, ErrorCode::ShuttingDown, DRAINING_MESSAGE);
            }
            let gen = self.next_gen;
            self.next_gen += 1;
            let ctl = Arc::new(JobCtl::default());
            let preview: Arc<str> = input
                .chars()
                .take(self.preview_chars)
                .collect::<String>()
                .into();
            let remote = self.remote.is_remote(evaluator);
            let clustered = self.cluster.is_some();
            if !clustered {
                if let Err(full) = self.dispatch(evaluator, key, gen, Arc::clone(&input), &ctl) {
                    return Self::reject(&waiter, ErrorCode::Busy, full_message(full));
                }
            }
            self.jobs += 1;
            self.metrics.queued.inc();
            // A remote job's deadline runs from its queueing too: with no
            // worker serving, it is not held longer than its timeout.
            let timer = remote.then(|| {
                let timeout = self.evaluators.get(evaluator).timeout;
                self.timers.insert((key, gen), timeout)
            });
            self.table.entry(key).or_default().job = Some(JobState {
                evaluator,
                coord: if clustered {
                    Coord::Pending
                } else {
                    Coord::Settled
                },
                input: clustered.then_some(input),
                gen,
                ctl,
                preview,
                queued_at: Instant::now(),
                running_since: None,
                timer,
                worker: None,
                wanted: Vec::new(),
            });
            if clustered {
                self.ask_cluster(ClusterCmd::Acquire { key, gen }, key);
            } else if remote {
                self.pump(evaluator);
            }
        }
        let entry = self.table.get_mut(&key).expect("entry exists");
        let job = entry.job.as_mut().expect("job exists");
        let state = if job.running_since.is_some() {
            "running"
        } else {
            "queued"
        };
        let waiters = entry.waiters.len() + usize::from(wait);
        if !wait && holds_new {
            job.wanted.push(session);
            self.sessions.entry(session).or_default().total += 1;
        }
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
        let session = waiter.outbox.session();
        let repeated = self
            .sessions
            .get(&session)
            .is_some_and(|s| s.subscribed.contains(&waiter.key));
        if !repeated && !self.has_room(session) {
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
        let key = waiter.key;
        let new_entry = !self.table.contains_key(&key);
        if !repeated {
            self.add_waiter(waiter);
        }
        if new_entry {
            // The result may be in the cluster's store already.
            if let Some(cluster) = &self.cluster {
                let _ = cluster.try_send(ClusterCmd::Lookup { key });
            }
        }
    }

    fn add_waiter(&mut self, waiter: Waiter) {
        let waits = self.sessions.entry(waiter.outbox.session()).or_default();
        waits.total += 1;
        *waits.by_key.entry(waiter.key).or_default() += 1;
        if waiter.is_subscription() {
            waits.subscribed.insert(waiter.key);
        }
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
        let (orphans, served) = self.remote.session_closed(session);
        for orphan in orphans {
            match orphan {
                Orphan::Requeued { key, gen } => {
                    if let Some(job) = job_mut(&mut self.table, key, gen) {
                        job.running_since = None;
                        job.worker = None;
                        self.metrics.running.dec();
                        self.metrics.queued.inc();
                    }
                }
                Orphan::Lost {
                    evaluator,
                    key,
                    gen,
                } => {
                    let lost = EvalError::Failed(format!(
                        "worker lost: the workers running it went away {} times (max_attempts)",
                        self.remote_attempts(evaluator)
                    ));
                    self.done(evaluator, key, gen, Err(lost), 0.0);
                }
            }
        }
        for evaluator in served {
            self.workers_changed(evaluator);
            self.pump(evaluator);
        }
        let Some(waits) = self.sessions.remove(&session) else {
            return;
        };
        for key in waits.by_key.into_keys() {
            self.drop_waiters_of(session, key);
        }
    }

    fn remote_attempts(&self, evaluator: usize) -> u32 {
        self.evaluators.get(evaluator).max_attempts
    }

    /// Removes every wait `session` holds on `key`.
    fn remove_waits(&mut self, session: SessionId, key: Key) {
        let Some(waits) = self.sessions.get_mut(&session) else {
            return;
        };
        let Some(n) = waits.by_key.remove(&key) else {
            return;
        };
        waits.subscribed.remove(&key);
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
        let remote = entry
            .job
            .as_ref()
            .is_some_and(|j| self.remote.is_remote(j.evaluator));
        if let (Some(job), Some(cluster)) = (&entry.job, &self.cluster) {
            // Waiting on another broker: stop waiting. Claimed here (or being
            // claimed): run to completion, other brokers may be waiting on it.
            if job.coord == Coord::Waiting && job.wanted.is_empty() {
                let _ = cluster.try_send(ClusterCmd::Forget { key });
                self.take_entry(key);
            }
            return;
        }
        match &entry.job {
            Some(job) if !job.wanted.is_empty() => {}
            // A running local evaluation finishes and is cached; a remote
            // one is taken back from its worker.
            Some(job) if job.running_since.is_some() && !remote => {}
            Some(job) => {
                job.ctl.cancel();
                if remote {
                    let (evaluator, gen) = (job.evaluator, job.gen);
                    self.remote.withdraw(evaluator, gen);
                    self.take_entry(key);
                    self.pump(evaluator);
                    return;
                }
                self.take_entry(key);
            }
            None => {
                self.table.remove(&key);
            }
        }
    }

    /// Takes one from the session's count; forgets the session at zero.
    fn release_one(&mut self, session: SessionId, key: Option<(Key, bool)>) {
        let Some(waits) = self.sessions.get_mut(&session) else {
            return;
        };
        if let Some((key, subscription)) = key {
            let Some(n) = waits.by_key.get_mut(&key) else {
                return;
            };
            *n -= 1;
            if *n == 0 {
                waits.by_key.remove(&key);
            }
            if subscription {
                waits.subscribed.remove(&key);
            }
        }
        waits.total -= 1;
        if waits.total == 0 {
            self.sessions.remove(&session);
        }
    }

    /// Removes an entry, keeping gauges, timers, the job count and the
    /// sessions' `wait: false` counts right.
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
            for session in std::mem::take(&mut job.wanted) {
                self.release_one(session, None);
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
        if let Some(previous) = job.timer.take() {
            self.timers.remove(&previous);
        }
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
        // None: no entry; Some(None): waiters (subscribers) but no job.
        let current = self
            .table
            .get(&key)
            .map(|e| e.job.as_ref().map(|j| (j.gen, j.evaluator)));
        let is_current = matches!(current, Some(Some((g, _))) if g == gen);
        // Cache first: a miss racing this completion then finds the result.
        match &outcome {
            Ok(output) => self.cache.insert_output(key, output.as_str().into()),
            Err(error) if is_current => self.cache.insert_failure(key, error.clone()),
            Err(_) => {}
        }
        if outcome.is_ok() || is_current {
            self.finished_here(
                key,
                outcome
                    .as_ref()
                    .map(|o| Arc::from(o.as_str()))
                    .map_err(Clone::clone),
            );
        }
        match current {
            Some(Some((_, evaluator))) if is_current => {
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
                self.deliver(key, Some(evaluator), outcome, eval_ms, "eval");
            }
            // A late result (its job timed out or was dropped) reaches whoever
            // waits on the key now; a success also answers a newer job's waiters.
            Some(None) => self.deliver(key, Some(evaluator), outcome, eval_ms, "eval"),
            Some(Some(_)) if outcome.is_ok() => {
                if let Some(job) = self.table.get(&key).and_then(|e| e.job.as_ref()) {
                    job.ctl.cancel();
                }
                self.deliver(key, Some(evaluator), outcome, eval_ms, "eval");
            }
            _ => {}
        }
    }

    /// Tells the cluster (if any) this broker has the outcome of `key`.
    fn finished_here(&self, key: Key, outcome: Result<Arc<str>, EvalError>) {
        if let Some(cluster) = &self.cluster {
            if cluster
                .try_send(ClusterCmd::Finished { key, outcome })
                .is_err()
            {
                tracing::warn!(key = %key, "cluster queue full: this outcome is not shared");
            }
        }
    }

    fn on_timeout(&mut self, key: Key, gen: u64) {
        let Some(job) = job_mut(&mut self.table, key, gen) else {
            return;
        };
        job.timer = None;
        let evaluator = job.evaluator;
        let ctl = Arc::clone(&job.ctl);
        let spec = self.evaluators.get(evaluator);
        let error = EvalError::Timeout(format!(
            "evaluation exceeded {} ms (timeout_ms of fn {:?})",
            spec.timeout.as_millis(),
            &*spec.name
        ));
        let ms = spec.timeout.as_secs_f64() * 1000.0;
        spec.metrics.failures.inc();
        spec.metrics.timeouts.inc();
        self.cache.insert_failure(key, error.clone());
        if self.remote.is_remote(evaluator) {
            self.remote.withdraw(evaluator, gen);
            self.finished_here(key, Err(error.clone()));
            self.deliver(key, Some(evaluator), Err(error), ms, "eval");
            self.pump(evaluator);
            return;
        }
        self.pool.overran(evaluator, &ctl);
        self.finished_here(key, Err(error.clone()));
        self.deliver(key, Some(evaluator), Err(error), ms, "eval");
    }

    /// Hands a key's outcome to all its waiters at once and removes the entry.
    /// `source` is `eval` (evaluated here) or `cluster` (by another broker,
    /// or found in Redis); `evaluator` is the fn, when a job here had one.
    fn deliver(
        &mut self,
        key: Key,
        evaluator: Option<usize>,
        outcome: Result<String, EvalError>,
        eval_ms: f64,
        source: &str,
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
        let frame = frame.str("source", source);
        let frame = match source {
            "eval" => frame.millis("eval_ms", eval_ms),
            _ => frame,
        };
        let tail = frame.uint("shared", shared as u64).finish();
        let latency = evaluator.map(|e| self.evaluators.get(e).metrics.latency_seconds.clone());
        // Waiters without an id all get the very same frame; waiters with
        // one get a head of their own and share the tail when it is large.
        let mut anonymous: Option<Frame> = None;
        let split = (tail.len() >= SPLIT_MIN_BYTES).then(|| Bytes::from(tail.clone()));
        let now = Instant::now();
        for waiter in &entry.waiters {
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
            waiter.outbox.push(frame);
            if let (Some(since), Some(latency)) = (waiter.since, &latency) {
                latency.observe(now.duration_since(since).as_secs_f64());
            }
        }
        for waiter in &entry.waiters {
            let session = waiter.outbox.session();
            self.release_one(session, Some((waiter.key, waiter.is_subscription())));
        }
        let Some(evaluator) = evaluator.filter(|_| source == "eval") else {
            return;
        };
        self.recent.push_front(Recent {
            key: key.to_hex(),
            fn_name: Arc::clone(&self.evaluators.get(evaluator).name),
            eval_ms: (eval_ms * 1000.0).round() / 1000.0,
            shared,
            ok: outcome.is_ok(),
        });
        self.recent.truncate(self.snapshot_recent);
    }

    /// The oldest in-flight entries (unsorted) and the recent completions.
    fn view(&self) -> HubView {
        let now = Instant::now();
        let mut jobs: Vec<(&Key, &Entry, &JobState)> = self
            .table
            .iter()
            .filter_map(|(k, e)| e.job.as_ref().map(|j| (k, e, j)))
            .collect();
        if jobs.len() > self.snapshot_inflight {
            jobs.select_nth_unstable_by_key(self.snapshot_inflight, |(_, _, j)| j.queued_at);
            jobs.truncate(self.snapshot_inflight);
        }
        HubView {
            inflight: jobs
                .into_iter()
                .map(|(key, entry, job)| InflightRow {
                    key: *key,
                    evaluator: job.evaluator,
                    running: job.running_since.is_some(),
                    waiters: entry.waiters.len(),
                    worker: job.worker.clone(),
                    queued_at: job.queued_at,
                    age_ms: now.duration_since(job.queued_at).as_millis() as u64,
                    preview: Arc::clone(&job.preview),
                })
                .collect(),
            recent: self.recent.iter().cloned().collect(),
        }
    }
}

/// The `busy` message for a full evaluation queue.
fn full_message(full: QueueFull) -> &'static str {
    match full {
        QueueFull::Jobs => "the evaluation queue is full (queue_capacity)",
        QueueFull::Bytes => "the evaluation queue holds its most input bytes (queue_bytes)",
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
