//! Deterministic simulation of the coordination core, cluster decisions
//! included.
//!
//! Several brokers' cores, driven exactly as the hub drives one (apply an
//! input, perform every effect, apply what the effects bring back), run
//! against model executors (jobs finish, fail, hang, lose their worker),
//! a model Redis that carries out the very commands the core sends
//! ([`RedisOp`]: the scripts' meaning, on maps), a model of each broker's
//! completion-channel listener (subscribe, ping, messages in order), a
//! model of each broker's results cache, and model sessions (submit,
//! subscribe, get, cancel, invalidate, close). Faults: Redis stopped and
//! started empty, paused (commands wait, claims expire, replies time out
//! while the command still runs), slow; pub/sub connections killed;
//! brokers paused, and killed and started again. Everything comes from one
//! seeded RNG on a virtual clock, in one thread, so a seed replays exactly.
//! Each seed draws its own parameters: timeouts above and below the lease,
//! queues of one job and of many, few keys and many.
//!
//! After every step:
//! 1. every request gets exactly one outcome, or its session closes;
//! 2. the table's counts agree with what it holds ([`Core::audit`]): each
//!    session's count is its waits plus its holds, no timer outlives its
//!    job;
//! 3. without faults each key is evaluated at most once across all
//!    brokers (unless it was invalidated);
//! 4. a submit is answered within three timeouts plus four leases (two
//!    and one without faults) of when it was made, or of when its broker
//!    last offered an evaluation of its key (a claimant's failure is not
//!    stored: a broker that takes the key over after it evaluates anew),
//!    unless its broker was paused;
//! 5. the wait table stays within its bounds, and a core stops acting
//!    within each step (no loop between it and what its effects bring
//!    back);
//! 6. every waiter of one evaluation (one claim) gets the same outcome, and
//!    no waiter gets `eval_timeout` for a claim whose broker is still
//!    evaluating it;
//! 7. no request made after an `invalidated` answer gets a result computed
//!    before it, from an evaluation or a cache, and no broker keeps one
//!    begun before it;
//! 8. a broker that heard its evaluation's outcome while submits of it
//!    waited gives them that; with failures not kept, no submit made after
//!    a broker delivered a failure is given that failure;
//! 9. progress reports go only to requests that asked for them and are
//!    still waiting, each request's reports of one evaluation in `seq`
//!    order without duplicates;
//! 10. a request's deadline answer comes within one tick (1 ms) of its
//!     deadline, unless its broker was paused, and never after its outcome;
//! 11. `accepted` says the job's priority, the highest its submits asked
//!     for; a queued job never waits behind a lower-priority one, nor, at
//!     its priority, behind two jobs of one other namespace.
//!
//! Once faults are over and all is quiet:
//! 12. every broker's cached result of a key is the one Redis holds, or it
//!    holds none;
//! 13. no subscription waits for a key whose result Redis or a cache holds;
//! 14. once every session closes, nothing is left: no entry, job, timer,
//!     session record, claim, key waited on or looked up, command in
//!     flight.
//!
//! `HERD_SIM_SEED=n` replays one seed (printed on failure);
//! `HERD_SIM_SEEDS` (default 300) and `HERD_SIM_STEPS` (default 3000) set
//! how many runs and how long; `HERD_SIM_FIRST_SEED` where they start. A
//! soak: `HERD_SIM_SEEDS=5000 cargo test --release -p herd-core --test sim`.

use herd_core::error::{ErrorCode, EvalError};
use herd_core::key::Key;
use herd_core::ns::Ns;
use herd_core::redis::Acquired;
use herd_core::{
    claim_node, ClusterConfig, Core, CoreConfig, Effect, FnLimits, Gen, Input, Link, OpId,
    Priority, PubsubEvent, RedisOp, RedisReply, Reply, RunQueue, Source, Target, DEFAULT_PRIORITY,
    NS_PENDING_FULL, PENDING_FULL, QUEUE_BYTES_FULL, QUEUE_FULL,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Maps and sets that iterate in the same order in every run, so a seed
/// replays exactly.
type Fixed = std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>;
type HashMap<K, V> = std::collections::HashMap<K, V, Fixed>;
type HashSet<K> = std::collections::HashSet<K, Fixed>;

/// How long a Redis command may take before the broker counts it lost.
const REDIS_TIMEOUT_MS: u64 = 40;
/// The Unix time at the simulation's start.
const UNIX_BASE_MS: u64 = 1_700_000_000_000;
const PREFIX: &str = "herd:";

/// The simulation's namespaces, interned once in this order.
fn namespaces() -> [Ns; 2] {
    static NS: std::sync::OnceLock<[Ns; 2]> = std::sync::OnceLock::new();
    *NS.get_or_init(|| [Ns::SHARED, Ns::intern("sim-b", 16).expect("a valid name")])
}

/// One seed's settings.
#[derive(Debug, Clone)]
struct Params {
    brokers: usize,
    clustered: bool,
    faults: bool,
    timeout_ms: u64,
    lease_ms: u64,
    queue_capacity: usize,
    threads: usize,
    /// Distinct inputs (each in both namespaces).
    inputs: usize,
    max_pending: usize,
    error_ttl_s: u64,
    notice_inline_bytes: usize,
    writeback_max: usize,
    /// Whether namespace "sim-b"'s bound is its own (`ns_max_pending`) or
    /// the default of unlisted namespaces; set from the seed's parity, so
    /// the draws of seeds before it stay as they were.
    ns_listed: bool,
}

impl Params {
    fn draw(rng: &mut StdRng) -> Params {
        let brokers = rng.random_range(1..=3);
        let clustered = brokers > 1 || rng.random_bool(0.5);
        Params {
            brokers,
            clustered,
            faults: clustered && rng.random_bool(0.7),
            timeout_ms: *pick(rng, &[60, 150, 300, 700]),
            lease_ms: *pick(rng, &[150, 300, 600]),
            queue_capacity: *pick(rng, &[1, 2, 5, 16]),
            threads: rng.random_range(1..=3),
            inputs: *pick(rng, &[1, 3, 8, 20]),
            max_pending: *pick(rng, &[2, 6, 12]),
            error_ttl_s: *pick(rng, &[0, 0, 60]),
            notice_inline_bytes: *pick(rng, &[0, 4096, 4096]),
            writeback_max: *pick(rng, &[1, 4, 1000]),
            ns_listed: true,
        }
    }
}

fn pick<'a, T>(rng: &mut StdRng, from: &'a [T]) -> &'a T {
    &from[rng.random_range(0..from.len())]
}

#[derive(Debug, Clone)]
enum Ev {
    /// A model session on this broker does something.
    Op,
    /// A model executor ends a job.
    ExecDone {
        inc: u64,
        evaluator: usize,
        gen: Gen,
        key: Key,
        outcome: Outcome,
    },
    /// A running job reports progress (its `n`th report).
    Report {
        inc: u64,
        evaluator: usize,
        gen: Gen,
        n: u32,
    },
    /// A command reaches Redis (Redis's side: not held up by a paused broker).
    Exec {
        inc: u64,
        op: OpId,
        cmd: Box<RedisOp>,
        restarts: u64,
    },
    /// A command's reply reaches the broker (None: it timed out).
    Reply {
        inc: u64,
        op: OpId,
        reply: Option<RedisReply>,
    },
    /// A command's time is up.
    Deadline { inc: u64, op: OpId },
    /// What the broker's listener hears.
    Pubsub { inc: u64, event: PubsubEvent },
    /// The broker's listener subscribes, or pings its subscription.
    Listen { inc: u64 },
    /// A fault starts or ends.
    Fault,
}

impl Ev {
    /// Whether it happens in Redis rather than in the broker.
    fn redis_side(&self) -> bool {
        matches!(self, Ev::Exec { .. })
    }

    /// The broker incarnation it belongs to (None: any).
    fn inc(&self) -> Option<u64> {
        match self {
            Ev::ExecDone { inc, .. }
            | Ev::Report { inc, .. }
            | Ev::Exec { inc, .. }
            | Ev::Reply { inc, .. }
            | Ev::Deadline { inc, .. }
            | Ev::Pubsub { inc, .. }
            | Ev::Listen { inc } => Some(*inc),
            Ev::Op | Ev::Fault => None,
        }
    }
}

#[derive(Debug, Clone)]
enum Outcome {
    Done(Result<Arc<str>, EvalError>),
    /// The worker went away; its task goes back to the queue.
    Requeued,
}

struct Exec {
    /// Threads (or worker slots) free.
    free: usize,
    queue: RunQueue<Key>,
    /// Each running job's key, and its priority and arrival place (to
    /// requeue it).
    running: HashMap<Gen, (Key, Priority, u64)>,
    /// Per priority and namespace with jobs waiting: the namespaces whose
    /// jobs started since it last had one started (or began to wait).
    passed: HashMap<(Priority, Ns), Vec<Ns>>,
    /// Jobs taken back from a worker: their late outcome is dropped.
    revoked: HashSet<Gen>,
    abandon_running: bool,
}

/// The listener's subscription.
#[derive(Debug, Clone, Copy)]
struct Sub {
    /// Messages published from then on reach it.
    since: u64,
    /// The last delivery scheduled: deliveries keep their order.
    last: u64,
}

struct Broker {
    /// Its incarnation: a broker killed and started again is a new one.
    inc: u64,
    core: Core,
    /// Its results cache: what sessions are answered from.
    cache: HashMap<Key, Arc<str>>,
    /// In a cluster the cache is served only until then.
    confirmed_until: u64,
    exec: Vec<Exec>,
    sessions: Vec<u64>,
    paused_until: u64,
    pauses: u64,
    /// Jobs offered to this broker's executors.
    offered: HashSet<Gen>,
    sub: Option<Sub>,
    /// Commands sent and not yet answered: their deadline.
    ops: HashMap<OpId, u64>,
}

/// A value in the model Redis.
#[derive(Debug, Clone)]
struct Stored {
    value: String,
    /// Expires then (ms), if ever.
    expires: Option<u64>,
}

/// The model Redis: what the scripts in `herd_core::redis` do, on maps.
#[derive(Default)]
struct Redis {
    /// The process runs (a stopped one comes back empty).
    up: bool,
    paused_until: u64,
    slow: bool,
    strings: BTreeMap<String, Stored>,
    hashes: BTreeMap<String, BTreeMap<String, u64>>,
    /// Times it lost its data and its connections.
    restarts: u64,
}

impl Redis {
    fn get(&self, name: &str, now: u64) -> Option<&str> {
        let stored = self.strings.get(name)?;
        if stored.expires.is_some_and(|at| at <= now) {
            return None;
        }
        Some(&stored.value)
    }

