//! The coordination core: the wait table and every key's lifecycle, as a
//! state machine that does no I/O.
//!
//! [`Core`] holds `key → {waiters, job}` and what each session holds in it.
//! Its one way in is [`Core::apply`] (something happened: a request, an
//! executor's report, a cluster reply) and [`Core::handle_timeout`] (the
//! clock passed [`Core::poll_timeout`]); both take `now` from the caller and
//! push [`Effect`]s that the caller takes with [`Core::poll`] and performs
//! after `apply` returns. No channel, clock, socket or await lives here, so
//! nothing re-enters the table while it changes, and the same core runs in
//! the broker (`hub`) and in the deterministic simulation (`tests/sim.rs`).
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
//! job, or both. The job's [`Phase`]:
//!
//! | from | event | to | who is told | what is released |
//! |---|---|---|---|---|
//! | (none) | submit, lone broker | `Queued` | submitter `accepted` | |
//! | (none) | submit, queue full | (none) | submitter `busy` | |
//! | (none) | submit, cluster | `Asking` | submitter `accepted`; cluster `Acquire` | |
//! | `Asking` | `Claimed` / `Takeover` | `Queued` (claimed) | executor `Offer` | |
//! | `Asking` | `Local` (Redis away) | `Queued` | executor `Offer` | |
//! | `Asking` | `Waiting` | `Waiting` | | timer reset to timeout + lease |
//! | `Waiting` | `Takeover` / `Local` | `Queued` | executor `Offer` | |
//! | `Asking`, `Waiting` | settle with the queue full | (none) | every waiter `busy` | claim, timer, `wait:false` holds |
//! | `Queued` | `Started` | `Running` | | timer reset to timeout |
//! | `Running` | `Requeued` (worker gone) | `Queued` | | |
//! | `Queued`, `Running` | `Finished` | (none) | every waiter the outcome; cache; cluster `Finished` | timer, claim (by `Finished`), holds |
//! | `Queued`, `Running` with a claim asked for half a lease ago or more | `Finished` | `Storing` | cluster `Finished` (confirm) | slot, running count |
//! | `Storing` | `Verdict` (or its own notice) | (none) | every waiter the result that stands (another broker's if stored first); cache | timer, holds |
//! | `Storing` | deadline (one lease) | (none) | every waiter its own outcome; cache | timer, holds |
//! | `Queued`, `Running` | deadline | (none) | every waiter `eval_timeout`; cache; cluster `Finished`; executor `Withdraw` | timer, claim, slot, holds |
//! | `Asking`, `Waiting` | deadline | (none) | every waiter `eval_timeout` (never published: the claim is not ours); cluster `Forget` | timer, claim if any, holds |
//! | any | `Found` / `Done` from the cluster | (none) | every waiter the outcome; cache | `Withdraw`, claim (`Release`), timer, holds |
//! | any with a claim | `Done` failure under another claim | unchanged | nobody (an earlier job's failure) | |
//! | any | `Stored` (a large output, not in the notice) | unchanged | cluster `Lookup`, which brings `Found` | |
//! | `Queued`, `Refused` by the executor | | (none) | every waiter `busy` | claim, timer, holds |
//! | any | last waiter leaves, no `wait:false` hold | (none), or kept | | see below |
//! | any | `Invalidate` of its key or fn (here, or `Dropped` from another broker) | unchanged, marked dropped | cache `Drop`; in a cluster, `Invalidate` (the answer waits for `Invalidated`) | |
//! | `Queued`, `Running`, marked dropped | `Finished` | (none) | every waiter the outcome; not cached, not stored | claim (`Release`), timer, holds |
//!
//! A late outcome (its job ended) is cached unless something was dropped
//! since its job began; an outcome from the cluster of a key or fn dropped
//! within the last lease is delivered but not cached.
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
//! Every phase has a deadline, so no job outlives its timeout (plus one
//! lease while it depends on another broker).

use crate::error::{ErrorCode, EvalError};
use crate::key::Key;
use crate::ns::Ns;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod cluster;
pub use cluster::{ClusterCmd, ClusterEvent};

