//! Evaluators: what turns an input into an output, and the builtin ones.
//!
//! Each pool thread owns one [`Worker`], made by its evaluator's
//! [`WorkerFactory`]; a worker keeps whatever per-thread state it needs (a
//! child process, for `process` evaluators) and runs one task at a time.

use crate::config::{EvaluatorConfig, EvaluatorKind, MAX_PROGRESS_STEPS};
use crate::error::EvalError;
use crate::key::Key;
use crate::metrics::{fn_label, Metrics};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One evaluation to run.
#[derive(Debug, Clone)]
pub struct Task {
    pub key: Key,
    pub fn_name: Arc<str>,
    /// The input as canonical JSON text.
    pub input: Arc<str>,
    /// Where its progress reports go.
    pub progress: Progress,
}

/// Where an evaluation's progress reports (JSON text) go.
#[derive(Clone, Default)]
pub struct Progress(Option<Sink>);

type Sink = Arc<dyn Fn(&str) + Send + Sync>;

impl Progress {
    pub fn to(sink: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Progress(Some(Arc::new(sink)))
    }

    /// Passes one report (JSON text) on.
    pub fn report(&self, data: &str) {
        if let Some(sink) = &self.0 {
            sink(data);
        }
    }
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Progress(sink)"
        } else {
            "Progress(none)"
        })
    }
}

/// Runs tasks on one pool thread.
pub trait Worker: Send {
    /// Gets ready before the first task (a process worker starts its
    /// program here, so the first evaluation does not pay for its start-up).
    fn prepare(&mut self) {}

    /// Evaluates `task`; the output is JSON text.
    fn run(&mut self, task: &Task) -> Result<String, EvalError>;

    /// Looks after the worker while no task comes (a process worker
    /// notices a program that died and starts it again on its backoff
    /// schedule); returns how long to wait for a task before calling it
    /// again, or None to wait for a task alone.
    fn tend(&mut self) -> Option<std::time::Duration> {
        None
    }
}

/// Makes the worker of each pool thread of one evaluator.
pub trait WorkerFactory: Send + Sync {
    fn make(&self, thread: usize) -> Box<dyn Worker>;
}

/// The factory of a builtin evaluator (`simulate`, `echo`); None for the
/// other kinds.
pub fn builtin_factory(config: &EvaluatorConfig) -> Option<Arc<dyn WorkerFactory>> {
    match config.kind {
        EvaluatorKind::Simulate => Some(Arc::new(Builtin(Simulate {
            max_output_bytes: config.max_output_bytes,
            max_sleep_ms: config.max_sleep_ms(),
            progress_steps: config.progress_steps,
        }))),
        EvaluatorKind::Echo => Some(Arc::new(Builtin(Echo))),
        EvaluatorKind::Process | EvaluatorKind::Remote => None,
    }
}

/// Whether an evaluator can currently run tasks, as its workers see it:
/// unhealthy while its worker programs keep dying at start-up, or while
/// threads are lost to evaluations that overran their timeout.
#[derive(Debug)]
pub struct Health {
    state: Mutex<HealthState>,
    healthy_gauge: Gauge,
    lost_gauge: Gauge,
    workers_gauge: Gauge,
    /// Worker processes replaced so far.
    pub restarts: Counter,
}

#[derive(Debug, Default)]
struct HealthState {
    startup: Option<String>,
    lost: usize,
    /// A remote evaluator that no worker session serves.
    no_workers: bool,
}

impl HealthState {
    fn reason(&self) -> Option<String> {
        if self.no_workers {
            return Some("no_workers: no worker session serves this fn".into());
        }
        match (&self.startup, self.lost) {
            (None, 0) => None,
            (Some(why), 0) => Some(why.clone()),
            (None, n) => Some(format!("{n} thread(s) lost to evaluations past timeout_ms")),
            (Some(why), n) => Some(format!(
                "{why}; {n} thread(s) lost to evaluations past timeout_ms"
            )),
        }
    }
}

impl Health {
    /// Health of evaluator `name`, reported in `metrics`.
    pub fn new(name: &str, metrics: &Metrics) -> Self {
        let label = fn_label(name);
        let healthy_gauge = metrics.evaluator_healthy.get_or_create(&label).clone();
        healthy_gauge.set(1);
        Health {
            state: Mutex::new(HealthState::default()),
            healthy_gauge,
            lost_gauge: metrics.lost_threads.get_or_create(&label).clone(),
            workers_gauge: metrics.remote_workers.get_or_create(&label).clone(),
            restarts: metrics.worker_restarts.get_or_create(&label).clone(),
        }
    }

    fn update(&self, change: impl FnOnce(&mut HealthState)) {
        let mut state = self.state.lock().expect("health lock");
        change(&mut state);
        self.lost_gauge.set(state.lost as i64);
        self.healthy_gauge.set(i64::from(state.reason().is_none()));
    }

    /// How many worker sessions serve a remote evaluator (none: `no_workers`).
    pub fn set_workers(&self, workers: usize) {
        self.workers_gauge.set(workers as i64);
        self.update(|s| s.no_workers = workers == 0);
    }