    fn set(&mut self, name: &str, value: &str, expires: Option<u64>) {
        self.strings.insert(
            name.to_string(),
            Stored {
                value: value.to_string(),
                expires,
            },
        );
    }

    fn del(&mut self, name: &str) {
        self.strings.remove(name);
    }
}

/// A stored value's `began_ms`, as the scripts read it.
fn began_ms(value: &str) -> u64 {
    value
        .split_once("\"began_ms\":")
        .map(|(_, rest)| {
            rest.chars()
                .take_while(|c| c.is_ascii_digit())
                .collect::<String>()
        })
        .and_then(|d| d.parse().ok())
        .unwrap_or(0)
}

/// A stored value's `at_ms`, as the scripts read it.
fn at_ms(value: &str) -> u64 {
    value
        .split_once("\"at_ms\":")
        .map(|(_, rest)| {
            rest.chars()
                .take_while(|c| c.is_ascii_digit())
                .collect::<String>()
        })
        .and_then(|d| d.parse().ok())
        .unwrap_or(0)
}

#[derive(Debug, Clone)]
struct Req {
    key: Key,
    since: u64,
    /// Its answer's bound runs from then (see invariant 4).
    bound_from: u64,
    /// A submit that waits (bound by invariant 4).
    bounded: bool,
    subscription: bool,
    /// The broker's pause count when it was made.
    pauses: u64,
    answered_accepted: bool,
    /// An `invalidate` (a cancel does not end it).
    invalidation: Option<Target>,
    priority: Priority,
    /// It asked for progress reports.
    progress: bool,
    /// Its own deadline (ms).
    deadline: Option<u64>,
    /// The last report `seq` it got of each evaluation.
    seqs: HashMap<String, u64>,
}

/// A request: broker, session, id.
type Request = (usize, u64, String);

struct Sim {
    seed: u64,
    p: Params,
    rng: StdRng,
    base: Instant,
    now: u64,
    seq: u64,
    events: BTreeMap<(u64, u64), (usize, Ev)>,
    brokers: Vec<Broker>,
    redis: Redis,
    keys: Vec<(Key, usize)>,
    pending: HashMap<Request, Req>,
    next_session: u64,
    next_req: u64,
    faults: bool,
    quiescing: bool,
    evaluations: HashMap<Key, u32>,
    /// Keys an invalidation was asked for, or whose evaluation timed out:
    /// each may be evaluated again.
    invalidated: HashSet<Key>,
    /// When each output was computed.
    computed: HashMap<Arc<str>, u64>,
    /// For each key, the latest invalidation answered: when it was asked
    /// for, and when it was answered.
    invalidated_at: HashMap<Key, (u64, u64)>,
    /// When each invalidation was asked for (kept after its session closes).
    invalidations: HashMap<Request, u64>,
    /// Each claim's outcome as its claimant delivered it to its own waiters.
    claim_outcomes: HashMap<Arc<str>, String>,
    /// What waiters of each claim on other brokers got, and when.
    claim_joined: HashMap<Arc<str>, Vec<(u64, String)>>,
    /// When Redis last ran a look of broker `b` waiting on a claim: a
    /// waiter given what that look found got it as of then.
    looked: HashMap<(usize, Arc<str>), u64>,
    /// When broker `b` first delivered a failure (not kept: error_ttl_s
    /// 0), by key and text.
    failed: HashMap<(usize, Key, String), u64>,
    /// When each claim's outcome was first stored in Redis: from then on
    /// every waiter of the evaluation can learn it, and gets it. Before,
    /// a waiter elsewhere may give up on a claimant whose lease ran out and
    /// take the result that stands; an outcome only announced (its
    /// evaluation invalidated while it ran) reaches the waiters that hear
    /// the announcement.
    published: HashMap<String, u64>,
    /// The outcome of each claim whose notice each broker (incarnation)
    /// heard after it began waiting on that claim: from then on its waiters
    /// of that evaluation get that.
    heard: HashMap<(usize, u64, Arc<str>), String>,
    /// The claims each broker (incarnation) has waited on.
    joined: HashSet<(usize, u64, Arc<str>)>,
    /// Times each fn's epoch (per namespace) was raised in Redis, and each
    /// broker's drops of a whole fn's results (and, under `usize::MAX - b`,
    /// the invalidations of it asked for there): a broker drops a fn's
    /// results only for an invalidation (heard, read or its own) or its
    /// first read of the epochs.
    rises: HashMap<String, u64>,
    fn_drops: HashMap<(usize, String), u64>,
    /// When each evaluation (`b<broker>i<incarnation>g<gen>`) was offered
    /// to its executor.
    began: HashMap<String, u64>,
    /// Claims whose stored outcome an invalidation deleted: a waiter of the
    /// evaluation that had not heard it by then gets the result that
    /// stands instead.
    deleted: HashSet<String>,
    /// Each claim taken in the model Redis: the broker (and incarnation)
    /// that took it, and its name.
    claims: HashMap<Arc<str>, (usize, u64, String)>,
    /// Draws for priorities, deadlines and progress, apart from `rng` so
    /// that the other draws of a seed stay as they were.
    extra: StdRng,
    /// The priority each broker's job of a key has: the highest its
    /// submits asked for since the one that started it.
    want: HashMap<(usize, Key), Priority>,
    trace: VecDeque<String>,
}

