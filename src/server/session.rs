//! One WebSocket session: a reader that serves requests and a writer that
//! drains the session's outbound queue.
//!
//! The reader answers what it can by itself (cache hits, `ping`, request
//! errors) and hands misses, subscriptions and cancels to the hub. The
//! writer is the only code that writes to the socket: it batches frames
//! (`feed`, then one `flush`), sends heartbeats, and closes the session with
//! the code chosen by whoever asked first.

use crate::config::{Limits, Role};
use crate::core::Target;
use crate::error::ErrorCode;
use crate::exec::pool::EvaluatorSpec;
use crate::hub::{HubMsg, Waiter};
use crate::key::{canonical_json, Key};
use crate::metrics::NsMetrics;
use crate::outbox::{close, Frame, Outbox, SessionCtl};
use crate::protocol::{
    error_frame, parse_input, parse_request, unix_ms, FrameWriter, Invalidation, Op, ReqId,
    DRAINING_MESSAGE, PROTOCOL_VERSION,
};
use crate::server::auth::{Identity, ServeRight};
use crate::server::broker::Broker;
use crate::server::snapshot::WatchMsg;
use crate::server::tenants::Seat;
use futures::future::{Fuse, FutureExt};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::{interval_at, Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::WaitForCancellationFuture;
use tracing::{debug, info, Instrument};

/// Whether `identity` may use `op` (which fns it may serve is checked apart).
fn allows(identity: &Identity, op: &Op) -> bool {
    let worker_op = matches!(
        op,
        Op::Serve { .. } | Op::Unserve { .. } | Op::Complete { .. }
    );
    match identity.role {
        // Without tokens everyone is an agent that may also serve and
        // invalidate (as an admin may).
        Role::Agent => {
            (!worker_op && !matches!(op, Op::Invalidate(_)))
                || identity.serve != ServeRight::Nothing
        }
        Role::Admin => !worker_op || identity.serve != ServeRight::Nothing,
        Role::Viewer => matches!(
            op,
            Op::Watch { .. } | Op::Unwatch | Op::Get { .. } | Op::Ping
        ),
        Role::Worker => worker_op || matches!(op, Op::Ping),
    }
}

/// Serves one upgraded connection until it closes. The caller has taken a
/// connection slot with [`Broker::admit`]; it is given back here.
///
/// Only the socket's two halves go into the session's task (what a future
/// is given stays in it for its whole life), so an idle session stays small.
pub fn serve<S>(
    ws: WebSocketStream<S>,
    broker: Arc<Broker>,
    peer: SocketAddr,
    identity: Identity,
    seat: Seat,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let uuid = uuid::Uuid::new_v4();
    let span = tracing::info_span!("session", %peer, session = %uuid, token = %identity.name);
    let (sink, stream) = ws.split();
    run_session(sink, stream, broker, uuid, identity, seat).instrument(span)
}

async fn run_session<S>(
    sink: Sink<S>,
    stream: SplitStream<WebSocketStream<S>>,
    broker: Arc<Broker>,
    uuid: uuid::Uuid,
    identity: Identity,
    seat: Seat,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let id = broker.next_session_id();
    let role = identity.role;
    let label: Arc<str> = format!("{}/{}", identity.name, &uuid.simple().to_string()[..8]).into();
    let limits = &broker.config.limits;
    let ctl = Arc::new(SessionCtl::new(id, limits.outbound_bytes));
    broker.register_session(&ctl);
    let (outbox, rx) = Outbox::channel(Arc::clone(&ctl), limits.outbound_queue);
    outbox.push(hello(&broker, uuid, &identity));
    info!(role = role.as_str(), "session open");
    let reader = Reader {
        broker: &broker,
        outbox,
        identity: &identity,
        ns_metrics: &seat.metrics,
        label,
        watching: false,
    };
    tokio::join!(
        reader.run(stream, &ctl, limits),
        write_loop(sink, rx, &ctl, limits),
        expire(identity.expires, &ctl)
    );
    let closed = HubMsg::SessionClosed { session: id };
    if let Err(TrySendError::Full(closed)) = broker.hub.try_send(closed) {
        let _ = Box::pin(broker.hub.send(closed)).await;
    }
    broker.sessions.remove(&id);
    broker.release();
    let code = ctl.code();
    broker.metrics.record_close(code);
    info!(code, reason = ctl.reason(), "session closed");
}

fn hello(broker: &Broker, uuid: uuid::Uuid, identity: &Identity) -> String {
    let limits = serde_json::json!({
        "max_frame_bytes": broker.config.limits.max_frame_bytes,
        "max_pending": broker.config.limits.max_pending,
    });
    let namespace = if identity.sees_all {
        "*".into()
    } else {
        identity.ns.name()
    };
    FrameWriter::new("hello")
        .str("session", &uuid.to_string())
        .uint("protocol", PROTOCOL_VERSION.into())
        .str("server", concat!("herd/", env!("CARGO_PKG_VERSION")))
        .str("role", identity.role.as_str())
        .str("namespace", &namespace)
        .raw("limits", &limits.to_string())
        .finish()
}

/// Serves one request `text` from outside a WebSocket session (the HTTP
/// API) as a session's would be served: the same checks, cache, quotas and
/// hub; its frames go to `outbox`, whose session the caller closes.
pub async fn serve_one(
    broker: &Arc<Broker>,
    identity: &Identity,
    ns_metrics: &NsMetrics,
    outbox: Outbox,
    text: &str,
) {
    let mut reader = Reader {
        broker,
        outbox,
        identity,
        ns_metrics,
        label: format!("{}/http", identity.name).into(),
        watching: false,
    };
    let then = reader.handle(text);
    reader.act(then).await;
}

/// Closes the session with 1008 "token expired" when its signed token
/// expires (`expires`, Unix seconds, leeway included), unless it closes first.
async fn expire(expires: Option<u64>, ctl: &SessionCtl) {
    let Some(at) = expires else { return };
    let left = Duration::from_millis(at.saturating_mul(1000).saturating_sub(unix_ms()));
    tokio::select! {
        _ = tokio::time::sleep(left) => {
            info!("signed token expired");
            ctl.close_expired();
        }
        _ = ctl.closing().cancelled() => {}
    }
}

/// What is left to do for a request once it has been read: at most one wait.
enum Then<'a> {
    Reply(Frame),
    /// A cache hit: the reply, then its latency observed.
    Hit {
        frame: Frame,
        spec: &'a EvaluatorSpec,
        arrived: std::time::Instant,
    },
    Hub(HubMsg),
    Watchers(WatchMsg),
    Unwatch,
}

