//! The cluster's decisions: brokers sharing one Redis, so that a key is
//! evaluated once across all of them and results outlive any one broker.
//!
//! The [`Coordinator`] is the part of the core that talks to Redis. It does
//! no I/O either: it chooses [`RedisOp`]s (pushed as [`Effect::Redis`]),
//! reads their replies ([`crate::Input::Redis`]) and the completion
//! channel's messages ([`crate::Input::Pubsub`]), and tells the wait table
//! what they mean. The broker's cluster shell sends the
//! commands; the simulation answers them from a model Redis. Both run this
//! same code.
//!
//! What it decides:
//! - **Acquire.** The first local miss of a key looks for its result in
//!   Redis (`result:{key}:<tag>`, a second cache level) or claims it
//!   (`claim:{key}:<tag>`, `<node>:<run>:<seq>` for one lease). The tag is
//!   the fn's epoch and version: a result of another version, or from
//!   before the fn was invalidated, is never found. The table hears
//!   `Found`, `Claimed` (evaluate here), `Waiting` (another broker does) or
//!   `Local` (Redis is away: evaluate here, as a lone broker would).
//! - **Keep claims.** Claims held are renewed every third of a lease, for
//!   at most the job's hold (twice its timeout, queued then running, plus
//!   one lease); a claim found lost stays the job's tag and claim value, so
//!   its outcome is still stored under it, fenced.
//! - **Finish.** An outcome is stored if the claim is still this job's or
//!   nothing is stored ([`crate::redis::FINISH`]), published with the claim
//!   it was computed under, and the claim given up, in one script. When
//!   another broker's result was stored first, that one stands: a job whose
//!   waiters wait for the verdict gets it, and this broker's cache takes it
//!   instead of its own.
//! - **Write back.** Outcomes computed while Redis was away are kept (at
//!   most `cluster.writeback_max`) and stored when it returns, first writer
//!   winning; the loser's cache takes the winner's.
//! - **Epochs.** Each fn's epoch in each namespace only rises: an
//!   invalidation raises it past both Redis's value and this broker's
//!   ([`crate::redis::RAISE`]), and every lease (and after every connect
//!   and subscription) the broker writes what it knows back and reads what
//!   Redis has ([`crate::redis::SYNC`]): a Redis that restarted empty cannot
//!   roll an epoch back.
//! - **Serve only what is current.** A result is read from Redis only once
//!   the epochs have been read since the last connect and subscription,
//!   and while this broker knows every invalidation answered up to now:
//!   its epochs were read within a lease, or its subscription answered a
//!   ping within a lease (the invalidating broker answers a lease after
//!   Redis recorded it). Until then reads wait. The results cache is
//!   served on the same confirmation ([`Effect::ConfirmCache`]).
//! - **Nobody waits forever.** Every lease, keys waited on are looked at
//!   again (a result found is delivered, an expired claim is taken over, and
//!   with Redis away the job runs here), as are keys subscribed to.
//! - **Redis away.** A command Redis does not answer trips the link: until
//!   a probe answers, every command is answered at once as away. At start
//!   commands wait for the first probe instead, so a broker that has just
//!   started does not evaluate what Redis holds.
//!
//! Commands for one key run in the order the table sent them; commands for
//! different keys run side by side.

use crate::error::EvalError;
use crate::key::Key;
use crate::ns::Ns;
use crate::redis::{Acquired, RedisOp, RedisReply};
use crate::table::{Effect, Gen, ReqId, SessionId, Target};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Names one command in flight; its reply comes back with it.
pub type OpId = u64;

/// The cluster's settings, as the core needs them.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This broker's name (`cluster.node`).
    pub node: String,
    /// This process's part of every claim value: two brokers given the same
    /// name still never hold the same claim value.
    pub run: String,
    /// `cluster.prefix` of every Redis name.
    pub prefix: String,
    /// `cluster.lease_ms`.
    pub lease: Duration,
    /// `cluster.result_ttl_s` (0: no expiry).
    pub result_ttl_s: u64,
    /// `cache.error_ttl_s`: failures are stored for that long (0: not at all).
    pub error_ttl_s: u64,
    /// `cluster.notice_inline_bytes`: larger outputs stay out of notices.
    pub notice_inline_bytes: usize,
    /// The longest stored value or notice read; longer ones are ignored.
    pub max_stored: usize,
    /// `cluster.writeback_max`: outcomes kept while Redis is away.
    pub writeback_max: usize,
    /// `cluster.progress_per_s`: progress reports of one evaluation
    /// announced to the other brokers per second at most (the latest
    /// winning; 0: none).
    pub progress_per_s: u32,
    /// Each fn's version, in evaluator order.
    pub versions: Vec<String>,
}

/// What the completion channel's listener saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PubsubEvent {
    /// Subscribed (again): what was announced meanwhile is unknown here.
    Subscribed,
    /// The subscription answered a ping sent at `sent`: every message
    /// published before then has arrived.
    Pong { sent: Instant },
    /// The subscription is down; the listener makes it again.
    Down,
    /// A message on the channel.
    Message(String),
}

/// Where Redis stands, for this broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// No command answered yet: commands wait for the first probe.
    Starting,
    /// Commands answer.
    Up,
    /// A command went unanswered: commands are answered as away until a
    /// probe answers.
    Down,
}

/// The cluster's figures, for metrics and the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterStatus {
    pub link: Link,
    /// The epochs were read since the last connect and subscription:
    /// results are served from Redis.
    pub synced: bool,
    pub pubsub: bool,
    pub claims: usize,
    pub takeovers: u64,
    /// Times commands stopped answering.
    pub degraded: u64,
    /// Results found in Redis rather than evaluated here.
    pub l2_hits: u64,
    /// Outcomes waiting to be written back.
    pub writeback: usize,
    /// Times Redis was found to have lost its data (its boot marker
    /// changed).
    pub redis_resets: u64,
}

impl ClusterStatus {
    /// Redis answers and this broker serves from it.
    pub fn up(&self) -> bool {
        self.link == Link::Up && self.synced
    }
}

/// What becomes of a job's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finish {
    /// Its waiters have it: stored (fenced) and published.
    Deliver,
    /// Its waiters wait for [`ClusterEvent::Verdict`].
    Confirm,
    /// Invalidated while it ran: published for other brokers' waiters of
    /// the same evaluation, never stored.
    Shared,
    /// It came after its job ended: stored only if nothing is.
    Late,
}

/// What the table asks of the coordinator.
#[derive(Debug, Clone)]
pub(crate) enum ClusterCmd {
    /// Job `gen` of `key` starts here: find its result in Redis or claim
    /// it. A claim taken is renewed for at most `hold`, past which the job
    /// has ended for certain. A stored result older than `max_age` is
    /// passed over.
    Acquire {
        key: Key,
        gen: Gen,
        evaluator: usize,
        hold: Duration,
        max_age: Option<Duration>,
    },
    /// A subscription to a key nobody evaluates here: look in Redis, now
    /// and at every re-check, until found or `Unlook`.
    Lookup { key: Key },
    /// Nobody here waits on `key` any more: stop looking it up.
    Unlook { key: Key },
    /// An outcome of fn `evaluator` for `key` (job `gen`, if it still had one).
    Finished {
        key: Key,
        gen: Option<Gen>,
        evaluator: usize,
        outcome: Result<Arc<str>, EvalError>,
        how: Finish,
    },
    /// Job `gen` no longer waits on another broker.
    Forget { key: Key, gen: Gen },
    /// Job `gen` ended without an outcome to share: give up its claim.
    Release { key: Key, gen: Gen },
    /// Drop `target`'s results in Redis and on every broker; answer
    /// [`ClusterEvent::Invalidated`] once no broker serves them.
    Invalidate {
        target: Target,
        session: SessionId,
        id: ReqId,
    },
}

impl ClusterCmd {
    /// The key whose commands run in order with this one (an invalidation
    /// runs beside them).
    fn key(&self) -> Option<Key> {
        Some(match self {
            ClusterCmd::Acquire { key, .. }
            | ClusterCmd::Lookup { key }
            | ClusterCmd::Unlook { key }
            | ClusterCmd::Finished { key, .. }
            | ClusterCmd::Forget { key, .. }
            | ClusterCmd::Release { key, .. } => *key,
            ClusterCmd::Invalidate { .. } => return None,
        })
    }

    /// Job `gen` is done with the cluster: its claim given up if it holds
    /// one, else its wait on another broker's ended.
    pub(crate) fn let_go(key: Key, gen: Gen, claimed: bool) -> ClusterCmd {
        if claimed {
            ClusterCmd::Release { key, gen }
        } else {
            ClusterCmd::Forget { key, gen }
        }
    }
}

/// What the coordinator tells the table.
#[derive(Debug, Clone)]
pub(crate) enum ClusterEvent {
    /// An outcome of fn `evaluator` for `key`, computed at `at_ms` (Unix ms)
    /// under the claim `claim` (None: without one), was read from Redis; in
    /// answer to job `gen`'s own look (None: a subscription's).
    Found {
        key: Key,
        gen: Option<Gen>,
        evaluator: usize,
        outcome: Result<Arc<str>, EvalError>,
        claim: Option<Arc<str>>,
        at_ms: u64,
        /// False for the outcome of an evaluation waited on whose fn was
        /// invalidated since: its waiters get it, nobody keeps it.
        keep: bool,
        /// When the read was sent: what it found was current then.
        read_at: Instant,
    },
    /// This broker holds the claim `claim` for job `gen`, asked for at
    /// `asked`; `takeover`: its claimant's lease had run out (and the
    /// claimant may still be evaluating it).
    Claimed {
        key: Key,
        gen: Gen,
        claim: Arc<str>,
        asked: Instant,
        takeover: bool,
    },
    /// Another broker holds the claim `holder`; wait for its completion.
    Waiting {
        key: Key,
        gen: Gen,
        holder: Arc<str>,
    },
    /// Redis is away: evaluate job `gen` here as a lone broker.
    Local { key: Key, gen: Gen },
    /// A broker stored a result of `key` too large for its notice.
    Stored { key: Key },
    /// The broker evaluating `key` under `claim` reported progress.
    Progress {
        key: Key,
        claim: Arc<str>,
        seq: u64,
        data: Arc<str>,
    },
    /// The answer to a `Finished` with [`Finish::Confirm`]: `stored` is
    /// another broker's result, stored first, which stands instead of job
    /// `gen`'s outcome; None: job `gen`'s outcome stands.
    Verdict {
        key: Key,
        gen: Gen,
        stored: Option<Result<Arc<str>, EvalError>>,
    },
    /// A broker finished `key` under the claim `claim` (None: without one).
    /// `keep`: false for an outcome shared with the waiters of its
    /// evaluation only (invalidated while it ran, or another result was
    /// stored first).
    Done {
        key: Key,
        evaluator: usize,
        outcome: Result<Arc<str>, EvalError>,
        claim: Option<Arc<str>>,
        at_ms: u64,
        keep: bool,
    },
    /// The outcome of `key` that stands in Redis (this broker's own, once
    /// stored, or another broker's, stored first): its cache takes it.
    Replace {
        key: Key,
        evaluator: usize,
        outcome: Result<Arc<str>, EvalError>,
        at_ms: u64,
    },
    /// `target`'s results were dropped elsewhere: drop them here too.
    Dropped(Target),
    /// The answer to [`ClusterCmd::Invalidate`].
    Invalidated {
        target: Target,
        session: SessionId,
        id: ReqId,
        ok: bool,
    },
}

/// A key's commands: how many are in flight, whether one is parked, and
/// those waiting their turn.
#[derive(Debug, Default)]
struct Turn {
    in_flight: usize,
    parked: bool,
    queue: VecDeque<ClusterCmd>,
}

/// A claim this broker holds.
#[derive(Debug)]
struct Held {
    gen: Gen,
    /// The claim's name in Redis.
    name: String,
    /// Its value (the fencing token).
    value: String,
    /// Renewed until then at most.
    until: Instant,
}

/// What a job that runs here was begun under: its outcome is stored under
/// its fn's tag as it was then, named by the claim it held (a claim since
/// lost included), and replaces a stored result older than `since_ms`.
#[derive(Debug, Clone)]
struct Begun {
    tag: String,
    claim: Option<String>,
    since_ms: u64,
    /// When it began (Unix ms): a key dropped since refuses its result.
    began_ms: u64,
    /// Redis's boot marker as this broker knew it then: a Redis that
    /// forgot its data since refuses its result (it may have forgotten a
    /// drop).
    boot: Option<Arc<str>>,
}

/// A key this broker waits on another broker for.
#[derive(Debug, Clone)]
struct Wait {
    gen: Gen,
    evaluator: usize,
    hold: Duration,
    /// The claim waited on, and its tag: while it holds, nothing else ends
    /// the wait, and once it is gone its outcome, if stored, ends it.
    holder: String,
    holder_tag: String,
}

/// An outcome computed while Redis was away, to store when it returns.
#[derive(Debug, Clone)]
struct WriteBack {
    key: Key,
    evaluator: usize,
    tag: String,
    /// The claim it was computed under: brokers that waited on it take it.
    claim: Option<String>,
    output: Arc<str>,
    at_ms: u64,
    began_ms: u64,
    boot: Option<Arc<str>>,
    /// Its waiters had it here: this broker keeps it once it is stored.
    own: bool,
}

/// An invalidation under way.
#[derive(Debug, Clone)]
struct Invalidation {
    target: Target,
    session: SessionId,
    id: ReqId,
}

/// A key's result names, and the instant (Unix ms) before which what they
/// hold is deleted again once an invalidation's lease has passed.
type Again = (Vec<String>, u64);