fn config(p: &Params, broker: usize, inc: u64) -> CoreConfig {
    let fns = ["threads", "remote"]
        .iter()
        .enumerate()
        .map(|(i, name)| FnLimits {
            name: (*name).into(),
            timeout: Duration::from_millis(p.timeout_ms),
            queue_capacity: p.queue_capacity,
            queue_bytes: 64 * p.queue_capacity,
            abandon_running: i == 1,
        })
        .collect();
    let cluster = p.clustered.then(|| ClusterConfig {
        node: format!("b{broker}"),
        run: format!("i{inc}"),
        prefix: PREFIX.into(),
        lease: Duration::from_millis(p.lease_ms),
        result_ttl_s: 0,
        error_ttl_s: p.error_ttl_s,
        notice_inline_bytes: p.notice_inline_bytes,
        max_stored: 1 << 16,
        writeback_max: p.writeback_max,
        progress_per_s: 20,
        versions: vec![String::new(), String::new()],
    });
    CoreConfig {
        fns,
        max_pending: p.max_pending,
        // Namespace "sim-b"'s sessions together hold at most twice one
        // session's bound: as a listed namespace, or as an unlisted one.
        ns_max_pending: p
            .ns_listed
            .then(|| (namespaces()[1], 2 * p.max_pending))
            .into_iter()
            .collect(),
        ns_default_max_pending: (!p.ns_listed).then_some(2 * p.max_pending),
        cluster,
        preview_chars: 16,
        progress_bytes: 64,
    }
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut p = Params::draw(&mut rng);
        p.ns_listed = seed % 2 == 0;
        let base = Instant::now();
        let brokers = (0..p.brokers)
            .map(|b| Sim::broker(&p, b, 0, base, 0))
            .collect();
        // Each input in both namespaces: key 2n is input n in the shared
        // namespace, key 2n+1 the same input in namespace "sim-b".
        let keys = (0..2 * p.inputs)
            .map(|i| {
                let (n, ns) = (i / 2, namespaces()[i % 2]);
                let evaluator = n % 2;
                let name = ["threads", "remote"][evaluator];
                (
                    Key::derive(name, format!("{{\"n\":{n}}}").as_bytes()).in_ns(ns),
                    evaluator,
                )
            })
            .collect();
        let faults = p.faults;
        let mut sim = Sim {
            seed,
            p,
            rng,
            extra: StdRng::seed_from_u64(seed ^ 0x5eed),
            want: HashMap::default(),
            base,
            now: 0,
            seq: 0,
            events: BTreeMap::new(),
            brokers,
            redis: Redis {
                up: true,
                ..Redis::default()
            },
            keys,
            pending: HashMap::default(),
            next_session: 1,
            next_req: 1,
            faults,
            quiescing: false,
            evaluations: HashMap::default(),
            invalidated: HashSet::default(),
            computed: HashMap::default(),
            invalidated_at: HashMap::default(),
            invalidations: HashMap::default(),
            claim_outcomes: HashMap::default(),
            claim_joined: HashMap::default(),
            looked: HashMap::default(),
            failed: HashMap::default(),
            published: HashMap::default(),
            deleted: HashSet::default(),
            heard: HashMap::default(),
            began: HashMap::default(),
            joined: HashSet::default(),
            rises: HashMap::default(),
            fn_drops: HashMap::default(),
            claims: HashMap::default(),
            trace: VecDeque::new(),
        };
        for b in 0..sim.brokers.len() {
            sim.start(b);
        }
        if faults {
            let at = sim.rng.random_range(100..400);
            sim.at(at, 0, Ev::Fault);
        }
        sim
    }

    fn broker(p: &Params, b: usize, inc: u64, base: Instant, now: u64) -> Broker {
        let at = base + Duration::from_millis(now);
        Broker {
            inc,
            core: Core::new(config(p, b, inc), at, UNIX_BASE_MS + now),
            cache: HashMap::default(),
            confirmed_until: 0,
            exec: (0..2)
                .map(|i| Exec {
                    free: p.threads,
                    queue: RunQueue::default(),
                    running: HashMap::default(),
                    passed: HashMap::default(),
                    revoked: HashSet::default(),
                    abandon_running: i == 1,
                })
                .collect(),
            sessions: Vec::new(),
            paused_until: 0,
            pauses: 0,
            offered: HashSet::default(),
            sub: None,
            ops: HashMap::default(),
        }
    }

    /// Broker `b`'s sessions begin, and its listener.
    fn start(&mut self, b: usize) {
        for _ in 0..3 {
            let at = self.rng.random_range(0..20);
            self.at(at, b, Ev::Op);
        }
        if self.p.clustered {
            let inc = self.brokers[b].inc;
            self.at(0, b, Ev::Listen { inc });
        }
    }

    fn instant(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }

    fn at(&mut self, after: u64, broker: usize, ev: Ev) {
        self.seq += 1;
        self.events
            .insert((self.now + after, self.seq), (broker, ev));
    }

    fn note(&mut self, line: String) {
        if self.trace.len() >= env("HERD_SIM_TRACE", 80) as usize {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("[{} ms] {line}", self.now));
    }

    fn fail(&self, what: &str) -> ! {
        let trace: Vec<&str> = self.trace.iter().map(String::as_str).collect();
        let held: Vec<String> = self
            .brokers
            .iter()
            .enumerate()
            .map(|(i, b)| {
                format!(
                    "b{i} {:?} {:?} {:?}",
                    b.core.counts(),
                    b.core.cluster_holding(),
                    b.core.cluster_status()
                )
            })
            .collect();
        panic!(
            "simulation seed {} failed at {} ms: {what}\nbrokers: {held:#?}\nparameters: {:?}\nreplay: HERD_SIM_SEED={} cargo test -p herd-core --test sim\nlast steps:\n{}",
            self.seed,
            self.now,
            self.p,
            self.seed,
            trace.join("\n")
        );
    }

    /// One step: the earliest event or deadline. False when nothing is left.
    fn step(&mut self) -> bool {
        let next_event = self.events.keys().next().map(|(t, _)| *t);
        let next_timer = (0..self.brokers.len())
            .filter_map(|b| {
                let at = self.brokers[b].core.poll_timeout()?;
                let ms = at.saturating_duration_since(self.base).as_millis() as u64;
                Some((ms.max(self.brokers[b].paused_until), b))
            })
            .min();
        match (next_event, next_timer) {
            (None, None) => return false,
            (Some(e), Some((t, b))) if t < e => self.timer(t, b),
            (None, Some((t, b))) => self.timer(t, b),
            _ => {
                let ((t, seq), (b, ev)) = self.events.pop_first().expect("an event");
                self.now = self.now.max(t);
                let stale = ev.inc().is_some_and(|inc| inc != self.brokers[b].inc);
                if stale && !ev.redis_side() {
                    // Of a broker since killed (Redis still runs its commands).
                    return true;
                }
                if !ev.redis_side() && self.brokers[b].paused_until > self.now {
                    // A paused broker does nothing; its events wait.
                    let until = self.brokers[b].paused_until;
                    self.events.insert((until, seq), (b, ev));
                    return true;
                }
                self.event(b, ev);
            }
        }
        self.check();
        true
    }

    fn timer(&mut self, t: u64, b: usize) {
        self.now = self.now.max(t);
        if std::env::var("HERD_SIM_DEBUG").is_ok() {
            let held = self.brokers[b].core.cluster_holding();
            let status = self.brokers[b].core.cluster_status();
            self.note(format!("b{b} tick {held:?} {status:?}"));
        }
        let now = self.instant(self.now);
        self.brokers[b].core.handle_timeout(now);
        self.settle(b);
        self.check();
    }

    fn event(&mut self, b: usize, ev: Ev) {
        match ev {
            Ev::Op => {
                if !self.quiescing {
                    self.op(b);
                    let after = self.rng.random_range(1..15);
                    self.at(after, b, Ev::Op);
                }
            }
            Ev::ExecDone {
                evaluator,
                gen,
                key,
                outcome,
                ..
            } => self.exec_done(b, evaluator, gen, key, outcome),
            Ev::Report {
                inc,
                evaluator,
                gen,
                n,
            } => {
                if self.brokers[b].exec[evaluator].running.contains_key(&gen) {
                    let data = format!("\"r-b{b}i{inc}g{gen}-{n}\"").into();
                    self.apply(b, Input::Progress { gen, data });
                }
            }
            Ev::Exec {
                inc,
                op,
                cmd,
                restarts,
            } => self.exec(b, inc, op, cmd, restarts),
            Ev::Reply { op, reply, .. } => {
                if let Some(RedisReply::Acquired(Acquired::Held(holder))) = &reply {
                    // From now on b waits on that claim (its notices bind).
                    let inc = self.brokers[b].inc;
                    self.joined.insert((b, inc, holder.as_str().into()));
                }
                if self.brokers[b].ops.remove(&op).is_some() {
                    self.note(format!("b{b} reply {op}: {}", brief(&reply)));
                    self.apply(b, Input::Redis { op, reply });
                }
            }
            Ev::Deadline { op, .. } => {
                if self.brokers[b].ops.remove(&op).is_some() {
                    self.note(format!("b{b} op {op} timed out"));
                    self.apply(b, Input::Redis { op, reply: None });
                }
            }
            Ev::Pubsub { event, .. } => {
                self.note(format!("b{b} pubsub {}", brief_pubsub(&event)));
                if let PubsubEvent::Message(text) = &event {
                    self.hear(b, text);
                }
                self.apply(b, Input::Pubsub(event));
            }
            Ev::Listen { inc } => self.listen(b, inc),
            Ev::Fault => {
                if !self.quiescing {
                    self.fault();
                    let after = self.rng.random_range(50..600);
                    self.at(after, 0, Ev::Fault);
                }
            }
        }
    }

    /// Redis answers commands now (the process runs and is not paused).
    fn redis_answers(&self) -> bool {
        self.redis.up && self.redis.paused_until <= self.now
    }

    fn latency(&mut self) -> u64 {
        if self.redis.slow {
            self.rng.random_range(5..60)
        } else {
            self.rng.random_range(0..3)
        }
    }

    /// The listener: subscribes when it has no subscription, else pings it.
    fn listen(&mut self, b: usize, inc: u64) {
        let lease = self.p.lease_ms;
        if self.redis_answers() {
            let latency = self.latency();
            let event = match self.brokers[b].sub {
                None => {
                    self.brokers[b].sub = Some(Sub {
                        since: self.now,
                        last: self.now,
                    });
                    PubsubEvent::Subscribed
                }
                Some(_) => PubsubEvent::Pong {
                    sent: self.instant(self.now),
                },
            };
            if latency < REDIS_TIMEOUT_MS {
                self.deliver_pubsub(b, event, latency);
                self.at(lease / 3, b, Ev::Listen { inc });
                return;
            }
        }
        // Not answered in time: the subscription is made again.
        self.brokers[b].sub = None;
        self.at(
            REDIS_TIMEOUT_MS,
            b,
            Ev::Pubsub {
                inc,
                event: PubsubEvent::Down,
            },
        );
        self.at(2 * REDIS_TIMEOUT_MS, b, Ev::Listen { inc });
    }

    /// Hands broker `b`'s listener an event, after the ones before it.
    fn deliver_pubsub(&mut self, b: usize, event: PubsubEvent, delay: u64) {
        let Some(mut sub) = self.brokers[b].sub else {
            return;
        };
        let at = (self.now + delay).max(sub.last);
        sub.last = at;
        self.brokers[b].sub = Some(sub);
        let inc = self.brokers[b].inc;
        self.at(at - self.now, b, Ev::Pubsub { inc, event });
    }

    /// Every subscription drops (its connection killed): messages in
    /// flight are lost, and each listener subscribes again.
    fn drop_subscriptions(&mut self) {
        for b in 0..self.brokers.len() {
            if self.brokers[b].sub.take().is_some() {
                let inc = self.brokers[b].inc;
                self.events.retain(|_, (eb, ev)| {
                    !(*eb == b
                        && matches!(
                            ev,
                            Ev::Pubsub {
                                event: PubsubEvent::Message(_) | PubsubEvent::Pong { .. },
                                ..
                            }
                        ))
                });
                self.at(
                    1,
                    b,
                    Ev::Pubsub {
                        inc,
                        event: PubsubEvent::Down,
                    },
                );
            }
        }
    }

    /// Nothing left but the periodic (pings, renewals, reads of the
    /// epochs and of keys subscribed to): no job, claim, wait on another
    /// broker, write-back or invalidation under way, no message on its way,
    /// and every broker with Redis.
    fn quiet(&self) -> bool {
        self.events.values().all(|(_, ev)| {
            matches!(
                ev,
                Ev::Listen { .. }
                    | Ev::Exec { .. }
                    | Ev::Reply { .. }
                    | Ev::Deadline { .. }
                    | Ev::Pubsub {
                        event: PubsubEvent::Pong { .. },
                        ..
                    }
            )
        }) && self.brokers.iter().all(|b| {
            let [claims, _, waits, _, _, _, writebacks, invalidations] = b.core.cluster_holding();
            b.core.counts().jobs == 0
                && claims + waits + writebacks + invalidations == 0
                && b.core.cluster_status().is_none_or(|s| s.up())
        })
    }

    fn fault(&mut self) {
        match self.rng.random_range(0..8) {
            0 => {
                self.redis.up = !self.redis.up;
                if self.redis.up {
                    // A stopped Redis comes back empty.
                    self.restart_redis();
                } else {
                    self.redis.restarts += 1;
                    self.drop_subscriptions();
                }
                self.note(format!("fault: redis up={}", self.redis.up));
            }
            1 => {
                self.redis.slow = !self.redis.slow;
                self.note(format!("fault: slow={}", self.redis.slow));
            }
            2 => {
                let pause = self
                    .rng
                    .random_range(self.p.lease_ms / 2..self.p.lease_ms * 3);
                // A pause under way is not cut short: what it holds back
                // comes out in order.
                self.redis.paused_until = self.redis.paused_until.max(self.now + pause);
                self.note(format!("fault: redis paused {pause} ms"));
            }
            3 => {
                self.drop_subscriptions();
                self.note("fault: pub/sub connections killed".into());
            }
            4 | 5 => {
                let b = self.rng.random_range(0..self.brokers.len());
                let pause = self
                    .rng
                    .random_range(self.p.lease_ms / 2..self.p.lease_ms * 3);
                let broker = &mut self.brokers[b];
                broker.paused_until = broker.paused_until.max(self.now + pause);
                self.brokers[b].pauses += 1;
                self.note(format!("fault: b{b} paused {pause} ms"));
            }
            6 => {
                let b = self.rng.random_range(0..self.brokers.len());
                self.restart_broker(b);
            }
            _ => {
                if self.redis.up {
                    self.restart_redis();
                    self.note("fault: redis restarted empty".into());
                }
            }
        }
    }

    fn restart_redis(&mut self) {
        // Every stored outcome is gone: a waiter that had not learnt one
        // gets the result that stands later instead.
        for claim in self.published.keys() {
            self.deleted.insert(claim.clone());
        }
        self.redis.strings.clear();
        self.redis.hashes.clear();
        self.redis.restarts += 1;
        self.redis.paused_until = 0;
        self.drop_subscriptions();
    }

    /// Broker `b` is killed and started again: a new incarnation with
    /// nothing, its sessions and their requests gone.
    fn restart_broker(&mut self, b: usize) {
        let inc = self.brokers[b].inc + 1;
        self.note(format!("fault: b{b} killed, started again as i{inc}"));
        self.pending.retain(|(pb, _, _), _| *pb != b);
        let mut broker = Sim::broker(&self.p, b, inc, self.base, self.now);
        broker.pauses = self.brokers[b].pauses + 1;
        self.brokers[b] = broker;
        self.events
            .retain(|_, (eb, ev)| !(*eb == b && matches!(ev, Ev::Op)));
        self.start(b);
    }

    /// The fn of one of the simulation's keys.
    fn fn_of(&self, key: Key) -> usize {
        self.keys
            .iter()
            .find(|(k, _)| *k == key)
            .map_or(0, |(_, e)| *e)
    }

    fn req_id(&mut self) -> String {
        self.next_req += 1;
        format!("r{}", self.next_req)
    }

    /// Whether broker `b` serves `key` from its cache now: the output.
    fn cached(&self, b: usize, key: &Key) -> Option<Arc<str>> {
        let broker = &self.brokers[b];
        if self.p.clustered && broker.confirmed_until <= self.now {
            return None;
        }
        broker.cache.get(key).cloned()
    }

    fn op(&mut self, b: usize) {
        if self.brokers[b].sessions.is_empty() || self.rng.random_bool(0.05) {
            let s = self.next_session;
            self.next_session += 1;
            self.brokers[b].sessions.push(s);
        }
        let sessions = &self.brokers[b].sessions;
        let session = sessions[self.rng.random_range(0..sessions.len())];
        // A session's namespace is its number's parity: it uses that
        // namespace's keys only.
        let ns = namespaces()[(session % 2) as usize];
        let pick = 2 * self.rng.random_range(0..self.keys.len() / 2) + (session % 2) as usize;
        let (key, evaluator) = self.keys[pick];
        let id = self.req_id();
        let roll = self.rng.random_range(0..100);
        let pauses = self.brokers[b].pauses;
        let now = self.now;
        let priority = if self.extra.random_bool(0.4) {
            self.extra.random_range(0..=9)
        } else {
            DEFAULT_PRIORITY
        };
        let progress = self.extra.random_bool(0.4);
        let deadline_ms = self
            .extra
            .random_bool(0.15)
            .then(|| self.extra.random_range(1..=self.p.timeout_ms));
        let req = move |bounded: bool, subscription| Req {
            key,
            since: now,
            bound_from: now,
            bounded,
            subscription,
            pauses,
            answered_accepted: false,
            invalidation: None,
            priority,
            progress,
            deadline: deadline_ms.filter(|_| bounded).map(|d| now + d),
            seqs: HashMap::default(),
        };
        match roll {
            0..55 => {
                let wait = roll >= 5;
                if let Some(output) = self.cached(b, &key) {
                    self.note(format!(
                        "b{b} s{session} submit {} hit {output}",
                        short(&key)
                    ));
                    return self.check_fresh(b, &key, &output, now);
                }
                self.note(format!(
                    "b{b} s{session} {id} submit {} wait={wait} p{priority} deadline={deadline_ms:?} progress={progress}",
                    short(&key)
                ));
                self.pending
                    .insert((b, session, id.clone()), req(wait, false));
                self.apply(
                    b,
                    Input::Submit {
                        session,
                        id: Some(id.into()),
                        key,
                        evaluator,
                        input: format!("{{\"n\":{}}}", short(&key)).into(),
                        wait,
                        draining: false,
                        max_age: None,
                        priority,
                        deadline: deadline_ms.filter(|_| wait).map(Duration::from_millis),
                        progress,
                    },
                );
            }
            55..65 => {
                if let Some(output) = self.cached(b, &key) {
                    return self.check_fresh(b, &key, &output, now);
                }
                self.note(format!("b{b} s{session} {id} subscribe {}", short(&key)));
                self.pending
                    .insert((b, session, id.clone()), req(false, true));
                self.apply(
                    b,
                    Input::Subscribe {
                        session,
                        id: Some(id.into()),
                        key,
                        progress,
                    },
                );
            }
            65..72 => self.apply(
                b,
                Input::Get {
                    session,
                    id: Some(id.into()),
                    key,
                },
            ),
            72..88 => {
                self.note(format!("b{b} s{session} cancel {}", short(&key)));
                self.pending.retain(|(pb, ps, _), r| {
                    !(*pb == b && *ps == session && r.key == key && r.invalidation.is_none())
                });
                self.apply(
                    b,
                    Input::Cancel {
                        session,
                        id: Some(id.into()),
                        key,
                    },
                );
            }
            88..93 => {
                let target = if roll == 92 {
                    Target::Fn(ns, evaluator)
                } else {
                    Target::Key(key)
                };
                self.note(format!("b{b} s{session} {id} invalidate {target:?}"));
                for (k, e) in self.keys.clone() {
                    if target.covers(k, e) {
                        self.invalidated.insert(k);
                    }
                }
                // Bound like a submit: answered, refused or not, in time.
                let invalidation = Req {
                    invalidation: Some(target),
                    deadline: None,
                    progress: false,
                    ..req(true, false)
                };
                self.pending.insert((b, session, id.clone()), invalidation);
                self.invalidations.insert((b, session, id.clone()), now);
                if let Target::Fn(ns, e) = target {
                    // Asked here: dropped here at once, whatever Redis says.
                    *self
                        .fn_drops
                        .entry((usize::MAX - b, epoch_field(ns, e)))
                        .or_default() += 1;
                }
                self.apply(
                    b,
                    Input::Invalidate {
                        session,
                        id: Some(id.into()),
                        target,
                    },
                );
            }
            _ => {
                self.note(format!("b{b} s{session} closes"));
                self.close_session(b, session);
            }
        }
    }

    fn close_session(&mut self, b: usize, session: u64) {
        self.brokers[b].sessions.retain(|s| *s != session);
        self.pending
            .retain(|(pb, ps, _), _| !(*pb == b && *ps == session));
        self.apply(b, Input::SessionClosed { session });
    }

    fn apply(&mut self, b: usize, input: Input) {
        let now = self.instant(self.now);
        self.brokers[b].core.apply(input, now);
        self.settle(b);
    }

    /// Performs every effect, as the hub does, applying what comes back.
    /// A core that acts for ever on what its own effects bring back (a
    /// loop within one step, which would hang a broker's hub) fails.
    fn settle(&mut self, b: usize) {
        const MAX_EFFECTS: usize = 100_000;
        let mut follow_ups = Vec::new();
        let mut effects = 0;
        loop {
            while let Some(effect) = self.brokers[b].core.poll() {
                effects += 1;
                if effects > MAX_EFFECTS {
                    self.fail(&format!(
                        "b{b}: still acting after {MAX_EFFECTS} effects in one step"
                    ));
                }
                self.perform(b, effect, &mut follow_ups);
            }
            if follow_ups.is_empty() {
                break;
            }
            let now = self.instant(self.now);
            for input in std::mem::take(&mut follow_ups) {
                self.brokers[b].core.apply(input, now);
            }
        }
    }

    fn answered(
        &mut self,
        b: usize,
        session: u64,
        id: &herd_core::ReqId,
        what: &str,
    ) -> Option<Req> {
        let id = id.as_deref().unwrap_or("").to_string();
        let req = self.pending.remove(&(b, session, id.clone()));
        if req.is_none() && self.brokers[b].sessions.contains(&session) {
            self.fail(&format!(
                "b{b} s{session} {id}: an outcome ({what}) for a request that has none pending (twice, or after its cancel)"
            ));
        }
        req
    }

    /// A request refused `busy` was refused for a bound it reached: its
    /// session's or namespace's waits, its evaluator's queue, or (with
    /// faults) Redis not answering an invalidation.
    fn busy_for_a_reason(&self, b: usize, session: u64, id: &herd_core::ReqId, message: &str) {
        let core = &self.brokers[b].core;
        let ns = namespaces()[(session % 2) as usize];
        let request = (b, session, id.as_deref().unwrap_or("").to_string());
        let reached = match message {
            PENDING_FULL => core.held_by(session) >= self.p.max_pending,
            NS_PENDING_FULL => core.held_in(ns) >= 2 * self.p.max_pending,
            QUEUE_FULL | QUEUE_BYTES_FULL => {
                let Some(req) = self.pending.get(&request) else {
                    return;
                };
                let (jobs, bytes) = core.queued(self.fn_of(req.key));
                jobs >= self.p.queue_capacity || bytes + 16 > 64 * self.p.queue_capacity
            }
            m if m.starts_with("Redis did not answer") => self.faults,
            _ => false,
        };
        if !reached {
            self.fail(&format!(
                "b{b} s{session}: refused busy ({message}) below its bound"
            ));
        }
    }

    /// Broker `b` keeps `output` for `key`: not if its evaluation was
    /// under way when an invalidation of the key was asked for, and that
    /// invalidation has been answered (an evaluation under way is
    /// delivered to its waiters, never kept), while the broker's cache is
    /// served (a broker that has not heard every invalidation serves
    /// nothing from its cache, and empties it when it subscribes again).
    fn not_kept_if_invalidated(&self, b: usize, key: &Key, output: &str) {
        let Some((asked, answered)) = self.invalidated_at.get(key) else {
            return;
        };
        if self.p.clustered && self.brokers[b].confirmed_until <= self.now {
            return;
        }
        let Some(evaluation) = output.trim_matches('"').rsplit('-').next() else {
            return;
        };
        let Some(began) = self.began.get(evaluation) else {
            return;
        };
        if *began < *asked && *answered <= self.now {
            self.fail(&format!(
                "b{b} keeps {output} of {}, begun at {began} ms, though an invalidation asked for at {asked} ms was answered at {answered} ms",
                short(key)
            ));
        }
    }

    /// Broker `b` hears a notice: the outcome of the claim it names.
    fn hear(&mut self, b: usize, text: &str) {
        let Ok(notice) = serde_json::from_str::<serde_json::Value>(text) else {
            return;
        };
        let Some(claim) = notice["claim"].as_str() else {
            return;
        };
        let outcome = if let Some(output) = notice.get("output") {
            output.to_string()
        } else if let Some(error) = notice.get("error") {
            format!(
                "{}: {}",
                error["code"].as_str().unwrap_or(""),
                error["message"].as_str().unwrap_or("")
            )
        } else {
            return;
        };
        let inc = self.brokers[b].inc;
        let claim: Arc<str> = claim.into();
        // Heard while it has submits of the key waiting: a job of its own
        // waits on that claim (once they have all gone, a later job may
        // join the claim without having heard this).
        let hex = notice["key"].as_str().unwrap_or("");
        let ns = notice["ns"].as_str().unwrap_or("");
        let waits = self.pending.iter().any(|((pb, _, _), r)| {
            *pb == b && !r.subscription && r.key.to_hex() == hex && *r.key.ns().name() == *ns
        });
        if waits && self.joined.contains(&(b, inc, Arc::clone(&claim))) {
            self.heard.entry((b, inc, claim)).or_insert(outcome);
        }
    }

    /// Broker `b` handed `text` to waiters of the evaluation under `claim`:
    /// its claimant's waiters and every waiter elsewhere that got it after
    /// it was stored got the same.
    fn same_outcome(&mut self, b: usize, claim: &Arc<str>, text: String) {
        let inc = self.brokers[b].inc;
        if let Some(heard) = self.heard.get(&(b, inc, Arc::clone(claim))) {
            if *heard != text {
                self.fail(&format!(
                    "b{b} heard {heard} for claim {claim}, then gave its waiters {text}"
                ));
            }
        }
        if self.deleted.contains(&**claim) {
            return;
        }
        let stored_at = self.published.get(&**claim).copied();
        let learnable = |at: u64| stored_at.is_some_and(|s| s <= at);
        if claim_node(claim) == format!("b{b}") {
            let joined = self.claim_joined.get(claim).cloned().unwrap_or_default();
            if let Some((at, other)) = joined.iter().find(|(at, o)| *o != text && learnable(*at)) {
                self.fail(&format!(
                    "the waiters of one evaluation (claim {claim}) got different outcomes: {text} from its claimant, {other} elsewhere at {at} ms"
                ));
            }
            self.claim_outcomes.insert(Arc::clone(claim), text);
            return;
        }
        // A waiter elsewhere gets the claim's outcome as it hears it, or
        // what a look found: as of when Redis ran that look.
        let as_of = match self.looked.get(&(b, Arc::clone(claim))) {
            Some(at) if self.heard.get(&(b, inc, Arc::clone(claim))) != Some(&text) => *at,
            _ => self.now,
        };
        if let Some(own) = self.claim_outcomes.get(claim) {
            if *own != text && learnable(as_of) {
                self.fail(&format!(
                    "the waiters of one evaluation (claim {claim}) got different outcomes: {own} from its claimant, {text} on b{b}"
                ));
            }
        }
        self.claim_joined
            .entry(Arc::clone(claim))
            .or_default()
            .push((as_of, text));
    }

    /// Whether the claim `claim` is still held in Redis by a broker that
    /// runs (the incarnation that took it, not paused), and Redis answers.
    fn still_evaluated(&self, claim: &str) -> bool {
        let Some((cb, inc, name)) = self.claims.get(claim) else {
            return false;
        };
        let claimant = &self.brokers[*cb];
        self.redis_answers()
            && self.redis.get(name, self.now) == Some(claim)
            && claimant.inc == *inc
            && claimant.paused_until <= self.now
    }

    /// A request made at `since` on broker `b` got `output`: it must not
    /// have been computed before an invalidation answered by then.
    fn check_fresh(&self, b: usize, key: &Key, output: &Arc<str>, since: u64) {
        let (Some(computed), Some((asked, answered))) =
            (self.computed.get(output), self.invalidated_at.get(key))
        else {
            return;
        };
        if computed < asked && *answered < since {
            self.fail(&format!(
                "b{b}: a request of {} made at {since} ms got {output}, computed at {computed} ms, before the invalidation asked for at {asked} ms and answered at {answered} ms",
                short(key)
            ));
        }
    }

    fn perform(&mut self, b: usize, effect: Effect, follow_ups: &mut Vec<Input>) {
        match effect {
            Effect::Reply { session, id, reply } => match reply {
                Reply::Accepted {
                    key: k,
                    first,
                    priority,
                    ..
                } => {
                    let key = (b, session, id.as_deref().unwrap_or("").to_string());
                    if let Some(asked) = self.pending.get(&key).map(|r| r.priority) {
                        let want = self.want.entry((b, k)).or_insert(asked);
                        *want = if first { asked } else { asked.max(*want) };
                        if priority != *want {
                            let want = *want;
                            self.fail(&format!(
                                "b{b}: accepted says priority {priority} for {}, its submits asked for {want} at most",
                                short(&k)
                            ));
                        }
                    }
                    match self.pending.get_mut(&key) {
                        Some(r) if r.bounded => {
                            if r.answered_accepted {
                                self.fail("two accepted frames for one submit");
                            }
                            r.answered_accepted = true;
                        }
                        Some(_) => {
                            self.pending.remove(&key);
                        }
                        None => self.fail("accepted for an unknown submit"),
                    }
                }
                Reply::Subscribed { key, .. } => {
                    let id = id.as_deref().unwrap_or("").to_string();
                    let twice = self.pending.iter().any(|((pb, ps, pid), r)| {
                        *pb == b && *ps == session && *pid != id && r.key == key && r.subscription
                    });
                    if twice {
                        // A repeated subscription: the first one waits.
                        self.pending.remove(&(b, session, id));
                    }
                }
                Reply::Rejected { code, message } => {
                    self.note(format!("b{b} s{session} rejected {code}: {message}"));
                    if code != ErrorCode::Busy {
                        self.fail(&format!("unexpected rejection {code}"));
                    }
                    self.busy_for_a_reason(b, session, &id, message);
                    self.answered(b, session, &id, "rejected");
                }
                Reply::Invalidated { target } => {
                    // The promise holds once the answer is given, whether
                    // its session is still there to read it or not.
                    self.note(format!("b{b} s{session} invalidated {target:?}"));
                    let request = (b, session, id.as_deref().unwrap_or("").to_string());
                    let asked = self.invalidations.remove(&request).unwrap_or(self.now);
                    for (k, e) in self.keys.clone() {
                        if target.covers(k, e) {
                            self.invalidated_at.insert(k, (asked, self.now));
                        }
                    }
                    self.answered(b, session, &id, "invalidated");
                }
                Reply::Status {
                    key,
                    state,
                    waiters,
                    ..
                } => {
                    // What `get` says is what the table holds.
                    let now = self.instant(self.now);
                    let row = self.brokers[b]
                        .core
                        .view(now, usize::MAX)
                        .into_iter()
                        .find(|r| r.key == key);
                    let said = (state != herd_core::KeyState::Unknown).then_some(waiters);
                    if said != row.as_ref().map(|r| r.waiters) {
                        self.fail(&format!(
                            "b{b}: get says {state:?} with {waiters} waiters for {}, the table {:?}",
                            short(&key),
                            row.map(|r| (r.running, r.waiters))
                        ));
                    }
                }
                Reply::Cancelled { .. } => {}
            },
            Effect::Deliver(d) => {
                let text = match &d.outcome {
                    Ok(o) => o.to_string(),
                    Err(e) => format!("{}: {}", e.code(), e.message()),
                };
                self.note(format!(
                    "b{b} deliver {} to {} ({:?}, claim {:?}): {text}",
                    short(&d.key),
                    d.waiters.len(),
                    d.source,
                    d.claim,
                ));
                let gave_up = matches!(&d.outcome, Err(EvalError::Timeout(m)) if m.starts_with("no outcome"))
                    && matches!(d.source, Source::Cluster { .. });
                if let Some(claim) = &d.claim {
                    // Giving up is no outcome of the evaluation: whether it
                    // was too early is checked below.
                    if !d.waiters.is_empty() && !gave_up {
                        self.same_outcome(b, claim, text.clone());
                    }
                    if gave_up && !self.faults {
                        self.fail(&format!(
                            "b{b}: without faults, waiters of claim {claim} were given up on"
                        ));
                    }
                    if gave_up && self.still_evaluated(claim) {
                        self.fail(&format!(
                            "b{b} gave eval_timeout for claim {claim}, which {} still evaluates",
                            claim_node(claim)
                        ));
                    }
                }
                if matches!(d.outcome, Err(EvalError::Timeout(_))) {
                    // Its evaluation may still finish, and the next one too.
                    self.invalidated.insert(d.key);
                }
                for w in &d.waiters {
                    let request = (b, w.session, w.id.as_deref().unwrap_or("").to_string());
                    if self.pending.get(&request).is_some_and(|r| r.key != d.key) {
                        self.fail(&format!(
                            "b{b} s{}: the result of {:?} reached a wait for another key or namespace",
                            w.session, d.key
                        ));
                    }
                    if let Some(req) = self.answered(b, w.session, &w.id, "result") {
                        if let Ok(output) = &d.outcome {
                            self.check_fresh(b, &d.key, output, req.since);
                        }
                        // A failure that is not kept answers only the
                        // waiters of its evaluation: not a submit made
                        // after this broker had delivered it.
                        let once = self.p.error_ttl_s == 0 && text.contains(": boom-");
                        let seen = self.failed.get(&(b, d.key, text.clone())).copied();
                        if let Some(at) =
                            seen.filter(|at| once && !req.subscription && *at < req.since)
                        {
                            self.fail(&format!(
                                "b{b}: a submit of {} made at {} ms got {text}, which this broker had delivered at {at} ms",
                                short(&d.key),
                                req.since
                            ));
                        }
                    }
                }
                if d.outcome.is_err() && !d.waiters.is_empty() {
                    self.failed.entry((b, d.key, text)).or_insert(self.now);
                }
            }
            Effect::Busy { waiters, message } => {
                if ![QUEUE_FULL, QUEUE_BYTES_FULL].contains(&message) {
                    self.fail(&format!("b{b}: waiters told busy: {message}"));
                }
                for w in &waiters {
                    self.answered(b, w.session, &w.id, "busy");
                }
            }
            Effect::Offer {
                evaluator,
                key,
                gen,
                priority,
                ..
            } => {
                self.note(format!("b{b} offer {} g{gen} p{priority}", short(&key)));
                self.brokers[b].offered.insert(gen);
                let inc = self.brokers[b].inc;
                self.began.insert(format!("b{b}i{inc}g{gen}"), self.now);
                let now = self.now;
                for ((pb, _, _), r) in self.pending.iter_mut() {
                    if *pb == b && r.key == key {
                        r.bound_from = r.bound_from.max(now);
                    }
                }
                let exec = &mut self.brokers[b].exec[evaluator];
                exec.queue.push(gen, key.ns(), priority, key);
                self.start_jobs(b, evaluator, follow_ups);
            }
            Effect::Raise {
                evaluator,
                gen,
                priority,
            } => {
                self.note(format!("b{b} raise g{gen} to p{priority}"));
                let exec = &mut self.brokers[b].exec[evaluator];
                let Some(key) = exec.queue.iter().find(|(g, _)| *g == gen).map(|(_, k)| *k) else {
                    self.fail(&format!("b{b}: raised g{gen}, which is not queued"));
                };
                exec.queue.raise(gen, priority);
                // Its submit's `accepted` follows; it waits at this
                // priority from now on.
                let want = self.want.entry((b, key)).or_insert(priority);
                *want = priority.max(*want);
                self.prune_passed(b, evaluator);
            }
            Effect::Progress { key, seq, data, to } => {
                let tag = data.rsplit_once('-').map_or("", |(t, _)| t).to_string();
                for (session, id) in to {
                    let request = (b, session, id.as_deref().unwrap_or("").to_string());
                    let Some(req) = self.pending.get_mut(&request) else {
                        if self.brokers[b].sessions.contains(&session) {
                            self.fail(&format!(
                                "b{b} s{session}: progress {seq} of {} for a request already answered",
                                short(&key)
                            ));
                        }
                        continue;
                    };
                    if !req.progress || req.key != key {
                        self.fail(&format!(
                            "b{b} s{session}: progress of {} for a request that did not ask for it",
                            short(&key)
                        ));
                    }
                    let last = req.seqs.entry(tag.clone()).or_insert(0);
                    if seq <= *last {
                        let last = *last;
                        self.fail(&format!(
                            "b{b} s{session}: progress {seq} of {tag} after {last}"
                        ));
                    } else {
                        *last = seq;
                    }
                }
            }
            Effect::DeadlineExceeded {
                session,
                id,
                key,
                deadline_ms,
            } => {
                self.note(format!(
                    "b{b} s{session} deadline of {} ({deadline_ms} ms)",
                    short(&key)
                ));
                let pauses = self.brokers[b].pauses;
                if let Some(req) = self.answered(b, session, &id, "deadline_exceeded") {
                    let Some(at) = req.deadline else {
                        self.fail("a deadline nobody asked for");
                    };
                    let late = self.now > at + 1 && req.pauses == pauses;
                    if self.now < at || late || req.key != key {
                        self.fail(&format!(
                            "b{b} s{session}: deadline of {} due at {at} ms answered at {} ms",
                            short(&key),
                            self.now
                        ));
                    }
                }
            }
            Effect::Withdraw {
                evaluator,
                gen,
                overran,
            } => {
                self.note(format!("b{b} withdraw g{gen} overran={overran}"));
                let exec = &mut self.brokers[b].exec[evaluator];
                exec.queue.remove(gen);
                self.prune_passed(b, evaluator);
                let exec = &mut self.brokers[b].exec[evaluator];
                if exec.running.contains_key(&gen) && (exec.abandon_running || overran) {
                    // A worker is sent revoke; an overrunning thread is replaced by a spare.
                    exec.running.remove(&gen);
                    exec.free += 1;
                    if exec.abandon_running {
                        exec.revoked.insert(gen);
                    }
                }
                self.start_jobs(b, evaluator, follow_ups);
            }
            Effect::Cache { key, outcome, .. } => {
                if let Ok(output) = outcome {
                    self.note(format!("b{b} caches {} = {output}", short(&key)));
                    self.not_kept_if_invalidated(b, &key, &output);
                    self.brokers[b].cache.insert(key, output);
                }
            }
            Effect::Drop(target) => {
                if let Target::Fn(ns, e) = target {
                    let field = epoch_field(ns, e);
                    let inc = self.brokers[b].inc;
                    let asked = self.fn_drops.get(&(usize::MAX - b, field.clone())).copied();
                    let drops = self.fn_drops.entry((b, field.clone())).or_default();
                    *drops += 1;
                    // Its own invalidation drops, and so may hearing it
                    // and reading it; plus one read per incarnation.
                    let bound = 3 * self.rises.get(&field).copied().unwrap_or(0)
                        + asked.unwrap_or(0)
                        + inc
                        + 1;
                    if *drops > bound {
                        let drops = *drops;
                        self.fail(&format!(
                            "b{b} dropped every result of {field} {drops} times, for {} raises of its epoch",
                            self.rises.get(&field).copied().unwrap_or(0)
                        ));
                    }
                }
                let keys = self.keys.clone();
                let cache = &mut self.brokers[b].cache;
                for (k, e) in keys {
                    if target.covers(k, e) {
                        cache.remove(&k);
                    }
                }
            }
            Effect::ConfirmCache(until) => {
                let until = until.saturating_duration_since(self.base).as_millis() as u64;
                let broker = &mut self.brokers[b];
                broker.confirmed_until = broker.confirmed_until.max(until);
            }
            Effect::ForgetCache => self.brokers[b].cache.clear(),
            Effect::Redis { op, cmd } => self.send(b, op, cmd),
        }
    }

    /// Broker `b` sends a command to Redis.
    fn send(&mut self, b: usize, op: OpId, cmd: RedisOp) {
        if !matches!(
            cmd,
            RedisOp::Ping | RedisOp::Sync { .. } | RedisOp::Renew { .. }
        ) {
            let text = format!("{cmd:?}");
            self.note(format!(
                "b{b} sends {op}: {}",
                &text[..text.len().min(2000)]
            ));
        }
        let inc = self.brokers[b].inc;
        let deadline = self.now + REDIS_TIMEOUT_MS;
        self.brokers[b].ops.insert(op, deadline);
        self.at(REDIS_TIMEOUT_MS, b, Ev::Deadline { inc, op });
        if !self.redis.up {
            // Refused at once, or lost until the timeout.
            if self.rng.random_bool(0.5) {
                let after = self.rng.random_range(0..3);
                self.at(
                    after,
                    b,
                    Ev::Reply {
                        inc,
                        op,
                        reply: None,
                    },
                );
            }
            return;
        }
        let latency = self.latency();
        let restarts = self.redis.restarts;
        self.at(
            latency,
            b,
            Ev::Exec {
                inc,
                op,
                cmd: Box::new(cmd),
                restarts,
            },
        );
    }

    /// A command reaches Redis: it waits out a pause, runs, and its reply
    /// goes back unless its time is up.
    fn exec(&mut self, b: usize, inc: u64, op: OpId, cmd: Box<RedisOp>, restarts: u64) {
        if restarts != self.redis.restarts || !self.redis.up {
            // Its connection was lost with the Redis it was sent to.
            return;
        }
        if self.redis.paused_until > self.now {
            let until = self.redis.paused_until - self.now;
            self.at(
                until,
                b,
                Ev::Exec {
                    inc,
                    op,
                    cmd,
                    restarts,
                },
            );
            return;
        }
        let reply = self.execute(b, &cmd);
        if !matches!(
            *cmd,
            RedisOp::Ping | RedisOp::Sync { .. } | RedisOp::Renew { .. }
        ) {
            self.note(format!(
                "redis runs b{b}i{inc} {op}: {}",
                brief(&Some(reply.clone()))
            ));
        }
        let latency = self.latency();
        if inc != self.brokers[b].inc {
            return;
        }
        let Some(deadline) = self.brokers[b].ops.get(&op).copied() else {
            return;
        };
        if self.now + latency <= deadline {
            self.at(
                latency,
                b,
                Ev::Reply {
                    inc,
                    op,
                    reply: Some(reply),
                },
            );
        }
    }

    /// What the command does to the model Redis, and its reply: the
    /// meaning of each script in `herd_core::redis`.
    fn execute(&mut self, from: usize, cmd: &RedisOp) -> RedisReply {
        let now = self.now;
        let redis = &mut self.redis;
        match cmd {
            RedisOp::Ping => RedisReply::Pong,
            RedisOp::Acquire {
                result,
                claim,
                dropped,
                value,
                lease_ms,
                since_ms,
                waited,
                waited_result,
                wait_for,
            } => {
                let marker: u64 = redis
                    .get(dropped, now)
                    .and_then(|d| d.parse().ok())
                    .unwrap_or(0);
                let kept = |v: &str| marker == 0 || began_ms(v) > marker;
                if !wait_for.is_empty() {
                    self.looked.insert((from, wait_for.as_str().into()), now);
                    if redis.get(waited, now) == Some(wait_for.as_str()) {
                        return RedisReply::Acquired(Acquired::Held(wait_for.clone()));
                    }
                    let named = format!("\"claim\":\"{wait_for}\"");
                    if let Some(w) = redis
                        .get(waited_result, now)
                        .filter(|w| w.contains(&named) && kept(w))
                    {
                        return RedisReply::Acquired(Acquired::Found(w.to_string()));
                    }
                }
                if let Some(r) = redis.get(result, now) {
                    if at_ms(r) >= *since_ms && kept(r) {
                        return RedisReply::Acquired(Acquired::Found(r.to_string()));
                    }
                }
                match redis.get(claim, now) {
                    None => {
                        redis.set(claim, value, Some(now + lease_ms));
                        let inc = self.brokers[from].inc;
                        self.claims
                            .insert(value.as_str().into(), (from, inc, claim.clone()));
                        RedisReply::Acquired(Acquired::Claimed)
                    }
                    Some(holder) => RedisReply::Acquired(Acquired::Held(holder.to_string())),
                }
            }
            RedisOp::Read { names } => RedisReply::Values(
                names
                    .iter()
                    .map(|n| redis.get(n, now).map(str::to_string))
                    .collect(),
            ),
            RedisOp::Finish {
                result,
                claim,
                dropped,
                boot,
                began_under,
                token,
                stored,
                ttl_s: _,
                keep,
                replace_before_ms,
                channel: _,
                notice,
                shared,
            } => {
                if !token.is_empty() && redis.get(claim, now) == Some(token.as_str()) {
                    redis.del(claim);
                }
                if !keep {
                    self.publish(notice);
                    return RedisReply::Finished {
                        stored: false,
                        current: None,
                        dropped: false,
                    };
                }
                let marker = redis
                    .get(dropped, now)
                    .and_then(|d| d.parse().ok())
                    .unwrap_or(0);
                let forgot = !boot.is_empty() && redis.get(boot, now) != Some(began_under.as_str());
                if began_ms(stored) <= marker || forgot {
                    if !shared.is_empty() {
                        self.publish(shared);
                    }
                    return RedisReply::Finished {
                        stored: false,
                        current: None,
                        dropped: true,
                    };
                }
                let current = redis.get(result, now).map(str::to_string);
                let failed = |v: &str| v.contains("\"ok\":false") && !v.contains("\"ok\":true");
                let dead = |v: &str| marker > 0 && began_ms(v) <= marker;
                let replace = current.as_deref().is_none_or(|r| {
                    dead(r) || at_ms(r) < *replace_before_ms || (failed(r) && !failed(stored))
                });
                if replace {
                    // What it replaces can no longer be learnt.
                    if let Some((_, rest)) = current
                        .as_deref()
                        .and_then(|c| c.split_once("\"claim\":\""))
                    {
                        self.deleted
                            .insert(rest.split('"').next().unwrap_or("").to_string());
                    }
                    if let Some((_, rest)) = stored.split_once("\"claim\":\"") {
                        let value = rest.split('"').next().unwrap_or("");
                        self.published.entry(value.to_string()).or_insert(now);
                    }
                    let redis = &mut self.redis;
                    redis.set(result, stored, None);
                    self.publish(notice);
                    return RedisReply::Finished {
                        stored: true,
                        current: None,
                        dropped: false,
                    };
                }
                if !shared.is_empty() {
                    self.publish(shared);
                }
                RedisReply::Finished {
                    stored: false,
                    current,
                    dropped: false,
                }
            }
            RedisOp::Renew { claims, lease_ms } => RedisReply::Renewed(
                claims
                    .iter()
                    .map(|(name, value)| {
                        let ours = redis.get(name, now) == Some(value.as_str());
                        if ours {
                            redis.set(name, value, Some(now + lease_ms));
                        }
                        ours
                    })
                    .collect(),
            ),
            RedisOp::Release { claim, value } => {
                if redis.get(claim, now) == Some(value.as_str()) {
                    redis.del(claim);
                }
                RedisReply::Done
            }
            RedisOp::Raise {
                hash,
                field,
                at_least,
            } => {
                let fields = redis.hashes.entry(hash.clone()).or_default();
                let epoch = fields.get(field).copied().unwrap_or(0).max(*at_least) + 1;
                fields.insert(field.clone(), epoch);
                *self.rises.entry(field.clone()).or_default() += 1;
                RedisReply::Raised(epoch)
            }
            RedisOp::Sync {
                hashes,
                boot,
                candidate,
            } => {
                let hashes = hashes
                    .iter()
                    .map(|(hash, known)| {
                        let fields = redis.hashes.entry(hash.clone()).or_default();
                        for (field, epoch) in known {
                            let have = fields.entry(field.clone()).or_default();
                            *have = (*have).max(*epoch);
                        }
                        fields.iter().map(|(f, e)| (f.clone(), *e)).collect()
                    })
                    .collect();
                if redis.get(boot, now).is_none() {
                    redis.set(boot, candidate, None);
                }
                let boot = redis.get(boot, now).unwrap_or_default().to_string();
                RedisReply::Epochs { hashes, boot }
            }
            RedisOp::Publish { message, .. } => {
                self.publish(message);
                RedisReply::Done
            }
            RedisOp::Drop {
                names,
                dropped,
                before_ms,
                ttl_s: _,
                channel: _,
                notice,
            } => {
                for name in names {
                    if let Some(r) = redis.get(name, now).filter(|r| began_ms(r) < *before_ms) {
                        if let Some((_, rest)) = r.split_once("\"claim\":\"") {
                            let claim = rest.split('"').next().unwrap_or("").to_string();
                            self.deleted.insert(claim);
                        }
                        redis.del(name);
                    }
                }
                let marker: u64 = redis
                    .get(dropped, now)
                    .and_then(|d| d.parse().ok())
                    .unwrap_or(0);
                if *before_ms > marker {
                    redis.set(dropped, &before_ms.to_string(), None);
                }
                // Results of the key left under other names (another tag)
                // are never read again either.
                let results = dropped.replacen("dropped:", "result:", 1);
                for (name, value) in &redis.strings {
                    if name.starts_with(&results) && began_ms(&value.value) <= *before_ms {
                        if let Some((_, rest)) = value.value.split_once("\"claim\":\"") {
                            self.deleted
                                .insert(rest.split('"').next().unwrap_or("").to_string());
                        }
                    }
                }
                if !notice.is_empty() {
                    self.publish(notice);
                }
                RedisReply::Done
            }
        }
    }

    /// A message on the completion channel reaches every subscription made
    /// before now, in order.
    fn publish(&mut self, message: &str) {
        for b in 0..self.brokers.len() {
            let subscribed = self.brokers[b].sub.is_some_and(|s| s.since <= self.now);
            if subscribed {
                let delay = self.latency();
                self.deliver_pubsub(b, PubsubEvent::Message(message.to_string()), delay);
            }
        }
    }

    fn start_jobs(&mut self, b: usize, evaluator: usize, follow_ups: &mut Vec<Input>) {
        loop {
            let exec = &mut self.brokers[b].exec[evaluator];
            if exec.free == 0 {
                return;
            }
            let Some(taken) = exec.queue.pop() else {
                return;
            };
            let (gen, key) = (taken.gen, taken.item);
            exec.free -= 1;
            exec.running.insert(gen, (key, taken.priority, taken.seq));
            self.started_in_order(b, evaluator, key);
            follow_ups.push(Input::Started {
                gen,
                worker: (evaluator == 1).then(|| Arc::from("worker")),
            });
            let roll = self.rng.random_range(0..100);
            let inc = self.brokers[b].inc;
            let outcome = match roll {
                0..8 => Some(Outcome::Done(Err(EvalError::Failed(format!(
                    "boom-b{b}i{inc}g{gen}"
                ))))),
                8..11 => None,
                11..15 if self.faults && evaluator == 1 => Some(Outcome::Requeued),
                15..17 if self.faults && evaluator == 1 => {
                    Some(Outcome::Done(Err(EvalError::Failed("worker lost".into()))))
                }
                _ => Some(Outcome::Done(Ok(format!(
                    "\"v{}-b{b}i{inc}g{gen}\"",
                    short(&key)
                )
                .into()))),
            };
            let inc = self.brokers[b].inc;
            let reports = self.extra.random_range(0..4);
            for n in 1..=reports {
                let at = self.extra.random_range(0..self.p.timeout_ms);
                let report = Ev::Report {
                    inc,
                    evaluator,
                    gen,
                    n,
                };
                self.at(at, b, report);
            }
            if let Some(outcome) = outcome {
                // Mostly within the timeout, sometimes past it.
                let took = self.rng.random_range(1..self.p.timeout_ms * 5 / 4);
                let inc = self.brokers[b].inc;
                self.at(
                    took,
                    b,
                    Ev::ExecDone {
                        inc,
                        evaluator,
                        gen,
                        key,
                        outcome,
                    },
                );
            }
        }
    }

    /// Job of `key` started on executor `evaluator` of broker `b`: no job
    /// left waiting has a higher priority than its submits asked for, and
    /// at its priority no namespace with jobs waiting has seen two jobs of
    /// another namespace start since its own last one.
    fn started_in_order(&mut self, b: usize, evaluator: usize, key: Key) {
        let want = |sim: &Sim, k: &Key| sim.want.get(&(b, *k)).copied().unwrap_or(DEFAULT_PRIORITY);
        let p = want(self, &key);
        let waiting = self.waiting(b, evaluator);
        if let Some((q, _)) = waiting.iter().find(|(q, _)| *q > p) {
            self.fail(&format!(
                "b{b}: {} started at priority {p} while a job of priority {q} waited",
                short(&key)
            ));
        }
        self.note(format!("b{b} e{evaluator} starts {} p{p}", short(&key)));
        let ns = key.ns();
        let exec = &mut self.brokers[b].exec[evaluator];
        let mut twice = None;
        exec.passed
            .retain(|(q, other), _| waiting.contains(&(*q, *other)));
        for (q, other) in waiting {
            if q != p || other == ns {
                continue;
            }
            let passed = exec.passed.entry((q, other)).or_default();
            if passed.contains(&ns) {
                twice = Some(other);
            }
            passed.push(ns);
        }
        exec.passed.remove(&(p, ns));
        if let Some(other) = twice {
            self.fail(&format!(
                "b{b}: namespace {other:?} waited at priority {p} behind two jobs of {ns:?}"
            ));
        }
    }

    /// The priorities and namespaces with jobs waiting on an executor.
    fn waiting(&self, b: usize, evaluator: usize) -> Vec<(Priority, Ns)> {
        let mut waiting: Vec<(Priority, Ns)> = Vec::new();
        for (_, k) in self.brokers[b].exec[evaluator].queue.iter() {
            let want = self.want.get(&(b, *k)).copied().unwrap_or(DEFAULT_PRIORITY);
            if !waiting.contains(&(want, k.ns())) {
                waiting.push((want, k.ns()));
            }
        }
        waiting
    }

    /// A job left an executor's queue (or a priority): a namespace left
    /// with no job waiting at a priority begins its wait anew.
    fn prune_passed(&mut self, b: usize, evaluator: usize) {
        let waiting = self.waiting(b, evaluator);
        let exec = &mut self.brokers[b].exec[evaluator];
        exec.passed.retain(|at, _| waiting.contains(at));
    }

    /// Starts queued jobs on the executor's free threads, as its reports.
    fn refill(&mut self, b: usize, evaluator: usize) {
        let mut follow_ups = Vec::new();
        self.start_jobs(b, evaluator, &mut follow_ups);
        let now = self.instant(self.now);
        for input in follow_ups {
            self.brokers[b].core.apply(input, now);
        }
        self.settle(b);
    }

    fn exec_done(&mut self, b: usize, evaluator: usize, gen: Gen, key: Key, outcome: Outcome) {
        let exec = &mut self.brokers[b].exec[evaluator];
        if exec.revoked.remove(&gen) {
            return;
        }
        let was = exec.running.remove(&gen);
        let was_running = was.is_some();
        if was_running {
            exec.free += 1;
        }
        match outcome {
            Outcome::Requeued => {
                if !was_running {
                    return;
                }
                self.note(format!("b{b} worker lost, g{gen} requeued"));
                let (_, priority, seq) = was.expect("it was running");
                let exec = &mut self.brokers[b].exec[evaluator];
                exec.queue.requeue(gen, key.ns(), priority, seq, key);
                // Its namespace goes first again: its start did not count.
                for passed in exec.passed.values_mut() {
                    passed.retain(|ns| *ns != key.ns());
                }
                self.apply(b, Input::Requeued { gen });
                self.refill(b, evaluator);
            }
            Outcome::Done(outcome) => {
                if let Ok(output) = &outcome {
                    *self.evaluations.entry(key).or_default() += 1;
                    self.computed.insert(Arc::clone(output), self.now);
                }
                self.note(format!(
                    "b{b} finished {} g{gen} ok={}",
                    short(&key),
                    outcome.is_ok()
                ));
                self.apply(
                    b,
                    Input::Finished {
                        key,
                        gen,
                        evaluator,
                        outcome,
                        eval_ms: 1.0,
                    },
                );
                self.refill(b, evaluator);
            }
        }
    }

    fn check(&mut self) {
        let p = &self.p;
        // Queued then running, then a lease for Redis's verdict; with
        // faults, a takeover's two leases and a wait on a dead claimant.
        let bound = if self.faults {
            3 * p.timeout_ms + 4 * p.lease_ms + 200
        } else {
            2 * p.timeout_ms + p.lease_ms + 100
        };
        let late = self.pending.iter().find(|((b, _, _), r)| {
            r.bounded
                && r.pauses == self.brokers[*b].pauses
                && self.now > r.bound_from + bound
                && self.brokers[*b].paused_until <= r.since
        });
        if let Some(((b, s, id), r)) = late {
            let what = format!(
                "b{b} s{s} {id}: a submit of {} made at {} ms is unanswered {bound} ms after {}",
                short(&r.key),
                r.since,
                r.bound_from
            );
            self.fail(&what);
        }
        let overdue = self.pending.iter().find(|((b, _, _), r)| {
            r.deadline.is_some_and(|at| {
                self.now > at + 1
                    && r.pauses == self.brokers[*b].pauses
                    && self.brokers[*b].paused_until <= at
            })
        });
        if let Some(((b, s, id), r)) = overdue {
            let what = format!(
                "b{b} s{s} {id}: a submit of {} due at {:?} ms is unanswered at {} ms",
                short(&r.key),
                r.deadline,
                self.now
            );
            self.fail(&what);
        }
        for (i, broker) in self.brokers.iter().enumerate() {
            if let Err(what) = broker.core.audit() {
                self.fail(&format!("b{i}: {what}"));
            }
            let counts = broker.core.counts();
            let sessions = broker.sessions.len().max(counts.sessions);
            if counts.entries > sessions * p.max_pending + self.keys.len() {
                self.fail(&format!(
                    "b{i}: the wait table outgrew its bounds: {counts:?}"
                ));
            }
            if counts.queued > 2 * p.queue_capacity + p.threads {
                self.fail(&format!("b{i}: queues outgrew queue_capacity: {counts:?}"));
            }
        }
        if !self.faults {
            for (i, broker) in self.brokers.iter().enumerate() {
                if broker.core.cluster_status().is_some_and(|s| s.degraded > 0) {
                    self.fail(&format!("b{i}: without faults, Redis went away"));
                }
            }
            let again = |key: &Key| self.invalidated.contains(key);
            if let Some((key, n)) = self
                .evaluations
                .iter()
                .find(|(key, n)| **n > 1 && !again(key))
            {
                let what = format!("without faults, {} was evaluated {n} times", short(key));
                self.fail(&what);
            }
        }
    }

    /// Runs until all is quiet for three leases, within a bound.
    fn settle_down(&mut self, what: &str) {
        let mut quiet_since: Option<u64> = None;
        let mut steps = 0;
        loop {
            if self.quiet() {
                let since = *quiet_since.get_or_insert(self.now);
                if self.now >= since + 3 * self.p.lease_ms {
                    return;
                }
            } else {
                quiet_since = None;
            }
            if !self.step() {
                return;
            }
            steps += 1;
            if steps > 300_000 {
                let held: Vec<_> = self
                    .brokers
                    .iter()
                    .map(|b| (b.core.counts(), b.core.cluster_holding(), b.ops.len()))
                    .collect();
                self.fail(&format!("not quiet after 300000 steps {what}: {held:?}"));
            }
        }
    }

    /// Ends faults, lets everything settle, checks that the brokers agree
    /// with Redis and nobody is stranded, then closes every session and
    /// checks that nothing is left.
    fn quiesce(&mut self) {
        self.quiescing = true;
        if !self.redis.up {
            self.redis.up = true;
            self.restart_redis();
        }
        // Pauses under way run their course: what they held back comes
        // out in order.
        self.redis.slow = false;
        self.note("quiescing".into());
        self.settle_down("with faults over");
        if self.p.clustered {
            self.agree_with_redis();
        }
        self.no_one_stranded();
        for b in 0..self.brokers.len() {
            for session in self.brokers[b].sessions.clone() {
                self.close_session(b, session);
            }
        }
        self.settle_down("with every session closed");
        let left: Vec<_> = self
            .pending
            .iter()
            .filter(|(_, r)| r.invalidation.is_none())
            .collect();
        if !left.is_empty() {
            self.fail(&format!("requests left unanswered: {left:?}"));
        }
        for (i, broker) in self.brokers.iter().enumerate() {
            let counts = broker.core.counts();
            if counts != Default::default() {
                self.fail(&format!("b{i}: left at quiescence: {counts:?}"));
            }
            // Pings and reads of the epochs go on for ever.
            let mut held = broker.core.cluster_holding();
            held[5] = 0;
            if held != [0; 8] {
                self.fail(&format!(
                    "b{i}: the cluster's decisions hold [claims, jobs begun, waits, looked up, keys busy, commands, write-backs, invalidations] {held:?} at quiescence"
                ));
            }
        }
    }

    /// The result of `key` stored in the model Redis under broker `b`'s
    /// current tag.
    fn stored(&self, b: usize, key: &Key) -> Option<String> {
        let evaluator = self.fn_of(*key);
        let epoch = self.brokers[b].core.cluster_epoch(key.ns(), evaluator);
        let hex = key.to_hex();
        let name = if key.ns().is_shared() {
            format!("{PREFIX}result:{{{hex}}}:{epoch}:")
        } else {
            format!("{PREFIX}{}/result:{{{hex}}}:{epoch}:", key.ns())
        };
        let value = self.redis.get(&name, self.now)?;
        // One that began at or before the key's drop marker is never read.
        let dropped = if key.ns().is_shared() {
            format!("{PREFIX}dropped:{{{hex}}}")
        } else {
            format!("{PREFIX}{}/dropped:{{{hex}}}", key.ns())
        };
        let marker: u64 = self
            .redis
            .get(&dropped, self.now)
            .and_then(|d| d.parse().ok())
            .unwrap_or(0);
        if marker > 0 && began_ms(value) <= marker {
            return None;
        }
        let output = value.split_once(",\"output\":")?.1;
        Some(output[..output.len() - 1].to_string())
    }

    fn agree_with_redis(&self) {
        for (b, broker) in self.brokers.iter().enumerate() {
            if broker
                .core
                .cluster_status()
                .is_some_and(|s| s.link != Link::Up)
            {
                self.fail(&format!("b{b}: Redis is up, yet the broker serves alone"));
            }
            for (key, output) in &broker.cache {
                match self.stored(b, key) {
                    Some(stored) if stored == **output => {}
                    stored => {
                        let names: Vec<(&String, &str)> = self
                            .redis
                            .strings
                            .iter()
                            .filter(|(n, _)| n.contains(&key.to_hex()))
                            .map(|(n, v)| (n, v.value.as_str()))
                            .collect();
                        self.fail(&format!(
                            "b{b} caches {output} for {}, Redis holds {stored:?} (epoch {}; {names:?})",
                            short(key),
                            broker.core.cluster_epoch(key.ns(), self.fn_of(*key)),
                        ))
                    }
                }
            }
        }
    }

    fn no_one_stranded(&self) {
        for ((b, s, id), r) in &self.pending {
            if !r.subscription {
                continue;
            }
            let elsewhere =
                (0..self.brokers.len()).find(|o| self.brokers[*o].cache.contains_key(&r.key));
            let in_redis = self.p.clustered && self.stored(*b, &r.key).is_some();
            if in_redis || elsewhere.is_some() {
                self.fail(&format!(
                    "b{b} s{s} {id}: a subscription to {} is stranded, while its result is in {}",
                    short(&r.key),
                    if in_redis {
                        "Redis".to_string()
                    } else {
                        format!("b{}'s cache", elsewhere.unwrap())
                    }
                ));
            }
        }
    }
}

