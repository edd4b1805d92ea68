//! Remote evaluators: worker sessions as the pool of a `remote` fn.
//!
//! A `remote` evaluator has no threads. Its queue lives here, and its pool
//! is the set of sessions that `serve` its fn, each with a `concurrency`.
//! The hub owns this state (it is part of the singular update queue) and
//! calls in on every change: a job queued, a worker serving, a `complete`,
//! a session gone, a deadline passed. Workers are reached only through
//! their outboxes (`task` and `revoke` frames), never awaited.
//!
//! Rules kept here:
//! - a task goes to a serving session with free concurrency, the one with
//!   the fewest tasks outstanding first, and to one session at a time;
//! - a session never holds more than its `concurrency` tasks of a fn;
//! - a `complete` counts only from the session that holds the task;
//! - tasks are taken in the order of a [`RunQueue`], as the threads take
//!   theirs: highest priority first, namespaces in turn at equal priority,
//!   then arrival order (a worker of one namespace takes the first of its
//!   namespace's);
//! - the tasks of a session that ends go back to their place in the queue,
//!   their namespace's turn first, with one more attempt, until
//!   `max_attempts`.

use crate::config::EvaluatorConfig;
use crate::core::RunQueue;
use crate::exec::pool::Job;
use crate::key::Key;
use crate::ns::Ns;
use crate::outbox::{Outbox, SessionId};
use crate::protocol::{unix_ms, FrameWriter};
use serde::Serialize;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A job waiting for a worker, with the attempts it has had.
pub struct Queued {
    pub job: Job,
    pub attempt: u32,
    /// Its place in arrival order, kept when it is queued again.
    pub seq: u64,
}

/// A job a worker holds.
pub struct Sent {
    pub evaluator: usize,
    pub queued: Queued,
    pub session: SessionId,
    pub sent_at: Instant,
}

/// A task handed to a worker.
pub struct Dispatched {
    pub key: Key,
    pub gen: u64,
    pub worker: Arc<str>,
}

/// What became of the tasks of a worker session that ended.
pub enum Orphan {
    /// Back at the front of its queue.
    Requeued { key: Key, gen: u64 },
    /// Out of attempts: its waiters get `eval_failed`.
    Lost {
        evaluator: usize,
        key: Key,
        gen: u64,
    },
}

struct RemoteQueue {
    name: Arc<str>,
    /// Jobs waiting for a worker. The core bounds how many it offers.
    queue: RunQueue<Queued>,
    timeout: Duration,
    max_attempts: u32,
    /// Sessions serving this fn, in the order they started.
    servers: Vec<SessionId>,
}

struct Slot {
    concurrency: usize,
    outstanding: usize,
    serving: bool,
}

struct Worker {
    outbox: Outbox,
    label: Arc<str>,
    /// The only namespace whose tasks it is given (None: every namespace).
    scope: Option<Ns>,
    slots: HashMap<usize, Slot>,
    tasks: HashSet<u64>,
    /// When it first offered to serve (Unix ms).
    since_ms: u64,
    /// Tasks it completed.
    done: u64,
    /// Tasks taken back from it (`revoke`).
    revoked: u64,
}

/// A worker session, for the dashboard.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerRow {
    /// Its token name and session.
    pub name: Arc<str>,
    /// The fns it serves now.
    pub fns: Vec<Arc<str>>,
    /// Tasks it takes at once, over those fns.
    pub concurrency: usize,
    pub in_flight: usize,
    pub done: u64,
    pub revoked: u64,
    pub since_ms: u64,
}

/// A remote fn's queue, for the dashboard.
#[derive(Debug, Clone, Serialize)]
pub struct QueueRow {
    #[serde(rename = "fn")]
    pub fn_name: Arc<str>,
    /// Jobs waiting for a worker.
    pub queued: usize,
    /// Worker sessions serving it (0: `no_workers`).
    pub workers: usize,
}

