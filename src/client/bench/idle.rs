//! S5 `idle`: many quiet sessions, and what they cost the broker.

use super::{progress, rss_kib, Report, Target};
use std::time::Duration;

#[derive(Debug, Clone, clap::Args)]
pub struct IdleArgs {
    /// Sessions to open and hold.
    #[arg(long, default_value_t = 20_000)]
    pub sessions: usize,
    /// How long to hold them, seconds.
    #[arg(long, default_value_t = 10)]
    pub hold_s: u64,
    /// Connections opened at the same time.
    #[arg(long, default_value_t = 256)]
    pub connect_parallel: usize,
}

/// Descriptors kept free for reading /proc, the stats session and the like.
const SPARE_FDS: u64 = 64;

/// The open-file limit of `pid` (from /proc/<pid>/limits), or of this process.
fn open_files_limit(pid: Option<u32>) -> Option<u64> {
    let path = pid.map_or("/proc/self/limits".to_string(), |p| {
        format!("/proc/{p}/limits")
    });
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

pub async fn run(target: &Target, args: &IdleArgs) -> anyhow::Result<Report> {
    // Each session is a descriptor here and one in the broker: open no more
    // than both allow, with some to spare.
    let allowed = [
        open_files_limit(None),
        target.pid.and_then(|p| open_files_limit(Some(p))),
    ]
    .into_iter()
    .flatten()
    .map(|limit| limit.saturating_sub(SPARE_FDS) as usize)
    .min()
    .unwrap_or(args.sessions);
    let sessions = args.sessions.min(allowed);
    if sessions < args.sessions {
        eprintln!(
            "herd bench: opening {sessions} sessions instead of {}: the open-file limits allow no more",
            args.sessions
        );
    }
    let rss_before = target.pid.and_then(rss_kib);
    let bar = progress(sessions as u64, "connecting");
    let mut sockets = Vec::with_capacity(sessions);
    let mut opening = futures::stream::iter((0..sessions).map(|_| target.socket()))
        .buffer_unordered(args.connect_parallel.max(1));
    let mut failures = 0usize;
    use futures::StreamExt;
    while let Some(socket) = opening.next().await {
        match socket {
            Ok(ws) => sockets.push(ws),
            Err(_) => failures += 1,
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    tokio::time::sleep(Duration::from_secs(args.hold_s)).await;
    let rss_after = target.pid.and_then(rss_kib);
    let mut report = Report::new("idle");
    report.add("sessions_asked", args.sessions);
    report.add("sessions", sockets.len());
    report.add("failed", failures);
    match (rss_before, rss_after) {
        (Some(before), Some(after)) => {
            report.add("rss_before_mb", super::round3(before as f64 / 1024.0));
            report.add("rss_after_mb", super::round3(after as f64 / 1024.0));
            report.add(
                "kib_per_session",
                super::round3(after.saturating_sub(before) as f64 / sockets.len().max(1) as f64),
            );
        }
        _ => {
            report.add("rss_before_mb", serde_json::Value::Null);
            report.add("rss_after_mb", serde_json::Value::Null);
            report.add("kib_per_session", serde_json::Value::Null);
        }
    }
    drop(sockets);
    Ok(report)
}
