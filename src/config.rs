//! Configuration: one typed struct read from TOML, every key with a default.
//!
//! `config/herd.toml` documents every key; [`Config::validate`] rejects
//! combinations that cannot work before anything is bound or spawned.

use crate::error::HerdError;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The whole configuration of one broker.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the one port that serves HTTP and WebSocket.
    pub listen: SocketAddr,
    /// Allow clients without a token on a non-loopback address.
    pub allow_anonymous: bool,
    pub limits: Limits,
    pub cache: CacheConfig,
    pub dashboard: DashboardConfig,
    /// Several brokers sharing one Redis.
    pub cluster: ClusterConfig,
    /// `Origin` values allowed to open `/ws` besides the broker's own host
    /// (requests without `Origin`, i.e. not from a browser, are not affected).
    pub allowed_origins: Vec<String>,
    /// With no tokens, host names (besides IP literals and `localhost`)
    /// under which `/ws` may be reached; other `Host` values get 403.
    pub allowed_hosts: Vec<String>,
    /// With tokens configured, `/metrics` answers only requests that present
    /// one (any role, as on `/ws`).
    pub metrics_need_token: bool,
    /// Serve HTTPS/WSS directly (certificate and key in PEM files).
    pub tls: Option<TlsConfig>,
    /// Credentials: with none (and no signed tokens), every client is an `agent`.
    #[serde(rename = "token")]
    pub tokens: Vec<TokenConfig>,
    /// Signed tokens (JWT) and the bound on namespaces.
    pub auth: AuthConfig,
    /// Quotas of namespaces, one entry each.
    #[serde(rename = "namespace")]
    pub namespaces: Vec<NamespaceConfig>,
    /// Quotas of every namespace without an entry (the shared one aside),
    /// and of the keys an entry leaves unset.
    pub namespace_defaults: NamespaceDefaults,
    /// The evaluators, one per `fn` name clients may send.
    #[serde(rename = "evaluator")]
    pub evaluators: Vec<EvaluatorConfig>,
}

/// TLS on the listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the certificate chain.
    pub cert: PathBuf,
    /// PEM file with the private key.
    pub key: PathBuf,
}

/// One credential: who holds it (`name`, in logs and metrics) and what it may do.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub name: String,
    pub role: Role,
    /// The secret itself; or, to keep it out of the file:
    pub secret: Option<String>,
    /// the name of an environment variable holding it;
    pub secret_env: Option<String>,
    /// or a file holding it (surrounding whitespace ignored).
    pub secret_file: Option<PathBuf>,
    /// Role `worker`: the remote fns it may serve (all of them when absent);
    /// roles `agent` and `admin`: the fns it may submit (all when absent).
    pub fns: Option<Vec<String>>,
    /// The namespace of its sessions (`""`, the shared one, by default);
    /// `"*"` lets a viewer see every namespace (its own ops act in `""`).
    #[serde(default)]
    pub namespace: String,
}

/// Signed tokens (JWT), and how many namespaces may exist.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// An environment variable holding the HS256 secret.
    pub jwt_secret_env: Option<String>,
    /// A PEM file holding the public key for RS256, ES256 or EdDSA tokens.
    pub jwt_public_key_file: Option<PathBuf>,
    /// When set, a token's `aud` must name it.
    pub jwt_audience: Option<String>,
    /// When set, a token's `iss` must be it.
    pub jwt_issuer: Option<String>,
    /// Seconds of clock skew allowed on `exp` and `nbf`.
    pub jwt_leeway_s: u64,
    /// How many distinct namespace names the broker will know (signed
    /// tokens can name new ones; a token naming one more is refused).
    pub max_namespaces: usize,
    /// How many namespaces get their own label on per-namespace metrics;
    /// the rest are counted under `_other`.
    pub namespace_labels: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            jwt_secret_env: None,
            jwt_public_key_file: None,
            jwt_audience: None,
            jwt_issuer: None,
            jwt_leeway_s: 5,
            max_namespaces: 10_000,
            namespace_labels: 32,
        }
    }
}

impl AuthConfig {
    /// Whether signed tokens are accepted.
    pub fn jwt(&self) -> bool {
        self.jwt_secret_env.is_some() || self.jwt_public_key_file.is_some()
    }
}

/// One namespace's quotas: bounds on all its sessions together.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    pub name: String,
    /// Waits held at once by all its sessions; beyond it `busy`.
    pub max_pending: Option<usize>,
    /// Submits per second (a token bucket); beyond it `rate_limited`.
    pub submits_per_s: Option<u32>,
    /// The bucket's size: submits allowed at once (default: `submits_per_s`).
    pub burst: Option<u32>,
    /// Sessions open at once; beyond it the upgrade gets HTTP 429.
    pub max_sessions: Option<usize>,
    /// Its results are kept in a cache of their own of this many bytes, so
    /// it cannot evict another namespace's results nor lose its own to them.
    pub cache_bytes: Option<u64>,
}

/// The quotas of a namespace that `[[namespace]]` does not list (named
/// only by a signed token, say), each for that namespace alone; a listed
/// namespace takes from here what its entry leaves unset. The shared
/// namespace `""` is bound by `[limits]` alone unless it is listed.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NamespaceDefaults {
    pub max_pending: Option<usize>,
    pub submits_per_s: Option<u32>,
    pub burst: Option<u32>,
    pub max_sessions: Option<usize>,
    /// The results of all unlisted namespaces together are kept in one
    /// store of this many bytes, apart from the shared namespace's and the
    /// listed ones' (one store each would not be bounded).
    pub cache_bytes_together: Option<u64>,
}

