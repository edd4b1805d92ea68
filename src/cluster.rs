//! Cluster mode: brokers sharing one Redis, so that a key is evaluated once
//! across all of them and results outlive any one broker.
//!
//! Each broker still coalesces locally and keeps its own cache; Redis is
//! touched once per key per broker, when the hub starts a job for a key it
//! does not have. This task does all Redis I/O and talks to the hub only by
//! messages (the hub never awaits Redis):
//!
//! - [`ClusterCmd::Acquire`]: look for the result in Redis
//!   (`result:{key}:<tag>`, a second cache level); if absent, claim the key
//!   (`SET claim:{key}:<tag> <node>:<seq> NX PX lease_ms`). The tag is the
//!   fn's epoch and version ([`FnTags`]): a result of another version, or
//!   from before the fn was invalidated, is never found. A namespace's
//!   names begin `<prefix><ns>/` (the shared namespace's do not), its fns'
//!   epochs live in `<prefix>ns-epochs` under `<ns>/<fn>`, and its notices
//!   carry `"ns"`, so namespaces share nothing in Redis. The hub hears
//!   `Found`, `Claimed` (evaluate here), `Waiting` (another broker
//!   evaluates) or `Local` (Redis is away: evaluate here, as a lone broker
//!   would).
//! - Claims held are renewed every `lease_ms / 3` while their evaluation
//!   runs; [`ClusterCmd::Finished`] stores the result (outputs for
//!   `result_ttl_s`, failures only for `error_ttl_s`) if the claim is still
//!   ours or no result is stored, publishes the outcome on `<prefix>done`
//!   with the claim it was computed under, and releases the claim if it is
//!   still ours (compare-and-delete, so a claim taken over after our lease
//!   expired is never deleted by us).
//! - One subscription per broker to `<prefix>done` brings every completion
//!   to the hub ([`ClusterEvent::Done`]); the hub delivers those it has
//!   waiters for.
//! - Keys this broker waits on are looked at again every `lease_ms`: a
//!   result found is delivered, an expired claim is taken over (the claimant
//!   died), and with Redis away the broker evaluates locally. Nobody waits
//!   forever.
//! - [`ClusterCmd::Invalidate`]: a fn's epoch is raised (`<prefix>epochs`)
//!   or a key's results deleted, and the drop announced on the same
//!   channel; every broker drops its copies when it hears it, and every
//!   lease reads the epochs again. A broker serves from its own cache only
//!   while its subscription has answered a ping within a lease (so it has
//!   heard every announcement made before), and the invalidating broker
//!   answers a lease after Redis recorded the drop.
//!
//! Commands for different keys run side by side on one multiplexed
//! connection (a slow round trip holds up only its own key); commands for
//! one key run in the order the hub sent them. Each tick's renewals go out
//! together. A breaker answers "away" at once while Redis does not answer,
//! and one probe at a time decides when it is back.
//!
//! Every key is hash-tagged (`{<key>}`) so its claim and result live on one
//! Redis Cluster shard.

use crate::cache::ResultCache;
use crate::config::{CacheConfig, ClusterConfig};
use crate::core::{ClusterCmd, ClusterEvent, Gen, Target};
use crate::error::EvalError;
use crate::key::Key;
use crate::metrics::{BrokerFigures, Metrics, Totals};
use crate::ns::Ns;
use crate::protocol::{eval_error_json, unix_ms};
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncCommands, Script};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Whether the cluster is reachable; shared with metrics and snapshots.
#[derive(Debug)]
pub struct ClusterHealth {
    /// Commands answer (claims, look-ups, stores).
    up: AtomicBool,
    gauge: prometheus_client::metrics::gauge::Gauge,
    /// The completion channel's subscription is live.
    pubsub: AtomicBool,
    pubsub_gauge: prometheus_client::metrics::gauge::Gauge,
    /// Keys claimed here after their claimant's lease ran out.
    takeovers: prometheus_client::metrics::counter::Counter,
    /// Times commands stopped answering.
    degraded: prometheus_client::metrics::counter::Counter,
}

impl ClusterHealth {
    pub fn new(metrics: &Metrics) -> Self {
        metrics.cluster_up.set(0);
        metrics.cluster_pubsub_up.set(0);
        ClusterHealth {
            up: AtomicBool::new(false),
            gauge: metrics.cluster_up.clone(),
            pubsub: AtomicBool::new(false),
            pubsub_gauge: metrics.cluster_pubsub_up.clone(),
            takeovers: metrics.cluster_takeovers.clone(),
            degraded: metrics.cluster_degraded.clone(),
        }
    }

    fn set(&self, up: bool) {
        let was = self.up.swap(up, Ordering::AcqRel);
        if was && !up {
            self.degraded.inc();
        }
        if was != up {
            if up {
                tracing::info!("cluster: Redis reachable, coordinating with other brokers");
            } else {
                tracing::warn!("cluster: Redis unreachable, serving in local mode (degraded)");
            }
        }
        self.gauge.set(i64::from(up));
    }

    fn set_pubsub(&self, up: bool) {
        if self.pubsub.swap(up, Ordering::AcqRel) != up {
            if up {
                tracing::info!("cluster: subscribed to the completion channel");
            } else {
                tracing::warn!("cluster: the completion channel's subscription is down; keys waited on are looked up every lease");
            }
        }
        self.pubsub_gauge.set(i64::from(up));
    }