/// A session, as the core knows it.
pub type SessionId = u64;
/// A request's `id`, echoed in its answers.
pub type ReqId = Option<Box<str>>;
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
    /// Cluster mode: jobs ask the cluster before they run.
    pub clustered: bool,
    /// `cluster.lease_ms`: how long another broker's claim may go silent.
    pub lease: Duration,
    /// `dashboard.input_preview_chars`.
    pub preview_chars: usize,
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
    },
    /// Wait for a key whoever submits it.
    Subscribe {
        session: SessionId,
        id: ReqId,
        key: Key,
    },
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
    /// A reply from the cluster task.
    Cluster(ClusterEvent),
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
    /// stands ([`ClusterEvent::Verdict`]).
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
    /// Tell the cluster task.
    Cluster(ClusterCmd),
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
    /// The cluster task looks this key up for its subscribers.
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
    "too many pending waits in this namespace (its [[namespace]] max_pending)";
/// The message of a `busy` answer for a full queue (jobs).
pub const QUEUE_FULL: &str = "the evaluation queue is full (queue_capacity)";
/// The message of a `busy` answer for a full queue (bytes).
pub const QUEUE_BYTES_FULL: &str = "the evaluation queue holds its most input bytes (queue_bytes)";
/// The message of a `shutting_down` answer.
pub const DRAINING: &str = crate::protocol::DRAINING_MESSAGE;

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
    /// In a cluster: what was dropped lately (oldest first). For one lease
    /// after a drop (and after its invalidation is answered), outcomes of
    /// it from the cluster are delivered but not cached: they may have
    /// been computed before it and been under way meanwhile.
    recent_drops: VecDeque<(Instant, Target)>,
    /// Jobs before this one were under way at the last drop: an outcome of
    /// one that comes after its job ended is delivered but not cached.
    drops_before: Gen,
}