    /// `ok`, `no_workers` or `unhealthy`, for snapshots.
    pub fn status(&self) -> &'static str {
        let state = self.state.lock().expect("health lock");
        if state.no_workers {
            "no_workers"
        } else if state.reason().is_some() {
            "unhealthy"
        } else {
            "ok"
        }
    }

    /// The evaluator's worker programs keep dying at start-up.
    pub fn set_unhealthy(&self, reason: String) {
        self.update(|s| s.startup = Some(reason));
    }

    /// A worker program answered again.
    pub fn set_healthy(&self) {
        self.update(|s| s.startup = None);
    }

    /// A thread is stuck in an evaluation past its timeout.
    pub fn thread_lost(&self) {
        self.update(|s| s.lost += 1);
    }

    /// A lost thread finished its evaluation.
    pub fn thread_returned(&self) {
        self.update(|s| s.lost = s.lost.saturating_sub(1));
    }

    pub fn is_healthy(&self) -> bool {
        self.reason().is_none()
    }

    /// Whether worker programs are failing at start-up.
    pub fn startup_failing(&self) -> bool {
        self.state.lock().expect("health lock").startup.is_some()
    }

    /// Why the evaluator is unhealthy, if it is.
    pub fn reason(&self) -> Option<String> {
        self.state.lock().expect("health lock").reason()
    }
}

struct Builtin<W>(W);

impl<W: Worker + Clone + Sync + 'static> WorkerFactory for Builtin<W> {
    fn make(&self, _thread: usize) -> Box<dyn Worker> {
        Box::new(self.0.clone())
    }
}

/// Stands in for a costly computation.
///
/// Input members it reads (all optional): `sleep_ms` (otherwise 15-30 ms
/// from the key), `spin_ms` (busy CPU time), each at most the evaluator's
/// `max_sleep_ms`; `fail` (fail with this message), `panic` (panic when
/// true), `output_bytes` (pad the output to about this size, at most the
/// evaluator's `max_output_bytes`), `progress` (report progress this many
/// times while sleeping, at most [`MAX_PROGRESS_STEPS`]; otherwise the
/// evaluator's `progress_steps`): `{"step":i,"of":n}`. The output is
/// derived from the key alone, about 128 bytes, so equal inputs give equal
/// outputs.
#[derive(Clone)]
pub struct Simulate {
    pub max_output_bytes: usize,
    pub max_sleep_ms: u64,
    pub progress_steps: u64,
}

impl Worker for Simulate {
    fn run(&mut self, task: &Task) -> Result<String, EvalError> {
        let input: Value = serde_json::from_str(&task.input)
            .map_err(|e| EvalError::Failed(format!("input is not JSON: {e}")))?;
        let field = |name: &str| input.as_object().and_then(|o| o.get(name));
        let sleep_ms = field("sleep_ms")
            .and_then(Value::as_u64)
            .unwrap_or(15 + task.key.seed() % 16)
            .min(self.max_sleep_ms);
        if let Some(spin_ms) = field("spin_ms").and_then(Value::as_u64) {
            let spin_ms = spin_ms.min(self.max_sleep_ms);
            let until = Instant::now() + Duration::from_millis(spin_ms);
            let mut x = task.key.seed();
            while Instant::now() < until {
                for _ in 0..1000 {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                }
                std::hint::black_box(x);
            }
        }
        let steps = field("progress")
            .and_then(Value::as_u64)
            .unwrap_or(self.progress_steps)
            .min(MAX_PROGRESS_STEPS);
        // The sleep in steps + 1 parts, a report after each of the first
        // `steps`.
        let part = Duration::from_millis(sleep_ms) / (steps as u32 + 1);
        for step in 1..=steps {
            std::thread::sleep(part);
            task.progress
                .report(&format!("{{\"step\":{step},\"of\":{steps}}}"));
        }
        std::thread::sleep(Duration::from_millis(sleep_ms).saturating_sub(part * steps as u32));
        if field("panic").and_then(Value::as_bool) == Some(true) {
            panic!("simulated panic for key {}", task.key);
        }
        if let Some(message) = field("fail") {
            let message = message
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| message.to_string());
            return Err(EvalError::Failed(message));
        }
        let digest = blake3::hash(task.key.bytes());
        let mut output = json!({
            "key": task.key.to_hex(),
            "value": task.key.seed() % 1_000_000,
            "digest": digest.to_hex().as_str(),
        });
        if let Some(bytes) = field("output_bytes").and_then(Value::as_u64) {
            let pad = (bytes as usize).min(self.max_output_bytes);
            output["pad"] = Value::String("x".repeat(pad.saturating_sub(128)));
        }
        Ok(output.to_string())
    }
}

/// Returns its input.
#[derive(Clone)]
pub struct Echo;

impl Worker for Echo {
    fn run(&mut self, task: &Task) -> Result<String, EvalError> {
        Ok(task.input.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn simulate() -> Simulate {
        Simulate {
            progress_steps: 0,
            max_output_bytes: 1 << 20,
            max_sleep_ms: 1000,
        }
    }

    fn task(input: Value) -> Task {
        let canonical = crate::key::canonical_json(&input);
        Task {
            key: Key::derive("default", canonical.as_bytes()),
            fn_name: "default".into(),
            input: canonical.into(),
            progress: Progress::default(),
        }
    }

    #[test]
    fn simulate_is_deterministic_and_small() {
        let t = task(json!({"sleep_ms": 0, "n": 1}));
        let a = simulate().run(&t).unwrap();
        assert_eq!(a, simulate().run(&t).unwrap());
        assert!((100..=160).contains(&a.len()), "{} bytes", a.len());
        let other = simulate()
            .run(&task(json!({"sleep_ms": 0, "n": 2})))
            .unwrap();
        assert_ne!(a, other);
    }

    #[test]
    fn simulate_fails_on_request() {
        let err = simulate()
            .run(&task(json!({"sleep_ms": 0, "fail": "nope"})))
            .unwrap_err();
        assert_eq!(err, EvalError::Failed("nope".into()));
    }

    #[test]
    fn simulate_pads_output() {
        let out = simulate()
            .run(&task(json!({"sleep_ms": 0, "output_bytes": 4096})))
            .unwrap();
        assert!(out.len() >= 4096);
    }
}
