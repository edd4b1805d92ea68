//! One executor boundary for every way a job runs.
//!
//! The core offers a job and takes it back; it never asks how the job runs.
//! [`Executors`] routes each offer to its evaluator's backend: the threads
//! of the [`Pool`] (builtin and process evaluators) or the worker sessions
//! of [`Remote`]. What happens to a job comes back as a [`Report`], which
//! the driver applies to the core: started, requeued (a worker went away),
//! finished (a lost worker is a finish with an error), refused.

pub mod eval;
pub mod pool;
pub mod process;
pub mod remote;

use crate::core::Gen;
use crate::error::EvalError;
use crate::exec::pool::{Job, JobCtl, Pool, PoolEvent, QueueFull};
use crate::exec::remote::{Orphan, Remote};
use crate::key::Key;
use crate::ns::Ns;
use crate::outbox::{Outbox, SessionId};
use std::collections::HashMap;
use std::sync::Arc;

/// What an executor reports of a job.
#[derive(Debug)]
pub enum Report {
    Started {
        evaluator: usize,
        gen: Gen,
        worker: Option<Arc<str>>,
    },
    Requeued {
        gen: Gen,
    },
    Finished {
        evaluator: usize,
        key: Key,
        gen: Gen,
        outcome: Result<Arc<str>, EvalError>,
        eval_ms: f64,
    },
    Refused {
        gen: Gen,
        reason: &'static str,
    },
    /// A running job reported progress (JSON text).
    Progress {
        gen: Gen,
        data: Arc<str>,
    },
}

/// The `busy` message for a full evaluation queue.
pub fn full_message(full: QueueFull) -> &'static str {
    match full {
        QueueFull::Jobs => crate::core::QUEUE_FULL,
        QueueFull::Bytes => crate::core::QUEUE_BYTES_FULL,
    }
}

/// The threads and the remote workers, behind one interface.
pub struct Executors {
    pool: Pool,
    /// The control of each job offered to the threads and not yet done.
    ctls: HashMap<Gen, Arc<JobCtl>>,
    remote: Remote,
    /// What the executors reported, for the driver to apply.
    reports: Vec<Report>,
}

impl Executors {
    pub fn new(pool: Pool, remote: Remote) -> Self {
        Executors {
            pool,
            ctls: HashMap::new(),
            remote,
            reports: Vec::new(),
        }
    }

    /// Reports gathered since the last call.
    pub fn take_reports(&mut self, into: &mut Vec<Report>) {
        into.append(&mut self.reports);
    }

    /// Worker sessions that had no room for a task since the last call.
    pub fn take_blocked(&mut self) -> Vec<Arc<crate::outbox::SessionCtl>> {
        self.remote.take_blocked()
    }

    pub fn remote(&self) -> &Remote {
        &self.remote
    }

    /// Queues job `gen`; a full queue is reported as `Refused`.
    pub fn offer(
        &mut self,
        evaluator: usize,
        key: Key,
        gen: Gen,
        input: Arc<str>,
        priority: crate::core::Priority,
    ) {
        let ctl = Arc::new(JobCtl::default());
        let job = Job {
            key,
            gen,
            input,
            priority,
            ctl: Arc::clone(&ctl),
        };
        if self.remote.is_remote(evaluator) {
            self.remote.enqueue(evaluator, job);
            self.pump(evaluator);
            return;
        }
        match self.pool.try_dispatch(evaluator, job) {
            Ok(()) => {
                self.ctls.insert(gen, ctl);
            }
            Err((_, full)) => self.reports.push(Report::Refused {
                gen,
                reason: full_message(full),
            }),
        }
    }

    /// Job `gen`, if still queued, now starts at `priority`.
    pub fn raise(&mut self, evaluator: usize, gen: Gen, priority: crate::core::Priority) {
        if self.remote.is_remote(evaluator) {
            self.remote.raise(evaluator, gen, priority);
        } else {
            self.pool.raise(evaluator, gen, priority);
        }
    }

