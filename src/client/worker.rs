//! The worker side of remote evaluation: a session that `serve`s a fn and
//! runs the tasks the broker sends it.
//!
//! [`serve`] keeps one session open to the broker (reconnecting with
//! jittered backoff when it goes away), offers `concurrency` slots for one
//! fn, runs each `task` with an async handler, and answers with `complete`.
//! A `revoke` aborts the task's handler. Tasks in hand when the connection
//! drops are abandoned: the broker gives them to another worker. When the
//! `stop` future resolves, the worker sends `unserve`, finishes the tasks it
//! holds, and returns.

use crate::client::{open, ClientError, Socket};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::{AbortHandle, JoinSet};
use tokio_tungstenite::tungstenite::Message;

/// One task the broker sent.
#[derive(Debug, Clone)]
pub struct Task {
    /// The broker's id of the task (opaque).
    pub task: String,
    pub key: String,
    pub fn_name: String,
    pub input: Value,
    /// Unix milliseconds after which the broker no longer wants the outcome.
    pub deadline_ms: u64,
    /// 1, or more when an earlier worker went away with it.
    pub attempt: u64,
    /// Sends the broker this task's progress reports.
    pub progress: Reporter,
}

/// Sends one task's progress reports to the broker, which passes them to
/// the waiters that asked for progress.
#[derive(Debug, Clone)]
pub struct Reporter {
    task: String,
    tx: tokio::sync::mpsc::Sender<Value>,
}

impl Reporter {
    /// Queues a report; false if `progress_queue` reports wait already
    /// (this one is dropped) or the session is gone.
    pub fn report(&self, data: Value) -> bool {
        let frame = json!({"op": "progress", "task": self.task, "data": data});
        self.tx.try_send(frame).is_ok()
    }
}

/// How to reach the broker and how much to take on.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub token: Option<String>,
    /// Tasks run at once (1 to 1024).
    pub concurrency: usize,
    /// First wait before reconnecting; it doubles (with jitter) up to `reconnect_max`.
    pub reconnect_first: Duration,
    pub reconnect_max: Duration,
    /// Progress reports waiting to be sent, at most (then dropped).
    pub progress_queue: usize,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            token: None,
            concurrency: 1,
            reconnect_first: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            progress_queue: 1024,
        }
    }
}

/// Counts kept while serving (read them from another task for progress).
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Tasks completed with an output.
    pub done: AtomicU64,
    /// Tasks completed with an error.
    pub failed: AtomicU64,
    /// Tasks taken back by the broker (`revoke`) or abandoned on a lost connection.
    pub dropped: AtomicU64,
    /// Sessions opened (1 plus the reconnects).
    pub connects: AtomicU64,
}

/// How one session ended.
enum Ended {
    /// `stop` resolved and the tasks in hand were finished.
    Stopped,
    /// The connection was lost; reconnect.
    Lost,
}

/// Serves `fn_name` on the broker at `url` until `stop` resolves.
///
/// `handler` gets each task and returns its output, or an error message
/// (sent as the task's `error`). Fails only when the broker refuses the
/// worker (a bad token, a fn it may not serve or that is not remote);
/// a broker that is away is waited for.
pub async fn serve<H, Fut>(
    url: &str,
    fn_name: &str,
    options: &WorkerOptions,
    stats: Arc<WorkerStats>,
    handler: H,
    stop: impl Future<Output = ()>,
) -> Result<(), ClientError>
where
    H: Fn(Task) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, String>> + Send + 'static,
{
    let handler = Arc::new(handler);
    tokio::pin!(stop);
    let mut delay = options.reconnect_first;
    loop {
        let opened = tokio::select! {
            opened = open(url, options.token.as_deref()) => opened,
            _ = &mut stop => return Ok(()),
        };
        let mut socket = match opened {
            Ok((socket, _hello)) => {
                tracing::info!(url, "connected");
                socket
            }
            Err(error @ ClientError::Refused { .. }) => return Err(error),
            Err(error) => {
                // Said once per outage, not at every attempt.
                if delay == options.reconnect_first {
                    tracing::warn!(url, %error, "cannot connect; retrying with backoff");
                }
                tokio::select! {
                    _ = tokio::time::sleep(jitter(delay)) => {}
                    _ = &mut stop => return Ok(()),
                }
                delay = (delay * 2).min(options.reconnect_max);
                continue;
            }
        };
        stats.connects.fetch_add(1, Ordering::Relaxed);
        match session(&mut socket, fn_name, options, &stats, &handler, &mut stop).await? {
            Ended::Stopped => {
                let _ = socket.close(None).await;
                tracing::info!(
                    done = stats.done.load(Ordering::Relaxed),
                    failed = stats.failed.load(Ordering::Relaxed),
                    "stopped"
                );
                return Ok(());
            }
            Ended::Lost => {
                tracing::warn!(
                    url,
                    "connection lost; reconnecting (tasks in hand are re-queued by the broker)"
                );
                delay = options.reconnect_first;
            }
        }
    }
}

/// A wait of `delay` give or take a quarter, so workers that lost the same
/// broker do not all come back at the same instant.
fn jitter(delay: Duration) -> Duration {
    let quarter = delay.as_millis() as u64 / 4;
    let offset = rand::random_range(0..=quarter * 2);
    Duration::from_millis(delay.as_millis() as u64 - quarter + offset)
}

async fn send(socket: &mut Socket, frame: Value) -> bool {
    socket.send(Message::text(frame.to_string())).await.is_ok()
}