fn reject<'a>(id: &ReqId, code: ErrorCode, message: &str) -> Then<'a> {
    Then::Reply(error_frame(id, code.as_str(), message).into())
}

fn reject_draining<'a>(id: &ReqId) -> Then<'a> {
    reject(id, ErrorCode::ShuttingDown, DRAINING_MESSAGE)
}

/// The answer to a submit beyond its namespace's `submits_per_s`: the
/// bucket holds a submit again after `wait`.
fn rate_limited(id: &ReqId, wait: Duration) -> String {
    FrameWriter::new("error")
        .id_or_null(id)
        .str("code", ErrorCode::RateLimited.as_str())
        .str(
            "message",
            "too many submits in this namespace (its [[namespace]] submits_per_s)",
        )
        .uint("retry_after_ms", wait.as_millis().max(1) as u64)
        .finish()
}

/// The answer to a request naming a fn no evaluator serves.
fn reject_unknown_fn<'a>(id: &ReqId, name: &str) -> Then<'a> {
    let shown: String = name.chars().take(64).collect();
    reject(
        id,
        ErrorCode::UnknownFn,
        &format!("no evaluator is configured under fn {shown:?}"),
    )
}

struct Reader<'a> {
    broker: &'a Arc<Broker>,
    outbox: Outbox,
    identity: &'a Identity,
    /// Its namespace's figures.
    ns_metrics: &'a NsMetrics,
    /// How this session is shown as a worker (token name and session).
    label: Arc<str>,
    /// Whether this session has a `watch` running.
    watching: bool,
}