/// One namespace's quotas in effect: its entry's, else the defaults'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Quotas {
    pub max_pending: Option<usize>,
    pub submits_per_s: Option<u32>,
    pub burst: Option<u32>,
    pub max_sessions: Option<usize>,
}

/// What a session's credentials allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Every op but `invalidate`.
    Agent,
    /// Every op an agent has, and `invalidate`.
    Admin,
    /// `watch`, `unwatch`, `get` and `ping` only.
    Viewer,
    /// `serve`, `unserve`, `complete` and `ping` only: runs remote evaluations.
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Admin => "admin",
            Role::Viewer => "viewer",
            Role::Worker => "worker",
        }
    }

    /// Whether a credential of this role may have namespace `"*"`: a
    /// viewer sees every namespace, a worker serves every namespace. An
    /// agent or admin acts in one namespace.
    pub fn may_span_namespaces(self) -> bool {
        matches!(self, Role::Viewer | Role::Worker)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:7878".parse().expect("valid default address"),
            allow_anonymous: false,
            allowed_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            metrics_need_token: false,
            tls: None,
            tokens: Vec::new(),
            auth: AuthConfig::default(),
            namespaces: Vec::new(),
            namespace_defaults: NamespaceDefaults::default(),
            limits: Limits::default(),
            cache: CacheConfig::default(),
            dashboard: DashboardConfig::default(),
            cluster: ClusterConfig::default(),
            evaluators: Vec::new(),
        }
    }
}

/// Every bound on what clients can make the broker hold.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Open WebSocket sessions at most; further upgrades get HTTP 503.
    pub max_connections: usize,
    /// Largest incoming message (and frame); larger closes the session with 1009.
    pub max_frame_bytes: usize,
    /// Waits (submits awaiting a result, subscriptions) one session may hold.
    pub max_pending: usize,
    /// Frames queued for one session's writer; overflow closes it with 4001.
    pub outbound_queue: usize,
    /// Bytes queued for one session's writer; overflow closes it with 4001
    /// (the session's own replies wait for room instead).
    pub outbound_bytes: usize,
    /// How long one write to a client's socket may take; a write that has
    /// not completed by then closes the session with 4001.
    pub write_timeout_ms: u64,
    /// Server ping interval; a session silent for three intervals is closed (4002).
    pub heartbeat_ms: u64,
    /// How long shutdown waits for in-flight evaluations and session writers.
    pub drain_timeout_s: u64,
    /// How long a close frame may take to reach a client before the socket is dropped.
    pub close_timeout_ms: u64,
    /// How long a new connection may take to send its request headers (and a
    /// TLS handshake to finish) before it is dropped.
    pub header_timeout_ms: u64,
    /// Messages queued for the hub before session readers wait.
    pub hub_queue: usize,
    /// Most bytes one read from a socket takes, into a buffer its thread
    /// lends a session only while the session's bytes are being read.
    pub ws_read_buffer: usize,
    /// A session's own buffer for the frame being parsed (a larger frame
    /// grows it while it arrives).
    pub ws_frame_buffer: usize,
    /// Bytes a session's writer buffers before writing to the socket.
    pub ws_write_buffer: usize,
    /// Most bytes a session's writer may hold unsent.
    pub ws_max_write_buffer: usize,
    /// Frames a writer sends between two flushes.
    pub write_batch: usize,
    /// Raw inputs remembered with their key, so that a byte-identical
    /// repeated submit skips parsing and hashing (0: none).
    pub key_memo_entries: usize,
    /// Longest raw input the key memo keeps.
    pub key_memo_max_input_bytes: usize,
    /// Longest an HTTP `/v1/submit` waits for its result (its `timeout_ms`
    /// is capped to this).
    pub http_max_timeout_ms: u64,
    /// How long an HTTP request's body may take to arrive; past it the
    /// request is answered 408 and its connection closed.
    pub http_body_timeout_ms: u64,
    /// HTTP API requests served at once (reading a body or waiting for a
    /// result); beyond it the request is answered 503 at once.
    pub max_http_requests: usize,
    /// Wrong credentials one address may present per minute (as many at
    /// once); past them it is answered 429 until it may try again (0: no
    /// bound). An IPv6 address counts as its /64.
    pub failed_logins_per_min: u32,
    /// Addresses whose failed logins are counted at most.
    pub failed_login_addresses: usize,
    /// TCP connections kept open while serving no request (waiting for a
    /// request's head, or idle between two); past it the one idle longest
    /// is closed, so silent connections cannot take every file descriptor.
    pub max_idle_connections: usize,
    /// Bytes of progress reports kept per evaluation for waiters that join
    /// it later (the latest ones; `seq` shows what was left out).
    pub progress_bytes: usize,
}

/// The most progress reports a `simulate` evaluation makes
/// (`progress_steps`, or its input's `progress`).
pub const MAX_PROGRESS_STEPS: u64 = 1000;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 30_000,
            max_frame_bytes: 1 << 20,
            max_pending: 1024,
            outbound_queue: 1024,
            outbound_bytes: 16 << 20,
            write_timeout_ms: 5_000,
            heartbeat_ms: 20_000,
            drain_timeout_s: 30,
            close_timeout_ms: 2_000,
            header_timeout_ms: 10_000,
            hub_queue: 65_536,
            ws_read_buffer: 16 * 1024,
            ws_frame_buffer: 256,
            ws_write_buffer: 16 * 1024,
            ws_max_write_buffer: 8 << 20,
            write_batch: 64,
            key_memo_entries: 16_384,
            key_memo_max_input_bytes: 4096,
            http_max_timeout_ms: 300_000,
            http_body_timeout_ms: 10_000,
            max_http_requests: 256,
            failed_logins_per_min: 30,
            failed_login_addresses: 65_536,
            max_idle_connections: 1024,
            progress_bytes: 64 * 1024,
        }
    }
}

