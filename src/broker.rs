//! The broker's shared state: what every session and route can reach.
//!
//! It owns the cache, the metrics, the evaluator table, the sessions
//! registry and the hub's inbox; the wait table is not here (the hub task
//! owns it alone).

use crate::auth::Gate;
use crate::cache::ResultCache;
use crate::config::Config;
use crate::error::HerdError;
use crate::hub::{Hub, HubMsg};
use crate::metrics::Metrics;
use crate::outbox::{SessionCtl, SessionId};
use crate::pool::{EvaluatorTable, Pool};
use dashmap::DashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Everything a running broker shares.
pub struct Broker {
    pub config: Config,
    /// Who may open a session.
    pub gate: Gate,
    pub cache: Arc<ResultCache>,
    pub metrics: Arc<Metrics>,
    pub evaluators: Arc<EvaluatorTable>,
    pub hub: mpsc::Sender<HubMsg>,
    /// Set once shutdown begins: no new work, `/readyz` answers 503.
    pub draining: Arc<AtomicBool>,
    /// Open sessions, so shutdown can close each with 1001.
    pub sessions: DashMap<SessionId, Arc<SessionCtl>>,
    /// Session tasks, awaited on shutdown.
    pub session_tasks: TaskTracker,
    pub ws_config: WebSocketConfig,
    next_session: AtomicU64,
    connections: AtomicUsize,
    jobs: watch::Receiver<usize>,
    hub_stop: CancellationToken,
    hub_task: Mutex<Option<JoinHandle<Pool>>>,
}

impl Broker {
    /// Starts the evaluator threads and the hub task on the current runtime.
    pub fn start(config: Config) -> Result<Arc<Broker>, HerdError> {
        config.validate()?;
        let gate = Gate::new(&config)?;
        let evaluator_configs = config.effective_evaluators();
        let metrics = Arc::new(Metrics::new());
        let evaluators = Arc::new(EvaluatorTable::new(&evaluator_configs, &metrics));
        let cache = Arc::new(ResultCache::new(&config.cache));
        let draining = Arc::new(AtomicBool::new(false));
        let (hub_tx, hub_rx) = mpsc::channel(config.limits.hub_queue);
        let (jobs_tx, jobs_rx) = watch::channel(0usize);
        let pool = Pool::start(&evaluator_configs, &evaluators, hub_tx.clone())?;
        let hub = Hub::new(
            &config,
            pool,
            Arc::clone(&evaluators),
            Arc::clone(&cache),
            Arc::clone(&metrics),
            Arc::clone(&draining),
            jobs_tx,
        );
        let hub_stop = CancellationToken::new();
        let hub_task = tokio::spawn(hub.run(hub_rx, hub_stop.clone()));
        let ws_config = crate::session::websocket_config(&config.limits);
        Ok(Arc::new(Broker {
            config,
            gate,
            cache,
            metrics,
            evaluators,
            hub: hub_tx,
            draining,
            sessions: DashMap::new(),
            session_tasks: TaskTracker::new(),
            ws_config,
            next_session: AtomicU64::new(1),
            connections: AtomicUsize::new(0),
            jobs: jobs_rx,
            hub_stop,
            hub_task: Mutex::new(Some(hub_task)),
        }))
    }

    /// Takes a connection slot; false when `max_connections` are open.
    pub fn admit(&self) -> bool {
        let before = self.connections.fetch_add(1, Ordering::AcqRel);
        if before >= self.config.limits.max_connections {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        self.metrics.connections.inc();
        true
    }

    /// Gives back a slot taken by [`Broker::admit`].
    pub fn release(&self) {
        self.connections.fetch_sub(1, Ordering::AcqRel);
        self.metrics.connections.dec();
    }

    pub fn next_session_id(&self) -> SessionId {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Stops taking work and waits until no evaluation is queued or running.
    pub async fn drain(&self) {
        self.draining.store(true, Ordering::Release);
        let mut jobs = self.jobs.clone();
        let _ = jobs.wait_for(|n| *n == 0).await;
    }

    /// Asks every open session to close with `code`.
    pub fn close_sessions(&self, code: u16) {
        for session in self.sessions.iter() {
            session.close_with(code);
        }
    }

    /// Stops the hub and the evaluator threads, waiting at most `grace` for
    /// threads still inside an evaluation.
    pub async fn stop(&self, grace: Duration) {
        self.hub_stop.cancel();
        let task = self.hub_task.lock().expect("hub task lock").take();
        if let Some(task) = task {
            if let Ok(pool) = task.await {
                let join = tokio::task::spawn_blocking(move || pool.shutdown());
                if tokio::time::timeout(grace, join).await.is_err() {
                    tracing::warn!(
                        "evaluator threads still busy after shutdown grace; leaving them"
                    );
                }
            }
        }
    }
}
