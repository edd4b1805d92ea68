//! The wait table and every key's lifecycle, as a state machine that does
//! no I/O.
//!
//! [`Core`] holds `key → {waiters, job}` and what each session holds in it,
//! and in cluster mode the cluster's decisions ([`crate::cluster`]). Its
//! one way in is [`Core::apply`] (something happened: a request, an
//! executor's report, a Redis reply or pub/sub message) and
//! [`Core::handle_timeout`] (the clock passed [`Core::poll_timeout`]); both
//! take `now` from the caller and push [`Effect`]s that the caller takes
//! with [`Core::poll`] and performs after `apply` returns. No channel,
//! clock, socket or await lives here, so nothing re-enters the table while
//! it changes, and the same core runs in the broker (`hub`) and in the
//! deterministic simulation (`tests/sim.rs`).
//!
//! The core never asks how a job runs: threads, process children and
//! remote workers sit behind one executor boundary. The core offers a job
//! ([`Effect::Offer`]) within the evaluator's queue bounds, which it counts
//! itself; the executor reports [`Input::Started`], [`Input::Requeued`],
//! [`Input::Finished`] (a lost worker is a finish with an error) or
//! [`Input::Refused`]; the core takes a job back with [`Effect::Withdraw`].
//!
//! # A key's lifecycle
//!
//! A key with an entry has waiters (submits that wait, subscriptions), a
//! job, or both. The job's [`Phase`] (T: the fn's `timeout_ms`, L: the
//! lease; "cluster" is the cluster's decisions):
//!
//! | from | event | to | who is told | what is released |
//! |---|---|---|---|---|
//! | (none) | submit, lone broker | `Queued` | submitter `accepted` | |
//! | (none) | submit, queue full | (none) | submitter `busy` | |
//! | (none) | submit, cluster | `Asking` (deadline T + L) | submitter `accepted`; cluster `Acquire` (a claim held at most 2T + L) | |
//! | `Asking` | `Claimed` | `Queued` (claimed) | executor `Offer` | |
//! | `Asking` | `Local` (Redis away) | `Queued` | executor `Offer` | |
//! | `Asking` | `Waiting` | `Waiting` (deadline 2T + 2L), or abandoned if nobody waits any more | | |
//! | `Waiting` | `Claimed` (a takeover) / `Local` | `Queued` | executor `Offer` | |
//! | `Asking`, `Waiting` | settle with the queue full | (none) | every waiter `busy` | claim, timer, `wait:false` holds |
//! | `Queued` | `Started` | `Running` | | timer reset to T |
//! | `Running` | `Requeued` (worker gone) | `Queued` | | |
//! | `Queued`, `Running` | `Finished` | (none) | every waiter the outcome; cache; cluster `Finished` (stored if nothing is; another result stored first replaces this broker's copy) | timer, claim (by `Finished`), holds |
//! | `Queued`, `Running` with a claim asked for L/2 ago or more, or taken over | `Finished` | `Storing` (deadline L) | cluster `Finished` (confirm) | slot, running count |
//! | `Storing` | `Verdict` (or its own notice) | (none) | every waiter the result that stands (another broker's if stored first); cache | timer, holds |
//! | `Storing` | deadline | (none) | every waiter its own outcome; cache | timer, holds |
//! | `Queued`, `Running` | deadline | (none) | every waiter `eval_timeout`; cache; cluster `Finished`; executor `Withdraw` | timer, claim, slot, holds |
//! | `Asking`, `Waiting` | deadline | (none) | every waiter `eval_timeout` (never published: the claim is not ours); cluster `Forget` | timer, claim if any, holds |
//! | `Waiting` on claim c | c's outcome (a notice, or its own look once c is gone) | (none) | every waiter that came in time (see [`Core`]'s `outcome_from_cluster`) | `Forget`, timer, holds |
//! | `Asking` | a success from the cluster, or its own look's answer | (none) | the same | claim, timer, holds |
//! | `Queued`, `Running` | a success kept in Redis | (none) | every waiter; cache | `Withdraw`, claim (`Release`), timer, holds |
//! | any | a failure under another claim, an outcome shared with another evaluation's waiters | unchanged | nobody | |
//! | any | `Stored` (a large output, not in the notice) | unchanged | cluster `Lookup`, which brings `Found` | |
//! | `Queued`, `Refused` by the executor | | (none) | every waiter `busy` | claim, timer, holds |
//! | any | last waiter leaves, no `wait:false` hold | (none), or kept | | see below |
//! | any | `Invalidate` of its key or fn (here, or `Dropped` from another broker or from Redis) | unchanged, marked dropped | cache `Drop`; in a cluster, `Invalidate` (the answer waits for `Invalidated`) | |
//! | `Queued`, `Running`, marked dropped or begun under a fn's older epoch | `Finished` (or deadline) | (none) | every waiter the outcome; shared with its evaluation's waiters elsewhere, kept nowhere | claim (by `Finished`), timer, holds |
//!
//! A late outcome (its job ended) on a lone broker is cached unless
//! something was dropped since its job began; in a cluster it is only
//! offered to Redis (stored if nothing is), and reaches this broker from
//! there. An outcome from the cluster of a key or fn dropped within the
//! last lease is delivered but not cached.
//!
//! When the last waiter of a key leaves (cancel, session closed) and no
//! `wait:false` submit holds its job: a `Queued` job is withdrawn; a
//! `Running` one is withdrawn if its evaluator can stop it
//! ([`FnLimits::abandon_running`]), else it finishes and is cached; a job
//! `Waiting` on another broker stops waiting; a job that holds or is asking
//! for a claim runs on (other brokers may wait on it).
//!
//! A claim, a timer and a queue slot each belong to exactly one job (one
//! generation: a later job of the same key has a new one) and end with it.
//! Every phase has a deadline, so no job outlives twice its timeout (plus
//! two leases while it depends on another broker).

use crate::cluster::{
    ClusterCmd, ClusterConfig, ClusterEvent, ClusterStatus, Coordinator, Finish, OpId, PubsubEvent,
};
use crate::error::{ErrorCode, EvalError};
use crate::key::Key;
use crate::ns::Ns;
use crate::redis::{RedisOp, RedisReply};
use crate::sched::Priority;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A session, as the core knows it.
pub type SessionId = u64;
/// A request's `id`, echoed in its answers (inline up to 24 bytes).
pub type ReqId = Option<compact_str::CompactString>;
/// Tells a job from a later one of the same key.
pub type Gen = u64;

/// The bounds of one evaluator (`fn`).
#[derive(Debug, Clone)]
pub struct FnLimits {
    pub name: Arc<str>,
    /// `timeout_ms`: the longest a job may run, or wait in its queue.
    pub timeout: Duration,
    /// `queue_capacity`: jobs offered and not started.
    pub queue_capacity: usize,
    /// `queue_bytes`: input bytes of those jobs.
    pub queue_bytes: usize,
    /// Whether a running job nobody waits on any more is withdrawn (its
    /// executor can stop it: a remote worker is sent `revoke`) rather than
    /// left to finish and fill the cache (a thread cannot be stopped).
    pub abandon_running: bool,
}

/// What the core is configured with.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub fns: Vec<FnLimits>,
    /// `limits.max_pending`: waits and `wait:false` holds per session.
    pub max_pending: usize,
    /// `[[namespace]] max_pending`: waits and holds of all of a
    /// namespace's sessions together.
    pub ns_max_pending: HashMap<Ns, usize>,
    /// `[namespace_defaults] max_pending`: the same for each namespace
    /// not in `ns_max_pending`, the shared one aside.
    pub ns_default_max_pending: Option<usize>,
    /// Cluster mode: jobs ask the cluster before they run.
    pub cluster: Option<ClusterConfig>,
    /// `dashboard.input_preview_chars`.
    pub preview_chars: usize,
    /// `limits.progress_bytes`: the reports kept per evaluation for
    /// waiters that join it later (the latest ones).
    pub progress_bytes: usize,
}

/// Something that happened, for [`Core::apply`].
#[derive(Debug)]
pub enum Input {
    /// A cache miss: evaluate `input`, or join the evaluation under way.
    /// `draining`: the broker takes no new evaluations.
    Submit {
        session: SessionId,
        id: ReqId,
        key: Key,
        evaluator: usize,
        input: Arc<str>,
        wait: bool,
        draining: bool,
        /// A stored result older than this does not answer it (in a
        /// cluster: nor one in Redis).
        max_age: Option<std::time::Duration>,
        /// Its job starts in order of the highest priority among its
        /// submits.
        priority: Priority,
        /// This waiter alone gets `deadline_exceeded` once this has passed.
        deadline: Option<Duration>,
        /// It gets the evaluation's progress reports.
        progress: bool,
    },
    /// Wait for a key whoever submits it.
    Subscribe {
        session: SessionId,
        id: ReqId,
        key: Key,
        progress: bool,
    },
    /// The running job `gen` reported progress (`data`: JSON).
    Progress { gen: Gen, data: Arc<str> },
    /// Report a key's state.
    Get {
        session: SessionId,
        id: ReqId,
        key: Key,
    },
    /// Stop this session's waits on a key.
    Cancel {
        session: SessionId,
        id: ReqId,
        key: Key,
    },
    /// The session is gone: its waits and holds go.
    SessionClosed { session: SessionId },
    /// The executor started job `gen` (on `worker`, for a remote one).
    Started { gen: Gen, worker: Option<Arc<str>> },
    /// The worker running job `gen` went away; it waits in its queue again.
    Requeued { gen: Gen },
    /// Job `gen` of `key`, of fn `evaluator`, ended (a late one, after
    /// its job ended, too).
    Finished {
        key: Key,
        gen: Gen,
        evaluator: usize,
        outcome: Result<Arc<str>, EvalError>,
        eval_ms: f64,
    },
    /// The executor had no room for job `gen`.
    Refused { gen: Gen, reason: &'static str },
    /// Redis's reply to the command [`Effect::Redis`] `op` (None: it did
    /// not answer in time).
    Redis { op: OpId, reply: Option<RedisReply> },
    /// What the completion channel's listener saw.
    Pubsub(PubsubEvent),
    /// Drop a key's result or every result of a fn (`invalidate`).
    Invalidate {
        session: SessionId,
        id: ReqId,
        target: Target,
    },
}

/// What an invalidation drops: one key's result, or every result of a fn
/// in a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Key(Key),
    Fn(Ns, usize),
}

impl Target {
    /// Whether it drops the result of `key`, of fn `evaluator`.
    pub fn covers(&self, key: Key, evaluator: usize) -> bool {
        match *self {
            Target::Key(k) => k == key,
            Target::Fn(ns, e) => ns == key.ns() && e == evaluator,
        }
    }
}

/// Where a job stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Asking the cluster for the result or a claim.
    Asking,
    /// Another broker holds the claim; its notice will come.
    Waiting,
    /// Offered to its executor, not started.
    Queued,
    /// Running on its executor.
    Running,
    /// Evaluated here under a claim that may have lapsed (the job outlived
    /// half a lease): its outcome waits for Redis's word on whose result
    /// stands (a verdict).
    Storing,
}

/// A key's state, as reported to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Queued,
    Running,
    Unknown,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Queued => "queued",
            KeyState::Running => "running",
            KeyState::Unknown => "unknown",
        }
    }
}

/// An answer to one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Accepted {
        key: Key,
        evaluator: usize,
        state: KeyState,
        first: bool,
        waiters: usize,
        priority: Priority,
    },
    Subscribed {
        key: Key,
        state: KeyState,
    },
    Status {
        key: Key,
        state: KeyState,
        waiters: usize,
        age_ms: u64,
        /// The latest progress report: its `seq` and data.
        progress: Option<(u64, Arc<str>)>,
    },
    Cancelled {
        key: Key,
    },
    Invalidated {
        target: Target,
    },
    Rejected {
        code: ErrorCode,
        message: &'static str,
    },
}

/// One request waiting for a key's outcome.
#[derive(Debug, Clone)]
pub struct Waiter {
    pub session: SessionId,
    pub id: ReqId,
    /// When the submit was applied; None for a subscription.
    pub since: Option<Instant>,
    /// It asked for progress reports.
    pub progress: bool,
    /// Its own deadline, and the number its timer goes by.
    pub deadline: Option<(Instant, u64)>,
}

/// Who computed an outcome.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Source {
    /// This broker, in `eval_ms`.
    Eval { eval_ms: f64 },
    /// Another broker, or the cluster's store; computed at `at_ms` (Unix
    /// ms) when known.
    Cluster { at_ms: Option<u64> },
}

/// A key's outcome, for all its waiters at once.
#[derive(Debug)]
pub struct Delivery {
    pub key: Key,
    /// The fn of the job that ended, when there was one here.
    pub evaluator: Option<usize>,
    /// The claim of the evaluation its waiters joined, in a cluster (None:
    /// subscriptions, or a job that ran without one).
    pub claim: Option<Arc<str>>,
    pub outcome: Result<Arc<str>, EvalError>,
    pub source: Source,
    pub waiters: Vec<Waiter>,
}

/// What must happen, for the caller to perform.
#[derive(Debug)]
pub enum Effect {
    /// Answer one request.
    Reply {
        session: SessionId,
        id: ReqId,
        reply: Reply,
    },
    /// Hand an outcome to every waiter of a key.
    Deliver(Delivery),
    /// Every waiter of a key gets `busy`: the job could not be queued.
    Busy {
        waiters: Vec<Waiter>,
        message: &'static str,
    },
    /// Queue job `gen` on its evaluator.
    Offer {
        evaluator: usize,
        key: Key,
        gen: Gen,
        input: Arc<str>,
        priority: Priority,
    },
    /// Job `gen`, queued, now starts at `priority` (a waiter asked for more).
    Raise {
        evaluator: usize,
        gen: Gen,
        priority: Priority,
    },
    /// Progress report `seq` of the evaluation of `key`, for these waiters
    /// (each request that asked for progress).
    Progress {
        key: Key,
        seq: u64,
        data: Arc<str>,
        to: Vec<(SessionId, ReqId)>,
    },
    /// One waiter's deadline passed: it gets `deadline_exceeded`; the
    /// evaluation goes on for the others.
    DeadlineExceeded {
        session: SessionId,
        id: ReqId,
        key: Key,
        /// The deadline it asked for.
        deadline_ms: u64,
    },
    /// Take job `gen` back: out of its queue, or from whoever runs it.
    /// `overran`: it ran past its deadline.
    Withdraw {
        evaluator: usize,
        gen: Gen,
        overran: bool,
    },
    /// Keep this outcome of fn `evaluator` in the results cache; `at_ms`:
    /// when it was computed elsewhere (Unix ms), None: just now.
    Cache {
        key: Key,
        evaluator: usize,
        outcome: Result<Arc<str>, EvalError>,
        at_ms: Option<u64>,
    },
    /// Drop cached results (a key's, or a whole fn's).
    Drop(Target),
    /// Send Redis this command; its reply comes back as [`Input::Redis`].
    Redis { op: OpId, cmd: RedisOp },
    /// The results cache may be served until then (in a cluster it is
    /// served only while this broker has heard every invalidation).
    ConfirmCache(Instant),
    /// Nothing cached so far may be served again.
    ForgetCache,
}