impl<'a> Reader<'a> {
    async fn run<S>(
        mut self,
        mut stream: SplitStream<WebSocketStream<S>>,
        ctl: &SessionCtl,
        limits: &Limits,
    ) where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // One registration for the session's life, not one per message.
        let closing = ctl.closing().cancelled();
        tokio::pin!(closing);
        while let Some(message) = next_message(&mut stream, &mut closing, ctl, limits).await {
            match message {
                Message::Text(text) => {
                    let then = self.handle(&text);
                    self.act(then).await
                }
                _ => {
                    self.outbox
                        .reply(error_frame(
                            &None,
                            ErrorCode::BadRequest.as_str(),
                            "binary frames are not accepted; send JSON in text frames",
                        ))
                        .await
                }
            }
        }
        self.unwatch().await;
    }

    /// Carries out what a request asked for: the one wait each request has.
    async fn act(&mut self, then: Then<'_>) {
        match then {
            Then::Reply(frame) => self.outbox.reply(frame).await,
            Then::Hit {
                frame,
                spec,
                arrived,
            } => {
                self.outbox.reply(frame).await;
                spec.metrics
                    .latency_seconds
                    .observe(arrived.elapsed().as_secs_f64());
            }
            // The hub outlives every session; a send fails only while the
            // broker stops. Waiting for room in its queue is the rare case.
            Then::Hub(msg) => {
                if let Err(TrySendError::Full(msg)) = self.broker.hub.try_send(msg) {
                    let _ = Box::pin(self.broker.hub.send(msg)).await;
                }
            }
            Then::Watchers(msg) => {
                let _ = Box::pin(self.broker.watchers.send(msg)).await;
            }
            Then::Unwatch => Box::pin(self.unwatch()).await,
        }
    }

    /// Serves one request as far as it can without waiting, and says what
    /// is left to wait for. Keeping every wait in [`Reader::act`] keeps the
    /// session's task small.
    fn handle(&mut self, text: &str) -> Then<'a> {
        let request = match parse_request(text) {
            Ok(r) => r,
            Err(rejection) => return Then::Reply(rejection.frame().into()),
        };
        let id = request.id;
        if !allows(self.identity, &request.op) {
            return reject(
                &id,
                ErrorCode::Forbidden,
                &format!(
                    "role {} may not use {}",
                    self.identity.role.as_str(),
                    request.op.name()
                ),
            );
        }
        match request.op {
            Op::Ping => Then::Reply(
                FrameWriter::new("pong")
                    .id(&id)
                    .uint("server_time_ms", unix_ms())
                    .finish()
                    .into(),
            ),
            Op::Submit {
                input,
                fn_name,
                wait,
                max_age_ms,
            } => {
                let max_age = max_age_ms.map(Duration::from_millis);
                self.submit(id, input, fn_name, wait, max_age)
            }
            Op::Get { key } => match self.broker.cache.get(&self.scoped(key)) {
                Some(hit) => Then::Reply(hit.cached.status_frame(&id, &key).into()),
                None => Then::Hub(HubMsg::Get {
                    key: self.scoped(key),
                    id,
                    outbox: self.outbox.clone(),
                }),
            },
            Op::Subscribe { key } => {
                let key = self.scoped(key);
                if let Some(hit) = self.broker.cache.get(&key) {
                    return Then::Reply(hit.result_frame(&id, &key).into());
                }
                if self.broker.is_draining() {
                    return reject_draining(&id);
                }
                Then::Hub(HubMsg::Subscribe {
                    waiter: self.waiter(key, id),
                })
            }
            Op::Cancel { key } => Then::Hub(HubMsg::Cancel {
                key: self.scoped(key),
                id,
                outbox: self.outbox.clone(),
            }),
            Op::Watch { interval_ms } => {
                self.watching = true;
                Then::Watchers(WatchMsg::Start {
                    id,
                    scope: (!self.identity.sees_all).then_some(self.identity.ns),
                    interval: Duration::from_millis(interval_ms),
                    outbox: self.outbox.clone(),
                })
            }
            Op::Unwatch => Then::Unwatch,
            Op::Serve {
                fn_name,
                concurrency,
            } => {
                let evaluator = match self.remote_fn(&id, &fn_name) {
                    Ok(evaluator) => evaluator,
                    Err(rejected) => return rejected,
                };
                if self.broker.is_draining() {
                    return reject_draining(&id);
                }
                Then::Hub(HubMsg::Serve {
                    outbox: self.outbox.clone(),
                    label: Arc::clone(&self.label),
                    evaluator,
                    concurrency,
                    id,
                })
            }
            Op::Unserve { fn_name } => match self.remote_fn(&id, &fn_name) {
                Ok(evaluator) => Then::Hub(HubMsg::Unserve {
                    outbox: self.outbox.clone(),
                    evaluator,
                    id,
                }),
                Err(rejected) => rejected,
            },
            Op::Invalidate(what) => {
                let target = match what {
                    Invalidation::Key(key) => Target::Key(key.in_ns(self.identity.ns)),
                    Invalidation::Fn(name) => match self.broker.evaluators.lookup(&name) {
                        Some(spec) => Target::Fn(self.identity.ns, spec.index),
                        None => return reject_unknown_fn(&id, &name),
                    },
                };
                Then::Hub(HubMsg::Invalidate {
                    target,
                    id,
                    outbox: self.outbox.clone(),
                })
            }
            Op::Complete { task, outcome } => Then::Hub(HubMsg::Complete {
                outbox: self.outbox.clone(),
                task,
                outcome,
                id,
            }),
        }
    }

    fn submit(
        &self,
        id: ReqId,
        input: &serde_json::value::RawValue,
        fn_name: Option<String>,
        wait: bool,
        max_age: Option<Duration>,
    ) -> Then<'a> {
        let broker: &'a Broker = self.broker;
        let arrived = std::time::Instant::now();
        let name = fn_name.as_deref().unwrap_or("default");
        let Some(spec) = broker.evaluators.lookup(name) else {
            return reject_unknown_fn(&id, name);
        };
        if !self.identity.may_submit(name) {
            let shown: String = name.chars().take(64).collect();
            return reject(
                &id,
                ErrorCode::Forbidden,
                &format!("token {:?} may not submit fn {shown:?}", self.identity.name),
            );
        }
        spec.metrics.submits.inc();
        self.ns_metrics.submits.inc();
        if broker.is_draining() {
            return reject_draining(&id);
        }
        if let Err(wait) = broker.tenants.take_submit(self.identity.ns) {
            self.ns_metrics.rate_limited.inc();
            return Then::Reply(rate_limited(&id, wait).into());
        }
        // A byte-identical input seen before: its key without parsing or hashing.
        let raw = input.get().as_bytes();
        let memoized = broker.memo.get(spec.index, raw).map(|key| self.scoped(key));
        if let Some(key) = memoized {
            if let Some(hit) = self.answer_from_cache(spec, &id, &key, arrived, max_age) {
                return hit;
            }
        }
        let input = match parse_input(input) {
            Ok(value) => value,
            Err(message) => return reject(&id, ErrorCode::BadRequest, &message),
        };
        let canonical = canonical_json(&input);
        drop(input);
        if canonical.len() > spec.max_input_bytes {
            return reject(
                &id,
                ErrorCode::BadRequest,
                &format!(
                    "input is {} bytes; fn {name:?} takes at most {} (max_input_bytes)",
                    canonical.len(),
                    spec.max_input_bytes
                ),
            );
        }
        let key = match memoized {
            Some(key) => key,
            None => {
                let key = Key::derive(name, canonical.as_bytes());
                broker.memo.insert(spec.index, raw, key);
                self.scoped(key)
            }
        };
        if let Some(hit) = self.answer_from_cache(spec, &id, &key, arrived, max_age) {
            return hit;
        }
        let evaluator = spec.index;
        let mut waiter = self.waiter(key, id);
        waiter.since = wait.then_some(arrived);
        Then::Hub(HubMsg::Submit {
            waiter,
            evaluator,
            input: canonical.into(),
            wait,
            max_age,
        })
    }

    /// The answer to a submit from the cache if `key` is there (counted as a hit).
    fn answer_from_cache(
        &self,
        spec: &'a EvaluatorSpec,
        id: &ReqId,
        key: &Key,
        arrived: std::time::Instant,
        max_age: Option<Duration>,
    ) -> Option<Then<'a>> {
        let hit = self.broker.cache.get_fresh(key, max_age)?;
        spec.metrics.cache_hits.inc();
        self.ns_metrics.cache_hits.inc();
        Some(Then::Hit {
            frame: hit.result_frame(id, key).into(),
            spec,
            arrived,
        })
    }

    /// A key a client sent, in this session's namespace.
    fn scoped(&self, key: Key) -> Key {
        key.in_ns(self.identity.ns)
    }

    fn waiter(&self, key: Key, id: ReqId) -> Waiter {
        Waiter {
            key,
            id,
            outbox: self.outbox.clone(),
            since: None,
        }
    }

    /// The index of remote evaluator `fn_name` if this session may serve it;
    /// otherwise the `unknown_fn` or `forbidden` answer.
    fn remote_fn(&self, id: &ReqId, fn_name: &str) -> Result<usize, Then<'a>> {
        let shown: String = fn_name.chars().take(64).collect();
        let Some(spec) = self
            .broker
            .evaluators
            .lookup(fn_name)
            .filter(|spec| spec.remote)
        else {
            return Err(reject(
                id,
                ErrorCode::UnknownFn,
                &format!("no remote evaluator is configured under fn {shown:?}"),
            ));
        };
        if !self.identity.serve.allows(fn_name) {
            return Err(reject(
                id,
                ErrorCode::Forbidden,
                &format!("token {:?} may not serve fn {shown:?}", self.identity.name),
            ));
        }
        Ok(spec.index)
    }

    async fn unwatch(&mut self) {
        if std::mem::take(&mut self.watching) {
            let session = self.outbox.session();
            let _ = self.broker.watchers.send(WatchMsg::Stop { session }).await;
        }
    }
}