/// The results cache.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Bound in bytes (key plus encoded output plus a fixed per-entry overhead).
    pub max_bytes: u64,
    /// Seconds a result stays cached; 0 keeps it until evicted for space.
    pub ttl_s: u64,
    /// Seconds a failure stays cached; 0 caches no failure.
    pub error_ttl_s: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_bytes: 1 << 30,
            ttl_s: 0,
            error_ttl_s: 0,
        }
    }
}

/// What `watch` snapshots carry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DashboardConfig {
    /// In-flight entries per snapshot (protocol maximum 500).
    pub snapshot_inflight: usize,
    /// Recent completions per snapshot (protocol maximum 50).
    pub snapshot_recent: usize,
    /// Characters of input shown per in-flight entry (protocol maximum 120).
    pub input_preview_chars: usize,
    /// Sessions watching at once; a further `watch` gets `busy`.
    pub max_watchers: usize,
    /// Seconds of per-second counters kept for a page that opens later
    /// (sent with a watch's first snapshot).
    pub history_s: usize,
}

impl Default for DashboardConfig {
    fn default() -> Self {
        DashboardConfig {
            snapshot_inflight: 500,
            snapshot_recent: 50,
            input_preview_chars: 120,
            max_watchers: 64,
            history_s: 300,
        }
    }
}

/// Cluster mode: brokers sharing one Redis (off while `redis` is unset).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// `redis://host:port/` of the shared Redis; unset: a lone broker.
    pub redis: Option<String>,
    /// `redis` is one node of a Redis Cluster (the others are discovered).
    pub redis_cluster: bool,
    /// This broker's name in claims and logs (default: the host name and a
    /// short random suffix).
    pub node: Option<String>,
    /// Prefix of every Redis key and channel herd uses.
    pub prefix: String,
    /// A claim's lease: renewed every third of it while the evaluation runs;
    /// brokers waiting on a claim look again this often.
    pub lease_ms: u64,
    /// Seconds results stay in Redis (0: until Redis's own `maxmemory`
    /// policy evicts them).
    pub result_ttl_s: u64,
    /// How long one Redis command may take before Redis counts as away.
    pub redis_timeout_ms: u64,
    /// Outputs up to this many bytes travel inside the completion notice;
    /// a larger one is read from Redis by the brokers that wait for it.
    pub notice_inline_bytes: usize,
    /// Results computed while Redis was away, kept to be stored in Redis
    /// when it returns (the oldest go first, from the cache too).
    pub writeback_max: usize,
    /// While Redis is unreachable, a WARN says so (with Redis's error) this
    /// often.
    pub down_warning_s: u64,
    /// Progress reports of one evaluation passed to the other brokers'
    /// waiters per second at most (the latest wins; 0: none).
    pub progress_per_s: u32,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            redis: None,
            redis_cluster: false,
            node: None,
            prefix: "herd:".into(),
            lease_ms: 5_000,
            result_ttl_s: 86_400,
            redis_timeout_ms: 1_000,
            notice_inline_bytes: 4096,
            writeback_max: 10_000,
            down_warning_s: 60,
            progress_per_s: 20,
        }
    }
}

impl ClusterConfig {
    /// The configured node name, or the host name with a short random suffix.
    pub fn node_name(&self) -> String {
        if let Some(node) = &self.node {
            return node.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "herd".into());
        format!("{host}-{}", &uuid::Uuid::new_v4().simple().to_string()[..6])
    }
}

/// The kinds of evaluator herd can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EvaluatorKind {
    /// Stands in for a costly computation (sleep, spin, fail, panic on request).
    Simulate,
    /// Returns its input.
    Echo,
    /// Runs a program and talks JSON lines with it.
    Process,
    /// Has no threads: worker sessions that `serve` its fn run its tasks.
    Remote,
}

/// One evaluator: a `fn` name and what runs behind it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluatorConfig {
    /// The name clients send as `fn`.
    #[serde(rename = "fn")]
    pub name: String,
    pub kind: EvaluatorKind,
    /// Dedicated OS threads (for `process`: one child each).
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Waiters get `eval_timeout` when a running evaluation exceeds this.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Evaluations queued for this evaluator at most; beyond it submits get `busy`.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
    /// Bytes of input queued for this evaluator at most; beyond it submits get `busy`.
    #[serde(default = "default_queue_bytes")]
    pub queue_bytes: usize,
    /// Spare threads started in place of threads stuck in an evaluation past
    /// its timeout (default: as many as `threads`).
    #[serde(default)]
    pub spare_threads: Option<usize>,
    /// `simulate`: the longest `sleep_ms` or `spin_ms` honoured (default: `timeout_ms`).
    #[serde(default)]
    pub max_sleep_ms: Option<u64>,
    /// `simulate`: progress reports per evaluation when the input names
    /// none (its `progress` member), at most 1000 (default 0).
    #[serde(default)]
    pub progress_steps: u64,
    /// Largest canonical input accepted for this evaluator.
    #[serde(default = "default_max_input_bytes")]
    pub max_input_bytes: usize,
    /// `process`: the program and its arguments.
    #[serde(default)]
    pub command: Vec<String>,
    /// `process`: working directory of the program.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// `process`: extra environment variables of the program.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// `process`: how long a child may take to exit after its stdin closes.
    #[serde(default = "default_grace_ms")]
    pub grace_ms: u64,
    /// Largest output: a `process` child's reply line, or `simulate`'s `output_bytes`.
    #[serde(default = "default_max_output_bytes")]
    pub max_output_bytes: usize,
    /// `process`: wait before restarting a child that died at start-up (doubles each time).
    #[serde(default = "default_restart_backoff_ms")]
    pub restart_backoff_ms: u64,
    /// `process`: the longest such wait.
    #[serde(default = "default_restart_backoff_max_ms")]
    pub restart_backoff_max_ms: u64,
    /// `process`: start-up deaths in a row after which the evaluator is reported unhealthy.
    #[serde(default = "default_unhealthy_after")]
    pub unhealthy_after: u32,
    /// `process`: longest stderr line logged; the rest of a longer line is dropped.
    #[serde(default = "default_stderr_line_bytes")]
    pub stderr_line_bytes: usize,
    /// `remote`: attempts a task gets when the workers running it go away;
    /// after the last, its waiters get `eval_failed` ("worker lost").
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// The version of the computation: a result of another version is
    /// never served (in a cluster, results in Redis are kept apart by it).
    #[serde(default)]
    pub version: String,
}

