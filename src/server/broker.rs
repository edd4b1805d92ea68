//! The broker's shared state: what every session and route can reach.
//!
//! It owns the cache, the metrics, the evaluator table, the sessions
//! registry, the hub's inbox and the snapshot renderer's; the wait table is
//! not here (the hub task owns it alone).

use crate::cache::{Layout, ResultCache};
use crate::cluster::{exchange, listen, Exchange, Listener, Shell};
use crate::config::Config;
use crate::error::HerdError;
use crate::exec::pool::{EvaluatorTable, Pool};
use crate::hub::{Hub, HubInputs, HubMsg};
use crate::memo::KeyMemo;
use crate::metrics::Metrics;
use crate::ns::Ns;
use crate::outbox::{SessionCtl, SessionId};
use crate::server::auth::Gate;
use crate::server::snapshot::{Renderer, WatchMsg};
use crate::server::tenants::Tenants;
use dashmap::DashMap;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Everything a running broker shares. Sessions and routes read it; each
/// field says who writes it.
pub struct Broker {
    /// The configuration in force; never changes.
    pub config: Config,
    /// Who may open a session.
    pub gate: Gate,
    /// Namespaces' quotas on sessions and submits.
    pub tenants: Arc<Tenants>,
    /// The results cache: read by sessions, written by the hub.
    pub cache: Arc<ResultCache>,
    /// Counters and gauges; anyone counts.
    pub metrics: Arc<Metrics>,
    /// The evaluators by name, with their limits, health and metrics.
    pub evaluators: Arc<EvaluatorTable>,
    /// The hub's inbox: every change to the wait table goes through it.
    pub hub: mpsc::Sender<HubMsg>,
    /// The snapshot renderer's inbox: `watch` and `unwatch`.
    pub watchers: mpsc::Sender<WatchMsg>,
    /// Set once shutdown begins: no new work, `/readyz` answers 503.
    pub draining: Arc<AtomicBool>,
    /// Open sessions, so shutdown can close each with 1001; sessions add
    /// and remove themselves.
    pub sessions: DashMap<SessionId, Arc<SessionCtl>>,
    /// Session tasks, awaited on shutdown.
    pub session_tasks: TaskTracker,
    /// Raw inputs to keys (sessions read and fill it).
    pub memo: KeyMemo,
    next_session: AtomicU64,
    connections: AtomicUsize,
    /// Room for HTTP API requests at once (`limits.max_http_requests`).
    pub http_requests: Arc<tokio::sync::Semaphore>,
    /// The close code every session gets once shutdown closes them (0 before),
    /// so a session that registers while they are being closed closes too.
    closing_all: AtomicU16,
    /// Jobs queued or running, as the hub publishes them.
    jobs: watch::Receiver<usize>,
    /// Stops the hub and the renderer.
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
        let listed = config
            .namespaces
            .iter()
            .filter_map(|n| Some((Ns::find(&n.name)?, n)));
        let layout = Layout {
            own: listed
                .clone()
                .filter_map(|(ns, n)| Some((ns, n.cache_bytes?)))
                .collect(),
            together: config.namespace_defaults.cache_bytes_together,
            listed: listed.map(|(ns, _)| ns).collect(),
        };
        let cache = Arc::new(ResultCache::new(
            &config.cache,
            evaluator_configs.len(),
            layout,
            config.cluster.redis.is_some(),
        ));
        let draining = Arc::new(AtomicBool::new(false));
        let (hub_tx, hub_rx) = mpsc::channel(config.limits.hub_queue);
        let (jobs_tx, jobs_rx) = watch::channel(0usize);
        let (events_tx, events_rx) = mpsc::channel(config.limits.hub_queue);
        let pool = Pool::start(&evaluator_configs, &evaluators, events_tx)?;
        let hub_stop = CancellationToken::new();
        let node = config.cluster.node_name();
        let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        let core = crate::hub::core_config(&config, &node, &run);
        let (cluster, cluster_events) = match &core.cluster {
            Some(settings) => {
                metrics.set_clustered();
                metrics.cluster_up.set(0);
                metrics.cluster_pubsub_up.set(0);
                tracing::info!(node = %node, "cluster mode");
                let (events_tx, events_rx) = mpsc::channel(config.limits.hub_queue);
                let (commands_tx, commands_rx) = mpsc::unbounded_channel();
                let shell = Shell::new(&config.cluster, events_tx.clone())?;
                let connector = shell.connector();
                let limit = Duration::from_millis(config.cluster.redis_timeout_ms);
                let listener = Listener {
                    channel: format!("{}done", settings.prefix),
                    hub: events_tx,
                    ping: settings.lease / 3,
                    timeout: limit,
                    max_stored: settings.max_stored,
                };
                tokio::spawn(listen(listener, connector.clone(), hub_stop.clone()));
                let gauge = metrics.cluster_up.clone();
                tokio::spawn(crate::cluster::warn_while_down(
                    connector.clone(),
                    move || gauge.get() == 1,
                    (settings.lease * 2).max(limit * 2),
                    Duration::from_secs(config.cluster.down_warning_s),
                    hub_stop.clone(),
                ));
                let local = {
                    let (metrics, evaluators) = (Arc::clone(&metrics), Arc::clone(&evaluators));
                    Box::new(move || metrics.totals(evaluators.figures()))
                };
                let figures = Exchange {
                    node: node.clone(),
                    run: run.clone(),
                    prefix: settings.prefix.clone(),
                    lease: settings.lease,
                    limit,
                    max: settings.max_stored,
                    local,
                };
                tokio::spawn(exchange(
                    figures,
                    connector,
                    Arc::clone(&metrics),
                    hub_stop.clone(),
                ));
                tokio::spawn(shell.run(commands_rx, hub_stop.clone()));
                (Some(commands_tx), Some(events_rx))
            }
            None => (None, None),
        };
        let hub = Hub::new(
            &config,
            core,
            pool,
            Arc::clone(&evaluators),
            Arc::clone(&cache),
            Arc::clone(&metrics),
            Arc::clone(&draining),
            jobs_tx,
            cluster,
        );
        let inputs = HubInputs {
            inbox: hub_rx,
            myself: hub_tx.downgrade(),
            events: events_rx,
            cluster: cluster_events,
        };
        let hub_task = tokio::spawn(supervised(hub.run(inputs, hub_stop.clone())));
        let (watch_tx, watch_rx) = mpsc::channel(config.limits.hub_queue);
        let renderer = Renderer::new(
            &config,
            hub_tx.clone(),
            Arc::clone(&cache),
            Arc::clone(&metrics),
            Arc::clone(&evaluators),
        );
        tokio::spawn(renderer.run(watch_rx, hub_stop.clone()));
        let memo = KeyMemo::new(
            config.limits.key_memo_entries,
            config.limits.key_memo_max_input_bytes,
        );
        let tenants = Arc::new(Tenants::new(&config, Arc::clone(&metrics)));
        let http_requests = Arc::new(tokio::sync::Semaphore::new(config.limits.max_http_requests));
        Ok(Arc::new(Broker {
            config,
            gate,
            tenants,
            cache,
            metrics,
            evaluators,
            hub: hub_tx,
            watchers: watch_tx,
            draining,
            sessions: DashMap::new(),
            session_tasks: TaskTracker::new(),
            memo,
            next_session: AtomicU64::new(1),
            connections: AtomicUsize::new(0),
            http_requests,
            closing_all: AtomicU16::new(0),
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

    /// Adds a session to the registry; if shutdown is already closing
    /// sessions, this one is asked to close as well.
    pub fn register_session(&self, ctl: &Arc<SessionCtl>) {
        self.sessions.insert(ctl.id, Arc::clone(ctl));
        let code = self.closing_all.load(Ordering::SeqCst);
        if code != 0 {
            ctl.close_with(code);
        }
    }

    /// Asks every open session, and every session registered from now on,
    /// to close with `code`.
    pub fn close_sessions(&self, code: u16) {
        self.closing_all.store(code, Ordering::SeqCst);
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

/// Runs the hub; if it panics, says so in one line and ends the process
/// (exit status 70): a broker whose hub is gone answers nothing, so it
/// must not go on answering `/healthz`.
async fn supervised(hub: impl std::future::Future<Output = Pool>) -> Pool {
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(hub).catch_unwind().await {
        Ok(pool) => pool,
        Err(panic) => {
            tracing::error!(
                panic = %crate::error::panic_message(panic.as_ref()),
                "the hub's task panicked; exiting"
            );
            std::process::exit(70);
        }
    }
}