fn is_graceful(code: u16) -> bool {
    code == close::NORMAL || code == close::GOING_AWAY
}

/// Resolves once the session is asked to close with a code that does not
/// wait for queued frames.
async fn hard_close(ctl: &SessionCtl) {
    ctl.closing().cancelled().await;
    if is_graceful(ctl.code()) {
        std::future::pending::<()>().await;
    }
}

/// While the writer sends the close frame, keeps reading (and dropping)
/// what the client still sends until its close reply, so the socket is not
/// torn down with unread data (which would reset the connection and could
/// cost the client the frames it has not read yet).
async fn linger<S>(stream: &mut SplitStream<WebSocketStream<S>>, limits: &Limits)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limit = Duration::from_millis(limits.close_timeout_ms);
    let _ = tokio::time::timeout(limit, async {
        while let Some(Ok(message)) = stream.next().await {
            if message.is_close() {
                break;
            }
        }
    })
    .await;
}

/// The next text or binary message, or None once the session ends: closing
/// was asked for (then it lingers for the client's close reply), the client
/// closed, or reading failed (the close code is set to say why).
async fn next_message<S>(
    stream: &mut SplitStream<WebSocketStream<S>>,
    closing: &mut Pin<&mut WaitForCancellationFuture<'_>>,
    ctl: &SessionCtl,
    limits: &Limits,
) -> Option<Message>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let next = tokio::select! {
            biased;
            next = stream.next() => next,
            _ = closing.as_mut() => {
                Box::pin(linger(stream, limits)).await;
                return None;
            }
        };
        ctl.mark_seen();
        match next {
            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => return Some(m),
            Some(Ok(Message::Close(_))) | None => {
                ctl.close_by_peer();
                return None;
            }
            Some(Ok(_)) => {}
            Some(Err(error)) => {
                debug!(%error, "read failed");
                ctl.close_with(close_code_for(&error));
                return None;
            }
        }
    }
}

