//! The client subcommands (`herd submit`, `get`, `subscribe`, `watch`): a
//! command line over [`crate::client`] for shells and scripts.
//!
//! Output is JSON, one object per line, so the commands compose with `jq`
//! and friends; `herd submit -` reads JSON lines and writes one result line
//! per input line, in input order, which makes it a filter.
//!
//! Exit codes: 0 all went well; 1 an evaluation failed or the broker refused
//! a request or the connection (a token it does not take); 2 the broker
//! could not be reached or the input is not JSON.

use crate::client::{Client, ClientError, Output, Status, SubmitOptions};
use futures::stream::{FuturesOrdered, StreamExt};
use serde_json::{json, Value};
use std::io::{BufRead, IsTerminal, Write};

/// Everything went well.
pub const EXIT_OK: i32 = 0;
/// An evaluation failed, or the broker refused a request.
pub const EXIT_FAILED: i32 = 1;
/// Could not connect, or bad input.
pub const EXIT_USAGE: i32 = 2;

/// Where and as whom to connect.
pub struct Target {
    pub url: String,
    pub token: Option<String>,
}

impl Target {
    async fn connect(&self) -> Result<Client, i32> {
        Client::connect(&self.url, self.token.as_deref())
            .await
            .map_err(|e| {
                eprintln!("herd: {e}");
                exit_for(&e)
            })
    }
}

fn print_line(value: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

fn output_json(o: &Output) -> Value {
    let mut v = json!({
        "key": o.key,
        "output": o.output,
        "source": o.source.as_str(),
    });
    if let Some(ms) = o.eval_ms {
        v["eval_ms"] = json!(ms);
    }
    v
}

fn error_json(key: Option<&str>, e: &ClientError) -> Value {
    if let ClientError::RateLimited {
        retry_after_ms,
        message,
    } = e
    {
        return json!({"key": key, "error": {
            "code": "rate_limited",
            "message": message,
            "retry_after_ms": retry_after_ms,
        }});
    }
    let (code, message) = match e {
        ClientError::EvalFailed { message, .. } => ("eval_failed", message.clone()),
        ClientError::EvalTimeout { message, .. } => ("eval_timeout", message.clone()),
        ClientError::DeadlineExceeded { message, .. } => ("deadline_exceeded", message.clone()),
        ClientError::Busy(m) => ("busy", m.clone()),
        ClientError::Rejected { code, message } => (code.as_str(), message.clone()),
        // The broker would refuse it (closing with 1009): a bad request.
        e @ ClientError::TooLarge { .. } => ("bad_request", e.to_string()),
        other => ("client_error", other.to_string()),
    };
    let key = match e {
        ClientError::EvalFailed { key, .. }
        | ClientError::EvalTimeout { key, .. }
        | ClientError::DeadlineExceeded { key, .. } => Some(key.as_str()),
        _ => key,
    };
    json!({"key": key, "error": {"code": code, "message": message}})
}

fn exit_for(e: &ClientError) -> i32 {
    match e {
        ClientError::Closed { .. } | ClientError::Connect { .. } | ClientError::Protocol(_) => {
            EXIT_USAGE
        }
        _ => EXIT_FAILED,
    }
}

/// How `herd submit` asks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SubmitFlags {
    /// Print what `accepted` said instead of waiting.
    pub nowait: bool,
    pub options: SubmitOptions,
    /// Print the evaluation's progress reports on stderr as they come.
    pub progress: bool,
}

/// `herd submit`: one input given as an argument, or JSON lines from stdin (`-`).
pub async fn submit(
    target: &Target,
    fn_name: &str,
    flags: SubmitFlags,
    input: &str,
    concurrency: usize,
) -> i32 {
    let client = match target.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let code = submit_all(&client, fn_name, flags, input, concurrency).await;
    client.close().await;
    code
}

async fn submit_all(
    client: &Client,
    fn_name: &str,
    flags: SubmitFlags,
    input: &str,
    concurrency: usize,
) -> i32 {
    if input != "-" {
        let value: Value = match serde_json::from_str(input) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("herd: the input is not JSON: {e}");
                return EXIT_USAGE;
            }
        };
        let (line, code) = submit_one(client, fn_name, flags, value).await;
        print_line(&line);
        return code;
    }
    let lines = std::io::stdin().lock().lines();
    let mut worst = EXIT_OK;
    let mut in_flight = FuturesOrdered::new();
    for (n, line) in lines.enumerate() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("herd: line {} is not JSON: {e}", n + 1);
                worst = worst.max(EXIT_USAGE);
                continue;
            }
        };
        let client = client.clone();
        let fn_name = fn_name.to_string();
        in_flight.push_back(async move { submit_one(&client, &fn_name, flags, value).await });
        if in_flight.len() >= concurrency.max(1) {
            if let Some((line, code)) = in_flight.next().await {
                print_line(&line);
                worst = worst.max(code);
            }
        }
    }
    while let Some((line, code)) = in_flight.next().await {
        print_line(&line);
        worst = worst.max(code);
    }
    worst
}

