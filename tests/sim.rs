//! Deterministic simulation of the coordination core.
//!
//! Several brokers' cores, driven exactly as the hub drives one (apply an
//! input, perform every effect, apply what the effects bring back), run
//! against model executors (jobs finish, fail, hang, lose their worker), a
//! model of each broker's cluster task over a model Redis (claims with
//! leases, a result store, pub/sub with loss, delay and reordering; Redis
//! down and up; a broker paused past its lease), and model sessions
//! (submit, subscribe, get, cancel, close). Everything comes from one
//! seeded RNG on a virtual clock, in one thread, so a seed replays exactly.
//!
//! After every step the invariants are checked:
//! 1. every request gets exactly one outcome, or its session closes;
//! 2. at quiescence nothing is left: no entry, job, timer, session record,
//!    held claim or key waited on;
//! 3. without faults (or a cluster inbox overflowing, which runs a job
//!    locally as Redis being away does) each key is evaluated
//!    (successfully) at most once across all brokers;
//! 4. a submit is answered within its timeout plus two leases (the time to
//!    notice a silent claimant and take over), unless its broker was paused;
//! 5. no panic, and the wait table stays within its bounds.
//!
//! `HERD_SIM_SEED=n` replays one seed (printed on failure);
//! `HERD_SIM_SEEDS` (default 1000) and `HERD_SIM_STEPS` (default 2000) set
//! how many runs and how long. A soak of a million steps and more:
//! `HERD_SIM_SEEDS=500 HERD_SIM_STEPS=4000 cargo test --release --test sim`.

use herd::core::{
    ClusterCmd, ClusterEvent, Core, CoreConfig, Effect, FnLimits, Gen, Input, Reply, Target,
};
use herd::error::{ErrorCode, EvalError};
use herd::ns::Ns;
use herd::Key;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, VecDeque};

/// Maps and sets that iterate in the same order in every run, so a seed
/// replays exactly.
type Fixed = std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>;
type HashMap<K, V> = std::collections::HashMap<K, V, Fixed>;
type HashSet<K> = std::collections::HashSet<K, Fixed>;
use std::sync::Arc;
use std::time::{Duration, Instant};

const TIMEOUT_MS: u64 = 200;
const LEASE_MS: u64 = 300;
/// Keys: five inputs, each in two namespaces.
const KEYS: usize = 10;

/// The simulation's namespaces, interned once in this order.
fn namespaces() -> [Ns; 2] {
    static NS: std::sync::OnceLock<[Ns; 2]> = std::sync::OnceLock::new();
    *NS.get_or_init(|| [Ns::SHARED, Ns::intern("sim-b", 16).expect("a valid name")])
}
const MAX_PENDING: usize = 6;
const QUEUE_CAPACITY: usize = 5;
const THREADS: usize = 2;
/// The cluster task's inbox: past this, an `Acquire` runs locally and
/// other commands wait in the driver's backlog, as in the hub.
const CLUSTER_INBOX: usize = 4;

#[derive(Debug, Clone)]
enum Ev {
    /// A model session on this broker does something.
    Op,
    /// A model executor ends a job.
    ExecDone {
        evaluator: usize,
        gen: Gen,
        key: Key,
        outcome: Outcome,
    },
    /// The cluster task handles the next command of its inbox.
    ClusterRun,
    /// A pub/sub notice reaches this broker.
    Notice {
        key: Key,
        /// None: the output is only in the store (too large for a notice).
        outcome: Option<Result<Arc<str>, EvalError>>,
        claim: Option<Arc<str>>,
        /// How many times its key had been invalidated when it was
        /// published (see [`Redis::drops`]).
        drops: u64,
    },
    /// The cluster task's renewal tick (every third: the re-check).
    Tick(u64),
    /// A fault starts or ends.
    Fault,
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
    queue: VecDeque<(Gen, Key)>,
    running: HashMap<Gen, Key>,
    /// Jobs taken back from a worker: their late outcome is dropped.
    revoked: HashSet<Gen>,
    abandon_running: bool,
}

#[derive(Default)]
struct ClusterTask {
    inbox: VecDeque<ClusterCmd>,
    busy: bool,
    held: HashMap<Key, (Gen, u64)>,
    /// Each claim's [`Redis::drops`] of its key when it was taken: the
    /// fn's tag in the claim's name, under which its result is stored.
    claim_drops: HashMap<Key, u64>,
    /// The same for jobs this task told to run without a claim.
    local_drops: HashMap<Gen, u64>,
    waiting: HashMap<Key, Gen>,
    looked: HashSet<Key>,
}

