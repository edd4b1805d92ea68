//! Process evaluators: any program as the computation.
//!
//! Each pool thread keeps one long-lived child and talks JSON lines with it,
//! one task at a time (docs/protocol.md, "Process evaluators"):
//!
//! ```text
//! broker -> child:  {"key":"…","fn":"…","input":…}
//! child -> broker:  {"output":…}   or   {"error":"message"}
//! ```
//!
//! A child that exits, writes something that is not such a line, or runs
//! past `timeout_ms` (taking the task included: a child that stops reading
//! its stdin is caught by the same deadline) fails the task at hand and is
//! replaced. Each child leads a process group of its own, and the whole
//! group is killed, so grandchildren holding its pipes die with it and no
//! thread is left waiting on them. Its stderr goes to herd's log a line at
//! a time (each at most `stderr_line_bytes`), never into results. A child that keeps dying before it
//! answers anything is restarted with exponential backoff, and meanwhile its
//! evaluator is reported unhealthy and tasks fail at once instead of
//! spinning up children in a hot loop.

use crate::config::EvaluatorConfig;
use crate::error::{EvalError, HerdError};
use crate::exec::eval::{Health, Task, Worker, WorkerFactory};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// What every child of one evaluator is started with.
pub struct ProcessFactory {
    spec: Arc<ProcessSpec>,
}

struct ProcessSpec {
    name: String,
    command: Vec<String>,
    cwd: Option<std::path::PathBuf>,
    env: Vec<(String, String)>,
    timeout: Duration,
    grace: Duration,
    max_output_bytes: usize,
    backoff: Duration,
    backoff_max: Duration,
    unhealthy_after: u32,
    stderr_line_bytes: usize,
    health: Arc<Health>,
}

impl ProcessFactory {
    pub fn new(config: &EvaluatorConfig, health: Arc<Health>) -> Result<Self, HerdError> {
        if config.command.is_empty() {
            return Err(HerdError::Evaluator {
                name: config.name.clone(),
                message: "kind \"process\" needs a command".into(),
            });
        }
        Ok(ProcessFactory {
            spec: Arc::new(ProcessSpec {
                name: config.name.clone(),
                command: config.command.clone(),
                cwd: config.cwd.clone(),
                env: config
                    .env
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                timeout: Duration::from_millis(config.timeout_ms),
                grace: Duration::from_millis(config.grace_ms),
                max_output_bytes: config.max_output_bytes,
                backoff: Duration::from_millis(config.restart_backoff_ms),
                backoff_max: Duration::from_millis(config.restart_backoff_max_ms),
                unhealthy_after: config.unhealthy_after,
                stderr_line_bytes: config.stderr_line_bytes,
                health,
            }),
        })
    }
}

impl WorkerFactory for ProcessFactory {
    fn make(&self, thread: usize) -> Box<dyn Worker> {
        Box::new(ProcessWorker {
            spec: Arc::clone(&self.spec),
            thread,
            child: None,
            early_deaths: 0,
            next_start: None,
            started_at: None,
            last_words: None,
        })
    }
}

/// A line the child wrote, or why there is none.
enum Line {
    Text(Vec<u8>),
    TooLong,
}

/// One running child and the threads that feed its stdin and read its
/// stdout (so that neither can block the evaluator thread).
struct Running {
    child: Child,
    /// Task lines for the stdin thread; dropping it closes the child's stdin.
    stdin: Option<crossbeam_channel::Sender<Vec<u8>>>,
    lines: crossbeam_channel::Receiver<Line>,
    /// The stderr thread's last line, sent when the child's stderr closes.
    last_stderr: crossbeam_channel::Receiver<Option<String>>,
    answered: bool,
}

impl Running {
    /// Kills the child's whole process group, then reaps the child.
    fn kill(&mut self) -> std::io::Result<std::process::ExitStatus> {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = self.child.kill();
        self.child.wait()
    }
}

struct ProcessWorker {
    spec: Arc<ProcessSpec>,
    thread: usize,
    child: Option<Running>,
    /// Children in a row that died before answering any task.
    early_deaths: u32,
    /// No new child before this instant (backoff after early deaths).
    next_start: Option<Instant>,
    /// When the current child was started.
    started_at: Option<Instant>,
    /// The last line the last child that died wrote on stderr.
    last_words: Option<String>,
}