    /// `ok` or `degraded` (commands do not answer).
    pub fn status(&self) -> &'static str {
        if self.up.load(Ordering::Acquire) {
            "ok"
        } else {
            "degraded"
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
    /// An invalidation: every result of `fn_name` before this epoch is dropped.
    #[serde(default)]
    epoch: Option<u64>,
    /// An invalidation: this key's result is dropped.
    #[serde(default)]
    drop: Option<&'a str>,
    #[serde(default)]
    claim: Option<&'a str>,
    /// The output was too large for the notice: it is in the store.
    #[serde(default)]
    stored: bool,
    #[serde(borrow, default)]
    output: Option<&'a RawValue>,
    #[serde(default)]
    error: Option<StoredError>,
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

/// Epochs as Redis keeps them: by fn (the shared namespace's) or by
/// `<ns>/<fn>` (other namespaces').
type Epochs = HashMap<String, u64>;

/// Each fn's name, version and epoch in each namespace, shared by the task
/// and its listener: results are stored and announced under a fn's tag
/// (`<epoch>:<version>`), so a result of another version, or from before
/// the fn's invalidation, is never found or taken.
pub struct FnTags {
    fns: Vec<FnTag>,
    /// Raised (never lowered) by an invalidation of a fn in a namespace,
    /// this broker's or another's; absent: 0.
    epochs: std::sync::Mutex<HashMap<(Ns, usize), u64>>,
}

struct FnTag {
    name: String,
    version: String,
}

impl FnTags {
    /// `fns`: each fn's name and version, in evaluator order.
    pub fn new(fns: Vec<(String, String)>) -> FnTags {
        FnTags {
            fns: fns
                .into_iter()
                .map(|(name, version)| FnTag { name, version })
                .collect(),
            epochs: Default::default(),
        }
    }

    fn tag(&self, ns: Ns, evaluator: usize) -> String {
        let epoch = self
            .epochs
            .lock()
            .expect("not poisoned")
            .get(&(ns, evaluator))
            .copied()
            .unwrap_or(0);
        format!("{epoch}:{}", self.fns[evaluator].version)
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.fns.iter().position(|f| f.name == name)
    }

    /// Fn `evaluator`'s epoch in `ns` is now at least `epoch`; whether it rose.
    fn raise(&self, ns: Ns, evaluator: usize, epoch: u64) -> bool {
        let mut epochs = self.epochs.lock().expect("not poisoned");
        let current = epochs.entry((ns, evaluator)).or_default();
        let rose = *current < epoch;
        *current = epoch.max(*current);
        rose
    }

    /// The fn of a stored result or notice of namespace `ns`, if it is of
    /// that fn's current tag.
    fn current(&self, stored: &Stored, ns: Ns) -> Option<usize> {
        let evaluator = self.index(stored.fn_name?)?;
        (stored.tag? == self.tag(ns, evaluator)).then_some(evaluator)
    }
}

/// A connection to one Redis, or to a Redis Cluster (commands routed by
/// key; a key's claim and result share a hash slot).
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// One piece of Redis I/O (a round trip, or a few in order for one key),
/// run beside the others on the multiplexed connection.
type Io = std::pin::Pin<Box<dyn std::future::Future<Output = Done> + Send>>;

/// What a piece of I/O brings back to the task.
struct Done {
    /// Redis answered every command (else the breaker trips).
    answered: bool,
    reply: Reply,
}

enum Reply {
    /// What [`ACQUIRE`] found for job `gen` (None: Redis did not answer);
    /// `recheck`: the key was waited on, and a claim now is a takeover.
    Acquired {
        key: Key,
        gen: Gen,
        evaluator: usize,
        hold: Duration,
        value: String,
        /// The claim's name, and the tag in it.
        name: String,
        tag: String,
        recheck: bool,
        found: Option<(i64, String)>,
    },
    /// The stored outcome of a key subscribed to (None: absent or unread).
    Looked { key: Key, found: Option<String> },
    /// Job `gen`'s outcome was stored, published and its claim released;
    /// with `confirm`, `stored` is another broker's result found stored
    /// instead.
    Finished {
        key: Key,
        gen: Gen,
        confirm: bool,
        stored: Option<String>,
    },
    /// A claim was given up.
    Released { key: Key },
    /// This tick's renewals: the claims found lost (taken over).
    Renewed { lost: Vec<(Key, String)> },
    /// An idle tick's PING (health only).
    Pinged,
    /// Every fn's epoch as Redis has it (None: not read).
    Epochs(Option<(Epochs, Epochs)>),
    /// An invalidation was recorded (`ok`) and has had its time to reach
    /// every broker.
    Invalidated {
        target: Target,
        session: crate::outbox::SessionId,
        id: crate::protocol::ReqId,
        ok: bool,
    },
    /// Every live broker's figures and their counters summed (None: not
    /// all could be read).
    Totals(Option<(Totals, Vec<BrokerFigures>)>),
}

impl Reply {
    /// The key whose next command waits for this one.
    fn key(&self) -> Option<Key> {
        match self {
            Reply::Acquired { key, .. }
            | Reply::Looked { key, .. }
            | Reply::Finished { key, .. }
            | Reply::Released { key } => Some(*key),
            Reply::Renewed { .. }
            | Reply::Pinged
            | Reply::Totals(_)
            | Reply::Epochs(_)
            | Reply::Invalidated { .. } => None,
        }
    }
}

/// The cluster task's state.
pub struct Cluster {
    config: ClusterConfig,
    node: String,
    hub: mpsc::Sender<ClusterEvent>,
    health: Arc<ClusterHealth>,
    /// None while a Redis Cluster connection has not been made (yet).
    conn: Option<Conn>,
    /// Makes Redis Cluster connections (when `redis_cluster` is set).
    cluster_client: Option<ClusterClient>,
    client: redis::Client,
    /// Claims this broker holds: key → the job holding it.
    held: HashMap<Key, Held>,
    /// Keys this broker waits on another broker for: the job waiting, its
    /// fn, and how long a claim taken over for it may be kept.
    waiting: HashMap<Key, (Gen, usize, Duration)>,
    /// Each fn's tag.
    tags: Arc<FnTags>,
    /// Jobs running here without a claim, and their fn's tag when they
    /// began (their result is stored under it).
    local_tags: HashMap<Gen, String>,
    /// The results cache (its freshness is confirmed by the listener).
    cache: Arc<ResultCache>,
    /// Keys with I/O under way, and the commands for them that wait their
    /// turn: commands for one key run in order, commands for different
    /// keys side by side.
    busy: HashMap<Key, VecDeque<ClusterCmd>>,
    /// This tick's renewals are under way.
    renewing: bool,
    /// This broker's own counters, published for the cluster's totals.
    local: Box<dyn Fn() -> Totals + Send + Sync>,
    /// Where the cluster's totals go (snapshots read them).
    metrics: Arc<Metrics>,
    /// The last exchange of totals is under way.
    totals_pending: bool,
    /// Results found in Redis rather than evaluated here.
    l2_hits: u64,
    /// When this task started (Unix ms).
    started_ms: u64,
    /// The longest stored result or notice taken from Redis: the largest
    /// `max_output_bytes` of any fn, plus room for the envelope. Anything
    /// longer is ignored (a result is then evaluated here).
    max_stored: usize,
    /// `notice_inline_bytes`.
    notice_inline: usize,
    /// The breaker: open while Redis is away (see [`Cluster::trip`]).
    open: bool,
    /// Keys subscribed to here with nobody evaluating them here: looked up
    /// at every re-check (a notice may be lost).
    looked: HashSet<Key>,
    /// This process's part of every claim value: two brokers given the same
    /// `node` name still never hold the same claim value.
    run: String,
    next_claim: u64,
    result_ttl_s: u64,
    error_ttl_s: u64,
    acquire: Script,
    renew: Script,
    release: Script,
    store: Script,
}

/// A claim this broker holds.
struct Held {
    /// The job it is for.
    gen: Gen,
    /// The claim's name in Redis.
    name: String,
    /// Its fn's tag when it was taken: the job's result is stored under it
    /// (after an invalidation of the fn, where nobody reads it).
    tag: String,
    /// Its value in Redis (the fencing token).
    value: String,
    /// Renewed until then at most.
    until: tokio::time::Instant,
}

/// The result if stored (and computed at `ARGV[3]` Unix ms or later: its
/// `at_ms` comes before its output), else a claim if free: one round trip,
/// and no second evaluation when a result lands between a look and a claim.
const ACQUIRE: &str = "local r = redis.call('GET', KEYS[1]) if r and (tonumber(string.match(r, '\"at_ms\":(%d+)')) or 0) >= tonumber(ARGV[3]) then return {1, r} end if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, ''} end return {3, redis.call('GET', KEYS[2]) or ''}";
/// Stores a result (KEYS[1]) if the claim (KEYS[2]) is still ARGV[1], or
/// if no result is stored: the fencing of a claimant that lost its claim.
const STORE: &str = "if (ARGV[1] ~= '' and redis.call('GET', KEYS[2]) == ARGV[1]) or redis.call('EXISTS', KEYS[1]) == 0 then if tonumber(ARGV[3]) > 0 then redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) else redis.call('SET', KEYS[1], ARGV[2]) end return 1 end return 0";
const RENEW: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

/// The broker's `node` name in one of its claims (`<node>:<run>:<seq>`).
pub fn claim_node(claim: &str) -> &str {
    claim.rsplitn(3, ':').nth(2).unwrap_or(claim)
}

/// A Redis call under `limit`; None when it failed or took longer.
async fn timed<T>(
    limit: Duration,
    op: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Option<T> {
    match tokio::time::timeout(limit, op).await {
        Ok(Ok(value)) => Some(value),
        Ok(Err(error)) => {
            tracing::debug!(%error, "cluster: Redis command failed");
            None
        }
        Err(_) => None,
    }
}

impl Cluster {
    /// Prepares the task (no connection is made yet: Redis may be away).
    /// `max_output` is the largest `max_output_bytes` of any fn.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &ClusterConfig,
        cache: &CacheConfig,
        tags: Arc<FnTags>,
        results: Arc<ResultCache>,
        max_output: usize,
        hub: mpsc::Sender<ClusterEvent>,
        health: Arc<ClusterHealth>,
        metrics: Arc<Metrics>,
        local: Box<dyn Fn() -> Totals + Send + Sync>,
    ) -> Result<Cluster, crate::HerdError> {
        let url = config.redis.clone().unwrap_or_default();
        let client = redis::Client::open(url.as_str()).map_err(|e| {
            crate::HerdError::Config(format!("cluster.redis {:?}: {e}", redacted(&url)))
        })?;
        let timeout = Some(Duration::from_millis(config.redis_timeout_ms));
        let manager_config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout)
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(config.lease_ms));
        let (conn, cluster_client) = if config.redis_cluster {
            let cluster_client = ClusterClient::builder(vec![url.clone()])
                .connection_timeout(Duration::from_millis(config.redis_timeout_ms))
                .response_timeout(Duration::from_millis(config.redis_timeout_ms))
                .build()
                .map_err(|e| crate::HerdError::Config(format!("cluster.redis: {e}")))?;
            (None, Some(cluster_client))
        } else {
            let manager = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
                .map_err(|e| crate::HerdError::Config(format!("cluster.redis: {e}")))?;
            (Some(Conn::Single(manager)), None)
        };
        Ok(Cluster {
            cluster_client,
            node: config.node_name(),
            config: config.clone(),
            hub,
            health,
            conn,
            client,
            held: HashMap::new(),
            looked: HashSet::new(),
            busy: HashMap::new(),
            renewing: false,
            local,
            metrics,
            totals_pending: false,
            l2_hits: 0,
            started_ms: unix_ms(),
            max_stored: max_output.saturating_add(64 * 1024),
            notice_inline: config.notice_inline_bytes,
            // Closed by the first probe, at the task's first tick.
            open: true,
            run: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
            waiting: HashMap::new(),
            tags,
            local_tags: HashMap::new(),
            cache: results,
            next_claim: 0,
            result_ttl_s: config.result_ttl_s,
            error_ttl_s: cache.error_ttl_s,
            acquire: Script::new(ACQUIRE),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
            store: Script::new(STORE),
        })
    }

