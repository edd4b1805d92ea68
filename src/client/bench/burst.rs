//! S2 `burst`: a cold key, everybody at once.

use super::{delta, percentile, progress, sorted, Report, Target};
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Barrier;

#[derive(Debug, Clone, clap::Args)]
pub struct BurstArgs {
    /// Sessions submitting the same key together.
    #[arg(long, default_value_t = 50)]
    pub sessions: usize,
    /// Rounds, each with a fresh key.
    #[arg(long, default_value_t = 100)]
    pub rounds: usize,
    /// How long each evaluation sleeps.
    #[arg(long, default_value_t = 20)]
    pub sleep_ms: u64,
    /// Evaluator to use.
    #[arg(long = "fn", default_value = "sleep")]
    pub fn_name: String,
}

pub async fn run(target: &Target, args: &BurstArgs, seed: u64) -> anyhow::Result<Report> {
    anyhow::ensure!(args.sessions > 0, "need at least one session");
    let before = target.stats().await?;
    let barrier = Arc::new(Barrier::new(args.sessions));
    let bar = progress(args.rounds as u64, "rounds");
    let mut tasks = Vec::new();
    for s in 0..args.sessions {
        let client = target.client().await?;
        let (barrier, bar, args) = (barrier.clone(), bar.clone(), args.clone());
        tasks.push(tokio::spawn(async move {
            let mut arrivals = Vec::with_capacity(args.rounds);
            for round in 0..args.rounds {
                let input = json!({"bench": "burst", "seed": seed, "round": round, "sleep_ms": args.sleep_ms});
                barrier.wait().await;
                client.submit(&args.fn_name, input).await?;
                arrivals.push(Instant::now());
                if s == 0 {
                    bar.inc(1);
                }
            }
            Ok::<_, anyhow::Error>(arrivals)
        }));
    }
    let mut per_session = Vec::new();
    for t in tasks {
        per_session.push(t.await??);
    }
    bar.finish_and_clear();
    let after = target.stats().await?;
    let spreads = sorted(
        (0..args.rounds)
            .map(|round| {
                let times = per_session.iter().map(|a| a[round]);
                let first = times.clone().min().expect("sessions");
                let last = times.max().expect("sessions");
                (last - first).as_secs_f64() * 1000.0
            })
            .collect(),
    );
    let mut report = Report::new("burst");
    report.add("rounds", args.rounds);
    report.add("sessions", args.sessions);
    report.add("evaluations", delta(&before, &after, "evaluations"));
    report.ms("spread_p50_ms", percentile(&spreads, 50.0));
    report.ms("spread_p99_ms", percentile(&spreads, 99.0));
    report.ms("spread_max_ms", spreads.last().copied().unwrap_or(0.0));
    Ok(report)
}