#[derive(Deserialize)]
struct Reply<'a> {
    #[serde(borrow)]
    output: Option<&'a RawValue>,
    error: Option<String>,
    #[serde(borrow)]
    progress: Option<&'a RawValue>,
}

/// What a child's line says.
enum Said {
    Outcome(Result<String, EvalError>),
    /// A progress report (JSON text); the outcome is still to come.
    Progress(String),
}

impl ProcessWorker {
    fn start(&mut self) -> Result<(), EvalError> {
        if let Some(at) = self.next_start {
            let now = Instant::now();
            if now < at {
                return Err(EvalError::Failed(format!(
                    "evaluator {:?}: its worker exited at start-up {} times in a row; next restart in {} ms{}",
                    self.spec.name,
                    self.early_deaths,
                    (at - now).as_millis(),
                    last_words(&self.last_words)
                )));
            }
        }
        let spec = &self.spec;
        let mut command = Command::new(&spec.command[0]);
        command
            .args(&spec.command[1..])
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(cwd) = &spec.cwd {
            command.current_dir(cwd);
        }
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                let message = format!("cannot start {:?}: {e}", spec.command[0]);
                self.early_death(&message);
                return Err(EvalError::Failed(message));
            }
        };
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = crossbeam_channel::bounded(1);
        let (tasks, task_rx) = crossbeam_channel::bounded(1);
        let (last_tx, last_stderr) = crossbeam_channel::bounded(1);
        let limit = spec.max_output_bytes;
        let name = spec.name.clone();
        let pid = child.id();
        let stderr_limit = spec.stderr_line_bytes;
        let thread = |role: &str| {
            std::thread::Builder::new().name(format!("herd-{role}-{}-{}", spec.name, self.thread))
        };
        let spawned = thread("out")
            .spawn(move || read_lines(stdout, limit, tx))
            .and_then(|_| thread("in").spawn(move || write_lines(stdin, task_rx)))
            .and_then(|_| {
                thread("err").spawn(move || {
                    let last = forward_stderr(stderr, stderr_limit, &name, pid);
                    let _ = last_tx.send(last);
                })
            });
        let mut running = Running {
            stdin: Some(tasks),
            child,
            lines,
            last_stderr,
            answered: false,
        };
        if let Err(e) = spawned {
            let _ = running.kill();
            return Err(EvalError::Failed(format!(
                "cannot start reader thread: {e}"
            )));
        }
        debug!(evaluator = %spec.name, pid, "worker started");
        self.child = Some(running);
        self.started_at = Some(Instant::now());
        Ok(())
    }

    /// Records a child that died (or never started) before answering anything.
    fn early_death(&mut self, why: &str) {
        self.early_deaths += 1;
        let spec = &self.spec;
        if self.early_deaths == 1 {
            warn!(evaluator = %spec.name, "worker died before answering anything: {why}");
        }
        // One death is replaced at once (the task may have been the cause);
        // from the second in a row on, restarts wait, twice as long each time.
        if self.early_deaths >= 2 {
            let exp = (self.early_deaths - 2).min(16);
            let backoff = spec
                .backoff
                .saturating_mul(1u32 << exp)
                .min(spec.backoff_max);
            self.next_start = Some(Instant::now() + backoff);
        }
        if self.early_deaths >= spec.unhealthy_after {
            spec.health.set_unhealthy(format!(
                "worker died at start-up {} times in a row: {why}",
                self.early_deaths
            ));
            warn!(evaluator = %spec.name, deaths = self.early_deaths, %why, "evaluator unhealthy");
        }
    }

    /// Stops the current child (if any), killing it, and records how it
    /// ended: its exit status and, if it wrote any, its last stderr line
    /// (waited for at most `grace_ms` once the child is gone).
    fn discard(&mut self, why: &str) -> String {
        let Some(mut running) = self.child.take() else {
            return String::new();
        };
        drop(running.stdin.take());
        let status = match running.child.try_wait() {
            Ok(Some(status)) => {
                // The child is gone; what it left in its group goes too.
                let _ = running.kill();
                status
            }
            _ => match running.kill() {
                Ok(status) => status,
                Err(_) => return "could not be reaped".into(),
            },
        };
        self.spec.health.restarts.inc();
        self.last_words = running
            .last_stderr
            .recv_timeout(self.spec.grace)
            .ok()
            .flatten();
        let ended = format!("{status}{}", last_words(&self.last_words));
        if running.answered {
            warn!(evaluator = %self.spec.name, pid = running.child.id(), %ended, "worker {why}; replacing it");
        } else {
            self.early_death(&format!("{why}, {ended}"));
        }
        ended
    }

    fn answered(&mut self) {
        if let Some(running) = self.child.as_mut() {
            running.answered = true;
        }
        if self.early_deaths > 0 || self.next_start.is_some() {
            self.early_deaths = 0;
            self.next_start = None;
            if self.spec.health.startup_failing() {
                info!(evaluator = %self.spec.name, "evaluator healthy again");
            }
            self.spec.health.set_healthy();
        }
    }
}