impl Core {
    pub fn new(config: CoreConfig) -> Self {
        let queues = vec![(0, 0); config.fns.len()];
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
            recent_drops: VecDeque::new(),
            drops_before: 0,
        }
    }

    /// The next effect to perform.
    pub fn poll(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    /// When [`Core::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.first().map(|(at, _)| *at)
    }

    pub fn counts(&self) -> Counts {
        let queued = self.queues.iter().map(|q| q.0).sum();
        Counts {
            entries: self.table.len(),
            jobs: self.by_gen.len(),
            queued,
            running: self.running,
            sessions: self.sessions.len(),
            timers: self.timers.len(),
        }
    }

    /// Waits a session holds (for its bound).
    pub fn held_by(&self, session: SessionId) -> usize {
        self.sessions.get(&session).map_or(0, |s| s.total)
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
            })
            .collect()
    }

    /// Applies one input at `now`.
    pub fn apply(&mut self, input: Input, now: Instant) {
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
            } => self.submit(
                session, id, key, evaluator, input, wait, draining, max_age, now,
            ),
            Input::Subscribe { session, id, key } => self.subscribe(session, id, key),
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
                        self.running -= 1;
                        self.queues[evaluator].0 += 1;
                        self.queues[evaluator].1 += len;
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
                if let Some(key) = self.by_gen.get(&gen).copied() {
                    self.busy(key, reason);
                }
            }
            Input::Cluster(event) => self.cluster_event(event, now),
            Input::Invalidate {
                session,
                id,
                target,
            } => self.invalidate(session, id, target, now),
        }
    }

    /// Drops the cached results `target` names; the evaluations under way
    /// for them are delivered to their waiters but not kept.
    fn invalidate(&mut self, session: SessionId, id: ReqId, target: Target, now: Instant) {
        self.drop_results(target, now);
        if self.config.clustered {
            // Answered once Redis has it and every broker has dropped it.
            let cmd = ClusterCmd::Invalidate {
                target,
                session,
                id,
            };
            return self.effects.push_back(Effect::Cluster(cmd));
        }
        self.reply(session, id, Reply::Invalidated { target });
    }

    /// Drops the cached results `target` names here, and keeps the
    /// evaluations under way for them from being kept.
    fn drop_results(&mut self, target: Target, now: Instant) {
        self.effects.push_back(Effect::Drop(target));
        self.drops_before = self.next_gen;
        if self.config.clustered {
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

    /// Fires every deadline at or before `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(at, gen)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            if let Some(job) = self.job_mut(gen) {
                job.deadline = None;
                self.expired(gen);
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
        let max = self.config.ns_max_pending.get(&ns)?;
        let held = self.ns_held.get(&ns).copied().unwrap_or(0);
        (held >= *max).then_some(NS_PENDING_FULL)
    }

    /// Counts `n` more waits or holds of `session` (of namespace `ns`).
    fn hold(&mut self, session: SessionId, ns: Ns, n: usize) -> &mut SessionWaits {
        if self.config.ns_max_pending.contains_key(&ns) {
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
            let clustered = self.config.clustered;
            if !clustered {
                if let Some(message) = self.queue_full(evaluator, input.len()) {
                    let reply = Reply::Rejected {
                        code: ErrorCode::Busy,
                        message,
                    };
                    return self.reply(session, id, reply);
                }
            }
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
                deadline: None,
                queued_at: now,
                worker: None,
                preview,
                wanted: Vec::new(),
                evaluated: None,
                dropped: false,
            });
            if clustered {
                let timeout = self.config.fns[evaluator].timeout;
                let hold = timeout.saturating_add(self.config.lease);
                self.set_deadline(gen, now.checked_add(hold));
                let hold = hold.saturating_add(timeout);
                self.effects.push_back(Effect::Cluster(ClusterCmd::Acquire {
                    key,
                    gen,
                    evaluator,
                    hold,
                    max_age,
                }));
            } else {
                self.queue(gen, now);
            }
        }
        let entry = self
            .table
            .get_mut(&key)
            .expect("the entry was just made or found");
        let job = entry.job.as_mut().expect("a job was just made or found");
        let state = job.state();
        let waiters = entry.waiters.len() + usize::from(wait);
        if !wait && holds_new {
            job.wanted.push(session);
            let gen = job.gen;
            self.hold(session, key.ns(), 1).holds.push(gen);
        }
        let accepted = Reply::Accepted {
            key,
            evaluator,
            state,
            first: !joined,
            waiters,
        };
        self.reply(session, id.clone(), accepted);
        if wait {
            self.add_waiter(
                key,
                Waiter {
                    session,
                    id,
                    since: Some(now),
                },
            );
        }
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
        });
    }

    fn subscribe(&mut self, session: SessionId, id: ReqId, key: Key) {
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
                },
            );
        }
        if new_entry && self.config.clustered {
            // The result may be in the cluster's store already, or land
            // there while a notice is lost: the cluster task looks until
            // the entry goes.
            if let Some(entry) = self.table.get_mut(&key) {
                entry.looked = true;
            }
            self.effects
                .push_back(Effect::Cluster(ClusterCmd::Lookup { key }));
        }
    }

    fn add_waiter(&mut self, key: Key, waiter: Waiter) {
        let waits = self.hold(waiter.session, key.ns(), 1);
        *waits.by_key.entry(key).or_default() += 1;
        self.table.entry(key).or_default().waiters.push(waiter);
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
            },
            _ => Reply::Status {
                key,
                state: KeyState::Unknown,
                waiters: 0,
                age_ms: 0,
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
        entry.waiters.retain(|w| w.session != session);
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
                self.effects
                    .push_back(Effect::Cluster(ClusterCmd::Forget { key, gen }));
            } else {
                self.effects.push_back(Effect::Withdraw {
                    evaluator,
                    gen,
                    overran: false,
                });
            }
            self.end_job(key);
            self.remove_entry(key);
        }
    }

    /// Removes the entry of `key`; the cluster task stops looking it up.
    fn remove_entry(&mut self, key: Key) -> Option<Entry> {
        let entry = self.table.remove(&key)?;
        if entry.looked {
            self.effects
                .push_back(Effect::Cluster(ClusterCmd::Unlook { key }));
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
        let current = self.table.get(&key).map(|e| {
            e.job
                .as_ref()
                .map(|j| (j.gen, j.evaluator, j.phase.clone()))
        });
        let is_current = matches!(&current, Some(Some((g, _, p)))
            if *g == gen && matches!(p, Phase::Queued | Phase::Running));
        let dropped = is_current && self.job(&key).is_some_and(|j| j.dropped);
        if dropped {
            // Invalidated while it ran: its waiters get it, nobody keeps it.
            if let Some(job) = self.end_job(key) {
                let cmd = ClusterCmd::let_go(key, gen, job.claimed);
                if self.config.clustered {
                    self.effects.push_back(Effect::Cluster(cmd));
                }
                self.deliver(key, Some(job.evaluator), outcome, Source::Eval { eval_ms });
            }
            return;
        }
        if is_current && self.claim_may_have_lapsed(key, now) {
            return self.store_first(key, gen, outcome, eval_ms, now);
        }
        // Cache first: a miss racing this completion then finds the result.
        // A late outcome (its job ended) is kept unless something was
        // dropped since its job began.
        let keep = is_current || (outcome.is_ok() && gen >= self.drops_before);
        if keep {
            self.effects.push_back(Effect::Cache {
                key,
                evaluator,
                outcome: outcome.clone(),
                at_ms: None,
            });
            if self.config.clustered {
                self.effects
                    .push_back(Effect::Cluster(ClusterCmd::Finished {
                        key,
                        gen,
                        evaluator,
                        outcome: outcome.clone(),
                        confirm: false,
                    }));
            }
        }
        let source = Source::Eval { eval_ms };
        match current {
            Some(Some((_, evaluator, _))) if is_current => {
                self.end_job(key);
                self.deliver(key, Some(evaluator), outcome, source);
            }
            // A late outcome (its job ended) reaches whoever waits on the key now.
            Some(None) => self.deliver(key, None, outcome, source),
            // A success also answers a newer job's waiters; that job is not needed.
            Some(Some((newer, evaluator, phase))) if outcome.is_ok() => {
                self.release_job(key, newer, evaluator, &phase);
                self.deliver(key, Some(evaluator), outcome, source);
            }
            _ => {}
        }
    }

    /// Whether the claim the job of `key` holds may have run out: it was
    /// asked for more than half a lease ago (a claim lives at least one
    /// lease from the moment it is asked for, longer when renewed; half
    /// leaves room for clocks that run at different rates). Until then the
    /// job's outcome is certainly the cluster's, and is delivered at once.
    fn claim_may_have_lapsed(&self, key: Key, now: Instant) -> bool {
        self.job(&key).is_some_and(|job| {
            job.claimed && now.saturating_duration_since(job.queued_at) >= self.config.lease / 2
        })
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
        let Some(job) = self.job_mut(gen) else {
            return;
        };
        let (evaluator, len) = (job.evaluator, job.input_len);
        let phase = std::mem::replace(&mut job.phase, Phase::Storing);
        job.worker = None;
        job.evaluated = Some((outcome.clone(), eval_ms));
        self.leave_executor(evaluator, len, &phase);
        self.set_deadline(gen, now.checked_add(self.config.lease));
        self.effects
            .push_back(Effect::Cluster(ClusterCmd::Finished {
                key,
                gen,
                evaluator,
                outcome,
                confirm: true,
            }));
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
        if !job.dropped {
            self.effects.push_back(Effect::Cache {
                key,
                evaluator: job.evaluator,
                outcome: outcome.clone(),
                at_ms: None,
            });
        }
        self.deliver(key, Some(job.evaluator), outcome, source);
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
        if self.config.clustered {
            let cmd = ClusterCmd::let_go(key, gen, claimed);
            self.effects.push_back(Effect::Cluster(cmd));
        }
        self.end_job(key);
    }

    /// Hands the outcome to every waiter of `key` and removes its entry.
    fn deliver(
        &mut self,
        key: Key,
        evaluator: Option<usize>,
        outcome: Result<Arc<str>, EvalError>,
        source: Source,
    ) {
        let waiters = self.take_waiters(key);
        self.effects.push_back(Effect::Deliver(Delivery {
            key,
            evaluator,
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
        if job.claimed {
            self.effects
                .push_back(Effect::Cluster(ClusterCmd::Release { key, gen: job.gen }));
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
                self.effects.push_back(Effect::Cache {
                    key,
                    evaluator: job.evaluator,
                    outcome: Err(error.clone()),
                    at_ms: None,
                });
                if self.config.clustered {
                    self.effects
                        .push_back(Effect::Cluster(ClusterCmd::Finished {
                            key,
                            gen,
                            evaluator: job.evaluator,
                            outcome: Err(error.clone()),
                            confirm: false,
                        }));
                }
                let eval_ms = ms as f64;
                self.deliver(
                    key,
                    Some(job.evaluator),
                    Err(error),
                    Source::Eval { eval_ms },
                );
            }
            // Redis did not say in time: this broker's own outcome stands.
            Phase::Storing => self.stored(key, job, None),
            Phase::Asking | Phase::Waiting => {
                // Not ours to publish: only this broker's waiters are told.
                let error = EvalError::Timeout(format!(
                    "no outcome within {ms} ms plus one lease (timeout_ms of fn {:?}, cluster.lease_ms): the broker evaluating it did not answer",
                    &*limits.name
                ));
                let cmd = ClusterCmd::let_go(key, gen, job.claimed);
                self.effects.push_back(Effect::Cluster(cmd));
                let source = Source::Cluster { at_ms: None };
                self.deliver(key, Some(job.evaluator), Err(error), source);
            }
        }
    }

    fn cluster_event(&mut self, event: ClusterEvent, now: Instant) {
        match event {
            ClusterEvent::Claimed { key, gen, claim }
            | ClusterEvent::Takeover { key, gen, claim } => self.settle(key, gen, Some(claim), now),
            ClusterEvent::Local { key, gen } => self.settle(key, gen, None, now),
            ClusterEvent::Waiting { key, gen, holder } => {
                let Some(job) = self.job_mut(gen) else {
                    return self
                        .effects
                        .push_back(Effect::Cluster(ClusterCmd::Forget { key, gen }));
                };
                if job.phase == Phase::Asking {
                    job.phase = Phase::Waiting;
                    job.claim = Some(holder);
                    let evaluator = job.evaluator;
                    let wait = self.config.fns[evaluator]
                        .timeout
                        .saturating_add(self.config.lease);
                    self.set_deadline(gen, now.checked_add(wait));
                }
            }
            // Another broker's outcome is cached here only when someone
            // here waits for it: a broker does not hold every result of
            // the cluster.
            ClusterEvent::Found {
                key,
                evaluator,
                output,
                at_ms,
            } => self.outcome_from_cluster(key, evaluator, Ok(output), at_ms, now),
            ClusterEvent::Dropped(target) => self.drop_results(target, now),
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
            ClusterEvent::Stored { key } => {
                if let Some(entry) = self.table.get_mut(&key) {
                    entry.looked = true;
                    self.effects
                        .push_back(Effect::Cluster(ClusterCmd::Lookup { key }));
                }
            }
            ClusterEvent::Verdict { key, gen, stored } => self.verdict(key, gen, stored),
            ClusterEvent::Done {
                key,
                evaluator,
                outcome,
                claim,
                at_ms,
            } => {
                // This broker's own notice, ahead of Redis's verdict on it:
                // it was stored, so its own outcome stands.
                let own = self
                    .job(&key)
                    .filter(|j| j.phase == Phase::Storing && claim.is_some() && j.claim == claim);
                if let Some(gen) = own.map(|j| j.gen) {
                    return self.verdict(key, gen, None);
                }
                // A failure under another claim than the one this job holds
                // or waits on is an earlier job's: it does not end this one.
                let stale = outcome.is_err()
                    && self
                        .job(&key)
                        .and_then(|j| j.claim.as_ref())
                        .is_some_and(|mine| claim.as_ref() != Some(mine));
                if !stale {
                    self.outcome_from_cluster(key, evaluator, outcome, at_ms, now);
                }
            }
        }
    }

    /// Job `gen` runs here: it leaves the cluster's hands and is queued.
    /// Without such a job, a claim taken for it is given back.
    fn settle(&mut self, key: Key, gen: Gen, claim: Option<Arc<str>>, now: Instant) {
        let claimed = claim.is_some();
        let Some(job) = self
            .job_mut(gen)
            .filter(|j| matches!(j.phase, Phase::Asking | Phase::Waiting))
        else {
            let cmd = ClusterCmd::let_go(key, gen, claimed);
            return self.effects.push_back(Effect::Cluster(cmd));
        };
        job.claimed = claimed;
        job.claim = claim;
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
        let lease = self.config.lease;
        while self
            .recent_drops
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > lease)
        {
            self.recent_drops.pop_front();
        }
    }

    /// An outcome of fn `evaluator` from the cluster, computed at `at_ms`,
    /// for whoever waits here; cached unless it was dropped lately.
    fn outcome_from_cluster(
        &mut self,
        key: Key,
        evaluator: usize,
        outcome: Result<Arc<str>, EvalError>,
        at_ms: u64,
        now: Instant,
    ) {
        let Some(entry) = self.table.get(&key) else {
            return;
        };
        let job = entry
            .job
            .as_ref()
            .map(|j| (j.gen, j.evaluator, j.phase.clone()));
        if !self.dropped_lately(key, evaluator, now) {
            self.effects.push_back(Effect::Cache {
                key,
                evaluator,
                outcome: outcome.clone(),
                at_ms: Some(at_ms),
            });
        }
        let evaluator = job.as_ref().map(|j| j.1);
        if let Some((gen, evaluator, phase)) = job {
            self.release_job(key, gen, evaluator, &phase);
        }
        let source = Source::Cluster { at_ms: Some(at_ms) };
        self.deliver(key, evaluator, outcome, source);
    }
}