struct Broker {
    core: Core,
    cache: HashMap<Key, Arc<str>>,
    exec: Vec<Exec>,
    cluster: ClusterTask,
    backlog: VecDeque<ClusterCmd>,
    sessions: Vec<u64>,
    paused_until: u64,
    pauses: u64,
    /// Jobs offered to this broker's executors.
    offered: HashSet<Gen>,
}

#[derive(Default)]
struct Redis {
    up: bool,
    results: HashMap<Key, Arc<str>>,
    /// key → (token, expires at)
    claims: HashMap<Key, (u64, u64)>,
    /// key → how many times it was invalidated (its own or its fn's). A
    /// notice published before an invalidation is not taken after it: the
    /// broker's listener drops a notice of an older fn epoch, and Redis
    /// delivers a key's notice before the announcement of its drop (the
    /// model's delays may reorder them, so it filters them instead).
    drops: HashMap<Key, u64>,
    next_token: u64,
}

#[derive(Debug, Clone)]
struct Req {
    key: Key,
    since: u64,
    /// A submit that waits (not a subscription): bound by invariant 4.
    bounded: bool,
    /// The broker's pause count when it was made.
    pauses: u64,
    answered_accepted: bool,
    /// An `invalidate` (a cancel does not end it).
    invalidation: bool,
}

/// A request: broker, session, id.
type Request = (usize, u64, String);

/// A broker's key, and the last of its jobs whose result it may not keep.
type Floor = ((usize, Key), Gen);

struct Sim {
    seed: u64,
    rng: StdRng,
    base: Instant,
    now: u64,
    seq: u64,
    events: BTreeMap<(u64, u64), (usize, Ev)>,
    brokers: Vec<Broker>,
    redis: Redis,
    keys: Vec<(Key, usize)>,
    pending: HashMap<(usize, u64, String), Req>,
    next_session: u64,
    next_req: u64,
    /// Faults on: Redis down, slow, notices lost or late, brokers paused, workers lost.
    faults: bool,
    slow: bool,
    lossy: bool,
    quiescing: bool,
    /// A cluster inbox overflowed (a job ran locally, as under a fault).
    overloaded: bool,
    evaluations: HashMap<Key, u32>,
    /// Invalidations are tried (every run).
    invalidating: bool,
    /// (broker, key) → the last job the broker had offered when the key's
    /// results were invalidated: no job up to it may be kept after.
    dropped: HashMap<(usize, Key), Gen>,
    /// The same for invalidations not answered yet: they hold once the
    /// broker says `invalidated` (a refused one promises nothing).
    dropping: HashMap<Request, Vec<Floor>>,
    /// Keys an invalidation was asked for: each may be evaluated again.
    invalidated: HashSet<Key>,
    trace: VecDeque<String>,
}

fn limits() -> CoreConfig {
    let fns = ["threads", "remote"]
        .iter()
        .enumerate()
        .map(|(i, name)| FnLimits {
            name: (*name).into(),
            timeout: Duration::from_millis(TIMEOUT_MS),
            queue_capacity: QUEUE_CAPACITY,
            queue_bytes: 64 * QUEUE_CAPACITY,
            abandon_running: i == 1,
        })
        .collect();
    CoreConfig {
        fns,
        max_pending: MAX_PENDING,
        // Namespace "sim-b"'s sessions together hold at most twice one
        // session's bound.
        ns_max_pending: [(namespaces()[1], 2 * MAX_PENDING)].into(),
        clustered: true,
        lease: Duration::from_millis(LEASE_MS),
        preview_chars: 16,
    }
}

impl Sim {
    fn new(seed: u64, brokers: usize, clustered: bool, faults: bool) -> Sim {
        let mut config = limits();
        config.clustered = clustered;
        let brokers = (0..brokers)
            .map(|_| Broker {
                core: Core::new(config.clone()),
                cache: HashMap::default(),
                exec: (0..2)
                    .map(|i| Exec {
                        free: THREADS,
                        queue: VecDeque::new(),
                        running: HashMap::default(),
                        revoked: HashSet::default(),
                        abandon_running: i == 1,
                    })
                    .collect(),
                cluster: ClusterTask::default(),
                backlog: VecDeque::new(),
                sessions: Vec::new(),
                paused_until: 0,
                pauses: 0,
                offered: HashSet::default(),
            })
            .collect();
        // Each input in both namespaces: key 2n is input n in the shared
        // namespace, key 2n+1 the same input in namespace "sim-b".
        let keys = (0..KEYS)
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
        let mut sim = Sim {
            seed,
            rng: StdRng::seed_from_u64(seed),
            base: Instant::now(),
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
            slow: false,
            lossy: false,
            quiescing: false,
            overloaded: false,
            evaluations: HashMap::default(),
            invalidating: true,
            dropped: HashMap::default(),
            dropping: HashMap::default(),
            invalidated: HashSet::default(),
            trace: VecDeque::new(),
        };
        for b in 0..sim.brokers.len() {
            for _ in 0..3 {
                let at = sim.rng.random_range(0..20);
                sim.at(at, b, Ev::Op);
            }
            if clustered {
                sim.at(LEASE_MS / 3, b, Ev::Tick(1));
            }
        }
        if faults {
            let at = sim.rng.random_range(100..400);
            sim.at(at, 0, Ev::Fault);
        }
        sim
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
        if self.trace.len() >= env("HERD_SIM_TRACE", 60) as usize {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("[{} ms] {line}", self.now));
    }