/// One in-flight job, for the dashboard.
#[derive(Debug, Clone)]
pub struct InflightRow {
    pub key: Key,
    pub evaluator: usize,
    pub running: bool,
    pub waiters: usize,
    pub worker: Option<Arc<str>>,
    /// The claim of the broker evaluating it, while this one waits on it.
    pub elsewhere: Option<Arc<str>>,
    pub queued_at: Instant,
    pub age_ms: u64,
    pub preview: Arc<str>,
    pub priority: Priority,
    /// The latest progress report: its `seq` and data.
    pub progress: Option<(u64, Arc<str>)>,
}

/// Counts the driver publishes (gauges and the drain).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub entries: usize,
    pub jobs: usize,
    pub queued: usize,
    pub running: usize,
    pub sessions: usize,
    pub timers: usize,
}

struct Job {
    evaluator: usize,
    gen: Gen,
    phase: Phase,
    /// Kept until the job is offered (the cluster may hand it over later).
    input: Option<Arc<str>>,
    input_len: usize,
    /// This broker holds the cluster's claim for this job.
    claimed: bool,
    /// The claim this job holds, or waits on (another broker's).
    claim: Option<Arc<str>>,
    /// Its claim may have run out by the time it finishes from then on (it
    /// was asked for half a lease before; None: taken over, when the
    /// claimant whose lease ran out may still be evaluating).
    claim_fresh_until: Option<Instant>,
    deadline: Option<Instant>,
    queued_at: Instant,
    worker: Option<Arc<str>>,
    preview: Arc<str>,
    /// Sessions whose `wait:false` submit asked for this job.
    wanted: Vec<SessionId>,
    /// In `Storing`: this broker's outcome and its evaluation time.
    evaluated: Option<(Result<Arc<str>, EvalError>, f64)>,
    /// Its result was invalidated while it ran: delivered, never kept.
    dropped: bool,
    /// While asking: the last outcome announced under a claim, in case
    /// this job then finds that claim is the one to wait on.
    heard: Option<Heard>,
    /// The highest priority among its submits.
    priority: Priority,
    /// Its progress reports.
    reports: Reports,
    /// In a cluster: when its last report was announced to the other
    /// brokers, and when the latest one held back (rate-bounded) will be.
    announced_at: Option<Instant>,
    announce_at: Option<Instant>,
}

/// An evaluation's progress reports: the latest ones, within
/// `progress_bytes`, for waiters that join it later.
#[derive(Default)]
struct Reports {
    /// The last report's `seq` (they count from 1).
    seq: u64,
    kept: VecDeque<(u64, Arc<str>)>,
    bytes: usize,
}

impl Reports {
    fn add(&mut self, data: Arc<str>, max_bytes: usize) -> u64 {
        self.add_at(self.seq + 1, data, max_bytes)
    }

    /// Adds report `seq` (later than any kept).
    fn add_at(&mut self, seq: u64, data: Arc<str>, max_bytes: usize) -> u64 {
        self.seq = seq;
        self.bytes += data.len();
        self.kept.push_back((self.seq, data));
        while self.bytes > max_bytes && self.kept.len() > 1 {
            let (_, old) = self.kept.pop_front().expect("more than one");
            self.bytes -= old.len();
        }
        self.seq
    }

    fn latest(&self) -> Option<(u64, Arc<str>)> {
        self.kept.back().cloned()
    }
}

/// What a submit asked for besides its input.
#[derive(Debug, Clone, Copy)]
struct Asked {
    priority: Priority,
    deadline: Option<Duration>,
    progress: bool,
}

/// An outcome announced under a claim, heard by a job still asking.
struct Heard {
    claim: Arc<str>,
    outcome: Result<Arc<str>, EvalError>,
    at_ms: u64,
    keep: bool,
}

impl Job {
    /// The state reported to clients.
    fn state(&self) -> KeyState {
        match self.phase {
            Phase::Running | Phase::Storing => KeyState::Running,
            _ => KeyState::Queued,
        }
    }
}

#[derive(Default)]
struct Entry {
    waiters: Vec<Waiter>,
    job: Option<Job>,
    /// The cluster looks this key up for its subscribers.
    looked: bool,
}

#[derive(Default)]
struct SessionWaits {
    /// Waits plus `wait:false` holds: at most `max_pending`.
    total: usize,
    /// The namespace of its keys.
    ns: Ns,
    by_key: HashMap<Key, u32>,
    subscribed: HashSet<Key>,
    /// Jobs this session's `wait:false` submits hold.
    holds: Vec<Gen>,
}

/// The message of a `busy` answer to a session at `limits.max_pending`.
pub const PENDING_FULL: &str = "too many pending waits on this session (limits.max_pending)";
/// The message of a `busy` answer to a session whose namespace is at its
/// `max_pending`.
pub const NS_PENDING_FULL: &str =
    "too many pending waits in this namespace (its max_pending, of [[namespace]] or [namespace_defaults])";
/// The message of a `busy` answer for a full queue (jobs).
pub const QUEUE_FULL: &str = "the evaluation queue is full (queue_capacity)";
/// The message of a `busy` answer for a full queue (bytes).
pub const QUEUE_BYTES_FULL: &str = "the evaluation queue holds its most input bytes (queue_bytes)";
/// The message of a `shutting_down` answer.
pub const DRAINING: &str = "the broker is draining and takes no new work";

/// The wait table and the jobs; see the module doc.
pub struct Core {
    config: CoreConfig,
    table: HashMap<Key, Entry>,
    sessions: HashMap<SessionId, SessionWaits>,
    /// Waits and holds of each namespace with a `max_pending`, its
    /// sessions' together.
    ns_held: HashMap<Ns, usize>,
    /// Deadlines, as (when, generation).
    timers: BTreeSet<(Instant, Gen)>,
    /// The key of each live job.
    by_gen: HashMap<Gen, Key>,
    /// Per evaluator: jobs `Queued`, and their input bytes.
    queues: Vec<(usize, usize)>,
    next_gen: Gen,
    running: usize,
    effects: VecDeque<Effect>,
    /// The cluster's decisions (cluster mode).
    cluster: Option<Coordinator>,
    /// The time of the input being applied.
    now: Instant,
    /// In a cluster: what was dropped lately (oldest first). For one lease
    /// after a drop (and after its invalidation is answered), outcomes of
    /// it from the cluster are delivered but not cached: they may have
    /// been computed before it and been under way meanwhile.
    recent_drops: VecDeque<(Instant, Target)>,
    /// Jobs before this one were under way at the last drop: an outcome of
    /// one that comes after its job ended is delivered but not cached.
    drops_before: Gen,
    /// Waiters' own deadlines, as (when, waiter number).
    deadlines: BTreeSet<(Instant, u64)>,
    /// When each job's held-back progress report is announced (cluster).
    announcements: BTreeSet<(Instant, Gen)>,
    /// The key each waiter number waits on.
    deadline_keys: HashMap<u64, Key>,
    next_waiter: u64,
}

impl Core {
    /// A core at `now`; `unix_ms` is the wall clock then (results stored in
    /// a cluster say when they were computed).
    pub fn new(config: CoreConfig, now: Instant, unix_ms: u64) -> Self {
        let queues = vec![(0, 0); config.fns.len()];
        let cluster = config.cluster.clone().map(|cluster| {
            let names = config.fns.iter().map(|f| Arc::clone(&f.name)).collect();
            Coordinator::new(cluster, names, now, unix_ms)
        });
        Core {
            config,
            table: HashMap::new(),
            sessions: HashMap::new(),
            ns_held: HashMap::new(),
            timers: BTreeSet::new(),
            by_gen: HashMap::new(),
            queues,
            next_gen: 0,
            running: 0,
            effects: VecDeque::new(),
            cluster,
            now,
            recent_drops: VecDeque::new(),
            drops_before: 0,
            deadlines: BTreeSet::new(),
            announcements: BTreeSet::new(),
            deadline_keys: HashMap::new(),
            next_waiter: 0,
        }
    }