fn default_threads() -> usize {
    64
}
fn default_timeout_ms() -> u64 {
    30_000
}
fn default_queue_capacity() -> usize {
    4096
}
fn default_max_input_bytes() -> usize {
    1 << 20
}
fn default_max_attempts() -> u32 {
    3
}
fn default_queue_bytes() -> usize {
    64 << 20
}
fn default_stderr_line_bytes() -> usize {
    8 << 10
}
fn default_grace_ms() -> u64 {
    2_000
}
fn default_max_output_bytes() -> usize {
    1 << 20
}
fn default_restart_backoff_ms() -> u64 {
    100
}
fn default_restart_backoff_max_ms() -> u64 {
    10_000
}
fn default_unhealthy_after() -> u32 {
    3
}

impl EvaluatorConfig {
    /// A builtin evaluator with every optional key at its default.
    pub fn builtin(name: &str, kind: EvaluatorKind) -> Self {
        EvaluatorConfig {
            name: name.to_string(),
            kind,
            threads: default_threads(),
            timeout_ms: default_timeout_ms(),
            queue_capacity: default_queue_capacity(),
            queue_bytes: default_queue_bytes(),
            spare_threads: None,
            max_sleep_ms: None,
            progress_steps: 0,
            max_input_bytes: default_max_input_bytes(),
            command: Vec::new(),
            version: String::new(),
            cwd: None,
            env: BTreeMap::new(),
            grace_ms: default_grace_ms(),
            max_output_bytes: default_max_output_bytes(),
            restart_backoff_ms: default_restart_backoff_ms(),
            restart_backoff_max_ms: default_restart_backoff_max_ms(),
            unhealthy_after: default_unhealthy_after(),
            stderr_line_bytes: default_stderr_line_bytes(),
            max_attempts: default_max_attempts(),
        }
    }

    /// Spare threads for threads lost past their timeout.
    pub fn spare_threads(&self) -> usize {
        self.spare_threads.unwrap_or(self.threads)
    }

    /// `simulate`'s cap on `sleep_ms` and `spin_ms`.
    pub fn max_sleep_ms(&self) -> u64 {
        self.max_sleep_ms.unwrap_or(self.timeout_ms)
    }
}

/// Refuses a quota of `what` set to 0 (`values`, by key) and a burst
/// without a rate (`submits_per_s`).
fn check_quotas(
    what: &str,
    submits_per_s: Option<u32>,
    values: [(&str, Option<u64>); 5],
) -> Result<(), HerdError> {
    let zero: Vec<&str> = values
        .iter()
        .filter(|(_, v)| *v == Some(0))
        .map(|(key, _)| *key)
        .collect();
    if !zero.is_empty() {
        return Err(HerdError::Config(format!(
            "{what}: {} must be at least 1 when set",
            zero.join(", ")
        )));
    }
    let burst = values.iter().any(|(key, v)| *key == "burst" && v.is_some());
    if burst && submits_per_s.is_none() {
        return Err(HerdError::Config(format!(
            "{what}: burst needs submits_per_s"
        )));
    }
    Ok(())
}

/// A TOML error as one line that says where: `line L, column C, in
/// [[evaluator]] #N: <what>: `<the offending line>``.
/// A config line as an error may show it: a value that may be a secret (of
/// a key naming a secret, a password or a URL, of an unknown key, which may
/// be a mistyped one, or of a line that is not `key = value`) is left out.
fn shown<'l>(line: &'l str, message: &str) -> std::borrow::Cow<'l, str> {
    let Some((key, _)) = line.split_once('=') else {
        return if line.starts_with('[') {
            line.into()
        } else {
            "…".into()
        };
    };
    let key = key.trim();
    let lower = key.to_ascii_lowercase();
    let secret = ["secret", "pass", "token", "redis", "url", "key"]
        .iter()
        .any(|word| lower.contains(word));
    if secret || message.starts_with("unknown field") {
        format!("{key} = …").into()
    } else {
        line.into()
    }
}

