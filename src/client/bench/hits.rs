//! S3 `hits`: the cache-hit path, with requests kept in flight, or sent in
//! batches exactly as `redis-benchmark -P` sends them.

use super::{cpu_seconds, percentile, progress, sorted, Report, Socket, Target};
use futures::{FutureExt, SinkExt, StreamExt};
use serde_json::json;
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// How `hits` and `echo` drive their sessions.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Sessions.
    #[arg(long, default_value_t = 64)]
    pub sessions: usize,
    /// Requests each session keeps in flight, each reply answered by a new
    /// request.
    #[arg(long, default_value_t = 16)]
    pub depth: usize,
    /// Instead of `--depth`: each session sends this many requests in one
    /// write and waits for all their replies before the next write, as
    /// `redis-benchmark -P` does.
    #[arg(long, conflicts_with = "depth")]
    pub pipeline: Option<usize>,
    /// Measured duration, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration_s: f64,
    /// The fn named in the submits.
    #[arg(long = "fn", default_value = "sleep")]
    pub fn_name: String,
}

impl LoadArgs {
    /// `sessions` sending the submits of `inputs` as these flags say.
    fn load(&self, sessions: Vec<Socket>, inputs: &[String]) -> Load {
        Load {
            sessions,
            requests: submits(inputs, &self.fn_name),
            depth: self.depth,
            pipeline: self.pipeline,
            duration_s: self.duration_s,
        }
    }

    fn positive(&self) -> bool {
        self.sessions > 0 && self.depth > 0 && self.pipeline != Some(0)
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct HitsArgs {
    /// Keys evaluated first (not measured).
    #[arg(long, default_value_t = 10_000)]
    pub warm: usize,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Also run `redis-benchmark -t get -c SESSIONS -P PIPELINE` (or
    /// `-P DEPTH`) against a local redis-server and report the ratio.
    #[arg(long)]
    pub redis: bool,
    /// Requests for the redis-benchmark reference run.
    #[arg(long, default_value_t = 2_000_000)]
    pub redis_requests: u64,
    /// Port of the local redis-server for `--redis`.
    #[arg(long, default_value_t = 6379)]
    pub redis_port: u16,
}

struct SessionRun {
    latencies: Vec<f64>,
    misses: u64,
}

pub async fn run(target: &Target, args: &HitsArgs, seed: u64) -> anyhow::Result<Report> {
    anyhow::ensure!(
        args.warm > 0 && args.load.positive(),
        "warm, sessions, depth and pipeline must be positive"
    );
    let inputs = inputs(seed, args.warm);
    if args.redis {
        // redis-benchmark waits forever for a server that is not there.
        tokio::net::TcpStream::connect(("127.0.0.1", args.redis_port))
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "--redis: no redis-server answers on 127.0.0.1:{} ({e}); start one \
                     (redis-server --port {} --daemonize yes) or leave out --redis",
                    args.redis_port,
                    args.redis_port
                )
            })?;
    }
    warm(target, args, &inputs).await?;
    let mut sockets = Vec::with_capacity(args.load.sessions);
    for _ in 0..args.load.sessions {
        sockets.push(target.socket().await?);
    }
    let load = args.load.load(sockets, &inputs);
    let mut report = Report::new("hits");
    let figures = load.run(target.pid, is_cache_hit).await?;
    figures.report(&mut report, ["hits", "misses", "hits_per_s"]);
    if args.redis {
        let redis = redis_reference(args).await?;
        report.add("redis_get_per_s", super::round3(redis));
        report.add(
            "ratio_to_redis",
            super::round3(figures.counted as f64 / figures.elapsed / redis),
        );
    }
    Ok(report)
}

/// The submit frames of `inputs`, as every session sends them.
fn submits(inputs: &[String], fn_name: &str) -> std::sync::Arc<Vec<Utf8Bytes>> {
    std::sync::Arc::new(
        inputs
            .iter()
            .map(|input| {
                Utf8Bytes::from(format!(
                    r#"{{"op":"submit","fn":{},"input":{input}}}"#,
                    json!(fn_name)
                ))
            })
            .collect(),
    )
}

/// Open sessions, the frames they send, and how.
struct Load {
    sessions: Vec<Socket>,
    requests: std::sync::Arc<Vec<Utf8Bytes>>,
    depth: usize,
    pipeline: Option<usize>,
    duration_s: f64,
}

/// What a [`Load`] measured.
struct Figures {
    /// Replies that counted, and their latencies (ms, sorted).
    counted: usize,
    latencies: Vec<f64>,
    others: u64,
    elapsed: f64,
    cpu: Option<f64>,
    depth: usize,
    pipeline: Option<usize>,
}