    /// The name of `key`'s `kind` (claim, result) under fn `evaluator`'s
    /// current tag.
    fn key(&self, kind: &str, key: &Key, evaluator: usize) -> String {
        self.tagged(kind, key, &self.tags.tag(key.ns(), evaluator))
    }

    /// The name of `key`'s `kind` under `tag`.
    /// A namespace's names begin `<prefix><ns>/`; the shared namespace's
    /// are the names of a broker without namespaces.
    fn tagged(&self, kind: &str, key: &Key, tag: &str) -> String {
        let prefix = &self.config.prefix;
        let hex = key.to_hex();
        if key.ns().is_shared() {
            format!("{prefix}{kind}:{{{hex}}}:{tag}")
        } else {
            format!("{prefix}{}/{kind}:{{{hex}}}:{tag}", key.ns())
        }
    }

    /// The names `key`'s results may have: one per fn (the key says which
    /// fn, but only to whoever knows the input).
    fn result_names(&self, key: &Key) -> Vec<String> {
        (0..self.tags.fns.len())
            .map(|evaluator| self.key("result", key, evaluator))
            .collect()
    }

    /// The hash of the shared namespace's epochs (a field per fn), and
    /// the hash of other namespaces' (a field per `<ns>/<fn>`).
    fn epochs_names(&self) -> (String, String) {
        (
            format!("{}epochs", self.config.prefix),
            format!("{}ns-epochs", self.config.prefix),
        )
    }

    fn channel(&self) -> String {
        format!("{}done", self.config.prefix)
    }

    fn limit(&self) -> Duration {
        Duration::from_millis(self.config.redis_timeout_ms)
    }

    async fn tell(&self, event: ClusterEvent) {
        let _ = self.hub.send(event).await;
    }