/// The queues of the remote evaluators and the sessions serving them.
pub struct Remote {
    queues: HashMap<usize, RemoteQueue>,
    workers: HashMap<SessionId, Worker>,
    tasks: HashMap<u64, Sent>,
    /// The task of each job generation a worker holds.
    by_gen: HashMap<u64, u64>,
    next_task: u64,
    /// Worker sessions whose outbox had no room for a task, since the last
    /// [`Remote::take_blocked`].
    blocked: Vec<Arc<crate::outbox::SessionCtl>>,
}

impl Remote {
    /// The remote evaluators among `configs` (by their index).
    pub fn new(configs: &[EvaluatorConfig]) -> Self {
        let queues = configs
            .iter()
            .enumerate()
            .filter(|(_, c)| c.kind == crate::config::EvaluatorKind::Remote)
            .map(|(i, c)| {
                (
                    i,
                    RemoteQueue {
                        name: c.name.as_str().into(),
                        queue: RunQueue::default(),
                        timeout: Duration::from_millis(c.timeout_ms),
                        max_attempts: c.max_attempts,
                        servers: Vec::new(),
                    },
                )
            })
            .collect();
        Remote {
            queues,
            workers: HashMap::new(),
            tasks: HashMap::new(),
            by_gen: HashMap::new(),
            next_task: 1,
            blocked: Vec::new(),
        }
    }

    pub fn is_remote(&self, evaluator: usize) -> bool {
        self.queues.contains_key(&evaluator)
    }

    /// Sessions serving `evaluator`.
    pub fn servers(&self, evaluator: usize) -> usize {
        self.queues.get(&evaluator).map_or(0, |q| q.servers.len())
    }

