//! Dashboard snapshots: built once per tick, beside the hub, for every watcher.
//!
//! The hub's only part is to hand out a view of its wait table
//! ([`HubMsg::View`]: the oldest in-flight entries and the recent
//! completions, copied, not sorted or encoded). This task asks for one view
//! per tick when some watcher is due, sorts and encodes it once, and sends
//! the same bytes to every watcher due at that tick: each gets a head of
//! its own (the id of its `watch`) and the shared tail, so ten open pages
//! cost one snapshot per tick, not ten.

use crate::cache::ResultCache;
use crate::config::Config;
use crate::error::ErrorCode;
use crate::exec::pool::EvaluatorTable;
use crate::hub::{HubMsg, HubView, Recent};
use crate::metrics::Metrics;
use crate::ns::Ns;
use crate::outbox::{Frame, Outbox, SessionId};
use crate::protocol::{error_frame, unix_ms, FrameWriter, ReqId, MIN_WATCH_INTERVAL_MS};
use bytes::Bytes;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// What sessions tell the renderer.
pub enum WatchMsg {
    /// Send this session a snapshot every `interval`, echoing `id`
    /// (replacing the session's earlier watch, if any).
    Start {
        id: ReqId,
        /// The namespace whose rows it sees; None: every namespace.
        scope: Option<Ns>,
        interval: Duration,
        outbox: Outbox,
    },
    /// Stop sending this session snapshots.
    Stop { session: SessionId },
}

struct Watcher {
    id: ReqId,
    scope: Option<Ns>,
    interval: Duration,
    outbox: Outbox,
    next: Instant,
    /// Its first snapshot, which carries the history, is still to come.
    fresh: bool,
}

#[derive(Serialize)]
struct Inflight<'a> {
    key: String,
    ns: Arc<str>,
    #[serde(rename = "fn")]
    fn_name: &'a str,
    state: &'static str,
    waiters: usize,
    age_ms: u64,
    input_preview: &'a str,
    /// The worker session running it (remote evaluators).
    #[serde(skip_serializing_if = "Option::is_none")]
    worker: Option<&'a str>,
    /// The broker evaluating it, while this one waits (cluster).
    #[serde(skip_serializing_if = "Option::is_none")]
    broker: Option<&'a str>,
    /// The highest priority its submits asked for.
    priority: u8,
    /// Its latest progress report, `{"seq":N,"data":…}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    progress: Option<Box<serde_json::value::RawValue>>,
}

/// The renderer task's state.
pub struct Renderer {
    hub: mpsc::Sender<HubMsg>,
    cache: Arc<ResultCache>,
    metrics: Arc<Metrics>,
    evaluators: Arc<EvaluatorTable>,
    watchers: HashMap<SessionId, Watcher>,
    max_watchers: usize,
    /// `[at_ms, submits, cache_hits, evaluations]` once a second, the
    /// last `dashboard.history_s` of them.
    history: std::collections::VecDeque<[u64; 4]>,
    history_len: usize,
}

/// The message of a `busy` answer beyond `dashboard.max_watchers`.
const WATCHERS_FULL: &str = "too many sessions are watching (dashboard.max_watchers)";

impl Renderer {
    pub fn new(
        config: &Config,
        hub: mpsc::Sender<HubMsg>,
        cache: Arc<ResultCache>,
        metrics: Arc<Metrics>,
        evaluators: Arc<EvaluatorTable>,
    ) -> Self {
        Renderer {
            hub,
            cache,
            metrics,
            evaluators,
            watchers: HashMap::new(),
            max_watchers: config.dashboard.max_watchers,
            history: std::collections::VecDeque::with_capacity(config.dashboard.history_s),
            history_len: config.dashboard.history_s,
        }
    }