    /// Runs until `stop` is cancelled or the hub is gone.
    pub async fn run(mut self, mut inbox: mpsc::Receiver<ClusterCmd>, stop: CancellationToken) {
        use futures::StreamExt;
        tracing::info!(node = %self.node, "cluster mode");
        let lease = Duration::from_millis(self.config.lease_ms);
        let resubscribed = Arc::new(tokio::sync::Notify::new());
        let listener = Listener {
            client: self.client.clone(),
            channel: self.channel(),
            hub: self.hub.clone(),
            health: Arc::clone(&self.health),
            ping: lease / 3,
            timeout: self.limit(),
            resubscribed: Arc::clone(&resubscribed),
            max_stored: self.max_stored,
            tags: Arc::clone(&self.tags),
            cache: Arc::clone(&self.cache),
            lease,
        };
        let listener = tokio::spawn(listen(listener, stop.clone()));
        let mut renew = tokio::time::interval(lease / 3);
        let mut recheck = tokio::time::interval(lease);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A probe runs beside the commands, so an away Redis never holds
        // them up: while the breaker is open each command is answered at once.
        let mut probe: Option<tokio::task::JoinHandle<bool>> = None;
        let mut io = futures::stream::FuturesUnordered::<Io>::new();
        let mut batch = Vec::with_capacity(256);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                n = inbox.recv_many(&mut batch, 256) => {
                    if n == 0 {
                        break;
                    }
                    for cmd in batch.drain(..) {
                        self.begin(cmd, &mut io).await;
                    }
                }
                Some(done) = io.next(), if !io.is_empty() => self.done(done, &mut io).await,
                _ = renew.tick() => {
                    if !self.open {
                        if let Some(renewals) = self.renewals().await {
                            io.push(renewals);
                        } else if io.is_empty() {
                            // Nothing to say to Redis: a PING keeps the
                            // health figure true while the broker is idle.
                            if let Some(ping) = self.ping().await {
                                io.push(ping);
                            }
                        }
                    } else if probe.is_none() {
                        probe = self.probe().await;
                    }
                }
                back = async { probe.as_mut().expect("guarded").await }, if probe.is_some() => {
                    probe = None;
                    if matches!(back, Ok(true)) {
                        self.open = false;
                        self.health.set(true);
                        // Back from degraded mode: whatever waits is looked at again.
                        self.recheck(&mut io).await;
                    }
                }
                _ = recheck.tick() => {
                    self.recheck(&mut io).await;
                    if let Some(read) = self.read_epochs().await {
                        io.push(read);
                    }
                    if self.open {
                        // Away: the cluster's figures are unknown.
                        *self.metrics.cluster_totals.lock().expect("not poisoned") = None;
                    } else if let Some(exchange) = self.exchange_totals().await {
                        io.push(exchange);
                    }
                }
                _ = resubscribed.notified() => self.recheck(&mut io).await,
            }
        }
        if let Some(probe) = probe {
            probe.abort();
        }
        listener.abort();
    }

    /// The connection, made first if it is a Redis Cluster one not made yet.
    async fn conn(&mut self) -> Option<Conn> {
        if self.conn.is_none() {
            let client = self.cluster_client.as_ref()?;
            match tokio::time::timeout(self.limit(), client.get_async_connection()).await {
                Ok(Ok(conn)) => self.conn = Some(Conn::Cluster(conn)),
                _ => {
                    self.trip();
                    return None;
                }
            }
        }
        self.conn.clone()
    }

    /// A connection to send on, or None while the breaker is open (a
    /// command failed and no probe has succeeded since): the caller then
    /// answers "away" at once, so in degraded mode nothing waits out
    /// `redis_timeout_ms`.
    async fn usable(&mut self) -> Option<Conn> {
        if self.open {
            return None;
        }
        self.conn().await
    }

    /// Opens the breaker: Redis counts as away until a probe answers.
    fn trip(&mut self) {
        self.open = true;
        self.health.set(false);
    }

    /// With the breaker open, one PING (in a task of its own) decides
    /// whether Redis is back.
    async fn probe(&mut self) -> Option<tokio::task::JoinHandle<bool>> {
        let limit = self.limit();
        let mut conn = self.conn().await?;
        Some(tokio::spawn(async move {
            let ping = redis::cmd("PING");
            let pong = tokio::time::timeout(limit, ping.query_async::<String>(&mut conn)).await;
            matches!(pong, Ok(Ok(_)))
        }))
    }

    /// Takes a command: started at once unless its key has I/O under way,
    /// in which case it waits its turn.
    async fn begin(&mut self, cmd: ClusterCmd, io: &mut futures::stream::FuturesUnordered<Io>) {
        let Some(key) = cmd.key() else {
            if let Some(work) = self.dispatch(cmd).await {
                io.push(work);
            }
            return;
        };
        if let Some(queue) = self.busy.get_mut(&key) {
            queue.push_back(cmd);
            return;
        }
        if let Some(work) = self.dispatch(cmd).await {
            self.busy.insert(key, VecDeque::new());
            io.push(work);
        }
    }

    /// I/O came back: its effect on the state and the hub, then the next
    /// command waiting for its key.
    async fn done(&mut self, done: Done, io: &mut futures::stream::FuturesUnordered<Io>) {
        if !done.answered {
            self.trip();
        } else if !self.open {
            self.health.set(true);
        }
        let key = done.reply.key();
        self.reply(done.reply).await;
        let Some(key) = key else { return };
        while let Some(cmd) = self.busy.get_mut(&key).and_then(VecDeque::pop_front) {
            if let Some(work) = self.dispatch(cmd).await {
                io.push(work);
                return;
            }
        }
        self.busy.remove(&key);
    }

    /// Starts a command's I/O, or carries it out at once when it needs
    /// none (or Redis is away).
    async fn dispatch(&mut self, cmd: ClusterCmd) -> Option<Io> {
        match cmd {
            ClusterCmd::Acquire {
                key,
                gen,
                evaluator,
                hold,
                max_age,
            } => {
                // A result computed before then is passed over.
                let since_ms =
                    max_age.map_or(0, |age| unix_ms().saturating_sub(age.as_millis() as u64));
                let work = self
                    .acquire(key, gen, evaluator, hold, since_ms, false)
                    .await;
                if work.is_none() {
                    self.local(key, gen, evaluator).await;
                }
                work
            }
            ClusterCmd::Lookup { key } => {
                let work = self.lookup(key).await;
                if work.is_none() {
                    self.looked.insert(key);
                }
                work
            }
            ClusterCmd::Unlook { key } => {
                self.looked.remove(&key);
                None
            }
            ClusterCmd::Finished {
                key,
                gen,
                evaluator,
                outcome,
                confirm,
            } => {
                let work = self.finished(key, gen, evaluator, outcome, confirm).await;
                if work.is_none() && confirm {
                    // Redis is away: nothing else can have been stored.
                    let verdict = ClusterEvent::Verdict {
                        key,
                        gen,
                        stored: None,
                    };
                    self.tell(verdict).await;
                }
                work
            }
            ClusterCmd::Forget { key, gen } => {
                self.local_tags.remove(&gen);
                if self.waiting.get(&key).is_some_and(|(g, _, _)| *g == gen) {
                    self.waiting.remove(&key);
                }
                None
            }
            ClusterCmd::Release { key, gen } => self.release_claim(key, gen).await,
            ClusterCmd::Invalidate {
                target,
                session,
                id,
            } => {
                let work = self.invalidate(target).await;
                if work.is_none() {
                    let answer = ClusterEvent::Invalidated {
                        target,
                        session,
                        id: id.clone(),
                        ok: false,
                    };
                    self.tell(answer).await;
                }
                work.map(|work| -> Io {
                    Box::pin(async move {
                        let Done { answered, .. } = work.await;
                        Done {
                            answered,
                            reply: Reply::Invalidated {
                                target,
                                session,
                                id,
                                ok: answered,
                            },
                        }
                    })
                })
            }
        }
    }

    /// Carries out what came back from Redis.
    async fn reply(&mut self, reply: Reply) {
        match reply {
            Reply::Acquired {
                key,
                gen,
                evaluator,
                hold,
                value,
                name,
                tag,
                recheck,
                found,
            } => {
                let event = match found {
                    // Redis went away: evaluate here rather than wait.
                    None => return self.local(key, gen, evaluator).await,
                    Some((1, stored)) => match self.parse(&stored, key.ns()) {
                        Some(found) => {
                            self.l2_hits += 1;
                            Some(found_event(key, found))
                        }
                        None => return self.local(key, gen, evaluator).await,
                    },
                    Some((2, _)) => {
                        let until = tokio::time::Instant::now() + hold;
                        let claim: Arc<str> = value.as_str().into();
                        let held = Held {
                            gen,
                            name,
                            tag,
                            value,
                            until,
                        };
                        self.held.insert(key, held);
                        Some(if recheck {
                            tracing::info!(key = %key, "cluster: the claimant's lease expired; evaluating here");
                            self.health.takeovers.inc();
                            ClusterEvent::Takeover { key, gen, claim }
                        } else {
                            ClusterEvent::Claimed { key, gen, claim }
                        })
                    }
                    Some((_, holder)) if !recheck => {
                        self.waiting.insert(key, (gen, evaluator, hold));
                        Some(ClusterEvent::Waiting {
                            key,
                            gen,
                            holder: holder.into(),
                        })
                    }
                    // Still claimed: keep waiting.
                    Some(_) => None,
                };
                if let Some(event) = event {
                    if recheck {
                        self.waiting.remove(&key);
                    }
                    self.tell(event).await;
                }
            }
            Reply::Looked { key, found } => {
                match found.and_then(|text| self.parse(&text, key.ns())) {
                    Some(found) => {
                        self.l2_hits += 1;
                        self.looked.remove(&key);
                        self.tell(found_event(key, found)).await;
                    }
                    None => {
                        self.looked.insert(key);
                    }
                }
            }
            Reply::Finished {
                key,
                gen,
                confirm: true,
                stored,
            } => {
                let stored = stored
                    .and_then(|text| self.parse(&text, key.ns()))
                    .map(|f| f.outcome);
                self.tell(ClusterEvent::Verdict { key, gen, stored }).await;
            }
            Reply::Finished { .. } | Reply::Released { .. } | Reply::Pinged => {}
            Reply::Epochs(epochs) => {
                let (shared, others) = epochs.unwrap_or_default();
                let named = shared
                    .into_iter()
                    .map(|(name, epoch)| (Some(Ns::SHARED), name, epoch))
                    .chain(others.into_iter().filter_map(|(field, epoch)| {
                        let (ns, name) = field.split_once('/')?;
                        Some((Ns::find(ns), name.to_string(), epoch))
                    }));
                for (ns, name, epoch) in named {
                    // A namespace this broker has not met holds nothing here.
                    let Some(ns) = ns else { continue };
                    if let Some(evaluator) = self.tags.index(&name) {
                        if self.tags.raise(ns, evaluator, epoch) {
                            self.tell(ClusterEvent::Dropped(Target::Fn(ns, evaluator)))
                                .await;
                        }
                    }
                }
            }
            Reply::Invalidated {
                target,
                session,
                id,
                ok,
            } => {
                let answer = ClusterEvent::Invalidated {
                    target,
                    session,
                    id,
                    ok,
                };
                self.tell(answer).await;
            }
            Reply::Totals(totals) => {
                self.totals_pending = false;
                *self.metrics.cluster_totals.lock().expect("not poisoned") = totals;
            }
            Reply::Renewed { lost } => {
                self.renewing = false;
                for (key, value) in lost {
                    // The lease ran out and another broker claimed the key.
                    if self.held.get(&key).is_some_and(|h| h.value == value) {
                        self.held.remove(&key);
                    }
                }
            }
        }
    }

    /// A stored result or notice read from Redis, unless too long or not
    /// one of ours.
    fn parse(&self, text: &str, ns: Ns) -> Option<FoundOutcome> {
        if text.len() > self.max_stored {
            return None;
        }
        let stored = serde_json::from_str::<Stored>(text).ok()?;
        Some(FoundOutcome {
            evaluator: self.tags.current(&stored, ns)?,
            outcome: stored.outcome()?,
            at_ms: stored.at_ms,
        })
    }

    /// Looks for the stored outcome of `key`, else claims it for job `gen`.
    async fn acquire(
        &mut self,
        key: Key,
        gen: Gen,
        evaluator: usize,
        hold: Duration,
        since_ms: u64,
        recheck: bool,
    ) -> Option<Io> {
        let mut conn = self.usable().await?;
        self.next_claim += 1;
        let value = format!("{}:{}:{}", self.node, self.run, self.next_claim);
        let tag = self.tags.tag(key.ns(), evaluator);
        let result = self.tagged("result", &key, &tag);
        let name = self.tagged("claim", &key, &tag);
        let (lease, limit) = (self.config.lease_ms, self.limit());
        let script = self.acquire.clone();
        Some(Box::pin(async move {
            let mut invocation = script.key(result);
            invocation.key(&name).arg(&value).arg(lease).arg(since_ms);
            let found: Option<(i64, String)> =
                timed(limit, invocation.invoke_async(&mut conn)).await;
            Done {
                answered: found.is_some(),
                reply: Reply::Acquired {
                    key,
                    gen,
                    evaluator,
                    hold,
                    value,
                    name,
                    tag,
                    recheck,
                    found,
                },
            }
        }))
    }

    /// Reads the stored outcome of `key`.
    async fn lookup(&mut self, key: Key) -> Option<Io> {
        let mut conn = self.usable().await?;
        let (names, limit) = (self.result_names(&key), self.limit());
        Some(Box::pin(async move {
            let mget = redis::cmd("MGET").arg(&names).to_owned();
            let found: Option<Vec<Option<String>>> =
                timed(limit, mget.query_async(&mut conn)).await;
            Done {
                answered: found.is_some(),
                reply: Reply::Looked {
                    key,
                    found: found.into_iter().flatten().flatten().next(),
                },
            }
        }))
    }

    /// Reads every fn's epoch.
    async fn read_epochs(&mut self) -> Option<Io> {
        let mut conn = self.usable().await?;
        let ((shared, others), limit) = (self.epochs_names(), self.limit());
        Some(Box::pin(async move {
            let mut c = conn.clone();
            let (shared, others): (Option<Epochs>, Option<Epochs>) = tokio::join!(
                timed(limit, conn.hgetall(shared)),
                timed(limit, c.hgetall(others))
            );
            let epochs = shared.zip(others);
            Done {
                answered: epochs.is_some(),
                reply: Reply::Epochs(epochs),
            }
        }))
    }

    /// Records the invalidation of `target` in Redis and announces it, then
    /// waits one lease: by then every broker has dropped its copies, or
    /// serves none from its cache (its subscription has not been confirmed
    /// within a lease). A key's result is deleted again after the wait, in
    /// case a broker evaluating it stored it before it heard.
    async fn invalidate(&mut self, target: Target) -> Option<Io> {
        let mut conn = self.usable().await?;
        let (channel, limit) = (self.channel(), self.limit());
        let lease = Duration::from_millis(self.config.lease_ms);
        match target {
            Target::Fn(ns, evaluator) => {
                let name = self.tags.fns[evaluator].name.clone();
                let (epochs, field) = if ns.is_shared() {
                    (self.epochs_names().0, name.clone())
                } else {
                    (self.epochs_names().1, format!("{ns}/{name}"))
                };
                let tags = Arc::clone(&self.tags);
                Some(Box::pin(async move {
                    let raised: Option<u64> = timed(limit, conn.hincr(&epochs, &field, 1u64)).await;
                    let Some(epoch) = raised else {
                        return unanswered();
                    };
                    tags.raise(ns, evaluator, epoch);
                    let notice = serde_json::json!({"fn": name, "epoch": epoch, "ns": &*ns.name()})
                        .to_string();
                    Done {
                        answered: announce(conn, &channel, &notice, limit, lease).await,
                        reply: Reply::Pinged,
                    }
                }))
            }
            Target::Key(key) => {
                let names = self.result_names(&key);
                Some(Box::pin(async move {
                    let delete = redis::cmd("DEL").arg(&names).to_owned();
                    let deleted: Option<i64> = timed(limit, delete.query_async(&mut conn)).await;
                    if deleted.is_none() {
                        return unanswered();
                    }
                    let notice = serde_json::json!({"drop": key.to_hex(), "ns": &*key.ns().name()})
                        .to_string();
                    let answered = announce(conn.clone(), &channel, &notice, limit, lease).await
                        && timed::<i64>(limit, delete.query_async(&mut conn))
                            .await
                            .is_some();
                    Done {
                        answered,
                        reply: Reply::Pinged,
                    }
                }))
            }
        }
    }

    /// Renews every claim held, all sent together (one round trip on the
    /// multiplexed connection); None while the last tick's are under way.
    async fn renewals(&mut self) -> Option<Io> {
        if self.renewing {
            return None;
        }
        // A claim is kept no longer than its job can live: past that the
        // job ended here without a word reaching this task, and the claim
        // is left to expire.
        let now = tokio::time::Instant::now();
        self.held.retain(|key, held| {
            let keep = held.until > now;
            if !keep {
                tracing::warn!(key = %key, "cluster: a claim outlived its job's deadline; letting it expire");
            }
            keep
        });
        if self.held.is_empty() {
            return None;
        }
        let conn = self.usable().await?;
        let claims: Vec<(Key, String, String)> = self
            .held
            .iter()
            .map(|(k, held)| (*k, held.name.clone(), held.value.clone()))
            .collect();
        let (lease, limit, script) = (self.config.lease_ms, self.limit(), self.renew.clone());
        self.renewing = true;
        Some(Box::pin(async move {
            let renewals = claims.into_iter().map(|(key, name, value)| {
                let (mut conn, script) = (conn.clone(), script.clone());
                async move {
                    let mut invocation = script.key(name);
                    invocation.arg(&value).arg(lease);
                    let renewed: Option<i64> =
                        timed(limit, invocation.invoke_async(&mut conn)).await;
                    (key, value, renewed)
                }
            });
            let renewed = futures::future::join_all(renewals).await;
            let answered = renewed.iter().all(|(_, _, r)| r.is_some());
            let lost = renewed
                .into_iter()
                .filter(|(_, _, r)| *r == Some(0))
                .map(|(key, value, _)| (key, value))
                .collect();
            Done {
                answered,
                reply: Reply::Renewed { lost },
            }
        }))
    }

    /// Publishes this broker's counters (`<prefix>broker:<node>:<run>`,
    /// kept three leases, listed in the sorted set `<prefix>brokers` by
    /// time) and reads every live broker's, for the cluster's totals.
    async fn exchange_totals(&mut self) -> Option<Io> {
        if self.totals_pending {
            return None;
        }
        let conn = self.usable().await?;
        let mine = BrokerFigures {
            node: self.node.clone(),
            up_since_ms: self.started_ms,
            pubsub: self.health.pubsub.load(Ordering::Acquire),
            claims: self.held.len() as u64,
            takeovers: self.health.takeovers.get(),
            l2_hits: self.l2_hits,
            counters: (self.local)(),
        };
        let own = serde_json::to_string(&mine).expect("figures serialize");
        let prefix = self.config.prefix.clone();
        let member = format!("{}:{}", self.node, self.run);
        let keep_ms = self.config.lease_ms.saturating_mul(3);
        let now_ms = unix_ms();
        let (limit, max) = (self.limit(), self.max_stored);
        self.totals_pending = true;
        Some(Box::pin(async move {
            let set = format!("{prefix}brokers");
            let mut c = conn.clone();
            let mine = redis::cmd("SET")
                .arg(format!("{prefix}broker:{member}"))
                .arg(&own)
                .arg("PX")
                .arg(keep_ms)
                .to_owned();
            let stored: Option<()> = timed(limit, mine.query_async(&mut c)).await;
            let listed: Option<Vec<String>> = match stored {
                None => None,
                Some(()) => {
                    let cutoff = now_ms.saturating_sub(keep_ms);
                    let update = redis::pipe()
                        .cmd("ZADD")
                        .arg(&set)
                        .arg(now_ms)
                        .arg(&member)
                        .ignore()
                        .cmd("ZREMRANGEBYSCORE")
                        .arg(&set)
                        .arg("-inf")
                        .arg(cutoff)
                        .ignore()
                        .cmd("ZRANGE")
                        .arg(&set)
                        .arg(0)
                        .arg(-1)
                        .to_owned();
                    let listed: Option<(Vec<String>,)> =
                        timed(limit, update.query_async(&mut c)).await;
                    listed.map(|(members,)| members)
                }
            };
            let Some(members) = listed else {
                return Done {
                    answered: false,
                    reply: Reply::Totals(None),
                };
            };
            let reads = members.iter().map(|member| {
                let (mut c, name) = (conn.clone(), format!("{prefix}broker:{member}"));
                async move { timed(limit, c.get::<_, Option<String>>(name)).await }
            });
            let mut totals = Totals::default();
            let mut brokers = Vec::new();
            let mut answered = true;
            for read in futures::future::join_all(reads).await {
                match read {
                    None => answered = false,
                    Some(Some(text)) if text.len() <= max => {
                        if let Ok(theirs) = serde_json::from_str::<BrokerFigures>(&text) {
                            totals.add(&theirs.counters);
                            brokers.push(theirs);
                        }
                    }
                    // Gone (that broker stopped) or not ours.
                    Some(_) => {}
                }
            }
            brokers.sort_by(|a, b| a.node.cmp(&b.node));
            Done {
                answered,
                reply: Reply::Totals(answered.then_some((totals, brokers))),
            }
        }))
    }

    /// A PING on the command connection, for health.
    async fn ping(&mut self) -> Option<Io> {
        let mut conn = self.usable().await?;
        let limit = self.limit();
        Some(Box::pin(async move {
            let ping = redis::cmd("PING");
            let pong: Option<String> = timed(limit, ping.query_async(&mut conn)).await;
            Done {
                answered: pong.is_some(),
                reply: Reply::Pinged,
            }
        }))
    }

    /// Looks again at every key waited on (delivered, taken over, or
    /// local) and at every key subscribed to, all side by side; a key with
    /// I/O under way is left to its own.
    async fn recheck(&mut self, io: &mut futures::stream::FuturesUnordered<Io>) {
        let looked: Vec<Key> = self
            .looked
            .iter()
            .filter(|k| !self.busy.contains_key(*k))
            .copied()
            .collect();
        for key in looked {
            let Some(work) = self.lookup(key).await else {
                break;
            };
            self.busy.insert(key, VecDeque::new());
            io.push(work);
        }
        let keys: Vec<(Key, Gen, usize, Duration)> = self
            .waiting
            .iter()
            .filter(|(k, _)| !self.busy.contains_key(*k))
            .map(|(k, (g, e, h))| (*k, *g, *e, *h))
            .collect();
        for (key, gen, evaluator, hold) in keys {
            match self.acquire(key, gen, evaluator, hold, 0, true).await {
                Some(work) => {
                    self.busy.insert(key, VecDeque::new());
                    io.push(work);
                }
                None => {
                    // Redis is away: evaluate here rather than wait.
                    self.waiting.remove(&key);
                    self.local(key, gen, evaluator).await;
                }
            }
        }
    }

    /// Job `gen` runs here without a claim: its result will be stored
    /// under its fn's tag as of now.
    async fn local(&mut self, key: Key, gen: Gen, evaluator: usize) {
        self.waiting.remove(&key);
        self.local_tags
            .insert(gen, self.tags.tag(key.ns(), evaluator));
        self.tell(ClusterEvent::Local { key, gen }).await;
    }

    /// Stores and publishes the outcome of job `gen` and gives up its claim;
    /// with `confirm`, reads the result stored instead of it, if any.
    async fn finished(
        &mut self,
        key: Key,
        gen: Gen,
        evaluator: usize,
        outcome: Result<Arc<str>, EvalError>,
        confirm: bool,
    ) -> Option<Io> {
        // The claim leaves `held` now: it is released below, not renewed.
        let held = match self.held.get(&key) {
            Some(held) if held.gen == gen => self.held.remove(&key),
            _ => None,
        };
        let local_tag = self.local_tags.remove(&gen);
        let conn = self.usable().await?;
        // Under the tag the job began with (its claim's): a job that began
        // before its fn was invalidated stores where nobody reads. A job
        // that began nowhere this task saw (the hub ran it alone while this
        // task's inbox was full) shares nothing but a failure.
        let tag = match (&held, local_tag) {
            (Some(held), _) => Some(held.tag.clone()),
            (None, tag) => tag,
        };
        if tag.is_none() && outcome.is_ok() {
            return None;
        }
        let tag = tag.unwrap_or_else(|| self.tags.tag(key.ns(), evaluator));
        let ns = if key.ns().is_shared() {
            String::new()
        } else {
            format!("\"ns\":\"{}\",", key.ns())
        };
        let origin = format!(
            "{ns}\"fn\":{},\"tag\":{},\"at_ms\":{}",
            serde_json::to_string(&self.tags.fns[evaluator].name).expect("a string serializes"),
            serde_json::to_string(&tag).expect("a string serializes"),
            unix_ms()
        );
        let (stored, ttl) = match &outcome {
            Ok(output) => (
                format!("{{{origin},\"output\":{output}}}"),
                self.result_ttl_s,
            ),
            Err(error) => (
                format!("{{{origin},\"error\":{}}}", eval_error_json(error)),
                self.error_ttl_s,
            ),
        };
        let keep = outcome.is_ok() || self.error_ttl_s > 0;
        // The notice names the claim it was computed under, so a broker
        // waiting on a later claim of the key ignores an earlier failure.
        let claim = match &held {
            None => String::new(),
            Some(Held { value, .. }) => format!(
                ",\"claim\":{}",
                serde_json::to_string(value).expect("a string serializes")
            ),
        };
        // A large output stays out of the notice: only brokers with
        // waiters for it read it from Redis.
        let notice = match &outcome {
            Ok(output) if output.len() > self.notice_inline => {
                format!(
                    "{{\"key\":\"{}\"{claim},{origin},\"stored\":true}}",
                    key.to_hex()
                )
            }
            _ => format!("{{\"key\":\"{}\"{claim},{}", key.to_hex(), &stored[1..]),
        };
        let result_name = self.tagged("result", &key, &tag);
        let claim_name = match &held {
            Some(held) => held.name.clone(),
            None => self.tagged("claim", &key, &tag),
        };
        let token = held.map(|h| h.value);
        let (channel, limit) = (self.channel(), self.limit());
        let (store, release) = (self.store.clone(), self.release.clone());
        Some(Box::pin(async move {
            let mut answered = true;
            // Stored only while this job holds the claim, or when no result
            // is stored yet: a claimant whose lease ran out and was taken
            // over never overwrites the result of the broker that took it
            // over.
            let mut stored_here = false;
            if keep {
                let mut c = conn.clone();
                let mut invocation = store.key(&result_name);
                invocation
                    .key(&claim_name)
                    .arg(token.as_deref().unwrap_or(""))
                    .arg(&stored)
                    .arg(ttl);
                let written: Option<i64> = timed(limit, invocation.invoke_async(&mut c)).await;
                answered &= written.is_some();
                stored_here = written == Some(1);
            }
            // The result that stands instead of this one, when asked.
            let mut instead = None;
            if confirm && answered && !stored_here {
                let mut c = conn.clone();
                let found: Option<Option<String>> = timed(limit, c.get(&result_name)).await;
                answered &= found.is_some();
                instead = found.flatten();
            }
            // Two commands, not a pipeline: on a Redis Cluster the result's
            // slot and the channel are served apart. An outcome that found
            // another result stored is not published: that one was.
            if answered && instead.is_none() && (outcome.is_err() || stored_here) {
                answered &= publish(conn.clone(), &channel, &notice, limit).await;
            }
            if let Some(value) = token.filter(|_| answered) {
                answered &= release_claim(&release, conn, &claim_name, &value, limit)
                    .await
                    .is_some();
            }
            Done {
                answered,
                reply: Reply::Finished {
                    key,
                    gen,
                    confirm,
                    stored: instead,
                },
            }
        }))
    }

    /// Deletes the claim job `gen` holds on `key`, if it is still ours.
    async fn release_claim(&mut self, key: Key, gen: Gen) -> Option<Io> {
        if self.held.get(&key).is_none_or(|h| h.gen != gen) {
            return None;
        }
        let Held { value, name, .. } = self.held.remove(&key).expect("just found");
        let conn = self.usable().await?;
        let (limit, script) = (self.limit(), self.release.clone());
        Some(Box::pin(async move {
            let released = release_claim(&script, conn, &name, &value, limit).await;
            Done {
                answered: released.is_some(),
                reply: Reply::Released { key },
            }
        }))
    }
}