    /// The next effect to perform.
    pub fn poll(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    /// When [`Core::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let jobs = self.timers.first().map(|(at, _)| *at);
        let waiters = self.deadlines.first().map(|(at, _)| *at);
        let announcements = self.announcements.first().map(|(at, _)| *at);
        let table = [jobs, waiters, announcements].into_iter().flatten().min();
        let cluster = self.cluster.as_ref().map(Coordinator::next_timer);
        match (table, cluster) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn counts(&self) -> Counts {
        let queued = self.queues.iter().map(|q| q.0).sum();
        Counts {
            entries: self.table.len(),
            jobs: self.by_gen.len(),
            queued,
            running: self.running,
            sessions: self.sessions.len(),
            timers: self.timers.len() + self.deadlines.len(),
        }
    }

    /// The cluster's figures (cluster mode).
    pub fn cluster_status(&self) -> Option<ClusterStatus> {
        self.cluster.as_ref().map(Coordinator::status)
    }

    /// What the cluster's decisions hold ([`Coordinator::holding`]).
    pub fn cluster_holding(&self) -> [usize; 8] {
        self.cluster.as_ref().map_or([0; 8], Coordinator::holding)
    }

    /// Fn `evaluator`'s epoch in `ns`, as this broker knows it (cluster mode).
    pub fn cluster_epoch(&self, ns: Ns, evaluator: usize) -> u64 {
        self.cluster.as_ref().map_or(0, |c| c.epoch(ns, evaluator))
    }

    /// Waits a session holds (for its bound).
    pub fn held_by(&self, session: SessionId) -> usize {
        self.sessions.get(&session).map_or(0, |s| s.total)
    }

    /// Waits a namespace with a `max_pending` holds, its sessions' together.
    pub fn held_in(&self, ns: Ns) -> usize {
        self.ns_held.get(&ns).copied().unwrap_or(0)
    }

    /// Jobs queued on evaluator `evaluator`, and their input bytes.
    pub fn queued(&self, evaluator: usize) -> (usize, usize) {
        self.queues[evaluator]
    }

    /// Checks what the table's counts say against what it holds: each
    /// session's count is its waits plus its holds, each wait is in the
    /// table, each namespace's count is its sessions', each queue's count
    /// is its queued jobs', and no timer outlives its job.
    pub fn audit(&self) -> Result<(), String> {
        let mut ns_held: HashMap<Ns, usize> = HashMap::new();
        for (id, waits) in &self.sessions {
            let by_key: usize = waits.by_key.values().map(|n| *n as usize).sum();
            if waits.total != by_key + waits.holds.len() {
                return Err(format!(
                    "session {id} counts {} held, but waits {by_key} and holds {}",
                    waits.total,
                    waits.holds.len()
                ));
            }
            for (key, n) in &waits.by_key {
                let in_table = self
                    .table
                    .get(key)
                    .map_or(0, |e| e.waiters.iter().filter(|w| w.session == *id).count());
                if in_table != *n as usize {
                    return Err(format!(
                        "session {id} counts {n} waits on {key:?}, the table {in_table}"
                    ));
                }
            }
            for gen in &waits.holds {
                let held = self
                    .by_gen
                    .get(gen)
                    .and_then(|k| self.job(k))
                    .is_some_and(|j| j.wanted.contains(id));
                if !held {
                    return Err(format!(
                        "session {id} holds job {gen}, which does not want it"
                    ));
                }
            }
            if self.ns_max_pending(waits.ns).is_some() {
                *ns_held.entry(waits.ns).or_default() += waits.total;
            }
        }
        ns_held.retain(|_, n| *n > 0);
        if ns_held != self.ns_held {
            return Err(format!(
                "namespaces count {:?}, their sessions {ns_held:?}",
                self.ns_held
            ));
        }
        for (key, entry) in &self.table {
            if entry.waiters.is_empty() && entry.job.is_none() {
                return Err(format!("{key:?} has an entry with nothing in it"));
            }
            for w in &entry.waiters {
                let counted = self
                    .sessions
                    .get(&w.session)
                    .and_then(|s| s.by_key.get(key))
                    .is_some();
                if !counted {
                    return Err(format!("{key:?} has a waiter its session does not count"));
                }
            }
        }
        let waiting: usize = self.table.values().map(|e| e.waiters.len()).sum();
        let with_deadline = self
            .table
            .values()
            .flat_map(|e| &e.waiters)
            .filter(|w| w.deadline.is_some())
            .count();
        if self.deadlines.len() != with_deadline || self.deadline_keys.len() != with_deadline {
            return Err(format!(
                "{} deadlines ({} keys) for {with_deadline} waiters with one (of {waiting})",
                self.deadlines.len(),
                self.deadline_keys.len()
            ));
        }
        for (at, gen) in &self.announcements {
            let due = self
                .by_gen
                .get(gen)
                .and_then(|k| self.job(k))
                .and_then(|j| j.announce_at);
            if due != Some(*at) {
                return Err(format!(
                    "an announcement of job {gen} at {at:?}, due {due:?}"
                ));
            }
        }
        if self.timers.len() > self.by_gen.len() {
            return Err(format!(
                "{} timers for {} jobs",
                self.timers.len(),
                self.by_gen.len()
            ));
        }
        let mut queues = vec![(0usize, 0usize); self.queues.len()];
        let mut running = 0;
        for entry in self.table.values() {
            if let Some(job) = &entry.job {
                match job.phase {
                    Phase::Queued => {
                        queues[job.evaluator].0 += 1;
                        queues[job.evaluator].1 += job.input_len;
                    }
                    Phase::Running => running += 1,
                    _ => {}
                }
                if job.deadline.is_none() {
                    return Err(format!("job {} has no deadline", job.gen));
                }
            }
        }
        if queues != self.queues || running != self.running {
            return Err(format!(
                "queues count {:?} and {} running; the jobs say {queues:?} and {running}",
                self.queues, self.running
            ));
        }
        Ok(())
    }

    /// The oldest in-flight jobs (at most `limit`, unsorted).
    pub fn view(&self, now: Instant, limit: usize) -> Vec<InflightRow> {
        let mut jobs: Vec<(&Key, &Entry, &Job)> = self
            .table
            .iter()
            .filter_map(|(k, e)| e.job.as_ref().map(|j| (k, e, j)))
            .collect();
        if jobs.len() > limit {
            jobs.select_nth_unstable_by_key(limit, |(_, _, j)| j.queued_at);
            jobs.truncate(limit);
        }
        jobs.into_iter()
            .map(|(key, entry, job)| InflightRow {
                key: *key,
                evaluator: job.evaluator,
                running: job.state() == KeyState::Running,
                waiters: entry.waiters.len(),
                worker: job.worker.clone(),
                elsewhere: (job.phase == Phase::Waiting)
                    .then(|| job.claim.clone())
                    .flatten(),
                queued_at: job.queued_at,
                age_ms: now.saturating_duration_since(job.queued_at).as_millis() as u64,
                preview: Arc::clone(&job.preview),
                priority: job.priority,
                progress: job.reports.latest(),
            })
            .collect()
    }

    /// Applies one input at `now`.
    pub fn apply(&mut self, input: Input, now: Instant) {
        self.now = now;
        match input {
            Input::Submit {
                session,
                id,
                key,
                evaluator,
                input,
                wait,
                draining,
                max_age,
                priority,
                deadline,
                progress,
            } => {
                let asked = Asked {
                    priority,
                    deadline,
                    progress,
                };
                self.submit(
                    session, id, key, evaluator, input, wait, draining, max_age, asked, now,
                )
            }
            Input::Subscribe {
                session,
                id,
                key,
                progress,
            } => self.subscribe(session, id, key, progress),
            Input::Progress { gen, data } => self.progress(gen, data),
            Input::Get { session, id, key } => self.get(session, id, key, now),
            Input::Cancel { session, id, key } => {
                self.remove_waits(session, key);
                self.reply(session, id, Reply::Cancelled { key });
            }
            Input::SessionClosed { session } => self.session_closed(session),
            Input::Started { gen, worker } => self.started(gen, worker, now),
            Input::Requeued { gen } => {
                if let Some(job) = self.job_mut(gen) {
                    if job.phase == Phase::Running {
                        job.phase = Phase::Queued;
                        job.worker = None;
                        let (evaluator, len) = (job.evaluator, job.input_len);
                        // Waiters that joined while it ran may have raised it.
                        let priority = job.priority;
                        self.running -= 1;
                        self.queues[evaluator].0 += 1;
                        self.queues[evaluator].1 += len;
                        self.effects.push_back(Effect::Raise {
                            evaluator,
                            gen,
                            priority,
                        });
                    }
                }
            }
            Input::Finished {
                key,
                gen,
                evaluator,
                outcome,
                eval_ms,
            } => self.finished(key, gen, evaluator, outcome, eval_ms, now),
            Input::Refused { gen, reason } => {
                // Only a job waiting in its queue can be refused.
                if self.job_mut(gen).is_some_and(|j| j.phase == Phase::Queued) {
                    let key = self.by_gen[&gen];
                    self.busy(key, reason);
                }
            }
            Input::Redis { op, reply } => {
                if let Some(cluster) = self.cluster.as_mut() {
                    cluster.reply(op, reply, now, &mut self.effects);
                }
            }
            Input::Pubsub(event) => {
                if let Some(cluster) = self.cluster.as_mut() {
                    cluster.pubsub(event, now, &mut self.effects);
                }
            }
            Input::Invalidate {
                session,
                id,
                target,
            } => self.invalidate(session, id, target, now),
        }
        self.hear_cluster();
    }

    /// Fires every deadline at or before `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        while let Some(&(at, gen)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            if let Some(job) = self.job_mut(gen) {
                job.deadline = None;
                self.expired(gen);
            }
            self.hear_cluster();
        }
        while let Some(&(at, number)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            self.deadline_passed(number);
            self.hear_cluster();
        }
        while let Some(&(at, gen)) = self.announcements.first() {
            if at > now {
                break;
            }
            self.announcements.pop_first();
            if let Some(job) = self.job_mut(gen) {
                job.announce_at = None;
                self.announce(gen, now);
            }
        }
        if let Some(cluster) = self.cluster.as_mut() {
            if cluster.next_timer() <= now {
                cluster.tick(now, &mut self.effects);
            }
        }
        self.hear_cluster();
    }

    fn clustered(&self) -> bool {
        self.cluster.is_some()
    }

    fn lease(&self) -> Duration {
        self.config
            .cluster
            .as_ref()
            .map_or(Duration::ZERO, |c| c.lease)
    }

    /// Hands a command to the cluster's decisions.
    fn ask(&mut self, cmd: ClusterCmd) {
        if let Some(cluster) = self.cluster.as_mut() {
            cluster.command(cmd, self.now, &mut self.effects);
        }
    }

    /// Applies what the cluster's decisions concluded, until nothing is left.
    fn hear_cluster(&mut self) {
        while let Some(event) = self.cluster.as_mut().and_then(Coordinator::take_event) {
            self.cluster_event(event, self.now);
        }
    }

    /// Drops the cached results `target` names; the evaluations under way
    /// for them are delivered to their waiters but not kept.
    fn invalidate(&mut self, session: SessionId, id: ReqId, target: Target, now: Instant) {
        self.drop_results(target, now);
        if self.clustered() {
            // Answered once Redis has it and every broker has dropped it.
            return self.ask(ClusterCmd::Invalidate {
                target,
                session,
                id,
            });
        }
        self.reply(session, id, Reply::Invalidated { target });
    }

    /// Drops the cached results `target` names here, and keeps the
    /// evaluations under way for them from being kept.
    fn drop_results(&mut self, target: Target, now: Instant) {
        self.effects.push_back(Effect::Drop(target));
        self.drops_before = self.next_gen;
        if let Some(cluster) = self.cluster.as_mut() {
            cluster.dropped(target);
        }
        if self.clustered() {
            self.remember_drop(target, now);
        }
        match target {
            Target::Key(key) => {
                if let Some(job) = self.table.get_mut(&key).and_then(|e| e.job.as_mut()) {
                    job.dropped = true;
                }
            }
            Target::Fn(..) => {
                for (key, entry) in self.table.iter_mut() {
                    if let Some(job) = entry.job.as_mut() {
                        if target.covers(*key, job.evaluator) {
                            job.dropped = true;
                        }
                    }
                }
            }
        }
    }

    fn reply(&mut self, session: SessionId, id: ReqId, reply: Reply) {
        self.effects.push_back(Effect::Reply { session, id, reply });
    }

    fn job_mut(&mut self, gen: Gen) -> Option<&mut Job> {
        let key = self.by_gen.get(&gen)?;
        self.table
            .get_mut(key)?
            .job
            .as_mut()
            .filter(|j| j.gen == gen)
    }

    fn job(&self, key: &Key) -> Option<&Job> {
        self.table.get(key)?.job.as_ref()
    }

    fn job_mut_of(&mut self, key: &Key) -> Option<&mut Job> {
        self.table.get_mut(key)?.job.as_mut()
    }

    fn set_deadline(&mut self, gen: Gen, at: Option<Instant>) {
        let Some(job) = self.job_mut(gen) else {
            return;
        };
        let old = std::mem::replace(&mut job.deadline, at);
        if let Some(old) = old {
            self.timers.remove(&(old, gen));
        }
        if let Some(at) = at {
            self.timers.insert((at, gen));
        }
    }

    /// Why `session` (in namespace `ns`) may hold no more waits.
    fn no_room(&self, session: SessionId, ns: Ns) -> Option<&'static str> {
        if self.held_by(session) >= self.config.max_pending {
            return Some(PENDING_FULL);
        }
        let max = self.ns_max_pending(ns)?;
        let held = self.ns_held.get(&ns).copied().unwrap_or(0);
        (held >= max).then_some(NS_PENDING_FULL)
    }

    /// The bound on the waits and holds of namespace `ns`'s sessions.
    fn ns_max_pending(&self, ns: Ns) -> Option<usize> {
        match self.config.ns_max_pending.get(&ns) {
            Some(max) => Some(*max),
            None if ns.is_shared() => None,
            None => self.config.ns_default_max_pending,
        }
    }

    /// Counts `n` more waits or holds of `session` (of namespace `ns`).
    fn hold(&mut self, session: SessionId, ns: Ns, n: usize) -> &mut SessionWaits {
        if self.ns_max_pending(ns).is_some() {
            *self.ns_held.entry(ns).or_default() += n;
        }
        let waits = self.sessions.entry(session).or_default();
        waits.ns = ns;
        waits.total += n;
        waits
    }

    /// Takes `n` waits or holds from its namespace's count.
    fn unhold_ns(ns_held: &mut HashMap<Ns, usize>, ns: Ns, n: usize) {
        if let Some(held) = ns_held.get_mut(&ns) {
            *held = held.saturating_sub(n);
            if *held == 0 {
                ns_held.remove(&ns);
            }
        }
    }

    /// Why evaluator `evaluator`'s queue cannot take `len` more bytes.
    fn queue_full(&self, evaluator: usize, len: usize) -> Option<&'static str> {
        let limits = &self.config.fns[evaluator];
        let (jobs, bytes) = self.queues[evaluator];
        if jobs >= limits.queue_capacity {
            Some(QUEUE_FULL)
        } else if bytes.saturating_add(len) > limits.queue_bytes {
            Some(QUEUE_BYTES_FULL)
        } else {
            None
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn submit(
        &mut self,
        session: SessionId,
        id: ReqId,
        key: Key,
        evaluator: usize,
        input: Arc<str>,
        wait: bool,
        draining: bool,
        max_age: Option<std::time::Duration>,
        asked: Asked,
        now: Instant,
    ) {
        let job = self.job(&key);
        let joined = job.is_some();
        // A wait:false submit of a job this session already asked for holds nothing new.
        let holds_new = wait || !job.is_some_and(|j| j.wanted.contains(&session));
        if let Some(message) = self.no_room(session, key.ns()).filter(|_| holds_new) {
            let reply = Reply::Rejected {
                code: ErrorCode::Busy,
                message,
            };
            return self.reply(session, id, reply);
        }
        if !joined {
            if draining {
                let reply = Reply::Rejected {
                    code: ErrorCode::ShuttingDown,
                    message: DRAINING,
                };
                return self.reply(session, id, reply);
            }
            let clustered = self.clustered();
            if !clustered {
                if let Some(message) = self.queue_full(evaluator, input.len()) {
                    let reply = Reply::Rejected {
                        code: ErrorCode::Busy,
                        message,
                    };
                    return self.reply(session, id, reply);
                }
            }
            self.start_job(key, evaluator, input, max_age, asked.priority, now);
        }
        // What the cluster answers is applied after this submit, so its
        // `accepted` comes first.
        let job = self
            .job_mut_of(&key)
            .expect("the job was just made or found");
        if asked.priority > job.priority {
            job.priority = asked.priority;
            if job.phase == Phase::Queued {
                let raise = Effect::Raise {
                    evaluator: job.evaluator,
                    gen: job.gen,
                    priority: asked.priority,
                };
                self.effects.push_back(raise);
            }
        }
        let job = self.job(&key).expect("just found");
        let (state, gen, priority) = (job.state(), job.gen, job.priority);
        let entry = self.table.get(&key).expect("the job's entry");
        let waiters = entry.waiters.len() + usize::from(wait);
        if !wait && holds_new {
            self.job_mut(gen).expect("just found").wanted.push(session);
            self.hold(session, key.ns(), 1).holds.push(gen);
        }
        let accepted = Reply::Accepted {
            key,
            evaluator,
            state,
            first: !joined,
            waiters,
            priority,
        };
        self.reply(session, id.clone(), accepted);
        if wait {
            let deadline = asked
                .deadline
                .and_then(|d| now.checked_add(d))
                .map(|at| (at, self.next_waiter));
            self.add_waiter(
                key,
                Waiter {
                    session,
                    id,
                    since: Some(now),
                    progress: asked.progress,
                    deadline,
                },
            );
        }
    }

    /// A new job for `key`: asking the cluster first, or queued at once on a
    /// lone broker (the caller checked its queue's room).
    fn start_job(
        &mut self,
        key: Key,
        evaluator: usize,
        input: Arc<str>,
        max_age: Option<Duration>,
        priority: Priority,
        now: Instant,
    ) {
        let gen = self.next_gen;
        self.next_gen += 1;
        let preview: Arc<str> = input
            .chars()
            .take(self.config.preview_chars)
            .collect::<String>()
            .into();
        self.by_gen.insert(gen, key);
        self.table.entry(key).or_default().job = Some(Job {
            evaluator,
            gen,
            phase: Phase::Asking,
            input_len: input.len(),
            input: Some(input),
            claimed: false,
            claim: None,
            claim_fresh_until: None,
            deadline: None,
            queued_at: now,
            worker: None,
            preview,
            wanted: Vec::new(),
            evaluated: None,
            dropped: false,
            heard: None,
            priority,
            reports: Reports::default(),
            announced_at: None,
            announce_at: None,
        });
        if !self.clustered() {
            return self.queue(gen, now);
        }
        let timeout = self.config.fns[evaluator].timeout;
        let lease = self.lease();
        self.set_deadline(gen, now.checked_add(timeout.saturating_add(lease)));
        // A claim lives while its job may: queued, then running, each up
        // to the timeout, then a lease for Redis's verdict.
        let hold = timeout.saturating_mul(2).saturating_add(lease);
        self.ask(ClusterCmd::Acquire {
            key,
            gen,
            evaluator,
            hold,
            max_age,
        });
    }

    /// Offers job `gen` (in `Asking` or `Waiting`, or new) to its executor.
    /// The caller checked the queue's room.
    fn queue(&mut self, gen: Gen, now: Instant) {
        let Some(job) = self.job_mut(gen) else {
            return;
        };
        let Some(input) = job.input.take() else {
            return;
        };
        job.phase = Phase::Queued;
        let priority = job.priority;
        let (evaluator, key) = (job.evaluator, *self.by_gen.get(&gen).expect("a live job"));
        self.queues[evaluator].0 += 1;
        self.queues[evaluator].1 += input.len();
        let at = now.checked_add(self.config.fns[evaluator].timeout);
        self.set_deadline(gen, at);
        self.effects.push_back(Effect::Offer {
            evaluator,
            key,
            gen,
            input,
            priority,
        });
    }

    fn subscribe(&mut self, session: SessionId, id: ReqId, key: Key, progress: bool) {
        let repeated = self
            .sessions
            .get(&session)
            .is_some_and(|s| s.subscribed.contains(&key));
        if let Some(message) = self.no_room(session, key.ns()).filter(|_| !repeated) {
            let reply = Reply::Rejected {
                code: ErrorCode::Busy,
                message,
            };
            return self.reply(session, id, reply);
        }
        let state = self.job(&key).map_or(KeyState::Unknown, Job::state);
        self.reply(session, id.clone(), Reply::Subscribed { key, state });
        let new_entry = !self.table.contains_key(&key);
        if !repeated {
            self.sessions
                .entry(session)
                .or_default()
                .subscribed
                .insert(key);
            self.add_waiter(
                key,
                Waiter {
                    session,
                    id,
                    since: None,
                    progress,
                    deadline: None,
                },
            );
        }
        if new_entry && self.clustered() {
            // The result may be in the cluster's store already, or land
            // there while a notice is lost: the cluster looks until the
            // entry goes.
            if let Some(entry) = self.table.get_mut(&key) {
                entry.looked = true;
            }
            self.ask(ClusterCmd::Lookup { key });
        }
    }

    /// Adds a waiter: its wait is counted, its deadline set, and the
    /// reports made so far go to it first if it asked for progress.
    fn add_waiter(&mut self, key: Key, waiter: Waiter) {
        let waits = self.hold(waiter.session, key.ns(), 1);
        *waits.by_key.entry(key).or_default() += 1;
        if let Some((at, number)) = waiter.deadline {
            self.next_waiter = self.next_waiter.max(number + 1);
            self.deadlines.insert((at, number));
            self.deadline_keys.insert(number, key);
        }
        let entry = self.table.entry(key).or_default();
        if waiter.progress {
            if let Some(job) = &entry.job {
                for (seq, data) in &job.reports.kept {
                    self.effects.push_back(Effect::Progress {
                        key,
                        seq: *seq,
                        data: Arc::clone(data),
                        to: vec![(waiter.session, waiter.id.clone())],
                    });
                }
            }
        }
        entry.waiters.push(waiter);
    }

    /// A waiter leaves: its deadline's timer goes.
    fn forget_deadline(&mut self, waiter: &Waiter) {
        if let Some((at, number)) = waiter.deadline {
            self.deadlines.remove(&(at, number));
            self.deadline_keys.remove(&number);
        }
    }

    /// Waiter `number`'s deadline passed: it alone is answered
    /// `deadline_exceeded`, and leaves as if cancelled.
    fn deadline_passed(&mut self, number: u64) {
        let Some(key) = self.deadline_keys.remove(&number) else {
            return;
        };
        let Some(entry) = self.table.get_mut(&key) else {
            return;
        };
        let Some(at) = entry
            .waiters
            .iter()
            .position(|w| w.deadline.is_some_and(|(_, n)| n == number))
        else {
            return;
        };
        let waiter = entry.waiters.remove(at);
        let (when, _) = waiter.deadline.expect("found by its deadline");
        self.release_wait(waiter.session, key, false);
        let asked = when.saturating_duration_since(waiter.since.unwrap_or(when));
        self.effects.push_back(Effect::DeadlineExceeded {
            session: waiter.session,
            id: waiter.id,
            key,
            deadline_ms: asked.as_millis() as u64,
        });
        self.maybe_abandon(key);
    }

    /// Job `gen` reported progress: it goes to every waiter that asked,
    /// and is kept for those that join later.
    fn progress(&mut self, gen: Gen, data: Arc<str>) {
        let max_bytes = self.config.progress_bytes;
        let Some(key) = self.by_gen.get(&gen).copied() else {
            return;
        };
        let Some(entry) = self.table.get_mut(&key) else {
            return;
        };
        let Some(job) = entry.job.as_mut() else {
            return;
        };
        if !matches!(job.phase, Phase::Queued | Phase::Running) {
            return;
        }
        let seq = job.reports.add(Arc::clone(&data), max_bytes);
        let shared = job.claimed;
        self.tell_progress(key, seq, data);
        if shared {
            // Other brokers' waiters of this evaluation hear it too.
            let now = self.now;
            self.announce(gen, now);
        }
    }

    /// Progress report `seq` of `key`'s evaluation, to each of its waiters
    /// that asked for progress.
    fn tell_progress(&mut self, key: Key, seq: u64, data: Arc<str>) {
        let Some(entry) = self.table.get(&key) else {
            return;
        };
        let to: Vec<(SessionId, ReqId)> = entry
            .waiters
            .iter()
            .filter(|w| w.progress)
            .map(|w| (w.session, w.id.clone()))
            .collect();
        if !to.is_empty() {
            self.effects
                .push_back(Effect::Progress { key, seq, data, to });
        }
    }

    /// Announces job `gen`'s latest report to the other brokers now, or,
    /// within `cluster.progress_per_s` of the last, once that allows (the
    /// latest then wins).
    fn announce(&mut self, gen: Gen, now: Instant) {
        let per_s = self.config.cluster.as_ref().map_or(0, |c| c.progress_per_s);
        if per_s == 0 {
            return;
        }
        let Some(key) = self.by_gen.get(&gen).copied() else {
            return;
        };
        let job = self.job_mut_of(&key).expect("a live job");
        if job.announce_at.is_some() || !matches!(job.phase, Phase::Queued | Phase::Running) {
            return;
        }
        let next = job
            .announced_at
            .map(|at| at + Duration::from_secs(1) / per_s);
        if let Some(next) = next.filter(|n| *n > now) {
            job.announce_at = Some(next);
            self.announcements.insert((next, gen));
            return;
        }
        job.announced_at = Some(now);
        let (Some((seq, data)), Some(claim)) = (job.reports.latest(), job.claim.clone()) else {
            return;
        };
        if let Some(cluster) = self.cluster.as_mut() {
            cluster.progress(&key, &claim, seq, &data, &mut self.effects);
        }
    }

    /// The broker evaluating `key` under `claim` reported progress: the
    /// job here that waits on that claim takes it in and tells its waiters.
    fn heard_progress(&mut self, key: Key, claim: &str, seq: u64, data: Arc<str>) {
        let max_bytes = self.config.progress_bytes;
        let Some(job) = self.job_mut_of(&key) else {
            return;
        };
        let waits_on_it = job.phase == Phase::Waiting && job.claim.as_deref() == Some(claim);
        if !waits_on_it || seq <= job.reports.seq {
            return;
        }
        job.reports.add_at(seq, Arc::clone(&data), max_bytes);
        self.tell_progress(key, seq, data);
    }

    fn get(&mut self, session: SessionId, id: ReqId, key: Key, now: Instant) {
        let reply = match self.table.get(&key) {
            Some(Entry {
                waiters,
                job: Some(job),
                ..
            }) => Reply::Status {
                key,
                state: job.state(),
                waiters: waiters.len(),
                age_ms: now.saturating_duration_since(job.queued_at).as_millis() as u64,
                progress: job.reports.latest(),
            },
            _ => Reply::Status {
                key,
                state: KeyState::Unknown,
                waiters: 0,
                age_ms: 0,
                progress: None,
            },
        };
        self.reply(session, id, reply);
    }

    fn session_closed(&mut self, session: SessionId) {
        let Some(waits) = self.sessions.remove(&session) else {
            return;
        };
        Self::unhold_ns(&mut self.ns_held, waits.ns, waits.total);
        // In key order, so the effects come out the same in every run.
        let mut keys: Vec<Key> = waits.by_key.into_keys().collect();
        keys.sort_unstable();
        for key in keys {
            self.drop_waiters_of(session, key);
        }
        // Its wait:false submits keep their jobs: the work runs on after
        // the session that asked for it is gone (the job still counts in
        // its evaluator's queue bounds, and ends by its deadline at most).
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
        Self::unhold_ns(&mut self.ns_held, waits.ns, n as usize);
        if waits.total == 0 {
            self.sessions.remove(&session);
        }
        self.drop_waiters_of(session, key);
    }

    fn drop_waiters_of(&mut self, session: SessionId, key: Key) {
        let Some(entry) = self.table.get_mut(&key) else {
            return;
        };
        let (gone, stay): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut entry.waiters)
            .into_iter()
            .partition(|w| w.session == session);
        entry.waiters = stay;
        for waiter in &gone {
            self.forget_deadline(waiter);
        }
        self.maybe_abandon(key);
    }

    /// An entry nobody waits on: dropped, or its job kept (see the module doc).
    fn maybe_abandon(&mut self, key: Key) {
        let Some(entry) = self.table.get(&key) else {
            return;
        };
        if !entry.waiters.is_empty() {
            return;
        }
        let Some(job) = &entry.job else {
            self.remove_entry(key);
            return;
        };
        if !job.wanted.is_empty() {
            return;
        }
        let abandon = match job.phase {
            Phase::Asking | Phase::Storing => false,
            Phase::Waiting => true,
            _ if job.claimed => false,
            Phase::Queued => true,
            Phase::Running => self.config.fns[job.evaluator].abandon_running,
        };
        if abandon {
            let (evaluator, phase) = (job.evaluator, job.phase.clone());
            let gen = job.gen;
            if phase == Phase::Waiting {
                self.ask(ClusterCmd::Forget { key, gen });
            } else {
                self.effects.push_back(Effect::Withdraw {
                    evaluator,
                    gen,
                    overran: false,
                });
                if self.clustered() {
                    // A job run without a claim: the cluster forgets it.
                    self.ask(ClusterCmd::Forget { key, gen });
                }
            }
            self.end_job(key);
            self.remove_entry(key);
        }
    }

    /// Removes the entry of `key`; the cluster stops looking it up.
    fn remove_entry(&mut self, key: Key) -> Option<Entry> {
        let entry = self.table.remove(&key)?;
        if entry.looked {
            self.ask(ClusterCmd::Unlook { key });
        }
        Some(entry)
    }

    /// Takes a wait on `key` from the session's count; forgets the session at zero.
    fn release_wait(&mut self, session: SessionId, key: Key, subscription: bool) {
        let Some(waits) = self.sessions.get_mut(&session) else {
            return;
        };
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
        waits.total -= 1;
        Self::unhold_ns(&mut self.ns_held, waits.ns, 1);
        if waits.total == 0 {
            self.sessions.remove(&session);
        }
    }

    /// Takes the hold on job `gen` from the session's count.
    fn release_hold(&mut self, session: SessionId, gen: Gen) {
        let Some(waits) = self.sessions.get_mut(&session) else {
            return;
        };
        let Some(at) = waits.holds.iter().position(|g| *g == gen) else {
            return;
        };
        waits.holds.swap_remove(at);
        waits.total -= 1;
        Self::unhold_ns(&mut self.ns_held, waits.ns, 1);
        if waits.total == 0 {
            self.sessions.remove(&session);
        }
    }

    /// Ends the job of `key` (the entry stays): its timer, queue slot,
    /// running count and `wait:false` holds are released. The claim is the
    /// caller's to release or hand to `Finished`.
    fn end_job(&mut self, key: Key) -> Option<Job> {
        let mut job = self.table.get_mut(&key)?.job.take()?;
        self.by_gen.remove(&job.gen);
        if let Some(at) = job.deadline.take() {
            self.timers.remove(&(at, job.gen));
        }
        if let Some(at) = job.announce_at.take() {
            self.announcements.remove(&(at, job.gen));
        }
        self.leave_executor(job.evaluator, job.input_len, &job.phase);
        for session in std::mem::take(&mut job.wanted) {
            self.release_hold(session, job.gen);
        }
        Some(job)
    }

    /// A job in `phase` leaves its executor's counts: a queue slot, or a
    /// running one.
    fn leave_executor(&mut self, evaluator: usize, input_len: usize, phase: &Phase) {
        match phase {
            Phase::Queued => {
                self.queues[evaluator].0 -= 1;
                self.queues[evaluator].1 -= input_len;
            }
            Phase::Running => self.running -= 1,
            Phase::Asking | Phase::Waiting | Phase::Storing => {}
        }
    }

    /// Removes the entry of `key` and hands back its waiters, releasing
    /// what they held.
    fn take_waiters(&mut self, key: Key) -> Vec<Waiter> {
        let Some(entry) = self.remove_entry(key) else {
            return Vec::new();
        };
        for waiter in &entry.waiters {
            self.release_wait(waiter.session, key, waiter.since.is_none());
            self.forget_deadline(waiter);
        }
        entry.waiters
    }

    fn started(&mut self, gen: Gen, worker: Option<Arc<str>>, now: Instant) {
        let Some(job) = self.job_mut(gen) else {
            return;
        };
        if job.phase != Phase::Queued {
            return;
        }
        job.phase = Phase::Running;
        job.worker = worker;
        let (evaluator, len) = (job.evaluator, job.input_len);
        self.queues[evaluator].0 -= 1;
        self.queues[evaluator].1 -= len;
        self.running += 1;
        let at = now.checked_add(self.config.fns[evaluator].timeout);
        self.set_deadline(gen, at);
    }

    fn finished(
        &mut self,
        key: Key,
        gen: Gen,
        evaluator: usize,
        outcome: Result<Arc<str>, EvalError>,
        eval_ms: f64,
        now: Instant,
    ) {
        let current = self
            .job(&key)
            .is_some_and(|j| j.gen == gen && matches!(j.phase, Phase::Queued | Phase::Running));
        let source = Source::Eval { eval_ms };
        if !current {
            return self.late(key, gen, evaluator, outcome, source);
        }
        let job = self.job(&key).expect("current");
        let stale = self
            .cluster
            .as_ref()
            .is_some_and(|c| !c.began_current(&key, gen, job.evaluator));
        if job.dropped || stale {
            // Invalidated while it ran: its waiters get it, nobody keeps it.
            let job = self.end_job(key).expect("current");
            self.share_dropped(key, &job, &outcome);
            return self.deliver(key, Some(job.evaluator), job.claim, outcome, source);
        }
        // A claim that may have run out: the outcome waits for Redis's
        // word on whose result stands.
        let may_have_lapsed = job.claimed && job.claim_fresh_until.is_none_or(|t| now >= t);
        if may_have_lapsed {
            return self.store_first(key, gen, outcome, eval_ms, now);
        }
        // Cache first: a miss racing this completion then finds the
        // result. In a cluster it is kept once Redis has it (a miss racing
        // it waits behind the store, and finds it there): an invalidation
        // this broker has not heard may have dropped it already.
        if !self.clustered() {
            self.effects.push_back(Effect::Cache {
                key,
                evaluator,
                outcome: outcome.clone(),
                at_ms: None,
            });
        }
        let job = self.end_job(key).expect("current");
        if self.clustered() {
            self.ask(ClusterCmd::Finished {
                key,
                gen: Some(gen),
                evaluator,
                outcome: outcome.clone(),
                how: Finish::Deliver,
            });
        }
        self.deliver(key, Some(job.evaluator), job.claim, outcome, source);
    }

    /// An outcome that came after its job ended (timed out, withdrawn, or
    /// answered from elsewhere). Kept unless something was dropped since
    /// its job began. In a cluster it is only offered to Redis (stored if
    /// nothing is, and then announced to every broker, this one included):
    /// this broker's cache holds what Redis holds. On a lone broker it is
    /// cached and reaches whoever waits on the key now.
    fn late(
        &mut self,
        key: Key,
        gen: Gen,
        evaluator: usize,
        outcome: Result<Arc<str>, EvalError>,
        source: Source,
    ) {
        let keep = outcome.is_ok() && gen >= self.drops_before;
        if self.clustered() {
            if keep {
                self.ask(ClusterCmd::Finished {
                    key,
                    gen: None,
                    evaluator,
                    outcome,
                    how: Finish::Late,
                });
            }
            return;
        }
        if keep {
            self.effects.push_back(Effect::Cache {
                key,
                evaluator,
                outcome: outcome.clone(),
                at_ms: None,
            });
        }
        let newer = self
            .job(&key)
            .map(|j| (j.gen, j.evaluator, j.phase.clone()));
        match newer {
            // A late outcome reaches whoever waits on the key now.
            None if self.table.contains_key(&key) => self.deliver(key, None, None, outcome, source),
            // A success also answers a newer job's waiters; that job is not needed.
            Some((newer, evaluator, phase)) if outcome.is_ok() => {
                self.release_job(key, newer, evaluator, &phase);
                self.deliver(key, Some(evaluator), None, outcome, source);
            }
            _ => {}
        }
    }

    /// A job invalidated while it ran ended here: the waiters of its
    /// evaluation on other brokers get its outcome too, which nobody
    /// keeps; its claim is given up.
    fn share_dropped(&mut self, key: Key, job: &Job, outcome: &Result<Arc<str>, EvalError>) {
        if !self.clustered() {
            return;
        }
        let cmd = if job.claimed {
            ClusterCmd::Finished {
                key,
                gen: Some(job.gen),
                evaluator: job.evaluator,
                outcome: outcome.clone(),
                how: Finish::Shared,
            }
        } else {
            ClusterCmd::Forget { key, gen: job.gen }
        };
        self.ask(cmd);
    }

    /// Job `gen` was evaluated here, under a claim that may have lapsed:
    /// its outcome waits until Redis has said whether another broker's
    /// result was stored first (which its waiters then get instead), for
    /// one lease at most.
    fn store_first(
        &mut self,
        key: Key,
        gen: Gen,
        outcome: Result<Arc<str>, EvalError>,
        eval_ms: f64,
        now: Instant,
    ) {
        let lease = self.lease();
        let Some(job) = self.job_mut(gen) else {
            return;
        };
        let (evaluator, len) = (job.evaluator, job.input_len);
        let phase = std::mem::replace(&mut job.phase, Phase::Storing);
        job.worker = None;
        job.evaluated = Some((outcome.clone(), eval_ms));
        self.leave_executor(evaluator, len, &phase);
        self.set_deadline(gen, now.checked_add(lease));
        self.ask(ClusterCmd::Finished {
            key,
            gen: Some(gen),
            evaluator,
            outcome,
            how: Finish::Confirm,
        });
    }

    /// Redis's word on job `gen`'s outcome: `stored`, another broker's
    /// result, stands instead of it; None: its own stands.
    fn verdict(&mut self, key: Key, gen: Gen, stored: Option<Result<Arc<str>, EvalError>>) {
        if !self
            .job(&key)
            .is_some_and(|j| j.gen == gen && j.phase == Phase::Storing)
        {
            return;
        }
        if let Some(job) = self.end_job(key) {
            self.stored(key, job, stored);
        }
    }

    /// A `Storing` job that has ended: `stored` (another broker's result)
    /// or else its own outcome is cached and delivered.
    fn stored(&mut self, key: Key, job: Job, stored: Option<Result<Arc<str>, EvalError>>) {
        let (own, eval_ms) = job.evaluated.expect("a storing job has its outcome");
        let (outcome, source) = match stored {
            Some(stored) => (stored, Source::Cluster { at_ms: None }),
            None => (own, Source::Eval { eval_ms }),
        };
        if !job.dropped && self.may_keep(self.now) {
            self.effects.push_back(Effect::Cache {
                key,
                evaluator: job.evaluator,
                outcome: outcome.clone(),
                at_ms: None,
            });
        }
        self.deliver(key, Some(job.evaluator), job.claim, outcome, source);
    }

    /// Whether this broker may keep an outcome it computed: in a cluster,
    /// only while it knows every invalidation answered so far (otherwise
    /// one it has not heard yet may have dropped it; it reaches the cache
    /// from Redis later).
    fn may_keep(&self, now: Instant) -> bool {
        self.cluster.as_ref().is_none_or(|c| c.ready(now))
    }

    /// Ends a job whose outcome came from elsewhere: taken back from its
    /// executor, its claim given up, the cluster told to stop waiting.
    fn release_job(&mut self, key: Key, gen: Gen, evaluator: usize, phase: &Phase) {
        let claimed = self.job(&key).is_some_and(|j| j.claimed);
        match phase {
            Phase::Queued | Phase::Running => self.effects.push_back(Effect::Withdraw {
                evaluator,
                gen,
                overran: false,
            }),
            Phase::Asking | Phase::Waiting | Phase::Storing => {}
        }
        if self.clustered() {
            self.ask(ClusterCmd::let_go(key, gen, claimed));
        }
        self.end_job(key);
    }

    /// Hands the outcome to every waiter of `key` and removes its entry.
    fn deliver(
        &mut self,
        key: Key,
        evaluator: Option<usize>,
        claim: Option<Arc<str>>,
        outcome: Result<Arc<str>, EvalError>,
        source: Source,
    ) {
        let waiters = self.take_waiters(key);
        self.effects.push_back(Effect::Deliver(Delivery {
            key,
            evaluator,
            claim,
            outcome,
            source,
            waiters,
        }));
    }

    /// The job of `key` could not be queued: every waiter gets `busy`.
    fn busy(&mut self, key: Key, message: &'static str) {
        let Some(job) = self.end_job(key) else {
            return;
        };
        if self.clustered() {
            self.ask(ClusterCmd::let_go(key, job.gen, job.claimed));
        }
        let waiters = self.take_waiters(key);
        self.effects.push_back(Effect::Busy { waiters, message });
    }

    fn expired(&mut self, gen: Gen) {
        let Some(key) = self.by_gen.get(&gen).copied() else {
            return;
        };
        let Some(job) = self.end_job(key) else {
            return;
        };
        let limits = &self.config.fns[job.evaluator];
        let ms = limits.timeout.as_millis();
        match job.phase {
            Phase::Queued | Phase::Running => {
                let error = EvalError::Timeout(format!(
                    "evaluation exceeded {ms} ms (timeout_ms of fn {:?})",
                    &*limits.name
                ));
                self.effects.push_back(Effect::Withdraw {
                    evaluator: job.evaluator,
                    gen,
                    overran: job.phase == Phase::Running,
                });
                let outcome = Err(error);
                if job.dropped {
                    self.share_dropped(key, &job, &outcome);
                } else {
                    if !self.clustered() {
                        self.effects.push_back(Effect::Cache {
                            key,
                            evaluator: job.evaluator,
                            outcome: outcome.clone(),
                            at_ms: None,
                        });
                    }
                    if self.clustered() {
                        self.ask(ClusterCmd::Finished {
                            key,
                            gen: Some(gen),
                            evaluator: job.evaluator,
                            outcome: outcome.clone(),
                            how: Finish::Deliver,
                        });
                    }
                }
                let source = Source::Eval { eval_ms: ms as f64 };
                self.deliver(key, Some(job.evaluator), job.claim, outcome, source);
            }
            // Redis did not say in time: this broker's own outcome stands.
            Phase::Storing => self.stored(key, job, None),
            Phase::Asking | Phase::Waiting => {
                // Not ours to publish: only this broker's waiters are told.
                let error = EvalError::Timeout(format!(
                    "no outcome within {ms} ms (timeout_ms of fn {:?}, twice: queued and running) plus two leases (cluster.lease_ms): the broker evaluating it did not answer",
                    &*limits.name
                ));
                self.ask(ClusterCmd::let_go(key, gen, job.claimed));
                let source = Source::Cluster { at_ms: None };
                self.deliver(key, Some(job.evaluator), job.claim, Err(error), source);
            }
        }
    }

    fn cluster_event(&mut self, event: ClusterEvent, now: Instant) {
        match event {
            ClusterEvent::Claimed {
                key,
                gen,
                claim,
                asked,
                takeover,
            } => {
                let fresh = (!takeover).then(|| asked + self.lease() / 2);
                self.settle(key, gen, Some((claim, fresh)), now)
            }
            ClusterEvent::Local { key, gen } => self.settle(key, gen, None, now),
            ClusterEvent::Waiting { key, gen, holder } => {
                let lease = self.lease();
                let Some(job) = self.job_mut(gen) else {
                    return self.ask(ClusterCmd::Forget { key, gen });
                };
                let switched = match job.phase {
                    Phase::Asking => false,
                    // The claim it waited on went without an outcome: it
                    // waits on the one that holds the key now, as long.
                    Phase::Waiting => true,
                    _ => return,
                };
                job.phase = Phase::Waiting;
                job.claim = Some(Arc::clone(&holder));
                // Its claimant's outcome may have been announced already.
                let heard = job.heard.take().filter(|h| h.claim == holder);
                // The claimant's job may wait in its queue and then run,
                // each up to the timeout, and wait a lease for Redis's
                // verdict; a lease more notices that it is gone.
                let evaluator = job.evaluator;
                let timeout = self.config.fns[evaluator].timeout;
                let wait = timeout
                    .saturating_mul(2)
                    .saturating_add(lease.saturating_mul(2));
                self.set_deadline(gen, now.checked_add(wait));
                if switched {
                    return;
                }
                if let Some(heard) = heard {
                    let from = From {
                        claim: Some(heard.claim),
                        at_ms: heard.at_ms,
                        keep: heard.keep,
                        for_gen: None,
                        read_at: None,
                    };
                    return self.outcome_from_cluster(key, evaluator, heard.outcome, from, now);
                }
                // Its last waiter may have left while it asked.
                self.maybe_abandon(key);
            }
            ClusterEvent::Found {
                key,
                gen,
                evaluator,
                outcome,
                claim,
                at_ms,
                keep,
                read_at,
            } => {
                let from = From {
                    claim,
                    at_ms,
                    keep,
                    for_gen: gen,
                    read_at: Some(read_at),
                };
                self.outcome_from_cluster(key, evaluator, outcome, from, now)
            }
            ClusterEvent::Dropped(target) => self.drop_results(target, now),
            ClusterEvent::Replace {
                key,
                evaluator,
                outcome,
                at_ms,
            } => {
                // Not what was dropped here lately (an invalidation that
                // Redis may not have carried out yet): then neither.
                let effect = if self.dropped_lately(key, evaluator, now) {
                    Effect::Drop(Target::Key(key))
                } else {
                    Effect::Cache {
                        key,
                        evaluator,
                        outcome,
                        at_ms: Some(at_ms),
                    }
                };
                self.effects.push_back(effect);
            }
            ClusterEvent::Invalidated {
                target,
                session,
                id,
                ok,
            } => {
                let reply = if ok {
                    self.remember_drop(target, now);
                    Reply::Invalidated { target }
                } else {
                    Reply::Rejected {
                        code: ErrorCode::Busy,
                        message: "Redis did not answer, so the invalidation was not recorded for the cluster; try again",
                    }
                };
                self.reply(session, id, reply);
            }
            ClusterEvent::Progress {
                key,
                claim,
                seq,
                data,
            } => self.heard_progress(key, &claim, seq, data),
            ClusterEvent::Stored { key } => {
                if let Some(entry) = self.table.get_mut(&key) {
                    entry.looked = true;
                    self.ask(ClusterCmd::Lookup { key });
                }
            }
            ClusterEvent::Verdict { key, gen, stored } => self.verdict(key, gen, stored),
            ClusterEvent::Done {
                key,
                evaluator,
                outcome,
                claim,
                at_ms,
                keep,
            } => {
                // This broker's own notice, ahead of Redis's verdict on it:
                // it was stored, so its own outcome stands.
                let own = self.job(&key).filter(|j| {
                    j.phase == Phase::Storing && keep && claim.is_some() && j.claim == claim
                });
                if let Some(gen) = own.map(|j| j.gen) {
                    return self.verdict(key, gen, None);
                }
                let from = From {
                    claim,
                    at_ms,
                    keep,
                    for_gen: None,
                    read_at: None,
                };
                self.outcome_from_cluster(key, evaluator, outcome, from, now);
            }
        }
    }

    /// Job `gen` runs here: it leaves the cluster's hands and is queued,
    /// holding the claim `claimed` (its value, and until when it is
    /// certainly still held) or none. Without such a job, a claim taken for
    /// it is given back.
    fn settle(
        &mut self,
        key: Key,
        gen: Gen,
        claimed: Option<(Arc<str>, Option<Instant>)>,
        now: Instant,
    ) {
        let Some(job) = self
            .job_mut(gen)
            .filter(|j| matches!(j.phase, Phase::Asking | Phase::Waiting))
        else {
            return self.ask(ClusterCmd::let_go(key, gen, claimed.is_some()));
        };
        job.claimed = claimed.is_some();
        (job.claim, job.claim_fresh_until) = match claimed {
            Some((claim, fresh)) => (Some(claim), fresh),
            None => (None, None),
        };
        let (evaluator, len) = (job.evaluator, job.input_len);
        if let Some(message) = self.queue_full(evaluator, len) {
            return self.busy(key, message);
        }
        self.queue(gen, now);
    }

    /// Whether key `key` of fn `evaluator` was dropped within the last lease.
    fn dropped_lately(&mut self, key: Key, evaluator: usize, now: Instant) -> bool {
        self.forget_old_drops(now);
        self.recent_drops
            .iter()
            .any(|(_, t)| t.covers(key, evaluator))
    }

    /// Outcomes of `target` from the cluster are not cached for a lease.
    fn remember_drop(&mut self, target: Target, now: Instant) {
        self.forget_old_drops(now);
        self.recent_drops.push_back((now, target));
    }

    /// Forgets the drops more than a lease old.
    fn forget_old_drops(&mut self, now: Instant) {
        let lease = self.lease();
        while self
            .recent_drops
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > lease)
        {
            self.recent_drops.pop_front();
        }
    }

    /// An outcome of fn `evaluator` from the cluster (see [`From`]). Who
    /// takes it depends on what waits here:
    /// - a job waiting on another broker's claim: that claim's outcome, or
    ///   what its own look found once that claim is gone (its waiters get
    ///   what the evaluation they joined gave);
    /// - a job asking: a success, or what its own look found;
    /// - a job evaluating here (or storing): a success that stands, which
    ///   makes it unnecessary; never another evaluation's failure;
    /// - subscriptions alone: anything kept.
    ///
    /// It may be older than what a late waiter may be given: an outcome
    /// shared but not kept (read or heard) was computed at `at_ms`, a read
    /// of a kept one found what was current when it was sent. A submit that came more than a lease after
    /// that may have come after an invalidation was answered: it gets a new
    /// evaluation instead (and subscriptions, when it is not kept, wait
    /// on). Cached when kept, unless dropped lately or read too long ago.
    fn outcome_from_cluster(
        &mut self,
        key: Key,
        evaluator: usize,
        outcome: Result<Arc<str>, EvalError>,
        from: From,
        now: Instant,
    ) {
        let Some(entry) = self.table.get(&key) else {
            return;
        };
        let From {
            claim,
            at_ms,
            keep,
            for_gen,
            read_at,
        } = from;
        let job = entry.job.as_ref();
        let takes = match job.map(|j| (&j.phase, j)) {
            None => keep,
            Some((Phase::Waiting, j)) => {
                for_gen == Some(j.gen) || (claim.is_some() && claim == j.claim)
            }
            Some((Phase::Asking, j)) => for_gen == Some(j.gen) || (keep && outcome.is_ok()),
            Some((Phase::Queued | Phase::Running, _)) => keep && outcome.is_ok(),
            Some((Phase::Storing, _)) => false,
        };
        if !takes {
            if let (Some(job), Some(claim)) = (self.job_mut_of(&key), claim) {
                if job.phase == Phase::Asking {
                    job.heard = Some(Heard {
                        claim,
                        outcome,
                        at_ms,
                        keep,
                    });
                }
            }
            return;
        }
        let lease = self.lease();
        let since = match (keep, read_at) {
            (true, Some(sent)) => Some(sent),
            (false, _) => self.cluster.as_ref().map(|c| c.instant_of(at_ms)),
            (true, None) => None,
        };
        let cutoff = since.map(|t| t + lease);
        if keep && cutoff.is_none_or(|c| now <= c) && !self.dropped_lately(key, evaluator, now) {
            self.effects.push_back(Effect::Cache {
                key,
                evaluator,
                outcome: outcome.clone(),
                at_ms: Some(at_ms),
            });
        }
        let Some(entry) = self.table.get_mut(&key) else {
            return;
        };
        // Who may be given it: everyone, or those that came in time.
        let (given, left): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut entry.waiters)
            .into_iter()
            .partition(|w| match (w.since, cutoff) {
                (_, None) => true,
                (Some(t), Some(c)) => t <= c,
                (None, Some(_)) => keep,
            });
        let later_submits = left.iter().any(|w| w.since.is_some());
        entry.waiters = left;
        let job = entry.job.as_ref().map(|j| {
            (
                j.gen,
                j.evaluator,
                j.phase.clone(),
                j.claim.clone(),
                j.input.clone().map(|i| (i, j.priority)),
            )
        });
        for waiter in &given {
            self.release_wait(waiter.session, key, waiter.since.is_none());
            self.forget_deadline(waiter);
        }
        let (evaluator, joined, input) = match job {
            Some((gen, evaluator, phase, joined, input)) => {
                self.release_job(key, gen, evaluator, &phase);
                (Some(evaluator), joined, input.map(|i| (evaluator, i)))
            }
            None => (None, None, None),
        };
        self.effects.push_back(Effect::Deliver(Delivery {
            key,
            evaluator,
            claim: joined,
            outcome,
            source: Source::Cluster { at_ms: Some(at_ms) },
            waiters: given,
        }));
        match input {
            Some((evaluator, (input, priority))) if later_submits => {
                self.start_job(key, evaluator, input, None, priority, now)
            }
            _ => self.maybe_abandon(key),
        }
        // Subscriptions left without a job: the cluster looks for them.
        if self
            .table
            .get(&key)
            .is_some_and(|e| e.job.is_none() && !e.looked)
        {
            self.table.get_mut(&key).expect("just found").looked = true;
            self.ask(ClusterCmd::Lookup { key });
        }
    }
}

