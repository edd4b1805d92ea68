//! Cluster mode's I/O: the shell around the core's cluster decisions.
//!
//! What to claim, store, look up, renew, write back and drop, and how to
//! read each reply, is decided in the core ([`herd_core::cluster`]); the
//! hub performs each [`RedisOp`] it chooses by handing it to this shell,
//! and feeds the reply back as [`herd_core::Input::Redis`]. Three tasks:
//!
//! - [`Shell::run`] sends each command (the core's scripts, verbatim) on one
//!   multiplexed connection, side by side, each bounded by
//!   `redis_timeout_ms`; a command not answered in time comes back as no
//!   reply, and the core counts Redis as away;
//! - [`listen`] keeps one subscription to the completion channel, pings it
//!   every third of a lease, and hands the hub what it sees
//!   ([`PubsubEvent`]);
//! - [`exchange`] publishes this broker's counters every lease and
//!   reads every broker's, for the cluster's totals on the page.
//!
//! The hub never awaits any of them: commands go out on an unbounded
//! channel (the core bounds what is in flight by the jobs and keys it
//! holds) and come back on a bounded one.

mod figures;

pub use figures::{exchange, Exchange};

use crate::config::ClusterConfig;
use herd_core::redis::{Acquired, ACQUIRE, BOOT, DROP, FINISH, RAISE, RELEASE, RENEW, SYNC};
use herd_core::{OpId, PubsubEvent, RedisOp, RedisReply};
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::Script;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What the shell tells the hub.
#[derive(Debug)]
pub enum ShellEvent {
    /// Redis's reply to command `op`; None: not answered in time.
    Reply { op: OpId, reply: Option<RedisReply> },
    /// What the completion channel's listener saw.
    Pubsub(PubsubEvent),
}

/// A connection to one Redis, or to a Redis Cluster (commands routed by
/// key; a key's claim and result share a hash slot).
#[derive(Clone)]
pub enum Conn {
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

/// Makes connections: a lazy connection manager for one Redis, or Redis
/// Cluster connections on demand.
#[derive(Clone)]
pub struct Connector {
    client: redis::Client,
    /// What Redis (or the wait for it) said when a command last failed.
    last_error: Arc<LastError>,
    single: Option<Arc<Single>>,
    cluster: Option<ClusterClient>,
    limit: Duration,
}

/// The connection manager of one Redis. A manager whose first connection
/// Redis refused (a wrong password) keeps that refusal for good, so it is
/// replaced by a new one after such a refusal: a broker started before
/// Redis was given its password joins once it has been.
struct Single {
    manager: std::sync::RwLock<ConnectionManager>,
    config: redis::aio::ConnectionManagerConfig,
}

impl Single {
    fn new(
        client: &redis::Client,
        config: redis::aio::ConnectionManagerConfig,
    ) -> Result<Single, crate::HerdError> {
        Ok(Single {
            manager: std::sync::RwLock::new(Single::manager(client, &config)?),
            config,
        })
    }

    fn manager(
        client: &redis::Client,
        config: &redis::aio::ConnectionManagerConfig,
    ) -> Result<ConnectionManager, crate::HerdError> {
        ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
            .map_err(|e| crate::HerdError::Config(format!("cluster.redis: {e}")))
    }

    fn current(&self) -> ConnectionManager {
        self.manager
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Starts over with a new manager (connecting when first used).
    fn renew(&self, client: &redis::Client) {
        if let Ok(fresh) = Single::manager(client, &self.config) {
            *self.manager.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        }
    }
}

impl Connector {
    pub(crate) fn new(config: &ClusterConfig) -> Result<Connector, crate::HerdError> {
        let url = config.redis.clone().unwrap_or_default();
        let client = redis::Client::open(url.as_str()).map_err(|e| {
            crate::HerdError::Config(format!("cluster.redis {:?}: {e}", redacted(&url)))
        })?;
        let limit = Duration::from_millis(config.redis_timeout_ms);
        let (single, cluster) = if config.redis_cluster {
            let cluster = ClusterClient::builder(vec![url.clone()])
                .connection_timeout(limit)
                .response_timeout(limit)
                .build()
                .map_err(|e| crate::HerdError::Config(format!("cluster.redis: {e}")))?;
            (None, Some(cluster))
        } else {
            let manager_config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(limit))
                .set_response_timeout(Some(limit))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(config.lease_ms));
            (Some(Arc::new(Single::new(&client, manager_config)?)), None)
        };
        Ok(Connector {
            client,
            last_error: Arc::default(),
            single,
            cluster,
            limit,
        })
    }

