//! Counters and gauges: one set, read by `watch` snapshots and `/metrics`.
//!
//! Every figure lives in a prometheus-client metric; the snapshot's `stats`
//! object is read from the same metrics, so the two views cannot disagree.

use crate::cache::ResultCache;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    pub code: u16,
}

/// The label set `{fn="<name>"}`.
pub type FnLabel = [(&'static str, String); 1];

pub fn fn_label(name: &str) -> FnLabel {
    [("fn", name.to_string())]
}

/// The label set `{ns="<name>"}`: `_shared` for the shared namespace,
/// `_other` past `auth.namespace_labels` namespaces.
pub type NsLabel = [(&'static str, std::sync::Arc<str>); 1];

/// The figures of one namespace, held by its sessions so that counting
/// never looks a label up.
#[derive(Clone, Debug)]
pub struct NsMetrics {
    pub sessions: Gauge,
    pub submits: Counter,
    pub cache_hits: Counter,
    pub rate_limited: Counter,
}

/// Histogram buckets of evaluation time: 1 ms to about 33 s.
fn eval_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Histogram buckets of submit-to-result latency: 50 µs to about 27 s.
fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

/// The figures of one evaluator (`{fn="…"}`), held by its spec so that
/// counting never looks a label up.
#[derive(Clone, Debug)]
pub struct FnMetrics {
    pub submits: Counter,
    pub cache_hits: Counter,
    pub evaluations: Counter,
    pub coalesced: Counter,
    pub failures: Counter,
    pub timeouts: Counter,
    pub eval_seconds: Histogram,
    pub latency_seconds: Histogram,
}

/// The broker's figures.
pub struct Metrics {
    registry: Registry,
    submits: Family<FnLabel, Counter>,
    cache_hits: Family<FnLabel, Counter>,
    evaluations: Family<FnLabel, Counter>,
    coalesced: Family<FnLabel, Counter>,
    failures: Family<FnLabel, Counter>,
    timeouts: Family<FnLabel, Counter>,
    eval_seconds: Family<FnLabel, Histogram, fn() -> Histogram>,
    latency_seconds: Family<FnLabel, Histogram, fn() -> Histogram>,
    pub connections: Gauge,
    pub queued: Gauge,
    pub running: Gauge,
    pub wait_table: Gauge,
    pub cache_entries: Gauge,
    pub cache_bytes: Gauge,
    pub closes: Family<CloseLabels, Counter>,
    /// `busy` answers, by which bound was full.
    busy: Family<[(&'static str, &'static str); 1], Counter>,
    pub evaluator_healthy: Family<FnLabel, Gauge>,
    pub worker_restarts: Family<FnLabel, Counter>,
    pub lost_threads: Family<FnLabel, Gauge>,
    pub remote_workers: Family<FnLabel, Gauge>,
    pub snapshots_rendered: Counter,
    /// 1 on a broker configured with a cluster (`[cluster] redis`).
    cluster_configured: Gauge,
    /// 1 while the cluster's Redis answers, 0 while degraded (cluster mode only).
    pub cluster_up: Gauge,
    pub cluster_pubsub_up: Gauge,
    pub cluster_takeovers: Counter,
    pub cluster_degraded: Counter,
    pub cluster_redis_resets: Counter,
    ns_sessions: Family<NsLabel, Gauge>,
    ns_submits: Family<NsLabel, Counter>,
    ns_cache_hits: Family<NsLabel, Counter>,
    ns_rate_limited: Family<NsLabel, Counter>,
    pub ns_refused_sessions: Family<NsLabel, Counter>,
    /// The namespaces with a label of their own, and how many may have one.
    ns_labels: std::sync::Mutex<std::collections::HashMap<crate::ns::Ns, std::sync::Arc<str>>>,
    ns_label_limit: std::sync::atomic::AtomicUsize,
    /// Whether this broker runs in cluster mode.
    pub cluster_mode: std::sync::atomic::AtomicBool,
    /// The cluster's totals and its brokers, as the figures exchange last
    /// read them.
    pub cluster_totals: std::sync::Mutex<Option<(Totals, Vec<BrokerFigures>)>>,
    /// The core's cluster figures, as the hub last published them.
    pub cluster_status: std::sync::Mutex<Option<herd_core::ClusterStatus>>,
}

/// Registers `metric` under `name` and hands it back.
fn registered<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// Counters summed over brokers: one broker's own, or the whole
/// cluster's (every broker publishes its own to Redis).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    /// Brokers counted.
    pub brokers: u64,
    pub connections: u64,
    pub submits: u64,
    pub cache_hits: u64,
    pub evaluations: u64,
    pub coalesced: u64,
    pub failures: u64,
    pub timeouts: u64,
}

impl Totals {
    /// Adds `other`'s figures to these.
    pub fn add(&mut self, other: &Totals) {
        self.brokers += other.brokers;
        self.connections += other.connections;
        self.submits += other.submits;
        self.cache_hits += other.cache_hits;
        self.evaluations += other.evaluations;
        self.coalesced += other.coalesced;
        self.failures += other.failures;
        self.timeouts += other.timeouts;
    }
}

/// One broker of a cluster, as it publishes itself to Redis.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BrokerFigures {
    /// Its `cluster.node` name.
    pub node: String,
    /// When it started (Unix ms).
    pub up_since_ms: u64,
    /// Its completion channel's subscription answers.
    pub pubsub: bool,
    /// Claims it holds (keys it is evaluating for the cluster).
    pub claims: u64,
    /// Keys it claimed after their claimant's lease ran out.
    pub takeovers: u64,
    /// Results it found in Redis rather than evaluating.
    pub l2_hits: u64,
    /// Its own counters (`brokers` is 1).
    #[serde(flatten)]
    pub counters: Totals,
}

/// The `stats` object of a `snapshot` frame.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub connections: i64,
    pub submits: u64,
    pub cache_hits: u64,
    pub evaluations: u64,
    pub coalesced: u64,
    pub failures: u64,
    pub timeouts: u64,
    pub queued: i64,
    pub running: i64,
    pub wait_table: i64,
    pub cache_entries: u64,
    pub cache_bytes: u64,
    pub cache_max_bytes: u64,
    /// Each evaluator's health: `ok`, `unhealthy`, or `no_workers` (a
    /// remote evaluator no worker serves).
    pub evaluators: std::collections::BTreeMap<String, &'static str>,
    /// Cluster mode only: `ok`, or `degraded` while Redis is away.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<&'static str>,
    /// Cluster mode only: `ok` while the completion channel's subscription
    /// answers, else `down` (notices are then found by re-checks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_pubsub: Option<&'static str>,
    /// Cluster mode only: keys claimed here after their claimant's lease
    /// ran out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub takeovers: Option<u64>,
    /// Cluster mode only: every live broker's counters summed, as last
    /// read from Redis (refreshed every `lease_ms`; absent while Redis is
    /// away).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_totals: Option<Totals>,
    /// Cluster mode only: every live broker, by node name, as last read
    /// from Redis (empty while Redis is away).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_brokers: Option<Vec<BrokerFigures>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("herd");
        let r = &mut registry;
        // Fields are built in the order written: the registry is taken last.
        Metrics {
            submits: registered(r, "submits", "Submit requests", Family::default()),
            cache_hits: registered(
                r,
                "cache_hits",
                "Submits answered from the cache",
                Family::default(),
            ),
            evaluations: registered(r, "evaluations", "Evaluations started", Family::default()),
            coalesced: registered(
                r,
                "coalesced",
                "Submits that joined a pending evaluation",
                Family::default(),
            ),
            failures: registered(
                r,
                "failures",
                "Evaluations that failed or timed out",
                Family::default(),
            ),
            timeouts: registered(
                r,
                "timeouts",
                "Evaluations that exceeded their timeout",
                Family::default(),
            ),
            eval_seconds: registered(
                r,
                "eval_seconds",
                "Time evaluations took",
                Family::new_with_constructor(eval_buckets as fn() -> Histogram),
            ),
            latency_seconds: registered(
                r,
                "submit_latency_seconds",
                "Time from a submit's arrival to its result being queued for the client",
                Family::new_with_constructor(latency_buckets as fn() -> Histogram),
            ),
            connections: registered(r, "connections", "Open WebSocket sessions", Gauge::default()),
            queued: registered(r, "queued", "Evaluations queued", Gauge::default()),
            running: registered(r, "running", "Evaluations running", Gauge::default()),
            wait_table: registered(
                r,
                "wait_table_entries",
                "Keys in the hub's wait table",
                Gauge::default(),
            ),
            cache_entries: registered(r, "cache_entries", "Results in the cache", Gauge::default()),
            cache_bytes: registered(
                r,
                "cache_bytes",
                "Weighted size of the cache in bytes",
                Gauge::default(),
            ),
            closes: registered(r, "closes", "Sessions closed, by close code", Family::default()),
            busy: registered(
                r,
                "busy",
                "busy answers, by the bound that was full: max_pending, namespace_max_pending, queue (queue_capacity or queue_bytes), watchers (dashboard.max_watchers), other",
                Family::default(),
            ),
            evaluator_healthy: registered(
                r,
                "evaluator_healthy",
                "1 while the evaluator's workers start and answer, 0 while they keep dying at start-up",
                Family::default(),
            ),
            worker_restarts: registered(
                r,
                "worker_restarts",
                "Worker processes replaced",
                Family::default(),
            ),
            lost_threads: registered(
                r,
                "evaluator_lost_threads",
                "Evaluator threads still inside an evaluation that overran its timeout",
                Family::default(),
            ),
            remote_workers: registered(
                r,
                "remote_workers",
                "Worker sessions serving a remote evaluator",
                Family::default(),
            ),
            cluster_configured: registered(
                r,
                "cluster_configured",
                "1 on a broker configured with a cluster (cluster.redis), 0 on a lone broker",
                Gauge::default(),
            ),
            cluster_up: registered(
                r,
                "cluster_up",
                "1 while the cluster's Redis answers, 0 while the broker serves in local mode",
                Gauge::default(),
            ),
            cluster_pubsub_up: registered(
                r,
                "cluster_pubsub_up",
                "1 while the subscription to the completion channel is live",
                Gauge::default(),
            ),
            cluster_takeovers: registered(
                r,
                "cluster_takeovers",
                "Keys this broker claimed after their claimant's lease ran out",
                Counter::default(),
            ),
            cluster_degraded: registered(
                r,
                "cluster_degraded",
                "Times Redis stopped answering and the broker went to local mode",
                Counter::default(),
            ),
            cluster_redis_resets: registered(
                r,
                "cluster_redis_resets",
                "Times Redis was found to have lost its data (restarted empty): evaluations begun before are not stored",
                Counter::default(),
            ),
            ns_sessions: registered(
                r,
                "namespace_sessions",
                "Open sessions, by namespace",
                Family::default(),
            ),
            ns_submits: registered(
                r,
                "namespace_submits",
                "Submit requests, by namespace",
                Family::default(),
            ),
            ns_cache_hits: registered(
                r,
                "namespace_cache_hits",
                "Submits answered from the cache, by namespace",
                Family::default(),
            ),
            ns_rate_limited: registered(
                r,
                "namespace_rate_limited",
                "Submits refused by the namespace's submits_per_s, by namespace",
                Family::default(),
            ),
            ns_refused_sessions: registered(
                r,
                "namespace_refused_sessions",
                "Upgrades refused by the namespace's max_sessions, by namespace",
                Family::default(),
            ),
            ns_labels: Default::default(),
            ns_label_limit: std::sync::atomic::AtomicUsize::new(32),
            cluster_mode: std::sync::atomic::AtomicBool::new(false),
            cluster_totals: std::sync::Mutex::new(None),
            cluster_status: std::sync::Mutex::new(None),
            snapshots_rendered: registered(
                r,
                "snapshots_rendered",
                "Dashboard snapshots built (one per tick, shared by every watcher due)",
                Counter::default(),
            ),
            registry: std::mem::take(r),
        }
    }

    /// How many namespaces (besides the shared one) get a label of their
    /// own (`auth.namespace_labels`).
    pub fn set_namespace_labels(&self, limit: usize) {
        self.ns_label_limit
            .store(limit, std::sync::atomic::Ordering::Relaxed);
    }

    /// The label of namespace `ns`: its name while fewer than
    /// `auth.namespace_labels` namespaces have one, else `_other`.
    pub fn ns_label(&self, ns: crate::ns::Ns) -> NsLabel {
        if ns.is_shared() {
            return [("ns", "_shared".into())];
        }
        let mut labels = self.ns_labels.lock().expect("not poisoned");
        let limit = self
            .ns_label_limit
            .load(std::sync::atomic::Ordering::Relaxed);
        let label = match labels.get(&ns) {
            Some(label) => std::sync::Arc::clone(label),
            None if labels.len() < limit => {
                let name = ns.name();
                labels.insert(ns, std::sync::Arc::clone(&name));
                name
            }
            None => "_other".into(),
        };
        [("ns", label)]
    }

    /// The metrics of namespace `ns`.
    pub fn for_ns(&self, ns: crate::ns::Ns) -> NsMetrics {
        let label = self.ns_label(ns);
        NsMetrics {
            sessions: self.ns_sessions.get_or_create(&label).clone(),
            submits: self.ns_submits.get_or_create(&label).clone(),
            cache_hits: self.ns_cache_hits.get_or_create(&label).clone(),
            rate_limited: self.ns_rate_limited.get_or_create(&label).clone(),
        }
    }

    /// The metrics of evaluator `name`.
    pub fn for_fn(&self, name: &str) -> FnMetrics {
        let label = fn_label(name);
        FnMetrics {
            submits: self.submits.get_or_create(&label).clone(),
            cache_hits: self.cache_hits.get_or_create(&label).clone(),
            evaluations: self.evaluations.get_or_create(&label).clone(),
            coalesced: self.coalesced.get_or_create(&label).clone(),
            failures: self.failures.get_or_create(&label).clone(),
            timeouts: self.timeouts.get_or_create(&label).clone(),
            eval_seconds: self.eval_seconds.get_or_create(&label).clone(),
            latency_seconds: self.latency_seconds.get_or_create(&label).clone(),
        }
    }

    /// Refreshes the cache gauges and returns the snapshot figures
    /// (counters summed over `evaluators`: each fn's name, metrics and health).
    pub fn stats<'a, I>(&self, cache: &ResultCache, evaluators: I) -> Stats
    where
        I: Iterator<Item = (&'a str, &'a FnMetrics, &'static str)> + Clone,
    {
        let (entries, bytes) = cache.usage();
        self.cache_entries.set(entries as i64);
        self.cache_bytes.set(bytes as i64);
        let own = self.totals(evaluators.clone());
        let clustered = self.cluster_mode.load(std::sync::atomic::Ordering::Relaxed);
        let cluster = clustered
            .then(|| self.cluster_totals.lock().expect("not poisoned").clone())
            .flatten();
        Stats {
            connections: self.connections.get(),
            submits: own.submits,
            cache_hits: own.cache_hits,
            evaluations: own.evaluations,
            coalesced: own.coalesced,
            failures: own.failures,
            timeouts: own.timeouts,
            queued: self.queued.get(),
            running: self.running.get(),
            wait_table: self.wait_table.get(),
            cache_entries: entries,
            cache_bytes: bytes,
            cache_max_bytes: cache.max_bytes(),
            evaluators: evaluators
                .map(|(name, _, health)| (name.to_string(), health))
                .collect(),
            cluster: clustered.then(|| {
                if self.cluster_up.get() == 1 {
                    "ok"
                } else {
                    "degraded"
                }
            }),
            cluster_pubsub: clustered.then(|| {
                if self.cluster_pubsub_up.get() == 1 {
                    "ok"
                } else {
                    "down"
                }
            }),
            takeovers: clustered.then(|| self.cluster_takeovers.get()),
            cluster_totals: cluster.as_ref().map(|(totals, _)| totals.clone()),
            cluster_brokers: clustered.then(|| cluster.map(|(_, b)| b).unwrap_or_default()),
        }
    }

    /// This broker's own counters, as one broker's [`Totals`].
    pub fn totals<'a, I>(&self, evaluators: I) -> Totals
    where
        I: Iterator<Item = (&'a str, &'a FnMetrics, &'static str)> + Clone,
    {
        let sum = |f: fn(&FnMetrics) -> &Counter| -> u64 {
            evaluators.clone().map(|(_, m, _)| f(m).get()).sum()
        };
        Totals {
            brokers: 1,
            connections: self.connections.get().max(0) as u64,
            submits: sum(|m| &m.submits),
            cache_hits: sum(|m| &m.cache_hits),
            evaluations: sum(|m| &m.evaluations),
            coalesced: sum(|m| &m.coalesced),
            failures: sum(|m| &m.failures),
            timeouts: sum(|m| &m.timeouts),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render<'a, I>(&self, cache: &ResultCache, evaluators: I) -> String
    where
        I: Iterator<Item = (&'a str, &'a FnMetrics, &'static str)> + Clone,
    {
        self.stats(cache, evaluators);
        let mut out = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn record_close(&self, code: u16) {
        self.closes.get_or_create(&CloseLabels { code }).inc();
    }

    /// Counts a `busy` answer: `reason`, the bound that was full.
    pub fn record_busy(&self, reason: &'static str) {
        self.busy.get_or_create(&[("reason", reason)]).inc();
    }

    /// The reason label of the core's `busy` answer `message`.
    pub fn busy_reason(message: &str) -> &'static str {
        match message {
            herd_core::PENDING_FULL => "max_pending",
            herd_core::NS_PENDING_FULL => "namespace_max_pending",
            herd_core::QUEUE_FULL | herd_core::QUEUE_BYTES_FULL => "queue",
            _ => "other",
        }
    }

    /// Marks this broker as one of a cluster.
    pub fn set_clustered(&self) {
        self.cluster_mode
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.cluster_configured.set(1);
    }
}
