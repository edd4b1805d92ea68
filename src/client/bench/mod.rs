//! `herd bench`: the benchmark scenarios of BENCHMARKS.md, run against a
//! running broker.
//!
//! Each scenario returns a [`Report`]: named figures, printed as a table and
//! written as one JSON object with `--json FILE`. Inputs are derived from
//! the seed, so two runs with the same `--seed` send the same requests (a
//! second run against the same broker therefore finds its results cached);
//! without `--seed` every run draws a fresh one.

pub mod agents;
pub mod burst;
pub mod fanout;
pub mod hits;
pub mod idle;

use crate::client::Client;
use futures::{SinkExt, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use rand::distr::{Alphanumeric, SampleString};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

pub use crate::client::Socket;

/// The broker under test (or the brokers of one cluster).
#[derive(Debug, Clone)]
pub struct Target {
    /// One URL, or one per broker of a cluster: sessions go round-robin.
    pub urls: Vec<String>,
    pub token: Option<String>,
    /// The broker's process id, for memory and CPU figures read from /proc.
    pub pid: Option<u32>,
    /// Said once: the brokers given are part of a larger cluster.
    pub partial_cluster_said: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Target {
    fn url(&self, n: usize) -> &str {
        &self.urls[n % self.urls.len()]
    }

    /// A client of the first broker.
    pub async fn client(&self) -> anyhow::Result<Client> {
        self.client_of(0).await
    }

    /// A client of the `n`-th broker (round-robin over the URLs).
    pub async fn client_of(&self, n: usize) -> anyhow::Result<Client> {
        Ok(Client::connect(self.url(n), self.token.as_deref()).await?)
    }

    /// Opens a raw socket and reads its `hello`.
    pub async fn socket(&self) -> anyhow::Result<Socket> {
        Ok(crate::client::open(self.url(0), self.token.as_deref())
            .await?
            .0)
    }

    /// Opens a socket to a plain WebSocket server, which sends no `hello`
    /// (`herd bench echo`'s echo server).
    pub async fn raw_socket(&self) -> anyhow::Result<Socket> {
        let (socket, _) = tokio_tungstenite::connect_async(self.url(0)).await?;
        Ok(socket)
    }

    /// The `stats` now, its counters summed over every broker.
    pub async fn stats(&self) -> anyhow::Result<Value> {
        let mut total = Map::new();
        for n in 0..self.urls.len() {
            let client = self.client_of(n).await?;
            let stream = client.watch(100).await?;
            futures::pin_mut!(stream);
            let snapshot = tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await?
                .ok_or_else(|| anyhow::anyhow!("no snapshot"))?;
            client.close().await;
            let brokers = snapshot["stats"]["cluster_totals"]["brokers"].as_u64();
            if n == 0
                && brokers.is_some_and(|b| b > self.urls.len() as u64)
                && !self
                    .partial_cluster_said
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                eprintln!(
                    "herd bench: {} is one of {} brokers of a cluster: its figures (evaluations, hits) are those of the brokers given; pass every broker's --url to count the whole cluster",
                    self.url(0),
                    brokers.unwrap_or(0)
                );
            }
            if let Value::Object(stats) = &snapshot["stats"] {
                for (name, value) in stats {
                    let sum = match (total.get(name).and_then(Value::as_i64), value.as_i64()) {
                        (Some(a), Some(b)) => json!(a + b),
                        _ => value.clone(),
                    };
                    total.insert(name.clone(), sum);
                }
            }
        }
        Ok(Value::Object(total))
    }
}

/// Sends one text frame.
pub async fn send_text(ws: &mut Socket, text: String) -> anyhow::Result<()> {
    ws.send(Message::text(text)).await?;
    Ok(())
}

/// The figures of one run, in the order they are printed.
pub struct Report {
    pub scenario: &'static str,
    pub rows: Vec<(&'static str, Value)>,
}

impl Report {
    pub fn new(scenario: &'static str) -> Self {
        Report {
            scenario,
            rows: Vec::new(),
        }
    }

    pub fn add(&mut self, name: &'static str, value: impl Into<Value>) {
        self.rows.push((name, value.into()));
    }

    /// Milliseconds, rounded to microseconds.
    pub fn ms(&mut self, name: &'static str, value: f64) {
        self.add(name, round3(value));
    }

    /// The figure `name`, if reported.
    pub fn value(&self, name: &str) -> Option<&Value> {
        self.rows.iter().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        map.insert("scenario".into(), json!(self.scenario));
        for (k, v) in &self.rows {
            map.insert((*k).to_string(), v.clone());
        }
        Value::Object(map)
    }

    pub fn table(&self) -> String {
        let width = self.rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = format!("herd bench {}\n", self.scenario);
        for (k, v) in &self.rows {
            out.push_str(&format!("  {k:<width$}  {v}\n"));
        }
        out
    }
}

pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Nearest-rank percentile of sorted samples (0 when there are none).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn sorted(mut samples: Vec<f64>) -> Vec<f64> {
    samples.sort_by(f64::total_cmp);
    samples
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// A deterministic input object whose `payload` is `min..=max` bytes long.
pub fn payload_input(
    rng: &mut StdRng,
    scenario: &str,
    seed: u64,
    i: usize,
    min: usize,
    max: usize,
) -> Value {
    let len = rng.random_range(min..=max.max(min));
    json!({
        "bench": scenario,
        "seed": seed,
        "i": i,
        "payload": Alphanumeric.sample_string(rng, len),
    })
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Resident memory of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time of all threads of `pid`, in seconds (from `/proc/<pid>/task/*/schedstat`).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let mut total_ns: u64 = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        if let Ok(text) = std::fs::read_to_string(path) {
            total_ns += text.split_whitespace().next()?.parse::<u64>().ok()?;
        }
    }
    Some(total_ns as f64 / 1e9)
}

/// Runs a scenario and, given the broker's pid, adds the broker's CPU
/// seconds spent during it and its resident memory after it.
pub async fn with_broker_figures(
    pid: Option<u32>,
    scenario: impl std::future::Future<Output = anyhow::Result<Report>>,
) -> anyhow::Result<Report> {
    let cpu_before = pid.and_then(cpu_seconds);
    let mut report = scenario.await?;
    if let Some(pid) = pid {
        let cpu = cpu_before
            .zip(cpu_seconds(pid))
            .map(|(before, after)| round3(after - before));
        report.add("broker_cpu_s", cpu);
        report.add(
            "broker_rss_mb",
            rss_kib(pid).map(|kib| round3(kib as f64 / 1024.0)),
        );
    }
    Ok(report)
}

/// Difference of a counter between two `stats` objects.
pub fn delta(before: &Value, after: &Value, name: &str) -> u64 {
    after[name]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(before[name].as_u64().unwrap_or(0))
}