impl Load {
    /// Drives every session for the duration; `counts` tells the replies
    /// measured from the others.
    async fn run(self, pid: Option<u32>, counts: fn(&str) -> bool) -> anyhow::Result<Figures> {
        let cpu_before = pid.and_then(cpu_seconds);
        let started = Instant::now();
        let end = started + Duration::from_secs_f64(self.duration_s);
        let tasks: Vec<_> = self
            .sessions
            .into_iter()
            .enumerate()
            .map(|(n, ws)| {
                let requests = self.requests.clone();
                match self.pipeline {
                    Some(batch) => {
                        tokio::spawn(batches(ws, requests, n, batch, end, counts).boxed())
                    }
                    None => tokio::spawn(session(ws, requests, n, self.depth, end, counts).boxed()),
                }
            })
            .collect();
        let mut latencies = Vec::new();
        let mut others = 0;
        for t in tasks {
            let run = t.await??;
            latencies.extend(run.latencies);
            others += run.misses;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = match (cpu_before, pid.and_then(cpu_seconds)) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        Ok(Figures {
            counted: latencies.len(),
            latencies: sorted(latencies),
            others,
            elapsed,
            cpu,
            depth: self.depth,
            pipeline: self.pipeline,
        })
    }
}

impl Figures {
    /// Adds the figures, named: the replies counted, the others, and the
    /// rate of the counted; then their latencies and the CPU per million.
    fn report(&self, report: &mut Report, [counted, others, rate]: [&'static str; 3]) {
        match self.pipeline {
            Some(batch) => report.add("pipeline", batch),
            None => report.add("depth", self.depth),
        }
        let n = self.counted as f64;
        report.add(counted, self.counted);
        report.add(others, self.others);
        report.add(rate, super::round3(n / self.elapsed));
        report.ms("p50_ms", percentile(&self.latencies, 50.0));
        report.ms("p99_ms", percentile(&self.latencies, 99.0));
        report.add(
            "cpu_s_per_m",
            self.cpu
                .map(|c| json!(super::round3(c / (n / 1e6))))
                .unwrap_or(json!(null)),
        );
    }
}

async fn warm(target: &Target, args: &HitsArgs, inputs: &[String]) -> anyhow::Result<()> {
    let client = target.client().await?;
    let bar = progress(inputs.len() as u64, "warming");
    let mut pending = futures::stream::iter(inputs.iter().map(|text| {
        let client = client.clone();
        let fn_name = args.load.fn_name.clone();
        let input: serde_json::Value = serde_json::from_str(text).expect("own JSON");
        async move { client.submit(&fn_name, input).await }
    }))
    .buffer_unordered(256);
    while let Some(outcome) = pending.next().await {
        outcome?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    client.close().await;
    Ok(())
}

#[derive(Debug, Clone, clap::Args)]
pub struct EchoArgs {
    /// Distinct frames: the submits `hits` sends for as many inputs.
    #[arg(long, default_value_t = 10_000)]
    pub frames: usize,
    #[command(flatten)]
    pub load: LoadArgs,
}

/// The transport's floor: the client of `hits`, its frames and its
/// pacing, against a WebSocket echo server (`examples/echo_server`, herd's
/// own transport with an echo behind it) instead of a broker.
pub async fn echo(target: &Target, args: &EchoArgs, seed: u64) -> anyhow::Result<Report> {
    anyhow::ensure!(
        args.frames > 0 && args.load.positive(),
        "frames, sessions, depth and pipeline must be positive"
    );
    let mut sessions = Vec::with_capacity(args.load.sessions);
    for _ in 0..args.load.sessions {
        sessions.push(target.raw_socket().await?);
    }
    let load = args.load.load(sessions, &inputs(seed, args.frames));
    let mut report = Report::new("echo");
    let figures = load.run(target.pid, |_| true).await?;
    figures.report(&mut report, ["messages", "others", "messages_per_s"]);
    Ok(report)
}

/// The inputs of `hits` (and of `echo`'s frames) for `seed`.
fn inputs(seed: u64, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| json!({"bench": "hits", "seed": seed, "i": i, "sleep_ms": 0}).to_string())
        .collect()
}

/// One pipelined session: `depth` requests in flight, each reply answered by
/// a new request, replies drained in batches and requests flushed once per batch.
async fn session(
    mut ws: Socket,
    requests: std::sync::Arc<Vec<Utf8Bytes>>,
    offset: usize,
    depth: usize,
    end: Instant,
    counts: fn(&str) -> bool,
) -> anyhow::Result<SessionRun> {
    let mut sent: VecDeque<Instant> = VecDeque::with_capacity(depth);
    let mut next = offset * 7919;
    let mut run = SessionRun {
        latencies: Vec::new(),
        misses: 0,
    };
    let mut feed_next = async |ws: &mut Socket, sent: &mut VecDeque<Instant>| {
        let request = requests[next % requests.len()].clone();
        next += 1;
        sent.push_back(Instant::now());
        ws.feed(Message::Text(request)).await
    };
    for _ in 0..depth {
        feed_next(&mut ws, &mut sent).await?;
    }
    ws.flush().await?;
    while !sent.is_empty() {
        let mut replies = vec![ws.next().await];
        while let Some(more) = ws.next().now_or_never() {
            replies.push(more);
        }
        let now = Instant::now();
        let mut refill = 0;
        for reply in replies {
            match reply {
                Some(Ok(Message::Text(text))) => {
                    let t0 = sent.pop_front().unwrap_or(now);
                    if counts(&text) {
                        run.latencies.push((now - t0).as_secs_f64() * 1000.0);
                    } else {
                        run.misses += 1;
                    }
                    refill += 1;
                }
                Some(Ok(_)) => {}
                other => anyhow::bail!("session ended: {other:?}"),
            }
        }
        if now < end {
            for _ in 0..refill {
                feed_next(&mut ws, &mut sent).await?;
            }
            ws.flush().await?;
        }
    }
    let _ = ws.close(None).await;
    Ok(run)
}

/// One session as `redis-benchmark -P batch` drives a connection: `batch`
/// submits in one write, then all their replies, then the next write.
async fn batches(
    mut ws: Socket,
    requests: std::sync::Arc<Vec<Utf8Bytes>>,
    offset: usize,
    batch: usize,
    end: Instant,
    counts: fn(&str) -> bool,
) -> anyhow::Result<SessionRun> {
    let mut next = offset * 7919;
    let mut run = SessionRun {
        latencies: Vec::new(),
        misses: 0,
    };
    while Instant::now() < end {
        let sent = Instant::now();
        for _ in 0..batch {
            let request = requests[next % requests.len()].clone();
            next += 1;
            ws.feed(Message::Text(request)).await?;
        }
        ws.flush().await?;
        let mut replies = 0;
        while replies < batch {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    replies += 1;
                    if counts(&text) {
                        run.latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                    } else {
                        run.misses += 1;
                    }
                }
                Some(Ok(_)) => {}
                other => anyhow::bail!("session ended: {other:?}"),
            }
        }
    }
    let _ = ws.close(None).await;
    Ok(run)
}