impl Worker for ProcessWorker {
    /// Starts the child with the broker; a failure is counted like any
    /// start-up death and retried with the first task.
    fn prepare(&mut self) {
        if let Err(error) = self.start() {
            warn!(evaluator = %self.spec.name, error = error.message(), "worker did not start");
        }
    }

    /// While idle: a child that died before answering anything counts as a
    /// start-up death and is started again when its backoff allows, so a
    /// program that cannot start shows unhealthy without a task to reveal
    /// it. A child that has not answered yet is looked at again after as
    /// long as it has lived (at least `restart_backoff_ms`, at most
    /// `restart_backoff_max_ms`); one that has answered, not at all.
    fn tend(&mut self) -> Option<Duration> {
        let now = Instant::now();
        if let Some(running) = self.child.as_mut() {
            if running.answered {
                return None;
            }
            if matches!(running.child.try_wait(), Ok(None)) {
                // Looked at less often the longer it lives.
                let lived = self.started_at.map_or(Duration::ZERO, |at| now - at);
                return Some(lived.clamp(
                    self.spec.backoff,
                    self.spec.backoff_max.max(self.spec.backoff),
                ));
            }
            self.discard("exited at start-up");
        }
        match self.next_start {
            Some(at) if now < at => Some(at - now),
            _ => {
                if let Err(error) = self.start() {
                    debug!(evaluator = %self.spec.name, error = error.message(), "worker did not start");
                }
                Some(self.spec.backoff)
            }
        }
    }

    fn run(&mut self, task: &Task) -> Result<String, EvalError> {
        // A child that exited while idle is replaced before the task, not blamed on it.
        if let Some(running) = self.child.as_mut() {
            if !matches!(running.child.try_wait(), Ok(None)) {
                self.discard("exited while idle");
            }
        }
        // A line left over from an earlier task means the child is out of step.
        if let Some(running) = self.child.as_ref() {
            if running.lines.try_recv().is_ok() {
                self.discard("wrote a line nobody asked for");
            }
        }
        if self.child.is_none() {
            self.start()?;
        }
        let deadline = Instant::now() + self.spec.timeout;
        let mut line = Vec::with_capacity(task.input.len() + 80);
        line.extend_from_slice(b"{\"key\":\"");
        line.extend_from_slice(task.key.to_hex().as_bytes());
        line.extend_from_slice(b"\",\"fn\":");
        line.extend_from_slice(
            serde_json::to_string(&*task.fn_name)
                .expect("string")
                .as_bytes(),
        );
        line.extend_from_slice(b",\"input\":");
        line.extend_from_slice(task.input.as_bytes());
        line.extend_from_slice(b"}\n");
        let running = self.child.as_mut().expect("child started");
        // The stdin thread writes; a child that does not read is caught below
        // by the same deadline as one that does not answer.
        let queued = running.stdin.as_ref().map(|stdin| stdin.try_send(line));
        if !matches!(queued, Some(Ok(()))) {
            let status = self.discard("stdin closed");
            return Err(EvalError::Failed(format!(
                "worker exited before taking the task ({status})"
            )));
        }
        let received = loop {
            let received = running
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()));
            if let Ok(Line::Text(text)) = &received {
                if let Ok(Said::Progress(data)) = parse_reply(text) {
                    task.progress.report(&data);
                    continue;
                }
            }
            break received;
        };
        match received {
            Ok(Line::Text(text)) => match parse_reply(&text) {
                Ok(Said::Outcome(result)) => {
                    self.answered();
                    result
                }
                Ok(Said::Progress(_)) => unreachable!("progress lines are passed on above"),
                Err(message) => {
                    self.discard("wrote an invalid line");
                    Err(EvalError::Failed(message))
                }
            },
            Ok(Line::TooLong) => {
                self.discard("wrote an over-long line");
                Err(EvalError::Failed(format!(
                    "worker wrote a line longer than max_output_bytes ({})",
                    self.spec.max_output_bytes
                )))
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                self.discard("timed out");
                Err(EvalError::Timeout(format!(
                    "worker took longer than {} ms and was killed",
                    self.spec.timeout.as_millis()
                )))
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                let status = self.discard("exited during a task");
                Err(EvalError::Failed(format!(
                    "worker exited during the task ({status})"
                )))
            }
        }
    }
}