    /// What Redis said when a command last failed (or that it did not
    /// answer in time); None before any failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok()?.clone()
    }

    /// A connection to send on; None when a Redis Cluster one cannot be
    /// made now.
    pub(crate) async fn conn(&self, made: &mut Option<Conn>) -> Option<Conn> {
        if let Some(single) = &self.single {
            if self.last_error.take_refusal() {
                single.renew(&self.client);
            }
            return Some(Conn::Single(single.current()));
        }
        if made.is_none() {
            let cluster = self.cluster.as_ref()?;
            match tokio::time::timeout(self.limit, cluster.get_async_connection()).await {
                Ok(Ok(conn)) => *made = Some(Conn::Cluster(conn)),
                Ok(Err(error)) => {
                    self.last_error.record(error.to_string());
                    return None;
                }
                Err(_) => {
                    self.last_error.record(no_reply(self.limit));
                    return None;
                }
            }
        }
        made.clone()
    }
}

/// Says in the log when the cluster is down: a WARN with Redis's own words
/// once Redis has had `grace` to answer and every `every` after that while
/// it stays down (a broker that never joined its cluster serves alone,
/// which `herd_cluster_up 0` alone would not tell), and an INFO when it
/// is up again.
pub async fn warn_while_down(
    connector: Connector,
    up: impl Fn() -> bool + Send,
    grace: Duration,
    every: Duration,
    stop: CancellationToken,
) {
    let started = tokio::time::Instant::now();
    let mut warned: Option<tokio::time::Instant> = None;
    let mut ticks = tokio::time::interval(grace.min(every).max(Duration::from_millis(100)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if up() {
            if warned.take().is_some() {
                tracing::info!("cluster: Redis answers again; this broker is back in its cluster");
            }
            continue;
        }
        if started.elapsed() < grace || warned.is_some_and(|at| at.elapsed() < every) {
            continue;
        }
        let error = connector
            .last_error()
            .unwrap_or_else(|| "no answer yet".into());
        tracing::warn!(
            %error,
            "cluster: Redis is unreachable; this broker serves alone, without its cluster, until it is (herd_cluster_up 0)"
        );
        warned = Some(tokio::time::Instant::now());
    }
}

/// Sends the core's commands to Redis.
pub struct Shell {
    connector: Connector,
    limit: Duration,
    hub: mpsc::Sender<ShellEvent>,
}

impl Shell {
    pub fn new(
        config: &ClusterConfig,
        hub: mpsc::Sender<ShellEvent>,
    ) -> Result<Shell, crate::HerdError> {
        Ok(Shell {
            connector: Connector::new(config)?,
            limit: Duration::from_millis(config.redis_timeout_ms),
            hub,
        })
    }

    pub fn connector(&self) -> Connector {
        self.connector.clone()
    }

    /// Sends every command that comes in, side by side, until `stop` is
    /// cancelled or the hub is gone.
    pub async fn run(
        self,
        mut commands: mpsc::UnboundedReceiver<(OpId, RedisOp)>,
        stop: CancellationToken,
    ) {
        use futures::StreamExt;
        let scripts = Scripts::new();
        let mut cluster_conn: Option<Conn> = None;
        let mut io = futures::stream::FuturesUnordered::new();
        let mut batch = Vec::with_capacity(256);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                n = commands.recv_many(&mut batch, 256) => {
                    if n == 0 {
                        return;
                    }
                    for (op, cmd) in batch.drain(..) {
                        let conn = self.connector.conn(&mut cluster_conn).await;
                        let limit = self.limit;
                        let scripts = scripts.clone();
                        let errors = Arc::clone(&self.connector.last_error);
                        io.push(async move {
                            let reply = match conn {
                                Some(conn) => perform(conn, cmd, &scripts, limit, &errors).await,
                                None => None,
                            };
                            (op, reply)
                        });
                    }
                }
                Some((op, reply)) = io.next(), if !io.is_empty() => {
                    if reply.is_none() && self.connector.single.is_none() {
                        // A Redis Cluster connection is made again.
                        cluster_conn = None;
                    }
                    if self.hub.send(ShellEvent::Reply { op, reply }).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// The core's scripts, loaded once per process.
#[derive(Clone)]
struct Scripts {
    acquire: Script,
    finish: Script,
    renew: Script,
    release: Script,
    raise: Script,
    sync: Script,
    boot: Script,
    drop: Script,
}

impl Scripts {
    fn new() -> Scripts {
        Scripts {
            acquire: Script::new(ACQUIRE),
            finish: Script::new(FINISH),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
            raise: Script::new(RAISE),
            sync: Script::new(SYNC),
            boot: Script::new(BOOT),
            drop: Script::new(DROP),
        }
    }
}

/// The last failure of a Redis command, as Redis worded it.
#[derive(Default)]
pub struct LastError {
    text: std::sync::Mutex<Option<String>>,
    /// Redis refused the credentials since this was last taken.
    refused: std::sync::atomic::AtomicBool,
}

impl LastError {
    fn record(&self, error: String) {
        if let Ok(mut last) = self.text.lock() {
            *last = Some(error);
        }
    }

    /// Records a command's failure, and whether it was Redis refusing
    /// the broker's credentials.
    fn record_error(&self, error: &redis::RedisError) {
        if error.kind() == redis::ErrorKind::AuthenticationFailed {
            self.refused
                .store(true, std::sync::atomic::Ordering::Release);
        }
        self.record(error.to_string());
    }

    /// Whether Redis refused the credentials since the last call.
    fn take_refusal(&self) -> bool {
        self.refused
            .swap(false, std::sync::atomic::Ordering::AcqRel)
    }

    fn lock(&self) -> std::sync::LockResult<std::sync::MutexGuard<'_, Option<String>>> {
        self.text.lock()
    }
}

/// The failure of a command that got no reply within `limit`.
fn no_reply(limit: Duration) -> String {
    format!(
        "no reply within {} ms (cluster.redis_timeout_ms)",
        limit.as_millis()
    )
}

/// A Redis call under `limit`; None when it failed or took longer (the
/// failure is recorded in `errors`).
async fn timed<T>(
    limit: Duration,
    errors: &LastError,
    op: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Option<T> {
    match tokio::time::timeout(limit, op).await {
        Ok(Ok(value)) => Some(value),
        Ok(Err(error)) => {
            tracing::debug!(%error, "cluster: Redis command failed");
            errors.record_error(&error);
            None
        }
        Err(_) => {
            errors.record(no_reply(limit));
            None
        }
    }
}

/// Sends one command and reads its reply as the core expects it.
async fn perform(
    mut conn: Conn,
    cmd: RedisOp,
    scripts: &Scripts,
    limit: Duration,
    errors: &LastError,
) -> Option<RedisReply> {
    match cmd {
        RedisOp::Ping => {
            let _: String = timed(limit, errors, redis::cmd("PING").query_async(&mut conn)).await?;
            Some(RedisReply::Pong)
        }
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
            let named = format!(
                "\"claim\":{}",
                serde_json::to_string(&wait_for).unwrap_or_default()
            );
            let mut invocation = scripts.acquire.key(result);
            invocation
                .key(claim)
                .key(waited)
                .key(waited_result)
                .key(dropped)
                .arg(value)
                .arg(lease_ms)
                .arg(since_ms)
                .arg(wait_for)
                .arg(named);
            let (kind, text): (i64, String) =
                timed(limit, errors, invocation.invoke_async(&mut conn)).await?;
            Some(RedisReply::Acquired(match kind {
                1 => Acquired::Found(text),
                2 => Acquired::Claimed,
                _ => Acquired::Held(text),
            }))
        }
        RedisOp::Read { names } => {
            let mget = redis::cmd("MGET").arg(&names).to_owned();
            let found: Vec<Option<String>> =
                timed(limit, errors, mget.query_async(&mut conn)).await?;
            Some(RedisReply::Values(found))
        }
        RedisOp::Finish {
            result,
            claim,
            dropped,
            boot,
            began_under,
            token,
            stored,
            ttl_s,
            keep,
            replace_before_ms,
            channel,
            notice,
            shared,
        } => {
            let mut invocation = scripts.finish.key(result);
            invocation.key(claim).key(dropped);
            // On a Redis Cluster the boot marker is on another slot.
            if !matches!(conn, Conn::Cluster(_)) && !boot.is_empty() {
                invocation.key(boot);
            }
            invocation
                .arg(token)
                .arg(stored)
                .arg(ttl_s)
                .arg(if keep { "1" } else { "0" })
                .arg(channel)
                .arg(notice)
                .arg(shared)
                .arg(replace_before_ms)
                .arg(began_under);
            let (stored, current): (i64, String) =
                timed(limit, errors, invocation.invoke_async(&mut conn)).await?;
            Some(RedisReply::Finished {
                stored: stored == 1,
                current: (!current.is_empty()).then_some(current),
                dropped: stored == 2,
            })
        }
        RedisOp::Renew { claims, lease_ms } => {
            let renewals = claims.into_iter().map(|(name, value)| {
                let mut conn = conn.clone();
                let mut invocation = scripts.renew.key(name);
                invocation.arg(value).arg(lease_ms);
                async move { timed::<i64>(limit, errors, invocation.invoke_async(&mut conn)).await }
            });
            let renewed: Option<Vec<i64>> = futures::future::join_all(renewals)
                .await
                .into_iter()
                .collect();
            Some(RedisReply::Renewed(
                renewed?.into_iter().map(|n| n == 1).collect(),
            ))
        }
        RedisOp::Release { claim, value } => {
            let mut invocation = scripts.release.key(claim);
            invocation.arg(value);
            let _: i64 = timed(limit, errors, invocation.invoke_async(&mut conn)).await?;
            Some(RedisReply::Done)
        }
        RedisOp::Raise {
            hash,
            field,
            at_least,
        } => {
            let mut invocation = scripts.raise.key(hash);
            invocation.arg(field).arg(at_least);
            let epoch: u64 = timed(limit, errors, invocation.invoke_async(&mut conn)).await?;
            Some(RedisReply::Raised(epoch))
        }
        RedisOp::Sync {
            hashes,
            boot,
            candidate,
        } => {
            let mut marker = scripts.boot.key(boot);
            marker.arg(candidate);
            let mut boot_conn = conn.clone();
            let boot = async move {
                timed::<String>(limit, errors, marker.invoke_async(&mut boot_conn)).await
            };
            let reads = hashes.into_iter().map(|(hash, known)| {
                let mut conn = conn.clone();
                let mut invocation = scripts.sync.key(hash);
                for (field, epoch) in known {
                    invocation.arg(field).arg(epoch);
                }
                async move {
                    let all: HashMap<String, u64> =
                        timed(limit, errors, invocation.invoke_async(&mut conn)).await?;
                    let mut all: Vec<(String, u64)> = all.into_iter().collect();
                    all.sort_unstable();
                    Some(all)
                }
            });
            let (read, boot) = futures::future::join(futures::future::join_all(reads), boot).await;
            let hashes: Option<Vec<Vec<(String, u64)>>> = read.into_iter().collect();
            Some(RedisReply::Epochs {
                hashes: hashes?,
                boot: boot?,
            })
        }
        RedisOp::Publish { channel, message } => {
            let publish = redis::cmd("PUBLISH").arg(channel).arg(message).to_owned();
            let _: i64 = timed(limit, errors, publish.query_async(&mut conn)).await?;
            Some(RedisReply::Done)
        }
        RedisOp::Drop {
            names,
            dropped,
            before_ms,
            ttl_s,
            channel,
            notice,
        } => {
            let mut invocation = scripts.drop.key(dropped);
            for name in names {
                invocation.key(name);
            }
            invocation
                .arg(before_ms)
                .arg(ttl_s)
                .arg(channel)
                .arg(notice);
            let _: i64 = timed(limit, errors, invocation.invoke_async(&mut conn)).await?;
            Some(RedisReply::Done)
        }
    }
}

/// Keeps one subscription to the completion channel, made again after it
/// drops, and hands the hub what it sees. The subscription is pinged every
/// `ping`: one that is open but silent (a dead peer, a stalled proxy)
/// counts as down after `timeout` and is made again.
pub struct Listener {
    pub channel: String,
    pub hub: mpsc::Sender<ShellEvent>,
    pub ping: Duration,
    pub timeout: Duration,
    pub max_stored: usize,
}

pub async fn listen(listener: Listener, connector: Connector, stop: CancellationToken) {
    use futures::StreamExt;
    let Listener {
        channel,
        hub,
        ping,
        timeout,
        max_stored,
    } = listener;
    let tell = |event| {
        let hub = hub.clone();
        async move { hub.send(ShellEvent::Pubsub(event)).await.is_ok() }
    };
    loop {
        let subscribed = async {
            let (mut sink, stream) = connector.client.get_async_pubsub().await?.split();
            sink.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>((sink, stream))
        };
        if let Ok(Ok((mut sink, mut messages))) = tokio::time::timeout(timeout, subscribed).await {
            if !tell(PubsubEvent::Subscribed).await {
                return;
            }
            let mut pings = tokio::time::interval(ping);
            pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            pings.tick().await;
            loop {
                let message = tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = pings.tick() => {
                        // On a subscribed connection Redis answers a PING
                        // with the array ["pong", ""], after every message
                        // published before Redis read it.
                        let sent = tokio::time::Instant::now().into_std();
                        let pong = tokio::time::timeout(timeout, sink.ping::<redis::Value>()).await;
                        if !matches!(pong, Ok(Ok(_))) {
                            tracing::debug!("cluster: the completion channel did not answer a ping");
                            break;
                        }
                        if !tell(PubsubEvent::Pong { sent }).await {
                            return;
                        }
                        continue;
                    }
                    m = messages.next() => m,
                };
                let Some(message) = message else { break };
                let Ok(text) = message.get_payload::<String>() else {
                    continue;
                };
                if text.len() <= max_stored && !tell(PubsubEvent::Message(text)).await {
                    return;
                }
            }
        }
        if !tell(PubsubEvent::Down).await {
            return;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(timeout) => {}
        }
    }
}

/// A Redis URL fit to print: its password (and user) replaced by `***`.
pub fn redacted(url: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((head, query)) => (head, Some(query)),
        None => (url, None),
    };
    let mut shown = match head.split_once("://") {
        Some((scheme, rest)) => {
            let host_end = rest.find('/').unwrap_or(rest.len());
            match rest[..host_end].rfind('@') {
                Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
                None => head.to_string(),
            }
        }
        None => head.to_string(),
    };
    // `redis+unix://` and `unix://` URLs carry the password as `?pass=`.
    if let Some(query) = query {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _))
                    if name.eq_ignore_ascii_case("pass")
                        || name.eq_ignore_ascii_case("password") =>
                {
                    format!("{name}=***")
                }
                _ => pair.to_string(),
            })
            .collect();
        shown.push('?');
        shown.push_str(&pairs.join("&"));
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::redacted;

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
        assert_eq!(
            redacted("redis+unix:///run/redis.sock?db=x&pass=s3cret"),
            "redis+unix:///run/redis.sock?db=x&pass=***"
        );
        assert_eq!(
            redacted("unix:///run/redis.sock?user=u&password=s3cret"),
            "unix:///run/redis.sock?user=u&password=***"
        );
    }
}