    /// The evaluators `session` serves.
    pub fn served_by(&self, session: SessionId) -> Vec<usize> {
        self.workers
            .get(&session)
            .map(|w| {
                w.slots
                    .iter()
                    .filter(|(_, s)| s.serving)
                    .map(|(e, _)| *e)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Worker sessions that had no room for a task since the last call.
    pub fn take_blocked(&mut self) -> Vec<Arc<crate::outbox::SessionCtl>> {
        std::mem::take(&mut self.blocked)
    }

    /// Queues a job, last of its priority and namespace.
    pub fn enqueue(&mut self, evaluator: usize, job: Job) {
        let q = self.queues.get_mut(&evaluator).expect("a remote evaluator");
        let (gen, ns, priority) = (job.gen, job.key.ns(), job.priority);
        let queued = Queued {
            job,
            attempt: 1,
            seq: 0,
        };
        q.queue.push(gen, ns, priority, queued);
    }

    /// Job `gen` of `evaluator`, if still queued, now starts at `priority`.
    pub fn raise(&mut self, evaluator: usize, gen: u64, priority: crate::core::Priority) {
        if let Some(q) = self.queues.get_mut(&evaluator) {
            q.queue.raise(gen, priority);
        }
    }

    /// The job generation of task `task`, if `session` holds it.
    pub fn task_gen(&self, session: SessionId, task: &str) -> Option<u64> {
        let sent = self.tasks.get(&task.parse().ok()?)?;
        (sent.session == session).then_some(sent.queued.job.gen)
    }

    /// Hands queued tasks to sessions with free concurrency, the least
    /// loaded first, each only while its outbox keeps room (flow control:
    /// a worker that reads its frames is never closed for a full queue).
    /// A worker scoped to a namespace is given the first task in line of
    /// that namespace, and none of another.
    pub fn dispatch(&mut self, evaluator: usize) -> Vec<Dispatched> {
        let mut sent = Vec::new();
        let Some(q) = self.queues.get_mut(&evaluator) else {
            return sent;
        };
        if q.queue.is_empty() {
            return sent;
        }
        let mut free: BinaryHeap<Reverse<(usize, SessionId)>> = q
            .servers
            .iter()
            .filter_map(|s| {
                let slot = self.workers.get(s)?.slots.get(&evaluator)?;
                (slot.serving && slot.outstanding < slot.concurrency)
                    .then_some(Reverse((slot.outstanding, *s)))
            })
            .collect();
        while let Some(Reverse((_, session))) = free.pop() {
            let worker = self.workers.get_mut(&session).expect("a serving worker");
            let scope = worker.scope;
            let may = |ns| scope.is_none_or(|s| s == ns);
            let Some((_, queued)) = q.queue.peek_where(may) else {
                if q.queue.is_empty() {
                    break;
                }
                continue;
            };
            let slot = worker.slots.get_mut(&evaluator).expect("a slot");
            let task = self.next_task;
            let deadline = unix_ms().saturating_add(q.timeout.as_millis() as u64);
            let mut frame = FrameWriter::with_capacity("task", 160 + queued.job.input.len())
                .str("task", itoa::Buffer::new().format(task))
                .key(&queued.job.key)
                .str("ns", &queued.job.key.ns().name())
                .str("fn", &q.name)
                .raw("input", &queued.job.input)
                .uint("deadline_ms", deadline);
            if queued.attempt > 1 {
                frame = frame.uint("attempt", u64::from(queued.attempt));
            }
            if worker.outbox.try_push_half(frame.finish().into()).is_err() {
                self.blocked.push(Arc::clone(worker.outbox.ctl()));
                continue;
            }
            let taken = q.queue.pop_where(may).expect("just seen");
            let mut queued = taken.item;
            queued.seq = taken.seq;
            queued.job.priority = taken.priority;
            self.next_task += 1;
            slot.outstanding += 1;
            worker.tasks.insert(task);
            if slot.outstanding < slot.concurrency {
                free.push(Reverse((slot.outstanding, session)));
            }
            sent.push(Dispatched {
                key: queued.job.key,
                gen: queued.job.gen,
                worker: Arc::clone(&worker.label),
            });
            self.by_gen.insert(queued.job.gen, task);
            self.tasks.insert(
                task,
                Sent {
                    evaluator,
                    queued,
                    session,
                    sent_at: Instant::now(),
                },
            );
        }
        sent
    }

    /// A session offers `concurrency` slots for `evaluator` (again: the new
    /// concurrency replaces the old), for the tasks of namespace `scope`
    /// only, or of every namespace (None).
    pub fn serve(
        &mut self,
        outbox: &Outbox,
        label: &Arc<str>,
        evaluator: usize,
        concurrency: usize,
        scope: Option<Ns>,
    ) {
        let session = outbox.session();
        let worker = self.workers.entry(session).or_insert_with(|| Worker {
            outbox: outbox.clone(),
            label: Arc::clone(label),
            scope,
            slots: HashMap::new(),
            tasks: HashSet::new(),
            since_ms: unix_ms(),
            done: 0,
            revoked: 0,
        });
        let slot = worker.slots.entry(evaluator).or_insert(Slot {
            concurrency,
            outstanding: 0,
            serving: true,
        });
        slot.concurrency = concurrency;
        slot.serving = true;
        let q = self.queues.get_mut(&evaluator).expect("a remote evaluator");
        if !q.servers.contains(&session) {
            q.servers.push(session);
        }
    }

    /// A session takes no new tasks of `evaluator`; those it holds still count.
    pub fn unserve(&mut self, session: SessionId, evaluator: usize) {
        if let Some(slot) = self
            .workers
            .get_mut(&session)
            .and_then(|w| w.slots.get_mut(&evaluator))
        {
            slot.serving = false;
        }
        if let Some(q) = self.queues.get_mut(&evaluator) {
            q.servers.retain(|s| *s != session);
        }
    }

    /// The task `task` if `session` holds it; it is no longer outstanding.
    pub fn complete(&mut self, session: SessionId, task: &str) -> Option<Sent> {
        let task: u64 = task.parse().ok()?;
        if self.tasks.get(&task)?.session != session {
            return None;
        }
        let sent = self.tasks.remove(&task)?;
        self.release(&sent, task);
        if let Some(worker) = self.workers.get_mut(&session) {
            worker.done += 1;
        }
        Some(sent)
    }

    /// The worker sessions (at most `limit`, longest connected first) and
    /// every remote fn's queue, for the dashboard.
    pub fn view(&self, limit: usize) -> (Vec<WorkerRow>, Vec<QueueRow>) {
        let mut workers: Vec<WorkerRow> = self
            .workers
            .values()
            .map(|w| {
                let serving = || w.slots.iter().filter(|(_, s)| s.serving);
                WorkerRow {
                    name: Arc::clone(&w.label),
                    fns: serving()
                        .map(|(e, _)| Arc::clone(&self.queues[e].name))
                        .collect(),
                    concurrency: serving().map(|(_, s)| s.concurrency).sum(),
                    in_flight: w.tasks.len(),
                    done: w.done,
                    revoked: w.revoked,
                    since_ms: w.since_ms,
                }
            })
            .collect();
        workers.sort_by(|a, b| (a.since_ms, &a.name).cmp(&(b.since_ms, &b.name)));
        workers.truncate(limit);
        let mut queues: Vec<QueueRow> = self
            .queues
            .values()
            .map(|q| QueueRow {
                fn_name: Arc::clone(&q.name),
                queued: q.queue.len(),
                workers: q.servers.len(),
            })
            .collect();
        queues.sort_by(|a, b| a.fn_name.cmp(&b.fn_name));
        (workers, queues)
    }

    fn release(&mut self, sent: &Sent, task: u64) {
        self.by_gen.remove(&sent.queued.job.gen);
        if let Some(worker) = self.workers.get_mut(&sent.session) {
            worker.tasks.remove(&task);
            if let Some(slot) = worker.slots.get_mut(&sent.evaluator) {
                slot.outstanding -= 1;
            }
        }
    }

    /// Takes job `gen` of `evaluator` back: out of the queue, or from the
    /// worker holding it (which is sent `revoke`).
    pub fn withdraw(&mut self, evaluator: usize, gen: u64) {
        if let Some(task) = self.by_gen.get(&gen).copied() {
            if let Some(sent) = self.tasks.remove(&task) {
                self.release(&sent, task);
                if let Some(worker) = self.workers.get_mut(&sent.session) {
                    worker.revoked += 1;
                    worker.outbox.push(
                        FrameWriter::new("revoke")
                            .str("task", itoa::Buffer::new().format(task))
                            .finish(),
                    );
                }
            }
            return;
        }
        if let Some(q) = self.queues.get_mut(&evaluator) {
            q.queue.remove(gen);
        }
    }

    /// The session ended: it serves nothing more, and its tasks go back to
    /// the front of their queues, or fail once out of attempts. Returns
    /// what became of each, and the evaluators it served.
    pub fn session_closed(&mut self, session: SessionId) -> (Vec<Orphan>, Vec<usize>) {
        let Some(worker) = self.workers.remove(&session) else {
            return (Vec::new(), Vec::new());
        };
        let served: Vec<usize> = worker.slots.keys().copied().collect();
        for evaluator in &served {
            if let Some(q) = self.queues.get_mut(evaluator) {
                q.servers.retain(|s| *s != session);
            }
        }
        let mut orphans = Vec::new();
        let mut tasks: Vec<u64> = worker.tasks.into_iter().collect();
        tasks.sort_unstable();
        for task in tasks {
            let Some(mut sent) = self.tasks.remove(&task) else {
                continue;
            };
            self.by_gen.remove(&sent.queued.job.gen);
            let (key, gen) = (sent.queued.job.key, sent.queued.job.gen);
            let q = self
                .queues
                .get_mut(&sent.evaluator)
                .expect("a remote evaluator");
            if sent.queued.attempt >= q.max_attempts {
                orphans.push(Orphan::Lost {
                    evaluator: sent.evaluator,
                    key,
                    gen,
                });
                continue;
            }
            sent.queued.attempt += 1;
            let (ns, priority, seq) = (key.ns(), sent.queued.job.priority, sent.queued.seq);
            q.queue.requeue(gen, ns, priority, seq, sent.queued);
            orphans.push(Orphan::Requeued { key, gen });
        }
        (orphans, served)
    }
}