/// `redis-benchmark -t get` with the same connections and pipeline depth;
/// returns GET requests per second.
async fn redis_reference(args: &HitsArgs) -> anyhow::Result<f64> {
    let output = tokio::process::Command::new("redis-benchmark")
        .args([
            "-t",
            "get",
            "-c",
            &args.load.sessions.to_string(),
            "-P",
            &args.load.pipeline.unwrap_or(args.load.depth).to_string(),
            "-n",
            &args.redis_requests.to_string(),
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            &args.redis_port.to_string(),
        ])
        .output()
        .await
        .map_err(|e| anyhow::anyhow!("cannot run redis-benchmark: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    // The last "GET: N requests per second" figure (-q rewrites the line as it goes).
    text.rsplit("GET: ")
        .next()
        .and_then(|tail| tail.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("unexpected redis-benchmark output: {text}"))
}

/// Whether a `result` frame is a cache hit: its last `"source"` member (the
/// broker writes it after the output) is `"cache"`.
fn is_cache_hit(frame: &str) -> bool {
    const SOURCE: &str = r#""source":""#;
    frame
        .rfind(SOURCE)
        .is_some_and(|at| frame[at + SOURCE.len()..].starts_with("cache\""))
}

#[cfg(test)]
mod tests {
    use super::is_cache_hit;

    #[test]
    fn a_hit_is_told_by_the_broker_s_own_source_member() {
        assert!(is_cache_hit(
            r#"{"type":"result","id":1,"output":1,"source":"cache","age_ms":3}"#
        ));
        assert!(is_cache_hit(
            r#"{"type":"result","id":1,"output":1,"source":"cache"}"#
        ));
        let eval = r#"{"type":"result","output":{"source":"cache"},"source":"eval","eval_ms":1.0}"#;
        assert!(!is_cache_hit(eval));
    }
}