/// One session: serve, run tasks, complete them; on `stop`, unserve and drain.
async fn session<H, Fut>(
    socket: &mut Socket,
    fn_name: &str,
    options: &WorkerOptions,
    stats: &WorkerStats,
    handler: &Arc<H>,
    stop: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<Ended, ClientError>
where
    H: Fn(Task) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, String>> + Send + 'static,
{
    let serve =
        json!({"op": "serve", "id": "serve", "fn": fn_name, "concurrency": options.concurrency});
    if !send(socket, serve).await {
        return Ok(Ended::Lost);
    }
    let (progress_tx, mut progress_rx) = tokio::sync::mpsc::channel(options.progress_queue.max(1));
    let mut running: JoinSet<(String, Result<Value, String>)> = JoinSet::new();
    let mut handles: HashMap<String, AbortHandle> = HashMap::new();
    let mut ids: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut draining = false;
    loop {
        if draining && running.is_empty() {
            return Ok(Ended::Stopped);
        }
        tokio::select! {
            Some(report) = progress_rx.recv() => {
                if !send(socket, report).await {
                    return Ok(lost(&mut running, stats, draining));
                }
            }
            _ = stop.as_mut(), if !draining => {
                draining = true;
                tracing::info!(
                    in_hand = running.len(),
                    "stopping: no new tasks; finishing the {} in hand",
                    running.len()
                );
                if !send(socket, json!({"op": "unserve", "id": "unserve", "fn": fn_name})).await {
                    return Ok(Ended::Stopped);
                }
            }
            finished = running.join_next_with_id(), if !running.is_empty() => {
                let (task, outcome) = match finished {
                    Some(Ok((id, (task, outcome)))) => {
                        ids.remove(&id);
                        (task, outcome)
                    }
                    // A handler that panicked fails its task; the broker's
                    // slot is given back at once, not at its timeout.
                    Some(Err(error)) if error.is_panic() => {
                        let Some(task) = ids.remove(&error.id()) else { continue };
                        let message = crate::error::panic_message(error.into_panic().as_ref());
                        (task, Err(format!("the worker's handler panicked: {message}")))
                    }
                    Some(Err(error)) => {
                        ids.remove(&error.id());
                        continue;
                    }
                    None => continue,
                };
                handles.remove(&task);
                // Its reports were queued before it finished: they go first.
                while let Ok(report) = progress_rx.try_recv() {
                    if !send(socket, report).await {
                        return Ok(lost(&mut running, stats, draining));
                    }
                }
                let frame = match outcome {
                    Ok(output) => {
                        stats.done.fetch_add(1, Ordering::Relaxed);
                        json!({"op": "complete", "task": task, "output": output})
                    }
                    Err(error) => {
                        stats.failed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(task, "task failed: {error}");
                        json!({"op": "complete", "task": task, "error": error})
                    }
                };
                if !send(socket, frame).await {
                    return Ok(lost(&mut running, stats, draining));
                }
            }
            message = socket.next() => {
                let text = match message {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                        return Ok(lost(&mut running, stats, draining));
                    }
                    Some(Ok(_)) => continue,
                };
                let Ok(frame) = serde_json::from_str::<Value>(&text) else { continue };
                match frame["type"].as_str() {
                    Some("task") => {
                        let id = frame["task"].as_str().unwrap_or_default().to_string();
                        let task = Task {
                            progress: Reporter { task: id.clone(), tx: progress_tx.clone() },
                            task: id,
                            key: frame["key"].as_str().unwrap_or_default().to_string(),
                            fn_name: frame["fn"].as_str().unwrap_or_default().to_string(),
                            input: frame["input"].clone(),
                            deadline_ms: frame["deadline_ms"].as_u64().unwrap_or(0),
                            attempt: frame["attempt"].as_u64().unwrap_or(1),
                        };
                        let id = task.task.clone();
                        let handler = Arc::clone(handler);
                        let handle = running.spawn(async move {
                            let outcome = handler(task).await;
                            (id, outcome)
                        });
                        let task = frame["task"].as_str().unwrap_or_default().to_string();
                        ids.insert(handle.id(), task.clone());
                        handles.insert(task, handle);
                    }
                    Some("revoke") => {
                        if let Some(handle) = frame["task"].as_str().and_then(|t| handles.remove(t)) {
                            handle.abort();
                            stats.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Some("serving") => {
                        tracing::info!(
                            fn_name,
                            concurrency = options.concurrency,
                            "serving: tasks of fn {fn_name:?}, at most {} at once",
                            options.concurrency
                        );
                    }
                    Some("error") if frame["id"] == "serve" => {
                        let code = frame["code"].as_str().unwrap_or_default().to_string();
                        let message = frame["message"].as_str().unwrap_or_default().to_string();
                        return Err(ClientError::Rejected { code, message });
                    }
                    // `stale_task` (an outcome the broker no longer wants), pongs.
                    _ => {}
                }
            }
        }
    }
}

/// The connection is gone: tasks in hand are abandoned (the broker re-queues them).
fn lost(
    running: &mut JoinSet<(String, Result<Value, String>)>,
    stats: &WorkerStats,
    draining: bool,
) -> Ended {
    stats
        .dropped
        .fetch_add(running.len() as u64, Ordering::Relaxed);
    running.abort_all();
    if draining {
        Ended::Stopped
    } else {
        Ended::Lost
    }
}