    /// Takes job `gen` back: out of its queue, or from whoever runs it
    /// (a worker is sent `revoke`; a thread that overran is replaced).
    pub fn withdraw(&mut self, evaluator: usize, gen: Gen, overran: bool) {
        if self.remote.is_remote(evaluator) {
            self.remote.withdraw(evaluator, gen);
            self.pump(evaluator);
            return;
        }
        self.pool.unqueue(evaluator, gen);
        if let Some(ctl) = self.ctls.remove(&gen) {
            ctl.cancel();
            if overran {
                self.pool.overran(evaluator, &ctl);
            }
        }
    }

    /// A pool thread's news.
    pub fn pool_event(&mut self, event: PoolEvent) {
        match event {
            PoolEvent::Started { evaluator, gen, .. } => self.reports.push(Report::Started {
                evaluator,
                gen,
                worker: None,
            }),
            PoolEvent::Progress { gen, data } => self.reports.push(Report::Progress { gen, data }),
            PoolEvent::Done {
                evaluator,
                key,
                gen,
                outcome,
                eval_ms,
            } => {
                self.ctls.remove(&gen);
                self.reports.push(Report::Finished {
                    evaluator,
                    key,
                    gen,
                    outcome: outcome.map(Arc::from),
                    eval_ms,
                });
            }
        }
    }

    /// A worker session serves `evaluator` with `concurrency` slots.
    pub fn serve(
        &mut self,
        outbox: &Outbox,
        label: &Arc<str>,
        evaluator: usize,
        concurrency: usize,
        scope: Option<Ns>,
    ) {
        self.remote
            .serve(outbox, label, evaluator, concurrency, scope);
        self.pump(evaluator);
    }

    /// A worker session takes no new tasks of `evaluator`.
    pub fn unserve(&mut self, session: SessionId, evaluator: usize) {
        self.remote.unserve(session, evaluator);
    }

    /// A worker's outcome of a task; None if the session holds no such task.
    pub fn complete(
        &mut self,
        session: SessionId,
        task: &str,
        outcome: Result<String, String>,
        max_output: impl Fn(usize) -> (usize, Arc<str>),
    ) -> Option<()> {
        let sent = self.remote.complete(session, task)?;
        let evaluator = sent.evaluator;
        let (max, name) = max_output(evaluator);
        let outcome = match outcome {
            Ok(output) if output.len() > max => Err(EvalError::Failed(format!(
                "the worker's output is {} bytes; fn {name:?} takes at most {max} (max_output_bytes)",
                output.len(),
            ))),
            Ok(output) => Ok(Arc::from(output)),
            Err(message) => Err(EvalError::Failed(message)),
        };
        let eval_ms = sent.sent_at.elapsed().as_secs_f64() * 1000.0;
        self.reports.push(Report::Finished {
            evaluator,
            key: sent.queued.job.key,
            gen: sent.queued.job.gen,
            outcome,
            eval_ms,
        });
        self.pump(evaluator);
        Some(())
    }

    /// The worker session has written what it was sent: offer it more.
    pub fn drained(&mut self, session: SessionId) {
        for evaluator in self.remote.served_by(session) {
            self.pump(evaluator);
        }
    }

    /// A session ended: its tasks go back to their queues, or fail once
    /// out of attempts. Returns the evaluators it served.
    pub fn session_closed(
        &mut self,
        session: SessionId,
        max_attempts: impl Fn(usize) -> u32,
    ) -> Vec<usize> {
        let (orphans, served) = self.remote.session_closed(session);
        for orphan in orphans {
            match orphan {
                Orphan::Requeued { gen, .. } => self.reports.push(Report::Requeued { gen }),
                Orphan::Lost {
                    evaluator,
                    key,
                    gen,
                } => self.reports.push(Report::Finished {
                    evaluator,
                    key,
                    gen,
                    outcome: Err(EvalError::Failed(format!(
                        "worker lost: the workers running it went away {} times (max_attempts)",
                        max_attempts(evaluator)
                    ))),
                    eval_ms: 0.0,
                }),
            }
        }
        for evaluator in &served {
            self.pump(*evaluator);
        }
        served
    }

    fn pump(&mut self, evaluator: usize) {
        for sent in self.remote.dispatch(evaluator) {
            self.reports.push(Report::Started {
                evaluator,
                gen: sent.gen,
                worker: Some(sent.worker),
            });
        }
    }

    /// Hands back the threads, for shutdown.
    pub fn into_pool(self) -> Pool {
        self.pool
    }
}
