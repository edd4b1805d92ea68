//! S4 `fanout`: one result, many subscribers.

use super::{percentile, progress, send_text, sorted, Report, Target};
use futures::StreamExt;
use serde_json::json;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Clone, clap::Args)]
pub struct FanoutArgs {
    /// Sessions subscribed to the one key.
    #[arg(long, default_value_t = 10_000)]
    pub subscribers: usize,
    /// Connections opened at the same time while setting up.
    #[arg(long, default_value_t = 256)]
    pub connect_parallel: usize,
    /// How long the evaluation sleeps.
    #[arg(long, default_value_t = 20)]
    pub sleep_ms: u64,
    /// Evaluator to use.
    #[arg(long = "fn", default_value = "sleep")]
    pub fn_name: String,
    /// How long to wait for every subscriber's result.
    #[arg(long, default_value_t = 60)]
    pub wait_s: u64,
}

pub async fn run(target: &Target, args: &FanoutArgs, seed: u64) -> anyhow::Result<Report> {
    let input = json!({"bench": "fanout", "seed": seed, "sleep_ms": args.sleep_ms});
    let key = crate::key::key_hex(&args.fn_name, &input);
    let probe = target.client().await?;
    if let crate::client::Status::Done(_) = probe.get(&key).await? {
        anyhow::bail!(
            "the fanout key of seed {seed} is already cached: restart the broker or pass another --seed"
        );
    }
    probe.close().await;
    let bar = progress(args.subscribers as u64, "subscribing");
    let (arrived_tx, mut arrived_rx) = mpsc::channel::<Instant>(args.subscribers.max(1));
    let (ready_tx, mut ready_rx) = mpsc::channel::<()>(args.subscribers.max(1));
    let (stop_tx, stop_rx) = watch::channel(false);
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(args.connect_parallel.max(1)));
    for _ in 0..args.subscribers {
        let (target, key, arrived_tx, ready_tx, permits, mut stop_rx) = (
            target.clone(),
            key.clone(),
            arrived_tx.clone(),
            ready_tx.clone(),
            permits.clone(),
            stop_rx.clone(),
        );
        tokio::spawn(async move {
            let mut ws = {
                let _permit = permits.acquire().await.ok()?;
                let mut ws = target.socket().await.ok()?;
                send_text(&mut ws, json!({"op": "subscribe", "key": key}).to_string())
                    .await
                    .ok()?;
                ws
            };
            loop {
                tokio::select! {
                    message = ws.next() => match message {
                        // Frames start with their type, so a prefix says which one came.
                        Some(Ok(Message::Text(text))) => {
                            if text.starts_with(r#"{"type":"result""#) {
                                arrived_tx.send(Instant::now()).await.ok()?;
                                break;
                            }
                            if text.starts_with(r#"{"type":"subscribed""#) {
                                ready_tx.send(()).await.ok()?;
                            }
                        }
                        Some(Ok(_)) => {}
                        _ => return None,
                    },
                    _ = stop_rx.changed() => return None,
                }
            }
            // Stay connected until the run ends, so closes do not disturb the others.
            let _ = stop_rx.changed().await;
            Some(())
        });
    }
    drop((arrived_tx, ready_tx));
    let mut subscribed = 0;
    let setup_deadline = Instant::now() + Duration::from_secs(args.wait_s);
    while subscribed < args.subscribers {
        match tokio::time::timeout_at(setup_deadline.into(), ready_rx.recv()).await {
            Ok(Some(())) => {
                subscribed += 1;
                bar.inc(1);
            }
            _ => break,
        }
    }
    bar.finish_and_clear();
    let client = target.client().await?;
    client.submit(&args.fn_name, input).await?;
    let reference = Instant::now();
    let mut arrivals = Vec::with_capacity(subscribed);
    let deadline = reference + Duration::from_secs(args.wait_s);
    while arrivals.len() < subscribed {
        match tokio::time::timeout_at(deadline.into(), arrived_rx.recv()).await {
            Ok(Some(at)) => arrivals.push(at),
            _ => break,
        }
    }
    let _ = stop_tx.send(true);
    let offsets = sorted(
        arrivals
            .iter()
            .map(|&at| signed_ms(at, reference))
            .collect(),
    );
    let mut report = Report::new("fanout");
    report.add("subscribers", subscribed);
    report.add("delivered", arrivals.len());
    report.ms("first_ms", offsets.first().copied().unwrap_or(0.0));
    report.ms("p50_ms", percentile(&offsets, 50.0));
    report.ms("p99_ms", percentile(&offsets, 99.0));
    report.ms("last_ms", offsets.last().copied().unwrap_or(0.0));
    Ok(report)
}

/// `at - reference` in milliseconds, negative when `at` came first.
fn signed_ms(at: Instant, reference: Instant) -> f64 {
    if at >= reference {
        (at - reference).as_secs_f64() * 1000.0
    } else {
        -((reference - at).as_secs_f64() * 1000.0)
    }
}
