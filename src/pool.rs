//! The evaluator pool: dedicated OS threads, a bounded job queue per evaluator.
//!
//! Evaluations block (they sleep, spin, or wait on a child process), so they
//! run on threads of their own, never on the async runtime. A thread tells
//! the hub when it starts a job and when it ends it; it never touches a
//! socket. A panic is caught, fails only that job, and the thread carries on
//! with a fresh worker, so the pool keeps its size.

use crate::config::EvaluatorConfig;
use crate::error::{EvalError, HerdError};
use crate::eval::{factory, Health, Task, WorkerFactory};
use crate::hub::HubMsg;
use crate::key::Key;
use crate::metrics::{FnMetrics, Metrics};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// One queued evaluation.
pub struct Job {
    pub key: Key,
    pub gen: u64,
    pub input: Arc<str>,
    /// Set by the hub when nobody waits any more; the job is then skipped.
    pub cancelled: Arc<AtomicBool>,
}

/// What sessions need to know of an evaluator: its name and limits.
#[derive(Debug, Clone)]
pub struct EvaluatorSpec {
    pub index: usize,
    pub name: Arc<str>,
    pub timeout: Duration,
    pub max_input_bytes: usize,
    pub health: Arc<Health>,
    pub metrics: FnMetrics,
}

/// The evaluators by `fn` name.
#[derive(Debug)]
pub struct EvaluatorTable {
    specs: Vec<EvaluatorSpec>,
    by_name: HashMap<String, usize>,
}

impl EvaluatorTable {
    pub fn new(configs: &[EvaluatorConfig], metrics: &Metrics) -> Self {
        let specs: Vec<EvaluatorSpec> = configs
            .iter()
            .enumerate()
            .map(|(index, c)| EvaluatorSpec {
                index,
                name: c.name.as_str().into(),
                timeout: Duration::from_millis(c.timeout_ms),
                max_input_bytes: c.max_input_bytes,
                health: Arc::new(Health::new(&c.name, metrics)),
                metrics: metrics.for_fn(&c.name),
            })
            .collect();
        let by_name = configs
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.clone(), i))
            .collect();
        EvaluatorTable { specs, by_name }
    }

    pub fn lookup(&self, name: &str) -> Option<&EvaluatorSpec> {
        self.by_name.get(name).map(|&i| &self.specs[i])
    }

    pub fn get(&self, index: usize) -> &EvaluatorSpec {
        &self.specs[index]
    }

    pub fn iter(&self) -> impl Iterator<Item = &EvaluatorSpec> {
        self.specs.iter()
    }
}

/// The running threads and the queues that feed them.
pub struct Pool {
    queues: Vec<crossbeam_channel::Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts every evaluator's threads; they report to `hub`.
    pub fn start(
        configs: &[EvaluatorConfig],
        table: &EvaluatorTable,
        hub: mpsc::Sender<HubMsg>,
    ) -> Result<Pool, HerdError> {
        let mut queues = Vec::with_capacity(configs.len());
        let mut threads = Vec::new();
        for (index, config) in configs.iter().enumerate() {
            let factory = factory(config, Arc::clone(&table.get(index).health))?;
            let evaluator = index;
            let (tx, rx) = crossbeam_channel::bounded::<Job>(config.queue_capacity);
            let name: Arc<str> = config.name.as_str().into();
            for i in 0..config.threads {
                let rx = rx.clone();
                let hub = hub.clone();
                let factory = Arc::clone(&factory);
                let name = Arc::clone(&name);
                let handle = std::thread::Builder::new()
                    .name(format!("herd-eval-{}-{i}", config.name))
                    .spawn(move || worker_loop(i, evaluator, name, factory, rx, hub))
                    .map_err(|e| HerdError::Evaluator {
                        name: config.name.clone(),
                        message: format!("cannot spawn thread: {e}"),
                    })?;
                threads.push(handle);
            }
            queues.push(tx);
        }
        Ok(Pool { queues, threads })
    }

    /// Queues a job; gives it back when the evaluator's queue is full.
    pub fn try_dispatch(&self, evaluator: usize, job: Job) -> Result<(), Job> {
        self.queues[evaluator]
            .try_send(job)
            .map_err(|e| e.into_inner())
    }

    /// Closes the queues and waits for every thread to finish its job.
    pub fn shutdown(self) {
        drop(self.queues);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn worker_loop(
    thread: usize,
    evaluator: usize,
    fn_name: Arc<str>,
    factory: Arc<dyn WorkerFactory>,
    jobs: crossbeam_channel::Receiver<Job>,
    hub: mpsc::Sender<HubMsg>,
) {
    let mut worker = factory.make(thread);
    while let Ok(job) = jobs.recv() {
        if job.cancelled.load(Ordering::Acquire) {
            continue;
        }
        if hub
            .blocking_send(HubMsg::Started {
                evaluator,
                key: job.key,
                gen: job.gen,
            })
            .is_err()
        {
            return;
        }
        let task = Task {
            key: job.key,
            fn_name: Arc::clone(&fn_name),
            input: job.input,
        };
        let started = Instant::now();
        let outcome = match catch_unwind(AssertUnwindSafe(|| worker.run(&task))) {
            Ok(outcome) => outcome,
            Err(panic) => {
                worker = factory.make(thread);
                Err(EvalError::Failed(format!(
                    "evaluator panicked: {}",
                    panic_message(panic.as_ref())
                )))
            }
        };
        let eval_ms = started.elapsed().as_secs_f64() * 1000.0;
        if hub
            .blocking_send(HubMsg::Done {
                evaluator,
                key: job.key,
                gen: job.gen,
                outcome,
                eval_ms,
            })
            .is_err()
        {
            return;
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}
