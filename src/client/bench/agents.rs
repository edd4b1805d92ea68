//! S1 `agents`: many agents, a Zipf mix of inputs, many identical requests.

use super::{delta, payload_input, percentile, progress, rng, sorted, Report, Target};
use crate::client::Source;
use rand_distr::{Distribution, Zipf};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone, clap::Args)]
pub struct AgentsArgs {
    /// Agents, one WebSocket session each.
    #[arg(long, default_value_t = 20)]
    pub agents: usize,
    /// Submits in flight across all agents.
    #[arg(long, default_value_t = 50)]
    pub inflight: usize,
    /// Submits in all.
    #[arg(long, default_value_t = 20_000)]
    pub submits: usize,
    /// Distinct inputs the submits are drawn from.
    #[arg(long, default_value_t = 2_000)]
    pub distinct: usize,
    /// Zipf exponent of the draw.
    #[arg(long, default_value_t = 1.1)]
    pub zipf_s: f64,
    /// Smallest input payload, bytes.
    #[arg(long, default_value_t = 256)]
    pub min_payload: usize,
    /// Largest input payload, bytes.
    #[arg(long, default_value_t = 1024)]
    pub max_payload: usize,
    /// Evaluator to use (15-30 ms per key with the shipped config).
    #[arg(long = "fn", default_value = "sleep")]
    pub fn_name: String,
    /// Also report "hop_p50_ms"/"hop_p99_ms": latency of evaluated submits
    /// minus the key's nominal evaluation time (15 ms plus the key's seed
    /// modulo 16, as the builtin simulate and examples/sleep_worker.py
    /// sleep), which includes any remote hop.
    #[arg(long)]
    pub nominal_sleep: bool,
    /// Run S1 twice, alone and then beside a flood: sessions with this
    /// token (a credential of another namespace) submitting fresh inputs
    /// as fast as they can; reports S1's latency both ways.
    #[arg(long)]
    pub flood_token: Option<String>,
    /// Flooding sessions.
    #[arg(long, default_value_t = 4)]
    pub flood_sessions: usize,
    /// Submits each flooding session keeps in flight.
    #[arg(long, default_value_t = 64)]
    pub flood_inflight: usize,
    /// Two priorities, HIGH,LOW: even agents submit at HIGH, odd ones at
    /// LOW; reports each class's latency ("high_p99_ms", "low_p99_ms").
    #[arg(long, value_delimiter = ',')]
    pub priority_split: Vec<u8>,
}

/// What the flood's submits got.
#[derive(Default)]
struct FloodCounts {
    results: AtomicUsize,
    rate_limited: AtomicUsize,
    busy: AtomicUsize,
    other: AtomicUsize,
}

