//! The evaluator pool: dedicated OS threads, a bounded job queue per evaluator.
//!
//! Evaluations block (they sleep, spin, or wait on a child process), so they
//! run on threads of their own, never on the async runtime. A thread reports
//! when it starts a job and when it ends it as [`PoolEvent`]s on the sender
//! it was handed; it never touches a socket and knows nothing of the hub.
//! A panic is caught, fails only that job, and the thread carries on with a
//! fresh worker, so the pool keeps its size.
//!
//! A thread whose job overran its timeout cannot be stopped (a builtin
//! evaluation is plain code). The driver says so with [`Pool::overran`]:
//! the thread is counted as lost, a spare takes its place (up to
//! `spare_threads` per evaluator) and the evaluator is reported unhealthy
//! until the lost thread returns; a returning thread whose place was taken
//! then ends, so the pool is back to its size.
//!
//! Each queue is bounded twice: `queue_capacity` jobs and `queue_bytes`
//! bytes of input, counted by the core (`crate::core`) for the jobs it has
//! offered and not seen start; the queue itself refuses past twice that.
//! Threads take jobs in the order of a [`RunQueue`]: highest priority
//! first, namespaces in turn at equal priority, then arrival order.

use crate::config::{EvaluatorConfig, EvaluatorKind};
use crate::core::{Priority, RunQueue};
use crate::error::{EvalError, HerdError};
use crate::exec::eval::{builtin_factory, Health, Progress, Task, WorkerFactory};
use crate::key::Key;
use crate::metrics::{FnMetrics, Metrics};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// What a pool thread reports.
pub enum PoolEvent {
    /// A thread took a job.
    Started {
        evaluator: usize,
        key: Key,
        gen: u64,
    },
    /// A job reported progress (JSON text).
    Progress { gen: u64, data: Arc<str> },
    /// A thread finished a job.
    Done {
        evaluator: usize,
        key: Key,
        gen: u64,
        outcome: Result<String, EvalError>,
        eval_ms: f64,
    },
}

const RUNNING: u8 = 0;
const FINISHED: u8 = 1;
const LOST: u8 = 2;

/// Shared between a job's driver and the thread that runs it.
#[derive(Debug, Default)]
pub struct JobCtl {
    /// Set when nobody waits any more; a queued job is then skipped.
    cancelled: AtomicBool,
    /// RUNNING, then FINISHED (by the thread) or LOST (by [`Pool::overran`]),
    /// whichever comes first.
    state: AtomicU8,
    /// A spare thread was started in place of the lost one.
    replaced: AtomicBool,
}

impl JobCtl {
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }
}

/// One queued evaluation.
pub struct Job {
    pub key: Key,
    pub gen: u64,
    pub input: Arc<str>,
    pub priority: Priority,
    pub ctl: Arc<JobCtl>,
}

/// One evaluator's queued jobs, in the order threads take them.
#[derive(Default)]
struct Line {
    jobs: RunQueue<Job>,
    bytes: usize,
    /// The pool is shutting down: threads end once it is empty.
    closed: bool,
}

/// Why a job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueFull {
    /// `queue_capacity` jobs are queued.
    Jobs,
    /// `queue_bytes` bytes of input are queued.
    Bytes,
}

/// What sessions need to know of an evaluator: its name and limits.
#[derive(Debug, Clone)]
pub struct EvaluatorSpec {
    pub index: usize,
    pub name: Arc<str>,
    pub timeout: Duration,
    pub max_input_bytes: usize,
    /// The largest output a worker may send (`max_output_bytes`).
    pub max_output_bytes: usize,
    /// `remote`: attempts per task.
    pub max_attempts: u32,
    /// Whether worker sessions run it (`kind = "remote"`).
    pub remote: bool,
    pub health: Arc<Health>,
    pub metrics: FnMetrics,
}

/// The evaluators by `fn` name.
#[derive(Debug)]
pub struct EvaluatorTable {
    specs: Vec<EvaluatorSpec>,
    by_name: foldhash::HashMap<String, usize>,
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
                max_output_bytes: c.max_output_bytes,
                max_attempts: c.max_attempts,
                remote: c.kind == crate::config::EvaluatorKind::Remote,
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

    /// Each fn's name, metrics and health, for the figures.
    pub fn figures(&self) -> impl Iterator<Item = (&str, &FnMetrics, &'static str)> + Clone {
        self.specs
            .iter()
            .map(|e| (&*e.name, &e.metrics, e.health.status()))
    }