/// What a command in flight is for.
#[derive(Debug)]
enum Pending {
    Probe,
    Ping,
    Acquire {
        key: Key,
        gen: Gen,
        evaluator: usize,
        hold: Duration,
        value: String,
        name: String,
        tag: String,
        since_ms: u64,
        max_age: Option<Duration>,
        sent: Instant,
        /// Redis's boot marker as known when it was sent.
        boot: Option<Arc<str>>,
        /// A re-check of a key waited on.
        recheck: bool,
        /// The claim waited on (empty: none).
        wait_for: String,
    },
    Read {
        key: Key,
        sent: Instant,
    },
    Finish {
        key: Key,
        gen: Option<Gen>,
        evaluator: usize,
        how: Finish,
        /// To keep for a write-back if Redis does not answer.
        back: Option<WriteBack>,
        /// This broker's own outcome, kept here once it is stored.
        own: Option<Result<Arc<str>, EvalError>>,
    },
    Release {
        key: Key,
    },
    Renew {
        claims: Vec<(Key, String)>,
    },
    Sync {
        sent: Instant,
    },
    /// A fn's epoch raised; its announcement follows.
    Raise(Invalidation),
    /// A key's results (computed before then) deleted and the drop
    /// announced.
    Delete(Invalidation, Vec<String>, u64),
    /// Announced; answered a lease on (a key's results deleted again first).
    Announce(Invalidation, Option<Again>),
    /// Deleted again: answered.
    DeleteAgain(Invalidation),
    /// A progress report announced (nothing waits for the reply).
    Progress,
}

impl Pending {
    fn key(&self) -> Option<Key> {
        match self {
            Pending::Acquire { key, .. }
            | Pending::Read { key, .. }
            | Pending::Finish { key, .. }
            | Pending::Release { key } => Some(*key),
            _ => None,
        }
    }
}

/// The notice published on `<prefix>done`, and the stored result.
#[derive(Deserialize)]
struct Stored<'a> {
    #[serde(default)]
    key: Option<&'a str>,
    /// Its namespace (absent: the shared one).
    #[serde(default)]
    ns: Option<&'a str>,
    /// The fn that computed it, and that fn's version and epoch then.
    #[serde(default, rename = "fn")]
    fn_name: Option<&'a str>,
    #[serde(default)]
    tag: Option<&'a str>,
    /// When it was computed (Unix ms).
    #[serde(default)]
    at_ms: u64,
    /// When its evaluation began (Unix ms).
    #[serde(default)]
    began_ms: u64,
    /// An invalidation: every result of `fn_name` before this epoch is dropped.
    #[serde(default)]
    epoch: Option<u64>,
    /// An invalidation: this key's result is dropped.
    #[serde(default)]
    drop: Option<&'a str>,
    /// A progress report of this key's evaluation under `claim`: its `seq`
    /// and `data`.
    #[serde(default)]
    progress: Option<&'a str>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    /// The claim it was computed under.
    #[serde(default)]
    claim: Option<&'a str>,
    /// The output was too large for the notice: it is in the store.
    #[serde(default)]
    stored: bool,
    /// False for an outcome shared with its evaluation's waiters only.
    #[serde(default = "yes")]
    keep: bool,
    #[serde(borrow, default)]
    output: Option<&'a RawValue>,
    #[serde(default)]
    error: Option<StoredError>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
struct StoredError {
    code: String,
    message: String,
}

impl Stored<'_> {
    /// Its namespace, if this broker knows it (if not, nobody here waits in it).
    fn namespace(&self) -> Option<Ns> {
        match self.ns {
            None | Some("") => Some(Ns::SHARED),
            Some(name) => Ns::find(name),
        }
    }

    fn outcome(&self) -> Option<Result<Arc<str>, EvalError>> {
        match (&self.output, &self.error) {
            (Some(output), None) => Some(Ok(output.get().into())),
            (None, Some(e)) if e.code == "eval_timeout" => {
                Some(Err(EvalError::Timeout(e.message.clone())))
            }
            (None, Some(e)) => Some(Err(EvalError::Failed(e.message.clone()))),
            _ => None,
        }
    }
}

/// A stored result as read: its fn, outcome, claim, `at_ms` and
/// `began_ms`.
struct Read {
    evaluator: usize,
    outcome: Result<Arc<str>, EvalError>,
    claim: Option<Arc<str>>,
    at_ms: u64,
    began_ms: u64,
}

/// An error as JSON: `{"code":…,"message":…}`.
pub fn eval_error_json(error: &EvalError) -> String {
    serde_json::json!({"code": error.code(), "message": error.message()}).to_string()
}