/// Where an outcome from the cluster comes from.
struct From {
    /// The claim it was computed under (None: without one).
    claim: Option<Arc<str>>,
    /// When it was computed (Unix ms).
    at_ms: u64,
    /// It may be kept (stored, under its fn's current tag).
    keep: bool,
    /// The job whose own look found it.
    for_gen: Option<Gen>,
    /// When the read that found it was sent (None: a notice).
    read_at: Option<Instant>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis::Acquired;

    fn core(clustered: bool) -> (Core, Instant) {
        core_with(clustered, |_| {})
    }

    fn core_with(clustered: bool, edit: impl FnOnce(&mut CoreConfig)) -> (Core, Instant) {
        let now = Instant::now();
        let mut config = CoreConfig {
            fns: vec![FnLimits {
                name: "f".into(),
                timeout: Duration::from_secs(1),
                queue_capacity: 4,
                queue_bytes: 1024,
                abandon_running: false,
            }],
            max_pending: 8,
            ns_max_pending: HashMap::new(),
            ns_default_max_pending: None,
            progress_bytes: 1024,
            cluster: clustered.then(|| ClusterConfig {
                node: "n".into(),
                run: "r".into(),
                prefix: "herd:".into(),
                lease: Duration::from_millis(300),
                result_ttl_s: 0,
                error_ttl_s: 0,
                notice_inline_bytes: 16,
                max_stored: 1024,
                writeback_max: 4,
                progress_per_s: 10,
                versions: vec![String::new()],
            }),
            preview_chars: 8,
        };
        edit(&mut config);
        (Core::new(config, now, 1_000), now)
    }

