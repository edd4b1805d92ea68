//! `herd work`: any JSON-lines program (the protocol of `process`
//! evaluators) as a remote worker.
//!
//! It starts `concurrency` children through the same code as a `process`
//! evaluator (so a child that crashes, garbles or hangs is replaced the same
//! way), serves one fn with [`crate::client::worker::serve`], and hands each task to
//! a free child. On a terminal it keeps one progress line up to date.

use crate::client::worker::{serve, Task, WorkerOptions, WorkerStats};
use crate::config::{EvaluatorConfig, EvaluatorKind};
use crate::exec::eval::{Health, Progress, Task as EvalTask, Worker, WorkerFactory};
use crate::exec::process::ProcessFactory;
use crate::key::{canonical_json, Key};
use crate::metrics::Metrics;
use serde_json::Value;
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Mutex};

/// What `herd work` runs.
pub struct WorkArgs {
    pub url: String,
    pub token: Option<String>,
    pub fn_name: String,
    pub concurrency: usize,
    /// A child that takes longer than this for one task is killed and replaced.
    pub timeout_ms: u64,
    /// The program and its arguments.
    pub command: Vec<String>,
}

/// Runs the worker until `stop` resolves (then drains) or the broker refuses it.
pub async fn run(args: WorkArgs, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
    anyhow::ensure!(!args.command.is_empty(), "give the program to run after --");
    anyhow::ensure!(
        (1..=crate::protocol::MAX_CONCURRENCY).contains(&args.concurrency),
        "--concurrency must be 1 to {}",
        crate::protocol::MAX_CONCURRENCY
    );
    let mut config = EvaluatorConfig::builtin(&args.fn_name, EvaluatorKind::Process);
    config.command = args.command.clone();
    config.threads = args.concurrency;
    config.timeout_ms = args.timeout_ms;
    let metrics = Metrics::new();
    let health = Arc::new(Health::new(&args.fn_name, &metrics));
    let factory = Arc::new(ProcessFactory::new(&config, health)?);
    // Free children wait here; a blocking thread takes one per task and
    // puts it back itself. A task the broker revokes leaves its child to
    // finish (or be killed at --timeout-ms) and discarded, and a fresh child
    // takes its place at once: the broker gives that slot a new task now.
    let (free_tx, free_rx) = mpsc::channel::<Box<dyn Worker>>(args.concurrency);
    for i in 0..args.concurrency {
        let mut child = factory.make(i);
        child.prepare();
        free_tx.try_send(child).expect("room for every child");
    }
    let free_rx = Arc::new(Mutex::new(free_rx));
    let fn_name: Arc<str> = args.fn_name.as_str().into();
    let handler = move |task: Task| {
        let (free_tx, free_rx, fn_name) =
            (free_tx.clone(), Arc::clone(&free_rx), Arc::clone(&fn_name));
        let factory = Arc::clone(&factory);
        async move {
            let key = Key::parse(&task.key).ok_or("the task's key is not a key")?;
            let reporter = task.progress.clone();
            let task = EvalTask {
                key,
                fn_name,
                input: canonical_json(&task.input).into(),
                // The child's progress lines, passed on to the broker.
                progress: Progress::to(move |data| {
                    if let Ok(data) = serde_json::from_str(data) {
                        reporter.report(data);
                    }
                }),
            };
            let mut child = free_rx
                .lock()
                .await
                .recv()
                .await
                .ok_or("the worker is stopping")?;
            let slot = Arc::new(ChildSlot::default());
            let revoked = Revoked {
                slot: Arc::clone(&slot),
                factory,
                free: free_tx.clone(),
            };
            let outcome = tokio::task::spawn_blocking(move || {
                let outcome = child.run(&task);
                if slot.finish() {
                    let _ = free_tx.blocking_send(child);
                }
                outcome
            })
            .await
            .map_err(|e| format!("the task's thread failed: {e}"))?;
            drop(revoked);
            match outcome {
                Ok(text) => serde_json::from_str::<Value>(&text)
                    .map_err(|e| format!("the program's output is not JSON: {e}")),
                Err(error) => Err(error.message().to_string()),
            }
        }
    };
    let options = WorkerOptions {
        token: args.token.clone(),
        concurrency: args.concurrency,
        ..WorkerOptions::default()
    };
    let stats = Arc::new(WorkerStats::default());
    let progress = std::io::stderr()
        .is_terminal()
        .then(|| tokio::spawn(show_progress(Arc::clone(&stats))));
    let served = serve(
        &args.url,
        &args.fn_name,
        &options,
        Arc::clone(&stats),
        handler,
        stop,
    )
    .await;
    if let Some(progress) = progress {
        progress.abort();
        eprintln!();
    }
    served?;
    Ok(())
}

/// Who ends a child's task first: the child (it goes back to the free
/// children) or a revoke (it is discarded when it ends).
#[derive(Default)]
struct ChildSlot {
    state: AtomicU8,
}

const RUNNING: u8 = 0;
const FINISHED: u8 = 1;
const REVOKED: u8 = 2;

impl ChildSlot {
    /// The child finished first: true if it goes back to the free children.
    fn finish(&self) -> bool {
        self.state
            .compare_exchange(RUNNING, FINISHED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The task was revoked first: true if its child is to be replaced.
    fn revoke(&self) -> bool {
        self.state
            .compare_exchange(RUNNING, REVOKED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// Dropped with a task's handler: if the child has not finished, the task
/// was revoked (its handler aborted), and a fresh child joins the free ones.
struct Revoked {
    slot: Arc<ChildSlot>,
    factory: Arc<ProcessFactory>,
    free: mpsc::Sender<Box<dyn Worker>>,
}

impl Drop for Revoked {
    fn drop(&mut self) {
        if !self.slot.revoke() {
            return;
        }
        let (factory, free) = (Arc::clone(&self.factory), self.free.clone());
        tokio::task::spawn_blocking(move || {
            let mut child = factory.make(0);
            child.prepare();
            let _ = free.try_send(child);
        });
    }
}

/// One line on stderr: tasks done and failed, and the rate.
async fn show_progress(stats: Arc<WorkerStats>) {
    let started = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_millis(500));
    loop {
        ticks.tick().await;
        let done = stats.done.load(Ordering::Relaxed);
        let failed = stats.failed.load(Ordering::Relaxed);
        let rate = (done + failed) as f64 / started.elapsed().as_secs_f64().max(0.001);
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[2Kdone {done} | failed {failed} | {rate:.1} tasks/s | dropped {} | connects {}",
            stats.dropped.load(Ordering::Relaxed),
            stats.connects.load(Ordering::Relaxed)
        );
        let _ = err.flush();
    }
}