    pub fn iter(&self) -> impl Iterator<Item = &EvaluatorSpec> {
        self.specs.iter()
    }
}

/// One evaluator's threads: what each needs to run, and its counts.
struct Crew {
    evaluator: usize,
    name: Arc<str>,
    factory: Arc<dyn WorkerFactory>,
    line: Mutex<Line>,
    /// Signalled when a job is queued or the line closes.
    ready: Condvar,
    max_jobs: usize,
    max_bytes: usize,
    events: mpsc::Sender<PoolEvent>,
    health: Arc<Health>,
    /// Threads started so far (names and worker numbers).
    started: AtomicUsize,
    /// Spares running in place of lost threads that have not returned.
    spares: AtomicUsize,
    max_spares: usize,
}

impl Crew {
    fn line(&self) -> MutexGuard<'_, Line> {
        self.line.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next job, waiting at most `wait` (forever: None); None when
    /// the wait is over or the pool shuts down (`Err`).
    fn next(&self, wait: Option<Duration>) -> Result<Option<Job>, ()> {
        let mut line = self.line();
        let until = wait.map(|w| Instant::now() + w);
        loop {
            if let Some(taken) = line.jobs.pop() {
                line.bytes -= taken.item.input.len();
                return Ok(Some(taken.item));
            }
            if line.closed {
                return Err(());
            }
            line = match until {
                None => self.ready.wait(line).unwrap_or_else(|e| e.into_inner()),
                Some(until) => {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    self.ready
                        .wait_timeout(line, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }
}

/// The running threads and the queues that feed them (none for `remote`
/// evaluators, whose work goes to worker sessions).
pub struct Pool {
    crews: Vec<Option<Arc<Crew>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts every evaluator's threads; they report to `events`.
    pub fn start(
        configs: &[EvaluatorConfig],
        table: &EvaluatorTable,
        events: mpsc::Sender<PoolEvent>,
    ) -> Result<Pool, HerdError> {
        let mut pool = Pool {
            crews: Vec::with_capacity(configs.len()),
            threads: Vec::new(),
        };
        for (index, config) in configs.iter().enumerate() {
            if config.kind == crate::config::EvaluatorKind::Remote {
                pool.crews.push(None);
                continue;
            }
            let health = Arc::clone(&table.get(index).health);
            let factory = factory(config, Arc::clone(&health))?;
            // The core admits at most queue_capacity jobs (queue_bytes of
            // input) at once; the queue refuses past twice that.
            let crew = Arc::new(Crew {
                evaluator: index,
                name: config.name.as_str().into(),
                factory,
                line: Mutex::new(Line::default()),
                ready: Condvar::new(),
                max_jobs: config.queue_capacity.saturating_mul(2),
                max_bytes: config.queue_bytes.saturating_mul(2),
                events: events.clone(),
                health,
                started: AtomicUsize::new(0),
                spares: AtomicUsize::new(0),
                max_spares: config.spare_threads(),
            });
            for _ in 0..config.threads {
                let handle = spawn(&crew).map_err(|e| HerdError::Evaluator {
                    name: config.name.clone(),
                    message: format!("cannot spawn thread: {e}"),
                })?;
                pool.threads.push(handle);
            }
            pool.crews.push(Some(crew));
        }
        Ok(pool)
    }

    /// Queues a job; gives it back when the evaluator's queue is full.
    pub fn try_dispatch(&self, evaluator: usize, job: Job) -> Result<(), (Job, QueueFull)> {
        let Some(crew) = &self.crews[evaluator] else {
            return Err((job, QueueFull::Jobs));
        };
        let mut line = crew.line();
        if line.jobs.len() >= crew.max_jobs {
            return Err((job, QueueFull::Jobs));
        }
        if line.bytes + job.input.len() > crew.max_bytes {
            return Err((job, QueueFull::Bytes));
        }
        line.bytes += job.input.len();
        line.jobs.push(job.gen, job.key.ns(), job.priority, job);
        drop(line);
        crew.ready.notify_one();
        Ok(())
    }

    /// Job `gen` of `evaluator`, if still queued, now starts at `priority`.
    pub fn raise(&self, evaluator: usize, gen: u64, priority: Priority) {
        if let Some(crew) = &self.crews[evaluator] {
            crew.line().jobs.raise(gen, priority);
        }
    }

    /// Takes job `gen` of `evaluator` out of its queue, if it is there.
    pub fn unqueue(&self, evaluator: usize, gen: u64) {
        if let Some(crew) = &self.crews[evaluator] {
            let mut line = crew.line();
            if let Some(job) = line.jobs.remove(gen) {
                line.bytes -= job.input.len();
            }
        }
    }

    /// The job `ctl` of `evaluator` overran its timeout: its thread is lost
    /// until it returns, and a spare takes its place if the cap allows.
    pub fn overran(&mut self, evaluator: usize, ctl: &JobCtl) {
        if ctl
            .state
            .compare_exchange(RUNNING, LOST, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let Some(crew) = &self.crews[evaluator] else {
            return;
        };
        crew.health.thread_lost();
        if crew.spares.load(Ordering::Acquire) >= crew.max_spares {
            tracing::warn!(
                evaluator = &*crew.name,
                "evaluator thread lost to an overrunning evaluation; spare_threads exhausted"
            );
            return;
        }
        match spawn(crew) {
            Ok(handle) => {
                crew.spares.fetch_add(1, Ordering::AcqRel);
                ctl.replaced.store(true, Ordering::Release);
                self.threads.retain(|t| !t.is_finished());
                self.threads.push(handle);
                tracing::warn!(
                    evaluator = &*crew.name,
                    "evaluator thread lost to an overrunning evaluation; a spare took its place"
                );
            }
            Err(error) => {
                tracing::warn!(evaluator = &*crew.name, %error, "cannot start a spare thread")
            }
        }
    }

    /// Closes the queues and waits for every thread to finish its job (and
    /// those still queued).
    pub fn shutdown(self) {
        for crew in self.crews.iter().flatten() {
            crew.line().closed = true;
            crew.ready.notify_all();
        }
        drop(self.crews);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// The factory for an evaluator's configuration.
fn factory(
    config: &EvaluatorConfig,
    health: Arc<Health>,
) -> Result<Arc<dyn WorkerFactory>, HerdError> {
    if let Some(builtin) = builtin_factory(config) {
        return Ok(builtin);
    }
    match config.kind {
        EvaluatorKind::Process => Ok(Arc::new(crate::exec::process::ProcessFactory::new(
            config, health,
        )?)),
        _ => Err(HerdError::Evaluator {
            name: config.name.clone(),
            message: "a remote evaluator runs on worker sessions, not on threads".into(),
        }),
    }
}

fn spawn(crew: &Arc<Crew>) -> std::io::Result<JoinHandle<()>> {
    let number = crew.started.fetch_add(1, Ordering::AcqRel);
    let crew = Arc::clone(crew);
    std::thread::Builder::new()
        .name(format!("herd-eval-{}-{number}", crew.name))
        .spawn(move || worker_loop(number, &crew))
}

fn worker_loop(thread: usize, crew: &Crew) {
    let mut worker = crew.factory.make(thread);
    worker.prepare();
    let evaluator = crew.evaluator;
    loop {
        let job = match crew.next(worker.tend()) {
            Ok(Some(job)) => job,
            Ok(None) => continue,
            Err(()) => return,
        };
        if job.ctl.is_cancelled() {
            continue;
        }
        let started = PoolEvent::Started {
            evaluator,
            key: job.key,
            gen: job.gen,
        };
        if crew.events.blocking_send(started).is_err() {
            return;
        }
        let (gen, events) = (job.gen, crew.events.clone());
        let task = Task {
            key: job.key,
            fn_name: Arc::clone(&crew.name),
            input: job.input,
            progress: Progress::to(move |data| {
                let _ = events.blocking_send(PoolEvent::Progress {
                    gen,
                    data: data.into(),
                });
            }),
        };
        let started = Instant::now();
        let outcome = match catch_unwind(AssertUnwindSafe(|| worker.run(&task))) {
            Ok(outcome) => outcome,
            Err(panic) => {
                worker = crew.factory.make(thread);
                Err(EvalError::Failed(format!(
                    "evaluator panicked: {}",
                    crate::error::panic_message(panic.as_ref())
                )))
            }
        };
        let eval_ms = started.elapsed().as_secs_f64() * 1000.0;
        let lost = job
            .ctl
            .state
            .compare_exchange(RUNNING, FINISHED, Ordering::AcqRel, Ordering::Acquire)
            .is_err();
        let done = PoolEvent::Done {
            evaluator,
            key: job.key,
            gen: job.gen,
            outcome,
            eval_ms,
        };
        if crew.events.blocking_send(done).is_err() {
            return;
        }
        if lost {
            crew.health.thread_returned();
            if job.ctl.replaced.load(Ordering::Acquire) {
                // A spare took this thread's place: leave it there.
                crew.spares.fetch_sub(1, Ordering::AcqRel);
                return;
            }
        }
    }
}