/// Publishes `notice` on `channel`; whether Redis took it.
async fn publish(mut conn: Conn, channel: &str, notice: &str, limit: Duration) -> bool {
    let publish = redis::cmd("PUBLISH").arg(channel).arg(notice).to_owned();
    timed::<i64>(limit, publish.query_async(&mut conn))
        .await
        .is_some()
}

/// Announces an invalidation, then waits one lease: by then every broker
/// has heard it or serves nothing from its cache. Whether Redis took it.
async fn announce(
    conn: Conn,
    channel: &str,
    notice: &str,
    limit: Duration,
    lease: Duration,
) -> bool {
    if !publish(conn, channel, notice, limit).await {
        return false;
    }
    tokio::time::sleep(lease).await;
    true
}

/// Deletes the claim `name` if its value is still `value` ([`RELEASE`]);
/// None when Redis did not answer.
async fn release_claim(
    script: &Script,
    mut conn: Conn,
    name: &str,
    value: &str,
    limit: Duration,
) -> Option<i64> {
    let mut invocation = script.key(name);
    invocation.arg(value);
    timed(limit, invocation.invoke_async(&mut conn)).await
}

/// Keeps one subscription to the completion channel, re-subscribing after
/// it drops, and hands every notice to the hub. The subscription is pinged
/// every `ping`: one that is open but silent (a dead peer, a stalled proxy)
/// counts as down after `timeout` and is made again. After each
/// (re)subscription `resubscribed` is notified, so the cluster task looks
/// again at every key waited on (notices sent while the subscription was
/// down are lost).
struct Listener {
    client: redis::Client,
    channel: String,
    hub: mpsc::Sender<ClusterEvent>,
    health: Arc<ClusterHealth>,
    ping: Duration,
    timeout: Duration,
    resubscribed: Arc<tokio::sync::Notify>,
    max_stored: usize,
    tags: Arc<FnTags>,
    cache: Arc<ResultCache>,
    lease: Duration,
}