async fn submit_one(
    client: &Client,
    fn_name: &str,
    flags: SubmitFlags,
    input: Value,
) -> (Value, i32) {
    if flags.nowait {
        return match client
            .submit_nowait_with(fn_name, input, flags.options)
            .await
        {
            Ok(a) => (
                json!({"key": a.key, "state": a.state, "first": a.first, "waiters": a.waiters}),
                EXIT_OK,
            ),
            Err(e) => (error_json(None, &e), exit_for(&e)),
        };
    }
    let outcome = if flags.progress {
        streamed(client, fn_name, input, flags.options).await
    } else {
        client.submit_with(fn_name, input, flags.options).await
    };
    match outcome {
        Ok(o) => (output_json(&o), EXIT_OK),
        Err(e) => (error_json(None, &e), exit_for(&e)),
    }
}

/// A submit whose progress reports go to stderr, one JSON line each
/// (`{"key","seq","data"}`), as they come.
async fn streamed(
    client: &Client,
    fn_name: &str,
    input: Value,
    options: SubmitOptions,
) -> Result<Output, ClientError> {
    let key = crate::key::key_hex(fn_name, &input);
    let updates = client.submit_stream(fn_name, input, options).await?;
    futures::pin_mut!(updates);
    while let Some(update) = updates.next().await {
        match update {
            crate::client::Update::Progress { seq, data } => {
                eprintln!("{}", json!({"key": key, "seq": seq, "data": data}));
            }
            crate::client::Update::Done(outcome) => return outcome,
        }
    }
    Err(ClientError::Protocol(
        "the stream ended without a result".into(),
    ))
}

/// `herd get KEY`: prints the key's state; exit 1 when it holds a failure.
pub async fn get(target: &Target, key: &str) -> i32 {
    let client = match target.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let code = get_one(&client, key).await;
    client.close().await;
    code
}

async fn get_one(client: &Client, key: &str) -> i32 {
    match client.get(key).await {
        Ok(Status::Done(o)) => {
            let mut v = output_json(&o);
            v["state"] = json!("done");
            print_line(&v);
            EXIT_OK
        }
        Ok(Status::Failed(e)) => {
            let mut v = error_json(Some(key), &e);
            v["state"] = json!("done");
            print_line(&v);
            EXIT_FAILED
        }
        Ok(Status::Pending {
            state,
            waiters,
            age_ms,
        }) => {
            print_line(&json!({"key": key, "state": state, "waiters": waiters, "age_ms": age_ms}));
            EXIT_OK
        }
        Ok(Status::Unknown) => {
            print_line(&json!({"key": key, "state": "unknown"}));
            EXIT_OK
        }
        Err(e) => {
            print_line(&error_json(Some(key), &e));
            exit_for(&e)
        }
    }
}

/// How long `herd invalidate` waits quietly before it says what it waits for.
const SAY_WHY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// `herd invalidate --key K` or `--fn F`: drops cached results, prints
/// what was dropped once the broker says so.
pub async fn invalidate(target: &Target, key: Option<&str>, fn_name: Option<&str>) -> i32 {
    let client = match target.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let dropped = match (key, fn_name) {
        (Some(key), _) => json!({"key": key}),
        (None, Some(name)) => json!({"fn": name}),
        (None, None) => unreachable!("clap requires --key or --fn"),
    };
    let invalidating = async {
        match (key, fn_name) {
            (Some(key), _) => client.invalidate_key(key).await,
            (_, name) => client.invalidate_fn(name.unwrap_or_default()).await,
        }
    };
    tokio::pin!(invalidating);
    let outcome = tokio::select! {
        outcome = &mut invalidating => outcome,
        _ = tokio::time::sleep(SAY_WHY_AFTER) => {
            eprintln!(
                "herd invalidate: waiting for the broker: in a cluster it answers once Redis has recorded the invalidation and one cluster.lease_ms has passed, so that no broker serves a dropped result afterwards"
            );
            invalidating.await
        }
    };
    let code = match outcome {
        Ok(()) => {
            let mut line = dropped;
            line["invalidated"] = json!(true);
            print_line(&line);
            EXIT_OK
        }
        Err(e) => {
            print_line(&error_json(key, &e));
            exit_for(&e)
        }
    };
    client.close().await;
    code
}

/// `herd subscribe KEY...`: prints each result as it arrives.
pub async fn subscribe(target: &Target, keys: &[String]) -> i32 {
    let client = match target.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut waits: futures::stream::FuturesUnordered<_> = keys
        .iter()
        .map(|key| {
            let client = client.clone();
            async move { (key.clone(), client.subscribe(key).await) }
        })
        .collect();
    let mut worst = EXIT_OK;
    while let Some((key, outcome)) = waits.next().await {
        match outcome {
            Ok(o) => print_line(&output_json(&o)),
            Err(e) => {
                print_line(&error_json(Some(&key), &e));
                worst = worst.max(exit_for(&e));
            }
        }
    }
    drop(waits);
    client.close().await;
    worst
}