/// The broker's `node` name in one of its claims (`<node>:<run>:<seq>`).
pub fn claim_node(claim: &str) -> &str {
    claim.rsplitn(3, ':').nth(2).unwrap_or(claim)
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// One broker's cluster decisions; see the module doc.
pub struct Coordinator {
    config: ClusterConfig,
    /// Each fn's name, in evaluator order.
    fns: Vec<Arc<str>>,
    /// `Unix ms` at an instant: the clock of stored results' `at_ms`.
    base: (Instant, u64),
    link: Link,
    probing: bool,
    /// The epochs were read since the last connect and subscription.
    synced: bool,
    /// When the last read of the epochs that counts was sent.
    synced_at: Option<Instant>,
    /// The last connect or subscription: a read of the epochs counts only
    /// if it was sent at or after it.
    sync_after: Instant,
    /// A read of the epochs in flight, sent then.
    syncing: Option<Instant>,
    /// Redis's boot marker, as last read: it changes when Redis loses its
    /// data.
    boot: Option<Arc<str>>,
    pubsub: bool,
    /// The subscription answered a ping sent a lease before this.
    confirmed_until: Option<Instant>,
    /// Each fn's epoch in each namespace (absent: 0); only ever raised.
    epochs: HashMap<(Ns, usize), u64>,
    held: HashMap<Key, Held>,
    begun: HashMap<Gen, Begun>,
    waiting: HashMap<Key, Wait>,
    looked: HashSet<Key>,
    busy: HashMap<Key, Turn>,
    parked: VecDeque<ClusterCmd>,
    ops: HashMap<OpId, Pending>,
    next_op: OpId,
    next_claim: u64,
    renewing: bool,
    writeback: VecDeque<WriteBack>,
    /// Invalidations announced, answered at the instant given (a key's
    /// results computed before the invalidation deleted again first).
    announced: Vec<(Instant, Invalidation, Option<Again>)>,
    next_renew: Instant,
    next_recheck: Instant,
    /// A re-check waits for the read of the epochs under way.
    recheck_due: bool,
    takeovers: u64,
    degraded: u64,
    l2_hits: u64,
    redis_resets: u64,
    events: VecDeque<ClusterEvent>,
}

impl Coordinator {
    /// `fns`: each fn's name, in evaluator order. `unix_ms`: the wall
    /// clock at `now`.
    pub fn new(config: ClusterConfig, fns: Vec<Arc<str>>, now: Instant, unix_ms: u64) -> Self {
        Coordinator {
            config,
            fns,
            base: (now, unix_ms),
            link: Link::Starting,
            probing: false,
            synced: false,
            synced_at: None,
            sync_after: now,
            syncing: None,
            boot: None,
            pubsub: false,
            confirmed_until: None,
            epochs: HashMap::new(),
            held: HashMap::new(),
            begun: HashMap::new(),
            waiting: HashMap::new(),
            looked: HashSet::new(),
            busy: HashMap::new(),
            parked: VecDeque::new(),
            ops: HashMap::new(),
            next_op: 0,
            next_claim: 0,
            renewing: false,
            writeback: VecDeque::new(),
            announced: Vec::new(),
            // The first probe goes out at once.
            next_renew: now,
            next_recheck: now,
            recheck_due: false,
            takeovers: 0,
            degraded: 0,
            l2_hits: 0,
            redis_resets: 0,
            events: VecDeque::new(),
        }
    }

    pub fn status(&self) -> ClusterStatus {
        ClusterStatus {
            link: self.link,
            synced: self.synced,
            pubsub: self.pubsub,
            claims: self.held.len(),
            takeovers: self.takeovers,
            degraded: self.degraded,
            l2_hits: self.l2_hits,
            writeback: self.writeback.len(),
            redis_resets: self.redis_resets,
        }
    }

    /// What it holds: claims, jobs begun, keys waited on, keys looked up,
    /// keys with commands waiting or in flight plus commands parked,
    /// commands in flight, write-backs, invalidations under way.
    pub fn holding(&self) -> [usize; 8] {
        [
            self.held.len(),
            self.begun.len(),
            self.waiting.len(),
            self.looked.len(),
            self.busy.len() + self.parked.len(),
            self.ops.len(),
            self.writeback.len(),
            self.announced.len(),
        ]
    }

    /// Each fn's epoch in each namespace, as this broker knows it.
    pub fn epoch(&self, ns: Ns, evaluator: usize) -> u64 {
        self.epochs.get(&(ns, evaluator)).copied().unwrap_or(0)
    }

    /// `target`'s results were dropped here: what waits to be written back
    /// of them goes.
    pub(crate) fn dropped(&mut self, target: Target) {
        self.writeback
            .retain(|b| !target.covers(b.key, b.evaluator));
    }

    /// Whether job `gen` began under its fn's current tag: if its fn was
    /// invalidated since, its outcome is stored where nobody reads it, and
    /// this broker must not keep it either.
    pub(crate) fn began_current(&self, key: &Key, gen: Gen, evaluator: usize) -> bool {
        self.begun
            .get(&gen)
            .is_none_or(|b| b.tag == self.tag(key.ns(), evaluator))
    }

    pub(crate) fn take_event(&mut self) -> Option<ClusterEvent> {
        self.events.pop_front()
    }

    /// When [`Coordinator::tick`] is next due.
    pub fn next_timer(&self) -> Instant {
        let mut at = self.next_renew.min(self.next_recheck);
        for (when, _, _) in &self.announced {
            at = at.min(*when);
        }
        at
    }

    /// The instant of a Unix time (ms) on this broker's clock.
    pub(crate) fn instant_of(&self, unix_ms: u64) -> Instant {
        let (base, ms) = self.base;
        match unix_ms.checked_sub(ms) {
            Some(after) => base + Duration::from_millis(after),
            None => base
                .checked_sub(Duration::from_millis(ms - unix_ms))
                .unwrap_or(base),
        }
    }

    fn unix_ms(&self, now: Instant) -> u64 {
        let (base, ms) = self.base;
        ms + now.saturating_duration_since(base).as_millis() as u64
    }

    fn lease_ms(&self) -> u64 {
        self.config.lease.as_millis() as u64
    }

    /// Fn `evaluator`'s tag in `ns`: `<epoch>:<version>`.
    fn tag(&self, ns: Ns, evaluator: usize) -> String {
        format!(
            "{}:{}",
            self.epoch(ns, evaluator),
            self.config.versions[evaluator]
        )
    }

    /// Raises fn `evaluator`'s epoch in `ns` to at least `epoch`; whether it rose.
    fn raise(&mut self, ns: Ns, evaluator: usize, epoch: u64) -> bool {
        let current = self.epochs.entry((ns, evaluator)).or_default();
        let rose = *current < epoch;
        *current = epoch.max(*current);
        rose
    }

    /// The name of `key`'s `kind` (claim, result) under `tag`. A
    /// namespace's names begin `<prefix><ns>/`; the shared namespace's are
    /// those of a broker without namespaces.
    fn name(&self, kind: &str, key: &Key, tag: &str) -> String {
        let prefix = &self.config.prefix;
        let hex = key.to_hex();
        let tag = if tag.is_empty() {
            String::new()
        } else {
            format!(":{tag}")
        };
        if key.ns().is_shared() {
            format!("{prefix}{kind}:{{{hex}}}{tag}")
        } else {
            format!("{prefix}{}/{kind}:{{{hex}}}{tag}", key.ns())
        }
    }

    /// What a look at `key` reads: its drop marker, then its results.
    fn read_names(&self, key: &Key) -> Vec<String> {
        let mut names = vec![self.name("dropped", key, "")];
        names.extend(self.result_names(key));
        names
    }

    /// The names `key`'s results may have now: one per fn (the key says
    /// which fn, but only to whoever knows the input).
    fn result_names(&self, key: &Key) -> Vec<String> {
        (0..self.fns.len())
            .map(|e| self.name("result", key, &self.tag(key.ns(), e)))
            .collect()
    }

    /// The hash of the shared namespace's epochs (a field per fn), and the
    /// hash of other namespaces' (a field per `<ns>/<fn>`).
    fn epochs_names(&self) -> (String, String) {
        let prefix = &self.config.prefix;
        (format!("{prefix}epochs"), format!("{prefix}ns-epochs"))
    }

    fn channel(&self) -> String {
        format!("{}done", self.config.prefix)
    }

    /// Redis's boot marker: set once by the first broker to read the
    /// epochs, gone when Redis loses its data.
    fn boot_name(&self) -> String {
        format!("{}boot", self.config.prefix)
    }

    fn send(&mut self, pending: Pending, op: RedisOp, out: &mut VecDeque<Effect>) {
        if let Some(key) = pending.key() {
            self.busy.entry(key).or_default().in_flight += 1;
        }
        self.next_op += 1;
        let id = self.next_op;
        self.ops.insert(id, pending);
        out.push_back(Effect::Redis { op: id, cmd: op });
    }

    /// Results may be read from Redis: the epochs were read since the last
    /// connect and subscription, and every invalidation answered by now is
    /// known here (the epochs were read within a lease, or the
    /// subscription answered a ping sent within one).
    pub(crate) fn ready(&self, now: Instant) -> bool {
        let lease = self.config.lease;
        self.link == Link::Up
            && self.synced
            && (self.synced_at.is_some_and(|at| at + lease > now)
                || self.confirmed_until.is_some_and(|until| until > now))
    }

    // ---- commands from the table ----

    /// Takes a command: carried out at once unless its key has a command
    /// in flight or parked, in which case it waits its turn.
    pub(crate) fn command(&mut self, cmd: ClusterCmd, now: Instant, out: &mut VecDeque<Effect>) {
        let Some(key) = cmd.key() else {
            return self.dispatch(cmd, now, out);
        };
        if let Some(turn) = self.busy.get_mut(&key) {
            turn.queue.push_back(cmd);
            return;
        }
        self.dispatch(cmd, now, out);
        self.next_for(key, now, out);
    }

    /// Carries out the commands waiting for `key` while it has none in
    /// flight or parked.
    fn next_for(&mut self, key: Key, now: Instant, out: &mut VecDeque<Effect>) {
        loop {
            let Some(turn) = self.busy.get_mut(&key) else {
                return;
            };
            if turn.in_flight > 0 || turn.parked {
                return;
            }
            match turn.queue.pop_front() {
                Some(cmd) => self.dispatch(cmd, now, out),
                None => {
                    self.busy.remove(&key);
                    return;
                }
            }
        }
    }

    /// Carries a command out: its I/O started, parked, or answered at once.
    fn dispatch(&mut self, cmd: ClusterCmd, now: Instant, out: &mut VecDeque<Effect>) {
        let parks = match &cmd {
            ClusterCmd::Acquire { .. } | ClusterCmd::Lookup { .. } => {
                self.link == Link::Starting || (self.link == Link::Up && !self.ready(now))
            }
            _ => self.link == Link::Starting,
        };
        if parks {
            if let Some(key) = cmd.key() {
                self.busy.entry(key).or_default().parked = true;
            }
            self.parked.push_back(cmd);
            return self.sync(now, out);
        }
        match cmd {
            ClusterCmd::Acquire {
                key,
                gen,
                evaluator,
                hold,
                max_age,
            } => {
                if self.link != Link::Up {
                    return self.local(key, gen, evaluator, now);
                }
                // A result computed before then is passed over.
                let since_ms = max_age.map_or(0, |age| {
                    self.unix_ms(now).saturating_sub(age.as_millis() as u64)
                });
                let wait = Wait {
                    gen,
                    evaluator,
                    hold,
                    holder: String::new(),
                    holder_tag: String::new(),
                };
                self.acquire(key, wait, (since_ms, max_age), false, now, out);
            }
            ClusterCmd::Lookup { key } => {
                self.looked.insert(key);
                if self.link != Link::Up {
                    return;
                }
                let names = self.read_names(&key);
                let pending = Pending::Read { key, sent: now };
                self.send(pending, RedisOp::Read { names }, out);
            }
            ClusterCmd::Finished {
                key,
                gen,
                evaluator,
                outcome,
                how,
            } => self.finish(key, gen, evaluator, outcome, how, now, out),
            ClusterCmd::Release { key, gen } => {
                self.begun.remove(&gen);
                if self.held.get(&key).is_none_or(|h| h.gen != gen) {
                    return;
                }
                let held = self.held.remove(&key).expect("just found");
                if self.link == Link::Up {
                    let op = RedisOp::Release {
                        claim: held.name,
                        value: held.value,
                    };
                    self.send(Pending::Release { key }, op, out);
                }
            }
            ClusterCmd::Invalidate {
                target,
                session,
                id,
            } => self.invalidate(
                Invalidation {
                    target,
                    session,
                    id,
                },
                now,
                out,
            ),
            ClusterCmd::Unlook { key } => {
                self.looked.remove(&key);
            }
            ClusterCmd::Forget { key, gen } => {
                self.begun.remove(&gen);
                if self.waiting.get(&key).is_some_and(|w| w.gen == gen) {
                    self.waiting.remove(&key);
                }
            }
        }
    }

    /// Job `gen` runs here without a claim: its result will be stored under
    /// its fn's tag as of now.
    fn local(&mut self, key: Key, gen: Gen, evaluator: usize, now: Instant) {
        if self.waiting.get(&key).is_some_and(|w| w.gen == gen) {
            self.waiting.remove(&key);
        }
        let tag = self.tag(key.ns(), evaluator);
        let begun = Begun {
            tag,
            claim: None,
            since_ms: 0,
            began_ms: self.unix_ms(now),
            boot: self.boot.clone(),
        };
        self.begun.insert(gen, begun);
        self.events.push_back(ClusterEvent::Local { key, gen });
    }

    /// Looks for `key`'s result, or claims it for the job `wait` describes
    /// (a re-check waits on as long as `wait.holder` holds the claim).
    fn acquire(
        &mut self,
        key: Key,
        wait: Wait,
        (since_ms, max_age): (u64, Option<Duration>),
        recheck: bool,
        now: Instant,
        out: &mut VecDeque<Effect>,
    ) {
        self.next_claim += 1;
        let value = format!(
            "{}:{}:{}",
            self.config.node, self.config.run, self.next_claim
        );
        let tag = self.tag(key.ns(), wait.evaluator);
        let name = self.name("claim", &key, &tag);
        let waited_tag = if wait.holder_tag.is_empty() {
            &tag
        } else {
            &wait.holder_tag
        };
        let op = RedisOp::Acquire {
            result: self.name("result", &key, &tag),
            claim: name.clone(),
            dropped: self.name("dropped", &key, ""),
            value: value.clone(),
            lease_ms: self.lease_ms(),
            since_ms,
            waited: self.name("claim", &key, waited_tag),
            waited_result: self.name("result", &key, waited_tag),
            wait_for: wait.holder.clone(),
        };
        let pending = Pending::Acquire {
            key,
            gen: wait.gen,
            evaluator: wait.evaluator,
            hold: wait.hold,
            value,
            name,
            tag,
            since_ms,
            max_age,
            sent: now,
            boot: self.boot.clone(),
            recheck,
            wait_for: wait.holder,
        };
        self.send(pending, op, out);
    }

    /// The stored form of an outcome computed under `tag` and `claim` at
    /// `at_ms` (its `at_ms` and whether it succeeded first, where the
    /// scripts read them), and where its origin (all but the outcome) ends.
    #[allow(clippy::too_many_arguments)]
    fn stored_form(
        &self,
        key: &Key,
        evaluator: usize,
        tag: &str,
        claim: Option<&str>,
        outcome: &Result<Arc<str>, EvalError>,
        at_ms: u64,
        began_ms: u64,
    ) -> (String, usize) {
        let ns = if key.ns().is_shared() {
            String::new()
        } else {
            format!(",\"ns\":{}", json_str(&key.ns().name()))
        };
        let claim = claim
            .map(|c| format!(",\"claim\":{}", json_str(c)))
            .unwrap_or_default();
        let origin = format!(
            "\"at_ms\":{at_ms},\"ok\":{},\"began_ms\":{began_ms}{ns},\"fn\":{},\"tag\":{}{claim}",
            outcome.is_ok(),
            json_str(&self.fns[evaluator]),
            json_str(tag),
        );
        let form = match outcome {
            Ok(output) => format!("{{{origin},\"output\":{output}}}"),
            Err(error) => format!("{{{origin},\"error\":{}}}", eval_error_json(error)),
        };
        (form, origin.len() + 1)
    }

    /// The notice of a stored form: the key added, and a large output left
    /// to be read from the store (`large`: where the form's origin ends).
    fn notice(&self, key: &Key, stored: &str, large: Option<usize>) -> String {
        let hex = key.to_hex();
        if let Some(end) = large {
            // Only brokers with waiters for it read it from Redis.
            let origin = &stored[1..end];
            format!("{{\"key\":\"{hex}\",{origin},\"stored\":true}}")
        } else {
            format!("{{\"key\":\"{hex}\",{}", &stored[1..])
        }
    }

    /// A notice for the waiters of one evaluation only: never kept.
    fn shared_notice(&self, key: &Key, stored: &str) -> String {
        format!(
            "{{\"key\":\"{}\",\"keep\":false,{}",
            key.to_hex(),
            &stored[1..]
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        key: Key,
        gen: Option<Gen>,
        evaluator: usize,
        outcome: Result<Arc<str>, EvalError>,
        how: Finish,
        now: Instant,
        out: &mut VecDeque<Effect>,
    ) {
        // The claim leaves `held` now: the script gives it up, or it expires.
        let held = match gen {
            Some(gen) if self.held.get(&key).is_some_and(|h| h.gen == gen) => {
                self.held.remove(&key)
            }
            _ => None,
        };
        let begun = gen.and_then(|gen| self.begun.remove(&gen));
        let tag = match &begun {
            Some(begun) => begun.tag.clone(),
            None => self.tag(key.ns(), evaluator),
        };
        let at_ms = self.unix_ms(now);
        // A late outcome's job is gone: taken as begun long ago.
        let began_ms = begun.as_ref().map_or(0, |b| b.began_ms);
        let claim = begun.as_ref().and_then(|b| b.claim.clone());
        let boot = begun.as_ref().and_then(|b| b.boot.clone());
        let back = match (&outcome, how) {
            (Ok(output), Finish::Deliver | Finish::Confirm | Finish::Late) => Some(WriteBack {
                key,
                evaluator,
                tag: tag.clone(),
                claim: claim.clone(),
                output: Arc::clone(output),
                at_ms,
                began_ms,
                boot: boot.clone(),
                own: how == Finish::Deliver,
            }),
            _ => None,
        };
        if self.link != Link::Up {
            if let Some(back) = back {
                self.keep_back(back, out);
            }
            if let (Finish::Confirm, Some(gen)) = (how, gen) {
                // Nothing that this broker could read was stored meanwhile.
                self.events.push_back(ClusterEvent::Verdict {
                    key,
                    gen,
                    stored: None,
                });
            }
            return;
        }
        let keep = how != Finish::Shared && (outcome.is_ok() || self.config.error_ttl_s > 0);
        let ttl_s = if outcome.is_ok() {
            self.config.result_ttl_s
        } else {
            self.config.error_ttl_s
        };
        // Named by the claim it was computed under, so a broker waiting on
        // that claim knows it, and one waiting on another ignores it.
        let (stored, origin_end) = self.stored_form(
            &key,
            evaluator,
            &tag,
            claim.as_deref(),
            &outcome,
            at_ms,
            began_ms,
        );
        let large = outcome
            .as_ref()
            .is_ok_and(|o| o.len() > self.config.notice_inline_bytes)
            .then_some(origin_end);
        let notice = if how == Finish::Shared {
            self.shared_notice(&key, &stored)
        } else {
            self.notice(&key, &stored, large)
        };
        // When another result stands, the waiters elsewhere of this
        // evaluation still get the outcome its waiters here got.
        let shared = match (how, &claim) {
            (Finish::Deliver, Some(_)) => self.shared_notice(&key, &stored),
            _ => String::new(),
        };
        let op = RedisOp::Finish {
            result: self.name("result", &key, &tag),
            dropped: self.name("dropped", &key, ""),
            boot: self.boot_name(),
            began_under: boot.as_deref().unwrap_or_default().to_string(),
            claim: match &held {
                Some(held) => held.name.clone(),
                None => self.name("claim", &key, &tag),
            },
            token: held.map(|h| h.value).unwrap_or_default(),
            stored,
            ttl_s,
            keep,
            replace_before_ms: begun.map_or(0, |b| b.since_ms),
            channel: self.channel(),
            notice,
            shared,
        };
        let own = (how == Finish::Deliver).then_some(outcome);
        let pending = Pending::Finish {
            key,
            gen,
            evaluator,
            how,
            back,
            own,
        };
        self.send(pending, op, out);
    }

    /// Keeps an outcome to store once Redis answers again. Past
    /// `cluster.writeback_max` the oldest goes, and leaves this broker's
    /// cache, which must not hold what Redis will never have.
    fn keep_back(&mut self, back: WriteBack, out: &mut VecDeque<Effect>) {
        self.writeback.retain(|b| b.key != back.key);
        if self.writeback.len() >= self.config.writeback_max {
            let gone = match self.writeback.pop_front() {
                Some(oldest) => {
                    self.writeback.push_back(back);
                    oldest
                }
                None => back,
            };
            out.push_back(Effect::Drop(Target::Key(gone.key)));
            return;
        }
        self.writeback.push_back(back);
    }

    /// Stores what was computed while Redis was away: each stored if
    /// nothing is, and published; otherwise this broker's cache takes the
    /// result that stands. A key with commands under way waits for the
    /// next round.
    fn write_back(&mut self, out: &mut VecDeque<Effect>) {
        let (now_free, later): (Vec<WriteBack>, Vec<WriteBack>) =
            std::mem::take(&mut self.writeback)
                .into_iter()
                .partition(|b| !self.busy.contains_key(&b.key));
        self.writeback = later.into();
        for back in now_free {
            let outcome = Ok(Arc::clone(&back.output));
            let claim = back.claim.as_deref();
            let (stored, origin_end) = self.stored_form(
                &back.key,
                back.evaluator,
                &back.tag,
                claim,
                &outcome,
                back.at_ms,
                back.began_ms,
            );
            let large = (back.output.len() > self.config.notice_inline_bytes).then_some(origin_end);
            // Where another result stands, the waiters elsewhere of this
            // evaluation still get this one.
            let shared = match claim {
                Some(_) => self.shared_notice(&back.key, &stored),
                None => String::new(),
            };
            let op = RedisOp::Finish {
                result: self.name("result", &back.key, &back.tag),
                claim: self.name("claim", &back.key, &back.tag),
                dropped: self.name("dropped", &back.key, ""),
                boot: self.boot_name(),
                began_under: back.boot.as_deref().unwrap_or_default().to_string(),
                // Its claim, if still held, goes: brokers waiting on it look
                // at once rather than when its lease runs out.
                token: back.claim.clone().unwrap_or_default(),
                notice: self.notice(&back.key, &stored, large),
                stored,
                ttl_s: self.config.result_ttl_s,
                keep: true,
                replace_before_ms: 0,
                channel: self.channel(),
                shared,
            };
            let own = back.own.then(|| Ok(Arc::clone(&back.output)));
            let pending = Pending::Finish {
                key: back.key,
                gen: None,
                evaluator: back.evaluator,
                how: Finish::Deliver,
                back: Some(back),
                own,
            };
            self.send(pending, op, out);
        }
    }

    fn invalidate(&mut self, invalidation: Invalidation, now: Instant, out: &mut VecDeque<Effect>) {
        if self.link != Link::Up {
            return self.answer(invalidation, false);
        }
        match invalidation.target {
            Target::Fn(ns, evaluator) => {
                let (shared, others) = self.epochs_names();
                let name = &self.fns[evaluator];
                let (hash, field) = if ns.is_shared() {
                    (shared, name.to_string())
                } else {
                    (others, format!("{ns}/{name}"))
                };
                let op = RedisOp::Raise {
                    hash,
                    field,
                    at_least: self.epoch(ns, evaluator),
                };
                self.send(Pending::Raise(invalidation), op, out);
            }
            Target::Key(key) => {
                // Deleted and announced in one step, and a lease later
                // deleted again if what is stored was computed before now
                // (a broker that evaluated it may store it before it hears).
                let names = self.result_names(&key);
                let before_ms = self.unix_ms(now);
                let notice =
                    serde_json::json!({"drop": key.to_hex(), "ns": &*key.ns().name()}).to_string();
                let op = RedisOp::Drop {
                    names: names.clone(),
                    dropped: self.name("dropped", &key, ""),
                    before_ms,
                    ttl_s: self.config.result_ttl_s,
                    channel: self.channel(),
                    notice,
                };
                self.send(Pending::Delete(invalidation, names, before_ms), op, out);
            }
        }
    }

    fn answer(&mut self, invalidation: Invalidation, ok: bool) {
        let Invalidation {
            target,
            session,
            id,
        } = invalidation;
        self.events.push_back(ClusterEvent::Invalidated {
            target,
            session,
            id,
            ok,
        });
    }

    // ---- time ----

    /// Answers invalidations whose lease has passed, renews claims every
    /// third of a lease and looks again at what waits every lease.
    pub fn tick(&mut self, now: Instant, out: &mut VecDeque<Effect>) {
        let lease = self.config.lease;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.announced)
            .into_iter()
            .partition(|(at, _, _)| *at <= now);
        self.announced = later;
        for (_, invalidation, again) in due {
            match again {
                Some((names, before_ms)) if self.link == Link::Up => {
                    let Target::Key(key) = invalidation.target else {
                        continue;
                    };
                    let op = RedisOp::Drop {
                        names,
                        dropped: self.name("dropped", &key, ""),
                        before_ms,
                        ttl_s: self.config.result_ttl_s,
                        channel: self.channel(),
                        notice: String::new(),
                    };
                    self.send(Pending::DeleteAgain(invalidation), op, out)
                }
                Some(_) => self.answer(invalidation, false),
                None => self.answer(invalidation, true),
            }
        }
        if now >= self.next_renew {
            self.next_renew = now + lease / 3;
            self.renew(now, out);
        }
        if now >= self.next_recheck {
            self.next_recheck = now + lease;
            self.recheck(now, out);
        }
    }

    fn renew(&mut self, now: Instant, out: &mut VecDeque<Effect>) {
        // A claim is kept no longer than its job can live: past that the
        // job ended here without a word, and the claim is left to expire.
        self.held.retain(|key, held| {
            let keep = held.until > now;
            if !keep {
                tracing::warn!(key = %key, "cluster: a claim outlived its job's deadline; letting it expire");
            }
            keep
        });
        if self.link != Link::Up {
            return self.probe(out);
        }
        if !self.held.is_empty() && !self.renewing {
            let mut claims: Vec<(Key, String, String)> = self
                .held
                .iter()
                .map(|(k, h)| (*k, h.name.clone(), h.value.clone()))
                .collect();
            claims.sort_unstable();
            let pending = Pending::Renew {
                claims: claims.iter().map(|(k, _, v)| (*k, v.clone())).collect(),
            };
            let op = RedisOp::Renew {
                claims: claims.into_iter().map(|(_, n, v)| (n, v)).collect(),
                lease_ms: self.lease_ms(),
            };
            self.renewing = true;
            self.send(pending, op, out);
        } else if self.ops.is_empty() {
            // Nothing to say to Redis: a PING keeps the health figure true.
            self.send(Pending::Ping, RedisOp::Ping, out);
        }
    }

    /// While Redis is away (or not yet heard), one PING at a time decides
    /// when it is back.
    fn probe(&mut self, out: &mut VecDeque<Effect>) {
        if !self.probing {
            self.probing = true;
            self.send(Pending::Probe, RedisOp::Ping, out);
        }
    }

    /// Writes the epochs this broker knows back and reads Redis's, unless
    /// a read that counts is in flight.
    fn sync(&mut self, now: Instant, out: &mut VecDeque<Effect>) {
        if self.link != Link::Up || self.syncing.is_some_and(|sent| sent >= self.sync_after) {
            return;
        }
        let (shared, others) = self.epochs_names();
        let mut known: [Vec<(String, u64)>; 2] = Default::default();
        let mut epochs: Vec<(&(Ns, usize), &u64)> =
            self.epochs.iter().filter(|(_, e)| **e > 0).collect();
        epochs.sort_unstable();
        for ((ns, evaluator), epoch) in epochs {
            let name = &self.fns[*evaluator];
            if ns.is_shared() {
                known[0].push((name.to_string(), *epoch));
            } else {
                known[1].push((format!("{ns}/{name}"), *epoch));
            }
        }
        let [a, b] = known;
        // Unique to this broker's run and this read.
        let candidate = format!("{}:{}:{}", self.config.node, self.config.run, self.next_op);
        let op = RedisOp::Sync {
            hashes: vec![(shared, a), (others, b)],
            boot: self.boot_name(),
            candidate,
        };
        self.syncing = Some(now);
        self.send(Pending::Sync { sent: now }, op, out);
    }

    /// Every lease: the epochs read, and what waits looked at again; with
    /// Redis away, what waits on another broker runs here.
    fn recheck(&mut self, now: Instant, out: &mut VecDeque<Effect>) {
        match self.link {
            Link::Starting => {}
            Link::Down => {
                let mut waiting: Vec<(Key, Wait)> = self.waiting.drain().collect();
                waiting.sort_unstable_by_key(|(k, _)| *k);
                for (key, wait) in waiting {
                    self.local(key, wait.gen, wait.evaluator, now);
                }
            }
            Link::Up => {
                self.sync(now, out);
                if self.ready(now) {
                    // Write-backs first: a key looked up waits for its own.
                    self.write_back(out);
                    self.look_again(now, out);
                } else {
                    // Once the epochs are read.
                    self.recheck_due = true;
                }
            }
        }
    }

    /// Looks again at every key waited on and subscribed to; a key with a
    /// command in flight or parked is left to it. A key both waited on and
    /// subscribed to is looked at once, for the wait (whose outcome reaches
    /// its subscribers too).
    fn look_again(&mut self, now: Instant, out: &mut VecDeque<Effect>) {
        let mut waiting: Vec<(Key, Wait)> = self
            .waiting
            .iter()
            .filter(|(k, _)| !self.busy.contains_key(*k))
            .map(|(k, w)| (*k, w.clone()))
            .collect();
        waiting.sort_unstable_by_key(|(k, _)| *k);
        let mut looked: Vec<Key> = self
            .looked
            .iter()
            .filter(|k| !self.busy.contains_key(*k) && !self.waiting.contains_key(*k))
            .copied()
            .collect();
        looked.sort_unstable();
        for (key, wait) in waiting {
            self.acquire(key, wait, (0, None), true, now, out);
        }
        for key in looked {
            let names = self.read_names(&key);
            self.send(
                Pending::Read { key, sent: now },
                RedisOp::Read { names },
                out,
            );
        }
    }

    /// Redis stopped answering: every command is answered as away until a
    /// probe answers.
    fn trip(&mut self, now: Instant, out: &mut VecDeque<Effect>) {
        if self.link == Link::Up {
            self.degraded += 1;
            tracing::warn!("cluster: Redis unreachable, serving in local mode (degraded)");
        }
        if self.link != Link::Down {
            self.link = Link::Down;
            self.synced = false;
            self.unpark(now, out);
        }
    }

    /// Carries out every parked command again (it may park again).
    fn unpark(&mut self, now: Instant, out: &mut VecDeque<Effect>) {
        for cmd in std::mem::take(&mut self.parked) {
            let key = cmd.key();
            if let Some(turn) = key.and_then(|k| self.busy.get_mut(&k)) {
                turn.parked = false;
            }
            self.dispatch(cmd, now, out);
            if let Some(key) = key {
                self.next_for(key, now, out);
            }
        }
    }

    // ---- what came back ----

    /// The reply to command `op`; None: Redis did not answer it in time.
    pub fn reply(
        &mut self,
        op: OpId,
        reply: Option<RedisReply>,
        now: Instant,
        out: &mut VecDeque<Effect>,
    ) {
        let Some(pending) = self.ops.remove(&op) else {
            return;
        };
        let key = pending.key();
        if let Some(turn) = key.and_then(|k| self.busy.get_mut(&k)) {
            turn.in_flight -= 1;
        }
        if reply.is_none() && !matches!(pending, Pending::Probe) {
            self.trip(now, out);
        }
        self.replied(pending, reply, now, out);
        if let Some(key) = key {
            self.next_for(key, now, out);
        }
    }

    fn replied(
        &mut self,
        pending: Pending,
        reply: Option<RedisReply>,
        now: Instant,
        out: &mut VecDeque<Effect>,
    ) {
        match pending {
            Pending::Probe => {
                self.probing = false;
                if reply == Some(RedisReply::Pong) {
                    if self.link != Link::Up {
                        tracing::info!("cluster: Redis reachable, coordinating with other brokers");
                    }
                    self.link = Link::Up;
                    self.sync_after = now;
                    self.synced = false;
                    self.sync(now, out);
                } else if self.link == Link::Starting {
                    tracing::warn!(
                        "cluster: Redis unreachable at start, serving in local mode (degraded)"
                    );
                    self.link = Link::Down;
                    self.unpark(now, out);
                }
            }
            Pending::Ping | Pending::Release { .. } => {}
            Pending::Acquire {
                key,
                gen,
                evaluator,
                hold,
                value,
                name,
                tag,
                since_ms,
                max_age,
                sent,
                boot,
                recheck,
                wait_for,
            } => {
                if sent < self.sync_after {
                    if let Some(RedisReply::Acquired(Acquired::Found(_))) = reply {
                        // Read before this broker last (re)connected or
                        // subscribed: it may predate an invalidation missed
                        // meanwhile. The job asks again (a re-check waits
                        // for the next one).
                        if !recheck {
                            let cmd = ClusterCmd::Acquire {
                                key,
                                gen,
                                evaluator,
                                hold,
                                max_age,
                            };
                            self.command(cmd, now, out);
                        }
                        return;
                    }
                }
                let still_waits = self.waiting.get(&key).is_some_and(|w| w.gen == gen);
                if recheck && !still_waits {
                    // It stopped waiting meanwhile: a claim taken is given up.
                    if let Some(RedisReply::Acquired(Acquired::Claimed)) = reply {
                        let op = RedisOp::Release { claim: name, value };
                        self.send(Pending::Release { key }, op, out);
                    }
                    return;
                }
                let event = match reply {
                    Some(RedisReply::Acquired(Acquired::Found(text))) => {
                        // The outcome of the evaluation waited on is taken
                        // under any tag, but kept only under the current one.
                        let read = self.parse(&text, key.ns()).map(|r| (r, true)).or_else(|| {
                            self.parse_any(&text)
                                .filter(|r| {
                                    !wait_for.is_empty() && r.claim.as_deref() == Some(&*wait_for)
                                })
                                .map(|r| (r, false))
                        });
                        match read {
                            Some((read, keep)) => {
                                self.l2_hits += 1;
                                self.waiting.remove(&key);
                                ClusterEvent::Found {
                                    key,
                                    gen: Some(gen),
                                    evaluator: read.evaluator,
                                    outcome: read.outcome,
                                    claim: read.claim,
                                    at_ms: read.at_ms,
                                    keep,
                                    read_at: sent,
                                }
                            }
                            None if recheck => return,
                            None => return self.local(key, gen, evaluator, now),
                        }
                    }
                    Some(RedisReply::Acquired(Acquired::Claimed)) => {
                        let claim: Arc<str> = value.as_str().into();
                        let begun = Begun {
                            tag,
                            claim: Some(value.clone()),
                            since_ms,
                            began_ms: self.unix_ms(sent),
                            boot,
                        };
                        self.begun.insert(gen, begun);
                        let held = Held {
                            gen,
                            name,
                            value,
                            until: now + hold,
                        };
                        self.held.insert(key, held);
                        if recheck {
                            tracing::info!(key = %key, "cluster: the claimant's lease expired; evaluating here");
                            self.takeovers += 1;
                            self.waiting.remove(&key);
                        }
                        ClusterEvent::Claimed {
                            key,
                            gen,
                            claim,
                            asked: sent,
                            takeover: recheck,
                        }
                    }
                    Some(RedisReply::Acquired(Acquired::Held(holder))) => {
                        if recheck && holder == wait_for {
                            // Still claimed by the broker it waits on.
                            return;
                        }
                        // The claim waited on is gone without an outcome,
                        // and another broker holds the key now: its
                        // evaluation is the one to wait for.
                        let wait = Wait {
                            gen,
                            evaluator,
                            hold,
                            holder: holder.clone(),
                            holder_tag: tag,
                        };
                        self.waiting.insert(key, wait);
                        ClusterEvent::Waiting {
                            key,
                            gen,
                            holder: holder.into(),
                        }
                    }
                    // Redis went away: evaluate here rather than wait.
                    _ => return self.local(key, gen, evaluator, now),
                };
                self.events.push_back(event);
            }
            Pending::Read { key, sent } => {
                if sent < self.sync_after {
                    // It may predate an invalidation missed meanwhile; the
                    // next re-check reads again.
                    return;
                }
                // The first result of the key's fn under its current tag
                // (another fn's name under an equal tag may hold an old one),
                // unless it began before the key was last dropped.
                let found = match reply {
                    Some(RedisReply::Values(values)) => {
                        let mut values = values.into_iter();
                        let dropped: u64 = values
                            .next()
                            .flatten()
                            .and_then(|d| d.parse().ok())
                            .unwrap_or(0);
                        values
                            .flatten()
                            .find_map(|text| self.parse(&text, key.ns()))
                            .filter(|read| dropped == 0 || read.began_ms > dropped)
                    }
                    _ => None,
                };
                // Looked at again every lease until the table lets it go.
                let Some(read) = found else { return };
                self.l2_hits += 1;
                self.events.push_back(ClusterEvent::Found {
                    key,
                    gen: None,
                    evaluator: read.evaluator,
                    outcome: read.outcome,
                    claim: read.claim,
                    at_ms: read.at_ms,
                    keep: true,
                    read_at: sent,
                });
            }
            Pending::Finish {
                key,
                gen,
                evaluator,
                how,
                back,
                own,
            } => {
                let Some(RedisReply::Finished {
                    stored,
                    current,
                    dropped,
                }) = reply
                else {
                    if let Some(back) = back {
                        self.keep_back(back, out);
                    }
                    if let (Finish::Confirm, Some(gen)) = (how, gen) {
                        self.events.push_back(ClusterEvent::Verdict {
                            key,
                            gen,
                            stored: None,
                        });
                    }
                    return;
                };
                if dropped {
                    // Redis knows of an invalidation of the key after this
                    // was computed: nobody keeps it, this broker included.
                    self.events
                        .push_back(ClusterEvent::Dropped(Target::Key(key)));
                }
                let instead = current
                    .filter(|_| !stored)
                    .and_then(|text| self.parse(&text, key.ns()))
                    .filter(|read| read.evaluator == evaluator);
                match (how, gen) {
                    (Finish::Confirm, Some(gen)) => {
                        let stored = instead.map(|read| read.outcome);
                        self.events
                            .push_back(ClusterEvent::Verdict { key, gen, stored });
                    }
                    (Finish::Deliver, _) => {
                        // Stored: this broker keeps its own. Another
                        // broker's result was stored first: this broker's
                        // cache takes that one instead.
                        if let (true, Some(outcome)) = (stored, own) {
                            let at_ms = self.unix_ms(now);
                            self.events.push_back(ClusterEvent::Replace {
                                key,
                                evaluator,
                                outcome,
                                at_ms,
                            });
                        } else if let Some(read) = instead {
                            self.events.push_back(ClusterEvent::Replace {
                                key,
                                evaluator,
                                outcome: read.outcome,
                                at_ms: read.at_ms,
                            });
                        }
                    }
                    _ => {}
                }
            }
            Pending::Renew { claims } => {
                self.renewing = false;
                let Some(RedisReply::Renewed(renewed)) = reply else {
                    return;
                };
                for ((key, value), ok) in claims.into_iter().zip(renewed) {
                    // The lease ran out and another broker may hold it now.
                    if !ok && self.held.get(&key).is_some_and(|h| h.value == value) {
                        self.held.remove(&key);
                    }
                }
            }
            Pending::Sync { sent } => {
                if self.syncing == Some(sent) {
                    self.syncing = None;
                }
                let Some(RedisReply::Epochs { hashes, boot }) = reply else {
                    return;
                };
                self.epochs_read(hashes);
                if self.boot.as_deref() != Some(boot.as_str()) {
                    if self.boot.is_some() {
                        tracing::warn!(
                            "cluster: Redis lost its data; what began before is not stored"
                        );
                        self.redis_resets += 1;
                    }
                    self.boot = Some(boot.into());
                }
                if sent < self.sync_after || self.link != Link::Up {
                    // Sent before the last connect or subscription: another follows.
                    return self.sync(now, out);
                }
                let first = !self.synced;
                self.synced = true;
                self.synced_at = Some(self.synced_at.map_or(sent, |at| at.max(sent)));
                self.unpark(now, out);
                if first || std::mem::take(&mut self.recheck_due) {
                    self.write_back(out);
                    self.look_again(now, out);
                }
            }
            Pending::Raise(invalidation) => {
                let (Some(RedisReply::Raised(epoch)), Target::Fn(ns, evaluator)) =
                    (reply, invalidation.target)
                else {
                    return self.answer(invalidation, false);
                };
                self.raise(ns, evaluator, epoch);
                let message = serde_json::json!({
                    "fn": &*self.fns[evaluator],
                    "epoch": epoch,
                    "ns": &*ns.name(),
                })
                .to_string();
                self.announce(invalidation, message, None, out);
            }
            Pending::Delete(invalidation, names, before_ms) => {
                if reply.is_none() {
                    return self.answer(invalidation, false);
                }
                // A lease on, every broker has heard it or serves nothing.
                let again = Some((names, before_ms));
                self.announced
                    .push((now + self.config.lease, invalidation, again));
            }
            Pending::Announce(invalidation, again) => {
                if reply.is_none() {
                    return self.answer(invalidation, false);
                }
                // A lease on, every broker has heard it or serves nothing.
                self.announced
                    .push((now + self.config.lease, invalidation, again));
            }
            Pending::DeleteAgain(invalidation) => {
                let ok = reply.is_some();
                self.answer(invalidation, ok);
            }
            Pending::Progress => {}
        }
    }

    /// Announces progress report `seq` of the evaluation of `key` under
    /// `claim` to the other brokers, while Redis is up.
    pub(crate) fn progress(
        &mut self,
        key: &Key,
        claim: &str,
        seq: u64,
        data: &str,
        out: &mut VecDeque<Effect>,
    ) {
        if self.link != Link::Up {
            return;
        }
        let message = format!(
            "{{\"progress\":\"{}\",\"ns\":{},\"claim\":{},\"seq\":{seq},\"data\":{data}}}",
            key.to_hex(),
            json_str(&key.ns().name()),
            json_str(claim),
        );
        let op = RedisOp::Publish {
            channel: self.channel(),
            message,
        };
        self.send(Pending::Progress, op, out);
    }

    fn announce(
        &mut self,
        invalidation: Invalidation,
        message: String,
        again: Option<Again>,
        out: &mut VecDeque<Effect>,
    ) {
        let op = RedisOp::Publish {
            channel: self.channel(),
            message,
        };
        self.send(Pending::Announce(invalidation, again), op, out);
    }

    /// Epochs read from Redis: every fn whose epoch rose is dropped here.
    fn epochs_read(&mut self, hashes: Vec<Vec<(String, u64)>>) {
        for (i, fields) in hashes.into_iter().enumerate() {
            for (field, epoch) in fields {
                let (ns, name) = if i == 0 {
                    (Some(Ns::SHARED), field.as_str())
                } else {
                    match field.split_once('/') {
                        Some((ns, name)) => (Ns::find(ns), name),
                        None => continue,
                    }
                };
                // A namespace this broker has not met holds nothing here.
                let Some(ns) = ns else { continue };
                let Some(evaluator) = self.fns.iter().position(|f| &**f == name) else {
                    continue;
                };
                if self.raise(ns, evaluator, epoch) {
                    self.events
                        .push_back(ClusterEvent::Dropped(Target::Fn(ns, evaluator)));
                }
            }
        }
    }

    /// A stored result read from Redis, if it is of its fn's current tag.
    fn parse(&self, text: &str, ns: Ns) -> Option<Read> {
        if text.len() > self.config.max_stored {
            return None;
        }
        let stored = serde_json::from_str::<Stored>(text).ok()?;
        Some(Read {
            evaluator: self.current(&stored, ns)?,
            outcome: stored.outcome()?,
            claim: stored.claim.map(Arc::from),
            at_ms: stored.at_ms,
            began_ms: stored.began_ms,
        })
    }

    /// A stored result read from Redis, whatever its tag.
    fn parse_any(&self, text: &str) -> Option<Read> {
        if text.len() > self.config.max_stored {
            return None;
        }
        let stored = serde_json::from_str::<Stored>(text).ok()?;
        let name = stored.fn_name?;
        Some(Read {
            evaluator: self.fns.iter().position(|f| &**f == name)?,
            outcome: stored.outcome()?,
            claim: stored.claim.map(Arc::from),
            at_ms: stored.at_ms,
            began_ms: stored.began_ms,
        })
    }

    /// The fn of a stored result or notice of namespace `ns`, if it is of
    /// that fn's current tag.
    fn current(&self, stored: &Stored, ns: Ns) -> Option<usize> {
        let name = stored.fn_name?;
        let evaluator = self.fns.iter().position(|f| &**f == name)?;
        (stored.tag? == self.tag(ns, evaluator)).then_some(evaluator)
    }

    /// What the completion channel's listener saw.
    pub fn pubsub(&mut self, event: PubsubEvent, now: Instant, out: &mut VecDeque<Effect>) {
        match event {
            PubsubEvent::Subscribed => {
                if !self.pubsub {
                    tracing::info!("cluster: subscribed to the completion channel");
                }
                self.pubsub = true;
                // Whatever was announced while unsubscribed is unknown
                // here: nothing cached before now is served again, and
                // nothing is read from Redis until the epochs are.
                out.push_back(Effect::ForgetCache);
                let until = now + self.config.lease;
                self.confirmed_until = Some(until);
                out.push_back(Effect::ConfirmCache(until));
                self.synced = false;
                self.sync_after = now;
                self.sync(now, out);
            }
            PubsubEvent::Pong { sent } => {
                let until = sent + self.config.lease;
                if self.confirmed_until.is_none_or(|u| u < until) {
                    self.confirmed_until = Some(until);
                }
                out.push_back(Effect::ConfirmCache(until));
            }
            PubsubEvent::Down => {
                if self.pubsub {
                    tracing::warn!("cluster: the completion channel's subscription is down; keys waited on are looked up every lease");
                    // Redis may have restarted: a PING finds out before a
                    // command of someone's is lost to a dead connection.
                    if self.link == Link::Up {
                        self.send(Pending::Ping, RedisOp::Ping, out);
                    }
                }
                self.pubsub = false;
            }
            PubsubEvent::Message(text) => self.message(&text, now),
        }
    }

    fn message(&mut self, text: &str, now: Instant) {
        if text.len() > self.config.max_stored {
            return;
        }
        let Ok(notice) = serde_json::from_str::<Stored>(text) else {
            return;
        };
        // A namespace this broker has not met: nobody here holds or waits
        // for anything in it.
        let Some(ns) = notice.namespace() else {
            return;
        };
        if let Some(key) = notice.drop.and_then(Key::parse) {
            let target = Target::Key(key.in_ns(ns));
            return self.events.push_back(ClusterEvent::Dropped(target));
        }
        if let Some(key) = notice.progress.and_then(Key::parse) {
            if let (Some(claim), Some(seq), Some(data)) = (notice.claim, notice.seq, notice.data) {
                self.events.push_back(ClusterEvent::Progress {
                    key: key.in_ns(ns),
                    claim: claim.into(),
                    seq,
                    data: data.get().into(),
                });
            }
            return;
        }
        if let Some(epoch) = notice.epoch {
            let evaluator = notice
                .fn_name
                .and_then(|name| self.fns.iter().position(|f| &**f == name));
            if let Some(evaluator) = evaluator {
                if self.raise(ns, evaluator, epoch) {
                    let target = Target::Fn(ns, evaluator);
                    self.events.push_back(ClusterEvent::Dropped(target));
                }
            }
            return;
        }
        let Some(key) = notice.key.and_then(Key::parse) else {
            return;
        };
        let key = key.in_ns(ns);
        let Some(evaluator) = notice
            .fn_name
            .and_then(|name| self.fns.iter().position(|f| &**f == name))
        else {
            return;
        };
        // Another version's, or from before an invalidation (or this broker
        // cannot tell now: the epochs not read since it subscribed, or not
        // knowing every invalidation answered by now): nobody keeps it, and
        // only the waiters of its own evaluation take it.
        let current = self.current(&notice, ns).is_some() && self.ready(now);
        if !current && notice.claim.is_none() {
            return;
        }
        let Some(outcome) = notice.outcome() else {
            if notice.stored && current {
                self.events.push_back(ClusterEvent::Stored { key });
            }
            return;
        };
        self.events.push_back(ClusterEvent::Done {
            key,
            evaluator,
            outcome,
            claim: notice.claim.map(Arc::from),
            at_ms: notice.at_ms,
            keep: notice.keep && current,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_millis(300);

    struct Rig {
        c: Coordinator,
        now: Instant,
        out: VecDeque<Effect>,
    }

    /// A coordinator for fns "f" and "g", its clock at Unix ms 1000.
    fn rig() -> Rig {
        let now = Instant::now();
        let config = ClusterConfig {
            node: "n".into(),
            run: "r".into(),
            prefix: "herd:".into(),
            lease: LEASE,
            result_ttl_s: 60,
            error_ttl_s: 0,
            notice_inline_bytes: 16,
            max_stored: 200,
            writeback_max: 2,
            progress_per_s: 10,
            versions: vec![String::new(), "2".into()],
        };
        let fns = vec![Arc::from("f"), Arc::from("g")];
        Rig {
            c: Coordinator::new(config, fns, now, 1_000),
            now,
            out: VecDeque::new(),
        }
    }

    impl Rig {
        /// The commands sent since the last look.
        fn sent(&mut self) -> Vec<(OpId, RedisOp)> {
            self.out
                .drain(..)
                .filter_map(|e| match e {
                    Effect::Redis { op, cmd } => Some((op, cmd)),
                    _ => None,
                })
                .collect()
        }

        fn events(&mut self) -> Vec<ClusterEvent> {
            std::iter::from_fn(|| self.c.take_event()).collect()
        }

        fn reply(&mut self, op: OpId, reply: Option<RedisReply>) {
            self.c.reply(op, reply, self.now, &mut self.out);
        }

        fn tick_at(&mut self, after: Duration) {
            self.now += after;
            self.c.tick(self.now, &mut self.out);
        }

        fn command(&mut self, cmd: ClusterCmd) {
            self.c.command(cmd, self.now, &mut self.out);
        }

        /// Redis answers the first probe and the first read of the epochs.
        fn up(&mut self) {
            self.tick_at(Duration::ZERO);
            let probe = self.sent();
            assert_eq!(probe.len(), 1, "{probe:?}");
            assert_eq!(probe[0].1, RedisOp::Ping);
            assert!(!self.c.status().up(), "up before Redis answered");
            self.reply(probe[0].0, Some(RedisReply::Pong));
            assert!(!self.c.status().up(), "up before the epochs were read");
            let sync = self.sent();
            assert!(matches!(sync[..], [(_, RedisOp::Sync { .. })]), "{sync:?}");
            self.reply(
                sync[0].0,
                Some(RedisReply::Epochs {
                    hashes: vec![vec![], vec![]],
                    boot: "b".into(),
                }),
            );
            assert!(self.c.status().up());
        }

        fn acquire(&mut self, key: Key, gen: Gen) {
            self.command(ClusterCmd::Acquire {
                key,
                gen,
                evaluator: 0,
                hold: LEASE * 3,
                max_age: None,
            });
        }
    }

    fn key() -> Key {
        Key::from_bytes([7; 16])
    }

    #[test]
    fn a_claim_names_its_broker() {
        assert_eq!(claim_node("b:7f3a:12"), "b");
        assert_eq!(claim_node("eu:west:1:7f3a:12"), "eu:west:1");
    }

    #[test]
    fn commands_wait_for_the_first_answer_from_redis() {
        let mut r = rig();
        r.acquire(key(), 1);
        assert!(r.sent().is_empty(), "an acquire before Redis was heard");
        assert_eq!(r.c.holding()[4], 2, "one key busy, one command parked");
        r.up();
        let sent = r.sent();
        assert!(
            matches!(&sent[..], [(_, RedisOp::Acquire { .. })]),
            "{sent:?}"
        );
        assert_eq!(r.c.holding()[4], 1, "its key busy");
        assert_eq!(r.c.holding()[5], 1, "one command in flight");
    }

    #[test]
    fn a_broker_redis_never_answered_serves_alone() {
        let mut r = rig();
        r.acquire(key(), 1);
        r.tick_at(Duration::ZERO);
        let probe = r.sent();
        r.reply(probe[0].0, None);
        assert_eq!(r.c.status().link, Link::Down);
        assert!(matches!(
            r.events()[..],
            [ClusterEvent::Local { gen: 1, .. }]
        ));
        // Away: answered at once, no command sent.
        r.acquire(Key::from_bytes([8; 16]), 2);
        assert!(r.sent().is_empty());
        assert!(matches!(
            r.events()[..],
            [ClusterEvent::Local { gen: 2, .. }]
        ));
    }

    #[test]
    fn redis_that_stops_answering_is_away_until_a_probe_answers() {
        let mut r = rig();
        r.up();
        r.acquire(key(), 1);
        let sent = r.sent();
        r.reply(sent[0].0, None);
        let status = r.c.status();
        assert_eq!((status.link, status.degraded), (Link::Down, 1));
        assert!(!status.up());
        r.events();
        r.acquire(Key::from_bytes([8; 16]), 2);
        assert!(r.sent().is_empty(), "a command to a Redis that is away");
        r.tick_at(LEASE / 3);
        let probe = r.sent();
        assert!(matches!(probe[..], [(_, RedisOp::Ping)]), "{probe:?}");
        r.reply(probe[0].0, Some(RedisReply::Pong));
        assert_eq!(r.c.status().link, Link::Up);
        assert_eq!(r.c.status().degraded, 1);
    }

    #[test]
    fn names_in_redis_are_as_documented() {
        let mut r = rig();
        r.up();
        let hex = key().to_hex();
        r.acquire(key(), 1);
        let team = Ns::intern("team", 16).unwrap();
        r.command(ClusterCmd::Acquire {
            key: Key::from_bytes([9; 16]).in_ns(team),
            gen: 2,
            evaluator: 1,
            hold: LEASE,
            max_age: None,
        });
        let sent = r.sent();
        let RedisOp::Acquire { result, claim, .. } = &sent[0].1 else {
            panic!("{sent:?}")
        };
        assert_eq!(result, &format!("herd:result:{{{hex}}}:0:"));
        assert_eq!(claim, &format!("herd:claim:{{{hex}}}:0:"));
        let RedisOp::Acquire { result, .. } = &sent[1].1 else {
            panic!("{sent:?}")
        };
        let other = Key::from_bytes([9; 16]).to_hex();
        assert_eq!(result, &format!("herd:team/result:{{{other}}}:0:2"));
        let invalidate = |target| ClusterCmd::Invalidate {
            target,
            session: 1,
            id: None,
        };
        r.command(invalidate(Target::Fn(Ns::SHARED, 0)));
        r.command(invalidate(Target::Fn(team, 1)));
        r.command(invalidate(Target::Key(key())));
        let sent = r.sent();
        let fields: Vec<(String, String)> = sent
            .iter()
            .filter_map(|(_, op)| match op {
                RedisOp::Raise { hash, field, .. } => Some((hash.clone(), field.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            fields,
            [
                ("herd:epochs".to_string(), "f".to_string()),
                ("herd:ns-epochs".to_string(), "team/g".to_string())
            ]
        );
        let Some(RedisOp::Drop {
            dropped,
            channel,
            notice,
            ..
        }) = sent
            .iter()
            .map(|(_, op)| op)
            .find(|op| matches!(op, RedisOp::Drop { .. }))
        else {
            panic!("{sent:?}")
        };
        assert_eq!(dropped, &format!("herd:dropped:{{{hex}}}"));
        assert_eq!(channel, "herd:done");
        assert!(notice.contains(&hex), "{notice}");
    }

    #[test]
    fn the_clock_of_stored_results_follows_the_broker_s() {
        let r = rig();
        assert_eq!(r.c.unix_ms(r.now), 1_000);
        assert_eq!(r.c.unix_ms(r.now + LEASE), 1_300);
        assert_eq!(r.c.instant_of(1_300), r.now + LEASE);
        assert_eq!(r.c.instant_of(1_000), r.now);
        if let Some(before) = r.now.checked_sub(Duration::from_millis(400)) {
            assert_eq!(r.c.instant_of(600), before);
        }
    }

    #[test]
    fn notices_say_what_they_carry() {
        let mut r = rig();
        r.up();
        let hex = key().to_hex();
        let notice = |body: &str| {
            format!("{{\"key\":\"{hex}\",\"at_ms\":5,\"fn\":\"f\",\"tag\":\"0:\",\"claim\":\"c\",{body}}}")
        };
        r.c.pubsub(
            PubsubEvent::Message(notice("\"output\":1")),
            r.now,
            &mut r.out,
        );
        r.c.pubsub(
            PubsubEvent::Message(notice("\"keep\":false,\"output\":2")),
            r.now,
            &mut r.out,
        );
        r.c.pubsub(
            PubsubEvent::Message(notice(
                "\"error\":{\"code\":\"eval_timeout\",\"message\":\"slow\"}",
            )),
            r.now,
            &mut r.out,
        );
        r.c.pubsub(
            PubsubEvent::Message(notice(
                "\"error\":{\"code\":\"eval_failed\",\"message\":\"boom\"}",
            )),
            r.now,
            &mut r.out,
        );
        let seen: Vec<(Result<Arc<str>, EvalError>, bool)> = r
            .events()
            .into_iter()
            .map(|e| match e {
                ClusterEvent::Done {
                    outcome,
                    keep,
                    claim,
                    ..
                } => {
                    assert_eq!(claim.as_deref(), Some("c"));
                    (outcome, keep)
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            seen,
            [
                (Ok(Arc::from("1")), true),
                (Ok(Arc::from("2")), false),
                (Err(EvalError::Timeout("slow".into())), true),
                (Err(EvalError::Failed("boom".into())), true),
            ]
        );
        // Too long to be one of ours: ignored.
        let long = notice(&format!("\"output\":\"{}\"", "x".repeat(200)));
        r.c.pubsub(PubsubEvent::Message(long), r.now, &mut r.out);
        assert!(r.events().is_empty());
    }

    #[test]
    fn an_epoch_read_again_drops_nothing_again() {
        let mut r = rig();
        r.up();
        let epochs = || RedisReply::Epochs {
            hashes: vec![vec![("f".into(), 2)], vec![]],
            boot: "b".into(),
        };
        r.tick_at(LEASE);
        let sync = r
            .sent()
            .into_iter()
            .find(|(_, op)| matches!(op, RedisOp::Sync { .. }));
        r.reply(sync.unwrap().0, Some(epochs()));
        assert!(matches!(
            r.events()[..],
            [ClusterEvent::Dropped(Target::Fn(Ns::SHARED, 0))]
        ));
        r.tick_at(LEASE);
        let sync = r
            .sent()
            .into_iter()
            .find(|(_, op)| matches!(op, RedisOp::Sync { .. }));
        let (op, RedisOp::Sync { hashes, .. }) = sync.unwrap() else {
            unreachable!()
        };
        // What this broker knows is written back.
        assert_eq!(hashes[0].1, [("f".to_string(), 2)]);
        r.reply(op, Some(epochs()));
        assert!(r.events().is_empty());
    }

    #[test]
    fn a_broker_subscribed_again_reads_nothing_before_the_epochs() {
        let mut r = rig();
        r.up();
        r.c.pubsub(PubsubEvent::Subscribed, r.now, &mut r.out);
        assert!(!r.c.status().up());
        let sync = r.sent();
        assert!(matches!(sync[..], [(_, RedisOp::Sync { .. })]), "{sync:?}");
        r.acquire(key(), 1);
        r.command(ClusterCmd::Lookup {
            key: Key::from_bytes([8; 16]),
        });
        assert!(r.sent().is_empty(), "a read before the epochs were");
        r.reply(
            sync[0].0,
            Some(RedisReply::Epochs {
                hashes: vec![vec![], vec![]],
                boot: "b".into(),
            }),
        );
        let sent = r.sent();
        assert!(
            matches!(
                &sent[..],
                [(_, RedisOp::Acquire { .. }), (_, RedisOp::Read { .. })]
            ),
            "{sent:?}"
        );
    }

    #[test]
    fn a_key_subscribed_to_is_looked_up_at_once_and_every_lease() {
        let mut r = rig();
        r.up();
        r.command(ClusterCmd::Lookup { key: key() });
        let sent = r.sent();
        assert!(matches!(sent[..], [(_, RedisOp::Read { .. })]), "{sent:?}");
        r.reply(sent[0].0, Some(RedisReply::Values(vec![None, None])));
        // A lease on, once the epochs are read again, it is read again.
        r.tick_at(LEASE);
        let sent = r.sent();
        let sync = sent
            .iter()
            .find(|(_, op)| matches!(op, RedisOp::Sync { .. }))
            .expect("a read of the epochs");
        r.reply(
            sync.0,
            Some(RedisReply::Epochs {
                hashes: vec![vec![], vec![]],
                boot: "b".into(),
            }),
        );
        assert!(r
            .sent()
            .iter()
            .any(|(_, op)| matches!(op, RedisOp::Read { .. })));
        r.command(ClusterCmd::Unlook { key: key() });
        r.tick_at(LEASE);
        let sent = r.sent();
        if let Some((op, _)) = sent
            .iter()
            .find(|(_, op)| matches!(op, RedisOp::Sync { .. }))
        {
            r.reply(
                *op,
                Some(RedisReply::Epochs {
                    hashes: vec![vec![], vec![]],
                    boot: "b".into(),
                }),
            );
        }
        assert!(!r
            .sent()
            .iter()
            .chain(sent.iter())
            .any(|(_, op)| matches!(op, RedisOp::Read { .. })));
    }

    #[test]
    fn a_job_that_stops_waiting_is_not_looked_at_again() {
        let mut r = rig();
        r.up();
        r.acquire(key(), 1);
        let sent = r.sent();
        r.reply(
            sent[0].0,
            Some(RedisReply::Acquired(Acquired::Held("o:r:1".into()))),
        );
        assert!(matches!(
            r.events()[..],
            [ClusterEvent::Waiting { gen: 1, .. }]
        ));
        r.command(ClusterCmd::Forget { key: key(), gen: 1 });
        assert_eq!(r.c.holding()[2], 0, "still waiting");
        r.tick_at(LEASE);
        let sent = r.sent();
        if let Some((op, _)) = sent
            .iter()
            .find(|(_, op)| matches!(op, RedisOp::Sync { .. }))
        {
            r.reply(
                *op,
                Some(RedisReply::Epochs {
                    hashes: vec![vec![], vec![]],
                    boot: "b".into(),
                }),
            );
        }
        assert!(!r
            .sent()
            .iter()
            .chain(sent.iter())
            .any(|(_, op)| matches!(op, RedisOp::Acquire { .. })));
    }

    #[test]
    fn a_drop_heard_takes_the_key_out_of_what_waits_to_be_written_back() {
        let mut r = rig();
        r.tick_at(Duration::ZERO);
        let probe = r.sent();
        r.reply(probe[0].0, None);
        let late = |key| ClusterCmd::Finished {
            key,
            gen: None,
            evaluator: 0,
            outcome: Ok(Arc::from("1")),
            how: Finish::Late,
        };
        r.command(late(key()));
        r.command(late(Key::from_bytes([8; 16])));
        assert_eq!(r.c.status().writeback, 2);
        r.c.dropped(Target::Key(key()));
        assert_eq!(r.c.status().writeback, 1);
        r.c.dropped(Target::Fn(Ns::SHARED, 0));
        assert_eq!(r.c.status().writeback, 0);
    }

    #[test]
    fn a_job_begun_before_its_fn_was_invalidated_is_not_current() {
        let mut r = rig();
        r.up();
        r.acquire(key(), 1);
        let sent = r.sent();
        r.reply(sent[0].0, Some(RedisReply::Acquired(Acquired::Claimed)));
        assert!(r.c.began_current(&key(), 1, 0));
        r.c.pubsub(
            PubsubEvent::Message("{\"fn\":\"f\",\"epoch\":1,\"ns\":\"\"}".into()),
            r.now,
            &mut r.out,
        );
        assert!(!r.c.began_current(&key(), 1, 0));
    }

    #[test]
    fn a_large_output_stays_out_of_its_notice() {
        let mut r = rig();
        r.up();
        let finish = |r: &mut Rig, output: &str| {
            r.command(ClusterCmd::Finished {
                key: key(),
                gen: None,
                evaluator: 0,
                outcome: Ok(Arc::from(output)),
                how: Finish::Late,
            });
            let sent = r.sent();
            let Some((op, RedisOp::Finish { notice, .. })) = sent.into_iter().next() else {
                panic!()
            };
            r.reply(
                op,
                Some(RedisReply::Finished {
                    stored: true,
                    current: None,
                    dropped: false,
                }),
            );
            notice
        };
        let inline = "x".repeat(16);
        assert!(finish(&mut r, &inline).contains(&inline));
        let large = finish(&mut r, &"y".repeat(17));
        let hex = key().to_hex();
        assert_eq!(
            large,
            format!("{{\"key\":\"{hex}\",\"at_ms\":1000,\"ok\":true,\"began_ms\":0,\"fn\":\"f\",\"tag\":\"0:\",\"stored\":true}}")
        );
        // Heard, it sends a broker whose subscribers wait for the key to
        // read it.
        r.c.pubsub(PubsubEvent::Message(large), r.now, &mut r.out);
        let events = r.events();
        assert!(
            matches!(&events[..], [ClusterEvent::Stored { .. }]),
            "{events:?}"
        );
    }

    /// A job claimed here: the claim taken, its `Finish` asked for.
    fn claimed(r: &mut Rig, gen: Gen) {
        r.acquire(key(), gen);
        let sent = r.sent();
        r.reply(sent[0].0, Some(RedisReply::Acquired(Acquired::Claimed)));
        r.events();
    }

    fn stored(r: &mut Rig, op: OpId) {
        r.reply(
            op,
            Some(RedisReply::Finished {
                stored: true,
                current: None,
                dropped: false,
            }),
        );
    }

    /// Answers the read of the epochs among `sent`, with boot marker `boot`.
    fn epochs_read(r: &mut Rig, sent: &[(OpId, RedisOp)], boot: &str) {
        let (op, _) = sent
            .iter()
            .find(|(_, op)| matches!(op, RedisOp::Sync { .. }))
            .expect("a read of the epochs");
        r.reply(
            *op,
            Some(RedisReply::Epochs {
                hashes: vec![vec![], vec![]],
                boot: boot.into(),
            }),
        );
    }

    fn finish_op(
        r: &mut Rig,
        gen: Option<Gen>,
        outcome: Result<Arc<str>, EvalError>,
        how: Finish,
    ) -> (OpId, RedisOp) {
        r.command(ClusterCmd::Finished {
            key: key(),
            gen,
            evaluator: 0,
            outcome,
            how,
        });
        let sent = r.sent();
        sent.into_iter()
            .find(|(_, op)| matches!(op, RedisOp::Finish { .. }))
            .expect("a Finish")
    }

    #[test]
    fn an_outcome_carries_redis_s_boot_marker_from_when_its_job_began() {
        let mut r = rig();
        r.up();
        claimed(&mut r, 1);
        // Redis lost its data meanwhile: the next read of the epochs says so.
        r.tick_at(LEASE);
        let sent = r.sent();
        let (
            sync,
            RedisOp::Sync {
                boot, candidate, ..
            },
        ) = sent
            .into_iter()
            .find(|(_, op)| matches!(op, RedisOp::Sync { .. }))
            .expect("a read of the epochs every lease")
        else {
            unreachable!()
        };
        assert_eq!(boot, "herd:boot");
        assert!(candidate.starts_with("n:r:"), "{candidate}");
        r.reply(
            sync,
            Some(RedisReply::Epochs {
                hashes: vec![vec![], vec![]],
                boot: "c".into(),
            }),
        );
        assert_eq!(r.c.status().redis_resets, 1);
        let (op, cmd) = finish_op(&mut r, Some(1), Ok(Arc::from("1")), Finish::Deliver);
        let RedisOp::Finish {
            boot, began_under, ..
        } = cmd
        else {
            unreachable!()
        };
        assert_eq!((boot.as_str(), began_under.as_str()), ("herd:boot", "b"));
        stored(&mut r, op);
        // A job begun now is under the new one.
        claimed(&mut r, 2);
        let (_, op) = finish_op(&mut r, Some(2), Ok(Arc::from("2")), Finish::Deliver);
        let RedisOp::Finish { began_under, .. } = op else {
            unreachable!()
        };
        assert_eq!(began_under, "c");
    }

    #[test]
    fn what_a_finish_keeps_shares_and_takes_back() {
        let mut r = rig();
        r.up();
        // A failure is not stored when failures are not kept.
        claimed(&mut r, 1);
        let failed = Err(EvalError::Failed("boom".into()));
        let (op, cmd) = finish_op(&mut r, Some(1), failed, Finish::Deliver);
        let RedisOp::Finish { keep, .. } = cmd else {
            unreachable!()
        };
        assert!(!keep);
        stored(&mut r, op);
        r.events();
        // A success under a claim: kept, and shared if another stands.
        claimed(&mut r, 2);
        let (op, cmd) = finish_op(&mut r, Some(2), Ok(Arc::from("2")), Finish::Deliver);
        let RedisOp::Finish { keep, shared, .. } = cmd else {
            unreachable!()
        };
        assert!(keep);
        assert!(shared.contains("\"keep\":false"), "{shared}");
        // Stored: this broker keeps its own.
        stored(&mut r, op);
        let events = r.events();
        assert!(
            matches!(&events[..], [ClusterEvent::Replace { outcome: Ok(o), .. }] if &**o == "2"),
            "{events:?}"
        );
        // A verdict asked for is a verdict, not a copy kept.
        claimed(&mut r, 3);
        let (op, _) = finish_op(&mut r, Some(3), Ok(Arc::from("3")), Finish::Confirm);
        stored(&mut r, op);
        let events = r.events();
        assert!(
            matches!(&events[..], [ClusterEvent::Verdict { stored: None, .. }]),
            "{events:?}"
        );
    }

    #[test]
    fn claims_are_renewed_while_their_job_may_live() {
        let mut r = rig();
        r.up();
        claimed(&mut r, 1);
        assert_eq!(r.c.status().claims, 1);
        r.tick_at(LEASE / 3);
        let renewed: Vec<RedisOp> = r
            .sent()
            .into_iter()
            .map(|(_, op)| op)
            .filter(|op| matches!(op, RedisOp::Renew { .. }))
            .collect();
        assert!(
            matches!(&renewed[..], [RedisOp::Renew { claims, .. }] if claims.len() == 1),
            "{renewed:?}"
        );
        // Past its hold (three leases here), the claim is let go.
        r.tick_at(LEASE * 3);
        r.tick_at(LEASE / 3);
        assert_eq!(r.c.status().claims, 0);
        let renewed = r
            .sent()
            .into_iter()
            .filter(|(_, op)| matches!(op, RedisOp::Renew { .. }))
            .count();
        assert_eq!(renewed, 0);
    }

    #[test]
    fn results_found_count_as_second_level_hits() {
        let mut r = rig();
        r.up();
        let stored = |output: &str| {
            format!(
                "{{\"at_ms\":1000,\"ok\":true,\"began_ms\":900,\"fn\":\"f\",\"tag\":\"0:\",\"output\":{output}}}"
            )
        };
        r.acquire(key(), 1);
        let sent = r.sent();
        r.reply(
            sent[0].0,
            Some(RedisReply::Acquired(Acquired::Found(stored("1")))),
        );
        assert_eq!(r.c.status().l2_hits, 1);
        r.command(ClusterCmd::Lookup { key: key() });
        let sent = r.sent();
        r.reply(
            sent[0].0,
            Some(RedisReply::Values(vec![None, Some(stored("2")), None])),
        );
        assert_eq!(r.c.status().l2_hits, 2);
        // The longest value read is read; a longer one is not.
        let at_limit = stored(&format!("\"{}\"", "x".repeat(200 - stored("\"\"").len())));
        assert_eq!(at_limit.len(), 200);
        r.acquire(key(), 2);
        let sent = r.sent();
        r.reply(
            sent[0].0,
            Some(RedisReply::Acquired(Acquired::Found(at_limit.clone()))),
        );
        assert_eq!(r.c.status().l2_hits, 3);
        r.acquire(key(), 3);
        let sent = r.sent();
        let longer = at_limit.replace("xx", "xxx");
        r.reply(
            sent[0].0,
            Some(RedisReply::Acquired(Acquired::Found(longer))),
        );
        assert_eq!(r.c.status().l2_hits, 3);
    }

    #[test]
    fn a_result_begun_before_the_key_s_drop_marker_is_passed_over() {
        let mut r = rig();
        r.up();
        let stored = |began: u64| {
            format!(
                "{{\"at_ms\":1000,\"ok\":true,\"began_ms\":{began},\"fn\":\"f\",\"tag\":\"0:\",\"output\":1}}"
            )
        };
        for (began, found) in [(900, false), (950, false), (951, true)] {
            r.command(ClusterCmd::Lookup { key: key() });
            let sent = r.sent();
            let (op, RedisOp::Read { names }) = &sent[0] else {
                panic!("{sent:?}")
            };
            assert_eq!(names[0], format!("herd:dropped:{{{}}}", key().to_hex()));
            r.reply(
                *op,
                Some(RedisReply::Values(vec![
                    Some("950".into()),
                    Some(stored(began)),
                    None,
                ])),
            );
            let events = r.events();
            assert_eq!(
                events
                    .iter()
                    .any(|e| matches!(e, ClusterEvent::Found { .. })),
                found,
                "began {began}: {events:?}"
            );
        }
    }

    #[test]
    fn a_takeover_is_counted() {
        let mut r = rig();
        r.up();
        let op = waiting_looked_again(&mut r);
        r.reply(op, Some(RedisReply::Acquired(Acquired::Claimed)));
        assert_eq!(r.c.status().takeovers, 1);
        let events = r.events();
        assert!(
            matches!(&events[..], [ClusterEvent::Claimed { takeover: true, .. }]),
            "{events:?}"
        );
    }

    #[test]
    fn a_confirmed_subscription_keeps_reads_going_after_the_epochs_age() {
        let mut r = rig();
        r.up();
        let t0 = r.now;
        r.c.pubsub(PubsubEvent::Subscribed, r.now, &mut r.out);
        let confirms = |r: &Rig, until: Instant| {
            r.out
                .iter()
                .any(|e| matches!(e, Effect::ConfirmCache(u) if *u == until))
        };
        assert!(confirms(&r, t0 + LEASE), "{:?}", r.out);
        let sent = r.sent();
        epochs_read(&mut r, &sent, "b");
        r.c.pubsub(PubsubEvent::Pong { sent: t0 }, r.now, &mut r.out);
        let later = t0 + LEASE / 2;
        r.c.pubsub(PubsubEvent::Pong { sent: later }, r.now, &mut r.out);
        assert!(confirms(&r, later + LEASE), "{:?}", r.out);
        r.sent();
        // The epochs were read a lease ago and more; the subscription
        // answered a ping sent within one: reads go on.
        r.now = t0 + LEASE + LEASE / 4;
        r.acquire(key(), 1);
        let sent = r.sent();
        assert!(
            matches!(&sent[..], [(_, RedisOp::Acquire { .. }), ..]),
            "{sent:?}"
        );
    }

    #[test]
    fn a_subscription_that_drops_pings_redis() {
        let mut r = rig();
        r.up();
        r.c.pubsub(PubsubEvent::Subscribed, r.now, &mut r.out);
        r.sent();
        r.c.pubsub(PubsubEvent::Down, r.now, &mut r.out);
        let sent = r.sent();
        assert!(sent.iter().any(|(_, op)| *op == RedisOp::Ping), "{sent:?}");
    }

    #[test]
    fn a_late_outcome_leaves_the_claim_of_the_job_after_it_alone() {
        let mut r = rig();
        r.up();
        claimed(&mut r, 2);
        let (op, _) = finish_op(&mut r, Some(1), Ok(Arc::from("1")), Finish::Late);
        stored(&mut r, op);
        assert_eq!(r.c.status().claims, 1);
    }

    #[test]
    fn a_look_sent_before_a_new_subscription_finds_nothing() {
        let mut r = rig();
        r.up();
        r.command(ClusterCmd::Lookup { key: key() });
        let sent = r.sent();
        r.now += Duration::from_millis(1);
        r.c.pubsub(PubsubEvent::Subscribed, r.now, &mut r.out);
        let stored = "{\"at_ms\":1000,\"ok\":true,\"began_ms\":900,\"fn\":\"f\",\"tag\":\"0:\",\"output\":1}";
        r.reply(
            sent[0].0,
            Some(RedisReply::Values(vec![None, Some(stored.into()), None])),
        );
        let events = r.events();
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, ClusterEvent::Found { .. })),
            "{events:?}"
        );
    }

    #[test]
    fn a_written_back_result_s_notice_carries_it_up_to_the_inline_limit() {
        for (len, inline) in [(16, true), (17, false)] {
            let mut r = rig();
            r.up();
            claimed(&mut r, 1);
            // Redis stops answering: the outcome waits to be written back.
            r.command(ClusterCmd::Lookup {
                key: Key::from_bytes([3; 16]),
            });
            let sent = r.sent();
            r.reply(sent[0].0, None);
            assert!(!r.c.status().up());
            let output = "z".repeat(len);
            r.command(ClusterCmd::Finished {
                key: key(),
                gen: Some(1),
                evaluator: 0,
                outcome: Ok(Arc::from(output.as_str())),
                how: Finish::Deliver,
            });
            assert_eq!(r.c.status().writeback, 1);
            // It answers again: the probe, the epochs, then the write-back.
            r.tick_at(LEASE);
            let sent = r.sent();
            let (probe, _) = sent
                .iter()
                .find(|(_, op)| *op == RedisOp::Ping)
                .expect("a probe");
            r.reply(*probe, Some(RedisReply::Pong));
            let sent = r.sent();
            epochs_read(&mut r, &sent, "b");
            let sent = r.sent();
            let Some((_, RedisOp::Finish { notice, token, .. })) = sent
                .into_iter()
                .find(|(_, op)| matches!(op, RedisOp::Finish { .. }))
            else {
                panic!("no write-back")
            };
            assert_eq!(notice.contains(&output), inline, "{notice}");
            assert!(token.starts_with("n:r:"), "{token}");
        }
    }

    fn stored_under(tag: &str, claim: &str) -> String {
        format!(
            "{{\"at_ms\":1000,\"ok\":true,\"began_ms\":900,\"fn\":\"f\",\"tag\":\"{tag}\",\"claim\":\"{claim}\",\"output\":1}}"
        )
    }

    #[test]
    fn a_result_found_before_a_new_subscription_is_asked_for_again() {
        let mut r = rig();
        r.up();
        r.acquire(key(), 1);
        let sent = r.sent();
        r.now += Duration::from_millis(1);
        r.c.pubsub(PubsubEvent::Subscribed, r.now, &mut r.out);
        let sync = r.sent();
        r.reply(
            sent[0].0,
            Some(RedisReply::Acquired(Acquired::Found(stored_under(
                "0:", "m:x:1",
            )))),
        );
        assert!(r.events().is_empty());
        // Asked again once the epochs are read.
        epochs_read(&mut r, &sync, "b");
        let sent = r.sent();
        assert!(
            sent.iter()
                .any(|(_, op)| matches!(op, RedisOp::Acquire { .. })),
            "{sent:?}"
        );
    }

    #[test]
    fn a_result_of_another_tag_answers_only_a_wait_on_its_claim() {
        let mut r = rig();
        r.up();
        r.acquire(key(), 1);
        let sent = r.sent();
        r.reply(
            sent[0].0,
            Some(RedisReply::Acquired(Acquired::Found(stored_under(
                "9:", "m:x:1",
            )))),
        );
        let events = r.events();
        assert!(
            matches!(&events[..], [ClusterEvent::Local { .. }]),
            "{events:?}"
        );
    }

    #[test]
    fn a_wait_looked_at_again_while_its_claim_holds_goes_on() {
        let mut r = rig();
        r.up();
        let op = waiting_looked_again(&mut r);
        r.reply(
            op,
            Some(RedisReply::Acquired(Acquired::Held("m:x:1".into()))),
        );
        assert!(r.events().is_empty());
    }

    #[test]
    fn a_claim_found_lost_at_renewal_is_let_go() {
        let mut r = rig();
        r.up();
        claimed(&mut r, 1);
        r.tick_at(LEASE / 3);
        let sent = r.sent();
        let (op, _) = sent
            .iter()
            .find(|(_, op)| matches!(op, RedisOp::Renew { .. }))
            .expect("renewed");
        r.reply(*op, Some(RedisReply::Renewed(vec![false])));
        assert_eq!(r.c.status().claims, 0);
    }

    #[test]
    fn epochs_read_before_a_new_subscription_do_not_count() {
        let mut r = rig();
        r.up();
        r.tick_at(LEASE);
        let stale = r.sent();
        r.now += Duration::from_millis(1);
        r.c.pubsub(PubsubEvent::Subscribed, r.now, &mut r.out);
        r.sent();
        epochs_read(&mut r, &stale, "b");
        r.acquire(key(), 1);
        let sent = r.sent();
        assert!(
            !sent
                .iter()
                .any(|(_, op)| matches!(op, RedisOp::Acquire { .. })),
            "{sent:?}"
        );
    }

    /// `make(filler)` grown by its filler to exactly `len` bytes.
    fn sized(len: usize, make: impl Fn(&str) -> String) -> String {
        let text = make(&"x".repeat(len - make("").len()));
        assert_eq!(text.len(), len);
        text
    }

    fn acquires(sent: &[(OpId, RedisOp)]) -> Vec<OpId> {
        sent.iter()
            .filter(|(_, op)| matches!(op, RedisOp::Acquire { .. }))
            .map(|(op, _)| *op)
            .collect()
    }

    #[test]
    fn results_are_read_only_within_a_lease_of_the_epochs_read() {
        let mut r = rig();
        r.up();
        r.now += LEASE - Duration::from_millis(1);
        r.acquire(key(), 1);
        assert_eq!(acquires(&r.sent()).len(), 1);
        // A lease on, and the epochs not read again: parked until they are.
        r.now += Duration::from_millis(1);
        r.acquire(Key::from_bytes([8; 16]), 2);
        let sent = r.sent();
        assert!(acquires(&sent).is_empty(), "{sent:?}");
        epochs_read(&mut r, &sent, "b");
        assert_eq!(acquires(&r.sent()).len(), 1);
        // A ping answered on the subscription confirms a lease from when
        // it was sent.
        let epochs_at = r.now;
        r.c.pubsub(
            PubsubEvent::Pong {
                sent: epochs_at + LEASE,
            },
            r.now,
            &mut r.out,
        );
        r.now = epochs_at + LEASE * 2 - Duration::from_millis(1);
        r.sent();
        r.acquire(Key::from_bytes([9; 16]), 3);
        assert_eq!(acquires(&r.sent()).len(), 1);
        r.now += Duration::from_millis(1);
        r.acquire(Key::from_bytes([10; 16]), 4);
        assert!(acquires(&r.sent()).is_empty());
    }

    /// A wait on claim `m:x:1`, looked at again a lease on: the look's
    /// command.
    fn waiting_looked_again(r: &mut Rig) -> OpId {
        r.acquire(key(), 1);
        let sent = r.sent();
        r.reply(
            sent[0].0,
            Some(RedisReply::Acquired(Acquired::Held("m:x:1".into()))),
        );
        r.events();
        r.tick_at(LEASE);
        let sent = r.sent();
        epochs_read(r, &sent, "b");
        let looks: Vec<(OpId, RedisOp)> = r
            .sent()
            .into_iter()
            .filter(|(_, op)| matches!(op, RedisOp::Acquire { .. }))
            .collect();
        match &looks[..] {
            [(op, RedisOp::Acquire { wait_for, .. })] if wait_for == "m:x:1" => *op,
            other => panic!("the key waited on is not looked at again: {other:?}"),
        }
    }

    #[test]
    fn a_wait_redis_left_runs_here_once() {
        let mut r = rig();
        r.up();
        let look = waiting_looked_again(&mut r);
        r.reply(look, None);
        let events = r.events();
        assert!(
            matches!(&events[..], [ClusterEvent::Local { gen: 1, .. }]),
            "{events:?}"
        );
        r.tick_at(LEASE);
        r.sent();
        let events = r.events();
        assert!(events.is_empty(), "{events:?}");
    }

    #[test]
    fn a_wait_takes_a_result_of_another_tag_only_from_its_own_claim() {
        let mut r = rig();
        r.up();
        let look = waiting_looked_again(&mut r);
        let found = |text: String| Some(RedisReply::Acquired(Acquired::Found(text)));
        // Another evaluation's: the wait goes on.
        r.reply(look, found(stored_under("9:", "m:y:2")));
        assert!(r.events().is_empty());
        // Its own claim's, but longer than any result of ours: the same.
        let own = |len| {
            sized(len, |x| {
                format!(
                    "{{\"at_ms\":1000,\"ok\":true,\"began_ms\":900,\"fn\":\"f\",\"tag\":\"9:\",\"claim\":\"m:x:1\",\"output\":\"{x}\"}}"
                )
            })
        };
        r.tick_at(LEASE);
        let sent = r.sent();
        epochs_read(&mut r, &sent, "b");
        let look = acquires(&r.sent())[0];
        r.reply(look, found(own(201)));
        assert!(r.events().is_empty());
        // At the bound: taken, not kept.
        r.tick_at(LEASE);
        let sent = r.sent();
        epochs_read(&mut r, &sent, "b");
        let look = acquires(&r.sent())[0];
        r.reply(look, found(own(200)));
        let events = r.events();
        assert!(
            matches!(
                &events[..],
                [ClusterEvent::Found {
                    evaluator: 0,
                    keep: false,
                    gen: Some(1),
                    ..
                }]
            ),
            "{events:?}"
        );
    }

    #[test]
    fn a_result_written_back_is_kept_here_only_if_this_broker_delivered_it() {
        let mut r = rig();
        r.tick_at(Duration::ZERO);
        let probe = r.sent();
        r.reply(probe[0].0, None);
        let finished = |key, output: &str, how| ClusterCmd::Finished {
            key,
            gen: None,
            evaluator: 0,
            outcome: Ok(Arc::from(output)),
            how,
        };
        let late = Key::from_bytes([8; 16]);
        r.command(finished(key(), "1", Finish::Deliver));
        r.command(finished(late, "2", Finish::Late));
        r.tick_at(LEASE / 3);
        let probe = r.sent();
        r.reply(probe[0].0, Some(RedisReply::Pong));
        let sent = r.sent();
        epochs_read(&mut r, &sent, "b");
        r.tick_at(LEASE);
        let sent = r.sent();
        let finishes: Vec<OpId> = sent
            .iter()
            .filter(|(_, op)| matches!(op, RedisOp::Finish { .. }))
            .map(|(op, _)| *op)
            .collect();
        assert_eq!(finishes.len(), 2, "{sent:?}");
        for op in finishes {
            stored(&mut r, op);
        }
        let events = r.events();
        assert!(
            matches!(&events[..], [ClusterEvent::Replace { key: k, outcome: Ok(o), .. }] if *k == key() && &**o == "1"),
            "{events:?}"
        );
    }

    #[test]
    fn failures_are_stored_when_failures_are_kept() {
        let mut r = rig();
        r.c.config.error_ttl_s = 5;
        r.up();
        claimed(&mut r, 1);
        let failed = Err(EvalError::Failed("boom".into()));
        let (_, cmd) = finish_op(&mut r, Some(1), failed, Finish::Deliver);
        let RedisOp::Finish { keep, ttl_s, .. } = cmd else {
            unreachable!()
        };
        assert!(keep);
        assert_eq!(ttl_s, 5);
    }

    #[test]
    fn an_invalidation_due_while_redis_is_away_is_not_confirmed() {
        let mut r = rig();
        r.up();
        r.command(ClusterCmd::Invalidate {
            target: Target::Key(key()),
            session: 1,
            id: None,
        });
        let sent = r.sent();
        r.reply(sent[0].0, Some(RedisReply::Done));
        assert!(r.events().is_empty());
        // Redis goes away before the lease is up.
        r.acquire(Key::from_bytes([8; 16]), 2);
        let sent = r.sent();
        r.reply(sent[0].0, None);
        r.events();
        r.tick_at(LEASE);
        let sent = r.sent();
        assert!(
            !sent
                .iter()
                .any(|(_, op)| matches!(op, RedisOp::Drop { .. })),
            "{sent:?}"
        );
        let events = r.events();
        assert!(
            matches!(&events[..], [ClusterEvent::Invalidated { ok: false, .. }]),
            "{events:?}"
        );
    }

    #[test]
    fn a_claim_is_let_go_at_its_job_s_deadline_and_renewed_one_at_a_time() {
        let mut r = rig();
        r.up();
        claimed(&mut r, 1);
        r.tick_at(LEASE / 3);
        let renews = |sent: Vec<(OpId, RedisOp)>| -> Vec<OpId> {
            sent.into_iter()
                .filter(|(_, op)| matches!(op, RedisOp::Renew { .. }))
                .map(|(op, _)| op)
                .collect()
        };
        let first = renews(r.sent());
        assert_eq!(first.len(), 1);
        // Not again while one is in flight.
        r.tick_at(LEASE / 3);
        assert!(renews(r.sent()).is_empty());
        r.reply(first[0], Some(RedisReply::Renewed(vec![true])));
        assert_eq!(r.c.status().claims, 1);
        // Its hold is three leases from the claim.
        r.tick_at(LEASE * 3 - LEASE / 3 * 2);
        assert_eq!(r.c.status().claims, 0);
    }

    #[test]
    fn a_notice_is_kept_when_current_and_taken_by_its_fn() {
        let mut r = rig();
        r.up();
        let hex = key().to_hex();
        let notice = |f: &str, tag: &str, rest: &str| {
            format!("{{\"key\":\"{hex}\",\"at_ms\":5,\"fn\":\"{f}\",\"tag\":\"{tag}\"{rest}}}")
        };
        let mut heard = |text: String| {
            r.c.pubsub(PubsubEvent::Message(text), r.now, &mut r.out);
            std::iter::from_fn(|| r.c.take_event()).collect::<Vec<_>>()
        };
        // Written back without a claim, current: kept, and g's.
        let events = heard(notice("g", "0:2", ",\"output\":1"));
        assert!(
            matches!(
                &events[..],
                [ClusterEvent::Done {
                    evaluator: 1,
                    keep: true,
                    claim: None,
                    ..
                }]
            ),
            "{events:?}"
        );
        // Of another version, without a claim: nobody's.
        assert!(heard(notice("g", "0:", ",\"output\":1")).is_empty());
        // A large one stored under another version's claim: not looked up.
        assert!(heard(notice("g", "0:", ",\"claim\":\"c\",\"stored\":true")).is_empty());
        let events = heard(notice("g", "0:2", ",\"claim\":\"c\",\"stored\":true"));
        assert!(
            matches!(&events[..], [ClusterEvent::Stored { .. }]),
            "{events:?}"
        );
        // At the bound of what is read.
        let at_bound = sized(200, |x| notice("f", "0:", &format!(",\"output\":\"{x}\"")));
        assert_eq!(heard(at_bound).len(), 1);
    }
}