fn located(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end();
    let Some(span) = error.span() else {
        return message.to_string();
    };
    let start = span.start.min(text.len());
    let before = &text[..start];
    let line = before.matches('\n').count() + 1;
    let column = before[before.rfind('\n').map_or(0, |i| i + 1)..]
        .chars()
        .count()
        + 1;
    let offending = shown(text.lines().nth(line - 1).unwrap_or("").trim(), message);
    // The table the line is in: its header, numbered for an array of tables.
    let mut table = String::new();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for header in text.lines().take(line).map(str::trim) {
        if let Some(name) = header.strip_prefix("[[").and_then(|h| h.split("]]").next()) {
            let n = counts.entry(name).or_default();
            *n += 1;
            table = format!(", in [[{name}]] #{n}");
        } else if let Some(name) = header.strip_prefix('[').and_then(|h| h.split(']').next()) {
            table = format!(", in [{name}]");
        }
    }
    format!("line {line}, column {column}{table}: {message}: `{offending}`")
}

impl Config {
    /// The quotas in effect for the namespace of `entry` (`None`: an
    /// unlisted namespace).
    pub fn quotas(&self, entry: Option<&NamespaceConfig>) -> Quotas {
        let d = &self.namespace_defaults;
        let Some(n) = entry else {
            return Quotas {
                max_pending: d.max_pending,
                submits_per_s: d.submits_per_s,
                burst: d.burst,
                max_sessions: d.max_sessions,
            };
        };
        Quotas {
            max_pending: n.max_pending.or(d.max_pending),
            submits_per_s: n.submits_per_s.or(d.submits_per_s),
            // An entry's own rate comes with its own burst (or none).
            burst: if n.submits_per_s.is_some() {
                n.burst
            } else {
                d.burst
            },
            max_sessions: n.max_sessions.or(d.max_sessions),
        }
    }

    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, HerdError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| HerdError::Config(format!("cannot read {}: {e}", path.display())))?;
        Config::from_toml(&text).map_err(|e| match e {
            HerdError::Config(message) => {
                HerdError::Config(format!("{}: {message}", path.display()))
            }
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Config, HerdError> {
        let config: Config =
            toml::from_str(text).map_err(|e| HerdError::Config(located(text, &e)))?;
        config.validate()?;
        Ok(config)
    }

    /// The evaluators in force: the configured ones, or the builtin set
    /// (`default` and `sleep` simulate, `echo` echoes) when none is configured.
    pub fn effective_evaluators(&self) -> Vec<EvaluatorConfig> {
        if self.evaluators.is_empty() {
            vec![
                EvaluatorConfig::builtin(crate::protocol::DEFAULT_FN, EvaluatorKind::Simulate),
                EvaluatorConfig::builtin("sleep", EvaluatorKind::Simulate),
                EvaluatorConfig::builtin("echo", EvaluatorKind::Echo),
            ]
        } else {
            self.evaluators.clone()
        }
    }

    /// Rejects numbers past what the broker can represent or mean: every
    /// time, size and count has an upper bound, named in the message.
    fn check_ranges(&self) -> Result<(), HerdError> {
        const WEEK_MS: u128 = 7 * 86_400_000;
        const DECADE_S: u128 = 10 * 365 * 86_400;
        const GIB: u128 = 1 << 30;
        const TIB: u128 = 1 << 40;
        const COUNT: u128 = 1 << 24;
        let l = &self.limits;
        let c = &self.cluster;
        let mut checks: Vec<(String, u128, u128)> = vec![
            (
                "limits.max_connections".into(),
                l.max_connections as u128,
                COUNT,
            ),
            (
                "limits.max_frame_bytes".into(),
                l.max_frame_bytes as u128,
                GIB,
            ),
            ("limits.max_pending".into(), l.max_pending as u128, COUNT),
            (
                "limits.outbound_queue".into(),
                l.outbound_queue as u128,
                COUNT,
            ),
            (
                "limits.outbound_bytes".into(),
                l.outbound_bytes as u128,
                4 * GIB,
            ),
            (
                "limits.write_timeout_ms".into(),
                l.write_timeout_ms.into(),
                WEEK_MS,
            ),
            ("limits.heartbeat_ms".into(), l.heartbeat_ms.into(), WEEK_MS),
            (
                "limits.drain_timeout_s".into(),
                l.drain_timeout_s.into(),
                WEEK_MS / 1000,
            ),
            (
                "limits.close_timeout_ms".into(),
                l.close_timeout_ms.into(),
                WEEK_MS,
            ),
            (
                "limits.header_timeout_ms".into(),
                l.header_timeout_ms.into(),
                WEEK_MS,
            ),
            ("limits.hub_queue".into(), l.hub_queue as u128, COUNT),
            (
                "limits.ws_read_buffer".into(),
                l.ws_read_buffer as u128,
                GIB,
            ),
            (
                "limits.ws_frame_buffer".into(),
                l.ws_frame_buffer as u128,
                GIB,
            ),
            (
                "limits.ws_write_buffer".into(),
                l.ws_write_buffer as u128,
                GIB,
            ),
            (
                "limits.ws_max_write_buffer".into(),
                l.ws_max_write_buffer as u128,
                4 * GIB,
            ),
            ("limits.write_batch".into(), l.write_batch as u128, COUNT),
            (
                "limits.key_memo_entries".into(),
                l.key_memo_entries as u128,
                COUNT,
            ),
            (
                "limits.key_memo_max_input_bytes".into(),
                l.key_memo_max_input_bytes as u128,
                GIB,
            ),
            (
                "limits.http_max_timeout_ms".into(),
                l.http_max_timeout_ms.into(),
                WEEK_MS,
            ),
            (
                "limits.http_body_timeout_ms".into(),
                l.http_body_timeout_ms.into(),
                WEEK_MS,
            ),
            ("cache.max_bytes".into(), self.cache.max_bytes.into(), TIB),
            ("cache.ttl_s".into(), self.cache.ttl_s.into(), DECADE_S),
            (
                "cache.error_ttl_s".into(),
                self.cache.error_ttl_s.into(),
                DECADE_S,
            ),
            ("cluster.lease_ms".into(), c.lease_ms.into(), WEEK_MS),
            (
                "cluster.down_warning_s".into(),
                c.down_warning_s.into(),
                DECADE_S,
            ),
            (
                "cluster.result_ttl_s".into(),
                c.result_ttl_s.into(),
                DECADE_S,
            ),
            (
                "cluster.redis_timeout_ms".into(),
                c.redis_timeout_ms.into(),
                WEEK_MS,
            ),
            (
                "cluster.notice_inline_bytes".into(),
                c.notice_inline_bytes as u128,
                GIB,
            ),
            (
                "cluster.writeback_max".into(),
                c.writeback_max as u128,
                COUNT,
            ),
            (
                "cluster.progress_per_s".into(),
                c.progress_per_s.into(),
                1000,
            ),
            (
                "dashboard.max_watchers".into(),
                self.dashboard.max_watchers as u128,
                COUNT,
            ),
            (
                "dashboard.history_s".into(),
                self.dashboard.history_s as u128,
                86_400,
            ),
        ];
        for e in &self.evaluators {
            let n = |key: &str| format!("evaluator {:?}: {key}", e.name);
            checks.extend([
                (n("threads"), e.threads as u128, 4096),
                (n("timeout_ms"), e.timeout_ms.into(), WEEK_MS),
                (n("queue_capacity"), e.queue_capacity as u128, COUNT),
                (n("queue_bytes"), e.queue_bytes as u128, 64 * GIB),
                (
                    n("spare_threads"),
                    e.spare_threads.unwrap_or(0) as u128,
                    4096,
                ),
                (
                    n("max_sleep_ms"),
                    e.max_sleep_ms.unwrap_or(0).into(),
                    WEEK_MS,
                ),
                (n("max_input_bytes"), e.max_input_bytes as u128, GIB),
                (
                    n("progress_steps"),
                    e.progress_steps.into(),
                    MAX_PROGRESS_STEPS.into(),
                ),
                (n("grace_ms"), e.grace_ms.into(), WEEK_MS),
                (n("max_output_bytes"), e.max_output_bytes as u128, GIB),
                (
                    n("restart_backoff_ms"),
                    e.restart_backoff_ms.into(),
                    WEEK_MS,
                ),
                (
                    n("restart_backoff_max_ms"),
                    e.restart_backoff_max_ms.into(),
                    WEEK_MS,
                ),
                (n("unhealthy_after"), e.unhealthy_after.into(), COUNT),
                (n("stderr_line_bytes"), e.stderr_line_bytes as u128, GIB),
                (n("max_attempts"), e.max_attempts.into(), 1000),
            ]);
        }
        match checks.into_iter().find(|(_, value, max)| value > max) {
            Some((key, value, max)) => Err(HerdError::Config(format!(
                "{key} is {value}; it may be at most {max}"
            ))),
            None => Ok(()),
        }
    }

    /// Whether clients must present a credential: tokens or signed tokens
    /// are configured.
    pub fn credentialed(&self) -> bool {
        !self.tokens.is_empty() || self.auth.jwt()
    }

    /// Rejects configurations that cannot work, with a message naming the key.
    pub fn validate(&self) -> Result<(), HerdError> {
        let bad = |msg: String| Err(HerdError::Config(msg));
        self.check_ranges()?;
        let l = &self.limits;
        if l.max_connections == 0 {
            return bad("limits.max_connections must be at least 1".into());
        }
        if l.failed_login_addresses == 0 || l.max_idle_connections == 0 {
            return bad(
                "limits.failed_login_addresses and limits.max_idle_connections must be at least 1"
                    .into(),
            );
        }
        if l.max_http_requests == 0 || l.http_body_timeout_ms == 0 {
            return bad(
                "limits.max_http_requests and limits.http_body_timeout_ms must be at least 1"
                    .into(),
            );
        }
        if l.max_frame_bytes < 1024 {
            return bad("limits.max_frame_bytes must be at least 1024".into());
        }
        if l.max_pending == 0 || l.outbound_queue == 0 || l.hub_queue == 0 || l.write_batch == 0 {
            return bad(
                "limits.max_pending, outbound_queue, hub_queue and write_batch must be at least 1"
                    .into(),
            );
        }
        if l.heartbeat_ms < 100 || l.header_timeout_ms < 100 || l.write_timeout_ms < 100 {
            return bad(
                "limits.heartbeat_ms, header_timeout_ms and write_timeout_ms must be at least 100"
                    .into(),
            );
        }
        if l.outbound_bytes < 2 * l.max_frame_bytes {
            return bad("limits.outbound_bytes must be at least 2 * max_frame_bytes".into());
        }
        if self.cluster.redis_timeout_ms >= self.cluster.lease_ms {
            return bad(format!(
                "cluster.redis_timeout_ms ({}) must be less than cluster.lease_ms ({}): a claim must be renewable before its lease runs out",
                self.cluster.redis_timeout_ms, self.cluster.lease_ms
            ));
        }
        if self.cluster.lease_ms < 300 || self.cluster.redis_timeout_ms == 0 {
            return bad(
                "cluster.lease_ms must be at least 300 and cluster.redis_timeout_ms at least 1"
                    .into(),
            );
        }
        if self.dashboard.max_watchers == 0 {
            return bad("dashboard.max_watchers must be at least 1".into());
        }
        if l.ws_read_buffer < 256 {
            return bad("limits.ws_read_buffer must be at least 256".into());
        }
        if l.ws_frame_buffer < 64 || l.ws_frame_buffer > l.ws_read_buffer {
            return bad(
                "limits.ws_frame_buffer must be at least 64 and at most ws_read_buffer".into(),
            );
        }
        if l.ws_max_write_buffer <= l.ws_write_buffer + 2 * l.max_frame_bytes {
            return bad(
                "limits.ws_max_write_buffer must exceed ws_write_buffer + 2 * max_frame_bytes"
                    .into(),
            );
        }
        if self.cache.max_bytes == 0 {
            return bad("cache.max_bytes must be at least 1".into());
        }
        let d = &self.dashboard;
        if d.snapshot_inflight > 500 || d.snapshot_recent > 50 || d.input_preview_chars > 120 {
            return bad("dashboard limits exceed the protocol's (500 in flight, 50 recent, 120 preview characters)".into());
        }
        let mut names = HashSet::new();
        for e in &self.evaluators {
            if e.name.is_empty() {
                return bad("evaluator.fn must not be empty".into());
            }
            if !names.insert(e.name.as_str()) {
                return bad(format!("evaluator fn {:?} is configured twice", e.name));
            }
            if e.threads == 0 || e.queue_capacity == 0 || e.timeout_ms == 0 {
                return bad(format!(
                    "evaluator {:?}: threads, queue_capacity and timeout_ms must be at least 1",
                    e.name
                ));
            }
            if e.queue_bytes < e.max_input_bytes {
                return bad(format!(
                    "evaluator {:?}: queue_bytes must be at least max_input_bytes",
                    e.name
                ));
            }
            if e.max_output_bytes + 1024 > l.outbound_bytes {
                return bad(format!(
                    "evaluator {:?}: max_output_bytes must leave 1 KiB under limits.outbound_bytes",
                    e.name
                ));
            }
            if e.stderr_line_bytes < 80 {
                return bad(format!(
                    "evaluator {:?}: stderr_line_bytes must be at least 80",
                    e.name
                ));
            }
            if e.max_output_bytes + 1024 > l.ws_max_write_buffer {
                return bad(format!(
                    "evaluator {:?}: max_output_bytes must leave 1 KiB under limits.ws_max_write_buffer",
                    e.name
                ));
            }
            if e.unhealthy_after == 0 || e.restart_backoff_max_ms < e.restart_backoff_ms {
                return bad(format!(
                    "evaluator {:?}: unhealthy_after must be at least 1 and restart_backoff_max_ms at least restart_backoff_ms",
                    e.name
                ));
            }
            if e.max_attempts == 0 {
                return bad(format!(
                    "evaluator {:?}: max_attempts must be at least 1",
                    e.name
                ));
            }
            if e.kind == EvaluatorKind::Process && e.command.is_empty() {
                return bad(format!(
                    "evaluator {:?}: kind \"process\" needs a command",
                    e.name
                ));
            }
            if e.kind == EvaluatorKind::Process && e.restart_backoff_ms == 0 {
                return bad(format!(
                    "evaluator {:?}: restart_backoff_ms must be at least 1 (a starting program is watched at that interval)",
                    e.name
                ));
            }
        }
        let mut token_names = HashSet::new();
        for t in &self.tokens {
            let sources = [
                t.secret.is_some(),
                t.secret_env.is_some(),
                t.secret_file.is_some(),
            ];
            if sources.iter().filter(|s| **s).count() != 1 {
                return bad(format!(
                    "token {:?}: give exactly one of secret, secret_env, secret_file",
                    t.name
                ));
            }
            if t.name.is_empty() || !token_names.insert(t.name.as_str()) {
                return bad(format!("token name {:?} is empty or used twice", t.name));
            }
            if t.namespace == "*" && !t.role.may_span_namespaces() {
                return bad(format!(
                    "token {:?}: namespace \"*\" (every namespace) is for roles \"viewer\" and \"worker\"; give role {:?} a namespace of its own",
                    t.name,
                    t.role.as_str()
                ));
            }
            if let Some(fns) = &t.fns {
                if matches!(t.role, Role::Viewer) {
                    return bad(format!(
                        "token {:?}: fns is for roles \"agent\", \"admin\" and \"worker\"",
                        t.name
                    ));
                }
                for f in fns {
                    let known = self.evaluators.iter().find(|e| &e.name == f);
                    let fits = match t.role {
                        Role::Worker => known.is_some_and(|e| e.kind == EvaluatorKind::Remote),
                        _ => known.is_some() || self.evaluators.is_empty(),
                    };
                    if !fits && t.role == Role::Worker {
                        return bad(format!(
                            "token {:?}: fns names {f:?}, which is not a remote evaluator",
                            t.name
                        ));
                    }
                    if !fits {
                        return bad(format!(
                            "token {:?}: fns names {f:?}, which is not an evaluator",
                            t.name
                        ));
                    }
                }
            }
            if t.namespace != "*" && !crate::ns::valid_name(&t.namespace) {
                return bad(format!(
                    "token {:?}: namespace {:?}: {}",
                    t.name,
                    t.namespace,
                    crate::ns::Refused::BadName
                ));
            }
        }
        let mut ns_names = HashSet::new();
        for n in &self.namespaces {
            if !crate::ns::valid_name(&n.name) {
                return bad(format!(
                    "namespace {:?}: {}",
                    n.name,
                    crate::ns::Refused::BadName
                ));
            }
            if !ns_names.insert(n.name.as_str()) {
                return bad(format!("namespace {:?} is configured twice", n.name));
            }
            check_quotas(
                &format!("namespace {:?}", n.name),
                n.submits_per_s,
                [
                    ("max_pending", n.max_pending.map(|v| v as u64)),
                    ("submits_per_s", n.submits_per_s.map(u64::from)),
                    ("burst", n.burst.map(u64::from)),
                    ("max_sessions", n.max_sessions.map(|v| v as u64)),
                    ("cache_bytes", n.cache_bytes),
                ],
            )?;
        }
        let d = &self.namespace_defaults;
        check_quotas(
            "namespace_defaults",
            d.submits_per_s,
            [
                ("max_pending", d.max_pending.map(|v| v as u64)),
                ("submits_per_s", d.submits_per_s.map(u64::from)),
                ("burst", d.burst.map(u64::from)),
                ("max_sessions", d.max_sessions.map(|v| v as u64)),
                ("cache_bytes_together", d.cache_bytes_together),
            ],
        )?;
        let a = &self.auth;
        if a.max_namespaces < 1 + self.namespaces.len() + self.tokens.len() {
            return bad(
                "auth.max_namespaces must be at least 1 + the namespaces and tokens configured"
                    .into(),
            );
        }
        if a.jwt_leeway_s > 3600 {
            return bad("auth.jwt_leeway_s may be at most 3600".into());
        }
        if a.max_namespaces > 1 << 24 || a.namespace_labels > 10_000 {
            return bad(
                "auth.max_namespaces may be at most 16777216 and auth.namespace_labels at most 10000"
                    .into(),
            );
        }
        if !self.credentialed() && !self.listen.ip().is_loopback() && !self.allow_anonymous {
            return bad(format!(
                "refusing to listen on non-loopback {} with no tokens: every client would be an agent; set allow_anonymous = true to allow it",
                self.listen
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluator_sections_alone_are_a_config() {
        let c = Config::from_toml(
            "[[evaluator]]\nfn = \"default\"\nkind = \"simulate\"\nthreads = 4\n",
        )
        .unwrap();
        assert_eq!(c.evaluators.len(), 1);
        assert_eq!(c.evaluators[0].timeout_ms, 30_000);
        assert_eq!(c.limits.max_frame_bytes, 1 << 20);
        assert_eq!(c.listen.port(), 7878);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        assert!(Config::from_toml("nope = 1").is_err());
        assert!(Config::from_toml("[limits]\nheartbeat_ms = 5").is_err());
        assert!(Config::from_toml("listen = \"0.0.0.0:1\"").is_err());
        assert!(Config::from_toml("listen = \"0.0.0.0:1\"\nallow_anonymous = true").is_ok());
        let twice =
            "[[evaluator]]\nfn=\"a\"\nkind=\"echo\"\n[[evaluator]]\nfn=\"a\"\nkind=\"echo\"\n";
        assert!(Config::from_toml(twice).is_err());
    }

    #[test]
    fn numbers_past_their_bounds_are_rejected_by_name() {
        let cases = [
            (
                "[[evaluator]]\nfn=\"a\"\nkind=\"echo\"\ntimeout_ms = 100000000000\n",
                "timeout_ms",
            ),
            ("[cache]\nttl_s = 18446744073709551615\n", "cache.ttl_s"),
            (
                "[[evaluator]]\nfn=\"a\"\nkind=\"echo\"\nmax_output_bytes = 18446744073709551615\n",
                "max_output_bytes",
            ),
            (
                "[cluster]\nlease_ms = 18446744073709551615\n",
                "cluster.lease_ms",
            ),
        ];
        for (text, key) in cases {
            let error = Config::from_toml(text).unwrap_err().to_string();
            assert!(error.contains(key), "{error}");
        }
    }

    #[test]
    fn namespace_quotas_take_the_defaults_their_entry_leaves_unset() {
        let c = Config::from_toml(
            "[namespace_defaults]\nmax_pending = 5\nsubmits_per_s = 10\nburst = 20\nmax_sessions = 3\n[[namespace]]\nname = \"a\"\nmax_sessions = 9\n[[namespace]]\nname = \"b\"\nsubmits_per_s = 1\n",
        )
        .unwrap();
        let of = |name: &str| c.quotas(c.namespaces.iter().find(|n| n.name == name));
        let defaults = Quotas {
            max_pending: Some(5),
            submits_per_s: Some(10),
            burst: Some(20),
            max_sessions: Some(3),
        };
        assert_eq!(of("unlisted"), defaults);
        assert_eq!(
            of("a"),
            Quotas {
                max_sessions: Some(9),
                ..defaults
            }
        );
        // A rate of its own comes with its own burst (by default the rate).
        assert_eq!(
            of("b"),
            Quotas {
                submits_per_s: Some(1),
                burst: None,
                ..defaults
            }
        );
        for (text, says) in [
            (
                "[namespace_defaults]\nmax_sessions = 0\n",
                "namespace_defaults: max_sessions must be at least 1",
            ),
            (
                "[namespace_defaults]\nburst = 4\n",
                "namespace_defaults: burst needs submits_per_s",
            ),
            (
                "[[namespace]]\nname = \"a\"\nmax_pending = 0\ncache_bytes = 0\n",
                "namespace \"a\": max_pending, cache_bytes must be at least 1",
            ),
        ] {
            let error = Config::from_toml(text).unwrap_err().to_string();
            assert!(error.contains(says), "{error}");
        }
    }

    #[test]
    fn shipped_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/herd.toml");
        let c = Config::load(&path).unwrap();
        let names: Vec<_> = c
            .effective_evaluators()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert!(names.contains(&"default".to_string()));
    }
}