/// The tokio-tungstenite settings for a session, from the limits.
pub fn websocket_config(limits: &Limits) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(limits.ws_read_buffer)
        .write_buffer_size(limits.ws_write_buffer)
        .max_write_buffer_size(limits.ws_max_write_buffer)
        .max_message_size(Some(limits.max_frame_bytes))
        .max_frame_size(Some(limits.max_frame_bytes))
}

/// The close code for a read error.
fn close_code_for(error: &WsError) -> u16 {
    match error {
        WsError::Capacity(_) => close::TOO_BIG,
        // The peer dropped the connection without a close frame.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => close::ABNORMAL,
        WsError::Protocol(_) => close::PROTOCOL_ERROR,
        WsError::Utf8(_) => close::INVALID_DATA,
        _ => close::ABNORMAL,
    }
}

/// Echoes every text and binary message back through the same outbound
/// queue and writer as a broker session: the transport without the broker,
/// for WebSocket conformance runs (examples/echo_server.rs).
pub async fn echo<S>(ws: WebSocketStream<S>, limits: &Limits)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ctl = Arc::new(SessionCtl::new(0, limits.outbound_bytes));
    let (outbox, rx) = Outbox::channel(Arc::clone(&ctl), limits.outbound_queue);
    let (sink, mut stream) = ws.split();
    let reader = async {
        let closing = ctl.closing().cancelled();
        tokio::pin!(closing);
        while let Some(message) = next_message(&mut stream, &mut closing, &ctl, limits).await {
            outbox.reply(Frame::Other(Box::new(message))).await;
        }
    };
    tokio::join!(reader, write_loop(sink, rx, &ctl, limits));
}