/// `herd watch`: a compact live view, one line per snapshot (rewritten in
/// place on a terminal).
pub async fn watch(target: &Target, interval_ms: u64) -> i32 {
    let client = match target.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let stream = match client.watch(interval_ms).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("herd: {e}");
            return exit_for(&e);
        }
    };
    futures::pin_mut!(stream);
    let terminal = std::io::stdout().is_terminal();
    let mut previous: Option<(u64, u64)> = None;
    while let Some(snapshot) = stream.next().await {
        let parts = watch_parts(&snapshot, &mut previous);
        let mut out = std::io::stdout().lock();
        if terminal {
            // One line that never wraps: the least important figures go first.
            let width = console::Term::stdout()
                .size_checked()
                .map_or(80, |(_, cols)| usize::from(cols));
            let line = fit_line(&parts, width.saturating_sub(1));
            let _ = write!(out, "\r\x1b[2K{line}");
        } else {
            let _ = writeln!(out, "{}", parts.join(" | "));
        }
        let _ = out.flush();
    }
    eprintln!("\nherd: the broker closed the connection");
    EXIT_USAGE
}

/// The figures of a snapshot, most important first.
fn watch_parts(snapshot: &Value, previous: &mut Option<(u64, u64)>) -> Vec<String> {
    let s = &snapshot["stats"];
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    let at = snapshot["at_ms"].as_u64().unwrap_or(0);
    let submits = n("submits");
    let rate = match previous.replace((at, submits)) {
        Some((t0, s0)) if at > t0 => {
            (submits.saturating_sub(s0)) as f64 * 1000.0 / (at - t0) as f64
        }
        _ => 0.0,
    };
    let hit_rate = if submits > 0 {
        100.0 * n("cache_hits") as f64 / submits as f64
    } else {
        0.0
    };
    // What needs attention comes first: an evaluator not ok (unhealthy, or
    // a remote fn no worker serves), a cluster degraded.
    let mut parts: Vec<String> = s["evaluators"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, health)| health.as_str() != Some("ok"))
        .map(|(name, health)| format!("fn {name}: {}", health.as_str().unwrap_or("?")))
        .collect();
    if s["cluster"].as_str().is_some_and(|c| c != "ok") {
        parts.push("cluster degraded".to_string());
    }
    if s["cluster_pubsub"].as_str().is_some_and(|c| c != "ok") {
        parts.push("cluster pub/sub down".to_string());
    }
    let cluster = &s["cluster_totals"];
    if cluster.is_object() {
        let c = |k: &str| cluster[k].as_u64().unwrap_or(0);
        parts.push(format!(
            "cluster: {} brokers, submits {}, evals {}",
            c("brokers"),
            c("submits"),
            c("evaluations")
        ));
    }
    parts.extend([
        format!("conns {}", n("connections")),
        format!("submits {submits} ({rate:.0}/s)"),
        format!("hits {hit_rate:.1}%"),
        format!("evals {}", n("evaluations")),
        format!("queued {} running {}", n("queued"), n("running")),
        format!("failures {}", n("failures")),
        format!(
            "in flight {}",
            snapshot["inflight"].as_array().map_or(0, Vec::len)
        ),
        format!("coalesced {}", n("coalesced")),
        format!(
            "cache {} entries, {:.1} MiB",
            n("cache_entries"),
            n("cache_bytes") as f64 / (1024.0 * 1024.0)
        ),
    ]);
    parts
}

/// As many of `parts` as fit in `width` columns, joined with ` | `.
fn fit_line(parts: &[String], width: usize) -> String {
    let mut line = String::new();
    for part in parts {
        let extra = if line.is_empty() { 0 } else { 3 } + part.chars().count();
        if line.chars().count() + extra > width {
            break;
        }
        if !line.is_empty() {
            line.push_str(" | ");
        }
        line.push_str(part);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_line_fits_an_80_column_terminal() {
        let snapshot = json!({
            "at_ms": 1000,
            "stats": {"connections": 20, "submits": 123456, "cache_hits": 100000,
                      "evaluations": 23456, "coalesced": 3456, "failures": 12,
                      "queued": 50, "running": 64, "cache_entries": 23456,
                      "cache_bytes": 12345678},
            "inflight": [],
        });
        let parts = watch_parts(&snapshot, &mut None);
        let full = parts.join(" | ");
        assert!(full.len() > 80, "the full line is wider: {full}");
        let line = fit_line(&parts, 79);
        assert!(line.chars().count() <= 79, "{line}");
        assert!(line.starts_with("conns 20 | submits 123456"));
        assert!(fit_line(&parts, 400) == full);
    }
}