    /// Serves watchers until `stop` is cancelled or every sender is gone.
    pub async fn run(mut self, mut inbox: mpsc::Receiver<WatchMsg>, stop: CancellationToken) {
        let mut ticks = tokio::time::interval(Duration::from_millis(MIN_WATCH_INTERVAL_MS));
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut samples = tokio::time::interval(Duration::from_secs(1));
        samples.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = samples.tick(), if self.history_len > 0 => self.sample(),
                msg = inbox.recv() => match msg {
                    Some(msg) => self.apply(msg),
                    None => break,
                },
                now = ticks.tick(), if !self.watchers.is_empty() => {
                    if !self.tick(now).await {
                        break;
                    }
                }
            }
        }
    }

    fn apply(&mut self, msg: WatchMsg) {
        match msg {
            WatchMsg::Start {
                id,
                scope,
                interval,
                outbox,
            } => {
                let session = outbox.session();
                if !self.watchers.contains_key(&session) && self.watchers.len() >= self.max_watchers
                {
                    self.metrics.record_busy("watchers");
                    return outbox.push(error_frame(&id, ErrorCode::Busy.as_str(), WATCHERS_FULL));
                }
                self.watchers.insert(
                    session,
                    Watcher {
                        id,
                        scope,
                        interval,
                        outbox,
                        next: Instant::now(),
                        fresh: true,
                    },
                );
            }
            WatchMsg::Stop { session } => {
                self.watchers.remove(&session);
            }
        }
    }

    /// Sends one snapshot to every watcher due at `now`; false once the hub is gone.
    async fn tick(&mut self, now: Instant) -> bool {
        // A watcher due within half a tick is served now rather than a tick late.
        let horizon = now + Duration::from_millis(MIN_WATCH_INTERVAL_MS / 2);
        if !self.watchers.values().any(|w| w.next <= horizon) {
            return true;
        }
        let (reply, view) = oneshot::channel();
        if self.hub.send(HubMsg::View { reply }).await.is_err() {
            return false;
        }
        let Ok(mut view) = view.await else {
            return false;
        };
        view.inflight.sort_unstable_by_key(|row| row.queued_at);
        let history = self
            .watchers
            .values()
            .any(|w| w.fresh && w.next <= horizon)
            .then(|| {
                let samples: Vec<&[u64; 4]> = self.history.iter().collect();
                to_json(&samples)
            });
        // One rendering per scope due: the whole, or one namespace's rows.
        let mut scopes: Vec<Option<Ns>> = self
            .watchers
            .values()
            .filter(|w| w.next <= horizon)
            .map(|w| w.scope)
            .collect();
        scopes.sort_unstable();
        scopes.dedup();
        for scope in scopes {
            let members = self.render(&view, scope);
            // A first snapshot carries the history as well.
            let first = history
                .as_ref()
                .map(|h| Bytes::from(members.clone().raw("history", h).finish()));
            let tail = Bytes::from(members.finish());
            self.metrics.snapshots_rendered.inc();
            let mut anonymous: Option<Frame> = None;
            let due = self
                .watchers
                .values_mut()
                .filter(|w| w.next <= horizon && w.scope == scope);
            for w in due {
                w.next = now + w.interval;
                if std::mem::take(&mut w.fresh) {
                    if let Some(first) = &first {
                        let head = FrameWriter::new("snapshot").id(&w.id).open();
                        w.outbox.push(Frame::split(head, first.clone()));
                        continue;
                    }
                }
                let frame = match &w.id {
                    Some(_) => {
                        Frame::split(FrameWriter::new("snapshot").id(&w.id).open(), tail.clone())
                    }
                    None => anonymous
                        .get_or_insert_with(|| {
                            Frame::split(FrameWriter::new("snapshot").open(), tail.clone())
                        })
                        .clone(),
                };
                w.outbox.push(frame);
            }
        }
        true
    }

    /// Records this second's counters, keeping the last `history_s`.
    fn sample(&mut self) {
        let t = self.metrics.totals(self.evaluators.figures());
        if self.history.len() == self.history_len {
            self.history.pop_front();
        }
        self.history
            .push_back([unix_ms(), t.submits, t.cache_hits, t.evaluations]);
    }

    /// The members of a snapshot after its `type` and `id`, to be closed
    /// (a watcher's first snapshot adds the history before).
    /// Rows of namespace `scope` only, when given.
    fn render(&self, view: &HubView, scope: Option<Ns>) -> FrameWriter {
        let inflight: Vec<Inflight> = view
            .inflight
            .iter()
            .filter(|row| scope.is_none_or(|ns| row.key.ns() == ns))
            .map(|row| Inflight {
                key: row.key.to_hex(),
                ns: row.key.ns().name(),
                fn_name: &self.evaluators.get(row.evaluator).name,
                state: if row.running { "running" } else { "queued" },
                waiters: row.waiters,
                age_ms: row.age_ms,
                input_preview: &row.preview,
                worker: row.worker.as_deref(),
                broker: row.elsewhere.as_deref().map(crate::core::claim_node),
                priority: row.priority,
                progress: row.progress.as_ref().and_then(|(seq, data)| {
                    serde_json::value::RawValue::from_string(crate::protocol::progress_json(
                        *seq, data,
                    ))
                    .ok()
                }),
            })
            .collect();
        let recent: Vec<&Recent> = view
            .recent
            .iter()
            .filter(|r| scope.is_none_or(|ns| r.scope == ns))
            .collect();
        let stats = self.metrics.stats(&self.cache, self.evaluators.figures());
        FrameWriter::tail(1024)
            .uint("at_ms", unix_ms())
            .raw("stats", &to_json(&stats))
            .raw("inflight", &to_json(&inflight))
            .raw("recent", &to_json(&recent))
            .raw("workers", &to_json(&view.workers))
            .raw("queues", &to_json(&view.queues))
    }
}

fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("snapshot parts serialize")
}