impl Drop for ProcessWorker {
    /// Closes the child's stdin, gives it `grace_ms` to exit, then kills it.
    fn drop(&mut self) {
        let Some(mut running) = self.child.take() else {
            return;
        };
        drop(running.stdin.take());
        let until = Instant::now() + self.spec.grace;
        while matches!(running.child.try_wait(), Ok(None)) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = running.kill();
    }
}

/// `last`, the last line a child wrote on stderr, as the end of a message.
fn last_words(last: &Option<String>) -> String {
    last.as_ref().map_or(String::new(), |line| {
        format!("; its last line on stderr: {line:?}")
    })
}

fn parse_reply(text: &[u8]) -> Result<Said, String> {
    let shown = || String::from_utf8_lossy(&text[..text.len().min(200)]).into_owned();
    let reply: Reply = serde_json::from_slice(text).map_err(|e| {
        format!(
            "worker wrote a line that is not a JSON reply ({e}): {}",
            shown()
        )
    })?;
    match (reply.output, reply.error, reply.progress) {
        (Some(output), None, _) => Ok(Said::Outcome(Ok(output.get().to_string()))),
        (None, Some(error), _) => Ok(Said::Outcome(Err(EvalError::Failed(error)))),
        (None, None, Some(progress)) => Ok(Said::Progress(progress.get().to_string())),
        _ => Err(format!(
            "worker wrote a line with neither or both of \"output\" and \"error\": {}",
            shown()
        )),
    }
}

/// Reads newline-terminated lines of at most `limit` bytes into `tx`.
fn read_lines(stdout: impl Read, limit: usize, tx: crossbeam_channel::Sender<Line>) {
    let mut reader = BufReader::new(stdout);
    loop {
        let mut line = Vec::new();
        match reader
            .by_ref()
            .take(limit as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.last() != Some(&b'\n') {
            // EOF inside a line, or a line over the limit.
            if line.len() > limit {
                let _ = tx.send(Line::TooLong);
            }
            return;
        }
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if tx.send(Line::Text(line)).is_err() {
            return;
        }
    }
}

/// Writes task lines to the child's stdin until the sender is dropped (then
/// the child sees end of input) or the child's stdin closes.
fn write_lines(mut stdin: ChildStdin, tasks: crossbeam_channel::Receiver<Vec<u8>>) {
    while let Ok(line) = tasks.recv() {
        if stdin.write_all(&line).and_then(|_| stdin.flush()).is_err() {
            return;
        }
    }
}

/// Logs the child's stderr a line at a time; of a line longer than `limit`
/// bytes the rest is dropped, and the log says how much. Returns the last
/// line that was not blank, once stderr closes.
fn forward_stderr(stderr: impl Read, limit: usize, evaluator: &str, pid: u32) -> Option<String> {
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::with_capacity(256);
    let mut last = None;
    loop {
        line.clear();
        match reader
            .by_ref()
            .take(limit as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return last,
            Ok(_) => {}
        }
        let mut dropped = 0usize;
        if line.last() != Some(&b'\n') && line.len() == limit {
            match skip_line(&mut reader) {
                Ok(n) => dropped = n,
                Err(_) => return last,
            }
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\n', '\r']);
        if !text.trim().is_empty() {
            last = Some(text.to_string());
        }
        if dropped > 0 {
            info!(
                evaluator,
                pid, "worker stderr: {text} [… {dropped} more bytes dropped]"
            );
        } else {
            info!(evaluator, pid, "worker stderr: {text}");
        }
    }
}

/// Consumes input up to and including the next newline; returns the bytes
/// skipped before it.
fn skip_line(reader: &mut impl BufRead) -> std::io::Result<usize> {
    let mut skipped = 0;
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Ok(skipped);
        }
        match available.iter().position(|&b| b == b'\n') {
            Some(i) => {
                reader.consume(i + 1);
                return Ok(skipped + i);
            }
            None => {
                let n = available.len();
                skipped += n;
                reader.consume(n);
            }
        }
    }
}