    fn fail(&self, what: &str) -> ! {
        let trace: Vec<&String> = self.trace.iter().collect();
        panic!(
            "simulation seed {} failed at {} ms: {what}\nreplay: HERD_SIM_SEED={} cargo test --test sim\nlast steps:\n{}",
            self.seed,
            self.now,
            self.seed,
            trace.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
        );
    }

    /// One step: the earliest event or deadline. False when nothing is left.
    fn step(&mut self) -> bool {
        let next_event = self.events.keys().next().map(|(t, _)| *t);
        let next_timer = (0..self.brokers.len())
            .filter_map(|b| {
                let at = self.brokers[b].core.poll_timeout()?;
                let ms = at.duration_since(self.base).as_millis() as u64;
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
                if self.brokers[b].paused_until > self.now {
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
        let now = self.instant(self.now);
        self.note(format!("b{b} deadline"));
        self.brokers[b].core.handle_timeout(now);
        self.settle(b);
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
            } => self.exec_done(b, evaluator, gen, key, outcome),
            Ev::ClusterRun => self.cluster_run(b),
            Ev::Notice { key, drops, .. }
                if drops < self.redis.drops.get(&key).copied().unwrap_or(0) =>
            {
                self.note(format!("b{b} notice {} from before its drop", short(&key)));
            }
            Ev::Notice {
                key,
                outcome,
                claim,
                ..
            } => {
                self.note(format!("b{b} notice {} claim {claim:?}", short(&key)));
                let event = match outcome {
                    Some(outcome) => ClusterEvent::Done {
                        key,
                        evaluator: self.fn_of(key),
                        outcome,
                        claim,
                        at_ms: 0,
                    },
                    None => ClusterEvent::Stored { key },
                };
                self.apply(b, Input::Cluster(event));
            }
            Ev::Tick(n) => {
                self.renew(b);
                if n % 3 == 0 {
                    self.recheck(b);
                }
                if !(self.quiescing && self.quiet()) {
                    self.at(LEASE_MS / 3, b, Ev::Tick(n + 1));
                }
            }
            Ev::Fault => {
                if !self.quiescing {
                    self.fault();
                    let after = self.rng.random_range(50..600);
                    self.at(after, 0, Ev::Fault);
                }
            }
        }
    }

    /// Nothing is left to do but ticks.
    fn quiet(&self) -> bool {
        self.events
            .values()
            .all(|(_, ev)| matches!(ev, Ev::Tick(_)))
            && self.brokers.iter().all(|b| b.core.poll_timeout().is_none())
    }

    fn fault(&mut self) {
        match self.rng.random_range(0..5) {
            0 => {
                self.redis.up = !self.redis.up;
                self.note(format!("fault: redis up={}", self.redis.up));
            }
            1 => {
                self.slow = !self.slow;
                self.note(format!("fault: slow={}", self.slow));
            }
            2 => {
                self.lossy = !self.lossy;
                self.note(format!("fault: lossy pub/sub={}", self.lossy));
            }
            3 => {
                let b = self.rng.random_range(0..self.brokers.len());
                let pause = self.rng.random_range(LEASE_MS / 2..LEASE_MS * 3);
                self.brokers[b].paused_until = self.now + pause;
                self.brokers[b].pauses += 1;
                self.note(format!("fault: b{b} paused {pause} ms"));
            }
            _ => {
                // Redis restarts empty.
                self.redis.results.clear();
                self.redis.claims.clear();
                self.note("fault: redis restarted empty".into());
            }
        }
    }

    /// Broker `b` drops `target`'s results: none of its jobs offered so far
    /// may be kept after.
    fn mark_dropped(&mut self, b: usize, target: Target) {
        for (at, last) in self.floors(b, target) {
            self.dropped.insert(at, last);
        }
    }

    /// The jobs broker `b` has offered so far of each key `target` names.
    fn floors(&mut self, b: usize, target: Target) -> Vec<Floor> {
        for (k, e) in &self.keys {
            if target.covers(*k, *e) {
                self.invalidated.insert(*k);
            }
        }
        let Some(last) = self.brokers[b].offered.iter().max().copied() else {
            return Vec::new();
        };
        self.keys
            .iter()
            .filter(|(k, e)| target.covers(*k, *e))
            .map(|(k, _)| ((b, *k), last))
            .collect()
    }

    /// The event for a result found in the model Redis.
    fn found(&self, key: Key, output: Arc<str>) -> ClusterEvent {
        ClusterEvent::Found {
            key,
            evaluator: self.fn_of(key),
            output,
            at_ms: 0,
        }
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
        let req = move |bounded| Req {
            key,
            since: now,
            bounded,
            pauses,
            answered_accepted: false,
            invalidation: false,
        };
        match roll {
            0..55 => {
                let wait = roll >= 5;
                if let Some(output) = self.brokers[b].cache.get(&key) {
                    self.note(format!(
                        "b{b} s{session} submit {} hit {output}",
                        short(&key)
                    ));
                    return;
                }
                self.note(format!(
                    "b{b} s{session} submit {} wait={wait}",
                    short(&key)
                ));
                self.pending.insert((b, session, id.clone()), req(wait));
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
                    },
                );
            }
            55..65 => {
                if self.brokers[b].cache.contains_key(&key) {
                    return;
                }
                self.note(format!("b{b} s{session} subscribe {}", short(&key)));
                self.pending.insert((b, session, id.clone()), req(false));
                self.apply(
                    b,
                    Input::Subscribe {
                        session,
                        id: Some(id.into()),
                        key,
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
            72..90 => {
                self.note(format!("b{b} s{session} cancel {}", short(&key)));
                self.pending.retain(|(pb, ps, _), r| {
                    !(*pb == b && *ps == session && r.key == key && !r.invalidation)
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
            90..94 if self.invalidating => {
                let target = if roll == 93 {
                    Target::Fn(ns, evaluator)
                } else {
                    Target::Key(key)
                };
                self.note(format!("b{b} s{session} invalidate {target:?}"));
                let floors = self.floors(b, target);
                self.dropping.insert((b, session, id.clone()), floors);
                // Bound like a submit: answered, refused or not, in time.
                let invalidation = Req {
                    invalidation: true,
                    ..req(true)
                };
                self.pending.insert((b, session, id.clone()), invalidation);
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
    fn settle(&mut self, b: usize) {
        let mut follow_ups = Vec::new();
        loop {
            while let Some(effect) = self.brokers[b].core.poll() {
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
        self.flush_backlog(b);
    }

    fn answered(&mut self, b: usize, session: u64, id: &Option<Box<str>>, what: &str) {
        let id = id.as_deref().unwrap_or("").to_string();
        if self.pending.remove(&(b, session, id.clone())).is_none() {
            self.fail(&format!(
                "b{b} s{session} {id}: an outcome ({what}) for a request that has none pending (twice, or after its cancel or close)"
            ));
        }
    }

    fn perform(&mut self, b: usize, effect: Effect, follow_ups: &mut Vec<Input>) {
        match effect {
            Effect::Reply { session, id, reply } => match reply {
                Reply::Accepted { .. } => {
                    let key = (b, session, id.as_deref().unwrap_or("").to_string());
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
                        *pb == b && *ps == session && *pid != id && r.key == key && !r.bounded
                    });
                    if twice {
                        // A repeated subscription: the first one waits.
                        self.pending.remove(&(b, session, id));
                    }
                }
                // An invalidation outlives its session (the hub drops the
                // answer, or refusal, to a closed one).
                Reply::Invalidated { .. } | Reply::Rejected { .. }
                    if !self.brokers[b].sessions.contains(&session) => {}
                Reply::Rejected { code, message } => {
                    self.note(format!("b{b} s{session} rejected {code}: {message}"));
                    if code != ErrorCode::Busy {
                        self.fail(&format!("unexpected rejection {code}"));
                    }
                    self.answered(b, session, &id, "rejected");
                }
                Reply::Invalidated { .. } => {
                    let request = (b, session, id.as_deref().unwrap_or("").to_string());
                    for (at, last) in self.dropping.remove(&request).unwrap_or_default() {
                        let floor = self.dropped.entry(at).or_insert(last);
                        *floor = (*floor).max(last);
                    }
                    self.answered(b, session, &id, "invalidated")
                }
                Reply::Status { .. } | Reply::Cancelled { .. } => {}
            },
            Effect::Deliver(d) => {
                self.note(format!(
                    "b{b} deliver {} to {} ({:?}, {})",
                    short(&d.key),
                    d.waiters.len(),
                    d.source,
                    match &d.outcome {
                        Ok(o) => o.to_string(),
                        Err(e) => e.code().to_string(),
                    }
                ));
                for w in &d.waiters {
                    let request = (b, w.session, w.id.as_deref().unwrap_or("").to_string());
                    if self.pending.get(&request).is_some_and(|r| r.key != d.key) {
                        self.fail(&format!(
                            "b{b} s{}: the result of {:?} reached a wait for another key or namespace",
                            w.session, d.key
                        ));
                    }
                    self.answered(b, w.session, &w.id, "result");
                }
            }
            Effect::Busy { waiters, .. } => {
                for w in &waiters {
                    self.answered(b, w.session, &w.id, "busy");
                }
            }
            Effect::Offer {
                evaluator,
                key,
                gen,
                ..
            } => {
                self.note(format!("b{b} offer {} g{gen}", short(&key)));
                self.brokers[b].offered.insert(gen);
                self.brokers[b].exec[evaluator].queue.push_back((gen, key));
                self.start_jobs(b, evaluator, follow_ups);
            }
            Effect::Withdraw {
                evaluator,
                gen,
                overran,
            } => {
                self.note(format!("b{b} withdraw g{gen} overran={overran}"));
                let exec = &mut self.brokers[b].exec[evaluator];
                exec.queue.retain(|(g, _)| *g != gen);
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
                    let gen = output
                        .rsplit_once(&format!("-b{b}g"))
                        .and_then(|(_, g)| g.trim_end_matches('"').parse::<Gen>().ok());
                    if let (Some(gen), Some(last)) = (gen, self.dropped.get(&(b, key))) {
                        if gen <= *last {
                            self.fail(&format!(
                                "b{b} keeps {output} of {}, invalidated while it ran",
                                short(&key)
                            ));
                        }
                    }
                    self.brokers[b].cache.insert(key, output);
                }
            }
            Effect::Drop(target) => {
                let keys = self.keys.clone();
                let cache = &mut self.brokers[b].cache;
                for (k, e) in keys {
                    if target.covers(k, e) {
                        cache.remove(&k);
                    }
                }
            }
            Effect::Cluster(cmd) => {
                if let ClusterCmd::Finished { gen, .. } = &cmd {
                    if !self.brokers[b].offered.contains(gen) {
                        self.fail(&format!(
                            "b{b} publishes an outcome of job g{gen}, which it never evaluated (another broker's claim)"
                        ));
                    }
                }
                let broker = &mut self.brokers[b];
                if !broker.backlog.is_empty() || broker.cluster.inbox.len() >= CLUSTER_INBOX {
                    match cmd {
                        ClusterCmd::Acquire { key, gen, .. } => {
                            // Overload: this key may be evaluated here and elsewhere.
                            self.overloaded = true;
                            self.note(format!("b{b} cluster inbox full: g{gen} runs locally"));
                            follow_ups.push(Input::Cluster(ClusterEvent::Local { key, gen }))
                        }
                        ClusterCmd::Invalidate {
                            target,
                            session,
                            id,
                        } => {
                            self.note(format!("b{b} cluster inbox full: invalidation refused"));
                            let refused = ClusterEvent::Invalidated {
                                target,
                                session,
                                id,
                                ok: false,
                            };
                            follow_ups.push(Input::Cluster(refused))
                        }
                        cmd => broker.backlog.push_back(cmd),
                    }
                    return;
                }
                broker.cluster.inbox.push_back(cmd);
                self.kick_cluster(b);
            }
        }
    }

    fn flush_backlog(&mut self, b: usize) {
        let broker = &mut self.brokers[b];
        while broker.cluster.inbox.len() < CLUSTER_INBOX {
            let Some(cmd) = broker.backlog.pop_front() else {
                break;
            };
            broker.cluster.inbox.push_back(cmd);
        }
        self.kick_cluster(b);
    }

    fn kick_cluster(&mut self, b: usize) {
        if !self.brokers[b].cluster.busy && !self.brokers[b].cluster.inbox.is_empty() {
            self.brokers[b].cluster.busy = true;
            let latency = self.redis_latency();
            self.at(latency, b, Ev::ClusterRun);
        }
    }

    fn redis_latency(&mut self) -> u64 {
        if !self.redis.up {
            // The command waits out redis_timeout_ms.
            return 50;
        }
        if self.slow {
            self.rng.random_range(5..60)
        } else {
            self.rng.random_range(0..3)
        }
    }

    fn start_jobs(&mut self, b: usize, evaluator: usize, follow_ups: &mut Vec<Input>) {
        loop {
            let exec = &mut self.brokers[b].exec[evaluator];
            if exec.free == 0 {
                return;
            }
            let Some((gen, key)) = exec.queue.pop_front() else {
                return;
            };
            exec.free -= 1;
            exec.running.insert(gen, key);
            follow_ups.push(Input::Started {
                gen,
                worker: (evaluator == 1).then(|| Arc::from("worker")),
            });
            let roll = self.rng.random_range(0..100);
            let outcome = match roll {
                0..8 => Some(Outcome::Done(Err(EvalError::Failed("boom".into())))),
                8..12 => None,
                12..16 if self.faults && evaluator == 1 => Some(Outcome::Requeued),
                16..18 if self.faults && evaluator == 1 => {
                    Some(Outcome::Done(Err(EvalError::Failed("worker lost".into()))))
                }
                _ => Some(Outcome::Done(Ok(format!(
                    "\"v{}-b{b}g{gen}\"",
                    short(&key)
                )
                .into()))),
            };
            if let Some(outcome) = outcome {
                let took = self.rng.random_range(5..TIMEOUT_MS / 3);
                self.at(
                    took,
                    b,
                    Ev::ExecDone {
                        evaluator,
                        gen,
                        key,
                        outcome,
                    },
                );
            }
        }
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
        let was_running = exec.running.remove(&gen).is_some();
        if was_running {
            exec.free += 1;
        }
        match outcome {
            Outcome::Requeued => {
                if !was_running {
                    return;
                }
                self.note(format!("b{b} worker lost, g{gen} requeued"));
                self.brokers[b].exec[evaluator].queue.push_front((gen, key));
                self.apply(b, Input::Requeued { gen });
                self.refill(b, evaluator);
            }
            Outcome::Done(outcome) => {
                if outcome.is_ok() {
                    *self.evaluations.entry(key).or_default() += 1;
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

    /// The model cluster task: one command, as `cluster.rs` handles it.
    fn cluster_run(&mut self, b: usize) {
        self.brokers[b].cluster.busy = false;
        let Some(cmd) = self.brokers[b].cluster.inbox.pop_front() else {
            return;
        };
        self.flush_backlog(b);
        let up = self.redis.up;
        match cmd {
            ClusterCmd::Acquire { key, gen, .. } => {
                let event = match self.acquire(b, key, gen) {
                    None => {
                        let drops = self.redis.drops.get(&key).copied().unwrap_or(0);
                        self.brokers[b].cluster.local_drops.insert(gen, drops);
                        ClusterEvent::Local { key, gen }
                    }
                    Some(Acquired::Found(output)) => self.found(key, output),
                    Some(Acquired::Claimed(claim)) => ClusterEvent::Claimed { key, gen, claim },
                    Some(Acquired::Held(holder)) => {
                        self.brokers[b].cluster.waiting.insert(key, gen);
                        ClusterEvent::Waiting { key, gen, holder }
                    }
                };
                self.note(format!("b{b} cluster {event:?}"));
                self.apply(b, Input::Cluster(event));
            }
            ClusterCmd::Lookup { key } => {
                match self.redis.results.get(&key).filter(|_| up).cloned() {
                    Some(output) => {
                        self.apply(b, Input::Cluster(self.found(key, output)));
                    }
                    None => {
                        self.brokers[b].cluster.looked.insert(key);
                    }
                }
            }
            ClusterCmd::Unlook { key } => {
                self.brokers[b].cluster.looked.remove(&key);
            }
            ClusterCmd::Finished {
                key,
                gen,
                outcome,
                confirm,
                ..
            } => {
                let claim = match self.brokers[b].cluster.held.get(&key) {
                    Some((g, token)) if *g == gen => Some(*token),
                    _ => None,
                };
                // Under the tag of its claim: after an invalidation since,
                // where nobody reads (a key's is deleted again a lease on).
                let now_drops = self.redis.drops.get(&key).copied().unwrap_or(0);
                let local = self.brokers[b].cluster.local_drops.remove(&gen);
                let drops = match claim {
                    Some(_) => self.brokers[b].cluster.claim_drops.get(&key).copied(),
                    None => local,
                };
                // A job that began nowhere this task saw shares only a failure.
                let shares = drops.is_some() || outcome.is_err();
                let drops = drops.unwrap_or(now_drops);
                let mut instead = None;
                if up && shares {
                    // Stored while the claim is this job's, or when no
                    // result is stored yet (the fenced STORE).
                    let holder = claim.is_some_and(|token| {
                        self.redis
                            .claims
                            .get(&key)
                            .is_some_and(|(t, expires)| *t == token && *expires > self.now)
                    });
                    let stored_here = (holder || !self.redis.results.contains_key(&key))
                        && outcome.is_ok()
                        && drops == now_drops;
                    if stored_here {
                        let output = outcome.as_ref().expect("checked");
                        self.redis.results.insert(key, Arc::clone(output));
                    } else if confirm {
                        instead = self.redis.results.get(&key).cloned();
                    }
                    let claim = claim.map(|token| Arc::from(token.to_string()));
                    // Some outputs are "large": the notice names the key only.
                    let inline = outcome.is_err() || self.rng.random_bool(0.7);
                    let publish = instead.is_none() && (outcome.is_err() || stored_here);
                    for other in (0..self.brokers.len()).filter(|_| publish) {
                        if self.lossy && self.rng.random_bool(0.3) {
                            continue;
                        }
                        let delay = if self.lossy {
                            self.rng.random_range(0..LEASE_MS)
                        } else {
                            self.rng.random_range(0..3)
                        };
                        let notice = Ev::Notice {
                            key,
                            outcome: inline.then(|| outcome.clone()),
                            claim: claim.clone(),
                            drops,
                        };
                        self.at(delay, other, notice);
                    }
                }
                if confirm {
                    let stored = instead.map(Ok);
                    self.note(format!("b{b} verdict {} g{gen} {stored:?}", short(&key)));
                    self.apply(
                        b,
                        Input::Cluster(ClusterEvent::Verdict { key, gen, stored }),
                    );
                }
                self.release(b, key, gen);
            }
            ClusterCmd::Forget { key, gen } => {
                self.brokers[b].cluster.local_drops.remove(&gen);
                if self.brokers[b].cluster.waiting.get(&key) == Some(&gen) {
                    self.brokers[b].cluster.waiting.remove(&key);
                }
            }
            ClusterCmd::Release { key, gen } => self.release(b, key, gen),
            // Recorded in Redis and heard by every other broker at once, or
            // refused while Redis is away.
            ClusterCmd::Invalidate {
                target,
                session,
                id,
            } => {
                if up {
                    let keys = self.keys.clone();
                    for (k, e) in keys {
                        if target.covers(k, e) {
                            self.redis.results.remove(&k);
                            *self.redis.drops.entry(k).or_default() += 1;
                        }
                    }
                    for other in (0..self.brokers.len()).filter(|o| *o != b) {
                        self.mark_dropped(other, target);
                        self.apply(other, Input::Cluster(ClusterEvent::Dropped(target)));
                    }
                }
                self.note(format!("b{b} cluster invalidated {target:?} ok={up}"));
                let answer = ClusterEvent::Invalidated {
                    target,
                    session,
                    id,
                    ok: up,
                };
                self.apply(b, Input::Cluster(answer));
            }
        }
        self.kick_cluster(b);
    }

    fn acquire(&mut self, b: usize, key: Key, gen: Gen) -> Option<Acquired> {
        if !self.redis.up {
            return None;
        }
        if let Some(output) = self.redis.results.get(&key) {
            return Some(Acquired::Found(Arc::clone(output)));
        }
        let free = self
            .redis
            .claims
            .get(&key)
            .is_none_or(|(_, expires)| *expires <= self.now);
        if free {
            self.redis.next_token += 1;
            let token = self.redis.next_token;
            self.redis.claims.insert(key, (token, self.now + LEASE_MS));
            self.brokers[b].cluster.held.insert(key, (gen, token));
            let drops = self.redis.drops.get(&key).copied().unwrap_or(0);
            self.brokers[b].cluster.claim_drops.insert(key, drops);
            Some(Acquired::Claimed(token.to_string().into()))
        } else {
            let holder = self.redis.claims.get(&key).map(|(t, _)| *t).unwrap_or(0);
            Some(Acquired::Held(holder.to_string().into()))
        }
    }

    fn release(&mut self, b: usize, key: Key, gen: Gen) {
        let held = &mut self.brokers[b].cluster.held;
        if held.get(&key).is_some_and(|(g, _)| *g == gen) {
            let (_, token) = held.remove(&key).expect("just found");
            if self.redis.up
                && self
                    .redis
                    .claims
                    .get(&key)
                    .is_some_and(|(t, _)| *t == token)
            {
                self.redis.claims.remove(&key);
            }
        }
    }

    fn renew(&mut self, b: usize) {
        if !self.redis.up {
            return;
        }
        let held: Vec<(Key, u64)> = self.brokers[b]
            .cluster
            .held
            .iter()
            .map(|(k, (_, t))| (*k, *t))
            .collect();
        for (key, token) in held {
            match self.redis.claims.get_mut(&key) {
                Some((t, expires)) if *t == token && *expires > self.now => {
                    *expires = self.now + LEASE_MS
                }
                _ => {
                    self.brokers[b].cluster.held.remove(&key);
                }
            }
        }
    }

    fn recheck(&mut self, b: usize) {
        if self.redis.up {
            let looked: Vec<Key> = self.brokers[b].cluster.looked.iter().copied().collect();
            for key in looked {
                if let Some(output) = self.redis.results.get(&key).cloned() {
                    self.brokers[b].cluster.looked.remove(&key);
                    self.apply(b, Input::Cluster(self.found(key, output)));
                }
            }
        }
        let waiting: Vec<(Key, Gen)> = self.brokers[b]
            .cluster
            .waiting
            .iter()
            .map(|(k, g)| (*k, *g))
            .collect();
        for (key, gen) in waiting {
            let event = match self.acquire(b, key, gen) {
                None => {
                    let drops = self.redis.drops.get(&key).copied().unwrap_or(0);
                    self.brokers[b].cluster.local_drops.insert(gen, drops);
                    Some(ClusterEvent::Local { key, gen })
                }
                Some(Acquired::Found(output)) => Some(self.found(key, output)),
                Some(Acquired::Claimed(claim)) => Some(ClusterEvent::Takeover { key, gen, claim }),
                Some(Acquired::Held(_)) => None,
            };
            if let Some(event) = event {
                self.brokers[b].cluster.waiting.remove(&key);
                self.note(format!("b{b} recheck {event:?}"));
                self.apply(b, Input::Cluster(event));
            }
        }
    }

    fn check(&mut self) {
        let bound = TIMEOUT_MS + 2 * LEASE_MS + 100;
        let late = self.pending.iter().find(|((b, _, _), r)| {
            r.bounded
                && r.pauses == self.brokers[*b].pauses
                && self.now > r.since + bound
                && self.brokers[*b].paused_until <= r.since
        });
        if let Some(((b, s, id), r)) = late {
            let what = format!(
                "b{b} s{s} {id}: a submit of {} made at {} ms is unanswered after {bound} ms",
                short(&r.key),
                r.since
            );
            self.fail(&what);
        }
        for (i, broker) in self.brokers.iter().enumerate() {
            let counts = broker.core.counts();
            let sessions = broker.sessions.len().max(counts.sessions);
            if counts.entries > sessions * MAX_PENDING + KEYS {
                self.fail(&format!(
                    "b{i}: the wait table outgrew its bounds: {counts:?}"
                ));
            }
            if counts.queued > 2 * QUEUE_CAPACITY + THREADS {
                self.fail(&format!("b{i}: queues outgrew queue_capacity: {counts:?}"));
            }
        }
        if !self.faults && !self.overloaded {
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

    /// Closes every session, ends faults and runs until nothing is left.
    fn quiesce(&mut self) {
        self.quiescing = true;
        self.redis.up = true;
        self.slow = false;
        self.lossy = false;
        for b in 0..self.brokers.len() {
            for session in self.brokers[b].sessions.clone() {
                self.close_session(b, session);
            }
        }
        let mut steps = 0;
        while self.step() {
            steps += 1;
            if steps > 200_000 {
                self.fail("no quiescence after 200000 steps");
            }
        }
        if !self.pending.is_empty() {
            self.fail(&format!("requests left unanswered: {:?}", self.pending));
        }
        for (i, broker) in self.brokers.iter().enumerate() {
            let counts = broker.core.counts();
            if counts != Default::default() {
                self.fail(&format!("b{i}: left at quiescence: {counts:?}"));
            }
            let cluster = &broker.cluster;
            if !cluster.held.is_empty() || !cluster.waiting.is_empty() || !cluster.looked.is_empty()
            {
                self.fail(&format!(
                    "b{i}: cluster task holds {} claims, waits on {} keys and looks up {} at quiescence",
                    cluster.held.len(),
                    cluster.waiting.len(),
                    cluster.looked.len()
                ));
            }
            if !broker.backlog.is_empty() {
                self.fail(&format!("b{i}: cluster backlog left at quiescence"));
            }
        }
    }
}

enum Acquired {
    Found(Arc<str>),
    Claimed(Arc<str>),
    Held(Arc<str>),
}

fn short(key: &Key) -> String {
    key.to_hex()[..6].to_string()
}

fn run(seed: u64, steps: usize) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let brokers = rng.random_range(1..=3);
    let clustered = brokers > 1 || rng.random_bool(0.5);
    let faults = clustered && rng.random_bool(0.6);
    let mut sim = Sim::new(seed, brokers, clustered, faults);
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
    let steps = env("HERD_SIM_STEPS", 2000) as usize;
    if let Ok(seed) = std::env::var("HERD_SIM_SEED") {
        let seed = seed.parse().expect("HERD_SIM_SEED is a number");
        return run(seed, steps);
    }
    let seeds = env("HERD_SIM_SEEDS", 1000);
    let first = env("HERD_SIM_FIRST_SEED", 0);
    for seed in first..first + seeds {
        run(seed, steps);
    }
}