async fn listen(listener: Listener, stop: CancellationToken) {
    use futures::StreamExt;
    let Listener {
        client,
        channel,
        hub,
        health,
        ping,
        timeout,
        resubscribed,
        max_stored,
        tags,
        cache,
        lease,
    } = listener;
    loop {
        let subscribed = async {
            let (mut sink, stream) = client.get_async_pubsub().await?.split();
            sink.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>((sink, stream))
        };
        match tokio::time::timeout(timeout, subscribed).await {
            Ok(Ok((mut sink, mut messages))) => {
                // Whatever was announced while unsubscribed is unknown
                // here: nothing cached before now is served again.
                cache.drop_all();
                cache.confirm_until(std::time::Instant::now() + lease);
                health.set_pubsub(true);
                resubscribed.notify_one();
                let mut pings = tokio::time::interval(ping);
                pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                pings.tick().await;
                loop {
                    let message = tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = pings.tick() => {
                            // On a subscribed connection Redis answers a
                            // PING with the array ["pong", ""], not +PONG.
                            // Its answer comes after every notice published
                            // before Redis read it: this broker has heard
                            // of every invalidation made before the PING.
                            let sent = std::time::Instant::now();
                            let pong = tokio::time::timeout(timeout, sink.ping::<redis::Value>()).await;
                            if matches!(pong, Ok(Ok(_))) {
                                cache.confirm_until(sent + lease);
                                continue;
                            }
                            tracing::debug!("cluster: the completion channel did not answer a ping");
                            break;
                        }
                        m = messages.next() => m,
                    };
                    let Some(message) = message else { break };
                    let Ok(text) = message.get_payload::<String>() else {
                        continue;
                    };
                    if text.len() > max_stored {
                        continue;
                    }
                    let Ok(notice) = serde_json::from_str::<Stored>(&text) else {
                        continue;
                    };
                    // A namespace this broker has not met: nobody here
                    // holds or waits for anything in it.
                    let Some(ns) = notice.namespace() else {
                        continue;
                    };
                    let dropped = match (notice.drop.and_then(Key::parse), notice.epoch) {
                        (Some(key), _) => Some(Target::Key(key.in_ns(ns))),
                        (None, Some(epoch)) => notice
                            .fn_name
                            .and_then(|name| tags.index(name))
                            .filter(|evaluator| tags.raise(ns, *evaluator, epoch))
                            .map(|evaluator| Target::Fn(ns, evaluator)),
                        (None, None) => None,
                    };
                    if let Some(target) = dropped {
                        if hub.send(ClusterEvent::Dropped(target)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    let Some(key) = notice.key.and_then(Key::parse) else {
                        continue;
                    };
                    let key = key.in_ns(ns);
                    // Another version's, or from before an invalidation.
                    let Some(evaluator) = tags.current(&notice, ns) else {
                        continue;
                    };
                    let Some(outcome) = notice.outcome() else {
                        if notice.stored && hub.send(ClusterEvent::Stored { key }).await.is_err() {
                            return;
                        }
                        continue;
                    };
                    let claim = notice.claim.map(Arc::from);
                    let event = ClusterEvent::Done {
                        key,
                        evaluator,
                        outcome,
                        claim,
                        at_ms: notice.at_ms,
                    };
                    if hub.send(event).await.is_err() {
                        return;
                    }
                }
                health.set_pubsub(false);
            }
            _ => health.set_pubsub(false),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(timeout) => {}
        }
    }
}

/// An outcome read from the store, of fn `evaluator`'s current tag.
struct FoundOutcome {
    evaluator: usize,
    outcome: Result<Arc<str>, EvalError>,
    at_ms: u64,
}

/// The event for an outcome read from the store.
fn found_event(key: Key, found: FoundOutcome) -> ClusterEvent {
    let FoundOutcome {
        evaluator,
        outcome,
        at_ms,
    } = found;
    match outcome {
        Ok(output) => ClusterEvent::Found {
            key,
            evaluator,
            output,
            at_ms,
        },
        Err(error) => ClusterEvent::Done {
            key,
            evaluator,
            outcome: Err(error),
            claim: None,
            at_ms,
        },
    }
}

/// I/O that Redis did not answer.
fn unanswered() -> Done {
    Done {
        answered: false,
        reply: Reply::Pinged,
    }
}

/// A Redis URL fit to print: its password (and user) replaced by `***`.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let host_start = rest.find('/').unwrap_or(rest.len());
    match rest[..host_start].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::{claim_node, redacted};

    #[test]
    fn a_claim_names_its_broker() {
        assert_eq!(claim_node("b:7f3a:12"), "b");
        assert_eq!(claim_node("eu:west:1:7f3a:12"), "eu:west:1");
    }

    #[test]
    fn passwords_are_never_printed() {
        assert_eq!(
            redacted("redis://:s3cret@10.0.0.1:6379/0"),
            "redis://***@10.0.0.1:6379/0"
        );
        assert_eq!(redacted("redis://user:pw@host/"), "redis://***@host/");
        assert_eq!(
            redacted("redis://127.0.0.1:6379/"),
            "redis://127.0.0.1:6379/"
        );
    }
}