/// S1, alone and then beside another namespace's flood (`--flood-token`).
pub async fn run(target: &Target, args: &AgentsArgs, seed: u64) -> anyhow::Result<Report> {
    let Some(token) = &args.flood_token else {
        return run_s1(target, args, seed).await;
    };
    let alone = run_s1(target, args, seed).await?;
    let flood_target = Target {
        token: Some(token.clone()),
        pid: None,
        ..target.clone()
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let counts = Arc::new(FloodCounts::default());
    let mut flooders = Vec::new();
    for session in 0..args.flood_sessions {
        let client = flood_target.client_of(session).await?;
        for lane in 0..args.flood_inflight {
            let (client, stop, counts) = (client.clone(), stop.clone(), Arc::clone(&counts));
            let fn_name = args.fn_name.clone();
            flooders.push(tokio::spawn(async move {
                for n in 0u64.. {
                    let input = serde_json::json!({"flood": seed, "s": session, "l": lane, "n": n});
                    let outcome = tokio::select! {
                        _ = stop.cancelled() => return,
                        o = client.submit(&fn_name, input) => o,
                    };
                    let counter = match outcome {
                        Ok(_) => &counts.results,
                        Err(crate::client::ClientError::RateLimited { .. }) => &counts.rate_limited,
                        Err(crate::client::ClientError::Busy(_)) => &counts.busy,
                        Err(_) => &counts.other,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    let started = Instant::now();
    let flooded = run_s1(target, args, seed.wrapping_add(1)).await;
    let flood_s = started.elapsed().as_secs_f64();
    stop.cancel();
    for f in flooders {
        let _ = f.await;
    }
    let mut report = flooded?;
    let p99 = |r: &Report| r.value("p99_ms").and_then(|v| v.as_f64()).unwrap_or(0.0);
    for name in ["p50_ms", "p99_ms", "evaluations", "throughput"] {
        if let Some(v) = alone.value(name) {
            report.add(alone_name(name), v.clone());
        }
    }
    if p99(&alone) > 0.0 {
        report.add("p99_ratio", super::round3(p99(&report) / p99(&alone)));
    }
    let get = |c: &AtomicUsize| c.load(Ordering::Relaxed);
    report.add("flood_results", get(&counts.results));
    report.add("flood_rate_limited", get(&counts.rate_limited));
    report.add("flood_busy", get(&counts.busy));
    report.add("flood_other_errors", get(&counts.other));
    report.add(
        "flood_results_per_s",
        super::round3(get(&counts.results) as f64 / flood_s),
    );
    Ok(report)
}

/// The name of S1's figure `name` when it ran alone.
fn alone_name(name: &str) -> &'static str {
    match name {
        "p50_ms" => "alone_p50_ms",
        "p99_ms" => "alone_p99_ms",
        "evaluations" => "alone_evaluations",
        _ => "alone_throughput",
    }
}

struct Sample {
    /// Its agent's class: false for the first (HIGH) of `--priority-split`.
    low: bool,
    latency_ms: f64,
    eval_ms: Option<f64>,
    /// The key's nominal evaluation time (ms), for evaluated submits.
    nominal_ms: Option<f64>,
}

async fn run_s1(target: &Target, args: &AgentsArgs, seed: u64) -> anyhow::Result<Report> {
    anyhow::ensure!(
        args.agents > 0 && args.inflight >= args.agents,
        "need inflight >= agents > 0"
    );
    anyhow::ensure!(
        args.priority_split
            .iter()
            .all(|p| *p <= crate::core::MAX_PRIORITY),
        "--priority-split takes two priorities from 0 to 9"
    );
    let mut r = rng(seed);
    let inputs: Vec<_> = (0..args.distinct)
        .map(|i| {
            payload_input(
                &mut r,
                "agents",
                seed,
                i,
                args.min_payload,
                args.max_payload,
            )
        })
        .collect();
    let zipf = Zipf::new(args.distinct as f64, args.zipf_s)?;
    let picks: Arc<Vec<usize>> = Arc::new(
        (0..args.submits)
            .map(|_| zipf.sample(&mut r) as usize - 1)
            .collect(),
    );
    let distinct_keys = picks.iter().collect::<HashSet<_>>().len();
    let probe = target.client().await?;
    let first = crate::key::canonical_json(&inputs[picks[0]]);
    let first = crate::Key::derive(&args.fn_name, first.as_bytes()).to_hex();
    if let crate::client::Status::Done(_) = probe.get(&first).await? {
        eprintln!(
            "herd bench: warning: the inputs of seed {seed} are already cached on this broker; this run measures cache hits, not evaluations (restart the broker or leave out --seed)"
        );
    }
    probe.close().await;
    let inputs = Arc::new(inputs);
    let before = target.stats().await?;
    let bar = progress(args.submits as u64, "submits");
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for agent in 0..args.agents {
        // With several brokers (a cluster), agents go round-robin over them.
        let client = target.client_of(agent).await?;
        let share = args.inflight / args.agents + usize::from(agent < args.inflight % args.agents);
        for _ in 0..share {
            let (client, next, picks, inputs, bar) = (
                client.clone(),
                next.clone(),
                picks.clone(),
                inputs.clone(),
                bar.clone(),
            );
            let fn_name = args.fn_name.clone();
            let low = agent % 2 == 1;
            let options = crate::client::SubmitOptions {
                priority: args.priority_split.get(usize::from(low)).copied(),
                deadline_ms: None,
            };
            workers.push(tokio::spawn(async move {
                let mut samples = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= picks.len() {
                        return Ok::<_, anyhow::Error>(samples);
                    }
                    let input = inputs[picks[i]].clone();
                    let t0 = Instant::now();
                    let out = client.submit_with(&fn_name, input, options).await?;
                    let evaluated = out.source == Source::Eval;
                    let nominal_ms = crate::Key::parse(&out.key)
                        .filter(|_| evaluated)
                        .map(|k| (15 + k.seed() % 16) as f64);
                    samples.push(Sample {
                        low,
                        latency_ms: t0.elapsed().as_secs_f64() * 1000.0,
                        eval_ms: evaluated.then_some(out.eval_ms).flatten(),
                        nominal_ms,
                    });
                    bar.inc(1);
                }
            }));
        }
    }
    let mut samples = Vec::with_capacity(args.submits);
    for w in workers {
        samples.extend(w.await??);
    }
    let wall = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let after = target.stats().await?;
    let latency = sorted(samples.iter().map(|s| s.latency_ms).collect());
    let overhead = sorted(
        samples
            .iter()
            .filter_map(|s| s.eval_ms.map(|e| s.latency_ms - e))
            .collect(),
    );
    let mut report = Report::new("agents");
    report.add("submits", samples.len());
    report.add("distinct_keys", distinct_keys);
    report.add("evaluations", delta(&before, &after, "evaluations"));
    report.add("coalesced", delta(&before, &after, "coalesced"));
    report.add("cache_hits", delta(&before, &after, "cache_hits"));
    report.add("wall_s", super::round3(wall));
    report.add("throughput", super::round3(samples.len() as f64 / wall));
    report.ms("p50_ms", percentile(&latency, 50.0));
    report.ms("p90_ms", percentile(&latency, 90.0));
    report.ms("p99_ms", percentile(&latency, 99.0));
    report.ms("max_ms", latency.last().copied().unwrap_or(0.0));
    report.ms("overhead_p50_ms", percentile(&overhead, 50.0));
    report.ms("overhead_p99_ms", percentile(&overhead, 99.0));
    if let [high, low] = args.priority_split[..] {
        for (class, priority) in [(false, high), (true, low)] {
            let latency = sorted(
                samples
                    .iter()
                    .filter(|s| s.low == class)
                    .map(|s| s.latency_ms)
                    .collect(),
            );
            let names = if class {
                ["low_priority", "low_p50_ms", "low_p99_ms"]
            } else {
                ["high_priority", "high_p50_ms", "high_p99_ms"]
            };
            report.add(names[0], priority);
            report.ms(names[1], percentile(&latency, 50.0));
            report.ms(names[2], percentile(&latency, 99.0));
        }
    }
    if args.nominal_sleep {
        let hop = sorted(
            samples
                .iter()
                .filter_map(|s| s.nominal_ms.map(|n| s.latency_ms - n))
                .collect(),
        );
        report.ms("hop_p50_ms", percentile(&hop, 50.0));
        report.ms("hop_p99_ms", percentile(&hop, 99.0));
    }
    Ok(report)
}
