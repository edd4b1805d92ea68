//! The cluster's figures for the page: every lease each broker publishes its
//! counters (`<prefix>broker:<node>:<run>`, kept three leases, listed in
//! the sorted set `<prefix>brokers` by time) and reads every live broker's.

use super::{timed, Conn, Connector, LastError};
use crate::metrics::{BrokerFigures, Metrics, Totals};
use redis::AsyncCommands;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What a broker says of itself.
pub struct Exchange {
    pub node: String,
    /// This process's part of its name in Redis.
    pub run: String,
    pub prefix: String,
    pub lease: Duration,
    pub limit: Duration,
    /// The longest figures read; longer ones are not ours.
    pub max: usize,
    /// This broker's own counters, now.
    pub local: Box<dyn Fn() -> Totals + Send + Sync>,
}

/// Publishes and reads the figures every lease until `stop`.
pub async fn exchange(
    exchange: Exchange,
    connector: Connector,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let started_ms = crate::protocol::unix_ms();
    let mut ticks = tokio::time::interval(exchange.lease);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut made = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let status = *metrics.cluster_status.lock().expect("not poisoned");
        let read = match (status, connector.conn(&mut made).await) {
            (Some(status), Some(conn)) if status.up() => {
                let mine = BrokerFigures {
                    node: exchange.node.clone(),
                    up_since_ms: started_ms,
                    pubsub: status.pubsub,
                    claims: status.claims as u64,
                    takeovers: status.takeovers,
                    l2_hits: status.l2_hits,
                    counters: (exchange.local)(),
                };
                once(&exchange, conn, &mine, &connector.last_error).await
            }
            // Away: the cluster's figures are unknown.
            _ => None,
        };
        if read.is_none() {
            made = None;
        }
        *metrics.cluster_totals.lock().expect("not poisoned") = read;
    }
}

/// One exchange: this broker's figures stored, every live broker's read.
async fn once(
    exchange: &Exchange,
    conn: Conn,
    mine: &BrokerFigures,
    errors: &LastError,
) -> Option<(Totals, Vec<BrokerFigures>)> {
    let own = serde_json::to_string(mine).expect("figures serialize");
    let prefix = &exchange.prefix;
    let member = format!("{}:{}", exchange.node, exchange.run);
    let keep_ms = exchange.lease.as_millis() as u64 * 3;
    let now_ms = crate::protocol::unix_ms();
    let limit = exchange.limit;
    let set = format!("{prefix}brokers");
    let mut c = conn.clone();
    let store = redis::cmd("SET")
        .arg(format!("{prefix}broker:{member}"))
        .arg(&own)
        .arg("PX")
        .arg(keep_ms)
        .to_owned();
    let () = timed(limit, errors, store.query_async(&mut c)).await?;
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
    let (members,): (Vec<String>,) = timed(limit, errors, update.query_async(&mut c)).await?;
    let reads = members.iter().map(|member| {
        let (mut c, name) = (conn.clone(), format!("{prefix}broker:{member}"));
        async move { timed(limit, errors, c.get::<_, Option<String>>(name)).await }
    });
    let mut totals = Totals::default();
    let mut brokers = Vec::new();
    for read in futures::future::join_all(reads).await {
        match read? {
            Some(text) if text.len() <= exchange.max => {
                if let Ok(theirs) = serde_json::from_str::<BrokerFigures>(&text) {
                    totals.add(&theirs.counters);
                    brokers.push(theirs);
                }
            }
            // Gone (that broker stopped) or not ours.
            _ => {}
        }
    }
    brokers.sort_by(|a, b| a.node.cmp(&b.node));
    Some((totals, brokers))
}