    /// `session` submits key 5.
    fn submit(session: SessionId) -> Input {
        submit_key(session, 5)
    }

    fn states(core: &mut Core) -> Vec<KeyState> {
        std::iter::from_fn(|| core.poll())
            .filter_map(|e| match e {
                Effect::Reply {
                    reply: Reply::Accepted { state, .. } | Reply::Status { state, .. },
                    ..
                } => Some(state),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_key_reports_queued_then_running() {
        let (mut core, now) = core(false);
        core.apply(submit(1), now);
        let offered = std::iter::from_fn(|| core.poll()).find_map(|e| match e {
            Effect::Offer { gen, .. } => Some(gen),
            _ => None,
        });
        let gen = offered.expect("offered to its executor");
        assert_eq!(core.counts().queued, 1);
        assert_eq!(core.held_by(1), 1);
        core.apply(Input::Started { gen, worker: None }, now);
        core.apply(submit(2), now);
        assert_eq!(states(&mut core), [KeyState::Queued, KeyState::Running]);
        assert_eq!(core.counts().running, 1);
        assert_eq!(core.held_by(2), 1);
        assert_eq!(
            [KeyState::Queued, KeyState::Running, KeyState::Unknown].map(KeyState::as_str),
            ["queued", "running", "unknown"]
        );
        assert!(core.cluster_status().is_none());
    }

    #[test]
    fn a_clustered_core_reports_what_its_cluster_holds() {
        let (mut core, now) = core(true);
        assert!(core.cluster_status().is_some());
        core.apply(submit(1), now);
        // The key waits for Redis's first answer, parked.
        assert!(core.cluster_holding().iter().sum::<usize>() > 0);
    }

    fn submit_key(session: SessionId, n: u8) -> Input {
        Input::Submit {
            session,
            id: Some(n.to_string().into()),
            key: Key::from_bytes([n; 16]),
            evaluator: 0,
            input: Arc::from("{}"),
            wait: true,
            draining: false,
            max_age: None,
            priority: crate::sched::DEFAULT_PRIORITY,
            deadline: None,
            progress: false,
        }
    }

    fn rejected(core: &mut Core) -> Vec<&'static str> {
        std::iter::from_fn(|| core.poll())
            .filter_map(|e| match e {
                Effect::Reply {
                    reply: Reply::Rejected { message, .. },
                    ..
                } => Some(message),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_session_holds_at_most_max_pending_and_a_queue_its_capacity() {
        let (mut core, now) = core(false);
        // Queue capacity 4: the fifth new key is refused.
        for n in 1..=4 {
            core.apply(submit_key(1, n), now);
        }
        assert!(rejected(&mut core).is_empty());
        core.apply(submit_key(1, 5), now);
        assert_eq!(rejected(&mut core), [QUEUE_FULL]);
        // Max pending 8: the ninth wait of one session is refused, a
        // subscription too; another session's is not.
        for _ in 0..4 {
            core.apply(submit_key(1, 1), now);
        }
        assert!(rejected(&mut core).is_empty());
        assert_eq!(core.held_by(1), 8);
        core.apply(submit_key(1, 2), now);
        core.apply(
            Input::Subscribe {
                session: 1,
                id: None,
                key: Key::from_bytes([9; 16]),
                progress: false,
            },
            now,
        );
        assert_eq!(rejected(&mut core), [PENDING_FULL, PENDING_FULL]);
        core.apply(submit_key(2, 2), now);
        assert!(rejected(&mut core).is_empty());
    }

    #[test]
    fn get_reports_a_key_s_state() {
        let (mut core, now) = core(false);
        let get = |key| Input::Get {
            session: 3,
            id: None,
            key: Key::from_bytes([key; 16]),
        };
        core.apply(get(5), now);
        core.apply(submit(1), now);
        core.apply(get(5), now);
        let replies: Vec<Reply> = std::iter::from_fn(|| core.poll())
            .filter_map(|e| match e {
                Effect::Reply {
                    session: 3, reply, ..
                } => Some(reply),
                _ => None,
            })
            .collect();
        assert!(
            matches!(
                &replies[..],
                [
                    Reply::Status {
                        state: KeyState::Unknown,
                        waiters: 0,
                        ..
                    },
                    Reply::Status {
                        state: KeyState::Queued,
                        waiters: 1,
                        ..
                    }
                ]
            ),
            "{replies:?}"
        );
    }

    fn effects(core: &mut Core) -> Vec<Effect> {
        std::iter::from_fn(|| core.poll()).collect()
    }

    /// The jobs offered to executors among `effects`.
    fn offered(effects: &[Effect]) -> Vec<Gen> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Offer { gen, .. } => Some(*gen),
                _ => None,
            })
            .collect()
    }

    fn input_of(session: SessionId, n: u8, input: &str, wait: bool) -> Input {
        Input::Submit {
            session,
            id: None,
            key: Key::from_bytes([n; 16]),
            evaluator: 0,
            input: Arc::from(input),
            wait,
            draining: false,
            max_age: None,
            priority: crate::sched::DEFAULT_PRIORITY,
            deadline: None,
            progress: false,
        }
    }

    #[test]
    fn the_dashboard_shows_the_oldest_jobs_first_and_which_run() {
        let (mut core, now) = core(false);
        for n in 1..=3 {
            core.apply(submit_key(1, n), now + Duration::from_millis(n.into()));
        }
        let gens = offered(&effects(&mut core));
        core.apply(
            Input::Started {
                gen: gens[0],
                worker: None,
            },
            now,
        );
        let later = now + Duration::from_millis(5);
        let rows = core.view(later, 2);
        let mut shown: Vec<(Key, bool, usize)> =
            rows.iter().map(|r| (r.key, r.running, r.waiters)).collect();
        shown.sort_unstable();
        assert_eq!(
            shown,
            [
                (Key::from_bytes([1; 16]), true, 1),
                (Key::from_bytes([2; 16]), false, 1)
            ]
        );
        assert!(rows.iter().all(|r| r.elsewhere.is_none()));
        assert_eq!(core.view(later, 3).len(), 3);
    }

    #[test]
    fn a_job_whose_worker_left_waits_in_its_queue_again() {
        let (mut core, now) = core(false);
        core.apply(submit(1), now);
        let gen = offered(&effects(&mut core))[0];
        core.apply(
            Input::Started {
                gen,
                worker: Some("w".into()),
            },
            now,
        );
        assert_eq!((core.counts().queued, core.counts().running), (0, 1));
        core.apply(Input::Requeued { gen }, now);
        assert_eq!((core.counts().queued, core.counts().running), (1, 0));
    }

    #[test]
    fn a_job_its_executor_refused_answers_busy() {
        let (mut core, now) = core(false);
        core.apply(submit(1), now);
        let gen = offered(&effects(&mut core))[0];
        core.apply(
            Input::Refused {
                gen,
                reason: "no room",
            },
            now,
        );
        let busy = effects(&mut core);
        assert!(
            matches!(&busy[..], [Effect::Busy { waiters, message: "no room" }] if waiters.len() == 1),
            "{busy:?}"
        );
        assert_eq!(core.counts().entries, 0);
        // A running job is not refused.
        core.apply(submit(1), now);
        let gen = offered(&effects(&mut core))[0];
        core.apply(Input::Started { gen, worker: None }, now);
        core.apply(
            Input::Refused {
                gen,
                reason: "no room",
            },
            now,
        );
        assert_eq!(core.counts().running, 1);
    }

    #[test]
    fn a_queue_holds_up_to_its_bytes() {
        let (mut core, now) = core(false);
        core.apply(input_of(1, 1, &"x".repeat(1000), true), now);
        core.apply(input_of(1, 2, &"x".repeat(24), true), now);
        assert!(rejected(&mut core).is_empty());
        core.apply(input_of(1, 3, "x", true), now);
        assert_eq!(rejected(&mut core), [QUEUE_BYTES_FULL]);
    }

    #[test]
    fn accepted_says_whether_the_job_is_new_and_who_waits() {
        let (mut core, now) = core(false);
        core.apply(submit(1), now);
        core.apply(submit(2), now);
        let accepted: Vec<(bool, usize)> = effects(&mut core)
            .into_iter()
            .filter_map(|e| match e {
                Effect::Reply {
                    reply: Reply::Accepted { first, waiters, .. },
                    ..
                } => Some((first, waiters)),
                _ => None,
            })
            .collect();
        assert_eq!(accepted, [(true, 1), (false, 2)]);
    }

    #[test]
    fn a_namespace_without_its_own_bound_takes_the_default_one() {
        let listed = Ns::intern("listed", 16).unwrap();
        let unlisted = Ns::intern("unlisted", 16).unwrap();
        let (mut core, now) = core_with(false, |c| {
            c.ns_max_pending = [(listed, 3)].into_iter().collect();
            c.ns_default_max_pending = Some(2);
        });
        let subscribe_in = |core: &mut Core, ns: Ns, session: SessionId, n: u8| {
            let key = Key::from_bytes([n; 16]).in_ns(ns);
            core.apply(
                Input::Subscribe {
                    session,
                    id: None,
                    key,
                    progress: false,
                },
                now,
            );
            rejected(core)
        };
        // Each namespace's sessions together: 2 by default, 3 when listed.
        for (ns, max, first_session) in [(unlisted, 2, 10), (listed, 3, 20)] {
            for n in 0..max {
                let session = first_session + SessionId::from(n);
                assert!(subscribe_in(&mut core, ns, session, n).is_empty());
            }
            assert_eq!(
                subscribe_in(&mut core, ns, first_session, 9),
                [NS_PENDING_FULL]
            );
            assert_eq!(core.held_in(ns), usize::from(max));
        }
        // The shared namespace is bound by its sessions' max_pending alone.
        for n in 0..4 {
            assert!(subscribe_in(&mut core, Ns::SHARED, 30 + SessionId::from(n), n).is_empty());
        }
        assert_eq!(core.audit(), Ok(()));
    }

    #[test]
    fn a_submit_that_does_not_wait_holds_a_place_of_its_session_s() {
        let (mut core, now) = core_with(false, |c| {
            c.max_pending = 2;
            c.fns[0].queue_capacity = 8;
        });
        core.apply(input_of(1, 1, "{}", false), now);
        core.apply(input_of(1, 2, "{}", false), now);
        assert!(rejected(&mut core).is_empty());
        assert_eq!(core.held_by(1), 2);
        core.apply(input_of(1, 3, "{}", false), now);
        assert_eq!(rejected(&mut core), [PENDING_FULL]);
    }

    #[test]
    fn the_last_cancel_takes_a_queued_job_back() {
        let (mut core, now) = core(false);
        core.apply(submit(1), now);
        let gen = offered(&effects(&mut core))[0];
        core.apply(
            Input::Cancel {
                session: 1,
                id: None,
                key: Key::from_bytes([5; 16]),
            },
            now,
        );
        let effects = effects(&mut core);
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::Withdraw { gen: g, overran: false, .. } if *g == gen)),
            "{effects:?}"
        );
        assert_eq!(core.counts().entries, 0);
    }

    #[test]
    fn a_timeout_is_cached_and_says_whether_the_job_ran_over() {
        let (mut core, now) = core(false);
        core.apply(submit_key(1, 1), now);
        core.apply(submit_key(1, 2), now);
        let gens = offered(&effects(&mut core));
        core.apply(
            Input::Started {
                gen: gens[1],
                worker: None,
            },
            now,
        );
        core.handle_timeout(now + Duration::from_secs(1));
        let effects = effects(&mut core);
        let withdrawn: Vec<(Gen, bool)> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::Withdraw { gen, overran, .. } => Some((*gen, *overran)),
                _ => None,
            })
            .collect();
        assert_eq!(withdrawn, [(gens[0], false), (gens[1], true)]);
        let cached = effects
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    Effect::Cache {
                        outcome: Err(EvalError::Timeout(_)),
                        ..
                    }
                )
            })
            .count();
        assert_eq!(cached, 2);
    }

    /// Job of key 5 timed out running; session 2 then submits it again.
    fn timed_out_then_submitted_again(core: &mut Core, now: Instant) -> (Gen, Gen) {
        core.apply(submit(1), now);
        let gen = offered(&effects(core))[0];
        core.apply(Input::Started { gen, worker: None }, now);
        let later = now + Duration::from_secs(1);
        core.handle_timeout(later);
        core.apply(submit(2), later);
        let again = offered(&effects(core))[0];
        (gen, again)
    }

    fn finished(gen: Gen, outcome: Result<Arc<str>, EvalError>) -> Input {
        Input::Finished {
            key: Key::from_bytes([5; 16]),
            gen,
            evaluator: 0,
            outcome,
            eval_ms: 1.0,
        }
    }

    #[test]
    fn a_late_success_is_kept_and_answers_the_job_after_it() {
        let (mut core, now) = core(false);
        let (late, again) = timed_out_then_submitted_again(&mut core, now);
        core.apply(finished(late, Ok(Arc::from("1"))), now);
        let effects = effects(&mut core);
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::Cache { outcome: Ok(_), .. })),
            "{effects:?}"
        );
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::Withdraw { gen, .. } if *gen == again)),
            "{effects:?}"
        );
        assert!(
            effects.iter().any(|e| matches!(e, Effect::Deliver(d) if d.waiters.len() == 1 && d.waiters[0].session == 2)),
            "{effects:?}"
        );
        assert_eq!(core.counts().entries, 0);
    }

    #[test]
    fn a_late_failure_leaves_the_job_after_it_alone() {
        let (mut core, now) = core(false);
        let (late, _) = timed_out_then_submitted_again(&mut core, now);
        core.apply(finished(late, Err(EvalError::Failed("boom".into()))), now);
        let effects = effects(&mut core);
        assert!(effects.is_empty(), "{effects:?}");
        assert_eq!(core.counts().queued, 1);
    }

    #[test]
    fn a_late_outcome_reaches_the_key_s_subscribers() {
        let (mut core, now) = core(false);
        core.apply(submit(1), now);
        let gen = offered(&effects(&mut core))[0];
        core.apply(Input::Started { gen, worker: None }, now);
        let later = now + Duration::from_secs(1);
        core.handle_timeout(later);
        core.apply(
            Input::Subscribe {
                session: 3,
                id: None,
                key: Key::from_bytes([5; 16]),
                progress: false,
            },
            later,
        );
        effects(&mut core);
        core.apply(finished(gen, Ok(Arc::from("1"))), later);
        let effects = effects(&mut core);
        assert!(
            effects.iter().any(|e| matches!(e, Effect::Deliver(d) if d.waiters.len() == 1 && d.waiters[0].session == 3)),
            "{effects:?}"
        );
    }

    const LEASE: Duration = Duration::from_millis(300);

    /// Answers every ping and read of the epochs sent (Redis up, nothing
    /// invalidated); what else was done.
    fn answered(core: &mut Core, now: Instant) -> Vec<Effect> {
        let mut rest = Vec::new();
        for _ in 0..100 {
            let effects = effects(core);
            if effects.is_empty() {
                return rest;
            }
            for effect in effects {
                let reply = match &effect {
                    Effect::Redis {
                        cmd: RedisOp::Ping, ..
                    } => RedisReply::Pong,
                    Effect::Redis {
                        cmd: RedisOp::Sync { .. },
                        ..
                    } => RedisReply::Epochs {
                        hashes: vec![vec![], vec![]],
                        boot: "b".into(),
                    },
                    _ => {
                        rest.push(effect);
                        continue;
                    }
                };
                let Effect::Redis { op, .. } = effect else {
                    unreachable!()
                };
                core.apply(
                    Input::Redis {
                        op,
                        reply: Some(reply),
                    },
                    now,
                );
            }
        }
        panic!("the core still asks for pings or epochs after 100 answers");
    }

    /// A clustered core whose Redis answered, and read its epochs, at `now`.
    fn cluster_up() -> (Core, Instant) {
        let (mut core, now) = core(true);
        core.handle_timeout(now);
        answered(&mut core, now);
        assert!(core.cluster_status().is_some_and(|s| s.up()));
        (core, now)
    }

    /// The commands among `effects`.
    fn commands(effects: Vec<Effect>) -> Vec<(OpId, RedisOp)> {
        effects
            .into_iter()
            .filter_map(|e| match e {
                Effect::Redis { op, cmd } => Some((op, cmd)),
                _ => None,
            })
            .collect()
    }

    fn redis(core: &mut Core, op: OpId, reply: RedisReply, now: Instant) {
        core.apply(
            Input::Redis {
                op,
                reply: Some(reply),
            },
            now,
        );
    }

    /// Session 1 submits key 5; the look for it, and the claim it offers.
    fn asked(core: &mut Core, now: Instant) -> (OpId, String) {
        core.apply(submit(1), now);
        let sent = commands(answered(core, now));
        match &sent[..] {
            [(op, RedisOp::Acquire { value, .. })] => (*op, value.clone()),
            other => panic!("{other:?}"),
        }
    }

    /// Key 5 claimed here for session 1 and running: its job.
    fn running_here(core: &mut Core, now: Instant) -> Gen {
        let (op, _) = asked(core, now);
        redis(core, op, RedisReply::Acquired(Acquired::Claimed), now);
        let gen = offered(&answered(core, now))[0];
        core.apply(Input::Started { gen, worker: None }, now);
        gen
    }

    /// Who was given what.
    type Given = (Vec<SessionId>, Result<Arc<str>, EvalError>);

    fn delivered(effects: &[Effect]) -> Vec<Given> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Deliver(d) => Some((
                    d.waiters.iter().map(|w| w.session).collect(),
                    d.outcome.clone(),
                )),
                _ => None,
            })
            .collect()
    }

    fn cached(effects: &[Effect]) -> usize {
        effects
            .iter()
            .filter(|e| matches!(e, Effect::Cache { .. }))
            .count()
    }

    fn ok(output: &str) -> Result<Arc<str>, EvalError> {
        Ok(Arc::from(output))
    }

    #[test]
    fn a_job_finished_while_its_claim_is_fresh_is_delivered_at_once() {
        let (mut core, now) = cluster_up();
        let gen = running_here(&mut core, now);
        let at = now + LEASE / 2 - Duration::from_millis(1);
        core.apply(finished(gen, ok("1")), at);
        let effects = answered(&mut core, at);
        assert_eq!(delivered(&effects), [(vec![1], ok("1"))]);
        let sent = commands(effects);
        assert!(
            matches!(&sent[..], [(_, RedisOp::Finish { shared, .. })] if !shared.is_empty()),
            "{sent:?}"
        );
    }

    /// Key 5's job finished here half a lease after it was claimed: the
    /// store it asked for.
    fn finished_after_its_claim_may_have_lapsed(core: &mut Core, now: Instant) -> (OpId, RedisOp) {
        let gen = running_here(core, now);
        let at = now + LEASE / 2;
        core.apply(finished(gen, ok("1")), at);
        let effects = answered(core, at);
        assert!(delivered(&effects).is_empty(), "{effects:?}");
        let mut sent = commands(effects);
        assert!(
            matches!(&sent[..], [(_, RedisOp::Finish { shared, .. })] if shared.is_empty()),
            "{sent:?}"
        );
        sent.remove(0)
    }

    #[test]
    fn a_job_finished_after_its_claim_may_have_lapsed_waits_for_redis_s_word() {
        let (mut core, now) = cluster_up();
        let (op, _) = finished_after_its_claim_may_have_lapsed(&mut core, now);
        let at = now + LEASE / 2;
        let verdict = RedisReply::Finished {
            stored: true,
            current: None,
            dropped: false,
        };
        redis(&mut core, op, verdict, at);
        let effects = answered(&mut core, at);
        assert_eq!(delivered(&effects), [(vec![1], ok("1"))]);
        assert_eq!(cached(&effects), 1);
    }

    #[test]
    fn a_job_whose_store_redis_never_answered_is_delivered_and_not_kept() {
        let (mut core, now) = cluster_up();
        let (op, _) = finished_after_its_claim_may_have_lapsed(&mut core, now);
        let at = now + LEASE / 2;
        core.apply(Input::Redis { op, reply: None }, at);
        let effects = effects(&mut core);
        assert_eq!(delivered(&effects), [(vec![1], ok("1"))]);
        assert_eq!(cached(&effects), 0);
    }

    #[test]
    fn a_job_s_own_notice_ahead_of_redis_s_word_delivers_it() {
        let (mut core, now) = cluster_up();
        let (_, store) = finished_after_its_claim_may_have_lapsed(&mut core, now);
        let RedisOp::Finish { notice, .. } = store else {
            unreachable!()
        };
        let at = now + LEASE / 2;
        core.apply(Input::Pubsub(PubsubEvent::Message(notice)), at);
        let effects = answered(&mut core, at);
        assert_eq!(delivered(&effects), [(vec![1], ok("1"))]);
    }

    /// The notice of an outcome of key 5 computed under `claim` at Unix ms
    /// 1000.
    fn notice(claim: &str, keep: bool, output: &str) -> Input {
        let hex = Key::from_bytes([5; 16]).to_hex();
        Input::Pubsub(PubsubEvent::Message(format!(
            "{{\"key\":\"{hex}\",\"at_ms\":1000,\"ok\":true,\"began_ms\":900,\"fn\":\"f\",\"tag\":\"0:\",\"claim\":\"{claim}\",\"keep\":{keep},\"output\":{output}}}"
        )))
    }

    #[test]
    fn a_claimant_s_outcome_heard_while_asking_answers_once_its_claim_is_known() {
        let (mut core, now) = cluster_up();
        let (op, _) = asked(&mut core, now);
        core.apply(notice("m:x:1", false, "7"), now);
        assert!(delivered(&effects(&mut core)).is_empty());
        let held = RedisReply::Acquired(Acquired::Held("m:x:1".into()));
        redis(&mut core, op, held, now);
        assert_eq!(delivered(&answered(&mut core, now)), [(vec![1], ok("7"))]);
    }

    /// The progress announcements among `effects`: (seq, data) of each.
    fn announced(effects: &[Effect]) -> Vec<(u64, String)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Redis {
                    cmd: RedisOp::Publish { message, .. },
                    ..
                } => {
                    let v: serde_json::Value = serde_json::from_str(message).ok()?;
                    assert_eq!(
                        v["progress"],
                        Key::from_bytes([5; 16]).to_hex(),
                        "{message}"
                    );
                    assert!(
                        v["claim"].as_str().is_some_and(|c| !c.is_empty()),
                        "{message}"
                    );
                    Some((v["seq"].as_u64()?, v["data"].to_string()))
                }
                _ => None,
            })
            .collect()
    }

    /// Session `session` submits key 5, asking for progress, with a
    /// deadline of `deadline_ms` if given.
    fn submit_asking(session: SessionId, deadline_ms: Option<u64>) -> Input {
        let mut input = submit(session);
        if let Input::Submit {
            progress, deadline, ..
        } = &mut input
        {
            *progress = true;
            *deadline = deadline_ms.map(Duration::from_millis);
        }
        input
    }

    #[test]
    fn a_late_joiner_gets_the_latest_reports_within_progress_bytes() {
        let (mut core, now) = core_with(false, |c| c.progress_bytes = 10);
        core.apply(submit_asking(1, None), now);
        let gen = offered(&effects(&mut core))[0];
        core.apply(Input::Started { gen, worker: None }, now);
        for data in ["\"aaaa\"", "\"bbbb\"", "\"cccc\"", "\"dd\""] {
            core.apply(
                Input::Progress {
                    gen,
                    data: data.into(),
                },
                now,
            );
        }
        // Every report reached the first waiter as it came.
        let first: Vec<u64> = effects(&mut core)
            .iter()
            .filter_map(|e| match e {
                Effect::Progress { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect();
        assert_eq!(first, [1, 2, 3, 4]);
        // 6 + 6 + 6 + 4 bytes: the latest ones within 10 bytes are kept.
        core.apply(submit_asking(2, None), now);
        let replayed: Vec<(u64, String)> = effects(&mut core)
            .into_iter()
            .filter_map(|e| match e {
                Effect::Progress { seq, data, to, .. } => {
                    assert_eq!(to, [(2, Some("5".into()))]);
                    Some((seq, data.to_string()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(replayed, [(3, "\"cccc\"".into()), (4, "\"dd\"".into())]);
        // One report larger than the bound is still kept, alone.
        core.apply(
            Input::Progress {
                gen,
                data: "\"a long report\"".into(),
            },
            now,
        );
        effects(&mut core);
        core.apply(submit_asking(3, None), now);
        let replayed: Vec<u64> = effects(&mut core)
            .iter()
            .filter_map(|e| match e {
                Effect::Progress { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect();
        assert_eq!(replayed, [5]);
    }

    #[test]
    fn a_waiter_s_deadline_is_a_timer_the_audit_accounts_for() {
        let (mut core, now) = core(false);
        core.apply(submit_asking(1, Some(50)), now);
        effects(&mut core);
        // The job's deadline and the waiter's.
        assert_eq!(core.counts().timers, 2);
        assert_eq!(core.poll_timeout(), Some(now + Duration::from_millis(50)));
        core.audit().unwrap();
        let kept = std::mem::take(&mut core.deadline_keys);
        assert!(core.audit().is_err(), "a deadline without its key");
        core.deadline_keys = kept;
        let kept = std::mem::take(&mut core.deadlines);
        assert!(
            core.audit().is_err(),
            "a waiter's deadline without its timer"
        );
        core.deadlines = kept;
        core.audit().unwrap();
        core.handle_timeout(now + Duration::from_millis(50));
        let answered: Vec<SessionId> = effects(&mut core)
            .iter()
            .filter_map(|e| match e {
                Effect::DeadlineExceeded { session, .. } => Some(*session),
                _ => None,
            })
            .collect();
        assert_eq!(answered, [1]);
        assert_eq!(
            core.counts().timers,
            0,
            "the queued job left with its waiter"
        );
        core.audit().unwrap();
    }

    #[test]
    fn a_claimant_announces_its_progress_at_most_progress_per_s_the_latest_winning() {
        let (mut core, now) = cluster_up();
        let gen = running_here(&mut core, now);
        answered(&mut core, now);
        let report = |core: &mut Core, n: u32, at: Instant| {
            let data = Arc::from(format!("{{\"n\":{n}}}"));
            core.apply(Input::Progress { gen, data }, at);
            announced(&answered(core, at))
        };
        assert_eq!(report(&mut core, 1, now), [(1, "{\"n\":1}".to_string())]);
        // Ten a second: the next two within 100 ms wait, the latest wins.
        let soon = now + Duration::from_millis(30);
        assert!(report(&mut core, 2, soon).is_empty());
        assert!(report(&mut core, 3, soon).is_empty());
        assert!(core.poll_timeout() <= Some(now + Duration::from_millis(100)));
        core.handle_timeout(now + Duration::from_millis(99));
        assert!(announced(&answered(&mut core, now + Duration::from_millis(99))).is_empty());
        let due = now + Duration::from_millis(100);
        core.handle_timeout(due);
        assert_eq!(
            announced(&answered(&mut core, due)),
            [(3, "{\"n\":3}".to_string())]
        );
        core.audit().unwrap();
        // A report after the interval goes at once.
        let later = now + Duration::from_millis(250);
        assert_eq!(report(&mut core, 4, later), [(4, "{\"n\":4}".to_string())]);
        // The evaluation ends with a report held back: it is not announced
        // after the outcome.
        assert!(report(&mut core, 5, later).is_empty());
        core.apply(finished(gen, ok("1")), later);
        answered(&mut core, later);
        core.audit().unwrap();
        let after = later + Duration::from_millis(200);
        core.handle_timeout(after);
        assert!(announced(&answered(&mut core, after)).is_empty());
        core.audit().unwrap();
    }

    #[test]
    fn a_broker_waiting_on_a_claim_passes_its_claimant_s_progress_on() {
        let (mut core, now) = cluster_up();
        let mut asking = submit(1);
        if let Input::Submit { progress, .. } = &mut asking {
            *progress = true;
        }
        core.apply(asking, now);
        let sent = commands(answered(&mut core, now));
        let [(op, RedisOp::Acquire { .. })] = &sent[..] else {
            panic!("{sent:?}")
        };
        redis(
            &mut core,
            *op,
            RedisReply::Acquired(Acquired::Held("m:x:1".into())),
            now,
        );
        answered(&mut core, now);
        let hex = Key::from_bytes([5; 16]).to_hex();
        let heard = |claim: &str, seq: u64| {
            Input::Pubsub(PubsubEvent::Message(format!(
                "{{\"progress\":\"{hex}\",\"ns\":\"\",\"claim\":\"{claim}\",\"seq\":{seq},\"data\":[{seq}]}}"
            )))
        };
        let told = |effects: Vec<Effect>| -> Vec<(u64, String)> {
            effects
                .into_iter()
                .filter_map(|e| match e {
                    Effect::Progress { seq, data, to, .. } => {
                        assert_eq!(to.len(), 1);
                        Some((seq, data.to_string()))
                    }
                    _ => None,
                })
                .collect()
        };
        core.apply(heard("m:x:1", 2), now);
        assert_eq!(told(answered(&mut core, now)), [(2, "[2]".to_string())]);
        // Another claim's, and an older report, are not passed on.
        core.apply(heard("m:y:9", 3), now);
        core.apply(heard("m:x:1", 1), now);
        core.apply(heard("m:x:1", 2), now);
        assert!(told(answered(&mut core, now)).is_empty());
        core.apply(heard("m:x:1", 5), now);
        assert_eq!(told(answered(&mut core, now)), [(5, "[5]".to_string())]);
        // `get` shows the latest.
        core.apply(
            Input::Get {
                session: 2,
                id: None,
                key: Key::from_bytes([5; 16]),
            },
            now,
        );
        let status = answered(&mut core, now).into_iter().find_map(|e| match e {
            Effect::Reply {
                reply: Reply::Status { progress, .. },
                ..
            } => Some(progress),
            _ => None,
        });
        assert_eq!(status, Some(Some((5, Arc::from("[5]")))));
    }

    #[test]
    fn a_wait_on_another_broker_s_claim_shows_it_and_takes_its_outcome() {
        let (mut core, now) = cluster_up();
        let (op, _) = asked(&mut core, now);
        let held = RedisReply::Acquired(Acquired::Held("m:x:1".into()));
        redis(&mut core, op, held, now);
        answered(&mut core, now);
        let rows = core.view(now, 10);
        assert_eq!(rows[0].elsewhere.as_deref(), Some("m:x:1"));
        core.apply(notice("m:y:2", false, "6"), now);
        assert!(delivered(&effects(&mut core)).is_empty());
        core.apply(notice("m:x:1", false, "7"), now);
        assert_eq!(delivered(&answered(&mut core, now)), [(vec![1], ok("7"))]);
    }

    #[test]
    fn a_result_found_in_redis_answers_the_submit_and_is_kept() {
        let (mut core, now) = cluster_up();
        let (op, _) = asked(&mut core, now);
        let stored = "{\"at_ms\":1000,\"ok\":true,\"began_ms\":900,\"fn\":\"f\",\"tag\":\"0:\",\"output\":3}";
        let found = RedisReply::Acquired(Acquired::Found(stored.into()));
        redis(&mut core, op, found, now);
        let effects = answered(&mut core, now);
        assert_eq!(delivered(&effects), [(vec![1], ok("3"))]);
        assert_eq!(cached(&effects), 1);
        assert!(offered(&effects).is_empty());
    }

    #[test]
    fn a_submit_made_a_lease_after_an_unkept_outcome_gets_an_evaluation_of_its_own() {
        let (mut core, now) = cluster_up();
        let (op, _) = asked(&mut core, now);
        let held = RedisReply::Acquired(Acquired::Held("m:x:1".into()));
        redis(&mut core, op, held, now);
        answered(&mut core, now);
        let later = now + LEASE * 2;
        core.apply(submit(2), later);
        answered(&mut core, later);
        core.apply(notice("m:x:1", false, "7"), later);
        let effects = answered(&mut core, later);
        assert_eq!(delivered(&effects), [(vec![1], ok("7"))]);
        let sent = commands(effects);
        assert!(
            sent.iter()
                .any(|(_, op)| matches!(op, RedisOp::Acquire { .. })),
            "{sent:?}"
        );
    }

    fn subscribe(session: SessionId) -> Input {
        Input::Subscribe {
            session,
            id: None,
            key: Key::from_bytes([5; 16]),
            progress: false,
        }
    }

    #[test]
    fn subscriptions_left_without_a_job_are_looked_up_once() {
        // Subscribed after the submit: looked up once the job is gone.
        let (mut core, now) = cluster_up();
        let (op, _) = asked(&mut core, now);
        let held = RedisReply::Acquired(Acquired::Held("m:x:1".into()));
        redis(&mut core, op, held, now);
        core.apply(subscribe(3), now);
        let sent = commands(answered(&mut core, now));
        assert!(sent.is_empty(), "{sent:?}");
        core.apply(notice("m:x:1", false, "7"), now);
        let effects = answered(&mut core, now);
        assert_eq!(delivered(&effects), [(vec![1], ok("7"))]);
        let sent = commands(effects);
        assert!(matches!(&sent[..], [(_, RedisOp::Read { .. })]), "{sent:?}");
        // Subscribed first: looked up then, not again.
        let (mut core, now) = cluster_up();
        core.apply(subscribe(3), now);
        let sent = commands(answered(&mut core, now));
        let [(read, RedisOp::Read { .. })] = &sent[..] else {
            panic!("{sent:?}")
        };
        redis(&mut core, *read, RedisReply::Values(vec![None, None]), now);
        let (op, _) = asked(&mut core, now);
        let held = RedisReply::Acquired(Acquired::Held("m:x:1".into()));
        redis(&mut core, op, held, now);
        answered(&mut core, now);
        core.apply(notice("m:x:1", false, "7"), now);
        let effects = answered(&mut core, now);
        assert_eq!(delivered(&effects), [(vec![1], ok("7"))]);
        let sent = commands(effects);
        assert!(sent.is_empty(), "{sent:?}");
    }

    #[test]
    fn outcomes_heard_within_a_lease_of_an_invalidation_are_not_kept() {
        let (mut core, now) = cluster_up();
        let hex = Key::from_bytes([5; 16]).to_hex();
        // Heard by a subscriber, kept.
        let heard_at = |core: &mut Core, at: Instant| {
            core.apply(subscribe(3), at);
            answered(core, at);
            core.apply(Input::Pubsub(PubsubEvent::Pong { sent: at }), at);
            core.apply(notice("c", true, "1"), at);
            let effects = answered(core, at);
            assert_eq!(delivered(&effects), [(vec![3], ok("1"))]);
            cached(&effects)
        };
        assert_eq!(heard_at(&mut core, now), 1);
        let drop = format!("{{\"drop\":\"{hex}\"}}");
        core.apply(Input::Pubsub(PubsubEvent::Message(drop)), now);
        answered(&mut core, now);
        assert_eq!(heard_at(&mut core, now + LEASE), 0);
        assert_eq!(
            heard_at(&mut core, now + LEASE + Duration::from_millis(1)),
            1
        );
    }

    #[test]
    fn the_audit_finds_counts_that_do_not_add_up() {
        let corrupted = |corrupt: fn(&mut Core)| {
            let (mut core, now) = core(false);
            core.apply(submit(1), now);
            effects(&mut core);
            assert_eq!(core.audit(), Ok(()));
            corrupt(&mut core);
            core.audit()
        };
        let err = corrupted(|c| c.running += 1).unwrap_err();
        assert!(err.contains("running"), "{err}");
        let err = corrupted(|c| {
            let (at, gen) = *c.timers.first().expect("a timer");
            c.timers.insert((at + Duration::from_millis(1), gen));
        })
        .unwrap_err();
        assert!(err.contains("timers"), "{err}");
        let err = corrupted(|c| c.sessions.get_mut(&1).expect("held").total += 1).unwrap_err();
        assert!(err.contains("session 1"), "{err}");
    }

    #[test]
    fn a_late_outcome_nobody_waits_for_is_only_kept() {
        let (mut core, now) = core(false);
        core.apply(submit(1), now);
        let gen = offered(&effects(&mut core))[0];
        core.apply(Input::Started { gen, worker: None }, now);
        let later = now + Duration::from_secs(1);
        core.handle_timeout(later);
        effects(&mut core);
        core.apply(finished(gen, ok("1")), later);
        let effects = effects(&mut core);
        assert!(
            matches!(&effects[..], [Effect::Cache { outcome: Ok(_), .. }]),
            "{effects:?}"
        );
    }

    /// The notice of a failure of key 5 under `claim`, kept.
    fn failure_notice(claim: &str) -> Input {
        let hex = Key::from_bytes([5; 16]).to_hex();
        Input::Pubsub(PubsubEvent::Message(format!(
            "{{\"key\":\"{hex}\",\"at_ms\":1000,\"ok\":false,\"began_ms\":900,\"fn\":\"f\",\"tag\":\"0:\",\"claim\":\"{claim}\",\"error\":{{\"code\":\"eval_failed\",\"message\":\"boom\"}}}}"
        )))
    }

    #[test]
    fn only_a_kept_success_heard_answers_a_job_asking_or_running() {
        let (mut core, now) = cluster_up();
        asked(&mut core, now);
        core.apply(notice("m:x:1", true, "7"), now);
        assert_eq!(delivered(&answered(&mut core, now)), [(vec![1], ok("7"))]);
        let (mut core, now) = cluster_up();
        running_here(&mut core, now);
        core.apply(notice("m:x:1", false, "7"), now);
        core.apply(failure_notice("m:x:1"), now);
        assert!(delivered(&effects(&mut core)).is_empty());
        core.apply(notice("m:x:1", true, "8"), now);
        assert_eq!(delivered(&answered(&mut core, now)), [(vec![1], ok("8"))]);
    }
}