/// The writing half of a session's socket.
type Sink<S> = SplitSink<WebSocketStream<S>, Message>;

/// Writes one batch and hands back the sink and the (emptied) batch buffer.
async fn write_batch<S>(
    mut sink: Sink<S>,
    mut batch: Vec<Message>,
) -> (Sink<S>, Vec<Message>, Result<(), WsError>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut result = Ok(());
    for message in batch.drain(..) {
        if let Err(e) = sink.feed(message).await {
            result = Err(e);
            break;
        }
    }
    if result.is_ok() {
        result = sink.flush().await;
    }
    batch.clear();
    (sink, batch, result)
}

/// Writes queued frames in batches until the session closes, then sends
/// the close frame.
///
/// One loop, one select; each arm is one concern: the queue (gather a batch
/// and start writing it), the write in progress (its end, or its deadline:
/// a write that takes longer than `limits.write_timeout_ms` closes the
/// session with 4001), the heartbeat (checked even while a write is stuck),
/// and closing (a hard close abandons a write in progress; a graceful one
/// lets it finish, then sends what is still queued).
///
/// A write in progress and the close live on the heap only while they
/// run, so an idle session's task stays small.
async fn write_loop<S>(
    sink: Sink<S>,
    mut rx: mpsc::Receiver<Frame>,
    ctl: &SessionCtl,
    limits: &Limits,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let heartbeat = Duration::from_millis(limits.heartbeat_ms);
    let write_timeout = Duration::from_millis(limits.write_timeout_ms);
    let mut pings = interval_at(Instant::now() + heartbeat, heartbeat);
    pings.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut silent_intervals = 0u32;
    // The sink is here while idle and inside `write` while a batch is written.
    let mut sink = Some(sink);
    let mut batch: Vec<Message> = Vec::new();
    let mut batch_cost = 0usize;
    let mut ping_owed = false;
    let closing = ctl.closing().cancelled();
    let hard = hard_close(ctl);
    let mut write = Fuse::terminated();
    tokio::pin!(closing, hard);
    loop {
        let writing = sink.is_none();
        let mut start = false;
        tokio::select! {
            biased;
            _ = &mut hard => break,
            _ = &mut closing, if !writing => break,
            written = &mut write, if writing => {
                ctl.release(std::mem::take(&mut batch_cost));
                let Ok((done, used, result)) = written else {
                    debug!("write made no progress within write_timeout_ms");
                    ctl.close_with(close::SLOW_CONSUMER);
                    break;
                };
                let result: Result<(), WsError> = result;
                if result.is_err() {
                    ctl.close_with(close::ABNORMAL);
                    break;
                }
                sink = Some(done);
                // The batch's room is kept while frames wait, and given
                // back when the session goes quiet.
                if !rx.is_empty() {
                    batch = used;
                }
                if ping_owed {
                    ping_owed = false;
                    batch.push(Message::Ping(Default::default()));
                    start = true;
                }
            }
            frame = rx.recv(), if !writing => {
                let Some(frame) = frame else { break };
                batch_cost += ctl.cost(frame.len()) as usize;
                batch.extend(frame.into_messages());
                for _ in 1..limits.write_batch {
                    match rx.try_recv() {
                        Ok(frame) => {
                            batch_cost += ctl.cost(frame.len()) as usize;
                            batch.extend(frame.into_messages());
                        }
                        Err(_) => break,
                    }
                }
                start = true;
            }
            _ = pings.tick() => {
                if ctl.take_seen() {
                    silent_intervals = 0;
                } else {
                    silent_intervals += 1;
                    if silent_intervals >= 3 {
                        ctl.close_with(close::HEARTBEAT_TIMEOUT);
                        break;
                    }
                }
                if writing {
                    ping_owed = true;
                } else {
                    batch.push(Message::Ping(Default::default()));
                    start = true;
                }
            }
        }
        if start {
            let idle = sink.take().expect("a batch starts only while idle");
            let batch = std::mem::take(&mut batch);
            write = Box::pin(tokio::time::timeout(
                write_timeout,
                write_batch(idle, batch),
            ))
            .fuse();
        }
    }
    drop(write);
    Box::pin(finish_close(sink, rx, ctl, limits)).await;
    ctl.writer_stopped();
}

/// Sends the close frame (after what is still queued, for a graceful close),
/// within `limits.close_timeout_ms`.
async fn finish_close<S>(
    sink: Option<Sink<S>>,
    mut rx: mpsc::Receiver<Frame>,
    ctl: &SessionCtl,
    limits: &Limits,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let code = ctl.code();
    // Without the sink a write was abandoned midway: no frame can follow it.
    let Some(mut sink) = sink else { return };
    if code == close::ABNORMAL {
        return;
    }
    let finish = async {
        if ctl.closed_by_peer() {
            // tungstenite queued the close reply when it read the client's
            // close frame; nothing else may be sent after it.
            return sink.close().await;
        }
        if is_graceful(code) {
            // A graceful close still delivers what was already queued.
            while let Ok(frame) = rx.try_recv() {
                for message in frame.into_messages() {
                    sink.feed(message).await?;
                }
            }
        }
        sink.send(Message::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: ctl.reason().into(),
        })))
        .await?;
        sink.close().await
    };
    let close_timeout = Duration::from_millis(limits.close_timeout_ms);
    let _ = tokio::time::timeout(close_timeout, finish).await;
}