/// A fn's field in the epochs hashes: `<fn>`, or `<ns>/<fn>`.
fn epoch_field(ns: Ns, evaluator: usize) -> String {
    let name = ["threads", "remote"][evaluator];
    if ns.is_shared() {
        name.to_string()
    } else {
        format!("{ns}/{name}")
    }
}

fn short(key: &Key) -> String {
    let ns = if key.ns().is_shared() { "" } else { "b/" };
    format!("{ns}{}", &key.to_hex()[..6])
}

fn brief(reply: &Option<RedisReply>) -> String {
    let text = format!("{reply:?}");
    text.chars().take(160).collect()
}

fn brief_pubsub(event: &PubsubEvent) -> String {
    let text = format!("{event:?}");
    text.chars().take(160).collect()
}

fn run(seed: u64, steps: usize) {
    let mut sim = Sim::new(seed);
    for _ in 0..steps {
        if !sim.step() {
            break;
        }
    }
    sim.quiesce();
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn the_core_keeps_its_invariants_under_simulated_faults() {
    let steps = env("HERD_SIM_STEPS", 3000) as usize;
    if let Ok(seed) = std::env::var("HERD_SIM_SEED") {
        let seed = seed.parse().expect("HERD_SIM_SEED is a number");
        return run(seed, steps);
    }
    let seeds = env("HERD_SIM_SEEDS", 300);
    let first = env("HERD_SIM_FIRST_SEED", 0);
    for seed in first..first + seeds {
        run(seed, steps);
    }
    for seed in FOUND {
        run(seed, steps);
    }
}

/// Seeds past the default range that once found a bug, each run every time:
/// - 432: a job raised while it ran (a later submit asked for more) went
///   back to its queue at its old priority when its worker was lost (seed 7
///   found it first, under the simulation's earlier draws);
/// - 716: an evaluation begun before an invalidation that its broker missed
///   (subscription down) was stored once Redis restarted empty, which forgot
///   the drop (Redis's boot marker refuses it now);
/// - 1249: a broker just started dropped a key's results under epochs it had
///   not read yet, missing the current one (reads pass over results begun
///   before the key's drop marker now);
/// - 6002: a submit that came after an invalidation was answered joined a
///   wait and was given the result, from before it, that a look found
///   (a result not kept is given to those who came within a lease of when it
///   was computed, not of when it was read);
/// - 6545: a result passed over (begun before the key's drop marker) kept
///   every later result from being stored, stranding a subscription (it
///   counts as none now);
/// - 10175, 10473: checks of the simulation itself (a waiter given what its
///   look found, as of when Redis ran the look; a stored outcome replaced
///   is no longer to be learnt);
/// - 13662: a broker that had subscribed again but not yet read the epochs
///   ignored the outcome announced for the claim it waited on, then gave its
///   waiters another evaluation's (it takes it now, not kept);
/// - 15454, 42071: checks of the simulation itself (an outcome under a
///   drop marker is no longer to be learnt; a notice counts as heard only
///   while the broker has submits of the key waiting). 42071 also showed a
///   written-back result leaving its claim held a lease on (it goes now).
const FOUND: [u64; 10] = [
    432, 716, 1249, 6002, 6545, 10175, 10473, 13662, 15454, 42071,
];
